"""Sizes as people write them (qemu-img's suffixes), shared by the CLI, HMP and the plugin's config."""

from __future__ import annotations

from vdisk.errors import OutOfRange

_SIZE_SUFFIX = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40, "p": 1 << 50}


def parse_size(text: str) -> int:
    """qemu-img style sizes: 512, 64k, 1M, 2G (binary multiples)."""
    t = text.strip().lower()
    if t.endswith("ib"):
        t = t[:-2]
    num, suffix = (t[:-1], t[-1]) if t and t[-1] in _SIZE_SUFFIX and t[-1].isalpha() else (t, "")
    multiplier = _SIZE_SUFFIX.get(suffix)
    if multiplier is None:
        raise OutOfRange(f"invalid size {text!r} (examples: 512, 64k, 1M, 2G)")
    if num.isdigit():
        return int(num) * multiplier  # exact: a float would round sizes past 2^53
    try:
        value = float(num) * multiplier
    except ValueError as exc:
        raise OutOfRange(f"invalid size {text!r} (examples: 512, 64k, 1M, 2G)") from exc
    if value < 0 or value != int(value):
        raise OutOfRange(f"invalid size {text!r}")
    return int(value)
