"""Model-based property tests: random write/zero/discard/flush/reopen sequences against a bytearray.

A chain of 2-4 images is built (the lower ones by ``qemu-img``/``qemu-io`` or by vdisk, qcow2 or a raw base,
shorter or longer than the top, with random content); vdisk's top image (made by vdisk or by qemu-img, with a
random cluster size, version, extended L2 and refcount width) and a plain ``bytearray`` receive the same
operations.  Every read agrees with the model; afterwards ``qemu-img check`` finds the top clean and
``qemu-img compare`` finds it identical to the model's raw file.  QEMU is the oracle, not vdisk.

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
from conftest import assert_clean, qemu_img_compare, qemu_map, qemu_raw, run
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vdisk.chain import chain_map, close_chain, open_chain
from vdisk.qcow2.image import Qcow2Image
from vdisk.raw import RawImage

KiB = 1024
MiB = 1024 * KiB

DEEP = os.environ.get("VDISK_DEEP") == "1"
# Generous: a failing example is shrunk for up to five minutes, which makes its report readable.
pytestmark = pytest.mark.timeout(3600 if DEEP else 900)

if DEEP:
    PROFILE = settings(max_examples=400, deadline=None, suppress_health_check=list(HealthCheck))
    LONE_PROFILE = settings(max_examples=800, deadline=None, suppress_health_check=list(HealthCheck))
else:
    PROFILE = settings(max_examples=60, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck),
                       database=None)
    LONE_PROFILE = settings(max_examples=100, deadline=None, derandomize=True,
                            suppress_health_check=list(HealthCheck), database=None)


# Examples run in tmpfs when there is one: hundreds of images are created, fsynced and thrown away, and
# on a busy disk the fdatasyncs would dominate the run.  The format logic does not care where files live.
SCRATCH = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None


# --- what gets drawn -------------------------------------------------------------------------------------


@dataclasses.dataclass
class TopOptions:
    maker: str  # "vdisk" or "qemu"
    cluster_size: int
    version: int
    extended_l2: bool
    refcount_bits: int
    size: int

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
    compressed: bool  # qemu only: one compressed cluster


@st.composite
def top_options(draw, *, makers=("vdisk", "qemu")) -> TopOptions:
    version = draw(st.sampled_from([3, 3, 2]))
    extended_l2 = version == 3 and draw(st.booleans())
    if extended_l2:
        cluster_size = draw(st.sampled_from([16 * KiB, 64 * KiB, 64 * KiB, 2 * MiB]))
    else:
        cluster_size = draw(st.sampled_from([512, 4 * KiB, 64 * KiB, 64 * KiB, 2 * MiB]))
    refcount_bits = draw(st.sampled_from([1, 2, 4, 8, 16, 32, 64])) if version == 3 else 16
    most = 6 if cluster_size >= 2 * MiB else (24 if cluster_size >= 64 * KiB else 96)
    clusters = draw(st.integers(2, most))
    tail = draw(st.sampled_from([0, 0, 512, 1536])) if cluster_size > 1536 else 0
    return TopOptions(draw(st.sampled_from(makers)), cluster_size, version, extended_l2, refcount_bits,
                      clusters * cluster_size + tail)


@st.composite
def lowers(draw, top_size: int) -> list[Lower]:
    """1..3 images under the top, base first."""
    out = []
    for level in range(draw(st.integers(1, 3))):
        maker = draw(st.sampled_from(["qemu", "vdisk", "raw"] if level == 0 else ["qemu", "vdisk"]))
        cluster_size = draw(st.sampled_from([4 * KiB, 64 * KiB] if maker == "qemu" else [512, 4 * KiB, 64 * KiB]))
        size = max(512, int(top_size * draw(st.sampled_from([1.0, 1.0, 0.5, 1.5]))) // 512 * 512)
        writes = []
        for _ in range(draw(st.integers(1, 4))):
            offset = draw(st.integers(0, size - 512)) // 512 * 512
            length = draw(st.integers(1, min(size - offset, 256 * KiB) // 512)) * 512
            writes.append((offset, length, draw(st.integers(1, 255))))
        compressed = maker == "qemu" and size >= 2 * cluster_size and draw(st.booleans())
        out.append(Lower(maker, cluster_size, size, writes, compressed))
    return out


@st.composite
def byte_range(draw, size: int, cluster_size: int) -> tuple[int, int]:
    """Ranges that are mostly cluster-shaped (aligned, whole clusters, to the end) with odd ones mixed in.

    Half of them start in the first four clusters or the last two, so operations meet each other often.
    """
    last = (size - 1) // cluster_size
    hot = sorted({0, 1, 2, 3, last - 1, last} & set(range(last + 1)))
    cluster = draw(st.sampled_from(hot) | st.integers(0, last))
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
    if shape == "to-end":
        length = room
    elif shape == "clusters":
        length = min(room, draw(st.integers(1, 3)) * cluster_size)
    else:
        length = draw(st.integers(1, min(room, 3 * cluster_size + cluster_size // 2)))
    return offset, length


@st.composite
def operations(draw, size: int, cluster_size: int) -> list[tuple]:
    ops = []
    for _ in range(draw(st.integers(1, 20))):
        kind = draw(st.sampled_from(["write", "write", "write", "zero", "zero", "discard", "discard", "read",
                                     "flush", "reopen"]))
        if kind in ("flush", "reopen"):
            ops.append((kind,))
            continue
        offset, length = draw(byte_range(size, cluster_size))
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


def build_lower(directory: Path, level: int, lower: Lower, backing: tuple[str, str] | None) -> tuple[str, str]:
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
        if lower.compressed:  # first: qemu compresses only into unallocated clusters
            middle = lower.size // lower.cluster_size // 2 * lower.cluster_size
            args += ["-c", f"write -c -P 0x5c {middle} {lower.cluster_size}"]
        for offset, length, pattern in lower.writes:
            args += ["-c", f"write -P {pattern} {offset} {length}"]
        run(*args, path)
    else:
        Qcow2Image.create(str(path), lower.size, cluster_size=lower.cluster_size,
                          backing_file=backing[0] if backing else None, backing_format=backing[1] if backing else None)
        top = open_chain(str(path))
        try:
            for offset, length, pattern in lower.writes:
                top.pwrite(random.Random(pattern).randbytes(length), offset)
        finally:
            close_chain(top)
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


# --- running a sequence ----------------------------------------------------------------------------------


def discard_in_model(model: bytearray, offset: int, length: int, cluster_size: int, size: int) -> None:
    """Whole clusters of the range read as zeros; partial ones keep their data.  The last cluster of the disk
    counts as whole when the range runs to the end (it is all the disk has of it)."""
    first = -(-offset // cluster_size) * cluster_size
    end = offset + length
    last = end if end == size else end // cluster_size * cluster_size
    if last > first:
        model[first:last] = bytes(last - first)


def run_sequence(top_path: Path, model: bytearray, ops: list[tuple], *, v2_with_backing: bool) -> None:
    top = open_chain(str(top_path))
    try:
        cluster_size, size = top.cluster_size, top.size
        assert bytes(read(top, 0, size)) == bytes(model), "initial contents differ from qemu's"
        for op in ops:
            kind = op[0]
            if kind == "write":
                _, offset, length, style, seed = op
                data = payload(style, seed, length)
                top.pwrite(data, offset)
                model[offset : offset + length] = data
            elif kind == "zero":
                _, offset, length, may_trim = op
                top.write_zeroes(offset, length, may_trim=may_trim)
                model[offset : offset + length] = bytes(length)
            elif kind == "discard":
                _, offset, length = op
                top.trim(offset, length)
                if not v2_with_backing:
                    discard_in_model(model, offset, length, cluster_size, size)
            elif kind == "read":
                _, offset, length = op
                assert read(top, offset, length) == model[offset : offset + length], op
            elif kind == "flush":
                top.flush()
            elif kind == "reopen":
                close_chain(top)
                top = open_chain(str(top_path))
        assert read(top, 0, size) == model
    finally:
        close_chain(top)


def read(top, offset: int, length: int) -> bytearray:
    buf = bytearray(length)
    top.pread(buf, offset)
    return buf


def check_with_qemu(top_path: Path, model: bytearray, directory: Path) -> None:
    assert_clean(top_path)
    model_path = directory / "model.raw"
    model_path.write_bytes(model)
    assert qemu_img_compare(top_path, model_path), "qemu-img compare: the top differs from the model"
    # Block status through the chain, as qemu-img map sees the same files.
    top = open_chain(str(top_path), read_only=True)
    try:
        ours = [e.as_json() for e in chain_map(top)]
    finally:
        close_chain(top)
    assert ours == qemu_map(top_path)


# --- the properties --------------------------------------------------------------------------------------


@st.composite
def chain_cases(draw):
    options = draw(top_options())
    return options, draw(lowers(options.size)), draw(operations(options.size, options.cluster_size))


@PROFILE
@given(case=chain_cases())
def test_random_operations_on_a_chain_agree_with_the_model(case):
    options, lower_images, ops = case
    with tempfile.TemporaryDirectory(prefix="vdisk-model-", dir=SCRATCH) as tmp:
        directory = Path(tmp)
        backing = None
        for level, lower in enumerate(lower_images):
            backing = build_lower(directory, level, lower, backing)
        top_path = build_top(directory, options, backing)
        model = bytearray(qemu_raw(top_path, directory / "initial.raw"))
        run_sequence(top_path, model, ops, v2_with_backing=options.version == 2)
        check_with_qemu(top_path, model, directory)


@st.composite
def lone_cases(draw):
    options = draw(top_options(makers=("vdisk", "vdisk", "qemu")))
    return options, draw(operations(options.size, options.cluster_size))


@LONE_PROFILE
@given(case=lone_cases())
def test_random_operations_on_an_image_without_backing_agree_with_the_model(case):
    options, ops = case
    with tempfile.TemporaryDirectory(prefix="vdisk-model-", dir=SCRATCH) as tmp:
        directory = Path(tmp)
        top_path = build_top(directory, options, None)
        model = bytearray(options.size)
        run_sequence(top_path, model, ops, v2_with_backing=False)
        check_with_qemu(top_path, model, directory)


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
        close_chain(top)
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
        close_chain(top)
    assert_clean(tmp_path / "top.qcow2")
    run("qemu-io", "-c", "read -P 0 64k 128k", "-c", "read -P 0x33 192k 64k", tmp_path / "top.qcow2")
