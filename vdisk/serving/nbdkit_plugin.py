"""The nbdkit Python plugin (API_VERSION 2): a thin adapter from nbdkit's callbacks to ``vdisk.serving.process``.

nbdkit owns the NBD protocol; this module maps each lifecycle callback onto one step of the serving process,
each data callback onto its block device, and each of our exceptions onto the errno nbdkit sends to the
client.  The one other thing here is process plumbing that only nbdkit needs: logging, and stopping
gracefully while clients stay attached (see "stopping with clients attached").
"""

import errno
import functools
import logging
import os
import socket
import stat
import threading

import nbdkit

from vdisk.errors import VdiskError
from vdisk.serving.config import config_help as plugin_config_help
from vdisk.serving.process import ServingProcess

API_VERSION = 2

log = logging.getLogger("vdisk.nbdkit")
_process = ServingProcess()


def errno_for(exc: BaseException) -> int:
    """The errno a client should see for an exception from the disk stack."""
    if isinstance(exc, VdiskError):
        return exc.errno
    if isinstance(exc, OSError) and exc.errno:
        return exc.errno
    return errno.EIO


# Serialized requests.  nbdkit's SERIALIZE_ALL_REQUESTS model holds its global request lock across the whole NBD
# handshake of each new connection (server/protocol-handshake.c, 1.32 and later), and nbdkit has no handshake
# timeout: one client that connects and sends nothing would freeze every other client's I/O for as long as it
# likes.  So nbdkit always runs PARALLEL and the serialization is ours: one lock around every data callback,
# taken only once a request has arrived.  `vdisk serve` adds --threads 1, so a connection still has one
# request in flight (nbdkit reads the next one after replying), as with nbdkit's serialized model.
_request_lock = threading.Lock()


def _guard(callback):
    @functools.wraps(callback)
    def wrapper(*args):
        try:
            if _process.plugin_config.serialize:
                with _request_lock:
                    return callback(*args)
            return callback(*args)
        except Exception as exc:
            code = errno_for(exc)
            if not isinstance(exc, VdiskError):
                log.exception("unexpected error in %s", callback.__name__)
            nbdkit.set_error(code)
            raise

    return wrapper


def config(key, value):
    _process.config(key, value)


def config_complete():
    _process.config_complete()
    logging.basicConfig(level=os.environ.get("VDISK_LOG_LEVEL", "WARNING"),
                        format="vdisk[%(process)d]: %(levelname)s: %(name)s: %(message)s")


def config_help():
    return plugin_config_help()


def thread_model():
    return nbdkit.THREAD_MODEL_PARALLEL  # serialize=true is _request_lock's job (see above)


def get_ready():
    _process.open()


def after_fork():
    _process.start(stop_serving=_stop_from_monitor)
    stop_fd = _process.plugin_config.stop_fd
    if stop_fd is not None:
        threading.Thread(target=_stop_when_closed, args=(stop_fd,), name="vdisk-stop", daemon=True).start()


# --- stopping with clients attached ---------------------------------------------------------------------
# nbdkit 1.32 on SIGTERM (or nbdkit.shutdown()) stops accepting, then waits for every client to disconnect:
# a connection idle in read() never looks at the quit flag, so a guest that stays attached keeps the server
# up forever.  So after asking nbdkit to quit we shut the read side of each client socket: the blocked read
# sees end-of-file and nbdkit ends the connection once the request it is running (if any) has been answered
# (the write side stays open for that reply).  When the last connection ends nbdkit calls cleanup, which
# flushes and closes the chain.  Requests a client pipelined but nbdkit had not read yet are not answered:
# the client sees the connection close, as with qemu-nbd on SIGTERM.
#
# The monitor answers `quit` after the hook returns, while cleanup (once the last connection ends) closes
# the monitor's connections: ending the NBD connections at once would race that answer.
MONITOR_REPLY_GRACE = 0.2  # seconds


def _stop_from_monitor() -> None:
    """QMP quit: stop accepting now; end the client connections once the monitor has had time to answer."""
    nbdkit.shutdown()
    timer = threading.Timer(MONITOR_REPLY_GRACE, stop_serving)
    timer.daemon = True
    timer.start()


def stop_serving() -> None:
    """Stop nbdkit gracefully now, even with clients attached (SIGTERM in `vdisk serve`, QMP quit)."""
    nbdkit.shutdown()
    qmp_path = _process.plugin_config.qmp
    keep = {qmp_path} if qmp_path else set()
    for name in os.listdir("/proc/self/fd"):
        try:
            fd = os.dup(int(name))
        except OSError:
            continue
        try:
            if not stat.S_ISSOCK(os.fstat(fd).st_mode):
                continue
            sock = socket.socket(fileno=fd)  # owns the duplicate; the original fd stays nbdkit's
            fd = -1
            with sock:
                if sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN) or sock.getsockname() in keep:
                    continue
                sock.shutdown(socket.SHUT_RD)
        except OSError:
            pass  # not connected, or gone meanwhile
        finally:
            if fd >= 0:
                os.close(fd)


def _stop_when_closed(fd: int) -> None:
    """`vdisk serve` holds the write end of this pipe and closes it when told to stop, or when it dies."""
    while True:
        try:
            os.read(fd, 1)
            break
        except InterruptedError:
            continue
    log.info("stop requested by vdisk serve")
    stop_serving()


def cleanup():
    _process.shutdown()


def open(readonly):
    return _process.device_for_connection()


def export_description(h):
    return _process.plugin_config.description or ""


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
