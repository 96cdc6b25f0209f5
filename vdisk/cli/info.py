"""``qemu-img info``-shaped descriptions of chain nodes (JSON objects and the human text)."""

from __future__ import annotations

import os

from vdisk.formats.node import Node
from vdisk.block.chain import resolve_backing
from vdisk.formats.qcow2 import format as fmt
from vdisk.formats.qcow2.image import Qcow2Image


def node_info(node: Node) -> dict:
    st = os.stat(node.path)
    info: dict = {
        "virtual-size": node.size,
        "filename": node.path,
        "format": node.format_name,
        "actual-size": st.st_blocks * 512,
        "dirty-flag": False,
    }
    if isinstance(node, Qcow2Image):
        h = node.header
        info["cluster-size"] = node.cluster_size
        if h.backing_file:
            info["backing-filename"] = h.backing_file
            info["full-backing-filename"] = resolve_backing(node.path, h.backing_file)
            if h.backing_format:
                info["backing-filename-format"] = h.backing_format
        data = {"compat": "1.1" if h.version >= 3 else "0.10"}
        if h.version >= 3:
            data.update({
                "compression-type": fmt.COMPRESSION_NAMES[h.compression_type],
                "lazy-refcounts": bool(h.compatible_features & fmt.COMPAT_LAZY_REFCOUNTS),
                "refcount-bits": h.refcount_bits,
                "corrupt": bool(h.incompatible_features & fmt.INCOMPAT_CORRUPT),
                "extended-l2": h.extended_l2,
            })
        else:
            data.update({"compression-type": "zlib", "refcount-bits": 16})
        info["format-specific"] = {"type": "qcow2", "data": data}
        info["dirty-flag"] = bool(h.incompatible_features & fmt.INCOMPAT_DIRTY)
    return info


def _human_size(n: int) -> str:
    for unit, name in ((1 << 40, "TiB"), (1 << 30, "GiB"), (1 << 20, "MiB"), (1 << 10, "KiB")):
        if n >= unit:
            value = n / unit
            return f"{value:.3g} {name}" if value != int(value) else f"{int(value)} {name}"
    return f"{n} B"


def render_info(info: dict) -> str:
    lines = [
        f"image: {info['filename']}",
        f"file format: {info['format']}",
        f"virtual size: {_human_size(info['virtual-size'])} ({info['virtual-size']} bytes)",
        f"disk size: {_human_size(info['actual-size'])}",
    ]
    if "cluster-size" in info:
        lines.append(f"cluster_size: {info['cluster-size']}")
    if "backing-filename" in info:
        backing_line = f"backing file: {info['backing-filename']}"
        full = info.get("full-backing-filename")
        if full is not None and full != info["backing-filename"]:
            backing_line += f" (actual path: {full})"  # qemu-img's wording when the two differ
        lines.append(backing_line)
        if "backing-filename-format" in info:
            lines.append(f"backing file format: {info['backing-filename-format']}")
    if "format-specific" in info:
        lines.append("Format specific information:")
        for key, value in info["format-specific"]["data"].items():
            text = str(value).lower() if isinstance(value, bool) else value
            lines.append(f"    {key.replace('-', ' ')}: {text}")
    return "\n".join(lines)
