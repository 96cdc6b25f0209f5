"""Where a host file has data and where it has holes (SEEK_DATA/SEEK_HOLE), as QEMU's file driver asks."""

from __future__ import annotations

import os


def host_extents(fd: int, offset: int, length: int) -> list[tuple[int, int, bool]]:
    """[offset, offset + length) of the file as (start, stop, is_hole) runs; past the end of the file is a hole."""
    out: list[tuple[int, int, bool]] = []
    pos, end = offset, offset + length
    file_size = os.fstat(fd).st_size
    while pos < end:
        if pos >= file_size:
            out.append((pos, end, True))
            break
        try:
            data_at = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError:  # ENXIO: only a hole up to the end of the file
            data_at = file_size
        if data_at > pos:
            stop = min(data_at, end)
            out.append((pos, stop, True))
        else:
            stop = min(os.lseek(fd, pos, os.SEEK_HOLE), end)
            out.append((pos, stop, False))
        pos = stop
    return out
