"""Fault injection for tests and drills, in the spirit of QEMU's blkdebug.

``VDISK_FAULTS`` (environment, read once at import) is a JSON list of rules
``{"path": "...", "op": "read"|"write", "offset": N, "length": N, "errno": "EIO", "count": N}``: an I/O of
that kind on that file overlapping [offset, offset+length) of the file fails with that errno, ``count``
times (default: always).  Without the variable every check is one attribute test.
"""

from __future__ import annotations

import errno as _errno
import json
import os
import threading

from vdisk.errors import StorageError

_RULES: list[dict] = []
_LOCK = threading.Lock()


def _load() -> None:
    text = os.environ.get("VDISK_FAULTS")
    if not text:
        return
    for rule in json.loads(text):
        rule["path"] = os.path.realpath(rule["path"])
        code = rule.get("errno", "EIO")
        rule["errno"] = getattr(_errno, code) if isinstance(code, str) else int(code)
        rule.setdefault("offset", 0)
        rule.setdefault("length", 1 << 62)
        rule.setdefault("count", -1)
        _RULES.append(rule)


_load()
ENABLED = bool(_RULES)


def check(path: str, op: str, offset: int, length: int) -> None:
    """Raise the injected error if a rule matches this I/O (host offsets of the file ``path``)."""
    real = os.path.realpath(path)
    with _LOCK:
        for rule in _RULES:
            if (rule["count"] != 0 and rule["op"] == op and rule["path"] == real
                    and offset < rule["offset"] + rule["length"] and rule["offset"] < offset + length):
                if rule["count"] > 0:
                    rule["count"] -= 1
                code = rule["errno"]
                raise StorageError(f"injected {op} error at {offset:#x}: {os.strerror(code)}", path=path,
                                   os_errno=code)
