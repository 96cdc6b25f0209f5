"""A QMP client for the command line, on ``qemu.qmp`` (the client library QEMU ships on PyPI)."""

from __future__ import annotations

import asyncio
import sys
import time
from typing import Any

from qemu.qmp import ExecuteError
from qemu.qmp.legacy import QEMUMonitorProtocol

from vdisk.errors import GenericError, QMPError


class Monitor:
    """A negotiated QMP connection with errors turned into ours."""

    def __init__(self, path: str):
        self._qmp = QEMUMonitorProtocol(path)
        try:
            self._qmp.connect(negotiate=True)
        except Exception as exc:  # OSError, or qemu.qmp's ConnectError/negotiation errors
            raise GenericError(f"cannot connect to the monitor at {path}: {exc}") from exc

    def execute(self, name: str, **arguments: Any) -> Any:
        args = {k.replace("_", "-"): v for k, v in arguments.items() if v is not None}
        try:
            return self._qmp.cmd(name, **args)
        except ExecuteError as exc:
            error = QMPError(str(exc))
            error.qmp_class = exc.error_class
            raise error from None

    def hmp(self, line: str) -> str:
        return self.execute("human-monitor-command", command_line=line)

    def event(self, timeout: float | None) -> dict | None:
        try:
            return self._qmp.pull_event(wait=True if timeout is None else timeout)
        except (TimeoutError, asyncio.TimeoutError):
            return None

    def close(self) -> None:
        self._qmp.close()

    def __enter__(self) -> Monitor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def progress_bar(done: int, total: int, speed: float, width: int = 40) -> str:
    fraction = done / total if total else 1.0
    filled = int(fraction * width)
    return (f"\r[{'#' * filled}{'.' * (width - filled)}] {100 * fraction:5.1f}% "
            f"{done >> 20}/{total >> 20} MiB {speed / (1 << 20):7.1f} MiB/s")


def wait_for_job(monitor: Monitor, job_id: str, *, show_progress: bool = True, out=sys.stderr) -> dict:
    """Follow a block job until its BLOCK_JOB_COMPLETED/CANCELLED event; returns that event's data."""
    started = time.monotonic()
    ending = None
    while ending is None:
        event = monitor.event(timeout=0.2)
        if event is not None and event["event"] in ("BLOCK_JOB_COMPLETED", "BLOCK_JOB_CANCELLED") \
                and event["data"].get("device") == job_id:
            ending = event
            break
        if show_progress:
            for job in monitor.execute("query-block-jobs"):
                if job["device"] == job_id:
                    elapsed = max(time.monotonic() - started, 1e-6)
                    out.write(progress_bar(job["offset"], job["len"], job["offset"] / elapsed))
                    out.flush()
    if show_progress:
        data = ending["data"]
        elapsed = max(time.monotonic() - started, 1e-6)
        out.write(progress_bar(data["offset"], data["len"], data["offset"] / elapsed) + "\n")
    return {"event": ending["event"], **ending["data"]}
