"""What a guest may read back after a crash, and a libnbd client that feeds that model.

The model keeps every guest request that changes data (write, zero, trim of whole clusters) as an ``Op`` with
the bytes it leaves behind.  An op becomes *durable* when a FLUSH that was sent after the op's reply returns,
or when its own reply returns if it was sent with FUA.  After a crash each byte must hold either the value the
durable ops give it (applied in order over the initial content) or the value of some op that is not durable
(sent, maybe even unanswered, but never covered by a flush).  That is the NBD contract, no more: a crash may
keep or drop each unflushed write, independently, and may tear it.

Clients own disjoint stripes of the disk, so ops that overlap come from one connection, one after another,
and "applied in order" is well defined.  Ids grow in the order ops are sent.
"""

from __future__ import annotations

import dataclasses
import random
import threading
from collections.abc import Callable, Iterable
from typing import ClassVar

import nbd
import numpy as np


@dataclasses.dataclass
class Op:
    id: int
    kind: str  # write, zero, trim
    offset: int
    data: np.ndarray  # uint8, what the range reads as afterwards
    fua: bool
    done: bool = False


class GuestModel:
    def __init__(self, initial: bytes):
        self.initial = np.frombuffer(initial, dtype=np.uint8).copy()
        self.current = bytearray(initial)  # what a read must return now (server alive)
        self.ops: list[Op] = []
        self.durable: set[int] = set()
        self.lock = threading.Lock()
        self.flushes = 0

    @property
    def size(self) -> int:
        return len(self.initial)

    def begin(self, kind: str, offset: int, data: bytes | None, length: int, fua: bool) -> Op:
        """Record a request about to be sent (it may land even if its reply never comes)."""
        arr = np.frombuffer(data, dtype=np.uint8).copy() if data is not None else np.zeros(length, np.uint8)
        with self.lock:
            op = Op(len(self.ops), kind, offset, arr, fua)
            self.ops.append(op)
        return op

    def done(self, op: Op) -> list[int]:
        """The reply came; returns the ids made durable by it (the op itself for FUA)."""
        with self.lock:
            op.done = True
            self.current[op.offset : op.offset + len(op.data)] = op.data.tobytes()
            if op.fua:
                self.durable.add(op.id)
                return [op.id]
        return []

    def flush_begin(self) -> list[int]:
        """Ids a FLUSH sent now will cover: every answered op."""
        with self.lock:
            return [op.id for op in self.ops if op.done and op.id not in self.durable]

    def flush_done(self, ids: Iterable[int]) -> None:
        with self.lock:
            self.durable.update(ids)
            self.flushes += 1

    # --- after the crash ---------------------------------------------------------------------------

    def expected(self, durable: Iterable[int]) -> np.ndarray:
        out = self.initial.copy()
        for i in sorted(durable):
            op = self.ops[i]
            out[op.offset : op.offset + len(op.data)] = op.data
        return out

    def violation(self, got: bytes, durable: Iterable[int] | None = None) -> str | None:
        """None if ``got`` (the whole disk after a crash) is allowed, else a description of the first bad byte."""
        durable = set(self.durable if durable is None else durable)
        exp = self.expected(durable)
        img = np.frombuffer(got, dtype=np.uint8)
        if len(img) != len(exp):
            return f"disk is {len(img)} bytes, expected {len(exp)}"
        ok = img == exp
        if ok.all():
            return None
        for op in self.ops:
            if op.id not in durable:
                end = op.offset + len(op.data)
                ok[op.offset : end] |= img[op.offset : end] == op.data
        bad = np.flatnonzero(~ok)
        if not bad.size:
            return None
        at = int(bad[0])
        touching = [(op.id, op.kind, op.offset, len(op.data), op.fua, op.done, op.id in durable)
                    for op in self.ops if op.offset <= at < op.offset + len(op.data)]
        return (f"{bad.size} bytes hold a value no durable or pending write gave them; first at {at:#x}: "
                f"{img[at]:#04x}, durable value {exp[at]:#04x}, initial {self.initial[at]:#04x}; "
                f"ops over it (id, kind, offset, length, fua, answered, durable): {touching[-6:]}")


class GuestClient:
    """One libnbd connection doing random mixed requests inside its own stripes, recorded in the model.

    ``on_durable(text)`` is called after a FLUSH or a FUA request returns, with the ids it made durable (the
    power-loss test appends it to the I/O log as a marker).
    """

    WEIGHTS: ClassVar[dict[str, int]] = {"write": 6, "fua_write": 1, "zero": 2, "trim": 1, "flush": 1, "read": 2}

    def __init__(self, uri: str, model: GuestModel, stripes: list[int], stripe_size: int, cluster_size: int,
                 rng: random.Random, on_durable: Callable[[str], None] | None = None):
        self.h = nbd.NBD()
        self.h.connect_uri(uri)
        self.model = model
        self.stripes = stripes
        self.stripe_size = stripe_size
        self.cluster_size = cluster_size
        self.rng = rng
        self.on_durable = on_durable
        self.counts = dict.fromkeys(self.WEIGHTS, 0)
        self.errors: list[str] = []
        self.nbd_error: nbd.Error | None = None

    def _range(self, align: int = 1) -> tuple[int, int]:
        stripe = self.rng.choice(self.stripes) * self.stripe_size
        if align > 1:
            units = self.stripe_size // align
            count = self.rng.randint(1, min(units, 4))
            return stripe + self.rng.randrange(0, units - count + 1) * align, count * align
        length = self.rng.choice([1, 512, 4096, 4096, 5000, 65536, 100_000])
        length = min(length, self.stripe_size)
        return stripe + self.rng.randrange(0, self.stripe_size - length + 1), length

    def one(self) -> None:
        kind = self.rng.choices(list(self.WEIGHTS), list(self.WEIGHTS.values()))[0]
        self.counts[kind] += 1
        model = self.model
        if kind in ("write", "fua_write"):
            offset, length = self._range()
            data = self.rng.randbytes(length)
            fua = kind == "fua_write"
            op = model.begin("write", offset, data, length, fua)
            self.h.pwrite(data, offset, nbd.CMD_FLAG_FUA if fua else 0)
            self._done(op)
        elif kind == "zero":
            offset, length = self._range()
            fua = self.rng.random() < 0.2
            flags = (nbd.CMD_FLAG_NO_HOLE if self.rng.random() < 0.5 else 0) | (nbd.CMD_FLAG_FUA if fua else 0)
            op = model.begin("zero", offset, None, length, fua)
            self.h.zero(length, offset, flags)
            self._done(op)
        elif kind == "trim":
            # Whole clusters only: vdisk leaves partial clusters as they are; a trimmed whole cluster reads as
            # zeros (zero flag above a backing file, unallocated without one).
            offset, length = self._range(self.cluster_size)
            op = model.begin("trim", offset, None, length, False)
            self.h.trim(length, offset)
            self._done(op)
        elif kind == "flush":
            ids = model.flush_begin()
            self.h.flush()
            model.flush_done(ids)
            if self.on_durable is not None:
                self.on_durable(" ".join(map(str, ids)))
        else:
            offset, length = self._range()
            got = self.h.pread(length, offset)
            with model.lock:
                want = bytes(model.current[offset : offset + length])
            if got != want:
                self.errors.append(f"read {offset:#x}+{length:#x} differs from the model")

    def _done(self, op: Op) -> None:
        ids = self.model.done(op)
        if ids and self.on_durable is not None:
            self.on_durable(" ".join(map(str, ids)))

    def loop(self, stop: threading.Event, max_ops: int = 1 << 30) -> None:
        """Run until ``stop``, ``max_ops`` requests, or the server goes away (an nbd.Error, kept)."""
        try:
            for _ in range(max_ops):
                if stop.is_set():
                    break
                self.one()
        except nbd.Error as exc:
            self.nbd_error = exc
        except Exception as exc:  # noqa: BLE001 - reported by the test
            self.errors.append(f"{type(exc).__name__}: {exc}")

    def close(self) -> None:
        try:
            self.h.shutdown()
        except nbd.Error:
            pass


def split_stripes(n_stripes: int, n_clients: int, rng: random.Random) -> tuple[list[list[int]], list[int]]:
    """Stripes for each client and a share nobody writes (n_clients + 1 shares)."""
    stripes = list(range(n_stripes))
    rng.shuffle(stripes)
    shares = [sorted(stripes[i :: n_clients + 1]) for i in range(n_clients + 1)]
    return shares[:n_clients], shares[n_clients]
