"""The serving process's state: the block devices, their jobs and the QMP monitor.

nbdkit loads ``vdisk.nbdkit_plugin``, which forwards its lifecycle here: ``config`` collects keys,
``open`` (nbdkit's get_ready, before serving) opens the chain so a bad image fails before any client
connects, ``start`` (after_fork) starts the monitor thread, ``shutdown`` (cleanup, on SIGTERM) cancels jobs,
flushes and closes the images cleanly.
"""

from __future__ import annotations

import logging
import os
import threading

from vdisk import chain
from vdisk.blockdev import BlockDevice
from vdisk.errors import DeviceNotFound, GenericError, VdiskError

log = logging.getLogger(__name__)

_TRUE = {"1", "true", "on", "yes"}


class Server:
    CONFIG_HELP = (
        "image=PATH          (required) the active image of the chain to serve\n"
        "format=qcow2|raw    its format (probed if not given)\n"
        "device=NAME         the block device name used by QMP (default drive0)\n"
        "readonly=BOOL       open the image read-only\n"
        "copy-on-read=BOOL   guest reads fill the active image from its backing chain\n"
        "qmp=PATH            a QMP-compatible control socket (unix)\n"
        "description=TEXT    the NBD export description\n"
        "allow-backing-dir=DIR  backing files must lie below DIR (repeatable)\n"
        "serialize=BOOL      one request at a time across all connections (default) or parallel"
    )

    def __init__(self) -> None:
        self.image: str | None = None
        self.format: str | None = None
        self.device_name = "drive0"
        self.read_only = False
        self.copy_on_read = False
        self.qmp_path: str | None = None
        self.description: str | None = None
        self.serialize = True
        self.allowed_dirs: list[str] | None = None  # backing files must lie below these (None: anywhere)
        self.devices: dict[str, BlockDevice] = {}
        self.job_lock = threading.RLock()  # QEMU's job_mutex: every job call and event emission
        self.monitor = None
        self.jobs: dict = {}
        self.shutdown_hook = None  # set by the nbdkit adapter: asks nbdkit to stop (QMP quit)

    # --- configuration (nbdkit config / config_complete) ---------------------------------------------

    def config(self, key: str, value: str) -> None:
        if key == "image":
            self.image = os.path.abspath(value)
        elif key == "format":
            self.format = value
        elif key == "device":
            self.device_name = value
        elif key == "readonly":
            self.read_only = value.lower() in _TRUE
        elif key == "copy-on-read":
            self.copy_on_read = value.lower() in _TRUE
        elif key == "qmp":
            self.qmp_path = os.path.abspath(value)
        elif key == "allow-backing-dir":
            self.allowed_dirs = [*(self.allowed_dirs or []), os.path.abspath(value)]
        elif key == "description":
            self.description = value
        elif key == "serialize":
            self.serialize = value.lower() in _TRUE
        else:
            raise GenericError(f"unknown parameter {key!r}; known: image, format, device, readonly, allow-backing-dir, "
                               "copy-on-read, qmp, description, serialize")

    def config_complete(self) -> None:
        if not self.image:
            raise GenericError("image=PATH is required")
        logging.basicConfig(level=os.environ.get("VDISK_LOG_LEVEL", "WARNING"),
                            format="vdisk[%(process)d]: %(levelname)s: %(name)s: %(message)s")

    # --- lifecycle -----------------------------------------------------------------------------------

    def open(self) -> None:
        top = chain.open_chain(self.image, self.format, read_only=self.read_only, allowed_dirs=self.allowed_dirs)
        self.devices[self.device_name] = BlockDevice(
            self.device_name, top, read_only=self.read_only, copy_on_read=self.copy_on_read
        )

    def start(self) -> None:
        if self.qmp_path:
            from vdisk.qmp.server import MonitorServer

            self.monitor = MonitorServer(self.qmp_path, self)
            self.monitor.start()

    def shutdown(self) -> None:
        from vdisk.jobs.runner import cancel_all

        cancel_all(self)
        if self.monitor is not None:
            self.monitor.stop()
        for device in self.devices.values():
            try:
                device.close()
            except VdiskError as exc:
                log.error("closing %s: %s", device.name, exc)
        self.devices.clear()

    def request_shutdown(self) -> None:
        if self.shutdown_hook is None:
            raise GenericError("this server cannot be stopped from the monitor")
        self.shutdown_hook()

    def device_for_connection(self, readonly: bool) -> BlockDevice:
        return self.device(self.device_name)

    def device(self, name: str) -> BlockDevice:
        try:
            return self.devices[name]
        except KeyError:
            raise DeviceNotFound(f"Device '{name}' not found") from None
