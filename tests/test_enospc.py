"""Out of disk space: the active image lives on a small tmpfs that a filler file nearly fills.

* A guest write that cannot be stored fails with ENOSPC (libnbd sees the errno), the server keeps serving,
  nothing already written is lost, repeated failing writes leak no clusters, and once the filler is deleted
  the same write succeeds; after a clean stop the image is clean and holds exactly what the guest wrote.
* A stream that runs out of space follows its on-error policy: ``enospc``/``stop`` pause the job with
  BLOCK_JOB_ERROR (guest I/O goes on meanwhile) and ``block-job-resume`` after freeing space completes it;
  ``report`` fails the job cleanly and leaves the chain as it was, and a second stream completes later.

Needs root for ``mount -t tmpfs``; skipped with the reason otherwise.
"""

from __future__ import annotations

import asyncio
import os
import random
import subprocess
from pathlib import Path

import nbd
import pytest

from tests.support.commands import run
from tests.support.images import assert_clean, chain_info, qemu_img_check, qemu_raw
from tests.support.powerloss.model import GuestModel
from tests.support.qmp import qmp_session, run_async
from tests.support.serving import serve

KiB = 1024
MiB = 1024 * KiB
DISK = 8 * MiB

pytestmark = pytest.mark.timeout(180)


@pytest.fixture
def small_fs(tmp_path: Path):
    """An 8 MiB tmpfs at tmp_path/fs, unmounted afterwards."""
    mount_point = tmp_path / "fs"
    mount_point.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8M,mode=0755", "tmpfs", str(mount_point)],
                          capture_output=True, text=True, check=False)
    if proc.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip() or proc.returncode}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], capture_output=True, check=False)


def fill(directory: Path, leave: int) -> Path:
    """Write a filler file so that about ``leave`` bytes stay free."""
    st = os.statvfs(directory)
    free = st.f_bavail * st.f_frsize
    filler = directory / "filler"
    with open(filler, "wb") as f:
        f.write(bytes(max(0, free - leave)))
    return filler


def make_chain(tmp_path: Path, fs: Path, *, data: str) -> Path:
    """A (on the ordinary disk) <- D (on the small tmpfs, qcow2 with 64 KiB clusters)."""
    a = tmp_path / "A.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", a, str(DISK))
    run("qemu-io", "-c", f"write -P 0xa1 0 {data}", a)
    d = fs / "D.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", "-b", str(a), "-F", "qcow2", d)
    return d


def _is_enospc(exc: nbd.Error) -> bool:
    return exc.errno == "ENOSPC"


def test_guest_gets_enospc_for_the_write_that_does_not_fit_and_writes_again_once_space_is_freed(tmp_path, small_fs):
    top = make_chain(tmp_path, small_fs, data="4M")
    model = GuestModel(qemu_raw(top, tmp_path / "initial.raw"))
    filler = fill(small_fs, 1 * MiB)
    rng = random.Random(5)
    with serve(top, "--parallel") as served:
        h = nbd.NBD()
        h.connect_uri(served.uri)
        failed = None
        offsets = [i * 64 * KiB for i in range(DISK // (64 * KiB))]
        rng.shuffle(offsets)
        for n, offset in enumerate(offsets):
            data = rng.randbytes(64 * KiB)
            op = model.begin("write", offset, data, len(data), False)
            try:
                h.pwrite(data, offset)
            except nbd.Error as exc:
                assert _is_enospc(exc), f"write {n} failed with {exc.errno}, not ENOSPC: {exc}"
                failed = (op, data)
                break
            model.done(op)
            if n % 4 == 3:
                ids = model.flush_begin()
                h.flush()
                model.flush_done(ids)
        assert failed is not None, "the tmpfs never filled up"
        op, data = failed
        assert len(model.durable) > 0

        # The server keeps serving: the same connection, and a new one, read everything written so far.
        others = [o for o in model.ops if o is not op]
        got = h.pread(DISK, 0)
        assert model.violation(got, [o.id for o in others if o.done]) is None
        h2 = nbd.NBD()
        h2.connect_uri(served.uri)
        assert h2.pread(DISK, 0) == got
        # Retrying while the disk is full fails the same way, again and again, and leaks nothing (below).
        for _ in range(5):
            with pytest.raises(nbd.Error) as caught:
                h.pwrite(data, op.offset)
            assert _is_enospc(caught.value), caught.value
        try:
            h.flush()  # may need space for metadata (a new L2 table): then it fails with ENOSPC too
        except nbd.Error as exc:
            assert _is_enospc(exc), exc

        filler.unlink()
        h.pwrite(data, op.offset)
        model.done(op)
        h2.pwrite(b"\x5c" * 4096, DISK - 4096)
        model.done(model.begin("write", DISK - 4096, b"\x5c" * 4096, 4096, False))
        h.flush()
        assert h2.pread(DISK, 0) == model.current
        h.shutdown()
        h2.shutdown()
    assert_clean(top)  # failed writes gave their clusters back: no leak
    assert qemu_raw(top, tmp_path / "final.raw") == model.current


@pytest.mark.parametrize("on_error", ["enospc", "stop"])
def test_stream_out_of_space_pauses_with_block_job_error_and_resumes_once_space_is_freed(tmp_path, small_fs,
                                                                                         on_error):
    top = make_chain(tmp_path, small_fs, data="7M")
    before = qemu_raw(top, tmp_path / "before.raw")
    filler = fill(small_fs, 2 * MiB)

    async def scenario(served) -> None:
        async with qmp_session(served.qmp) as qmp:
            await qmp.execute("block-stream", {"device": "drive0", "on-error": on_error})
            error = await qmp.wait_event("BLOCK_JOB_ERROR", timeout=60, device="drive0")
            assert error["data"]["operation"] == "write" and error["data"]["action"] == "stop", error
            await qmp.wait_status("drive0", "paused", timeout=30)
            info = await qmp.job("drive0")
            assert info["paused"] and info["io-status"] == "nospace", info
            # The guest goes on reading and writing while the job waits.
            h = nbd.NBD()
            h.connect_uri(served.uri)
            assert h.pread(DISK, 0) == before
            await asyncio.sleep(0.2)
            assert (await qmp.job("drive0"))["paused"], "the job went on without space"
            filler.unlink()
            await qmp.execute("block-job-resume", {"device": "drive0"})
            end = await qmp.wait_gone("drive0", timeout=60)
            assert end["event"] == "BLOCK_JOB_COMPLETED" and "error" not in end["data"], end
            assert h.pread(DISK, 0) == before
            h.shutdown()

    with serve(top, qmp=True) as served:
        run_async(scenario(served), timeout=120)
    assert [i.get("backing-filename") for i in chain_info(top)] == [None]
    assert qemu_raw(top, tmp_path / "after.raw") == before
    assert_clean(top)


def test_stream_out_of_space_with_on_error_report_fails_cleanly_and_leaves_the_chain(tmp_path, small_fs):
    top = make_chain(tmp_path, small_fs, data="6M")
    before = qemu_raw(top, tmp_path / "before.raw")
    backing = chain_info(top)[0]["backing-filename"]
    filler = fill(small_fs, 2 * MiB)
    # (6 MiB to copy: the second stream must fit in 8 MiB beside the up to one chunk of pages that the failed
    # copy wrote before it ran out of space; those clusters are free again, but their pages stay in use until
    # reused.)

    async def stream(served, expect_error: bool) -> None:
        async with qmp_session(served.qmp) as qmp:
            await qmp.execute("block-stream", {"device": "drive0", "on-error": "report"})
            end = await qmp.wait_gone("drive0", timeout=60)
            assert end["event"] == "BLOCK_JOB_COMPLETED", end
            if expect_error:
                assert end["data"].get("error") == os.strerror(28), end  # "No space left on device"
                assert "BLOCK_JOB_ERROR" in qmp.sequence("drive0"), qmp.sequence("drive0")
            else:
                assert "error" not in end["data"], str(end["data"])

    with serve(top, qmp=True) as served:
        run_async(stream(served, True), timeout=90)
        h = nbd.NBD()
        h.connect_uri(served.uri)
        assert h.pread(DISK, 0) == before
        h.flush()  # the failed job left nothing behind that needs space: the disk is still full
        h.shutdown()
    assert chain_info(top)[0]["backing-filename"] == backing
    check = qemu_img_check(top)
    assert check.get("corruptions", 0) == 0 and check.get("leaks", 0) == 0 and check["check-errors"] == 0, check
    assert qemu_raw(top, tmp_path / "failed.raw") == before

    filler.unlink()
    with serve(top, qmp=True) as served:
        run_async(stream(served, False), timeout=90)
    assert [i.get("backing-filename") for i in chain_info(top)] == [None]
    assert qemu_raw(top, tmp_path / "after.raw") == before
    assert_clean(top)


def test_a_flush_that_fails_keeps_the_pending_frees_for_the_next_one(tmp_path, monkeypatch):
    """A trimmed cluster's refcount drops only after the L2 table without it is durable.  When that flush
    failed (ENOSPC/EIO writing the table), the frees it carried were dropped: leaked for good.  Now the next
    flush that succeeds releases them."""
    from vdisk.io import faults
    from vdisk.formats.qcow2.image import Qcow2Image

    path = tmp_path / "d.qcow2"
    Qcow2Image.create(str(path), DISK)
    image = Qcow2Image.open(str(path))
    image.pwrite(b"\x42" * (4 * 65536), 0)
    image.flush()
    image.trim(0, 2 * 65536)
    l2_host = int(image.clusters.l1_entries()[0]) & ((1 << 56) - 512)
    monkeypatch.setattr(faults, "_RULES", [{"path": os.path.realpath(path), "op": "write", "offset": l2_host,
                                            "length": 65536, "errno": 28, "count": 1}])
    monkeypatch.setattr(faults, "ENABLED", True)
    with pytest.raises(Exception, match="No space left|ENOSPC"):
        image.flush()
    image.flush()  # the table goes out now, and the two clusters are released
    image.close()
    assert_clean(path)
    assert qemu_raw(path, tmp_path / "d.raw") == bytes(2 * 65536) + b"\x42" * (2 * 65536) + bytes(DISK - 4 * 65536)
