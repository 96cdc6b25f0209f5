"""Consistency check and repair of a qcow2 image (``qemu-img check`` semantics).

Every cluster the metadata references is counted (header, L1, refcount table and blocks, L2 tables, data
clusters, compressed extents, the snapshot table and what snapshots reference); the counts are compared with
the stored refcounts.  stored < referenced is a corruption (a cluster could be handed out twice), stored >
referenced a leak (space lost, data safe).  COPIED flags must match refcount == 1.
Repair: ``leaks`` lowers leaked refcounts; ``all`` also raises too-low ones.  Vectorised with numpy.

The order is QEMU's (``qcow2_check_refcounts``): refcounts are compared and repaired first, then COPIED flags
are checked against the refcounts as repaired, and repaired with ``all``, or with ``leaks`` when nothing
else is left wrong (fixing a flag changes no refcount).  A referenced cluster whose stored refcount is 0
needs QEMU's full refcount rebuild: ``leaks`` then refuses to repair anything and reports a check error.

The check reads and repairs the image only through the public API of its parts (``refcount.Refcounts``,
``cluster.Clusters``, ``file.ImageFile``) and the two writes of the facade that order them
(``CheckedImage``), holding the metadata lock throughout and calling its safe point between tables.
"""

from __future__ import annotations

import dataclasses
import struct
from typing import Protocol

import numpy as np

from vdisk.errors import VdiskError
from vdisk.formats.qcow2 import format as fmt
from vdisk.formats.qcow2.cluster import Clusters
from vdisk.formats.qcow2.file import ImageFile
from vdisk.formats.qcow2.refcount import Refcounts

SNAPSHOT_HEADER = struct.Struct(">QIHHIIQII")  # "Snapshot table entry", fixed part (40 bytes)
MAX_CHECK_CLUSTERS = (1 << 31) - 1  # QEMU: a file of more clusters than INT_MAX is not checked


class CheckedImage(Protocol):
    """What the check needs of an open image (``image.Qcow2Image``): its parts, and the facade's writes that
    make a repair durable in crash-safe order."""

    file: ImageFile
    refcounts: Refcounts
    clusters: Clusters

    def flush(self) -> None: ...

    def set_incompatible_features(self, features: int) -> None: ...


@dataclasses.dataclass
class CheckResult:
    filename: str
    corruptions: int = 0
    leaks: int = 0
    corruptions_fixed: int = 0
    leaks_fixed: int = 0
    check_errors: int = 0
    image_end_offset: int = 0
    total_clusters: int = 0
    allocated_clusters: int = 0
    messages: list[str] = dataclasses.field(default_factory=list)

    @property
    def exit_code(self) -> int:
        """qemu-img check's: 0 clean, 2 corruptions, 3 leaks only."""
        if self.check_errors:
            return 1
        if self.corruptions:
            return 2
        if self.leaks:
            return 3
        return 0

    def as_json(self) -> dict:
        # qemu-img leaves out image-end-offset, total-clusters and allocated-clusters when they are 0
        # (an empty image has no allocated-clusters key at all), so do we.
        out = {
            "image-end-offset": self.image_end_offset,
            "total-clusters": self.total_clusters,
            "check-errors": self.check_errors,
            "allocated-clusters": self.allocated_clusters,
            "filename": self.filename,
            "format": "qcow2",
        }
        for key in ("image-end-offset", "total-clusters", "allocated-clusters"):
            if not out[key]:
                del out[key]
        for key, value in (("corruptions", self.corruptions), ("leaks", self.leaks),
                           ("corruptions-fixed", self.corruptions_fixed), ("leaks-fixed", self.leaks_fixed)):
            if value:
                out[key] = value
        return out


def check_image(image: CheckedImage, repair: str | None = None) -> CheckResult:
    """Check ``image`` (open; read-write if repair is 'leaks' or 'all')."""
    if repair not in (None, "leaks", "all"):
        raise ValueError(f"repair must be None, 'leaks' or 'all', not {repair!r}")
    file, refcounts, clusters = image.file, image.refcounts, image.clusters
    if repair:
        file.check_writable()
    result = CheckResult(file.path)
    with file.lock:
        cs = file.cluster_size
        bits = file.cluster_bits
        file_clusters = -(-file.file_size() // cs)
        if file_clusters > MAX_CHECK_CLUSTERS:
            # QEMU's qcow2_check_refcounts refuses such a file (EFBIG), and vdisk's counts below would take
            # 8 bytes of memory per cluster: 32 GiB for 2^32 clusters.
            result.check_errors += 1
            result.messages.append(f"Check failed: File too large ({file_clusters} clusters, QEMU checks at "
                                   f"most {MAX_CHECK_CLUSTERS})")
            return result
        # The clusters compared: those of the file (and of tables the header places past its end), as QEMU's
        # check_refcounts compares them.  A refcount past the end of the file (a cluster claimed at the end
        # whose data a crash never wrote) is neither a leak nor a corruption to QEMU, so not to vdisk either.
        n = max(file_clusters, -(-refcounts.host_end // cs))
        refs: list[np.ndarray] = []

        def add_range(host: int, length: int, what: str) -> None:
            first = host >> bits
            last = (host + max(length, 1) - 1) >> bits
            if last >= n:
                result.corruptions += 1
                result.messages.append(f"ERROR {what} at {host:#x} lies past the end of the file")
                return
            refs.append(np.arange(first, last + 1, dtype=np.int64))

        def add_clusters(cluster_indices: np.ndarray, what: str) -> None:
            past = cluster_indices >= n
            if past.any():
                result.corruptions += int(np.count_nonzero(past))
                result.messages.append(f"ERROR {what} lies past the end of the file")
            refs.append(cluster_indices[~past])

        add_range.clusters = add_clusters  # type: ignore[attr-defined]

        add_range(0, cs, "header")
        h = file.header
        add_range(h.l1_table_offset, h.l1_size * 8, "L1 table")
        add_range(*refcounts.table_extent(), "refcount table")
        for block_host in refcounts.block_offsets().tolist():
            if block_host:
                add_range(block_host, cs, "refcount block")
        allocated = _count_l1(clusters, clusters.l1_entries(), add_range, result, active=True)
        result.allocated_clusters = allocated
        if h.nb_snapshots:
            _count_snapshots(clusters, add_range, result)

        expected = np.bincount(np.concatenate(refs) if refs else np.zeros(0, np.int64), minlength=n)
        stored = refcounts.stored_refcounts(n)
        low = np.flatnonzero(stored < expected)
        high = np.flatnonzero(stored > expected)
        for i in low[:20]:
            result.messages.append(f"ERROR cluster {i} refcount={stored[i]} reference={expected[i]}")
        for i in high[:20]:
            result.messages.append(f"Leaked cluster {i} refcount={stored[i]} reference={expected[i]}")
        result.corruptions += int(low.size)
        result.leaks += int(high.size)
        used = np.flatnonzero(np.maximum(stored, expected))
        result.image_end_offset = (int(used[-1]) + 1) * cs if used.size else cs
        result.total_clusters = -(-h.size // cs)

        needs_rebuild = bool(np.count_nonzero(stored[low] == 0))
        if repair == "leaks" and needs_rebuild:
            result.check_errors += 1
            result.messages.append("ERROR need to rebuild refcount structures")
            repair = None
        current = stored
        if repair:
            # A count the refcount width cannot hold stays a corruption, as in QEMU ("ERROR: overflow cluster
            # offset=...": amend or convert the image); it must not escape as an OverflowError.
            overflow = low[expected[low] > min((1 << h.refcount_bits) - 1, np.iinfo(np.int64).max)]
            for i in overflow[:20]:
                result.messages.append(f"ERROR overflow cluster {i} reference={expected[i]} exceeds "
                                       f"{h.refcount_bits}-bit refcounts")
            low = np.setdiff1d(low, overflow)
            fix = np.concatenate((high, low if repair == "all" else low[:0]))
            refcounts.repair(fix, expected[fix])
            current = stored.copy()
            current[fix] = expected[fix]
            result.leaks_fixed = int(high.size)
            result.leaks -= int(high.size)
            if repair == "all":
                result.corruptions_fixed = int(low.size)
                result.corruptions -= int(low.size)
        fix_copied = repair == "all" or (
            repair == "leaks" and not (result.corruptions or result.leaks or result.check_errors)
        )
        _check_copied(clusters, current, result, fix_copied)
        if repair:
            image.flush()
            if not result.check_errors and not result.corruptions:
                _mark_clean_and_consistent(image)
    return result


def _mark_clean_and_consistent(image: CheckedImage) -> None:
    """After a successful repair, clear the dirty and corrupt bits (QEMU's qcow2_mark_clean/_consistent)."""
    h = image.file.header
    bits = h.incompatible_features & ~(fmt.INCOMPAT_DIRTY | fmt.INCOMPAT_CORRUPT)
    if bits != h.incompatible_features and h.version >= 3:
        image.set_incompatible_features(bits)


def _check_copied(clusters: Clusters, refcounts: np.ndarray, result: CheckResult, repair: bool) -> None:
    """COPIED must be set exactly where the refcount is 1: L1 entries (L2 tables) and L2 entries (data)."""
    file = clusters.file
    bits = file.cluster_bits

    def refcount_of(host: np.ndarray) -> np.ndarray:
        clusters = (host >> np.uint64(bits)).astype(np.int64)
        inside = clusters < len(refcounts)
        return np.where(inside, refcounts[np.minimum(clusters, len(refcounts) - 1)], 0)

    for l1_index, entry in enumerate(clusters.l1_entries().astype(np.uint64).tolist()):
        l2_host = entry & fmt.L1E_OFFSET_MASK
        if not l2_host or l2_host % file.cluster_size:
            continue
        refcount = int(refcount_of(np.array([l2_host], dtype=np.uint64))[0])
        if bool(entry & fmt.OFLAG_COPIED) != (refcount == 1):
            result.messages.append(f"{'Repairing' if repair else 'ERROR'} OFLAG_COPIED L2 cluster: "
                                   f"l1_index={l1_index} l1_entry={entry:x} refcount={refcount}")
            if repair:
                clusters.set_l1_entry(l1_index, entry | fmt.OFLAG_COPIED if refcount == 1 else entry & ~fmt.OFLAG_COPIED)
                result.corruptions_fixed += 1
            else:
                result.corruptions += 1
        try:
            table = clusters.l2_table(l1_index)
        except VdiskError:  # unreadable: already counted as a check error by _count_l1
            continue
        if table is None:
            continue
        descs = table.view[0 :: file.l2_words].astype(np.uint64)
        hosts = descs & np.uint64(fmt.L2E_OFFSET_MASK)
        normal = ((descs & np.uint64(fmt.OFLAG_COMPRESSED)) == 0) & (hosts != 0)
        normal &= (hosts % np.uint64(file.cluster_size)) == 0
        copied = (descs & np.uint64(fmt.OFLAG_COPIED)) != 0
        wrong = np.flatnonzero(normal & (copied != (refcount_of(hosts) == 1)))
        for i in wrong.tolist():
            desc = int(descs[i])
            refcount = int(refcount_of(hosts[i : i + 1])[0])
            result.messages.append(f"{'Repairing' if repair else 'ERROR'} OFLAG_COPIED data cluster: "
                                   f"l2_entry={desc:x} refcount={refcount}")
            if repair:
                table.view[i * file.l2_words] = desc | fmt.OFLAG_COPIED if refcount == 1 else desc & ~fmt.OFLAG_COPIED
                table.dirty = True
                result.corruptions_fixed += 1
            else:
                result.corruptions += 1
        file.lock.safe_point()  # this table is done with


def _count_l1(clusters: Clusters, l1: np.ndarray, add_range, result: CheckResult, *, active: bool) -> int:
    """Count the L2 tables and data clusters an L1 table references; returns guest clusters allocated.

    ``active``: the image's own L1 table (its L2 tables go through the image's cache), not a snapshot's.
    """
    file = clusters.file
    cs = file.cluster_size
    allocated = 0
    for l1_index, entry in enumerate(l1.astype(np.uint64).tolist()):
        l2_host = entry & fmt.L1E_OFFSET_MASK
        if not l2_host:
            continue
        if l2_host % cs:
            result.corruptions += 1
            result.messages.append(f"ERROR l1[{l1_index}] L2 offset {l2_host:#x} unaligned")
            continue
        add_range(l2_host, cs, "L2 table")
        try:
            table = clusters.l2_table(l1_index) if active else clusters.load_l2(l2_host, l1_index)
        except Exception as exc:  # a table we cannot even read is one check error, as in QEMU
            result.check_errors += 1
            result.messages.append(f"ERROR reading L2 table of l1[{l1_index}]: {exc}")
            continue
        descs = table.view[0 :: file.l2_words].astype(np.uint64)
        compressed = (descs & np.uint64(fmt.OFLAG_COMPRESSED)) != 0
        hosts = descs & np.uint64(fmt.L2E_OFFSET_MASK)
        normal = ~compressed & (hosts != 0)
        allocated += int(np.count_nonzero(compressed | normal))
        bad = normal & ((hosts % np.uint64(cs)) != 0)
        for i in np.flatnonzero(bad)[:5]:
            result.messages.append(f"ERROR l2 entry {i} of l1[{l1_index}]: offset {int(hosts[i]):#x} unaligned")
        result.corruptions += int(np.count_nonzero(bad))
        add_range.clusters((hosts[normal & ~bad] >> np.uint64(file.cluster_bits)).astype(np.int64), "data cluster")
        for desc in descs[compressed].tolist():
            host, length = fmt.compressed_extent(desc, file.cluster_bits)
            add_range(host, length, "compressed cluster")
        file.lock.safe_point()  # this table is done with
    return allocated


def _count_snapshots(clusters: Clusters, add_range, result: CheckResult) -> None:
    file = clusters.file
    h = file.header
    offset = h.snapshots_offset
    start = offset
    for _ in range(h.nb_snapshots):
        raw = file.pread(SNAPSHOT_HEADER.size, offset)
        l1_offset, l1_size, id_len, name_len, _, _, _, _, extra = SNAPSHOT_HEADER.unpack(raw)
        offset += SNAPSHOT_HEADER.size + extra + id_len + name_len
        offset += -offset % 8
        if l1_size * 8 > fmt.MAX_L1_BYTES or l1_offset % file.cluster_size:
            result.corruptions += 1
            result.messages.append(f"ERROR snapshot L1 table at {l1_offset:#x} invalid")
            continue
        add_range(l1_offset, l1_size * 8, "snapshot L1 table")
        l1 = np.frombuffer(file.pread(l1_size * 8, l1_offset), dtype=">u8")
        _count_l1(clusters, l1, add_range, result, active=False)
    add_range(start, offset - start, "snapshot table")

