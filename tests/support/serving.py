"""A real ``vdisk serve`` process for the length of a ``with`` block, and the nbdkit process it runs."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import subprocess
import time
from pathlib import Path

from tests.support.commands import ROOT, VDISK


@dataclasses.dataclass
class Served:
    proc: subprocess.Popen
    socket: Path
    qmp: Path | None
    image: Path

    @property
    def uri(self) -> str:
        return f"nbd+unix:///?socket={self.socket}"

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(timeout)


@contextlib.contextmanager
def serve(image: Path | str, *extra: str, qmp: bool = False, timeout: float = 30):
    """Run `vdisk serve IMAGE --socket ...` until the context ends (SIGTERM, then waits)."""
    image = Path(image)
    base = image.parent / f".{image.name}.{os.getpid()}"
    sock, pid = Path(f"{base}.sock"), Path(f"{base}.pid")
    qmp_path = Path(f"{base}.qmp") if qmp else None
    args = [*VDISK, "serve", str(image), "--socket", str(sock), "--pid-file", str(pid), *extra]
    if qmp_path:
        args += ["--qmp", str(qmp_path)]
    proc = subprocess.Popen(args, cwd=ROOT, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + timeout
    while not (pid.exists() and sock.exists() and (qmp_path is None or qmp_path.exists())):
        if proc.poll() is not None:
            raise AssertionError(f"vdisk serve exited {proc.returncode}: {proc.stderr.read()}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError("vdisk serve did not start")
        time.sleep(0.02)
    served = Served(proc, sock, qmp_path, image)
    try:
        yield served
    finally:
        served.stop()


def nbdkit_pid(served: Served) -> int:
    """The nbdkit process that a `vdisk serve` runs (its only child): the one holding the image open."""
    pid = served.proc.pid
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    assert len(children) == 1, f"vdisk serve {pid} has children {children}, expected one nbdkit"
    return int(children[0])
