"""What a guest sees: the active node of a backing chain, with range locks and copy-on-read.

Design notes
============
Three kinds of work touch the active image at once: guest requests (nbdkit's threads), a block job's copier
(its own thread), and the monitor (queries; the snapshot and stream-completion switches).

Range lock (``RangeLock``), over guest byte ranges, three modes:

=========  ======  ======  ======
 held \\ new  READ    COPY    WRITE
=========  ======  ======  ======
 READ        ok      ok     wait
 COPY        ok     wait    wait
 WRITE      wait    wait    wait
=========  ======  ======  ======

* Guest writes, zeroes and trims take WRITE over their range widened to whole clusters (a partial-cluster
  write copies the rest of the cluster from the backing chain, so the whole cluster is read and replaced).
* The stream copier and copy-on-read take COPY over the clusters they fill.  COPY excludes writers, so the
  backing data they read cannot be stale by the time ``populate`` links it: a guest write to that cluster
  either finished before (the cluster is then allocated, and ``populate`` re-checks allocation under the
  image lock and skips it) or waits until the copy is linked and then overwrites it.  A guest write is
  therefore never overwritten by backing data.
* Guest reads take READ over exactly their range: they never wait for the copier (the copy does not change
  what the guest sees) and wait at most for one overlapping guest write.  Copy-on-read turns a read into a
  copy only when its COPY lock is free at once (``try_acquire``); otherwise it reads the plain way.
* Switching the chain (snapshot, the end of a stream, reopening an intermediate node read-write for a stream
  into it and read-only after) takes WRITE over the whole disk: it waits for requests in flight and holds new
  ones for the switch only (a header write and an fdatasync; the bulk flush happens before, without the lock).

Below this, ``Qcow2Image.lock`` covers metadata only; payload I/O runs under the range lock alone.
Accepted race: two guest requests that overlap are ordered by the range lock in arrival order at the lock,
not at the socket; NBD leaves overlapping in-flight requests unordered, so this is allowed.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Iterator

import numpy as np

from vdisk.block import chain
from vdisk.io import native
from vdisk.formats.buffers import zero_fill
from vdisk.formats.node import Node
from vdisk.errors import GenericError, OutOfRange, ReadOnlyError, StorageError, VdiskError
from vdisk.formats.qcow2.cache import CacheOptions
from vdisk.formats.qcow2.image import Qcow2Image

log = logging.getLogger(__name__)

READ, COPY, WRITE = "read", "copy", "write"
_CONFLICTS = {
    (READ, WRITE), (WRITE, READ),
    (COPY, COPY), (COPY, WRITE), (WRITE, COPY),
    (WRITE, WRITE),
}

# nbdkit's extent flags (NBD base:allocation): a hole is "not data", zero "reads as zeros"
EXTENT_HOLE = 1
EXTENT_ZERO = 2


class RangeLock:
    """Byte-range locks in three modes (see the design notes); held ranges are few, so a list suffices."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._held: list[tuple[int, int, str]] = []

    def acquire(self, start: int, end: int, mode: str) -> tuple[int, int, str]:
        """Wait until [start, end) can be held in ``mode``; returns the token for ``release``.

        Not owner-bound: a pipeline may acquire in one thread and release in another.
        """
        token = (start, end, mode)
        with self._cond:
            while self._held and any(
                s < end and start < e and (m, mode) in _CONFLICTS for s, e, m in self._held
            ):
                self._cond.wait()
            self._held.append(token)
        return token

    def try_acquire(self, start: int, end: int, mode: str) -> tuple[int, int, str] | None:
        """``acquire`` without waiting: None when a conflicting range is held."""
        token = (start, end, mode)
        with self._cond:
            if any(s < end and start < e and (m, mode) in _CONFLICTS for s, e, m in self._held):
                return None
            self._held.append(token)
        return token

    def release(self, token: tuple[int, int, str]) -> None:
        with self._cond:
            self._held.remove(token)
            self._cond.notify_all()

    @contextlib.contextmanager
    def hold(self, start: int, end: int, mode: str) -> Iterator[None]:
        token = self.acquire(start, end, mode)
        try:
            yield
        finally:
            self.release(token)


class BlockDevice:
    """A named guest disk over a chain.  Callbacks are shaped like nbdkit's (see vdisk.serving.nbdkit_plugin)."""

    def __init__(self, name: str, top: Node, *, read_only: bool = False, copy_on_read: bool = False,
                 cache: CacheOptions = CacheOptions()):
        self.name = name
        self.top = top
        self.cache = cache  # the qcow2 cache options of every node this device opens (reopen, snapshot)
        self.read_only = read_only
        self.copy_on_read = copy_on_read
        self.ranges = RangeLock()
        # While a stream runs, reads populate the active image from the chain above this base
        # (``None`` with ``cor_active`` means: everything).  Set by the stream job.
        self.cor_active = False
        self.cor_base: Node | None = None
        self.job = None  # the block job running on this device, if any
        self._cor_failing = False  # copy-on-read copies fail to store (logged once per run of failures)

    @property
    def size(self) -> int:
        return self.top.size

    @property
    def cluster_size(self) -> int:
        return getattr(self.top, "cluster_size", 65536)

    def nodes(self) -> list[Node]:
        return list(chain.nodes(self.top))

    def _cluster_span(self, offset: int, length: int) -> tuple[int, int]:
        cs = self.cluster_size
        return offset // cs * cs, min(self.size, -(-(offset + length) // cs) * cs)

    def _check(self, offset: int, length: int) -> None:
        if offset < 0 or length < 0 or offset + length > self.size:
            raise OutOfRange(f"request {offset}+{length} outside the disk of {self.size} bytes",
                             offset=offset, length=length)

    def _writable(self) -> None:
        if self.read_only:
            raise ReadOnlyError(f"device {self.name} is read-only", path=self.top.path)

    # --- guest requests ------------------------------------------------------------------------------

    def pread(self, buf, offset: int) -> None:
        view = memoryview(buf).cast("B")
        self._check(offset, len(view))
        if (self.copy_on_read or self.cor_active) and not self.read_only and isinstance(self.top, Qcow2Image):
            if self._read_with_copy(view, offset):
                return
        token = self.ranges.acquire(offset, offset + len(view), READ)
        try:
            self.top.pread(view, offset)
        finally:
            self.ranges.release(token)

    def _read_with_copy(self, view: memoryview, offset: int) -> bool:
        """Copy-on-read: a read of clusters that the chain above the base holds also fills the active image.

        Returns False (read not done) when nothing in range needs copying.
        """
        top: Qcow2Image = self.top  # type: ignore[assignment]
        start, end = self._cluster_span(offset, len(view))
        cs = top.cluster_size
        first = start // cs
        count = -(-(end - start) // cs)
        if not top.unallocated_clusters(first, count).any():
            return False
        # Never wait for a copy: when the copier (or a guest write) holds part of the range, this read goes
        # the plain way (READ does not conflict with COPY) and leaves the copying to the copier.
        token = self.ranges.try_acquire(start, end, COPY)
        if token is None:
            return False
        try:
            wanted = self.copy_wanted(start, end, self.cor_base)
            if not wanted.any():
                return False
            buf = bytearray(count * cs)
            whole = memoryview(buf)
            _read_below(top, whole[: end - start], start)
            zero = native.zero_map(buf, cs)
            try:
                top.populate(start, buf, wanted, zero)
            except StorageError as exc:
                # The copy could not be stored (ENOSPC while a stream waits for space, EIO): the read itself
                # does not need it, so it goes on from the chain.  (QEMU fails the guest read here; a paused
                # stream on a full disk would make every read of an uncopied cluster fail.)  populate gave
                # its clusters back; the stream job reports the error through its own on-error policy.
                if not self._cor_failing:
                    log.warning("device %s: copy-on-read could not store a copy, reads go on without it: %s",
                                self.name, exc)
                self._cor_failing = True
            else:
                self._cor_failing = False
            # Read from the active image itself: clusters of the range that were already allocated there
            # (or partly, with subclusters) must come from it, not from the backing data just read.
            top.pread(view, offset)
        finally:
            self.ranges.release(token)
        return True

    def copy_wanted(self, start: int, end: int, base: Node | None, target: Qcow2Image | None = None) -> np.ndarray:
        """Clusters of [start, end) that are unallocated in ``target`` and held between it and ``base``.

        ``target`` is the active image unless a job streams into an intermediate node; ``base`` None means
        the whole chain below the target.
        """
        top: Qcow2Image = target if target is not None else self.top  # type: ignore[assignment]
        cs = top.cluster_size
        first = start // cs
        count = -(-(end - start) // cs)
        wanted = top.unallocated_clusters(first, count)
        if not wanted.any() or top.below is None:
            return np.zeros(count, dtype=bool)
        held = np.zeros(count, dtype=bool)
        backing_end = min(end, top.below.size)
        if backing_end > start:
            for e in chain.block_status(top.below, start, backing_end - start, stop_at=base):
                if e.present:
                    held[(e.start - start) // cs : -(-(e.start + e.length - start) // cs)] = True
        return wanted & held

    def pwrite(self, buf, offset: int, *, fua: bool = False) -> None:
        self._writable()
        view = memoryview(buf).cast("B")
        self._check(offset, len(view))
        start, end = self._cluster_span(offset, len(view))
        with self.ranges.hold(start, end, WRITE):
            self.top.pwrite(view, offset, fua=fua)

    def write_zeroes(self, offset: int, length: int, *, may_trim: bool = True, fua: bool = False) -> None:
        self._writable()
        self._check(offset, length)
        start, end = self._cluster_span(offset, length)
        with self.ranges.hold(start, end, WRITE):
            self.top.write_zeroes(offset, length, may_trim=may_trim, fua=fua)

    def trim(self, offset: int, length: int, *, fua: bool = False) -> None:
        self._writable()
        self._check(offset, length)
        start, end = self._cluster_span(offset, length)
        with self.ranges.hold(start, end, WRITE):
            self.top.trim(offset, length)
        if fua:
            self.top.flush()

    def flush(self) -> None:
        if not self.read_only:
            self.top.flush()

    def extents(self, offset: int, length: int) -> list[tuple[int, int, int]]:
        """(offset, length, flags) for NBD base:allocation: data through the whole chain, else hole+zero."""
        self._check(offset, length)
        out: list[tuple[int, int, int]] = []
        for e in chain.merge_extents(chain.block_status(self.top, offset, length)):
            flags = 0 if e.data else EXTENT_HOLE | EXTENT_ZERO
            if out and out[-1][2] == flags and out[-1][0] + out[-1][1] == e.start:
                out[-1] = (out[-1][0], out[-1][1] + e.length, flags)
            else:
                out.append((e.start, e.length, flags))
        return out

    # --- chain switches (monitor / jobs) ------------------------------------------------------------

    @contextlib.contextmanager
    def quiesced(self) -> Iterator[None]:
        """Hold every guest request out (after those in flight finish) for a chain switch."""
        with self.ranges.hold(0, max(self.size, 1), WRITE):
            yield

    def reopen_node(self, node: Node, *, read_only: bool) -> Node:
        """Swap a backing node for the same file opened read-only or read-write; returns the new node.

        QEMU's bdrv_reopen for a job that writes into an intermediate image: the node is writable (and holds
        QEMU's write lock bytes) only while the job runs.  The old node is closed first, under quiesce, since
        its own lock bytes refuse writers; if the new access is refused, the old one is restored.
        """
        nodes = self.nodes()
        index = nodes.index(node)
        if index == 0:
            raise GenericError(f"{node.path} is the active image of device '{self.name}', not a backing node")
        above = nodes[index - 1]
        with self.quiesced():
            node.close()  # flushes a writable node first
            try:
                new = chain.open_node(node.path, node.format_name, read_only=read_only, cache=self.cache)
            except VdiskError:
                new = chain.open_node(node.path, node.format_name, read_only=node.read_only, cache=self.cache)
                _adopt(new, node, above)
                raise
            _adopt(new, node, above)
        log.info("device %s: %s reopened %s", self.name, node.path, "read-only" if read_only else "read-write")
        return new

    def close(self) -> None:
        chain.close_chain(self.top)


def _adopt(new: Node, old: Node, above: Node) -> None:
    """Put ``new`` in ``old``'s place in the chain (same backing, same QMP node name)."""
    new.below = old.below
    if getattr(old, "node_name", None) is not None:
        new.node_name = old.node_name
    above.below = new


def _read_below(node: Node, view: memoryview, guest_offset: int) -> None:
    """What shows through ``node``'s unallocated ranges: its ``below``, zeros past its end or without one."""
    below = node.below
    inside = max(0, min(len(view), below.size - guest_offset)) if below is not None else 0
    if inside:
        below.pread(view[:inside], guest_offset)
    zero_fill(view[inside:])
