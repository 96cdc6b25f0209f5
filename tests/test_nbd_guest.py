"""Real kernels as NBD clients of `vdisk serve`: a booted guest (QEMU's NBD client under virtio-blk) and, where
the host has it, the Linux kernel's own nbd driver."""

from __future__ import annotations

import hashlib
import os
import random
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import assert_clean, qemu_raw, run, serve
from vdisk.guest import GuestArtifacts, boot_guest, ensure_guest_artifacts

MiB = 1 << 20
DISK_SIZE = 8 * MiB
BLOCK = 4096

# (guest offset, file name, length): over B's data inside a cluster (copy-on-write from the chain), over
# nothing at all in the chain, and over C's compressed cluster.
WRITES = [(MiB + 4 * BLOCK, "over-b.bin", 64 * 1024), (5 * MiB, "fresh.bin", 256 * 1024),
          (7 * MiB + BLOCK, "over-c.bin", 8 * BLOCK)]


@pytest.fixture(scope="module")
def artifacts() -> GuestArtifacts:
    return ensure_guest_artifacts()


@pytest.mark.timeout(240)
def test_booted_guest_writes_and_reads_back_through_vdisk_serve(chain4, tmp_path, artifacts):
    rng = random.Random(99)
    files = {name: rng.randbytes(length) for _, name, length in WRITES}
    model = bytearray(qemu_raw(chain4["D"], tmp_path / "before.raw"))
    for offset, name, length in WRITES:
        model[offset : offset + length] = files[name]
    lines = ["set -e", 'echo "SIZE $(cat /sys/block/vda/size)"']
    for offset, name, _ in WRITES:
        lines.append(f"dd if=/vdisk/files/{name} of=/dev/vda bs={BLOCK} seek={offset // BLOCK} conv=notrunc,fsync "
                     "2>/dev/null")
    lines += ["sync", "echo 3 > /proc/sys/vm/drop_caches"]
    for offset, name, length in WRITES:
        lines.append(f"dd if=/dev/vda bs={BLOCK} skip={offset // BLOCK} count={length // BLOCK} iflag=direct "
                     f'2>/dev/null | md5sum | sed "s/ .*//;s/^/READ {name} /"')
    # Untouched data that comes from the backing chain: A's pattern, B's zero cluster.
    lines.append(f'dd if=/dev/vda bs={BLOCK} count=16 iflag=direct 2>/dev/null | md5sum | sed "s/ .*//;s/^/READ a1 /"')
    lines.append(f"dd if=/dev/vda bs={BLOCK} skip={3 * MiB // BLOCK} count=16 iflag=direct 2>/dev/null "
                 '| md5sum | sed "s/ .*//;s/^/READ zero /"')

    with serve(chain4["D"]) as served:
        result = boot_guest(f"nbd:unix:{served.socket}", "\n".join(lines) + "\n", files=files,
                            artifacts=artifacts, timeout=180)
        assert result.rc == 0, result.console
        assert served.stop() == 0

    sums = dict(re.findall(r"^READ (\S+) ([0-9a-f]{32})$", result.output, re.MULTILINE))
    assert f"SIZE {DISK_SIZE // 512}" in result.output, result.console
    for _, name, _ in WRITES:
        assert sums.get(name) == hashlib.md5(files[name]).hexdigest(), (name, result.console)
    assert sums["a1"] == hashlib.md5(b"\xa1" * 16 * BLOCK).hexdigest()
    assert sums["zero"] == hashlib.md5(bytes(16 * BLOCK)).hexdigest()
    assert qemu_raw(chain4["D"], tmp_path / "after.raw") == model
    assert_clean(chain4["D"])


def _kernel_nbd_unavailable() -> str | None:
    """Why the kernel NBD client cannot be used here, or None."""
    if not Path("/dev/nbd0").exists() and shutil.which("modprobe"):
        subprocess.run(["modprobe", "nbd"], capture_output=True)
    if not Path("/dev/nbd0").exists():
        how = "modprobe nbd failed" if shutil.which("modprobe") else "no modprobe to load it"
        return f"no /dev/nbd0: this kernel has no nbd driver loaded ({how})"
    if shutil.which("nbd-client") is None:
        return "nbd-client is not installed (Debian: apt-get install nbd-client)"
    if os.geteuid() != 0:
        return "attaching /dev/nbd0 needs root"
    return None


@pytest.mark.timeout(120)
def test_kernel_nbd_client_reads_and_writes_the_export(chain4, tmp_path):
    reason = _kernel_nbd_unavailable()
    if reason:
        pytest.skip(reason)
    data = random.Random(3).randbytes(128 * 1024)
    offset = 2 * MiB + BLOCK
    model = bytearray(qemu_raw(chain4["D"], tmp_path / "before.raw"))
    model[offset : offset + len(data)] = data
    (tmp_path / "data.bin").write_bytes(data)
    with serve(chain4["D"]) as served:
        run("nbd-client", "-unix", served.socket, "/dev/nbd0")
        try:
            run("dd", f"if={tmp_path / 'data.bin'}", "of=/dev/nbd0", f"bs={BLOCK}", f"seek={offset // BLOCK}",
                "oflag=direct", "conv=notrunc,fsync")
            size = int(Path("/sys/block/nbd0/size").read_text()) * 512
            run("sh", "-c", "echo 3 > /proc/sys/vm/drop_caches")
            with open("/dev/nbd0", "rb", buffering=0) as dev:
                head = os.pread(dev.fileno(), 16 * BLOCK, 0)
                written = os.pread(dev.fileno(), len(data), offset)
        finally:
            run("nbd-client", "-d", "/dev/nbd0", check=False)
        assert size == DISK_SIZE
        assert head == b"\xa1" * 16 * BLOCK
        assert written == data
        assert served.stop() == 0
    assert qemu_raw(chain4["D"], tmp_path / "after.raw") == model
    assert_clean(chain4["D"])
