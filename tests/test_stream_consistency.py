"""A stream under guest I/O: the data the guest wrote always wins, whatever the order.

Three kinds of test:

* Deterministic orderings, in-process: a ``BlockDevice`` and a ``StreamCopier`` driven by threads, with the
  copier's ``before_populate`` hook (called while the chunk's COPY lock is held, after the backing data was
  read) and a gate inside the image's write path to force a guest write and the copier onto one cluster in
  each order.
* Random guest I/O against a model: libnbd clients write, zero, trim and read across a served disk while a
  stream runs; every read must equal a ``bytearray`` model, during and after; then ``qemu-img`` compares,
  checks and shows the new chain.
* SIGKILL: the server dies at a random point of a stream with writes in flight; the image must check clean
  (leaks allowed), keep every write acknowledged before the last completed flush, and stream again to the end.

The served tests run with QEMU's default caches and with the smallest (one L2 table, one refcount block), on
chains of 4 KiB or 512-byte clusters where a one-table cache must evict, reload and write back all the time
(with 64 KiB clusters one L2 table maps the whole 16 MiB disk).  ``VDISK_DEEP=1`` runs more seeds and kills.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import threading
import time
from pathlib import Path

import nbd
import pytest

from tests.support.commands import run
from tests.support.images import assert_clean, chain_info, qemu_img_check, qemu_img_compare, qemu_map, qemu_raw
from tests.support.qmp import qmp_session, run_async
from tests.support.serving import nbdkit_pid, serve
from vdisk.block import chain
from vdisk.block.device import BlockDevice
from vdisk.jobs.stream import StreamCopier

MiB = 1 << 20
CLUSTER = 65536  # the unit of the chain's layout and of the guests' trims, whatever the images' cluster size
DEEP = os.environ.get("VDISK_DEEP") == "1"
TINY_CACHE_FLAGS = ("--l2-cache-size", "1", "--refcount-cache-size", "1")

pytestmark = pytest.mark.timeout(1800 if DEEP else 120)


# --- in-process: one cluster, two parties, each order ---------------------------------------------------


@pytest.fixture
def small_chain(tmp_path: Path) -> dict[str, Path]:
    """A (4 MiB of 0xa1) <- B (0xb2 in its second MiB) <- D (empty), by qemu-img."""
    paths = {n: tmp_path / f"{n}.qcow2" for n in "ABD"}
    run("qemu-img", "create", "-q", "-f", "qcow2", paths["A"], "4M")
    run("qemu-io", "-c", "write -P 0xa1 0 4M", paths["A"])
    run("qemu-img", "create", "-q", "-f", "qcow2", "-b", "A.qcow2", "-F", "qcow2", paths["B"])
    run("qemu-io", "-c", "write -P 0xb2 1M 1M", paths["B"])
    run("qemu-img", "create", "-q", "-f", "qcow2", "-b", "B.qcow2", "-F", "qcow2", paths["D"])
    return paths


def backing_bytes(guest_offset: int, length: int) -> bytes:
    """What small_chain reads at a range before anyone writes to D."""
    return bytes(0xB2 if MiB <= o < 2 * MiB else 0xA1 for o in range(guest_offset, guest_offset + length))


def in_thread(fn, *args) -> tuple[threading.Thread, threading.Event, list]:
    """Run fn in a thread; the event is set when it returns, the list gets its exception."""
    done, errors = threading.Event(), []

    def body():
        try:
            fn(*args)
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            errors.append(exc)
        finally:
            done.set()

    thread = threading.Thread(target=body, daemon=True)
    thread.start()
    return thread, done, errors


def stream_all(copier: StreamCopier) -> None:
    position = 0
    while position < copier.length:
        position = copier.step(position)
    copier.drain()


class WriteGate:
    """Holds the image's next pwrite of a given guest range inside the write (the WRITE lock held)."""

    def __init__(self, image, guest_offset: int):
        self.entered = threading.Event()
        self.release = threading.Event()
        self._inner = image.pwrite
        self._offset = guest_offset
        image.pwrite = self

    def __call__(self, buf, guest_offset, **kwargs):
        if guest_offset == self._offset:
            self.entered.set()
            assert self.release.wait(30), "gate never released"
        return self._inner(buf, guest_offset, **kwargs)


@pytest.fixture
def device(small_chain):
    dev = BlockDevice("drive0", chain.open_chain(str(small_chain["D"])))
    yield dev
    dev.close()


GUEST = bytes(range(256)) * 4  # 1 KiB that no backing image holds
WHERE = 1 * MiB + 3 * CLUSTER + 100  # inside B's data, in the stream's second chunk


def _expected_after(writes: dict[int, bytes]) -> bytes:
    data = bytearray(backing_bytes(0, 4 * MiB))
    for offset, payload in writes.items():
        data[offset : offset + len(payload)] = payload
    return bytes(data)


def _check_device(device: BlockDevice, expected: bytes) -> None:
    got = bytearray(len(expected))
    device.pread(got, 0)
    assert bytes(got) == expected


def test_guest_write_before_the_copy_reads_is_kept_and_the_cluster_skipped(device, small_chain):
    device.pwrite(GUEST, WHERE)
    copier = StreamCopier(device, None)
    try:
        stream_all(copier)
        copier.finish()
    finally:
        copier.close()
    _check_device(device, _expected_after({WHERE: GUEST}))
    device.close()
    assert chain_info(small_chain["D"])[0].get("backing-filename") is None
    assert qemu_raw(small_chain["D"], small_chain["D"].with_suffix(".raw")) == _expected_after({WHERE: GUEST})
    assert_clean(small_chain["D"])


@pytest.mark.parametrize("request_kind", ["write", "zero", "trim"])
def test_guest_request_arriving_while_the_copy_holds_the_cluster_waits_then_wins(device, small_chain, request_kind):
    copier = StreamCopier(device, None)
    in_hook, release = threading.Event(), threading.Event()

    def hook(start: int, end: int) -> None:
        if start <= WHERE < end:
            in_hook.set()
            assert release.wait(30)

    copier.before_populate = hook
    cluster_start = WHERE // CLUSTER * CLUSTER
    if request_kind == "write":
        request, expected = (lambda: device.pwrite(GUEST, WHERE)), {WHERE: GUEST}
    elif request_kind == "zero":
        request, expected = (lambda: device.write_zeroes(cluster_start, CLUSTER)), {cluster_start: bytes(CLUSTER)}
    else:  # a whole-cluster trim of a v3 image with a backing file reads as zeros afterwards
        request, expected = (lambda: device.trim(cluster_start, CLUSTER)), {cluster_start: bytes(CLUSTER)}
    try:
        _, streamed, stream_errors = in_thread(stream_all, copier)
        assert in_hook.wait(30), "the copier never reached the chunk"
        _, guest_done, guest_errors = in_thread(request)
        assert not guest_done.wait(0.3), f"a guest {request_kind} went through a cluster being copied"
        # a read of the same cluster is not held back by the copy (it sees the same data either way)
        _, read_done, read_errors = in_thread(lambda: _check_range(device, cluster_start, CLUSTER))
        assert read_done.wait(5) and not read_errors, read_errors
        release.set()
        assert streamed.wait(30) and guest_done.wait(30)
        assert not stream_errors and not guest_errors, stream_errors + guest_errors
        copier.finish()
    finally:
        release.set()
        copier.close()
    _check_device(device, _expected_after(expected))
    device.close()
    assert qemu_raw(small_chain["D"], small_chain["D"].with_suffix(".raw")) == _expected_after(expected)
    assert_clean(small_chain["D"])


def _check_range(device: BlockDevice, offset: int, length: int) -> None:
    got = bytearray(length)
    device.pread(got, offset)
    assert bytes(got) == backing_bytes(offset, length)


def test_copy_arriving_while_a_guest_write_is_in_flight_waits_and_skips_the_cluster(device, small_chain):
    gate = WriteGate(device.top, WHERE)
    copier = StreamCopier(device, None)
    copied_chunks = []
    copier.before_populate = lambda start, end: copied_chunks.append(start)
    try:
        _, guest_done, guest_errors = in_thread(device.pwrite, GUEST, WHERE)
        assert gate.entered.wait(30)
        _, streamed, stream_errors = in_thread(stream_all, copier)
        time.sleep(0.3)
        assert not streamed.is_set(), "the copier went past a cluster with a guest write in flight"
        assert WHERE // copier.chunk * copier.chunk not in copied_chunks, \
            "the copier read the chunk while a guest write held it"
        gate.release.set()
        assert guest_done.wait(30) and streamed.wait(30)
        assert not stream_errors and not guest_errors, stream_errors + guest_errors
        copier.finish()
    finally:
        gate.release.set()
        copier.close()
    _check_device(device, _expected_after({WHERE: GUEST}))
    device.close()
    assert qemu_raw(small_chain["D"], small_chain["D"].with_suffix(".raw")) == _expected_after({WHERE: GUEST})
    assert_clean(small_chain["D"])


def test_copy_on_read_during_a_guest_write_waits_and_returns_the_new_data(device, small_chain):
    device.copy_on_read = True
    gate = WriteGate(device.top, WHERE)
    _, guest_done, guest_errors = in_thread(device.pwrite, GUEST, WHERE)
    try:
        assert gate.entered.wait(30)
        got = bytearray(CLUSTER)
        cluster_start = WHERE // CLUSTER * CLUSTER
        _, read_done, read_errors = in_thread(device.pread, got, cluster_start)
        assert not read_done.wait(0.3), "a read overtook a write in flight to the same range"
        gate.release.set()
        assert guest_done.wait(30) and read_done.wait(30)
        assert not guest_errors and not read_errors, guest_errors + read_errors
    finally:
        gate.release.set()
    assert bytes(got) == _expected_after({WHERE: GUEST})[cluster_start : cluster_start + CLUSTER]
    _check_device(device, _expected_after({WHERE: GUEST}))


def test_copy_on_read_with_a_base_fills_only_what_lies_above_it(device, small_chain):
    """While a stream with base A runs, guest reads copy B's clusters into D, never A's."""
    device.cor_active, device.cor_base = True, device.nodes()[2]
    _check_device(device, backing_bytes(0, 4 * MiB))
    device.close()
    for e in qemu_map(small_chain["D"]):
        inside_b = MiB <= e["start"] and e["start"] + e["length"] <= 2 * MiB
        assert (e["depth"] == 0) == inside_b, e
    assert_clean(small_chain["D"])


def test_serve_copy_on_read_populates_the_active_image(chain4, tmp_path):
    before = qemu_raw(chain4["D"], tmp_path / "before.raw")
    held = [(e["start"], e["length"]) for e in qemu_map(chain4["D"]) if e["present"]]
    with serve(chain4["D"], "--copy-on-read") as served:
        h = nbd.NBD()
        h.connect_uri(served.uri)
        assert h.pread(8 * MiB, 0) == before
        h.shutdown()
    after = qemu_map(chain4["D"])
    for start, length in held:
        for e in after:
            if e["start"] < start + length and start < e["start"] + e["length"]:
                assert e["depth"] == 0, f"{start:#x}+{length:#x} was read but not copied: {e}"
    assert chain_info(chain4["D"])[0]["backing-filename"] == "C.qcow2"
    assert qemu_raw(chain4["D"], tmp_path / "after.raw") == before
    assert_clean(chain4["D"])


# --- random guest I/O against a model while a served stream runs ------------------------------------------

DISK = 16 * MiB
STRIPE = 256 * 1024


def build_chain(directory: Path, seed: int, cluster_size: int = CLUSTER) -> Path:
    """A 16 MiB chain A <- B <- C <- D with data, zero and compressed clusters in each layer, every image with
    ``cluster_size`` clusters (the layout is in 64 KiB units either way)."""
    rng = random.Random(seed)
    names = {n: directory / f"{n}.qcow2" for n in "ABCD"}
    options = f"cluster_size={cluster_size}"
    run("qemu-img", "create", "-q", "-f", "qcow2", "-o", options, names["A"], "16M")
    run("qemu-io", "-c", "write -P 0xa1 0 12M", names["A"])
    backing = "A.qcow2"
    for layer, fill in (("B", 0xB2), ("C", 0xC3), ("D", 0xD4)):
        run("qemu-img", "create", "-q", "-f", "qcow2", "-o", options, "-b", backing, "-F", "qcow2", names[layer])
        commands = []
        written: set[int] = set()  # this layer's 64 KiB units so far
        for _ in range({"B": 12, "C": 6, "D": 3}[layer]):
            start = rng.randrange(0, DISK // CLUSTER - 4) * CLUSTER
            length = rng.choice([CLUSTER, 2 * CLUSTER, 4 * CLUSTER, 4096])
            kind = rng.random()
            # qemu compresses only into clusters the image does not hold yet (else the write fails, EIO)
            if kind < 0.2:
                commands += ["-c", f"write -z {start} {length}"]
            elif kind < 0.3 and length >= CLUSTER and start // CLUSTER not in written:
                commands += ["-c", f"write -c -P {fill + 1} {start} {CLUSTER}"]
            else:
                commands += ["-c", f"write -P {fill} {start} {length}"]
            written.update(range(start // CLUSTER, -(-(start + length) // CLUSTER)))
        run("qemu-io", *commands, names[layer])
        backing = f"{layer}.qcow2"
    return names["D"]


class ModelClient:
    """One libnbd connection doing random requests inside the stripes it owns, checked against the model."""

    def __init__(self, uri: str, model: bytearray, stripes: list[int], rng: random.Random):
        self.h = nbd.NBD()
        self.h.connect_uri(uri)
        self.model = model
        self.stripes = stripes
        self.rng = rng
        self.ops = {"write": 0, "zero": 0, "trim": 0, "read": 0}
        self.errors: list[str] = []

    def random_range(self, align: int = 1) -> tuple[int, int]:
        stripe = self.rng.choice(self.stripes) * STRIPE
        if align > 1:
            count = self.rng.randint(1, STRIPE // align)
            first = self.rng.randrange(0, STRIPE // align - count + 1)
            return stripe + first * align, count * align
        length = self.rng.choice([1, 512, 4096, 5000, 65536, 100_000, STRIPE])
        return stripe + self.rng.randrange(0, STRIPE - length + 1), length

    def one(self) -> None:
        kind = self.rng.choices(["write", "zero", "trim", "read"], [5, 2, 1, 4])[0]
        self.ops[kind] += 1
        if kind == "write":
            offset, length = self.random_range()
            data = self.rng.randbytes(length)
            self.h.pwrite(data, offset)
            self.model[offset : offset + length] = data
        elif kind == "zero":
            offset, length = self.random_range()
            flags = 0 if self.rng.random() < 0.5 else nbd.CMD_FLAG_NO_HOLE
            self.h.zero(length, offset, flags)
            self.model[offset : offset + length] = bytes(length)
        elif kind == "trim":
            # whole clusters only: vdisk leaves partial clusters as they are, and a trimmed whole cluster of
            # a v3 image reads as zeros (zero flag with a backing file, unallocated without one)
            offset, length = self.random_range(CLUSTER)
            self.h.trim(length, offset)
            self.model[offset : offset + length] = bytes(length)
        else:
            offset, length = self.random_range()
            got = self.h.pread(length, offset)
            if got != self.model[offset : offset + length]:
                self.errors.append(f"read {offset:#x}+{length:#x} differs from the model")

    def loop(self, stop: threading.Event) -> None:
        try:
            while not stop.is_set():
                self.one()
        except Exception as exc:  # noqa: BLE001 - reported by the test
            self.errors.append(f"{type(exc).__name__}: {exc}")


# (seed, base, --parallel, the chain's cluster size, serve flags for the caches)
RANDOM_IO_CASES = [
    pytest.param(1, None, False, CLUSTER, (), id="1-full-default-caches"),
    pytest.param(2, "A.qcow2", True, CLUSTER, (), id="2-base-parallel-default-caches"),
    pytest.param(3, None, True, CLUSTER, (), id="3-full-parallel-default-caches"),
    pytest.param(4, "A.qcow2", False, CLUSTER, (), id="4-base-default-caches"),
    pytest.param(5, None, True, 4096, TINY_CACHE_FLAGS, id="5-full-parallel-4k-tiny-caches"),
    pytest.param(6, "A.qcow2", False, 512, TINY_CACHE_FLAGS, id="6-base-512-tiny-caches"),
    pytest.param(7, None, False, 512, TINY_CACHE_FLAGS, id="7-full-512-tiny-caches"),
    pytest.param(8, "A.qcow2", True, 4096, TINY_CACHE_FLAGS, id="8-base-parallel-4k-tiny-caches"),
]
if DEEP:  # 32 more: each (cluster size, caches) with a full stream and one with base, serialized and parallel
    DEEP_SETTINGS = [(CLUSTER, ()), (4096, TINY_CACHE_FLAGS), (512, TINY_CACHE_FLAGS), (4096, ())]
    for seed in range(100, 132):
        cluster_size, flags = DEEP_SETTINGS[seed % 4]
        base = "A.qcow2" if seed // 4 % 2 else None
        RANDOM_IO_CASES.append(pytest.param(seed, base, seed // 8 % 2 == 1, cluster_size, flags, id=f"deep-{seed}"))


@pytest.mark.timeout(1800 if DEEP else 180)
@pytest.mark.parametrize(("seed", "base", "parallel", "cluster_size", "cache_flags"), RANDOM_IO_CASES)
def test_random_guest_io_during_a_stream_matches_a_model(tmp_path, seed, base, parallel, cluster_size,
                                                         cache_flags):
    top = build_chain(tmp_path, seed, cluster_size)
    model = bytearray(qemu_raw(top, tmp_path / "before.raw"))
    rng = random.Random(seed)
    n_writers = 2
    stripes = list(range(DISK // STRIPE))
    rng.shuffle(stripes)
    owned = [sorted(stripes[i :: n_writers + 1]) for i in range(n_writers)]
    untouched = sorted(stripes[n_writers :: n_writers + 1])

    async def stream(served):
        async with qmp_session(served.qmp) as qmp:
            args = {"device": "drive0", "speed": 16 * MiB}
            if base:
                args["base"] = base
            await qmp.execute("block-stream", args)
            end = await qmp.wait_gone("drive0", timeout=60)
            assert end["event"] == "BLOCK_JOB_COMPLETED" and "error" not in end["data"], end

    extra = ["--parallel"] if parallel else []
    with serve(top, *extra, *cache_flags, qmp=True) as served:
        clients = [ModelClient(served.uri, model, owned[i], random.Random(seed * 100 + i)) for i in range(n_writers)]
        checker = ModelClient(served.uri, model, untouched, random.Random(seed * 100 + 99))
        stop = threading.Event()
        threads = [threading.Thread(target=c.loop, args=(stop,), daemon=True) for c in clients]
        threads.append(threading.Thread(target=_read_loop, args=(checker, stop), daemon=True))
        for t in threads:
            t.start()
        try:
            time.sleep(0.2)
            run_async(stream(served), timeout=90)
            # and a little I/O after the switch: 0.2 s, or until every writer has sent each kind of request
            # (with one-table caches and 512-byte clusters a request can take tens of milliseconds)
            time.sleep(0.2)
            deadline = time.monotonic() + 30
            while not all(all(c.ops.values()) for c in clients) and time.monotonic() < deadline:
                time.sleep(0.05)
        finally:
            stop.set()
            for t in threads:
                t.join(30)
        for client in [*clients, checker]:
            assert not client.errors, client.errors[:5]
        assert all(c.ops["write"] and c.ops["trim"] and c.ops["zero"] for c in clients), [c.ops for c in clients]
        assert clients[0].h.pread(DISK, 0) == model, "the disk differs from the model after the stream"
        clients[0].h.flush()
        for client in [*clients, checker]:
            client.h.shutdown()

    (tmp_path / "model.raw").write_bytes(model)
    assert qemu_img_compare(top, tmp_path / "model.raw")
    assert_clean(top)
    info = chain_info(top)
    if base:
        assert [i["filename"] for i in info] == [str(top), str(tmp_path / "A.qcow2")]
        assert info[0]["backing-filename"] == "A.qcow2"
    else:
        assert len(info) == 1 and "backing-filename" not in info[0]


def _read_loop(client: ModelClient, stop: threading.Event) -> None:
    """Reads of stripes nobody writes: during the stream they must always show the chain's data."""
    try:
        while not stop.is_set():
            offset, length = client.random_range()
            if client.h.pread(length, offset) != client.model[offset : offset + length]:
                client.errors.append(f"read {offset:#x}+{length:#x} of an untouched stripe changed")
    except Exception as exc:  # noqa: BLE001
        client.errors.append(f"{type(exc).__name__}: {exc}")


# --- SIGKILL in the middle of a stream ----------------------------------------------------------------------

BLOCK = 4096


class DurableWriter:
    """Writes 4 KiB blocks (each at most once), flushing now and then, and records what a flush made durable."""

    def __init__(self, uri: str, blocks: list[int], rng: random.Random, log: dict, lock: threading.Lock):
        self.h = nbd.NBD()
        self.h.connect_uri(uri)
        self.blocks = blocks
        self.rng = rng
        self.log = log  # block -> [data, acked, durable]
        self.lock = lock

    def loop(self) -> None:
        try:
            for i, block in enumerate(self.blocks):
                data = self.rng.randbytes(BLOCK)
                with self.lock:
                    self.log[block] = [data, False, False]
                self.h.pwrite(data, block * BLOCK)
                with self.lock:
                    self.log[block][1] = True
                if i % 8 == 7:
                    with self.lock:
                        covered = [b for b, entry in self.log.items() if entry[1]]
                    self.h.flush()
                    with self.lock:
                        for b in covered:
                            self.log[b][2] = True
        except nbd.Error:
            pass  # the server was killed


async def _stream_to_end(served, speed: int = 0) -> dict:
    async with qmp_session(served.qmp) as qmp:
        await qmp.execute("block-stream", {"device": "drive0", "speed": speed})
        return await qmp.wait_gone("drive0", timeout=60)


@pytest.mark.timeout(1800 if DEEP else 240)
@pytest.mark.parametrize(("cluster_size", "cache_flags", "seed"), [
    pytest.param(CLUSTER, (), 1000, id="default-caches"),
    pytest.param(4096, TINY_CACHE_FLAGS, 2000, id="4k-tiny-caches"),
])
def test_sigkill_during_a_stream_loses_no_flushed_write_and_streaming_again_completes(tmp_path, cluster_size,
                                                                                      cache_flags, seed):
    # the kill lands early, in the middle, and late in (or just after) the stream; deep: that, four times over
    trials = 12 if DEEP else 3
    for trial in range(trials):
        rng = random.Random(seed + trial)
        work = tmp_path / f"trial{trial}"
        work.mkdir()
        top = build_chain(work, seed + trial, cluster_size)
        old = qemu_raw(top, work / "old.raw")
        blocks = rng.sample(range(DISK // BLOCK), 400)
        log: dict[int, list] = {}
        lock = threading.Lock()

        async def start_and_kill(served, delay: float) -> None:
            async with qmp_session(served.qmp) as qmp:
                await qmp.execute("block-stream", {"device": "drive0", "speed": 8 * MiB})
                await asyncio.sleep(delay)
                os.kill(nbdkit_pid(served), signal.SIGKILL)

        with serve(top, "--parallel", *cache_flags, qmp=True) as served:
            writers = [DurableWriter(served.uri, blocks[i::2], random.Random(trial * 10 + i), log, lock)
                       for i in range(2)]
            threads = [threading.Thread(target=w.loop, daemon=True) for w in writers]
            for t in threads:
                t.start()
            time.sleep(0.05)
            delay = rng.uniform(trial % 3 * 0.8, (trial % 3 + 1) * 0.8)  # 16 MiB at 8 MiB/s takes about 2 s
            run_async(start_and_kill(served, delay), timeout=60)
            for t in threads:
                t.join(30)
            served.proc.wait(30)

        check = qemu_img_check(top)
        assert check.get("corruptions", 0) == 0 and check["check-errors"] == 0, (trial, delay, check)
        names = [i.get("backing-filename") for i in chain_info(top)]
        assert names in (["C.qcow2", "B.qcow2", "A.qcow2", None], [None]), (trial, delay, names)
        crashed = qemu_raw(top, work / "crashed.raw")
        for block in range(DISK // BLOCK):
            got = crashed[block * BLOCK : (block + 1) * BLOCK]
            was = old[block * BLOCK : (block + 1) * BLOCK]
            entry = log.get(block)
            if entry is None:
                assert got == was, f"trial {trial} (kill at {delay:.2f} s): block {block} changed unasked"
            elif entry[2]:
                assert got == entry[0], f"trial {trial} (kill at {delay:.2f} s): flushed block {block} lost"
            else:
                assert got in (was, entry[0]), f"trial {trial}: block {block} is neither old nor new data"

        # serve again (the crashed image opens), stream to the end, and the disk is what it was after the crash
        with serve(top, *cache_flags, qmp=True) as served:
            end = run_async(_stream_to_end(served), timeout=60)
            assert end["event"] == "BLOCK_JOB_COMPLETED" and "error" not in end["data"], end
        (work / "expected.raw").write_bytes(crashed)
        assert qemu_img_compare(top, work / "expected.raw")
        assert [i.get("backing-filename") for i in chain_info(top)] == [None]
        check = qemu_img_check(top)
        assert check.get("corruptions", 0) == 0 and check["check-errors"] == 0, check
