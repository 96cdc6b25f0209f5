"""The serving and control commands of ``vdisk`` (serve, stream, jobs, monitor, demo).

``serve`` runs nbdkit with our plugin (``vdisk.serving.launcher``); every other command talks to a running
server only through its QMP socket (``vdisk.qmp.client``), never to the server's objects.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from vdisk.formats.qcow2.cache import CacheOptions
from vdisk.harness.demo import run_demo
from vdisk.qmp.client import Monitor, wait_for_job
from vdisk.serving.launcher import ServeOptions, serve
from vdisk.units import parse_size


def cmd_serve(args: argparse.Namespace) -> int:
    if args.socket and args.bind:
        raise SystemExit("vdisk serve: give --socket or --bind, not both")
    cache = CacheOptions(
        cache_size=parse_size(args.cache_size) if args.cache_size else None,
        l2_cache_size=parse_size(args.l2_cache_size) if args.l2_cache_size else None,
        refcount_cache_size=parse_size(args.refcount_cache_size) if args.refcount_cache_size else None,
        cache_clean_interval=args.cache_clean_interval,
    )
    return serve(ServeOptions(
        image=args.image, socket=args.socket, bind=args.bind, port=args.port, export_name=args.export_name,
        description=args.description, read_only=args.read_only, copy_on_read=args.copy_on_read,
        device=args.device, qmp=args.qmp, pid_file=args.pid_file, format=args.format,
        serialize=not args.parallel, max_connections=args.max_connections, threads=args.threads,
        tls=args.tls, tls_creds=args.tls_creds, tls_psk=args.tls_psk,
        allow_backing_dirs=tuple(args.allow_backing_dir or ()), cache=cache,
    ))


def cmd_stream(args: argparse.Namespace) -> int:
    with Monitor(args.qmp) as monitor:
        job_id = args.job_id or args.device
        monitor.execute("block-stream", device=args.device, job_id=args.job_id, base=args.base,
                        speed=parse_size(args.speed) if args.speed else None, backing_file=args.backing_file)
        if not args.wait:
            print(f"started stream job {job_id}")
            return 0
        ending = wait_for_job(monitor, job_id, show_progress=sys.stderr.isatty() or args.progress)
    if ending["event"] == "BLOCK_JOB_CANCELLED":
        print(f"stream job {job_id} cancelled at {ending['offset']} of {ending['len']} bytes", file=sys.stderr)
        return 2
    if "error" in ending:
        print(f"stream job {job_id} failed: {ending['error']}", file=sys.stderr)
        return 1
    print(f"stream job {job_id} completed: {ending['len']} bytes")
    return 0


def cmd_jobs(args: argparse.Namespace) -> int:
    with Monitor(args.qmp) as monitor:
        print(monitor.hmp("info block-jobs"), end="")
    return 0


def cmd_monitor(args: argparse.Namespace) -> int:
    """An HMP shell over QMP's human-monitor-command, like QEMU's (qemu) prompt."""

    with Monitor(args.qmp) as monitor:
        lines = args.command or None
        interactive = lines is None and sys.stdin.isatty()
        source = lines if lines is not None else _input_lines(interactive)
        for line in source:
            if line.strip() in ("quit", "q") and interactive:
                break
            output = monitor.hmp(line)
            if output:
                print(output.replace("\r\n", "\n"), end="")
    return 0


def _input_lines(prompt: bool):
    while True:
        try:
            yield input("(vdisk) " if prompt else "")
        except EOFError:
            return


def cmd_demo(args: argparse.Namespace) -> int:
    return run_demo(args.workdir, size_mib=args.size, keep=args.keep)


def add_commands(add_parser: Callable[..., argparse.ArgumentParser]) -> None:
    """The serve, stream, jobs, monitor and demo subcommands."""
    p = add_parser("serve", help="serve the active image of a chain over NBD (through nbdkit)")
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
    p.add_argument("--tls", choices=["off", "on", "require"], default="off",
                   help="NBD over TLS (with --tls-creds or --tls-psk; default then: require)")
    p.add_argument("--tls-creds", help="x509 directory: ca-cert.pem, server-cert.pem, server-key.pem (QEMU's layout)")
    p.add_argument("--tls-psk", help="PSK file of username:hexkey lines (QEMU's keys.psk)")
    p.add_argument("--allow-backing-dir", action="append",
                   help="backing files must lie below this directory (repeatable; default: anywhere)")
    p.add_argument("--max-connections", type=int, default=64, metavar="N",
                   help="NBD clients connected at once (nbdkit's limit filter; 0 = no limit; default 64)")
    p.add_argument("--threads", type=int, metavar="N",
                   help="requests in flight per connection with --parallel (nbdkit --threads; default 16)")
    p.add_argument("--cache-size", metavar="SIZE",
                   help="qcow2 metadata cache, L2 + refcount (QEMU's cache-size; per qcow2 node of the chain)")
    p.add_argument("--l2-cache-size", metavar="SIZE",
                   help="qcow2 L2 table cache (default: enough for the whole disk, at most 32M)")
    p.add_argument("--refcount-cache-size", metavar="SIZE",
                   help="qcow2 refcount block cache (default: 4 clusters)")
    p.add_argument("--cache-clean-interval", type=int, default=600, metavar="SECONDS",
                   help="drop cached metadata tables unused for this long (default 600; 0 = never)")
    p.set_defaults(func=cmd_serve)

    p = add_parser("stream", help="start a live block stream (QMP block-stream)")
    p.add_argument("--qmp", required=True, help="the server's QMP socket")
    p.add_argument("device")
    p.add_argument("--base", help="backing file to keep (the new backing file of the device)")
    p.add_argument("--backing-file", help="the name to write as the new backing file")
    p.add_argument("--speed", help="bytes per second (suffixes k, M, G), 0 = unlimited")
    p.add_argument("--job-id")
    p.add_argument("--wait", action="store_true", help="wait for the end; the exit status says how it ended")
    p.add_argument("--progress", action="store_true", help="show the progress bar even when not on a terminal")
    p.set_defaults(func=cmd_stream)

    p = add_parser("jobs", help="list block jobs (HMP info block-jobs)")
    p.add_argument("--qmp", required=True)
    p.set_defaults(func=cmd_jobs)

    p = add_parser("monitor", help="HMP shell: block_stream, info block-jobs, snapshot_blkdev ...")
    p.add_argument("--qmp", required=True)
    p.add_argument("-c", "--command", action="append", help="run this HMP line (repeatable) and exit")
    p.set_defaults(func=cmd_monitor)

    p = add_parser("demo", help="the whole story on a demo chain: build, serve, boot a guest, stream, check")
    p.add_argument("--workdir", help="where to build the chain (default: a new temporary directory)")
    p.add_argument("--size", type=int, default=256, help="disk size in MiB")
    p.add_argument("--keep", action="store_true", help="keep the work directory")
    p.set_defaults(func=cmd_demo)
