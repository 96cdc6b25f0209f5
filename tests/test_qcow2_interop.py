"""QEMU is the oracle: vdisk reads what qemu-img makes, and qemu-img finds what vdisk makes clean.

Direction 1 (``IMAGES``): images made by ``qemu-img``/``qemu-io`` with each option (cluster sizes 512 B to
2 MiB, zlib and zstd compression, extended L2 with subcluster writes/zeroes, refcount widths 1..64, compat
0.10, plain and preallocated zero clusters, discards, internal snapshots, chains of 2-4 images with relative
and absolute names, raw bases, backing files shorter and longer than the image above).  For each one:
our pread of the whole disk equals ``qemu-img convert -O raw``; ``vdisk map``, ``vdisk info --backing-chain``
and ``vdisk check`` (all ``--output=json``) equal ``qemu-img``'s; and a fixed sequence of writes, zeroes and
discards made by vdisk on top of it leaves an image ``qemu-img check`` finds clean and ``qemu-img compare``
finds identical to a bytearray model.

Direction 2 (``CREATE_OPTIONS``): images made by vdisk with every create option, then written: ``qemu-img info``
reports the options, ``qemu-img check`` finds them clean and ``qemu-img compare``/``qemu-io read -P`` read the
model's bytes.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import struct
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.support.commands import run
from tests.support.images import assert_clean, qemu_img_check, qemu_img_compare, qemu_raw
from vdisk import errors
from vdisk.cli import main as cli
from vdisk.block.chain import open_chain
from vdisk.formats.qcow2 import format as fmt
from vdisk.formats.qcow2.image import Qcow2Image

pytestmark = pytest.mark.timeout(120)

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB
WHOLE_READ_LIMIT = 64 * MiB  # larger (sparse) disks are compared region by region


# --- running qemu and vdisk ------------------------------------------------------------------------------


def qemu_img(*args) -> None:
    run("qemu-img", *args)


def qemu_io(path: Path, *commands: str, fmt_name: str = "qcow2") -> None:
    args = ["qemu-io", "-f", fmt_name]
    for command in commands:
        args += ["-c", command]
    run(*args, path)


def vdisk_json(capsys, *args: str):
    """Run a vdisk command in this process (fast); return (exit code, parsed JSON stdout)."""
    capsys.readouterr()
    code = cli.main([*args])
    out = capsys.readouterr().out
    return code, json.loads(out)


def qemu_json(*args) -> tuple[int, object]:
    proc = run("qemu-img", *args, check=False)
    assert proc.returncode in (0, 2, 3), proc.stderr
    return proc.returncode, json.loads(proc.stdout)


def common_keys(a: list[dict], b: list[dict]) -> set[str]:
    """Keys both sides know (e.g. a newer qemu-img's "compressed" is dropped when vdisk lacks it)."""
    keys_a = set().union(*(e.keys() for e in a)) if a else set()
    keys_b = set().union(*(e.keys() for e in b)) if b else set()
    return keys_a & keys_b


def read_all(path: Path | str, guest_offset: int = 0, length: int | None = None) -> bytes:
    top = open_chain(str(path), read_only=True, force_share=True)
    try:
        length = top.size - guest_offset if length is None else length
        buf = bytearray(length)
        top.pread(buf, guest_offset)
        return bytes(buf)
    finally:
        top.close()


# --- direction 1: images qemu makes ---------------------------------------------------------------------


@dataclasses.dataclass
class Made:
    """An image built by qemu tools: its top file, and the regions worth comparing byte for byte."""

    id: str
    build: Callable[[Path], Path]
    sparse: bool = False  # too big to read whole; compare ``regions`` only
    regions: tuple[tuple[int, int], ...] = ()
    writable: bool = True  # False: vdisk refuses to write it (internal snapshots)


def create(path: Path, size: str | None = None, *options: str, backing: str | None = None,
           backing_fmt: str = "qcow2") -> Path:
    args = ["create", "-q", "-f", "qcow2"]
    if options:
        args += ["-o", ",".join(options)]
    if backing:
        args += ["-b", backing, "-F", backing_fmt]
    qemu_img(*args, path, *([size] if size else []))
    return path


def everything(cluster_size: int) -> list[str]:
    """qemu-io commands that leave every kind of L2 entry: data, zero plain/preallocated, discarded, compressed."""
    c = max(cluster_size, 64 * KiB)
    return [
        "write -P 0x11 0 100k",
        "write -P 0x12 150k 7k",
        f"write -P 0x19 {1 * MiB + 3 * 512} 1000",
        "write -z 200k 64k",  # over unallocated: a plain zero cluster
        "write -P 0x13 320k 128k",
        "write -z 320k 64k",  # over data, no unmap: zero, allocation kept (preallocated zero)
        "write -P 0x14 512k 128k",
        "write -z -u 512k 64k",  # with unmap: allocation dropped
        "write -P 0x15 1536k 256k",
        "discard 1536k 128k",
        f"write -c -P 0x16 {2 * MiB} {c}",  # qemu compresses only into unallocated clusters
        f"write -P 0x17 {2 * MiB + c} 64k",
    ]


def _cluster_size_image(cluster_size: int) -> Callable[[Path], Path]:
    def build(d: Path) -> Path:
        image = create(d / "img.qcow2", "5M", f"cluster_size={cluster_size}")
        qemu_io(image, *everything(cluster_size))
        return image

    return build


def _extended_l2(cluster_size: int, backed: bool) -> Callable[[Path], Path]:
    sub = cluster_size // 32

    def build(d: Path) -> Path:
        backing = None
        if backed:
            create(d / "base.qcow2", "4M")
            qemu_io(d / "base.qcow2", "write -P 0xaa 0 4M")
            backing = "base.qcow2"
        size = str(max(4 * MiB, 8 * cluster_size))
        image = create(d / "img.qcow2", size, "extended_l2=on", f"cluster_size={cluster_size}", backing=backing)
        qemu_io(
            image,
            f"write -P 0x21 0 {2 * sub}",  # two whole subclusters
            f"write -P 0x22 {3 * sub} {sub}",
            f"write -P 0x23 {5 * sub + 100} 300",  # inside one subcluster: copy-on-write of that subcluster only
            f"write -z {cluster_size} {sub}",  # zero subcluster of an unallocated cluster
            f"write -P 0x24 {2 * cluster_size} {cluster_size}",
            f"write -z {2 * cluster_size + 2 * sub} {2 * sub}",  # zero subclusters inside an allocated cluster
            f"write -z -u {2 * cluster_size + 8 * sub} {sub}",
            f"write -P 0x25 {4 * cluster_size} {2 * cluster_size}",
            f"discard {4 * cluster_size} {cluster_size}",  # whole cluster
            f"discard {5 * cluster_size + sub} {sub}",  # a subcluster: QEMU ignores partial discards
            f"write -c -P 0x26 {6 * cluster_size} {cluster_size}",
            f"write -P 0x27 {7 * cluster_size + 7 * sub} {20 * sub}",
        )
        return image

    return build


def _refcount_bits(bits: int) -> Callable[[Path], Path]:
    def build(d: Path) -> Path:
        image = create(d / "img.qcow2", "4M", f"refcount_bits={bits}", "cluster_size=4k")
        ops = ["write -P 0x31 0 1M", "discard 256k 128k", "write -P 0x32 2M 512k", "write -z 2M 64k",
               "write -P 0x33 3M 4k"]
        if bits > 1:  # several compressed clusters share a host cluster: needs refcounts above 1
            ops.append("write -c -P 0x34 3584k 64k")
        qemu_io(image, *ops)
        return image

    return build


def _compat_010(backed: bool) -> Callable[[Path], Path]:
    def build(d: Path) -> Path:
        backing = None
        if backed:
            create(d / "base.qcow2", "4M")
            qemu_io(d / "base.qcow2", "write -P 0xbb 0 4M")
            backing = "base.qcow2"
        image = create(d / "img.qcow2", "4M", "compat=0.10", backing=backing)
        qemu_io(image, "write -P 0x41 0 256k", "write -z 64k 64k", "discard 128k 64k", "write -z 1M 128k",
                "write -c -P 0x42 2M 64k", "write -P 0x43 3M 1000")
        return image

    return build


def _zstd_convert(d: Path) -> Path:
    src = d / "src.raw"
    src.write_bytes(b"")
    os.truncate(src, 4 * MiB)
    qemu_io(src, "write -P 0x51 0 1M", "write -P 0x52 2M 100k", fmt_name="raw")
    image = d / "img.qcow2"
    qemu_img("convert", "-c", "-O", "qcow2", "-o", "compression_type=zstd", src, image)
    return image


def _zlib_convert(d: Path) -> Path:
    src = d / "src.raw"
    # incompressible and compressible halves side by side
    src.write_bytes(b"".join(os.urandom(32 * KiB) + bytes([i]) * (32 * KiB) for i in range(64)))
    image = d / "img.qcow2"
    qemu_img("convert", "-c", "-O", "qcow2", "-o", "cluster_size=16k", src, image)
    return image


def _zstd_qemu_io(d: Path) -> Path:
    image = create(d / "img.qcow2", "4M", "compression_type=zstd", "cluster_size=8k")
    qemu_io(image, "write -c -P 0x61 0 64k", "write -P 0x62 8k 8k", "write -c -P 0x63 1M 1M",
            "write -z 1M 8k", "discard 1040k 16k")
    return image


def _chain_relative(depth: int) -> Callable[[Path], Path]:
    """depth images with relative names; each writes its own pattern over a shifting range."""

    def build(d: Path) -> Path:
        prev = None
        for level in range(depth):
            image = create(d / f"l{level}.qcow2", "4M", backing=prev)
            offset = level * 512 * KiB
            qemu_io(image, f"write -P {0x70 + level} {offset} 1M", f"write -z {offset + 64 * KiB} 64k",
                    f"discard {offset + 256 * KiB} 64k")
            prev = image.name
        return image

    return build


def _chain_absolute_in_subdirs(d: Path) -> Path:
    """a <- sub/b ("../a.qcow2") <- sub/deeper/c (absolute path of b) <- top ("sub/deeper/c.qcow2")."""
    (d / "sub" / "deeper").mkdir(parents=True)
    a = create(d / "a.qcow2", "4M")
    qemu_io(a, "write -P 0x81 0 4M")
    b = create(d / "sub" / "b.qcow2", None, backing="../a.qcow2")
    qemu_io(b, "write -P 0x82 1M 1M")
    c = create(d / "sub" / "deeper" / "c.qcow2", None, backing=str(b))
    qemu_io(c, "write -P 0x83 1536k 64k", "write -z 3M 128k")
    top = create(d / "top.qcow2", None, backing="sub/deeper/c.qcow2")
    qemu_io(top, "write -P 0x84 2M 4k")
    return top


def _raw_base(d: Path) -> Path:
    base = d / "base.raw"
    with open(base, "wb") as f:
        f.truncate(3 * MiB)  # shorter than the images above it, with holes
    qemu_io(base, "write -P 0x91 0 1M", "write -P 0x92 2M 64k", fmt_name="raw")
    mid = create(d / "mid.qcow2", "4M", backing="base.raw", backing_fmt="raw")
    qemu_io(mid, "write -P 0x93 512k 64k")
    top = create(d / "top.qcow2", "4M", backing="mid.qcow2")
    qemu_io(top, "write -P 0x94 2560k 1M")
    return top


def _short_middle(d: Path) -> Path:
    """A (4M, full) <- B (1M: hides A past 1M) <- C (4M): C reads zeros where B ends, not A's data."""
    a = create(d / "a.qcow2", "4M")
    qemu_io(a, "write -P 0xa1 0 4M")
    b = create(d / "b.qcow2", "1M", backing="a.qcow2")
    qemu_io(b, "write -P 0xa2 512k 64k")
    c = create(d / "c.qcow2", "4M", backing="b.qcow2")
    qemu_io(c, "write -P 0xa3 3M 64k")
    return c


def _longer_backing(d: Path) -> Path:
    a = create(d / "a.qcow2", "8M")
    qemu_io(a, "write -P 0xb1 0 8M")
    b = create(d / "b.qcow2", "2M", backing="a.qcow2")
    qemu_io(b, "write -P 0xb2 1M 4k")
    return b


def _mixed_chain(d: Path) -> Path:
    """Every node different: v2 4k <- extended L2 32k <- zstd 2M <- 512 B refcount_bits=8."""
    a = create(d / "a.qcow2", "6M", "compat=0.10", "cluster_size=4k")
    qemu_io(a, "write -P 0xc1 0 5M", "write -c -P 0xc9 5M 64k")
    b = create(d / "b.qcow2", "6M", "extended_l2=on", "cluster_size=32k", backing="a.qcow2")
    qemu_io(b, "write -P 0xc2 1M 3k", "write -z 1200k 1k", "discard 2M 64k")
    c = create(d / "c.qcow2", "6M", "compression_type=zstd", "cluster_size=2M", backing="b.qcow2")
    qemu_io(c, "write -c -P 0xc3 2M 2M", "write -P 0xc4 100k 4k")
    top = create(d / "top.qcow2", "6M", "cluster_size=512", "refcount_bits=8", backing="c.qcow2")
    qemu_io(top, "write -P 0xc5 3M 3000", "write -z 4M 1M")
    return top


def _odd_size(d: Path) -> Path:
    image = create(d / "img.qcow2", str(5 * MiB + 3 * 512), "cluster_size=64k")
    qemu_io(image, f"write -P 0xd1 {5 * MiB - 1024} 2560", f"write -z {5 * MiB} 1536")
    return image


def _sparse_huge(d: Path) -> Path:
    image = create(d / "img.qcow2", "1T", "cluster_size=64k")
    qemu_io(image, "write -P 0xe1 0 64k", f"write -P 0xe2 {700 * GiB} 128k", f"write -z {900 * GiB} 1M",
            f"write -P 0xe3 {1024 * GiB - 4096} 4k")
    return image


def _internal_snapshot(d: Path) -> Path:
    image = create(d / "img.qcow2", "2M")
    qemu_io(image, "write -P 0xf1 0 256k")
    qemu_img("snapshot", "-c", "snap1", image)
    qemu_io(image, "write -P 0xf2 64k 256k", "discard 0 64k")
    return image


def _lazy_refcounts(d: Path) -> Path:
    image = create(d / "img.qcow2", "2M", "lazy_refcounts=on")
    qemu_io(image, "write -P 0xf3 0 300k")
    return image


def _preallocated(mode: str) -> Callable[[Path], Path]:
    def build(d: Path) -> Path:
        image = create(d / "img.qcow2", "3M", f"preallocation={mode}", "cluster_size=16k")
        qemu_io(image, "write -P 0xf4 64k 4k", "write -z 1M 64k", "discard 2M 32k")
        return image

    return build


def _chain4(d: Path) -> Path:
    """conftest's chain4: A <- B <- C <- D, as the brief describes it."""
    paths = {name: d / f"{name}.qcow2" for name in "ABCD"}
    create(paths["A"], "8M")
    qemu_io(paths["A"], "write -P 0xa1 0 4M")
    create(paths["B"], None, backing="A.qcow2")
    qemu_io(paths["B"], "write -P 0xb2 1M 1M", "write -z 3M 64k", "write -P 0xb3 6M 512k")
    create(paths["C"], None, backing="B.qcow2")
    qemu_io(paths["C"], "write -P 0xc3 1536k 256k", "write -c -P 0xc4 7M 64k")
    create(paths["D"], None, backing="C.qcow2")
    return paths["D"]


IMAGES = [
    *(Made(f"cluster-{cs // KiB or cs}{'k' if cs >= KiB else ''}", _cluster_size_image(cs))
      for cs in (512, 4 * KiB, 64 * KiB, 2 * MiB)),
    Made("extended-l2-64k", _extended_l2(64 * KiB, backed=False)),
    Made("extended-l2-64k-backed", _extended_l2(64 * KiB, backed=True)),
    Made("extended-l2-16k-backed", _extended_l2(16 * KiB, backed=True)),
    Made("extended-l2-2M", _extended_l2(2 * MiB, backed=False)),
    *(Made(f"refcount-bits-{bits}", _refcount_bits(bits)) for bits in (1, 2, 4, 8, 32, 64)),
    Made("compat-0.10", _compat_010(backed=False)),
    Made("compat-0.10-backed", _compat_010(backed=True)),
    Made("zstd-convert", _zstd_convert),
    Made("zlib-convert-16k", _zlib_convert),
    Made("zstd-qemu-io-8k", _zstd_qemu_io),
    Made("chain-2-relative", _chain_relative(2)),
    Made("chain-3-relative", _chain_relative(3)),
    Made("chain-4-relative", _chain_relative(4)),
    Made("chain-4-absolute-subdirs", _chain_absolute_in_subdirs),
    Made("chain-4-brief", _chain4),
    Made("raw-base-shorter", _raw_base),
    Made("short-middle", _short_middle),
    Made("longer-backing", _longer_backing),
    Made("mixed-chain", _mixed_chain),
    Made("odd-size", _odd_size),
    Made("sparse-1T", _sparse_huge, sparse=True,
         regions=((0, MiB), (700 * GiB - 64 * KiB, MiB), (900 * GiB, 2 * MiB), (1024 * GiB - MiB, MiB))),
    Made("internal-snapshot", _internal_snapshot, writable=False),
    Made("lazy-refcounts", _lazy_refcounts),
    *(Made(f"preallocation-{mode}", _preallocated(mode)) for mode in ("metadata", "falloc", "full")),
]
IDS = [m.id for m in IMAGES]


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Callable[[Made], Path]:
    """Build each qemu image once per module; tests that write get a copy (see ``writable_copy``)."""
    cache: dict[str, Path] = {}

    def get(made: Made) -> Path:
        if made.id not in cache:
            cache[made.id] = made.build(tmp_path_factory.mktemp(made.id))
        return cache[made.id]

    return get


@pytest.mark.parametrize("made", IMAGES, ids=IDS)
def test_vdisk_reads_what_qemu_img_convert_reads(made: Made, built, tmp_path: Path):
    image = built(made)
    if not made.sparse:
        assert read_all(image) == qemu_raw(image, tmp_path / "qemu.raw")
        return
    for guest_offset, length in made.regions:
        # A raw node with offset/size over the qcow2 node: qemu reads just that window.
        window = f"driver=raw,offset={guest_offset},size={length},file.driver=qcow2,file.file.filename={image}"
        run("qemu-img", "convert", "-U", "--image-opts", window, "-O", "raw", tmp_path / "r.raw")
        assert read_all(image, guest_offset, length) == (tmp_path / "r.raw").read_bytes(), guest_offset


def assert_maps_equal(image: Path, capsys) -> None:
    _, theirs = qemu_json("map", "-U", "--output=json", image)
    code, ours = vdisk_json(capsys, "map", "-U", "--output=json", str(image))
    assert code == 0
    keys = common_keys(theirs, ours)
    assert {"start", "length", "depth", "zero", "data"} <= keys
    strip = lambda entries: [{k: v for k, v in e.items() if k in keys} for e in entries]
    assert strip(ours) == strip(theirs)


@pytest.mark.parametrize("made", IMAGES, ids=IDS)
def test_vdisk_map_equals_qemu_img_map(made: Made, built, capsys):
    assert_maps_equal(built(made), capsys)


INFO_KEYS = ("virtual-size", "filename", "format", "cluster-size", "backing-filename", "full-backing-filename",
             "backing-filename-format", "dirty-flag", "format-specific")


@pytest.mark.parametrize("made", IMAGES, ids=IDS)
def test_vdisk_info_backing_chain_agrees_with_qemu_img_info(made: Made, built, capsys):
    image = built(made)
    _, theirs = qemu_json("info", "-U", "--backing-chain", "--output=json", image)
    code, ours = vdisk_json(capsys, "info", "-U", "--backing-chain", "--output=json", str(image))
    assert code == 0
    assert len(ours) == len(theirs)
    for node_ours, node_theirs in zip(ours, theirs):
        pick = lambda info: {k: info.get(k) for k in INFO_KEYS}
        assert pick(node_ours) == pick(node_theirs)


@pytest.mark.parametrize("made", IMAGES, ids=IDS)
def test_vdisk_check_agrees_with_qemu_img_check(made: Made, built, capsys):
    image = built(made)
    qemu_code, theirs = qemu_json("check", "-U", "--output=json", image)
    code, ours = vdisk_json(capsys, "check", "-U", "--output=json", str(image))
    assert (code, ours.get("corruptions", 0), ours.get("leaks", 0)) == (0, 0, 0), ours
    assert qemu_code == 0
    for key in ("image-end-offset", "total-clusters", "allocated-clusters", "check-errors"):
        assert ours.get(key) == theirs.get(key), key


# --- vdisk writing over qemu's images -----------------------------------------------------------------


def write_sequence(cluster_size: int, size: int) -> list[tuple]:
    """A fixed mix of writes, zeroes (may_trim both ways) and discards, in whole and partial clusters."""
    c = cluster_size
    ops: list[tuple] = [
        ("write", 0, 3 * c + 100, 0x01),
        ("write", 10 * c - 300, 700, 0x02),  # straddles a cluster boundary, both halves partial
        ("zero", 5 * c + 17, 2 * c, True),  # partial head, whole cluster, partial tail
        ("zero", 12 * c, 3 * c, False),
        ("trim", 0, 2 * c),  # whole clusters of data written above
        ("trim", 20 * c + 1, c),  # partial: leaves the data
        ("flush",),
        ("write", 2 * MiB + 512, 4096, 0x03),  # over compressed clusters in most images
        ("zero", 2 * MiB + 2 * c, c, True),
        ("trim", 2 * MiB + 3 * c, c),
        ("reopen",),
        ("write", 1536 * KiB, 64 * KiB, 0x04),
        ("write", size - 1000, 1000, 0x05),  # the last (maybe partial) cluster
        ("zero", size - 3 * c, 3 * c, False),
        ("write", size - 2 * c + 5, 11, 0x06),
    ]
    return [op for op in ops if op[0] in ("flush", "reopen") or (op[1] >= 0 and op[1] + op[2] <= size)]


def apply(top, model: bytearray, op: tuple, v3_or_no_backing: bool) -> None:
    """Apply ``op`` to the vdisk image and to the model with the same semantics as QEMU's."""
    kind = op[0]
    if kind == "write":
        _, offset, length, pattern = op
        data = bytes([pattern]) * length
        top.pwrite(data, offset)
        model[offset : offset + length] = data
    elif kind == "zero":
        _, offset, length, may_trim = op
        top.write_zeroes(offset, length, may_trim=may_trim)
        model[offset : offset + length] = bytes(length)
    elif kind == "trim":
        _, offset, length = op
        top.trim(offset, length)
        if v3_or_no_backing:  # whole clusters read as zeros; partial ones keep their data
            cs = top.cluster_size
            first = -(-offset // cs) * cs
            end = offset + length
            last = end if end == top.size else end // cs * cs
            if last > first:
                model[first:last] = bytes(last - first)


def writable_copy(made: Made, built, tmp_path: Path) -> Path:
    """A copy of the image's directory (every builder leaves the top image at its root)."""
    source = built(made)
    shutil.copytree(source.parent, tmp_path / "w", symlinks=True)
    # Relative names resolve inside the copy; absolute names still reach the (read-only) originals.
    return tmp_path / "w" / source.name


@pytest.mark.parametrize("made", [m for m in IMAGES if not m.sparse], ids=[m.id for m in IMAGES if not m.sparse])
def test_vdisk_writes_over_qemu_images_stay_clean_and_identical(made: Made, built, tmp_path: Path, capsys):
    image = writable_copy(made, built, tmp_path)
    model = bytearray(qemu_raw(image, tmp_path / "before.raw"))
    if not made.writable:
        with pytest.raises(errors.UnsupportedFeature, match="snapshot"):
            open_chain(str(image))
        return
    top = open_chain(str(image))
    try:
        v3_or_no_backing = top.top.header.version >= 3 or len(top.nodes) == 1
        for op in write_sequence(top.top.cluster_size, top.size):
            if op[0] == "flush":
                top.flush()
            elif op[0] == "reopen":
                top.close()
                top = open_chain(str(image))
            else:
                apply(top, model, op, v3_or_no_backing)
        buf = bytearray(top.size)
        top.pread(buf, 0)
        assert buf == model
    finally:
        top.close()
    (tmp_path / "model.raw").write_bytes(model)
    for node in _chain_files(image):
        assert_clean(node)
    assert qemu_img_compare(image, tmp_path / "model.raw")
    assert_maps_equal(image, capsys)  # what vdisk wrote, qemu-img maps as vdisk does


def _chain_files(image: Path) -> list[str]:
    top = open_chain(str(image), read_only=True, force_share=True)
    try:
        return [n.path for n in top.nodes if n.format_name == "qcow2"]
    finally:
        top.close()


# --- check on damaged images agrees with qemu-img check -----------------------------------------------


def _refcount_entry(path: Path, cluster_index: int) -> int:
    """File offset of a 16-bit refcount entry."""
    data = path.read_bytes()
    cluster_bits = struct.unpack_from(">I", data, 20)[0]
    per_block = (1 << cluster_bits) // 2
    reftable = struct.unpack_from(">Q", data, 48)[0]
    block = struct.unpack_from(">Q", data, reftable + 8 * (cluster_index // per_block))[0]
    return block + 2 * (cluster_index % per_block)


def _set_refcount(path: Path, cluster_index: int, value: int) -> None:
    entry = _refcount_entry(path, cluster_index)
    with open(path, "r+b") as f:
        f.seek(entry)
        f.write(struct.pack(">H", value))


def _data_cluster(path: Path) -> int:
    """The host cluster of guest cluster 0 (a data cluster in the damaged images)."""
    data = path.read_bytes()
    cluster_bits = struct.unpack_from(">I", data, 20)[0]
    l1 = struct.unpack_from(">Q", data, 40)[0]
    l2 = struct.unpack_from(">Q", data, l1)[0] & fmt.L1E_OFFSET_MASK
    return (struct.unpack_from(">Q", data, l2)[0] & fmt.L2E_OFFSET_MASK) >> cluster_bits


def _leak(path: Path) -> None:
    end_cluster = -(-path.stat().st_size // 65536)
    os.truncate(path, (end_cluster + 2) * 65536)
    _set_refcount(path, end_cluster, 1)
    _set_refcount(path, end_cluster + 1, 3)


def _freed_but_counted(path: Path) -> None:
    # A cluster inside the file that qemu freed (the discard) gets its refcount back.
    data = path.read_bytes()
    free = [i for i in range(len(data) // 65536) if not struct.unpack_from(">H", data, _refcount_entry(path, i))[0]]
    assert free
    _set_refcount(path, free[0], 1)


def _lowered(path: Path) -> None:
    _set_refcount(path, _data_cluster(path), 0)


def _raised(path: Path) -> None:  # refcount 2 under a COPIED entry: a leak and a COPIED-flag error
    _set_refcount(path, _data_cluster(path), 2)


def _l2_refcount_zero(path: Path) -> None:
    data = path.read_bytes()
    l1 = struct.unpack_from(">Q", data, 40)[0]
    l2 = struct.unpack_from(">Q", data, l1)[0] & fmt.L1E_OFFSET_MASK
    _set_refcount(path, l2 >> 16, 0)


def _copied_flag_cleared(path: Path) -> None:
    data = path.read_bytes()
    l1 = struct.unpack_from(">Q", data, 40)[0]
    l2 = struct.unpack_from(">Q", data, l1)[0] & fmt.L1E_OFFSET_MASK
    entry = struct.unpack_from(">Q", data, l2)[0]
    with open(path, "r+b") as f:
        f.seek(l2)
        f.write(struct.pack(">Q", entry & ~fmt.OFLAG_COPIED))


DAMAGE = {
    "leak": _leak,
    "freed-but-counted": _freed_but_counted,
    "lowered-refcount": _lowered,
    "raised-refcount": _raised,
    "l2-table-refcount-zero": _l2_refcount_zero,
    "copied-flag-cleared": _copied_flag_cleared,
}


@pytest.mark.parametrize("damage", DAMAGE, ids=list(DAMAGE))
def test_vdisk_check_counts_damage_like_qemu_img_check(damage: str, tmp_path: Path, capsys):
    image = create(tmp_path / "img.qcow2", "4M")
    qemu_io(image, "write -P 1 0 512k", "write -c -P 2 1M 64k", "discard 64k 64k")
    DAMAGE[damage](image)
    qemu_code, theirs = qemu_json("check", "--output=json", image)
    code, ours = vdisk_json(capsys, "check", "--output=json", str(image))
    assert qemu_code != 0
    assert code == qemu_code
    for key in ("corruptions", "leaks", "check-errors", "image-end-offset", "total-clusters", "allocated-clusters"):
        assert ours.get(key, 0) == theirs.get(key, 0), (key, ours, theirs)


@pytest.mark.parametrize("damage", DAMAGE, ids=list(DAMAGE))
@pytest.mark.parametrize("mode", ["leaks", "all"])
def test_vdisk_check_repair_matches_qemu_img_check_repair(damage: str, mode: str, tmp_path: Path, capsys):
    image = create(tmp_path / "img.qcow2", "4M")
    qemu_io(image, "write -P 1 0 512k", "write -c -P 2 1M 64k", "discard 64k 64k")
    DAMAGE[damage](image)
    twin = tmp_path / "twin.qcow2"
    shutil.copy(image, twin)
    proc = run("qemu-img", "check", "-r", mode, "--output=json", twin, check=False)
    code, ours = vdisk_json(capsys, "check", "-r", mode, "--output=json", str(image))
    assert code == proc.returncode, proc.stderr
    if proc.returncode == 1:  # "need to rebuild refcount structures": qemu-img repairs nothing, prints no JSON
        assert "rebuild" in proc.stderr and ours["check-errors"] == 1
        assert image.read_bytes() == twin.read_bytes()
        return
    theirs = json.loads(proc.stdout)
    for key in ("corruptions", "leaks", "corruptions-fixed", "leaks-fixed", "check-errors"):
        assert ours.get(key, 0) == theirs.get(key, 0), (key, ours, theirs)
    after_theirs, after_ours = qemu_img_check(twin), qemu_img_check(image)
    for key in ("corruptions", "leaks"):
        assert after_ours.get(key, 0) == after_theirs.get(key, 0), (key, after_ours, after_theirs)
    assert read_all(image) == read_all(twin)


@pytest.mark.parametrize("cluster_size", [512, 65536])
def test_a_refcount_past_the_end_of_the_file_is_no_leak_to_either_check(cluster_size: int, tmp_path: Path, capsys):
    """Found by the deep SIGKILL runs: a cluster claimed at the end of the file whose data a crash never wrote
    leaves a refcount one cluster past the end.  QEMU's check compares the file's clusters only; vdisk counted
    one more, so ``check -r leaks`` reported a leak qemu-img did not."""
    image = tmp_path / "img.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", "-o", f"cluster_size={cluster_size}", image, "4M")
    qemu_io(image, "write -P 1 0 64k")
    size = image.stat().st_size
    node = Qcow2Image.open(str(image))
    with node.lock:
        claimed = node.refcounts.allocate(1)  # refcount 1, nothing written there
    node.close()
    assert claimed == size and image.stat().st_size == size, "the claimed cluster did not lie past the end"
    twin = tmp_path / "twin.qcow2"
    shutil.copy(image, twin)
    theirs = json.loads(run("qemu-img", "check", "-r", "leaks", "--output=json", twin).stdout)
    code, ours = vdisk_json(capsys, "check", "-r", "leaks", "--output=json", str(image))
    assert code == 0
    for key in ("corruptions", "leaks", "corruptions-fixed", "leaks-fixed", "check-errors"):
        assert ours.get(key, 0) == theirs.get(key, 0) == 0, (key, ours, theirs)


# --- direction 2: images vdisk makes ------------------------------------------------------------------


@dataclasses.dataclass
class Options:
    id: str
    cluster_size: int = 64 * KiB
    version: int = 3
    extended_l2: bool = False
    refcount_bits: int = 16
    compression_type: int = fmt.COMPRESSION_ZLIB
    backing: str | None = None  # "qcow2" or "raw": a base with a pattern, made by qemu
    size: int = 6 * MiB


CREATE_OPTIONS = [
    Options("default"),
    Options("cluster-512", cluster_size=512),
    Options("cluster-4k", cluster_size=4 * KiB),
    Options("cluster-2M", cluster_size=2 * MiB, size=7 * MiB),
    Options("extended-l2", extended_l2=True),
    Options("extended-l2-16k-backed", cluster_size=16 * KiB, extended_l2=True, backing="qcow2"),
    Options("extended-l2-2M", cluster_size=2 * MiB, extended_l2=True),
    *(Options(f"refcount-bits-{bits}", refcount_bits=bits, cluster_size=4 * KiB) for bits in (1, 2, 4, 8, 32, 64)),
    Options("compat-0.10", version=2),
    Options("compat-0.10-backed", version=2, backing="qcow2"),
    Options("zstd", compression_type=fmt.COMPRESSION_ZSTD),
    Options("backed-qcow2", backing="qcow2"),
    Options("backed-raw", backing="raw"),
    Options("odd-size-backed", size=6 * MiB + 1536, backing="qcow2"),
]


def _make_base(tmp_path: Path, kind: str, size: int) -> str:
    if kind == "raw":
        base = tmp_path / "base.raw"
        with open(base, "wb") as f:
            f.truncate(size - MiB)  # a shorter backing file: zeros past its end
        qemu_io(base, "write -P 0xee 0 2M", f"write -P 0xef {size - 2 * MiB - 4096} 4096", fmt_name="raw")
    else:
        base = create(tmp_path / "base.qcow2", str(size))
        half = size // 2 // MiB * MiB
        qemu_io(base, f"write -P 0xee 0 {half}", f"write -c -P 0xed {half} 1M")
    return base.name


@pytest.mark.parametrize("options", CREATE_OPTIONS, ids=[o.id for o in CREATE_OPTIONS])
def test_vdisk_made_image_is_clean_and_read_identically_by_qemu(options: Options, tmp_path: Path, capsys):
    o = options
    backing = _make_base(tmp_path, o.backing, o.size) if o.backing else None
    image = tmp_path / "img.qcow2"
    Qcow2Image.create(str(image), o.size, cluster_size=o.cluster_size, version=o.version, extended_l2=o.extended_l2,
                      refcount_bits=o.refcount_bits, compression_type=o.compression_type, backing_file=backing,
                      backing_format=o.backing)

    # qemu-img sees the options it was created with, and a clean empty image.
    _, info = qemu_json("info", "--output=json", image)
    assert info["virtual-size"] == o.size and info["cluster-size"] == o.cluster_size
    data = info["format-specific"]["data"]
    assert data["compat"] == ("1.1" if o.version >= 3 else "0.10")
    assert data["refcount-bits"] == o.refcount_bits
    assert data.get("extended-l2", False) == o.extended_l2
    assert data["compression-type"] == fmt.COMPRESSION_NAMES[o.compression_type]
    assert info.get("backing-filename") == backing
    assert info.get("backing-filename-format") == o.backing
    assert_clean(image)

    model = bytearray(qemu_raw(image, tmp_path / "before.raw"))
    top = open_chain(str(image))
    try:
        v3_or_no_backing = o.version >= 3 or backing is None
        for op in write_sequence(o.cluster_size, o.size):
            if op[0] == "flush":
                top.flush()
            elif op[0] == "reopen":
                top.close()
                top = open_chain(str(image))
            else:
                apply(top, model, op, v3_or_no_backing)
    finally:
        top.close()
    (tmp_path / "model.raw").write_bytes(model)
    assert_clean(image)
    assert qemu_img_compare(image, tmp_path / "model.raw")
    reads = []
    for guest_offset, length in ((1536 * KiB, 64 * KiB), (o.size - 2 * o.cluster_size + 5, 11), (o.size - 1000, 1000)):
        piece = model[guest_offset : guest_offset + length]
        assert piece == bytes([piece[0]]) * length
        reads += ["-c", f"read -P {piece[0]} {guest_offset} {length}"]
    run("qemu-io", *reads, image)
    assert_maps_equal(image, capsys)


def test_refcount_table_grows_and_stays_clean(tmp_path: Path):
    """512-byte clusters with 64-bit refcounts: one refcount block covers 32 KiB, the first table 2 MiB."""
    image = tmp_path / "img.qcow2"
    Qcow2Image.create(str(image), 16 * MiB, cluster_size=512, refcount_bits=64)
    img = Qcow2Image.open(str(image))
    table_before = img.header.refcount_table_offset
    chunk = bytes(range(256)) * 256
    try:
        for i in range(0, 6 * MiB, len(chunk)):
            img.pwrite(chunk, i)
        img.flush()
        img.trim(MiB, 2 * MiB)
        img.pwrite(chunk, 9 * MiB)
    finally:
        img.close()
    assert struct.unpack(">Q", image.read_bytes()[48:56])[0] != table_before
    assert_clean(image)
    model = bytearray(16 * MiB)
    for i in range(0, 6 * MiB, len(chunk)):
        model[i : i + len(chunk)] = chunk
    model[MiB : 3 * MiB] = bytes(2 * MiB)
    model[9 * MiB : 9 * MiB + len(chunk)] = chunk
    (tmp_path / "model.raw").write_bytes(model)
    assert qemu_img_compare(image, tmp_path / "model.raw")


def test_block_status_depth_matches_qemu_img_map_on_a_range(built, capsys):
    """block_status of a sub-range (what NBD extents and the stream job ask) agrees with qemu-img map."""
    image = built(next(m for m in IMAGES if m.id == "chain-4-relative"))
    top = open_chain(str(image), read_only=True, force_share=True)
    try:
        ours = [e.as_json() for e in top.block_status(700 * KiB, 2 * MiB)]
    finally:
        top.close()
    _, theirs = qemu_json("map", "-U", "--output=json", "--start-offset", str(700 * KiB),
                          "--max-length", str(2 * MiB), image)
    keys = common_keys(theirs, ours)
    merged = []
    for e in ours:  # qemu-img map merges neighbours; merge ours the same way before comparing
        if merged and all(merged[-1].get(k) == e.get(k) for k in ("depth", "present", "zero", "data")) and (
            ("offset" in e) == ("offset" in merged[-1])
            and ("offset" not in e or merged[-1]["offset"] + merged[-1]["length"] == e["offset"])
        ):
            merged[-1]["length"] += e["length"]
        else:
            merged.append(dict(e))
    assert [{k: v for k, v in e.items() if k in keys} for e in merged] == [
        {k: v for k, v in e.items() if k in keys} for e in theirs
    ]
