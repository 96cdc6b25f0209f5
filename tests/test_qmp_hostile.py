"""Hostile QMP clients against a real `vdisk serve --qmp`: broken JSON, wrong types for every argument of every
command, unknown commands, many clients connecting and vanishing while a stream runs, clients that never read.

Allowed: error replies (one per bad request, with QEMU's classes), dropping the offending client.  Not allowed:
a crash, a traceback or an "internal error" from the monitor, a job that stalls or dies, other clients that
stop getting replies or events.  Raw sockets (``fuzz.qmp_wire``): qemu.qmp cannot send broken input.
"""

from __future__ import annotations

import contextlib
import random
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import nbd
import pytest

from fuzz.qmp_wire import RawQmp
from tests.support.images import assert_clean, qemu_img_compare, qemu_raw
from tests.support.serving import Served, serve
from vdisk.qmp.commands import COMMANDS
from vdisk.qmp.schema import EnumType

pytestmark = pytest.mark.timeout(120)

MiB = 1 << 20
STREAM_SPEED = 4 * MiB  # bytes/s: the chain4 stream then runs for about a second, long enough to be hit


@contextlib.contextmanager
def monitored(image: Path) -> Iterator[tuple[Served, list[str]]]:
    """`vdisk serve --qmp` with its stderr drained; afterwards it exited 0 and logged no traceback."""
    lines: list[str] = []
    with serve(image, qmp=True) as served:
        drain = threading.Thread(target=lambda: lines.extend(served.proc.stderr), daemon=True)
        drain.start()
        yield served, lines
        assert served.proc.poll() is None, "".join(lines)[-3000:]
    drain.join(30)
    log = "".join(lines)
    assert served.proc.returncode == 0, log[-3000:]
    for bad in ("Traceback", "internal error", "QMP command"):  # dispatch logs "QMP command X failed" on a bug
        assert bad not in log, log[-5000:]


def nbd_reads(served: Served, expected: bytes) -> None:
    h = nbd.NBD()
    h.connect_unix(str(served.socket))
    try:
        assert h.pread(len(expected), 0) == expected
    finally:
        h.shutdown()


# --- broken input ------------------------------------------------------------------------------------------------

BROKEN = [
    b"{", b"}", b"]", b"[[[", b"{]", b'{"execute"}', b'{"execute": }', b'{"execute": "query-jobs",}',
    b'{"execute" "query-jobs"}', b"{'execute': 'query-jobs'", b'{"execute": nul}', b'{"execute": tru}',
    b'{"execute": "query-jobs", "execute": "quit"}', b'{"execute": "\\x"}', b'{"execute": "\\ud800"}',
    b'{"execute": "\xff\xfe"}', b'{"execute": "\xc0\xaf"}', b'{"execute": 1e999999}', b"01", b"-", b"1.", b"1e",
    b"\x00", b"\xff", b"\x1b[A", b'"unterminated', b"'", b"null", b"[]", b"42 ", b'"just a string"',
    b'{"execute": "query-jobs", "arguments": []}', b'{"execute": "query-jobs", "arguments": null}',
    b'{"execute": 7}', b'{"execute": ["query-jobs"]}', b'{"arguments": {}}', b'{"id": 1}', b"{}",
    b'{"execute": "query-jobs", "x": 1}', b'{"exec-oob": "query-jobs"}',
    b'{"execute": "query-jobs", "exec-oob": "query-jobs"}', b'{"execute": "qmp_capabilities"}',
    b'{"execute": "nope"}', b'{"execute": ""}', b'{"execute": "query-jobs\\u0000x"}',
    b'{"execute": "' + b"a" * 100_000 + b'"}', b'{"execute": "query-jobs", "arguments": {"a": ' * 30 + b"}" * 31,
    b"[" * 2000 + b"]" * 2000,
]


def test_broken_requests_get_error_replies_and_the_monitor_keeps_answering(chain4):
    expected = qemu_raw(chain4["D"], chain4["D"].parent / "before.raw")[:MiB]
    with monitored(chain4["D"]) as (served, _log):
        with RawQmp(served.qmp) as qmp:
            for number, data in enumerate(BROKEN):
                qmp.send(data + b"\r\n")
                # the resync byte itself is a stray token to QEMU's lexer (an error reply of its own), and it
                # is what ends an incomplete message: either way the bad input is answered with an error
                replies = qmp.replies_until_sync(f"after-{number}")
                assert replies, f"no reply to {data[:80]!r}"
                for reply in replies:
                    assert set(reply) <= {"error", "id"}, (data[:80], reply)
                    assert reply["error"]["class"] in ("GenericError", "CommandNotFound"), (data[:80], reply)
            assert qmp.execute("query-block-jobs") == {"return": [], "id": "x"}
        nbd_reads(served, expected)


def _right(arg_type):
    if isinstance(arg_type, EnumType):
        return arg_type.values[0]
    if isinstance(arg_type, list):
        return []
    if isinstance(arg_type, dict):
        return {m.lstrip("*"): _right(t) for m, t in arg_type.items() if not m.startswith("*")}
    return {"str": "no-such-device", "int": 0, "uint64": 0, "size": 0, "bool": False, "number": 0.5,
            "any": None}[arg_type]


def _wrong(arg_type) -> list:
    if isinstance(arg_type, EnumType):
        return ["no-such-value", 3, None]
    if isinstance(arg_type, list):
        return [{}, "x", [None]]
    if isinstance(arg_type, dict):
        return [[], 1]
    return {"str": [1, None, {}], "int": ["1", 1.5, True, 1 << 63], "uint64": [-1.5, "1", 1 << 64],
            "size": [-1.5, "1"], "bool": ["true", 1, None], "number": ["x", None], "any": []}[arg_type]


WRONG_TYPES = [
    (name, member.lstrip("*"), value, {m.lstrip("*"): _right(t) for m, t in schema.items() if not m.startswith("*")})
    for name, (schema, _handler) in sorted(COMMANDS.items())
    for member, arg_type in schema.items()
    for value in _wrong(arg_type)
]


def test_every_argument_of_every_command_with_a_wrong_type_gets_one_error_naming_it(chain4):
    with monitored(chain4["D"]) as (served, _log), RawQmp(served.qmp) as qmp:
        for number, (name, member, value, required) in enumerate(WRONG_TYPES):
            reply = qmp.execute(name, {**required, member: value}, id=number)
            assert reply["id"] == number and reply["error"]["class"] == "GenericError", (name, member, value, reply)
            assert f"'{member}" in reply["error"]["desc"] or "'null'" in reply["error"]["desc"], (name, member, reply)
        for name, (schema, _handler) in sorted(COMMANDS.items()):
            required = {m.lstrip("*"): _right(t) for m, t in schema.items() if not m.startswith("*")}
            reply = qmp.execute(name, {**required, "no-such-member": 1}, id=name)
            assert reply["error"]["desc"] in ("Parameter 'no-such-member' is unexpected",) or any(
                f"'{m}'" in reply["error"]["desc"] for m in required), (name, reply)
        assert qmp.execute("query-block-jobs") == {"return": [], "id": "x"}
    assert len(WRONG_TYPES) > 100


# --- many clients, vanishing -------------------------------------------------------------------------------------


def _vanish(path: Path, how: int, rng: random.Random) -> None:
    """One client that leaves in one of several rude ways (errors on our side of the socket are fine)."""
    with contextlib.suppress(OSError, EOFError):
        if how == 0:  # connect and close at once
            s = socket.socket(socket.AF_UNIX)
            s.connect(str(path))
            s.close()
            return
        qmp = RawQmp(path, negotiate=how >= 3, timeout=10)
        if how == 1:  # read the greeting and leave
            qmp.close()
        elif how == 2:  # half a message
            qmp.send(b'{"execute": "query-block-jo')
            qmp.close()
        elif how == 3:  # a request, then a reset without reading the reply
            qmp.send(b'{"execute": "query-block-jobs"}\r\n' * 20)
            qmp.reset()
        elif how == 4:  # garbage, then leave
            qmp.send(rng.randbytes(64 * 1024))
            qmp.close()
        elif how == 5:  # a polite query, then leave
            qmp.execute("query-jobs")
            qmp.close()
        else:  # shut down writing, read the reply, leave
            qmp.send(b'{"execute": "query-version", "id": 1}\r\n')
            qmp.sock.shutdown(socket.SHUT_WR)
            qmp.reply()
            qmp.close()


def test_many_clients_vanishing_while_a_stream_runs_leave_the_job_and_the_others_alone(chain4, tmp_path):
    expected = qemu_raw(chain4["D"], tmp_path / "before.raw")
    rng = random.Random(5)
    with monitored(chain4["D"]) as (served, _log), RawQmp(served.qmp) as observer:
        assert observer.execute("block-stream", {"device": "drive0", "speed": STREAM_SPEED}) == {"return": {}, "id": "x"}
        for wave in range(4):  # 4 waves of 40 concurrent clients: 160 in all, under the 64 limit at any time
            threads = [threading.Thread(target=_vanish, args=(served.qmp, (wave * 40 + i) % 7,
                                                                random.Random(rng.random())))
                       for i in range(40)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(30)
            assert observer.execute("query-version", id=wave)["id"] == wave
        completed = observer.wait_event("BLOCK_JOB_COMPLETED")
        assert "error" not in completed["data"] and completed["data"]["offset"] == completed["data"]["len"], completed
        assert observer.execute("query-block-jobs") == {"return": [], "id": "x"}
        # every vanished client was forgotten: 60 more can connect at once (the monitor allows 64)
        others = [RawQmp(served.qmp) for _ in range(60)]
        for qmp in others:
            qmp.close()
        nbd_reads(served, expected[:MiB])
    assert_clean(chain4["D"])
    assert qemu_img_compare(chain4["D"], tmp_path / "before.raw")


# --- clients that never read -------------------------------------------------------------------------------------


def _flood_without_reading(path: Path, stop: threading.Event) -> RawQmp:
    qmp = RawQmp(path)
    qmp.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)

    def flood() -> None:
        with contextlib.suppress(OSError):
            while not stop.is_set():
                qmp.send(b'{"execute": "query-commands"}\r\n' * 50)

    threading.Thread(target=flood, daemon=True).start()
    return qmp


def test_clients_that_never_read_do_not_delay_the_job_or_other_clients(chain4, tmp_path):
    """Eight clients flood requests and never read their replies.  The observer's requests are answered and
    the job's events arrive without waiting on them (before the fix, each broadcast waited up to the 5 s send
    timeout on every stalled client, holding the job lock), and the stalled clients are dropped."""
    expected = qemu_raw(chain4["D"], tmp_path / "before.raw")
    stop = threading.Event()
    with monitored(chain4["D"]) as (served, _log), RawQmp(served.qmp) as observer:
        stuck = [_flood_without_reading(served.qmp, stop) for _ in range(8)]
        time.sleep(0.5)  # their send buffers fill up
        try:
            start = time.monotonic()
            reply = observer.execute("block-stream", {"device": "drive0", "speed": STREAM_SPEED})
            assert reply == {"return": {}, "id": "x"}
            answered = time.monotonic() - start
            completed = observer.wait_event("BLOCK_JOB_COMPLETED")
            took = time.monotonic() - start
            assert "error" not in completed["data"], completed
            # the old loop took SEND_TIMEOUT (5 s) per stalled broadcast; what is left is the flood's CPU time
            assert answered < 3.0, f"block-stream answered after {answered:.2f} s"
            assert took < 8.0, f"stream completed after {took:.2f} s"
            for _ in range(20):
                start = time.monotonic()
                observer.execute("query-block-jobs")
                assert time.monotonic() - start < 2.0
            stop.set()
            for qmp in stuck[:2]:  # the monitor dropped them: reading what it had sent ends in EOF (or a reset:
                qmp.sock.settimeout(15)  # it closed with their requests unread)
                with contextlib.suppress(ConnectionResetError):
                    while qmp.sock.recv(1 << 20):
                        pass
        finally:
            stop.set()
            for qmp in stuck:
                qmp.close()
        nbd_reads(served, expected[:MiB])
    assert qemu_img_compare(chain4["D"], tmp_path / "before.raw")
