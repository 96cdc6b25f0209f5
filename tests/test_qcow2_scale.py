"""Scale as a dimension of the qcow2 interop tests (issue 8), with qemu-img/qemu-io 7.2 as the oracle.

* The largest disk QEMU allows, for every cluster size from 512 B to 2 MiB (the 13 powers of two).  QEMU's
  only qcow2 size limit is the L1 table, at most 32 MiB (QCOW_MAX_L1_SIZE): 4 Mi entries of
  ``cluster_size / 8`` L2 entries of one cluster each, from 128 GiB (512 B clusters) to 2 EiB (2 MiB).
  QEMU's block-layer limit (BDRV_MAX_LENGTH, 2^63 - 1 GiB) is above that for every cluster size.
  ``qemu-img create`` accepts exactly that size and refuses one byte more (which it rounds up to a sector);
  ``Qcow2Image.create`` and ``vdisk create`` must agree (to the byte, past 2^53 too), and each side opens
  the other's largest images.
* On those disks, writes in turns (vdisk, then qemu-io, then vdisk, each overlapping clusters the other
  allocated) at the first cluster, the last byte, across 2^32 and 2^40 bytes and at scattered offsets, with
  vdisk's default caches and with TINY_CACHES (one L2 table, one refcount block: every step evicts).  Each
  side reads what the other wrote; then ``qemu-img check`` is clean and counts exactly the guest clusters
  written, the L1 table on disk points at L2 tables exactly where data was written, and around every write
  ``qemu-img compare`` finds the image equal to the model and ``qemu-img map`` equals vdisk's block status.
  (Whole-disk compare and map are out of reach there, but for the deep run's 512 B and 1 KiB clusters:
  qemu-img map asks for block status 1 GiB at a time, and at most one L2 table's reach per call, so at least
  4 Mi calls, 35 s on the 2 PiB disk of 64 KiB clusters and 2^31 calls on the 2 EiB one; and the raw model
  of a disk past 16 TiB does not fit in one ext4 file.)
* 1 TiB and 4 TiB disks with 64 KiB clusters: the same turns, checked on the whole disk (``qemu-img compare``
  against a sparse raw model, ``vdisk map --output=json`` == ``qemu-img map --output=json``).
* L1 tables of 256 and 4096 clusters (small clusters, large disks): writes in many L1 clusters.
* Refcount table growth with refcount blocks evicted (TINY_CACHES): 512 B clusters with 64-, 16- and 1-bit
  refcounts; vdisk and qemu-io grow the table in turns.  With those small refcount blocks, trimmed clusters
  must be reused as QEMU reuses them (twins: vdisk's file grows no more than QEMU's).
* Host offsets past 4 GiB: an 8 GiB ``preallocation=metadata`` image (sparse), grown to 10 GiB, written in
  place past 4 GiB and allocated past 8 GiB.
* Host offsets past 2^32 clusters: the C core and its Python reference at file offsets past 2^41 (sparse
  files), the numpy L2 decoding with host offsets past 2^41 and cluster indices past 2^32, and a hand-built
  image (1 KiB clusters, 1-bit refcounts) whose L1 table, L2 tables, refcount block and data clusters lie past
  cluster 2^32, 4 TiB into a sparse file: QEMU reads it as vdisk does, both write to it, and its refcounts
  are audited on disk, since qemu-img check refuses files of more than INT_MAX clusters (and so does vdisk).

CI uses a few chosen offsets per disk; ``VDISK_DEEP=1`` adds random ones and the other image-maker/cache
combinations.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest

from tests.support.commands import run, vdisk_main
from tests.support.images import assert_clean, qemu_img_check, qemu_img_compare, qemu_map
from vdisk.io import native
from vdisk.block.chain import merge_extents, open_chain
from vdisk.errors import OutOfRange
from vdisk.formats.node import KIND_COMPRESSED, KIND_DATA, KIND_UNALLOCATED, KIND_ZERO
from vdisk.formats.qcow2 import format as fmt
from vdisk.formats.qcow2.cache import TINY_CACHES, CacheOptions
from vdisk.formats.qcow2.image import Qcow2Image
from vdisk.formats.qcow2.tables import l2_units, runs

pytestmark = pytest.mark.timeout(300)

KiB, MiB, GiB, TiB = 1 << 10, 1 << 20, 1 << 30, 1 << 40
DEEP = os.environ.get("VDISK_DEEP") == "1"

CLUSTER_SIZES = [1 << bits for bits in range(fmt.MIN_CLUSTER_BITS, fmt.MAX_CLUSTER_BITS + 1)]
L1_MAX_ENTRIES = 32 * MiB // 8  # QEMU's QCOW_MAX_L1_SIZE, in 8-byte entries
CACHES = {"default": CacheOptions(), "tiny": TINY_CACHES}
# (image maker, vdisk caches): CI pairs each maker with one cache setting, so each cluster size still sees
# both makers and both caches; the deep run adds the other two pairs.
MAKER_CACHE_PAIRS = [("qemu-img", "default"), ("vdisk", "tiny")] + (
    [("qemu-img", "tiny"), ("vdisk", "default")] if DEEP else []
)
PAIR_IDS = [f"{maker}-made-{cache}-caches" for maker, cache in MAKER_CACHE_PAIRS]
SCATTERED = 16 if DEEP else 2  # random spots per disk, besides the chosen ones


def size_name(n: int) -> str:
    for unit, suffix in ((TiB, "T"), (GiB, "G"), (MiB, "M"), (KiB, "k")):
        if n >= unit and n % unit == 0:
            return f"{n // unit}{suffix}"
    return str(n)


def largest_disk(cluster_size: int) -> int:
    """The largest virtual size QEMU gives a qcow2 image with standard (8-byte) L2 entries."""
    return L1_MAX_ENTRIES * (cluster_size // 8) * cluster_size


# --- qemu and vdisk -------------------------------------------------------------------------------------------


def qemu_img_create(path: Path, size: int, *options: str):
    args = ["qemu-img", "create", "-q", "-f", "qcow2"]
    if options:
        args += ["-o", ",".join(options)]
    return run(*args, path, str(size), check=False)


def qemu_io(path: Path, *commands: str) -> None:
    # cache=unsafe: QEMU skips its fdatasyncs but still writes all its metadata back when it closes the image,
    # which is all these tests look at (and each write's allocation would otherwise wait for several syncs).
    args = ["qemu-io", "-t", "unsafe", "-f", "qcow2"]
    for command in commands:
        args += ["-c", command]
    run(*args, path)


def make_image(maker: str, path: Path, size: int, cluster_size: int = 64 * KiB) -> Path:
    if maker == "qemu-img":
        proc = qemu_img_create(path, size, f"cluster_size={cluster_size}")
        assert proc.returncode == 0, proc.stderr
    else:
        Qcow2Image.create(str(path), size, cluster_size=cluster_size)
    return path


def header_fields(path: Path) -> dict[str, int]:
    """The fixed header fields these tests follow, read from the file as it is now."""
    with open(path, "rb") as f:
        fields = fmt.HEADER_V2.unpack(f.read(fmt.HEADER_V2_LENGTH))
    names = ("magic", "version", "backing_file_offset", "backing_file_size", "cluster_bits", "size",
             "crypt_method", "l1_size", "l1_table_offset", "refcount_table_offset", "refcount_table_clusters",
             "nb_snapshots", "snapshots_offset")
    return dict(zip(names, fields))


def l2_tables_on_disk(path: Path) -> set[int]:
    """The L1 indices whose entry on disk points at an L2 table."""
    h = header_fields(path)
    with open(path, "rb") as f:
        f.seek(h["l1_table_offset"])
        l1 = np.frombuffer(f.read(8 * h["l1_size"]), dtype=">u8").astype(np.uint64)
    return set(np.flatnonzero(l1 & np.uint64(fmt.L1E_OFFSET_MASK)).tolist())


# --- writes in turns ---------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Write:
    offset: int
    data: bytes

    @property
    def end(self) -> int:
        return self.offset + len(self.data)


@dataclasses.dataclass(frozen=True)
class Spot:
    """Three overlapping writes around one guest offset: vdisk's, then qemu-io's, then vdisk's again."""

    vdisk_first: Write
    qemu: Write
    vdisk_last: Write

    @property
    def writes(self) -> tuple[Write, Write, Write]:
        return self.vdisk_first, self.qemu, self.vdisk_last


def spot(center: int, cluster_size: int, size: int, rng: random.Random) -> Spot:
    """Writes around ``center`` (0 and ``size`` included: the first and the last byte of the disk).

    vdisk's first write covers the bytes on both sides of ``center``; qemu-io's starts inside it (in place in
    a cluster vdisk allocated, or copy-on-write around its own partial clusters) and runs past it; vdisk's
    second write starts in the part only qemu-io wrote, when there is one.  Unaligned, at most a few clusters.
    """
    reach = min(2 * cluster_size, 256 * KiB)
    below = rng.randint(1, min(center, reach)) if center else 0
    above = rng.randint(1, min(size - center, reach)) if center < size else 0
    first_start, first_end = center - below, center + above
    qemu_start = rng.randint(first_start, first_end - 1)
    qemu_end = min(size, first_end + rng.randint(1, reach))
    last_start = rng.randint(first_end if qemu_end > first_end else qemu_start, qemu_end - 1)
    last_end = min(size, qemu_end + rng.randint(1, reach))
    return Spot(*(Write(start, rng.randbytes(end - start))
                  for start, end in ((first_start, first_end), (qemu_start, qemu_end), (last_start, last_end))))


def edge_spots(size: int, cluster_size: int, rng: random.Random, scattered: int = SCATTERED) -> list[Spot]:
    """The first cluster, the last byte, both sides of 2^32 and 2^40 (inside the disk), random offsets."""
    centers = [0, size] + [edge for edge in (1 << 32, 1 << 40) if edge < size]
    centers += [rng.randrange(1, size) for _ in range(scattered)]
    return [spot(center, cluster_size, size, rng) for center in centers]


def windows(spots: list[Spot], cluster_size: int, size: int) -> list[tuple[int, int]]:
    """Merged cluster-aligned ranges around the writes, one untouched cluster on each side: [start, end)."""
    ranges = []
    for s in spots:
        start = min(w.offset for w in s.writes) // cluster_size * cluster_size - cluster_size
        end = -(-max(w.end for w in s.writes) // cluster_size) * cluster_size + cluster_size
        ranges.append((max(0, start), min(size, end)))
    merged: list[list[int]] = []
    for start, end in sorted(ranges):
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    return [(start, end) for start, end in merged]


class WindowModel:
    """What the disk must hold inside the windows (everything else reads as zeros)."""

    def __init__(self, ranges: list[tuple[int, int]]):
        self.ranges = ranges
        self.content = {start: bytearray(end - start) for start, end in ranges}

    def apply(self, w: Write) -> None:
        for start, end in self.ranges:
            lo, hi = max(start, w.offset), min(end, w.end)
            if lo < hi:
                self.content[start][lo - start : hi - start] = w.data[lo - w.offset : hi - w.offset]

    def assert_reads(self, top, when: str) -> None:
        for start, end in self.ranges:
            buf = bytearray(end - start)
            top.pread(buf, start)
            if buf != self.content[start]:
                first_bad = next(i for i in range(len(buf)) if buf[i] != self.content[start][i])
                raise AssertionError(f"{when}: vdisk reads wrong data at guest offset {start + first_bad:#x}")


def guest_clusters(writes: list[Write], cluster_size: int) -> set[int]:
    return {c for w in writes for c in range(w.offset // cluster_size, (w.end - 1) // cluster_size + 1)}


def take_turns(image: Path, cache: CacheOptions, spots: list[Spot], tmp_path: Path, capsys, *,
               whole_disk: bool, allocated_before: range = range(0)) -> None:
    """vdisk writes, qemu-io writes over it, vdisk reads that and writes over it; then qemu-img judges.

    ``whole_disk``: compare and map the whole disk (it must fit a sparse raw file), else only the windows
    around the writes.  ``allocated_before``: guest clusters the image had allocated already (preallocation).
    """
    header = header_fields(image)
    size, cluster_size = header["size"], 1 << header["cluster_bits"]
    ranges = windows(spots, cluster_size, size)
    model = WindowModel(ranges)

    top = open_chain(str(image), cache=cache)
    try:
        for s in spots:
            top.pwrite(s.vdisk_first.data, s.vdisk_first.offset)
            model.apply(s.vdisk_first)
        model.assert_reads(top, "vdisk's first turn, before closing")
    finally:
        top.close()

    commands = []
    for i, s in enumerate(spots):
        source = tmp_path / f"qemu-write-{i}.bin"
        source.write_bytes(s.qemu.data)
        commands.append(f"write -q -s {source} {s.qemu.offset} {len(s.qemu.data)}")
        model.apply(s.qemu)
    qemu_io(image, *commands)

    top = open_chain(str(image), cache=cache)
    try:
        model.assert_reads(top, "vdisk reading what qemu-io wrote over vdisk's clusters")
        for s in spots:
            top.pwrite(s.vdisk_last.data, s.vdisk_last.offset)
            model.apply(s.vdisk_last)
        model.assert_reads(top, "vdisk's second turn, before closing")
    finally:
        top.close()

    everything = [w for s in spots for w in s.writes]
    allocated = guest_clusters(everything, cluster_size) | set(allocated_before)
    result = qemu_img_check(image)
    assert (result.get("corruptions", 0), result.get("leaks", 0), result["check-errors"]) == (0, 0, 0), result
    assert result.get("allocated-clusters", 0) == len(allocated), "clusters allocated that no write asked for"
    l2_entries = cluster_size // 8
    assert l2_tables_on_disk(image) == {c // l2_entries for c in allocated}

    if whole_disk:
        raw = tmp_path / "model.raw"
        with open(raw, "wb") as f:
            f.truncate(size)
            for w in [s.vdisk_first for s in spots] + [s.qemu for s in spots] + [s.vdisk_last for s in spots]:
                os.pwrite(f.fileno(), w.data, w.offset)
        assert qemu_img_compare(image, raw), "qemu-img compare: the image differs from the model"
        assert json.loads(vdisk_main(capsys, "map", "--output=json", image).stdout) == qemu_map(image)
        return
    top = open_chain(str(image), read_only=True, force_share=True)
    try:
        for start, end in ranges:
            expected = tmp_path / f"window-{start:x}.raw"
            expected.write_bytes(model.content[start])
            window = f"driver=raw,offset={start},size={end - start},file.driver=qcow2,file.file.filename={image}"
            proc = run("qemu-img", "compare", "-U", "--image-opts", window,
                       f"driver=raw,file.driver=file,file.filename={expected}", check=False)
            assert proc.returncode == 0, f"window {start:#x}+{end - start:#x}: {proc.stdout}{proc.stderr}"
            theirs = json.loads(run("qemu-img", "map", "-U", "--output=json", "--start-offset", start,
                                    "--max-length", end - start, image).stdout)
            ours = [e.as_json() for e in merge_extents(top.block_status(start, end - start))]
            assert ours == theirs, f"map of window {start:#x}+{end - start:#x}"
    finally:
        top.close()


# --- the largest disks ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def largest_image(tmp_path_factory):
    """The largest disk of a cluster size, empty, made once per module by qemu-img or by vdisk.

    qemu-img writes the 32 MiB L1 table out (5 s for 512-byte clusters), so each image is made only once;
    tests that write take a copy.
    """
    made: dict[tuple[int, str], Path] = {}

    def get(cluster_size: int, maker: str) -> Path:
        if (cluster_size, maker) not in made:
            directory = tmp_path_factory.mktemp(f"largest-{size_name(cluster_size)}-{maker}")
            made[cluster_size, maker] = make_image(maker, directory / "empty.qcow2", largest_disk(cluster_size),
                                                   cluster_size)
        return made[cluster_size, maker]

    return get


@pytest.mark.parametrize("cluster_size", CLUSTER_SIZES, ids=size_name)
def test_largest_disk_is_the_one_qemu_allows(cluster_size: int, largest_image, tmp_path: Path, capsys):
    largest = largest_disk(cluster_size)
    option = f"cluster_size={cluster_size}"
    for too_big in (largest + 1, largest + 512):
        proc = qemu_img_create(tmp_path / "refused-by-qemu.qcow2", too_big, option)
        assert proc.returncode == 1 and "image size is too large" in proc.stderr, proc.stderr
        with pytest.raises(OutOfRange, match="L1 table larger than"):
            Qcow2Image.create(str(tmp_path / "refused.qcow2"), too_big, cluster_size=cluster_size)
    refused = vdisk_main(capsys, "create", "-f", "qcow2", "-o", option, tmp_path / "refused.qcow2", largest + 512)
    assert refused.returncode != 0 and "L1 table larger than" in refused.stderr, refused
    accepted = vdisk_main(capsys, "create", "-f", "qcow2", "-o", option, tmp_path / "cli.qcow2", largest)
    assert accepted.returncode == 0, accepted.stderr

    made_by_qemu, made_by_vdisk = largest_image(cluster_size, "qemu-img"), largest_image(cluster_size, "vdisk")
    assert header_fields(tmp_path / "cli.qcow2") == header_fields(made_by_vdisk)
    assert header_fields(made_by_vdisk)["l1_size"] == header_fields(made_by_qemu)["l1_size"] == L1_MAX_ENTRIES
    # Each side opens the other's image.
    info = json.loads(run("qemu-img", "info", "-U", "--output=json", made_by_vdisk).stdout)
    assert (info["virtual-size"], info["cluster-size"]) == (largest, cluster_size)
    assert_clean(made_by_vdisk)
    image = Qcow2Image.open(str(made_by_qemu), read_only=True, force_share=True)
    try:
        assert (image.size, image.cluster_size) == (largest, cluster_size)
    finally:
        image.close()


@pytest.mark.parametrize("cluster_size", CLUSTER_SIZES, ids=size_name)
def test_vdisk_create_refuses_one_byte_past_the_largest_disk(cluster_size: int, tmp_path: Path, capsys):
    """As qemu-img create does (it rounds the size up to a sector, which needs one more L1 entry).  The size
    must be taken to the byte: from 128 KiB clusters on, the largest disk is 2^53 bytes or more, where a
    float no longer holds every integer."""
    too_big = largest_disk(cluster_size) + 1
    refused = vdisk_main(capsys, "create", "-f", "qcow2", "-o", f"cluster_size={cluster_size}",
                         tmp_path / "refused.qcow2", too_big)
    assert refused.returncode != 0 and "L1 table larger than" in refused.stderr, refused.stdout


LARGEST_CASES = [pytest.param(cs, maker, cache, id=f"{size_name(cs)}-{pair_id}")
                 for cs in CLUSTER_SIZES for (maker, cache), pair_id in zip(MAKER_CACHE_PAIRS, PAIR_IDS)]


@pytest.mark.parametrize("cluster_size, maker, cache_name", LARGEST_CASES)
def test_writes_at_the_edges_of_the_largest_disk(cluster_size: int, maker: str, cache_name: str,
                                                 largest_image, tmp_path: Path, capsys):
    image = tmp_path / "disk.qcow2"
    shutil.copyfile(largest_image(cluster_size, maker), image)
    rng = random.Random(f"largest-{cluster_size}-{maker}-{cache_name}")
    # Whole-disk compare and map take 15-20 s on a 128 or 512 GiB disk of 4 Mi L1 entries (vdisk map walks the
    # L1 table in Python): deep runs only.  Larger disks are out of reach (see the module docstring).
    take_turns(image, CACHES[cache_name], edge_spots(largest_disk(cluster_size), cluster_size, rng), tmp_path,
               capsys, whole_disk=DEEP and cluster_size <= KiB)
    image.unlink()  # 32-40 MiB each; a failing test keeps its copy to look at


@pytest.mark.parametrize("size", [TiB, 4 * TiB], ids=size_name)
@pytest.mark.parametrize("maker, cache_name", MAKER_CACHE_PAIRS, ids=PAIR_IDS)
def test_terabyte_disks_with_64k_clusters(size: int, maker: str, cache_name: str, tmp_path: Path, capsys):
    image = make_image(maker, tmp_path / "disk.qcow2", size)
    rng = random.Random(f"terabyte-{size}-{maker}-{cache_name}")
    spots = edge_spots(size, 64 * KiB, rng, scattered=64 if DEEP else 6)
    take_turns(image, CACHES[cache_name], spots, tmp_path, capsys, whole_disk=True)


L1_SPANNING = [pytest.param(512, 8 * GiB, id="512-8G-l1-of-4096-clusters"),
               pytest.param(4 * KiB, 256 * GiB, id="4k-256G-l1-of-256-clusters")]


@pytest.mark.parametrize("cluster_size, size", L1_SPANNING)
@pytest.mark.parametrize("maker, cache_name", MAKER_CACHE_PAIRS, ids=PAIR_IDS)
def test_l1_table_spanning_many_clusters(cluster_size: int, size: int, maker: str, cache_name: str,
                                         tmp_path: Path, capsys):
    """Writes in many clusters of the L1 table, its first and last among them; the L1 entries of each must
    reach the disk (take_turns reads them back) whoever wrote them."""
    image = make_image(maker, tmp_path / "disk.qcow2", size, cluster_size)
    l1_clusters = header_fields(image)["l1_size"] * 8 // cluster_size
    guest_per_l1_cluster = (cluster_size // 8) * (cluster_size // 8) * cluster_size
    rng = random.Random(f"l1-{cluster_size}-{maker}-{cache_name}")
    inner = rng.sample(range(1, l1_clusters - 1), min(300 if DEEP else 24, l1_clusters - 2))
    chosen = {0, l1_clusters - 1, *inner}
    # Away from the L1 cluster's ends, so that each spot's writes stay in the L1 cluster chosen for it.
    margin = 4 * cluster_size
    spots = [spot(k * guest_per_l1_cluster + rng.randrange(margin, guest_per_l1_cluster - margin), cluster_size,
                  size, rng) for k in sorted(chosen)]
    take_turns(image, CACHES[cache_name], spots, tmp_path, capsys, whole_disk=True)
    l1_entries_per_cluster = cluster_size // 8
    assert {i // l1_entries_per_cluster for i in l2_tables_on_disk(image)} == chosen


# --- refcount table growth ----------------------------------------------------------------------------------


REFCOUNT_CASES = [
    # (refcount bits, MiB written per turn: vdisk, qemu-io, vdisk).  With 512-byte clusters one refcount table
    # cluster covers 64 refcount blocks: 2 MiB of host space at 64 bits, 8 MiB at 16, 128 MiB at 1.  Each turn
    # about doubles the host space used, so every turn must grow the table; at 1 bit only the deep run writes
    # the 136 MiB that grow it once (CI still writes over several evicted 2 MiB blocks).
    pytest.param(64, (4, 4, 8), id="refcount-bits-64"),
    pytest.param(16, (16, 16, 32), id="refcount-bits-16"),
    pytest.param(1, (136, 4, 4) if DEEP else (6, 2, 4), id="refcount-bits-1"),
]


@pytest.mark.parametrize("refcount_bits, turn_mib", REFCOUNT_CASES)
def test_refcount_table_grows_in_turns_with_blocks_evicted(refcount_bits: int, turn_mib: tuple[int, int, int],
                                                           tmp_path: Path, capsys):
    """vdisk (one refcount block cached) and qemu-io take turns writing; the refcount table must move and grow
    in every turn that passes what it covers; vdisk's last turn trims and writes again."""
    image = tmp_path / "disk.qcow2"
    size = (sum(turn_mib) + 8) * MiB
    proc = qemu_img_create(image, size, "cluster_size=512", f"refcount_bits={refcount_bits}")
    assert proc.returncode == 0, proc.stderr
    rng = random.Random(f"refcount-{refcount_bits}")
    model = bytearray(size)
    tables = [header_fields(image)]  # after each turn

    def vdisk_turn(start: int, mib: int, trim: tuple[int, int] | None = None) -> None:
        top = open_chain(str(image), cache=TINY_CACHES)
        try:
            if trim:
                top.trim(*trim)
                model[trim[0] : trim[0] + trim[1]] = bytes(trim[1])
                top.flush()  # the freed clusters become free for the writes below
            for offset in range(start, start + mib * MiB, MiB):
                data = rng.randbytes(MiB)
                top.pwrite(data, offset)
                model[offset : offset + MiB] = data
            buf = bytearray(size)
            top.pread(buf, 0)
            assert buf == model
        finally:
            top.close()
        tables.append(header_fields(image))

    first, second, third = turn_mib
    vdisk_turn(0, first)
    data = rng.randbytes(second * MiB)
    (tmp_path / "qemu-write.bin").write_bytes(data)
    qemu_io(image, f"write -q -s {tmp_path / 'qemu-write.bin'} {first * MiB} {len(data)}")
    model[first * MiB : (first + second) * MiB] = data
    tables.append(header_fields(image))
    vdisk_turn((first + second) * MiB, third, trim=(MiB, 2 * MiB))

    steps = list(zip(tables, tables[1:]))
    grown = [after["refcount_table_clusters"] > before["refcount_table_clusters"] for before, after in steps]
    if refcount_bits > 1:
        assert grown == [True, True, True], tables
    else:
        assert grown == [first > 128, False, False], tables
    for (before, after), table_grew in zip(steps, grown):  # a larger table is a new table somewhere else
        assert (after["refcount_table_offset"] != before["refcount_table_offset"]) == table_grew, tables
    assert_clean(image)
    (tmp_path / "model.raw").write_bytes(model)
    assert qemu_img_compare(image, tmp_path / "model.raw")
    assert json.loads(vdisk_main(capsys, "map", "--output=json", image).stdout) == qemu_map(image)


@pytest.mark.parametrize("refcount_bits", [64, 16, 1], ids=lambda bits: f"refcount-bits-{bits}")
def test_trimmed_clusters_are_reused_as_qemu_reuses_them(refcount_bits: int, tmp_path: Path):
    """Twins: 4 MiB written, 2 MiB of it trimmed, 4 MiB more written, by vdisk on one and qemu-io on the other.
    QEMU puts the new data where the trimmed data was; vdisk's file must not grow more than QEMU's.  Small
    refcount blocks make the free space cross many of them: 512-byte clusters give a block 64 entries at 64
    bits, 256 at 16, 4096 at 1."""
    ours, theirs = tmp_path / "vdisk.formats.qcow2", tmp_path / "qemu.qcow2"
    proc = qemu_img_create(ours, 16 * MiB, "cluster_size=512", f"refcount_bits={refcount_bits}")
    assert proc.returncode == 0, proc.stderr
    rng = random.Random(f"reuse-{refcount_bits}")
    first, second = rng.randbytes(4 * MiB), rng.randbytes(4 * MiB)
    top = open_chain(str(ours), cache=TINY_CACHES)
    try:
        top.pwrite(first, 0)
    finally:
        top.close()
    shutil.copyfile(ours, theirs)
    (tmp_path / "second.bin").write_bytes(second)
    qemu_io(theirs, f"discard {MiB} {2 * MiB}", f"write -q -s {tmp_path / 'second.bin'} {8 * MiB} {len(second)}")
    top = open_chain(str(ours), cache=TINY_CACHES)
    try:
        top.trim(MiB, 2 * MiB)
        top.flush()  # the trimmed clusters are free from here on
        top.pwrite(second, 8 * MiB)
    finally:
        top.close()
    for image in (ours, theirs):
        assert_clean(image)
    assert qemu_img_compare(ours, theirs, fmt_b="qcow2")
    assert ours.stat().st_size <= theirs.stat().st_size, (ours.stat().st_size, theirs.stat().st_size)


# --- host offsets past 4 GiB --------------------------------------------------------------------------------


@pytest.mark.parametrize("cache_name", CACHES, ids=[f"{c}-caches" for c in CACHES])
def test_preallocated_image_with_data_past_4_gib(cache_name: str, tmp_path: Path, capsys):
    """preallocation=metadata gives every guest cluster of the first 8 GiB its host cluster (a sparse file);
    resized to 10 GiB, the rest is unallocated.  Writes land in place past 4 GiB of host offsets and in new
    clusters past 8 GiB."""
    image = tmp_path / "disk.qcow2"
    proc = qemu_img_create(image, 8 * GiB, "preallocation=metadata", "cluster_size=64k")
    assert proc.returncode == 0, proc.stderr
    run("qemu-img", "resize", "-q", image, str(10 * GiB))
    cluster_size = 64 * KiB
    rng = random.Random(f"preallocated-{cache_name}")
    centers = [1 << 32, 6 * GiB, 8 * GiB - 1, 8 * GiB, 10 * GiB]
    centers += [rng.randrange(4 * GiB, 10 * GiB) for _ in range(3 + SCATTERED)]
    spots = [spot(center, cluster_size, 10 * GiB, rng) for center in centers]
    take_turns(image, CACHES[cache_name], spots, tmp_path, capsys, whole_disk=True,
               allocated_before=range(8 * GiB // cluster_size))
    for extent in qemu_map(image):
        if extent["data"] and extent["start"] >= 4 * GiB:
            assert extent["offset"] >= 4 * GiB, extent
        if extent["data"] and extent["start"] >= 8 * GiB:
            assert extent["offset"] >= 8 * GiB, extent


# --- host offsets past 2^32 clusters ----------------------------------------------------------------------


@pytest.mark.parametrize("core_name", ["c", "python"])
def test_native_io_at_file_offsets_past_2_41(core_name: str, tmp_path: Path):
    """2^41 is cluster 2^32 of 512-byte clusters; 2^43 cluster 2^32 of 2 KiB clusters (ext4 ends at 16 TiB)."""
    core = native.implementations()[core_name]
    rng = random.Random(core_name)
    fd = os.open(tmp_path / "sparse.bin", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        at = (1 << 41) + 12345
        data = rng.randbytes(100 * KiB + 3)
        core.pwrite_full(fd, data, at)
        assert os.pread(fd, len(data) + 2, at - 1) == b"\0" + data  # the file ends where the write did
        buf = bytearray(len(data) + 4096)
        core.pread_full(fd, buf, at)
        assert buf == data + bytes(4096)  # past the end of the file reads as zeros

        cluster_size, host = 64 * KiB, 1 << 43
        clusters = rng.randbytes(5 * cluster_size)
        select = np.array([True, False, True, True, False])
        assert core.pwrite_selected(fd, clusters, cluster_size, select, host) == 3
        packed = b"".join(clusters[i * cluster_size : (i + 1) * cluster_size] for i in np.flatnonzero(select))
        assert os.pread(fd, 3 * cluster_size + 1, host - 1) == b"\0" + packed

        core.copy_range(fd, host, fd, (1 << 42) + 7, 3 * cluster_size)
        assert os.pread(fd, 3 * cluster_size, (1 << 42) + 7) == packed
    finally:
        os.close(fd)


def _decode_l2_entry(entry: int, cluster_bits: int) -> tuple[int, int]:
    """(kind, host) of a standard L2 entry, one entry at a time (the reference for the numpy decoding)."""
    if entry & fmt.OFLAG_COMPRESSED:
        return KIND_COMPRESSED, entry
    host = entry & fmt.L2E_OFFSET_MASK
    if entry & fmt.OFLAG_ZERO:
        return KIND_ZERO, host
    return (KIND_DATA, host) if host else (KIND_UNALLOCATED, 0)


@pytest.mark.parametrize("cluster_bits", [9, 16, 21], ids=lambda b: size_name(1 << b))
def test_l2_decoding_of_host_offsets_past_2_32_clusters(cluster_bits: int):
    cs = 1 << cluster_bits
    last_cluster = (fmt.MAX_HOST_OFFSET >> cluster_bits) - 1  # the last host cluster an entry can name
    far = 1 << 32
    compressed_offset_mask, csize_shift, csize_mask = fmt.compressed_layout(cluster_bits)
    compressed_host = ((far + 9) * cs + 96) & compressed_offset_mask
    compressed_sectors = min(4, csize_mask + 1)  # the size field has cluster_bits - 8 bits
    entries = [
        (far - 1) * cs | fmt.OFLAG_COPIED,  # three contiguous clusters across cluster 2^32: one run
        far * cs | fmt.OFLAG_COPIED,
        (far + 1) * cs | fmt.OFLAG_COPIED,
        (far + 5) * cs,  # not COPIED (shared), and not contiguous
        (far + 7) * cs | fmt.OFLAG_ZERO,  # zero, preallocated past 2^32 clusters
        fmt.OFLAG_ZERO,
        0,
        fmt.OFLAG_COMPRESSED | (compressed_sectors - 1) << csize_shift | compressed_host,
        (last_cluster - 1) * cs | fmt.OFLAG_COPIED,
        last_cluster * cs | fmt.OFLAG_COPIED,
    ]
    kinds, hosts = l2_units(np.array(entries, dtype=">u8"), False, cluster_bits)
    assert [(int(k), int(h)) for k, h in zip(kinds, hosts)] == [_decode_l2_entry(e, cluster_bits) for e in entries]
    assert runs(kinds, hosts, cs) == [
        (0, 3, KIND_DATA, (far - 1) * cs),
        (3, 1, KIND_DATA, (far + 5) * cs),
        (4, 1, KIND_ZERO, (far + 7) * cs),
        (5, 1, KIND_ZERO, 0),
        (6, 1, KIND_UNALLOCATED, 0),
        (7, 1, KIND_COMPRESSED, entries[7]),
        (8, 2, KIND_DATA, (last_cluster - 1) * cs),
    ]
    host, length = fmt.compressed_extent(entries[7], cluster_bits)
    assert (host, length) == (compressed_host, compressed_sectors * fmt.SECTOR - (compressed_host & (fmt.SECTOR - 1)))

    if cluster_bits < 14:
        return  # extended L2 entries need clusters of at least 16 KiB
    sub = cs // fmt.SUBCLUSTERS_PER_CLUSTER
    alloc_bits = 0b1011 | 1 << 31  # subclusters 0, 1, 3 and 31 allocated, 4 and 5 zero, the rest unallocated
    bitmap = alloc_bits | (0b110000 << 32)
    extended = np.array([(far + 3) * cs | fmt.OFLAG_COPIED, bitmap, last_cluster * cs, fmt.L2_BITMAP_ALL_ALLOC],
                        dtype=">u8")
    kinds, hosts = l2_units(extended, True, cluster_bits)
    for k in range(fmt.SUBCLUSTERS_PER_CLUSTER):
        expected = KIND_DATA if alloc_bits >> k & 1 else KIND_ZERO if k in (4, 5) else KIND_UNALLOCATED
        assert (int(kinds[k]), int(hosts[k])) == (expected, (far + 3) * cs + k * sub), k
        assert (int(kinds[32 + k]), int(hosts[32 + k])) == (KIND_DATA, last_cluster * cs + k * sub), k
    assert runs(kinds[32:], hosts[32:], sub) == [(0, 32, KIND_DATA, last_cluster * cs)]


FAR_CLUSTER_BITS = 10  # 1 KiB clusters and 1-bit refcounts: a refcount block covers 8192 clusters
FAR = 1 << 32  # the first cluster index past 2^32 clusters (host offset 4 TiB)
FAR_SIZE = 384 * KiB  # three L2 tables of 128 entries
FAR_REFTABLE_CLUSTERS = 8190  # 8 MiB - 2 KiB (QEMU allows 8 MiB): entry 2^19 is the far block's


def build_far_image(path: Path, rng: random.Random) -> bytearray:
    """A valid image whose L1 table, L2 tables, refcount block and data clusters all lie past cluster 2^32.

    Clusters 0-8191, the whole reach of refcount block 0, are the header, the refcount table (8190 clusters,
    sparse on disk but for its two entries) and block 0 itself: the next cluster anyone allocates is past
    what block 0 counts.  Past cluster 2^32 (refcount table entry 2^19): 2^32 the far refcount block, +1 the
    L1 table, +2 and +3 L2 tables, +4..+6 data.  L1[0] -> guest clusters 0 and 1 at 2^32+4, 2^32+5; L1[1] ->
    guest cluster 128 at 2^32+6; L1[2] unallocated.  Returns the guest content.
    """
    cs = 1 << FAR_CLUSTER_BITS
    refblock0 = 1 + FAR_REFTABLE_CLUSTERS
    far_refblock, l1, l2_tables, far_data = FAR, FAR + 1, (FAR + 2, FAR + 3), (FAR + 4, FAR + 5, FAR + 6)
    header = struct.pack(">4sIQIIQIIQQIIQ", fmt.MAGIC, 3, 0, 0, FAR_CLUSTER_BITS, FAR_SIZE, 0, 3, l1 * cs, cs,
                         FAR_REFTABLE_CLUSTERS, 0, 0)
    header += struct.pack(">QQQII", 0, 0, 0, 0, fmt.HEADER_V3_LENGTH) + bytes(8) + bytes(8)  # zlib; no extensions
    copied = fmt.OFLAG_COPIED
    pieces = {
        0: header,
        cs: struct.pack(">Q", refblock0 * cs),  # refcount table entry 0
        cs + 8 * (FAR >> 13): struct.pack(">Q", far_refblock * cs),  # entry 2^19
        refblock0 * cs: b"\xff" * cs,  # clusters 0-8191
        far_refblock * cs: bytes([0b1111111]),  # clusters 2^32 .. 2^32+6
        l1 * cs: struct.pack(">QQQ", l2_tables[0] * cs | copied, l2_tables[1] * cs | copied, 0),
        l2_tables[0] * cs: struct.pack(">QQ", far_data[0] * cs | copied, far_data[1] * cs | copied),
        l2_tables[1] * cs: struct.pack(">Q", far_data[2] * cs | copied),
    }
    guest = bytearray(FAR_SIZE)
    for guest_cluster, host_cluster in zip((0, 1, 128), far_data):
        data = rng.randbytes(cs)
        pieces[host_cluster * cs] = data
        guest[guest_cluster * cs : (guest_cluster + 1) * cs] = data
    with open(path, "wb") as f:
        for offset, data in pieces.items():
            os.pwrite(f.fileno(), data, offset)
        f.truncate((far_data[-1] + 1) * cs)
    return guest


def audit_one_bit_refcounts(path: Path) -> tuple[set[int], set[int]]:
    """(clusters the metadata references, clusters whose 1-bit refcount is set), read from the file.

    qemu-img check in miniature, for an image it refuses to check (no snapshots, no compression).
    """
    h = header_fields(path)
    bits = h["cluster_bits"]
    cs = 1 << bits
    with open(path, "rb") as f:
        def read_u64s(offset: int, length: int) -> np.ndarray:
            return np.frombuffer(os.pread(f.fileno(), length, offset), dtype=">u8").astype(np.uint64)

        def clusters_of(offset: int, length: int) -> set[int]:
            return set(range(offset >> bits, ((offset + length - 1) >> bits) + 1))

        referenced = {0} | clusters_of(h["refcount_table_offset"], h["refcount_table_clusters"] * cs)
        referenced |= clusters_of(h["l1_table_offset"], 8 * h["l1_size"])
        counted: set[int] = set()
        reftable = read_u64s(h["refcount_table_offset"], h["refcount_table_clusters"] * cs)
        for rt_index in np.flatnonzero(reftable).tolist():
            block = int(reftable[rt_index])
            referenced.add(block >> bits)
            refcounts = np.unpackbits(np.frombuffer(os.pread(f.fileno(), cs, block), np.uint8), bitorder="little")
            counted |= {rt_index * 8 * cs + int(i) for i in np.flatnonzero(refcounts)}
        for entry in read_u64s(h["l1_table_offset"], 8 * h["l1_size"]).tolist():
            l2 = entry & fmt.L1E_OFFSET_MASK
            if l2:
                referenced.add(l2 >> bits)
                hosts = read_u64s(l2, cs) & np.uint64(fmt.L2E_OFFSET_MASK)
                referenced |= {int(host) >> bits for host in hosts[hosts != 0]}
    return referenced, counted


def qemu_reads_whole_disk(path: Path, out: Path) -> bytes:
    run("qemu-img", "convert", "-U", "-O", "raw", path, out)
    return out.read_bytes()


@pytest.mark.parametrize("cache_name", CACHES, ids=[f"{c}-caches" for c in CACHES])
def test_image_with_metadata_and_data_past_2_32_clusters(cache_name: str, tmp_path: Path, capsys):
    """Neither qemu-img check nor vdisk check takes a file of 2^32 clusters, so the refcounts are audited on
    disk instead (``audit_one_bit_refcounts``), where they live: past cluster 2^32."""
    cs = 1 << FAR_CLUSTER_BITS
    image = tmp_path / "far.qcow2"
    rng = random.Random(f"far-{cache_name}")
    model = build_far_image(image, rng)
    referenced, counted = audit_one_bit_refcounts(image)
    assert referenced == counted
    assert qemu_reads_whole_disk(image, tmp_path / "qemu.raw") == model
    assert {e["start"]: e.get("offset") for e in qemu_map(image) if e["data"]} == {
        0: (FAR + 4) * cs, 128 * KiB: (FAR + 6) * cs}

    top = open_chain(str(image), cache=CACHES[cache_name])
    try:
        for start, length in ((0, FAR_SIZE), (0, 2 * KiB), (KiB + 100, 300), (128 * KiB, KiB)):
            buf = bytearray(length)
            top.pread(buf, start)  # the whole disk, then the scalar paths: two clusters, one, a whole one
            assert buf == model[start : start + length], (start, length)
        with top.top.lock:
            assert [top.top.refcounts.refcount(c) for c in (8191, 8192, FAR - 1, FAR, FAR + 6, FAR + 7)] == [1, 0, 0, 1, 1, 0]
        vdisk_writes = [Write(100, rng.randbytes(700)),  # in place, past cluster 2^32
                        Write(128 * KiB + 900, rng.randbytes(300)),  # in place, then one new cluster
                        Write(300 * KiB + 5, rng.randbytes(2 * KiB))]  # a new L2 table and three data clusters
        for w in vdisk_writes:
            top.pwrite(w.data, w.offset)
            model[w.offset : w.end] = w.data
        top.trim(KiB, KiB)  # frees cluster 2^32+5: its refcount, far out, must drop
        model[KiB : 2 * KiB] = bytes(KiB)
    finally:
        top.close()
    referenced, counted = audit_one_bit_refcounts(image)
    assert referenced == counted and FAR + 5 not in counted
    # Block 0 is full and no block counts the clusters after it, so vdisk allocated at the end of the file.
    assert len({c for c in counted if c > FAR + 6}) == 5
    assert qemu_reads_whole_disk(image, tmp_path / "qemu.raw") == model

    qemu_writes = [Write(5, rng.randbytes(50)), Write(KiB + 3, rng.randbytes(2000))]
    for i, w in enumerate(qemu_writes):
        (tmp_path / f"qemu-{i}.bin").write_bytes(w.data)
        model[w.offset : w.end] = w.data
    qemu_io(image, *(f"write -q -s {tmp_path / f'qemu-{i}.bin'} {w.offset} {len(w.data)}"
                     for i, w in enumerate(qemu_writes)))
    referenced, counted = audit_one_bit_refcounts(image)
    assert referenced == counted
    top = open_chain(str(image), read_only=True, cache=CACHES[cache_name])
    try:
        buf = bytearray(FAR_SIZE)
        top.pread(buf, 0)
        assert buf == model
    finally:
        top.close()
    assert json.loads(vdisk_main(capsys, "map", "--output=json", image).stdout) == qemu_map(image)

    # Neither checks a file of more than INT_MAX clusters: qemu-img says "File too large", and so does vdisk
    # (rather than count 2^32 clusters in 32 GiB of memory).
    theirs = run("qemu-img", "check", "--output=json", image, check=False)
    assert theirs.returncode == 1 and "File too large" in theirs.stderr, theirs
    ours = vdisk_main(capsys, "check", "--output=json", image)
    assert ours.returncode == 1 and "File too large" in ours.stderr, ours
    assert json.loads(ours.stdout)["check-errors"] == 1
