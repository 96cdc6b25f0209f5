"""The qcow2 on-disk format: every magic, flag, limit and struct in one place.  No I/O.

Spec: qemu ``docs/interop/qcow2.txt``.  Section names below refer to it.  Limits marked "QEMU" are the
ones QEMU's ``block/qcow2.c`` enforces on open; we refuse the same images with a :class:`FormatError`
that names the field, before any table is allocated.
"""

from __future__ import annotations

import dataclasses
import struct

from vdisk.errors import FormatError, UnsupportedFeature

# --- "Header" --------------------------------------------------------------------------------------

MAGIC = b"QFI\xfb"
HEADER_V2 = struct.Struct(">4sIQIIQIIQQIIQ")  # bytes 0..71
HEADER_V2_LENGTH = HEADER_V2.size  # 72
HEADER_V3_EXTRA = struct.Struct(">QQQII")  # bytes 72..103
HEADER_V3_MIN_LENGTH = 104
HEADER_V3_LENGTH = 112  # with compression_type (byte 104) and padding to 8
COMPRESSION_TYPE_OFFSET = 104

# Byte offsets of fields we rewrite in place.
OFFSET_BACKING_FILE = 8  # backing_file_offset (u64) + backing_file_size (u32)
BACKING_POINTER = struct.Struct(">QI")
OFFSET_REFCOUNT_TABLE = 48  # refcount_table_offset (u64) + refcount_table_clusters (u32)
REFCOUNT_TABLE_POINTER = struct.Struct(">QI")
OFFSET_INCOMPATIBLE_FEATURES = 72
OFFSET_AUTOCLEAR_FEATURES = 88
U64 = struct.Struct(">Q")

# incompatible_features bits
INCOMPAT_DIRTY = 1 << 0
INCOMPAT_CORRUPT = 1 << 1
INCOMPAT_DATA_FILE = 1 << 2
INCOMPAT_COMPRESSION = 1 << 3
INCOMPAT_EXTL2 = 1 << 4
INCOMPAT_KNOWN = INCOMPAT_DIRTY | INCOMPAT_CORRUPT | INCOMPAT_DATA_FILE | INCOMPAT_COMPRESSION | INCOMPAT_EXTL2
# Bits we can open.  An external data file changes where every data cluster lives: refused.
INCOMPAT_SUPPORTED = INCOMPAT_DIRTY | INCOMPAT_CORRUPT | INCOMPAT_COMPRESSION | INCOMPAT_EXTL2

COMPAT_LAZY_REFCOUNTS = 1 << 0
AUTOCLEAR_BITMAPS = 1 << 0
AUTOCLEAR_DATA_FILE_RAW = 1 << 1
# We do not maintain bitmaps, so a read-write open clears every autoclear bit (the spec's rule for unknown
# bits applies to bitmaps too: QEMU then knows the bitmaps are stale).
AUTOCLEAR_KEPT: int = 0

COMPRESSION_ZLIB = 0
COMPRESSION_ZSTD = 1
COMPRESSION_NAMES = {COMPRESSION_ZLIB: "zlib", COMPRESSION_ZSTD: "zstd"}

CRYPT_NONE = 0

# --- "Header extensions" ---------------------------------------------------------------------------

EXTENSION_HEADER = struct.Struct(">II")
EXT_END = 0x00000000
EXT_BACKING_FORMAT = 0xE2792ACA
EXT_FEATURE_NAME_TABLE = 0x6803F857
EXT_BITMAPS = 0x23852875
EXT_FULL_DISK_ENCRYPTION = 0x0537BE77
EXT_EXTERNAL_DATA_FILE = 0x44415441
FEATURE_NAME_ENTRY = struct.Struct(">BB46s")
FEATURE_TYPE_INCOMPATIBLE, FEATURE_TYPE_COMPATIBLE, FEATURE_TYPE_AUTOCLEAR = 0, 1, 2

# --- limits (QEMU's, block/qcow2.h) ----------------------------------------------------------------

MIN_CLUSTER_BITS = 9
MAX_CLUSTER_BITS = 21
MAX_REFCOUNT_ORDER = 6
MAX_BACKING_FILE_NAME = 1023
MAX_L1_BYTES = 32 * 1024 * 1024  # QCOW_MAX_L1_SIZE
MAX_REFCOUNT_TABLE_BYTES = 8 * 1024 * 1024  # QCOW_MAX_REFTABLE_SIZE
MAX_HOST_OFFSET = 1 << 56  # offsets live in bits 9..55
# QEMU's block layer limit (BDRV_MAX_LENGTH: INT64_MAX aligned down to 1 GiB).  qcow2 sets no other: the
# real bound is the 32 MiB L1 table, (4 Mi entries) * (cluster_size / 8) * cluster_size, from 128 GiB for
# 512-byte clusters to 2 EiB for 2 MiB clusters, all below this one.
MAX_VIRTUAL_SIZE = (1 << 63) - (1 << 30)
SECTOR = 512

# --- "Cluster mapping" -----------------------------------------------------------------------------

L1E_OFFSET_MASK = 0x00FFFFFFFFFFFE00
L1E_RESERVED_MASK = 0x7F000000000001FF
L2E_OFFSET_MASK = 0x00FFFFFFFFFFFE00
L2E_RESERVED_MASK = 0x3F000000000001FE  # bits 1..8 and 56..61 of a standard descriptor
OFLAG_COPIED = 1 << 63
OFLAG_COMPRESSED = 1 << 62
OFLAG_ZERO = 1 << 0
REFT_OFFSET_MASK = 0xFFFFFFFFFFFFFE00
REFT_RESERVED_MASK = 0x1FF

# Extended L2 ("Extended L2 Entries"): 32 subclusters; bitmap word = alloc bits 0..31, zero bits 32..63.
SUBCLUSTERS_PER_CLUSTER = 32
L2_BITMAP_ALL_ALLOC = (1 << 32) - 1
L2_BITMAP_ALL_ZERO = L2_BITMAP_ALL_ALLOC << 32

def compressed_layout(cluster_bits: int) -> tuple[int, int, int]:
    """(offset mask, size shift, size mask) of a compressed cluster descriptor for this cluster size."""
    csize_shift = 62 - (cluster_bits - 8)
    csize_mask = (1 << (cluster_bits - 8)) - 1
    return (1 << csize_shift) - 1, csize_shift, csize_mask


def compressed_extent(entry: int, cluster_bits: int) -> tuple[int, int]:
    """(host offset, byte count) of the compressed data an L2 entry names."""
    offset_mask, csize_shift, csize_mask = compressed_layout(cluster_bits)
    host_offset = entry & offset_mask
    sectors = ((entry >> csize_shift) & csize_mask) + 1
    return host_offset, sectors * SECTOR - (host_offset & (SECTOR - 1))


@dataclasses.dataclass
class Header:
    """The fixed header and what its extensions say, as parsed from the first cluster of an image."""

    version: int
    backing_file_offset: int
    backing_file_size: int
    cluster_bits: int
    size: int
    crypt_method: int
    l1_size: int
    l1_table_offset: int
    refcount_table_offset: int
    refcount_table_clusters: int
    nb_snapshots: int
    snapshots_offset: int
    incompatible_features: int = 0
    compatible_features: int = 0
    autoclear_features: int = 0
    refcount_order: int = 4
    header_length: int = HEADER_V2_LENGTH
    compression_type: int = COMPRESSION_ZLIB
    backing_file: str | None = None
    backing_format: str | None = None
    feature_names: dict[tuple[int, int], str] = dataclasses.field(default_factory=dict)
    extensions: list[tuple[int, bytes]] = dataclasses.field(default_factory=list)

    @property
    def cluster_size(self) -> int:
        return 1 << self.cluster_bits

    @property
    def extended_l2(self) -> bool:
        return bool(self.incompatible_features & INCOMPAT_EXTL2)

    @property
    def l2_entry_bytes(self) -> int:
        return 16 if self.extended_l2 else 8

    @property
    def l2_entries(self) -> int:
        return self.cluster_size // self.l2_entry_bytes

    @property
    def refcount_bits(self) -> int:
        return 1 << self.refcount_order

    def pack(self) -> bytes:
        """The header and its extensions, as they stand at offset 0 (backing name excluded)."""
        fixed = HEADER_V2.pack(
            MAGIC,
            self.version,
            self.backing_file_offset,
            self.backing_file_size,
            self.cluster_bits,
            self.size,
            self.crypt_method,
            self.l1_size,
            self.l1_table_offset,
            self.refcount_table_offset,
            self.refcount_table_clusters,
            self.nb_snapshots,
            self.snapshots_offset,
        )
        if self.version >= 3:
            fixed += HEADER_V3_EXTRA.pack(
                self.incompatible_features,
                self.compatible_features,
                self.autoclear_features,
                self.refcount_order,
                self.header_length,
            )
            if self.header_length > HEADER_V3_MIN_LENGTH:
                fixed += bytes([self.compression_type]).ljust(self.header_length - HEADER_V3_MIN_LENGTH, b"\0")
        out = bytearray(fixed)
        for ext_type, data in self.extensions:
            out += EXTENSION_HEADER.pack(ext_type, len(data)) + data + b"\0" * (-len(data) % 8)
        out += EXTENSION_HEADER.pack(EXT_END, 0)
        return bytes(out)


def build_extensions(backing_format: str | None, feature_names: bool = True) -> list[tuple[int, bytes]]:
    """The header extensions vdisk writes: backing format, and QEMU's feature name table."""
    extensions: list[tuple[int, bytes]] = []
    if backing_format:
        extensions.append((EXT_BACKING_FORMAT, backing_format.encode()))
    if feature_names:
        names = [
            (FEATURE_TYPE_INCOMPATIBLE, 0, b"dirty bit"),
            (FEATURE_TYPE_INCOMPATIBLE, 1, b"corrupt bit"),
            (FEATURE_TYPE_INCOMPATIBLE, 2, b"external data file"),
            (FEATURE_TYPE_INCOMPATIBLE, 3, b"compression type"),
            (FEATURE_TYPE_INCOMPATIBLE, 4, b"extended L2 entries"),
            (FEATURE_TYPE_COMPATIBLE, 0, b"lazy refcounts"),
            (FEATURE_TYPE_AUTOCLEAR, 0, b"bitmaps"),
            (FEATURE_TYPE_AUTOCLEAR, 1, b"raw external data"),
        ]
        extensions.append((EXT_FEATURE_NAME_TABLE, b"".join(FEATURE_NAME_ENTRY.pack(*n) for n in names)))
    return extensions


def parse_header(first: bytes, *, path: str | None = None, file_size: int | None = None) -> Header:
    """Parse and validate a header from the image's first bytes (at least one cluster, or the whole file).

    Raises FormatError naming the field for every limit QEMU checks; UnsupportedFeature for valid images
    that use what vdisk refuses.  Table contents are checked later, by the image, as they are read.
    """

    def bad(message: str, field: str, offset: int | None = None) -> FormatError:
        return FormatError(message, path=path, field=field, offset=offset)

    if len(first) < HEADER_V2_LENGTH:
        raise bad(f"file too short for a qcow2 header ({len(first)} bytes)", "magic", 0)
    fields = HEADER_V2.unpack_from(first, 0)
    if fields[0] != MAGIC:
        raise bad("not a qcow2 image: bad magic", "magic", 0)
    h = Header(*fields[1:])
    if h.version not in (2, 3):
        raise UnsupportedFeature(f"qcow2 version {h.version} is not supported", path=path, field="version", offset=4)
    if not MIN_CLUSTER_BITS <= h.cluster_bits <= MAX_CLUSTER_BITS:
        raise bad(f"cluster_bits {h.cluster_bits} outside {MIN_CLUSTER_BITS}..{MAX_CLUSTER_BITS}", "cluster_bits", 20)
    cs = h.cluster_size
    if h.version >= 3:
        if len(first) < HEADER_V3_MIN_LENGTH:
            raise bad("file too short for a version 3 header", "header_length", 100)
        (
            h.incompatible_features,
            h.compatible_features,
            h.autoclear_features,
            h.refcount_order,
            h.header_length,
        ) = HEADER_V3_EXTRA.unpack_from(first, HEADER_V2_LENGTH)
        if h.header_length < HEADER_V3_MIN_LENGTH:
            raise bad(f"header_length {h.header_length} below {HEADER_V3_MIN_LENGTH}", "header_length", 100)
        if h.header_length > cs:
            raise bad(f"header_length {h.header_length} larger than the cluster size {cs}", "header_length", 100)
        if h.header_length > COMPRESSION_TYPE_OFFSET:
            if len(first) <= COMPRESSION_TYPE_OFFSET:
                raise bad("file too short for compression_type", "compression_type", COMPRESSION_TYPE_OFFSET)
            h.compression_type = first[COMPRESSION_TYPE_OFFSET]
    if h.refcount_order > MAX_REFCOUNT_ORDER:
        raise bad(f"refcount_order {h.refcount_order} above {MAX_REFCOUNT_ORDER}", "refcount_order", 96)
    if h.size > MAX_VIRTUAL_SIZE:
        raise bad(f"virtual size {h.size} above the limit {MAX_VIRTUAL_SIZE}", "size", 24)
    if h.crypt_method != CRYPT_NONE:
        raise UnsupportedFeature("encrypted images are not supported", path=path, field="crypt_method", offset=32)

    # Extensions: between the header and the end of the first cluster (or the backing name).
    ext_end = cs
    if h.backing_file_offset and h.backing_file_offset < ext_end:
        ext_end = h.backing_file_offset
    _parse_extensions(h, first, h.header_length, min(ext_end, len(first)), path)

    unknown_incompat = h.incompatible_features & ~INCOMPAT_KNOWN
    if unknown_incompat:
        raise UnsupportedFeature(
            f"unknown incompatible feature bits {_feature_list(h, FEATURE_TYPE_INCOMPATIBLE, unknown_incompat)}",
            path=path,
            field="incompatible_features",
            offset=OFFSET_INCOMPATIBLE_FEATURES,
        )
    unsupported = h.incompatible_features & ~INCOMPAT_SUPPORTED
    if unsupported:
        raise UnsupportedFeature(
            f"unsupported incompatible features {_feature_list(h, FEATURE_TYPE_INCOMPATIBLE, unsupported)}",
            path=path,
            field="incompatible_features",
            offset=OFFSET_INCOMPATIBLE_FEATURES,
        )
    if h.compression_type not in COMPRESSION_NAMES:
        raise UnsupportedFeature(
            f"unknown compression_type {h.compression_type}", path=path, field="compression_type", offset=104
        )
    if h.compression_type != COMPRESSION_ZLIB and not h.incompatible_features & INCOMPAT_COMPRESSION:
        raise bad("compression_type set without the compression type feature bit", "compression_type", 104)
    if h.extended_l2 and h.cluster_bits < 14:
        raise bad("extended L2 entries need clusters of at least 16 KiB", "cluster_bits", 20)

    # Tables: sizes first (so nothing huge is allocated), then alignment and placement.
    if h.l1_size * 8 > MAX_L1_BYTES:
        raise bad(f"L1 table of {h.l1_size} entries exceeds {MAX_L1_BYTES} bytes", "l1_size", 36)
    entries_per_l2 = h.l2_entries
    needed_l1 = -(-h.size // (entries_per_l2 * cs))
    if h.l1_size < needed_l1:
        raise bad(f"L1 table too small: {h.l1_size} entries for {needed_l1} needed", "l1_size", 36)
    if h.refcount_table_clusters * cs > MAX_REFCOUNT_TABLE_BYTES:
        raise bad(
            f"refcount table of {h.refcount_table_clusters} clusters exceeds {MAX_REFCOUNT_TABLE_BYTES} bytes",
            "refcount_table_clusters",
            56,
        )
    if h.refcount_table_clusters == 0:
        raise bad("image has no refcount table", "refcount_table_clusters", 56)
    _check_table_offset(h.l1_table_offset, h.l1_size * 8, cs, "l1_table_offset", 40, path, file_size)
    _check_table_offset(
        h.refcount_table_offset, h.refcount_table_clusters * cs, cs, "refcount_table_offset", 48, path, file_size
    )
    if h.nb_snapshots:
        _check_table_offset(h.snapshots_offset, 1, cs, "snapshots_offset", 64, path, file_size)

    if h.backing_file_offset:
        if h.backing_file_offset > cs or h.backing_file_offset + h.backing_file_size > cs:
            raise bad("backing file name lies outside the first cluster", "backing_file_offset", 8)
        if h.backing_file_size > MAX_BACKING_FILE_NAME:
            raise bad(
                f"backing file name of {h.backing_file_size} bytes exceeds {MAX_BACKING_FILE_NAME}",
                "backing_file_size",
                16,
            )
        end = h.backing_file_offset + h.backing_file_size
        if end > len(first):
            raise bad("file too short for the backing file name", "backing_file_offset", 8)
        raw = first[h.backing_file_offset : end]
        try:
            h.backing_file = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise bad("backing file name is not UTF-8", "backing_file_offset", h.backing_file_offset) from exc
        if "\0" in h.backing_file:
            raise bad("backing file name contains a NUL byte", "backing_file_offset", h.backing_file_offset)
    return h


def _check_table_offset(
    offset: int, length: int, cluster_size: int, field: str, field_offset: int, path: str | None, file_size: int | None
) -> None:
    if offset % cluster_size:
        raise FormatError(f"{field} {offset:#x} not aligned to a cluster", path=path, field=field, offset=field_offset)
    if offset == 0 and length:
        raise FormatError(f"{field} is 0: the table would overlap the header", path=path, field=field, offset=field_offset)
    if offset + length > MAX_HOST_OFFSET:
        raise FormatError(f"{field} {offset:#x} beyond 2^56", path=path, field=field, offset=field_offset)
    if file_size is not None and offset + length > file_size and length:
        raise FormatError(
            f"{field} {offset:#x}+{length} lies past the end of the file ({file_size} bytes)",
            path=path,
            field=field,
            offset=field_offset,
        )


def _parse_extensions(h: Header, data: bytes, start: int, end: int, path: str | None) -> None:
    offset = start
    while True:
        if offset + EXTENSION_HEADER.size > end:
            raise FormatError("header extensions run past their area", path=path, field="extension", offset=offset)
        ext_type, length = EXTENSION_HEADER.unpack_from(data, offset)
        offset += EXTENSION_HEADER.size
        if ext_type == EXT_END:
            return
        if length > end - offset:
            raise FormatError(
                f"header extension {ext_type:#x} of {length} bytes runs past its area",
                path=path,
                field="extension",
                offset=offset - 8,
            )
        payload = bytes(data[offset : offset + length])
        if ext_type == EXT_BACKING_FORMAT:
            try:
                h.backing_format = payload.decode("ascii").rstrip("\0")
            except UnicodeDecodeError as exc:
                raise FormatError("backing format is not ASCII", path=path, field="extension", offset=offset) from exc
        elif ext_type == EXT_FEATURE_NAME_TABLE:
            for i in range(length // FEATURE_NAME_ENTRY.size):
                kind, bit, name = FEATURE_NAME_ENTRY.unpack_from(payload, i * FEATURE_NAME_ENTRY.size)
                h.feature_names[(kind, bit)] = name.rstrip(b"\0").decode("utf-8", "replace")
        else:
            h.extensions.append((ext_type, payload))
        offset += length + (-length % 8)


def _feature_list(h: Header, kind: int, bits: int) -> str:
    names = []
    for bit in range(64):
        if bits & (1 << bit):
            name = h.feature_names.get((kind, bit))
            names.append(f"{bit} ({name})" if name else str(bit))
    return ", ".join(names)
