"""Make the seed corpora in fuzz/corpus/ (small files; run again to rebuild them): ``python -m fuzz.make_seeds``.

qcow2 seeds are made by qemu-img/qemu-io, small clusters so that every table fits in a few KiB: versions 2
and 3, refcount widths 1/16/64, zlib and zstd compressed clusters, zero clusters, extended L2, a backing
file name, the dirty bit, a sparse 4 GiB disk.  Header seeds are their first clusters.  QMP seeds are
messages a client sends, good and bad.
"""

from __future__ import annotations

import json
import shutil
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

CORPUS = Path(__file__).resolve().parent / "corpus"

QCOW2_SEEDS = {
    # name: (qemu-img -o options, virtual size, qemu-io commands)
    "v3-512": ("cluster_size=512", "1M", ["write -P 0x11 0 4k", "write -c -P 0x22 8k 512", "write -z 16k 2k",
                                          "write -P 0x33 900k 1k"]),
    "v2-512": ("compat=0.10,cluster_size=512", "256k", ["write -P 0x44 512 3k", "write -c -P 0x55 4k 512"]),
    "refcount1-512": ("cluster_size=512,refcount_bits=1", "256k", ["write -P 0x66 0 2k"]),
    "refcount64-512": ("cluster_size=512,refcount_bits=64", "256k", ["write -P 0x77 1k 2k", "write -z 4k 1k"]),
    "zstd-512": ("cluster_size=512,compression_type=zstd", "256k", ["write -c -P 0x88 0 512", "write -P 1 1k 1k"]),
    "extl2-16k": ("cluster_size=16k,extended_l2=on", "256k", ["write -P 0x99 0 1k", "write -P 0xaa 20k 3k",
                                                               "write -z 40k 512"]),
    "sparse-4g-4k": ("cluster_size=4k", "4G", ["write -P 0xbb 0 4k", "write -P 0xcc 3G 4k"]),
}
BACKING_NAME = "base.qcow2"  # the harnesses put a clean base under this name beside the fuzzed image

QMP_SEEDS = {
    "negotiate": b'{"execute": "qmp_capabilities"}\r\n',
    "negotiate-oob": b'{"execute": "qmp_capabilities", "arguments": {"enable": ["oob"]}}\r\n',
    "stream": b'{"execute": "qmp_capabilities"}{"execute": "block-stream", "arguments": {"device": "drive0", '
              b'"speed": 1048576, "on-error": "stop", "job-id": "j1"}, "id": 7}\r\n',
    "query": b'{"execute":"qmp_capabilities"}\n{"execute":"query-block-jobs","id":["x",{"y":null}]}\n',
    "oob": b'{"execute": "qmp_capabilities", "arguments": {"enable": ["oob"]}}{"exec-oob": "query-jobs"}',
    "single-quotes": b"{'execute': 'qmp_capabilities'}{'execute': 'job-pause', 'arguments': {'id': '\\u00e9'}}",
    "numbers": b'{"execute": "block-job-set-speed", "arguments": {"device": "d", "speed": -1.5e308}, "id": 1e400}',
    "broken": b'{"execute": tru}\x01{"execute": "quit"}]]}}{"a"',
    "nested": b'{"id": ' + b"[" * 70 + b"]" * 70 + b"}",
    "escapes": b'{"execute": "human-monitor-command", "arguments": {"command-line": "info \\ud83d\\ude00 \\u0000"}}',
}

QMP_ARGUMENT_SEEDS = {
    "stream": {"device": "drive0", "base": "A.qcow2", "speed": 0, "on-error": "report", "auto-finalize": True},
    "snapshot": {"device": "drive0", "snapshot-file": "/x", "format": "qcow2", "mode": "existing"},
    "capabilities": {"enable": ["oob", "oob"]},
    "wrong-types": {"device": 5, "speed": "fast", "force": 1, "id": None, "flat": [], "x": {}},
    "big-numbers": {"speed": 18446744073709551615, "cpu-index": -9223372036854775809},
}


def _run(*args: str | Path) -> None:
    subprocess.run([str(a) for a in args], check=True, capture_output=True)


def make_qcow2(directory: Path) -> dict[str, Path]:
    """The qcow2 seeds, made in ``directory`` (a base plus one file per seed)."""
    out = {}
    base = directory / BACKING_NAME
    _run("qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=512", base, "256k")
    _run("qemu-io", "-c", "write -P 0xee 0 256k", base)
    for name, (options, size, commands) in QCOW2_SEEDS.items():
        path = directory / f"{name}.qcow2"
        _run("qemu-img", "create", "-q", "-f", "qcow2", "-o", options, path, size)
        if commands:
            _run("qemu-io", *[arg for c in commands for arg in ("-c", c)], path)
        out[name] = path
    path = directory / "backing-512.qcow2"
    _run("qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=512", "-b", BACKING_NAME, "-F", "qcow2",
         path, "256k")
    _run("qemu-io", "-c", "write -P 0x12 1k 1k", "-c", "write -z 4k 4k", path)
    out["backing-512"] = path
    dirty = directory / "dirty-512.qcow2"
    shutil.copy(out["v3-512"], dirty)
    with open(dirty, "r+b") as f:
        f.seek(72)
        features = struct.unpack(">Q", f.read(8))[0]
        f.seek(72)
        f.write(struct.pack(">Q", features | 1))
    out["dirty-512"] = dirty
    return out


def main() -> int:
    for target in ("qcow2_image", "qcow2_header", "qmp_framing", "qmp_arguments"):
        d = CORPUS / target
        if d.exists():
            shutil.rmtree(d)
        d.mkdir(parents=True)
    with tempfile.TemporaryDirectory() as tmp:
        for name, path in make_qcow2(Path(tmp)).items():
            data = path.read_bytes()
            (CORPUS / "qcow2_image" / f"{name}.qcow2").write_bytes(data)
            cluster_size = 1 << struct.unpack_from(">I", data, 20)[0]
            (CORPUS / "qcow2_header" / f"{name}.bin").write_bytes(data[:cluster_size])
    for name, data in QMP_SEEDS.items():
        (CORPUS / "qmp_framing" / f"{name}.json").write_bytes(data)
    for name, value in QMP_ARGUMENT_SEEDS.items():
        (CORPUS / "qmp_arguments" / f"{name}.json").write_bytes(json.dumps(value).encode())
    total = sum(p.stat().st_size for p in CORPUS.rglob("*") if p.is_file())
    print(f"seed corpora written to {CORPUS}: {total} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
