"""The small backend interface every disk node implements, shaped like nbdkit's plugin callbacks.

Implemented by ``vdisk.formats.qcow2.image.Qcow2Image`` and ``vdisk.formats.raw.RawImage``.  ``pread`` fills the caller's
buffer (nbdkit's, without a copy); unallocated ranges of a qcow2 node read through its ``backing``.
"""

from __future__ import annotations

from typing import Protocol


class Backend(Protocol):
    path: str
    format_name: str
    size: int
    read_only: bool
    backing: "Backend | None"

    def pread(self, buf, guest_offset: int) -> None: ...

    def pwrite(self, buf, guest_offset: int, *, fua: bool = False) -> None: ...

    def write_zeroes(self, guest_offset: int, length: int, *, may_trim: bool = True, fua: bool = False) -> None: ...

    def trim(self, guest_offset: int, length: int) -> None: ...

    def flush(self) -> None: ...

    def close(self) -> None: ...

    def clean_caches(self) -> int:
        """Drop cached metadata unused since the previous call (QEMU's cache-clean-interval); how many tables."""
        ...

    def map_units(self, guest_offset: int, length: int) -> list[tuple[int, int, int, int]]:
        """Runs (guest_start, length, kind, host_offset) of this node alone; kinds from vdisk.formats.qcow2.format."""
        ...
