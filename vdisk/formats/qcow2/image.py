"""A qcow2 image as a node: open, create, close, the header, flush ordering, rebase; the parts composed.

The facade of the qcow2 package (QEMU's qcow2.c).  One ``Qcow2Image`` is one open file, made of:

* ``file.ImageFile``: the descriptor, header and geometry, host I/O, and the metadata lock, shared by
* ``refcount.Refcounts``: the refcount table and blocks, the allocator, frees, and
* ``cluster.Clusters``: the L1 and L2 tables, reads, writes, zero and discard, populate, and ``below``.

The node callbacks (``vdisk.formats.node.Node``) delegate to them; what needs more than one part lives here:
flushing, the caches' safe points, block status (mapping plus refcounts plus the host file), the header.

Design notes
============
Metadata lives in memory, written back at flush (QEMU's qcow2 cache, simplified):

* The L1 table and the refcount table are loaded whole (both are bounded on open: 32 MiB and 8 MiB).
* L2 tables and refcount blocks sit in bounded LRU caches (``vdisk.formats.qcow2.cache``: sized as QEMU sizes
  them, evicting only at safe points, never a dirty table), so memory does not grow with the virtual size.
  The safe point is ``trim_caches``: when a cache is over capacity with dirty tables only, it flushes first.

Crash ordering (a crash may leak clusters, never corrupt):

1. Data is written to its host cluster before any L2 entry that exposes it reaches the disk.
2. A refcount is raised (and durable) before an L2/L1 entry pointing at the cluster reaches the disk.
3. A pointer is removed (and durable) before the cluster's refcount drops: freed clusters wait in the
   refcounts' pending frees with their refcount still held, so they cannot be reused, until a flush has
   made the L2/L1 tables that no longer point at them durable.

``flush()`` therefore runs: fdatasync (data) -> write refcount blocks -> [fdatasync -> refcount table] ->
fdatasync -> write L2 tables -> [fdatasync -> L1] -> fdatasync -> release pending frees (in memory; written by
the next flush).  A table that points at a new table (refcount table -> block, L1 -> L2) is written only once
what it points to is durable: a power loss must not keep the pointer and lose the table, whose cluster may
hold a freed cluster's old bytes (the bracketed syncs run only when such a pointer changed).  A moved
refcount table is different: the header points at it only after a further fdatasync.  The refcount steps
are ``Refcounts.write_back``, the L2/L1 steps ``Clusters.write_back``; the order between them is here.
The data fdatasync runs without the lock, so a write may link fresh data (``Clusters.pwrite``) after it and
before the metadata phase: ``Clusters.links`` counts links, and the metadata phase syncs again when it moved
meanwhile (otherwise only a dirty refcount block's sync would cover that data before its L2 entry is written).
(The power-loss tests in tests/test_powerloss.py replay every barrier of recorded runs against these rules.)

Locking: ``self.lock`` (the ``MetadataLock`` of ``ImageFile``, reentrant) covers every metadata structure of
every part: caches, L1, refcounts, the allocator and the pending frees; payload I/O runs outside it (see
``vdisk.formats.qcow2.cluster`` for the one exception).  ``flush()`` fdatasyncs data without the lock, then
takes it for the metadata phase only.  Two calls must not touch the same guest cluster at the same time; the
block device (``vdisk.block.device``) guarantees that with its range locks.
"""

from __future__ import annotations

import logging
import os

import numpy as np

from vdisk.errors import CorruptImage, FormatError, OutOfRange, StorageError, UnsupportedFeature
from vdisk.formats.node import KIND_COMPRESSED, KIND_DATA, KIND_ZERO, Below, Status
from vdisk.formats.qcow2 import format as fmt
from vdisk.formats.qcow2.cache import CacheOptions, cache_tables
from vdisk.formats.qcow2.check import check_image
from vdisk.formats.qcow2.cluster import Clusters
from vdisk.formats.qcow2.file import ImageFile
from vdisk.formats.qcow2.refcount import Refcounts
from vdisk.formats.qcow2.tables import RefcountBlock
from vdisk.io import locking

log = logging.getLogger(__name__)


class Qcow2Image:
    """One qcow2 file as a node of a chain; ``below`` (set by the block layer) shows through where it holds
    nothing."""

    format_name = "qcow2"
    can_have_backing = True
    node_name: str | None = None  # the QMP node name, once the monitor named it

    def __init__(self, path: str, fd: int, header: fmt.Header, *, read_only: bool, cache: CacheOptions):
        self.path = path
        self.fd = fd
        self.header = header
        self.read_only = read_only
        self.size = header.size
        self.cluster_size = header.cluster_size
        self.file = ImageFile(path, fd, header, read_only=read_only, at_safe_point=self.trim_caches)
        self.lock = self.file.lock
        l2_tables, refcount_tables = cache_tables(cache, header.size, header.cluster_size, header.l2_entry_bytes)
        self.refcounts = Refcounts(self.file, refcount_tables)
        self.clusters = Clusters(self.file, self.refcounts, l2_tables)
        # The two calls every guest read makes on every level of the chain, bound straight to the part that
        # answers them (a delegating method per call costs a Python frame on the hot path).
        self.map_units = self.clusters.map_units
        self.read_mapped = self.clusters.read_mapped
        self._closed = False

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
        corrupt image opens read-write as it is, for ``check`` to report and repair."""
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
                # The repaired refcounts are durable (the check flushed them) before the bit is cleared.
                self.set_incompatible_features(h.incompatible_features & ~fmt.INCOMPAT_DIRTY)
                log.warning("%s: refcounts repaired; dirty bit cleared", self.path)
        if h.version >= 3 and h.autoclear_features & ~fmt.AUTOCLEAR_KEPT:
            log.info("%s: clearing autoclear feature bits %#x", self.path, h.autoclear_features)
            h.autoclear_features &= fmt.AUTOCLEAR_KEPT
            self._write_header_u64(fmt.OFFSET_AUTOCLEAR_FEATURES, h.autoclear_features)
            self.file.fdatasync()

    def _write_header_u64(self, offset: int, value: int) -> None:
        self.file.pwrite(fmt.U64.pack(value), offset)

    def set_incompatible_features(self, features: int) -> None:
        """Rewrite the header's incompatible feature bits (the dirty and corrupt bits), durably."""
        self._write_header_u64(fmt.OFFSET_INCOMPATIBLE_FEATURES, features)
        self.file.fdatasync()
        self.header.incompatible_features = features

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
    # the node: what shows through, and the backing file the header names

    @property
    def below(self) -> Below | None:
        return self.clusters.below

    @below.setter
    def below(self, below: Below | None) -> None:
        self.clusters.below = below

    @property
    def backing_name(self) -> str | None:
        return self.header.backing_file

    @property
    def backing_format(self) -> str | None:
        return self.header.backing_format

    # ---------------------------------------------------------------------------------------------------
    # guest requests (the mapping and its changes: vdisk.formats.qcow2.cluster)

    def pread(self, buf, guest_offset: int) -> None:
        self.clusters.pread(buf, guest_offset)

    def pwrite(self, buf, guest_offset: int, *, fua: bool = False) -> None:
        self.clusters.pwrite(buf, guest_offset)
        if fua:
            self.flush()

    def write_zeroes(self, guest_offset: int, length: int, *, may_trim: bool = True, fua: bool = False) -> None:
        self.clusters.write_zeroes(guest_offset, length, may_trim=may_trim)
        if fua:
            self.flush()

    def trim(self, guest_offset: int, length: int) -> None:
        self.clusters.trim(guest_offset, length)

    def unallocated_clusters(self, first: int, count: int) -> np.ndarray:
        return self.clusters.unallocated_clusters(first, count)

    def populate(self, guest_offset: int, buf, wanted: np.ndarray, zero: np.ndarray) -> int:
        return self.clusters.populate(guest_offset, buf, wanted, zero)

    def partially_allocated(self, guest_offset: int, length: int) -> list[int]:
        return self.clusters.partially_allocated(guest_offset, length)

    def block_status(self, guest_offset: int, length: int) -> list[Status]:
        """``map_units`` as ``qemu-img map`` reports it (QEMU's qcow2_co_block_status).

        QEMU reports a host offset wherever one is known: data, preallocated zero clusters, unallocated
        subclusters of an allocated cluster (qcow2 never maps guest data at host offset 0: the header), never
        for compressed clusters.  In a metadata-preallocated image, data over a hole of the host file (or past
        its end) reads as zeros and says so.
        """
        out: list[Status] = []
        for start, run_length, kind, host in self.clusters.map_units(guest_offset, length):
            if kind == KIND_DATA and self.refcounts.metadata_preallocated():
                out.extend(Status(start + pos - host, stop - pos, KIND_DATA, hole, pos)
                           for pos, stop, hole in self.file.host_extents(host, run_length))
                continue
            known = kind != KIND_COMPRESSED and host != 0
            out.append(Status(start, run_length, kind, kind == KIND_ZERO, host if known else None))
        return out

    def describe(self) -> dict:
        """What ``qemu-img info`` says of a qcow2 image beyond any node's size and name (its keys)."""
        h = self.header
        facts: dict = {"cluster-size": self.cluster_size}
        if h.backing_file:
            facts["backing-filename"] = h.backing_file
            if h.backing_format:
                facts["backing-filename-format"] = h.backing_format
        data: dict = {"compat": "1.1" if h.version >= 3 else "0.10"}
        if h.version >= 3:
            data.update({
                "compression-type": fmt.COMPRESSION_NAMES[h.compression_type],
                "lazy-refcounts": bool(h.compatible_features & fmt.COMPAT_LAZY_REFCOUNTS),
                "refcount-bits": h.refcount_bits,
                "corrupt": bool(h.incompatible_features & fmt.INCOMPAT_CORRUPT),
                "extended-l2": h.extended_l2,
            })
        else:
            data.update({"compression-type": "zlib", "refcount-bits": 16})
        facts["format-specific"] = {"type": "qcow2", "data": data}
        facts["dirty-flag"] = bool(h.incompatible_features & fmt.INCOMPAT_DIRTY)
        return facts

    # ---------------------------------------------------------------------------------------------------
    # flush and the caches

    def flush(self) -> None:
        """Make every completed write durable, in crash-safe order (see the design notes)."""
        if self.read_only or self._closed:
            return
        with self.lock:
            links = self.clusters.links
        self.file.fdatasync()
        with self.lock:
            self._flush_metadata(data_synced=self.clusters.links == links)

    def _flush_metadata(self, data_synced: bool = True) -> None:
        """Write dirty metadata in crash-safe order, then release the frees it made safe.  Caller holds the lock.

        ``data_synced``: every write linked so far had its data made durable by an fdatasync before this call
        (False: ``flush()`` saw a link after its data fdatasync; it is synced again before L2 tables go out).
        """
        frees = self.refcounts.take_pending_frees()
        try:
            if self.refcounts.write_back(frees):
                data_synced = True
            self.clusters.write_back(data_synced)
        except BaseException:
            self.refcounts.requeue_frees(frees)
            raise
        self.refcounts.release(frees)

    def trim_caches(self) -> None:
        """Bring both caches back within capacity: a safe point, where the caller holds no table.

        Runs at the end of every outermost metadata section (and at ``MetadataLock.safe_point``, between the
        tables of a loop that holds the lock throughout).  Dirty tables over capacity are written back first,
        in crash-safe order.
        """
        if self._closed:
            return
        with self.lock:
            for cache in (self.clusters.cache, self.refcounts.cache):
                if not cache.evict_clean():
                    self.file.fdatasync()
                    self._flush_metadata()
                    cache.evict_clean()
            # Writing back released pending frees, which may have loaded refcount blocks again.
            self.refcounts.cache.evict_clean()

    def clean_caches(self) -> int:
        """Drop the clean tables unused since the previous call (QEMU's cache-clean-interval); returns how many."""
        if self._closed:
            return 0
        with self.lock:
            return self.clusters.cache.drop_idle() + self.refcounts.cache.drop_idle()

    # ---------------------------------------------------------------------------------------------------
    # backing pointer

    def set_backing(self, backing_name: str | None, backing_format: str | None) -> None:
        """Rewrite the backing file name and format in the header (QEMU's unsafe rebase), then fdatasync.

        The whole header cluster is rewritten with one pwrite, so a reader sees the old or the new pointer.
        """
        self.file.check_writable()
        with self.lock:
            h = self.header
            h.extensions = [(t, d) for t, d in h.extensions if t != fmt.EXT_BACKING_FORMAT]
            if backing_name and backing_format:
                h.extensions.insert(0, (fmt.EXT_BACKING_FORMAT, backing_format.encode()))
            if h.version >= 3 and not any(t == fmt.EXT_FEATURE_NAME_TABLE for t, _ in h.extensions):
                h.extensions.extend(fmt.build_extensions(None))
            first = _first_cluster(h, backing_name, self.path)
            self.file.pwrite(first, 0)
            self.file.fdatasync()
            h.backing_file = backing_name
            h.backing_format = backing_format if backing_name else None


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
