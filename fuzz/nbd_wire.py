"""A deliberately permissive NBD client on a raw socket, for sending what real clients never send.

Spec: NetworkBlockDevice/nbd ``doc/proto.md``.  Every magic, option, command and reply type the fuzzers use is
here; nothing checks that a request makes sense (that is the point), but every *reply* is checked against the
spec: right magic, the option or cookie echoed, a known reply type, a length that fits.  A reply that breaks
the spec raises :class:`SpecViolation`; the server closing the connection raises :class:`Disconnected`.
"""

from __future__ import annotations

import dataclasses
import socket
import struct
from typing import Self

# --- "Handshake" -------------------------------------------------------------------------------------------

NBDMAGIC = b"NBDMAGIC"
IHAVEOPT = 0x49484156454F5054
OPTION_REPLY_MAGIC = 0x3E889045565A9
GREETING = struct.Struct(">8sQH")
OPTION_HEADER = struct.Struct(">QII")
OPTION_REPLY = struct.Struct(">QIII")

FLAG_FIXED_NEWSTYLE = 1 << 0
FLAG_NO_ZEROES = 1 << 1

OPT_EXPORT_NAME = 1
OPT_ABORT = 2
OPT_LIST = 3
OPT_STARTTLS = 5
OPT_INFO = 6
OPT_GO = 7
OPT_STRUCTURED_REPLY = 8
OPT_LIST_META_CONTEXT = 9
OPT_SET_META_CONTEXT = 10
OPT_EXTENDED_HEADERS = 11

REP_ACK = 1
REP_SERVER = 2
REP_INFO = 3
REP_META_CONTEXT = 4
REP_ERR = 1 << 31
REP_ERR_UNSUP = REP_ERR | 1
REP_ERR_POLICY = REP_ERR | 2
REP_ERR_INVALID = REP_ERR | 3
REP_ERR_PLATFORM = REP_ERR | 4
REP_ERR_TLS_REQD = REP_ERR | 5
REP_ERR_UNKNOWN = REP_ERR | 6
REP_ERR_SHUTDOWN = REP_ERR | 7
REP_ERR_BLOCK_SIZE_REQD = REP_ERR | 8
REP_ERR_TOO_BIG = REP_ERR | 9
KNOWN_OPTION_REPLIES = {REP_ACK, REP_SERVER, REP_INFO, REP_META_CONTEXT, REP_ERR_UNSUP, REP_ERR_POLICY,
                        REP_ERR_INVALID, REP_ERR_PLATFORM, REP_ERR_TLS_REQD, REP_ERR_UNKNOWN, REP_ERR_SHUTDOWN,
                        REP_ERR_BLOCK_SIZE_REQD, REP_ERR_TOO_BIG}

INFO_EXPORT = 0
INFO_NAME = 1
INFO_DESCRIPTION = 2
INFO_BLOCK_SIZE = 3

# --- "Transmission" ----------------------------------------------------------------------------------------

REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668E33EF
REQUEST = struct.Struct(">IHHQQI")
SIMPLE_REPLY = struct.Struct(">IIQ")
STRUCTURED_REPLY = struct.Struct(">IHHQI")

CMD_READ = 0
CMD_WRITE = 1
CMD_DISC = 2
CMD_FLUSH = 3
CMD_TRIM = 4
CMD_CACHE = 5
CMD_WRITE_ZEROES = 6
CMD_BLOCK_STATUS = 7

CMD_FLAG_FUA = 1 << 0
CMD_FLAG_NO_HOLE = 1 << 1
CMD_FLAG_DF = 1 << 2
CMD_FLAG_REQ_ONE = 1 << 3
CMD_FLAG_FAST_ZERO = 1 << 4

REPLY_FLAG_DONE = 1 << 0
REPLY_TYPE_NONE = 0
REPLY_TYPE_OFFSET_DATA = 1
REPLY_TYPE_OFFSET_HOLE = 2
REPLY_TYPE_BLOCK_STATUS = 5
REPLY_TYPE_ERROR = (1 << 15) | 1
REPLY_TYPE_ERROR_OFFSET = (1 << 15) | 2

# The errors a server may send ("Error values"): EPERM EIO ENOMEM EINVAL ENOSPC EOVERFLOW ENOTSUP ESHUTDOWN.
NBD_ERRORS = {1, 5, 12, 22, 28, 75, 95, 108}
MAX_STRING = 4096  # NBD_MAX_STRING: names the spec allows


class Disconnected(Exception):
    """The server closed the connection (EOF or reset)."""


class SpecViolation(AssertionError):
    """The server sent something the NBD spec does not allow."""


@dataclasses.dataclass
class OptionReply:
    option: int
    reply_type: int
    data: bytes

    @property
    def is_error(self) -> bool:
        return bool(self.reply_type & REP_ERR)


@dataclasses.dataclass
class Reply:
    """One whole transmission reply (all chunks of a structured reply)."""

    cookie: int
    error: int
    data: bytes = b""  # read payload (simple), or the concatenated OFFSET_DATA chunks
    chunks: list[tuple[int, bytes]] = dataclasses.field(default_factory=list)  # (type, payload) if structured


class Wire:
    """One raw connection.  ``timeout`` bounds every wait: a server that neither answers nor disconnects
    raises ``TimeoutError`` (a hang is a failure)."""

    def __init__(self, path: str, timeout: float = 15.0):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(path)
        self.structured = False
        self.handshake_flags = 0

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- bytes

    def send(self, data: bytes) -> None:
        try:
            self.sock.sendall(data)
        except (BrokenPipeError, ConnectionResetError) as exc:
            raise Disconnected(str(exc)) from exc

    def recv_exact(self, n: int) -> bytes:
        chunks, left = [], n
        while left:
            try:
                chunk = self.sock.recv(min(left, 1 << 20))
            except ConnectionResetError as exc:
                raise Disconnected(str(exc)) from exc
            if not chunk:
                raise Disconnected(f"EOF after {n - left} of {n} bytes")
            chunks.append(chunk)
            left -= len(chunk)
        return b"".join(chunks)

    def wait_closed(self) -> bytes:
        """Read until the server closes; returns what it sent meanwhile (a hang raises TimeoutError)."""
        out = []
        while True:
            try:
                chunk = self.sock.recv(65536)
            except ConnectionResetError:
                return b"".join(out)
            if not chunk:
                return b"".join(out)
            out.append(chunk)

    # -- handshake

    def greeting(self) -> int:
        magic, opt_magic, flags = GREETING.unpack(self.recv_exact(GREETING.size))
        if magic != NBDMAGIC or opt_magic != IHAVEOPT:
            raise SpecViolation(f"bad greeting {magic!r} {opt_magic:#x}")
        self.handshake_flags = flags
        return flags

    def client_flags(self, flags: int = FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES) -> None:
        self.send(struct.pack(">I", flags))

    def option(self, option: int, data: bytes = b"", *, length: int | None = None, magic: int = IHAVEOPT) -> None:
        self.send(OPTION_HEADER.pack(magic, option, len(data) if length is None else length) + data)

    def option_reply(self, option: int) -> OptionReply:
        magic, opt, reply_type, length = OPTION_REPLY.unpack(self.recv_exact(OPTION_REPLY.size))
        if magic != OPTION_REPLY_MAGIC:
            raise SpecViolation(f"option reply magic {magic:#x}")
        if opt != option & 0xFFFFFFFF:
            raise SpecViolation(f"option reply for option {opt}, sent {option}")
        if reply_type not in KNOWN_OPTION_REPLIES:
            raise SpecViolation(f"unknown option reply type {reply_type:#x}")
        if length > (1 << 20):
            raise SpecViolation(f"option reply of {length} bytes")
        data = self.recv_exact(length)
        if reply_type == REP_ACK and length:
            raise SpecViolation("ACK with a payload")
        return OptionReply(opt, reply_type, data)

    def option_replies(self, option: int) -> list[OptionReply]:
        """Replies up to and including the final one (ACK or an error)."""
        out = []
        while True:
            reply = self.option_reply(option)
            out.append(reply)
            if reply.reply_type == REP_ACK or reply.is_error:
                return out

    def handshake(self, *, structured: bool = False, meta: tuple[bytes, ...] = (), name: bytes = b"") -> tuple[int, int]:
        """A correct fixed-newstyle handshake ending in NBD_OPT_GO; returns (export size, transmission flags)."""
        self.greeting()
        self.client_flags()
        if structured:
            self.option(OPT_STRUCTURED_REPLY)
            if self.option_reply(OPT_STRUCTURED_REPLY).reply_type != REP_ACK:
                raise SpecViolation("structured replies refused")
            self.structured = True
        if meta:
            self.option(OPT_SET_META_CONTEXT, meta_context_data(name, meta))
            self.option_replies(OPT_SET_META_CONTEXT)
        self.option(OPT_GO, go_data(name))
        size = flags = None
        for reply in self.option_replies(OPT_GO):
            if reply.is_error:
                raise SpecViolation(f"GO refused: {reply}")
            if reply.reply_type == REP_INFO and struct.unpack_from(">H", reply.data)[0] == INFO_EXPORT:
                _, size, flags = struct.unpack(">HQH", reply.data)
        if size is None:
            raise SpecViolation("GO succeeded without NBD_INFO_EXPORT")
        return size, flags

    # -- transmission

    def request(self, command: int, offset: int, length: int, *, flags: int = 0, cookie: int = 1,
                payload: bytes = b"", magic: int = REQUEST_MAGIC) -> None:
        self.send(REQUEST.pack(magic, flags, command, cookie, offset, length) + payload)

    def reply(self, cookie: int, read_offset: int = 0, read_length: int = 0) -> Reply:
        """Read one reply.  For a READ give ``read_offset``/``read_length``: a successful simple reply carries
        that many bytes, and structured data and hole chunks are placed at their offsets (and must lie inside)."""
        magic = struct.unpack(">I", self.recv_exact(4))[0]
        if magic == SIMPLE_REPLY_MAGIC:
            error, got = struct.unpack(">IQ", self.recv_exact(12))
            self._check_cookie(got, cookie)
            self._check_error(error)
            data = self.recv_exact(read_length) if read_length and not error else b""
            return Reply(got, error, data)
        if magic != STRUCTURED_REPLY_MAGIC or not self.structured:
            raise SpecViolation(f"reply magic {magic:#x} (structured negotiated: {self.structured})")
        reply = Reply(cookie, 0)
        data: bytearray | None = None  # allocated at the first data chunk: a refused read may announce 4 GiB
        while True:
            flags, reply_type, got, length = struct.unpack(">HHQI", self.recv_exact(16))
            self._check_cookie(got, cookie)
            if length > (64 << 20) + 64:
                raise SpecViolation(f"structured chunk of {length} bytes")
            payload = self.recv_exact(length)
            reply.chunks.append((reply_type, payload))
            if reply_type in (REPLY_TYPE_ERROR, REPLY_TYPE_ERROR_OFFSET):
                if length < 6:
                    raise SpecViolation(f"error chunk of {length} bytes")
                error, message_length = struct.unpack_from(">IH", payload)
                if 6 + message_length > len(payload):
                    raise SpecViolation("error chunk message longer than the chunk")
                self._check_error(error)
                if not error:
                    raise SpecViolation("error chunk with error 0")
                reply.error = reply.error or error
            elif reply_type in (REPLY_TYPE_OFFSET_DATA, REPLY_TYPE_OFFSET_HOLE):
                if reply_type == REPLY_TYPE_OFFSET_DATA:
                    (offset,), piece = struct.unpack_from(">Q", payload), payload[8:]
                else:
                    offset, hole = struct.unpack(">QI", payload)
                    piece = bytes(hole)
                start = offset - read_offset
                if start < 0 or start + len(piece) > read_length or not piece:
                    raise SpecViolation(f"read chunk {offset}+{len(piece)} outside {read_offset}+{read_length}")
                if data is None:
                    data = bytearray(read_length)
                data[start : start + len(piece)] = piece
            elif reply_type not in (REPLY_TYPE_NONE, REPLY_TYPE_BLOCK_STATUS):
                raise SpecViolation(f"unknown structured reply type {reply_type:#x}")
            if flags & REPLY_FLAG_DONE:
                reply.data = bytes(data) if data is not None and not reply.error else b""
                return reply
            if reply_type == REPLY_TYPE_NONE:
                raise SpecViolation("NBD_REPLY_TYPE_NONE without the DONE flag")

    def simple_reply_any(self, outstanding: dict[int, int]) -> Reply:
        """One simple reply to any of the outstanding requests (cookie -> bytes a successful READ carries): a
        server may answer pipelined requests in any order.  The answered cookie is removed."""
        magic, error, cookie = SIMPLE_REPLY.unpack(self.recv_exact(SIMPLE_REPLY.size))
        if magic != SIMPLE_REPLY_MAGIC:
            raise SpecViolation(f"reply magic {magic:#x}")
        if cookie not in outstanding:
            raise SpecViolation(f"reply cookie {cookie:#x} answers no outstanding request")
        self._check_error(error)
        read_length = outstanding.pop(cookie)
        return Reply(cookie, error, self.recv_exact(read_length) if read_length and not error else b"")

    @staticmethod
    def _check_cookie(got: int, sent: int) -> None:
        if got != sent:
            raise SpecViolation(f"reply cookie {got:#x}, sent {sent:#x}")

    @staticmethod
    def _check_error(error: int) -> None:
        if error and error not in NBD_ERRORS:
            raise SpecViolation(f"error {error} is not one of the spec's error values")


def go_data(name: bytes = b"", infos: tuple[int, ...] = (), *, name_length: int | None = None,
            info_count: int | None = None) -> bytes:
    """The payload of NBD_OPT_GO / NBD_OPT_INFO; the counts can lie."""
    return (struct.pack(">I", len(name) if name_length is None else name_length) + name
            + struct.pack(">H", len(infos) if info_count is None else info_count)
            + b"".join(struct.pack(">H", i) for i in infos))


def meta_context_data(export: bytes, queries: tuple[bytes, ...], *, query_count: int | None = None) -> bytes:
    """The payload of NBD_OPT_LIST/SET_META_CONTEXT."""
    out = struct.pack(">I", len(export)) + export
    out += struct.pack(">I", len(queries) if query_count is None else query_count)
    for q in queries:
        out += struct.pack(">I", len(q)) + q
    return out
