"""Long random hostile-session run against a real `vdisk serve` (the CI version: tests/test_fuzz_nbd.py).

    python -m fuzz.run_nbd [--seconds N] [--seed S] [--parallel]

Builds a 128 MiB base (patterns in its first and last MiB) and an empty overlay with qemu-img in a temporary
directory, serves the overlay on a unix socket, and runs ``fuzz.nbd_sessions`` until the time is up, checking
every 200 sessions that a libnbd client still reads what the model says.  At the end: SIGTERM, exit status 0,
no Python traceback in the server's stderr, ``qemu-img check`` clean.  Prints the counts; exits non-zero on
the first failure (with the seed and session number to replay it).
"""

from __future__ import annotations

import argparse
import json
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import nbd

from fuzz import nbd_sessions
from fuzz.nbd_sessions import WINDOW, Model

MiB = 1 << 20
SIZE = 128 * MiB
ROOT = Path(__file__).resolve().parent.parent


def _run(*args) -> None:
    subprocess.run([str(a) for a in args], check=True, capture_output=True)


def _check_reads(socket_path: Path, model: Model) -> None:
    h = nbd.NBD()
    h.connect_unix(str(socket_path))
    try:
        for start in model.data:
            problem = model.mismatch(start, h.pread(WINDOW, start))
            if problem:
                raise AssertionError(f"libnbd reads disagree with the model: {problem}")
    finally:
        h.shutdown()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=600)
    parser.add_argument("--seed", type=int, default=int(time.time()))
    parser.add_argument("--parallel", action="store_true")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="vdisk-nbd-fuzz-") as tmp:
        d = Path(tmp)
        base, top, sock, pid = d / "base.qcow2", d / "top.qcow2", d / "nbd.sock", d / "pid"
        _run("qemu-img", "create", "-q", "-f", "qcow2", base, str(SIZE))
        _run("qemu-io", "-c", "write -P 0x5a 0 1M", "-c", f"write -P 0x6b {SIZE - MiB} 1M", base)
        _run("qemu-img", "create", "-q", "-f", "qcow2", "-b", base, "-F", "qcow2", top)
        model = Model(SIZE, b"\x5a" * MiB + bytes(MiB), bytes(MiB) + b"\x6b" * MiB)
        cmd = [sys.executable, "-m", "vdisk.cli", "serve", str(top), "--socket", str(sock), "--pid-file", str(pid)]
        if args.parallel:
            cmd.append("--parallel")
        proc = subprocess.Popen(cmd, cwd=ROOT, stderr=subprocess.PIPE, text=True)
        lines: list[str] = []
        threading.Thread(target=lambda: lines.extend(proc.stderr), daemon=True).start()
        while not (pid.exists() and sock.exists()):
            if proc.poll() is not None:
                raise SystemExit(f"vdisk serve exited: {''.join(lines)}")
            time.sleep(0.05)
        rng = random.Random(args.seed)
        stats = nbd_sessions.Stats()
        deadline = time.monotonic() + args.seconds
        failure = None
        try:
            while time.monotonic() < deadline:
                number = stats.sessions
                try:
                    nbd_sessions.session(str(sock), rng, model, stats)
                    if number % 200 == 199:
                        _check_reads(sock, model)
                except Exception as exc:  # noqa: BLE001 - report it with what replays it
                    failure = f"session {number} (seed {args.seed}): {exc!r}"
                    break
                if proc.poll() is not None:
                    failure = f"vdisk serve died after session {number} (seed {args.seed})"
                    break
            if failure is None:
                _check_reads(sock, model)
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
            status = proc.wait(60)
        log = "".join(lines)
        if failure is None and status != 0:
            failure = f"vdisk serve exited {status}"
        if failure is None and "Traceback" in log:
            failure = "Python traceback in the server's stderr:\n" + log[log.index("Traceback") - 200:][:3000]
        check = json.loads(subprocess.run(["qemu-img", "check", "--output=json", str(top)], capture_output=True,
                                          text=True, check=False).stdout or "{}")
        if failure is None and (check.get("corruptions") or check.get("leaks") or check.get("check-errors")):
            failure = f"qemu-img check: {check}"
        print(json.dumps({"seed": args.seed, "seconds": args.seconds, "parallel": args.parallel,
                          **vars(stats), "failure": failure}))
        return 1 if failure else 0


if __name__ == "__main__":
    sys.exit(main())
