"""The serving process's state: its run state, its configuration, and the command context (block devices,
jobs, stop request) that the QMP monitor and the jobs work on.

Design notes
============
nbdkit loads ``vdisk.serving.nbdkit_plugin``, which forwards its lifecycle callbacks here, one step each:
``config`` (one key), ``config_complete``, ``open`` (nbdkit's get_ready: the chain opens before any client
connects, so a bad image fails at once), ``start`` (after_fork: the monitor and the cache cleaner start),
``device_for_connection`` (open, per client), ``shutdown`` (cleanup: jobs cancelled, images flushed and
closed).  :data:`RUN_STATE_TABLE` says which step each :class:`RunState` allows and where it leads, as
qemu.qmp's ``Runstate`` does for a connection; a step the table does not list raises
:class:`~vdisk.errors.StateError` before doing anything.

A step that fails leaves the state it started from, and nothing half-done: what it had opened or started is
closed or stopped again, and the error propagates (ours as they are; anything else as a
:class:`~vdisk.errors.ServingError` whose cause is chained), so nbdkit reports it and exits.

Threads: nbdkit calls the lifecycle steps one at a time from its main thread, so only they write ``state``;
``device_for_connection`` (nbdkit's connection threads) only reads it.  ``shutdown`` runs once the last client
connection has ended.
"""

from __future__ import annotations

import contextlib
import enum
import logging
import threading
from collections.abc import Callable, Iterator

from vdisk.block import chain
from vdisk.block.device import BlockDevice
from vdisk.errors import ServingError, StateError, VdiskError
from vdisk.qmp.context import CommandContext
from vdisk.qmp.monitor import MonitorServer
from vdisk.serving.config import PluginConfig, PluginConfigParser

log = logging.getLogger(__name__)


class RunState(enum.Enum):
    CONFIGURING = "configuring"  # collecting nbdkit's key=value pairs
    CONFIGURED = "configured"  # the keys are complete and checked
    READY = "ready"  # the chain is open
    RUNNING = "running"  # the monitor and the cache cleaner run; clients connect
    STOPPED = "stopped"  # jobs cancelled, monitor stopped, images flushed and closed


class Step(enum.Enum):
    CONFIG = "config"
    CONFIG_COMPLETE = "config_complete"
    OPEN = "open"
    START = "start"
    CONNECT = "connect"
    SHUTDOWN = "shutdown"


#: (state, step) -> the state after the step succeeded.  nbdkit calls cleanup (shutdown) whenever it unloads
#: the plugin, even when an earlier step failed, so every state but STOPPED may shut down.
RUN_STATE_TABLE: dict[tuple[RunState, Step], RunState] = {
    (RunState.CONFIGURING, Step.CONFIG): RunState.CONFIGURING,
    (RunState.CONFIGURING, Step.CONFIG_COMPLETE): RunState.CONFIGURED,
    (RunState.CONFIGURED, Step.OPEN): RunState.READY,
    (RunState.READY, Step.START): RunState.RUNNING,
    (RunState.RUNNING, Step.CONNECT): RunState.RUNNING,
    (RunState.CONFIGURING, Step.SHUTDOWN): RunState.STOPPED,
    (RunState.CONFIGURED, Step.SHUTDOWN): RunState.STOPPED,
    (RunState.READY, Step.SHUTDOWN): RunState.STOPPED,
    (RunState.RUNNING, Step.SHUTDOWN): RunState.STOPPED,
}


def next_run_state(state: RunState, step: Step) -> RunState:
    """Look the pair up in :data:`RUN_STATE_TABLE`; a pair not in it raises :class:`StateError`."""
    try:
        return RUN_STATE_TABLE[(state, step)]
    except KeyError:
        raise StateError(f"the serving process cannot {step.value} while {state.value}",
                         state=state.value, action=step.value) from None


class ServingProcess:
    """One nbdkit process's worth of vdisk: configuration, run state, devices, jobs and the QMP monitor."""

    def __init__(self) -> None:
        self.state = RunState.CONFIGURING
        self.context = CommandContext()
        self.monitor: MonitorServer | None = None
        self._parser = PluginConfigParser()
        self._config: PluginConfig | None = None
        self._stopping = threading.Event()  # ends the cache cleaner

    @contextlib.contextmanager
    def _step(self, step: Step, rollback: Callable[[], None] | None = None) -> Iterator[None]:
        """Run one step: refused unless the table allows it; on failure ``rollback`` undoes what the step did,
        the state stays, and a foreign error is wrapped (cause chained); on success the state moves on."""
        next_state = next_run_state(self.state, step)
        try:
            yield
        except BaseException as exc:
            if rollback is not None:
                rollback()
            if isinstance(exc, VdiskError) or not isinstance(exc, Exception):
                raise  # ours say what was wrong already; KeyboardInterrupt and the like stay what they are
            raise ServingError(f"{step.value} failed: {exc}", step=step.value) from exc
        self.state = next_state

    @property
    def plugin_config(self) -> PluginConfig:
        """The configuration, once ``config_complete`` accepted it."""
        if self._config is None:
            raise StateError(f"the serving process has no configuration while {self.state.value}",
                             state=self.state.value, action="plugin_config")
        return self._config

    # --- configuration (nbdkit config / config_complete) ---------------------------------------------

    def config(self, key: str, value: str) -> None:
        with self._step(Step.CONFIG):
            self._parser.add(key, value)

    def config_complete(self) -> None:
        with self._step(Step.CONFIG_COMPLETE):
            self._config = self._parser.complete()

    # --- lifecycle -----------------------------------------------------------------------------------

    def open(self) -> None:
        """Open the chain and make it the device (nbdkit's get_ready)."""
        with self._step(Step.OPEN):
            config = self.plugin_config
            top = chain.open_chain(config.image, config.format, read_only=config.read_only,
                                   allowed_dirs=list(config.allow_backing_dirs) or None, cache=config.cache)
            try:
                device = BlockDevice(config.device, top, read_only=config.read_only,
                                     copy_on_read=config.copy_on_read, cache=config.cache)
            except BaseException:
                chain.close_chain(top)
                raise
            self.context.devices[config.device] = device

    def start(self, stop_serving: Callable[[], None]) -> None:
        """Start the monitor (if asked for) and the cache cleaner (nbdkit's after_fork).  ``stop_serving`` is
        how QMP ``quit`` stops the process (nbdkit's business, so the adapter supplies it)."""
        with self._step(Step.START, rollback=self._stop_monitor):
            config = self.plugin_config
            self.context.stop_request = stop_serving
            if config.qmp:
                self.monitor = MonitorServer(config.qmp, self.context)
                self.context.jobs.broadcast = self.monitor.broadcast
                self.monitor.start()
            if config.cache.cache_clean_interval:
                threading.Thread(target=self._clean_caches, args=(config.cache.cache_clean_interval,),
                                 name="vdisk-cache-clean", daemon=True).start()

    def _stop_monitor(self) -> None:
        self.context.jobs.broadcast = None
        self.context.stop_request = None
        if self.monitor is not None:
            self.monitor.stop()
            self.monitor = None

    def _clean_caches(self, interval: int) -> None:
        """QEMU's cache-clean-interval: every interval, drop the metadata tables unused since the last one."""
        while not self._stopping.wait(interval):
            for device in list(self.context.devices.values()):
                for node in device.nodes():
                    dropped = node.clean_caches()
                    if dropped:
                        log.info("%s: dropped %d idle cached tables", node.path, dropped)

    def device_for_connection(self) -> BlockDevice:
        """The device a new NBD connection serves (nbdkit's open; nbdkit itself enforces a read-only export)."""
        with self._step(Step.CONNECT):
            return self.context.device(self.plugin_config.device)

    def shutdown(self) -> None:
        """Cancel the jobs, stop the monitor and the cleaner, flush and close the images (nbdkit's cleanup)."""
        with self._step(Step.SHUTDOWN):
            self.context.jobs.cancel_all()
            self._stopping.set()
            self._stop_monitor()
            for device in self.context.devices.values():
                try:
                    device.close()
                except VdiskError as exc:
                    log.error("closing %s: %s", device.name, exc)
            self.context.devices.clear()
