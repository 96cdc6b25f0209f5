"""A tiny Linux guest that boots under QEMU to read and write a vdisk export the way a real VM does.

Theory of operation
-------------------
*Artifacts.*  :func:`ensure_guest_artifacts` fetches two Debian packages with ``apt-get download``: the
real, versioned ``linux-image-*-cloud-amd64`` that the ``linux-image-cloud-amd64`` metapackage depends
on, and ``busybox-static``.  It unpacks them with ``dpkg -x``, keeps the kernel's ``vmlinuz`` and packs
an initramfs (``cpio -H newc``, gzip) holding busybox, the virtio modules in :data:`MODULES` (loading
order) and the ``/init`` in :data:`INIT_SCRIPT`.  The cloud kernel builds virtio as modules, so ``/init``
must ``insmod`` them before ``/dev/vda`` exists.  Debian 12 ships them uncompressed (``.ko``); ``.ko.xz``
and ``.ko.zst`` are decompressed at build time all the same, because busybox ``insmod`` loads only plain
``.ko`` files.  Both artifacts live in the cache directory beside a ``recipe`` stamp: a hash of everything
that shapes them, so a changed ``/init`` rebuilds them and an unchanged one never downloads again.  The
build holds an exclusive ``flock`` on ``.lock`` in that directory, so concurrent test processes build
once and the others wait; finished files are moved into place with ``os.replace``.

*Extras.*  ``ensure_guest_artifacts(extras=InitramfsExtras(...))`` builds another flavour of the initramfs
in its own subdirectory of the cache (``extras-<hash of the names>``, with its own kernel, so modules and
kernel always come from the same package): more modules of the same kernel, loaded after :data:`MODULES`,
and host programs (Debian's own binaries, found on ``PATH`` or in the sbin directories) copied to
``/usr/bin`` with every shared library ``ldd`` lists and the dynamic loader, at the paths ``ldd`` gives.
Scripts call them by that path: busybox's shell prefers its own applets (it has ``mke2fs`` and
``nbd-client``) to anything on ``PATH``.  The flavour's recipe also hashes the content of every copied
program and library, so a package upgrade on the host rebuilds it.  The default flavour (no extras) is
built and stamped exactly as before.

*The guest kernel's NBD client.*  :data:`KERNEL_NBD` is the extras for it (``virtio_console``, ``nbd``,
``nbd-client``, ``socat``).  There is no network: :func:`kernel_nbd_args` gives the guest a virtio-serial
port named :data:`NBD_PORT_NAME` whose host side is a QEMU chardev connected, as a client, to the NBD
server's unix socket.  In the guest, :data:`KERNEL_NBD_CONNECT` finds that port through sysfs (no udev, so
no ``/dev/virtio-ports`` links), lets ``socat`` relay a unix socket to it and points ``nbd-client`` at that
socket, so ``/dev/nbd0`` is the export; :data:`KERNEL_NBD_DISCONNECT` ends the session.  The chardev holds a
single connection to the server, so one boot gets one NBD session.

*Passing the script.*  Linux unpacks every cpio archive concatenated in the initrd, later ones on top of
earlier ones.  Each boot therefore writes a private initrd: the cached one, zero padding to a 4-byte
boundary (the kernel looks for a cpio header only at such an offset), then a small uncompressed archive
written here holding ``/vdisk/script.sh`` and any extra ``files`` under ``/vdisk/files/``.  Unlike the
kernel command line (2 KiB on x86) this has no practical size limit and needs no quoting.

*The guest side.*  ``/init`` mounts proc, sysfs and devtmpfs, points stdin/stdout/stderr at
``/dev/console`` (the serial port, ``console=ttyS0``), loads the modules, waits briefly for ``/dev/vda``,
prints ``VDISK-GUEST-BEGIN``, runs the script with ``sh``, syncs, prints ``VDISK-GUEST-END rc=N`` and
powers off.  ``-no-reboot`` plus ``panic=-1`` make QEMU exit on a kernel panic too, so a broken guest
never hangs until the timeout; it just lacks the END marker, which :meth:`GuestHandle.finish` reports.

*The host side.*  QEMU runs with ``-accel tcg`` always (KVM hangs on the machines this runs on), its
serial port on stdio.  A reader thread collects the serial output line by line, so a caller can
:meth:`GuestHandle.wait_for` a line the script prints while the guest keeps running, and
:meth:`GuestHandle.send_line` text the script reads from its stdin (echo is off).  Every failure to run
raises :class:`GuestError` carrying the console output; a deadline that passes kills QEMU and raises
:class:`GuestTimeout`.
"""

from __future__ import annotations

import fcntl
import gzip
import hashlib
import logging
import lzma
import os
import re
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Self

from vdisk.errors import VdiskError

log = logging.getLogger(__name__)

KERNEL_METAPACKAGE = "linux-image-cloud-amd64"
BUSYBOX_PACKAGE = "busybox-static"
MODULES = (
    "virtio_ring",
    "virtio",
    "virtio_pci_legacy_dev",
    "virtio_pci_modern_dev",
    "virtio_pci",
    "virtio_blk",
)

BEGIN_MARKER = "VDISK-GUEST-BEGIN"
END_MARKER = "VDISK-GUEST-END"
_END_RE = re.compile(rf"^{END_MARKER} rc=(\d+)$")

QEMU = "qemu-system-x86_64"
KERNEL_APPEND = "console=ttyS0 panic=-1 quiet mitigations=off"
GUEST_MEMORY_MIB = 256
SCRIPT_PATH = "vdisk/script.sh"
FILES_DIR = "vdisk/files"
#: Where an extras initramfs puts its programs.  Scripts call them by this path: busybox's shell runs its
#: own applet of the same name (``mke2fs``, ``nbd-client``) whatever ``PATH`` says.
PROGRAMS_DIR = "usr/bin"


def _init_script(modules: Sequence[str]) -> str:
    """The guest's /init: load ``modules`` in order, run the script, power off."""
    return f"""#!/bin/sh
# vdisk test guest: load virtio, run /{SCRIPT_PATH}, report its status, power off.
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
exec </dev/console >/dev/console 2>&1
stty -echo 2>/dev/null
for m in {" ".join(modules)}; do
    insmod /lib/modules/$m.ko || echo "VDISK-GUEST-WARN insmod $m failed"
done
i=0
if grep -qx 0x0002 /sys/bus/virtio/devices/*/device 2>/dev/null; then  # a virtio disk is attached
    while [ ! -b /dev/vda ] && [ $i -lt 50 ]; do sleep 0.1; i=$((i + 1)); done
fi
cd /tmp
echo {BEGIN_MARKER}
if [ -f /{SCRIPT_PATH} ]; then
    sh /{SCRIPT_PATH}
    rc=$?
else
    echo "VDISK-GUEST-WARN no /{SCRIPT_PATH} in the initrd"
    rc=127
fi
sync
echo "{END_MARKER} rc=$rc"
poweroff -f
"""


INIT_SCRIPT = _init_script(MODULES)

# Bump when the build changes in a way the hashed inputs below do not show.
_RECIPE_VERSION = 1
_MODULE_SUFFIXES = (".ko", ".ko.xz", ".ko.zst", ".ko.gz")
_CONSOLE_TAIL_LINES = 40


class GuestError(VdiskError):
    """The guest could not be built, booted or run to its end; ``console`` holds what it printed."""

    def __init__(self, message: str, *, console: str = ""):
        self.console = console
        if console:
            tail = "\n".join(console.splitlines()[-_CONSOLE_TAIL_LINES:])
            message = f"{message}\n--- last guest console lines ---\n{tail}"
        super().__init__(message)


class GuestTimeout(GuestError):
    """A deadline passed while waiting on the guest; QEMU has been killed."""


@dataclass(frozen=True)
class GuestArtifacts:
    kernel: Path
    initrd: Path


@dataclass(frozen=True)
class GuestResult:
    """``output`` is what the script printed (between the markers); ``rc`` its exit status."""

    output: str
    rc: int
    console: str = ""

    def check(self) -> GuestResult:
        """Return self, or raise :class:`GuestError` if the script failed."""
        if self.rc != 0:
            raise GuestError(f"guest script exited with status {self.rc}", console=self.console)
        return self


@dataclass(frozen=True)
class InitramfsExtras:
    """What a guest needs beyond busybox and virtio-blk (see *Extras* in the module docstring).

    ``modules``: modules of the guest kernel, loaded after :data:`MODULES` in this order (dependencies
    first).  ``programs``: host executables put in the guest's ``/usr/bin`` with their shared libraries;
    scripts call them as ``/usr/bin/NAME`` (see :data:`PROGRAMS_DIR`).
    ``a + b`` holds both, each name once, in order.
    """

    modules: tuple[str, ...] = ()
    programs: tuple[str, ...] = ()

    def __add__(self, other: InitramfsExtras) -> InitramfsExtras:
        return InitramfsExtras(
            modules=tuple(dict.fromkeys(self.modules + other.modules)),
            programs=tuple(dict.fromkeys(self.programs + other.programs)),
        )

    def cache_name(self) -> str:
        """The cache subdirectory of this flavour: a hash of the names (contents go in its recipe)."""
        text = f"modules={','.join(self.modules)}\nprograms={','.join(self.programs)}"
        return f"extras-{hashlib.sha256(text.encode()).hexdigest()[:12]}"


KERNEL_NBD = InitramfsExtras(modules=("virtio_console", "nbd"), programs=("nbd-client", "socat"))
NBD_PORT_NAME = "nbd"
_NBD_GUEST_SOCKET = "/run/nbd.sock"

KERNEL_NBD_CONNECT = f"""\
# /dev/nbd0 through the guest kernel's NBD client: socat relays its unix socket to the virtio port
# {NBD_PORT_NAME!r}, whose host side is connected to the NBD server (vdisk.harness.guest.kernel_nbd_args).
# The port and its name arrive as separate messages from QEMU, some time after virtio_console loads.
nbd_port=
i=0
while [ -z "$nbd_port" ] && [ $i -lt 100 ]; do
    for port in /sys/class/virtio-ports/*; do
        if [ -f "$port/name" ] && [ "$(cat "$port/name")" = {NBD_PORT_NAME} ]; then nbd_port=/dev/${{port##*/}}; fi
    done
    [ -n "$nbd_port" ] || sleep 0.05
    i=$((i + 1))
done
if [ -z "$nbd_port" ]; then echo "VDISK-GUEST-WARN no virtio port named {NBD_PORT_NAME}"; exit 1; fi
mkdir -p /run
/{PROGRAMS_DIR}/socat -b 262144 UNIX-LISTEN:{_NBD_GUEST_SOCKET},unlink-early "$nbd_port" &
nbd_relay=$!
while [ ! -S {_NBD_GUEST_SOCKET} ]; do
    if ! kill -0 $nbd_relay 2>/dev/null; then echo "VDISK-GUEST-WARN socat exited"; exit 1; fi
    sleep 0.05
done
# 4 KiB blocks: the filesystems' block size and vdisk's preferred one
/{PROGRAMS_DIR}/nbd-client -unix {_NBD_GUEST_SOCKET} /dev/nbd0 -b 4096 >/dev/null
"""
KERNEL_NBD_DISCONNECT = f"""\
/{PROGRAMS_DIR}/nbd-client -d /dev/nbd0 >/dev/null
wait $nbd_relay
"""


def kernel_nbd_args(socket_path: str | os.PathLike[str]) -> list[str]:
    """QEMU arguments for the guest's virtio-serial port to the NBD server listening at ``socket_path``.

    QEMU connects when it starts, so the server must already listen; the server's greeting waits in the
    socket until the guest opens the port.
    """
    path = os.fspath(socket_path).replace(",", ",,")
    return [
        "-chardev", f"socket,id=nbd0,path={path}",
        "-device", "virtio-serial",
        "-device", f"virtserialport,chardev=nbd0,name={NBD_PORT_NAME}",
    ]  # fmt: skip


# --- building the kernel and initramfs ----------------------------------------------------------------


def default_cache_dir() -> Path:
    env = os.environ.get("VDISK_CACHE")
    if env:
        return Path(env)
    return Path.home() / ".cache" / "vdisk" / "guest"


def _recipe(extras: InitramfsExtras | None, programs: Mapping[str, Path]) -> str:
    """The stamp of one flavour; ``programs`` maps each initramfs path of ``extras.programs`` to its file."""
    lines = [
        f"version={_RECIPE_VERSION}",
        f"kernel={KERNEL_METAPACKAGE}",
        f"busybox={BUSYBOX_PACKAGE}",
        f"modules={','.join(MODULES)}",
    ]
    modules = MODULES
    if extras is not None:
        modules += extras.modules
        lines.append(f"extra-modules={','.join(extras.modules)}")
        lines += [f"file={name} sha256={hashlib.sha256(path.read_bytes()).hexdigest()}"
                  for name, path in sorted(programs.items())]
    lines.append(_init_script(modules))
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


def ensure_guest_artifacts(
    cache_dir: str | os.PathLike[str] | None = None, *, extras: InitramfsExtras | None = None
) -> GuestArtifacts:
    """Return the guest kernel and base initrd, building them into ``cache_dir`` if they are missing.

    With ``extras`` (not empty), the flavour that also holds them, in its own subdirectory of ``cache_dir``.
    """
    directory = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    if extras == InitramfsExtras():
        extras = None
    if extras is not None:
        directory = directory / extras.cache_name()
    directory.mkdir(parents=True, exist_ok=True)
    artifacts = GuestArtifacts(kernel=directory / "vmlinuz", initrd=directory / "initrd.img")
    stamp = directory / "recipe"
    programs = _program_files(extras.programs) if extras is not None else {}
    recipe = _recipe(extras, programs)
    with _locked(directory / ".lock"):
        if (
            artifacts.kernel.is_file()
            and artifacts.initrd.is_file()
            and stamp.is_file()
            and stamp.read_text().strip() == recipe
        ):
            return artifacts
        started = time.monotonic()
        log.info("building guest kernel and initrd in %s", directory)
        with tempfile.TemporaryDirectory(prefix=".build-", dir=directory) as tmp:
            kernel, initrd = _build(Path(tmp), extras, programs)
            stamp.unlink(missing_ok=True)
            os.replace(kernel, artifacts.kernel)
            os.replace(initrd, artifacts.initrd)
            stamp.write_text(recipe + "\n")
        log.info("guest artifacts built in %.1f s", time.monotonic() - started)
    return artifacts


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    with open(path, "a") as lock_file:
        fcntl.flock(lock_file, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock_file, fcntl.LOCK_UN)


def _run(argv: Sequence[str], *, cwd: Path | None = None, what: str) -> str:
    try:
        proc = subprocess.run(argv, check=False, cwd=cwd, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    except FileNotFoundError as exc:
        raise GuestError(f"{what}: {argv[0]} is not installed (run scripts/setup.sh)") from exc
    if proc.returncode != 0:
        raise GuestError(f"{what} failed (exit {proc.returncode}): {' '.join(argv)}\n{proc.stderr.strip()}")
    return proc.stdout


def _resolve_kernel_package() -> str:
    out = _run(["apt-cache", "depends", KERNEL_METAPACKAGE], what=f"resolving {KERNEL_METAPACKAGE}")
    for line in out.splitlines():
        match = re.match(r"^\s*\|?Depends:\s*(linux-image-\S+-cloud-amd64)\s*$", line)
        if match and match.group(1) != KERNEL_METAPACKAGE:
            return match.group(1)
    raise GuestError(f"{KERNEL_METAPACKAGE} depends on no linux-image-*-cloud-amd64 package:\n{out}")


def _download_packages(dest: Path) -> list[Path]:
    """Download the kernel and busybox .debs into ``dest``, running ``apt-get update`` once if needed."""
    for attempt in (1, 2):
        try:
            packages = [_resolve_kernel_package(), BUSYBOX_PACKAGE]
            _run(["apt-get", "download", *packages], cwd=dest, what="apt-get download")
            break
        except GuestError as exc:
            if attempt == 2:
                raise
            log.info("%s; running apt-get update once and retrying", str(exc).splitlines()[0])
            _run(["apt-get", "update"], what="apt-get update")
    debs = []
    for name in packages:
        found = sorted(dest.glob(f"{name}_*.deb"))
        if len(found) != 1:
            raise GuestError(f"apt-get download left {len(found)} files for {name} in {dest}")
        debs.append(found[0])
    log.info("downloaded %s", ", ".join(d.name for d in debs))
    return debs


_LDD_LINE = re.compile(r"^\s*(?:\S+ => )?(/\S+) \(0x[0-9a-f]+\)$")


def _program_files(programs: Sequence[str]) -> dict[str, Path]:
    """Initramfs path -> host file for ``programs`` (in /usr/bin, by the name asked for) and their libraries.

    Libraries keep the absolute paths ``ldd`` prints (the dynamic loader's own one among them), so the
    guest's loader finds them in its default directories without an ``ld.so.cache``.
    """
    search = os.pathsep.join([os.environ.get("PATH", ""), "/usr/local/sbin", "/usr/sbin", "/sbin"])
    files: dict[str, Path] = {}
    for name in programs:
        found = shutil.which(name, path=search)
        if found is None:
            raise GuestError(f"guest program {name} is not installed on the host (run scripts/setup.sh)")
        files[f"{PROGRAMS_DIR}/{name}"] = Path(found).resolve()
        try:
            proc = subprocess.run(["ldd", found], capture_output=True, text=True, stdin=subprocess.DEVNULL)
        except FileNotFoundError as exc:
            raise GuestError("ldd is not installed (Debian: libc-bin)") from exc
        if proc.returncode != 0:
            if "not a dynamic executable" in proc.stdout + proc.stderr:
                continue  # static: nothing else to copy
            raise GuestError(f"ldd {found} failed (exit {proc.returncode}): {proc.stderr.strip()}")
        for line in proc.stdout.splitlines():
            if "not found" in line:
                raise GuestError(f"{name} needs a library that is missing on the host: {line.strip()}")
            match = _LDD_LINE.match(line)
            if match:  # (linux-vdso.so.1 has no path: the kernel provides it)
                files[match.group(1).lstrip("/")] = Path(match.group(1)).resolve()
    return files


def _find_module(tree: Path, name: str) -> Path:
    for base in (tree / "lib" / "modules", tree / "usr" / "lib" / "modules"):
        for suffix in _MODULE_SUFFIXES:
            found = sorted(base.glob(f"*/kernel/**/{name}{suffix}"))
            if found:
                return found[0]
    raise GuestError(f"kernel module {name} not found in the kernel package (looked in {tree})")


def _module_bytes(path: Path) -> bytes:
    data = path.read_bytes()
    if path.name.endswith(".ko.xz"):
        return lzma.decompress(data)
    if path.name.endswith(".ko.gz"):
        return gzip.decompress(data)
    if path.name.endswith(".ko.zst"):
        return _run_bytes(["zstd", "-d", "-c", str(path)], what=f"decompressing {path.name}")
    return data


def _run_bytes(argv: Sequence[str], *, what: str, input: bytes | None = None, cwd: Path | None = None) -> bytes:
    try:
        proc = subprocess.run(argv, check=False, input=input, cwd=cwd, capture_output=True)
    except FileNotFoundError as exc:
        raise GuestError(f"{what}: {argv[0]} is not installed (run scripts/setup.sh)") from exc
    if proc.returncode != 0:
        stderr = proc.stderr.decode(errors="replace").strip()
        raise GuestError(f"{what} failed (exit {proc.returncode}): {' '.join(argv)}\n{stderr}")
    return proc.stdout


def _build(tmp: Path, extras: InitramfsExtras | None, programs: Mapping[str, Path]) -> tuple[Path, Path]:
    debs_dir = tmp / "debs"
    debs_dir.mkdir()
    kernel_deb, busybox_deb = _download_packages(debs_dir)
    kernel_tree, busybox_tree = tmp / "kernel", tmp / "busybox"
    _run(["dpkg", "-x", str(kernel_deb), str(kernel_tree)], what="unpacking the kernel package")
    _run(["dpkg", "-x", str(busybox_deb), str(busybox_tree)], what="unpacking busybox-static")

    vmlinuz = sorted((kernel_tree / "boot").glob("vmlinuz-*"))
    if len(vmlinuz) != 1:
        raise GuestError(f"expected one boot/vmlinuz-* in {kernel_deb.name}, found {len(vmlinuz)}")
    kernel = tmp / "vmlinuz"
    shutil.copyfile(vmlinuz[0], kernel)

    root = tmp / "root"
    for sub in ("bin", "dev", "proc", "sys", "tmp", "lib/modules", FILES_DIR):
        (root / sub).mkdir(parents=True, exist_ok=True)
    busybox = next(
        (p for p in (busybox_tree / "bin" / "busybox", busybox_tree / "usr/bin/busybox") if p.is_file()), None
    )
    if busybox is None:
        raise GuestError(f"no busybox binary in {busybox_deb.name}")
    shutil.copyfile(busybox, root / "bin" / "busybox")
    (root / "bin" / "busybox").chmod(0o755)
    (root / "bin" / "sh").symlink_to("busybox")
    modules = MODULES + (extras.modules if extras is not None else ())
    for name in modules:
        (root / "lib" / "modules" / f"{name}.ko").write_bytes(_module_bytes(_find_module(kernel_tree, name)))
    for name, source in programs.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, root / name)
        (root / name).chmod(0o755)
    (root / "init").write_text(_init_script(modules))
    (root / "init").chmod(0o755)

    names = sorted(str(p.relative_to(root)) for p in root.rglob("*"))
    listing = "".join(f"{name}\n" for name in [".", *names]).encode()
    archive = _run_bytes(
        ["cpio", "-o", "-H", "newc", "-R", "0:0", "--quiet"], input=listing, cwd=root, what="packing the initramfs"
    )
    initrd = tmp / "initrd.img"
    initrd.write_bytes(gzip.compress(archive, compresslevel=6, mtime=0))
    return kernel, initrd


# --- the per-boot archive ------------------------------------------------------------------------------


def _newc_entry(name: str, mode: int, data: bytes = b"", *, ino: int) -> bytes:
    """One entry of a cpio "newc" archive (the format the kernel's initramfs unpacker reads)."""
    encoded = name.encode() + b"\0"
    fields = (ino, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(encoded), 0)
    header = b"070701" + b"".join(b"%08X" % value for value in fields)
    head = header + encoded
    head += b"\0" * (-len(head) % 4)
    return head + data + b"\0" * (-len(data) % 4)


def _script_archive(script: str, files: Mapping[str, bytes]) -> bytes:
    entries = [("vdisk", 0o040755, b""), (FILES_DIR, 0o040755, b""), (SCRIPT_PATH, 0o100755, script.encode())]
    for name, data in sorted(files.items()):
        if "/" in name or name in ("", ".", ".."):
            raise ValueError(f"guest file name {name!r} must be a plain file name")
        entries.append((f"{FILES_DIR}/{name}", 0o100644, bytes(data)))
    out = b"".join(_newc_entry(name, mode, data, ino=i + 1) for i, (name, mode, data) in enumerate(entries))
    out += _newc_entry("TRAILER!!!", 0, ino=0)
    return out + b"\0" * (-len(out) % 512)


# --- running a guest -----------------------------------------------------------------------------------


def qemu_command(
    artifacts: GuestArtifacts, initrd: Path, drive: str | os.PathLike[str] | None, extra_args: Sequence[str] = ()
) -> list[str]:
    """The QEMU command line for one boot; ``drive`` is a raw file path or a QEMU URI (``nbd:unix:...``)."""
    argv = [
        QEMU,
        "-accel", "tcg",
        "-m", str(GUEST_MEMORY_MIB),
        "-nodefaults",
        "-no-user-config",
        "-display", "none",
        "-serial", "stdio",
        "-no-reboot",
        "-kernel", str(artifacts.kernel),
        "-initrd", str(initrd),
        "-append", KERNEL_APPEND,
    ]  # fmt: skip
    if drive is not None:
        escaped = os.fspath(drive).replace(",", ",,")
        argv += ["-drive", f"file={escaped},format=raw,if=virtio,cache=writeback"]
    return argv + list(extra_args)


class GuestHandle:
    """A running guest.  Use as a context manager, or call :meth:`finish` or :meth:`kill` yourself."""

    def __init__(self, argv: Sequence[str], workdir: Path):
        self.argv = list(argv)
        self._workdir = workdir
        self._stderr = open(workdir / "qemu.stderr", "w+b")  # noqa: SIM115 (lives as long as the guest)
        self._lines: list[str] = []
        self._cursor = 0
        self._cond = threading.Condition()
        self._eof = False
        self._stderr_text: str | None = None
        log.debug("starting %s", " ".join(self.argv))
        try:
            self.process = subprocess.Popen(
                self.argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._stderr
            )
        except FileNotFoundError as exc:
            self._stderr.close()
            shutil.rmtree(workdir, ignore_errors=True)
            raise GuestError(f"{self.argv[0]} is not installed (run scripts/setup.sh)") from exc
        self._reader = threading.Thread(target=self._read, name="vdisk-guest-console", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for raw in self.process.stdout:
            line = raw.decode(errors="replace").rstrip("\r\n").replace("\r", "")
            with self._cond:
                self._lines.append(line)
                self._cond.notify_all()
        with self._cond:
            self._eof = True
            self._cond.notify_all()

    @property
    def console(self) -> str:
        """Everything the guest printed so far."""
        with self._cond:
            return "\n".join(self._lines)

    def _qemu_stderr(self) -> str:
        if self._stderr_text is None:
            self._stderr.seek(0)
            return self._stderr.read().decode(errors="replace").strip()
        return self._stderr_text

    def _failure(self, message: str, cls: type[GuestError] = GuestError) -> GuestError:
        stderr = self._qemu_stderr()
        if stderr:
            message = f"{message}; qemu said: {stderr}"
        return cls(message, console=self.console)

    def wait_for(self, pattern: str | re.Pattern[str], timeout: float = 60.0) -> re.Match[str]:
        """Wait for a console line matching ``pattern`` (``re.search``), after the last line matched before.

        Raises :class:`GuestTimeout` (after killing QEMU) if none comes within ``timeout`` seconds, and
        :class:`GuestError` if the guest stops first.
        """
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                while self._cursor < len(self._lines):
                    match = regex.search(self._lines[self._cursor])
                    self._cursor += 1
                    if match:
                        return match
                if self._eof:
                    break
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._cond.wait(remaining)
        if self._eof:
            self.process.wait()
            raise self._failure(
                f"guest stopped (qemu exit {self.process.returncode}) before printing a line matching {regex.pattern!r}"
            )
        self.kill()
        raise self._failure(f"no guest line matched {regex.pattern!r} within {timeout:g} s", GuestTimeout)

    def send_line(self, text: str) -> None:
        """Write ``text`` and a newline to the guest's serial console: the script's stdin."""
        assert self.process.stdin is not None
        try:
            self.process.stdin.write(text.encode() + b"\n")
            self.process.stdin.flush()
        except BrokenPipeError as exc:
            raise self._failure("guest is no longer running") from exc

    def finish(self, timeout: float = 120.0) -> GuestResult:
        """Wait for the guest to power off and return the script's output and exit status."""
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise self._failure(f"guest did not power off within {timeout:g} s", GuestTimeout) from None
        self._reader.join()
        try:
            return self._result()
        finally:
            self._cleanup()

    def _result(self) -> GuestResult:
        lines = self.console.splitlines()
        end = next((i for i in range(len(lines) - 1, -1, -1) if _END_RE.match(lines[i])), None)
        if end is None:
            raise self._failure(f"guest stopped (qemu exit {self.process.returncode}) without printing {END_MARKER}")
        begin = next((i for i in range(end - 1, -1, -1) if lines[i] == BEGIN_MARKER), -1)
        rc_match = _END_RE.match(lines[end])
        assert rc_match is not None
        return GuestResult(output="\n".join(lines[begin + 1 : end]), rc=int(rc_match.group(1)), console=self.console)

    def kill(self) -> None:
        """Stop QEMU now (no-op if it already exited) and remove this boot's files."""
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()
        self._reader.join(timeout=10)
        self._cleanup()

    def _cleanup(self) -> None:
        if self.process.stdin is not None and not self.process.stdin.closed:
            with suppress(BrokenPipeError):
                self.process.stdin.close()
        if self.process.stdout is not None and not self._reader.is_alive():
            self.process.stdout.close()
        if not self._stderr.closed:
            self._stderr_text = self._qemu_stderr()
            self._stderr.close()
        shutil.rmtree(self._workdir, ignore_errors=True)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.kill()


def start_guest(
    drive: str | os.PathLike[str] | None,
    script: str,
    *,
    files: Mapping[str, bytes] | None = None,
    extra_args: Sequence[str] = (),
    artifacts: GuestArtifacts | None = None,
) -> GuestHandle:
    """Boot the guest with ``drive`` as /dev/vda and start ``script``; return at once with a handle.

    ``files`` are put in the guest as ``/vdisk/files/NAME``.  The script runs with ``sh`` in /tmp, its
    stdin, stdout and stderr on the serial console.
    """
    artifacts = artifacts or ensure_guest_artifacts()
    workdir = Path(tempfile.mkdtemp(prefix="vdisk-guest-"))
    try:
        base = artifacts.initrd.read_bytes()
        initrd = workdir / "initrd.img"
        initrd.write_bytes(base + b"\0" * (-len(base) % 4) + _script_archive(script, files or {}))
        argv = qemu_command(artifacts, initrd, drive, extra_args)
    except BaseException:
        shutil.rmtree(workdir, ignore_errors=True)
        raise
    return GuestHandle(argv, workdir)


def boot_guest(
    drive: str | os.PathLike[str] | None,
    script: str,
    *,
    timeout: float = 120.0,
    extra_args: Sequence[str] = (),
    files: Mapping[str, bytes] | None = None,
    artifacts: GuestArtifacts | None = None,
) -> GuestResult:
    """Boot the guest, run ``script`` to its end and return its output and exit status.

    ``timeout`` covers the whole boot; when it passes QEMU is killed and :class:`GuestTimeout` raised.
    """
    with start_guest(drive, script, files=files, extra_args=extra_args, artifacts=artifacts) as guest:
        return guest.finish(timeout)
