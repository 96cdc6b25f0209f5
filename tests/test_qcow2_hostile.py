"""Hostile qcow2 images: every limit QEMU checks on open gives our own error, naming the field, quickly.

Each case starts from an image made by ``qemu-img`` and patches header or table bytes with ``struct``.
Opening (and reading the whole disk, for cases in the tables) must raise a ``vdisk.errors`` exception whose
message names the field, within a second: never an IndexError, a MemoryError or a hang.  ``vdisk info`` on
the header cases prints one line to stderr and exits 1.  The dirty and autoclear bits are honoured the way
QEMU honours them.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import struct
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.support.commands import run, vdisk, vdisk_main
from tests.support.images import assert_clean, qemu_img_check, qemu_raw
from vdisk import errors
from vdisk.block.chain import MAX_CHAIN_DEPTH, open_chain
from vdisk.formats.qcow2 import format as fmt
from vdisk.formats.qcow2.image import Qcow2Image

pytestmark = pytest.mark.timeout(60)

KiB = 1024
MiB = 1024 * KiB
CLUSTER = 64 * KiB
TOP_SIZE = 1 * MiB

# Header field offsets ("Header" in docs/interop/qcow2.txt).
MAGIC, VERSION, BACKING_OFFSET, BACKING_SIZE, CLUSTER_BITS = 0, 4, 8, 16, 20
VIRTUAL_SIZE, CRYPT_METHOD, L1_SIZE, L1_OFFSET = 24, 32, 36, 40
REFTABLE_OFFSET, REFTABLE_CLUSTERS, NB_SNAPSHOTS, SNAPSHOTS_OFFSET = 48, 56, 60, 64
INCOMPAT, AUTOCLEAR, REFCOUNT_ORDER, HEADER_LENGTH = 72, 88, 96, 100


# --- images to spoil --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def templates(tmp_path_factory) -> Path:
    """base.qcow2 <- top.qcow2 (relative name, backing format extension), by qemu-img; top has data at 0."""
    d = tmp_path_factory.mktemp("templates")
    run("qemu-img", "create", "-q", "-f", "qcow2", d / "base.qcow2", str(TOP_SIZE))
    run("qemu-io", "-c", "write -P 0x5a 0 1M", d / "base.qcow2")
    run("qemu-img", "create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", d / "top.qcow2", str(TOP_SIZE))
    run("qemu-io", "-c", "write -P 0x11 0 64k", "-c", "write -c -P 0x22 128k 64k", d / "top.qcow2")
    return d


@pytest.fixture
def image(templates: Path, tmp_path: Path) -> Path:
    """A private copy of the templates; returns the top image, ready to be patched."""
    for name in ("base.qcow2", "top.qcow2"):
        shutil.copy(templates / name, tmp_path / name)
    return tmp_path / "top.qcow2"


def patch(path: Path, offset: int, fmt_string: str, *values) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(struct.pack(fmt_string, *values))


def read_u64(path: Path, offset: int) -> int:
    with open(path, "rb") as f:
        f.seek(offset)
        return struct.unpack(">Q", f.read(8))[0]


def read_u32(path: Path, offset: int) -> int:
    with open(path, "rb") as f:
        f.seek(offset)
        return struct.unpack(">I", f.read(4))[0]


def extensions(path: Path) -> dict[int, int]:
    """Header extension type -> file offset of its 8-byte (type, length) header."""
    data = path.read_bytes()[:CLUSTER]
    offset = struct.unpack_from(">I", data, HEADER_LENGTH)[0]
    found = {}
    while True:
        ext_type, length = struct.unpack_from(">II", data, offset)
        if ext_type == 0:
            return found
        found[ext_type] = offset
        offset += 8 + length + (-length % 8)


def l2_table_offset(path: Path) -> int:
    return read_u64(path, read_u64(path, L1_OFFSET)) & fmt.L1E_OFFSET_MASK


def set_refcount(path: Path, cluster_index: int, value: int) -> None:
    """Patch a 16-bit refcount (qemu-img's default width) in place."""
    reftable = read_u64(path, REFTABLE_OFFSET)
    per_block = CLUSTER // 2
    block = read_u64(path, reftable + 8 * (cluster_index // per_block)) & fmt.REFT_OFFSET_MASK
    patch(path, block + 2 * (cluster_index % per_block), ">H", value)


def get_refcount(path: Path, cluster_index: int) -> int:
    reftable = read_u64(path, REFTABLE_OFFSET)
    per_block = CLUSTER // 2
    block = read_u64(path, reftable + 8 * (cluster_index // per_block)) & fmt.REFT_OFFSET_MASK
    with open(path, "rb") as f:
        f.seek(block + 2 * (cluster_index % per_block))
        return struct.unpack(">H", f.read(2))[0]


# --- the table ------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Case:
    id: str
    spoil: Callable[[Path], None]
    error: type[errors.VdiskError]
    names: tuple[str, ...]  # each must appear in the message
    at_open: bool = True  # False: the open succeeds, reading the tables fails


def _feature_table_entry(path: Path, bit: int) -> int:
    """File offset of the feature name table entry (incompatible, bit)."""
    ext = extensions(path)[fmt.EXT_FEATURE_NAME_TABLE]
    length = read_u32(path, ext + 4)
    for i in range(length // 48):
        entry = ext + 8 + 48 * i
        with open(path, "rb") as f:
            f.seek(entry)
            kind, entry_bit = f.read(2)
        if (kind, entry_bit) == (fmt.FEATURE_TYPE_INCOMPATIBLE, bit):
            return entry
    raise AssertionError(f"no feature name for incompatible bit {bit}")


def _named_unknown_bit(path: Path) -> None:
    # Rename QEMU's "extended L2 entries" entry to bit 10 and set bit 10: the message must use the name.
    patch(path, _feature_table_entry(path, 4) + 1, ">B", 10)
    patch(path, INCOMPAT, ">Q", 1 << 10)


def _l1_entry_past_eof(path: Path) -> None:
    patch(path, read_u64(path, L1_OFFSET), ">Q", fmt.OFLAG_COPIED | 256 * MiB)


def _l1_entry_unaligned(path: Path) -> None:
    patch(path, read_u64(path, L1_OFFSET), ">Q", fmt.OFLAG_COPIED | (l2_table_offset(path) + 512))


def _l1_entry_reserved_bits(path: Path) -> None:
    patch(path, read_u64(path, L1_OFFSET), ">Q", fmt.OFLAG_COPIED | (1 << 60) | l2_table_offset(path))


def _l2_entry_unaligned(path: Path) -> None:
    l2 = l2_table_offset(path)
    patch(path, l2, ">Q", read_u64(path, l2) + 512)


def _compressed_garbage(path: Path) -> None:
    entry = read_u64(path, l2_table_offset(path) + 8 * 2)  # guest cluster 2 (128k) was written compressed
    assert entry & fmt.OFLAG_COMPRESSED
    host, length = fmt.compressed_extent(entry, 16)
    patch(path, host, f"{length}s", b"\xff" * length)


def _reftable_entry_unaligned(path: Path) -> None:
    reftable = read_u64(path, REFTABLE_OFFSET)
    patch(path, reftable, ">Q", read_u64(path, reftable) + 512)


def _backing_name_outside_cluster(path: Path) -> None:
    patch(path, BACKING_OFFSET, ">Q", CLUSTER - 4)  # the 11-byte name would cross into the second cluster


def _extension_past_cluster(path: Path) -> None:
    ext = extensions(path)[fmt.EXT_FEATURE_NAME_TABLE]
    patch(path, ext + 4, ">I", CLUSTER)


CASES = [
    Case("bad-magic", lambda p: patch(p, MAGIC, "4s", b"QFI\0"), errors.FormatError, ("magic",)),
    Case("version-4", lambda p: patch(p, VERSION, ">I", 4), errors.UnsupportedFeature, ("version", "4")),
    Case("version-1", lambda p: patch(p, VERSION, ">I", 1), errors.UnsupportedFeature, ("version", "1")),
    Case("cluster-bits-8", lambda p: patch(p, CLUSTER_BITS, ">I", 8), errors.FormatError, ("cluster_bits", "8")),
    Case("cluster-bits-22", lambda p: patch(p, CLUSTER_BITS, ">I", 22), errors.FormatError, ("cluster_bits", "22")),
    Case("refcount-order-7", lambda p: patch(p, REFCOUNT_ORDER, ">I", 7), errors.FormatError,
         ("refcount_order", "7")),
    Case("l1-over-32MiB", lambda p: patch(p, L1_SIZE, ">I", 32 * MiB // 8 + 1), errors.FormatError, ("l1_size",)),
    Case("l1-too-small", lambda p: patch(p, L1_SIZE, ">I", 0), errors.FormatError, ("l1_size",)),
    Case("virtual-size-huge", lambda p: patch(p, VIRTUAL_SIZE, ">Q", 1 << 62), errors.FormatError, ("size",)),
    Case("reftable-over-8MiB", lambda p: patch(p, REFTABLE_CLUSTERS, ">I", 8 * MiB // CLUSTER + 1),
         errors.FormatError, ("refcount_table_clusters",)),
    Case("reftable-empty", lambda p: patch(p, REFTABLE_CLUSTERS, ">I", 0), errors.FormatError,
         ("refcount_table_clusters",)),
    Case("header-length-too-small", lambda p: patch(p, HEADER_LENGTH, ">I", 100), errors.FormatError,
         ("header_length",)),
    Case("header-length-over-cluster", lambda p: patch(p, HEADER_LENGTH, ">I", CLUSTER + 8), errors.FormatError,
         ("header_length",)),
    Case("backing-name-1024", lambda p: patch(p, BACKING_SIZE, ">I", 1024), errors.FormatError,
         ("backing_file_size", "1023")),
    Case("backing-name-outside-cluster", _backing_name_outside_cluster, errors.FormatError,
         ("backing_file_offset",)),
    Case("extension-past-cluster", _extension_past_cluster, errors.FormatError, ("extension",)),
    Case("l1-offset-unaligned", lambda p: patch(p, L1_OFFSET, ">Q", read_u64(p, L1_OFFSET) + 8),
         errors.FormatError, ("l1_table_offset",)),
    Case("reftable-offset-unaligned", lambda p: patch(p, REFTABLE_OFFSET, ">Q", read_u64(p, REFTABLE_OFFSET) + 512),
         errors.FormatError, ("refcount_table_offset",)),
    Case("l1-offset-beyond-2^56", lambda p: patch(p, L1_OFFSET, ">Q", 1 << 56), errors.FormatError,
         ("l1_table_offset", "2^56")),
    Case("reftable-offset-beyond-2^56", lambda p: patch(p, REFTABLE_OFFSET, ">Q", 1 << 56),
         errors.FormatError, ("refcount_table_offset", "2^56")),
    Case("l1-past-eof", lambda p: patch(p, L1_OFFSET, ">Q", 64 * MiB), errors.FormatError, ("l1_table_offset",)),
    Case("reftable-past-eof", lambda p: patch(p, REFTABLE_OFFSET, ">Q", 64 * MiB), errors.FormatError,
         ("refcount_table_offset",)),
    Case("snapshots-offset-unaligned", lambda p: (patch(p, NB_SNAPSHOTS, ">I", 1), patch(p, SNAPSHOTS_OFFSET, ">Q", 7)),
         errors.FormatError, ("snapshots_offset",)),
    Case("unknown-incompatible-bit", lambda p: patch(p, INCOMPAT, ">Q", 1 << 10), errors.UnsupportedFeature,
         ("incompatible", "10")),
    Case("unknown-incompatible-bit-named", _named_unknown_bit, errors.UnsupportedFeature,
         ("incompatible", "10", "extended L2 entries")),
    Case("external-data-file", lambda p: patch(p, INCOMPAT, ">Q", fmt.INCOMPAT_DATA_FILE), errors.UnsupportedFeature,
         ("incompatible", "2")),
    Case("encryption", lambda p: patch(p, CRYPT_METHOD, ">I", 1), errors.UnsupportedFeature, ("crypt_method",)),
    Case("compression-type-unknown", lambda p: (patch(p, INCOMPAT, ">Q", fmt.INCOMPAT_COMPRESSION),
                                                patch(p, 104, ">B", 7)),
         errors.UnsupportedFeature, ("compression_type", "7")),
    Case("l1-entry-reserved-bits", _l1_entry_reserved_bits, errors.CorruptImage, ("l1[0]",)),
    Case("l1-entry-unaligned", _l1_entry_unaligned, errors.CorruptImage, ("l1[0]",)),
    Case("reftable-entry-unaligned", _reftable_entry_unaligned, errors.CorruptImage, ("refcount_table[0]",)),
    Case("l1-entry-past-eof", _l1_entry_past_eof, errors.CorruptImage, ("l1[0]", "end of the file"), at_open=False),
    Case("l2-entry-unaligned", _l2_entry_unaligned, errors.CorruptImage, ("L2 table of l1[0]",), at_open=False),
    Case("compressed-garbage", _compressed_garbage, errors.CorruptImage, ("compressed",), at_open=False),
]
HEADER_CASES = [c for c in CASES if c.at_open]


def open_and_read(path: Path) -> None:
    top = open_chain(str(path), "qcow2", read_only=True)
    try:
        buf = bytearray(top.size)
        top.pread(buf, 0)
    finally:
        top.close()


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_hostile_image_raises_our_error_naming_the_field_quickly(image: Path, case: Case):
    case.spoil(image)
    start = time.monotonic()
    with pytest.raises(errors.VdiskError) as info:
        open_and_read(image)
    elapsed = time.monotonic() - start

    assert isinstance(info.value, case.error), repr(info.value)
    for name in case.names:
        assert name in str(info.value), str(info.value)
    assert str(image) in str(info.value)
    assert elapsed < 1.0


@pytest.mark.parametrize("case", HEADER_CASES, ids=[c.id for c in HEADER_CASES])
def test_hostile_header_fails_before_any_table_is_read(image: Path, case: Case):
    case.spoil(image)
    with pytest.raises(case.error) as info:
        Qcow2Image.open(str(image), read_only=True)
    for name in case.names:
        assert name in str(info.value)


@pytest.mark.parametrize("case", HEADER_CASES, ids=[c.id for c in HEADER_CASES])
def test_vdisk_info_on_hostile_header_prints_one_line_and_exits_1(image: Path, case: Case, capsys):
    case.spoil(image)
    proc = vdisk_main(capsys, "info", "-f", "qcow2", str(image))  # in process: an escaping exception fails here

    assert proc.returncode == 1, proc
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert case.names[0] in lines[0] and str(image) in lines[0]
    assert proc.stdout == ""


def test_data_cluster_past_the_end_of_the_file_reads_as_zeros_like_qemu(image: Path, tmp_path: Path):
    """QEMU reads a data cluster past EOF (even just below 2^56) as zeros and leaves it to check: so do we."""
    patch(image, l2_table_offset(image), ">Q", fmt.OFLAG_COPIED | (fmt.L2E_OFFSET_MASK & ~0xFFFF))
    start = time.monotonic()
    top = open_chain(str(image), read_only=True)
    try:
        ours = bytearray(top.size)
        top.pread(ours, 0)
    finally:
        top.close()
    assert time.monotonic() - start < 1.0
    assert ours == qemu_raw(image, tmp_path / "qemu.raw")
    assert ours[:CLUSTER] == bytes(CLUSTER)
    proc = vdisk("check", "--output=json", str(image), check=False)
    assert proc.returncode == 2, proc
    ours_check = json.loads(proc.stdout)
    theirs = qemu_img_check(image)
    assert (ours_check.get("corruptions"), ours_check.get("leaks")) == (theirs.get("corruptions"), theirs.get("leaks"))


@pytest.mark.parametrize("case", [c for c in HEADER_CASES if c.id in ("l1-over-32MiB", "unknown-incompatible-bit")],
                         ids=["l1-over-32MiB", "unknown-incompatible-bit"])
def test_vdisk_info_process_on_hostile_header_has_no_traceback(image: Path, case: Case):
    case.spoil(image)
    proc = vdisk("info", str(image), check=False)  # a real process, format probed
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and case.names[0] in proc.stderr


def test_header_fed_whole_one_byte_short_and_with_trailing_data(image: Path):
    """Practice 10: the parser sees the whole first cluster, a cut-off header, and extra bytes after it."""
    first = image.read_bytes()[:CLUSTER]
    whole = fmt.parse_header(first)
    assert fmt.parse_header(first + b"\xff" * 4096) == whole
    for cut in (0, 3, 50, 71, 103, 111):
        with pytest.raises(errors.FormatError):
            fmt.parse_header(first[:cut])
    # Cut inside the extensions: our error, not a struct.error.
    with pytest.raises(errors.FormatError, match="extension"):
        fmt.parse_header(first[:0x90])


# --- backing chains that never end ----------------------------------------------------------------------


def test_backing_loop_of_two_images_is_refused(tmp_path: Path):
    a, b = tmp_path / "a.qcow2", tmp_path / "b.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", "-u", "-b", "b.qcow2", "-F", "qcow2", a, "1M")
    run("qemu-img", "create", "-q", "-f", "qcow2", "-u", "-b", "a.qcow2", "-F", "qcow2", b, "1M")
    start = time.monotonic()
    with pytest.raises(errors.BackingChainError, match="loop") as info:
        open_chain(str(a), read_only=True)
    assert time.monotonic() - start < 1.0
    assert "a.qcow2" in str(info.value)
    proc = vdisk("info", "--backing-chain", str(a), check=False)
    assert proc.returncode == 1 and len(proc.stderr.strip().splitlines()) == 1 and "loop" in proc.stderr


def test_image_that_is_its_own_backing_file_is_refused(tmp_path: Path):
    a = tmp_path / "a.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", "-u", "-b", "a.qcow2", "-F", "qcow2", a, "1M")
    with pytest.raises(errors.BackingChainError, match="loop"):
        open_chain(str(a), read_only=True)
    # The same file reached through another name is the same (device, inode).
    (tmp_path / "alias.qcow2").symlink_to(a)
    run("qemu-img", "rebase", "-u", "-b", str(tmp_path / "alias.qcow2"), "-F", "qcow2", a)
    with pytest.raises(errors.BackingChainError, match="loop"):
        open_chain(str(a), read_only=True)


def _linear_chain(directory: Path, links: int) -> Path:
    """links+1 small images made by vdisk, each backed by the previous (relative names)."""
    Qcow2Image.create(str(directory / "n0.qcow2"), MiB)
    for i in range(1, links + 1):
        Qcow2Image.create(str(directory / f"n{i}.qcow2"), MiB, backing_file=f"n{i - 1}.qcow2", backing_format="qcow2")
    return directory / f"n{links}.qcow2"


def test_chain_at_the_depth_limit_opens_and_one_more_is_refused(tmp_path: Path):
    top = _linear_chain(tmp_path, MAX_CHAIN_DEPTH)
    open_chain(str(top), read_only=True).close()
    Qcow2Image.create(str(tmp_path / "deeper.qcow2"), MiB, backing_file=top.name, backing_format="qcow2")
    start = time.monotonic()
    with pytest.raises(errors.BackingChainError, match=f"deeper than {MAX_CHAIN_DEPTH}"):
        open_chain(str(tmp_path / "deeper.qcow2"), read_only=True)
    assert time.monotonic() - start < 1.0


def test_depth_limit_is_a_parameter(tmp_path: Path):
    top = _linear_chain(tmp_path, 4)
    with pytest.raises(errors.BackingChainError, match="deeper than 3"):
        open_chain(str(top), read_only=True, max_depth=3)
    proc = vdisk("info", "--backing-chain", str(top))
    assert proc.returncode == 0


def test_missing_backing_file_names_where_it_was_looked_for(image: Path):
    (image.parent / "base.qcow2").unlink()
    with pytest.raises(errors.BackingChainError, match="not found") as info:
        open_chain(str(image), read_only=True)
    assert str(image.parent / "base.qcow2") in str(info.value)


# --- bits QEMU honours on open -------------------------------------------------------------------------


def test_corrupt_bit_refuses_read_write_but_allows_read_only(image: Path):
    patch(image, INCOMPAT, ">Q", fmt.INCOMPAT_CORRUPT)
    with pytest.raises(errors.CorruptImage, match="corrupt"):
        Qcow2Image.open(str(image))
    top = open_chain(str(image), read_only=True)
    try:
        buf = bytearray(CLUSTER)
        top.pread(buf, 0)
        assert buf == b"\x11" * CLUSTER
    finally:
        top.close()
    info = vdisk("info", "--output=json", str(image))
    assert '"corrupt": true' in info.stdout


def test_dirty_image_is_repaired_on_read_write_open_and_logged(image: Path, caplog):
    # A leaked cluster (refcount 1, referenced by nothing) and a too-low refcount on the L2 table.
    file_clusters = -(-image.stat().st_size // CLUSTER)
    set_refcount(image, file_clusters, 1)
    with open(image, "r+b") as f:
        f.truncate((file_clusters + 1) * CLUSTER)
    l2_cluster = l2_table_offset(image) // CLUSTER
    set_refcount(image, l2_cluster, 0)
    patch(image, INCOMPAT, ">Q", fmt.INCOMPAT_DIRTY)
    before = qemu_img_check(image)
    assert before.get("leaks") == 1 and before.get("corruptions", 0) >= 1, before

    # Read-only: left alone, as QEMU leaves it.
    Qcow2Image.open(str(image), read_only=True).close()
    assert read_u64(image, INCOMPAT) & fmt.INCOMPAT_DIRTY

    with caplog.at_level(logging.WARNING, logger="vdisk.formats.qcow2.image"):
        img = Qcow2Image.open(str(image))
        img.close()
    assert any("dirty" in r.getMessage() and "repair" in r.getMessage() for r in caplog.records), caplog.text
    assert not read_u64(image, INCOMPAT) & fmt.INCOMPAT_DIRTY
    assert get_refcount(image, l2_cluster) == 1
    assert_clean(image)


def test_dirty_image_is_not_opened_read_write_without_repair(image: Path):
    patch(image, INCOMPAT, ">Q", fmt.INCOMPAT_DIRTY)
    with pytest.raises(errors.CorruptImage, match="dirty"):
        Qcow2Image.open(str(image), repair=False)


def test_unknown_autoclear_bits_are_cleared_on_read_write_open_only(image: Path):
    bits = fmt.AUTOCLEAR_BITMAPS | (1 << 7) | (1 << 40)
    patch(image, AUTOCLEAR, ">Q", bits)
    Qcow2Image.open(str(image), read_only=True).close()
    assert read_u64(image, AUTOCLEAR) == bits
    Qcow2Image.open(str(image)).close()
    assert read_u64(image, AUTOCLEAR) == 0
    assert_clean(image)
    # qemu-img agrees that the image is fine and sees the same data.
    run("qemu-io", "-c", "read -P 0x11 0 64k", image)


def test_known_compatible_bits_do_not_stop_an_open(image: Path):
    patch(image, 80, ">Q", fmt.COMPAT_LAZY_REFCOUNTS | (1 << 33))  # unknown compatible bits are ignored
    Qcow2Image.open(str(image)).close()
    assert_clean(image)
