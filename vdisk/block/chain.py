"""Backing chains: open them safely, and ask where data lives through their depth.

A chain is the active node with ``below`` links down to the base.  Opening resolves each backing name
relative to the directory of the image that names it (QEMU's rule), detects loops by (device, inode) and
bounds the depth, so a hostile image cannot make vdisk hang or open arbitrary files: ``json:`` and protocol
names (``nbd:``, ``http:``...) are refused, and ``allowed_dirs`` can pin backing files to directories.
"""

from __future__ import annotations

import dataclasses
import os
import re
import stat
from collections.abc import Iterator, Sequence

from vdisk.formats.node import KIND_COMPRESSED, KIND_DATA, KIND_UNALLOCATED, Node
from vdisk.errors import BackingChainError, FormatError, StorageError
from vdisk.formats.qcow2 import format as fmt
from vdisk.formats.qcow2.cache import CacheOptions
from vdisk.formats.qcow2.image import Qcow2Image
from vdisk.formats.raw import RawImage

MAX_CHAIN_DEPTH = 64
_PROTOCOL = re.compile(r"^[A-Za-z0-9+.-]+:")


def probe_format(path: str) -> str:
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as exc:
        raise StorageError.from_oserror(exc, path=path, action="open") from exc
    return "qcow2" if magic == fmt.MAGIC else "raw"


def open_node(path: str, fmt_name: str | None = None, *, read_only: bool, force_share: bool = False,
              cache: CacheOptions = CacheOptions()) -> Node:
    """Open one node.  ``cache``: the qcow2 metadata cache options (QEMU's), ignored by raw."""
    fmt_name = fmt_name or probe_format(path)
    if fmt_name == "qcow2":
        return Qcow2Image.open(path, read_only=read_only, force_share=force_share, cache=cache)
    if fmt_name == "raw":
        return RawImage.open(path, read_only=read_only, force_share=force_share)
    raise FormatError(f"unknown image format {fmt_name!r} (vdisk knows qcow2 and raw)", path=path)


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
) -> Node:
    """Open ``path`` (read-write unless read_only) and its backing files (always read-only).

    ``cache`` applies to every qcow2 node of the chain (QEMU applies -drive options to the top node and
    ``backing.*`` options below it; one setting for all is what the tests and users of vdisk need).
    """
    seen: dict[tuple[int, int], str] = {}
    top = open_node(path, fmt_name, read_only=read_only, force_share=force_share, cache=cache)
    node = top
    try:
        _remember(seen, node.path)
        depth = 0
        while node.backing_name:
            name = node.backing_name
            depth += 1
            if depth > max_depth:
                raise BackingChainError(f"backing chain deeper than {max_depth} images", path=path)
            if name.startswith("json:") or (_PROTOCOL.match(name) and not os.path.exists(resolve_backing(node.path, name))):
                raise BackingChainError(
                    f"backing file name {name!r} is a protocol or json: name; vdisk opens only plain files",
                    path=node.path,
                )
            target = resolve_backing(node.path, name)
            if allowed_dirs is not None and not _inside(target, allowed_dirs):
                raise BackingChainError(
                    f"backing file {target!r} lies outside the allowed directories {list(allowed_dirs)}",
                    path=node.path,
                )
            if not os.path.exists(target):
                raise BackingChainError(f"backing file {name!r} not found (looked for {target})", path=node.path)
            if not (stat.S_ISREG(mode := os.stat(target).st_mode) or stat.S_ISBLK(mode)):
                # QEMU's file driver wants a regular file (or a host device): a FIFO would block the open
                # forever, a directory or a character device is no disk.
                raise BackingChainError(f"backing file {target!r} is not a regular file or a block device",
                                        path=node.path)
            key = _file_key(target)
            if key in seen:
                raise BackingChainError(
                    f"backing file loop: {target} is already in the chain (as {seen[key]})", path=node.path
                )
            seen[key] = target
            backing = open_node(target, node.backing_format, read_only=True, force_share=force_share,
                                cache=cache)
            node.below = backing
            node = backing
    except BaseException:
        close_chain(top)
        raise
    return top


def _file_key(path: str) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_dev, st.st_ino


def _remember(seen: dict[tuple[int, int], str], path: str) -> None:
    seen[_file_key(path)] = path


def _inside(path: str, dirs: Sequence[str]) -> bool:
    real = os.path.realpath(path)
    return any(os.path.commonpath([real, os.path.realpath(d)]) == os.path.realpath(d) for d in dirs)


def nodes(top: Node) -> Iterator[Node]:
    node: Node | None = top
    while node is not None:
        yield node
        node = node.below


def close_chain(top: Node) -> None:
    """Close every node; one that fails to close (a final flush error) does not leave the others open."""
    first_error: BaseException | None = None
    for node in list(nodes(top)):
        try:
            node.close()
        except BaseException as exc:  # noqa: BLE001 - raised below, once every node is closed
            first_error = first_error or exc
    if first_error is not None:
        raise first_error


# --- block status through the chain ------------------------------------------------------------------


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
    node: Node | None = dataclasses.field(default=None, repr=False, compare=False)

    def as_json(self) -> dict:
        out = {"start": self.start, "length": self.length, "depth": self.depth, "present": self.present,
               "zero": self.zero, "data": self.data}
        if self.offset is not None:
            out["offset"] = self.offset
        return out


def block_status(top: Node, guest_offset: int, length: int, *, stop_at: Node | None = None) -> list[Extent]:
    """Where each byte of a range comes from: depth (0 = top), data/zero, host offset (QEMU's block status).

    ``stop_at`` is a base node that is not descended into: ranges it would supply report present=False at
    the depth of the base (QEMU's ``bdrv_is_allocated_above(top, base)``).
    """
    out: list[Extent] = []
    _status(top, guest_offset, length, 0, stop_at, out)
    return out


def _status(node: Node, offset: int, length: int, depth: int, stop_at: Node | None, out: list[Extent]) -> None:
    if node is stop_at:
        out.append(Extent(offset, length, depth, False, True, False))
        return
    for status in node.block_status(offset, length):
        start, run_len, host_offset = status.start, status.length, status.host
        if status.kind == KIND_UNALLOCATED:
            backing = node.below
            if backing is None:
                out.append(Extent(start, run_len, depth, False, True, False, host_offset))
                continue
            inside = max(0, min(run_len, backing.size - start))
            if inside:
                _status(backing, start, inside, depth + 1, stop_at, out)
            if inside < run_len:
                # Past the end of a shorter backing file: zeros, still unallocated at this depth (QEMU's
                # bdrv_co_block_status sets ZERO without ALLOCATED, so qemu-img map says present=false).
                past = host_offset + inside if host_offset is not None else None
                out.append(Extent(start + inside, run_len - inside, depth, False, True, False, past))
            continue
        out.append(Extent(start, run_len, depth, True, status.zero, status.kind in (KIND_DATA, KIND_COMPRESSED),
                          host_offset, node))


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


def chain_map(top: Node) -> list[Extent]:
    """The whole disk's map, as ``qemu-img map --output=json`` reports it."""
    return merge_extents(block_status(top, 0, top.size))
