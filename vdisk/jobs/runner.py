"""Block jobs as threads beside the block devices: the stream job's worker and its QMP-facing glue.

Design notes
============
``Job`` (vdisk.jobs.job) is pure state; this module is the worker that drives it.  All calls into a job, and
every event it returns, happen under ``JobRegistry.lock`` (QEMU's job_mutex); events are broadcast while it is
held, so every client sees them in the order they happened.  The worker drops the lock for the copying
(``StreamCopier.step``), sleeps on ``job.wakeup`` (a Condition on that lock) for rate limiting and pauses,
and is woken by every verb that changes what it should do (pause, resume, cancel, set-speed).

The stream job's ``_prepare`` (run from ``complete_run`` or ``job-finalize``) switches the backing chain;
``_clean`` releases the device (copy-on-read off, ``device.job`` cleared).  A cancelled or failed job never
calls ``_prepare``: the chain stays as it was, and the clusters already copied are harmless duplicates.
"""

from __future__ import annotations

import logging
import os
import threading
import time

from vdisk.formats.node import Node
from vdisk.block.device import BlockDevice
from vdisk.errors import StorageError, VdiskError
from vdisk.jobs.job import Job, JobStatus, JobType
from vdisk.jobs.registry import JobRegistry
from vdisk.jobs.stream import StreamCopier

log = logging.getLogger(__name__)


class StreamJob(Job):
    def __init__(
        self,
        registry: JobRegistry,
        device: BlockDevice,
        job_id: str,
        base: Node | None,
        *,
        backing_file: str | None = None,
        on_error: str = "report",
        auto_finalize: bool = True,
        auto_dismiss: bool = True,
        target: Node | None = None,
    ):
        super().__init__(job_id, JobType.STREAM, auto_finalize=auto_finalize, auto_dismiss=auto_dismiss)
        self.registry = registry
        self.device = device
        self.base = base
        self.backing_file = backing_file
        self.on_error = on_error
        # Streaming into an intermediate node: the caller reopened it read-write; _clean reopens it read-only.
        self.intermediate = target is not None and target is not device.top
        self.copier = StreamCopier(device, base, target=target)
        self.wakeup = threading.Condition(registry.lock)
        self.thread = threading.Thread(target=self._run, name=f"vdisk-job-{job_id}", daemon=True)
        self.progress_set_remaining(self.copier.length)

    # --- hooks of Job ----------------------------------------------------------------------------------

    def _prepare(self) -> None:
        self.copier.finish(self.backing_file)

    def _clean(self) -> None:
        self.device.cor_active = False
        self.device.cor_base = None
        if self.intermediate:
            self.device.reopen_node(self.copier.top, read_only=True)
        if self.device.job is self:
            self.device.job = None

    # --- control from QMP (caller holds the job lock) -------------------------------------------------

    def launch(self) -> None:
        """Start the job (lock held).  QEMU starts it inside block-stream: 'running' precedes the reply, and a
        cancel can never find a created job whose worker has not started yet."""
        self.registry.emit(self.start())
        self.device.job = self
        if not self.intermediate:  # copy-on-read fills the active image only
            self.device.cor_base = self.base
            self.device.cor_active = True
        self.registry.add(self)
        self.thread.start()

    def poke(self) -> None:
        """Wake the worker after a verb changed what it should do."""
        self.wakeup.notify_all()

    def cancel_and_wait(self, timeout: float = 60.0) -> None:
        with self.registry.lock:
            if self.status not in (JobStatus.CONCLUDED, JobStatus.NULL):
                self.registry.emit(self.cancel_unchecked(force=True))
                self.poke()
        if self.thread.is_alive() and self.thread is not threading.current_thread():
            self.thread.join(timeout)

    # --- the worker --------------------------------------------------------------------------------------

    def _run(self) -> None:
        lock = self.registry.lock
        copier = self.copier
        position = 0
        # The first copy error, reported when the run ends even if on-error let the job go on (QEMU's
        # stream_run): an ignored error must not drop the backing chain, whose data was not all copied.
        error: BaseException | None = None
        try:
            while True:
                if position < copier.length:
                    with lock:
                        if not self._wait_to_copy():
                            break
                try:
                    if position >= copier.length:
                        copier.drain()  # the last chunk's write may still fail
                        break
                    next_position = copier.step(position)
                    copied = copier.last_copied
                except VdiskError as exc:
                    # A write error surfaces one step late: it names the chunk it happened in.
                    failed = min(getattr(exc, "chunk_start", position), position)
                    action = self._on_copy_error(exc)
                    if action == "stop":
                        with lock:  # copy the failed chunk again (after block-job-resume)
                            self.progress_current -= position - failed
                        position = failed
                        continue
                    if error is None:
                        error = exc
                    if action == "report" or position >= copier.length:
                        break
                    next_position = min(copier.length, position + copier.chunk)  # ignore: skip this chunk
                    copied = next_position - position
                with lock:
                    self.progress_update(next_position - position)
                    self.ratelimit_processed(time.monotonic(), copied)
                position = next_position
        except Exception as exc:  # a bug must fail the job, not leave it running forever
            log.exception("stream job %s failed", self.id)
            error = error or exc
        finally:
            try:
                copier.close()
            except Exception as exc:  # noqa: BLE001 - a cancelled job's last write failed: it is cancelled anyway
                log.warning("stream job %s: %s", self.id, exc)
                error = error or exc
            with lock:
                if self.paused:
                    self.registry.emit(self.leave_pause_point())
                self.registry.emit(self.complete_run(_qemu_error(error)))

    def _wait_to_copy(self) -> bool:
        """Pause point and rate limit (lock held).  False when the job was cancelled."""
        while True:
            if self.is_cancelled:
                return False
            if self.pause_requested:
                self.registry.emit(self.on_pause_point())
                while self.pause_requested and not self.is_cancelled:
                    self.wakeup.wait()
                self.registry.emit(self.leave_pause_point())
                continue
            delay = self.ratelimit_delay(time.monotonic())
            if delay <= 0:
                self.set_busy(True)
                return True
            self.set_busy(False)
            self.wakeup.wait(delay)

    def _on_copy_error(self, exc: VdiskError) -> str:
        with self.registry.lock:
            action, events = self.error_action(self.on_error, getattr(exc, "is_read", False), exc.errno)
            self.registry.emit(events)
        log.warning("stream job %s: %s (action: %s)", self.id, exc, action)
        return action


def _qemu_error(error: BaseException | None) -> BaseException | None:
    """QEMU reports a block job's I/O error as strerror alone ("Input/output error"); the log has the detail."""
    if isinstance(error, StorageError):
        return OSError(error.errno, os.strerror(error.errno))
    return error
