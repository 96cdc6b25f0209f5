"""The node interface every format implements, and the mapping kinds, defined once for every format.

A node is one image file.  Its callbacks are shaped like nbdkit's plugin callbacks (size, pread into the
caller's buffer, pwrite, zero, trim, flush, extents).  A node knows nothing of the chain it sits in: the block
layer (``vdisk.block.chain``) walks the chain with ``map_units`` and ``read_mapped``, and gives each node a
``below``, the reader of what shows through the node's unallocated ranges (None: zeros).  A node needs
``below`` only for its own write path: copy-on-write of a partial cluster, and whether a discarded cluster
must read as zeros.
"""

from __future__ import annotations

from typing import NamedTuple, Protocol

import numpy as np

from vdisk.errors import OutOfRange

# What one run of a node's ``map_units`` is (qemu-img map's terms in the comments).
KIND_UNALLOCATED = 0  # this node holds nothing: read what shows through (present=false)
KIND_DATA = 1  # data at ``host`` (data=true)
KIND_ZERO = 2  # reads as zeros without asking below (zero=true); ``host``: a preallocated cluster, else 0
KIND_COMPRESSED = 3  # a compressed cluster; ``host`` is the format's raw descriptor (its L2 entry)


# One run of a node's own allocation, (start, length, kind, host): guest [start, start + length) is ``kind``
# at ``host`` (plain tuples: map_units is on the guest's hot path).
Run = tuple[int, int, int, int]


def check_request(guest_offset: int, length: int, size: int) -> None:
    """A guest request must lie inside the disk: OutOfRange (EINVAL) otherwise."""
    if guest_offset < 0 or length < 0 or guest_offset + length > size:
        raise OutOfRange(f"request {guest_offset}+{length} outside the disk of {size} bytes",
                         offset=guest_offset, length=length)


class Below(Protocol):
    """What shows through a node's unallocated ranges (set by the block layer)."""

    size: int

    def pread(self, buf, guest_offset: int) -> None: ...


class Node(Protocol):
    path: str
    format_name: str
    size: int
    read_only: bool
    cluster_size: int
    fd: int  # the host file, for what is done to the file itself (locks, writeback)
    below: Below | None
    node_name: str | None  # the QMP node name, once the monitor named it
    can_have_backing: bool  # the format can record a backing file (qcow2: yes, raw: no)
    # The backing file the image names (the qcow2 header's name and format); None for a raw file.
    backing_name: str | None
    backing_format: str | None

    def map_units(self, guest_offset: int, length: int) -> list[Run]:
        """This node's own allocation over [guest_offset, +length) (runs clipped to the request)."""
        ...

    def read_mapped(self, buf, guest_offset: int, kind: int, host: int) -> None:
        """Fill ``buf`` with guest bytes at ``guest_offset`` that one run of ``map_units`` says this node holds
        (``kind`` DATA, ZERO or COMPRESSED, ``host`` as that run reported it, advanced to ``guest_offset``)."""
        ...

    def pread(self, buf, guest_offset: int) -> None:
        """This node's content: its own runs, and ``below`` where it holds nothing."""
        ...

    def pwrite(self, buf, guest_offset: int, *, fua: bool = False) -> None: ...

    def write_zeroes(self, guest_offset: int, length: int, *, may_trim: bool = True, fua: bool = False) -> None: ...

    def trim(self, guest_offset: int, length: int) -> None: ...

    def flush(self) -> None: ...

    def close(self) -> None: ...

    def clean_caches(self) -> int:
        """Drop cached metadata unused since the previous call (QEMU's cache-clean-interval); how many tables."""
        ...

    def unallocated_clusters(self, first: int, count: int) -> np.ndarray:
        """Which clusters of [first, first + count) this node holds nothing of (bool array)."""
        ...

    def populate(self, guest_offset: int, buf, wanted: np.ndarray, zero: np.ndarray) -> int:
        """Fill the ``wanted`` clusters that are still unallocated with ``buf`` (whole clusters from the
        cluster-aligned ``guest_offset``); ``zero`` marks all-zero ones.  The copy-on-read and stream step."""
        ...

    def partially_allocated(self, guest_offset: int, length: int) -> list[int]:
        """Clusters of the range that hold some data and read the rest from below (qcow2 subclusters)."""
        ...

    def set_backing(self, backing_name: str | None, backing_format: str | None) -> None:
        """Rewrite the backing file name the image records (QEMU's unsafe rebase), durably."""
        ...

    def block_status(self, guest_offset: int, length: int) -> list[Status]:
        """``map_units`` as ``qemu-img map`` reports it: ``host`` where known, and data that reads as zeros
        (a hole of the host file under a preallocated cluster) said so."""
        ...

    def describe(self) -> dict:
        """Format-specific facts for ``query-block`` / ``vdisk info`` (cluster size, backing names...)."""
        ...


class Status(NamedTuple):
    """One run of a node's ``block_status``: ``qemu-img map``'s flags for what the node itself holds."""

    start: int
    length: int
    kind: int
    zero: bool
    host: int | None
