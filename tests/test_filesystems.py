"""Real filesystems on large disks, through real kernel block devices (issue 8: acknowledged writes lost).

Host: ``vdisk serve`` -> ``nbdfuse`` (the export as a file) -> ``losetup`` (a loop device of this host's
kernel) -> ``mkfs.ext4`` / ``mkfs.xfs``, mount, copy a snapshot of real directory trees (Python's standard
library and the time zone database: many files, one of several MB, symlinks), sync, umount, and take it
all down; ``qemu-img check`` must find the image clean.  Then a fresh server and a fresh device (nothing
the first ones cached can help): ``e2fsck -fn`` / ``xfs_repair -n`` must find the filesystem clean, and
the tree, mounted read-only, must equal the source byte for byte (sha256 of every file, every symlink's
target, every directory); ``qemu-img check`` again.  Variants:

* default caches, on a 300 GiB disk: past the 256 GiB the default L2 cache (32 MiB of tables) covers;
* the smallest caches (``--l2-cache-size 1 --refcount-cache-size 1``: one L2 table and one refcount
  block, so every metadata path evicts and writes back);
* filled under a running ``block-stream`` (QMP, rate-limited so that the whole fill happens while the
  job runs) from a 200 GiB backing file holding scattered data: the job completes, the chain stands
  alone, the backing file is untouched.

Guest: the same inside a TCG-booted Debian cloud kernel through its own nbd driver (``nbd.ko``;
``vdisk.harness.guest.KERNEL_NBD``: the export reaches the guest through a virtio-serial port, no network), the
tree coming from a tar file on a read-only virtio disk; the guest runs mkfs, fsck and hashes with
Debian's e2fsprogs and xfsprogs and prints the results on the console.  Afterwards the host checks the
image and, through a fresh server and its own kernel, the filesystem and the tree again.  Once also under
a running stream.

CI runs small trees and one stream per side;
``VDISK_DEEP=1`` copies several more trees (/usr/share/doc, /usr/include, dist-packages) several times
and streams under both filesystems on both sides.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import os
import random
import shutil
import subprocess
import sysconfig
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest

from tests.support.commands import run
from tests.support.images import assert_clean, chain_info, file_digest
from tests.support.qmp import qmp_session, run_async
from tests.support.serving import Served, serve
from vdisk.harness.guest import (
    KERNEL_NBD,
    KERNEL_NBD_CONNECT,
    KERNEL_NBD_DISCONNECT,
    PROGRAMS_DIR,
    GuestArtifacts,
    InitramfsExtras,
    ensure_guest_artifacts,
    kernel_nbd_args,
    start_guest,
)

GiB, MiB = 1 << 30, 1 << 20
DEEP = os.environ.get("VDISK_DEEP") == "1"

LARGE_DISK = 300 * GiB  # past the 256 GiB the default L2 cache covers: even the default caches evict
STREAM_DISK = 200 * GiB  # the stream steps through every 1 MiB of the disk, so not larger
STREAM_SPEED = 4 * MiB  # bytes/s: the backing data takes longer than the fill to copy
STREAM_REGION = 256 * 1024  # each data region of the stream's backing file
TINY_CACHES = ("--l2-cache-size", "1", "--refcount-cache-size", "1")
DEVICE = "drive0"  # vdisk serve's default --device

STDLIB = Path(sysconfig.get_paths()["stdlib"])
ZONEINFO = Path("/usr/share/zoneinfo")
# Debian 12: ~52 MB in ~2,300 files and ~370 symlinks (DEEP: ~370 MB more in ~18,000 files)
HOST_TREES = [STDLIB, ZONEINFO] + (
    [Path("/usr/share/doc"), Path("/usr/include"), Path("/usr/lib/python3/dist-packages")] if DEEP else [])
# under TCG the guest extracts and hashes a few MB per second: ~7 MB in ~1,750 entries
GUEST_TREES = [STDLIB, ZONEINFO] if DEEP else [
    ZONEINFO, *(STDLIB / name for name in ("encodings", "asyncio", "email", "xml", "unittest"))]
FILL_ROUNDS = 3 if DEEP else 1  # copies of the tree, tree-0 ... on the host

FILESYSTEMS = ["ext4", "xfs"]
# CI: one stream on each side, XFS on the host and ext4 in the guest
HOST_STREAM_FILESYSTEMS = FILESYSTEMS if DEEP else ["xfs"]
GUEST_STREAM_FILESYSTEMS = FILESYSTEMS if DEEP else ["ext4"]

FSCK = {"ext4": ["e2fsck", "-fn"], "xfs": ["xfs_repair", "-n"]}  # read-only checks: exit 0 means clean
GUEST_EXTRAS = KERNEL_NBD + InitramfsExtras(
    modules=("libcrc32c", "xfs"),  # ext4 is built into Debian's cloud kernel, XFS is a module
    programs=("mkfs.ext4", "e2fsck", "mkfs.xfs", "xfs_repair"))

SBIN_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])
HOST_TOOLS = {"nbdfuse": "libnbd-bin", "fusermount3": "fuse3", "losetup": "mount", "mkfs.ext4": "e2fsprogs",
              "e2fsck": "e2fsprogs", "mkfs.xfs": "xfsprogs", "xfs_repair": "xfsprogs"}
GUEST_TOOLS = {"qemu-system-x86_64": "qemu-system-x86", "nbd-client": "nbd-client", "socat": "socat"}

pytestmark = pytest.mark.timeout(3600 if DEEP else 300)


def mkfs_command(fs: str, *, keep_data: bool = False, in_guest: bool = False) -> list[str]:
    """mkfs for ``fs``, the device to be appended.

    ``keep_data``: no initial discard, so the backing file's data stays visible under the free space and a
    stream has something to copy while the filesystem writes.  ``in_guest``: the guest kernel's nbd driver
    has no WRITE_ZEROES (6.1), so zeroing ext4's 1 GiB journal would write 1 GiB through the emulated serial
    port.  The discard before it already made the disk read as zeros; and journal blocks are read only to
    replay them after a crash, which these cleanly unmounted filesystems never need.
    """
    if fs == "ext4":
        extended = (["nodiscard"] if keep_data else []) + (["lazy_journal_init=1"] if in_guest else [])
        return ["mkfs.ext4", "-q", "-F", *(["-E", ",".join(extended)] if extended else [])]
    return ["mkfs.xfs", "-q", "-f", *(["-K"] if keep_data else [])]


# --- the source trees -------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class SourceTree:
    """A private snapshot of real directories (other work may install packages meanwhile) and its manifest."""

    path: Path
    manifest: dict[str, str]


def tree_manifest(root: Path) -> dict[str, str]:
    """Every entry below ``root`` by relative path: ``dir``, ``link -> TARGET`` or a file's sha256."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath, name)
            rel = path.relative_to(root).as_posix()
            if path.is_symlink():
                out[rel] = f"link -> {os.readlink(path)}"
            elif path.is_dir():
                out[rel] = "dir"
            elif path.is_file():
                out[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
            else:
                out[rel] = "special file"
    return out


def assert_same_tree(got: dict[str, str], want: dict[str, str], where: str) -> None:
    missing = sorted(want.keys() - got.keys())
    extra = sorted(got.keys() - want.keys())
    differ = sorted(k for k in want.keys() & got.keys() if got[k] != want[k])
    assert not (missing or extra or differ), (
        f"{where}: {len(missing)} entries missing {missing[:10]}, {len(extra)} extra {extra[:10]}, "
        f"{len(differ)} differ {differ[:10]} (of {len(want)})")


def snapshot(trees: Sequence[Path], directory: Path) -> SourceTree:
    directory.mkdir()
    for tree in trees:
        assert tree.is_dir(), f"source tree {tree} is missing"
        run("cp", "-a", tree, directory / tree.name)
    return SourceTree(directory, tree_manifest(directory))


@pytest.fixture(scope="module")
def host_source(tmp_path_factory) -> SourceTree:
    return snapshot(HOST_TREES, tmp_path_factory.mktemp("host-source") / "tree")


# --- the host's block device: nbdfuse and a loop device -----------------------------------------------


def _unavailable(tools: dict[str, str]) -> str | None:
    missing = [f"{tool} (Debian: {package})" for tool, package in tools.items()
               if shutil.which(tool, path=SBIN_PATH) is None]
    return f"not installed: {', '.join(missing)}; scripts/setup.sh installs them" if missing else None


def host_stack_unavailable() -> str | None:
    """Why this host cannot mount filesystems on an export through nbdfuse and a loop device, or None."""
    if os.geteuid() != 0:
        return "loop devices and mounts need root"
    if not Path("/dev/fuse").exists():
        return "no /dev/fuse: nbdfuse cannot mount the export"
    if reason := _unavailable(HOST_TOOLS):
        return reason
    for fs in FILESYSTEMS:
        if fs not in Path("/proc/filesystems").read_text().split() and shutil.which("modprobe"):
            subprocess.run(["modprobe", fs], capture_output=True)
        if fs not in Path("/proc/filesystems").read_text().split():
            return f"this host's kernel cannot mount {fs} (not in /proc/filesystems)"
    return None


@pytest.fixture(scope="module")
def host_stack() -> None:
    if reason := host_stack_unavailable():
        pytest.skip(reason)


def wait_until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out after {timeout} s waiting for {what}"
        time.sleep(0.02)


@contextlib.contextmanager
def host_block_device(served: Served, workdir: Path) -> Iterator[str]:
    """The export as a block device of this host's kernel: nbdfuse shows it as a file, a loop device
    attaches that file.  Afterwards the loop device is detached and nbdfuse unmounted (it flushes and
    exits), on failure too."""
    fuse_dir, pid_file = workdir / "nbdfuse", workdir / "nbdfuse.pid"
    fuse_dir.mkdir(exist_ok=True)
    pid_file.unlink(missing_ok=True)
    nbdfuse = subprocess.Popen(
        ["nbdfuse", "-P", str(pid_file), str(fuse_dir / "disk"), "--unix", str(served.socket)],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    ok = False
    try:
        wait_until(lambda: pid_file.exists() or nbdfuse.poll() is not None, 30, "nbdfuse to mount")
        assert nbdfuse.poll() is None, f"nbdfuse exited {nbdfuse.returncode}: {nbdfuse.stderr.read()}"
        loop = run("losetup", "--find", "--show", fuse_dir / "disk").stdout.strip()
        try:
            yield loop
            ok = True
        finally:
            detach_loop(loop, strict=ok)
    finally:
        unmount = run("fusermount3", "-u", fuse_dir, check=False)
        if unmount.returncode != 0:
            run("fusermount3", "-u", "-z", fuse_dir, check=False)
        try:
            nbdfuse.wait(30)
        except subprocess.TimeoutExpired:
            nbdfuse.kill()
            nbdfuse.wait()
        stderr = nbdfuse.stderr.read()
        nbdfuse.stderr.close()
    if ok:  # the normal way down: every step must have worked
        assert unmount.returncode == 0, unmount.stderr
        assert nbdfuse.returncode == 0, f"nbdfuse exited {nbdfuse.returncode}: {stderr}"


def detach_loop(loop: str, *, strict: bool) -> None:
    """Detach ``loop`` and wait until it lets go of its file (sysfs drops its "loop" directory then).

    Not ``strict`` (cleaning up after a failure): best effort, so that the failure itself is what shows.
    """
    detach = run("losetup", "--detach", loop, check=False)
    attached = Path(f"/sys/block/{Path(loop).name}/loop")
    deadline = time.monotonic() + 30
    while attached.exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    if strict:
        assert detach.returncode == 0, f"losetup --detach {loop}: {detach.stderr}"
        assert not attached.exists(), f"{loop} still holds its file 30 s after losetup --detach"


@contextlib.contextmanager
def mounted(device: str, mountpoint: Path, fs: str, *, read_only: bool = False) -> Iterator[Path]:
    """``device`` mounted at ``mountpoint``; unmounted afterwards (lazily if a failure left it busy)."""
    mountpoint.mkdir(exist_ok=True)
    run("mount", "-t", fs, *(["-o", "ro"] if read_only else []), device, mountpoint)
    try:
        yield mountpoint
    except BaseException:
        if run("umount", mountpoint, check=False).returncode != 0:
            run("umount", "--lazy", mountpoint, check=False)
        raise
    run("umount", mountpoint)


def fsck(device: str, fs: str) -> None:
    result = run(*FSCK[fs], device, check=False)
    assert result.returncode == 0, \
        f"{' '.join(FSCK[fs])} {device}: exit {result.returncode}\n{result.stdout}\n{result.stderr}"


def fill(source: SourceTree, mountpoint: Path, rounds: int) -> None:
    """Copy the tree ``rounds`` times (tree-0, tree-1, ...) and sync the filesystem."""
    for round_ in range(rounds):
        run("cp", "-a", source.path, mountpoint / f"tree-{round_}")
    run("sync", "--file-system", mountpoint)


def check_on_fresh_server(image: Path, workdir: Path, fs: str, source: SourceTree, rounds: int,
                          *serve_args: str) -> None:
    """Through a new server and a new device: fsck clean, each copy equal to the source, image clean."""
    with serve(image, *serve_args) as served:
        with host_block_device(served, workdir) as device:
            fsck(device, fs)
            with mounted(device, workdir / "check", fs, read_only=True) as mountpoint:
                assert {p.name for p in mountpoint.iterdir() if p.name.startswith("tree-")} == \
                    {f"tree-{i}" for i in range(rounds)}
                for round_ in range(rounds):
                    assert_same_tree(tree_manifest(mountpoint / f"tree-{round_}"), source.manifest,
                                     f"{fs} tree-{round_} read back through a fresh server")
        assert served.stop() == 0
    assert_clean(image)


# --- the stream --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class StreamedChain:
    """base.qcow2 (200 GiB; ``regions`` of 256 KiB written by qemu-io, denser in the first 2 GiB where the
    filesystems start) <- top.qcow2 (empty)."""

    top: Path
    base: Path
    regions: list[tuple[int, int]]  # (offset, the byte qemu-io's pattern repeats)

    def assert_streamed(self, base_digest: str) -> None:
        """The chain stands alone, the base is untouched, and the top holds the base's data where the
        filesystem did not write (it writes a small part of the disk: it can have hit only a few regions)."""
        assert [info.get("backing-filename") for info in chain_info(self.top)] == [None], "the backing file stayed"
        assert file_digest(self.base) == base_digest, "streaming changed the backing file"
        reads = [a for offset, byte in self.regions for a in ("-c", f"read -P {byte} {offset} {STREAM_REGION}")]
        output = run("qemu-io", "-r", "-U", "-f", "qcow2", *reads, self.top, check=False).stdout
        changed = output.count("Pattern verification failed")
        assert output.count("read ") == len(self.regions), output[-2000:]
        assert changed <= len(self.regions) // 4, f"{changed} of {len(self.regions)} backing regions were not copied"


def make_streamed_chain(directory: Path) -> StreamedChain:
    base, top = directory / "base.qcow2", directory / "top.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", base, str(STREAM_DISK))
    rng = random.Random(8)
    slots = rng.sample(range(2 * GiB // STREAM_REGION), 64) + rng.sample(range(STREAM_DISK // STREAM_REGION), 128)
    regions = [(slot * STREAM_REGION, i % 255 + 1) for i, slot in enumerate(sorted(set(slots)))]
    run("qemu-io", *(a for offset, byte in regions for a in ("-c", f"write -P {byte} {offset} {STREAM_REGION}")), base)
    run("qemu-img", "create", "-q", "-f", "qcow2", "-b", base.name, "-F", "qcow2", top)
    return StreamedChain(top, base, regions)


async def assert_streaming(qmp, when: str) -> None:
    job = await qmp.job(DEVICE)
    assert job is not None and job["status"] == "running" and job["offset"] < job["len"], f"{when}: {job}"


async def fill_during_stream(qmp_path: Path, fill_the_filesystem: Callable[[], None]) -> None:
    """Start a rate-limited full stream, fill the filesystem while it runs, then let it finish."""
    async with qmp_session(qmp_path) as qmp:
        assert await qmp.execute("block-stream", {"device": DEVICE, "speed": STREAM_SPEED}) == {}
        await assert_streaming(qmp, "when the fill starts")
        await asyncio.to_thread(fill_the_filesystem)
        await assert_streaming(qmp, "when the fill is synced")
        await qmp.execute("block-job-set-speed", {"device": DEVICE, "speed": 0})
        end = await qmp.wait_gone(DEVICE, timeout=600)
        assert end["event"] == "BLOCK_JOB_COMPLETED" and "error" not in end["data"], end
        assert end["data"]["offset"] == end["data"]["len"] == STREAM_DISK, end


# --- host tests -------------------------------------------------------------------------------------


@pytest.mark.parametrize("caches", [pytest.param((), id="default-caches"), pytest.param(TINY_CACHES, id="tiny-caches")])
@pytest.mark.parametrize("fs", FILESYSTEMS)
def test_host_filesystem_on_a_300_gib_disk(tmp_path, host_stack, host_source, fs, caches):
    image = tmp_path / "disk.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", image, str(LARGE_DISK))
    with serve(image, *caches) as served:
        with host_block_device(served, tmp_path) as device:
            run(*mkfs_command(fs), device)
            with mounted(device, tmp_path / "mnt", fs) as mountpoint:
                fill(host_source, mountpoint, FILL_ROUNDS)
        assert served.stop() == 0
    assert_clean(image)
    check_on_fresh_server(image, tmp_path, fs, host_source, FILL_ROUNDS, *caches)


@pytest.mark.parametrize("fs", HOST_STREAM_FILESYSTEMS)
def test_host_filesystem_filled_during_a_stream_from_a_200_gib_backing_file(tmp_path, host_stack, host_source, fs):
    chain = make_streamed_chain(tmp_path)
    base_digest = file_digest(chain.base)
    with serve(chain.top, qmp=True) as served:
        with host_block_device(served, tmp_path) as device:
            run(*mkfs_command(fs, keep_data=True), device)
            with mounted(device, tmp_path / "mnt", fs) as mountpoint:
                run_async(fill_during_stream(served.qmp, lambda: fill(host_source, mountpoint, FILL_ROUNDS)),
                          timeout=900)
        assert served.stop() == 0
    chain.assert_streamed(base_digest)
    assert_clean(chain.top)
    check_on_fresh_server(chain.top, tmp_path, fs, host_source, FILL_ROUNDS)


# --- guest tests ------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class GuestSource:
    tree: SourceTree
    tar: Path  # the guest's /dev/vda


@pytest.fixture(scope="module")
def guest_source(tmp_path_factory) -> GuestSource:
    directory = tmp_path_factory.mktemp("guest-source")
    tree = snapshot(GUEST_TREES, directory / "tree")
    odd = [rel for rel, entry in tree.manifest.items()
           if any(c in "\n'" for c in rel + entry.removeprefix("link -> ")) or " -> " in rel]
    assert not odd, f"names that the guest's manifest lines cannot carry (newlines, quotes, ' -> '): {odd[:5]}"
    tar = directory / "tree.tar"
    run("tar", "-C", tree.path, "--format=ustar", "-cf", tar, ".")
    return GuestSource(tree, tar)


@pytest.fixture(scope="module")
def guest_artifacts(host_stack) -> GuestArtifacts:
    """The initramfs with the kernel's nbd client and the filesystem tools (the host's check needs
    host_stack)."""
    if reason := _unavailable(GUEST_TOOLS):
        pytest.skip(reason)
    return ensure_guest_artifacts(extras=GUEST_EXTRAS)


def guest_script(fs: str, *, stream: bool) -> str:
    """mkfs on /dev/nbd0, mount, extract the tree, sync, umount; drop the caches, fsck, mount read-only,
    print the manifest.  With ``stream``, the guest waits for a line from the host once it has mounted
    (the host starts the stream) and once it has filled the filesystem (the host lets the stream end)."""
    tools = f"/{PROGRAMS_DIR}"
    mkfs = " ".join(mkfs_command(fs, keep_data=stream, in_guest=True))
    wait = 'read -r line'
    return "set -e\n" + KERNEL_NBD_CONNECT + f"""
echo "SIZE $(cat /sys/block/nbd0/size)"
{tools}/{mkfs} /dev/nbd0
mkdir -p /mnt/fs
mount -t {fs} /dev/nbd0 /mnt/fs
{"echo MOUNTED; " + wait if stream else ""}
mkdir /mnt/fs/tree-0
tar -xf /dev/vda -C /mnt/fs/tree-0
sync
{"echo FILLED; " + wait if stream else ""}
umount /mnt/fs
# the checks read what the server holds, not this kernel's page cache
echo 3 > /proc/sys/vm/drop_caches
rc=0
{tools}/{" ".join(FSCK[fs])} /dev/nbd0 > /tmp/fsck.log 2>&1 || rc=$?
echo "FSCK rc=$rc"
if [ $rc -ne 0 ]; then cat /tmp/fsck.log; fi
mount -o ro -t {fs} /dev/nbd0 /mnt/fs
cd /mnt/fs/tree-0
find . -mindepth 1 -type d | sed 's/^/D /'
find . -type l -exec stat -c "L %N" {{}} +
find . -type f -exec sha256sum {{}} + | sed 's/^/F /'
cd /
umount /mnt/fs
""" + KERNEL_NBD_DISCONNECT + "echo CHECKED\n"


def guest_manifest(output: str) -> dict[str, str]:
    """The manifest the guest printed, in :func:`tree_manifest`'s terms."""
    out = {}
    for line in output.splitlines():
        kind, _, rest = line.partition(" ")
        if kind == "D":
            out[rest.removeprefix("./")] = "dir"
        elif kind == "L":  # busybox stat's %N: 'PATH' -> 'TARGET'
            path, _, target = rest.partition(" -> ")
            out[path.strip("'").removeprefix("./")] = f"link -> {target.strip(chr(39))}"
        elif kind == "F":
            digest, _, path = rest.partition("  ")
            out[path.removeprefix("./")] = digest
    return out


def check_guest_output(output: str, fs: str, source: GuestSource, size: int) -> None:
    assert f"SIZE {size // 512}" in output.splitlines(), output[-3000:]
    assert "FSCK rc=0" in output.splitlines(), f"{FSCK[fs][0]} in the guest:\n{output[-3000:]}"
    assert "CHECKED" in output.splitlines(), output[-3000:]
    assert_same_tree(guest_manifest(output), source.tree.manifest, f"{fs} tree read back in the guest")


def guest_drives(served: Served, source: GuestSource) -> list[str]:
    """The export on the guest's NBD port, the tree's tar as its read-only /dev/vda."""
    tar = os.fspath(source.tar).replace(",", ",,")
    return kernel_nbd_args(served.socket) + ["-drive", f"file={tar},format=raw,if=virtio,readonly=on"]


@pytest.mark.parametrize("fs", FILESYSTEMS)
def test_guest_filesystem_through_its_kernel_nbd_client(tmp_path, guest_artifacts, guest_source, fs):
    image = tmp_path / "disk.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", image, str(LARGE_DISK))
    with serve(image) as served:
        with start_guest(None, guest_script(fs, stream=False), extra_args=guest_drives(served, guest_source),
                         artifacts=guest_artifacts) as guest:
            result = guest.finish(timeout=600 if DEEP else 240)
        assert result.rc == 0, result.console[-3000:]
        assert served.stop() == 0
    check_guest_output(result.output, fs, guest_source, LARGE_DISK)
    assert_clean(image)
    check_on_fresh_server(image, tmp_path, fs, guest_source.tree, 1)


@pytest.mark.parametrize("fs", GUEST_STREAM_FILESYSTEMS)
def test_guest_filesystem_filled_during_a_stream(tmp_path, guest_artifacts, guest_source, fs):
    chain = make_streamed_chain(tmp_path)
    base_digest = file_digest(chain.base)
    with serve(chain.top, qmp=True) as served:
        with start_guest(None, guest_script(fs, stream=True), extra_args=guest_drives(served, guest_source),
                         artifacts=guest_artifacts) as guest:

            def guest_fills() -> None:
                guest.send_line("fill")
                guest.wait_for(r"^FILLED$", timeout=600)

            guest.wait_for(r"^MOUNTED$", timeout=240)
            run_async(fill_during_stream(served.qmp, guest_fills), timeout=900)
            guest.send_line("check")
            result = guest.finish(timeout=600 if DEEP else 240)
        assert result.rc == 0, result.console[-3000:]
        assert served.stop() == 0
    check_guest_output(result.output, fs, guest_source, STREAM_DISK)
    chain.assert_streamed(base_digest)
    assert_clean(chain.top)
    check_on_fresh_server(chain.top, tmp_path, fs, guest_source.tree, 1)
