"""The QMP monitor's socket loop: a unix socket, one thread per client, events broadcast to all.

Only I/O lives here; framing and negotiation are ``vdisk.qmp.protocol``'s, the commands
``vdisk.qmp.commands``'.  Every whole reply or event is written under the client's write lock, so messages
never interleave.  A client that vanishes or stops reading is dropped without affecting the others.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time

from vdisk.qmp import protocol
from vdisk.qmp.commands import dispatch, qemu_version

log = logging.getLogger(__name__)

MAX_CLIENTS = 64
SEND_TIMEOUT = 5.0


class _Client:
    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.core = protocol.QMPConnectionCore()
        self.write_lock = threading.Lock()
        self.alive = True

    def send(self, data: bytes) -> None:
        with self.write_lock:
            if not self.alive:
                return
            try:
                self.sock.sendall(data)
            except OSError:
                self.alive = False


class MonitorServer:
    def __init__(self, path: str, server, *, mode: int = 0o600):
        self.path = path
        self.server = server
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
        for client in clients:
            try:
                client.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        if os.path.exists(self.path):
            os.unlink(self.path)

    def broadcast(self, name: str, data: dict | None) -> None:
        """Send an event to every negotiated client."""
        message = protocol.event(name, data, time.time())
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
            client.send(protocol.greeting(qemu_version(), client.core.capabilities_offered))
            while client.alive:
                data = sock.recv(65536)
                if not data:
                    break
                for item in client.core.receive_data(data):
                    if isinstance(item, protocol.Command):
                        reply = dispatch(self.server, item, client_id=id(client))
                        client.send(reply)
                    else:
                        client.send(item.reply)
        except OSError:
            pass
        finally:
            client.alive = False
            with self._lock:
                if client in self._clients:
                    self._clients.remove(client)
            sock.close()


def _timeval(seconds: float) -> bytes:
    import struct

    return struct.pack("ll", int(seconds), int((seconds % 1) * 1e6))
