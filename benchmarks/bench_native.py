"""Micro-benchmark: vdisk.io.native's C core against the pure-Python reference.

    .venv/bin/python benchmarks/bench_native.py [--size-mib 256] [--cluster-size 65536] [--repeat 5]
                                                [--dir DIR]

zero_map is timed on three buffers (all zeros: every byte must be read; random: each cluster stops at its
first block, so the figure is clusters classified per second times the cluster size, not memory bandwidth;
half: alternate zero and random clusters).  pwrite_selected writes the selected clusters of
the buffer packed at offset 0 of a file in --dir (default: the system temporary directory; pass /dev/shm
to take the disk out of the picture); the file is written once before timing, so the timed runs overwrite
pages already in the page cache.  Each figure is the best of --repeat runs, as GiB/s of buffer scanned or
of bytes written.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial

import numpy as np

from vdisk.io import native

GiB = 1 << 30


def best_of(repeat: int, run: Callable[[], object]) -> float:
    run()  # warm up: page faults, page cache
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - start)
    return best


def make_buffers(size: int, cluster_size: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    random = rng.integers(0, 256, size, dtype=np.uint8)
    random.reshape(-1, cluster_size)[:, 0] |= 1  # no random cluster is accidentally zero
    half = random.copy()
    half.reshape(-1, cluster_size)[::2] = 0
    zeros = np.empty(size, dtype=np.uint8)
    zeros.fill(0)  # written, so backed by real pages (np.zeros would read the kernel's shared zero page)
    return {"zeros": zeros, "random": random, "half": half}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mib", type=int, default=256)
    parser.add_argument("--cluster-size", type=int, default=65536)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--dir", default=tempfile.gettempdir())
    args = parser.parse_args()

    size = args.size_mib << 20
    cluster_size = args.cluster_size
    n = size // cluster_size
    cores = native.implementations()
    if "c" not in cores:
        print("warning: the C core is not built; only the Python reference is measured", file=sys.stderr)
    buffers = make_buffers(size, cluster_size)
    print(
        f"backend={native.BACKEND} size={args.size_mib} MiB cluster_size={cluster_size} "
        f"clusters={n} repeat={args.repeat} dir={args.dir}"
    )
    header = f"{'operation':<34}" + "".join(f"{name:>14}" for name in cores) + f"{'c/python':>10}"
    print(header)
    print("-" * len(header))

    def report(label: str, nbytes: int, runs: dict[str, Callable[[], object]]) -> None:
        rates = {name: nbytes / best_of(args.repeat, run) / GiB for name, run in runs.items()}
        line = f"{label:<34}" + "".join(f"{rates[name]:>8.2f} GiB/s" for name in runs)
        if "c" in rates:
            line += f"{rates['c'] / rates['python']:>9.1f}x"
        print(line, flush=True)

    for kind, buf in buffers.items():
        report(
            f"zero_map {kind}",
            size,
            {name: partial(core.zero_map, buf, cluster_size) for name, core in cores.items()},
        )

    rng = np.random.default_rng(1)
    patterns = {
        "all": np.ones(n, dtype=bool),
        "alternate": np.arange(n) % 2 == 0,
        "random 50%": rng.random(n) < 0.5,
    }
    fd, path = tempfile.mkstemp(prefix="bench-native-", dir=args.dir)
    try:
        for label, select in patterns.items():
            written = int(np.count_nonzero(select)) * cluster_size
            report(
                f"pwrite_selected {label}",
                written,
                {
                    name: partial(core.pwrite_selected, fd, buffers["random"], cluster_size, select, 0)
                    for name, core in cores.items()
                },
            )
    finally:
        os.close(fd)
        os.unlink(path)


if __name__ == "__main__":
    main()
