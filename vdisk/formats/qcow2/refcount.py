"""qcow2 refcounts: the refcount table and blocks, the cluster allocator, frees, and what check needs of them.

QEMU's qcow2-refcount.c.  ``Refcounts`` owns the refcount table (loaded whole: at most 8 MiB), the cache of
refcount blocks, the end of the file as the allocator knows it, the free hint, and the clusters waiting to
be freed.  ``cluster.Clusters`` allocates and frees through it; ``check`` reads and repairs refcounts through
its public methods; the facade (``image.Qcow2Image``) runs ``write_back`` in its flush.

Design notes
============
Crash ordering, the refcount part (the whole order is in ``vdisk.formats.qcow2.image``):

* A refcount is raised before anything points at the cluster, and the facade writes refcounts back (and
  syncs) before any L2/L1 table that points at a new cluster.
* A new refcount block is durable before the table entry that points at it (a power loss must not keep the
  entry and lose the block, whose cluster may hold a freed cluster's old bytes).  A moved (grown) table is
  written in full at its new place, synced, and only then does the header point at it; the old table's
  clusters are freed once that header write is durable.
* Frees wait: a cluster that stops being referenced keeps its refcount, queued in ``_pending_free``, until
  a flush has made the tables that no longer point at it durable (``take_pending_frees`` at the start of
  the flush, ``release`` at its end, ``requeue_frees`` when it failed).  Until then it cannot be handed out
  again.  A cluster allocated for a write that failed before anything pointed at it is released at once.

Allocation: ``allocate`` takes the first run of free clusters at or after the free hint (runs may cross
refcount blocks), else claims clusters at the end of the file.  The hint only moves back when a refcount
drops to 0 (``release``) or check repairs refcounts (``repair``: the next search starts over).

Locking: every method runs under the image's metadata lock (``ImageFile.lock``); the public ones that are
called from outside a metadata section take it themselves.
"""

from __future__ import annotations

import numpy as np

from vdisk.errors import CorruptImage, StorageError
from vdisk.formats.qcow2 import format as fmt
from vdisk.formats.qcow2.cache import TableCache
from vdisk.formats.qcow2.file import ImageFile
from vdisk.formats.qcow2.tables import RefcountBlock, Table

EFBIG = 27


class Refcounts:
    """The refcount structures of one image and the allocator over them."""

    def __init__(self, file: ImageFile, cache_tables: int):
        self.file = file
        self.lock = file.lock
        h = file.header
        self.block_entries = file.cluster_size * 8 // h.refcount_bits
        self.cache = TableCache(cache_tables)
        self._table = self._load_table()
        self._table_dirty = False
        self._table_moved: tuple[int, int] | None = None  # old table (offset, clusters) to free once durable
        self._pending_free: list[int] = []
        self._host_end = self._initial_host_end()
        self._free_hint = 0
        self._metadata_preallocated: bool | None = None  # computed once per open (as QEMU does)

    def _load_table(self) -> Table:
        h = self.file.header
        cs = self.file.cluster_size
        table = Table(h.refcount_table_offset,
                      bytearray(self.file.pread(h.refcount_table_clusters * cs, h.refcount_table_offset)))
        blocks = table.view.astype(np.uint64)
        misaligned = np.flatnonzero((blocks & np.uint64(fmt.REFT_OFFSET_MASK)) % np.uint64(cs))
        if misaligned.size:
            i = int(misaligned[0])
            raise CorruptImage("refcount block offset not cluster aligned", path=self.file.path,
                               field=f"refcount_table[{i}]", offset=h.refcount_table_offset + 8 * i)
        return table

    def _initial_host_end(self) -> int:
        h = self.file.header
        cs = self.file.cluster_size
        end = -(-self.file.file_size() // cs) * cs
        return max(end, h.refcount_table_offset + h.refcount_table_clusters * cs,
                   h.l1_table_offset + -(-h.l1_size * 8 // cs) * cs)

    # --- reading refcounts ---------------------------------------------------------------------------

    def _block(self, rt_index: int) -> RefcountBlock | None:
        """The refcount block of table slot ``rt_index`` (cached), or None where the table has none."""
        if rt_index >= len(self._table.view):
            return None
        host = int(self._table.view[rt_index]) & fmt.REFT_OFFSET_MASK
        if not host:
            return None
        block = self.cache.lookup(host)
        if block is None:
            self.file.check_table_offset(host, f"refcount_table[{rt_index}]")
            block = self.cache.insert(RefcountBlock(host, bytearray(self.file.pread(self.file.cluster_size, host)),
                                                    self.file.header.refcount_order))
        return block  # type: ignore[return-value]

    def refcount(self, cluster_index: int) -> int:
        """The stored refcount of one host cluster (caller holds the lock)."""
        block = self._block(cluster_index // self.block_entries)
        return block.get(cluster_index % self.block_entries) if block else 0

    @property
    def host_end(self) -> int:
        """The end of the host clusters the allocator knows of (the file, or what was claimed past it)."""
        return self._host_end

    def table_extent(self) -> tuple[int, int]:
        """(host offset, length in bytes) of the refcount table as it stands in memory."""
        return self._table.host_offset, len(self._table.data)

    def block_offsets(self) -> np.ndarray:
        """The host offset of each refcount block the table points at (0: no block), one per table entry."""
        return self._table.view.astype(np.uint64) & np.uint64(fmt.REFT_OFFSET_MASK)

    def stored_refcounts(self, count: int) -> np.ndarray:
        """The refcounts of host clusters [0, count) as an int64 array (caller holds the lock; a safe point
        between blocks keeps the cache within its capacity)."""
        per = self.block_entries
        out = np.zeros(count, dtype=np.int64)
        for rt_index in range(min(len(self._table.view), -(-count // per))):
            block = self._block(rt_index)
            if block is None:
                continue
            lo = rt_index * per
            hi = min(count, lo + per)
            out[lo:hi] = block.values()[: hi - lo].astype(np.int64)
            self.lock.safe_point()  # this block is done with
        return out

    def metadata_preallocated(self) -> bool:
        """QEMU's ``qcow2_detect_metadata_preallocation``: more clusters have a refcount than the file has blocks.

        Such an image (``preallocation=metadata``, ``falloc``...) has data clusters that were never written.
        For them QEMU asks the host file too (BDRV_BLOCK_RECURSE) and reports holes as zero, so ``qemu-img
        map`` says ``"zero": true, "data": true``.  Same heuristic, same file, same answer; computed once.
        """
        if self._metadata_preallocated is not None:
            return self._metadata_preallocated
        st = self.file.fstat()
        cs = self.file.cluster_size
        real_clusters = st.st_blocks * 512 // cs
        threshold = max(real_clusters * 10 // 9, real_clusters + 2)
        end_cluster = -(-st.st_size // cs)
        per = self.block_entries
        counted = 0
        for rt_index in range(-(-end_cluster // per)):
            with self.lock:  # one section per block: the cache may evict between them
                block = self._block(rt_index)
                if block is not None:
                    counted += int(np.count_nonzero(block.values()[: end_cluster - rt_index * per]))
            if counted >= threshold:
                break
        self._metadata_preallocated = counted >= threshold
        return self._metadata_preallocated

    # --- changing refcounts (caller holds the lock) --------------------------------------------------

    def _set_refcount(self, cluster_index: int, value: int) -> None:
        rt_index, index = divmod(cluster_index, self.block_entries)
        block = self._block(rt_index) or self._new_block(rt_index)
        block.set(index, value)

    def _new_block(self, rt_index: int) -> RefcountBlock:
        """Create the refcount block for table slot rt_index, growing the table if needed."""
        if rt_index >= len(self._table.view):
            self._grow_table(rt_index + 1)
            # Growing counts the new table's own clusters, which may have created this very block: a
            # second block for the slot would replace it and lose those refcounts (the table would then
            # be handed out again as free space and overwritten).
            existing = self._block(rt_index)
            if existing is not None:
                return existing
        host = self._claim_end(1)
        block = RefcountBlock(host, bytearray(self.file.cluster_size), self.file.header.refcount_order)
        block.dirty = True
        self.cache.insert(block)
        self._table.view[rt_index] = host
        self._table_dirty = True
        own_cluster = host >> self.file.cluster_bits
        if own_cluster // self.block_entries == rt_index:
            block.set(own_cluster % self.block_entries, 1)
        else:
            self._set_refcount(own_cluster, 1)
        return block

    def _grow_table(self, min_entries: int) -> None:
        """Move the refcount table to a larger place at the end of the file (the header follows at flush)."""
        cs = self.file.cluster_size
        old_clusters = len(self._table.data) // cs
        new_clusters = max(old_clusters * 2, -(-min_entries // (cs // 8)) + 1)
        if new_clusters * cs > fmt.MAX_REFCOUNT_TABLE_BYTES:
            raise StorageError("refcount table would exceed its 8 MiB limit", path=self.file.path, os_errno=EFBIG)
        host = self._claim_end(new_clusters)
        data = bytearray(new_clusters * cs)
        data[: len(self._table.data)] = self._table.data
        old = (self._table.host_offset, old_clusters)
        self._table = Table(host, data)
        self._table_dirty = True
        if self._table_moved is None:
            self._table_moved = old
        else:
            # Moved twice between flushes: the header still points at the first old table, so the one in
            # between was never durable as the table and waits like any other free.
            self._pending_free.extend(self._clusters_of(*old))
        first = host >> self.file.cluster_bits
        for cluster in range(first, first + new_clusters):
            self._set_refcount(cluster, 1)

    def _clusters_of(self, host_offset: int, clusters: int) -> range:
        first = host_offset >> self.file.cluster_bits
        return range(first, first + clusters)

    def _claim_end(self, count: int) -> int:
        host = self._host_end
        self._host_end += count * self.file.cluster_size
        if self._host_end > fmt.MAX_HOST_OFFSET:
            raise StorageError("image file would exceed 2^56 bytes", path=self.file.path, os_errno=EFBIG)
        return host

    def allocate(self, count: int) -> int:
        """Allocate ``count`` contiguous clusters with refcount 1; returns the host offset of the first."""
        host = self._find_free_run(count)
        if host is None:
            host = self._claim_end(count)
        first = host >> self.file.cluster_bits
        per = self.block_entries
        for rt_index in range(first // per, (first + count - 1) // per + 1):
            block = self._block(rt_index) or self._new_block(rt_index)
            lo = max(first, rt_index * per) - rt_index * per
            hi = min(first + count, (rt_index + 1) * per) - rt_index * per
            block.set_range(lo, hi, 1)
        return host

    def _find_free_run(self, count: int) -> int | None:
        """First run of ``count`` free clusters below the end of the file, from the free hint on.

        A run may cross refcount blocks (with 512-byte clusters a block covers only 64 to 4096 clusters):
        ``carry`` counts the free clusters that end the blocks already scanned.  The hint moves past what
        was scanned, except the free tail, which may begin the run that a later allocation needs.
        """
        bits = self.file.cluster_bits
        end_cluster = self._host_end >> bits
        cluster = self._free_hint
        per = self.block_entries
        carry = 0
        while cluster - carry + count <= end_cluster:
            rt_index, index = divmod(cluster, per)
            block = self._block(rt_index)
            if block is None:
                return None
            limit = min(per, end_cluster - rt_index * per)
            if carry:
                need = count - carry
                head = min(need, limit)
                if block.first_free_run(0, head, head) == 0:
                    if need <= limit:
                        start = cluster - carry
                        self._free_hint = start + count
                        return start << bits
                    carry += limit  # the whole block is free and the run goes on
                    cluster = (rt_index + 1) * per
                    continue
                carry = 0
            found = block.first_free_run(index, count, limit)
            if found is not None:
                self._free_hint = rt_index * per + found + count
                return (rt_index * per + found) << bits
            carry = block.free_tail(index, limit)
            block_end = rt_index * per + limit
            self._free_hint = block_end - carry
            if limit < per:
                break  # the end of the file
            cluster = block_end
        return None

    def release(self, clusters) -> None:
        """Drop one reference from each cluster; one that is free now may be allocated again.

        For the frees a flush has made safe (see ``take_pending_frees``), and for clusters allocated to a
        write that failed before anything pointed at them (QEMU's qcow2_alloc_cluster_abort: a guest
        retrying a write on a full disk must not leak a cluster per try).
        """
        with self.lock:
            for cluster in clusters:
                value = self.refcount(cluster)
                if value:
                    self._set_refcount(cluster, value - 1)
                    if value == 1:
                        self._free_hint = min(self._free_hint, cluster)

    def free_later(self, clusters) -> None:
        """Queue clusters that metadata stopped pointing at: released by the flush that makes that durable."""
        self._pending_free.extend(clusters)

    def take_pending_frees(self) -> list[int]:
        """The frees queued so far, for the flush now starting to ``release`` at its end."""
        frees, self._pending_free = self._pending_free, []
        return frees

    def requeue_frees(self, frees: list[int]) -> None:
        """Give back the frees of a flush that failed: the tables that stopped pointing at them may not be
        durable (ENOSPC, EIO), so the next flush tries again, instead of leaking them."""
        self._pending_free[:0] = frees

    def repair(self, clusters: np.ndarray, values: np.ndarray) -> None:
        """Set the refcounts of ``clusters`` to ``values`` (check's repair); the next allocation searches
        from the start of the file again."""
        for cluster, value in zip(clusters.tolist(), values.tolist()):
            self._set_refcount(cluster, value)
        if len(clusters):
            self._free_hint = 0

    # --- writing back ----------------------------------------------------------------------------------

    def write_back(self, frees: list[int]) -> bool:
        """Write dirty refcount blocks and the table, durably, in crash-safe order (caller holds the lock).

        A moved table is made durable, then the header points at it; its old clusters join ``frees``, the
        flush's batch, released once that header write is durable.  Returns whether anything was written
        (and so synced: every write before this call is durable too).
        """
        dirty_blocks = self.cache.dirty()
        if not dirty_blocks and not self._table_dirty:
            return False
        file = self.file
        for block in dirty_blocks:
            file.pwrite(block.data, block.host_offset)
        if self._table_dirty:
            if self._table_moved is None and dirty_blocks:
                file.fdatasync()  # new blocks durable before the table entries that point at them
            file.pwrite(self._table.data, self._table.host_offset)
        file.fdatasync()
        for block in dirty_blocks:
            block.dirty = False
        if self._table_dirty and self._table_moved is not None:
            table_clusters = len(self._table.data) // file.cluster_size
            file.pwrite(fmt.REFCOUNT_TABLE_POINTER.pack(self._table.host_offset, table_clusters),
                        fmt.OFFSET_REFCOUNT_TABLE)
            file.fdatasync()
            frees.extend(self._clusters_of(*self._table_moved))
            self._table_moved = None
            file.header.refcount_table_offset = self._table.host_offset
            file.header.refcount_table_clusters = table_clusters
        self._table_dirty = False
        return True
