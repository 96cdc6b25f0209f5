"""QEMU's JSON message reader as a push parser: bytes in, JSON values and parse errors out.  No I/O.

Theory of operation
===================

It mirrors QEMU's three stages (qobject/json-lexer.c, json-streamer.c, json-parser.c as shipped from QEMU 3.0
to 9.x; checked byte for byte against qemu-storage-daemon by tests/test_qmp_protocol.py):

* **Lexer** -- a byte state machine with QEMU's states (strings in double *or single* quotes, numbers,
  lower-case keywords, the six structural characters).  A byte no state accepts yields an error token
  ("JSON parse error, stray '...'") and the lexer enters *recovery*: it skips bytes until a structural
  character, an ASCII control character other than TAB, or 0xFE/0xFF.  The QMP spec tells clients to send
  such a control character to force the parser into a known-good state; that works here too.
* **Streamer** -- counts braces and brackets over tokens.  QMP is *not* line-based: a message may span
  lines and several may share one.  A message ends when both counts are back to zero (or one goes
  negative: a stray ``}``).  A top-level scalar (``42``, ``"x"``) is a whole message by itself; it
  parses fine (the connection then refuses it with "QMP input must be a JSON object", exactly like QEMU).
* **Parser** -- turns one message's tokens into a Python value, iteratively (no recursion, so nesting up
  to ``max_nesting`` cannot hit Python's recursion limit).  The first error wins and carries QEMU's text.

Limits (QEMU's are 64 MiB / 2M tokens / 1024 levels; ours are configurable, default 1 MiB / 1024 levels):
the size of one message is counted in bytes from its first byte to its last, whitespace inside included.
When a message exceeds a limit the parser reports it once, then *eats the rest of that message* (tracking
strings and brace depth, storing nothing) and resyncs at its end, as the newest json-streamer.c does ("during
error recovery eat tokens until parentheses balance"); QEMU 3.0-9.x cascaded one error per leftover token.
During that skip only a hard-reset byte (a control character other than TAB/CR/LF, or 0xFE/0xFF) ends it
early.  Every other error (lexical or syntactic) behaves exactly as in QEMU 3.0-9.x.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from vdisk.errors import ProtocolError

logger = logging.getLogger(__name__)

DEFAULT_MAX_MESSAGE_SIZE = 1 << 20
DEFAULT_MAX_NESTING = 1024  # QEMU's MAX_NESTING (qobject/json-streamer.c)

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


# An integer in this range stays exact (int64, or uint64 when not negative); anything else becomes a double.
# QAPI's integer types (schema.py) are checked against the same bounds, as QEMU's visitor checks the QNum.
INT64_MIN, INT64_MAX, UINT64_MAX = -(1 << 63), (1 << 63) - 1, (1 << 64) - 1
# The 66 Unicode noncharacters, which QEMU refuses inside strings (util/unicode.c).
NONCHARACTER = re.compile("[\ufdd0-\ufdef\ufffe\uffff\U0001fffe\U0001ffff\U0002fffe\U0002ffff\U0003fffe"
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
    if NONCHARACTER.search(text):
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
        if INT64_MIN <= value <= UINT64_MAX:
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

