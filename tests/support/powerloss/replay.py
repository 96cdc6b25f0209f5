"""Power-loss states from a ``vdisk.io.iolog`` recording.

A recording is the image file's writes and fdatasyncs in the order they reached the OS (see vdisk.io.iolog),
plus markers the test appended when a guest FLUSH or FUA request returned.  A power loss after fdatasync
number ``k`` returned (``k = -1``: before the first one) leaves:

* every write recorded before sync ``k``, in order, over the file as it was when recording started;
* any subset of the writes recorded after it and before sync ``k + 1`` (a later write cannot land without
  the earlier ones only if an fdatasync separates them), each torn at 4 KiB sectors: the units of the subset
  are sector-aligned pieces of writes, as a disk may persist some sectors of a large write and not others.

The guest's guarantees at that point: every op named by a marker recorded before sync ``k + 1`` is durable (a
marker is appended after the reply, which came after the flush's last fdatasync, so that fdatasync is sync
``k`` or earlier).
"""

from __future__ import annotations

import dataclasses
import os
import random
from collections.abc import Iterator

from vdisk.io import iolog

SECTOR = 4096


@dataclasses.dataclass
class Epoch:
    """What happened between sync ``index`` and sync ``index + 1``."""

    index: int  # -1 before the first sync
    units: list[tuple[int, bytes]]  # sector pieces of the writes, in order
    durable: frozenset[int]  # guest op ids durable from this epoch's start on (markers recorded before its end)
    writes: int  # whole writes recorded in this epoch


class Recording:
    def __init__(self, log_path: str, image_path: str):
        self.image_path = os.path.realpath(image_path)
        self.epochs: list[Epoch] = []
        self.other_files: set[str] = set()
        self.markers = 0
        units: list[tuple[int, bytes]] = []
        durable: set[int] = set()
        writes = 0
        for record in iolog.read(log_path):
            op = record["op"]
            if op == "m":
                self.markers += 1
                durable.update(int(x) for x in record["text"].split())
                continue
            if record["file"] != self.image_path:
                self.other_files.add(record["file"])
                continue
            if op == "w":
                writes += 1
                units.extend(_sectors(record["offset"], record["bytes"]))
            elif op == "s":
                self.epochs.append(Epoch(len(self.epochs) - 1, units, frozenset(durable), writes))
                units, writes = [], 0
        self.epochs.append(Epoch(len(self.epochs) - 1, units, frozenset(durable), writes))

    def epochs_writing(self, offset: int, length: int, around: int = 1) -> list[int]:
        """Indexes of the epochs with a write into [offset, offset+length) of the file, and ``around`` each side."""
        hit = {i for i, e in enumerate(self.epochs) if any(o < offset + length and offset < o + len(d)
                                                            for o, d in e.units)}
        return sorted({j for i in hit for j in range(i - around, i + around + 1) if 0 <= j < len(self.epochs)})

    @property
    def syncs(self) -> int:
        return len(self.epochs) - 1

    @property
    def writes(self) -> int:
        return sum(e.writes for e in self.epochs)

    def states(self, initial: bytes, rng: random.Random, *, subsets: int = 2, singles: int = 0,
               epochs: list[int] | None = None) -> Iterator[tuple[Epoch, str, bytearray]]:
        """(epoch, subset description, file content) for the power-loss states of the chosen epochs.

        For each epoch: nothing of it, all of it, ``subsets`` random subsets of its units (half of the first
        one of them holds exactly one unit: the smallest step past the barrier), and for epochs of at most
        ``singles`` units each unit alone: a pointer that reached the disk without what it points to shows up
        there for certain (metadata phases have a few units; bulk data, whose units alone prove little, many).
        """
        wanted = set(range(len(self.epochs)) if epochs is None else epochs)
        base = bytearray(initial)
        for number, epoch in enumerate(self.epochs):
            if number in wanted:
                units = _effective(base, epoch.units)
                n = len(units)
                # "none" is the previous epoch's "all": only needed when that one is not replayed.
                choices: list[tuple[str, list[int]]] = [("none", [])] if number - 1 not in wanted else []
                if n:
                    choices.append(("all", list(range(n))))
                seen = {(), tuple(range(n))}
                if 1 < n <= singles:
                    for i in range(n):
                        seen.add((i,))
                        choices.append((f"unit {i} alone of {n}", [i]))
                for s in range(subsets if n > 1 else 0):
                    if s == 0 and rng.random() < 0.5:
                        pick = [rng.randrange(n)]
                    else:
                        pick = [i for i in range(n) if rng.random() < 0.5]
                    if tuple(pick) not in seen:
                        seen.add(tuple(pick))
                        choices.append((f"units {_short(pick)} of {n}", pick))
                for text, pick in choices:
                    image = bytearray(base)
                    for i in pick:
                        _apply(image, *units[i])
                    yield epoch, text, image
            for unit in epoch.units:
                _apply(base, *unit)


def _effective(base: bytearray, units: list[tuple[int, bytes]]) -> list[tuple[int, bytes]]:
    """The units that matter: one that rewrites bytes the file already holds, and that no other unit of the
    epoch overlaps, leaves the same file whether it lands or not (a table write changes a sector or two)."""
    order = sorted(range(len(units)), key=lambda i: units[i][0])
    shared: set[int] = set()
    active: list[tuple[int, int]] = []  # (end, index) of the units the sweep is inside
    for i in order:
        offset, data = units[i]
        active = [(end, j) for end, j in active if end > offset]
        for _, j in active:
            shared.update((i, j))
        active.append((offset + len(data), i))
    return [(offset, data) for i, (offset, data) in enumerate(units)
            if i in shared or bytes(base[offset : offset + len(data)]) != data]


def _sectors(offset: int, data: bytes) -> Iterator[tuple[int, bytes]]:
    pos = 0
    while pos < len(data):
        stop = min(len(data), (offset + pos) // SECTOR * SECTOR + SECTOR - offset)
        yield offset + pos, data[pos:stop]
        pos = stop


def _apply(image: bytearray, offset: int, data: bytes) -> None:
    end = offset + len(data)
    if end > len(image):
        image.extend(bytes(end - len(image)))
    image[offset:end] = data


def _short(pick: list[int]) -> str:
    return ",".join(map(str, pick)) if len(pick) <= 8 else f"{','.join(map(str, pick[:8]))},... ({len(pick)})"
