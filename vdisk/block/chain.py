"""Backing chains: opening them safely, the one walk through them (``resolve``), and every chain switch.

Design notes
============
A ``Chain`` is the list of its nodes, the active image first.  Nodes know nothing of each other: each gets a
``below`` (a ``Below`` of this module) that reads what shows through its unallocated ranges by walking the
rest of the chain, so a node can copy-on-write a partial cluster without knowing where the data comes from.

``resolve`` is the only walk.  It asks each node, once per call, for its own runs over the span still
unresolved (``map_units``, or ``block_status`` for map/extents), and returns pieces: which node holds each
byte, of which kind, at which host offset, and whether it is held above a base.  Guest reads, copy-on-read,
block status, ``map`` and the stream copier all use it; the pieces are read with ``node.read_mapped``.

Opening resolves each backing name relative to the directory of the image that names it (QEMU's rule),
detects loops by (device, inode) and bounds the depth, so a hostile image cannot make vdisk hang or open
arbitrary files: ``json:`` and protocol names (``nbd:``, ``http:``...) are refused, and ``allowed_dirs`` can
pin backing files to directories.

Switches (``push``, ``drop_between``, ``replace``) publish a new list and relink the ``below`` readers; they
never change a list in place, so a walk that took the old list ends on it.  They run with every guest
request held out (the block device's quiesce), so no guest request spans one; a dropped node is closed only
after the switch, when no request can reach it.
"""

from __future__ import annotations

import dataclasses
import os
import re
import stat
from collections.abc import Sequence

import numpy as np

from vdisk.errors import BackingChainError, FormatError, GenericError, StorageError
from vdisk.formats.node import KIND_COMPRESSED, KIND_DATA, KIND_UNALLOCATED, KIND_ZERO, Node, check_request
from vdisk.formats.qcow2 import format as qcow2_format
from vdisk.formats.qcow2.cache import CacheOptions
from vdisk.formats.qcow2.image import Qcow2Image
from vdisk.formats.raw import RawImage
from vdisk.io import native

MAX_CHAIN_DEPTH = 64
_PROTOCOL = re.compile(r"^[A-Za-z0-9+.-]+:")


def probe_format(path: str) -> str:
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as exc:
        raise StorageError.from_oserror(exc, path=path, action="open") from exc
    return "qcow2" if magic == qcow2_format.MAGIC else "raw"


def open_node(path: str, fmt_name: str | None = None, *, read_only: bool, force_share: bool = False,
              cache: CacheOptions = CacheOptions()) -> Node:
    """Open one node.  ``cache``: the qcow2 metadata cache options (QEMU's), ignored by raw."""
    fmt_name = fmt_name or probe_format(path)
    if fmt_name == "qcow2":
        return Qcow2Image.open(path, read_only=read_only, force_share=force_share, cache=cache)
    if fmt_name == "raw":
        return RawImage.open(path, read_only=read_only, force_share=force_share)
    raise FormatError(f"unknown image format {fmt_name!r} (vdisk knows qcow2 and raw)", path=path)


def create_overlay(path: str, backing: Node) -> None:
    """A new empty qcow2 image at ``path`` over ``backing`` (absolute name), as a live snapshot makes it."""
    Qcow2Image.create(path, backing.size, backing_file=os.path.abspath(backing.path),
                      backing_format=backing.format_name)


def resolve_backing(image_path: str, backing_name: str) -> str:
    """The path QEMU would open for ``backing_name`` written in ``image_path``."""
    if os.path.isabs(backing_name):
        return backing_name
    return os.path.join(os.path.dirname(image_path), backing_name)


def open_chain(
    path: str,
    fmt_name: str | None = None,
    *,
    read_only: bool = False,
    force_share: bool = False,
    allowed_dirs: Sequence[str] | None = None,
    max_depth: int = MAX_CHAIN_DEPTH,
    cache: CacheOptions = CacheOptions(),
) -> Chain:
    """Open ``path`` (read-write unless read_only) and its backing files (always read-only).

    ``cache`` applies to every qcow2 node of the chain (QEMU applies -drive options to the top node and
    ``backing.*`` options below it; one setting for all is what the tests and users of vdisk need).
    """
    top = open_node(path, fmt_name, read_only=read_only, force_share=force_share, cache=cache)
    nodes = [top]
    try:
        seen = {_file_key(top.path): top.path}
        node = top
        while node.backing_name:
            name = node.backing_name
            if len(nodes) > max_depth:
                raise BackingChainError(f"backing chain deeper than {max_depth} images", path=path)
            target = _checked_backing_path(node, name, allowed_dirs)
            key = _file_key(target)
            if key in seen:
                raise BackingChainError(
                    f"backing file loop: {target} is already in the chain (as {seen[key]})", path=node.path
                )
            seen[key] = target
            node = open_node(target, node.backing_format, read_only=True, force_share=force_share, cache=cache)
            nodes.append(node)
    except BaseException:
        close_nodes(nodes)
        raise
    return Chain(nodes)


def _checked_backing_path(node: Node, name: str, allowed_dirs: Sequence[str] | None) -> str:
    if name.startswith("json:") or (_PROTOCOL.match(name) and not os.path.exists(resolve_backing(node.path, name))):
        raise BackingChainError(
            f"backing file name {name!r} is a protocol or json: name; vdisk opens only plain files", path=node.path
        )
    target = resolve_backing(node.path, name)
    if allowed_dirs is not None and not _inside(target, allowed_dirs):
        raise BackingChainError(
            f"backing file {target!r} lies outside the allowed directories {list(allowed_dirs)}", path=node.path
        )
    if not os.path.exists(target):
        raise BackingChainError(f"backing file {name!r} not found (looked for {target})", path=node.path)
    if not (stat.S_ISREG(mode := os.stat(target).st_mode) or stat.S_ISBLK(mode)):
        # QEMU's file driver wants a regular file (or a host device): a FIFO would block the open forever,
        # a directory or a character device is no disk.
        raise BackingChainError(f"backing file {target!r} is not a regular file or a block device", path=node.path)
    return target


def _file_key(path: str) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_dev, st.st_ino


def _inside(path: str, dirs: Sequence[str]) -> bool:
    real = os.path.realpath(path)
    return any(os.path.commonpath([real, os.path.realpath(d)]) == os.path.realpath(d) for d in dirs)


def close_nodes(nodes: Sequence[Node]) -> None:
    """Close every node; one that fails to close (a final flush error) does not leave the others open."""
    first_error: BaseException | None = None
    for node in nodes:
        try:
            node.close()
        except BaseException as exc:  # noqa: BLE001 - raised below, once every node is closed
            first_error = first_error or exc
    if first_error is not None:
        raise first_error


# --- the walk -------------------------------------------------------------------------------------------


class Piece:
    """A run of guest bytes [start, stop) and where it comes from.

    ``kind`` is the run's kind in ``node`` (at depth ``depth``: 0 is the top), with ``host`` where the node
    keeps it.  ``kind`` None: no node above the base holds it; ``node`` is then the base (read through it)
    or None (reads as zeros: unallocated everywhere, or past the end of a shorter backing node), and
    ``depth``/``host`` say where it was last unallocated.  ``zero``: reads as zeros.  ``held``: some node
    above the base holds it (what a stream copies).
    """

    __slots__ = ("depth", "held", "host", "kind", "node", "start", "stop", "zero")

    def __init__(self, start: int, stop: int, depth: int, node: Node | None, kind: int | None, host: int | None,
                 zero: bool, held: bool):
        self.start, self.stop, self.depth, self.node, self.kind = start, stop, depth, node, kind
        self.host, self.zero, self.held = host, zero, held


@dataclasses.dataclass
class Extent:
    """One run of ``qemu-img map --output=json``."""

    start: int
    length: int
    depth: int
    present: bool
    zero: bool
    data: bool
    offset: int | None = None

    def as_json(self) -> dict:
        out = {"start": self.start, "length": self.length, "depth": self.depth, "present": self.present,
               "zero": self.zero, "data": self.data}
        if self.offset is not None:
            out["offset"] = self.offset
        return out


class Below:
    """What shows through the unallocated ranges of the node above ``depth``: the chain from ``depth`` on."""

    __slots__ = ("chain", "depth", "size")

    def __init__(self, chain: Chain, depth: int, size: int):
        self.chain, self.depth, self.size = chain, depth, size

    def pread(self, buf, guest_offset: int) -> None:
        self.chain.read(buf, guest_offset, first=self.depth)


class Chain:
    """The nodes of one backing chain, the active image first, and the guest view they make together."""

    def __init__(self, nodes: list[Node]):
        if not nodes:
            raise GenericError("a chain needs at least one node")
        self._publish(nodes)

    def _publish(self, nodes: list[Node]) -> None:
        """Make ``nodes`` the chain: link each node's ``below``, then swap the list in whole (a walker that
        took the old list finishes on it; no list a walker holds is ever changed)."""
        for depth, node in enumerate(nodes):
            node.below = Below(self, depth + 1, nodes[depth + 1].size) if depth + 1 < len(nodes) else None
        self.nodes = nodes

    @property
    def top(self) -> Node:
        return self.nodes[0]

    @property
    def size(self) -> int:
        return self.nodes[0].size

    @property
    def cluster_size(self) -> int:
        """The active image's: the granularity of allocation, copy-on-write and copying."""
        return self.nodes[0].cluster_size

    def depth_of(self, node: Node) -> int:
        for depth, candidate in enumerate(self.nodes):
            if candidate is node:
                return depth
        raise GenericError(f"{node.path} is not in the chain of {self.top.path}")

    def resolve(self, start: int, stop: int, *, first: int = 0, base: Node | None = None,
                status: bool = False) -> list[Piece]:
        """Where each byte of [start, stop) comes from, from depth ``first`` down to ``base`` (excluded).

        One ``map_units`` (``status``: ``block_status``) call per node over the span still unresolved,
        instead of one per run and per level as a recursive read makes: a middle image with scattered
        clusters splits a range into many runs, and each call costs tens of microseconds of numpy.
        """
        nodes = self.nodes
        pieces: list[Piece] = []
        todo: list[tuple[int, int, int | None]] = [(start, stop, None)]  # span, host where unallocated above
        depth = first
        while todo:
            if depth >= len(nodes):
                pieces.extend(Piece(a, b, depth - 1, None, None, h, True, False) for a, b, h in todo)
                break
            node = nodes[depth]
            if node is base:
                pieces.extend(Piece(a, b, depth, node, None, None, True, False) for a, b, _ in todo)
                break
            size = node.size
            for a, b, h in todo:
                if b > size:  # past the end of a shorter backing node: zeros, unallocated one level up
                    lo = max(a, size)
                    pieces.append(Piece(lo, b, depth - 1, None, None, None if h is None else h + lo - a, True, False))
            inside = [(a, min(b, size)) for a, b, _ in todo if a < size]
            if not inside:
                break
            lo_all, hi_all = inside[0][0], inside[-1][1]
            runs = node.block_status(lo_all, hi_all - lo_all) if status else node.map_units(lo_all, hi_all - lo_all)
            todo = []
            i = 0
            for a, b in inside:
                while i < len(runs) and runs[i][0] + runs[i][1] <= a:
                    i += 1
                j = i
                while j < len(runs) and runs[j][0] < b:
                    run = runs[j]
                    j += 1
                    r_start, kind = run[0], run[2]
                    lo, hi = max(a, r_start), min(b, r_start + run[1])
                    if status:
                        zero, host = run[3], run[4]
                    else:
                        zero, host = kind == KIND_ZERO, run[3] if kind in (KIND_DATA, KIND_COMPRESSED) else None
                    if host is not None and kind != KIND_COMPRESSED:
                        host += lo - r_start
                    if kind == KIND_UNALLOCATED:
                        if todo and todo[-1][1] == lo and _continues(todo[-1], lo, host):
                            todo[-1] = (todo[-1][0], hi, todo[-1][2])
                        else:
                            todo.append((lo, hi, host))
                    else:
                        pieces.append(Piece(lo, hi, depth, node, kind, host, zero, True))
            depth += 1
        pieces.sort(key=lambda p: p.start)
        return pieces

    def read(self, buf, guest_offset: int, *, first: int = 0) -> None:
        """Fill ``buf`` with the guest bytes at ``guest_offset`` as the chain from depth ``first`` shows them."""
        view = memoryview(buf).cast("B")
        length = len(view)
        nodes = self.nodes
        # A request inside one run of every node it meets (a 4 KiB random read, a read of a range the top
        # does not hold): one map_units call per level, no pieces.  Where a node splits the request, the walk
        # resolves from that node on: the nodes above hold none of it.
        depth = first
        while depth < len(nodes):
            node = nodes[depth]
            if guest_offset + length > node.size:
                break
            runs = node.map_units(guest_offset, length)
            if len(runs) != 1:
                break
            kind, host = runs[0][2], runs[0][3]
            if kind != KIND_UNALLOCATED:
                node.read_mapped(view, guest_offset, kind, host)
                return
            depth += 1
        else:
            native.zero_fill(view)
            return
        self.read_pieces(view, guest_offset, self.resolve(guest_offset, guest_offset + length, first=depth),
                         [(guest_offset, guest_offset + length)])

    def read_pieces(self, view: memoryview, view_start: int, pieces: list[Piece],
                    spans: list[tuple[int, int]]) -> None:
        """Fill the parts of ``view`` (guest ``view_start`` on) that ``spans`` name, from resolved pieces.

        ``view`` may be a reused buffer: whatever in ``spans`` no piece covers is zero-filled.
        """
        i = 0
        for a, b in spans:
            cursor = a
            while i < len(pieces) and pieces[i].stop <= a:
                i += 1
            j = i
            while j < len(pieces) and pieces[j].start < b:
                p = pieces[j]
                j += 1
                lo, hi = max(a, p.start), min(b, p.stop)
                if lo > cursor:
                    native.zero_fill(view[cursor - view_start : lo - view_start])
                cursor = hi
                dst = view[lo - view_start : hi - view_start]
                if p.kind is not None:
                    host = p.host + lo - p.start if p.kind == KIND_DATA else p.host
                    p.node.read_mapped(dst, lo, p.kind, host)
                elif p.node is not None:
                    self.read(dst, lo, first=p.depth)
                else:
                    native.zero_fill(dst)
            if b > cursor:
                native.zero_fill(view[cursor - view_start : b - view_start])

    def copy_plan(self, target: Node, start: int, end: int, base: Node | None, *,
                  with_target: bool = False) -> tuple[np.ndarray, list[Piece]]:
        """The clusters of [start, end) that ``target`` holds nothing of and the chain between it and
        ``base`` holds (what a stream or a copy-on-read copies), and the pieces of the range below the target
        (``with_target``: from the target down, its own pieces included, for a read of the whole range)."""
        cs = target.cluster_size
        first, count = start // cs, -(-(end - start) // cs)
        free = target.unallocated_clusters(first, count)
        if not free.any():
            return free, []
        depth = self.depth_of(target)
        if depth + 1 >= len(self.nodes) and not with_target:
            return np.zeros(count, dtype=bool), []
        pieces = self.resolve(start, end, first=depth if with_target else depth + 1, base=base)
        held = np.zeros(count, dtype=bool)
        for p in pieces:
            if p.held and p.depth > depth:
                held[(p.start - start) // cs : -(-(p.stop - start) // cs)] = True
        return free & held, pieces

    def first_held(self, target: Node, start: int, stop: int, base: Node | None) -> int:
        """The first cluster-aligned offset of [start, stop) that the chain below ``target`` and above
        ``base`` holds, or ``stop``."""
        depth = self.depth_of(target) + 1
        if depth >= len(self.nodes):
            return stop
        chain_end = min(stop, self.nodes[depth].size)
        if chain_end > start:
            cs = target.cluster_size
            for p in self.resolve(start, chain_end, first=depth, base=base):
                if p.held:
                    return max(start, p.start // cs * cs)
        return stop

    # --- block status ---------------------------------------------------------------------------------

    def block_status(self, guest_offset: int, length: int, *, first: int = 0,
                     base: Node | None = None) -> list[Extent]:
        """Where each byte of a range comes from: depth (0 = top), data/zero, host offset (QEMU's block status).

        ``base`` is not descended into: ranges it would supply report present=False at the depth of the base
        (QEMU's ``bdrv_is_allocated_above(top, base)``).
        """
        return [
            Extent(p.start, p.stop - p.start, p.depth, p.kind is not None, p.zero,
                   p.kind in (KIND_DATA, KIND_COMPRESSED), p.host)
            for p in self.resolve(guest_offset, guest_offset + length, first=first, base=base, status=True)
        ]

    def map(self) -> list[Extent]:
        """The whole disk's map, as ``qemu-img map --output=json`` reports it."""
        return merge_extents(self.block_status(0, self.size))

    # --- the active image's callbacks, without the block device's locks --------------------------------

    def pread(self, buf, guest_offset: int) -> None:
        view = memoryview(buf).cast("B")
        check_request(guest_offset, len(view), self.size)
        self.read(view, guest_offset)

    def pwrite(self, buf, guest_offset: int, *, fua: bool = False) -> None:
        self.top.pwrite(buf, guest_offset, fua=fua)

    def write_zeroes(self, guest_offset: int, length: int, *, may_trim: bool = True, fua: bool = False) -> None:
        self.top.write_zeroes(guest_offset, length, may_trim=may_trim, fua=fua)

    def trim(self, guest_offset: int, length: int) -> None:
        self.top.trim(guest_offset, length)

    def flush(self) -> None:
        self.top.flush()

    def close(self) -> None:
        close_nodes(self.nodes)

    # --- switches (the caller holds every guest request out) --------------------------------------------

    def push(self, overlay: Node) -> None:
        """A live snapshot: ``overlay`` (whose backing name points at the top) becomes the active image."""
        if overlay.size != self.size:
            raise GenericError(f"Snapshot '{overlay.path}' has size {overlay.size}, the device {self.size}")
        self._publish([overlay, *self.nodes])

    def drop_between(self, target: Node, base: Node | None, backing_name: str | None,
                     backing_format: str | None) -> list[Node]:
        """Make ``base`` (None: nothing) ``target``'s backing node, durably first (the header), then in the
        chain; returns the dropped nodes, for the caller to close once requests flow again."""
        depth = self.depth_of(target)
        stop = self.depth_of(base) if base is not None else len(self.nodes)
        target.set_backing(backing_name, backing_format)
        dropped = self.nodes[depth + 1 : stop]
        self._publish(self.nodes[: depth + 1] + self.nodes[stop:])
        return dropped

    def replace(self, old: Node, new: Node) -> None:
        """Put ``new`` (the same file opened again) in ``old``'s place."""
        nodes = list(self.nodes)
        nodes[self.depth_of(old)] = new
        self._publish(nodes)

    def backing_name_for(self, target: Node, base: Node | None) -> tuple[str | None, str | None]:
        """The backing name to write into ``target`` for ``base``: as it stood in the chain, re-relativised.

        A relative name stays relative (to the target's directory); an absolute one stays absolute.
        """
        if base is None:
            return None, None
        above_base = self.nodes[self.depth_of(base) - 1]
        stored = above_base.backing_name
        if stored is None or os.path.isabs(stored):
            return stored or base.path, base.format_name
        return (os.path.relpath(resolve_backing(above_base.path, stored), os.path.dirname(target.path) or "."),
                base.format_name)

    def find_base(self, name: str, below: Node) -> Node:
        """The node below ``below`` named ``name``: a backing name as stored, or any path to the same file."""
        nodes = self.nodes
        for depth in range(self.depth_of(below) + 1, len(nodes)):
            node = nodes[depth]
            if (nodes[depth - 1].backing_name == name or os.path.abspath(name) == os.path.abspath(node.path)
                    or _same_file(name, node.path)):
                return node
        raise BackingChainError(f"Can't find '{name}' in the backing chain")


def _continues(span: tuple[int, int, int | None], lo: int, host: int | None) -> bool:
    """Whether an unallocated run at ``lo`` (``host``: where its unallocated subclusters sit, if known) extends
    ``span`` without changing what block status says of it (qemu-img map splits at a change of offset)."""
    if span[2] is None or host is None:
        return span[2] is None and host is None
    return span[2] + lo - span[0] == host


def _same_file(a: str, b: str) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def merge_extents(extents: list[Extent]) -> list[Extent]:
    """Merge neighbours the way ``qemu-img map`` does (same flags and depth, contiguous offsets)."""
    merged: list[Extent] = []
    for e in extents:
        if merged:
            last = merged[-1]
            if (
                last.depth == e.depth
                and last.present == e.present
                and last.zero == e.zero
                and last.data == e.data
                and (last.offset is None) == (e.offset is None)
                and (last.offset is None or last.offset + last.length == e.offset)
                and last.start + last.length == e.start
            ):
                last.length += e.length
                continue
        merged.append(dataclasses.replace(e))
    return merged
