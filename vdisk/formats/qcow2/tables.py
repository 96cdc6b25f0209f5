"""qcow2 metadata tables as numpy views, without copies, and the vectorised scans over them.

A table is a ``bytearray`` holding exactly the on-disk bytes plus a numpy view of it (``'>u8'`` for L1, L2
and the refcount table; the refcount width for refcount blocks).  Writing a table back is writing its
bytearray.  Sub-byte refcounts (1, 2, 4 bits) are packed least significant bits first, as QEMU packs them.
"""

from __future__ import annotations

import numpy as np

from vdisk.formats.node import KIND_COMPRESSED, KIND_DATA, KIND_UNALLOCATED, KIND_ZERO
from vdisk.formats.qcow2 import format as fmt

_REFCOUNT_DTYPES = {3: ">u1", 4: ">u2", 5: ">u4", 6: ">u8"}


class Table:
    """One cluster-sized (or larger) metadata table: its bytes, a view, and whether memory differs from disk."""

    __slots__ = ("host_offset", "data", "view", "dirty")

    def __init__(self, host_offset: int, data: bytearray, dtype: str = ">u8"):
        self.host_offset = host_offset
        self.data = data
        self.view = np.frombuffer(data, dtype=dtype)
        self.dirty = False


class RefcountBlock(Table):
    """A refcount block of any refcount_order 0..6."""

    __slots__ = ("order", "bits", "mask")

    def __init__(self, host_offset: int, data: bytearray, order: int):
        self.order = order
        self.bits = 1 << order
        self.mask = (1 << self.bits) - 1
        super().__init__(host_offset, data, _REFCOUNT_DTYPES.get(order, ">u1"))

    @property
    def entries(self) -> int:
        return len(self.data) * 8 // self.bits

    def get(self, index: int) -> int:
        if self.order >= 3:
            return int(self.view[index])
        per_byte = 8 // self.bits
        return (self.data[index // per_byte] >> (self.bits * (index % per_byte))) & self.mask

    def set(self, index: int, value: int) -> None:
        if value < 0 or value > self.mask:
            raise OverflowError(f"refcount {value} does not fit in {self.bits} bits")
        if self.order >= 3:
            self.view[index] = value
        else:
            per_byte = 8 // self.bits
            shift = self.bits * (index % per_byte)
            byte = self.data[index // per_byte]
            self.data[index // per_byte] = (byte & ~(self.mask << shift) & 0xFF) | (value << shift)
        self.dirty = True

    def set_range(self, start: int, stop: int, value: int) -> None:
        if self.order >= 3:
            self.view[start:stop] = value
            self.dirty = True
        else:
            for index in range(start, stop):
                self.set(index, value)

    def values(self) -> np.ndarray:
        """All refcounts of the block as a native uint64 array (a copy)."""
        if self.order >= 3:
            return self.view.astype(np.uint64)
        raw = np.frombuffer(self.data, dtype=np.uint8)
        per_byte = 8 // self.bits
        parts = [(raw >> (self.bits * k)) & self.mask for k in range(per_byte)]
        return np.stack(parts, axis=1).reshape(-1).astype(np.uint64)

    def free_tail(self, start: int, stop: int) -> int:
        """How many zero refcounts end at ``stop``, counting back no further than ``start``."""
        values = self.view[start:stop] if self.order >= 3 else self.values()[start:stop]
        used = np.flatnonzero(values)
        return stop - start if not used.size else stop - start - int(used[-1]) - 1

    def first_free_run(self, start: int, count: int, stop: int) -> int | None:
        """Index of the first run of ``count`` zero refcounts within [start, stop), or None."""
        if stop - start < count:
            return None
        if self.order >= 3:
            if not self.view[start : start + count].any():
                return start  # the common case: allocation right at the free hint
            free = self.view[start:stop] == 0
        else:
            free = self.values()[start:stop] == 0
        edges = np.flatnonzero(np.diff(np.concatenate(([False], free, [False])).view(np.int8)))
        run_starts, run_stops = edges[0::2], edges[1::2]
        long_enough = np.flatnonzero(run_stops - run_starts >= count)
        return int(run_starts[long_enough[0]]) + start if long_enough.size else None


def l2_units(entries: np.ndarray, extended: bool, cluster_bits: int) -> tuple[np.ndarray, np.ndarray]:
    """Kinds and host offsets of each guest unit (cluster, or subcluster with extended L2) of an L2 slice.

    ``entries`` is a '>u8' view of whole entries (two words each when extended).  For compressed units the
    host array holds the raw L2 entry, so the reader can decode the compressed descriptor.
    Returns (kinds: uint8, hosts: uint64), one element per unit.
    """
    words = entries.astype(np.uint64)
    if not extended:
        compressed = (words & np.uint64(fmt.OFLAG_COMPRESSED)) != 0
        host = words & np.uint64(fmt.L2E_OFFSET_MASK)
        zero = (words & np.uint64(fmt.OFLAG_ZERO)) != 0
        kinds = np.where(
            compressed,
            KIND_COMPRESSED,
            np.where(zero, KIND_ZERO, np.where(host != 0, KIND_DATA, KIND_UNALLOCATED)),
        ).astype(np.uint8)
        return kinds, np.where(compressed, words, host)
    desc = words[0::2]
    bitmap = words[1::2]
    n = fmt.SUBCLUSTERS_PER_CLUSTER
    shifts = np.arange(n, dtype=np.uint64)
    alloc = ((bitmap[:, None] >> shifts) & np.uint64(1)) != 0
    zero = ((bitmap[:, None] >> (shifts + np.uint64(32))) & np.uint64(1)) != 0
    compressed = ((desc & np.uint64(fmt.OFLAG_COMPRESSED)) != 0)[:, None]
    kinds = np.where(
        compressed,
        KIND_COMPRESSED,
        np.where(alloc, KIND_DATA, np.where(zero, KIND_ZERO, KIND_UNALLOCATED)),
    ).astype(np.uint8)
    subcluster_size = np.uint64((1 << cluster_bits) // n)
    cluster_host = (desc & np.uint64(fmt.L2E_OFFSET_MASK))[:, None]
    # A cluster without a host cluster has no subcluster offsets either (0 = "no host offset", never
    # shifts * subcluster_size, which would look like a real offset to block status).
    host = np.where(cluster_host != 0, cluster_host + shifts * subcluster_size, np.uint64(0))
    host = np.where(compressed, desc[:, None], host)
    return kinds.reshape(-1), host.reshape(-1)


def runs(kinds: np.ndarray, hosts: np.ndarray, unit: int) -> list[tuple[int, int, int, int]]:
    """Merge units into runs: (first unit, unit count, kind, host offset of the first unit).

    A run has one kind; a run whose units have host offsets (data, but also preallocated zero clusters and
    unallocated subclusters of an allocated cluster, which ``qemu-img map`` reports with an offset) is also
    contiguous on the host, and never mixes units with and without one; every compressed unit is its own run.
    """
    n = kinds.size
    if n == 0:
        return []
    brk = np.ones(n, dtype=bool)
    if n > 1:
        same_kind = kinds[1:] == kinds[:-1]
        has_host = hosts != 0
        contiguous = hosts[1:] == hosts[:-1] + np.uint64(unit)
        compressed = kinds[1:] == KIND_COMPRESSED
        brk[1:] = ~same_kind | ((has_host[1:] | has_host[:-1]) & ~contiguous) | compressed
    starts = np.flatnonzero(brk)
    stops = np.append(starts[1:], n)
    return [
        (int(s), int(e - s), int(kinds[s]), int(hosts[s]))
        for s, e in zip(starts.tolist(), stops.tolist())
    ]
