"""Process death: SIGKILL of the server at random moments of mixed guest I/O, with and without a stream; and the
dirty bit a crash leaves behind.

Each SIGKILL trial serves a copy of a qemu-img-made chain A <- B <- D (D's cluster size varies: 64 KiB,
4 KiB, 512 bytes), lets two libnbd clients write, zero-write, trim, flush and FUA-write in their own stripes
(recorded in ``powerloss.model.GuestModel``), maybe starts a rate-limited block-stream over QMP, and kills
nbdkit at a random moment.  Then:

* ``qemu-img check`` finds no corruption and no check error (leaks are allowed);
* every byte of the disk (read by ``qemu-img convert``) holds its durable value (acknowledged before a
  completed FLUSH, or sent with FUA) or the value of a write that was never made durable;
* ``vdisk check -r leaks`` repairs the leaks exactly as ``qemu-img check -r leaks`` does on a copy (same
  counts), after which ``qemu-img check`` finds the image clean and the data unchanged;
* a restarted server streams the whole chain into D, which then equals the crashed disk, clean.

Each kind of trial runs with QEMU's default caches and with the smallest (one L2 table and one refcount
block, ``--l2-cache-size 1 --refcount-cache-size 1``), so that the kill also lands while tables are being
evicted, reloaded and written back.  The tiny-cache trials use D's small cluster sizes: with 64 KiB clusters
one L2 table maps the whole 8 MiB disk and a one-table cache would never evict.

CI runs a handful of trials; ``VDISK_DEEP=1`` runs ``VDISK_CRASH_TRIALS`` (default 120) of each cache setting.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import shutil
import signal
import struct
import threading
import time
from pathlib import Path

import nbd
import pytest

from tests.support.commands import run, vdisk
from tests.support.images import (
    assert_clean,
    chain_info,
    file_digest,
    qemu_img_check,
    qemu_img_compare,
    qemu_map,
    qemu_raw,
)
from tests.support.powerloss.model import GuestClient, GuestModel, split_stripes
from tests.support.qmp import qmp_session, run_async
from tests.support.serving import nbdkit_pid, serve

KiB = 1024
MiB = 1024 * KiB
DISK = 8 * MiB
STRIPE = 256 * KiB
DEEP = os.environ.get("VDISK_DEEP") == "1"
TRIALS = int(os.environ.get("VDISK_CRASH_TRIALS", "120")) if DEEP else 4
CLUSTER_SIZES = (65536, 4096, 512)
TINY_CACHE_FLAGS = ("--l2-cache-size", "1", "--refcount-cache-size", "1")
# (serve flags, D's cluster sizes the trials cycle through, seed offset)
CACHE_SETTINGS = {
    "default-caches": ((), CLUSTER_SIZES, 0),
    "tiny-caches": (TINY_CACHE_FLAGS, (512, 4096), 10000),
}

pytestmark = pytest.mark.timeout(7200 if DEEP else 240)


class Template:
    """A chain made once per cluster size; each trial copies it."""

    def __init__(self, directory: Path, cluster_size: int):
        directory.mkdir(parents=True)
        self.dir = directory
        a, b, d = (directory / f"{n}.qcow2" for n in "ABD")
        run("qemu-img", "create", "-q", "-f", "qcow2", a, str(DISK))
        run("qemu-io", "-c", "write -P 0xa1 0 6M", a)
        run("qemu-img", "create", "-q", "-f", "qcow2", "-b", "A.qcow2", "-F", "qcow2", b)
        run("qemu-io", "-c", "write -P 0xb2 1M 1M", "-c", "write -z 3M 64k", "-c", "write -c -P 0xb3 5M 64k",
            "-c", "write -P 0xb4 7M 512k", b)
        run("qemu-img", "create", "-q", "-f", "qcow2", "-o", f"cluster_size={cluster_size}", "-b", "B.qcow2",
            "-F", "qcow2", d)
        run("qemu-io", "-c", "write -P 0xd5 2M 256k", "-c", "write -z 6M 128k", d)
        self.cluster_size = cluster_size
        self.initial = qemu_raw(d, directory / "initial.raw")

    def copy_to(self, work: Path) -> Path:
        work.mkdir()
        for name in ("A.qcow2", "B.qcow2", "D.qcow2"):
            shutil.copy(self.dir / name, work / name)
        return work / "D.qcow2"


@pytest.fixture(scope="module")
def templates(tmp_path_factory) -> dict[int, Template]:
    base = tmp_path_factory.mktemp("crash-templates")
    return {cs: Template(base / str(cs), cs) for cs in CLUSTER_SIZES}


class Figures:
    def __init__(self):
        self.trials = self.during_stream = self.stream_done_before_kill = 0
        self.ops = self.flushes = self.durable = self.leaks = 0

    def __str__(self) -> str:
        return (f"{self.trials} SIGKILL trials ({self.during_stream} with a stream running, "
                f"{self.stream_done_before_kill} of them killed after it completed): {self.ops} guest requests, "
                f"{self.flushes} flushes, {self.durable} requests durable at the kill; {self.leaks} leaked "
                f"clusters repaired, as qemu-img repairs them")


def crash_trial(work: Path, template: Template, seed: int, with_stream: bool, cache_flags: tuple[str, ...],
                figures: Figures) -> None:
    rng = random.Random(seed)
    top = template.copy_to(work)
    where = (f"trial seed {seed}, {template.cluster_size}-byte clusters, {'with' if with_stream else 'no'} stream, "
             f"serve flags {list(cache_flags)}")
    model = GuestModel(template.initial)
    owned, _ = split_stripes(DISK // STRIPE, 2, rng)
    stream_state: dict = {}

    with serve(top, "--parallel", *cache_flags, qmp=True) as served:
        clients = [GuestClient(served.uri, model, owned[i], STRIPE, template.cluster_size,
                               random.Random(seed * 10 + i)) for i in range(2)]
        stop = threading.Event()
        threads = [threading.Thread(target=c.loop, args=(stop,), daemon=True) for c in clients]
        for t in threads:
            t.start()

        async def stream_then_kill() -> None:
            async with qmp_session(served.qmp) as qmp:
                await asyncio.sleep(rng.uniform(0.0, 0.3))
                # ~7 MiB to copy: killed while copying at 1-4 MiB/s, about half the time at 8 MiB/s, and near
                # or after the switch unlimited (0)
                speed = rng.choice([1 * MiB, 2 * MiB, 4 * MiB, 8 * MiB, 0])
                await qmp.execute("block-stream", {"device": "drive0", "speed": speed})
                await asyncio.sleep(rng.uniform(0.05, 1.0))
                os.kill(nbdkit_pid(served), signal.SIGKILL)
                stream_state["events"] = qmp.sequence("drive0")

        try:
            if with_stream:
                run_async(stream_then_kill(), timeout=60)
            else:
                time.sleep(rng.uniform(0.1, 1.2))
                os.kill(nbdkit_pid(served), signal.SIGKILL)
        finally:
            stop.set()
            for t in threads:
                t.join(30)
        served.proc.wait(30)
    for c in clients:
        assert not c.errors, (where, c.errors[:3])
    figures.trials += 1
    figures.ops += len(model.ops)
    figures.flushes += model.flushes
    figures.durable += len(model.durable)
    if with_stream:
        figures.during_stream += 1
        if "BLOCK_JOB_COMPLETED" in stream_state.get("events", []):
            figures.stream_done_before_kill += 1

    # No corruption; the chain is the old one or the streamed one; every durable write is there.
    check = qemu_img_check(top)
    assert check.get("corruptions", 0) == 0 and check["check-errors"] == 0, (where, check)
    names = [i.get("backing-filename") for i in chain_info(top)]
    assert names in (["B.qcow2", "A.qcow2", None], [None]), (where, names)
    crashed = qemu_raw(top, work / "crashed.raw")
    problem = model.violation(crashed)
    assert problem is None, f"{where}: {problem}"

    # vdisk check -r leaks repairs what qemu-img check -r leaks repairs.
    twin = work / "Q.qcow2"
    shutil.copy(top, twin)
    qemu_fix = json.loads(run("qemu-img", "check", "-r", "leaks", "--output=json", twin).stdout)
    ours = vdisk("check", "-r", "leaks", "--output=json", str(top))
    our_fix = json.loads(ours.stdout)
    for key in ("leaks-fixed", "corruptions-fixed", "leaks", "corruptions", "check-errors"):
        assert our_fix.get(key, 0) == qemu_fix.get(key, 0), (where, key, our_fix, qemu_fix)
    figures.leaks += our_fix.get("leaks-fixed", 0)
    assert_clean(top)
    assert_clean(twin)
    assert qemu_img_compare(top, work / "crashed.raw"), f"{where}: the leak repair changed the data"

    # A restarted server opens it and streams the whole chain into it; the disk stays what the crash left.
    with serve(top, *cache_flags, qmp=True) as served:
        if names[0] is not None:
            async def stream() -> dict:
                async with qmp_session(served.qmp) as qmp:
                    await qmp.execute("block-stream", {"device": "drive0"})
                    return await qmp.wait_gone("drive0", timeout=90)

            end = run_async(stream(), timeout=120)
            assert end["event"] == "BLOCK_JOB_COMPLETED" and "error" not in end["data"], (where, end)
        h = nbd.NBD()
        h.connect_uri(served.uri)
        assert h.pread(DISK, 0) == crashed, f"{where}: the restarted server shows other data"
        h.shutdown()
    assert [i.get("backing-filename") for i in chain_info(top)] == [None], where
    assert qemu_img_compare(top, work / "crashed.raw"), f"{where}: streaming after the crash changed the data"
    assert_clean(top)
    shutil.rmtree(work)


@pytest.mark.parametrize("cache", list(CACHE_SETTINGS))
@pytest.mark.parametrize("with_stream", [False, True], ids=["guest-io", "guest-io-and-stream"])
def test_sigkill_keeps_every_durable_write_and_the_image_repairs_and_streams(tmp_path, templates, with_stream,
                                                                            cache):
    cache_flags, cluster_sizes, seed_offset = CACHE_SETTINGS[cache]
    figures = Figures()
    trials = TRIALS // 2 if DEEP else 2
    base_seed = int(os.environ.get("VDISK_CRASH_SEED", "0")) + (5000 if with_stream else 0) + seed_offset
    for trial in range(trials):
        template = templates[cluster_sizes[trial % len(cluster_sizes)]]
        crash_trial(tmp_path / f"trial{trial}", template, base_seed + trial, with_stream, cache_flags, figures)
    print(f"\ncrash ({'with' if with_stream else 'without'} stream, {cache}): {figures}")


# --- the dirty bit -------------------------------------------------------------------------------------------

INCOMPAT_OFFSET = 72
DIRTY = 1


def _u64(path: Path, offset: int) -> int:
    with open(path, "rb") as f:
        f.seek(offset)
        return struct.unpack(">Q", f.read(8))[0]


def _set_refcount(path: Path, cluster: int, value: int) -> None:
    """16-bit refcounts of a qemu-img image whose first refcount block covers ``cluster``."""
    reftable = _u64(path, 48)
    block = _u64(path, reftable) & ~0x1FF
    with open(path, "r+b") as f:
        f.seek(block + 2 * cluster)
        f.write(struct.pack(">H", value))


def _dirty_image(tmp_path: Path) -> tuple[Path, bytes]:
    """A qemu-img image with data, left dirty with wrong refcounts: a leak, a too-high and a zero refcount."""
    image = tmp_path / "dirty.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", image, "8M")
    run("qemu-io", "-c", "write -P 0x5a 0 1M", "-c", "write -P 0x6b 4M 64k", image)
    data = qemu_raw(image, tmp_path / "before.raw")
    hosts = [e["offset"] // 65536 for e in qemu_map(image) if e.get("data") and "offset" in e]
    end_cluster = -(-image.stat().st_size // 65536)
    _set_refcount(image, hosts[0], 0)  # a referenced cluster that looks free: QEMU would hand it out again
    _set_refcount(image, hosts[1], 3)  # too high: a leak
    _set_refcount(image, end_cluster, 1)  # a cluster nothing references: a leak
    with open(image, "r+b") as f:
        f.truncate((end_cluster + 1) * 65536)
        f.seek(INCOMPAT_OFFSET)
        f.write(struct.pack(">Q", _u64(image, INCOMPAT_OFFSET) | DIRTY))
    return image, data


def test_dirty_image_opens_read_write_only_after_a_logged_refcount_repair(tmp_path):
    image, data = _dirty_image(tmp_path)
    before = qemu_img_check(image)
    assert before.get("corruptions", 0) >= 1 and before.get("leaks", 0) >= 2, before

    # Read-only serving leaves it exactly as it is (QEMU does not repair a read-only open).
    digest = file_digest(image)
    with serve(image, "--read-only") as served:
        h = nbd.NBD()
        h.connect_uri(served.uri)
        assert h.pread(DISK, 0) == data
        h.shutdown()
    assert file_digest(image) == digest

    with serve(image) as served:
        h = nbd.NBD()
        h.connect_uri(served.uri)
        assert h.pread(DISK, 0) == data
        h.pwrite(b"\x7c" * 4096, 2 * MiB)
        h.flush()
        h.shutdown()
        served.stop()
        log = served.proc.stderr.read()
    assert "dirty bit set" in log and "repairing refcounts" in log, log
    assert "repaired 2 leaked clusters and 1 corruptions" in log and "dirty bit cleared" in log, log
    assert not _u64(image, INCOMPAT_OFFSET) & DIRTY
    assert_clean(image)
    after = bytearray(data)
    after[2 * MiB : 2 * MiB + 4096] = b"\x7c" * 4096
    assert qemu_raw(image, tmp_path / "after.raw") == after


def test_dirty_image_whose_metadata_cannot_be_read_is_refused_for_writing(tmp_path):
    """QEMU refuses a dirty image whose repair hits check errors ("Could not repair dirty image").  vdisk
    counts an L2 table past the end of the file as one (QEMU reads zeros there and counts a corruption)."""
    image, _ = _dirty_image(tmp_path)
    l1 = _u64(image, 40)
    with open(image, "r+b") as f:
        f.seek(l1)  # the L2 table moves far past the end of the file
        f.write(struct.pack(">Q", (1 << 40) | (1 << 63)))
    digest = file_digest(image)
    with pytest.raises(AssertionError, match="could not repair dirty image"), serve(image):
        pass
    assert file_digest(image) == digest, "the refused open wrote to the image"
