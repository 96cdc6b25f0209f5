"""Power loss, not just process death: replay what reached the OS up to each fdatasync, plus a random part of
what followed, and check every image a power loss could leave.

``vdisk.io.iolog`` records each write and fdatasync of the image (in the server with ``VDISK_IOLOG``, or
in-process); the test appends a marker after each guest FLUSH or FUA reply.  ``powerloss.replay`` builds, for
each fdatasync ``k``, the file as of that barrier plus subsets (torn at 4 KiB sectors) of the writes after it.
Each such image must:

* pass ``qemu-img check`` without corruption or check errors (leaks are allowed);
* read back (through ``qemu-img convert``) every guest write made durable by a flush or FUA before the power
  loss, and nothing in any byte that no write put there;
* on a sample, open read-write in vdisk and stream to completion, with the data unchanged and the result
  still free of corruption.

Regression tests pin the ordering bugs the replay found (see each test's docstring).  ``VDISK_DEEP=1``
replays every barrier of longer runs with more subsets; the default replays a sample.

The served runs and the ordering tests run with QEMU's default caches and with the smallest (one L2 table,
one refcount block), where every metadata section that touches a second table ends in a write-back: the
orderings must hold for those write-backs too, and the replays' streams reopen the image with the same caches.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import threading
import time
from pathlib import Path

import pytest

from tests.support.commands import run
from tests.support.images import assert_clean, qemu_raw
from tests.support.powerloss.model import GuestClient, GuestModel, split_stripes
from tests.support.powerloss.replay import Recording
from tests.support.qmp import qmp_session, run_async
from tests.support.serving import serve
from vdisk.block import chain
from vdisk.io import iolog
from vdisk.block.device import BlockDevice
from vdisk.jobs.stream import StreamCopier
from vdisk.formats.qcow2.cache import TINY_CACHES, CacheOptions
from vdisk.formats.qcow2.image import Qcow2Image

KiB = 1024
MiB = 1024 * KiB
DEEP = os.environ.get("VDISK_DEEP") == "1"

pytestmark = pytest.mark.timeout(3600 if DEEP else 240)

# cache setting -> (in-process options, `vdisk serve` flags)
CACHES = {
    "default-caches": (CacheOptions(), ()),
    "tiny-caches": (TINY_CACHES, ("--l2-cache-size", "1", "--refcount-cache-size", "1")),
}


# --- checking one power-loss state -------------------------------------------------------------------------


def qemu_check(path: Path) -> tuple[int, dict | str]:
    proc = run("qemu-img", "check", "-U", "--output=json", path, check=False)
    try:
        return proc.returncode, json.loads(proc.stdout)
    except json.JSONDecodeError:
        return proc.returncode, proc.stderr.strip()


def state_problems(path: Path, model: GuestModel, durable, scratch: Path) -> str | None:
    """What is wrong with the image at ``path`` as a power-loss survivor, or None."""
    rc, result = qemu_check(path)
    if not isinstance(result, dict) or result.get("corruptions", 0) or result.get("check-errors", 0):
        return f"qemu-img check exited {rc}: {result}"
    proc = run("qemu-img", "convert", "-U", "-O", "raw", path, scratch, check=False)
    if proc.returncode:
        return f"qemu-img convert failed: {proc.stderr.strip()}"
    return model.violation(scratch.read_bytes(), durable)


def stream_in_process(path: Path, cache: CacheOptions) -> None:
    """Open the image read-write with vdisk (as a restarted server would) and stream the whole chain into it."""
    top = chain.open_chain(str(path), cache=cache)
    device = BlockDevice("replay", top, cache=cache)
    try:
        if len(top.nodes) > 1:
            copier = StreamCopier(device, None)
            try:
                position = 0
                while position < copier.length:
                    position = copier.step(position)
                copier.finish()
            finally:
                copier.close()
    finally:
        device.close()


class Replayer:
    """Writes each state into a directory that also holds the backing files, and checks it."""

    def __init__(self, work: Path, image_name: str, backing_dir: Path, model: GuestModel, cache: CacheOptions):
        self.dir = work / "replay"
        self.dir.mkdir()
        for other in backing_dir.iterdir():
            if other.name != image_name and other.suffix == ".qcow2":
                (self.dir / other.name).symlink_to(other)
        self.path = self.dir / image_name
        self.scratch = work / "replay.raw"
        self.model = model
        self.cache = cache
        self.states = 0
        self.streamed = 0
        self.failures: list[str] = []

    def run(self, recording: Recording, initial: bytes, rng: random.Random, *, subsets: int, singles: int = 0,
            epochs: list[int] | None = None, stream_every: int = 0) -> None:
        for epoch, text, content in recording.states(initial, rng, subsets=subsets, singles=singles, epochs=epochs):
            self.states += 1
            where = f"power loss after sync {epoch.index} of {recording.syncs}, {text}"
            self.path.write_bytes(content)
            problem = state_problems(self.path, self.model, epoch.durable, self.scratch)
            if problem:
                self.failures.append(f"{where}: {problem}")
                continue
            if stream_every and self.states % stream_every == 0:
                self.streamed += 1
                before = self.scratch.read_bytes()
                try:
                    stream_in_process(self.path, self.cache)
                except Exception as exc:  # noqa: BLE001 - reported below with the state
                    self.failures.append(f"{where}: vdisk could not open and stream it: {exc!r}")
                    continue
                rc, result = qemu_check(self.path)
                if not isinstance(result, dict) or result.get("corruptions", 0) or result.get("check-errors", 0):
                    self.failures.append(f"{where}: after a stream, qemu-img check exited {rc}: {result}")
                elif qemu_raw(self.path, self.scratch) != before:
                    self.failures.append(f"{where}: the stream changed the guest data")

    def assert_ok(self) -> None:
        assert not self.failures, f"{len(self.failures)} of {self.states} states failed:\n" + "\n".join(
            self.failures[:8])


@pytest.fixture
def recording(tmp_path):
    """In-process recording into tmp_path/io.log for the duration of the test."""
    log = tmp_path / "io.log"
    iolog.start(str(log))
    try:
        yield log
    finally:
        iolog.stop()


class Direct:
    """Guest requests applied to an open image in-process, recorded in a model; flushes leave markers."""

    def __init__(self, image: Qcow2Image, model: GuestModel, log: Path):
        self.image, self.model, self.log = image, model, log

    def write(self, offset: int, data: bytes) -> None:
        op = self.model.begin("write", offset, data, len(data), False)
        self.image.pwrite(data, offset)
        self.model.done(op)

    def trim(self, offset: int, length: int) -> None:
        op = self.model.begin("trim", offset, None, length, False)
        self.image.trim(offset, length)
        self.model.done(op)

    def flush(self) -> None:
        ids = self.model.flush_begin()
        self.image.flush()
        self.model.flush_done(ids)
        iolog.mark(str(self.log), " ".join(map(str, ids)))


def fresh_image(path: Path, size: int, cluster_size: int, cache: CacheOptions) -> tuple[Qcow2Image, bytes]:
    Qcow2Image.create(str(path), size, cluster_size=cluster_size)
    return Qcow2Image.open(str(path), cache=cache), path.read_bytes()


def replay_all(tmp_path: Path, log: Path, image_path: Path, initial: bytes, model: GuestModel, cache: CacheOptions,
               *, subsets: int = 3 if DEEP else 1, singles: int = 8, header_only: bool = False) -> Replayer:
    """Every barrier of an in-process recording: random subsets of the units after it, and each unit alone
    where an epoch has at most ``singles`` units.

    ``header_only`` (not in the deep run): only the barriers around writes to the header cluster."""
    iolog.stop()
    recording = Recording(str(log), str(image_path))
    epochs = recording.epochs_writing(0, 512, around=2) if header_only and not DEEP else None
    replayer = Replayer(tmp_path, image_path.name, image_path.parent, model, cache)
    replayer.run(recording, initial, random.Random(7), subsets=subsets, singles=singles, epochs=epochs)
    print(f"\n{recording.writes} writes, {recording.syncs} syncs: {replayer.states} states replayed")
    return replayer


# --- regression tests: orderings the replay found wrong -----------------------------------------------------


@pytest.mark.parametrize("cache", list(CACHES))
def test_new_l2_table_is_durable_before_the_l1_entry_that_points_at_it(tmp_path, recording, cache):
    """Found by the replay: flush wrote new L2 tables and the L1 table before one fdatasync, so a power loss
    could keep the L1 entry and lose the table.  When the table had taken a freed cluster, its old content (guest
    data) was then read as L2 entries: corruption.  Now: L2 tables -> fdatasync -> L1 -> fdatasync."""
    cs = 512  # an L2 table covers 32 KiB
    path = tmp_path / "d.qcow2"
    image, initial = fresh_image(path, 1 * MiB, cs, CACHES[cache][0])
    model = GuestModel(bytes(1 * MiB))
    guest = Direct(image, model, recording)
    rng = random.Random(1)
    guest.write(0, rng.randbytes(4 * cs))  # clusters full of random bytes...
    guest.flush()
    guest.trim(0, 4 * cs)  # ...freed (pointer durable first, then the refcount drop)
    guest.flush()
    guest.flush()
    guest.write(512 * KiB, rng.randbytes(cs))  # a new L2 table: it takes a freed cluster
    guest.flush()
    image.close()
    replayer = replay_all(tmp_path, recording, path, initial, model, CACHES[cache][0])
    replayer.assert_ok()


@pytest.mark.parametrize("cache", list(CACHES))
def test_new_refcount_block_is_durable_before_the_refcount_table_entry(tmp_path, recording, cache):
    """Found by the replay: a new refcount block and the refcount table entry pointing at it were written
    before one fdatasync; a power loss could keep the entry and lose the block, whose own refcount (and those
    of every cluster it covers) then read as 0: corruption.  Now: blocks -> fdatasync -> table -> fdatasync."""
    cs = 512  # a refcount block covers 256 clusters (128 KiB of file)
    path = tmp_path / "d.qcow2"
    image, initial = fresh_image(path, 1 * MiB, cs, CACHES[cache][0])
    model = GuestModel(bytes(1 * MiB))
    guest = Direct(image, model, recording)
    rng = random.Random(2)
    for i in range(3):
        guest.write(i * 64 * KiB, rng.randbytes(48 * KiB))
        guest.flush()
    assert int((image.refcounts.block_offsets() != 0).sum()) > 1, "no second refcount block: the test lost its point"
    image.close()
    replayer = replay_all(tmp_path, recording, path, initial, model, CACHES[cache][0])
    replayer.assert_ok()


@pytest.mark.parametrize("cache", list(CACHES))
def test_reftable_growth_survives_power_loss_at_every_barrier(tmp_path, recording, cache):
    """The refcount table moves when it fills up (512-byte clusters, 64-bit refcounts: every 2 MiB of file);
    the new table and its blocks are durable before the header points at them, the old table is freed after."""
    path = tmp_path / "d.qcow2"
    Qcow2Image.create(str(path), 8 * MiB, cluster_size=512, refcount_bits=64)
    initial = path.read_bytes()
    image = Qcow2Image.open(str(path), cache=CACHES[cache][0])
    model = GuestModel(bytes(8 * MiB))
    guest = Direct(image, model, recording)
    rng = random.Random(3)
    for i in range(12):
        guest.write(i * 640 * KiB, rng.randbytes(256 * KiB))
        guest.flush()
    assert image.refcounts.table_extent()[0] != 512, "the refcount table did not move: the test lost its point"
    image.close()
    replayer = replay_all(tmp_path, recording, path, initial, model, CACHES[cache][0], singles=16,
                          header_only=True)
    replayer.assert_ok()


def test_flush_racing_a_write_does_not_link_data_it_did_not_sync(tmp_path, recording):
    """Found by review, pinned by replay: flush() synced data without the image lock, then wrote L2 tables
    under it.  A write that stored its data and linked it in between had its L2 entry written with data the
    fdatasync had not covered; when no refcount block was dirty nothing else synced it first.  A power loss
    could then keep the entry and not the data: the guest read a freed cluster's stale bytes.  Now the
    metadata phase syncs again when a write was linked after the data fdatasync.

    Default caches only: one L2 table and one refcount block serve the whole 4 MiB disk, so one-table caches
    would never evict here; the race needs exactly this layout."""
    cs = 65536
    path = tmp_path / "d.qcow2"
    image, initial = fresh_image(path, 4 * MiB, cs, CacheOptions())
    model = GuestModel(bytes(4 * MiB))
    guest = Direct(image, model, recording)
    rng = random.Random(4)
    guest.write(0, rng.randbytes(cs))
    guest.flush()
    guest.trim(0, cs)
    guest.flush()
    guest.flush()  # host cluster of guest cluster 0 is free again, its stale bytes still on disk

    real_pwritev, real_fdatasync = image.file.pwritev, image.file.fdatasync
    data_may_go, data_linked, gate_sync = threading.Event(), threading.Event(), threading.Event()

    def pwritev(buffers, offset):  # guest data only: metadata goes out through pwrite
        assert data_may_go.wait(20)
        real_pwritev(buffers, offset)

    def fdatasync():
        real_fdatasync()
        if gate_sync.is_set() and threading.current_thread().name == "racing-flush":
            gate_sync.clear()
            data_may_go.set()  # the write stores its data and links it after this sync...
            assert data_linked.wait(20)  # ...before the flush takes the lock for its metadata

    image.file.pwritev, image.file.fdatasync = pwritev, fdatasync
    op = model.begin("write", 2 * cs, rng.randbytes(cs), cs, False)

    def writer():
        image.pwrite(op.data.tobytes(), 2 * cs)  # allocates the freed cluster, then waits at its data write
        model.done(op)
        data_linked.set()

    w = threading.Thread(target=writer)
    w.start()
    deadline = time.monotonic() + 20
    while not image.refcounts.cache.dirty():
        assert time.monotonic() < deadline
        time.sleep(0.01)
    guest.flush()  # another flush makes the allocation's refcount durable: no refblock left dirty
    gate_sync.set()
    f = threading.Thread(target=image.flush, name="racing-flush")
    f.start()
    f.join(30)
    w.join(30)
    assert not f.is_alive() and not w.is_alive()
    image.file.pwritev, image.file.fdatasync = real_pwritev, real_fdatasync
    guest.flush()
    image.close()
    replayer = replay_all(tmp_path, recording, path, initial, model, CacheOptions(),
                          singles=20)  # the data and the L2 table
    replayer.assert_ok()


# --- a served run: guest I/O and a stream, recorded in the server ----------------------------------------------


def build_chain(directory: Path, cluster_size: int, size: int) -> Path:
    """A (data in its first 3/4) <- B (data, a zeroed and a compressed cluster) <- D (active, empty)."""
    directory.mkdir(parents=True, exist_ok=True)
    a, b, d = (directory / f"{n}.qcow2" for n in "ABD")
    run("qemu-img", "create", "-q", "-f", "qcow2", a, str(size))
    run("qemu-io", "-c", f"write -P 0xa1 0 {size * 3 // 4}", a)
    run("qemu-img", "create", "-q", "-f", "qcow2", "-b", "A.qcow2", "-F", "qcow2", b)
    run("qemu-io", "-c", "write -P 0xb2 1M 1M", "-c", "write -z 3M 64k", "-c", "write -c -P 0xb3 5M 64k", b)
    run("qemu-img", "create", "-q", "-f", "qcow2", "-o", f"cluster_size={cluster_size}", "-b", "B.qcow2",
        "-F", "qcow2", d)
    return d


def recorded_run(work: Path, cluster_size: int, seed: int, serve_flags: tuple[str, ...],
                 monkeypatch) -> tuple[Path, bytes, GuestModel, Path]:
    """Serve D with recording on; two guests do mixed I/O while a rate-limited stream runs to completion."""
    size = 8 * MiB
    top = build_chain(work / "run", cluster_size, size)
    initial_file = top.read_bytes()
    model = GuestModel(qemu_raw(top, work / "initial.raw"))
    log = work / "io.log"
    rng = random.Random(seed)
    stripe = 256 * KiB
    owned, _ = split_stripes(size // stripe, 2, rng)
    monkeypatch.setenv("VDISK_IOLOG", str(log))
    with serve(top, "--parallel", *serve_flags, qmp=True) as served:
        monkeypatch.delenv("VDISK_IOLOG")

        def mark(text: str) -> None:
            iolog.mark(str(log), text)

        clients = [GuestClient(served.uri, model, owned[i], stripe, cluster_size, random.Random(seed * 10 + i), mark)
                   for i in range(2)]
        stop = threading.Event()
        threads = [threading.Thread(target=c.loop, args=(stop,), daemon=True) for c in clients]
        for t in threads:
            t.start()

        async def stream() -> dict:
            async with qmp_session(served.qmp) as qmp:
                await asyncio.sleep(0.3)
                await qmp.execute("block-stream", {"device": "drive0", "speed": 8 * MiB})
                return await qmp.wait_gone("drive0", timeout=90)

        try:
            end = run_async(stream(), timeout=120)
            time.sleep(0.3)
        finally:
            stop.set()
            for t in threads:
                t.join(30)
        assert end["event"] == "BLOCK_JOB_COMPLETED" and "error" not in end["data"], end
        for c in clients:
            assert not c.errors and c.nbd_error is None, (c.errors[:3], c.nbd_error)
        for c in clients:
            c.close()
    assert_clean(top)
    assert qemu_raw(top, work / "final.raw") == bytes(model.current)
    return top, initial_file, model, log


# (D's cluster size, seed, caches).  No 64 KiB run with tiny caches: one L2 table maps the whole 8 MiB disk.
RUNS = [(65536, 1, "default-caches"), (4096, 2, "default-caches"), (512, 3, "default-caches"),
        (4096, 21, "tiny-caches"), (512, 22, "tiny-caches")]
if DEEP:
    RUNS += [(65536, 11, "default-caches"), (4096, 12, "default-caches"), (512, 13, "default-caches"),
             (4096, 31, "tiny-caches"), (512, 32, "tiny-caches")]


@pytest.mark.parametrize(("cluster_size", "seed", "cache"), RUNS)
def test_power_loss_during_guest_io_and_a_stream_keeps_every_flushed_write(tmp_path, monkeypatch, cluster_size,
                                                                             seed, cache):
    cache_options, serve_flags = CACHES[cache]
    top, initial_file, model, log = recorded_run(tmp_path, cluster_size, seed, serve_flags, monkeypatch)
    recording_ = Recording(str(log), str(top))
    assert not recording_.other_files, recording_.other_files
    assert recording_.syncs > 10 and recording_.markers > 5, (recording_.syncs, recording_.markers)
    rng = random.Random(seed)
    n = len(recording_.epochs)
    if DEEP:  # every barrier
        epochs, subsets, singles, stream_every = None, 2, 8, 25
    else:  # a sample, the barriers around header writes (the stream's switch), the last ones (clean close)
        epochs = sorted(set(rng.sample(range(n), min(n, 10))) | set(recording_.epochs_writing(0, 512, around=1))
                        | {n - 1, n - 2})
        subsets, singles, stream_every = 1, 4, 9
    replayer = Replayer(tmp_path, top.name, top.parent, model, cache_options)
    replayer.run(recording_, initial_file, rng, subsets=subsets, singles=singles, epochs=epochs,
                 stream_every=stream_every)
    print(f"\npower loss, {cluster_size}-byte clusters, {cache}: {recording_.writes} writes, "
          f"{recording_.syncs} syncs, {recording_.markers} guest flush/FUA markers; {replayer.states} states "
          f"replayed over {len(epochs) if epochs else n} barriers, {replayer.streamed} streamed after replay")
    replayer.assert_ok()
