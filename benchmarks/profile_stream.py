"""Where a vdisk stream spends its time: the StreamCopier run in-process on a benchmark chain, phase by phase.

The chain is the one ``bench_stream.py`` builds (``--workdir DIR`` keeps it).  Each phase is timed by wrapping
the function that does it, per thread (the job thread reads, the writer thread populates); ``finish`` is
split into its data fdatasync, metadata flush and the chain switch (quiesce + header write + fdatasync).
Run it under ``py-spy record -o out.txt --format raw -- python benchmarks/profile_stream.py ...`` for stacks.

    .venv/bin/python benchmarks/profile_stream.py DIR [--kind full|base] [--chunk MiB] [--reps N]
"""

from __future__ import annotations

import argparse
import collections
import functools
import shutil
import statistics
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_stream  # noqa: E402
from vdisk import chain, native  # noqa: E402
from vdisk.blockdev import BlockDevice  # noqa: E402
from vdisk.jobs import stream  # noqa: E402
from vdisk.qcow2 import image as qimage  # noqa: E402

TIMES: dict[tuple[str, str], float] = collections.defaultdict(float)
COUNTS: dict[tuple[str, str], int] = collections.defaultdict(int)


def timed(owner, attr: str, label: str) -> None:
    """Wrap owner.attr so that its wall time is added to TIMES[(thread role, label)]."""
    original = getattr(owner, attr)

    @functools.wraps(original)
    def wrapper(*args, **kwargs):
        t = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            role = "writer" if threading.current_thread().name.startswith("vdisk-stream-write") else "job"
            TIMES[(role, label)] += time.perf_counter() - t
            COUNTS[(role, label)] += 1

    setattr(owner, attr, wrapper)


def instrument() -> None:
    timed(BlockDevice, "copy_wanted", "copy_wanted (allocation + block status)")
    for name, label in (("resolve", "resolve (chain map of a chunk)"), ("_read_pieces", "_read_pieces (preads)")):
        if hasattr(stream, name):
            timed(stream, name, label)
    timed(qimage.Qcow2Image, "map_units", "map_units")
    timed(stream.StreamCopier, "_read", "_read (total)")
    timed(qimage.Qcow2Image, "read_backing", "read_backing (through the chain)")
    timed(qimage.Qcow2Image, "unallocated_clusters", "unallocated_clusters")
    timed(native, "zero_map", "zero_map (C)")
    timed(qimage.Qcow2Image, "populate", "populate (total)")
    timed(native, "pwrite_selected", "  pwrite_selected (C)")
    timed(qimage.Qcow2Image, "_allocate", "  _allocate")
    timed(qimage.Qcow2Image, "_commit", "  _commit (L2 updates)")
    timed(stream.StreamCopier, "drain", "drain (waiting for the writer)")
    timed(qimage.Qcow2Image, "_fdatasync", "fdatasync")
    timed(qimage.Qcow2Image, "_flush_metadata", "flush metadata")
    timed(qimage.Qcow2Image, "set_backing", "set_backing (header + fdatasync)")
    timed(qimage.Qcow2Image, "_pwrite", "_pwrite (metadata writes)")


def one(workdir: Path, kind: str, chunk: int, writeback: float | None = None) -> dict:
    image = workdir / "profile-run.qcow2"
    shutil.copyfile(workdir / "top.qcow2", image)
    with open(image, "rb+") as f:
        import os

        os.fsync(f.fileno())
    bench_stream.warm(workdir)
    top = chain.open_chain(str(image))
    device = BlockDevice("drive0", top)
    base = stream.find_base(device, str(workdir / "base.qcow2")) if kind == "base" else None
    TIMES.clear()
    COUNTS.clear()
    bench_stream.prefault()
    copier = stream.StreamCopier(device, base, chunk=chunk)
    if writeback is not None:
        copier.writeback_every = int(writeback * 2**20)
    t0 = time.perf_counter()
    cpu0 = time.process_time()
    position = 0
    while position < copier.length:
        position = copier.step(position)
    copier.drain()
    t1 = time.perf_counter()
    cpu1 = time.process_time()
    fdatasync_before = TIMES[("job", "fdatasync")]
    copier.finish()
    t2 = time.perf_counter()
    copier.close()
    device.close()
    image.unlink()
    out = {"copy_s": t1 - t0, "copy_cpu_s": cpu1 - cpu0, "finish_s": t2 - t1, "total_s": t2 - t0,
           "finish_fdatasync_s": TIMES[("job", "fdatasync")] - fdatasync_before}
    out["phases"] = {f"{role}: {label}": (secs, COUNTS[(role, label)]) for (role, label), secs in TIMES.items()}
    return out


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("workdir")
    p.add_argument("--kind", default="full", choices=["full", "base"])
    p.add_argument("--chunk", type=float, default=stream.CHUNK / 2**20, help="MiB")
    p.add_argument("--reps", type=int, default=1)
    p.add_argument("--switch-interval", type=float, default=None, help="sys.setswitchinterval (s)")
    p.add_argument("--writeback", type=float, default=None, help="MiB between writeback kicks (0: off)")
    args = p.parse_args()
    instrument()
    if args.switch_interval:
        sys.setswitchinterval(args.switch_interval)
    results = [one(Path(args.workdir), args.kind, int(args.chunk * 2**20), args.writeback) for _ in range(args.reps)]
    for r in results:
        print(f"copy {r['copy_s']:.2f} s (cpu {r['copy_cpu_s']:.2f} s)  finish {r['finish_s']:.2f} s (fdatasyncs {r['finish_fdatasync_s']:.2f} s)"
              f"  total {r['total_s']:.2f} s")
    print(f"median total {statistics.median(r['total_s'] for r in results):.2f} s")
    last = results[-1]
    for name, (secs, n) in sorted(last["phases"].items()):
        print(f"  {name:55} {secs:7.3f} s  {n:6d} calls")
    return 0


if __name__ == "__main__":
    sys.exit(main())
