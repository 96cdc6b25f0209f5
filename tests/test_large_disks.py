"""Large sparse disks: writes spread over 100 GiB - 4 TiB, with caches that must evict.

The regression of issue 8: past what the L2 cache covers (the old fixed 4 MiB: 32 GiB of a 64 KiB-cluster
disk), a table loaded into a cache full of dirty tables was evicted by the lookup that loaded it, and the
write that followed changed a detached copy: after FLUSH about half of 3,000 random writes read back as
zeros and ``qemu-img check`` found the data clusters leaked.  Each case writes at random cluster-aligned
and unaligned offsets, flushes, reads everything back, and checks the image with qemu-img (check, compare
against a sparse raw model, map against ``vdisk map``).
"""

from __future__ import annotations

import json
import os
import random
import re
import time
from pathlib import Path

import nbd
import pytest

from tests.support.commands import run, vdisk
from tests.support.images import assert_clean, qemu_img_compare
from tests.support.serving import nbdkit_pid, serve
from vdisk.block import chain
from vdisk.errors import InvalidArgument
from vdisk.formats.qcow2.cache import TINY_CACHES, CacheOptions, cache_tables
from vdisk.formats.qcow2.image import Qcow2Image
from vdisk.formats.qcow2.tables import RefcountBlock

GiB, TiB = 1 << 30, 1 << 40
DEEP = bool(os.environ.get("VDISK_DEEP"))


def _writes(size: int, count: int, seed: int, cluster_size: int = 65536) -> list[tuple[int, bytes]]:
    """``count`` writes at distinct random clusters: most whole clusters, some partial (copy-on-write)."""
    rng = random.Random(seed)
    out = []
    for i, cluster in enumerate(rng.sample(range(size // cluster_size), count)):
        if i % 5 == 4:  # a partial write inside the cluster: the rest comes from the backing file (or zeros)
            start = rng.randrange(0, cluster_size - 512, 512)
            length = rng.randrange(512, cluster_size - start + 1, 512)
        else:
            start, length = 0, cluster_size
        out.append((cluster * cluster_size + start, rng.randbytes(16) * (length // 16)))
    return out


def _model(path: Path, size: int, writes: list[tuple[int, bytes]], base: dict[int, bytes] | None = None) -> Path:
    """A sparse raw file with the expected content."""
    with open(path, "wb") as f:
        f.truncate(size)
        for offset, data in list((base or {}).items()) + writes:
            f.seek(offset)
            f.write(data)
    return path


def _make(tmp_path: Path, size: int, *, backing: bool) -> tuple[Path, dict[int, bytes]]:
    """The top image; with ``backing``, over a base holding a few clusters of its own (0x5A)."""
    top = tmp_path / "top.qcow2"
    base_data: dict[int, bytes] = {}
    if backing:
        base = tmp_path / "base.qcow2"
        run("qemu-img", "create", "-q", "-f", "qcow2", base, str(size))
        rng = random.Random(size)
        for cluster in rng.sample(range(size // 65536), 64):
            base_data[cluster * 65536] = b"\x5a" * 65536
        cmds = [a for offset in base_data for a in ("-c", f"write -P 0x5a {offset} 64k")]
        run("qemu-io", *cmds, base)
        run("qemu-img", "create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", top)
    else:
        run("qemu-img", "create", "-q", "-f", "qcow2", top, str(size))
    return top, base_data


def _check_against_model(top: Path, model: Path) -> None:
    assert_clean(top)
    assert qemu_img_compare(top, model), "qemu-img compare: the image differs from the model"
    ours = json.loads(vdisk("map", "--output=json", str(top)).stdout)
    theirs = json.loads(run("qemu-img", "map", "--output=json", top).stdout)
    assert ours == theirs


CASES = [
    # (virtual size, backing file, cache options, writes): the reports first
    pytest.param(100 * GiB, True, CacheOptions(l2_cache_size=4 << 20), 3000, id="100G-backing-old-4M-cache"),
    pytest.param(1 * TiB, False, CacheOptions(l2_cache_size=4 << 20), 3000, id="1T-old-4M-cache"),
    pytest.param(4 * TiB, False, CacheOptions(), 3000, id="4T-default-cache"),
    pytest.param(100 * GiB, True, TINY_CACHES, 1000, id="100G-backing-tiny-caches"),
    pytest.param(4 * TiB, False, TINY_CACHES, 1000, id="4T-tiny-caches"),
]


@pytest.mark.parametrize("size, backing, cache, count", CASES)
def test_flushed_writes_survive_cache_eviction(tmp_path, size, backing, cache, count):
    top_path, base_data = _make(tmp_path, size, backing=backing)
    writes = _writes(size, count * (4 if DEEP else 1), seed=size + count)
    top = chain.open_chain(str(top_path), cache=cache)
    try:
        for offset, data in writes:
            top.pwrite(data, offset)
        top.flush()
        lost = []
        for offset, data in writes:
            buf = bytearray(len(data))
            top.pread(buf, offset)
            if buf != data:
                lost.append(offset)
        assert not lost, f"{len(lost)} of {len(writes)} flushed writes read back wrong (first at {lost[0]:#x})"
    finally:
        top.close()
    _check_against_model(top_path, _model(tmp_path / "model.raw", size, writes, base_data))


def test_served_random_writes_past_the_l2_cache(tmp_path):
    """The issue's report as a user ran it: vdisk serve, libnbd, 3,000 writes, FLUSH, read back."""
    size = 100 * GiB
    top_path, base_data = _make(tmp_path, size, backing=True)
    writes = _writes(size, 3000, seed=8)
    with serve(top_path, "--l2-cache-size", "4M") as served:
        h = nbd.NBD()
        h.connect_uri(served.uri)
        for offset, data in writes:
            h.pwrite(data, offset)
        h.flush()
        lost = sum(h.pread(len(data), offset) != data for offset, data in writes)
        h.shutdown()
        assert lost == 0, f"{lost} of {len(writes)} flushed writes read back wrong"
    _check_against_model(top_path, _model(tmp_path / "model.raw", size, writes, base_data))


def test_cache_sizes_follow_qemu():
    """QEMU 7.2's read_cache_sizes: the L2 default covers the disk up to 32 MiB; cache-size splits."""
    cs = 65536
    assert cache_tables(CacheOptions(), 1 * GiB, cs, 8) == (2, 4)  # 1 GiB: 128 KiB of L2 entries, two tables
    assert cache_tables(CacheOptions(), 100 * GiB, cs, 8) == (200, 4)  # 12.5 MiB covers 100 GiB
    assert cache_tables(CacheOptions(), 4 * TiB, cs, 8) == (512, 4)  # capped at 32 MiB
    assert cache_tables(CacheOptions(), 1 * TiB, cs, 16) == (512, 4)  # extended L2: 16-byte entries
    assert cache_tables(CacheOptions(l2_cache_size=4 << 20), 1 * TiB, cs, 8) == (64, 4)
    assert cache_tables(CacheOptions(cache_size=10 << 20), 1 * TiB, cs, 8) == (156, 4)  # 4 clusters of refcounts
    assert cache_tables(CacheOptions(cache_size=40 << 20), 100 * GiB, cs, 8) == (200, 440)  # the rest to refcounts
    assert cache_tables(CacheOptions(cache_size=2 << 20, l2_cache_size=1 << 20), TiB, cs, 8) == (16, 16)
    assert cache_tables(CacheOptions(cache_size=2 << 20, refcount_cache_size=1 << 20), TiB, cs, 8) == (16, 16)
    assert cache_tables(TINY_CACHES, 4 * TiB, cs, 8) == (1, 1)
    with pytest.raises(InvalidArgument, match="may not be set at the same time"):
        CacheOptions(cache_size=1, l2_cache_size=1, refcount_cache_size=1)
    with pytest.raises(InvalidArgument, match="l2-cache-size may not exceed cache-size"):
        CacheOptions(cache_size=1 << 20, l2_cache_size=2 << 20)
    with pytest.raises(InvalidArgument, match="refcount-cache-size may not exceed cache-size"):
        CacheOptions(cache_size=1 << 20, refcount_cache_size=2 << 20)


def test_idle_tables_are_dropped_and_reload(tmp_path):
    """cache-clean-interval: tables unused for one interval go; dirty ones stay; a later read reloads."""
    path = tmp_path / "a.qcow2"
    Qcow2Image.create(str(path), TiB)
    image = Qcow2Image.open(str(path))
    try:
        for k in range(8):  # eight L2 tables (each covers 512 MiB)
            image.pwrite(bytes([k + 1]) * 4096, k * 512 << 20)
        image.flush()
        assert image.clean_caches() == 0  # all used since the (first) tick
        image.pwrite(b"\xff" * 4096, 0)  # dirty and used
        dropped = image.clean_caches()
        assert dropped >= 7  # the other seven L2 tables (and any idle refcount block)
        buf = bytearray(4096)
        for k in range(1, 8):
            image.pread(buf, k * 512 << 20)
            assert buf == bytes([k + 1]) * 4096
        image.pread(buf, 0)
        assert buf == b"\xff" * 4096
    finally:
        image.close()
    assert_clean(path)


# --- the audit: every cache and size-derived limit at its boundary ----------------------------------------


def test_nbdkit_memory_stays_bounded_on_a_1tib_disk(tmp_path, capsys):
    """A 1 TiB disk under random I/O touching all of its 2,048 L2 tables: the default L2 cap (32 MiB, 512
    tables) holds, so nbdkit's resident memory stays under 150 MiB."""
    size = TiB
    path = tmp_path / "big.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", path, str(size))
    rng = random.Random(1)
    table_span = 512 << 20  # guest bytes one 64 KiB L2 table maps
    offsets = [t * table_span + rng.randrange(0, table_span, 4096) for t in range(size // table_span)]
    offsets += [rng.randrange(0, size, 4096) for _ in range(2000 if not DEEP else 20000)]
    rng.shuffle(offsets)
    with serve(path) as served:
        h = nbd.NBD()
        h.connect_uri(served.uri)
        pid = nbdkit_pid(served)
        for i, offset in enumerate(offsets):
            h.pwrite(i.to_bytes(8, "little") * 512, offset)
        h.flush()
        for i, offset in enumerate(offsets[:: 7]):
            assert h.pread(4096, offset) == (i * 7).to_bytes(8, "little") * 512
        status = Path(f"/proc/{pid}/status").read_text()
        rss_kib = int(next(line for line in status.splitlines() if line.startswith("VmRSS:")).split()[1])
        hwm_kib = int(next(line for line in status.splitlines() if line.startswith("VmHWM:")).split()[1])
        h.shutdown()
    with capsys.disabled():
        print(f"\n1 TiB disk, {len(offsets)} random 4 KiB writes over all 2048 L2 tables: "
              f"nbdkit RSS {rss_kib / 1024:.0f} MiB (peak {hwm_kib / 1024:.0f} MiB)")
    assert hwm_kib < 150 * 1024, f"nbdkit peak RSS {hwm_kib} KiB"
    assert_clean(path)


@pytest.mark.parametrize("cache", [CacheOptions(), TINY_CACHES], ids=["default-cache", "tiny-caches"])
def test_decompressed_cluster_cache_follows_rewrites(tmp_path, cache):
    """The one-cluster decompression cache is keyed by the L2 entry: a rewrite (copy-on-write of the
    compressed cluster) changes the entry, so a later read never sees the cached old cluster."""
    size = TiB
    path = tmp_path / "c.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", path, str(size))
    near_end = size - 65536
    run("qemu-io", "-c", "write -c -P 0x11 0 64k", "-c", f"write -c -P 0x22 {near_end} 64k", path)
    top = chain.open_chain(str(path), cache=cache)
    try:
        buf = bytearray(65536)
        top.pread(buf, 0)
        assert buf == b"\x11" * 65536
        top.pwrite(b"\x33" * 512, 4096)  # copy-on-write: decompress, patch, write a data cluster
        top.pread(buf, 0)
        assert buf == b"\x11" * 4096 + b"\x33" * 512 + b"\x11" * (65536 - 4608)
        top.pread(buf, near_end)
        assert buf == b"\x22" * 65536
        top.flush()
    finally:
        top.close()
    assert_clean(path)
    model = tmp_path / "model.raw"
    _model(model, size, [(0, b"\x11" * 65536), (4096, b"\x33" * 512), (near_end, b"\x22" * 65536)])
    assert qemu_img_compare(path, model)


@pytest.mark.parametrize("cache", [CacheOptions(), TINY_CACHES], ids=["default-cache", "tiny-caches"])
def test_freed_clusters_are_reused_only_after_their_pointers_are_gone(tmp_path, cache):
    """The free-cluster hint: clusters freed by a discard go back to the allocator after the flush that makes
    the discard durable, and are then handed out again; nothing reads another cluster's data."""
    path = tmp_path / "f.qcow2"
    Qcow2Image.create(str(path), 4 * TiB)
    top = chain.open_chain(str(path), cache=cache)
    spread = [k * (64 << 30) for k in range(64)]  # one cluster in each of 64 L2 tables
    try:
        for k, offset in enumerate(spread):
            top.pwrite(bytes([k + 1]) * 65536, offset)
        top.flush()
        end_before = os.path.getsize(path)
        for offset in spread[::2]:
            top.trim(offset, 65536)
        top.flush()
        top.flush()  # the second flush writes the lowered refcounts: the host clusters are free now
        for k, offset in enumerate(spread[::2]):
            top.pwrite(bytes([0x80 + k]) * 65536, offset + 65536)  # new clusters: the freed ones are reused
        top.flush()
        assert os.path.getsize(path) == end_before, "freed clusters were not reused"
        buf = bytearray(65536)
        for k, offset in enumerate(spread):
            top.pread(buf, offset)
            assert buf == (bytes(65536) if k % 2 == 0 else bytes([k + 1]) * 65536)
        for k, offset in enumerate(spread[::2]):
            top.pread(buf, offset + 65536)
            assert buf == bytes([0x80 + k]) * 65536
    finally:
        top.close()
    assert_clean(path)


@pytest.mark.parametrize("refcount_bits", [1, 4, 16, 64])
def test_allocation_across_refcount_block_boundaries(tmp_path, refcount_bits):
    """Runs that cross refcount blocks (512 B clusters: a block covers 64 to 4096 clusters) with one cached
    block: the run-length search, the allocator's per-block loop and the refcount table's growth."""
    path = tmp_path / "r.qcow2"
    Qcow2Image.create(str(path), 8 << 30, cluster_size=512, refcount_bits=refcount_bits)
    top = chain.open_chain(str(path), cache=TINY_CACHES)
    rng = random.Random(refcount_bits)
    writes = []
    try:
        for k in range(40):
            offset = rng.randrange(0, (8 << 30) - (1 << 20), 512)
            data = rng.randbytes(512) * rng.choice([1, 3, 64, 200, 1024])  # up to 512 KiB: many blocks
            writes.append((offset, data))
            top.pwrite(data, offset)
            if k % 10 == 9:  # discard an earlier write: its clusters are freed, then reused
                offset, length = writes[-6][0], len(writes[-6][1])
                top.trim(offset, length)
                writes.append((offset, bytes(length)))
                top.flush()
        top.flush()
    finally:
        top.close()
    assert_clean(path)
    assert qemu_img_compare(path, _model(tmp_path / "model.raw", 8 << 30, writes))


def _first_free_run_reference(values: list[int], start: int, count: int, stop: int) -> int | None:
    run_start = None
    for i in range(start, stop):
        if values[i] == 0:
            run_start = i if run_start is None else run_start
            if i - run_start + 1 >= count:
                return run_start
        else:
            run_start = None
    return None


@pytest.mark.parametrize("order", range(7))
def test_run_length_search_matches_a_plain_scan(order):
    """RefcountBlock.first_free_run (vectorised) against a plain loop, for every refcount width, at the
    block's edges and with runs exactly as long as asked."""
    rng = random.Random(order)
    block = RefcountBlock(0, bytearray(512), order)
    for trial in range(200):
        values = [0 if rng.random() < 0.7 else rng.randrange(1, min(1 << (1 << order), 1 << 16))
                  for _ in range(block.entries)]
        for i, v in enumerate(values):
            block.set(i, v)
        start = rng.choice([0, 1, rng.randrange(block.entries)])
        stop = rng.choice([block.entries, rng.randrange(start, block.entries + 1)])
        count = rng.choice([1, 2, 5, 17, stop - start, stop - start + 1])
        if count < 1:
            continue
        assert block.first_free_run(start, count, stop) == _first_free_run_reference(values, start, count, stop)


def test_served_cache_clean_interval_drops_idle_tables(tmp_path, monkeypatch):
    """`vdisk serve --cache-clean-interval 1`: a second after the last use, the idle tables are gone (the
    server logs it), and the data reads back from the reloaded tables."""
    path = tmp_path / "idle.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", path, str(TiB))
    monkeypatch.setenv("VDISK_LOG_LEVEL", "INFO")
    offsets = [k * (40 << 30) for k in range(20)]  # 20 L2 tables
    with serve(path, "--cache-clean-interval", "1") as served:
        h = nbd.NBD()
        h.connect_uri(served.uri)
        for k, offset in enumerate(offsets):
            h.pwrite(bytes([k + 1]) * 4096, offset)
        h.flush()
        time.sleep(2.5)  # two intervals: the first marks the tables unused, the second drops them
        for k, offset in enumerate(offsets):
            assert h.pread(4096, offset) == bytes([k + 1]) * 4096
        h.shutdown()
    log = served.proc.stderr.read()
    dropped = [int(n) for n in re.findall(r"dropped (\d+) idle cached tables", log)]
    assert dropped and max(dropped) >= len(offsets), log
    assert_clean(path)
