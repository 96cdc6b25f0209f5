"""A raw QMP client on a unix socket, for sending what qemu.qmp never sends (broken JSON, huge lines) and for
behaving badly (vanishing mid-message, never reading).  Replies are CRLF-terminated JSON lines."""

from __future__ import annotations

import json
import socket
import struct
from typing import Self

SYNC = b'\x01\r\n{"execute": "query-version", "id": "%s"}\r\n'  # a control character resyncs the parser


class RawQmp:
    def __init__(self, path: str, *, negotiate: bool = True, timeout: float = 20.0):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(str(path))
        self.buffer = b""
        self.events: list[dict] = []
        self.greeting = self.message()
        if negotiate:
            self.send(b'{"execute": "qmp_capabilities"}\r\n')
            assert self.reply() == {"return": {}}

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def reset(self) -> None:
        """Close with a TCP-style reset (SO_LINGER 0): unread data is thrown away."""
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.sock.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def message(self) -> dict:
        while b"\r\n" not in self.buffer:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError(f"monitor closed the connection; unread: {self.buffer[:200]!r}")
            self.buffer += chunk
        line, self.buffer = self.buffer.split(b"\r\n", 1)
        return json.loads(line)

    def reply(self) -> dict:
        """The next message that is not an event (events are kept in ``events``)."""
        while True:
            msg = self.message()
            if "event" in msg:
                self.events.append(msg)
            else:
                return msg

    def execute(self, command: str, arguments: dict | None = None, id: object = "x") -> dict:
        request = {"execute": command, "id": id}
        if arguments is not None:
            request["arguments"] = arguments
        self.send(json.dumps(request).encode() + b"\r\n")
        return self.reply()

    def replies_until_sync(self, tag: str) -> list[dict]:
        """Send the resync sequence and a query tagged ``tag``; return every reply before its answer."""
        self.send(SYNC % tag.encode())
        out = []
        while True:
            msg = self.reply()
            if msg.get("id") == tag:
                assert "return" in msg, msg
                return out
            out.append(msg)

    def wait_event(self, name: str, timeout_messages: int = 10_000) -> dict:
        for ev in self.events:
            if ev["event"] == name:
                self.events.remove(ev)
                return ev
        for _ in range(timeout_messages):
            msg = self.message()
            if msg.get("event") == name:
                return msg
            if "event" in msg:
                self.events.append(msg)
        raise AssertionError(f"no {name} event")
