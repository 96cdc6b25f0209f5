"""One QMP connection, sans I/O: framing, request checks, capabilities negotiation, and the reply and event
messages.  No sockets, no threads, no clock.

Theory of operation
===================

One :class:`QMPConnectionCore` per client connection.  The socket loop around it does all I/O::

    sock.sendall(greeting(version, core.capabilities_offered))
    for data in iter(lambda: sock.recv(65536), b""):
        for item in core.receive_data(data):
            if isinstance(item, Command):
                sock.sendall(dispatch(item))          # reply_return(...) / reply_exception(...)
            else:                                    # Rejected / Negotiated: the core already answered
                sock.sendall(item.reply)
    # and, from the event thread, only while core.events_enabled:
    sock.sendall(event(name, data, time.time()))

Every reply and event is one whole message ending in CRLF, as QEMU writes them; the caller writes each one
under the connection's write lock so that messages never interleave.  Bytes become JSON values in
:mod:`vdisk.qmp.json_parser` (QEMU's lexer, streamer and parser, with their errors and limits); messages
become bytes in :mod:`vdisk.qmp.json_writer`.

Request validation follows qapi/qmp-dispatch.c: the value must be an object; members are ``execute``
(string), ``arguments`` (object), ``id`` (any value, echoed in the reply -- even ``null``), and
``exec-oob`` only once the ``oob`` capability is enabled.  Errors found after the object parsed carry its
``id``; JSON errors never do (the spec says so: the id was never read).

Negotiation is a table (:data:`NEGOTIATION_TABLE`): ``(state, input kind) -> (next state, action)``, an
unknown pair raises :class:`StateError`.  In ``capabilities_negotiation`` only ``qmp_capabilities`` exists
(anything else gets CommandNotFound "Expecting capabilities negotiation with 'qmp_capabilities'", from
monitor/qmp.c); in ``command_mode`` ``qmp_capabilities`` gets CommandNotFound "Capabilities negotiation is
already complete, command ignored" (monitor/qmp-cmds-control.c).  Events are delivered only in command mode.

Messages are laid out as QEMU happens to emit them (``{"return": ..., "id": ...}``, ``{"id": ..., "error":
...}``, ``{"timestamp": ..., "event": ..., "data": ...}``), so a reply can be compared with QEMU's byte for byte.
"""

from __future__ import annotations

import enum
import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from vdisk.errors import CommandNotFound, GenericError, StateError
from vdisk.qmp.json_parser import DEFAULT_MAX_MESSAGE_SIZE, DEFAULT_MAX_NESTING, JSONStreamParser, JSONValue
from vdisk.qmp.json_writer import encode_json
from vdisk.qmp.schema import EnumType, Schema, as_c_string, validate_arguments

logger = logging.getLogger(__name__)

CRLF = b"\r\n"

#: The capabilities QEMU's QMPCapability enum knows (qapi/control.json).
KNOWN_CAPABILITIES = ("oob",)


class _NoId:
    """The absence of an ``id`` member (distinct from ``"id": null``, which is echoed as ``null``)."""

    _instance: _NoId | None = None

    def __new__(cls) -> _NoId:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "NO_ID"

    def __bool__(self) -> bool:
        return False


NO_ID: Any = _NoId()


# --- messages ---------------------------------------------------------------------------------------------


def _message(obj: Mapping[str, Any]) -> bytes:
    return encode_json(obj).encode("ascii") + CRLF


def make_version(major: int, minor: int, micro: int, package: str = "") -> dict[str, Any]:
    """A ``query-version`` / greeting version object: ``{"qemu": {"micro", "minor", "major"}, "package"}``."""
    return {"qemu": {"micro": micro, "minor": minor, "major": major}, "package": package}


def greeting(version: Mapping[str, Any], capabilities: Iterable[str]) -> bytes:
    """``{"QMP": {"version": ..., "capabilities": [...]}}`` + CRLF: the first message on a connection."""
    return _message({"QMP": {"version": version, "capabilities": list(capabilities)}})


def reply_return(value: Any = None, id: Any = NO_ID) -> bytes:  # noqa: A002 - QMP's own word
    """A success reply.  ``value=None`` becomes ``{}``: the spec's answer for commands that return nothing."""
    msg: dict[str, Any] = {"return": {} if value is None else value}
    if id is not NO_ID:
        msg["id"] = id
    return _message(msg)


def reply_error(error_class: str, desc: str, id: Any = NO_ID) -> bytes:  # noqa: A002
    """An error reply ``{"id": ..., "error": {"class": ..., "desc": ...}}`` (id only when the client sent one)."""
    msg: dict[str, Any] = {}
    if id is not NO_ID:
        msg["id"] = id
    msg["error"] = {"class": error_class, "desc": desc}
    return _message(msg)


def error_class_and_desc(exc: BaseException) -> tuple[str, str]:
    """The one mapping from an exception to a QMP ``(class, desc)``: our errors carry their class; anything
    else is a GenericError with its message."""
    return getattr(exc, "qmp_class", "GenericError"), str(exc)


def reply_exception(exc: BaseException, id: Any = NO_ID) -> bytes:  # noqa: A002
    """:func:`reply_error` for an exception, through :func:`error_class_and_desc`."""
    error_class, desc = error_class_and_desc(exc)
    return reply_error(error_class, desc, id)


def event(name: str, data: Mapping[str, Any] | None, timestamp_seconds: float) -> bytes:
    """An asynchronous event.  The time comes from the caller (``time.time()``), never from the clock here.

    ``data=None`` leaves the member out, as QEMU does for events without data.
    """
    if not math.isfinite(timestamp_seconds) or timestamp_seconds < 0:
        raise ValueError(f"event timestamp must be a non-negative number of seconds, not {timestamp_seconds!r}")
    seconds, microseconds = divmod(round(timestamp_seconds * 1_000_000), 1_000_000)
    msg: dict[str, Any] = {
        "timestamp": {"seconds": seconds, "microseconds": microseconds},
        "event": name,
    }
    if data is not None:
        msg["data"] = data
    return _message(msg)


def command_not_found(name: str) -> CommandNotFound:
    """The error QEMU gives for an unknown command (qapi/qmp-dispatch.c)."""
    return CommandNotFound(f"The command {as_c_string(name)} has not been found")


# --- the connection core ----------------------------------------------------------------------------------


class QMPState(enum.Enum):
    CAPABILITIES_NEGOTIATION = "capabilities_negotiation"
    COMMAND_MODE = "command_mode"


class InputKind(enum.Enum):
    QMP_CAPABILITIES = "qmp_capabilities"
    OTHER_COMMAND = "other_command"


class Action(enum.Enum):
    ACCEPT_CAPABILITIES = "accept_capabilities"  # validate, enable, reply {"return": {}}
    REFUSE_NOT_NEGOTIATED = "refuse_not_negotiated"
    REFUSE_ALREADY_NEGOTIATED = "refuse_already_negotiated"
    DISPATCH = "dispatch"  # hand the command to the caller


#: (state, input) -> (next state, action).  The next state is entered only if the action succeeds.
NEGOTIATION_TABLE: dict[tuple[QMPState, InputKind], tuple[QMPState, Action]] = {
    (QMPState.CAPABILITIES_NEGOTIATION, InputKind.QMP_CAPABILITIES):
        (QMPState.COMMAND_MODE, Action.ACCEPT_CAPABILITIES),
    (QMPState.CAPABILITIES_NEGOTIATION, InputKind.OTHER_COMMAND):
        (QMPState.CAPABILITIES_NEGOTIATION, Action.REFUSE_NOT_NEGOTIATED),
    (QMPState.COMMAND_MODE, InputKind.QMP_CAPABILITIES):
        (QMPState.COMMAND_MODE, Action.REFUSE_ALREADY_NEGOTIATED),
    (QMPState.COMMAND_MODE, InputKind.OTHER_COMMAND):
        (QMPState.COMMAND_MODE, Action.DISPATCH),
}

NOT_NEGOTIATED_DESC = "Expecting capabilities negotiation with 'qmp_capabilities'"
ALREADY_NEGOTIATED_DESC = "Capabilities negotiation is already complete, command ignored"

QMP_CAPABILITIES_SCHEMA: Schema = {"*enable": [EnumType("QMPCapability", KNOWN_CAPABILITIES)]}


def negotiation_step(state: QMPState, kind: InputKind) -> tuple[QMPState, Action]:
    """Look the pair up in :data:`NEGOTIATION_TABLE`; a pair not in it raises :class:`StateError`."""
    try:
        return NEGOTIATION_TABLE[(state, kind)]
    except KeyError:
        raise StateError(
            f"QMP connection in state {getattr(state, 'value', state)!r} has no rule for input "
            f"{getattr(kind, 'value', kind)!r}",
            state=str(getattr(state, "value", state)),
            action=str(getattr(kind, "value", kind)),
        ) from None


@dataclass(frozen=True)
class Command:
    """A well-formed request for the caller to dispatch (command mode only).

    ``arguments`` is the raw object (``{}`` when absent): validate it with the command's schema.
    ``id`` is the client's id, or :data:`NO_ID`; pass it to :func:`reply_return` / :func:`reply_exception`.
    """

    name: str
    arguments: dict[str, Any]
    id: Any = NO_ID
    oob: bool = False


@dataclass(frozen=True)
class Rejected:
    """Input the core answered itself with an error; send ``reply``.  ``error.qmp_class`` and ``str(error)``
    are the QMP class and desc."""

    error: Exception
    id: Any = NO_ID
    reply: bytes = field(default=b"", repr=False)


@dataclass(frozen=True)
class Negotiated:
    """``qmp_capabilities`` succeeded: the connection is in command mode now; send ``reply``."""

    capabilities: tuple[str, ...]
    id: Any = NO_ID
    reply: bytes = field(default=b"", repr=False)


QMPEvent = Command | Rejected | Negotiated


def _rejected(error: Exception, id: Any = NO_ID) -> Rejected:  # noqa: A002
    return Rejected(error, id, reply_exception(error, id))


class QMPConnectionCore:
    """One QMP connection's protocol state: JSON framing, request checks and capabilities negotiation.

    Not thread-safe: one reader thread feeds it.  :attr:`events_enabled` may be read from other threads.
    """

    def __init__(
        self,
        *,
        capabilities: Sequence[str] = (),
        max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
        max_nesting: int = DEFAULT_MAX_NESTING,
    ):
        unknown = [cap for cap in capabilities if cap not in KNOWN_CAPABILITIES]
        if unknown:
            raise ValueError(f"unknown QMP capabilities offered: {unknown}")
        self.capabilities_offered: tuple[str, ...] = tuple(capabilities)
        self.capabilities_enabled: frozenset[str] = frozenset()
        self.state = QMPState.CAPABILITIES_NEGOTIATION
        self._json = JSONStreamParser(max_message_size=max_message_size, max_nesting=max_nesting)

    @property
    def max_message_size(self) -> int:
        """Bytes one message may take on the wire (settable; applies from the next byte)."""
        return self._json.max_message_size

    @max_message_size.setter
    def max_message_size(self, value: int) -> None:
        if value < 1:
            raise ValueError("max_message_size must be positive")
        self._json.max_message_size = value

    @property
    def max_nesting(self) -> int:
        """Deepest nesting of arrays and objects one message may use (settable)."""
        return self._json.max_nesting

    @max_nesting.setter
    def max_nesting(self, value: int) -> None:
        if value < 1:
            raise ValueError("max_nesting must be positive")
        self._json.max_nesting = value

    @property
    def events_enabled(self) -> bool:
        """Asynchronous events are delivered only after negotiation (QMP spec)."""
        return self.state is QMPState.COMMAND_MODE

    def receive_data(self, data: bytes) -> list[QMPEvent]:
        """Feed bytes as they arrive; returns the requests and self-answered inputs that completed."""
        events: list[QMPEvent] = []
        for item in self._json.feed(data):
            if isinstance(item, JSONValue):
                events.append(self._handle_request(item.value))
            else:
                events.append(_rejected(item))
        return events

    def _check_request(self, request: dict[str, Any]) -> tuple[str, bool]:
        """qmp_dispatch_check_obj: returns (command name, out-of-band?)."""
        allow_oob = "oob" in self.capabilities_enabled
        exec_key: str | None = None
        for member, value in request.items():
            if member == "execute" or (member == "exec-oob" and allow_oob):
                if not isinstance(value, str):
                    raise GenericError(f"QMP input member '{member}' must be a string")
                if exec_key is not None:
                    raise GenericError(f"QMP input member '{member}' clashes with '{exec_key}'")
                exec_key = member
            elif member == "arguments":
                if not isinstance(value, dict):
                    raise GenericError("QMP input member 'arguments' must be an object")
            elif member != "id":
                raise GenericError(f"QMP input member '{as_c_string(member)}' is unexpected")
        if exec_key is None:
            raise GenericError("QMP input lacks member 'execute'")
        return request[exec_key], exec_key == "exec-oob"

    def _handle_request(self, request: Any) -> QMPEvent:
        if not isinstance(request, dict):
            return _rejected(GenericError("QMP input must be a JSON object"))
        request_id = request.get("id", NO_ID)
        try:
            name, oob = self._check_request(request)
        except GenericError as exc:
            return _rejected(exc, request_id)
        arguments = request.get("arguments", {})
        kind = InputKind.QMP_CAPABILITIES if name == "qmp_capabilities" else InputKind.OTHER_COMMAND
        next_state, action = negotiation_step(self.state, kind)
        if action is Action.DISPATCH:
            return Command(name, arguments, request_id, oob)
        if action is Action.REFUSE_NOT_NEGOTIATED:
            return _rejected(CommandNotFound(NOT_NEGOTIATED_DESC), request_id)
        try:
            if oob:
                raise GenericError(f"The command {name} does not support OOB")
            checked = validate_arguments(QMP_CAPABILITIES_SCHEMA, arguments)
            if action is Action.REFUSE_ALREADY_NEGOTIATED:
                raise CommandNotFound(ALREADY_NEGOTIATED_DESC)
            requested = checked.get("enable", [])
            unavailable = [cap for cap in requested if cap not in self.capabilities_offered]
            if unavailable:
                raise GenericError(f"Capability {', '.join(unavailable)} not available")
        except (GenericError, CommandNotFound) as exc:
            return _rejected(exc, request_id)
        enable = tuple(dict.fromkeys(requested))
        self.capabilities_enabled = frozenset(enable)
        self.state = next_state
        logger.debug("QMP capabilities negotiated: %s", enable)
        return Negotiated(enable, request_id, reply_return({}, request_id))
