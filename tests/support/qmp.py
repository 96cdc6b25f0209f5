"""QMP through qemu.qmp: a session that records every event in order, and the runner for asyncio scenarios."""

from __future__ import annotations

import asyncio
import contextlib
import time
from pathlib import Path


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
