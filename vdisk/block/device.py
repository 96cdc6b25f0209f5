"""What a guest sees: a named chain with range locks, copy-on-read, and the quiesce around chain switches.

Design notes
============
Three kinds of work touch the active image at once: guest requests (nbdkit's threads), a block job's copier
(its own thread), and the monitor (queries; the snapshot and stream-completion switches).

Range lock (``vdisk.block.rangelock``), over guest byte ranges, three modes:

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
  into it and read-only after) takes WRITE over the whole disk (``quiesced``): it waits for requests in
  flight and holds new ones for the switch only (a header write and an fdatasync; the bulk flush happens
  before, without the lock).  The switches themselves are ``vdisk.block.chain``'s.

Below this, each node's own lock covers its metadata only; payload I/O runs under the range lock alone.
Accepted race: two guest requests that overlap are ordered by the range lock in arrival order at the lock,
not at the socket; NBD leaves overlapping in-flight requests unordered, so this is allowed.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

from vdisk.block import chain as chains
from vdisk.block.chain import Chain
from vdisk.block.rangelock import COPY, READ, WRITE, RangeLock
from vdisk.errors import GenericError, ReadOnlyError, StorageError, VdiskError
from vdisk.formats.node import Node, check_request
from vdisk.formats.qcow2.cache import CacheOptions
from vdisk.io import native

log = logging.getLogger(__name__)

# nbdkit's extent flags (NBD base:allocation): a hole is "not data", zero "reads as zeros"
EXTENT_HOLE = 1
EXTENT_ZERO = 2


class BlockDevice:
    """A named guest disk over a chain.  Callbacks are shaped like nbdkit's (see vdisk.serving.nbdkit_plugin)."""

    def __init__(self, name: str, chain: Chain, *, read_only: bool = False, copy_on_read: bool = False,
                 cache: CacheOptions = CacheOptions()):
        self.name = name
        self.chain = chain
        self.cache = cache  # the qcow2 cache options of every node this device opens (reopen, snapshot)
        self.read_only = read_only
        self.copy_on_read = copy_on_read
        self.ranges = RangeLock()
        # While a stream runs, reads populate the active image from the chain above this base
        # (``None`` with ``cor_active`` means: everything).  Set by the stream job.
        self.cor_active = False
        self.cor_base: Node | None = None
        self.job = None  # the block job running on this device, if any
        self.cor_failing = False  # copy-on-read copies fail to store (logged once per run of failures)

    @property
    def top(self) -> Node:
        return self.chain.top

    @property
    def size(self) -> int:
        return self.chain.size

    @property
    def cluster_size(self) -> int:
        return self.chain.cluster_size

    def nodes(self) -> list[Node]:
        return list(self.chain.nodes)

    def cluster_span(self, offset: int, length: int) -> tuple[int, int]:
        """[offset, offset + length) widened to whole clusters (clipped to the disk)."""
        cs = self.cluster_size
        return offset // cs * cs, min(self.size, -(-(offset + length) // cs) * cs)

    def _writable(self) -> None:
        if self.read_only:
            raise ReadOnlyError(f"device {self.name} is read-only", path=self.top.path)

    # --- guest requests ------------------------------------------------------------------------------

    def pread(self, buf, offset: int) -> None:
        view = memoryview(buf).cast("B")
        check_request(offset, len(view), self.size)
        if (self.copy_on_read or self.cor_active) and not self.read_only and len(self.chain.nodes) > 1:
            if self._read_with_copy(view, offset):
                return
        token = self.ranges.acquire(offset, offset + len(view), READ)
        try:
            self.chain.read(view, offset)
        finally:
            self.ranges.release(token)

    def _read_with_copy(self, view: memoryview, offset: int) -> bool:
        """Copy-on-read: a read of clusters that the chain above the base holds also fills the active image.

        The cluster-aligned range is read through the chain once; the clusters to copy are linked from that
        buffer, and the guest's bytes are taken from it.  Returns False (read not done) when nothing in range
        needs copying, or when the copier or a guest write holds part of the range (the read then goes the
        plain way: READ does not conflict with COPY, and the copying is left to the copier).
        """
        top = self.top
        start, end = self.cluster_span(offset, len(view))
        cs = top.cluster_size
        if not top.unallocated_clusters(start // cs, -(-(end - start) // cs)).any():
            return False
        token = self.ranges.try_acquire(start, end, COPY)
        if token is None:
            return False
        try:
            wanted, pieces = self.chain.copy_plan(top, start, end, self.cor_base, with_target=True)
            if not wanted.any():
                return False
            buf = bytearray(len(wanted) * cs)
            whole = memoryview(buf)
            self.chain.read_pieces(whole, start, pieces, [(start, end)])
            self._store_copy(start, buf, wanted)
            view[:] = whole[offset - start : offset - start + len(view)]
        finally:
            self.ranges.release(token)
        return True

    def _store_copy(self, start: int, buf: bytearray, wanted) -> None:
        try:
            self.top.populate(start, buf, wanted, native.zero_map(buf, self.cluster_size))
        except StorageError as exc:
            # The copy could not be stored (ENOSPC while a stream waits for space, EIO): the read itself
            # does not need it, so it goes on from the chain.  (QEMU fails the guest read here; a paused
            # stream on a full disk would make every read of an uncopied cluster fail.)  populate gave its
            # clusters back; the stream job reports the error through its own on-error policy.
            if not self.cor_failing:
                log.warning("device %s: copy-on-read could not store a copy, reads go on without it: %s",
                            self.name, exc)
            self.cor_failing = True
        else:
            self.cor_failing = False

    def pwrite(self, buf, offset: int, *, fua: bool = False) -> None:
        self._writable()
        view = memoryview(buf).cast("B")
        check_request(offset, len(view), self.size)
        start, end = self.cluster_span(offset, len(view))
        with self.ranges.hold(start, end, WRITE):
            self.top.pwrite(view, offset, fua=fua)

    def write_zeroes(self, offset: int, length: int, *, may_trim: bool = True, fua: bool = False) -> None:
        self._writable()
        check_request(offset, length, self.size)
        start, end = self.cluster_span(offset, length)
        with self.ranges.hold(start, end, WRITE):
            self.top.write_zeroes(offset, length, may_trim=may_trim, fua=fua)

    def trim(self, offset: int, length: int, *, fua: bool = False) -> None:
        self._writable()
        check_request(offset, length, self.size)
        start, end = self.cluster_span(offset, length)
        with self.ranges.hold(start, end, WRITE):
            self.top.trim(offset, length)
        if fua:
            self.top.flush()

    def flush(self) -> None:
        if not self.read_only:
            self.top.flush()

    def extents(self, offset: int, length: int) -> list[tuple[int, int, int]]:
        """(offset, length, flags) for NBD base:allocation: data through the whole chain, else hole+zero."""
        check_request(offset, length, self.size)
        out: list[tuple[int, int, int]] = []
        with self.ranges.hold(offset, offset + length, READ):  # no chain switch under the walk
            extents = chains.merge_extents(self.chain.block_status(offset, length))
        for e in extents:
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

    def snapshot(self, path: str, *, create: bool, node_name: str | None = None) -> Node:
        """A live snapshot: ``path`` (made now over the active image when ``create``) becomes the active
        image; returns it."""
        old_top = self.top
        if create:
            chains.create_overlay(path, old_top)
        old_top.flush()
        with self.quiesced():
            overlay = chains.open_node(path, "qcow2", read_only=False, cache=self.cache)
            try:
                old_top.flush()
                self.chain.push(overlay)
            except BaseException:
                overlay.close()
                raise
            if node_name:
                overlay.node_name = node_name
        log.info("device %s: active image is now %s (backing %s)", self.name, path, old_top.path)
        return overlay

    def drop_between(self, target: Node, base: Node | None, backing_name: str | None = None) -> None:
        """Make ``base`` the backing node of ``target`` (the end of a stream): flush the target, then switch
        the chain under quiesce, then close the nodes that left it."""
        name, base_format = self.chain.backing_name_for(target, base)
        if backing_name is not None:
            name = backing_name
        target.flush()
        with self.quiesced():
            dropped = self.chain.drop_between(target, base, name, base_format)
        chains.close_nodes(dropped)

    def reopen_node(self, node: Node, *, read_only: bool) -> Node:
        """Swap a backing node for the same file opened read-only or read-write; returns the new node.

        QEMU's bdrv_reopen for a job that writes into an intermediate image: the node is writable (and holds
        QEMU's write lock bytes) only while the job runs.  The old node is closed first, under quiesce, since
        its own lock bytes refuse writers; if the new access is refused, the old one is restored.
        """
        if self.chain.depth_of(node) == 0:
            raise GenericError(f"{node.path} is the active image of device '{self.name}', not a backing node")
        with self.quiesced():
            node.close()  # flushes a writable node first
            try:
                new = chains.open_node(node.path, node.format_name, read_only=read_only, cache=self.cache)
            except VdiskError:
                new = chains.open_node(node.path, node.format_name, read_only=node.read_only, cache=self.cache)
                self._adopt(new, node)
                raise
            self._adopt(new, node)
        log.info("device %s: %s reopened %s", self.name, node.path, "read-only" if read_only else "read-write")
        return new

    def _adopt(self, new: Node, old: Node) -> None:
        """Put ``new`` in ``old``'s place (same QMP node name)."""
        if getattr(old, "node_name", None) is not None:
            new.node_name = old.node_name
        self.chain.replace(old, new)

    def close(self) -> None:
        self.chain.close()

