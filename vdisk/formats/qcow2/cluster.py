"""qcow2 cluster mapping: the L1 and L2 tables, reads, the write path, zero and discard, populate.

QEMU's qcow2-cluster.c (and the read and write loops of qcow2.c).  ``Clusters`` owns the L1 table (loaded
whole: at most 32 MiB), the cache of L2 tables, and ``below``: what shows through this image's unallocated
ranges, set by the block layer (through the facade).  It allocates and frees host clusters through
``refcount.Refcounts``; the facade (``image.Qcow2Image``) runs ``write_back`` in its flush.

Design notes
============
Crash ordering, the mapping part (the whole order is in ``vdisk.formats.qcow2.image``):

* Data is written to its host cluster before the L2 entry that exposes it is changed (``pwrite``:
  allocate under the lock, write the data without it, then ``_commit`` the entries).  ``links`` counts the
  commits, so a flush can tell whether a write linked data after its data fdatasync.
* A write never changes a cluster in place unless the cluster is this image's alone (COPIED); every other
  write goes to a new cluster, filled around a partial write from this image's own content (copy-on-write:
  the old cluster, or ``below``), and the old cluster is freed only after the flush that unlinks it
  (``Refcounts.free_later``).
* A new L2 table gets its blocks from the file system at once (``ImageFile.reserve``) and is written at the
  next flush, before the L1 entry that points at it.

Locking: ``self.lock`` (the image's ``MetadataLock``) covers the L1 and L2 tables and every call into the
refcounts; payload I/O (guest data reads and writes, populate's data) runs outside it.  The exception is the
copy-on-write read around a partial write, which runs inside the write's metadata step, so that the new
cluster is filled and allocated in one section.  Two calls must not touch the same guest cluster at the same
time; the block device (``vdisk.block.device``) guarantees that with its range locks.  A table is used only
inside the section that looked it up.

Fast paths: a request inside one cluster (standard L2 entries) maps with scalar code and no numpy
(``_map_in_cluster``: the 4 KiB guest read costs one L2 lookup and one preadv), as does a range of a few
clusters of one L2 table (``_map_clusters``); both decode entries with ``_decode_entry``, the scalar twin
of ``tables.l2_units``.
"""

from __future__ import annotations

import os

import numpy as np

from vdisk.errors import CorruptImage, OutOfRange, StorageError, UnsupportedFeature
from vdisk.formats.node import (KIND_COMPRESSED, KIND_DATA, KIND_UNALLOCATED, KIND_ZERO, Below, Run,
                               check_request)
from vdisk.formats.qcow2 import format as fmt
from vdisk.formats.qcow2.cache import TableCache
from vdisk.formats.qcow2.compressed import CompressedClusters
from vdisk.formats.qcow2.file import ImageFile
from vdisk.formats.qcow2.refcount import Refcounts
from vdisk.formats.qcow2.tables import Table, l2_units, runs
from vdisk.io import faults, native

# map_units ranges of at most this many clusters (in one L2 table) take the scalar path
SCALAR_MAP_CLUSTERS = 64
# a host-contiguous run of write segments goes out in one pwritev of at most this many buffers
MAX_WRITE_BUFFERS = 1024


class Clusters:
    """The guest-to-host mapping of one image, and every request that reads or changes it."""

    def __init__(self, file: ImageFile, refcounts: Refcounts, cache_tables: int):
        self.file = file
        self.refcounts = refcounts
        self.lock = file.lock
        self.below: Below | None = None
        self.cache = TableCache(cache_tables)
        self.links = 0  # L2 links made by _commit: a flush checks none came after its data fdatasync
        self._compressed = CompressedClusters(file)
        self._l1 = self._load_l1()
        self._l1_dirty: tuple[int, int] | None = None  # [first, last] L1 entries changed since the last write
        # geometry, read on every request
        self._bits = file.cluster_bits
        self._cs = file.cluster_size
        self._l2_entries = file.l2_entries
        self._l2_words = file.l2_words
        self._extended = file.extended_l2

    def _load_l1(self) -> Table:
        h = self.file.header
        l1 = Table(h.l1_table_offset, bytearray(self.file.pread(h.l1_size * 8, h.l1_table_offset)))
        bad = np.flatnonzero(l1.view.astype(np.uint64) & np.uint64(fmt.L1E_RESERVED_MASK))
        if bad.size:
            i = int(bad[0])
            raise CorruptImage("L1 entry has reserved bits set", path=self.file.path, field=f"l1[{i}]",
                               offset=h.l1_table_offset + 8 * i)
        l2_offsets = l1.view.astype(np.uint64) & np.uint64(fmt.L1E_OFFSET_MASK)
        misaligned = np.flatnonzero(l2_offsets % np.uint64(self.file.cluster_size))
        if misaligned.size:
            i = int(misaligned[0])
            raise CorruptImage("L2 table offset not cluster aligned", path=self.file.path, field=f"l1[{i}]",
                               offset=h.l1_table_offset + 8 * i)
        return l1

    # --- tables (caller holds the lock) ----------------------------------------------------------------

    def l1_entries(self) -> np.ndarray:
        """The L1 table as it stands in memory ('>u8' view; change it only through ``set_l1_entry``)."""
        return self._l1.view

    def l2_table(self, l1_index: int) -> Table | None:
        """The L2 table of one L1 entry (cached), or None where the entry has none."""
        host = int(self._l1.view[l1_index]) & fmt.L1E_OFFSET_MASK
        if not host:
            return None
        table = self.cache.lookup(host)
        return table if table is not None else self.cache.insert(self.load_l2(host, l1_index))

    def load_l2(self, host_offset: int, l1_index: int) -> Table:
        """Read the L2 table that entry ``l1_index`` of an L1 table points at, bypassing the cache (check
        reads snapshots' tables this way)."""
        self.file.check_table_offset(host_offset, f"l1[{l1_index}]")
        return Table(host_offset, bytearray(self.file.pread(self._cs, host_offset)))

    def set_l1_entry(self, l1_index: int, entry: int) -> None:
        """Change one L1 entry; the next write-back writes the span of changed entries, not the whole table
        (up to 32 MiB on a large disk with small clusters)."""
        self._l1.view[l1_index] = entry
        first, last = self._l1_dirty or (l1_index, l1_index)
        self._l1_dirty = (min(first, l1_index), max(last, l1_index))

    def _l2_table_for_write(self, l1_index: int) -> Table:
        """The L2 table of one L1 entry, created if it has none; a table shared with an internal snapshot
        (no COPIED flag) is refused."""
        table = self.l2_table(l1_index)
        if table is not None:
            if not int(self._l1.view[l1_index]) & fmt.OFLAG_COPIED:
                raise UnsupportedFeature("shared L2 table (internal snapshot) cannot be written", path=self.file.path)
            return table
        host = self.refcounts.allocate(1)
        try:
            self.file.reserve(host, self._cs)
        except StorageError:
            self.refcounts.release([host >> self._bits])
            raise
        table = Table(host, bytearray(self._cs))
        table.dirty = True
        self.cache.insert(table)
        self.set_l1_entry(l1_index, host | fmt.OFLAG_COPIED)
        return table

    def _free_entry(self, entry: int) -> None:
        """Queue the clusters an L2 entry referenced for release after the next flush."""
        if entry & fmt.OFLAG_COMPRESSED:
            host, length = fmt.compressed_extent(entry, self._bits)
            self.refcounts.free_later(range(host >> self._bits, ((host + length - 1) >> self._bits) + 1))
        elif entry & fmt.L2E_OFFSET_MASK:
            self.refcounts.free_later([(entry & fmt.L2E_OFFSET_MASK) >> self._bits])

    # --- mapping -------------------------------------------------------------------------------------

    def _invalid_data_offset(self, l1_index: int) -> CorruptImage:
        return CorruptImage("data cluster offset invalid (unaligned or beyond 2^56)", path=self.file.path,
                            field=f"L2 table of l1[{l1_index}]")

    def _decode_entry(self, entry: int, l1_index: int) -> tuple[int, int]:
        """(kind, host offset of the cluster) of one standard L2 entry, the scalar twin of ``l2_units``:
        compressed entries carry the entry itself, zero clusters their preallocated cluster or 0."""
        if entry & fmt.OFLAG_COMPRESSED:
            return KIND_COMPRESSED, entry
        host = entry & fmt.L2E_OFFSET_MASK
        if entry & fmt.OFLAG_ZERO:
            return KIND_ZERO, host
        if not host:
            return KIND_UNALLOCATED, 0
        if host & (self._cs - 1) or host >= fmt.MAX_HOST_OFFSET:
            raise self._invalid_data_offset(l1_index)
        return KIND_DATA, host

    def map_units(self, guest_offset: int, length: int) -> list[Run]:
        """This image's allocation over [guest_offset, +length), unit-aligned outward.

        Returns runs (guest_start, byte length, kind, host offset); guest_start/length are clipped to the
        request.  Compressed runs carry the raw L2 entry as host offset.  Zero and unallocated runs carry the
        host offset of a preallocated cluster (or of an allocated cluster's unallocated subclusters), else 0.
        """
        bits = self._bits
        if not self._extended and length:
            if (guest_offset & (self._cs - 1)) + length <= self._cs:
                return [self._map_in_cluster(guest_offset, length)]
            first, last = guest_offset >> bits, (guest_offset + length - 1) >> bits
            if last - first < SCALAR_MAP_CLUSTERS and first // self._l2_entries == last // self._l2_entries:
                return self._map_clusters(guest_offset, length, first, last)
        out: list[Run] = []
        end = guest_offset + length
        unit = self.file.unit_size
        units_per_cluster = self._cs // unit
        l2_entries = self._l2_entries
        units_per_l2 = l2_entries * units_per_cluster
        pos = guest_offset
        with self.lock:
            while pos < end:
                l1_index = (pos >> bits) // l2_entries
                stop = min(end, (l1_index + 1) * l2_entries << bits)
                table = self.l2_table(l1_index)
                if table is None:
                    # Jump over every L1 entry without a table at once: a large disk with small clusters
                    # has millions of them (a 128 GiB disk of 512-byte clusters: 4 Mi).
                    last_l1 = min(len(self._l1.view), -(-(end >> bits) // l2_entries) + 1)
                    present = np.flatnonzero(self._l1.view[l1_index + 1 : last_l1].astype(np.uint64)
                                             & np.uint64(fmt.L1E_OFFSET_MASK))
                    next_table = l1_index + 1 + int(present[0]) if present.size else last_l1
                    stop = min(end, next_table * l2_entries << bits)
                    if out and out[-1][2] == KIND_UNALLOCATED and out[-1][0] + out[-1][1] == pos:
                        out[-1] = (out[-1][0], out[-1][1] + stop - pos, KIND_UNALLOCATED, 0)
                    else:
                        out.append((pos, stop - pos, KIND_UNALLOCATED, 0))
                    pos = stop
                    continue
                first_unit = pos // unit
                last_unit = -(-stop // unit)
                base_unit = l1_index * units_per_l2
                c0 = (first_unit - base_unit) // units_per_cluster
                c1 = -(-(last_unit - base_unit) // units_per_cluster)
                kinds, hosts = l2_units(table.view[c0 * self._l2_words : c1 * self._l2_words], self._extended, bits)
                skip = first_unit - base_unit - c0 * units_per_cluster
                kinds = kinds[skip : skip + last_unit - first_unit]
                hosts = hosts[skip : skip + last_unit - first_unit]
                data = hosts[kinds == KIND_DATA]
                if data.size and ((data >= np.uint64(fmt.MAX_HOST_OFFSET)).any() or (data % np.uint64(unit)).any()):
                    raise self._invalid_data_offset(l1_index)
                for u0, count, kind, host in runs(kinds, hosts, unit):
                    start = max(pos, (first_unit + u0) * unit)
                    stop_run = min(stop, (first_unit + u0 + count) * unit)
                    if kind != KIND_COMPRESSED and host:
                        host += start - (first_unit + u0) * unit
                    out.append((start, stop_run - start, kind, host))
                pos = stop
        return out

    def _map_clusters(self, guest_offset: int, length: int, first: int, last: int) -> list[Run]:
        """map_units for a few clusters of one standard L2 table: scalar code (numpy costs more on so few
        entries).  Same runs as the vectorised path: a run has one kind; runs with host offsets are
        host-contiguous; every compressed cluster is its own run."""
        bits = self._bits
        in_cluster = (1 << bits) - 1
        end = guest_offset + length
        l1_index, l2_first = divmod(first, self._l2_entries)
        with self.lock:
            table = self.l2_table(l1_index)
            entries = table.view[l2_first : l2_first + last - first + 1].tolist() if table is not None else None
        if entries is None:
            return [(guest_offset, length, KIND_UNALLOCATED, 0)]
        out: list[Run] = []
        pos = guest_offset
        prev_kind = prev_host_end = -1
        for i, entry in enumerate(entries):
            stop = min(end, (first + i + 1) << bits)
            kind, host = self._decode_entry(entry, l1_index)
            if kind == KIND_COMPRESSED:
                out.append((pos, stop - pos, kind, host))
                prev_kind, pos = kind, stop
                continue
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

    def _map_in_cluster(self, guest_offset: int, length: int) -> Run:
        """map_units for a range inside one cluster (standard L2): scalar code, the small-I/O fast path."""
        l1_index, l2_index = divmod(guest_offset >> self._bits, self._l2_entries)
        with self.lock:
            table = self.l2_table(l1_index)
            entry = int(table.view[l2_index]) if table is not None else 0
        kind, host = self._decode_entry(entry, l1_index)
        if host and kind != KIND_COMPRESSED:
            # the host offset at the same place in the cluster as the guest offset (as map_units reports it)
            host += guest_offset & (self._cs - 1)
        return guest_offset, length, kind, host

    # --- reads ---------------------------------------------------------------------------------------

    def pread(self, buf, guest_offset: int) -> None:
        """Fill ``buf`` with this image's content at guest_offset: its own runs, ``below`` where it has none."""
        view = memoryview(buf).cast("B")
        length = len(view)
        check_request(guest_offset, length, self.file.size)
        if (length and (guest_offset & (self._cs - 1)) + length <= self._cs
                and not self._extended and not faults.ENABLED):
            # One cluster (the small random read): one L2 lookup per chain level, one preadv.
            _, _, kind, host = self._map_in_cluster(guest_offset, length)
            if kind == KIND_DATA:
                try:
                    if os.preadv(self.file.fd, [view], host) == length:
                        return
                except OSError:
                    pass  # the general path below reads it again and reports the error properly
            below = self.below
            if kind == KIND_UNALLOCATED and below is not None and guest_offset + length <= below.size:
                below.pread(view, guest_offset)
                return
        for start, run_length, kind, host in self.map_units(guest_offset, length):
            dst = view[start - guest_offset : start - guest_offset + run_length]
            if kind == KIND_UNALLOCATED:
                self._read_below(dst, start)
            else:
                self._read_run(dst, start, kind, host)

    def read_mapped(self, buf, guest_offset: int, kind: int, host: int) -> None:
        """Fill ``buf`` with guest bytes at ``guest_offset`` from one of this image's own runs (DATA at
        ``host``, ZERO, or COMPRESSED with ``host`` its L2 entry)."""
        view = memoryview(buf).cast("B")
        check_request(guest_offset, len(view), self.file.size)
        if kind == KIND_DATA and not faults.ENABLED:
            # The guest's hot path: one preadv; a short or failed read goes the checked way below, which
            # reads again and reports the error properly.
            try:
                if os.preadv(self.file.fd, [view], host) == len(view):
                    return
            except OSError:
                pass
        if kind == KIND_UNALLOCATED:
            raise OutOfRange(f"{self.file.path}: guest {guest_offset:#x} is not allocated in this image",
                             offset=guest_offset, length=len(view))
        self._read_run(view, guest_offset, kind, host)

    def _read_run(self, dst: memoryview, guest_offset: int, kind: int, host: int) -> None:
        if kind == KIND_DATA:
            self.file.pread_into(dst, host)
        elif kind == KIND_ZERO:
            native.zero_fill(dst)
        else:
            in_cluster = guest_offset & (self._cs - 1)
            dst[:] = self._compressed.read(host)[in_cluster : in_cluster + len(dst)]

    def _read_below(self, dst: memoryview, guest_offset: int) -> None:
        """What an unallocated range reads as: ``below``, zeros past its end or without one."""
        below = self.below
        if below is None or guest_offset >= below.size:
            native.zero_fill(dst)
            return
        inside = min(len(dst), below.size - guest_offset)
        below.pread(dst[:inside], guest_offset)
        if inside < len(dst):
            native.zero_fill(dst[inside:])

    def _read_cluster(self, dst: memoryview, cluster: int) -> None:
        """The current guest content of a whole cluster (for copy-on-write; caller holds the lock)."""
        c_start = cluster << self._bits
        length = min(self._cs, self.file.size - c_start)
        self.pread(dst[:length], c_start)
        if length < self._cs:
            native.zero_fill(dst[length:])

    # --- writes --------------------------------------------------------------------------------------

    def pwrite(self, buf, guest_offset: int) -> None:
        """Write ``buf`` at guest_offset: in place where allocated, else into newly allocated clusters."""
        self.file.check_writable()
        view = memoryview(buf).cast("B")
        check_request(guest_offset, len(view), self.file.size)
        if not len(view):
            return
        first = guest_offset >> self._bits
        last = (guest_offset + len(view) - 1) >> self._bits
        segments: list[tuple[int, memoryview | bytearray]] = []
        updates: list[tuple[int, int, int]] = []  # (cluster index, descriptor, bitmap)
        allocated: list[int] = []  # new clusters: given back if the write fails
        try:
            self._map_for_write(view, guest_offset, first, last, segments, updates, allocated)
            self._write_segments(segments)
        except BaseException:
            self.refcounts.release(allocated)
            raise
        if updates:
            self._commit(updates)

    def _map_for_write(self, view: memoryview, guest_offset: int, first: int, last: int, segments: list,
                       updates: list, allocated: list) -> None:
        """pwrite's metadata step (under the lock): where each piece goes, new clusters for the pieces that
        cannot be written in place (filled from this image's content around a partial write), their L2
        updates."""
        cs = self._cs
        words_per_entry = self._l2_words
        with self.lock:
            cluster = first
            while cluster <= last:
                l1_index, l2_index = divmod(cluster, self._l2_entries)
                stop = min(last + 1, (l1_index + 1) * self._l2_entries)
                table = self._l2_table_for_write(l1_index)
                words = table.view[l2_index * words_per_entry : (l2_index + stop - cluster) * words_per_entry]
                descs = words[0 :: words_per_entry].astype(np.uint64)
                in_place = ((descs & np.uint64(fmt.OFLAG_COPIED | fmt.OFLAG_COMPRESSED | fmt.OFLAG_ZERO))
                            == np.uint64(fmt.OFLAG_COPIED)) & ((descs & np.uint64(fmt.L2E_OFFSET_MASK)) != 0)
                if self._extended:
                    in_place &= words[1 :: 2].astype(np.uint64) == np.uint64(fmt.L2_BITMAP_ALL_ALLOC)
                need = np.flatnonzero(~in_place)
                new_host = self.refcounts.allocate(len(need)) if len(need) else 0
                allocated.extend((new_host >> self._bits) + k for k in range(len(need)))
                new_index = {int(i): new_host + k * cs for k, i in enumerate(need)}
                for i in range(stop - cluster):
                    c_start = (cluster + i) << self._bits
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
                        self._read_cluster(memoryview(whole), cluster + i)
                        whole[lo - c_start : hi - c_start] = piece
                        segments.append((host, whole))
                    updates.append((cluster + i, host | fmt.OFLAG_COPIED, fmt.L2_BITMAP_ALL_ALLOC))
                cluster = stop

    def _write_segments(self, segments: list[tuple[int, memoryview | bytearray]]) -> None:
        """One pwritev per host-contiguous run of segments."""
        i = 0
        while i < len(segments):
            host, data = segments[i]
            batch = [data]
            end = host + len(data)
            j = i + 1
            while j < len(segments) and segments[j][0] == end and len(batch) < MAX_WRITE_BUFFERS:
                batch.append(segments[j][1])
                end += len(segments[j][1])
                j += 1
            self.file.pwritev(batch, host)
            i = j

    def _commit(self, updates: list[tuple[int, int, int]]) -> None:
        """Point L2 entries at their new descriptors; queue what they referenced before for release."""
        with self.lock:
            self.links += 1
            for cluster, desc, bitmap in updates:
                l1_index, l2_index = divmod(cluster, self._l2_entries)
                table = self._l2_table_for_write(l1_index)
                old = int(table.view[l2_index * self._l2_words])
                old_host = old & fmt.L2E_OFFSET_MASK
                if old & fmt.OFLAG_COMPRESSED or (old_host and old_host != desc & fmt.L2E_OFFSET_MASK):
                    self._free_entry(old)
                table.view[l2_index * self._l2_words] = desc
                if self._extended:
                    table.view[l2_index * 2 + 1] = bitmap
                table.dirty = True

    # --- the stream and copy-on-read step --------------------------------------------------------------

    def unallocated_clusters(self, first: int, count: int) -> np.ndarray:
        """Which of the clusters [first, first+count) are wholly unallocated here (read from ``below``)."""
        out = np.zeros(count, dtype=bool)
        words_per_entry = self._l2_words
        with self.lock:
            cluster = first
            while cluster < first + count:
                l1_index, l2_index = divmod(cluster, self._l2_entries)
                stop = min(first + count, (l1_index + 1) * self._l2_entries)
                table = self.l2_table(l1_index)
                if table is None:
                    out[cluster - first : stop - first] = True
                else:
                    words = table.view[l2_index * words_per_entry : (l2_index + stop - cluster) * words_per_entry]
                    free = words[0 :: words_per_entry].astype(np.uint64) == 0
                    if self._extended:
                        free &= words[1 :: 2].astype(np.uint64) == 0
                    out[cluster - first : stop - first] = free
                cluster = stop
        return out

    def partially_allocated(self, guest_offset: int, length: int) -> list[int]:
        """Clusters of the range with some subclusters allocated and some still reading from ``below``
        (extended L2 only: a standard cluster is allocated whole or not at all)."""
        if not self._extended:
            return []
        cs = self._cs
        out = set()
        for run_start, run_length, kind, _ in self.map_units(guest_offset, length):
            if kind == KIND_UNALLOCATED:
                for cluster in (run_start // cs, (run_start + run_length - 1) // cs):
                    lo = cluster * cs
                    if run_start > lo or run_start + run_length < min(lo + cs, self.file.size):
                        out.add(cluster)
        return sorted(out)

    def populate(self, guest_offset: int, buf, wanted: np.ndarray, zero: np.ndarray) -> int:
        """Fill clusters that are still unallocated with data from below (the stream and copy-on-read step).

        ``buf`` holds whole clusters starting at the cluster-aligned ``guest_offset``; ``wanted`` says which
        of them to fill and ``zero`` which of them are all zeros (they become zero clusters, never written
        zeros).  Clusters allocated meanwhile are left alone.  The caller excludes guest writes to these
        clusters (the block device's COPY range lock).  Returns the number of clusters filled.
        """
        self.file.check_writable()
        cs = self._cs
        first = guest_offset >> self._bits
        count = len(wanted)
        if guest_offset % cs or len(buf) != count * cs:
            raise OutOfRange(f"populate needs whole clusters: {guest_offset}+{len(buf)}", offset=guest_offset)
        with self.lock:
            todo = wanted & self.unallocated_clusters(first, count)
            as_zero = todo & zero if self.file.has_zero_flag else np.zeros(count, dtype=bool)
            as_data = todo & ~as_zero
            n_data = int(np.count_nonzero(as_data))
            # The L2 tables first: one that cannot be had (ENOSPC) fails the copy before any data is written.
            for l1_index in {(first + int(i)) // self._l2_entries for i in np.flatnonzero(todo)}:
                self._l2_table_for_write(l1_index)
            host = self.refcounts.allocate(n_data) if n_data else 0
        if n_data:
            try:
                self.file.pwrite_selected(buf, as_data, host)
            except BaseException:
                self.refcounts.release(range(host >> self._bits, (host >> self._bits) + n_data))
                raise
        updates = [(first + int(i), host + k * cs | fmt.OFLAG_COPIED, fmt.L2_BITMAP_ALL_ALLOC)
                   for k, i in enumerate(np.flatnonzero(as_data))]
        if self._extended:
            updates += [(first + int(i), 0, fmt.L2_BITMAP_ALL_ZERO) for i in np.flatnonzero(as_zero)]
        else:
            updates += [(first + int(i), fmt.OFLAG_ZERO, 0) for i in np.flatnonzero(as_zero)]
        if updates:
            self._commit(updates)
        return len(updates)

    # --- zero and discard ----------------------------------------------------------------------------

    def write_zeroes(self, guest_offset: int, length: int, *, may_trim: bool = True) -> None:
        """Make a range read as zeros; whole clusters become zero clusters, never written-out zeros."""
        self.file.check_writable()
        check_request(guest_offset, length, self.file.size)
        head, whole_first, whole_last, tail = self._split_whole_clusters(guest_offset, length)
        for start, count in (head, tail):
            if count:
                self._zero_partial(start, count)
        if whole_last > whole_first:
            self._set_clusters(whole_first, whole_last, zero=True, keep_allocation=not may_trim)

    def _zero_partial(self, start: int, count: int) -> None:
        if all(kind == KIND_ZERO or (kind == KIND_UNALLOCATED and self.below is None)
               for _, _, kind, _ in self.map_units(start, count)):
            return
        self.pwrite(bytes(count), start)

    def trim(self, guest_offset: int, length: int) -> None:
        """Discard whole clusters in the range (partial clusters are left as they are, as QEMU does)."""
        self.file.check_writable()
        check_request(guest_offset, length, self.file.size)
        _, whole_first, whole_last, _ = self._split_whole_clusters(guest_offset, length)
        if whole_last > whole_first:
            self._set_clusters(whole_first, whole_last, zero=False, keep_allocation=False)

    def _split_whole_clusters(self, guest_offset: int, length: int) -> tuple[tuple[int, int], int, int, tuple[int, int]]:
        """(head partial (start, len), first whole cluster, end whole cluster, tail partial (start, len)).

        The last cluster counts as whole when the range runs to the end of the disk.
        """
        cs = self._cs
        end = guest_offset + length
        first_whole = -(-guest_offset // cs)
        last_whole = end // cs if end < self.file.size else -(-end // cs)
        if last_whole <= first_whole:
            return (guest_offset, length), 0, 0, (0, 0)
        head = (guest_offset, first_whole * cs - guest_offset)
        tail_start = min(last_whole * cs, end)
        return head, first_whole, last_whole, (tail_start, end - tail_start)

    def _set_clusters(self, first: int, stop: int, *, zero: bool, keep_allocation: bool) -> None:
        """Turn whole clusters [first, stop) into zero clusters (zero=True) or discard them.

        A discarded cluster reads as zeros where something shows through from below (v3), as QEMU does.
        v2 images have no zero flag: zeroing over ``below`` writes zeros; discarding leaves them.
        """
        shows_through = self.below is not None
        if not self.file.has_zero_flag and shows_through:
            if zero:
                for cluster in range(first, stop):
                    c_start = cluster << self._bits
                    self.pwrite(bytes(min(self._cs, self.file.size - c_start)), c_start)
            return
        use_zero_flag = self.file.has_zero_flag and (shows_through or (zero and keep_allocation))
        with self.lock:
            cluster = first
            while cluster < stop:
                l1_index, l2_index = divmod(cluster, self._l2_entries)
                chunk_stop = min(stop, (l1_index + 1) * self._l2_entries)
                if not use_zero_flag and self.l2_table(l1_index) is None:
                    cluster = chunk_stop  # nothing to discard, and unallocated reads as zeros already
                    continue
                table = self._l2_table_for_write(l1_index)
                for i in range(l2_index, l2_index + chunk_stop - cluster):
                    old = int(table.view[i * self._l2_words])
                    old_host = old & fmt.L2E_OFFSET_MASK
                    # Only the zero flag makes a kept host cluster read as zeros.  Without it (v2, nothing
                    # below: the only v2 case that gets here) keeping the cluster would keep its old data,
                    # so it is released instead and the unallocated cluster reads as zeros.
                    keep = use_zero_flag and keep_allocation and old_host and not old & fmt.OFLAG_COMPRESSED
                    if keep:
                        desc = old_host | fmt.OFLAG_COPIED
                    else:
                        desc = 0
                        if old_host or old & fmt.OFLAG_COMPRESSED:
                            self._free_entry(old)
                    if self._extended:
                        table.view[2 * i] = desc
                        table.view[2 * i + 1] = fmt.L2_BITMAP_ALL_ZERO if use_zero_flag else 0
                    else:
                        table.view[i] = desc | (fmt.OFLAG_ZERO if use_zero_flag else 0)
                table.dirty = True
                cluster = chunk_stop

    # --- writing back --------------------------------------------------------------------------------

    def write_back(self, data_synced: bool) -> None:
        """Write dirty L2 tables, then the changed span of L1, durably (caller holds the lock).

        Tables are durable before the L1 entries that point at them.  ``data_synced`` False: data linked
        since the last fdatasync, which is synced first (before any L2 entry pointing at it goes out).
        """
        dirty = self.cache.dirty()
        if not dirty and not self._l1_dirty:
            return
        file = self.file
        if not data_synced:
            file.fdatasync()
        for table in dirty:
            file.pwrite(table.data, table.host_offset)
        if self._l1_dirty:
            if dirty:
                file.fdatasync()  # new L2 tables durable before the L1 entries that point at them
            first, last = self._l1_dirty
            file.pwrite(memoryview(self._l1.data)[first * 8 : (last + 1) * 8], self._l1.host_offset + first * 8)
        file.fdatasync()
        for table in dirty:
            table.dirty = False
        self._l1_dirty = None
