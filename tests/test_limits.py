"""Limits a server needs, each pinned against a real `vdisk serve`: connections, request sizes, bytes in flight
per connection, QMP clients and QMP message size.  What enforces each (nbdkit's limit filter, nbdkit itself,
our monitor) is written down in ``vdisk/serving/launcher.py`` ("Limits").

nbdkit has no handshake timeout (not in 1.32, not later): what we can promise instead is pinned here too, that
a client stalled in the handshake holds no connection slot and blocks nobody.
"""

from __future__ import annotations

import contextlib
import errno
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import nbd
import pytest

from fuzz import nbd_wire as w
from fuzz.qmp_wire import RawQmp
from tests.support.commands import run
from tests.support.images import assert_clean
from tests.support.serving import Served, nbdkit_pid, serve
from vdisk.qmp import json_parser
from vdisk.qmp.monitor import MAX_CLIENTS
from vdisk.serving.launcher import ServeOptions, nbdkit_command

pytestmark = pytest.mark.timeout(120)

MiB = 1 << 20
MAX_REQUEST = 64 * MiB  # nbdkit's MAX_REQUEST_SIZE


@pytest.fixture(scope="module")
def big_image(tmp_path_factory) -> Path:
    """A sparse 160 MiB qcow2 (room for requests of 64 MiB and more inside the disk) with data at its start."""
    path = tmp_path_factory.mktemp("limits") / "big.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", path, "160M")
    run("qemu-io", "-c", "write -P 0x3c 0 1M", path)
    return path


@contextlib.contextmanager
def logged(image: Path, *extra: str, qmp: bool = False) -> Iterator[tuple[Served, list[str]]]:
    lines: list[str] = []
    with serve(image, *extra, qmp=qmp) as served:
        drain = threading.Thread(target=lambda: lines.extend(served.proc.stderr), daemon=True)
        drain.start()
        yield served, lines
        assert served.proc.poll() is None, "".join(lines)[-3000:]
    drain.join(30)
    assert served.proc.returncode == 0 and "Traceback" not in "".join(lines), "".join(lines)[-3000:]


def client(served: Served) -> nbd.NBD:
    h = nbd.NBD()
    h.connect_unix(str(served.socket))
    return h


def client_when_a_slot_frees(served: Served, timeout: float = 10) -> nbd.NBD:
    """nbdkit frees a connection's slot once it has finished closing it: retry until then."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return client(served)
        except nbd.Error:
            assert time.monotonic() < deadline, "no connection slot freed"
            time.sleep(0.05)


def rss(pid: int, field: str = "VmRSS") -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no {field} for {pid}")


# --- connections ---------------------------------------------------------------------------------------------


def test_command_line_puts_the_limit_filter_in_front_of_the_plugin():
    cmd = nbdkit_command(ServeOptions(image="/i.qcow2", socket="/s"))
    assert "--filter=limit" in cmd and "limit=64" in cmd
    assert cmd.index("--filter=limit") < cmd.index("python")
    cmd = nbdkit_command(ServeOptions(image="/i.qcow2", socket="/s", max_connections=0, threads=2, serialize=False))
    assert "--filter=limit" not in cmd and not any(a.startswith("limit=") for a in cmd)
    assert cmd[cmd.index("--threads") + 1] == "2"


def test_max_connections_refuses_the_next_client_and_a_leaving_client_frees_its_slot(big_image):
    with logged(big_image, "--max-connections", "2") as (served, lines):
        first, second = client(served), client(served)
        with pytest.raises(nbd.Error):
            client(served)
        assert first.pread(512, 0) == second.pread(512, 0) == b"\x3c" * 512
        first.shutdown()
        third = client_when_a_slot_frees(served)
        assert third.pread(512, 0) == b"\x3c" * 512
        third.shutdown()
        second.shutdown()
    assert any("too many clients" in line for line in lines), "".join(lines)


def pread_within(h: nbd.NBD, length: int, offset: int, seconds: float = 5) -> bytes:
    """A read that must complete within ``seconds`` (a frozen server fails the test instead of hanging it)."""
    buf = nbd.Buffer(length)
    cookie = h.aio_pread(buf, offset)
    deadline = time.monotonic() + seconds
    while not h.aio_command_completed(cookie):
        assert time.monotonic() < deadline, f"read of {length} at {offset} not answered in {seconds} s"
        h.poll(100)
    return buf.to_bytearray()


def test_clients_stalled_in_the_handshake_hold_no_slot_and_freeze_nobody(big_image):
    """nbdkit has no handshake timeout, so what matters is that a client stalled in the handshake (before, in or
    after the option phase) holds no connection slot and freezes nobody.  Found by this test: nbdkit's
    serialized thread model holds its global request lock across every handshake, so one client that connected
    and sent nothing froze the I/O of every guest, for as long as it stayed.  nbdkit now runs its parallel model
    and the plugin serializes requests itself (vdisk.serving.nbdkit_plugin)."""
    with logged(big_image, "--max-connections", "2") as (served, _lines):
        established = client(served)
        stalled = []
        for how in range(12):
            c = w.Wire(str(served.socket), timeout=10)
            if how % 4 >= 1:
                c.greeting()
            if how % 4 >= 2:
                c.client_flags()
            if how % 4 == 3:
                c.option(w.OPT_GO, w.go_data()[:3], length=100)  # an option that never finishes
            stalled.append(c)
        assert pread_within(established, 4096, 0) == b"\x3c" * 4096
        newcomer = client(served)  # the second slot: stalled clients hold none
        assert pread_within(newcomer, 4096, 0) == b"\x3c" * 4096
        with pytest.raises(nbd.Error):  # both slots are the libnbd clients'
            client(served)
        newcomer.shutdown()
        for c in stalled:
            c.close()
        h = client_when_a_slot_frees(served)
        assert pread_within(h, 512, 0) == b"\x3c" * 512
        h.shutdown()
        established.shutdown()


# --- request sizes and bytes in flight ---------------------------------------------------------------------------


def test_requests_of_64_MiB_work_and_one_byte_more_is_refused_with_enomem(big_image, tmp_path):
    image = tmp_path / "big.qcow2"
    run("cp", "--sparse=always", big_image, image)
    with logged(image) as (served, _lines), w.Wire(str(served.socket)) as c:
        c.handshake(structured=True)
        c.request(w.CMD_READ, 0, MAX_REQUEST, cookie=1)
        data = c.reply(1, 0, MAX_REQUEST).data
        assert data[:MiB] == b"\x3c" * MiB and data[MiB:] == bytes(MAX_REQUEST - MiB)
        del data
        payload = bytes([0x5e]) * MAX_REQUEST
        c.request(w.CMD_WRITE, MiB, MAX_REQUEST, cookie=2, payload=payload)
        assert c.reply(2).error == 0
        for command in (w.CMD_READ, w.CMD_WRITE):
            c.request(command, 0, MAX_REQUEST + 1, cookie=3, payload=payload + b"\0" if command == w.CMD_WRITE else b"")
            assert c.reply(3).error == errno.ENOMEM
        c.request(w.CMD_READ, MAX_REQUEST + MiB - 512, 1024, cookie=4)
        assert c.reply(4, MAX_REQUEST + MiB - 512, 1024).data == b"\x5e" * 512 + bytes(512)
        del payload
        # a payload nbdkit will not even skip (over 128 MiB): it closes the connection, and only that one
        c.request(w.CMD_WRITE, 0, 2 * MAX_REQUEST + 1, cookie=5)
        assert c.wait_closed() == b""
        h = client(served)
        assert h.pread(512, MiB) == b"\x5e" * 512
        h.shutdown()
    assert_clean(image)


@pytest.mark.parametrize("mode", [(), ("--parallel", "--threads", "2")], ids=["serialized", "parallel-2-threads"])
def test_bytes_in_flight_per_connection_are_bounded_by_back_pressure(big_image, mode):
    """A client pipelines 16 reads of 32 MiB (512 MiB) and reads no reply: nbdkit holds one request buffer per
    worker (1 serialized, --threads in parallel) and waits on the socket; it never buffers the rest."""
    request = 32 * MiB
    with logged(big_image, *mode) as (served, _lines), w.Wire(str(served.socket), timeout=60) as c:
        pid = nbdkit_pid(served)
        c.handshake()
        c.request(w.CMD_READ, 0, 4096, cookie=100)
        c.reply(100, 0, 4096)
        before = rss(pid)
        for cookie in range(16):
            c.request(w.CMD_READ, (cookie % 4) * request, request, cookie=cookie)
        time.sleep(1.5)  # let the server read what it will and block on its replies
        workers = 2 if mode else 1
        grown = rss(pid) - before
        assert grown < (workers + 1) * request + 32 * MiB, f"nbdkit grew by {grown >> 20} MiB"
        outstanding = dict.fromkeys(range(16), request)
        while outstanding:  # in any order: parallel workers answer as they finish
            reply = c.simple_reply_any(outstanding)
            assert reply.error == 0 and (reply.cookie % 4 or reply.data[:MiB] == b"\x3c" * MiB)


# --- QMP -----------------------------------------------------------------------------------------------------------


def test_qmp_clients_beyond_the_limit_are_closed_without_a_greeting_until_one_leaves(chain4):
    with logged(chain4["D"], qmp=True) as (served, _lines):
        clients = [RawQmp(served.qmp, negotiate=False) for _ in range(MAX_CLIENTS)]
        with socket.socket(socket.AF_UNIX) as extra:
            extra.settimeout(10)
            extra.connect(str(served.qmp))
            assert extra.recv(4096) == b""  # closed at once
        clients.pop().close()
        deadline = time.monotonic() + 10
        while True:
            try:
                late = RawQmp(served.qmp)
                break
            except (EOFError, ConnectionResetError):
                assert time.monotonic() < deadline, "slot never freed"
                time.sleep(0.05)
        assert late.execute("query-block-jobs") == {"return": [], "id": "x"}
        late.close()
        for c in clients:
            c.close()


def test_qmp_message_over_the_size_limit_is_refused_once_and_the_connection_goes_on(chain4):
    limit = json_parser.DEFAULT_MAX_MESSAGE_SIZE
    with logged(chain4["D"], qmp=True) as (served, _lines), RawQmp(served.qmp) as qmp:
        pid = nbdkit_pid(served)
        exact = b'{"execute": "query-version", "id": "%s"}'
        padding = limit - len(exact % b"")
        assert qmp.execute("query-version", id="a" * 10)["id"] == "a" * 10
        qmp.send(exact % (b"a" * padding) + b"\r\n")  # exactly the limit: answered
        assert qmp.reply()["id"] == "a" * padding
        qmp.send(exact % (b"a" * (padding + 1)) + b"\r\n")  # one byte more: one error, then resync
        assert qmp.reply() == {"error": {"class": "GenericError", "desc": "JSON token size limit exceeded"}}
        assert qmp.execute("query-block-jobs") == {"return": [], "id": "x"}
        # 64 MiB of one unterminated string: still one error, and nothing of it is kept in memory
        before = rss(pid)
        qmp.send(b'{"execute": "' + b"x" * (64 * MiB))
        qmp.send(b'"}\r\n')
        assert qmp.reply()["error"]["desc"] == "JSON token size limit exceeded"
        assert qmp.execute("query-version", id=2)["id"] == 2
        assert qmp.replies_until_sync("end") == [{"error": {"class": "GenericError",
                                                            "desc": "JSON parse error, stray '\x01'"}}]
        assert rss(pid) - before < 16 * MiB, f"monitor grew by {(rss(pid) - before) >> 20} MiB"
