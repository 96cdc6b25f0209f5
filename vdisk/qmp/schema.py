"""QMP argument schemas and their check, with the wording of QEMU's QObject input visitor.

A command declares its arguments as a :data:`Schema` (member name -> type, ``*`` marking an optional member,
the QAPI schema convention); :func:`validate_arguments` checks what a client sent against it as QEMU's
generated marshallers do (qapi/qobject-input-visitor.c, qapi/qapi-visit-core.c): members in schema order
first (missing, then wrong type), then unexpected members, each refused with QEMU's text.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from vdisk.errors import InvalidArgument
from vdisk.qmp.json_parser import INT64_MAX, INT64_MIN, UINT64_MAX


def as_c_string(text: str) -> str:
    """How QEMU shows a client's string in a message: formatted with ``%s``, so a NUL ends it."""
    return text.split("\x00", 1)[0]


@dataclass(frozen=True)
class EnumType:
    """A QAPI enum: a string from a fixed set (``name`` is only for documentation)."""

    name: str
    values: tuple[str, ...]


#: A member type: "str", "int" (int64), "uint64"/"size", "bool", "number", "any", an :class:`EnumType`,
#: a one-element list ``[T]`` for an array of T, or a nested schema mapping for an object.
ArgType = Any
Schema = Mapping[str, ArgType]
"""Member name -> type; a leading ``*`` marks the member optional (the QAPI schema convention)."""


def _join_name(parent: str | None, name: str) -> str:
    return f"{parent}.{name}" if parent else name


def _type_error(full_name: str, expected: str) -> InvalidArgument:
    return InvalidArgument(f"Invalid parameter type for '{full_name}', expected: {expected}")


def _check_value(arg_type: ArgType, value: Any, full_name: str, short_name: str | None) -> Any:
    """One value against one type; returns the value as the command should see it."""
    if isinstance(arg_type, EnumType):
        if not isinstance(value, str):
            raise _type_error(full_name, "string")
        if value not in arg_type.values:
            # QEMU names the member, not its path, and says 'null' for list elements
            raise InvalidArgument(
                f"Parameter '{short_name if short_name is not None else 'null'}' does not accept value "
                f"'{as_c_string(value)}'"
            )
        return value
    if isinstance(arg_type, list):
        if len(arg_type) != 1:
            raise TypeError(f"a list type has exactly one element type, not {arg_type!r}")
        if not isinstance(value, list):
            raise _type_error(full_name, "array")
        return [_check_value(arg_type[0], item, f"{full_name}[{index}]", None) for index, item in enumerate(value)]
    if isinstance(arg_type, Mapping):
        if not isinstance(value, dict):
            raise _type_error(full_name, "object")
        return _check_struct(arg_type, value, full_name)
    if arg_type == "any":
        return value
    if arg_type == "str":
        if not isinstance(value, str):
            raise _type_error(full_name, "string")
        return value
    if arg_type == "bool":
        if not isinstance(value, bool):
            raise _type_error(full_name, "boolean")
        return value
    if arg_type == "int":
        if isinstance(value, bool) or not isinstance(value, int) or not INT64_MIN <= value <= INT64_MAX:
            raise _type_error(full_name, "integer")
        return value
    if arg_type in ("uint64", "size"):
        if isinstance(value, bool) or not isinstance(value, int) or not INT64_MIN <= value <= UINT64_MAX:
            raise InvalidArgument(f"Parameter '{full_name}' expects uint64")
        return value & UINT64_MAX  # QEMU accepts negative int64 "for backward compatibility" and wraps it
    if arg_type == "number":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _type_error(full_name, "number")
        return float(value)
    raise TypeError(f"unknown QMP argument type {arg_type!r}")


def _check_struct(schema: Schema, obj: Mapping[str, Any], parent: str | None) -> dict[str, Any]:
    result: dict[str, Any] = {}
    unvisited = dict.fromkeys(obj)
    for declared, arg_type in schema.items():
        optional = declared.startswith("*")
        name = declared[1:] if optional else declared
        if name not in obj:
            if optional:
                continue
            raise InvalidArgument(f"Parameter '{_join_name(parent, name)}' is missing")
        result[name] = _check_value(arg_type, obj[name], _join_name(parent, name), name)
        del unvisited[name]
    for name in unvisited:
        raise InvalidArgument(f"Parameter '{as_c_string(_join_name(parent, name))}' is unexpected")
    return result


def validate_arguments(schema: Schema, arguments: Mapping[str, Any]) -> dict[str, Any]:
    """Check ``arguments`` against ``schema`` as QEMU's generated marshaller does, members in schema order
    first (missing, then wrong type), then unexpected members.  Returns a new dict with the members that
    were given ("uint64" values wrapped to unsigned, "number" values as float).  Raises
    :class:`~vdisk.errors.InvalidArgument` (class GenericError) with QEMU's wording, e.g.
    "Parameter 'device' is missing", "Invalid parameter type for 'speed', expected: integer",
    "Parameter 'x' is unexpected".
    """
    return _check_struct(schema, arguments, None)

