"""The nbdkit plugin's configuration keys, written once: :data:`KEYS` makes nbdkit's command line
(:func:`plugin_arguments`, for ``vdisk serve``), reads what nbdkit hands the plugin's ``config`` callback
(:class:`PluginConfigParser`) and writes the plugin's ``--help`` (:func:`config_help`).

A key's value is typed by its :class:`ValueKind`, which says how the text is read and how a value is written
back; each key names the :class:`PluginConfig` field it sets (``cache.*``: a field of its
:class:`~vdisk.formats.qcow2.cache.CacheOptions`).  The command line carries a key only when its value is not
the default (and always carries the required ``image``), so what the plugin reads back equals what the
launcher meant.
"""

from __future__ import annotations

import dataclasses
import enum
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from vdisk.errors import GenericError
from vdisk.formats.qcow2.cache import CacheOptions
from vdisk.units import parse_size

_CACHE_PREFIX = "cache."
_TRUE = {"1", "true", "on", "yes"}


@dataclass(frozen=True)
class PluginConfig:
    """What the plugin was told to serve, and how."""

    image: str | None = None  # required: the parser refuses to complete without it
    format: str | None = None
    device: str = "drive0"
    read_only: bool = False
    copy_on_read: bool = False
    qmp: str | None = None
    description: str | None = None
    allow_backing_dirs: tuple[str, ...] = ()  # backing files must lie below one of these (empty: anywhere)
    serialize: bool = True
    cache: CacheOptions = CacheOptions()
    stop_fd: int | None = None  # the read end of the pipe `vdisk serve` closes to stop the plugin


class ValueKind(enum.Enum):
    PATH = "path"  # made absolute, so nbdkit and the plugin agree whatever directory each runs in
    TEXT = "text"
    BOOL = "bool"  # 1/true/on/yes are true, anything else false
    SIZE = "size"  # bytes, with qemu-img's suffixes
    SECONDS = "seconds"  # a whole number
    FD = "fd"  # a file descriptor number


def _whole_number(what: str) -> Callable[[str, str], int]:
    def read(key: str, text: str) -> int:
        try:
            return int(text)
        except ValueError:
            raise GenericError(f"{key} must be {what}, not {text!r}") from None

    return read


# kind -> (read the text of key=text, write a value back as text)
_CODECS: dict[ValueKind, tuple[Callable[[str, str], Any], Callable[[Any], str]]] = {
    ValueKind.PATH: (lambda key, text: os.path.abspath(text), os.path.abspath),
    ValueKind.TEXT: (lambda key, text: text, str),
    ValueKind.BOOL: (lambda key, text: text.lower() in _TRUE, lambda value: "true" if value else "false"),
    ValueKind.SIZE: (lambda key, text: parse_size(text), str),
    ValueKind.SECONDS: (_whole_number("a whole number of seconds"), str),
    ValueKind.FD: (_whole_number("a file descriptor number"), str),
}


@dataclass(frozen=True)
class ConfigKey:
    name: str  # as nbdkit passes it: name=value
    field: str  # the PluginConfig field it sets; "cache.x" is CacheOptions' field x
    kind: ValueKind
    metavar: str
    help: str
    required: bool = False
    repeatable: bool = False  # each occurrence adds one item to a tuple field


KEYS: tuple[ConfigKey, ...] = (
    ConfigKey("image", "image", ValueKind.PATH, "PATH", "the active image of the chain to serve", required=True),
    ConfigKey("format", "format", ValueKind.TEXT, "qcow2|raw", "its format (probed if not given)"),
    ConfigKey("device", "device", ValueKind.TEXT, "NAME", "the block device name used by QMP (default drive0)"),
    ConfigKey("readonly", "read_only", ValueKind.BOOL, "BOOL", "open the image read-only"),
    ConfigKey("copy-on-read", "copy_on_read", ValueKind.BOOL, "BOOL",
              "guest reads fill the active image from its backing chain"),
    ConfigKey("qmp", "qmp", ValueKind.PATH, "PATH", "a QMP-compatible control socket (unix)"),
    ConfigKey("description", "description", ValueKind.TEXT, "TEXT", "the NBD export description"),
    ConfigKey("allow-backing-dir", "allow_backing_dirs", ValueKind.PATH, "DIR",
              "backing files must lie below DIR (repeatable)", repeatable=True),
    ConfigKey("serialize", "serialize", ValueKind.BOOL, "BOOL",
              "one request at a time across all connections (default) or parallel"),
    ConfigKey("cache-size", "cache.cache_size", ValueKind.SIZE, "SIZE",
              "qcow2 L2 + refcount cache, as QEMU's cache-size (per qcow2 node)"),
    ConfigKey("l2-cache-size", "cache.l2_cache_size", ValueKind.SIZE, "SIZE",
              "qcow2 L2 cache (default: covers the disk, at most 32M)"),
    ConfigKey("refcount-cache-size", "cache.refcount_cache_size", ValueKind.SIZE, "SIZE",
              "qcow2 refcount cache (default: 4 clusters)"),
    ConfigKey("cache-clean-interval", "cache.cache_clean_interval", ValueKind.SECONDS, "SECONDS",
              "drop cache entries unused this long (default 600, 0 = never)"),
    ConfigKey("stop-fd", "stop_fd", ValueKind.FD, "FD", "(set by vdisk serve) stop serving when this pipe closes"),
)
_BY_NAME = {key.name: key for key in KEYS}
_DEFAULTS = PluginConfig()


def _field_value(config: PluginConfig, field: str) -> Any:
    if field.startswith(_CACHE_PREFIX):
        return getattr(config.cache, field.removeprefix(_CACHE_PREFIX))
    return getattr(config, field)


def plugin_arguments(config: PluginConfig) -> list[str]:
    """The ``key=value`` words of nbdkit's command line that give the plugin ``config``."""
    words: list[str] = []
    for key in KEYS:
        value = _field_value(config, key.field)
        write = _CODECS[key.kind][1]
        if key.repeatable:
            words += [f"{key.name}={write(item)}" for item in value]
        elif key.required or value != _field_value(_DEFAULTS, key.field):
            words.append(f"{key.name}={write(value)}")
    return words


class PluginConfigParser:
    """Reads nbdkit's ``key=value`` pairs one by one (the ``config`` callback), then checks them as a whole
    (``config_complete``).  A key given twice keeps its last value; a repeatable key keeps every one."""

    def __init__(self) -> None:
        self._values: dict[str, Any] = {}  # PluginConfig field (or "cache.x") -> value

    def add(self, name: str, text: str) -> None:
        key = _BY_NAME.get(name)
        if key is None:
            raise GenericError(f"unknown parameter {name!r}; known: {', '.join(_BY_NAME)}")
        value = _CODECS[key.kind][0](name, text)
        if key.repeatable:
            value = (*self._values.get(key.field, ()), value)
        self._values[key.field] = value

    def complete(self) -> PluginConfig:
        """The configuration; refuses a missing required key, and cache settings QEMU would refuse."""
        for key in KEYS:
            if key.required and key.field not in self._values:
                raise GenericError(f"{key.name}={key.metavar} is required")
        fields = {name: value for name, value in self._values.items() if not name.startswith(_CACHE_PREFIX)}
        cache = {name.removeprefix(_CACHE_PREFIX): value for name, value in self._values.items()
                 if name.startswith(_CACHE_PREFIX)}
        return dataclasses.replace(_DEFAULTS, **fields, cache=CacheOptions(**cache))


def config_help() -> str:
    """nbdkit's ``--help`` text for the plugin: one line per key."""
    lines = []
    for key in KEYS:
        usage = f"{key.name}={key.metavar}"
        lines.append(f"{usage:<18}  {'(required) ' if key.required else ''}{key.help}")
    return "\n".join(lines)
