"""The QMP monitor's socket loop: a unix socket, one thread per client, events broadcast to all.

Only I/O lives here; framing and negotiation are ``vdisk.qmp.connection``'s, the commands
``vdisk.qmp.commands``', run with the serving process's :class:`~vdisk.qmp.context.CommandContext`.  Each
client has a reader thread (requests in, replies queued) and a writer thread that sends its queue: whole
messages, one at a time, so they never interleave, and nobody else ever waits on this client's socket (a
broadcast may run under the job lock).  A client that vanishes, leaves more than
MAX_PENDING_BYTES unread, or blocks one send for SEND_TIMEOUT is dropped without affecting the others.
"""

from __future__ import annotations

import collections
import logging
import os
import socket
import struct
import threading
import time

from vdisk.qmp import connection
from vdisk.qmp.commands import dispatch, qemu_version
from vdisk.qmp.context import CommandContext
from vdisk.qmp.json_parser import DEFAULT_MAX_MESSAGE_SIZE

log = logging.getLogger(__name__)

MAX_CLIENTS = 64
SEND_TIMEOUT = 5.0
# Replies and events a client may leave unread before it is dropped (one message is always accepted: the reply
# to a request of the maximum size, whose id it echoes, is that large).
MAX_PENDING_BYTES = 2 * DEFAULT_MAX_MESSAGE_SIZE


class _Client:
    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.core = connection.QMPConnectionCore()
        self.alive = True
        self._queue: collections.deque[bytes] = collections.deque()
        self._queued_bytes = 0
        self._closing = False
        self._cond = threading.Condition()
        self._writer = threading.Thread(target=self._write_loop, name="vdisk-qmp-writer", daemon=True)
        self._writer.start()

    def send(self, data: bytes) -> None:
        """Queue one whole message for the writer thread; never blocks."""
        with self._cond:
            if not self.alive or self._closing:
                return
            if self._queue and self._queued_bytes + len(data) > MAX_PENDING_BYTES:
                log.warning("QMP client dropped: it left %d bytes of replies and events unread", self._queued_bytes)
                self._drop()
                return
            self._queue.append(data)
            self._queued_bytes += len(data)
            self._cond.notify()

    def _drop(self) -> None:
        """Caller holds _cond.  The reader thread wakes up (its socket is shut down) and cleans up."""
        self.alive = False
        self._cond.notify_all()
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def _write_loop(self) -> None:
        while True:
            with self._cond:
                while self.alive and not self._queue and not self._closing:
                    self._cond.wait()
                if not self.alive or not self._queue:
                    return
                data = self._queue.popleft()
            try:
                self.sock.sendall(data)  # SO_SNDTIMEO (set by the reader) bounds a client that stopped reading
            except OSError:
                with self._cond:
                    self._drop()
                return
            with self._cond:
                self._queued_bytes -= len(data)
                self._cond.notify_all()

    def drain(self, deadline: float) -> None:
        """Wait (until the ``time.monotonic()`` deadline at most) for the writer to send what is queued."""
        with self._cond:
            while self.alive and self._queued_bytes and time.monotonic() < deadline:
                self._cond.wait(max(0.0, deadline - time.monotonic()))

    def close(self) -> None:
        """Send what is still queued (the reply to a client that half-closed), then close the socket."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        self._writer.join()
        with self._cond:
            self.alive = False
        self.sock.close()


class MonitorServer:
    """The listening socket at ``path`` and its clients; commands run with ``context``."""

    def __init__(self, path: str, context: CommandContext, *, mode: int = 0o600):
        self.path = path
        self.context = context
        self.mode = mode
        self._clients: list[_Client] = []
        self._lock = threading.Lock()
        self._listener: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._stopping = False

    def start(self) -> None:
        if os.path.exists(self.path):
            os.unlink(self.path)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o777 & ~self.mode)
        try:
            listener.bind(self.path)
        finally:
            os.umask(old)
        listener.listen(16)
        self._listener = listener
        self._thread = threading.Thread(target=self._accept_loop, name="vdisk-qmp-accept", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stopping = True
        if self._listener is not None:
            try:
                self._listener.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            self._listener.close()
        with self._lock:
            clients = list(self._clients)
        deadline = time.monotonic() + 1.0  # for all clients together: the reply to `quit`, the last events
        for client in clients:
            client.drain(deadline)
            try:
                client.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        if os.path.exists(self.path):
            os.unlink(self.path)

    def broadcast(self, name: str, data: dict | None) -> None:
        """Send an event to every negotiated client."""
        message = connection.event(name, data, time.time())
        with self._lock:
            clients = [c for c in self._clients if c.alive and c.core.events_enabled]
        for client in clients:
            client.send(message)

    def _accept_loop(self) -> None:
        while not self._stopping:
            try:
                sock, _ = self._listener.accept()
            except OSError:
                return
            with self._lock:
                if len(self._clients) >= MAX_CLIENTS:
                    sock.close()
                    continue
                client = _Client(sock)
                self._clients.append(client)
            threading.Thread(target=self._serve, args=(client,), name="vdisk-qmp-client", daemon=True).start()

    def _serve(self, client: _Client) -> None:
        sock = client.sock
        sock.settimeout(None)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, _timeval(SEND_TIMEOUT))
            client.send(connection.greeting(qemu_version(), client.core.capabilities_offered))
            while client.alive:
                data = sock.recv(65536)
                if not data:
                    break
                for item in client.core.receive_data(data):
                    if isinstance(item, connection.Command):
                        client.send(dispatch(self.context, item))
                    else:
                        client.send(item.reply)
        except OSError:
            pass
        finally:
            with self._lock:
                if client in self._clients:
                    self._clients.remove(client)
            client.close()


def _timeval(seconds: float) -> bytes:
    return struct.pack("ll", int(seconds), int((seconds % 1) * 1e6))
