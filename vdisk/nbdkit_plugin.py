"""The nbdkit Python plugin (API_VERSION 2): a thin adapter from nbdkit's callbacks to ``vdisk.server``.

nbdkit owns the NBD protocol; this module maps each callback onto the server's block device and each of our
exceptions onto the errno nbdkit sends to the client.  Nothing else lives here.
"""

import errno
import functools
import logging

import nbdkit

from vdisk.errors import VdiskError
from vdisk.server import Server

API_VERSION = 2

log = logging.getLogger("vdisk.nbdkit")
_server = Server()


def errno_for(exc: BaseException) -> int:
    """The errno a client should see for an exception from the disk stack."""
    if isinstance(exc, VdiskError):
        return exc.errno
    if isinstance(exc, OSError) and exc.errno:
        return exc.errno
    return errno.EIO


def _guard(callback):
    @functools.wraps(callback)
    def wrapper(*args):
        try:
            return callback(*args)
        except Exception as exc:
            code = errno_for(exc)
            if not isinstance(exc, VdiskError):
                log.exception("unexpected error in %s", callback.__name__)
            nbdkit.set_error(code)
            raise

    return wrapper


def config(key, value):
    _server.config(key, value)


def config_complete():
    _server.config_complete()


def config_help():
    return Server.CONFIG_HELP


def thread_model():
    return nbdkit.THREAD_MODEL_SERIALIZE_ALL_REQUESTS if _server.serialize else nbdkit.THREAD_MODEL_PARALLEL


def get_ready():
    _server.open()


def after_fork():
    _server.shutdown_hook = nbdkit.shutdown
    _server.start()


def cleanup():
    _server.shutdown()


def open(readonly):
    return _server.device_for_connection(readonly)


def export_description(h):
    return _server.description or ""


def get_size(h):
    return h.size


def block_size(h):
    return 1, 4096, 32 * 1024 * 1024


def can_write(h):
    return not h.read_only


def can_flush(h):
    return True


def can_trim(h):
    return not h.read_only


def can_zero(h):
    return not h.read_only


def can_fast_zero(h):
    return not h.read_only


def can_fua(h):
    return nbdkit.FUA_NATIVE


def can_multi_conn(h):
    return True


def can_extents(h):
    return True


def can_cache(h):
    return nbdkit.CACHE_EMULATE


def is_rotational(h):
    return False


@_guard
def pread(h, buf, offset, flags):
    h.pread(buf, offset)


@_guard
def pwrite(h, buf, offset, flags):
    h.pwrite(buf, offset, fua=bool(flags & nbdkit.FLAG_FUA))


@_guard
def flush(h, flags):
    h.flush()


@_guard
def trim(h, count, offset, flags):
    h.trim(offset, count, fua=bool(flags & nbdkit.FLAG_FUA))


@_guard
def zero(h, count, offset, flags):
    h.write_zeroes(offset, count, may_trim=bool(flags & nbdkit.FLAG_MAY_TRIM), fua=bool(flags & nbdkit.FLAG_FUA))


@_guard
def extents(h, count, offset, flags):
    return h.extents(offset, count)
