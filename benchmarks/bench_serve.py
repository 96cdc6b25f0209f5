"""NBD serving, side by side: `vdisk serve` (nbdkit + our plugin) against `qemu-nbd -f qcow2` on the same chain.

    .venv/bin/python benchmarks/bench_serve.py [--size 2G] [--reps 3] [--dir /dev/shm/vdisk-bench]

The chain: a base with random data over the whole disk, a middle overlay that rewrites every 8th cluster and
one 64 MiB run, an empty top.  The servers never run at the same time, so they serve the very same base and
middle files; each run gets a fresh empty top, so every run does the same work (the write allocates).

Per repetition, each server in turn (the order rotates every repetition) is started on a fresh top and runs:

* sequential read of the whole disk: ``nbdcopy URI null:``
* 4 KiB random reads at queue depth 16 for ``--randread-seconds``: ``fio --ioengine=nbd``
* sequential write of 1 GiB of random data: ``nbdcopy --flush SOURCE URI`` (SOURCE is on /dev/shm)

Right before each timed run a few GiB of memory are touched (``--prefault``): these VMs hand freed memory back to
their host, and the first touch of it afterwards swings timings 2-5x.  Each server's CPU time is utime+stime of
its process tree (/proc/PID/stat), taken around each run.  The table shows medians over the repetitions.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
MiB = 1 << 20
GiB = 1 << 30
CLUSTER = 64 * 1024
NBDCOPY_REQUEST = 256 * 1024  # nbdcopy's default --request-size
TICK = os.sysconf("SC_CLK_TCK")

# vdisk / qemu-nbd targets from the issue: (workload, minimum ratio)
TARGETS = {"seq_read": 1.0, "seq_write": 0.9, "rand_read": 0.7}
UNITS = {"seq_read": "MB/s", "seq_write": "MB/s", "rand_read": "IOPS"}
LABELS = {"seq_read": "sequential read, whole disk", "seq_write": "sequential write",
          "rand_read": "4 KiB random read, QD16"}


def run(*args: str | Path, **kwargs) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(a) for a in args], capture_output=True, text=True, **kwargs)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(map(str, args))} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
    return proc


def parse_size(text: str) -> int:
    units = {"k": 1 << 10, "m": MiB, "g": GiB}
    return int(float(text[:-1]) * units[text[-1].lower()]) if text[-1].lower() in units else int(text)


# --- the chain ------------------------------------------------------------------------------------------


def random_file(path: Path, size: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    with open(path, "wb") as f:
        for _ in range(0, size, 64 * MiB):
            f.write(rng.bytes(64 * MiB))
        f.truncate(size)


def build_chain(workdir: Path, size: int) -> tuple[Path, Path]:
    """base.qcow2 <- mid.qcow2 (returns their paths); tops are made per run by :func:`fresh_top`."""
    base, mid = workdir / "base.qcow2", workdir / "mid.qcow2"
    stamp = workdir / "chain.json"
    if stamp.exists() and json.loads(stamp.read_text()) == {"size": size} and base.exists() and mid.exists():
        return base, mid
    print(f"building a {size / GiB:g} GiB chain in {workdir} ...", file=sys.stderr)
    raw = workdir / "base.raw"
    random_file(raw, size, seed=1)
    run("qemu-img", "convert", "-f", "raw", "-O", "qcow2", raw, base)
    raw.unlink()
    run("qemu-img", "create", "-q", "-f", "qcow2", "-b", base.name, "-F", "qcow2", mid)
    commands = [f"write -P {0x40 + i % 64} {offset} {CLUSTER}"
                for i, offset in enumerate(range(3 * CLUSTER, size, 8 * CLUSTER))]
    commands.append(f"write -P 0x77 {size // 2} {64 * MiB}")
    subprocess.run(["qemu-io", mid], input="\n".join(commands) + "\nquit\n", text=True, check=True,
                   stdout=subprocess.DEVNULL)
    stamp.write_text(json.dumps({"size": size}))
    return base, mid


def fresh_top(mid: Path, top: Path) -> None:
    top.unlink(missing_ok=True)
    run("qemu-img", "create", "-q", "-f", "qcow2", "-b", mid.name, "-F", "qcow2", top)


# --- servers ------------------------------------------------------------------------------------------------


def tree_cpu_seconds(pid: int) -> float:
    """utime+stime of ``pid`` and its live descendants."""
    total = 0.0
    todo = [pid]
    while todo:
        p = todo.pop()
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / TICK  # utime, stime (fields 14, 15)
            for task in Path(f"/proc/{p}/task").iterdir():
                todo += [int(c) for c in (task / "children").read_text().split()]
        except FileNotFoundError:
            continue
    return total


@dataclasses.dataclass
class Server:
    name: str
    argv_for: object  # (top, socket, pid_file) -> argv
    ready: str  # "pid" (wait for the pid file) or "socket"
    proc: subprocess.Popen | None = None
    socket: Path | None = None

    def start(self, top: Path, workdir: Path) -> str:
        self.socket = workdir / f"{self.name.replace(' ', '_')}.sock"
        pid_file = workdir / f"{self.name.replace(' ', '_')}.pid"
        for p in (self.socket, pid_file):
            p.unlink(missing_ok=True)
        self.proc = subprocess.Popen(self.argv_for(top, self.socket, pid_file), cwd=ROOT,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        wait_for = pid_file if self.ready == "pid" else self.socket
        deadline = time.monotonic() + 60
        while not wait_for.exists():
            if self.proc.poll() is not None:
                raise SystemExit(f"{self.name} exited {self.proc.returncode}: {self.proc.stderr.read()}")
            if time.monotonic() > deadline:
                self.proc.kill()
                raise SystemExit(f"{self.name} did not start")
            time.sleep(0.02)
        return f"nbd+unix:///?socket={self.socket}"

    def cpu(self) -> float:
        return tree_cpu_seconds(self.proc.pid)

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(120)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise SystemExit(f"{self.name} did not stop on SIGTERM") from None


def vdisk_server(*extra: str) -> Server:
    python = ROOT / ".venv" / "bin" / "python"
    name = " ".join(["vdisk", *extra])
    return Server(name, lambda top, sock, pid: [python, "-m", "vdisk.cli", "serve", top, "--socket", sock,
                                                "--pid-file", pid, *extra], "pid")


def qemu_nbd_server() -> Server:
    # --persistent: several clients one after the other; --shared: nbdcopy's four connections (multi-conn).
    return Server("qemu-nbd", lambda top, sock, pid: ["qemu-nbd", "-f", "qcow2", "--cache=writeback", "--persistent",
                                                      "--shared=16", "-k", sock, top], "socket")


# --- workloads ---------------------------------------------------------------------------------------------


def prefault(gib: float) -> None:
    """Touch ``gib`` GiB of fresh anonymous memory, one write per page, then give it back."""
    if gib <= 0:
        return
    block = np.empty(int(gib * GiB), dtype=np.uint8)
    block[::4096] = 1
    del block


def timed(server: Server, argv: list[str | Path]) -> tuple[float, float, str]:
    """(wall seconds, server CPU seconds, stdout) of one client command."""
    cpu0, t0 = server.cpu(), time.perf_counter()
    out = run(*argv).stdout
    return time.perf_counter() - t0, server.cpu() - cpu0, out


def seq_read(server: Server, uri: str, size: int) -> tuple[float, float]:
    seconds, cpu, _ = timed(server, ["nbdcopy", uri, "null:"])
    return size / seconds / 1e6, cpu


def seq_write(server: Server, uri: str, source: Path) -> tuple[float, float]:
    seconds, cpu, _ = timed(server, ["nbdcopy", "--flush", source, uri])
    return source.stat().st_size / seconds / 1e6, cpu


def rand_read(server: Server, uri: str, seconds: int) -> tuple[float, float]:
    _, cpu, out = timed(server, ["fio", "--name=randread", "--ioengine=nbd", f"--uri={uri}", "--rw=randread",
                                 "--bs=4k", "--iodepth=16", f"--runtime={seconds}", "--time_based",
                                 "--randrepeat=0", "--output-format=json"])
    result = json.loads(out[out.index("{"):])
    return result["jobs"][0]["read"]["iops"], cpu


# --- report ---------------------------------------------------------------------------------------------------


def report(results: dict[str, dict[str, list[tuple[float, float]]]], baseline: str,
           requests: dict[str, float] | None = None) -> str:
    """Medians per server; ratios against ``baseline``; the target verdict is for the first other server.

    ``requests``: NBD requests per run of each workload (random reads: per second), to show CPU per request.
    """
    names = [baseline, *[n for n in results if n != baseline]]
    others = names[1:]
    width = max(12, *(len(n) + 2 for n in names))
    rwidth = max(12, *(len(n) + 8 for n in others)) if others else 0
    head = f"{'workload':<30}{'unit':>5}" + "".join(f"{n:>{width}}" for n in names)
    head += "".join(f"{n + ' ratio':>{rwidth}}" for n in others) + "  target"
    lines = [head, "-" * (len(head) + 12)]
    workloads = [w for w in ("seq_read", "seq_write", "rand_read") if all(results[n][w] for n in names)]
    for workload in workloads:
        med = {n: statistics.median(v for v, _ in results[n][workload]) for n in names}
        row = f"{LABELS[workload]:<30}{UNITS[workload]:>5}" + "".join(f"{med[n]:>{width},.0f}" for n in names)
        row += "".join(f"{med[n] / med[baseline]:>{rwidth - 1}.2f}x" for n in others)
        if others:
            ratio = med[others[0]] / med[baseline]
            row += f"  >= {TARGETS[workload]:.1f}x {'met' if ratio >= TARGETS[workload] else 'MISSED'}"
        lines.append(row)
    lines += ["", f"{'server CPU seconds (median)':<35}" + "".join(f"{n:>{width}}" for n in names)]
    for workload in workloads:
        cpu = {n: statistics.median(c for _, c in results[n][workload]) for n in names}
        lines.append(f"{LABELS[workload]:<35}" + "".join(f"{cpu[n]:>{width}.2f}" for n in names))
    if requests:
        lines += ["", f"{'server CPU microseconds per request':<35}" + "".join(f"{n:>{width}}" for n in names)]
        for workload in workloads:
            per = {}
            for n in names:
                runs = results[n][workload]
                count = [requests[workload] * (v if workload == "rand_read" else 1) for v, _ in runs]
                per[n] = statistics.median(c / k * 1e6 for (_, c), k in zip(runs, count, strict=True))
            lines.append(f"{LABELS[workload]:<35}" + "".join(f"{per[n]:>{width}.0f}" for n in names))
    return "\n".join(lines)


def main(argv: list[str] | None = None, extra_servers: tuple[Server, ...] = ()) -> int:
    """``extra_servers``: more servers to run side by side (experiments, e.g. a patched plugin)."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", default="2G", help="virtual disk size (default 2G)")
    ap.add_argument("--write-size", default="1G", help="bytes written by the sequential write (default 1G)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--randread-seconds", type=int, default=10)
    ap.add_argument("--prefault", type=float, default=3.0, help="GiB of memory to touch before each run")
    ap.add_argument("--dir", default="/dev/shm/vdisk-bench", help="where the chain lives (default /dev/shm)")
    ap.add_argument("--no-parallel", action="store_true", help="leave out `vdisk serve --parallel`")
    ap.add_argument("--only", choices=["seq_read", "seq_write", "rand_read"], action="append",
                    help="run only these workloads (repeatable)")
    ap.add_argument("--json", help="also write the raw results here")
    args = ap.parse_args(argv)

    workdir = Path(args.dir)
    workdir.mkdir(parents=True, exist_ok=True)
    size, write_size = parse_size(args.size), parse_size(args.write_size)
    _, mid = build_chain(workdir, size)
    source = workdir / "write-source.raw"
    if not source.exists() or source.stat().st_size != write_size:
        random_file(source, write_size, seed=2)
    top = workdir / "top.qcow2"
    workloads = args.only or ["seq_read", "rand_read", "seq_write"]

    load_before = os.getloadavg()[0]
    servers = [qemu_nbd_server(), vdisk_server()] + ([] if args.no_parallel else [vdisk_server("--parallel")])
    servers += extra_servers
    results: dict[str, dict[str, list[tuple[float, float]]]] = {
        s.name: {w: [] for w in ("seq_read", "seq_write", "rand_read")} for s in servers
    }
    for rep in range(args.reps):
        order = servers[rep % len(servers):] + servers[: rep % len(servers)]
        for server in order:
            fresh_top(mid, top)
            uri = server.start(top, workdir)
            try:
                for workload in workloads:
                    prefault(args.prefault)
                    if workload == "seq_read":
                        value = seq_read(server, uri, size)
                    elif workload == "rand_read":
                        value = rand_read(server, uri, args.randread_seconds)
                    else:
                        value = seq_write(server, uri, source)
                    results[server.name][workload].append(value)
                    print(f"rep {rep + 1} {server.name:<17} {workload:<10} {value[0]:>12,.0f} {UNITS[workload]:<5}"
                          f" cpu {value[1]:6.2f} s", file=sys.stderr)
            finally:
                server.stop()
    top.unlink(missing_ok=True)

    print()
    print(f"vdisk serve vs qemu-nbd: {size / GiB:g} GiB chain in {workdir}, {write_size / GiB:g} GiB written, "
          f"{args.randread_seconds} s of random reads, {args.reps} repetitions (medians), "
          f"{os.cpu_count()} CPUs, 1-minute load average {load_before:.1f} before, {os.getloadavg()[0]:.1f} after")
    # nbdcopy's requests are 256 KiB (its default --request-size); fio's are 4 KiB, IOPS x seconds of them.
    requests = {"seq_read": size / NBDCOPY_REQUEST, "seq_write": write_size / NBDCOPY_REQUEST,
                "rand_read": args.randread_seconds}
    print(report(results, "qemu-nbd", requests))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
