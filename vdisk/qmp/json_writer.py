"""JSON output the way QEMU writes it (qobject/qjson.c to_json), so our replies compare with QEMU's byte for byte.

ASCII only, ``\\uXXXX`` escapes in upper-case hex (surrogate pairs beyond the BMP), ``": "`` and ``", "``
separators, doubles printed with ``%.17g``, members in the order the caller gives them.  Iterative, so any
nesting depth is fine.  No I/O: values in, text out.
"""

from __future__ import annotations

import enum
import numbers
import re
from collections.abc import Mapping
from typing import Any

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
    """Serialise ``value`` the way QEMU's compact writer does.

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
