"""A qcow2 image: open, create, read, write, zero, discard, flush, rebase.

Design notes
============
Metadata lives in memory, written back at flush (QEMU's qcow2 cache, simplified):

* The L1 table and the refcount table are loaded whole (both are bounded on open: 32 MiB and 8 MiB).
* L2 tables and refcount blocks sit in bounded LRU caches (``vdisk.formats.qcow2.cache``: sized as QEMU sizes them,
  evicting only at safe points, never a dirty table), so memory does not grow with the virtual size.

Crash ordering (a crash may leak clusters, never corrupt):

1. Data is written to its host cluster before any L2 entry that exposes it reaches the disk.
2. A refcount is raised (and durable) before an L2/L1 entry pointing at the cluster reaches the disk.
3. A pointer is removed (and durable) before the cluster's refcount drops: freed clusters wait in
   ``_pending_free`` with their refcount still held, so they cannot be reused, until a flush has made the
   L2/L1 tables that no longer point at them durable.

``flush()`` therefore runs: fdatasync (data) -> write refcount blocks -> [fdatasync -> refcount table] ->
fdatasync -> write L2 tables -> [fdatasync -> L1] -> fdatasync -> release pending frees (in memory; written by
the next flush).  A table that points at a new table (refcount table -> block, L1 -> L2) is written only once
what it points to is durable: a power loss must not keep the pointer and lose the table, whose cluster may
hold a freed cluster's old bytes (the bracketed syncs run only when such a pointer changed).  A moved
refcount table is different: the header points at it only after a further fdatasync.
The data fdatasync runs without the lock, so a write may link fresh data (``_commit``) after it and before
the metadata phase: ``_links`` counts links, and the metadata phase syncs again when it moved meanwhile
(otherwise only a dirty refcount block's sync would cover that data before its L2 entry is written).
(The power-loss tests in tests/test_powerloss.py replay every barrier of recorded runs against these rules.)

Locking: ``self.lock`` (a reentrant ``MetadataLock``) covers every metadata structure: caches, L1, refcounts,
the allocator and the pending frees.  A table object is used only inside the section that looked it up:
the caches evict when the outermost section ends (see ``vdisk.formats.qcow2.cache``).  Payload I/O runs outside
it.  Two calls must not touch the same guest cluster at the same
time; the block device (``vdisk.block.device``) guarantees that with its range locks.  A single-threaded user gets
it for free.  ``flush()`` fdatasyncs data without the lock, then takes it for the metadata phase only.
"""

from __future__ import annotations

import errno
import logging
import os
import zlib
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np

from vdisk.io import faults, iolog, locking, native
from vdisk.errors import CorruptImage, FormatError, OutOfRange, ReadOnlyError, StorageError, UnsupportedFeature
from vdisk.formats.qcow2 import format as fmt
from vdisk.formats.qcow2.cache import CacheOptions, MetadataLock, TableCache, cache_tables
from vdisk.formats.qcow2.tables import RefcountBlock, Table, l2_units, runs

# map_units ranges of at most this many clusters (in one L2 table) take the scalar path
_SCALAR_MAP_CLUSTERS = 64

if TYPE_CHECKING:
    from vdisk.formats.node import Node

log = logging.getLogger(__name__)


class Qcow2Image:
    """One qcow2 file.  ``backing`` (set by the chain opener) supplies unallocated ranges."""

    format_name = "qcow2"

    def __init__(self, path: str, fd: int, header: fmt.Header, *, read_only: bool, cache: CacheOptions):
        self.path = path
        self.fd = fd
        self.header = header
        self.read_only = read_only
        self.backing: Node | None = None
        self.lock = MetadataLock(self.trim_caches)
        self.cluster_bits = header.cluster_bits
        self.cluster_size = header.cluster_size
        self.size = header.size
        self.extended_l2 = header.extended_l2
        self.unit_size = self.cluster_size // (fmt.SUBCLUSTERS_PER_CLUSTER if self.extended_l2 else 1)
        self.l2_entries = header.l2_entries
        self.l2_words = 2 if self.extended_l2 else 1
        self.has_zero_flag = header.version >= 3
        self.refcount_block_entries = self.cluster_size * 8 // header.refcount_bits
        l2_tables, refcount_tables = cache_tables(cache, header.size, self.cluster_size, 8 * self.l2_words)
        self._l2_cache = TableCache(l2_tables)
        self._refblock_cache = TableCache(refcount_tables)
        self._pending_free: list[int] = []
        self._links = 0  # L2 links made by _commit: flush() checks none came after its data fdatasync
        self._l1_dirty: tuple[int, int] | None = None  # [first, last] L1 entries changed since the last write
        self._reftable_dirty = False
        self._reftable_moved: tuple[int, int] | None = None  # old table (offset, clusters) to free once durable
        self._decompressed: tuple[int, bytes] | None = None
        self._closed = False
        if header.compression_type == fmt.COMPRESSION_ZSTD:
            import zstandard

            self._zstd = zstandard.ZstdDecompressor()
        self._load_tables()
        self._host_end = self._initial_host_end()
        self._free_hint = 0

    # ---------------------------------------------------------------------------------------------------
    # open / create / close

    @classmethod
    def open(
                cls,
        path: str,
        *,
        read_only: bool = False,
        force_share: bool = False,
        cache: CacheOptions = CacheOptions(),
        repair: bool = True,
        for_check: bool = False,
    ) -> Qcow2Image:
        """Open an image.  ``for_check``: as ``qemu-img check`` opens it (QEMU's BDRV_O_CHECK): a dirty or
        corrupt image opens read-write as it is, for ``check_image`` to report and repair."""
        flags = os.O_RDONLY if read_only else os.O_RDWR
        try:
            fd = os.open(path, flags | os.O_CLOEXEC)
        except OSError as exc:
            raise StorageError.from_oserror(exc, path=path, action="open") from exc
        try:
            locking.lock_image(fd, path, write=not read_only, force_share=force_share)
            file_size = os.fstat(fd).st_size
            first = os.pread(fd, 1 << fmt.MAX_CLUSTER_BITS, 0)
            header = fmt.parse_header(first, path=path, file_size=file_size)
            first = first[: header.cluster_size]
            if not read_only:
                if header.incompatible_features & fmt.INCOMPAT_CORRUPT and not for_check:
                    raise CorruptImage(
                        "image is marked corrupt; it can only be opened read-only",
                        path=path,
                        field="incompatible_features",
                        offset=fmt.OFFSET_INCOMPATIBLE_FEATURES,
                    )
                if header.nb_snapshots:
                    raise UnsupportedFeature(
                        f"image has {header.nb_snapshots} internal snapshots; vdisk opens such images read-only",
                        path=path,
                        field="nb_snapshots",
                        offset=60,
                    )
            image = cls(path, fd, header, read_only=read_only, cache=cache)
        except BaseException:
            os.close(fd)
            raise
        if not read_only:
            try:
                image._open_for_writing(repair, for_check=for_check)
            except BaseException:
                image.close()
                raise
        return image

    def _open_for_writing(self, repair: bool, *, for_check: bool = False) -> None:
        h = self.header
        if h.incompatible_features & fmt.INCOMPAT_DIRTY and not for_check:
            if not repair:
                raise CorruptImage("image is dirty and repair was not allowed", path=self.path, field="dirty bit")
            from vdisk.formats.qcow2.check import check_image

            log.warning("%s: dirty bit set (not closed cleanly); repairing refcounts as QEMU does", self.path)
            result = check_image(self)
            if not result.check_errors:
                result = check_image(self, repair="all")
            if result.check_errors:
                # QEMU: "Could not repair dirty image"; the image stays dirty and is not opened for writing.
                # Checked before repairing, so a refused image is left as it was.  (vdisk counts metadata it
                # cannot read, such as an L2 table past the end of the file, as a check error; QEMU reads zeros
                # there and counts a corruption.)
                raise CorruptImage(
                    f"could not repair dirty image: {result.check_errors} check errors "
                    f"({'; '.join(result.messages[:3])})",
                    path=self.path, field="dirty bit",
                )
            log.warning("%s: repaired %d leaked clusters and %d corruptions", self.path,
                        result.leaks_fixed, result.corruptions_fixed)
            if result.corruptions:
                # As QEMU: opened, but the bit stays set, so the next open checks again.
                log.error("%s: %d corruptions could not be repaired; the image stays marked dirty (%s)",
                          self.path, result.corruptions, "; ".join(result.messages[:3]))
            else:
                # The repaired refcounts are durable (check_image flushed them) before the bit is cleared.
                self._write_header_u64(fmt.OFFSET_INCOMPATIBLE_FEATURES,
                                       h.incompatible_features & ~fmt.INCOMPAT_DIRTY)
                self._fdatasync()
                h.incompatible_features &= ~fmt.INCOMPAT_DIRTY
                log.warning("%s: refcounts repaired; dirty bit cleared", self.path)
        if h.version >= 3 and h.autoclear_features & ~fmt.AUTOCLEAR_KEPT:
            log.info("%s: clearing autoclear feature bits %#x", self.path, h.autoclear_features)
            h.autoclear_features &= fmt.AUTOCLEAR_KEPT
            self._write_header_u64(fmt.OFFSET_AUTOCLEAR_FEATURES, h.autoclear_features)
            self._fdatasync()

    def _write_header_u64(self, offset: int, value: int) -> None:
        self._pwrite(fmt.U64.pack(value), offset)

    @classmethod
    def create(
        cls,
        path: str,
        size: int,
        *,
        cluster_size: int = 65536,
        version: int = 3,
        backing_file: str | None = None,
        backing_format: str | None = None,
        extended_l2: bool = False,
        refcount_bits: int = 16,
        compression_type: int = fmt.COMPRESSION_ZLIB,
    ) -> None:
        """Write a new empty image at ``path`` (truncating it), laid out like qemu-img's."""
        cluster_bits = cluster_size.bit_length() - 1
        if 1 << cluster_bits != cluster_size or not fmt.MIN_CLUSTER_BITS <= cluster_bits <= fmt.MAX_CLUSTER_BITS:
            raise OutOfRange(f"cluster size {cluster_size} must be a power of two from 512 to 2 MiB")
        if refcount_bits not in (1, 2, 4, 8, 16, 32, 64):
            raise OutOfRange(f"refcount bits {refcount_bits} must be a power of two from 1 to 64")
        if version == 2 and (refcount_bits != 16 or extended_l2 or compression_type != fmt.COMPRESSION_ZLIB):
            raise OutOfRange("compat=0.10 images only have 16-bit refcounts, no extended L2, zlib compression")
        if extended_l2 and cluster_bits < 14:
            raise OutOfRange("extended L2 entries need clusters of at least 16 KiB")
        if size < 0 or size > fmt.MAX_VIRTUAL_SIZE:
            raise OutOfRange(f"size {size} outside 0..{fmt.MAX_VIRTUAL_SIZE}")
        size = -(-size // fmt.SECTOR) * fmt.SECTOR  # as qemu-img: QEMU sees a disk in whole sectors
        if backing_file is not None and len(backing_file.encode()) > fmt.MAX_BACKING_FILE_NAME:
            raise OutOfRange(f"backing file name longer than {fmt.MAX_BACKING_FILE_NAME} bytes")
        refcount_order = refcount_bits.bit_length() - 1
        entry_bytes = 16 if extended_l2 else 8
        l1_size = max(1, -(-size // ((cluster_size // entry_bytes) * cluster_size)))
        l1_clusters = -(-l1_size * 8 // cluster_size)
        if l1_size * 8 > fmt.MAX_L1_BYTES:
            raise OutOfRange(f"size {size} needs an L1 table larger than {fmt.MAX_L1_BYTES} bytes")
        per_block = cluster_size * 8 // refcount_bits
        reftable_clusters, refblocks = 1, 1
        while True:
            total = 1 + reftable_clusters + refblocks + l1_clusters
            need_blocks = -(-total // per_block)
            need_table = -(-need_blocks * 8 // cluster_size)
            if need_blocks <= refblocks and need_table <= reftable_clusters:
                break
            refblocks, reftable_clusters = max(refblocks, need_blocks), max(reftable_clusters, need_table)
        reftable_offset = cluster_size
        refblock_offset = reftable_offset + reftable_clusters * cluster_size
        l1_offset = refblock_offset + refblocks * cluster_size
        total = 1 + reftable_clusters + refblocks + l1_clusters
        incompat = (fmt.INCOMPAT_EXTL2 if extended_l2 else 0) | (
            fmt.INCOMPAT_COMPRESSION if compression_type != fmt.COMPRESSION_ZLIB else 0
        )
        header = fmt.Header(
            version=version,
            backing_file_offset=0,
            backing_file_size=0,
            cluster_bits=cluster_bits,
            size=size,
            crypt_method=fmt.CRYPT_NONE,
            l1_size=l1_size,
            l1_table_offset=l1_offset,
            refcount_table_offset=reftable_offset,
            refcount_table_clusters=reftable_clusters,
            nb_snapshots=0,
            snapshots_offset=0,
            incompatible_features=incompat,
            refcount_order=refcount_order,
            header_length=fmt.HEADER_V3_LENGTH if version >= 3 else fmt.HEADER_V2_LENGTH,
            compression_type=compression_type,
            extensions=fmt.build_extensions(backing_format if backing_file else None, feature_names=version >= 3),
        )
        first = _first_cluster(header, backing_file, path)
        reftable = np.zeros(reftable_clusters * cluster_size // 8, dtype=">u8")
        reftable[:refblocks] = refblock_offset + np.arange(refblocks, dtype=np.uint64) * cluster_size
        blocks = [RefcountBlock(0, bytearray(cluster_size), refcount_order) for _ in range(refblocks)]
        for cluster in range(total):
            blocks[cluster // per_block].set(cluster % per_block, 1)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise StorageError.from_oserror(exc, path=path, action="create") from exc
        try:
            os.pwrite(fd, first, 0)
            os.pwrite(fd, reftable.tobytes(), reftable_offset)
            for i, block in enumerate(blocks):
                os.pwrite(fd, bytes(block.data), refblock_offset + i * cluster_size)
            os.ftruncate(fd, l1_offset + l1_clusters * cluster_size)
            os.fsync(fd)
        except OSError as exc:
            raise StorageError.from_oserror(exc, path=path, action="create") from exc
        finally:
            os.close(fd)

    def close(self) -> None:
        if self._closed:
            return
        try:
            if not self.read_only:
                self.flush()
                # The first flush made the freeing L2 tables durable and released pending frees in memory;
                # the second writes those lowered refcounts, so a clean close leaves no leaks.
                self.flush()
        finally:
            self._closed = True
            os.close(self.fd)

    # ---------------------------------------------------------------------------------------------------
    # low-level I/O with errors mapped into our tree

    def _pread(self, length: int, offset: int) -> bytes:
        try:
            data = os.pread(self.fd, length, offset)
        except OSError as exc:
            raise StorageError.from_oserror(exc, path=self.path, action=f"read at {offset:#x}") from exc
        return data.ljust(length, b"\0")

    def _pread_into(self, view: memoryview, offset: int) -> None:
        if faults.ENABLED:
            faults.check(self.path, "read", offset, len(view))
        try:
            native.pread_full(self.fd, view, offset)
        except StorageError as exc:
            exc.path = self.path
            raise

    def _pwrite(self, data, offset: int) -> None:
        if faults.ENABLED:
            faults.check(self.path, "write", offset, len(data))
        try:
            if iolog.ENABLED:  # power-loss tests: record the write (see vdisk.io.iolog)
                iolog.write(self.path, data, offset, lambda: native.pwrite_full(self.fd, data, offset))
            else:
                native.pwrite_full(self.fd, data, offset)
        except StorageError as exc:
            exc.path = self.path
            raise

    def _pwritev(self, buffers: list, offset: int) -> None:
        if len(buffers) == 1 or iolog.ENABLED:
            self._pwrite(buffers[0] if len(buffers) == 1 else b"".join(buffers), offset)
            return
        total = sum(len(b) for b in buffers)
        if faults.ENABLED:
            faults.check(self.path, "write", offset, total)
        try:
            done = os.pwritev(self.fd, buffers, offset)
        except OSError as exc:
            raise StorageError.from_oserror(exc, path=self.path, action=f"write at {offset:#x}") from exc
        if done < total:
            joined = b"".join(bytes(b) for b in buffers)
            self._pwrite(memoryview(joined)[done:], offset + done)

    def _reserve(self, host_offset: int, length: int) -> None:
        """Give the file blocks for a new table now: it is written only at the next flush, and a full disk
        must fail the request that needs the table (as in QEMU, which writes it at once), not every later
        flush.  Where the file system cannot preallocate, the first write of the table will."""
        try:
            os.posix_fallocate(self.fd, host_offset, length)
        except OSError as exc:
            if exc.errno in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                return
            raise StorageError.from_oserror(exc, path=self.path,
                                            action=f"preallocate {length} bytes at {host_offset:#x}") from exc

    def _fdatasync(self) -> None:
        try:
            if iolog.ENABLED:
                iolog.sync(self.path, lambda: os.fdatasync(self.fd))
            else:
                os.fdatasync(self.fd)
        except OSError as exc:
            raise StorageError.from_oserror(exc, path=self.path, action="fdatasync") from exc

    # ---------------------------------------------------------------------------------------------------
    # tables

    def _load_tables(self) -> None:
        h = self.header
        self._l1 = Table(h.l1_table_offset, bytearray(self._pread(h.l1_size * 8, h.l1_table_offset)))
        bad = np.flatnonzero(self._l1.view.astype(np.uint64) & np.uint64(fmt.L1E_RESERVED_MASK))
        if bad.size:
            i = int(bad[0])
            raise CorruptImage("L1 entry has reserved bits set", path=self.path, field=f"l1[{i}]",
                               offset=h.l1_table_offset + 8 * i)
        l2_offsets = self._l1.view.astype(np.uint64) & np.uint64(fmt.L1E_OFFSET_MASK)
        misaligned = np.flatnonzero(l2_offsets % np.uint64(self.cluster_size))
        if misaligned.size:
            i = int(misaligned[0])
            raise CorruptImage("L2 table offset not cluster aligned", path=self.path, field=f"l1[{i}]",
                               offset=h.l1_table_offset + 8 * i)
        rt_bytes = h.refcount_table_clusters * self.cluster_size
        self._reftable = Table(h.refcount_table_offset, bytearray(self._pread(rt_bytes, h.refcount_table_offset)))
        blocks = self._reftable.view.astype(np.uint64)
        misaligned = np.flatnonzero((blocks & np.uint64(fmt.REFT_OFFSET_MASK)) % np.uint64(self.cluster_size))
        if misaligned.size:
            i = int(misaligned[0])
            raise CorruptImage("refcount block offset not cluster aligned", path=self.path,
                               field=f"refcount_table[{i}]", offset=h.refcount_table_offset + 8 * i)

    def _initial_host_end(self) -> int:
        file_end = os.fstat(self.fd).st_size
        end = -(-file_end // self.cluster_size) * self.cluster_size
        return max(end, self.header.refcount_table_offset + self.header.refcount_table_clusters * self.cluster_size,
                   self.header.l1_table_offset + -(-self.header.l1_size * 8 // self.cluster_size) * self.cluster_size)

    def _check_host_offset(self, host_offset: int, field: str, length: int | None = None) -> None:
        if host_offset % self.cluster_size or host_offset + (length or self.cluster_size) > fmt.MAX_HOST_OFFSET:
            raise CorruptImage(f"table offset {host_offset:#x} invalid", path=self.path, field=field)

    def _check_inside_file(self, host_offset: int, field: str) -> None:
        file_size = os.fstat(self.fd).st_size
        if host_offset + self.cluster_size > file_size:
            raise CorruptImage(f"table at {host_offset:#x} lies past the end of the file ({file_size} bytes)",
                               path=self.path, field=field)

    @staticmethod
    def _cached(cache: TableCache, host_offset: int, load: Callable[[], Table]) -> Table:
        """The cached table at host_offset, loaded on a miss.  Never evicts (see vdisk.formats.qcow2.cache)."""
        table = cache.lookup(host_offset)
        return table if table is not None else cache.insert(load())

    def trim_caches(self) -> None:
        """Bring both caches back within capacity: a safe point, where the caller holds no table.

        Runs at the end of every outermost metadata section; a loop that holds the lock throughout (check)
        calls it between tables.  Dirty tables over capacity are written back first, in crash-safe order.
        """
        if self._closed:
            return
        with self.lock:
            for cache in (self._l2_cache, self._refblock_cache):
                if not cache.evict_clean():
                    self._fdatasync()
                    self._flush_metadata()
                    cache.evict_clean()
            # Writing back released pending frees, which may have loaded refcount blocks again.
            self._refblock_cache.evict_clean()

    def clean_caches(self) -> int:
        """Drop the clean tables unused since the previous call (QEMU's cache-clean-interval); returns how many."""
        if self._closed:
            return 0
        with self.lock:
            return self._l2_cache.drop_idle() + self._refblock_cache.drop_idle()

    def _l2_table(self, l1_index: int) -> Table | None:
        entry = int(self._l1.view[l1_index])
        host = entry & fmt.L1E_OFFSET_MASK
        if not host:
            return None
        return self._cached(self._l2_cache, host, lambda: self._load_l2(host, l1_index))

    def _load_l2(self, host: int, l1_index: int) -> Table:
        self._check_host_offset(host, f"l1[{l1_index}]")
        self._check_inside_file(host, f"l1[{l1_index}]")
        return Table(host, bytearray(self._pread(self.cluster_size, host)))

    def _refblock(self, rt_index: int) -> RefcountBlock | None:
        if rt_index >= len(self._reftable.view):
            return None
        host = int(self._reftable.view[rt_index]) & fmt.REFT_OFFSET_MASK
        if not host:
            return None

        def load() -> RefcountBlock:
            self._check_host_offset(host, f"refcount_table[{rt_index}]")
            self._check_inside_file(host, f"refcount_table[{rt_index}]")
            return RefcountBlock(host, bytearray(self._pread(self.cluster_size, host)), self.header.refcount_order)

        return self._cached(self._refblock_cache, host, load)  # type: ignore[return-value]

    # ---------------------------------------------------------------------------------------------------
    # refcounts and allocation (caller holds self.lock)

    def refcount(self, cluster_index: int) -> int:
        block = self._refblock(cluster_index // self.refcount_block_entries)
        return block.get(cluster_index % self.refcount_block_entries) if block else 0

    def _set_refcount(self, cluster_index: int, value: int) -> None:
        rt_index, index = divmod(cluster_index, self.refcount_block_entries)
        block = self._refblock(rt_index) or self._new_refblock(rt_index)
        block.set(index, value)

    def _new_refblock(self, rt_index: int) -> RefcountBlock:
        """Create the refcount block for table slot rt_index, growing the table if needed."""
        if rt_index >= len(self._reftable.view):
            self._grow_reftable(rt_index + 1)
            # Growing counts the new table's own clusters, which may have created this very block: a
            # second block for the slot would replace it and lose those refcounts (the table would then
            # be handed out again as free space and overwritten).
            existing = self._refblock(rt_index)
            if existing is not None:
                return existing
        host = self._claim_end(1)
        block = RefcountBlock(host, bytearray(self.cluster_size), self.header.refcount_order)
        block.dirty = True
        self._refblock_cache.insert(block)
        self._reftable.view[rt_index] = host
        self._reftable_dirty = True
        own_cluster = host >> self.cluster_bits
        if own_cluster // self.refcount_block_entries == rt_index:
            block.set(own_cluster % self.refcount_block_entries, 1)
        else:
            self._set_refcount(own_cluster, 1)
        return block

    def _grow_reftable(self, min_entries: int) -> None:
        """Move the refcount table to a larger place at the end of the file (header updated at flush)."""
        entries_per_cluster = self.cluster_size // 8
        old_clusters = len(self._reftable.data) // self.cluster_size
        new_clusters = max(old_clusters * 2, -(-min_entries // entries_per_cluster) + 1)
        if new_clusters * self.cluster_size > fmt.MAX_REFCOUNT_TABLE_BYTES:
            raise StorageError("refcount table would exceed its 8 MiB limit", path=self.path,
                               os_errno=27)  # EFBIG
        host = self._claim_end(new_clusters)
        data = bytearray(new_clusters * self.cluster_size)
        data[: len(self._reftable.data)] = self._reftable.data
        old = (self._reftable.host_offset, old_clusters)
        self._reftable = Table(host, data)
        self._reftable_dirty = True
        if self._reftable_moved is None:
            self._reftable_moved = old
        else:
            self._pending_free.extend(
                range(old[0] >> self.cluster_bits, (old[0] >> self.cluster_bits) + old[1])
            )
        first = host >> self.cluster_bits
        for cluster in range(first, first + new_clusters):
            self._set_refcount(cluster, 1)

    def _claim_end(self, count: int) -> int:
        host = self._host_end
        self._host_end += count * self.cluster_size
        if self._host_end > fmt.MAX_HOST_OFFSET:
            raise StorageError("image file would exceed 2^56 bytes", path=self.path, os_errno=27)
        return host

    def _allocate(self, count: int) -> int:
        """Allocate ``count`` contiguous clusters with refcount 1; returns the host offset of the first."""
        host = self._find_free_run(count)
        if host is None:
            host = self._claim_end(count)
        first = host >> self.cluster_bits
        for rt_index in range(first // self.refcount_block_entries,
                              (first + count - 1) // self.refcount_block_entries + 1):
            block = self._refblock(rt_index) or self._new_refblock(rt_index)
            lo = max(first, rt_index * self.refcount_block_entries) - rt_index * self.refcount_block_entries
            hi = min(first + count, (rt_index + 1) * self.refcount_block_entries) - rt_index * self.refcount_block_entries
            block.set_range(lo, hi, 1)
        return host

    def _find_free_run(self, count: int) -> int | None:
        """First run of ``count`` free clusters below the end of the file, from the free hint on.

        A run may cross refcount blocks (with 512-byte clusters a block covers only 64 to 4096 clusters):
        ``carry`` counts the free clusters that end the blocks already scanned.  The hint moves past what
        was scanned, except the free tail, which may begin the run that a later allocation needs.
        """
        end_cluster = self._host_end >> self.cluster_bits
        cluster = self._free_hint
        per = self.refcount_block_entries
        carry = 0
        while cluster - carry + count <= end_cluster:
            rt_index, index = divmod(cluster, per)
            block = self._refblock(rt_index)
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
                        return start << self.cluster_bits
                    carry += limit  # the whole block is free and the run goes on
                    cluster = (rt_index + 1) * per
                    continue
                carry = 0
            found = block.first_free_run(index, count, limit)
            if found is not None:
                self._free_hint = rt_index * per + found + count
                return (rt_index * per + found) << self.cluster_bits
            carry = block.free_tail(index, limit)
            block_end = rt_index * per + limit
            self._free_hint = block_end - carry
            if limit < per:
                break  # the end of the file
            cluster = block_end
        return None

    def _free_entry(self, entry: int) -> None:
        """Queue the clusters an L2 entry referenced for release after the next flush."""
        if entry & fmt.OFLAG_COMPRESSED:
            host, length = fmt.compressed_extent(entry, self.cluster_bits)
            first = host >> self.cluster_bits
            last = (host + length - 1) >> self.cluster_bits
            self._pending_free.extend(range(first, last + 1))
        else:
            host = entry & fmt.L2E_OFFSET_MASK
            if host:
                self._pending_free.append(host >> self.cluster_bits)

    # ---------------------------------------------------------------------------------------------------
    # mapping

    def _entry_words(self, table: Table, index: int) -> tuple[int, int]:
        if self.extended_l2:
            return int(table.view[2 * index]), int(table.view[2 * index + 1])
        return int(table.view[index]), 0

    def map_units(self, guest_offset: int, length: int) -> list[tuple[int, int, int, int]]:
        """This image's allocation over [guest_offset, +length), unit-aligned outward.

        Returns runs (guest_start, byte length, kind, host offset); guest_start/length are clipped to the request.
        Compressed runs carry the raw L2 entry as host offset.  Zero and unallocated runs carry the host offset
        of a preallocated cluster (or of an allocated cluster's unallocated subclusters), else 0.
        """
        if not self.extended_l2 and length:
            if (guest_offset & (self.cluster_size - 1)) + length <= self.cluster_size:
                return [self._map_in_cluster(guest_offset, length)]
            first, last = guest_offset >> self.cluster_bits, (guest_offset + length - 1) >> self.cluster_bits
            if last - first < _SCALAR_MAP_CLUSTERS and first // self.l2_entries == last // self.l2_entries:
                return self._map_clusters(guest_offset, length, first, last)
        out: list[tuple[int, int, int, int]] = []
        end = guest_offset + length
        unit = self.unit_size
        units_per_l2 = self.l2_entries * (self.cluster_size // unit)
        pos = guest_offset
        with self.lock:
            while pos < end:
                cluster = pos >> self.cluster_bits
                l1_index, l2_index = divmod(cluster, self.l2_entries)
                table_end = (l1_index + 1) * self.l2_entries << self.cluster_bits
                stop = min(end, table_end)
                first_unit = pos // unit
                last_unit = -(-stop // unit)
                base_unit = l1_index * units_per_l2
                table = self._l2_table(l1_index)
                if table is None:
                    # Jump over every L1 entry without a table at once: a large disk with small clusters
                    # has millions of them (a 128 GiB disk of 512-byte clusters: 4 Mi).
                    last_l1 = min(len(self._l1.view), -(-(end >> self.cluster_bits) // self.l2_entries) + 1)
                    present = np.flatnonzero(self._l1.view[l1_index + 1 : last_l1].astype(np.uint64)
                                             & np.uint64(fmt.L1E_OFFSET_MASK))
                    next_table = l1_index + 1 + int(present[0]) if present.size else last_l1
                    stop = min(end, next_table * self.l2_entries << self.cluster_bits)
                    if out and out[-1][2] == fmt.KIND_UNALLOCATED and out[-1][0] + out[-1][1] == pos:
                        out[-1] = (out[-1][0], out[-1][1] + stop - pos, fmt.KIND_UNALLOCATED, 0)
                    else:
                        out.append((pos, stop - pos, fmt.KIND_UNALLOCATED, 0))
                    pos = stop
                    continue
                c0 = (first_unit - base_unit) // (self.cluster_size // unit)
                c1 = -(-(last_unit - base_unit) // (self.cluster_size // unit))
                words = table.view[c0 * self.l2_words : c1 * self.l2_words]
                kinds, hosts = l2_units(words, self.extended_l2, self.cluster_bits)
                skip = first_unit - base_unit - c0 * (self.cluster_size // unit)
                kinds = kinds[skip : skip + last_unit - first_unit]
                hosts = hosts[skip : skip + last_unit - first_unit]
                self._validate_units(kinds, hosts, l1_index)
                for u0, count, kind, host in runs(kinds, hosts, unit):
                    start = max(pos, (first_unit + u0) * unit)
                    stop_run = min(stop, (first_unit + u0 + count) * unit)
                    if kind != fmt.KIND_COMPRESSED and host:
                        host += start - (first_unit + u0) * unit
                    out.append((start, stop_run - start, kind, host))
                pos = stop
        return out

    def _map_clusters(self, guest_offset: int, length: int, first: int, last: int) -> list[tuple[int, int, int, int]]:
        """map_units for a few clusters of one standard L2 table: scalar code (numpy costs more on so few entries).

        Same runs as the vectorised path: a run has one kind; runs with host offsets are host-contiguous;
        every compressed cluster is its own run.
        """
        bits = self.cluster_bits
        in_cluster = (1 << bits) - 1
        end = guest_offset + length
        l1_index, l2_first = divmod(first, self.l2_entries)
        with self.lock:
            table = self._l2_table(l1_index)
            entries = table.view[l2_first : l2_first + last - first + 1].tolist() if table is not None else None
        if entries is None:
            return [(guest_offset, length, fmt.KIND_UNALLOCATED, 0)]
        out: list[tuple[int, int, int, int]] = []
        pos = guest_offset
        prev_kind = prev_host_end = -1
        for i, entry in enumerate(entries):
            stop = min(end, (first + i + 1) << bits)
            if entry & fmt.OFLAG_COMPRESSED:
                out.append((pos, stop - pos, fmt.KIND_COMPRESSED, entry))
                prev_kind, pos = fmt.KIND_COMPRESSED, stop
                continue
            host = entry & fmt.L2E_OFFSET_MASK
            if entry & fmt.OFLAG_ZERO:
                kind = fmt.KIND_ZERO
            elif host:
                if host & in_cluster or host >= fmt.MAX_HOST_OFFSET:
                    raise CorruptImage("data cluster offset invalid (unaligned or beyond 2^56)", path=self.path,
                                       field=f"L2 table of l1[{l1_index}]")
                kind = fmt.KIND_DATA
            else:
                kind = fmt.KIND_UNALLOCATED
            if host:
                host += pos & in_cluster
            if kind == prev_kind and (host == prev_host_end if host or prev_host_end else True):
                run_start, run_length, _, run_host = out[-1]
                out[-1] = (run_start, run_length + stop - pos, kind, run_host)
            else:
                out.append((pos, stop - pos, kind, host))
            prev_kind, prev_host_end = kind, host + stop - pos if host else 0
            pos = stop
        return out

    def _map_in_cluster(self, guest_offset: int, length: int) -> tuple[int, int, int, int]:
        """map_units for a range inside one cluster (standard L2): scalar code, the small-I/O fast path."""
        cluster = guest_offset >> self.cluster_bits
        l1_index, l2_index = divmod(cluster, self.l2_entries)
        with self.lock:
            table = self._l2_table(l1_index)
            entry = int(table.view[l2_index]) if table is not None else 0
        if entry & fmt.OFLAG_COMPRESSED:
            return guest_offset, length, fmt.KIND_COMPRESSED, entry
        if entry & fmt.OFLAG_ZERO:
            # A preallocated zero cluster's host offset, at the same place in the cluster as the guest offset
            # (as map_units reports it); 0 for a plain zero cluster.
            prealloc = entry & fmt.L2E_OFFSET_MASK
            return guest_offset, length, fmt.KIND_ZERO, prealloc + (guest_offset & (self.cluster_size - 1)) if prealloc else 0
        host = entry & fmt.L2E_OFFSET_MASK
        if not host:
            return guest_offset, length, fmt.KIND_UNALLOCATED, 0
        if host % self.cluster_size or host >= fmt.MAX_HOST_OFFSET:
            raise CorruptImage("data cluster offset invalid (unaligned or beyond 2^56)", path=self.path,
                               field=f"L2 table of l1[{l1_index}]")
        return guest_offset, length, fmt.KIND_DATA, host + (guest_offset & (self.cluster_size - 1))

    def _validate_units(self, kinds: np.ndarray, hosts: np.ndarray, l1_index: int) -> None:
        data = kinds == fmt.KIND_DATA
        if not data.any():
            return
        h = hosts[data]
        if (h >= np.uint64(fmt.MAX_HOST_OFFSET)).any() or (h % np.uint64(self.unit_size)).any():
            raise CorruptImage("data cluster offset invalid (unaligned or beyond 2^56)", path=self.path,
                               field=f"L2 table of l1[{l1_index}]")

    # ---------------------------------------------------------------------------------------------------
    # reads

    def pread(self, buf, guest_offset: int) -> None:
        """Fill ``buf`` with the guest data at guest_offset (falls through to the backing file)."""
        view = memoryview(buf).cast("B")
        self._check_range(guest_offset, len(view))
        length = len(view)
        if (length and (guest_offset & (self.cluster_size - 1)) + length <= self.cluster_size
                and not self.extended_l2 and not faults.ENABLED):
            # One cluster (the small random read): one L2 lookup per chain level, one preadv.
            _, _, kind, host = self._map_in_cluster(guest_offset, length)
            if kind == fmt.KIND_DATA:
                try:
                    if os.preadv(self.fd, [view], host) == length:
                        return
                except OSError:
                    pass  # the general path below reads it again and reports the error properly
            backing = self.backing
            if kind == fmt.KIND_UNALLOCATED and backing is not None and guest_offset + length <= backing.size:
                backing.pread(view, guest_offset)
                return
        for start, length, kind, host in self.map_units(guest_offset, len(view)):
            dst = view[start - guest_offset : start - guest_offset + length]
            if kind == fmt.KIND_DATA:
                self._pread_into(dst, host)
            elif kind == fmt.KIND_ZERO:
                zero_fill(dst)
            elif kind == fmt.KIND_UNALLOCATED:
                self.read_backing(dst, start)
            else:
                cluster_start = start >> self.cluster_bits << self.cluster_bits
                data = self._decompress(host)
                dst[:] = data[start - cluster_start : start - cluster_start + length]

    def read_backing(self, dst: memoryview, guest_offset: int) -> None:
        """What an unallocated range reads as: the backing file, zeros past its end or without one."""
        backing = self.backing
        if backing is None or guest_offset >= backing.size:
            zero_fill(dst)
            return
        inside = min(len(dst), backing.size - guest_offset)
        backing.pread(dst[:inside], guest_offset)
        if inside < len(dst):
            zero_fill(dst[inside:])

    def _decompress(self, entry: int) -> bytes:
        cached = self._decompressed
        if cached is not None and cached[0] == entry:
            return cached[1]
        host, length = fmt.compressed_extent(entry, self.cluster_bits)
        raw = self._pread(length, host)
        try:
            if self.header.compression_type == fmt.COMPRESSION_ZSTD:
                # Never decompress a frame whole: a few KiB of zstd can expand to gigabytes.  One byte past the
                # cluster tells a frame that is too long, which QEMU's qcow2_zstd_decompress refuses (EIO).
                data = self._zstd.stream_reader(raw).read(self.cluster_size + 1)
            else:
                data = zlib.decompressobj(-12).decompress(raw, self.cluster_size)
        except Exception as exc:  # zlib.error / zstd.ZstdError: both are "this cluster is garbage"
            raise CorruptImage(f"compressed cluster does not decompress: {exc}", path=self.path,
                               offset=host) from exc
        if len(data) > self.cluster_size:
            raise CorruptImage(f"compressed cluster decompresses to more than {self.cluster_size} bytes",
                               path=self.path, offset=host)
        if len(data) < self.cluster_size:
            raise CorruptImage(
                f"compressed cluster decompresses to {len(data)} bytes, not {self.cluster_size}",
                path=self.path, offset=host,
            )
        data = data[: self.cluster_size]
        self._decompressed = (entry, data)
        return data

    def _check_range(self, guest_offset: int, length: int) -> None:
        if guest_offset < 0 or length < 0 or guest_offset + length > self.size:
            raise OutOfRange(
                f"request {guest_offset}+{length} outside the disk of {self.size} bytes",
                offset=guest_offset,
                length=length,
            )

    def _check_writable(self) -> None:
        if self.read_only:
            raise ReadOnlyError("image is open read-only", path=self.path)

    # ---------------------------------------------------------------------------------------------------
    # writes

    def pwrite(self, buf, guest_offset: int, *, fua: bool = False) -> None:
        """Write ``buf`` at guest_offset: in place where allocated, else into newly allocated clusters."""
        self._check_writable()
        view = memoryview(buf).cast("B")
        self._check_range(guest_offset, len(view))
        if not len(view):
            return
        first = guest_offset >> self.cluster_bits
        last = (guest_offset + len(view) - 1) >> self.cluster_bits
        segments: list[tuple[int, memoryview | bytearray]] = []
        updates: list[tuple[int, int, int]] = []  # (cluster index, descriptor, bitmap)
        allocated: list[int] = []  # host offsets of new clusters: given back if the write fails
        try:
            self._map_for_write(view, guest_offset, first, last, segments, updates, allocated)
            self._write_segments(segments)
        except BaseException:
            self._release_unlinked(allocated)
            raise
        if updates:
            self._commit(updates)
        if fua:
            self.flush()

    def _map_for_write(self, view: memoryview, guest_offset: int, first: int, last: int, segments: list,
                       updates: list, allocated: list) -> None:
        """pwrite's metadata step (under the lock): where each piece goes, new clusters for the pieces that
        cannot be written in place (filled from the chain around a partial write), their L2 updates."""
        cs = self.cluster_size
        with self.lock:
            cluster = first
            while cluster <= last:
                l1_index, l2_index = divmod(cluster, self.l2_entries)
                stop = min(last + 1, (l1_index + 1) * self.l2_entries)
                table = self._l2_table_for_write(l1_index)
                words = table.view[l2_index * self.l2_words : (l2_index + stop - cluster) * self.l2_words]
                descs = words[0 :: self.l2_words].astype(np.uint64)
                in_place = ((descs & np.uint64(fmt.OFLAG_COPIED | fmt.OFLAG_COMPRESSED | fmt.OFLAG_ZERO))
                            == np.uint64(fmt.OFLAG_COPIED)) & ((descs & np.uint64(fmt.L2E_OFFSET_MASK)) != 0)
                if self.extended_l2:
                    in_place &= words[1 :: 2].astype(np.uint64) == np.uint64(fmt.L2_BITMAP_ALL_ALLOC)
                need = np.flatnonzero(~in_place)
                new_host = self._allocate(len(need)) if len(need) else 0
                allocated.extend(new_host + k * cs for k in range(len(need)))
                new_index = {int(i): new_host + k * cs for k, i in enumerate(need)}
                for i in range(stop - cluster):
                    c = cluster + i
                    c_start = c << self.cluster_bits
                    lo = max(guest_offset, c_start)
                    hi = min(guest_offset + len(view), c_start + cs)
                    piece = view[lo - guest_offset : hi - guest_offset]
                    if in_place[i]:
                        segments.append((int(descs[i] & np.uint64(fmt.L2E_OFFSET_MASK)) + lo - c_start, piece))
                        continue
                    host = new_index[i]
                    if hi - lo == cs:
                        segments.append((host, piece))
                    else:
                        whole = bytearray(cs)
                        self._read_cluster(memoryview(whole), c)
                        whole[lo - c_start : hi - c_start] = piece
                        segments.append((host, whole))
                    updates.append((c, host | fmt.OFLAG_COPIED, fmt.L2_BITMAP_ALL_ALLOC))
                cluster = stop

    def _release_unlinked(self, hosts: list[int]) -> None:
        """Give back clusters allocated for a write that failed before anything pointed at them (QEMU's
        qcow2_alloc_cluster_abort): a guest retrying a write on a full disk must not leak a cluster per try."""
        with self.lock:
            for host in hosts:
                cluster = host >> self.cluster_bits
                value = self.refcount(cluster)
                if value:
                    self._set_refcount(cluster, value - 1)
                    if value == 1:
                        self._free_hint = min(self._free_hint, cluster)

    def _read_cluster(self, dst: memoryview, cluster: int) -> None:
        """The current guest content of a whole cluster (for copy-on-write); caller holds the lock."""
        c_start = cluster << self.cluster_bits
        length = min(self.cluster_size, self.size - c_start)
        self.pread(dst[:length], c_start)
        if length < self.cluster_size:
            zero_fill(dst[length:])

    def _write_segments(self, segments: list[tuple[int, memoryview | bytearray]]) -> None:
        """One pwritev per host-contiguous run of segments."""
        i = 0
        while i < len(segments):
            host, data = segments[i]
            batch = [data]
            end = host + len(data)
            j = i + 1
            while j < len(segments) and segments[j][0] == end and len(batch) < 1024:
                batch.append(segments[j][1])
                end += len(segments[j][1])
                j += 1
            self._pwritev(batch, host)
            i = j

    def _commit(self, updates: list[tuple[int, int, int]]) -> None:
        """Point L2 entries at their new descriptors; queue what they referenced before for release."""
        with self.lock:
            self._links += 1
            for cluster, desc, bitmap in updates:
                l1_index, l2_index = divmod(cluster, self.l2_entries)
                table = self._l2_table_for_write(l1_index)
                old = int(table.view[l2_index * self.l2_words])
                old_host = old & fmt.L2E_OFFSET_MASK
                if old & fmt.OFLAG_COMPRESSED or (old_host and old_host != desc & fmt.L2E_OFFSET_MASK):
                    self._free_entry(old)
                table.view[l2_index * self.l2_words] = desc
                if self.extended_l2:
                    table.view[l2_index * 2 + 1] = bitmap
                table.dirty = True

    def _l2_table_for_write(self, l1_index: int) -> Table:
        table = self._l2_table(l1_index)
        if table is not None:
            if not int(self._l1.view[l1_index]) & fmt.OFLAG_COPIED:
                raise UnsupportedFeature("shared L2 table (internal snapshot) cannot be written", path=self.path)
            return table
        host = self._allocate(1)
        try:
            self._reserve(host, self.cluster_size)
        except StorageError:
            self._release_unlinked([host])
            raise
        table = Table(host, bytearray(self.cluster_size))
        table.dirty = True
        self._l2_cache.insert(table)
        self._set_l1_entry(l1_index, host | fmt.OFLAG_COPIED)
        return table

    def _set_l1_entry(self, l1_index: int, entry: int) -> None:
        """Change one L1 entry; the next metadata flush writes the span of changed entries, not the whole
        table (up to 32 MiB on a large disk with small clusters).  Caller holds the lock."""
        self._l1.view[l1_index] = entry
        first, last = self._l1_dirty or (l1_index, l1_index)
        self._l1_dirty = (min(first, l1_index), max(last, l1_index))

    def unallocated_clusters(self, first: int, count: int) -> np.ndarray:
        """Which of the clusters [first, first+count) are wholly unallocated here (read from the backing)."""
        out = np.zeros(count, dtype=bool)
        with self.lock:
            cluster = first
            while cluster < first + count:
                l1_index, l2_index = divmod(cluster, self.l2_entries)
                stop = min(first + count, (l1_index + 1) * self.l2_entries)
                table = self._l2_table(l1_index)
                if table is None:
                    out[cluster - first : stop - first] = True
                else:
                    words = table.view[l2_index * self.l2_words : (l2_index + stop - cluster) * self.l2_words]
                    free = words[0 :: self.l2_words].astype(np.uint64) == 0
                    if self.extended_l2:
                        free &= words[1 :: 2].astype(np.uint64) == 0
                    out[cluster - first : stop - first] = free
                cluster = stop
        return out

    def populate(self, guest_offset: int, buf, wanted: np.ndarray, zero: np.ndarray) -> int:
        """Fill clusters that are still unallocated with backing data (the stream and copy-on-read step).

        ``buf`` holds whole clusters starting at the cluster-aligned ``guest_offset``; ``wanted`` says which
        of them to fill and ``zero`` which of them are all zeros (they become zero clusters, never written
        zeros).  Clusters allocated meanwhile are left alone.  The caller excludes guest writes to these
        clusters (the block device's COPY range lock).  Returns the number of clusters filled.
        """
        self._check_writable()
        cs = self.cluster_size
        first = guest_offset >> self.cluster_bits
        count = len(wanted)
        if guest_offset % cs or len(buf) != count * cs:
            raise OutOfRange(f"populate needs whole clusters: {guest_offset}+{len(buf)}", offset=guest_offset)
        with self.lock:
            todo = wanted & self.unallocated_clusters(first, count)
            as_zero = todo & zero if self.has_zero_flag else np.zeros(count, dtype=bool)
            as_data = todo & ~as_zero
            n_data = int(np.count_nonzero(as_data))
            # The L2 tables first: one that cannot be had (ENOSPC) fails the copy before any data is written.
            for l1_index in {(first + int(i)) // self.l2_entries for i in np.flatnonzero(todo)}:
                self._l2_table_for_write(l1_index)
            host = self._allocate(n_data) if n_data else 0
        if n_data:
            try:
                if faults.ENABLED:
                    faults.check(self.path, "write", host, n_data * cs)
                if iolog.ENABLED:
                    packed = b"".join(memoryview(buf)[int(i) * cs : (int(i) + 1) * cs] for i in np.flatnonzero(as_data))
                    self._pwrite(packed, host)
                else:
                    native.pwrite_selected(self.fd, buf, cs, as_data, host)
            except BaseException as exc:
                if isinstance(exc, StorageError):
                    exc.path = self.path
                self._release_unlinked([host + k * cs for k in range(n_data)])
                raise
        updates = [(first + int(i), host + k * cs | fmt.OFLAG_COPIED, fmt.L2_BITMAP_ALL_ALLOC)
                   for k, i in enumerate(np.flatnonzero(as_data))]
        if self.extended_l2:
            updates += [(first + int(i), 0, fmt.L2_BITMAP_ALL_ZERO) for i in np.flatnonzero(as_zero)]
        else:
            updates += [(first + int(i), fmt.OFLAG_ZERO, 0) for i in np.flatnonzero(as_zero)]
        if updates:
            self._commit(updates)
        return len(updates)

    # ---------------------------------------------------------------------------------------------------
    # zero and discard

    def write_zeroes(self, guest_offset: int, length: int, *, may_trim: bool = True, fua: bool = False) -> None:
        """Make a range read as zeros; whole clusters become zero clusters, never written-out zeros."""
        self._check_writable()
        self._check_range(guest_offset, length)
        head, whole_first, whole_last, tail = self._split_whole_clusters(guest_offset, length)
        for start, count in (head, tail):
            if count:
                self._zero_partial(start, count)
        if whole_last > whole_first:
            self._set_clusters(whole_first, whole_last, zero=True, keep_allocation=not may_trim)
        if fua:
            self.flush()

    def _zero_partial(self, start: int, count: int) -> None:
        if all(kind == fmt.KIND_ZERO or (kind == fmt.KIND_UNALLOCATED and self.backing is None)
               for _, _, kind, _ in self.map_units(start, count)):
            return
        self.pwrite(bytes(count), start)

    def trim(self, guest_offset: int, length: int) -> None:
        """Discard whole clusters in the range (partial clusters are left as they are, as QEMU does)."""
        self._check_writable()
        self._check_range(guest_offset, length)
        _, whole_first, whole_last, _ = self._split_whole_clusters(guest_offset, length)
        if whole_last > whole_first:
            self._set_clusters(whole_first, whole_last, zero=False, keep_allocation=False)

    def _split_whole_clusters(self, guest_offset: int, length: int) -> tuple[tuple[int, int], int, int, tuple[int, int]]:
        """(head partial (start, len), first whole cluster, end whole cluster, tail partial (start, len)).

        The last cluster counts as whole when the range runs to the end of the disk.
        """
        cs = self.cluster_size
        end = guest_offset + length
        first_whole = -(-guest_offset // cs)
        last_whole = end // cs if end < self.size else -(-end // cs)
        if last_whole <= first_whole:
            return (guest_offset, length), 0, 0, (0, 0)
        head = (guest_offset, first_whole * cs - guest_offset)
        tail_start = min(last_whole * cs, end)
        return head, first_whole, last_whole, (tail_start, end - tail_start)

    def _set_clusters(self, first: int, stop: int, *, zero: bool, keep_allocation: bool) -> None:
        """Turn whole clusters [first, stop) into zero clusters (zero=True) or discard them.

        A discarded cluster reads as zeros where a backing file would show through (v3), as QEMU does.
        v2 images have no zero flag: zeroing with a backing file writes zeros; discarding leaves them.
        """
        has_backing = self.backing is not None
        if not self.has_zero_flag and has_backing:
            if zero:
                for cluster in range(first, stop):
                    c_start = cluster << self.cluster_bits
                    self.pwrite(bytes(min(self.cluster_size, self.size - c_start)), c_start)
            return
        use_zero_flag = self.has_zero_flag and (has_backing or (zero and keep_allocation))
        with self.lock:
            cluster = first
            while cluster < stop:
                l1_index, l2_index = divmod(cluster, self.l2_entries)
                chunk_stop = min(stop, (l1_index + 1) * self.l2_entries)
                table = self._l2_table(l1_index)
                if table is None and not use_zero_flag:
                    cluster = chunk_stop
                    continue
                table = table or self._l2_table_for_write(l1_index)
                if not int(self._l1.view[l1_index]) & fmt.OFLAG_COPIED:
                    raise UnsupportedFeature("shared L2 table (internal snapshot) cannot be written", path=self.path)
                for i in range(l2_index, l2_index + chunk_stop - cluster):
                    old = int(table.view[i * self.l2_words])
                    old_host = old & fmt.L2E_OFFSET_MASK
                    # Only the zero flag makes a kept host cluster read as zeros.  Without it (v2, no backing
                    # file: the only v2 case that gets here) keeping the cluster would keep its old data, so
                    # it is released instead and the unallocated cluster reads as zeros.
                    keep = use_zero_flag and keep_allocation and old_host and not old & fmt.OFLAG_COMPRESSED
                    if keep:
                        desc = old_host | fmt.OFLAG_COPIED
                    else:
                        desc = 0
                        if old_host or old & fmt.OFLAG_COMPRESSED:
                            self._free_entry(old)
                    if self.extended_l2:
                        table.view[2 * i] = desc
                        table.view[2 * i + 1] = fmt.L2_BITMAP_ALL_ZERO if use_zero_flag else 0
                    else:
                        table.view[i] = desc | (fmt.OFLAG_ZERO if use_zero_flag else 0)
                table.dirty = True
                cluster = chunk_stop

    # ---------------------------------------------------------------------------------------------------
    # flush

    def flush(self) -> None:
        """Make every completed write durable, in crash-safe order (see the design notes)."""
        if self.read_only or self._closed:
            return
        with self.lock:
            links = self._links
        self._fdatasync()
        with self.lock:
            self._flush_metadata(data_synced=self._links == links)

    def _flush_metadata(self, data_synced: bool = True) -> None:
        """Write dirty metadata in crash-safe order.  Caller holds self.lock.

        ``data_synced``: every write linked so far had its data made durable by an fdatasync before this call
        (False: ``flush()`` saw a link after its data fdatasync; it is synced again before L2 tables go out).
        """
        to_release = self._pending_free
        self._pending_free = []
        try:
            dirty_blocks = self._refblock_cache.dirty()
            if dirty_blocks or self._reftable_dirty:
                for block in dirty_blocks:
                    self._pwrite(block.data, block.host_offset)
                if self._reftable_dirty:
                    if self._reftable_moved is None and dirty_blocks:
                        self._fdatasync()  # new blocks durable before the table entries that point at them
                    self._pwrite(self._reftable.data, self._reftable.host_offset)
                self._fdatasync()
                data_synced = True
                for block in dirty_blocks:
                    block.dirty = False
                if self._reftable_dirty and self._reftable_moved is not None:
                    self._pwrite(
                        fmt.REFCOUNT_TABLE_POINTER.pack(self._reftable.host_offset,
                                                        len(self._reftable.data) // self.cluster_size),
                        fmt.OFFSET_REFCOUNT_TABLE,
                    )
                    self._fdatasync()
                    old_offset, old_clusters = self._reftable_moved
                    to_release.extend(range(old_offset >> self.cluster_bits,
                                            (old_offset >> self.cluster_bits) + old_clusters))
                    self._reftable_moved = None
                    self.header.refcount_table_offset = self._reftable.host_offset
                    self.header.refcount_table_clusters = len(self._reftable.data) // self.cluster_size
                self._reftable_dirty = False
            dirty_l2 = self._l2_cache.dirty()
            if dirty_l2 or self._l1_dirty:
                if not data_synced:
                    self._fdatasync()  # data linked after flush()'s data fdatasync
                for table in dirty_l2:
                    self._pwrite(table.data, table.host_offset)
                if self._l1_dirty:
                    if dirty_l2:
                        self._fdatasync()  # new L2 tables durable before the L1 entries that point at them
                    first, last = self._l1_dirty
                    self._pwrite(memoryview(self._l1.data)[first * 8 : (last + 1) * 8],
                                 self._l1.host_offset + first * 8)
                self._fdatasync()
                for table in dirty_l2:
                    table.dirty = False
                self._l1_dirty = None
        except BaseException:
            # Not released: the tables that stopped pointing at them may not be durable (ENOSPC, EIO).
            # The next flush tries again, instead of leaking them.
            self._pending_free[:0] = to_release
            raise
        for cluster in to_release:
            value = self.refcount(cluster)
            if value:
                self._set_refcount(cluster, value - 1)
                if value == 1:
                    self._free_hint = min(self._free_hint, cluster)

    # ---------------------------------------------------------------------------------------------------
    # backing pointer

    def set_backing(self, backing_file: str | None, backing_format: str | None) -> None:
        """Rewrite the backing file name and format in the header (QEMU's unsafe rebase), then fdatasync.

        The whole header cluster is rewritten with one pwrite, so a reader sees the old or the new pointer.
        """
        self._check_writable()
        with self.lock:
            h = self.header
            h.extensions = [(t, d) for t, d in h.extensions if t != fmt.EXT_BACKING_FORMAT]
            if backing_file and backing_format:
                h.extensions.insert(0, (fmt.EXT_BACKING_FORMAT, backing_format.encode()))
            if h.version >= 3 and not any(t == fmt.EXT_FEATURE_NAME_TABLE for t, _ in h.extensions):
                h.extensions.extend(fmt.build_extensions(None))
            first = _first_cluster(h, backing_file, self.path)
            self._pwrite(first, 0)
            self._fdatasync()
            h.backing_file = backing_file
            h.backing_format = backing_format if backing_file else None


def _first_cluster(header: fmt.Header, backing_file: str | None, path: str) -> bytes:
    """The header cluster's meaningful bytes: header, extensions, backing name (fields updated in place)."""
    header.backing_file_offset = 0
    header.backing_file_size = 0
    packed = header.pack()
    name = backing_file.encode() if backing_file else b""
    if len(name) > fmt.MAX_BACKING_FILE_NAME:
        raise OutOfRange(f"backing file name longer than {fmt.MAX_BACKING_FILE_NAME} bytes")
    if name:
        header.backing_file_offset = len(packed)
        header.backing_file_size = len(name)
        packed = header.pack()
    if len(packed) + len(name) > header.cluster_size:
        if any(t == fmt.EXT_FEATURE_NAME_TABLE for t, _ in header.extensions):
            # The feature name table (384 bytes) is optional, and 512-byte clusters have no room for it
            # beside a backing name: leave it out, as qemu-img does for such images.
            header.extensions = [(t, d) for t, d in header.extensions if t != fmt.EXT_FEATURE_NAME_TABLE]
            return _first_cluster(header, backing_file, path)
        raise FormatError("header, extensions and backing name do not fit in the first cluster", path=path)
    return packed + name


def zero_fill(view: memoryview) -> None:
    """Zero a buffer in place (numpy, no Python loop)."""
    if len(view):
        np.frombuffer(view, dtype=np.uint8)[:] = 0
