"""Real kernels as NBD clients of `vdisk serve`: a booted guest (QEMU's NBD client under virtio-blk) and the
Linux kernel's own nbd driver, the guest's (through a virtio-serial port: this host has no nbd module)."""

from __future__ import annotations

import hashlib
import os
import random
import re
import shutil

import pytest

from tests.support.images import assert_clean, qemu_raw
from tests.support.serving import serve
from vdisk.harness.guest import (
    KERNEL_NBD,
    KERNEL_NBD_CONNECT,
    KERNEL_NBD_DISCONNECT,
    GuestArtifacts,
    boot_guest,
    ensure_guest_artifacts,
    kernel_nbd_args,
)

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


@pytest.fixture(scope="module")
def kernel_nbd_artifacts() -> GuestArtifacts:
    """The guest with nbd.ko, Debian's nbd-client and socat (copied from this host, which must have them)."""
    search = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])
    missing = [program for program in KERNEL_NBD.programs if shutil.which(program, path=search) is None]
    if missing:
        pytest.skip(f"not installed: {', '.join(missing)} (Debian packages of the same names; scripts/setup.sh)")
    return ensure_guest_artifacts(extras=KERNEL_NBD)


@pytest.mark.timeout(240)
def test_kernel_nbd_client_reads_and_writes_the_export(chain4, tmp_path, kernel_nbd_artifacts):
    data = random.Random(3).randbytes(128 * 1024)
    offset = 2 * MiB + BLOCK
    model = bytearray(qemu_raw(chain4["D"], tmp_path / "before.raw"))
    model[offset : offset + len(data)] = data
    script = "set -e\n" + KERNEL_NBD_CONNECT + f"""
echo "SIZE $(cat /sys/block/nbd0/size)"
dd if=/vdisk/files/data.bin of=/dev/nbd0 bs={BLOCK} seek={offset // BLOCK} conv=notrunc,fsync 2>/dev/null
echo 3 > /proc/sys/vm/drop_caches
dd if=/dev/nbd0 bs={BLOCK} count=16 iflag=direct 2>/dev/null | md5sum | sed "s/ .*//;s/^/READ head /"
dd if=/dev/nbd0 bs={BLOCK} skip={offset // BLOCK} count={len(data) // BLOCK} iflag=direct 2>/dev/null \\
    | md5sum | sed "s/ .*//;s/^/READ written /"
""" + KERNEL_NBD_DISCONNECT
    with serve(chain4["D"]) as served:
        result = boot_guest(None, script, files={"data.bin": data}, extra_args=kernel_nbd_args(served.socket),
                            artifacts=kernel_nbd_artifacts, timeout=180)
        assert result.rc == 0, result.console
        assert served.stop() == 0
    sums = dict(re.findall(r"^READ (\S+) ([0-9a-f]{32})$", result.output, re.MULTILINE))
    assert f"SIZE {DISK_SIZE // 512}" in result.output, result.console
    assert sums.get("head") == hashlib.md5(b"\xa1" * 16 * BLOCK).hexdigest(), result.console
    assert sums.get("written") == hashlib.md5(data).hexdigest(), result.console
    assert qemu_raw(chain4["D"], tmp_path / "after.raw") == model
    assert_clean(chain4["D"])
