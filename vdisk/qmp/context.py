"""What a QMP command reaches of the serving process: its block devices, its jobs, and a way to ask it to stop.

Every command (and every HMP word, which runs commands) gets one :class:`CommandContext` as its first argument
and nothing else of the process: not its run state, not nbdkit, not the monitor's sockets.  The serving
process (``vdisk.serving.process``) owns one and fills it as it moves through its run states: the devices
when it opens the chain, the stop request when it starts serving.  Tests build one directly.

The context is not locked as a whole: ``jobs.lock`` (QEMU's job_mutex, see ``vdisk.jobs.registry``) covers the
jobs and every device's job slot; the device table is written only before the monitor starts and after it
stopped.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from vdisk.block.device import BlockDevice
from vdisk.errors import DeviceNotFound, GenericError
from vdisk.jobs.registry import JobRegistry


@dataclass(eq=False)
class CommandContext:
    """The devices by name, the job registry, and the stop request of one serving process."""

    devices: dict[str, BlockDevice] = field(default_factory=dict)
    jobs: JobRegistry = field(default_factory=JobRegistry)
    #: Asks the process to stop serving (QMP ``quit``); None while nothing can stop it from the monitor.
    stop_request: Callable[[], None] | None = None

    def device(self, name: str) -> BlockDevice:
        """The device called ``name``, as QEMU's blk_by_name looks it up."""
        try:
            return self.devices[name]
        except KeyError:
            raise DeviceNotFound(f"Device '{name}' not found") from None

    def request_shutdown(self) -> None:
        """QMP ``quit``: ask the process to stop; it answers first, then stops (the process decides how)."""
        if self.stop_request is None:
            raise GenericError("this server cannot be stopped from the monitor")
        self.stop_request()
