"""The one exception tree of vdisk.

Every error raised on purpose by vdisk derives from :class:`VdiskError`.  Each class carries the data a
caller needs to act on it: the errno that the nbdkit adapter hands to ``nbdkit.set_error``, the QMP error
class that the monitor puts in ``{"error": {"class": ...}}``, and where applicable the file, the field and
the offset that were wrong.  ``str(err)`` is one line a person can act on.
"""

from __future__ import annotations

import errno as _errno


class VdiskError(Exception):
    """Root of the tree.  ``errno`` is for nbdkit, ``qmp_class`` for the QMP monitor."""

    errno: int = _errno.EIO
    qmp_class: str = "GenericError"


# --- images and chains -------------------------------------------------------------------------------


class ImageError(VdiskError):
    """Something about an image file; ``path`` names it."""

    def __init__(self, message: str, *, path: str | None = None):
        self.path = path
        super().__init__(f"{path}: {message}" if path else message)


class FormatError(ImageError):
    """The image's bytes break the format's rules: a field out of range, a bad magic, a table past the end."""

    def __init__(
        self,
        message: str,
        *,
        path: str | None = None,
        field: str | None = None,
        offset: int | None = None,
    ):
        self.field = field
        self.offset = offset
        where = []
        if field is not None:
            where.append(f"field {field}")
        if offset is not None:
            where.append(f"offset {offset:#x}")
        if where:
            message = f"{message} ({', '.join(where)})"
        super().__init__(message, path=path)


class UnsupportedFeature(FormatError):
    """A valid image that uses something vdisk refuses (unknown incompatible feature bits, ...)."""

    errno = _errno.ENOTSUP


class CorruptImage(FormatError):
    """The image is marked corrupt, or metadata contradicts itself in a way that must not be written over."""


class BackingChainError(ImageError):
    """A backing chain that cannot be opened: a loop, too deep, a missing or refused backing file."""


class ImageLocked(ImageError):
    """Another process holds the image open for writing (our advisory lock, like QEMU's image locking)."""

    errno = _errno.EBUSY


class ReadOnlyError(ImageError):
    """A write-like request on an image or export opened read-only."""

    errno = _errno.EPERM


class OutOfRange(VdiskError):
    """A request beyond the end of the disk or otherwise malformed."""

    errno = _errno.EINVAL

    def __init__(self, message: str, *, offset: int | None = None, length: int | None = None):
        self.offset = offset
        self.length = length
        super().__init__(message)


class StorageError(ImageError):
    """An OS-level I/O failure on an image file; ``errno`` is the one the OS gave (ENOSPC, EIO, ...)."""

    def __init__(self, message: str, *, path: str | None = None, os_errno: int = _errno.EIO):
        self.errno = os_errno
        super().__init__(message, path=path)

    @classmethod
    def from_oserror(cls, exc: OSError, *, path: str | None, action: str) -> "StorageError":
        code = exc.errno or _errno.EIO
        return cls(f"{action} failed: {_errno.errorcode.get(code, code)} ({exc.strerror})", path=path, os_errno=code)


class CopyError(VdiskError):
    """A block job's copy failed: ``cause`` says why, ``chunk_start`` where, ``is_read`` which side failed
    (reading the chain, or writing the target: QEMU's on-error policies tell them apart).  The errno and the
    QMP class are the cause's."""

    def __init__(self, cause: VdiskError, *, chunk_start: int, is_read: bool):
        super().__init__(str(cause))
        self.cause = cause
        self.errno = cause.errno
        self.qmp_class = cause.qmp_class
        self.chunk_start = chunk_start
        self.is_read = is_read


# --- control plane -----------------------------------------------------------------------------------


class StateError(VdiskError):
    """An operation asked for in a state that does not allow it (a job verb, a QMP phase)."""

    def __init__(self, message: str, *, state: str | None = None, action: str | None = None):
        self.state = state
        self.action = action
        super().__init__(message)


class ServingError(VdiskError):
    """A step of the serving process's life (open the chain, start the monitor...) failed for a reason that is
    not one of ours; ``step`` names the step and the original error is the ``__cause__``."""

    def __init__(self, message: str, *, step: str):
        self.step = step
        super().__init__(message)


class QMPError(VdiskError):
    """An error a QMP command returns; the subclass fixes the class QEMU would use."""


class GenericError(QMPError):
    qmp_class = "GenericError"


class CommandNotFound(QMPError):
    qmp_class = "CommandNotFound"


class DeviceNotFound(QMPError):
    qmp_class = "DeviceNotFound"
    errno = _errno.ENODEV


class DeviceNotActive(QMPError):
    qmp_class = "DeviceNotActive"


class DeviceInUse(GenericError):
    """A second block job on a device (or a node of its chain) that already has one."""

    errno = _errno.EBUSY


class InvalidArgument(GenericError):
    """QMP arguments that do not match the command's schema."""

    errno = _errno.EINVAL


class ProtocolError(VdiskError):
    """Bytes on a control connection that do not form a valid message (bad JSON, line too long)."""
