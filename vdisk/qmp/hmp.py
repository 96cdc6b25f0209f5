"""HMP: the human monitor's words, mapped onto the QMP commands, with QEMU's output text.

The words run QMP commands through the :data:`RunCommand` they are handed (QMP's ``human-monitor-command``
hands one that calls ``vdisk.qmp.commands``' functions), so this module knows the commands by their QMP names
only and imports none of them.

``block_stream DEVICE [BASE]`` follows QEMU's live-block-ops document (``block_stream virtio0 file-A.img``);
QEMU's later ``block_stream DEVICE [SPEED [BASE]]`` form is accepted too: a second word that is a number is
the speed.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Callable
from typing import Any

from vdisk.errors import GenericError, VdiskError
from vdisk.units import parse_size

#: Runs the QMP command named by its first argument with the given keyword arguments (Python spelling:
#: ``job_id``) and returns its result; raises what the command raises.
RunCommand = Callable[..., Any]

_SPEED = re.compile(r"^\d+[kKmMgGtT]?$")

HELP = """\
block_job_cancel [-f] device -- stop an active background block operation (use -f if the operation is currently paused)
block_job_complete device -- stop an active background block operation
block_job_pause device -- pause an active background block operation
block_job_resume device -- resume a paused background block operation
block_job_set_speed device speed -- set maximum speed for a background block operation
block_stream device [base] | device [speed [base]] -- copy data from a backing file into a block device
help|? [cmd] -- show the help
info block -- show the block devices
info block-jobs -- show progress of ongoing block device operations
info version -- show the version of QEMU
snapshot_blkdev [-n] device [new-image-file] [format] -- initiates a live snapshot of device
"""


def run_hmp(run_command: RunCommand, line: str) -> str:
    """Run one HMP command line; returns its text output (errors as QEMU prints them: 'Error: ...')."""
    try:
        words = shlex.split(line)
    except ValueError as exc:
        return f"Error: {exc}\r\n"
    if not words:
        return ""
    try:
        return _run(run_command, words[0], words[1:])
    except VdiskError as exc:
        return f"Error: {exc}\r\n"


def _need(args: list[str], count: int, usage: str) -> None:
    if len(args) < count:
        raise GenericError(f"Parameter missing; usage: {usage}")


def _run(run_command: RunCommand, cmd: str, args: list[str]) -> str:
    if cmd in ("help", "?"):
        return HELP.replace("\n", "\r\n")
    if cmd == "info":
        _need(args, 1, "info block|block-jobs|version")
        what = args[0]
        if what == "block-jobs":
            return info_block_jobs(run_command)
        if what == "block":
            return info_block(run_command)
        if what == "version":
            v = run_command("query-version")
            q = v["qemu"]
            return f"{q['major']}.{q['minor']}.{q['micro']} ({v['package']})\r\n"
        raise GenericError(f"info: unknown item '{what}'")
    if cmd == "block_stream":
        _need(args, 1, "block_stream device [base]")
        device, rest = args[0], args[1:]
        speed = 0
        if rest and _SPEED.match(rest[0]):
            speed, rest = parse_size(rest[0]), rest[1:]
        base = rest[0] if rest else None
        # QEMU's hmp_block_stream passes the device (or node) name as the job ID too
        run_command("block-stream", device=device, job_id=device, base=base, speed=speed)
        return ""
    if cmd == "block_job_set_speed":
        _need(args, 2, "block_job_set_speed device speed")
        run_command("block-job-set-speed", device=args[0], speed=parse_size(args[1]))
        return ""
    if cmd == "block_job_cancel":
        force = "-f" in args
        rest = [a for a in args if a != "-f"]
        _need(rest, 1, "block_job_cancel [-f] device")
        run_command("block-job-cancel", device=rest[0], force=force)
        return ""
    if cmd in ("block_job_pause", "block_job_resume", "block_job_complete"):
        _need(args, 1, f"{cmd} device")
        run_command(cmd.replace("_", "-"), device=args[0])
        return ""
    if cmd == "snapshot_blkdev":
        reuse = "-n" in args
        rest = [a for a in args if a != "-n"]
        _need(rest, 2, "snapshot_blkdev [-n] device new-image-file [format]")
        run_command("blockdev-snapshot-sync", device=rest[0], snapshot_file=rest[1],
                    format=rest[2] if len(rest) > 2 else "qcow2", mode="existing" if reuse else "absolute-paths")
        return ""
    raise GenericError(f"unknown command: '{cmd}'")


def info_block_jobs(run_command: RunCommand) -> str:
    """QEMU's hmp_info_block_jobs text."""
    jobs = run_command("query-block-jobs")
    if not jobs:
        return "No active jobs\r\n"
    lines = []
    for job in jobs:
        if job["type"] == "stream":
            lines.append(f"Streaming device {job['device']}: Completed {job['offset']} of {job['len']} bytes, "
                         f"speed limit {job['speed']} bytes/s")
        else:
            lines.append(f"Type {job['type']}, device {job['device']}: Completed {job['offset']} of "
                         f"{job['len']} bytes, speed limit {job['speed']} bytes/s")
    return "".join(line + "\r\n" for line in lines)


def info_block(run_command: RunCommand) -> str:
    """QEMU's ``info block`` text for each device."""
    out = []
    for dev in run_command("query-block"):
        inserted = dev["inserted"]
        out.append(f"{dev['device']} ({inserted['node-name']}): {inserted['file']} ({inserted['drv']}"
                   f"{', read-only' if inserted['ro'] else ''})")
        out.append("    Cache mode:       writeback")
        if "backing_file" in inserted:
            out.append(f"    Backing file:     {inserted['backing_file']} "
                       f"(chain depth: {inserted['backing_file_depth']})")
        out.append("")
    return "".join(line + "\r\n" for line in out)
