"""The serving process's state: the block devices, their jobs and the QMP monitor.

nbdkit loads ``vdisk.serving.nbdkit_plugin``, which forwards its lifecycle here: ``config`` collects keys,
``open`` (nbdkit's get_ready, before serving) opens the chain so a bad image fails before any client
connects, ``start`` (after_fork) starts the monitor thread, ``shutdown`` (cleanup, on SIGTERM) cancels jobs,
flushes and closes the images cleanly.
"""

from __future__ import annotations

import logging
import os
import threading

from vdisk.block import chain
from vdisk.block.device import BlockDevice
from vdisk.errors import DeviceNotFound, GenericError, VdiskError
from vdisk.jobs.registry import JobRegistry
from vdisk.formats.qcow2.cache import DEFAULT_CACHE_CLEAN_INTERVAL, CacheOptions
from vdisk.units import parse_size

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
        "serialize=BOOL      one request at a time across all connections (default) or parallel\n"
        "cache-size=SIZE     qcow2 L2 + refcount cache, as QEMU's cache-size (per qcow2 node)\n"
        "l2-cache-size=SIZE  qcow2 L2 cache (default: covers the disk, at most 32M)\n"
        "refcount-cache-size=SIZE  qcow2 refcount cache (default: 4 clusters)\n"
        "cache-clean-interval=SECONDS  drop cache entries unused this long (default 600, 0 = never)"
    )
    _CACHE_KEYS = ("cache-size", "l2-cache-size", "refcount-cache-size")

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
        self._cache_settings: dict[str, int] = {}  # QEMU's qcow2 cache option names -> bytes or seconds
        self.cache = CacheOptions()
        self._stopping = threading.Event()
        self.devices: dict[str, BlockDevice] = {}
        self.jobs = JobRegistry()
        self.monitor = None
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
        elif key in self._CACHE_KEYS:
            self._cache_settings[key] = parse_size(value)
        elif key == "cache-clean-interval":
            try:
                self._cache_settings[key] = int(value)
            except ValueError:
                raise GenericError(f"cache-clean-interval must be a whole number of seconds, not {value!r}") from None
        else:
            raise GenericError(f"unknown parameter {key!r}; known: image, format, device, readonly, allow-backing-dir, "
                               "copy-on-read, qmp, description, serialize, cache-size, l2-cache-size, "
                               "refcount-cache-size, cache-clean-interval")

    def config_complete(self) -> None:
        if not self.image:
            raise GenericError("image=PATH is required")
        settings = self._cache_settings
        self.cache = CacheOptions(
            cache_size=settings.get("cache-size"), l2_cache_size=settings.get("l2-cache-size"),
            refcount_cache_size=settings.get("refcount-cache-size"),
            cache_clean_interval=settings.get("cache-clean-interval", DEFAULT_CACHE_CLEAN_INTERVAL),
        )
        logging.basicConfig(level=os.environ.get("VDISK_LOG_LEVEL", "WARNING"),
                            format="vdisk[%(process)d]: %(levelname)s: %(name)s: %(message)s")

    # --- lifecycle -----------------------------------------------------------------------------------

    def open(self) -> None:
        opened = chain.open_chain(self.image, self.format, read_only=self.read_only, allowed_dirs=self.allowed_dirs,
                               cache=self.cache)
        self.devices[self.device_name] = BlockDevice(
            self.device_name, opened, read_only=self.read_only, copy_on_read=self.copy_on_read, cache=self.cache
        )

    def start(self) -> None:
        if self.qmp_path:
            from vdisk.qmp.monitor import MonitorServer

            self.monitor = MonitorServer(self.qmp_path, self)
            self.jobs.broadcast = self.monitor.broadcast
            self.monitor.start()
        if self.cache.cache_clean_interval:
            threading.Thread(target=self._clean_caches, name="vdisk-cache-clean", daemon=True).start()

    def _clean_caches(self) -> None:
        """QEMU's cache-clean-interval: every interval, drop the metadata tables unused since the last one."""
        while not self._stopping.wait(self.cache.cache_clean_interval):
            for device in list(self.devices.values()):
                for node in device.nodes():
                    dropped = node.clean_caches()
                    if dropped:
                        log.info("%s: dropped %d idle cached tables", node.path, dropped)

    def shutdown(self) -> None:
        self.jobs.cancel_all()
        self._stopping.set()
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
