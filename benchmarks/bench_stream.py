"""Live block streaming, vdisk against qemu-storage-daemon, with `cp` as the physical reference.

Theory of operation
===================
One run builds one chain (qemu-img/qemu-io only, so the input owes nothing to vdisk)::

    base.qcow2  SIZE, every cluster written with random (non-zero) data
    mid.qcow2   backing base.qcow2, 25 % of the clusters rewritten (random clusters, fixed seed)
    top.qcow2   backing mid.qcow2,   5 % of the clusters rewritten

and streams a fresh copy of ``top.qcow2`` (base and mid are never written by a stream) on each server:

* ``full``: ``block-stream drive0`` (everything into the top; no backing file afterwards),
* ``base``: ``block-stream drive0 base=base.qcow2`` (mid's clusters into the top; backing base.qcow2).

Each (server, kind) is timed from the ``block-stream`` command to the ``BLOCK_JOB_COMPLETED`` event under
three guest loads, in separate runs so that one load does not queue behind the other:

* ``none``: no guest I/O (the stream time of the table),
* ``seq``: a libnbd reader doing sequential 256 KiB reads, 8 in flight, over the whole disk, round and round
  (nbdcopy's request size; nbdcopy itself cannot report throughput over time),
* ``rand``: a libnbd client at queue depth 1 reading 4 KiB at random 4 KiB-aligned offsets, timing each.

A load runs ``IDLE`` seconds before the stream (the idle baseline: same server, same chain, no job) and
``TAIL`` seconds after the completion event, so the chain switch at the end is inside the measured window.
Load clients are separate processes (no GIL shared with the orchestrator); times are CLOCK_MONOTONIC, which
all processes share.

Noise: these VMs hand freed memory back to their host, so a write-heavy run that needs fresh page-cache pages
can be 2-5x slower than the same run a minute later.  Before each timed run we ``sync`` and prefault
``PREFAULT`` bytes (an anonymous MAP_POPULATE mapping, then unmapped), servers alternate (vdisk first in even
repetitions, qemu-storage-daemon first in odd ones), and every number quoted is the median of the repetitions.

``cp`` reference: ``cp base.qcow2`` (the bytes a full stream writes, about) and ``cp mid.qcow2`` (about what
a stream with base writes); timed alone and followed by an fdatasync of the copy, since both servers make
the streamed data durable before they switch the backing chain.

Usage::

    .venv/bin/python benchmarks/bench_stream.py [--size-gib 2] [--reps 3] [--workdir DIR] [--out DIR]
    .venv/bin/python benchmarks/plot_stream.py benchmarks/results/stream.json

    # vdisk against itself: this tree and another one (e.g. an older commit's checkout), on a kept chain
    .venv/bin/python benchmarks/bench_stream.py --servers vdisk --vdisk-tree before=/tmp/old-tree \
        --loads none,rand --workdir DIR --reuse-chain --name stream_before_after
"""

from __future__ import annotations

import argparse
import contextlib
import json
import mmap
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

CLUSTER = 65536
IDLE = 3.0
TAIL = 0.6
PREFAULT = 3 << 30
SEQ_REQUEST = 256 * 1024
SEQ_DEPTH = 8
RAND_REQUEST = 4096
BIN = 0.1  # seconds per bin of the time series
QUIET_BUSY = 0.35  # before a timed run, wait until other processes use less than this fraction of the CPUs
QUIET_WAIT = 20.0  # ... but no longer than this (seconds); the busy fraction seen is recorded with the run
TARGETS = {"vdisk/qsd": 0.5, "vdisk/cp": 1.5, "guest_read_fraction": 0.8, "max_wait_ms": 50.0}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def run(*args, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([str(a) for a in args], check=True, capture_output=True, text=True, **kwargs)


# --- the chain -----------------------------------------------------------------------------------------


def _runs(clusters: np.ndarray) -> list[tuple[int, int]]:
    """Sorted cluster indices -> (first, count) runs of consecutive clusters."""
    if not len(clusters):
        return []
    breaks = np.flatnonzero(np.diff(clusters) != 1) + 1
    starts = np.concatenate(([0], breaks))
    stops = np.concatenate((breaks, [len(clusters)]))
    return [(int(clusters[a]), int(b - a)) for a, b in zip(starts, stops)]


def _rewrite(image: Path, fraction: float, pattern: int, rng: np.random.Generator, n_clusters: int) -> int:
    """Rewrite ``fraction`` of the clusters (random choice) with a byte pattern, through qemu-io."""
    chosen = np.sort(rng.choice(n_clusters, int(n_clusters * fraction), replace=False))
    commands = [f"write -q -P {pattern:#x} {first * CLUSTER} {count * CLUSTER}" for first, count in _runs(chosen)]
    for i in range(0, len(commands), 2000):  # keep each command line well under ARG_MAX
        run("qemu-io", "-f", "qcow2", *[x for c in commands[i : i + 2000] for x in ("-c", c)], image)
    return len(chosen)


def build_chain(workdir: Path, size: int, seed: int = 4) -> dict:
    n_clusters = size // CLUSTER
    rng = np.random.default_rng(seed)
    raw = workdir / "base.raw"
    with open(raw, "wb") as f:
        block = 64 << 20
        f.writelines(rng.integers(1, 256, min(block, size - offset), dtype=np.uint8).tobytes()
                     for offset in range(0, size, block))
    run("qemu-img", "convert", "-f", "raw", "-O", "qcow2", "-o", f"cluster_size={CLUSTER}", raw, workdir / "base.qcow2")
    raw.unlink()
    run("qemu-img", "create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", workdir / "mid.qcow2")
    mid = _rewrite(workdir / "mid.qcow2", 0.25, 0xB2, rng, n_clusters)
    run("qemu-img", "create", "-q", "-f", "qcow2", "-b", "mid.qcow2", "-F", "qcow2", workdir / "top.qcow2")
    top = _rewrite(workdir / "top.qcow2", 0.05, 0xC3, rng, n_clusters)
    os.sync()
    return {"size": size, "cluster_size": CLUSTER, "clusters": n_clusters, "mid_clusters": mid, "top_clusters": top,
            "files": {p.name: p.stat().st_size for p in sorted(workdir.glob("*.qcow2"))}}


def warm(workdir: Path) -> None:
    """Keep base and mid in the page cache (both servers read them from there)."""
    for name in ("base.qcow2", "mid.qcow2"):
        with open(workdir / name, "rb", buffering=0) as f:
            while f.read(16 << 20):
                pass


def cpu_busy(interval: float = 1.0) -> float:
    """Fraction of all CPUs busy over ``interval`` seconds (/proc/stat)."""
    def sample() -> tuple[int, int]:
        with open("/proc/stat") as f:
            values = [int(x) for x in f.readline().split()[1:]]
        return sum(values), values[3] + values[4]

    total0, idle0 = sample()
    time.sleep(interval)
    total1, idle1 = sample()
    return 1.0 - (idle1 - idle0) / max(total1 - total0, 1)


def wait_quiet(limit: float = QUIET_BUSY, max_wait: float = QUIET_WAIT) -> tuple[float, float]:
    """Wait (at most ``max_wait`` s) until other work leaves the CPUs mostly idle; returns (busy, waited)."""
    start = time.monotonic()
    while True:
        busy = cpu_busy()
        waited = time.monotonic() - start
        if busy < limit or waited > max_wait:
            return busy, waited


def prefault(nbytes: int = PREFAULT) -> float:
    os.sync()
    t = time.monotonic()
    m = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | getattr(mmap, "MAP_POPULATE", 0x8000))
    m.close()
    return time.monotonic() - t


# --- the two servers -----------------------------------------------------------------------------------


class Server:
    name = ""

    def __init__(self, image: Path, rundir: Path):
        self.image = image
        self.socket = rundir / f"{self.name}.sock"
        self.qmp = rundir / f"{self.name}.qmp"
        self.pid_file = rundir / f"{self.name}.pid"
        self.proc: subprocess.Popen | None = None
        self.monitor = None
        self.stderr = rundir / f"{self.name}.log"

    uri = ""

    def command(self) -> list[str]:
        raise NotImplementedError

    def start(self) -> None:
        from vdisk.qmp.client import Monitor

        for p in (self.socket, self.qmp, self.pid_file):
            p.unlink(missing_ok=True)
        with open(self.stderr, "w") as log_file:  # the child keeps its own descriptor
            self.proc = subprocess.Popen(self.command(), stdout=subprocess.DEVNULL, stderr=log_file,
                                         cwd=self.image.parent)
        deadline = time.monotonic() + 60
        while not (self.pid_file.exists() and self.pid_file.stat().st_size and self.socket.exists()
                   and self.qmp.exists()):
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited {self.proc.returncode}: {self.stderr.read_text()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.name} did not start")
            time.sleep(0.02)
        self.monitor = Monitor(str(self.qmp))

    def stream(self, base: str | None) -> tuple[float, float, dict]:
        """Start block-stream; returns (t0, t1, completion event data) with t1 at the event's arrival."""
        t0 = time.monotonic()
        self.monitor.execute("block-stream", job_id="drive0", device="drive0", base=base)
        while True:
            event = self.monitor.event(timeout=120)
            t1 = time.monotonic()
            if event is None:
                raise RuntimeError(f"{self.name}: no completion event within 120 s")
            if event["event"] in ("BLOCK_JOB_COMPLETED", "BLOCK_JOB_CANCELLED") \
                    and event["data"].get("device") == "drive0":
                break
        if event["event"] != "BLOCK_JOB_COMPLETED" or "error" in event["data"]:
            raise RuntimeError(f"{self.name}: stream ended with {event}")
        return t0, t1, event["data"]

    def stop(self) -> None:
        if self.monitor is not None:
            self.monitor.close()
            self.monitor = None
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None


class VdiskServer(Server):
    name = "vdisk"
    extra: tuple[str, ...] = ()  # more `vdisk serve` arguments (--vdisk-arg)
    root = ROOT  # the source tree whose vdisk is served (another one: --vdisk-tree NAME=PATH)

    @property
    def uri(self) -> str:
        return f"nbd+unix:///?socket={self.socket}"

    def command(self) -> list[str]:
        return [sys.executable, "-m", "vdisk.cli", "serve", str(self.image), "--socket", str(self.socket),
                "--qmp", str(self.qmp), "--pid-file", str(self.pid_file), "--device", "drive0", *self.extra]

    def start(self) -> None:
        env_pp = os.environ.get("PYTHONPATH", "")
        os.environ["PYTHONPATH"] = str(self.root) + (os.pathsep + env_pp if env_pp else "")
        try:
            super().start()
        finally:
            os.environ["PYTHONPATH"] = env_pp
            if not env_pp:
                del os.environ["PYTHONPATH"]


class QsdServer(Server):
    name = "qsd"

    @property
    def uri(self) -> str:
        return f"nbd+unix:///drive0?socket={self.socket}"

    def command(self) -> list[str]:
        return ["qemu-storage-daemon",
                "--blockdev", f"driver=file,filename={self.image},node-name=file0",
                "--blockdev", "driver=qcow2,file=file0,node-name=drive0",
                "--nbd-server", f"addr.type=unix,addr.path={self.socket}",
                "--export", "type=nbd,id=export0,node-name=drive0,writable=on",
                "--chardev", f"socket,path={self.qmp},server=on,wait=off,id=mon0",
                "--monitor", "chardev=mon0",
                "--pidfile", str(self.pid_file)]


SERVERS = {"vdisk": VdiskServer, "qsd": QsdServer}


# --- guest load clients (separate processes) ------------------------------------------------------------


def _stop_flag() -> list[bool]:
    flag = [False]

    def handler(signum, frame):
        flag[0] = True

    signal.signal(signal.SIGTERM, handler)
    return flag


def load_seq(uri: str, out: str) -> None:
    """Sequential reads, SEQ_DEPTH x SEQ_REQUEST in flight; records (start, end) of every request."""
    import nbd

    stop = _stop_flag()
    h = nbd.NBD()
    h.connect_uri(uri)
    size = h.get_size()
    free = [nbd.Buffer(SEQ_REQUEST) for _ in range(SEQ_DEPTH)]
    inflight: dict[int, tuple[float, nbd.Buffer]] = {}
    starts, ends = [], []
    offset = 0
    print("ready", flush=True)
    while not stop[0] or inflight:
        while not stop[0] and free:
            buf = free.pop()
            length = min(SEQ_REQUEST, size - offset)
            cookie = h.aio_pread(buf if length == SEQ_REQUEST else nbd.Buffer(length), offset)
            inflight[cookie] = (time.monotonic(), buf)
            offset = (offset + length) % size
        h.poll(100)
        now = time.monotonic()
        for cookie in [c for c in inflight if h.aio_command_completed(c)]:
            started, buf = inflight.pop(cookie)
            starts.append(started)
            ends.append(now)
            free.append(buf)
    h.shutdown()
    np.savez(out, start=np.array(starts), end=np.array(ends), bytes=SEQ_REQUEST)


def load_rand(uri: str, out: str) -> None:
    """Queue depth 1, 4 KiB random aligned reads; records (start, end) of every request."""
    import nbd

    stop = _stop_flag()
    h = nbd.NBD()
    h.connect_uri(uri)
    blocks = h.get_size() // RAND_REQUEST
    rng = np.random.default_rng(7)
    starts, ends = [], []
    print("ready", flush=True)
    while not stop[0]:
        for block in rng.integers(0, blocks, 1024).tolist():
            t = time.monotonic()
            h.pread(RAND_REQUEST, block * RAND_REQUEST)
            starts.append(t)
            ends.append(time.monotonic())
            if stop[0]:
                break
    h.shutdown()
    np.savez(out, start=np.array(starts), end=np.array(ends), bytes=RAND_REQUEST)


@contextlib.contextmanager
def load(kind: str, uri: str, out: Path):
    """Run a load client for the duration of the block; yields a dict filled with its records at exit."""
    records: dict = {}
    if kind == "none":
        yield records
        return
    proc = subprocess.Popen([sys.executable, __file__, f"_{kind}", uri, str(out)], stdout=subprocess.PIPE, text=True)
    if proc.stdout.readline().strip() != "ready":
        raise RuntimeError(f"load client {kind} did not start")
    try:
        yield records
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
    with np.load(out) as data:
        records.update(start=data["start"], end=data["end"], bytes=int(data["bytes"]))
    out.unlink()


# --- one timed run ---------------------------------------------------------------------------------------


def timed_stream(server_cls, workdir: Path, kind: str, load_kind: str, check: bool = False) -> dict:
    image = workdir / f"run-{server_cls.name}.qcow2"
    shutil.copyfile(workdir / "top.qcow2", image)
    with open(image, "rb+") as f:
        os.fsync(f.fileno())
    warm(workdir)
    server = server_cls(image, workdir)
    result: dict = {"server": server_cls.name, "kind": kind, "load": load_kind}
    result["busy_before"], result["quiet_wait_s"] = wait_quiet()
    try:
        server.start()
        result["prefault_s"] = prefault()
        with load(load_kind, server.uri, workdir / f"load-{server_cls.name}.npz") as records:
            idle_from = time.monotonic()
            if load_kind != "none":
                time.sleep(IDLE)
            t0, t1, event = server.stream(str(workdir / "base.qcow2") if kind == "base" else None)
            if load_kind != "none":
                time.sleep(TAIL)
        result.update(stream_s=t1 - t0, bytes=event["len"])
        if load_kind != "none":
            result.update(summarise_load(records, idle_from, t0, t1))
    finally:
        server.stop()
    if check:
        result["check"] = verify(workdir, image, kind)
    image.unlink()
    return result


def summarise_load(rec: dict, idle_from: float, t0: float, t1: float) -> dict:
    start, end, size = rec["start"], rec["end"], rec["bytes"]
    lat = (end - start) * 1000.0
    idle = (start >= idle_from + 0.5) & (end <= t0)  # skip connection warm-up
    during = (end > t0) & (start <= t1)  # every request that overlapped the stream, its end included
    ending = (end > t1 - 1.0) & (start <= t1)  # the last second: the flush and the chain switch
    out = {
        "idle_mib_s": size * int(idle.sum()) / max(t0 - idle_from - 0.5, 1e-9) / 2**20,
        "during_mib_s": size * int(((end > t0) & (end <= t1)).sum()) / max(t1 - t0, 1e-9) / 2**20,
        "idle_ms": _percentiles(lat[idle]),
        "during_ms": _percentiles(lat[during]),
        "end_max_ms": float(lat[ending].max()) if ending.any() else None,
    }
    out["read_fraction"] = out["during_mib_s"] / out["idle_mib_s"] if out["idle_mib_s"] else None
    # time series for the plot, relative to the block-stream command
    lo, hi = -1.0, (t1 - t0) + TAIL
    edges = np.arange(lo, hi + BIN, BIN)
    rel_end = end - t0
    counts, _ = np.histogram(rel_end, bins=edges)
    series = {"t": [round(float(x), 3) for x in edges[:-1]],
              "mib_s": [round(float(c * size / BIN / 2**20), 1) for c in counts]}
    which = np.digitize(rel_end, edges) - 1
    series["lat_max_ms"] = [round(float(lat[which == i].max()), 3) if (which == i).any() else None
                            for i in range(len(edges) - 1)]
    series["lat_p50_ms"] = [round(float(np.median(lat[which == i])), 3) if (which == i).any() else None
                            for i in range(len(edges) - 1)]
    out["series"] = series
    return out


def _percentiles(lat: np.ndarray) -> dict:
    if not len(lat):
        return {"n": 0}
    return {"n": len(lat), "p50": float(np.percentile(lat, 50)), "p99": float(np.percentile(lat, 99)),
            "max": float(lat.max())}


def verify(workdir: Path, image: Path, kind: str) -> dict:
    """The streamed image reads like the unstreamed chain, is clean, and has the expected backing file."""
    info = json.loads(run("qemu-img", "info", "--output=json", image).stdout)
    same = subprocess.run(["qemu-img", "compare", "-q", image, workdir / "top.qcow2"], check=False).returncode == 0
    clean = subprocess.run(["qemu-img", "check", "-q", image], capture_output=True, check=False).returncode == 0
    backing = info.get("backing-filename")
    ok = same and clean and (backing is None if kind == "full" else backing is not None and
                             os.path.samefile(workdir / backing if not os.path.isabs(backing) else backing,
                                              workdir / "base.qcow2"))
    return {"identical": same, "clean": clean, "backing": backing, "ok": ok}


def timed_cp(workdir: Path, name: str) -> dict:
    src, dst = workdir / name, workdir / f"cp-{name}"
    warm(workdir)
    busy, waited = wait_quiet()
    pf = prefault()
    t0 = time.monotonic()
    run("cp", src, dst)
    t1 = time.monotonic()
    fd = os.open(dst, os.O_RDONLY)
    try:
        os.fdatasync(fd)
    finally:
        os.close(fd)
    t2 = time.monotonic()
    dst.unlink()
    return {"server": "cp", "kind": "full" if name == "base.qcow2" else "base", "source": name,
            "cp_s": t1 - t0, "cp_sync_s": t2 - t0, "bytes": src.stat().st_size, "prefault_s": pf,
            "busy_before": busy, "quiet_wait_s": waited}


# --- the whole benchmark ---------------------------------------------------------------------------------


def median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def summarise(runs: list[dict], servers: list[str]) -> dict:
    table = {}
    for kind in ("full", "base"):
        row: dict = {}
        for s in servers:
            mine = [r for r in runs if r["server"] == s and r["kind"] == kind]
            seq = [r for r in mine if r["load"] == "seq"]
            rnd = [r for r in mine if r["load"] == "rand"]
            row[s] = {
                "stream_s": median([r["stream_s"] for r in mine if r["load"] == "none"]),
                "stream_s_all": [round(r["stream_s"], 3) for r in mine if r["load"] == "none"],
                "stream_s_seq_load": median([r["stream_s"] for r in seq]),
                "stream_s_rand_load": median([r["stream_s"] for r in rnd]),
                "idle_mib_s": median([r["idle_mib_s"] for r in seq]),
                "during_mib_s": median([r["during_mib_s"] for r in seq]),
                "read_fraction": median([r["read_fraction"] for r in seq]),
                "seq_max_wait_ms": median([r["during_ms"].get("max") for r in seq]),
                "idle_p50_ms": median([r["idle_ms"].get("p50") for r in rnd]),
                "idle_p99_ms": median([r["idle_ms"].get("p99") for r in rnd]),
                "idle_max_ms": median([r["idle_ms"].get("max") for r in rnd]),
                "p50_ms": median([r["during_ms"].get("p50") for r in rnd]),
                "p99_ms": median([r["during_ms"].get("p99") for r in rnd]),
                "max_ms": median([r["during_ms"].get("max") for r in rnd]),
                "max_ms_all": [round(r["during_ms"].get("max", 0), 1) for r in rnd],
                "end_max_ms": median([r["end_max_ms"] for r in rnd]),
                "end_max_ms_all": [round(r["end_max_ms"] or 0, 1) for r in rnd],
            }
        cps = [r for r in runs if r["server"] == "cp" and r["kind"] == kind]
        row["cp"] = {"cp_s": median([r["cp_s"] for r in cps]), "cp_sync_s": median([r["cp_sync_s"] for r in cps]),
                     "source": cps[0]["source"] if cps else None}
        v, q, c = row.get("vdisk", {}).get("stream_s"), row.get("qsd", {}).get("stream_s"), row["cp"]["cp_s"]
        row["vdisk/qsd"] = v / q if v and q else None
        row["vdisk/cp"] = v / c if v and c else None
        row["vdisk/cp+sync"] = v / row["cp"]["cp_sync_s"] if v and row["cp"]["cp_sync_s"] else None
        table[kind] = row
    return table


def representative_series(runs: list[dict]) -> dict:
    """For the plot: per (server, kind, load), the run whose stream time is the median of its repetitions."""
    out: dict = {}
    for r in runs:
        if "series" in r:
            out.setdefault(f"{r['server']}/{r['kind']}/{r['load']}", []).append(r)
    picked = {}
    for key, rs in out.items():
        rs = sorted(rs, key=lambda r: r["stream_s"])
        r = rs[len(rs) // 2]
        picked[key] = {"stream_s": r["stream_s"], **r["series"]}
    return picked


def fmt(x, spec=".2f", none="-"):
    return none if x is None else format(x, spec)


def render_table(summary: dict, meta: dict) -> str:
    size_gib = meta["chain"]["size"] / 2**30
    lines = [(f"Stream of a {size_gib:g} GiB chain (base full, mid 25 %, top 5 %), medians of {meta['reps']} "
              f"repetitions, servers alternated; times to BLOCK_JOB_COMPLETED."), ""]
    lines.append("| stream | vdisk s | qsd s | cp s (cp+sync) | vdisk/qsd | vdisk/cp (cp+sync) |")
    lines.append("|---|---|---|---|---|---|")
    for kind, label in (("full", "full"), ("base", "with base")):
        row = summary[kind]
        lines.append(f"| {label} | {fmt(row.get('vdisk', {}).get('stream_s'))} | "
                     f"{fmt(row.get('qsd', {}).get('stream_s'))} | "
                     f"{fmt(row['cp']['cp_s'])} ({fmt(row['cp']['cp_sync_s'])}) `{row['cp']['source']}` | "
                     f"{fmt(row['vdisk/qsd'])} | {fmt(row['vdisk/cp'])} ({fmt(row['vdisk/cp+sync'])}) |")
    others = [s for s in meta["servers"] if s not in ("vdisk", "qsd")]
    if others:
        lines += ["", "| stream | " + " | ".join(f"{s} s (all runs)" for s in ["vdisk", *others]) + " |",
                  "|---|" + "---|" * (1 + len(others))]
        for kind, label in (("full", "full"), ("base", "with base")):
            lines.append(f"| {label} | " + " | ".join(
                f"{fmt(summary[kind].get(s, {}).get('stream_s'))} {summary[kind].get(s, {}).get('stream_s_all')}"
                for s in ["vdisk", *others]) + " |")
    lines += ["", "Guest during the stream (a separate run per load; idle = the same server before the stream):", ""]
    lines.append("| stream | server | seq read MiB/s idle -> during (fraction) | 4K read p50 ms idle -> during | "
                 "p99 ms | max ms | max ms in the last 1 s (switch) |")
    lines.append("|---|---|---|---|---|---|---|")
    for kind, label in (("full", "full"), ("base", "with base")):
        for s in meta["servers"]:
            r = summary[kind][s]
            lines.append(
                f"| {label} | {s} | {fmt(r['idle_mib_s'], '.0f')} -> {fmt(r['during_mib_s'], '.0f')} "
                f"({fmt(r['read_fraction'])}) | {fmt(r['idle_p50_ms'], '.3f')} -> {fmt(r['p50_ms'], '.3f')} | "
                f"{fmt(r['idle_p99_ms'], '.2f')} -> {fmt(r['p99_ms'], '.2f')} | "
                f"{fmt(r['idle_max_ms'], '.1f')} -> {fmt(r['max_ms'], '.1f')} | {fmt(r['end_max_ms'], '.1f')} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size-gib", type=float, default=2.0)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--workdir", help="where to build the chain (default: a temporary directory, removed)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    p.add_argument("--servers", default="vdisk,qsd")
    p.add_argument("--loads", default="none,seq,rand")
    p.add_argument("--kinds", default="full,base")
    p.add_argument("--vdisk-arg", action="append", default=[], help="extra argument for vdisk serve")
    p.add_argument("--name", default="stream", help="result file stem")
    p.add_argument("--vdisk-tree", action="append", default=[], metavar="NAME=PATH",
                   help="also serve the vdisk of another source tree (e.g. a checkout of an older commit) as NAME")
    p.add_argument("--reuse-chain", action="store_true", help="use the chain already in --workdir")
    args = p.parse_args(argv)
    VdiskServer.extra = tuple(args.vdisk_arg)
    for spec in args.vdisk_tree:
        tree_name, _, tree_path = spec.partition("=")
        SERVERS[tree_name] = type(f"Vdisk_{tree_name}", (VdiskServer,),
                                  {"name": tree_name, "root": Path(tree_path).resolve()})
    servers = args.servers.split(",") + [spec.partition("=")[0] for spec in args.vdisk_tree]
    loads, kinds = args.loads.split(","), args.kinds.split(",")
    size = int(args.size_gib * 2**30) // CLUSTER * CLUSTER
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as stack:
        if args.workdir:
            workdir = Path(args.workdir).resolve()
            workdir.mkdir(parents=True, exist_ok=True)
        else:
            workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="vdisk-bench-", dir="/var/tmp")))
        if args.reuse_chain:
            chain = {"size": size, "cluster_size": CLUSTER, "reused": str(workdir)}
        else:
            log(f"building the chain ({size >> 20} MiB) in {workdir}")
            chain = build_chain(workdir, size)
        log(f"chain: {chain}")
        runs: list[dict] = []
        for rep in range(args.reps):
            order = servers if rep % 2 == 0 else servers[::-1]
            for kind in kinds:
                for load_kind in loads:
                    for s in order:
                        r = timed_stream(SERVERS[s], workdir, kind, load_kind, check=(rep == 0 and load_kind == "none"))
                        r["rep"] = rep
                        runs.append(r)
                        extra = ""
                        if load_kind == "seq":
                            extra = f" read {r['idle_mib_s']:.0f}->{r['during_mib_s']:.0f} MiB/s max {r['during_ms']['max']:.1f} ms"
                        if load_kind == "rand":
                            d = r["during_ms"]
                            extra = f" p50 {d['p50']:.3f} p99 {d['p99']:.2f} max {d['max']:.1f} end {r['end_max_ms']:.1f} ms"
                        log(f"rep {rep} {kind:4} {load_kind:4} {s:5} {r['stream_s']:.2f} s{extra}"
                            f" (prefault {r['prefault_s']:.1f} s, busy {r['busy_before']:.0%})"
                            f"{' ' + str(r['check']) if 'check' in r else ''}")
                if kind in ("full", "base"):
                    r = timed_cp(workdir, "base.qcow2" if kind == "full" else "mid.qcow2")
                    r["rep"] = rep
                    runs.append(r)
                    log(f"rep {rep} {kind:4} cp {r['source']} {r['cp_s']:.2f} s (+sync {r['cp_sync_s']:.2f} s)")
        meta = {"reps": args.reps, "servers": servers, "chain": chain, "date": time.strftime("%Y-%m-%d %H:%M"),
                "vdisk_args": args.vdisk_arg, "cpus": os.cpu_count(),
                "qsd": run("qemu-storage-daemon", "--version").stdout.splitlines()[0],
                "loads": {"seq": f"{SEQ_DEPTH} x {SEQ_REQUEST // 1024} KiB in flight, one connection",
                          "rand": f"queue depth 1, {RAND_REQUEST} B"}, "targets": TARGETS}
        summary = summarise(runs, servers)
        result = {"meta": meta, "summary": summary, "series": representative_series(runs),
                  "runs": [{k: v for k, v in r.items() if k != "series"} for r in runs]}
        (out / f"{args.name}.json").write_text(json.dumps(result, indent=1))
        table = render_table(summary, meta)
        (out / f"{args.name}.md").write_text(table + "\n")
        print(table)
        if any(r.get("check", {}).get("ok") is False for r in runs):
            log("a streamed image did not verify: see 'check' in the runs")
            return 1
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] in ("_seq", "_rand"):
        (load_seq if sys.argv[1] == "_seq" else load_rand)(sys.argv[2], sys.argv[3])
        sys.exit(0)
    sys.exit(main())
