"""The state every part of an open qcow2 image shares: the file, its header and geometry, the metadata lock.

QEMU keeps this in one ``BDRVQcow2State`` that qcow2.c, qcow2-cluster.c and qcow2-refcount.c all use; here
it is ``ImageFile``, which the facade (``image.Qcow2Image``) creates and hands to ``refcount.Refcounts`` and
``cluster.Clusters``.  Each of those owns its own tables; this object owns no table, only what they all need:
the descriptor and host I/O with errors mapped into vdisk's tree (every write passes fault injection and the
power-loss I/O log: ``vdisk.io.faults``, ``vdisk.io.iolog``), the one rule for where a metadata table may
lie, and the lock that covers all metadata (see ``vdisk.formats.qcow2.cache`` for its safe points).
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable

import numpy as np

from vdisk.errors import CorruptImage, ReadOnlyError, StorageError
from vdisk.formats.qcow2 import format as fmt
from vdisk.formats.qcow2.cache import MetadataLock
from vdisk.io import faults, iolog, native, sparse


class ImageFile:
    """One open qcow2 file: descriptor, parsed header, geometry, and the lock over its metadata."""

    def __init__(self, path: str, fd: int, header: fmt.Header, *, read_only: bool,
                 at_safe_point: Callable[[], None]):
        self.path = path
        self.fd = fd
        self.header = header
        self.read_only = read_only
        self.lock = MetadataLock(at_safe_point)
        self.cluster_bits = header.cluster_bits
        self.cluster_size = header.cluster_size
        self.size = header.size
        self.extended_l2 = header.extended_l2
        # The guest unit an L2 entry maps: a cluster, or a subcluster with extended L2 entries.
        self.unit_size = self.cluster_size // (fmt.SUBCLUSTERS_PER_CLUSTER if self.extended_l2 else 1)
        self.l2_entries = header.l2_entries
        self.l2_words = 2 if self.extended_l2 else 1
        self.has_zero_flag = header.version >= 3

    def check_writable(self) -> None:
        if self.read_only:
            raise ReadOnlyError("image is open read-only", path=self.path)

    def fstat(self) -> os.stat_result:
        return os.fstat(self.fd)

    def file_size(self) -> int:
        return os.fstat(self.fd).st_size

    def check_table_offset(self, host_offset: int, field: str) -> None:
        """Where a cluster-sized metadata table (L2 table, refcount block) that ``field`` points at may lie:
        cluster aligned, below 2^56, inside the file."""
        if host_offset % self.cluster_size or host_offset + self.cluster_size > fmt.MAX_HOST_OFFSET:
            raise CorruptImage(f"table offset {host_offset:#x} invalid", path=self.path, field=field)
        file_size = self.file_size()
        if host_offset + self.cluster_size > file_size:
            raise CorruptImage(f"table at {host_offset:#x} lies past the end of the file ({file_size} bytes)",
                               path=self.path, field=field)

    # --- host I/O, errors mapped into vdisk's tree ---------------------------------------------------

    def pread(self, length: int, offset: int) -> bytes:
        """``length`` bytes at ``offset``; zeros past the end of the file."""
        try:
            data = os.pread(self.fd, length, offset)
        except OSError as exc:
            raise StorageError.from_oserror(exc, path=self.path, action=f"read at {offset:#x}") from exc
        return data.ljust(length, b"\0")

    def pread_into(self, view: memoryview, offset: int) -> None:
        if faults.ENABLED:
            faults.check(self.path, "read", offset, len(view))
        try:
            native.pread_full(self.fd, view, offset)
        except StorageError as exc:
            exc.path = self.path
            raise

    def pwrite(self, data, offset: int) -> None:
        if faults.ENABLED:
            faults.check(self.path, "write", offset, len(data))
        try:
            if iolog.ENABLED:  # power-loss tests: record the write (see vdisk.io.iolog)
                iolog.write(self.path, data, offset, lambda: native.pwrite_full(self.fd, data, offset))
            else:
                native.pwrite_full(self.fd, data, offset)
        except StorageError as exc:
            exc.path = self.path
            raise

    def pwritev(self, buffers: list, offset: int) -> None:
        """The buffers back to back at ``offset`` (one system call where the I/O log does not record)."""
        if len(buffers) == 1 or iolog.ENABLED:
            self.pwrite(buffers[0] if len(buffers) == 1 else b"".join(buffers), offset)
            return
        total = sum(len(b) for b in buffers)
        if faults.ENABLED:
            faults.check(self.path, "write", offset, total)
        try:
            done = os.pwritev(self.fd, buffers, offset)
        except OSError as exc:
            raise StorageError.from_oserror(exc, path=self.path, action=f"write at {offset:#x}") from exc
        if done < total:
            joined = b"".join(bytes(b) for b in buffers)
            self.pwrite(memoryview(joined)[done:], offset + done)

    def pwrite_selected(self, buf, selected: np.ndarray, offset: int) -> None:
        """The clusters of ``buf`` that ``selected`` marks, packed one after another at ``offset``."""
        cs = self.cluster_size
        count = int(np.count_nonzero(selected))
        try:
            if faults.ENABLED:
                faults.check(self.path, "write", offset, count * cs)
            if iolog.ENABLED:
                view = memoryview(buf)
                self.pwrite(b"".join(view[int(i) * cs : (int(i) + 1) * cs] for i in np.flatnonzero(selected)), offset)
            else:
                native.pwrite_selected(self.fd, buf, cs, selected, offset)
        except StorageError as exc:
            exc.path = self.path
            raise

    def reserve(self, host_offset: int, length: int) -> None:
        """Give the file blocks for a new table now: it is written only at the next flush, and a full disk
        must fail the request that needs the table (as in QEMU, which writes it at once), not every later
        flush.  Where the file system cannot preallocate, the first write of the table will."""
        try:
            os.posix_fallocate(self.fd, host_offset, length)
        except OSError as exc:
            if exc.errno in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                return
            raise StorageError.from_oserror(exc, path=self.path,
                                            action=f"preallocate {length} bytes at {host_offset:#x}") from exc

    def fdatasync(self) -> None:
        try:
            if iolog.ENABLED:
                iolog.sync(self.path, lambda: os.fdatasync(self.fd))
            else:
                os.fdatasync(self.fd)
        except OSError as exc:
            raise StorageError.from_oserror(exc, path=self.path, action="fdatasync") from exc

    def host_extents(self, offset: int, length: int) -> list[tuple[int, int, bool]]:
        """[offset, offset + length) of the file as (start, stop, is_hole) runs (``vdisk.io.sparse``)."""
        return sparse.host_extents(self.fd, offset, length)
