"""Plot a ``bench_stream.py`` result: the guest's view of a stream, both servers, over time.

Rows: full stream, stream with base.  Left: sequential read throughput (100 ms bins) of the ``seq`` load run;
right: the slowest 4 KiB random read completing in each 100 ms bin (and the median, thin) of the ``rand`` load
run; a read slower than 50 ms is also drawn as a bar from its start to its completion.  Time 0
is the block-stream command; a dashed line marks each server's BLOCK_JOB_COMPLETED.  The run shown for each
(server, stream, load) is the one whose stream time is the median of its repetitions.

    .venv/bin/python benchmarks/plot_stream.py [benchmarks/results/stream.json] [-o stream.png]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

COLORS = {"vdisk": "tab:blue", "qsd": "tab:orange"}
LABELS = {"vdisk": "vdisk", "qsd": "qemu-storage-daemon"}


def plot(result: dict, out: Path) -> None:
    meta, summary, series = result["meta"], result["summary"], result["series"]
    size_gib = meta["chain"]["size"] / 2**30
    fig, axes = plt.subplots(2, 2, figsize=(13, 7.5), sharex="row")
    for row, (kind, title) in enumerate((("full", "full stream"), ("base", "stream with base"))):
        ax_tp, ax_lat = axes[row]
        for server in meta["servers"]:
            color = COLORS.get(server)
            seq = series.get(f"{server}/{kind}/seq")
            if seq:
                ax_tp.step(seq["t"], seq["mib_s"], where="post", color=color, lw=1.2, label=LABELS.get(server, server))
                ax_tp.axvline(seq["stream_s"], color=color, ls="--", lw=1)
                idle = summary[kind][server]["idle_mib_s"]
                if idle:
                    ax_tp.axhline(idle, color=color, ls=":", lw=1)
            rnd = series.get(f"{server}/{kind}/rand")
            if rnd:
                # bins are by completion time; a bin without completions is a gap (nan), not a low value
                nan = float("nan")
                ax_lat.step(rnd["t"], [nan if v is None else v for v in rnd["lat_max_ms"]], where="post",
                            color=color, lw=1.2, label=f"{LABELS.get(server, server)} (max per 100 ms)")
                ax_lat.step(rnd["t"], [nan if v is None else v for v in rnd["lat_p50_ms"]], where="post",
                            color=color, lw=0.6, alpha=0.6)
                # a request slower than the target is drawn as a bar from its start to its completion
                for t, v in zip(rnd["t"], rnd["lat_max_ms"]):
                    if v is not None and v > 50:
                        done = t + 0.1
                        ax_lat.hlines(v, done - v / 1000, done, color=color, lw=3, alpha=0.5)
                ax_lat.axvline(rnd["stream_s"], color=color, ls="--", lw=1)
        ax_tp.set_title(f"{title}: guest sequential reads (256 KiB x 8), idle dotted")
        ax_tp.set_ylabel("MiB/s")
        ax_tp.set_ylim(bottom=0)
        ax_lat.axhline(50, color="red", ls=":", lw=1, label="50 ms target")
        ax_lat.set_yscale("log")
        ax_lat.set_title(f"{title}: 4 KiB random reads, queue depth 1")
        ax_lat.set_ylabel("latency (ms)")
        for ax in (ax_tp, ax_lat):
            ax.set_xlabel("seconds since block-stream (dashed: BLOCK_JOB_COMPLETED)")
            ax.grid(alpha=0.3)
        ax_tp.legend(loc="lower right", fontsize=8)
        ax_lat.legend(loc="upper left", fontsize=8)
    fig.suptitle(f"Live block stream of a {size_gib:g} GiB chain under a reading guest "
                 f"({meta['date']}, median run of {meta['reps']})", fontsize=11)
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("result", nargs="?", default=str(Path(__file__).with_name("results") / "stream.json"))
    p.add_argument("-o", "--output")
    args = p.parse_args()
    result_path = Path(args.result)
    out = Path(args.output) if args.output else result_path.with_suffix(".png")
    plot(json.loads(result_path.read_text()), out)
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
