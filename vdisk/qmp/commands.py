"""QMP commands: one function per command, each with its declared argument schema, and their dispatch.

Pipeline (nbdkit's validate -> dispatch -> reply): :func:`dispatch` looks the command up, validates the
arguments against its schema (``vdisk.qmp.schema``: QEMU's wording), calls it with the
:class:`~vdisk.qmp.context.CommandContext` and the checked arguments, and maps any exception to a QMP error
reply through ``connection.reply_exception`` (our exceptions carry their QMP class).  Error texts follow QEMU
7.2's.

``human-monitor-command`` runs the HMP words of ``vdisk.qmp.hmp``, which in turn run commands of this table:
hmp knows them only by name, through the :data:`~vdisk.qmp.hmp.RunCommand` it is handed, so the import goes
one way (commands -> hmp).
"""

from __future__ import annotations

import itertools
import logging
import os
from collections.abc import Callable
from typing import Any

import vdisk
from vdisk.block import chain
from vdisk.errors import DeviceInUse, GenericError, InvalidArgument, VdiskError
from vdisk.jobs.job import ON_ERROR_VALUES, JobStatus, validate_job_id
from vdisk.jobs.registry import JobRegistry
from vdisk.jobs.stream import StreamJob
from vdisk.qmp import connection, hmp
from vdisk.qmp.context import CommandContext
from vdisk.qmp.schema import EnumType, Schema, validate_arguments

log = logging.getLogger(__name__)

Handler = Callable[..., Any]
COMMANDS: dict[str, tuple[Schema, Handler]] = {}

ON_ERROR = EnumType("BlockdevOnError", tuple(v for v in ON_ERROR_VALUES if v != "auto"))
SNAPSHOT_MODE = EnumType("NewImageMode", ("existing", "absolute-paths"))


def qemu_version() -> dict:
    """The version we announce: QEMU's shape; vdisk's own version in ``package``."""
    return connection.make_version(7, 2, 0, f"vdisk-{vdisk.__version__}")


def command(name: str, schema: Schema | None = None) -> Callable[[Handler], Handler]:
    def register(fn: Handler) -> Handler:
        COMMANDS[name] = (schema or {}, fn)
        return fn

    return register


def dispatch(context: CommandContext, request: connection.Command) -> bytes:
    """Run one request; returns the whole reply message."""
    entry = COMMANDS.get(request.name)
    try:
        if entry is None:
            raise connection.command_not_found(request.name)
        schema, fn = entry
        arguments = validate_arguments(schema, request.arguments)
        result = fn(context, **{k.replace("-", "_"): v for k, v in arguments.items()})
    except VdiskError as exc:
        return connection.reply_exception(exc, request.id)
    except Exception as exc:  # a bug: answer, log, keep the monitor alive
        log.exception("QMP command %s failed", request.name)
        return connection.reply_error("GenericError", f"internal error: {exc}", request.id)
    return connection.reply_return(result, request.id)


# --- lookups ----------------------------------------------------------------------------------------


_AUTOMATIC_NODE_NAMES = itertools.count(1)


def node_name(node) -> str:
    """QEMU-style automatic node names, stable for the life of the node object."""
    if node.node_name is None:
        node.node_name = f"#block{next(_AUTOMATIC_NODE_NAMES):03d}"
    return node.node_name


def find_device_or_node(context: CommandContext, device: str):
    """(device, node) for a device name or a node name (node names also match the image path or file name)."""
    if device in context.devices:
        dev = context.devices[device]
        return dev, dev.top
    for dev in context.devices.values():
        for node in dev.nodes():
            if device in (node_name(node), node.path, os.path.basename(node.path)):
                return dev, node
    raise GenericError(f"Cannot find device='{device}' nor node-name='{device}'")


def _busy(device) -> DeviceInUse:
    return DeviceInUse(f"Node '{device.name}' is busy: block device is in use by block job: stream")


# --- information ------------------------------------------------------------------------------------


@command("query-version")
def query_version(context: CommandContext) -> dict:
    return qemu_version()


@command("query-commands")
def query_commands(context: CommandContext) -> list:
    return [{"name": name} for name in sorted({"qmp_capabilities", *COMMANDS})]


def image_info(nodes: list, depth: int = 0) -> dict:
    """ImageInfo of ``nodes[depth]``, with its backing chain below it."""
    node = nodes[depth]
    info: dict[str, Any] = {
        "filename": node.path,
        "format": node.format_name,
        "virtual-size": node.size,
        "dirty-flag": False,
    }
    facts = node.describe()
    if "cluster-size" in facts:
        info["cluster-size"] = facts["cluster-size"]
    if node.backing_name:
        info["backing-filename"] = node.backing_name
        info["full-backing-filename"] = chain.resolve_backing(node.path, node.backing_name)
        if node.backing_format:
            info["backing-filename-format"] = node.backing_format
    if depth + 1 < len(nodes):
        info["backing-image"] = image_info(nodes, depth + 1)
    return info


def node_info(nodes: list, depth: int, read_only: bool) -> dict:
    """BlockDeviceInfo of ``nodes[depth]`` (query-named-block-nodes, and query-block's ``inserted``)."""
    node = nodes[depth]
    info: dict[str, Any] = {
        "file": node.path,
        "node-name": node_name(node),
        "ro": read_only or node.read_only,
        "drv": node.format_name,
        "encrypted": False,
        "detect_zeroes": "off",
        "bps": 0, "bps_rd": 0, "bps_wr": 0, "iops": 0, "iops_rd": 0, "iops_wr": 0,
        "write_threshold": 0,
        "backing_file_depth": len(nodes) - 1 - depth,
        "cache": {"writeback": True, "direct": False, "no-flush": False},
        "image": image_info(nodes, depth),
    }
    if node.backing_name:
        info["backing_file"] = node.backing_name
    return info


@command("query-block")
def query_block(context: CommandContext) -> list:
    out = []
    for dev in context.devices.values():
        out.append({
            "device": dev.name,
            "qdev": dev.name,
            "type": "unknown",
            "removable": False,
            "locked": False,
            "io-status": "ok",
            "inserted": node_info(dev.nodes(), 0, dev.read_only),
        })
    return out


@command("query-named-block-nodes", {"*flat": "bool"})
def query_named_block_nodes(context: CommandContext, flat: bool = False) -> list:
    out = []
    for dev in context.devices.values():
        nodes = dev.nodes()
        for depth in range(len(nodes)):
            info = node_info(nodes, depth, dev.read_only and depth == 0)
            if flat:
                info["image"].pop("backing-image", None)
            out.append(info)
    return out


@command("query-block-jobs")
def query_block_jobs(context: CommandContext) -> list:
    with context.jobs.lock:
        return [job.info() for job in context.jobs if job.status is not JobStatus.NULL]


@command("query-jobs")
def query_jobs(context: CommandContext) -> list:
    with context.jobs.lock:
        return [job.query_jobs_info() for job in context.jobs if job.status is not JobStatus.NULL]


# --- block-stream -----------------------------------------------------------------------------------


@command("block-stream", {
    "*job-id": "str", "device": "str", "*base": "str", "*base-node": "str", "*backing-file": "str",
    "*speed": "int", "*on-error": ON_ERROR, "*auto-finalize": "bool", "*auto-dismiss": "bool",
})
def block_stream(context: CommandContext, device: str, job_id: str | None = None, base: str | None = None,
                 base_node: str | None = None, backing_file: str | None = None, speed: int = 0,
                 on_error: str = "report", auto_finalize: bool = True, auto_dismiss: bool = True) -> None:
    if base is not None and base_node is not None:
        raise GenericError("'base' and 'base-node' cannot be specified at the same time")
    dev, node = find_device_or_node(context, device)
    if node is not dev.top and job_id is None:
        job_id = ""  # QEMU names a job after the device; a node that is not one has no name to lend
    if job_id is not None:
        validate_job_id(job_id)
    base_bs = None
    if base_node is not None:
        _, base_bs = find_device_or_node(context, base_node)
        if not any(n is base_bs for n in dev.nodes()[dev.chain.depth_of(node) + 1 :]):
            raise GenericError(f"Node '{base_node}' is not a backing image of '{device}'")
    elif base is not None:
        base_bs = dev.chain.find_base(base, node)
    if backing_file is not None and base_bs is None:
        raise GenericError("backing file specified, but streaming the entire chain")
    with context.jobs.lock:
        if dev.job is not None:
            raise _busy(dev)
        job_id = job_id if job_id is not None else dev.name
        context.jobs.check_unused(job_id)
        target = None
        if node is not dev.top:
            # QEMU's stream into an intermediate image: it is writable for the job's life (bdrv_reopen).
            target = dev.reopen_node(node, read_only=False)
        try:
            job = StreamJob(context.jobs, dev, job_id, base_bs, backing_file=backing_file, on_error=on_error,
                            auto_finalize=auto_finalize, auto_dismiss=auto_dismiss, target=target)
        except BaseException:
            if target is not None:
                dev.reopen_node(target, read_only=True)
            raise
        events = job.create()
        try:
            job.set_speed(speed)
        except VdiskError:
            job.copier.close()
            context.jobs.emit(events + job.early_fail())
            if target is not None:
                dev.reopen_node(target, read_only=True)
            raise
        context.jobs.emit(events)
        job.launch()


# --- job verbs (block-job-* by device or job id, job-* by job id) --------------------------------------


def _verb(context: CommandContext, job, action: Callable[[], list]) -> None:
    context.jobs.emit(action())
    job.poke()


@command("block-job-set-speed", {"device": "str", "speed": "int"})
def block_job_set_speed(context: CommandContext, device: str, speed: int) -> None:
    with context.jobs.lock:
        job = context.jobs.find_block_job(device)
        _verb(context, job, lambda: job.set_speed(speed))


@command("block-job-cancel", {"device": "str", "*force": "bool"})
def block_job_cancel(context: CommandContext, device: str, force: bool = False) -> None:
    with context.jobs.lock:
        job = context.jobs.find_block_job(device)
        _verb(context, job, lambda: job.block_job_cancel(force))


def _job_verb_command(find: Callable, verb: Callable, argument: str) -> Handler:
    """A command that looks a job up by its one argument (``find``) and applies one verb to it."""

    def run(context: CommandContext, **named: str) -> None:
        with context.jobs.lock:
            job = find(context.jobs, named[argument])
            _verb(context, job, lambda: verb(job))

    return run


# The commands that name a job by device or id and take no other argument: one table, not a function each.
_DEVICE_VERBS: dict[str, Callable] = {
    "block-job-pause": lambda job: job.user_pause(),
    "block-job-resume": lambda job: job.user_resume(),
    "block-job-complete": lambda job: job.complete(),
}
for _name, _apply in _DEVICE_VERBS.items():
    command(_name, {"device": "str"})(_job_verb_command(JobRegistry.find_block_job, _apply, "device"))

_ID_VERBS: dict[str, tuple[Callable, Callable]] = {
    "block-job-finalize": (JobRegistry.find_block_job, lambda job: job.finalize()),
    "block-job-dismiss": (JobRegistry.find_block_job, lambda job: job.dismiss()),
    "job-pause": (JobRegistry.find, lambda job: job.user_pause()),
    "job-resume": (JobRegistry.find, lambda job: job.user_resume()),
    "job-cancel": (JobRegistry.find, lambda job: job.cancel(True)),
    "job-complete": (JobRegistry.find, lambda job: job.complete()),
    "job-finalize": (JobRegistry.find, lambda job: job.finalize()),
    "job-dismiss": (JobRegistry.find, lambda job: job.dismiss()),
}
for _name, (_find, _apply) in _ID_VERBS.items():
    command(_name, {"id": "str"})(_job_verb_command(_find, _apply, "id"))


# --- live snapshot ----------------------------------------------------------------------------------


@command("blockdev-snapshot-sync", {
    "*device": "str", "*node-name": "str", "snapshot-file": "str", "*snapshot-node-name": "str",
    "*format": "str", "*mode": SNAPSHOT_MODE,
})
def blockdev_snapshot_sync(context: CommandContext, snapshot_file: str, device: str | None = None,
                           node_name: str | None = None, snapshot_node_name: str | None = None,
                           format: str = "qcow2", mode: str = "absolute-paths") -> None:  # noqa: A002
    if device is None and node_name is None:
        raise GenericError("Cannot find device='' nor node-name=''")
    dev, node = find_device_or_node(context, device if device is not None else node_name)
    if node is not dev.top:
        raise GenericError(f"The node '{node_name or device}' is not the active image of a device")
    if format != "qcow2":
        raise InvalidArgument(f"Format '{format}' cannot be used for a snapshot overlay (vdisk makes qcow2)")
    if dev.read_only:
        raise GenericError(f"Device '{dev.name}' is read-only")
    with context.jobs.lock:
        if dev.job is not None:
            raise _busy(dev)
        path = os.path.abspath(snapshot_file)
        exists = os.path.exists(path)
        if mode == "absolute-paths" and exists:
            raise GenericError(f"Could not create '{snapshot_file}': File exists")
        if mode == "existing" and not exists:
            raise GenericError(f"Could not open '{snapshot_file}': No such file or directory")
        dev.snapshot(path, create=mode == "absolute-paths", node_name=snapshot_node_name)


# --- HMP and quit -----------------------------------------------------------------------------------


@command("human-monitor-command", {"command-line": "str", "*cpu-index": "int"})
def human_monitor_command(context: CommandContext, command_line: str, cpu_index: int | None = None) -> str:
    def run_command(name: str, **arguments: Any) -> Any:
        # As QEMU's hmp_* functions call qmp_* ones: the function itself, with arguments HMP built (no schema).
        return COMMANDS[name][1](context, **arguments)

    return hmp.run_hmp(run_command, command_line)


@command("quit")
def quit_(context: CommandContext) -> None:
    context.request_shutdown()
