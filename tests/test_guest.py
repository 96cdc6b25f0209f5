"""The test guest boots under QEMU, runs a script against /dev/vda and reports what it saw."""

from __future__ import annotations

import hashlib
import random
import re
import time
from pathlib import Path

import pytest

from vdisk.harness.guest import GuestArtifacts, GuestTimeout, boot_guest, ensure_guest_artifacts, start_guest

pytestmark = pytest.mark.timeout(300)

DISK_SIZE = 16 * 1024 * 1024
BLOCK = 4096


@pytest.fixture(scope="module")
def artifacts() -> GuestArtifacts:
    return ensure_guest_artifacts()


@pytest.fixture
def raw_disk(tmp_path: Path) -> Path:
    path = tmp_path / "disk.raw"
    with open(path, "wb") as f:
        f.truncate(DISK_SIZE)
    return path


def test_guest_write_reaches_the_raw_file_at_the_offset_it_chose(artifacts: GuestArtifacts, raw_disk: Path):
    data = random.Random(1234).randbytes(64 * 1024)
    guest_offset = 3 * 1024 * 1024 + 5 * BLOCK
    script = f"""
set -e
dd if=/vdisk/files/data.bin of=/dev/vda bs={BLOCK} seek={guest_offset // BLOCK} conv=notrunc,fsync
sync
echo 3 > /proc/sys/vm/drop_caches
dd if=/dev/vda bs={BLOCK} skip={guest_offset // BLOCK} count={len(data) // BLOCK} iflag=direct > /tmp/back.bin
echo "READBACK $(md5sum < /tmp/back.bin)"
"""
    result = boot_guest(raw_disk, script, files={"data.bin": data}, artifacts=artifacts)

    assert result.rc == 0, result.console
    match = re.search(r"^READBACK ([0-9a-f]{32})", result.output, re.MULTILINE)
    assert match, result.console
    assert match.group(1) == hashlib.md5(data).hexdigest()
    disk = raw_disk.read_bytes()
    assert len(disk) == DISK_SIZE
    assert disk[guest_offset : guest_offset + len(data)] == data
    assert disk[:guest_offset].count(0) == guest_offset
    assert disk[guest_offset + len(data) :].count(0) == DISK_SIZE - guest_offset - len(data)


def test_failing_guest_script_reports_its_exit_status(artifacts: GuestArtifacts, raw_disk: Path):
    result = boot_guest(raw_disk, "echo before-failure\nexit 7\n", artifacts=artifacts)

    assert result.rc == 7
    assert result.output.splitlines()[-1] == "before-failure"


def test_host_can_wait_for_a_guest_line_and_answer_while_it_runs(artifacts: GuestArtifacts, raw_disk: Path):
    script = 'echo READY\nread reply\necho "GOT $reply"\n'
    with start_guest(raw_disk, script, artifacts=artifacts) as guest:
        guest.wait_for(r"^READY$", timeout=120)
        assert guest.process.poll() is None
        guest.send_line("go on")
        assert guest.wait_for(r"^GOT (.*)$", timeout=60).group(1) == "go on"
        result = guest.finish(timeout=60)

    assert result.rc == 0
    assert result.output.splitlines() == ["READY", "GOT go on"]


def test_guest_that_overruns_its_deadline_is_killed(artifacts: GuestArtifacts):
    with start_guest(None, "echo STARTED\nsleep 600\n", artifacts=artifacts) as guest:
        guest.wait_for("STARTED", timeout=120)
        started = time.monotonic()
        with pytest.raises(GuestTimeout, match="did not power off within 1 s") as excinfo:
            guest.finish(timeout=1)
        assert time.monotonic() - started < 30
        assert guest.process.returncode is not None
        assert "STARTED" in excinfo.value.console
