"""The serving and control commands of ``vdisk`` (serve, stream, jobs, monitor, demo)."""

from __future__ import annotations

import argparse


def cmd_serve(args: argparse.Namespace) -> int:
    from vdisk.serve import ServeOptions, serve

    if args.socket and args.bind:
        raise SystemExit("vdisk serve: give --socket or --bind, not both")
    return serve(ServeOptions(
        image=args.image, socket=args.socket, bind=args.bind, port=args.port, export_name=args.export_name,
        description=args.description, read_only=args.read_only, copy_on_read=args.copy_on_read,
        device=args.device, qmp=args.qmp, pid_file=args.pid_file, format=args.format,
        serialize=not args.parallel,
    ))


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="serve the active image of a chain over NBD (through nbdkit)")
    p.add_argument("image")
    p.add_argument("-f", "--format", choices=["qcow2", "raw"])
    p.add_argument("--socket", help="unix socket path")
    p.add_argument("--bind", help="TCP address (default: unix socket, or 127.0.0.1 with --port)")
    p.add_argument("--port", type=int, default=10809)
    p.add_argument("--export-name", default="")
    p.add_argument("--description")
    p.add_argument("--read-only", action="store_true")
    p.add_argument("--copy-on-read", action="store_true")
    p.add_argument("--device", default="drive0")
    p.add_argument("--qmp", help="QMP-compatible control socket path")
    p.add_argument("--pid-file")
    p.add_argument("--parallel", action="store_true", help="nbdkit's parallel thread model")
    p.set_defaults(func=cmd_serve)
