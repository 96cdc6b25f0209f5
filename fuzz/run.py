"""atheris (libFuzzer for Python) harness for the targets in ``fuzz/targets.py``.

    python -m fuzz.run TARGET [libFuzzer options] [corpus dirs...]

TARGET is one of qmp_framing, qmp_arguments, qcow2_header, qcow2_image, qcow2_image_rw.  The Makefile's
``fuzz-deep`` target runs each one for a while with a scratch corpus seeded from ``fuzz/corpus/<target>/``
(``fuzz/corpus/qcow2_image/`` for both image targets), ``-rss_limit_mb`` for memory and ``-timeout`` for hangs.

An input also fails if it takes more than ``FUZZ_INPUT_CPU_SECONDS`` (default 2) of CPU: the bound CI checks on
uninstrumented code is 1 s per open+read of a small image, and coverage instrumentation slows Python down.
A failing input is written by libFuzzer as ``crash-*``/``timeout-*``/``oom-*``; keep it under
``fuzz/regressions/<target>/`` with the fix, and ``tests/test_fuzz_parsers.py`` replays it in CI.
"""

from __future__ import annotations

import atexit
import logging
import os
import pkgutil
import sys
import time
from pathlib import Path

import atheris

import vdisk

HERE = Path(__file__).resolve().parent
# Coverage is collected only where the target's parser lives (instrumented Python runs many times slower):
# atheris includes whole top-level packages, so every other vdisk module is excluded by name.
IMAGE_MODULES = ["vdisk.formats.qcow2.format", "vdisk.formats.qcow2.image", "vdisk.formats.qcow2.tables", "vdisk.formats.qcow2.check",
                 "vdisk.formats.qcow2.file", "vdisk.formats.qcow2.refcount", "vdisk.formats.qcow2.cluster",
                 "vdisk.formats.qcow2.compressed", "vdisk.block.chain", "vdisk.formats.raw"]
INSTRUMENT = {
    "qmp_framing": ["vdisk.qmp.json_parser", "vdisk.qmp.json_writer", "vdisk.qmp.schema", "vdisk.qmp.connection"],
    "qmp_arguments": ["vdisk.qmp.json_parser", "vdisk.qmp.json_writer", "vdisk.qmp.schema"],
    "qcow2_header": ["vdisk.formats.qcow2.format"],
    "qcow2_image": IMAGE_MODULES,
    "qcow2_image_rw": IMAGE_MODULES,
}
if len(sys.argv) < 2 or sys.argv[1] not in INSTRUMENT:
    sys.exit(f"usage: python -m fuzz.run {{{','.join(INSTRUMENT)}}} [libFuzzer options] [corpus dirs]")
_ALL = [m.name for m in pkgutil.walk_packages(vdisk.__path__, "vdisk.") if not m.ispkg]
with atheris.instrument_imports(include=["vdisk"], exclude=[m for m in _ALL if m not in INSTRUMENT[sys.argv[1]]]):
    from fuzz import targets
targets.BYTEWISE_MAX = 64  # CI (Hypothesis) feeds longer inputs byte by byte too
CPU_LIMIT = float(os.environ.get("FUZZ_INPUT_CPU_SECONDS", "2"))


def main() -> None:
    name = sys.argv.pop(1)
    logging.getLogger("vdisk").setLevel(logging.ERROR)  # the dirty-bit repair warns on every such input
    one_input = TARGETS[name]()

    def test_one_input(data: bytes) -> None:
        start = time.process_time()
        one_input(data)
        spent = time.process_time() - start
        if spent > CPU_LIMIT:
            raise AssertionError(f"{name}: one input took {spent:.2f} s of CPU (limit {CPU_LIMIT} s)")

    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


def _image_target(write: bool):
    def make():
        base = (HERE / "corpus" / "qcow2_image" / "v3-512.qcow2").read_bytes()
        targets.ImageWorkdir.remove_stale()
        workdir = targets.ImageWorkdir(base)
        atexit.register(workdir.cleanup)
        return lambda data: targets.qcow2_image(data, workdir, write=write)

    return make


TARGETS = {
    "qmp_framing": lambda: targets.qmp_framing,
    "qmp_arguments": lambda: targets.qmp_arguments,
    "qcow2_header": lambda: targets.qcow2_header,
    "qcow2_image": _image_target(write=False),
    "qcow2_image_rw": _image_target(write=True),
}


if __name__ == "__main__":
    main()
