"""A booted guest writes checksummed blocks through NBD while the host streams under it.

The guest (vdisk.harness.guest: a TCG-booted Linux whose /dev/vda is ``nbd:unix:SOCKET``) writes random 4 KiB
blocks with ``conv=fsync`` in a loop, printing each block's index and md5, until the host tells it to stop;
then it re-reads every block it wrote (O_DIRECT) and prints the md5s it sees.  Meanwhile the host drives the
QEMU document's scenarios (docs/live-block-ops.txt) word for word through HMP:

* Snapshot live merge: ``block_stream virtio0 file-A.img`` (then a full ``block-stream`` over QMP).
* Live block copy: ``snapshot_blkdev ide0-hd0 /new-path/disk.img qcow2`` then ``block_stream ide0-hd0``;
  afterwards the old files are deleted and the disk still reads the same.

Afterwards the guest's checksums, its read-back, and the host's final image all agree, and every block the
guest did not write still holds the chain's original data.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
from pathlib import Path

import pytest

from tests.support.commands import ROOT, VDISK, run
from tests.support.images import assert_clean, chain_info, qemu_raw
from tests.support.qmp import qmp_session, run_async
from tests.support.serving import serve
from vdisk.harness.guest import GuestArtifacts, ensure_guest_artifacts, start_guest

pytestmark = pytest.mark.timeout(300)

MiB = 1 << 20
DISK = 16 * MiB
BLOCK = 4096

GUEST_SCRIPT = f"""
set -e
NBLK={DISK // BLOCK}
: > /tmp/written
# a background job's stdin is /dev/null: hand it the console through fd 3
exec 3<&0
(read line <&3; touch /tmp/stop) &
echo READY
i=0
while [ ! -e /tmp/stop ]; do
  idx=$(( (i * 7919 + 13) % NBLK ))
  dd if=/dev/urandom of=/tmp/blk bs={BLOCK} count=1 2>/dev/null
  dd if=/tmp/blk of=/dev/vda bs={BLOCK} seek=$idx count=1 conv=notrunc,fsync 2>/dev/null
  echo "W $i $idx $(md5sum < /tmp/blk | cut -c1-32)"
  echo $idx >> /tmp/written
  i=$((i+1))
done
echo WRITES-DONE
sync
echo 3 > /proc/sys/vm/drop_caches
for idx in $(sort -un /tmp/written); do
  echo "R $idx $(dd if=/dev/vda bs={BLOCK} skip=$idx count=1 iflag=direct 2>/dev/null | md5sum | cut -c1-32)"
done
echo READ-DONE
"""


@pytest.fixture(scope="module")
def artifacts() -> GuestArtifacts:
    return ensure_guest_artifacts()


def document_chain(directory: Path) -> Path:
    """The document's [A] <- [B] <- [C] <- [D] <- [E], 16 MiB, as file-A.img ... file-E.img (qcow2)."""
    run("qemu-img", "create", "-q", "-f", "qcow2", directory / "file-A.img", "16M")
    run("qemu-io", "-c", "write -P 0xa1 0 12M", directory / "file-A.img")
    previous = "file-A.img"
    for i, name in enumerate("BCDE"):
        path = directory / f"file-{name}.img"
        run("qemu-img", "create", "-q", "-f", "qcow2", "-b", previous, "-F", "qcow2", path)
        if name != "E":
            run("qemu-io", "-c", f"write -P {0xb2 + i} {2 + 4 * i}M 2M", "-c", f"write -z {4 + 4 * i}M 64k", path)
        previous = path.name
    return directory / "file-E.img"


class GuestWrites:
    """What the guest reported: the last md5 written to each block, and what it read back."""

    def __init__(self, output: str):
        self.written: dict[int, str] = {}
        self.order: list[int] = []
        self.read_back: dict[int, str] = {}
        for line in output.splitlines():
            if m := re.fullmatch(r"W (\d+) (\d+) ([0-9a-f]{32})", line):
                self.written[int(m.group(2))] = m.group(3)
                self.order.append(int(m.group(1)))
            elif m := re.fullmatch(r"R (\d+) ([0-9a-f]{32})", line):
                self.read_back[int(m.group(1))] = m.group(2)

    def check(self, original: bytes, final: bytes) -> None:
        assert self.order == list(range(len(self.order))), "the guest's write log has gaps"
        assert self.read_back == self.written, "the guest read back something else than it wrote"
        lost, changed = [], []
        for index in range(DISK // BLOCK):
            block = final[index * BLOCK : (index + 1) * BLOCK]
            if index in self.written:
                if hashlib.md5(block).hexdigest() != self.written[index]:
                    lost.append(index)
            elif block != original[index * BLOCK : (index + 1) * BLOCK]:
                changed.append((index, block[:1].hex(), original[index * BLOCK : index * BLOCK + 1].hex(),
                                sorted(i for i in self.written if i // 16 == index // 16)))
        assert not lost and not changed, f"guest writes lost: {lost[:20]}; blocks changed: {changed[:20]}"


def count_writes(guest) -> int:
    return len(re.findall(r"^W \d+", guest.console, re.MULTILINE))


async def wait_for_more_writes(guest, at_least: int, timeout: float = 120) -> None:
    """Wait until the guest has reported ``at_least`` more writes than now."""
    target = count_writes(guest) + at_least
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while count_writes(guest) < target:
        assert loop.time() < deadline, f"the guest stopped writing:\n{guest.console[-2000:]}"
        assert guest.process.poll() is None, f"the guest died:\n{guest.console[-2000:]}"
        await asyncio.sleep(0.1)


async def guest_writes_while_the_job_runs(qmp, guest, job_id: str) -> None:
    """The guest completes writes while the (speed-limited) job is still copying."""
    await wait_for_more_writes(guest, 3)
    info = await qmp.job(job_id)
    assert info is not None and info["status"] == "running" and info["offset"] < info["len"], info


def test_guest_writes_during_block_stream_virtio0_file_a_img(artifacts, tmp_path):
    """Snapshot live merge, word for word, under a writing guest; then a full stream over QMP."""
    top = document_chain(tmp_path)
    original = qemu_raw(top, tmp_path / "original.raw")

    async def host(served, guest):
        await asyncio.to_thread(guest.wait_for, r"^READY$", 180)
        async with qmp_session(served.qmp) as qmp:
            await wait_for_more_writes(guest, 3)
            # (qemu) block_stream virtio0 file-A.img
            assert await qmp.hmp("block_stream virtio0 file-A.img") == ""
            assert await qmp.hmp("block_job_set_speed virtio0 64K") == ""
            await guest_writes_while_the_job_runs(qmp, guest, "virtio0")
            assert re.fullmatch(rf"Streaming device virtio0: Completed \d+ of {DISK} bytes, "
                                rf"speed limit {64 * 1024} bytes/s\r\n", await qmp.hmp("info block-jobs"))
            assert await qmp.hmp("block_job_set_speed virtio0 0") == ""
            end = await qmp.wait_gone("virtio0", timeout=120)
            assert end["event"] == "BLOCK_JOB_COMPLETED" and "error" not in end["data"], end
            assert await qmp.hmp("info block-jobs") == "No active jobs\r\n"
            assert "Backing file:     file-A.img (chain depth: 1)" in await qmp.hmp("info block")

            # and the rest of the chain, over QMP, still under the writing guest
            await qmp.execute("block-stream", {"device": "virtio0", "speed": 64 * 1024})
            await guest_writes_while_the_job_runs(qmp, guest, "virtio0")
            await qmp.execute("block-job-set-speed", {"device": "virtio0", "speed": 0})
            end = await qmp.wait_gone("virtio0", timeout=120)
            assert end["event"] == "BLOCK_JOB_COMPLETED" and "error" not in end["data"], end
            await wait_for_more_writes(guest, 3)
        guest.send_line("stop")
        await asyncio.to_thread(guest.wait_for, r"^READ-DONE$", 180)

    with serve(top, "--device", "virtio0", qmp=True) as served, \
            start_guest(f"nbd:unix:{served.socket}", GUEST_SCRIPT, artifacts=artifacts) as guest:
        run_async(host(served, guest), timeout=280)
        result = guest.finish(timeout=120)
    assert result.rc == 0, result.console[-3000:]
    assert [i.get("backing-filename") for i in chain_info(top)] == [None]
    writes = GuestWrites(result.output)
    assert len(writes.written) > 10
    writes.check(original, qemu_raw(top, tmp_path / "final.raw"))
    assert_clean(top)


def test_live_block_copy_under_a_writing_guest_then_the_old_files_go(artifacts, tmp_path):
    """Live block copy, word for word through `vdisk monitor`, under a writing guest."""
    old_dir, new_dir = tmp_path / "old", tmp_path / "new-path"
    old_dir.mkdir()
    new_dir.mkdir()
    top = document_chain(old_dir)
    original = qemu_raw(top, tmp_path / "original.raw")
    new_image = new_dir / "disk.img"

    def monitor(served, *lines: str) -> str:
        return run(*VDISK, "monitor", "--qmp", served.qmp, *(a for line in lines for a in ("-c", line)),
                   cwd=ROOT).stdout

    async def host(served, guest):
        await asyncio.to_thread(guest.wait_for, r"^READY$", 180)
        async with qmp_session(served.qmp) as qmp:
            await wait_for_more_writes(guest, 3)
            # (qemu) snapshot_blkdev ide0-hd0 /new-path/disk.img qcow2
            assert await asyncio.to_thread(monitor, served, f"snapshot_blkdev ide0-hd0 {new_image} qcow2") == ""
            await wait_for_more_writes(guest, 3)
            # (qemu) block_stream ide0-hd0   (and, on the same connection, a speed limit that holds the job
            # until the guest has written under it)
            assert await asyncio.to_thread(monitor, served, "block_stream ide0-hd0",
                                           "block_job_set_speed ide0-hd0 64K") == ""
            await guest_writes_while_the_job_runs(qmp, guest, "ide0-hd0")
            await qmp.execute("block-job-set-speed", {"device": "ide0-hd0", "speed": 0})
            end = await qmp.wait_gone("ide0-hd0", timeout=120)
            assert end["event"] == "BLOCK_JOB_COMPLETED" and "error" not in end["data"], end
            assert (await qmp.execute("query-block"))[0]["inserted"]["file"] == str(new_image)
            await wait_for_more_writes(guest, 3)
        guest.send_line("stop")
        await asyncio.to_thread(guest.wait_for, r"^READ-DONE$", 180)

    with serve(top, "--device", "ide0-hd0", qmp=True) as served, \
            start_guest(f"nbd:unix:{served.socket}", GUEST_SCRIPT, artifacts=artifacts) as guest:
        run_async(host(served, guest), timeout=280)
        result = guest.finish(timeout=120)
    assert result.rc == 0, result.console[-3000:]

    # the old files can be deleted: the disk lives at the new path, standing alone
    for old in old_dir.iterdir():
        old.unlink()
    assert [i.get("backing-filename") for i in chain_info(new_image)] == [None]
    writes = GuestWrites(result.output)
    assert len(writes.written) > 10
    writes.check(original, qemu_raw(new_image, tmp_path / "final.raw"))
    assert_clean(new_image)
