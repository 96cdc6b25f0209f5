"""Random hostile NBD sessions on a raw socket, against a served export, with a model of the disk.

Used by ``tests/test_fuzz_nbd.py`` (a short seeded run in CI) and ``fuzz/run_nbd.py`` (long runs).

Each session is a handshake, correct or mutated, and, if it reaches transmission, a burst of requests whose
fields come from a list of interesting values (0, 1, the end of the disk, 64 MiB +- 1, 2^32 - 1, 2^63, ...)
or at random: unknown commands and flags, bad magic, write payloads shorter than announced.  The generator
knows what it sent, so it knows which outcome the spec allows: a reply (success or one of the spec's errors)
to every complete request, a disconnect only after what the server may treat as fatal (bad magic, a payload it
cannot skip, a truncated message followed by our close).  A hang is a failure (the socket has a timeout).

The model: requests that could change data and lie inside the disk are moved into two windows (the first and
last 2 MiB), so the model only has to cover those.  Successful writes and zeroes update it; a successful trim
makes its range unknown (partial clusters keep their data, whole ones read as zeros).  Reads that succeed
must equal the model wherever it is known.
"""

from __future__ import annotations

import dataclasses
import random
import struct

import numpy as np

from fuzz import nbd_wire as w

MiB = 1 << 20
WINDOW = 2 * MiB
MAX_REQUEST = 64 * MiB  # nbdkit's MAX_REQUEST_SIZE (server/internal.h)


class Model:
    """What the windows [0, WINDOW) and [size - WINDOW, size) must read as; ``known`` masks trimmed bytes."""

    def __init__(self, size: int, head: bytes, tail: bytes):
        assert len(head) == len(tail) == WINDOW
        self.size = size
        self.data = {0: bytearray(head), size - WINDOW: bytearray(tail)}
        self.known = {0: bytearray(b"\1" * WINDOW), size - WINDOW: bytearray(b"\1" * WINDOW)}

    def window_of(self, offset: int, length: int) -> int | None:
        for start in self.data:
            if start <= offset and offset + length <= start + WINDOW:
                return start
        return None

    def apply(self, command: int, offset: int, payload: bytes, length: int) -> None:
        start = self.window_of(offset, length)
        assert start is not None, f"data-changing request {offset}+{length} outside the model's windows"
        lo, hi = offset - start, offset - start + length
        if command == w.CMD_WRITE:
            self.data[start][lo:hi] = payload
            self.known[start][lo:hi] = b"\1" * length
        elif command == w.CMD_WRITE_ZEROES:
            self.data[start][lo:hi] = bytes(length)
            self.known[start][lo:hi] = b"\1" * length
        elif command == w.CMD_TRIM:
            self.known[start][lo:hi] = bytes(length)

    def mismatch(self, offset: int, data: bytes) -> str | None:
        """None if ``data`` read at ``offset`` agrees with the model where the model knows; else where not."""
        for start, window in self.data.items():
            lo, hi = max(offset, start), min(offset + len(data), start + WINDOW)
            if lo >= hi:
                continue
            got = np.frombuffer(data, np.uint8)[lo - offset : hi - offset]
            want = np.frombuffer(window, np.uint8)[lo - start : hi - start]
            known = np.frombuffer(self.known[start], np.uint8)[lo - start : hi - start]
            bad = np.flatnonzero((got != want) & (known != 0))
            if bad.size:
                i = int(bad[0])
                return f"byte {lo + i}: read {got[i]:#x}, expected {want[i]:#x}"
        return None


@dataclasses.dataclass
class Stats:
    sessions: int = 0
    requests: int = 0
    replies: int = 0
    error_replies: int = 0
    disconnects: int = 0
    option_errors: int = 0


# --- interesting values ---------------------------------------------------------------------------------------


def _offset(rng: random.Random, size: int) -> int:
    return rng.choice([
        0, 1, 511, 512, 4096, 65535, 65536, size - 4096, size - 512, size - 1, size, size + 1, size + 4096,
        1 << 32, (1 << 63) - 1, 1 << 63, (1 << 64) - 1, (1 << 64) - 512, rng.randrange(size),
        rng.randrange(1 << 64),
    ])


def _length(rng: random.Random) -> int:
    return rng.choice([
        0, 1, 2, 511, 512, 4096, 65536, 65537, 1 * MiB, MAX_REQUEST - 1, MAX_REQUEST, MAX_REQUEST + 1,
        2 * MAX_REQUEST, 2 * MAX_REQUEST + 1, 1 << 31, (1 << 32) - 1, rng.randrange(1, 1 << 16),
        rng.randrange(1 << 32),
    ])


def _flags(rng: random.Random) -> int:
    return rng.choice([0, 0, 0, w.CMD_FLAG_FUA, w.CMD_FLAG_NO_HOLE, w.CMD_FLAG_DF, w.CMD_FLAG_REQ_ONE,
                       w.CMD_FLAG_FAST_ZERO, 1 << rng.randrange(16), rng.randrange(1 << 16)])


def _command(rng: random.Random) -> int:
    return rng.choice([w.CMD_READ] * 4 + [w.CMD_WRITE] * 4 + [w.CMD_WRITE_ZEROES, w.CMD_TRIM, w.CMD_FLUSH,
                      w.CMD_CACHE, w.CMD_BLOCK_STATUS, w.CMD_DISC, 8, 9, 0x7FFF, 0xFFFF, rng.randrange(1 << 16)])


def _odd_name(rng: random.Random) -> bytes:
    return rng.choice([
        b"", b"base:allocation", b"base:allocation\0", b"base:", b":", b"base:allocation" * 300,
        b"\xff\xfe\xfd", b"\xc0\x80", b"qemu:dirty-bitmap:" + bytes(rng.randrange(256) for _ in range(40)),
        b"x" * (w.MAX_STRING + 1), bytes(rng.randrange(256) for _ in range(rng.randrange(64))),
        "base:allocationé".encode(), b"base:*", b"\n\r\t",
    ])


# --- sessions --------------------------------------------------------------------------------------------------


def _handshake(rng: random.Random, wire: w.Wire, stats: Stats) -> bool:
    """A handshake with mutations; True if it reached transmission with structured replies or not."""
    wire.greeting()
    if rng.random() < 0.05:
        wire.client_flags(rng.choice([0xFFFFFFFF, 1 << 5, 4]))
        wire.wait_closed()  # unknown client flags: the server must close
        return False
    wire.client_flags()
    options = rng.randrange(0, 6)
    structured = False
    for _ in range(options):
        kind = rng.randrange(10)
        if kind == 0:  # an unknown option
            opt = rng.choice([0, 4, 11, 12, 0x7FFF, 1 << 31, 0xFFFFFFFF, rng.randrange(1 << 32)])
            data = bytes(rng.randrange(256) for _ in range(rng.randrange(16)))
            wire.option(opt, data)
            if opt not in (w.OPT_EXPORT_NAME, w.OPT_ABORT):
                stats.option_errors += any(r.is_error for r in wire.option_replies(opt))
        elif kind == 1:  # LIST with a payload it must not have
            data = b"" if rng.random() < 0.5 else b"junk"
            wire.option(w.OPT_LIST, data)
            stats.option_errors += any(r.is_error for r in wire.option_replies(w.OPT_LIST))
        elif kind in (2, 3):  # meta contexts with odd names, counts that may lie
            opt = rng.choice([w.OPT_LIST_META_CONTEXT, w.OPT_SET_META_CONTEXT])
            queries = tuple(_odd_name(rng) for _ in range(rng.randrange(4)))
            count = rng.choice([None, None, 0, len(queries) + 1, 0xFFFFFFFF])
            wire.option(opt, w.meta_context_data(_odd_name(rng) if rng.random() < 0.2 else b"", queries,
                                                 query_count=count))
            stats.option_errors += any(r.is_error for r in wire.option_replies(opt))
        elif kind == 4:  # INFO with bogus info requests and lying lengths
            infos = tuple(rng.choice([0, 1, 2, 3, 4, 0xFFFF, rng.randrange(1 << 16)]) for _ in range(rng.randrange(5)))
            data = w.go_data(b"", infos, name_length=rng.choice([None, None, 1, 1000, 0xFFFFFFFF]),
                             info_count=rng.choice([None, None, len(infos) + 3, 0xFFFF]))
            wire.option(w.OPT_INFO, data)
            stats.option_errors += any(r.is_error for r in wire.option_replies(w.OPT_INFO))
        elif kind == 5:
            wire.option(w.OPT_STRUCTURED_REPLY, b"" if rng.random() < 0.7 else b"x")
            replies = wire.option_replies(w.OPT_STRUCTURED_REPLY)
            structured = structured or replies[-1].reply_type == w.REP_ACK
        elif kind == 6:  # STARTTLS on a server without TLS
            wire.option(w.OPT_STARTTLS)
            stats.option_errors += any(r.is_error for r in wire.option_replies(w.OPT_STARTTLS))
        elif kind == 7:  # truncated option, then we leave
            length = rng.choice([100, MAX_REQUEST, MAX_REQUEST + 1, 0xFFFFFFFF])
            wire.option(rng.choice([w.OPT_GO, w.OPT_INFO, w.OPT_LIST]), b"\0" * rng.randrange(8), length=length)
            if length > MAX_REQUEST:
                wire.wait_closed()  # nbdkit refuses option data over 64 MiB at once
            return False
        elif kind == 8:  # bad option magic: the server must close
            wire.option(w.OPT_GO, w.go_data(), magic=rng.choice([0, IHAVEOPT_FLIPPED, rng.randrange(1 << 64)]))
            wire.wait_closed()
            return False
        else:  # GO with bogus info requests and odd names; may fail, then the session goes on
            infos = tuple(rng.choice([0, 3, 7, 0xFFFF]) for _ in range(rng.randrange(3)))
            name = rng.choice([b"", b"", b"\xff", b"x" * (w.MAX_STRING + 1), b"a\0b"])
            wire.option(w.OPT_GO, w.go_data(name, infos))
            replies = wire.option_replies(w.OPT_GO)
            if not replies[-1].is_error:
                wire.structured = structured
                return True
            stats.option_errors += 1
    wire.option(w.OPT_GO, w.go_data())
    replies = wire.option_replies(w.OPT_GO)
    if replies[-1].is_error:
        raise w.SpecViolation(f"plain GO refused: {replies}")
    wire.structured = structured
    return True


IHAVEOPT_FLIPPED = w.IHAVEOPT ^ 1


def _requests(rng: random.Random, wire: w.Wire, model: Model, stats: Stats) -> None:
    size = model.size
    for cookie in range(1, rng.randrange(2, 24)):
        if rng.random() < 0.4:  # a well-formed request: the plugin gets to run
            command = rng.choice([w.CMD_READ, w.CMD_READ, w.CMD_WRITE, w.CMD_WRITE, w.CMD_WRITE_ZEROES, w.CMD_TRIM,
                                  w.CMD_CACHE, w.CMD_FLUSH])
            length = rng.choice([1, 512, 4096, 65536, rng.randrange(1, 256 * 1024)])
            offset = rng.randrange(size - length + 1)
            flags = rng.choice([0, 0, w.CMD_FLAG_FUA]) if command != w.CMD_READ else 0
            if command == w.CMD_FLUSH:
                offset = length = flags = 0
        else:
            command, offset, length, flags = _command(rng), _offset(rng, size), _length(rng), _flags(rng)
        in_range = length > 0 and offset + length <= size
        changes_data = command in (w.CMD_WRITE, w.CMD_WRITE_ZEROES, w.CMD_TRIM)
        if changes_data and in_range:
            if length > WINDOW // 2:  # keep big in-range data changes out: just past the end instead
                offset = size - length + 1
            else:
                window = rng.choice(list(model.data))
                offset = window + rng.randrange(WINDOW - length + 1)
                if rng.random() < 0.5:
                    offset -= offset % 512
        if command == w.CMD_READ and in_range and length > 8 * MiB and rng.random() < 0.8:
            length = rng.randrange(1, 8 * MiB)  # big reads are valid and slow: keep a few
        stats.requests += 1
        if rng.random() < 0.02:  # bad request magic: the server must close
            wire.request(command, offset, length, flags=flags, cookie=cookie, magic=rng.randrange(1 << 32))
            wire.wait_closed()
            stats.disconnects += 1
            return
        if command == w.CMD_DISC:
            wire.request(command, offset, length, flags=flags, cookie=cookie)
            wire.wait_closed()
            return
        payload = b""
        if command == w.CMD_WRITE:
            if length > 2 * MAX_REQUEST:  # more than nbdkit skips: it closes without reading it
                wire.request(command, offset, length, flags=flags, cookie=cookie)
                wire.wait_closed()
                stats.disconnects += 1
                return
            if length > 4 * MiB or (length and rng.random() < 0.03):  # announce, send part of it, leave
                wire.request(command, offset, length, flags=flags, cookie=cookie,
                             payload=bytes(rng.randrange(min(length, 4096))))
                return
            payload = rng.randbytes(length)
        wire.request(command, offset, length, flags=flags, cookie=cookie, payload=payload)
        is_read = command == w.CMD_READ
        reply = wire.reply(cookie, offset if is_read else 0, length if is_read else 0)
        stats.replies += 1
        if reply.error:
            stats.error_replies += 1
            continue
        if changes_data:
            model.apply(command, offset, payload, length)
        elif is_read:
            problem = model.mismatch(offset, reply.data)
            if problem:
                raise AssertionError(f"read {offset}+{length} disagrees with the model: {problem}")


def session(path: str, rng: random.Random, model: Model, stats: Stats, timeout: float = 15.0) -> None:
    """One random session; raises on a spec violation or a hang, returns on any allowed outcome."""
    stats.sessions += 1
    with w.Wire(path, timeout) as wire:
        if _handshake(rng, wire, stats):
            _requests(rng, wire, model, stats)


def pack_u64(value: int) -> bytes:
    return struct.pack(">Q", value)
