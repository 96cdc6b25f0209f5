"""A raw image file as a node (a base image of a chain, or a raw export).

Guest offset and file offset are the same.  A raw file names no backing file and holds every byte itself:
its map is data where the file has data and zeros over its holes, nothing ever shows through from
``below``, and the stream's calls that fill unallocated clusters have nothing to do or refuse.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os

import numpy as np

from vdisk.errors import OutOfRange, ReadOnlyError, StorageError, UnsupportedFeature
from vdisk.formats.node import KIND_DATA, KIND_ZERO, Below, Run, Status, check_request
from vdisk.io import faults, locking, native, sparse


class RawImage:
    format_name = "raw"
    cluster_size = 65536  # the granularity the block layer locks and copies in; a raw file has none of its own
    backing_name = None
    backing_format = None
    can_have_backing = False
    node_name: str | None = None  # the QMP node name, once the monitor named it

    def __init__(self, path: str, fd: int, *, read_only: bool):
        self.path = path
        self.fd = fd
        self.read_only = read_only
        self.size = os.fstat(fd).st_size
        self.below: Below | None = None  # never read: a raw file holds all of its range

    @classmethod
    def open(cls, path: str, *, read_only: bool = False, force_share: bool = False) -> RawImage:
        try:
            fd = os.open(path, (os.O_RDONLY if read_only else os.O_RDWR) | os.O_CLOEXEC)
        except OSError as exc:
            raise StorageError.from_oserror(exc, path=path, action="open") from exc
        try:
            locking.lock_image(fd, path, write=not read_only, force_share=force_share)
        except BaseException:
            os.close(fd)
            raise
        return cls(path, fd, read_only=read_only)

    @staticmethod
    def create(path: str, size: int) -> None:
        try:
            with open(path, "wb") as f:
                f.truncate(size)
        except OSError as exc:
            raise StorageError.from_oserror(exc, path=path, action="create") from exc

    def _writable(self) -> None:
        if self.read_only:
            raise ReadOnlyError("image is open read-only", path=self.path)

    def pread(self, buf, guest_offset: int) -> None:
        view = memoryview(buf).cast("B")
        check_request(guest_offset, len(view), self.size)
        if faults.ENABLED:
            faults.check(self.path, "read", guest_offset, len(view))
        native.pread_full(self.fd, view, guest_offset)

    def read_mapped(self, buf, guest_offset: int, kind: int, host: int) -> None:
        """A run of ``map_units``: DATA at file offset ``host``, or ZERO (a hole)."""
        view = memoryview(buf).cast("B")
        check_request(guest_offset, len(view), self.size)
        if kind == KIND_ZERO:
            native.zero_fill(view)
            return
        if kind != KIND_DATA:
            raise OutOfRange(f"{self.path}: a raw file has no runs of kind {kind}", offset=guest_offset,
                             length=len(view))
        if faults.ENABLED:
            faults.check(self.path, "read", host, len(view))
        native.pread_full(self.fd, view, host)

    def pwrite(self, buf, guest_offset: int, *, fua: bool = False) -> None:
        self._writable()
        view = memoryview(buf).cast("B")
        check_request(guest_offset, len(view), self.size)
        native.pwrite_full(self.fd, view, guest_offset)
        if fua:
            self.flush()

    def write_zeroes(self, guest_offset: int, length: int, *, may_trim: bool = True, fua: bool = False) -> None:
        self._writable()
        check_request(guest_offset, length, self.size)
        try:
            mode = 0x02 | 0x01 if may_trim else 0x10  # PUNCH_HOLE|KEEP_SIZE, or ZERO_RANGE
            _fallocate(self.fd, mode, guest_offset, length)
        except OSError:
            native.pwrite_full(self.fd, bytes(length), guest_offset)
        if fua:
            self.flush()

    def trim(self, guest_offset: int, length: int) -> None:
        self._writable()
        check_request(guest_offset, length, self.size)
        try:
            _fallocate(self.fd, 0x02 | 0x01, guest_offset, length)
        except OSError as exc:
            if exc.errno not in (errno.EOPNOTSUPP, errno.ENOSYS):
                raise StorageError.from_oserror(exc, path=self.path, action="discard") from exc

    def flush(self) -> None:
        if self.read_only:
            return
        try:
            os.fdatasync(self.fd)
        except OSError as exc:
            raise StorageError.from_oserror(exc, path=self.path, action="fdatasync") from exc

    def close(self) -> None:
        if self.fd >= 0:
            self.flush()
            os.close(self.fd)
            self.fd = -1

    def clean_caches(self) -> int:
        return 0  # a raw file caches no metadata

    def map_units(self, guest_offset: int, length: int) -> list[Run]:
        """Data where the file has data, zero where it has holes (SEEK_DATA/SEEK_HOLE), like QEMU."""
        return [(start, stop - start, KIND_ZERO if hole else KIND_DATA, start)
                for start, stop, hole in sparse.host_extents(self.fd, guest_offset, length)]

    def block_status(self, guest_offset: int, length: int) -> list[Status]:
        """``map_units`` with every host offset known (the identity, 0 included)."""
        return [Status(start, run_length, kind, kind == KIND_ZERO, host)
                for start, run_length, kind, host in self.map_units(guest_offset, length)]

    def describe(self) -> dict:
        return {}  # qemu-img info says nothing of a raw file beyond its size and name

    def unallocated_clusters(self, first: int, count: int) -> np.ndarray:
        return np.zeros(count, dtype=bool)  # every byte is the file's own

    def partially_allocated(self, guest_offset: int, length: int) -> list[int]:
        return []

    def populate(self, guest_offset: int, buf, wanted: np.ndarray, zero: np.ndarray) -> int:
        raise UnsupportedFeature("a raw image has no unallocated clusters to fill from a backing file",
                                 path=self.path)

    def set_backing(self, backing_name: str | None, backing_format: str | None) -> None:
        raise UnsupportedFeature("a raw image cannot record a backing file", path=self.path)


_LIBC = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)


def _fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    if _LIBC.fallocate(fd, mode, ctypes.c_long(offset), ctypes.c_long(length)) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))
