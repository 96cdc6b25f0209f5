"""Shared fixtures: real images made by qemu-img and vdisk, and a real `vdisk serve` process."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
VDISK = [sys.executable, "-m", "vdisk.cli"]


def run(*args: str, check: bool = True, **kwargs) -> subprocess.CompletedProcess:
    """Run a command, text output; on failure the assertion shows what it printed."""
    proc = subprocess.run([str(a) for a in args], capture_output=True, text=True, **kwargs)
    if check and proc.returncode != 0:
        raise AssertionError(f"{args} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
    return proc


def vdisk(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return run(*VDISK, *args, check=check, cwd=ROOT)


def qemu_img_check(path: Path | str) -> dict:
    """qemu-img check --output=json; -U so it also works on an image being served."""
    proc = run("qemu-img", "check", "-U", "--output=json", path, check=False)
    assert proc.returncode in (0, 2, 3), proc.stderr
    return json.loads(proc.stdout)


def assert_clean(path: Path | str) -> None:
    result = qemu_img_check(path)
    assert result.get("corruptions", 0) == 0 and result.get("leaks", 0) == 0 and result["check-errors"] == 0, result


def qemu_img_compare(a: Path | str, b: Path | str, fmt_a: str = "qcow2", fmt_b: str = "raw") -> bool:
    proc = run("qemu-img", "compare", "-U", "-f", fmt_a, "-F", fmt_b, a, b, check=False)
    assert proc.returncode in (0, 1), proc.stderr
    return proc.returncode == 0


def qemu_raw(path: Path | str, out: Path | str) -> bytes:
    run("qemu-img", "convert", "-U", "-O", "raw", path, out)
    return Path(out).read_bytes()


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


@pytest.fixture
def chain4(tmp_path: Path) -> dict[str, Path]:
    """The brief's chain [A] -> [B] -> [C] -> [D] in tmp_path (see make_chain4)."""
    return make_chain4(tmp_path)


def make_chain4(directory: Path) -> dict[str, Path]:
    """The brief's chain [A] -> [B] -> [C] -> [D], 8 MiB, made by qemu-img/qemu-io, with relative names.

    A holds pattern 0xA1 in its first half, B rewrites clusters with 0xB2 and zeroes one, C writes 0xC3 and
    a compressed cluster; D (active) is empty.
    """
    directory.mkdir(parents=True, exist_ok=True)
    paths = {name: directory / f"{name}.qcow2" for name in "ABCD"}
    run("qemu-img", "create", "-q", "-f", "qcow2", paths["A"], "8M")
    run("qemu-io", "-c", "write -P 0xa1 0 4M", paths["A"])
    run("qemu-img", "create", "-q", "-f", "qcow2", "-b", "A.qcow2", "-F", "qcow2", paths["B"])
    run("qemu-io", "-c", "write -P 0xb2 1M 1M", "-c", "write -z 3M 64k", "-c", "write -P 0xb3 6M 512k", paths["B"])
    run("qemu-img", "create", "-q", "-f", "qcow2", "-b", "B.qcow2", "-F", "qcow2", paths["C"])
    run("qemu-io", "-c", "write -P 0xc3 1536k 256k", "-c", "write -c -P 0xc4 7M 64k", paths["C"])
    run("qemu-img", "create", "-q", "-f", "qcow2", "-b", "C.qcow2", "-F", "qcow2", paths["D"])
    return paths


def nbdkit_pid(served: Served) -> int:
    """The nbdkit process that a `vdisk serve` runs (its only child): the one holding the image open."""
    pid = served.proc.pid
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    assert len(children) == 1, f"vdisk serve {pid} has children {children}, expected one nbdkit"
    return int(children[0])


# --- QMP through qemu.qmp, images through qemu-img (helpers for the stream tests) ---------------------------


class QmpSession:
    """A connected ``qemu.qmp.QMPClient`` that records every event it receives, in order.

    ``wait_event`` consumes events in arrival order (it never skips back); ``events`` keeps them all, so a
    test can wait for the end of a job and then look at the whole sequence.
    """

    def __init__(self, client, listener):
        self.client = client
        self._listener = listener
        self.events: list[dict] = []
        self._cursor = 0

    async def execute(self, command: str, arguments: dict | None = None):
        return await self.client.execute(command, arguments or {})

    async def error(self, command: str, arguments: dict | None = None) -> tuple[str, str]:
        """The (class, desc) of the error that ``command`` must fail with."""
        from qemu.qmp import ExecuteError

        try:
            result = await self.client.execute(command, arguments or {})
        except ExecuteError as exc:
            return exc.error_class, str(exc)
        raise AssertionError(f"{command} {arguments} succeeded with {result!r}, expected an error")

    async def hmp(self, line: str) -> str:
        return await self.client.execute("human-monitor-command", {"command-line": line})

    def _drain(self) -> None:
        self.events.extend(dict(message) for message in self._listener.clear())

    async def wait_event(self, name: str, timeout: float = 30, **data) -> dict:
        """The next event called ``name`` whose data holds ``data`` (consumes everything before it)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            self._drain()
            while self._cursor < len(self.events):
                ev = self.events[self._cursor]
                self._cursor += 1
                if ev["event"] == name and all(ev.get("data", {}).get(k) == v for k, v in data.items()):
                    return ev
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise AssertionError(f"no {name} {data} within {timeout} s; events: {self.sequence()}")
            try:
                self.events.append(dict(await asyncio.wait_for(self._listener.get(), remaining)))
            except TimeoutError:
                pass

    async def wait_status(self, job_id: str, status: str, timeout: float = 30) -> dict:
        return await self.wait_event("JOB_STATUS_CHANGE", timeout, id=job_id, status=status)

    async def wait_gone(self, job_id: str, timeout: float = 30) -> dict:
        """Wait for the job's 'null' status; returns its BLOCK_JOB_COMPLETED or BLOCK_JOB_CANCELLED event."""
        await self.wait_status(job_id, "null", timeout)
        endings = [ev for ev in self.events if ev["event"] in ("BLOCK_JOB_COMPLETED", "BLOCK_JOB_CANCELLED")
                   and ev["data"]["device"] == job_id]
        assert endings, f"job {job_id} vanished without a completion event: {self.sequence()}"
        return endings[-1]

    def sequence(self, job_id: str | None = None) -> list[str]:
        """Event names, JOB_STATUS_CHANGE as 'status:<status>' (optionally only this job's)."""
        self._drain()
        out = []
        for ev in self.events:
            data = ev.get("data", {})
            if job_id is not None and job_id not in (data.get("id"), data.get("device")):
                continue
            out.append(f"status:{data['status']}" if ev["event"] == "JOB_STATUS_CHANGE" else ev["event"])
        return out

    async def job(self, job_id: str) -> dict | None:
        """This job's query-block-jobs entry, or None."""
        for info in await self.execute("query-block-jobs"):
            if info["device"] == job_id:
                return info
        return None


@contextlib.asynccontextmanager
async def qmp_session(path: Path | str, *, negotiate: bool = True):
    """A qemu.qmp client connected to ``path`` (negotiated unless told otherwise), events recorded."""
    from qemu.qmp import EventListener, QMPClient

    client = QMPClient("vdisk-test")
    client.negotiate = negotiate
    listener = EventListener()
    client.register_listener(listener)
    deadline = time.monotonic() + 20
    while True:
        try:
            await client.connect(str(path))
            break
        except Exception:  # noqa: BLE001 - a socket not listening yet; qemu.qmp wraps the OSError
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.05)
    try:
        yield QmpSession(client, listener)
    finally:
        await client.disconnect()


def run_async(coro, timeout: float = 120):
    """Run one test's asyncio scenario with an overall deadline."""
    return asyncio.run(asyncio.wait_for(coro, timeout))


def chain_info(path: Path | str) -> list[dict]:
    """``qemu-img info --backing-chain`` as JSON: the active image first."""
    return json.loads(run("qemu-img", "info", "-U", "--backing-chain", "--output=json", path).stdout)


def qemu_map(path: Path | str) -> list[dict]:
    """``qemu-img map --output=json`` of the chain rooted at ``path``."""
    return json.loads(run("qemu-img", "map", "-U", "--output=json", path).stdout)


def file_digest(path: Path | str) -> str:
    import hashlib

    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def vdisk_main(capsys, *args: str) -> subprocess.CompletedProcess:
    """``vdisk ARGS`` run in this process (no interpreter start-up): exit code and captured output.

    An exception that escapes ``cli.main`` (what would be a traceback) fails the calling test.
    """
    from vdisk.cli import main as cli

    capsys.readouterr()
    code = cli.main([str(a) for a in args])
    captured = capsys.readouterr()
    return subprocess.CompletedProcess(["vdisk", *args], code, captured.out, captured.err)
