"""Model-based property tests: random write/zero/discard/flush/reopen sequences against a bytearray.

A chain of 2-4 images is built (the lower ones by ``qemu-img``/``qemu-io`` or by vdisk, qcow2 or a raw base,
shorter or longer than the top, with random content); vdisk's top image (made by vdisk or by qemu-img, with a
random cluster size, version, extended L2 and refcount width) and the model, a sparse raw file, receive the
same operations.  Every read agrees with the model; afterwards ``qemu-img check`` finds the top clean,
``qemu-img compare`` finds it identical to the model and ``qemu-img map`` agrees with vdisk's map.  QEMU is
the oracle, not vdisk.

Two dimensions on top of the drawn cases:

* caches: QEMU's defaults, and the smallest possible (one L2 table, one refcount block: ``TINY_CACHES``), so
  that every path that evicts, reloads and writes back a table runs all the time (issue 8);
* disk size: small disks (2 clusters to three L2 tables: operations meet each other often, and go from one
  table to the next), and large sparse ones (1 TiB and 4 TiB) whose operations land near 0, near the end,
  around 2^32 bytes and anywhere; there the model holds only what was touched (it is a sparse file) and
  vdisk's reads compare the touched ranges (qemu-img still compares the whole disk).

Discard semantics (what the model does): whole clusters read as zeros afterwards (v3, or no backing file);
partial clusters keep their data; on a v2 image with a backing file discard leaves the data.

Profiles: a short deterministic one by default (CI), ``VDISK_DEEP=1`` for many more random examples.
"""

from __future__ import annotations

import dataclasses
import os
import random
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.support.commands import run
from tests.support.images import assert_clean, qemu_img_compare, qemu_map
from vdisk.block.chain import open_chain
from vdisk.formats.qcow2.cache import TINY_CACHES, CacheOptions
from vdisk.formats.qcow2.image import Qcow2Image
from vdisk.formats.raw import RawImage

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB
TiB = 1024 * GiB

DEEP = os.environ.get("VDISK_DEEP") == "1"
# Generous: a failing example is shrunk for up to five minutes, which makes its report readable.
pytestmark = pytest.mark.timeout(3600 if DEEP else 900)

if DEEP:
    PROFILE = settings(max_examples=400, deadline=None, suppress_health_check=list(HealthCheck))
    LONE_PROFILE = settings(max_examples=800, deadline=None, suppress_health_check=list(HealthCheck))
    LARGE_PROFILE = settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
else:
    PROFILE = settings(max_examples=60, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck),
                       database=None)
    LONE_PROFILE = settings(max_examples=100, deadline=None, derandomize=True,
                            suppress_health_check=list(HealthCheck), database=None)
    LARGE_PROFILE = settings(max_examples=15, deadline=None, derandomize=True,
                             suppress_health_check=list(HealthCheck), database=None)

CACHES = [pytest.param(CacheOptions(), id="default-caches"), pytest.param(TINY_CACHES, id="tiny-caches")]


# Examples run in tmpfs when there is one: hundreds of images are created, fsynced and thrown away, and
# on a busy disk the fdatasyncs would dominate the run.  The format logic does not care where files live.
SCRATCH = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None


# --- what gets drawn -------------------------------------------------------------------------------------

LARGE_SIZES = (1 * TiB, 4 * TiB)
# A range "to the end" only where the end is near: a large disk's operations stay a few clusters long (the
# small disks are at most 12 MiB and a bit, so every range of theirs may run to the end).
TO_END_MAX = 16 * MiB


@dataclasses.dataclass
class TopOptions:
    maker: str  # "vdisk" or "qemu"
    cluster_size: int
    version: int
    extended_l2: bool
    refcount_bits: int
    size: int

    @property
    def l2_entries(self) -> int:
        """Clusters one L2 table maps."""
        return self.cluster_size // (16 if self.extended_l2 else 8)

    def qemu_options(self) -> str:
        opts = [f"cluster_size={self.cluster_size}", f"compat={'1.1' if self.version == 3 else '0.10'}"]
        if self.version == 3:
            opts += [f"refcount_bits={self.refcount_bits}", f"extended_l2={'on' if self.extended_l2 else 'off'}"]
        return ",".join(opts)


@dataclasses.dataclass
class Lower:
    maker: str  # "qemu", "vdisk" or "raw" (the base only)
    cluster_size: int
    size: int
    writes: list[tuple[int, int, int]]  # (offset, length, pattern); vdisk makes random bytes from the pattern
    compressed_at: int | None  # qemu only: the guest offset of one compressed cluster


@st.composite
def image_format(draw, *, plain: list[int], extended: list[int]) -> tuple[int, bool, int, int]:
    """(version, extended L2, cluster size, refcount bits) of a top image; cluster sizes drawn from
    ``plain`` or, with extended L2, from ``extended``."""
    version = draw(st.sampled_from([3, 3, 2]))
    extended_l2 = version == 3 and draw(st.booleans())
    cluster_size = draw(st.sampled_from(extended if extended_l2 else plain))
    refcount_bits = draw(st.sampled_from([1, 2, 4, 8, 16, 32, 64])) if version == 3 else 16
    return version, extended_l2, cluster_size, refcount_bits


@st.composite
def top_options(draw, *, makers=("vdisk", "qemu")) -> TopOptions:
    version, extended_l2, cluster_size, refcount_bits = draw(image_format(
        plain=[512, 4 * KiB, 64 * KiB, 64 * KiB, 2 * MiB], extended=[16 * KiB, 64 * KiB, 64 * KiB, 2 * MiB]))
    if cluster_size >= 2 * MiB:
        most = 6
    elif cluster_size >= 64 * KiB:
        most = 24
    elif cluster_size >= 16 * KiB:
        most = 96
    else:  # up to three L2 tables (96 KiB or 6 MiB), so that a one-table cache evicts and reloads
        most = 3 * cluster_size // 8
    clusters = draw(st.integers(2, most))
    tail = draw(st.sampled_from([0, 0, 512, 1536])) if cluster_size > 1536 else 0
    return TopOptions(draw(st.sampled_from(makers)), cluster_size, version, extended_l2, refcount_bits,
                      clusters * cluster_size + tail)


@st.composite
def large_top_options(draw) -> TopOptions:
    """A 1 TiB or 4 TiB top with clusters of 64 KiB or 2 MiB: at most 16,384 L1 entries.  With smaller
    clusters every map of the disk (vdisk's and qemu-img's check, compare, convert, map) walks an L1 table
    of 65,536 entries and more, seconds per example; the small disks cover the small clusters."""
    size = draw(st.sampled_from(LARGE_SIZES))
    version, extended_l2, cluster_size, refcount_bits = draw(image_format(
        plain=[64 * KiB, 64 * KiB, 2 * MiB], extended=[64 * KiB, 2 * MiB]))
    tail = draw(st.sampled_from([0, 0, 512, 1536]))
    return TopOptions(draw(st.sampled_from(["vdisk", "qemu"])), cluster_size, version, extended_l2, refcount_bits,
                      size + tail)


def hot_clusters(size: int, cluster_size: int, l2_entries: int) -> list[int]:
    """The first four clusters, the last two, and the two either side of the first L2 table boundary and of
    2^32 bytes (where the disk has them): where operations meet each other, go from one L2 table to the
    next, and need more than 32 bits."""
    last = (size - 1) // cluster_size
    hot = {0, 1, 2, 3, last - 1, last, l2_entries - 1, l2_entries, 2**32 // cluster_size - 1, 2**32 // cluster_size}
    return sorted(c for c in hot if 0 <= c <= last)


def landing_cluster(size: int, cluster_size: int, l2_entries: int) -> st.SearchStrategy[int]:
    """Half the time a hot cluster, else any cluster of the disk."""
    return st.sampled_from(hot_clusters(size, cluster_size, l2_entries)) | st.integers(0, (size - 1) // cluster_size)


@st.composite
def lowers(draw, top_size: int, *, large: bool = False) -> list[Lower]:
    """1..3 images under the top, base first (0..3 under a large top: it also stands alone).

    Under a large top the lower writes land where the top's operations do (``landing_cluster``), so that
    they meet; their images keep to clusters of 64 KiB and more (their L1 tables stay small).
    """
    out = []
    for level in range(draw(st.integers(0 if large else 1, 3))):
        maker = draw(st.sampled_from(["qemu", "vdisk", "raw"] if level == 0 else ["qemu", "vdisk"]))
        if large:
            cluster_size = draw(st.sampled_from([64 * KiB, 2 * MiB]))
        else:
            cluster_size = draw(st.sampled_from([4 * KiB, 64 * KiB] if maker == "qemu" else [512, 4 * KiB, 64 * KiB]))
        size = max(512, int(top_size * draw(st.sampled_from([1.0, 1.0, 0.5, 1.5]))) // 512 * 512)
        writes = []
        for _ in range(draw(st.integers(1, 4))):
            if large:
                cluster = draw(landing_cluster(size, 64 * KiB, 8192))
                offset = min(cluster * 64 * KiB + draw(st.integers(0, 127)) * 512, size - 512)
            else:
                offset = draw(st.integers(0, size - 512)) // 512 * 512
            length = draw(st.integers(1, min(size - offset, 256 * KiB) // 512)) * 512
            writes.append((offset, length, draw(st.integers(1, 255))))
        compressed_at = None
        if maker == "qemu" and size >= 2 * cluster_size and draw(st.booleans()):
            if large:
                cluster = draw(landing_cluster(size, cluster_size, cluster_size // 8))
                compressed_at = min(cluster, size // cluster_size - 1) * cluster_size
            else:
                compressed_at = size // cluster_size // 2 * cluster_size
        out.append(Lower(maker, cluster_size, size, writes, compressed_at))
    return out


@st.composite
def byte_range(draw, options: TopOptions) -> tuple[int, int]:
    """Ranges that are mostly cluster-shaped (aligned, whole clusters, to the end) with odd ones mixed in.

    Half of them start in a hot cluster (``hot_clusters``), so operations meet each other often.
    """
    size, cluster_size = options.size, options.cluster_size
    cluster = draw(landing_cluster(size, cluster_size, options.l2_entries))
    within = draw(st.sampled_from(["start", "start", "odd", "sector"]))
    if within == "start":
        offset = cluster * cluster_size
    elif within == "sector":
        offset = cluster * cluster_size + draw(st.integers(0, cluster_size // 512 - 1)) * 512
    else:
        offset = cluster * cluster_size + draw(st.integers(0, cluster_size - 1))
    offset = min(offset, size - 1)
    room = size - offset
    shape = draw(st.sampled_from(["clusters", "clusters", "odd", "to-end"]))
    if shape == "to-end" and room <= TO_END_MAX:
        length = room
    elif shape in ("clusters", "to-end"):
        length = min(room, draw(st.integers(1, 3)) * cluster_size)
    else:
        length = draw(st.integers(1, min(room, 3 * cluster_size + cluster_size // 2)))
    return offset, length


@st.composite
def operations(draw, options: TopOptions) -> list[tuple]:
    ops = []
    for _ in range(draw(st.integers(1, 20))):
        kind = draw(st.sampled_from(["write", "write", "write", "zero", "zero", "discard", "discard", "read",
                                     "flush", "reopen"]))
        if kind in ("flush", "reopen"):
            ops.append((kind,))
            continue
        offset, length = draw(byte_range(options))
        if kind == "write":
            ops.append((kind, offset, length, draw(st.sampled_from(["random", "random", "zeros", "pattern"])),
                        draw(st.integers(0, 2**32))))
        elif kind == "zero":
            ops.append((kind, offset, length, draw(st.booleans())))
        else:
            ops.append((kind, offset, length))
    return ops


# --- building the chain ----------------------------------------------------------------------------------


def payload(style: str, seed: int, length: int) -> bytes:
    if style == "zeros":
        return bytes(length)
    if style == "pattern":
        return bytes([seed % 255 + 1]) * length
    return random.Random(seed).randbytes(length)


def build_lower(directory: Path, level: int, lower: Lower, backing: tuple[str, str] | None,
                cache: CacheOptions) -> tuple[str, str]:
    """Make one lower image; returns (file name, format) for the image above it."""
    if lower.maker == "raw":
        path = directory / f"l{level}.raw"
        RawImage.create(str(path), lower.size)
        args = ["qemu-io", "-f", "raw"]
        for offset, length, pattern in lower.writes:
            args += ["-c", f"write -P {pattern} {offset} {length}"]
        run(*args, path)
        return path.name, "raw"
    path = directory / f"l{level}.qcow2"
    if lower.maker == "qemu":
        create = ["qemu-img", "create", "-q", "-f", "qcow2", "-o", f"cluster_size={lower.cluster_size}"]
        if backing:
            create += ["-b", backing[0], "-F", backing[1]]
        run(*create, path, str(lower.size))
        args = ["qemu-io", "-f", "qcow2"]
        if lower.compressed_at is not None:  # first: qemu compresses only into unallocated clusters
            args += ["-c", f"write -c -P 0x5c {lower.compressed_at} {lower.cluster_size}"]
        for offset, length, pattern in lower.writes:
            args += ["-c", f"write -P {pattern} {offset} {length}"]
        run(*args, path)
    else:
        Qcow2Image.create(str(path), lower.size, cluster_size=lower.cluster_size,
                          backing_file=backing[0] if backing else None, backing_format=backing[1] if backing else None)
        top = open_chain(str(path), cache=cache)
        try:
            for offset, length, pattern in lower.writes:
                top.pwrite(random.Random(pattern).randbytes(length), offset)
        finally:
            top.close()
    return path.name, "qcow2"


def build_top(directory: Path, options: TopOptions, backing: tuple[str, str] | None) -> Path:
    path = directory / "top.qcow2"
    if options.maker == "qemu":
        create = ["qemu-img", "create", "-q", "-f", "qcow2", "-o", options.qemu_options()]
        if backing:
            create += ["-b", backing[0], "-F", backing[1]]
        run(*create, path, str(options.size))
    else:
        Qcow2Image.create(str(path), options.size, cluster_size=options.cluster_size, version=options.version,
                          extended_l2=options.extended_l2, refcount_bits=options.refcount_bits,
                          backing_file=backing[0] if backing else None,
                          backing_format=backing[1] if backing else None)
    return path


# --- the model -------------------------------------------------------------------------------------------


class DiskModel:
    """What the disk must read as, in a raw file that stays sparse: a 4 TiB model costs what was touched.

    It starts as qemu-img's conversion of the chain and receives every operation; at the end qemu-img
    compares the top with it."""

    def __init__(self, path: Path):
        self._fd = os.open(path, os.O_RDWR)

    def __enter__(self) -> DiskModel:
        return self

    def __exit__(self, *exc) -> None:
        os.close(self._fd)

    def write(self, offset: int, data: bytes) -> None:
        os.pwrite(self._fd, data, offset)

    def read(self, offset: int, length: int) -> bytes:
        return os.pread(self._fd, length, offset)


def touched_ranges(size: int, cluster_size: int, ops: list[tuple], lower_images: list[Lower]) -> list[tuple[int, int]]:
    """(offset, length) runs that a large disk's reads compare: every operation's range and every lower
    write, widened to whole clusters of the top (a bad copy-on-write shows in the rest of the cluster), merged."""
    spans = [(op[1], op[1] + op[2]) for op in ops if len(op) > 1]
    for lower in lower_images:
        spans += [(offset, offset + length) for offset, length, _ in lower.writes]
        if lower.compressed_at is not None:
            spans.append((lower.compressed_at, lower.compressed_at + lower.cluster_size))
    merged: list[list[int]] = []
    for start, end in sorted(spans):
        start = start // cluster_size * cluster_size
        end = min(size, -(-end // cluster_size) * cluster_size)
        if start >= end:
            continue
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    return [(start, end - start) for start, end in merged]


# --- running a sequence ----------------------------------------------------------------------------------


def discard_in_model(model: DiskModel, offset: int, length: int, cluster_size: int, size: int) -> None:
    """Whole clusters of the range read as zeros; partial ones keep their data.  The last cluster of the disk
    counts as whole when the range runs to the end (it is all the disk has of it)."""
    first = -(-offset // cluster_size) * cluster_size
    end = offset + length
    last = end if end == size else end // cluster_size * cluster_size
    if last > first:
        model.write(first, bytes(last - first))


def run_sequence(top_path: Path, model: DiskModel, ops: list[tuple], *, checked: list[tuple[int, int]],
                 v2_with_backing: bool, cache: CacheOptions) -> None:
    """Apply ``ops`` to vdisk's chain and to the model; ``checked`` ranges must agree before and after."""
    top = open_chain(str(top_path), cache=cache)
    try:
        cluster_size, size = top.cluster_size, top.size
        for offset, length in checked:
            assert read(top, offset, length) == model.read(offset, length), \
                f"initial contents at {offset:#x}+{length:#x} differ from qemu's"
        for op in ops:
            kind = op[0]
            if kind == "write":
                _, offset, length, style, seed = op
                data = payload(style, seed, length)
                top.pwrite(data, offset)
                model.write(offset, data)
            elif kind == "zero":
                _, offset, length, may_trim = op
                top.write_zeroes(offset, length, may_trim=may_trim)
                model.write(offset, bytes(length))
            elif kind == "discard":
                _, offset, length = op
                top.trim(offset, length)
                if not v2_with_backing:
                    discard_in_model(model, offset, length, cluster_size, size)
            elif kind == "read":
                _, offset, length = op
                assert read(top, offset, length) == model.read(offset, length), op
            elif kind == "flush":
                top.flush()
            elif kind == "reopen":
                top.close()
                top = open_chain(str(top_path), cache=cache)
        for offset, length in checked:
            assert read(top, offset, length) == model.read(offset, length), \
                f"{offset:#x}+{length:#x} differs from the model at the end"
    finally:
        top.close()


def read(top, offset: int, length: int) -> bytearray:
    buf = bytearray(length)
    top.pread(buf, offset)
    return buf


def check_with_qemu(top_path: Path, model_path: Path, cache: CacheOptions) -> None:
    assert_clean(top_path)
    assert qemu_img_compare(top_path, model_path), "qemu-img compare: the top differs from the model"
    # Block status through the chain, as qemu-img map sees the same files.
    top = open_chain(str(top_path), read_only=True, cache=cache)
    try:
        ours = [e.as_json() for e in top.map()]
    finally:
        top.close()
    assert ours == qemu_map(top_path)


def run_case(options: TopOptions, lower_images: list[Lower], ops: list[tuple], cache: CacheOptions, *,
             large: bool) -> None:
    """Build the chain, run the operations on it and on the model, then let qemu-img judge the top."""
    with tempfile.TemporaryDirectory(prefix="vdisk-model-", dir=SCRATCH) as tmp:
        directory = Path(tmp)
        backing = None
        for level, lower in enumerate(lower_images):
            backing = build_lower(directory, level, lower, backing, cache)
        top_path = build_top(directory, options, backing)
        model_path = directory / "model.raw"
        run("qemu-img", "convert", "-U", "-O", "raw", top_path, model_path)  # sparse: holes stay holes
        if large:
            checked = touched_ranges(options.size, options.cluster_size, ops, lower_images)
        else:
            checked = [(0, options.size)]
        with DiskModel(model_path) as model:
            run_sequence(top_path, model, ops, checked=checked,
                         v2_with_backing=options.version == 2 and backing is not None, cache=cache)
        check_with_qemu(top_path, model_path, cache)


# --- the properties --------------------------------------------------------------------------------------


@st.composite
def chain_cases(draw):
    options = draw(top_options())
    return options, draw(lowers(options.size)), draw(operations(options))


@pytest.mark.parametrize("cache", CACHES)
@PROFILE
@given(case=chain_cases())
def test_random_operations_on_a_chain_agree_with_the_model(cache, case):
    options, lower_images, ops = case
    run_case(options, lower_images, ops, cache, large=False)


@st.composite
def lone_cases(draw):
    options = draw(top_options(makers=("vdisk", "vdisk", "qemu")))
    return options, draw(operations(options))


@pytest.mark.parametrize("cache", CACHES)
@LONE_PROFILE
@given(case=lone_cases())
def test_random_operations_on_an_image_without_backing_agree_with_the_model(cache, case):
    options, ops = case
    run_case(options, [], ops, cache, large=False)


@st.composite
def large_cases(draw):
    options = draw(large_top_options())
    return options, draw(lowers(options.size, large=True)), draw(operations(options))


@pytest.mark.parametrize("cache", CACHES)
@LARGE_PROFILE
@given(case=large_cases())
def test_random_operations_on_a_large_sparse_disk_agree_with_the_model(cache, case):
    """1 TiB and 4 TiB disks, alone or over 1-3 images: offsets near 0, near the end, around 2^32 and anywhere."""
    options, lower_images, ops = case
    run_case(options, lower_images, ops, cache, large=True)


def test_v2_discard_with_a_backing_file_leaves_the_data(tmp_path: Path):
    """The one place the model keeps data on discard, pinned by an example as well."""
    run("qemu-img", "create", "-q", "-f", "qcow2", tmp_path / "base.qcow2", "1M")
    run("qemu-io", "-c", "write -P 0x33 0 1M", tmp_path / "base.qcow2")
    Qcow2Image.create(str(tmp_path / "top.qcow2"), MiB, version=2, backing_file="base.qcow2", backing_format="qcow2")
    top = open_chain(str(tmp_path / "top.qcow2"))
    try:
        top.pwrite(b"\x44" * 65536, 0)
        top.trim(0, MiB)
        assert read(top, 0, 65536) == b"\x44" * 65536
        assert read(top, 65536, 65536) == b"\x33" * 65536
    finally:
        top.close()
    assert_clean(tmp_path / "top.qcow2")


def test_v3_discard_with_a_backing_file_reads_zeros_but_partial_clusters_keep_data(tmp_path: Path):
    run("qemu-img", "create", "-q", "-f", "qcow2", tmp_path / "base.qcow2", "1M")
    run("qemu-io", "-c", "write -P 0x33 0 1M", tmp_path / "base.qcow2")
    Qcow2Image.create(str(tmp_path / "top.qcow2"), MiB, backing_file="base.qcow2", backing_format="qcow2")
    top = open_chain(str(tmp_path / "top.qcow2"))
    try:
        top.pwrite(b"\x44" * 65536, 0)
        top.trim(100, 3 * 65536)  # cluster 0 partial, clusters 1 and 2 whole, cluster 3 partial
        assert read(top, 0, 65536) == b"\x44" * 65536
        assert read(top, 65536, 2 * 65536) == bytes(2 * 65536)
        assert read(top, 3 * 65536, 65536) == b"\x33" * 65536
    finally:
        top.close()
    assert_clean(tmp_path / "top.qcow2")
    run("qemu-io", "-c", "read -P 0 64k 128k", "-c", "read -P 0x33 192k 64k", tmp_path / "top.qcow2")
