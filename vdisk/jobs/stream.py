"""The stream copier: fill the active image from its backing chain above a base, then drop the middle.

Design notes
============
The copier walks the disk in chunks (``CHUNK`` bytes, whole clusters).  For each chunk it holds the block
device's COPY range lock (which excludes guest writes, not guest reads), maps the chunk through the chain
below the target once (``resolve``: one ``map_units`` call per node, not one per run and per level as a
recursive read makes; a middle image with scattered clusters cuts a chunk into many runs), takes the
clusters that the target does not hold but the chain above the base does, reads them straight from the host
offsets the map gave (compressed clusters, raw files and the base through their own ``pread``) into one of
two reused chunk buffers, classifies all-zero clusters in C (``native.zero_map``, GIL released) and hands
the buffer to ``Qcow2Image.populate``, which re-checks allocation under the image lock, allocates one
contiguous host run for the non-zero clusters, writes them with one pwritev and links them with one batch
of L2 updates.  Zero clusters become zero-flag clusters, never written zeros.  (``BlockDevice.copy_wanted``
answers the same question for copy-on-read, one guest request at a time.)

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

Completion (``finish``): flush the active image (data, then metadata) with no lock held, then quiesce the
device (wait for requests in flight, hold new ones), rewrite the backing pointer (one header write +
fdatasync), relink the in-memory chain, release the device, close the dropped nodes.  A crash before the
header write leaves the old, still valid chain (the copied clusters are harmless duplicates); after it, the
new chain, whose data was made durable first.
"""

from __future__ import annotations

import concurrent.futures
import logging
import os
from collections.abc import Callable

import numpy as np

from vdisk.block import chain
from vdisk.io import native
from vdisk.formats.buffers import zero_fill
from vdisk.formats.node import KIND_DATA, KIND_UNALLOCATED, KIND_ZERO, Node
from vdisk.block.device import COPY, BlockDevice
from vdisk.errors import BackingChainError, DeviceNotActive, GenericError
from vdisk.formats.qcow2.image import Qcow2Image
import itertools

log = logging.getLogger(__name__)

CHUNK = 1 << 20
#: The longest stretch one step skips when the chain above the base holds nothing there.
MAX_SKIP = 1 << 30
#: Start the kernel's writeback of the target every this many bytes copied (0: never), so that the
#: fdatasync before the chain switch finds little left to write.
WRITEBACK_EVERY = 32 << 20


def find_base(device: BlockDevice, base: str | None = None, base_node: Node | None = None,
              top: Node | None = None) -> Node | None:
    """The node named by the user's ``base`` (a backing name as stored, or any path to the same file),
    searched below ``top`` (the device's active image unless the stream goes into an intermediate node)."""
    if base_node is not None:
        return base_node
    if base is None:
        return None
    nodes = list(chain.nodes(top if top is not None else device.top))
    for above, node in itertools.pairwise(nodes):
        stored = above.backing_name
        if stored == base or os.path.abspath(base) == os.path.abspath(node.path) or _same_file(base, node.path):
            return node
    raise BackingChainError(f"Can't find '{base}' in the backing chain")


def _same_file(a: str, b: str) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def backing_name_for(top: Node, base: Node | None, above_base: Node | None) -> tuple[str | None, str | None]:
    """The backing name to write into ``top`` for ``base``: as it stood in the chain, re-relativised.

    A relative name stays relative (to the active image's directory); an absolute one stays absolute.
    """
    if base is None:
        return None, None
    stored = above_base.backing_name
    if stored is None or os.path.isabs(stored):
        return stored or base.path, base.format_name
    return os.path.relpath(chain.resolve_backing(above_base.path, stored), os.path.dirname(top.path) or "."), \
        base.format_name


class StreamCopier:
    """Copies, chunk by chunk, what the chain above ``base`` holds into the device's active image."""

    def __init__(self, device: BlockDevice, base: Node | None, *, chunk: int = CHUNK,
                 target: Node | None = None):
        """``target``: the node to fill, the device's active image unless given (an intermediate node, which
        the caller has reopened read-write: see ``BlockDevice.reopen_node``)."""
        top = target if target is not None else device.top
        if not isinstance(top, Qcow2Image):
            raise DeviceNotActive(f"Device '{device.name}' is not a qcow2 image with a backing file")
        if top.read_only:
            raise GenericError(f"Device '{device.name}' is read-only" if top is device.top
                               else f"Node '{top.path}' is read-only")
        self.device = device
        self.top: Qcow2Image = top
        self.base = base
        cs = top.cluster_size
        self.chunk = max(cs, chunk // cs * cs)
        self.length = top.size
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
        next position.  Errors of the previous chunk surface here."""
        if self._skip_window:
            held_from = self._first_held(position, self._skip_window)
            if held_from > position:
                self._skip_window = min(MAX_SKIP, self._skip_window * 2)
                self.last_copied = 0
                return held_from
        end = min(self.length, position + self.chunk)
        ranges = self.device.ranges
        token = ranges.acquire(position, end, COPY)
        try:
            work = self._read(position, end)
        except BaseException as exc:
            ranges.release(token)
            _mark(exc, position, is_read=True)
            self.drain()
            raise
        try:
            self.drain()
        except BaseException:
            # The previous chunk failed to write: this chunk is not copied, and its lock must not outlive it.
            ranges.release(token)
            raise
        self._pending = self._writer.submit(self._write, token, position, end, work)
        # what the rate limit counts (QEMU's stream_run: only ranges it copies, not the ones it skips)
        self.last_copied = 0 if work is None else int(np.count_nonzero(work[0])) * self.top.cluster_size
        self._skip_window = 0 if work is not None and work[0].any() else max(self._skip_window, 2 * self.chunk)
        self._pending_buffer = work[4] if work is not None else None
        return end

    def _first_held(self, position: int, window: int) -> int:
        """The first cluster-aligned offset in [position, position + window) that the chain above the base
        holds, or the window's end."""
        stop = min(self.length, position + window)
        backing = self.top.below
        chain_end = min(stop, backing.size) if backing is not None else position
        if chain_end > position:
            cs = self.top.cluster_size
            for piece in resolve(backing, position, chain_end, self.base):
                if piece.held:
                    return max(position, piece.start // cs * cs)
        return stop

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
        top = self.top
        cs = top.cluster_size
        first = start // cs
        count = -(-(end - start) // cs)
        free = top.unallocated_clusters(first, count)
        partial = top.partially_allocated(start, end - start)
        if not free.any() and not partial:
            return None
        backing = top.below
        backing_end = min(end, backing.size) if backing is not None else start
        pieces = resolve(backing, start, backing_end, self.base) if backing_end > start else []
        held = np.zeros(count, dtype=bool)
        for piece in pieces:
            if piece.held:
                held[(piece.start - start) // cs : -(-(piece.stop - start) // cs)] = True
        wanted = free & held
        whole = self._buffers[0] if self._buffers[0] is not self._pending_buffer else self._buffers[1]
        buf = memoryview(whole)[: count * cs]
        if wanted.any():
            spans = [(start + a * cs, start + b * cs) for a, b in _runs(wanted)]
            _read_pieces(buf, start, pieces, spans, min(end, backing_end) if backing_end > start else start)
        zero = native.zero_map(buf, cs)
        return wanted, buf, zero, partial, whole

    def _write(self, token, start: int, end: int, work) -> None:
        try:
            self._populate(start, end, work)
        except BaseException as exc:
            _mark(exc, start, is_read=False)
            raise
        finally:
            self.device.ranges.release(token)

    def _populate(self, start: int, end: int, work) -> None:
        if work is None:
            return
        wanted, buf, zero, partial, _ = work
        if self.before_populate is not None:
            self.before_populate(start, end)
        if wanted.any():
            self.top.populate(start, buf, wanted, zero)
            self._unsynced += end - start
            if self.writeback_every and self._unsynced >= self.writeback_every:
                self._kick_writeback()
        cs = self.top.cluster_size
        for cluster in partial:
            # Copy-on-write of the whole cluster fills its unallocated subclusters from the chain.
            lo = cluster * cs
            whole = bytearray(min(cs, self.length - lo))
            self.top.pread(whole, lo)
            self.top.pwrite(whole, lo)

    def _kick_writeback(self) -> None:
        """Have the kernel start writing the target's dirty pages, in a helper thread: sync_file_range may
        block while the disk's queue is full, and the copy must not wait for the disk (only finish does)."""
        kick = self._writeback
        if kick is not None and not kick.done():
            return  # the previous kick is still queueing pages; this one would find nothing new
        self._unsynced = 0
        if self._flusher is None:
            self._flusher = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="vdisk-stream-writeback")
        self._writeback = self._flusher.submit(_start_writeback, self.top.fd)

    def finish(self, backing_file: str | None = None) -> None:
        """Make the base the target's backing file (or none), durably and atomically."""
        self.drain()
        device, top, base = self.device, self.top, self.base
        nodes = list(chain.nodes(top))
        above_base = nodes[nodes.index(base) - 1] if base is not None else None
        name, base_format = backing_name_for(top, base, above_base)
        if backing_file is not None:
            name = backing_file
        top.flush()
        with device.quiesced():
            top.set_backing(name, base_format)
            dropped = nodes[1 : nodes.index(base)] if base is not None else nodes[1:]
            top.below = base
        for node in dropped:
            node.close()


# --- reading a chunk through the chain in one pass ----------------------------------------------------------


class Piece:
    """A run of guest bytes and where they come from: ``node``'s own ``kind`` run at ``host`` (DATA, ZERO,
    COMPRESSED), or ``kind`` None with ``node`` the base (read through it) or None (reads as zeros).
    ``held``: allocated above the base (what a stream copies)."""

    __slots__ = ("held", "host", "kind", "node", "start", "stop")

    def __init__(self, start, stop, node, kind, host, held):
        self.start, self.stop, self.node, self.kind, self.host, self.held = start, stop, node, kind, host, held


def resolve(node: Node | None, start: int, stop: int, base: Node | None) -> list[Piece]:
    """Where each byte of [start, stop) comes from, below ``node`` and above ``base``.

    One ``map_units`` call per node (over the span still unresolved), instead of one per run and per level
    as a recursive read would make: a chain whose middle image holds scattered clusters splits a chunk
    into many runs, and each ``map_units`` call costs tens of microseconds of numpy.
    """
    pieces: list[Piece] = []
    todo = [(start, stop)]
    while todo:
        if node is None or node is base:
            pieces.extend(Piece(a, b, node, None, 0, False) for a, b in todo)
            break
        size = node.size
        inside = [(a, min(b, size)) for a, b in todo if a < size]
        pieces.extend(Piece(max(a, size), b, None, None, 0, False) for a, b in todo if b > size)
        if not inside:
            break
        runs_ = node.map_units(inside[0][0], inside[-1][1] - inside[0][0])
        todo = []
        i = 0
        for a, b in inside:
            while i < len(runs_) and runs_[i][0] + runs_[i][1] <= a:
                i += 1
            j = i
            while j < len(runs_) and runs_[j][0] < b:
                r_start, r_len, kind, host = runs_[j]
                lo, hi = max(a, r_start), min(b, r_start + r_len)
                if kind == KIND_UNALLOCATED:
                    if todo and todo[-1][1] == lo:
                        todo[-1] = (todo[-1][0], hi)
                    else:
                        todo.append((lo, hi))
                else:
                    if kind == KIND_DATA:
                        host += lo - r_start
                    pieces.append(Piece(lo, hi, node, kind, host, True))
                j += 1
        node = node.below
    pieces.sort(key=lambda p: p.start)
    return pieces


def _read_pieces(view: memoryview, chunk_start: int, pieces: list[Piece], spans: list[tuple[int, int]],
                 chain_end: int) -> None:
    """Fill the parts of ``view`` (guest ``chunk_start`` on) that ``spans`` name from the resolved pieces.

    ``view`` is a reused buffer: whatever no data piece covers (zero runs, ranges past the chain's end
    ``chain_end`` or past the end of the disk in the last cluster) is zero-filled.  Data runs of qcow2 images
    are read at their host offsets directly; everything else (compressed clusters, raw files, the base)
    through the node's own ``pread``.
    """
    i = 0
    for a, b in spans:
        cursor = a
        while i < len(pieces) and pieces[i].stop <= a:
            i += 1
        j = i
        while j < len(pieces) and pieces[j].start < b and pieces[j].start < chain_end:
            p = pieces[j]
            j += 1
            lo, hi = max(a, p.start), min(b, p.stop)
            if lo > cursor:
                zero_fill(view[cursor - chunk_start : lo - chunk_start])
            cursor = hi
            dst = view[lo - chunk_start : hi - chunk_start]
            if p.node is None or p.kind == KIND_ZERO:
                zero_fill(dst)
            elif p.kind == KIND_DATA and isinstance(p.node, Qcow2Image):
                p.node.read_mapped(dst, lo, KIND_DATA, p.host + lo - p.start)
            else:
                p.node.pread(dst, lo)
        if b > cursor:
            zero_fill(view[cursor - chunk_start : b - chunk_start])


_SYNC_FILE_RANGE_WRITE = 2
_libc = None


def _start_writeback(fd: int) -> None:
    """sync_file_range(fd, 0, 0, SYNC_FILE_RANGE_WRITE): queue the file's dirty pages for writing, no wait."""
    global _libc
    if _libc is None:
        import ctypes
        import ctypes.util

        _libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        _libc.sync_file_range.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    _libc.sync_file_range(fd, 0, 0, _SYNC_FILE_RANGE_WRITE)  # advisory: an error here changes nothing


def _mark(exc: BaseException, chunk_start: int, *, is_read: bool) -> None:
    """Say where a copy failed and whether reading (the chain) or writing (the active image) failed."""
    if not hasattr(exc, "chunk_start"):
        exc.chunk_start = chunk_start  # type: ignore[attr-defined]
        exc.is_read = is_read  # type: ignore[attr-defined]


def _runs(mask: np.ndarray) -> list[tuple[int, int]]:
    """[start, stop) index runs where mask is True."""
    if not mask.any():
        return []
    padded = np.concatenate(([False], mask, [False]))
    edges = np.flatnonzero(padded[1:] != padded[:-1])
    return list(zip(edges[0::2].tolist(), edges[1::2].tolist()))
