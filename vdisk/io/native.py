"""The one module that imports the compiled core (``vdisk._copier``), with a pure-Python fallback.

Theory of operation
-------------------
Two implementations of the same six operations sit behind one validating front end (:class:`Core`):

* :class:`CCore` calls the cffi API-mode extension built from ``native/copier.c``.  cffi releases the GIL
  around every call, so scans and I/O run beside the guest-facing threads.
* :class:`PythonCore` is the reference: numpy for the zero map, ``os.preadv``/``os.pwritev``/
  ``os.copy_file_range`` for I/O.  It mirrors the C loops one for one (same short-transfer handling, same
  fallback rules), so the one parametrised test set in ``tests/test_native.py`` holds both to the same
  results.

``Core``'s public methods validate every argument (buffer shape and writability, cluster size, select
length, offsets within ``off_t``, overlapping copies within one file) and raise :class:`OutOfRange`; the
backends then do the work and turn an errno into :class:`StorageError`.  C therefore only checks what it
needs to stay memory-safe.

Buffers are never copied: callers pass ``bytes``/``bytearray``/``memoryview``/numpy arrays (any
C-contiguous buffer), and both backends read or write them in place.  ``copy_range`` needs a bounce buffer
when the kernel cannot copy between the two files; each thread keeps one (``BOUNCE_SIZE`` bytes) and
reuses it, so concurrent copies from different threads never share one.

Loading: the compiled core is optional at import (a source checkout without a build still works, slower)
but mandatory in CI (a test asserts ``BACKEND == "c"`` when ``$CI`` is set).  ``vdisk_version()`` compiled
into the ``.so`` must equal :data:`EXPECTED_VERSION`; a stale build is refused with a warning and the
Python fallback is used instead.
"""

from __future__ import annotations

import errno as _errno
import importlib
import logging
import operator
import os
import threading
from types import ModuleType
from typing import Any

import numpy as np

from vdisk.errors import OutOfRange, StorageError

log = logging.getLogger(__name__)

#: Must equal ``VDISK_COPIER_VERSION`` in ``native/copier.h``; bump both together.
EXPECTED_VERSION = 1

#: Size of the per-thread bounce buffer used when the kernel cannot copy between two files.
BOUNCE_SIZE = 1 << 20

#: Largest offset + length a positional call may reach (``off_t`` is a signed 64-bit integer).
OFF_MAX = (1 << 63) - 1

#: Largest value a C ``int`` file descriptor can hold.
FD_MAX = (1 << 31) - 1

#: Largest transfer handed to one system call (as ``VDISK_MAX_IO`` in copier.c).
_MAX_IO = 1 << 30

#: Largest number of iovecs in one ``pwritev`` (as ``IOV_MAX`` in copier.c).
_IOV_MAX = 1024

#: ``copy_file_range`` errors that mean "not between these two files": copy through the bounce buffer.
_COPY_FALLBACK_ERRNOS = frozenset({_errno.EXDEV, _errno.ENOSYS, _errno.EOPNOTSUPP, _errno.ENOTSUP, _errno.EINVAL})

Buffer = bytes | bytearray | memoryview | np.ndarray


# --- argument validation --------------------------------------------------------------------------------


def _byte_view(buf: Any, name: str, *, writable: bool = False) -> memoryview:
    """A flat unsigned-byte memoryview of ``buf`` without copying it."""
    try:
        view = memoryview(buf)
    except TypeError:
        raise OutOfRange(
            f"{name} must be a buffer (bytes, bytearray, memoryview, numpy array), not {type(buf).__name__}"
        ) from None
    if not view.c_contiguous:
        raise OutOfRange(f"{name} must be C-contiguous (got a strided view of shape {view.shape})")
    if writable and view.readonly:
        raise OutOfRange(f"{name} is read-only; a read needs a writable buffer (bytearray, numpy array)")
    if view.ndim != 1 or view.format != "B":
        try:
            view = view.cast("B")
        except (TypeError, ValueError) as exc:
            raise OutOfRange(f"{name} cannot be seen as bytes: {exc}") from None
    return view


def _check_int(name: str, value: Any, *, minimum: int = 0, maximum: int = OFF_MAX) -> int:
    if isinstance(value, bool):
        raise OutOfRange(f"{name} must be an integer, not bool")
    try:
        value = operator.index(value)
    except TypeError:
        raise OutOfRange(f"{name} must be an integer, not {type(value).__name__}") from None
    if not minimum <= value <= maximum:
        raise OutOfRange(f"{name} {value} is outside [{minimum}, {maximum}]")
    return value


def _check_fd(name: str, fd: Any) -> int:
    return _check_int(name, fd, maximum=FD_MAX)


def _check_span(name: str, offset: Any, length: int) -> int:
    offset = _check_int(name, offset)
    if offset + length > OFF_MAX:
        raise OutOfRange(
            f"{name} {offset:#x} + length {length:#x} passes the largest file offset {OFF_MAX:#x}",
            offset=offset,
            length=length,
        )
    return offset


def _check_clusters(view: memoryview, cluster_size: Any) -> tuple[int, int]:
    """``(cluster_size, cluster_count)`` for a buffer that must hold whole clusters."""
    cluster_size = _check_int("cluster_size", cluster_size, minimum=1)
    if len(view) % cluster_size:
        raise OutOfRange(
            f"buffer length {len(view)} is not a multiple of cluster_size {cluster_size}", length=len(view)
        )
    return cluster_size, len(view) // cluster_size


def _check_select(select: Any, n: int) -> np.ndarray:
    """A contiguous one-byte-per-cluster bool array (a view of ``select`` when it already is one)."""
    try:
        sel = np.asarray(select)
    except (TypeError, ValueError) as exc:
        raise OutOfRange(f"select must be an array of flags: {exc}") from None
    if sel.ndim != 1 or sel.shape[0] != n:
        raise OutOfRange(f"select has shape {sel.shape}; expected ({n},), one flag per cluster of the buffer")
    if sel.dtype != np.bool_:
        if not (np.issubdtype(sel.dtype, np.integer) or n == 0):
            raise OutOfRange(f"select must be bool or integer flags, not {sel.dtype}")
        sel = sel != 0
    return np.ascontiguousarray(sel)


def _same_file(fd_a: int, fd_b: int) -> bool:
    if fd_a == fd_b:
        return True
    try:
        st_a, st_b = os.fstat(fd_a), os.fstat(fd_b)
    except OSError as exc:
        raise StorageError.from_oserror(exc, path=None, action=f"fstat of fd {fd_a} or fd {fd_b}") from exc
    return (st_a.st_dev, st_a.st_ino) == (st_b.st_dev, st_b.st_ino)


# --- errors ---------------------------------------------------------------------------------------------


def _fd_path(fd: int) -> str | None:
    """The path behind ``fd`` for an error message (Linux), or None."""
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return None


def _storage_error(code: int, fd: int | None, action: str) -> StorageError:
    exc = OSError(code, os.strerror(code))
    return StorageError.from_oserror(exc, path=_fd_path(fd) if fd is not None else None, action=action)


# --- the per-thread bounce buffer -----------------------------------------------------------------------

_thread_state = threading.local()


def _bounce() -> bytearray:
    bounce = getattr(_thread_state, "bounce", None)
    if bounce is None:
        bounce = _thread_state.bounce = bytearray(BOUNCE_SIZE)
    return bounce


# --- the front end ----------------------------------------------------------------------------------------


class Core:
    """Validating front end shared by both backends; subclasses implement the ``_`` methods."""

    name: str = "abstract"

    def zero_map(self, buf: Buffer, cluster_size: int) -> np.ndarray:
        """``out[i]`` is True when cluster ``i`` of ``buf`` is all zeros; ``len(buf)`` must be a multiple of
        ``cluster_size``."""
        view = _byte_view(buf, "buf")
        cluster_size, n = _check_clusters(view, cluster_size)
        out = np.empty(n, dtype=np.bool_)
        if n:
            self._zero_map(view, cluster_size, out)
        return out

    def is_zero(self, buf: Buffer) -> bool:
        """True when every byte of ``buf`` is zero (True for an empty buffer)."""
        view = _byte_view(buf, "buf")
        if not len(view):
            return True
        out = np.empty(1, dtype=np.bool_)
        self._zero_map(view, len(view), out)
        return bool(out[0])

    def pread_full(self, fd: int, buf: Buffer, offset: int) -> None:
        """Fill ``buf`` from ``fd`` at ``offset``; the part past end-of-file reads as zeros."""
        view = _byte_view(buf, "buf", writable=True)
        fd = _check_fd("fd", fd)
        offset = _check_span("offset", offset, len(view))
        if len(view):
            self._pread_full(fd, view, offset)

    def pwrite_full(self, fd: int, buf: Buffer, offset: int) -> None:
        """Write all of ``buf`` to ``fd`` at ``offset``."""
        view = _byte_view(buf, "buf")
        fd = _check_fd("fd", fd)
        offset = _check_span("offset", offset, len(view))
        if len(view):
            self._pwrite_full(fd, view, offset)

    def pwrite_selected(self, fd: int, buf: Buffer, cluster_size: int, select: Any, host_offset: int) -> int:
        """Write the clusters ``i`` of ``buf`` with ``select[i]`` true, packed one after another from
        ``host_offset`` (``k`` selected clusters fill ``[host_offset, host_offset + k * cluster_size)``).
        Returns ``k``."""
        view = _byte_view(buf, "buf")
        fd = _check_fd("fd", fd)
        cluster_size, n = _check_clusters(view, cluster_size)
        sel = _check_select(select, n)
        count = int(np.count_nonzero(sel))
        host_offset = _check_span("host_offset", host_offset, count * cluster_size)
        if count:
            self._pwrite_selected(fd, view, cluster_size, sel, host_offset)
        return count

    def copy_range(self, src_fd: int, src_offset: int, dst_fd: int, dst_offset: int, length: int) -> None:
        """Copy ``length`` bytes from ``src_fd`` at ``src_offset`` to ``dst_fd`` at ``dst_offset``; the part
        past the source's end-of-file is written as zeros.  The ranges must not overlap within one file."""
        src_fd = _check_fd("src_fd", src_fd)
        dst_fd = _check_fd("dst_fd", dst_fd)
        length = _check_int("length", length)
        src_offset = _check_span("src_offset", src_offset, length)
        dst_offset = _check_span("dst_offset", dst_offset, length)
        if not length:
            return
        if src_offset < dst_offset + length and dst_offset < src_offset + length and _same_file(src_fd, dst_fd):
            raise OutOfRange(
                f"copy of {length} bytes from offset {src_offset:#x} to offset {dst_offset:#x} overlaps "
                f"itself within one file",
                offset=dst_offset,
                length=length,
            )
        self._copy_range(src_fd, src_offset, dst_fd, dst_offset, length)

    # Backends: arguments are validated and non-empty.
    def _zero_map(self, view: memoryview, cluster_size: int, out: np.ndarray) -> None:
        raise NotImplementedError

    def _pread_full(self, fd: int, view: memoryview, offset: int) -> None:
        raise NotImplementedError

    def _pwrite_full(self, fd: int, view: memoryview, offset: int) -> None:
        raise NotImplementedError

    def _pwrite_selected(self, fd: int, view: memoryview, cluster_size: int, sel: np.ndarray, host_offset: int) -> None:
        raise NotImplementedError

    def _copy_range(self, src_fd: int, src_offset: int, dst_fd: int, dst_offset: int, length: int) -> None:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<vdisk.io.native {self.name} core>"


def _pread_action(view: memoryview, offset: int) -> str:
    return f"pread of {len(view)} bytes at offset {offset:#x}"


def _pwrite_action(length: int, offset: int) -> str:
    return f"pwrite of {length} bytes at offset {offset:#x}"


def _copy_action(src_fd: int, src_offset: int, dst_offset: int, length: int) -> str:
    return (
        f"copy of {length} bytes from {_fd_path(src_fd) or f'fd {src_fd}'} offset {src_offset:#x} "
        f"to offset {dst_offset:#x}"
    )


# --- the compiled core ------------------------------------------------------------------------------------


class CCore(Core):
    """The cffi extension ``vdisk._copier``; every call runs without the GIL."""

    name = "c"

    def __init__(self, module: ModuleType):
        self._ffi = module.ffi
        self._lib = module.lib
        self.version: int = module.lib.vdisk_version()
        self.path: str | None = getattr(module, "__file__", None)

    def _zero_map(self, view: memoryview, cluster_size: int, out: np.ndarray) -> None:
        ffi = self._ffi
        rc = self._lib.vdisk_zero_map(
            ffi.from_buffer("uint8_t[]", view),
            len(view),
            cluster_size,
            ffi.from_buffer("uint8_t[]", out, require_writable=True),
        )
        if rc:
            raise OutOfRange(f"zero map refused: {os.strerror(-rc)}")

    def _pread_full(self, fd: int, view: memoryview, offset: int) -> None:
        buf = self._ffi.from_buffer("uint8_t[]", view, require_writable=True)
        rc = self._lib.vdisk_pread_full(fd, buf, len(view), offset)
        if rc:
            raise _storage_error(-rc, fd, _pread_action(view, offset))

    def _pwrite_full(self, fd: int, view: memoryview, offset: int) -> None:
        rc = self._lib.vdisk_pwrite_full(fd, self._ffi.from_buffer("uint8_t[]", view), len(view), offset)
        if rc:
            raise _storage_error(-rc, fd, _pwrite_action(len(view), offset))

    def _pwrite_selected(self, fd: int, view: memoryview, cluster_size: int, sel: np.ndarray, host_offset: int) -> None:
        ffi = self._ffi
        rc = self._lib.vdisk_pwrite_selected(
            fd,
            ffi.from_buffer("uint8_t[]", view),
            cluster_size,
            ffi.from_buffer("uint8_t[]", sel),
            len(sel),
            host_offset,
        )
        if rc:
            count = int(np.count_nonzero(sel))
            raise _storage_error(
                -rc,
                fd,
                _pwrite_action(count * cluster_size, host_offset)
                + f" ({count} selected clusters of {cluster_size} bytes)",
            )

    def _copy_range(self, src_fd: int, src_offset: int, dst_fd: int, dst_offset: int, length: int) -> None:
        bounce = _bounce()
        rc = self._lib.vdisk_copy_range(
            src_fd,
            src_offset,
            dst_fd,
            dst_offset,
            length,
            self._ffi.from_buffer("uint8_t[]", bounce, require_writable=True),
            len(bounce),
        )
        if rc:
            raise _storage_error(-rc, dst_fd, _copy_action(src_fd, src_offset, dst_offset, length))


# --- the pure-Python reference --------------------------------------------------------------------------


def _pread_upto(fd: int, view: memoryview, offset: int) -> int:
    """Read up to ``len(view)`` bytes, stopping early only at end-of-file; returns the bytes read.
    Raises OSError.  (``os.preadv`` retries EINTR itself, PEP 475.)"""
    done = 0
    while done < len(view):
        got = os.preadv(fd, [view[done : done + _MAX_IO]], offset + done)
        if got == 0:
            break
        done += got
    return done


def zero_fill(view: memoryview) -> None:
    """Zero a buffer in place (numpy, no Python loop)."""
    if len(view):
        np.frombuffer(view, dtype=np.uint8).fill(0)


def _pwrite_all(fd: int, view: memoryview, offset: int) -> None:
    done = 0
    while done < len(view):
        written = os.pwritev(fd, [view[done : done + _MAX_IO]], offset + done)
        if written == 0:
            raise OSError(_errno.EIO, "pwrite made no progress")
        done += written


def _pwritev_full(fd: int, iov: list[memoryview], offset: int) -> None:
    """Write the iovecs at ``offset``, looping on short writes."""
    while iov:
        written = os.pwritev(fd, iov, offset)
        if written == 0:
            raise OSError(_errno.EIO, "pwritev made no progress")
        offset += written
        consumed = 0
        while consumed < len(iov) and written >= len(iov[consumed]):
            written -= len(iov[consumed])
            consumed += 1
        iov = iov[consumed:]
        if iov and written:
            iov[0] = iov[0][written:]


def _selected_runs(sel: np.ndarray, max_clusters: int) -> tuple[np.ndarray, np.ndarray]:
    """``(starts, ends)`` of the runs of adjacent selected clusters, none longer than ``max_clusters``."""
    index = np.flatnonzero(sel)
    breaks = np.flatnonzero(np.diff(index) != 1) + 1
    starts = index[np.concatenate(([0], breaks))]
    ends = index[np.concatenate((breaks - 1, [len(index) - 1]))] + 1
    if np.any(ends - starts > max_clusters):
        pieces = [
            (piece_start, min(piece_start + max_clusters, run_end))
            for run_start, run_end in zip(starts.tolist(), ends.tolist(), strict=True)
            for piece_start in range(run_start, run_end, max_clusters)
        ]
        starts, ends = (np.array(column, dtype=np.int64) for column in zip(*pieces, strict=True))
    return starts, ends


class PythonCore(Core):
    """The reference implementation: numpy and ``os`` positional I/O, no payload copies."""

    name = "python"

    def _zero_map(self, view: memoryview, cluster_size: int, out: np.ndarray) -> None:
        data = np.frombuffer(view, dtype=np.uint8)
        if cluster_size % 8 == 0:
            data = data.view(np.uint64)  # 8 bytes per compare
        rows = data.reshape(len(out), -1)
        # For unsigned words "max == 0" is "all zero", and numpy's max reduction is vectorised.
        np.equal(rows.max(axis=1), 0, out=out)

    def _pread_full(self, fd: int, view: memoryview, offset: int) -> None:
        try:
            got = _pread_upto(fd, view, offset)
        except OSError as exc:
            raise StorageError.from_oserror(exc, path=_fd_path(fd), action=_pread_action(view, offset)) from exc
        if got < len(view):
            zero_fill(view[got:])  # past end-of-file reads as zeros

    def _pwrite_full(self, fd: int, view: memoryview, offset: int) -> None:
        try:
            _pwrite_all(fd, view, offset)
        except OSError as exc:
            raise StorageError.from_oserror(exc, path=_fd_path(fd), action=_pwrite_action(len(view), offset)) from exc

    def _pwrite_selected(self, fd: int, view: memoryview, cluster_size: int, sel: np.ndarray, host_offset: int) -> None:
        starts, ends = _selected_runs(sel, max(1, _MAX_IO // cluster_size))
        iov: list[memoryview] = []
        batch_bytes = 0
        offset = host_offset
        try:
            for start, end in zip(starts.tolist(), ends.tolist(), strict=True):
                run = view[start * cluster_size : end * cluster_size]
                if len(iov) == _IOV_MAX or (iov and batch_bytes + len(run) > _MAX_IO):
                    _pwritev_full(fd, iov, offset)
                    offset += batch_bytes
                    iov, batch_bytes = [], 0
                iov.append(run)
                batch_bytes += len(run)
            if iov:
                _pwritev_full(fd, iov, offset)
        except OSError as exc:
            count = int(np.count_nonzero(sel))
            raise StorageError.from_oserror(
                exc,
                path=_fd_path(fd),
                action=_pwrite_action(count * cluster_size, host_offset)
                + f" ({count} selected clusters of {cluster_size} bytes)",
            ) from exc

    def _copy_range(self, src_fd: int, src_offset: int, dst_fd: int, dst_offset: int, length: int) -> None:
        try:
            self._copy_range_os(src_fd, src_offset, dst_fd, dst_offset, length)
        except OSError as exc:
            raise StorageError.from_oserror(
                exc, path=_fd_path(dst_fd), action=_copy_action(src_fd, src_offset, dst_offset, length)
            ) from exc

    @staticmethod
    def _copy_range_os(src_fd: int, src_offset: int, dst_fd: int, dst_offset: int, length: int) -> None:
        done = 0
        while done < length:
            try:
                copied = os.copy_file_range(
                    src_fd, dst_fd, min(length - done, _MAX_IO), src_offset + done, dst_offset + done
                )
            except OSError as exc:
                if exc.errno not in _COPY_FALLBACK_ERRNOS:
                    raise
                break  # not between these two files
            if copied == 0:
                break  # end of the source, or a file system that copies nothing
            done += copied

        bounce = memoryview(_bounce())
        at_eof = bounce_zeroed = False
        while done < length:
            chunk = min(length - done, len(bounce))
            if not at_eof:
                got = _pread_upto(src_fd, bounce[:chunk], src_offset + done)
                if got < chunk:
                    at_eof = True  # everything from here on reads as zeros
                    zero_fill(bounce[got:chunk])
            elif not bounce_zeroed:
                zero_fill(bounce)
                bounce_zeroed = True
            _pwrite_all(dst_fd, bounce[:chunk], dst_offset + done)
            done += chunk


# --- loading --------------------------------------------------------------------------------------------


def core_from_module(module: ModuleType) -> CCore | None:
    """A :class:`CCore` for ``module``, or None (with a warning) when its version stamp is stale."""
    try:
        stamp = module.lib.vdisk_version()
    except AttributeError:
        stamp = None
    if stamp != EXPECTED_VERSION:
        log.warning(
            "refusing stale compiled core %s: version stamp %s, expected %d; rebuild it with "
            "`pip install -e .` or `python native/build_copier.py`; using the pure-Python fallback",
            getattr(module, "__file__", module),
            stamp,
            EXPECTED_VERSION,
        )
        return None
    return CCore(module)


def _load_c_core() -> CCore | None:
    try:
        copier = importlib.import_module("vdisk._copier")
    except ModuleNotFoundError as exc:
        if exc.name != "vdisk._copier":
            raise
        log.info("compiled core vdisk._copier is not built; using the pure-Python fallback")
        return None
    except ImportError as exc:
        log.warning("compiled core vdisk._copier failed to load (%s); using the pure-Python fallback", exc)
        return None
    return core_from_module(copier)


_PYTHON_CORE = PythonCore()
_C_CORE = _load_c_core()
_CORE: Core = _C_CORE if _C_CORE is not None else _PYTHON_CORE

#: ``"c"`` when the compiled core loaded, else ``"python"``.
BACKEND: str = _CORE.name


def implementations() -> dict[str, Core]:
    """Every available backend by name (``"python"`` always, ``"c"`` when built): for tests and benchmarks."""
    cores: dict[str, Core] = {"python": _PYTHON_CORE}
    if _C_CORE is not None:
        cores["c"] = _C_CORE
    return cores


zero_map = _CORE.zero_map
is_zero = _CORE.is_zero
pread_full = _CORE.pread_full
pwrite_full = _CORE.pwrite_full
pwrite_selected = _CORE.pwrite_selected
copy_range = _CORE.copy_range

__all__ = [
    "BACKEND",
    "BOUNCE_SIZE",
    "EXPECTED_VERSION",
    "CCore",
    "Core",
    "PythonCore",
    "copy_range",
    "implementations",
    "is_zero",
    "pread_full",
    "pwrite_full",
    "pwrite_selected",
    "zero_fill",
    "zero_map",
]
