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

import bench_stream

from vdisk.block import chain
from vdisk.block.chain import Chain
from vdisk.block.device import BlockDevice
from vdisk.formats.qcow2.cluster import Clusters
from vdisk.formats.qcow2.file import ImageFile
from vdisk.formats.qcow2.image import Qcow2Image
from vdisk.formats.qcow2.refcount import Refcounts
from vdisk.io import native
from vdisk.jobs import stream

TIMES: dict[tuple[str, str], float] = collections.defaultdict(float)
SPANS: list[tuple[str, float, float]] = []  # (label, start, end) of the calls made while finishing
COUNTS: dict[tuple[str, str], int] = collections.defaultdict(int)
FINISHING = [False]


def timed(owner, attr: str, label: str) -> None:
    """Wrap owner.attr so that its wall time is added to TIMES[(thread role, label)]."""
    original = getattr(owner, attr)

    @functools.wraps(original)
    def wrapper(*args, **kwargs):
        t = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            now = time.perf_counter()
            role = "writer" if threading.current_thread().name.startswith("vdisk-stream-write") else "job"
            TIMES[(role, label)] += now - t
            if FINISHING[0]:
                SPANS.append((label, t, now))
            COUNTS[(role, label)] += 1

    setattr(owner, attr, wrapper)


def instrument() -> None:
    timed(Chain, "copy_plan", "copy_plan (allocation + the chain walk)")
    timed(Chain, "resolve", "  resolve (chain map of a chunk)")
    timed(Chain, "read_pieces", "read_pieces (preads)")
    timed(Clusters, "map_units", "map_units")
    timed(stream.StreamCopier, "step", "step (total, job thread)")
    timed(Clusters, "unallocated_clusters", "unallocated_clusters")
    timed(native, "zero_map", "zero_map (C)")
    timed(Clusters, "populate", "populate (total)")
    timed(ImageFile, "pwrite_selected", "  pwrite_selected (C)")
    timed(Refcounts, "allocate", "  allocate")
    timed(stream.StreamCopier, "drain", "drain (waiting for the writer)")
    timed(ImageFile, "fdatasync", "fdatasync")
    timed(Clusters, "write_back", "flush L2/L1")
    timed(Refcounts, "write_back", "flush refcounts")
    timed(Qcow2Image, "set_backing", "set_backing (header + fdatasync)")
    timed(ImageFile, "pwrite", "pwrite (metadata writes)")
    timed(BlockDevice, "quiesced", "quiesced (enter)")


class GuestReader(threading.Thread):
    """4 KiB reads at random offsets through the block device, back to back, each timed (a QD1 guest)."""

    def __init__(self, device: BlockDevice):
        super().__init__(name="guest-reader", daemon=True)
        self.device, self.stop, self.samples = device, False, []

    def run(self) -> None:
        import random

        rng = random.Random(7)
        buf = bytearray(4096)
        blocks = self.device.size // 4096
        while not self.stop:
            offset = rng.randrange(blocks) * 4096
            t = time.perf_counter()
            self.device.pread(buf, offset)
            self.samples.append((t, time.perf_counter() - t))


def one(workdir: Path, kind: str, chunk: int, writeback: float | None = None, guest: bool = False) -> dict:
    image = workdir / "profile-run.qcow2"
    shutil.copyfile(workdir / "top.qcow2", image)
    with open(image, "rb+") as f:
        import os

        os.fsync(f.fileno())
    bench_stream.warm(workdir)
    opened = chain.open_chain(str(image))
    device = BlockDevice("drive0", opened)
    base = opened.find_base(str(workdir / "base.qcow2"), opened.top) if kind == "base" else None
    TIMES.clear()
    COUNTS.clear()
    bench_stream.prefault()
    copier = stream.StreamCopier(device, base, chunk=chunk)
    reader = None
    if guest:
        device.cor_active, device.cor_base = True, base  # as the stream job does: reads copy too
        reader = GuestReader(device)
        reader.start()
        time.sleep(0.5)
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
    SPANS.clear()
    FINISHING[0] = True
    copier.finish()
    FINISHING[0] = False
    t2 = time.perf_counter()
    if reader is not None:
        time.sleep(0.3)
        reader.stop = True
        reader.join()
        device.cor_active = False
    copier.close()
    device.close()
    image.unlink()
    out = {"copy_s": t1 - t0, "copy_cpu_s": cpu1 - cpu0, "finish_s": t2 - t1, "total_s": t2 - t0,
           "finish_fdatasync_s": TIMES[("job", "fdatasync")] - fdatasync_before}
    if reader is not None:
        lat = [(t, d) for t, d in reader.samples]
        during = [d for t, d in lat if t0 <= t < t1]
        ending = [(t, d) for t, d in lat if t + d > t1 and t < t2]
        ordered = sorted(during) or [0.0]
        out["guest"] = {"copy_max_ms": 1000 * max(during, default=0), "copy_n": len(during),
                        "copy_p50_ms": 1000 * ordered[len(ordered) // 2],
                        "copy_p99_ms": 1000 * ordered[min(len(ordered) - 1, len(ordered) * 99 // 100)],
                        "finish_max_ms": 1000 * max((d for _, d in ending), default=0), "finish_n": len(ending)}
    out["spans"] = [(label, round(1000 * (a - t1), 1), round(1000 * (b - a), 1)) for label, a, b in SPANS]
    out["phases"] = {f"{role}: {label}": (secs, COUNTS[(role, label)]) for (role, label), secs in TIMES.items()}
    return out


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("workdir")
    p.add_argument("--kind", default="full", choices=["full", "base"])
    p.add_argument("--chunk", type=float, default=stream.CHUNK / 2**20, help="MiB")
    p.add_argument("--reps", type=int, default=1)
    p.add_argument("--guest", action="store_true", help="a QD1 4 KiB random reader thread during the stream")
    p.add_argument("--switch-interval", type=float, default=None, help="sys.setswitchinterval (s)")
    p.add_argument("--writeback", type=float, default=None, help="MiB between writeback kicks (0: off)")
    args = p.parse_args()
    instrument()
    if args.switch_interval:
        sys.setswitchinterval(args.switch_interval)
    results = [one(Path(args.workdir), args.kind, int(args.chunk * 2**20), args.writeback, args.guest) for _ in range(args.reps)]
    for r in results:
        if "guest" in r:
            print(f"guest 4K reads: p50 {r['guest']['copy_p50_ms']:.3f} p99 {r['guest']['copy_p99_ms']:.2f}"
                  f" max {r['guest']['copy_max_ms']:.1f} ms while copying ({r['guest']['copy_n']}),"
                  f" max {r['guest']['finish_max_ms']:.1f} ms while finishing ({r['guest']['finish_n']})")
        print("finish, ms after the copy ended (start, duration):", r["spans"])
        print(f"copy {r['copy_s']:.2f} s (cpu {r['copy_cpu_s']:.2f} s)  finish {r['finish_s']:.2f} s (fdatasyncs {r['finish_fdatasync_s']:.2f} s)"
              f"  total {r['total_s']:.2f} s")
    print(f"median total {statistics.median(r['total_s'] for r in results):.2f} s")
    last = results[-1]
    for name, (secs, n) in sorted(last["phases"].items()):
        print(f"  {name:55} {secs:7.3f} s  {n:6d} calls")
    return 0


if __name__ == "__main__":
    sys.exit(main())
