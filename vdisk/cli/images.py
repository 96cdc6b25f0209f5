"""The image commands of ``vdisk`` (create, info, map, check): qemu-img's words, output and exit codes, on
the library directly (no server involved)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable

from vdisk.block.chain import open_chain, probe_format, resolve_backing
from vdisk.errors import OutOfRange
from vdisk.formats.node import Node
from vdisk.formats.qcow2 import format as fmt
from vdisk.formats.qcow2.check import check_image
from vdisk.formats.qcow2.image import Qcow2Image
from vdisk.formats.raw import RawImage
from vdisk.units import parse_size


def _parse_options(text: str | None) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in (text or "").split(","):
        if not item:
            continue
        key, _, value = item.partition("=")
        out[key.strip()] = value.strip()
    return out


def cmd_create(args: argparse.Namespace) -> int:
    opts = _parse_options(args.options)
    known = {"cluster_size", "extended_l2", "refcount_bits", "compat", "compression_type"}
    unknown = set(opts) - known
    if unknown:
        raise OutOfRange(f"unknown option(s) {', '.join(sorted(unknown))} (known: {', '.join(sorted(known))})")
    size = parse_size(args.size) if args.size is not None else None
    if args.backing and not args.unsafe:
        # Like qemu-img create: the backing chain must open (a typo is caught now, not at first use),
        # and gives the size when none is given.  -u skips this, as it does for qemu-img.
        backing = open_chain(resolve_backing(args.filename, args.backing), args.backing_format, read_only=True,
                             force_share=True)
        if size is None:
            size = backing.size
        backing.close()
    if size is None:
        raise OutOfRange("a size is needed when there is no backing file")
    if args.format == "raw":
        RawImage.create(args.filename, size)
    else:
        compat = opts.get("compat", "1.1")
        if compat not in ("0.10", "1.1", "v2", "v3"):
            raise OutOfRange(f"compat must be 0.10 or 1.1, not {compat!r}")
        compression = opts.get("compression_type", "zlib")
        if compression not in ("zlib", "zstd"):
            raise OutOfRange(f"compression_type must be zlib or zstd, not {compression!r}")
        Qcow2Image.create(
            args.filename,
            size,
            cluster_size=parse_size(opts.get("cluster_size", "64k")),
            version=2 if compat in ("0.10", "v2") else 3,
            backing_file=args.backing,
            backing_format=args.backing_format or (
                args.backing and probe_format(resolve_backing(args.filename, args.backing))),
            extended_l2=opts.get("extended_l2", "off") in ("on", "true", "1"),
            refcount_bits=int(opts.get("refcount_bits", "16")),
            compression_type=fmt.COMPRESSION_ZSTD if compression == "zstd" else fmt.COMPRESSION_ZLIB,
        )
    backing_note = f" backing_file={args.backing}" if args.backing else ""
    print(f"Formatting '{args.filename}', fmt={args.format} size={size}{backing_note}")
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    chain = open_chain(args.filename, args.format, read_only=True, force_share=args.force_share)
    try:
        infos = [node_info(node) for node in (chain.nodes if args.backing_chain else [chain.top])]
    finally:
        chain.close()
    if args.output == "json":
        print(json.dumps(infos if args.backing_chain else infos[0], indent=4))
    else:
        print("\n\n".join(render_info(i) for i in infos))
    return 0


def cmd_map(args: argparse.Namespace) -> int:
    chain = open_chain(args.filename, args.format, read_only=True, force_share=args.force_share)
    try:
        extents = chain.map()
        paths = [node.path for node in chain.nodes]
    finally:
        chain.close()
    if args.output == "json":
        print("[" + ",\n".join(_map_json_line(e.as_json()) for e in extents) + "]")
    else:
        print(f"{'Offset':<16}{'Length':<16}{'Mapped to':<16}File")
        for e in extents:
            if e.data and e.offset is not None:
                print(f"{_c_hex(e.start):<16}{_c_hex(e.length):<16}{_c_hex(e.offset):<16}{paths[e.depth]}")
    return 0


def _c_hex(n: int) -> str:
    """C's %#x, which qemu-img map prints: no 0x prefix on zero ("0", not "0x0")."""
    return f"{n:#x}" if n else "0"


def _map_json_line(entry: dict) -> str:
    # qemu-img's exact spacing, so the two outputs can be diffed as text too
    body = ", ".join(f'"{k}": {json.dumps(v)}' for k, v in entry.items())
    return "{ " + body + "}"


def cmd_check(args: argparse.Namespace) -> int:
    image = Qcow2Image.open(args.filename, read_only=args.repair is None, force_share=args.force_share,
                            repair=False, for_check=True)
    try:
        result = check_image(image, repair=args.repair)
        if result.leaks_fixed or result.corruptions_fixed:
            # As qemu-img does: report the image as it is after the repair, plus what was fixed.
            fixed = result
            result = check_image(image)
            result.messages = fixed.messages + result.messages
            result.leaks_fixed, result.corruptions_fixed = fixed.leaks_fixed, fixed.corruptions_fixed
    finally:
        image.close()
    for line in result.messages:  # on stderr whatever the output format, as qemu-img prints them
        print(line, file=sys.stderr)
    if args.output == "json":
        print(json.dumps(result.as_json(), indent=4))
    else:
        if result.corruptions:
            print(f"\n{result.corruptions} errors were found on the image.\n"
                  "Data may be corrupted, or further writes to the image may corrupt it.")
        if result.leaks:
            print(f"\n{result.leaks} leaked clusters were found on the image.\n"
                  "This means waste of disk space, but no harm to data.")
        if result.leaks_fixed or result.corruptions_fixed:
            print(f"The following inconsistencies were found and repaired:\n\n"
                  f"    {result.leaks_fixed} leaked clusters\n    {result.corruptions_fixed} corruptions\n")
        if not result.corruptions and not result.leaks:
            print("No errors were found on the image.")
        print(f"{result.allocated_clusters}/{result.total_clusters} = "
              f"{100.0 * result.allocated_clusters / max(1, result.total_clusters):.2f}% allocated")
        print(f"Image end offset: {result.image_end_offset}")
    return result.exit_code


# --- info: qemu-img info-shaped descriptions of chain nodes (JSON objects and the human text) ----------------


def node_info(node: Node) -> dict:
    """qemu-img info's JSON object for one node."""
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
    """qemu-img info's human text for one :func:`node_info` object."""
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


def add_commands(add_parser: Callable[..., argparse.ArgumentParser]) -> None:
    """The create, info, map and check subcommands."""
    p = add_parser("create", help="create an image (like qemu-img create)")
    p.add_argument("-f", "--format", choices=["qcow2", "raw"], default="qcow2")
    p.add_argument("-b", "--backing", help="backing file (stored as given; relative to the new image)")
    p.add_argument("-F", "--backing-format", choices=["qcow2", "raw"])
    p.add_argument("-u", "--unsafe", action="store_true", help="do not open the backing file (needs a size)")
    p.add_argument("-o", "--options", help="cluster_size=N,extended_l2=on,refcount_bits=N,compat=0.10,"
                                            "compression_type=zstd")
    p.add_argument("filename")
    p.add_argument("size", nargs="?")
    p.set_defaults(func=cmd_create)

    for name, func, text in (("info", cmd_info, "show image information (like qemu-img info)"),
                             ("map", cmd_map, "show where the data lives (like qemu-img map)"),
                             ("check", cmd_check, "check image consistency (like qemu-img check)")):
        p = add_parser(name, help=text)
        p.add_argument("--output", choices=["human", "json"], default="human")
        p.add_argument("-U", "--force-share", action="store_true", help="open without taking image locks")
        if name != "check":
            p.add_argument("-f", "--format", choices=["qcow2", "raw"])
        if name == "info":
            p.add_argument("--backing-chain", action="store_true")
        if name == "check":
            p.add_argument("-r", "--repair", choices=["leaks", "all"])
        p.add_argument("filename")
        p.set_defaults(func=func)
