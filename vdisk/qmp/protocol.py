"""The QMP wire core: bytes in, requests and reply bytes out.  No sockets, no threads, no clock.

Theory of operation
===================

One :class:`QMPConnectionCore` per client connection.  The socket loop around it does all I/O::

    sock.sendall(greeting(version, core.capabilities_offered))
    for data in iter(lambda: sock.recv(65536), b""):
        for item in core.receive_data(data):
            if isinstance(item, Command):
                sock.sendall(dispatch(item))          # reply_return(...) / reply_exception(...)
            else:                                    # Rejected / Negotiated: the core already answered
                sock.sendall(item.reply)
    # and, from the event thread, only while core.events_enabled:
    sock.sendall(event(name, data, time.time()))

Every reply and event is one whole message ending in CRLF, as QEMU writes them; the caller writes each one
under the connection's write lock so that messages never interleave.

The input side mirrors QEMU's three stages (qobject/json-lexer.c, json-streamer.c, json-parser.c as shipped
from QEMU 3.0 to 9.x; checked byte for byte against qemu-storage-daemon by tests/test_qmp_protocol.py):

* **Lexer** -- a byte state machine with QEMU's states (strings in double *or single* quotes, numbers,
  lower-case keywords, the six structural characters).  A byte no state accepts yields an error token
  ("JSON parse error, stray '...'") and the lexer enters *recovery*: it skips bytes until a structural
  character, an ASCII control character other than TAB, or 0xFE/0xFF.  The QMP spec tells clients to send
  such a control character to force the parser into a known-good state; that works here too.
* **Streamer** -- counts braces and brackets over tokens.  QMP is *not* line-based: a message may span
  lines and several may share one.  A message ends when both counts are back to zero (or one goes
  negative: a stray ``}``).  A top-level scalar (``42``, ``"x"``) is a whole message by itself; it
  parses fine and is then refused with "QMP input must be a JSON object", exactly like QEMU.
* **Parser** -- turns one message's tokens into a Python value, iteratively (no recursion, so nesting up
  to ``max_nesting`` cannot hit Python's recursion limit).  The first error wins and carries QEMU's text.

Limits (QEMU's are 64 MiB / 2M tokens / 1024 levels; ours are configurable, default 1 MiB / 1024 levels):
the size of one message is counted in bytes from its first byte to its last, whitespace inside included.
When a message exceeds a limit the core reports it once, then *eats the rest of that message* (tracking
strings and brace depth, storing nothing) and resyncs at its end, as the newest json-streamer.c does ("during
error recovery eat tokens until parentheses balance"); QEMU 3.0-9.x cascaded one error per leftover token.
During that skip only a hard-reset byte (a control character other than TAB/CR/LF, or 0xFE/0xFF) ends it
early.  Every other error (lexical or syntactic) behaves exactly as in QEMU 3.0-9.x.

Request validation follows qapi/qmp-dispatch.c: the value must be an object; members are ``execute``
(string), ``arguments`` (object), ``id`` (any value, echoed in the reply -- even ``null``), and
``exec-oob`` only once the ``oob`` capability is enabled.  Errors found after the object parsed carry its
``id``; JSON errors never do (the spec says so: the id was never read).

Negotiation is a table (:data:`NEGOTIATION_TABLE`): ``(state, input kind) -> (next state, action)``, an
unknown pair raises :class:`StateError`.  In ``capabilities_negotiation`` only ``qmp_capabilities`` exists
(anything else gets CommandNotFound "Expecting capabilities negotiation with 'qmp_capabilities'", from
monitor/qmp.c); in ``command_mode`` ``qmp_capabilities`` gets CommandNotFound "Capabilities negotiation is
already complete, command ignored" (monitor/qmp-cmds-control.c).  Events are delivered only in command mode.

Output mirrors QEMU's writer (qobject/qjson.c): ASCII only, ``\\uXXXX`` escapes in upper-case hex (surrogate
pairs beyond the BMP), ``": "`` and ``", "`` separators, doubles printed with ``%.17g``, and member order
as QEMU happens to emit it (``{"return": ..., "id": ...}``, ``{"id": ..., "error": ...}``,
``{"timestamp": ..., "event": ..., "data": ...}``), so a reply can be compared with QEMU's byte for byte.

:func:`validate_arguments` checks a command's arguments against a declared schema with the wording of
QEMU's QObject input visitor (qapi/qobject-input-visitor.c, qapi/qapi-visit-core.c).
"""

from __future__ import annotations

import enum
import logging
import math
import numbers
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from vdisk.errors import CommandNotFound, GenericError, InvalidArgument, ProtocolError, StateError

logger = logging.getLogger(__name__)

DEFAULT_MAX_MESSAGE_SIZE = 1 << 20
DEFAULT_MAX_NESTING = 1024  # QEMU's MAX_NESTING (qobject/json-streamer.c)
CRLF = b"\r\n"

#: The capabilities QEMU's QMPCapability enum knows (qapi/control.json).
KNOWN_CAPABILITIES = ("oob",)


class _NoId:
    """The absence of an ``id`` member (distinct from ``"id": null``, which is echoed as ``null``)."""

    _instance: _NoId | None = None

    def __new__(cls) -> _NoId:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "NO_ID"

    def __bool__(self) -> bool:
        return False


NO_ID: Any = _NoId()


# --- JSON output, QEMU style (qobject/qjson.c to_json) ----------------------------------------------------

_ESCAPE_NEEDED = re.compile("[\x00-\x1f\"\\\\\x7f-\U0010ffff]")
_SIMPLE_ESCAPES = {'"': '\\"', "\\": "\\\\", "\b": "\\b", "\f": "\\f", "\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape_char(match: re.Match[str]) -> str:
    ch = match.group()
    simple = _SIMPLE_ESCAPES.get(ch)
    if simple is not None:
        return simple
    cp = ord(ch)
    if cp > 0xFFFF:
        cp -= 0x10000
        return "\\u%04X\\u%04X" % (0xD800 + (cp >> 10), 0xDC00 + (cp & 0x3FF))
    return "\\u%04X" % cp


def _quote(text: str) -> str:
    return '"' + _ESCAPE_NEEDED.sub(_escape_char, text) + '"'


def _scalar(value: Any) -> str:
    if value is None:
        return "null"
    if value is True:
        return "true"
    if value is False:
        return "false"
    if isinstance(value, enum.Enum):
        value = value.value
    if isinstance(value, str):
        return _quote(value)
    if isinstance(value, numbers.Integral):
        return str(int(value))
    if isinstance(value, numbers.Real):
        value = float(value)
        # QEMU prints doubles with "%.17g"; for inf/nan that is "inf"/"nan", which no JSON parser reads, but
        # only a client that sent 1e400 as its id can get one back, and it gets what QEMU would send.
        return "%.17g" % value
    raise TypeError(f"cannot encode {type(value).__name__} as QMP JSON")


def encode_json(value: Any) -> str:
    """Serialise ``value`` the way QEMU's compact writer does.  Iterative, so any nesting depth is fine.

    Accepts dict (str keys), list/tuple, str, int, float, bool, None and Enum members (their value).
    """
    parts: list[str] = []
    stack: list[list[Any]] = []  # [iterator, is_object, is_first]
    current = value
    while True:
        if isinstance(current, Mapping):
            parts.append("{")
            stack.append([iter(current.items()), True, True])
        elif isinstance(current, (list, tuple)):
            parts.append("[")
            stack.append([iter(current), False, True])
        else:
            parts.append(_scalar(current))
        while stack:
            frame = stack[-1]
            try:
                item = next(frame[0])
            except StopIteration:
                parts.append("}" if frame[1] else "]")
                stack.pop()
                continue
            if not frame[2]:
                parts.append(", ")
            frame[2] = False
            if frame[1]:
                key, current = item
                if isinstance(key, enum.Enum):
                    key = key.value
                if not isinstance(key, str):
                    raise TypeError(f"QMP object keys must be strings, not {type(key).__name__}")
                parts.append(_quote(key))
                parts.append(": ")
            else:
                current = item
            break
        else:
            return "".join(parts)


def _message(obj: Mapping[str, Any]) -> bytes:
    return encode_json(obj).encode("ascii") + CRLF


# --- serializers ------------------------------------------------------------------------------------------


def make_version(major: int, minor: int, micro: int, package: str = "") -> dict[str, Any]:
    """A ``query-version`` / greeting version object: ``{"qemu": {"micro", "minor", "major"}, "package"}``."""
    return {"qemu": {"micro": micro, "minor": minor, "major": major}, "package": package}


def greeting(version: Mapping[str, Any], capabilities: Iterable[str]) -> bytes:
    """``{"QMP": {"version": ..., "capabilities": [...]}}`` + CRLF: the first message on a connection."""
    return _message({"QMP": {"version": version, "capabilities": list(capabilities)}})


def reply_return(value: Any = None, id: Any = NO_ID) -> bytes:  # noqa: A002 - QMP's own word
    """A success reply.  ``value=None`` becomes ``{}``: the spec's answer for commands that return nothing."""
    msg: dict[str, Any] = {"return": {} if value is None else value}
    if id is not NO_ID:
        msg["id"] = id
    return _message(msg)


def reply_error(error_class: str, desc: str, id: Any = NO_ID) -> bytes:  # noqa: A002
    """An error reply ``{"id": ..., "error": {"class": ..., "desc": ...}}`` (id only when the client sent one)."""
    msg: dict[str, Any] = {}
    if id is not NO_ID:
        msg["id"] = id
    msg["error"] = {"class": error_class, "desc": desc}
    return _message(msg)


def error_class_and_desc(exc: BaseException) -> tuple[str, str]:
    """The one mapping from an exception to a QMP ``(class, desc)``: our errors carry their class; anything
    else is a GenericError with its message."""
    return getattr(exc, "qmp_class", "GenericError"), str(exc)


def reply_exception(exc: BaseException, id: Any = NO_ID) -> bytes:  # noqa: A002
    """:func:`reply_error` for an exception, through :func:`error_class_and_desc`."""
    error_class, desc = error_class_and_desc(exc)
    return reply_error(error_class, desc, id)


def event(name: str, data: Mapping[str, Any] | None, timestamp_seconds: float) -> bytes:
    """An asynchronous event.  The time comes from the caller (``time.time()``), never from the clock here.

    ``data=None`` leaves the member out, as QEMU does for events without data.
    """
    if not math.isfinite(timestamp_seconds) or timestamp_seconds < 0:
        raise ValueError(f"event timestamp must be a non-negative number of seconds, not {timestamp_seconds!r}")
    seconds, microseconds = divmod(round(timestamp_seconds * 1_000_000), 1_000_000)
    msg: dict[str, Any] = {
        "timestamp": {"seconds": seconds, "microseconds": microseconds},
        "event": name,
    }
    if data is not None:
        msg["data"] = data
    return _message(msg)


def command_not_found(name: str) -> CommandNotFound:
    """The error QEMU gives for an unknown command (qapi/qmp-dispatch.c)."""
    return CommandNotFound(f"The command {_c_string(name)} has not been found")


def _c_string(text: str) -> str:
    """QEMU formats client strings with ``%s``: a NUL ends them."""
    return text.split("\x00", 1)[0]


# --- the JSON lexer, streamer and parser ------------------------------------------------------------------

# token types
_LCURLY, _RCURLY, _LSQUARE, _RSQUARE, _COLON, _COMMA = range(6)
_STRING, _INTEGER, _FLOAT, _KEYWORD, _ERROR = range(6, 11)

# lexer states (qobject/json-lexer.c)
(
    _IN_START,
    _IN_RECOVERY,
    _IN_DQ,
    _IN_DQ_ESC,
    _IN_SQ,
    _IN_SQ_ESC,
    _IN_ZERO,
    _IN_SIGN,
    _IN_DIGITS,
    _IN_MANTISSA,
    _IN_MANTISSA_DIGITS,
    _IN_EXP_E,
    _IN_EXP_SIGN,
    _IN_EXP_DIGITS,
    _IN_KEYWORD,
) = range(15)

_STRUCTURAL = {ord("{"): _LCURLY, ord("}"): _RCURLY, ord("["): _LSQUARE, ord("]"): _RSQUARE, ord(":"): _COLON,
               ord(","): _COMMA}
_WHITESPACE_RUN = re.compile(rb"[ \t\r\n]+")
# bytes recovery skips: TAB and 0x20..0xFD except the six structural characters
_RECOVERY_RUN = re.compile(rb"[\x09\x20-\x2b\x2d-\x39\x3b-\x5a\x5c\x5e-\x7a\x7c\x7e-\xfd]+")
_DQ_RUN = re.compile(rb"[\x20\x21\x23-\x5b\x5d-\xfd]+")  # 0x20..0xFD except '"' and '\\'
_SQ_RUN = re.compile(rb"[\x20-\x26\x28-\x5b\x5d-\xfd]+")  # 0x20..0xFD except "'" and '\\'
_DIGIT_RUN = re.compile(rb"[0-9]+")
_KEYWORD_RUN = re.compile(rb"[a-z]+")
_STEP_ERROR = -1  # _number_step: no state accepts the byte
_QUOTE, _APOSTROPHE, _BACKSLASH = ord('"'), ord("'"), ord("\\")


def _is_hard_reset_byte(byte: int) -> bool:
    """The bytes the QMP spec offers clients to force the parser into a known-good state."""
    return (byte < 0x20 and byte not in (0x09, 0x0A, 0x0D)) or byte >= 0xFE


class _JSONSyntaxError(Exception):
    pass


_INT64_MIN, _INT64_MAX, _UINT64_MAX = -(1 << 63), (1 << 63) - 1, (1 << 64) - 1
_NONCHARACTER = re.compile("[\ufdd0-\ufdef\ufffe\uffff\U0001fffe\U0001ffff\U0002fffe\U0002ffff\U0003fffe"
                           "\U0003ffff\U0004fffe\U0004ffff\U0005fffe\U0005ffff\U0006fffe\U0006ffff\U0007fffe"
                           "\U0007ffff\U0008fffe\U0008ffff\U0009fffe\U0009ffff\U000afffe\U000affff\U000bfffe"
                           "\U000bffff\U000cfffe\U000cffff\U000dfffe\U000dffff\U000efffe\U000effff\U000ffffe"
                           "\U000fffff\U0010fffe\U0010ffff]")
_SIMPLE_UNESCAPE = {ord('"'): '"', ord("'"): "'", ord("\\"): "\\", ord("/"): "/", ord("b"): "\b",
                    ord("f"): "\f", ord("n"): "\n", ord("r"): "\r", ord("t"): "\t"}


def _valid_codepoint(cp: int) -> bool:
    """util/unicode.c: inside U+0000..U+10FFFF, not a surrogate, not one of the 66 noncharacters."""
    return (
        0 <= cp <= 0x10FFFF
        and not 0xD800 <= cp <= 0xDFFF
        and not 0xFDD0 <= cp <= 0xFDEF
        and (cp & 0xFFFE) != 0xFFFE
    )


def _decode_mod_utf8_strict(raw: bytes) -> str:
    """Modified UTF-8 (C0 80 is U+0000) with QEMU's validity rules; raises on anything invalid."""
    if raw.isascii():
        return raw.decode("ascii")
    try:
        text = raw.replace(b"\xc0\x80", b"\x00").decode("utf-8")
    except UnicodeDecodeError:
        raise _JSONSyntaxError("invalid UTF-8 sequence in string") from None
    if _NONCHARACTER.search(text):
        raise _JSONSyntaxError("invalid UTF-8 sequence in string")
    return text


_MIN_CODEPOINT = (0x80, 0x800, 0x10000, 0x200000, 0x4000000)


def _decode_mod_utf8_lossy(raw: bytes) -> str:
    """How QEMU prints client bytes in an error message: a C string (a NUL ends it), each invalid
    sequence replaced by U+FFFD (util/unicode.c mod_utf8_codepoint, qobject/qjson.c)."""
    raw = raw.split(b"\x00", 1)[0]
    try:
        return _decode_mod_utf8_strict(raw)
    except _JSONSyntaxError:
        pass
    out: list[str] = []
    i, n = 0, len(raw)
    while i < n:
        byte = raw[i]
        i += 1
        if byte < 0x80:
            out.append(chr(byte))
            continue
        if byte >= 0xFE or not byte & 0x40:
            out.append("\ufffd")
            continue
        length, mask = 0, 0x80
        while byte & mask:
            length += 1
            mask >>= 1
        cp = byte & (mask - 1)
        for _ in range(length - 1):
            if i >= n or raw[i] & 0xC0 != 0x80:
                cp = -1
                break
            cp = (cp << 6) | (raw[i] & 0x3F)
            i += 1
        if cp >= 0 and cp < _MIN_CODEPOINT[length - 2] and not (cp == 0 and length == 2):
            cp = -1
        out.append(chr(cp) if cp >= 0 and _valid_codepoint(cp) else "\ufffd")
    return "".join(out)


def _hex4(raw: bytes, start: int) -> int:
    digits = raw[start:start + 4]
    if len(digits) != 4 or not all(c in b"0123456789abcdefABCDEF" for c in digits):
        return -1
    return int(digits, 16)


def _parse_string(token: bytes) -> str:
    """qobject/json-parser.c parse_string: the escapes JSON defines plus ``\\'``; ``\\uXXXX`` pairs."""
    out: list[str] = []
    i, end = 1, len(token) - 1  # the lexer guarantees the closing quote at token[-1]
    while i < end:
        backslash = token.find(b"\\", i, end)
        if backslash < 0:
            backslash = end
        if backslash > i:
            out.append(_decode_mod_utf8_strict(token[i:backslash]))
            i = backslash
            continue
        escape_start = i
        kind = token[i + 1]
        i += 2
        simple = _SIMPLE_UNESCAPE.get(kind)
        if simple is not None:
            out.append(simple)
            continue
        if kind != ord("u"):
            raise _JSONSyntaxError("invalid escape sequence in string")
        cp = _hex4(token, i)
        i += 4
        if 0xD800 <= cp <= 0xDBFF and token[i:i + 2] == b"\\u":
            trailing = _hex4(token, i + 2)
            if 0xDC00 <= trailing <= 0xDFFF:
                cp = 0x10000 + ((cp & 0x3FF) << 10) + (trailing & 0x3FF)
                i += 6
            else:
                cp = -1
        if not _valid_codepoint(cp):
            # QEMU quotes the escape as far as it read it (which may run past the closing quote)
            shown = token[escape_start:min(i, len(token))]
            raise _JSONSyntaxError(f"{_decode_mod_utf8_lossy(shown)} is not a valid Unicode character")
        out.append(chr(cp))
    return "".join(out)


def _parse_number(ttype: int, text: bytes) -> int | float:
    """An integer that fits int64 (or, when not negative, uint64) stays an int, else becomes a double."""
    if ttype == _INTEGER and len(text) <= 21:
        value = int(text)
        if _INT64_MIN <= value <= _UINT64_MAX:
            return value
    return float(text)


_KEYWORDS = {b"true": True, b"false": False, b"null": None}


def _parse_scalar(ttype: int, text: bytes) -> Any:
    if ttype == _STRING:
        return _parse_string(text)
    if ttype == _INTEGER or ttype == _FLOAT:
        return _parse_number(ttype, text)
    if text in _KEYWORDS:
        return _KEYWORDS[text]
    raise _JSONSyntaxError(f"invalid keyword '{_decode_mod_utf8_lossy(text)}'")


_OBJECT_KEY, _OBJECT_VALUE = 0, 1


def _parse_tokens(tokens: Sequence[tuple[int, bytes]]) -> Any:
    """One message's tokens to a value; the first error wins, with json-parser.c's words."""
    pos, count = 0, len(tokens)

    def take() -> int:
        nonlocal pos
        if pos >= count:
            raise _JSONSyntaxError("premature EOI")
        pos += 1
        return tokens[pos - 1][0]

    # frames: [container, state, key]; state is _OBJECT_KEY/_OBJECT_VALUE for objects, None for lists
    stack: list[list[Any]] = []
    while True:
        # a value starts here
        if pos >= count:
            raise _JSONSyntaxError("premature EOI")
        ttype, text = tokens[pos]
        pos += 1
        if ttype == _LCURLY or ttype == _LSQUARE:
            closer = _RCURLY if ttype == _LCURLY else _RSQUARE
            if pos >= count:
                raise _JSONSyntaxError("premature EOI")
            if tokens[pos][0] == closer:
                pos += 1
                value: Any = {} if ttype == _LCURLY else []
            else:
                stack.append([{}, _OBJECT_KEY, None] if ttype == _LCURLY else [[], None, None])
                continue
        elif _STRING <= ttype <= _KEYWORD:
            value = _parse_scalar(ttype, text)
        else:
            raise _JSONSyntaxError("expecting value")
        # a value is complete: hand it to the enclosing container, closing containers as they end
        while True:
            if not stack:
                return value
            frame = stack[-1]
            container, state = frame[0], frame[1]
            if state == _OBJECT_KEY:
                if not isinstance(value, str):
                    raise _JSONSyntaxError("key is not a string in object")
                frame[2] = value
                if take() != _COLON:
                    raise _JSONSyntaxError("missing : in object pair")
                frame[1] = _OBJECT_VALUE
                break
            if state == _OBJECT_VALUE:
                if frame[2] in container:
                    raise _JSONSyntaxError("duplicate key")
                container[frame[2]] = value
                separator = take()
                if separator == _RCURLY:
                    stack.pop()
                    value = container
                    continue
                if separator != _COMMA:
                    raise _JSONSyntaxError("expected separator in dict")
                frame[1] = _OBJECT_KEY
                break
            container.append(value)
            separator = take()
            if separator == _RSQUARE:
                stack.pop()
                value = container
                continue
            if separator != _COMMA:
                raise _JSONSyntaxError("expected separator in list")
            break


@dataclass(frozen=True)
class JSONValue:
    """One complete JSON value read from the stream (any JSON value; QMP then wants an object)."""

    value: Any


class JSONStreamParser:
    """QEMU's JSON message parser as a push parser: :meth:`feed` bytes, get values and errors in order.

    Output items are :class:`JSONValue` or :class:`~vdisk.errors.ProtocolError` (``str()`` is the QMP desc).
    """

    def __init__(self, *, max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
                 max_nesting: int = DEFAULT_MAX_NESTING):
        if max_message_size < 1 or max_nesting < 1:
            raise ValueError("max_message_size and max_nesting must be positive")
        self.max_message_size = max_message_size
        self.max_nesting = max_nesting
        self._state = _IN_START
        self._token = bytearray()
        self._tokens: list[tuple[int, bytes]] = []
        self._braces = 0
        self._brackets = 0
        self._message_bytes = 0
        self._skipping = False  # after a limit error: eat the rest of the message, store nothing
        self._out: list[JSONValue | ProtocolError] = []

    # -- bookkeeping

    def _count(self, n: int) -> None:
        """``n`` more bytes belong to the current message; enforce the size limit."""
        self._message_bytes += n
        if self._message_bytes > self.max_message_size and not self._skipping:
            logger.warning("QMP message larger than %d bytes refused", self.max_message_size)
            self._start_skipping("JSON token size limit exceeded")

    def _start_skipping(self, desc: str) -> None:
        self._out.append(ProtocolError(desc))
        self._skipping = True
        self._tokens = []
        self._token.clear()

    def _end_message(self) -> None:
        self._braces = self._brackets = 0
        self._tokens = []
        self._message_bytes = 0
        self._skipping = False

    def _emit(self, ttype: int, error_byte: int = -1) -> None:
        """A complete token (json-streamer.c json_message_process_token).  ``error_byte`` is the byte that
        made an error token (its text is not stored while skipping)."""
        text = bytes(self._token)
        self._token.clear()
        if ttype == _ERROR:
            hard = _is_hard_reset_byte(error_byte)
            if self._skipping and not hard and (self._braces > 0 or self._brackets > 0):
                return  # swallowed: still inside the oversized message
            if not self._skipping:
                self._out.append(ProtocolError(f"JSON parse error, stray '{_decode_mod_utf8_lossy(text)}'"))
            self._end_message()
            return
        if ttype == _LCURLY:
            self._braces += 1
        elif ttype == _RCURLY:
            self._braces -= 1
        elif ttype == _LSQUARE:
            self._brackets += 1
        elif ttype == _RSQUARE:
            self._brackets -= 1
        if self._skipping:
            if self._braces <= 0 and self._brackets <= 0:
                self._end_message()
            return
        if self._braces + self._brackets > self.max_nesting:
            self._start_skipping("JSON nesting depth limit exceeded")
            return
        self._tokens.append((ttype, text))
        if (self._braces > 0 or self._brackets > 0) and self._braces >= 0 and self._brackets >= 0:
            return
        try:
            self._out.append(JSONValue(_parse_tokens(self._tokens)))
        except _JSONSyntaxError as exc:
            self._out.append(ProtocolError(f"JSON parse error, {exc}"))
        self._end_message()

    def _in_message(self) -> bool:
        return self._braces > 0 or self._brackets > 0

    # -- the lexer

    def feed(self, data: bytes) -> list[JSONValue | ProtocolError]:
        """Lex and parse ``data`` (any chunking); returns what completed, in input order."""
        self._out = out = []
        token = self._token
        i, n = 0, len(data)
        while i < n:
            state = self._state
            if state == _IN_START:
                match = _WHITESPACE_RUN.match(data, i)
                if match:
                    if self._in_message():
                        self._count(match.end() - i)
                    i = match.end()
                    continue
                byte = data[i]
                i += 1
                self._count(1)
                if not self._skipping:
                    token.append(byte)
                structural = _STRUCTURAL.get(byte)
                if structural is not None:
                    self._emit(structural)
                elif byte == _QUOTE:
                    self._state = _IN_DQ
                elif byte == _APOSTROPHE:
                    self._state = _IN_SQ
                elif byte == 0x30:
                    self._state = _IN_ZERO
                elif 0x31 <= byte <= 0x39:
                    self._state = _IN_DIGITS
                elif byte == 0x2D:
                    self._state = _IN_SIGN
                elif 0x61 <= byte <= 0x7A:
                    self._state = _IN_KEYWORD
                else:
                    self._error_token(byte)
                continue
            if state == _IN_RECOVERY:
                match = _RECOVERY_RUN.match(data, i)
                if match:
                    if self._in_message():
                        self._count(match.end() - i)
                    i = match.end()
                else:
                    self._state = _IN_START  # lookahead: the byte is read again in the start state
                continue
            if state == _IN_DQ or state == _IN_SQ:
                match = (_DQ_RUN if state == _IN_DQ else _SQ_RUN).match(data, i)
                if match:
                    self._count(match.end() - i)
                    if not self._skipping:
                        token += data[i:match.end()]
                    i = match.end()
                    continue
                byte = data[i]
                i += 1
                self._count(1)
                if not self._skipping:
                    token.append(byte)
                if byte == (_QUOTE if state == _IN_DQ else _APOSTROPHE):
                    self._state = _IN_START
                    self._emit(_STRING)
                elif byte == _BACKSLASH:
                    self._state = _IN_DQ_ESC if state == _IN_DQ else _IN_SQ_ESC
                else:
                    self._error_token(byte)
                continue
            if state == _IN_DIGITS or state == _IN_MANTISSA_DIGITS or state == _IN_EXP_DIGITS:
                match = _DIGIT_RUN.match(data, i)
                if match:
                    self._count(match.end() - i)
                    if not self._skipping:
                        token += data[i:match.end()]
                    i = match.end()
                    continue
            elif state == _IN_KEYWORD:
                match = _KEYWORD_RUN.match(data, i)
                if match:
                    self._count(match.end() - i)
                    if not self._skipping:
                        token += data[i:match.end()]
                    i = match.end()
                    continue
                self._state = _IN_START
                self._emit(_KEYWORD)
                continue
            # single-byte steps of the number and escape states
            byte = data[i]
            next_state = self._number_step(state, byte)
            if next_state is None:  # the token ended before this byte: lookahead
                self._state = _IN_START
                self._emit(_FLOAT if state in (_IN_MANTISSA_DIGITS, _IN_EXP_DIGITS) else _INTEGER)
                continue
            i += 1
            self._count(1)
            if not self._skipping:
                token.append(byte)
            if next_state == _STEP_ERROR:
                self._error_token(byte)
            else:
                self._state = next_state
        return out

    @staticmethod
    def _number_step(state: int, byte: int) -> int | None:
        """Next state for one byte in a number or escape state; None = token complete (lookahead),
        _STEP_ERROR = the byte is an error."""
        is_digit = 0x30 <= byte <= 0x39
        if state == _IN_DQ_ESC:
            return _IN_DQ if 0x20 <= byte <= 0xFD else _STEP_ERROR
        if state == _IN_SQ_ESC:
            return _IN_SQ if 0x20 <= byte <= 0xFD else _STEP_ERROR
        if state == _IN_ZERO:
            if is_digit:
                return _STEP_ERROR
            return _IN_MANTISSA if byte == 0x2E else None
        if state == _IN_SIGN:
            if byte == 0x30:
                return _IN_ZERO
            return _IN_DIGITS if is_digit else _STEP_ERROR
        if state == _IN_DIGITS:
            if byte in (0x65, 0x45):
                return _IN_EXP_E
            return _IN_MANTISSA if byte == 0x2E else None
        if state == _IN_MANTISSA:
            return _IN_MANTISSA_DIGITS if is_digit else _STEP_ERROR
        if state == _IN_MANTISSA_DIGITS:
            return _IN_EXP_E if byte in (0x65, 0x45) else None
        if state == _IN_EXP_E:
            if byte in (0x2B, 0x2D):
                return _IN_EXP_SIGN
            return _IN_EXP_DIGITS if is_digit else _STEP_ERROR
        if state == _IN_EXP_SIGN:
            return _IN_EXP_DIGITS if is_digit else _STEP_ERROR
        if state == _IN_EXP_DIGITS:
            return None
        raise AssertionError(f"lexer state {state}")  # pragma: no cover

    def _error_token(self, byte: int) -> None:
        self._state = _IN_RECOVERY
        self._emit(_ERROR, byte)


# --- argument schemas -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EnumType:
    """A QAPI enum: a string from a fixed set (``name`` is only for documentation)."""

    name: str
    values: tuple[str, ...]


#: A member type: "str", "int" (int64), "uint64"/"size", "bool", "number", "any", an :class:`EnumType`,
#: a one-element list ``[T]`` for an array of T, or a nested schema mapping for an object.
ArgType = Any
Schema = Mapping[str, ArgType]
"""Member name -> type; a leading ``*`` marks the member optional (the QAPI schema convention)."""


def _join_name(parent: str | None, name: str) -> str:
    return f"{parent}.{name}" if parent else name


def _type_error(full_name: str, expected: str) -> InvalidArgument:
    return InvalidArgument(f"Invalid parameter type for '{full_name}', expected: {expected}")


def _check_value(arg_type: ArgType, value: Any, full_name: str, short_name: str | None) -> Any:
    """One value against one type; returns the value as the command should see it."""
    if isinstance(arg_type, EnumType):
        if not isinstance(value, str):
            raise _type_error(full_name, "string")
        if value not in arg_type.values:
            # QEMU names the member, not its path, and says 'null' for list elements
            raise InvalidArgument(
                f"Parameter '{short_name if short_name is not None else 'null'}' does not accept value "
                f"'{_c_string(value)}'"
            )
        return value
    if isinstance(arg_type, list):
        if len(arg_type) != 1:
            raise TypeError(f"a list type has exactly one element type, not {arg_type!r}")
        if not isinstance(value, list):
            raise _type_error(full_name, "array")
        return [_check_value(arg_type[0], item, f"{full_name}[{index}]", None) for index, item in enumerate(value)]
    if isinstance(arg_type, Mapping):
        if not isinstance(value, dict):
            raise _type_error(full_name, "object")
        return _check_struct(arg_type, value, full_name)
    if arg_type == "any":
        return value
    if arg_type == "str":
        if not isinstance(value, str):
            raise _type_error(full_name, "string")
        return value
    if arg_type == "bool":
        if not isinstance(value, bool):
            raise _type_error(full_name, "boolean")
        return value
    if arg_type == "int":
        if isinstance(value, bool) or not isinstance(value, int) or not _INT64_MIN <= value <= _INT64_MAX:
            raise _type_error(full_name, "integer")
        return value
    if arg_type in ("uint64", "size"):
        if isinstance(value, bool) or not isinstance(value, int) or not _INT64_MIN <= value <= _UINT64_MAX:
            raise InvalidArgument(f"Parameter '{full_name}' expects uint64")
        return value & _UINT64_MAX  # QEMU accepts negative int64 "for backward compatibility" and wraps it
    if arg_type == "number":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _type_error(full_name, "number")
        return float(value)
    raise TypeError(f"unknown QMP argument type {arg_type!r}")


def _check_struct(schema: Schema, obj: Mapping[str, Any], parent: str | None) -> dict[str, Any]:
    result: dict[str, Any] = {}
    unvisited = dict.fromkeys(obj)
    for declared, arg_type in schema.items():
        optional = declared.startswith("*")
        name = declared[1:] if optional else declared
        if name not in obj:
            if optional:
                continue
            raise InvalidArgument(f"Parameter '{_join_name(parent, name)}' is missing")
        result[name] = _check_value(arg_type, obj[name], _join_name(parent, name), name)
        del unvisited[name]
    for name in unvisited:
        raise InvalidArgument(f"Parameter '{_c_string(_join_name(parent, name))}' is unexpected")
    return result


def validate_arguments(schema: Schema, arguments: Mapping[str, Any]) -> dict[str, Any]:
    """Check ``arguments`` against ``schema`` as QEMU's generated marshaller does, members in schema order
    first (missing, then wrong type), then unexpected members.  Returns a new dict with the members that
    were given ("uint64" values wrapped to unsigned, "number" values as float).  Raises
    :class:`~vdisk.errors.InvalidArgument` (class GenericError) with QEMU's wording, e.g.
    "Parameter 'device' is missing", "Invalid parameter type for 'speed', expected: integer",
    "Parameter 'x' is unexpected".
    """
    return _check_struct(schema, arguments, None)


# --- the connection core ----------------------------------------------------------------------------------


class QMPState(enum.Enum):
    CAPABILITIES_NEGOTIATION = "capabilities_negotiation"
    COMMAND_MODE = "command_mode"


class InputKind(enum.Enum):
    QMP_CAPABILITIES = "qmp_capabilities"
    OTHER_COMMAND = "other_command"


class Action(enum.Enum):
    ACCEPT_CAPABILITIES = "accept_capabilities"  # validate, enable, reply {"return": {}}
    REFUSE_NOT_NEGOTIATED = "refuse_not_negotiated"
    REFUSE_ALREADY_NEGOTIATED = "refuse_already_negotiated"
    DISPATCH = "dispatch"  # hand the command to the caller


#: (state, input) -> (next state, action).  The next state is entered only if the action succeeds.
NEGOTIATION_TABLE: dict[tuple[QMPState, InputKind], tuple[QMPState, Action]] = {
    (QMPState.CAPABILITIES_NEGOTIATION, InputKind.QMP_CAPABILITIES):
        (QMPState.COMMAND_MODE, Action.ACCEPT_CAPABILITIES),
    (QMPState.CAPABILITIES_NEGOTIATION, InputKind.OTHER_COMMAND):
        (QMPState.CAPABILITIES_NEGOTIATION, Action.REFUSE_NOT_NEGOTIATED),
    (QMPState.COMMAND_MODE, InputKind.QMP_CAPABILITIES):
        (QMPState.COMMAND_MODE, Action.REFUSE_ALREADY_NEGOTIATED),
    (QMPState.COMMAND_MODE, InputKind.OTHER_COMMAND):
        (QMPState.COMMAND_MODE, Action.DISPATCH),
}

NOT_NEGOTIATED_DESC = "Expecting capabilities negotiation with 'qmp_capabilities'"
ALREADY_NEGOTIATED_DESC = "Capabilities negotiation is already complete, command ignored"

QMP_CAPABILITIES_SCHEMA: Schema = {"*enable": [EnumType("QMPCapability", KNOWN_CAPABILITIES)]}


def negotiation_step(state: QMPState, kind: InputKind) -> tuple[QMPState, Action]:
    """Look the pair up in :data:`NEGOTIATION_TABLE`; a pair not in it raises :class:`StateError`."""
    try:
        return NEGOTIATION_TABLE[(state, kind)]
    except KeyError:
        raise StateError(
            f"QMP connection in state {getattr(state, 'value', state)!r} has no rule for input "
            f"{getattr(kind, 'value', kind)!r}",
            state=str(getattr(state, "value", state)),
            action=str(getattr(kind, "value", kind)),
        ) from None


@dataclass(frozen=True)
class Command:
    """A well-formed request for the caller to dispatch (command mode only).

    ``arguments`` is the raw object (``{}`` when absent): validate it with the command's schema.
    ``id`` is the client's id, or :data:`NO_ID`; pass it to :func:`reply_return` / :func:`reply_exception`.
    """

    name: str
    arguments: dict[str, Any]
    id: Any = NO_ID
    oob: bool = False


@dataclass(frozen=True)
class Rejected:
    """Input the core answered itself with an error; send ``reply``.  ``error.qmp_class`` and ``str(error)``
    are the QMP class and desc."""

    error: Exception
    id: Any = NO_ID
    reply: bytes = field(default=b"", repr=False)


@dataclass(frozen=True)
class Negotiated:
    """``qmp_capabilities`` succeeded: the connection is in command mode now; send ``reply``."""

    capabilities: tuple[str, ...]
    id: Any = NO_ID
    reply: bytes = field(default=b"", repr=False)


QMPEvent = Command | Rejected | Negotiated


def _rejected(error: Exception, id: Any = NO_ID) -> Rejected:  # noqa: A002
    return Rejected(error, id, reply_exception(error, id))


class QMPConnectionCore:
    """One QMP connection's protocol state: JSON framing, request checks and capabilities negotiation.

    Not thread-safe: one reader thread feeds it.  :attr:`events_enabled` may be read from other threads.
    """

    def __init__(
        self,
        *,
        capabilities: Sequence[str] = (),
        max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
        max_nesting: int = DEFAULT_MAX_NESTING,
    ):
        unknown = [cap for cap in capabilities if cap not in KNOWN_CAPABILITIES]
        if unknown:
            raise ValueError(f"unknown QMP capabilities offered: {unknown}")
        self.capabilities_offered: tuple[str, ...] = tuple(capabilities)
        self.capabilities_enabled: frozenset[str] = frozenset()
        self.state = QMPState.CAPABILITIES_NEGOTIATION
        self._json = JSONStreamParser(max_message_size=max_message_size, max_nesting=max_nesting)

    @property
    def max_message_size(self) -> int:
        """Bytes one message may take on the wire (settable; applies from the next byte)."""
        return self._json.max_message_size

    @max_message_size.setter
    def max_message_size(self, value: int) -> None:
        if value < 1:
            raise ValueError("max_message_size must be positive")
        self._json.max_message_size = value

    @property
    def max_nesting(self) -> int:
        """Deepest nesting of arrays and objects one message may use (settable)."""
        return self._json.max_nesting

    @max_nesting.setter
    def max_nesting(self, value: int) -> None:
        if value < 1:
            raise ValueError("max_nesting must be positive")
        self._json.max_nesting = value

    @property
    def events_enabled(self) -> bool:
        """Asynchronous events are delivered only after negotiation (QMP spec)."""
        return self.state is QMPState.COMMAND_MODE

    def receive_data(self, data: bytes) -> list[QMPEvent]:
        """Feed bytes as they arrive; returns the requests and self-answered inputs that completed."""
        events: list[QMPEvent] = []
        for item in self._json.feed(data):
            if isinstance(item, JSONValue):
                events.append(self._handle_request(item.value))
            else:
                events.append(_rejected(item))
        return events

    def _check_request(self, request: dict[str, Any]) -> tuple[str, bool]:
        """qmp_dispatch_check_obj: returns (command name, out-of-band?)."""
        allow_oob = "oob" in self.capabilities_enabled
        exec_key: str | None = None
        for member, value in request.items():
            if member == "execute" or (member == "exec-oob" and allow_oob):
                if not isinstance(value, str):
                    raise GenericError(f"QMP input member '{member}' must be a string")
                if exec_key is not None:
                    raise GenericError(f"QMP input member '{member}' clashes with '{exec_key}'")
                exec_key = member
            elif member == "arguments":
                if not isinstance(value, dict):
                    raise GenericError("QMP input member 'arguments' must be an object")
            elif member != "id":
                raise GenericError(f"QMP input member '{_c_string(member)}' is unexpected")
        if exec_key is None:
            raise GenericError("QMP input lacks member 'execute'")
        return request[exec_key], exec_key == "exec-oob"

    def _handle_request(self, request: Any) -> QMPEvent:
        if not isinstance(request, dict):
            return _rejected(GenericError("QMP input must be a JSON object"))
        request_id = request.get("id", NO_ID)
        try:
            name, oob = self._check_request(request)
        except GenericError as exc:
            return _rejected(exc, request_id)
        arguments = request.get("arguments", {})
        kind = InputKind.QMP_CAPABILITIES if name == "qmp_capabilities" else InputKind.OTHER_COMMAND
        next_state, action = negotiation_step(self.state, kind)
        if action is Action.DISPATCH:
            return Command(name, arguments, request_id, oob)
        if action is Action.REFUSE_NOT_NEGOTIATED:
            return _rejected(CommandNotFound(NOT_NEGOTIATED_DESC), request_id)
        try:
            if oob:
                raise GenericError(f"The command {name} does not support OOB")
            checked = validate_arguments(QMP_CAPABILITIES_SCHEMA, arguments)
            if action is Action.REFUSE_ALREADY_NEGOTIATED:
                raise CommandNotFound(ALREADY_NEGOTIATED_DESC)
            requested = checked.get("enable", [])
            unavailable = [cap for cap in requested if cap not in self.capabilities_offered]
            if unavailable:
                raise GenericError(f"Capability {', '.join(unavailable)} not available")
        except (GenericError, CommandNotFound) as exc:
            return _rejected(exc, request_id)
        enable = tuple(dict.fromkeys(requested))
        self.capabilities_enabled = frozenset(enable)
        self.state = next_state
        logger.debug("QMP capabilities negotiated: %s", enable)
        return Negotiated(enable, request_id, reply_return({}, request_id))
