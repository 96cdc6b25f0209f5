"""I/O recording for power-loss tests: every image write and fdatasync, in the order they reached the OS.

``VDISK_IOLOG=PATH`` (environment, read once at import) or :func:`start` (in-process tests) turns it on.  The
qcow2 image then routes each payload/metadata write (``ImageFile.pwrite``; its pwritev and populate paths
fall back to it while recording) and each fdatasync through :func:`write` and :func:`sync`, which run the
real call and append a record to ``PATH`` (one JSON line each); the written bytes go to ``PATH.data``.

Design notes
============
* One lock serialises every recorded write and fdatasync (in recording mode only).  A write's record is
  therefore appended before any fdatasync that started after the write returned, and after any fdatasync
  that returned before the write started: the log is an exact order, with no ambiguous overlap.  The races
  that matter (a flush syncing data while another thread links freshly written data) are decided in Python
  before these calls, so serialising the system calls does not hide them.
* Records: ``{"op": "w", "file": path, "offset": host offset, "length": n, "data": offset in PATH.data}``,
  ``{"op": "s", "file": path}`` for a completed fdatasync, ``{"op": "m", "text": ...}`` for a marker.
  Markers come from other processes too (a test appends "the guest's flush N returned" after the reply):
  every record is one ``write`` on an ``O_APPEND`` descriptor, so the file order is the time order.
* A failed write or fdatasync is not recorded (a failed write may have stored part of its bytes: the
  power-loss model treats a write as atomic per 4 KiB sector, and such partial writes are not modelled).
* Opened lazily, per process (nbdkit may fork after loading the plugin).
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Callable, Iterator

_LOCK = threading.RLock()
_path: str | None = os.environ.get("VDISK_IOLOG") or None
_fds: tuple[int, int, int] | None = None  # (pid, log fd, data fd)
ENABLED = _path is not None


def start(path: str) -> None:
    """Record from now on into ``path`` (in-process tests)."""
    global _path, ENABLED
    stop()
    with _LOCK:
        _path = path
        ENABLED = True


def stop() -> None:
    """Stop recording and close the log."""
    global _path, _fds, ENABLED
    with _LOCK:
        ENABLED = False
        if _fds is not None and _fds[0] == os.getpid():
            os.close(_fds[1])
            os.close(_fds[2])
        _fds = None
        _path = None


def _open() -> tuple[int, int]:
    global _fds
    if _fds is None or _fds[0] != os.getpid():
        assert _path is not None
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC
        _fds = (os.getpid(), os.open(_path, flags, 0o644), os.open(_path + ".data", flags, 0o644))
    return _fds[1], _fds[2]


def _append(fd: int, record: dict) -> None:
    os.write(fd, (json.dumps(record, separators=(",", ":")) + "\n").encode())


def write(path: str, data, offset: int, do: Callable[[], None]) -> None:
    """Run ``do`` (the pwrite of ``data`` at ``offset`` of ``path``) and record it."""
    with _LOCK:
        do()
        log_fd, data_fd = _open()
        data_offset = os.lseek(data_fd, 0, os.SEEK_END)
        payload = bytes(data)
        os.write(data_fd, payload)
        _append(log_fd, {"op": "w", "file": os.path.realpath(path), "offset": offset,
                         "length": len(payload), "data": data_offset})


def sync(path: str, do: Callable[[], None]) -> None:
    """Run ``do`` (an fdatasync of ``path``) and record the barrier."""
    with _LOCK:
        do()
        _append(_open()[0], {"op": "s", "file": os.path.realpath(path)})


def mark(log_path: str, text: str) -> None:
    """Append a marker to the log at ``log_path`` (from any process)."""
    fd = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        _append(fd, {"op": "m", "text": text})
    finally:
        os.close(fd)


def read(log_path: str) -> Iterator[dict]:
    """The records of a log, in order; write records get their bytes as ``record["bytes"]``."""
    with open(log_path + ".data", "rb") as data_file, open(log_path, encoding="utf-8") as log_file:
        for line in log_file:
            if not line.endswith("\n"):
                break  # a record torn by a kill of the writer
            record = json.loads(line)
            if record["op"] == "w":
                data_file.seek(record["data"])
                record["bytes"] = data_file.read(record["length"])
            yield record
