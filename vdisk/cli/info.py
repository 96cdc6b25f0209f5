"""``qemu-img info``-shaped descriptions of chain nodes (JSON objects and the human text)."""

from __future__ import annotations

import os

from vdisk.block.chain import resolve_backing
from vdisk.formats.node import Node


def node_info(node: Node) -> dict:
    st = os.stat(node.path)
    info: dict = {
        "virtual-size": node.size,
        "filename": node.path,
        "format": node.format_name,
        "actual-size": st.st_blocks * 512,
        "dirty-flag": False,
    }
    info.update(node.describe())
    if node.backing_name:
        info["full-backing-filename"] = resolve_backing(node.path, node.backing_name)
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
