"""Live streams of a 200 GiB chain under guest I/O, with the smallest caches: the data equals a model, the
images are clean.

The chain base <- mid <- top is sparse: ``qemu-io`` writes scattered data over the whole disk (the first
clusters, either side of 2^32 bytes, past it, random places, the very end): whole clusters, partial ones,
zero clusters and a compressed cluster in each image, mid rewriting and zeroing some of base's.  mid has
4 KiB clusters, base and top 64 KiB ones, so one top cluster can gather its data from both.  ``vdisk serve
--l2-cache-size 1 --refcount-cache-size 1`` serves top: every image's L2 tables (400 in base and top, up to
102,400 in mid) go through a one-table cache, and the guests and the copier evict each other's tables.

Libnbd clients write, zero, trim and read at random offsets of the stripes they own (half of them on or
next to the scattered data, which the stream is copying at the same time), and read their writes back;
another client reads stripes nobody writes.  Meanwhile a full stream (``block-stream`` without base) or a
stream with ``base=base.qcow2`` runs over QMP, rate-limited so that its copying is spread over a few seconds
(the limit counts only what it copies) and the guests meet it all along.  At the end:

* every range anyone touched (the scattered data and every guest request), read over NBD, equals the model:
  a sparse raw file, ``qemu-img convert`` of the chain at the start plus every guest request;
* ``qemu-img compare`` finds top identical to the model, across the whole 200 GiB;
* ``qemu-img check`` finds top, mid and base clean (no leak either: the server shut down cleanly), and mid
  and base are byte for byte what they were;
* ``qemu-img info --backing-chain`` shows top alone (full stream) or top <- base.

CI runs one seed of each stream; ``VDISK_DEEP=1`` runs six of each, with more scattered data and more clients.
"""

from __future__ import annotations

import json
import os
import random
import tempfile
import threading
import time
from pathlib import Path

import nbd
import pytest

from tests.support.commands import run
from tests.support.images import assert_clean, chain_info, file_digest, qemu_img_compare
from tests.support.qmp import qmp_session, run_async
from tests.support.serving import serve

KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30
SIZE = 200 * GiB
CLUSTER = 64 * KiB  # base's and top's clusters; the unit of the guests' trims
MID_CLUSTER = 4 * KiB
STRIPE = 1 * GiB  # guests own whole stripes (the disk has 200), so requests that overlap come from one client
DEEP = os.environ.get("VDISK_DEEP") == "1"
SITES = 400 if DEEP else 100  # scattered data ranges per image (base; mid and top fewer)
WRITERS = 4 if DEEP else 2
SEEDS = tuple(range(1, 7)) if DEEP else (1,)
TINY_CACHE_FLAGS = ("--l2-cache-size", "1", "--refcount-cache-size", "1")
# The rate limit spreads the copying over at most about this long: guest reads copy on read and guest writes
# take clusters over, which leaves the stream less to do.
STREAM_SECONDS = 30 if DEEP else 4
# A copier that maps all 204,800 chunks of 1 MiB one by one (most of them empty) needs 40 s for that alone
# on this 2-core machine, whatever the rate limit.  The guests pause between requests: served with one-table
# caches, each request costs the server about a millisecond of the interpreter the copier runs in, and
# unpaced clients (900 requests/s) made such a walk four times slower.  The deep run pauses less.
STREAM_TIMEOUT = 1500 if DEEP else 400
GUEST_PAUSE = 0.002 if DEEP else 0.01  # seconds between two requests of one client

pytestmark = pytest.mark.timeout(1800 if DEEP else 600)

# Images live in tmpfs when there is one: with one-table caches nearly every guest write ends in a metadata
# write-back with its fdatasyncs, and on a shared disk those would set the pace of the whole test.
SCRATCH = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None


# --- the chain ---------------------------------------------------------------------------------------------


def landmarks() -> list[int]:
    """Cluster-aligned offsets every image writes near: the start, either side of 2^32, past it, the end."""
    return [0, CLUSTER, 2**32 - CLUSTER, 2**32, 2**32 + 5 * CLUSTER, 2**33 + 7 * CLUSTER, SIZE // 2,
            SIZE - 2 * CLUSTER, SIZE - CLUSTER]


def scattered_writes(rng: random.Random, count: int, pattern_base: int, *,
                     sites: list[int]) -> tuple[list[str], list[int]]:
    """qemu-io commands for ``count`` ranges at the landmarks, at or next to ``sites`` (a lower image's
    data, so the layers overlap) and anywhere: data ranges of whole or partial clusters, and zero ranges.
    Also returns the clusters they start in."""
    commands = []
    places = landmarks() + [rng.choice(sites) + rng.randrange(-2, 3) * CLUSTER for _ in range(count // 3)]
    places += [rng.randrange(SIZE // CLUSTER) * CLUSTER for _ in range(count - len(places))]
    places = [min(max(place, 0), SIZE - CLUSTER) for place in places]
    for i, place in enumerate(places):
        shape = rng.random()
        if shape < 0.15:
            commands += ["-c", f"write -z {place} {min(rng.choice([CLUSTER, 2 * CLUSTER]), SIZE - place)}"]
        elif shape < 0.4:  # part of a cluster, 512-byte aligned as qemu-io wants it
            start = rng.randrange(CLUSTER // 512) * 512
            length = rng.randrange(1, (CLUSTER - start) // 512 + 1) * 512
            commands += ["-c", f"write -P {(pattern_base + i) % 255 + 1} {place + start} {length}"]
        else:
            length = rng.choice([CLUSTER, CLUSTER, 2 * CLUSTER, 4 * CLUSTER])
            commands += ["-c", f"write -P {(pattern_base + i) % 255 + 1} {place} {min(length, SIZE - place)}"]
    # the disk's very last sector
    commands += ["-c", f"write -P {pattern_base % 255 + 1} {SIZE - 512} 512"]
    return commands, places


def build_chain(directory: Path, rng: random.Random) -> dict[str, Path]:
    """base (64 KiB clusters) <- mid (4 KiB) <- top (64 KiB), each 200 GiB with scattered data."""
    paths = {name: directory / f"{name}.qcow2" for name in ("base", "mid", "top")}
    run("qemu-img", "create", "-q", "-f", "qcow2", paths["base"], str(SIZE))
    run("qemu-img", "create", "-q", "-f", "qcow2", "-o", f"cluster_size={MID_CLUSTER}", "-b", "base.qcow2",
        "-F", "qcow2", paths["mid"], str(SIZE))
    run("qemu-img", "create", "-q", "-f", "qcow2", "-b", "mid.qcow2", "-F", "qcow2", paths["top"], str(SIZE))
    sites = landmarks()
    for name, count, pattern_base in (("base", SITES, 0x10), ("mid", SITES // 2, 0x60), ("top", SITES // 8, 0xB0)):
        # a compressed cluster first: qemu compresses only into clusters the image does not hold yet
        compressed = rng.randrange(SIZE // CLUSTER) * CLUSTER
        writes, places = scattered_writes(rng, count, pattern_base, sites=sites)
        run("qemu-io", "-f", "qcow2", "-c", f"write -c -P {pattern_base} {compressed} {CLUSTER}", *writes, paths[name])
        sites += places
    return paths


class SparseModel:
    """What the disk must read as: a sparse raw file (qemu-img's conversion of the chain at the start), which
    every guest request is applied to.  Clients own disjoint stripes, so their updates never overlap."""

    def __init__(self, path: Path):
        self._fd = os.open(path, os.O_RDWR)

    def write(self, offset: int, data: bytes) -> None:
        os.pwrite(self._fd, data, offset)

    def read(self, offset: int, length: int) -> bytes:
        return os.pread(self._fd, length, offset)

    def close(self) -> None:
        os.close(self._fd)


# --- the guests ----------------------------------------------------------------------------------------------


def pick_place(rng: random.Random, stripes: list[int], sites: list[int]) -> tuple[int, int]:
    """(stripe start, offset in it): half the time on or next to one of ``sites`` (those in ``stripes``),
    else anywhere in one of ``stripes``."""
    if sites and rng.random() < 0.5:
        site = rng.choice(sites)
        stripe_start = site // STRIPE * STRIPE
        place = site + rng.randrange(-CLUSTER, 2 * CLUSTER)
    else:
        stripe_start = rng.choice(stripes) * STRIPE
        place = stripe_start + rng.randrange(STRIPE)
    return stripe_start, min(max(place, stripe_start), stripe_start + STRIPE - 1)


class Guest:
    """One libnbd connection doing random requests in its own stripes, half of them on or next to the scattered
    data; after a write it sometimes reads the range straight back.  Every read is checked against the model."""

    KINDS = ("write", "zero", "trim", "read", "flush")
    WEIGHTS = (6, 1, 1, 3, 1)

    def __init__(self, uri: str, model: SparseModel, stripes: list[int], sites: list[int], rng: random.Random,
                 streaming: threading.Event):
        self.h = nbd.NBD()
        self.h.connect_uri(uri)
        self.model = model
        self.stripes = stripes
        owned = set(stripes)
        self.sites = [s for s in sites if s // STRIPE in owned]
        self.rng = rng
        self.streaming = streaming
        self.touched: list[tuple[int, int]] = []
        self.ops = dict.fromkeys(self.KINDS, 0)
        self.during_stream = 0
        self.errors: list[str] = []

    def _range(self, align: int = 1) -> tuple[int, int]:
        stripe_start, place = pick_place(self.rng, self.stripes, self.sites)
        stripe_end = stripe_start + STRIPE
        if align > 1:  # whole clusters of top: a trimmed whole cluster reads as zeros above a backing file
            start = place // align * align
            return start, min(self.rng.randint(1, 4) * align, stripe_end - start)
        length = self.rng.choice([1, 512, 4096, 5000, CLUSTER, 100_000, 4 * CLUSTER])
        return min(place, stripe_end - length), length

    def one(self) -> None:
        kind = self.rng.choices(self.KINDS, self.WEIGHTS)[0]
        self.ops[kind] += 1
        if self.streaming.is_set():
            self.during_stream += 1
        if kind == "write":
            offset, length = self._range()
            data = self.rng.randbytes(length)
            self.h.pwrite(data, offset)
            self.model.write(offset, data)
            self.touched.append((offset, length))
            if self.rng.random() < 0.5:
                self._read_back(offset, length)
        elif kind == "zero":
            offset, length = self._range()
            self.h.zero(length, offset, 0 if self.rng.random() < 0.5 else nbd.CMD_FLAG_NO_HOLE)
            self.model.write(offset, bytes(length))
            self.touched.append((offset, length))
        elif kind == "trim":
            offset, length = self._range(CLUSTER)
            self.h.trim(length, offset)
            self.model.write(offset, bytes(length))
            self.touched.append((offset, length))
        elif kind == "read":
            self._read_back(*self._range())
        else:
            self.h.flush()

    def _read_back(self, offset: int, length: int) -> None:
        if self.h.pread(length, offset) != self.model.read(offset, length):
            self.errors.append(f"read {offset:#x}+{length:#x} differs from the model")

    def loop(self, stop: threading.Event) -> None:
        try:
            while not stop.wait(GUEST_PAUSE):
                self.one()
        except Exception as exc:  # noqa: BLE001 - reported by the test
            self.errors.append(f"{type(exc).__name__}: {exc}")


def reader_loop(h: nbd.NBD, model: SparseModel, stripes: list[int], sites: list[int], rng: random.Random,
                stop: threading.Event, errors: list[str]) -> None:
    """Reads of stripes nobody writes (their scattered data above all): they must always show the chain's data,
    before, during and after the copy and the switch."""
    owned = set(stripes)
    sites = [s for s in sites if s // STRIPE in owned]
    try:
        while not stop.wait(GUEST_PAUSE):
            stripe_start, place = pick_place(rng, stripes, sites)
            length = rng.choice([512, 4096, CLUSTER, 4 * CLUSTER])
            offset = min(place, stripe_start + STRIPE - length)
            if h.pread(length, offset) != model.read(offset, length):
                errors.append(f"read {offset:#x}+{length:#x} of an unwritten stripe changed")
    except Exception as exc:  # noqa: BLE001 - reported by the test
        errors.append(f"{type(exc).__name__}: {exc}")


def merged_clusters(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """The ranges widened to whole 64 KiB clusters and merged, as (offset, length)."""
    merged: list[list[int]] = []
    for offset, length in sorted(ranges):
        start, end = offset // CLUSTER * CLUSTER, min(SIZE, -(-(offset + length) // CLUSTER) * CLUSTER)
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    return [(start, end - start) for start, end in merged]


# --- the test ------------------------------------------------------------------------------------------------


def chain_layout(top: Path, base: str | None) -> tuple[list[tuple[int, int]], int]:
    """From qemu-img map of top's chain: the ranges it holds (data or zero clusters, in any image), and the
    bytes the stream copies (what mid and base hold, or with base only what mid holds, where top does not)."""
    entries = json.loads(run("qemu-img", "map", "-U", "--output=json", top).stdout)
    below_base = 2 if base else 3  # depth 1 is mid, 2 is base
    held = [(e["start"], e["length"]) for e in entries if e["present"]]
    return held, sum(e["length"] for e in entries if e["present"] and 1 <= e["depth"] < below_base)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("base", [None, "base.qcow2"], ids=["full-stream", "stream-with-base"])
def test_stream_of_a_200g_chain_under_guest_io_with_tiny_caches_matches_the_model(base, seed):
    rng = random.Random(seed * 2 + (base is not None))
    with tempfile.TemporaryDirectory(prefix="vdisk-stream-scale-", dir=SCRATCH) as tmp:
        directory = Path(tmp)
        paths = build_chain(directory, rng)
        held, to_copy = chain_layout(paths["top"], base)
        sites = sorted({offset // CLUSTER * CLUSTER for offset, _ in held})
        model_path = directory / "model.raw"
        run("qemu-img", "convert", "-U", "-O", "raw", paths["top"], model_path)  # sparse: holes stay holes
        lower_digests = {name: file_digest(paths[name]) for name in ("base", "mid")}
        model = SparseModel(model_path)
        try:
            run_stream_under_guests(paths, model, held, sites, base, max(1, to_copy // STREAM_SECONDS), rng)
        finally:
            model.close()

        assert qemu_img_compare(paths["top"], model_path), "qemu-img compare: top differs from the model"
        for name in ("top", "mid", "base"):
            assert_clean(paths[name])
        assert {name: file_digest(paths[name]) for name in ("base", "mid")} == lower_digests, \
            "the stream changed a backing image"
        info = chain_info(paths["top"])
        if base is None:
            assert len(info) == 1 and "backing-filename" not in info[0], info
        else:
            assert [i["filename"] for i in info] == [str(paths["top"]), str(paths["base"])], info
            assert info[0]["backing-filename"] == "base.qcow2"


def run_stream_under_guests(paths: dict[str, Path], model: SparseModel, held: list[tuple[int, int]],
                            sites: list[int], base: str | None, speed: int, rng: random.Random) -> None:
    """Serve top with tiny caches, run the guests, stream over QMP at ``speed``, then read back everything
    touched."""
    stripes = list(range(-(-SIZE // STRIPE)))
    rng.shuffle(stripes)
    shares = [sorted(stripes[i :: WRITERS + 1]) for i in range(WRITERS + 1)]
    streaming, stop = threading.Event(), threading.Event()
    reader_errors: list[str] = []
    timings: dict[str, float] = {}

    async def stream(served) -> dict:
        async with qmp_session(served.qmp) as qmp:
            args = {"device": "drive0", "speed": speed} | ({"base": base} if base else {})
            started = time.monotonic()
            await qmp.execute("block-stream", args)
            streaming.set()
            end = await qmp.wait_gone("drive0", timeout=STREAM_TIMEOUT)
            streaming.clear()
            timings["stream"] = time.monotonic() - started
            return end

    with serve(paths["top"], "--parallel", *TINY_CACHE_FLAGS, qmp=True) as served:
        guests = [Guest(served.uri, model, shares[i], sites, random.Random(rng.random()), streaming)
                  for i in range(WRITERS)]
        reader = nbd.NBD()
        reader.connect_uri(served.uri)
        threads = [threading.Thread(target=g.loop, args=(stop,), daemon=True) for g in guests]
        threads.append(threading.Thread(target=reader_loop, daemon=True, args=(
            reader, model, shares[WRITERS], sites, random.Random(rng.random()), stop, reader_errors)))
        for t in threads:
            t.start()
        try:
            time.sleep(0.5)
            end = run_async(stream(served), timeout=STREAM_TIMEOUT + 30)
            time.sleep(0.5)  # and some I/O after the switch
        finally:
            stop.set()
            for t in threads:
                t.join(60)
        assert end["event"] == "BLOCK_JOB_COMPLETED" and "error" not in end["data"], end
        assert end["data"]["offset"] == end["data"]["len"] == SIZE, end
        for guest in guests:
            assert not guest.errors, guest.errors[:5]
        assert not reader_errors, reader_errors[:5]
        assert all(g.during_stream and all(g.ops.values()) for g in guests), \
            [(g.during_stream, g.ops) for g in guests]

        touched = merged_clusters(held + [r for g in guests for r in g.touched])
        h = guests[0].h
        wrong = [(offset, length) for offset, length in touched
                 if h.pread(length, offset) != model.read(offset, length)]
        assert not wrong, f"{len(wrong)} of {len(touched)} touched ranges differ from the model: {wrong[:5]}"
        h.flush()
        for guest in guests:
            guest.h.shutdown()
        reader.shutdown()
    print(f"\n200 GiB {'stream with base' if base else 'full stream'} with tiny caches: {timings['stream']:.1f} s "
          f"at {speed / MiB:.1f} MiB/s, "
          f"{sum(sum(g.ops.values()) for g in guests)} guest requests ({sum(g.during_stream for g in guests)} during "
          f"the stream), {len(held)} scattered ranges, {len(touched)} touched ranges read back")
