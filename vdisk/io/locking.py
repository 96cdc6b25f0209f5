"""Image locking compatible with QEMU's (``block/file-posix.c``: raw_apply_lock_bytes / raw_check_lock_bytes).

QEMU expresses "I use permission P" as a shared OFD lock on byte 100 + bit(P), and "I do not let others use
P" as a shared lock on byte 200 + bit(P).  A would-be user checks for conflicting locks with F_OFD_GETLK.
Taking the same bytes makes QEMU and vdisk refuse each other exactly as two QEMUs would: a second writer
(qemu-img, qemu-nbd, another vdisk) on an image that vdisk serves is refused, and vice versa.
"""

from __future__ import annotations

import fcntl
import struct

from vdisk.errors import ImageLocked

PERM_BASE = 100
SHARED_BASE = 200
PERM_CONSISTENT_READ = 0
PERM_WRITE = 1
PERM_WRITE_UNCHANGED = 2
PERM_RESIZE = 3
PERM_NAMES = {0: "consistent read", 1: "write", 2: "write unchanged", 3: "resize"}

# struct flock on x86_64 Linux: short l_type, short l_whence, off_t l_start, off_t l_len, pid_t l_pid (+pad)
_FLOCK = struct.Struct("hhqqi4x")


def _lock(fd: int, cmd: int, lock_type: int, byte: int) -> int:
    request = _FLOCK.pack(lock_type, 0, byte, 1, 0)
    answer = fcntl.fcntl(fd, cmd, request)
    return _FLOCK.unpack(answer)[0]


def lock_image(fd: int, path: str, *, write: bool, force_share: bool = False) -> None:
    """Take QEMU's lock bytes for a reader (write=False) or an exclusive writer (write=True).

    ``force_share`` is qemu-img's ``-U``: take and check nothing (read-only use only).
    """
    if force_share and not write:
        return
    perms = [PERM_CONSISTENT_READ] + ([PERM_WRITE, PERM_WRITE_UNCHANGED] if write else [])
    unshared = [PERM_WRITE, PERM_RESIZE]
    for perm in perms:
        if _lock(fd, fcntl.F_OFD_GETLK, fcntl.F_WRLCK, SHARED_BASE + perm) != fcntl.F_UNLCK:
            raise ImageLocked(f"Failed to get \"{PERM_NAMES[perm]}\" lock: another process refuses to share it",
                              path=path)
    for perm in unshared:
        if _lock(fd, fcntl.F_OFD_GETLK, fcntl.F_WRLCK, PERM_BASE + perm) != fcntl.F_UNLCK:
            raise ImageLocked(
                f"Failed to get shared \"{PERM_NAMES[perm]}\" lock: is another process using the image?", path=path
            )
    for perm in perms:
        _lock(fd, fcntl.F_OFD_SETLK, fcntl.F_RDLCK, PERM_BASE + perm)
    for perm in unshared:
        _lock(fd, fcntl.F_OFD_SETLK, fcntl.F_RDLCK, SHARED_BASE + perm)
