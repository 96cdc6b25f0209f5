"""The stream job: fill a node from its backing chain above a base, then drop the nodes in between.

``StreamJob`` drives QEMU's job state machine (``vdisk.jobs.job``) from its own thread; ``StreamCopier`` does
the copying, through the block layer only: ``Chain.copy_plan`` (the one walk) says what to copy, the
pieces are read with the nodes' ``read_mapped``, the target's ``populate`` links them, and the block
device's ``drop_between`` (a chain switch) finishes.

Design notes
============
The copier walks the disk in chunks (``CHUNK`` bytes, whole clusters).  For each chunk it holds the block
device's COPY range lock (which excludes guest writes, not guest reads), maps the chunk through the chain
below the target once (``Chain.copy_plan``), takes the clusters that the target does not hold but the chain
above the base does, reads them straight from where the pieces say they are into one of two reused chunk
buffers, classifies all-zero clusters in C (``native.zero_map``, GIL released) and hands the buffer to the
target's ``populate``, which re-checks allocation under the image lock, allocates one contiguous host run
for the non-zero clusters, writes them with one pwritev and links them with one batch of L2 updates.  Zero
clusters become zero-flag clusters, never written zeros.  (Copy-on-read asks ``copy_plan`` the same
question, one guest request at a time.)

Ranges the chain above the base does not hold are skipped without a lock (the nodes below the target
never change while the job runs): after a chunk with nothing to copy, the next step maps a window twice as
large as the last one (up to ``MAX_SKIP``) and jumps to the first cluster held there, as QEMU's stream_run
skips what ``bdrv_is_allocated_above`` says is unallocated.  The progress counts skipped bytes, as QEMU's.
A dense chain pays nothing for this: the window is only mapped after an empty chunk.

Every ``WRITEBACK_EVERY`` bytes copied, a helper thread asks the kernel to start writing the target's dirty
pages (``sync_file_range(SYNC_FILE_RANGE_WRITE)``, no waiting), so the disk works while the copy runs and
the fdatasync of ``finish`` finds little left: on a 2 GiB stream it otherwise writes everything at the end.

Two stages overlap (these machines have 2 cores): while stage 2 (a worker thread) writes chunk N, stage 1
(the job thread) reads chunk N+1.  Each chunk keeps its COPY lock from its read until its write is linked,
so a guest write to that chunk waits at most for one chunk's copy and is never overwritten by it.

Completion (``finish``, through ``BlockDevice.drop_between``): flush the target (data, then metadata) with
no lock held, then quiesce the device (wait for requests in flight, hold new ones), rewrite the backing
pointer (one header write + fdatasync), relink the in-memory chain, release the device, close the dropped
nodes.  A crash before the
header write leaves the old, still valid chain (the copied clusters are harmless duplicates); after it, the
new chain, whose data was made durable first.

The job thread
--------------
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

import concurrent.futures
import ctypes
import ctypes.util
import logging
import os
import threading
import time
from collections.abc import Callable

import numpy as np

from vdisk.block.device import BlockDevice
from vdisk.block.rangelock import COPY
from vdisk.errors import CopyError, DeviceNotActive, GenericError, StorageError, VdiskError
from vdisk.formats.node import Node
from vdisk.io import native
from vdisk.jobs.job import Job, JobStatus, JobType
from vdisk.jobs.registry import JobRegistry

log = logging.getLogger(__name__)

CHUNK = 1 << 20
#: The longest stretch one step skips when the chain above the base holds nothing there.
MAX_SKIP = 1 << 30
#: Start the kernel's writeback of the target every this many bytes copied (0: never), so that the
#: fdatasync before the chain switch finds little left to write.
WRITEBACK_EVERY = 32 << 20


class StreamCopier:
    """Copies, chunk by chunk, what the chain above ``base`` holds into the device's active image."""

    def __init__(self, device: BlockDevice, base: Node | None, *, chunk: int = CHUNK, target: Node | None = None):
        """``target``: the node to fill, the device's active image unless given (an intermediate node, which
        the caller has reopened read-write: see ``BlockDevice.reopen_node``)."""
        target = target if target is not None else device.top
        if not target.can_have_backing:
            raise DeviceNotActive(f"Device '{device.name}' is not a qcow2 image with a backing file")
        if target.read_only:
            raise GenericError(f"Device '{device.name}' is read-only" if target is device.top
                               else f"Node '{target.path}' is read-only")
        self.device = device
        self.chain = device.chain
        self.target = target
        self.base = base
        cs = target.cluster_size
        self.chunk = max(cs, chunk // cs * cs)
        self.length = target.size
        # Test hook: called with (chunk start, end) after the backing data is read, before it is linked,
        # while the chunk's COPY lock is held (deterministic concurrency tests).
        self.before_populate: Callable[[int, int], None] | None = None
        self._writer = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="vdisk-stream-write")
        self._pending: concurrent.futures.Future | None = None
        self.last_copied = 0  # bytes the last step copied (wanted clusters), for the rate limit
        self._skip_window = 0  # 0: the last chunk held data above the base; else the next window to map
        # Two chunk buffers, reused: one being filled by the job thread, one being written by the writer.
        # (A fresh 1 MiB bytearray per chunk costs a calloc and, once glibc hands it back, page faults.)
        self._buffers = [bytearray(self.chunk), bytearray(self.chunk)]
        self._pending_buffer: bytearray | None = None
        self.writeback_every = WRITEBACK_EVERY
        self._unsynced = 0
        self._flusher: concurrent.futures.ThreadPoolExecutor | None = None
        self._writeback: concurrent.futures.Future | None = None

    def step(self, position: int) -> int:
        """Copy the chunk at ``position`` (or skip what the chain above the base does not hold); returns the
        next position.  Errors of the previous chunk surface here, as ``CopyError``."""
        if self._skip_window:
            try:
                held_from = self.chain.first_held(self.target, position,
                                                  min(self.length, position + self._skip_window), self.base)
            except VdiskError as exc:
                raise CopyError(exc, chunk_start=position, is_read=True) from exc
            if held_from > position:
                self._skip_window = min(MAX_SKIP, self._skip_window * 2)
                self.last_copied = 0
                return held_from
        end = min(self.length, position + self.chunk)
        ranges = self.device.ranges
        token = ranges.acquire(position, end, COPY)
        try:
            work = self._read(position, end)
        except VdiskError as exc:
            ranges.release(token)
            self.drain()
            raise CopyError(exc, chunk_start=position, is_read=True) from exc
        except BaseException:
            ranges.release(token)
            raise
        try:
            self.drain()
        except BaseException:
            # The previous chunk failed to write: this chunk is not copied, and its lock must not outlive it.
            ranges.release(token)
            raise
        self._pending = self._writer.submit(self._write, token, position, end, work)
        # what the rate limit counts (QEMU's stream_run: only ranges it copies, not the ones it skips)
        copied = work is not None and work[0].any()
        self.last_copied = int(np.count_nonzero(work[0])) * self.target.cluster_size if work is not None else 0
        self._skip_window = 0 if copied else max(self._skip_window, 2 * self.chunk)
        self._pending_buffer = work[3] if work is not None else None
        return end

    def drain(self) -> None:
        """Wait for the chunk being written; raise its error, if any."""
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def close(self) -> None:
        try:
            self.drain()
        finally:
            self._writer.shutdown(wait=True)
            if self._flusher is not None:
                self._flusher.shutdown(wait=True)

    def _read(self, start: int, end: int):
        target = self.target
        cs = target.cluster_size
        wanted, pieces = self.chain.copy_plan(target, start, end, self.base)
        partial = target.partially_allocated(start, end - start)
        if not wanted.any() and not partial:
            return None
        whole = self._buffers[0] if self._buffers[0] is not self._pending_buffer else self._buffers[1]
        buf = memoryview(whole)[: len(wanted) * cs]
        if wanted.any():
            spans = [(start + a * cs, start + b * cs) for a, b in _runs(wanted)]
            self.chain.read_pieces(buf, start, pieces, spans)
        return wanted, buf, partial, whole

    def _write(self, token, start: int, end: int, work) -> None:
        try:
            self._populate(start, end, work)
        except VdiskError as exc:
            raise CopyError(exc, chunk_start=start, is_read=False) from exc
        finally:
            self.device.ranges.release(token)

    def _populate(self, start: int, end: int, work) -> None:
        if work is None:
            return
        wanted, buf, partial, _ = work
        if self.before_populate is not None:
            self.before_populate(start, end)
        target = self.target
        if wanted.any():
            target.populate(start, buf, wanted, native.zero_map(buf, target.cluster_size))
            self._unsynced += end - start
            if self.writeback_every and self._unsynced >= self.writeback_every:
                self._kick_writeback()
        cs = target.cluster_size
        depth = self.chain.depth_of(target)
        for cluster in partial:
            # Copy-on-write of the whole cluster fills its unallocated subclusters from the chain.
            lo = cluster * cs
            whole = bytearray(min(cs, self.length - lo))
            self.chain.read(whole, lo, first=depth)
            target.pwrite(whole, lo)

    def _kick_writeback(self) -> None:
        """Have the kernel start writing the target's dirty pages, in a helper thread: sync_file_range may
        block while the disk's queue is full, and the copy must not wait for the disk (only finish does)."""
        kick = self._writeback
        if kick is not None and not kick.done():
            return  # the previous kick is still queueing pages; this one would find nothing new
        self._unsynced = 0
        if self._flusher is None:
            self._flusher = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="vdisk-stream-writeback")
        self._writeback = self._flusher.submit(_start_writeback, self.target.fd)

    def finish(self, backing_file: str | None = None) -> None:
        """Make the base the target's backing file (or none), durably and atomically."""
        self.drain()
        self.device.drop_between(self.target, self.base, backing_file)


_SYNC_FILE_RANGE_WRITE = 2
_LIBC = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_LIBC.sync_file_range.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]


def _start_writeback(fd: int) -> None:
    """sync_file_range(fd, 0, 0, SYNC_FILE_RANGE_WRITE): queue the file's dirty pages for writing, no wait."""
    _LIBC.sync_file_range(fd, 0, 0, _SYNC_FILE_RANGE_WRITE)  # advisory: an error here changes nothing


def _runs(mask: np.ndarray) -> list[tuple[int, int]]:
    """[start, stop) index runs where mask is True."""
    if not mask.any():
        return []
    padded = np.concatenate(([False], mask, [False]))
    edges = np.flatnonzero(padded[1:] != padded[:-1])
    return list(zip(edges[0::2].tolist(), edges[1::2].tolist()))


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
            self.device.reopen_node(self.copier.target, read_only=True)
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
                except CopyError as exc:
                    # A write error surfaces one step late: it names the chunk it happened in.
                    failed = min(exc.chunk_start, position)
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

    def _on_copy_error(self, exc: CopyError) -> str:
        with self.registry.lock:
            action, events = self.error_action(self.on_error, exc.is_read, exc.errno)
            self.registry.emit(events)
        log.warning("stream job %s: %s (action: %s)", self.id, exc, action)
        return action


def _qemu_error(error: BaseException | None) -> BaseException | None:
    """QEMU reports a block job's I/O error as strerror alone ("Input/output error"); the log has the detail."""
    if isinstance(error, CopyError):
        error = error.cause
    if isinstance(error, StorageError):
        return OSError(error.errno, os.strerror(error.errno))
    return error
