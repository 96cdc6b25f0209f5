"""Byte-range locks over guest ranges, in three modes: READ, COPY and WRITE.

=========  ======  ======  ======
 held \\ new  READ    COPY    WRITE
=========  ======  ======  ======
 READ        ok      ok     wait
 COPY        ok     wait    wait
 WRITE      wait    wait    wait
=========  ======  ======  ======

What each mode is for is in ``vdisk.block.device``'s design notes.  Locks are not owner-bound: a pipeline may
acquire in one thread and release in another.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

READ, COPY, WRITE = "read", "copy", "write"
_CONFLICTS = {
    (READ, WRITE), (WRITE, READ),
    (COPY, COPY), (COPY, WRITE), (WRITE, COPY),
    (WRITE, WRITE),
}


class RangeLock:
    """Byte-range locks in three modes (see the design notes); held ranges are few, so a list suffices."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._held: list[tuple[int, int, str]] = []

    def acquire(self, start: int, end: int, mode: str) -> tuple[int, int, str]:
        """Wait until [start, end) can be held in ``mode``; returns the token for ``release``.

        Not owner-bound: a pipeline may acquire in one thread and release in another.
        """
        token = (start, end, mode)
        with self._cond:
            while self._held and any(
                s < end and start < e and (m, mode) in _CONFLICTS for s, e, m in self._held
            ):
                self._cond.wait()
            self._held.append(token)
        return token

    def try_acquire(self, start: int, end: int, mode: str) -> tuple[int, int, str] | None:
        """``acquire`` without waiting: None when a conflicting range is held."""
        token = (start, end, mode)
        with self._cond:
            if any(s < end and start < e and (m, mode) in _CONFLICTS for s, e, m in self._held):
                return None
            self._held.append(token)
        return token

    def release(self, token: tuple[int, int, str]) -> None:
        with self._cond:
            self._held.remove(token)
            self._cond.notify_all()

    @contextlib.contextmanager
    def hold(self, start: int, end: int, mode: str) -> Iterator[None]:
        token = self.acquire(start, end, mode)
        try:
            yield
        finally:
            self.release(token)
