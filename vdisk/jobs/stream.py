"""The stream copier: fill the active image from its backing chain above a base, then drop the middle.

Design notes
============
The copier walks the disk in chunks (``CHUNK`` bytes, whole clusters).  For each chunk it holds the block
device's COPY range lock (which excludes guest writes, not guest reads), asks which clusters the active
image does not hold but the chain above the base does (``BlockDevice.copy_wanted``), reads the guest-visible
content of the chunk through the chain, classifies all-zero clusters in C (``native.zero_map``, GIL
released) and hands the buffer to ``Qcow2Image.populate``, which re-checks allocation under the image lock,
allocates one contiguous host run for the non-zero clusters, writes them with one pwritev and links them
with one batch of L2 updates.  Zero clusters become zero-flag clusters, never written zeros.

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

from vdisk import chain, native
from vdisk.backend import Backend
from vdisk.blockdev import COPY, BlockDevice
from vdisk.errors import BackingChainError, DeviceNotActive, GenericError
from vdisk.qcow2 import format as fmt
from vdisk.qcow2.image import Qcow2Image

log = logging.getLogger(__name__)

CHUNK = 1 << 20


def find_base(device: BlockDevice, base: str | None = None, base_node: Backend | None = None,
              top: Backend | None = None) -> Backend | None:
    """The node named by the user's ``base`` (a backing name as stored, or any path to the same file),
    searched below ``top`` (the device's active image unless the stream goes into an intermediate node)."""
    if base_node is not None:
        return base_node
    if base is None:
        return None
    nodes = list(chain.nodes(top if top is not None else device.top))
    for above, node in zip(nodes, nodes[1:]):
        stored = getattr(above, "header", None) and above.header.backing_file
        if stored == base or os.path.abspath(base) == os.path.abspath(node.path) or _same_file(base, node.path):
            return node
    raise BackingChainError(f"Can't find '{base}' in the backing chain")


def _same_file(a: str, b: str) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def backing_name_for(top: Backend, base: Backend | None, above_base: Backend | None) -> tuple[str | None, str | None]:
    """The backing name to write into ``top`` for ``base``: as it stood in the chain, re-relativised.

    A relative name stays relative (to the active image's directory); an absolute one stays absolute.
    """
    if base is None:
        return None, None
    stored = above_base.header.backing_file if isinstance(above_base, Qcow2Image) else None
    if stored is None or os.path.isabs(stored):
        return stored or base.path, base.format_name
    return os.path.relpath(chain.resolve_backing(above_base.path, stored), os.path.dirname(top.path) or "."), \
        base.format_name


class StreamCopier:
    """Copies, chunk by chunk, what the chain above ``base`` holds into the device's active image."""

    def __init__(self, device: BlockDevice, base: Backend | None, *, chunk: int = CHUNK,
                 target: Backend | None = None):
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

    def step(self, position: int) -> int:
        """Copy the chunk at ``position``; returns the next position.  Errors of the previous chunk surface here."""
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

    def _read(self, start: int, end: int):
        top = self.top
        cs = top.cluster_size
        wanted = self.device.copy_wanted(start, end, self.base, top)
        partial = self._partially_allocated(start, end)
        if not wanted.any() and not partial:
            return None
        count = len(wanted)
        buf = bytearray(count * cs)
        view = memoryview(buf)
        for run_start, run_stop in _runs(wanted):
            lo = start + run_start * cs
            hi = min(end, start + run_stop * cs)
            top.read_backing(view[lo - start : hi - start], lo)
        zero = native.zero_map(buf, cs)
        return wanted, buf, zero, partial

    def _partially_allocated(self, start: int, end: int) -> list[int]:
        """Clusters (extended L2) with some subclusters still reading from the backing chain."""
        if not self.top.extended_l2:
            return []
        cs = self.top.cluster_size
        out = set()
        for run_start, length, kind, _ in self.top.map_units(start, end - start):
            if kind == fmt.KIND_UNALLOCATED:
                first, last = run_start // cs, (run_start + length - 1) // cs
                for cluster in (first, last):
                    lo = cluster * cs
                    if run_start > lo or run_start + length < min(lo + cs, self.length):
                        out.add(cluster)
        return sorted(out)

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
        wanted, buf, zero, partial = work
        if self.before_populate is not None:
            self.before_populate(start, end)
        if wanted.any():
            self.top.populate(start, buf, wanted, zero)
        cs = self.top.cluster_size
        for cluster in partial:
            # Copy-on-write of the whole cluster fills its unallocated subclusters from the chain.
            lo = cluster * cs
            whole = bytearray(min(cs, self.length - lo))
            self.top.pread(whole, lo)
            self.top.pwrite(whole, lo)

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
            top.backing = base
        for node in dropped:
            node.close()


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
