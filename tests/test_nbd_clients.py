"""`vdisk serve` against real NBD clients over real sockets: libnbd, nbdinfo and nbdcopy.

Each test serves the chain4 fixture (A <- B <- C <- D, 8 MiB, made by qemu-img) with a real `vdisk serve`
process (nbdkit + our plugin) and checks what a client sees against an oracle: a bytearray model of the disk,
`qemu-img map` for allocation, `qemu-img convert` for contents, `qemu-img check` for the metadata.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import random
import signal
import socket
import stat
import threading
from collections.abc import Iterator
from pathlib import Path

import nbd
import pytest

from tests.support.commands import run, vdisk
from tests.support.images import assert_clean, qemu_img_check, qemu_img_compare, qemu_raw
from tests.support.serving import Served, nbdkit_pid, serve

pytestmark = pytest.mark.timeout(90)

MiB = 1 << 20
DISK_SIZE = 8 * MiB
CLUSTER = 64 * 1024
HOLE_ZERO = nbd.STATE_HOLE | nbd.STATE_ZERO


# --- helpers ----------------------------------------------------------------------------------------------


def connect(served: Served, *, structured: bool = True, opt_mode: bool = False, handshake_flags: int | None = None,
            log: list[str] | None = None) -> nbd.NBD:
    """A libnbd handle connected to the served socket; ``log`` collects libnbd's debug lines (state changes)."""
    h = nbd.NBD()
    if log is not None:
        h.set_debug_callback(lambda _context, message: log.append(message))
        h.set_debug(True)
    h.set_request_structured_replies(structured)
    if handshake_flags is not None:
        h.set_handshake_flags(handshake_flags)
    h.set_opt_mode(opt_mode)
    h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
    h.connect_unix(str(served.socket))
    return h


def read_all(h: nbd.NBD, size: int = DISK_SIZE, chunk: int = 4 * MiB) -> bytes:
    return b"".join(h.pread(min(chunk, size - offset), offset) for offset in range(0, size, chunk))


def runs(extents: list[tuple[int, int, int]]) -> list[tuple[int, int, int]]:
    """Merge adjacent (start, length, flags) extents with equal flags."""
    out: list[tuple[int, int, int]] = []
    for start, length, flags in extents:
        if out and out[-1][2] == flags and out[-1][0] + out[-1][1] == start:
            out[-1] = (out[-1][0], out[-1][1] + length, flags)
        else:
            out.append((start, length, flags))
    return out


def qemu_map_runs(image: Path) -> list[tuple[int, int, int]]:
    """`qemu-img map` of a chain, as NBD base:allocation flags: data, or hole+zero (QEMU's own NBD server mapping)."""
    entries = json.loads(run("qemu-img", "map", "-U", "--output=json", image).stdout)
    return runs([(e["start"], e["length"], 0 if e["data"] else HOLE_ZERO) for e in entries])


def nbd_block_status(h: nbd.NBD, size: int = DISK_SIZE) -> list[tuple[int, int, int]]:
    extents: list[tuple[int, int, int]] = []
    got: list[int] = []

    def callback(context: str, _offset: int, entries: list[int], _err: object) -> int:
        if context == nbd.CONTEXT_BASE_ALLOCATION:
            got.extend(entries)
        return 0

    offset = 0
    while offset < size:
        got.clear()
        h.block_status(size - offset, offset, callback)
        assert got, f"no base:allocation extents at {offset}"
        for length, flags in zip(got[::2], got[1::2], strict=True):
            length = min(length, size - offset)
            extents.append((offset, length, flags))
            offset += length
    return runs(extents)


def nbd_errno(call) -> int:
    with pytest.raises(nbd.Error) as excinfo:
        call()
    return excinfo.value.errnum


def patterned(rng: random.Random, length: int) -> bytes:
    return rng.randbytes(length)


@contextlib.contextmanager
def tmpfs(path: Path, size: str) -> Iterator[Path]:
    path.mkdir()
    proc = run("mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", path, check=False)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a {size} tmpfs to fill up (needs root and mount rights): {proc.stderr.strip()}")
    try:
        yield path
    finally:
        run("umount", "-l", path, check=False)


# --- handshake variants -----------------------------------------------------------------------------------


@pytest.mark.parametrize("structured", [True, False], ids=["structured", "simple"])
def test_go_handshake_exports_the_chain_with_its_flags(chain4, structured):
    with serve(chain4["D"]) as served:
        h = connect(served, structured=structured)

        assert h.get_protocol() == "newstyle-fixed"
        assert h.get_structured_replies_negotiated() is structured
        assert h.can_meta_context(nbd.CONTEXT_BASE_ALLOCATION) is structured  # needs structured replies
        assert h.get_size() == DISK_SIZE
        assert not h.is_read_only()
        assert all((h.can_flush(), h.can_fua(), h.can_trim(), h.can_zero(), h.can_fast_zero(), h.can_multi_conn(),
                    h.can_cache()))
        assert h.pread(4096, 0) == b"\xa1" * 4096
        assert h.pread(4096, MiB) == b"\xb2" * 4096
        h.pwrite(b"\x5a" * 1000, 3000)
        assert h.pread(5000, 0) == b"\xa1" * 3000 + b"\x5a" * 1000 + b"\xa1" * 1000
        h.shutdown()


def test_export_name_handshake_of_a_client_without_fixed_newstyle(chain4):
    log: list[str] = []
    with serve(chain4["D"]) as served:
        h = connect(served, handshake_flags=0, log=log)

        assert h.get_protocol() == "newstyle"
        assert any("OPT_EXPORT_NAME" in line for line in log), "libnbd did not use NBD_OPT_EXPORT_NAME"
        assert not any("OPT_GO" in line for line in log)
        assert not h.get_structured_replies_negotiated()
        assert h.get_size() == DISK_SIZE
        h.pwrite(b"\x11" * 70000, 5 * MiB - 100)
        assert h.pread(70000, 5 * MiB - 100) == b"\x11" * 70000
        h.shutdown()


def test_list_option_names_the_export_and_the_handshake_goes_on(chain4):
    with serve(chain4["D"]) as served:
        h = connect(served, opt_mode=True)
        assert h.aio_is_negotiating()

        names: list[tuple[str, str]] = []
        count = h.opt_list(lambda name, description: names.append((name, description)))

        assert count == len(names) == 1
        assert names[0][0] == ""
        h.opt_go()
        assert h.aio_is_ready()
        assert h.pread(512, 0) == b"\xa1" * 512
        h.shutdown()


@pytest.mark.parametrize("structured", [True, False], ids=["structured", "simple"])
def test_info_option_describes_the_export_before_go(chain4, structured):
    with serve(chain4["D"], "--description", "vdisk test export") as served:
        h = connect(served, structured=structured, opt_mode=True)
        h.set_full_info(True)

        h.opt_info()

        assert h.get_size() == DISK_SIZE
        assert not h.is_read_only()
        assert h.get_export_description() == "vdisk test export"
        assert h.get_block_size(nbd.SIZE_MINIMUM) == 1
        assert h.get_block_size(nbd.SIZE_PREFERRED) == 4096
        assert h.get_block_size(nbd.SIZE_MAXIMUM) == 32 * MiB
        assert h.can_multi_conn()
        h.opt_go()
        assert h.get_structured_replies_negotiated() is structured
        assert h.pread(512, 7 * MiB) == b"\xc4" * 512
        h.shutdown()


# --- data path ----------------------------------------------------------------------------------------------


def _pick_range(rng: random.Random) -> tuple[int, int]:
    kind = rng.random()
    if kind < 0.3:  # partial sector, anywhere
        length = rng.randint(1, 600)
    elif kind < 0.7:  # a few KiB, often inside one cluster
        length = rng.randint(1, 16) * 512 + rng.choice((0, rng.randint(1, 511)))
    else:  # across clusters
        length = rng.randint(CLUSTER // 2, 3 * CLUSTER)
    start = rng.randrange(0, DISK_SIZE - length)
    return start, start + length


def test_pipelined_aio_reads_and_writes_agree_with_a_model(chain4, tmp_path):
    """Up to 32 requests in flight at once; none overlaps a write in flight (NBD leaves those unordered)."""
    model = bytearray(qemu_raw(chain4["D"], tmp_path / "before.raw"))
    rng = random.Random(20240531)
    depth = 32
    with serve(chain4["D"]) as served:
        h = connect(served)
        inflight: dict[int, tuple[str, int, int, nbd.Buffer, bytes | None]] = {}
        checked = 0

        def retire() -> None:
            nonlocal checked
            for cookie in [c for c in inflight if h.aio_command_completed(c)]:
                kind, start, end, buf, expected = inflight.pop(cookie)
                if kind == "read":
                    assert bytes(buf.to_bytearray()) == expected, f"read {start}+{end - start} differs from model"
                    checked += 1

        for _ in range(1500):
            while len(inflight) >= depth:
                h.poll(-1)
                retire()
            op = rng.choices(("read", "write", "zero", "flush"), weights=(45, 40, 10, 5))[0]
            if op == "flush":
                inflight[h.aio_flush()] = ("flush", 0, 0, None, None)
                continue
            while True:
                start, end = _pick_range(rng)
                writes_conflict = any(s < end and start < e for k, s, e, _, _ in inflight.values()
                                      if k in ("write", "zero"))
                reads_conflict = op != "read" and any(s < end and start < e for k, s, e, _, _ in inflight.values()
                                                      if k == "read")
                if not writes_conflict and not reads_conflict:
                    break
            if op == "read":
                buf = nbd.Buffer(end - start)
                inflight[h.aio_pread(buf, start)] = ("read", start, end, buf, bytes(model[start:end]))
            elif op == "write":
                data = rng.randbytes(end - start)
                model[start:end] = data
                buf = nbd.Buffer.from_bytearray(bytearray(data))
                flags = nbd.CMD_FLAG_FUA if rng.random() < 0.1 else 0
                inflight[h.aio_pwrite(buf, start, flags=flags)] = ("write", start, end, buf, None)
            else:
                model[start:end] = bytes(end - start)
                inflight[h.aio_zero(end - start, start)] = ("zero", start, end, None, None)
        while inflight:
            h.poll(-1)
            retire()

        assert checked > 500
        assert read_all(h) == model
        h.shutdown()
    assert qemu_raw(chain4["D"], tmp_path / "after.raw") == model
    assert_clean(chain4["D"])


@pytest.mark.parametrize("thread_model", [(), ("--parallel",)], ids=["serialize", "parallel"])
def test_connections_writing_into_the_same_clusters_at_once(chain4, tmp_path, thread_model):
    """Four connections interleave 4 KiB writes in every cluster of the first 2 MiB (over backing data, so each
    first write to a cluster copies the rest of it from the chain) while a fifth reads."""
    model = bytearray(qemu_raw(chain4["D"], tmp_path / "before.raw"))
    writers = 4
    chunk = 4096
    region = 2 * MiB
    for i in range(writers):
        for offset in range(i * chunk, region, writers * chunk):
            model[offset : offset + chunk] = bytes([0x10 + i]) * (chunk - 1) + bytes([offset // chunk % 256])
    errors: list[BaseException] = []

    with serve(chain4["D"], *thread_model) as served:
        handles = [connect(served) for _ in range(writers + 1)]
        assert all(h.can_multi_conn() for h in handles)

        def write(i: int) -> None:
            try:
                h = handles[i]
                sent = []  # (cookie, buffer): the buffer must live until the write completes
                for offset in range(i * chunk, region, writers * chunk):
                    buf = nbd.Buffer.from_bytearray(bytearray(model[offset : offset + chunk]))
                    sent.append((h.aio_pwrite(buf, offset), buf))
                    while h.aio_in_flight() >= 16:
                        h.poll(-1)
                while h.aio_in_flight():
                    h.poll(-1)
                assert all(h.aio_command_completed(cookie) for cookie, _ in sent)  # raises on an error reply
            except BaseException as exc:  # re-raised in the main thread
                errors.append(exc)

        def read() -> None:
            try:
                reader = handles[writers]
                for _ in range(20):
                    assert len(reader.pread(region, 0)) == region
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=write, args=(i,)) for i in range(writers)]
        threads.append(threading.Thread(target=read))
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert not errors, errors
        handles[0].flush()
        assert read_all(handles[writers]) == model
        for h in handles:
            h.shutdown()
    assert qemu_raw(chain4["D"], tmp_path / "after.raw") == model
    assert_clean(chain4["D"])


def test_flush_on_one_connection_persists_writes_acknowledged_on_another(chain4, tmp_path):
    """NBD multi-conn: a flush covers every write already acknowledged on any connection.  nbdkit is killed
    with SIGKILL right after the flush, so nothing (no cleanup, no close) runs after it."""
    model = bytearray(qemu_raw(chain4["D"], tmp_path / "before.raw"))
    rng = random.Random(7)
    writes = [
        (5 * MiB + 12345, 200_000),  # unallocated in the whole chain
        (MiB + 4096, 8192),  # partial cluster over B's data: copy-on-write
        (7 * MiB + 100, 1000),  # inside C's compressed cluster
        (3 * MiB, CLUSTER),  # B's zero cluster
    ]
    with serve(chain4["D"]) as served:
        writer, flusher = connect(served), connect(served)
        assert writer.can_multi_conn() and flusher.can_multi_conn()
        for offset, length in writes:
            data = patterned(rng, length)
            model[offset : offset + length] = data
            writer.pwrite(data, offset)

        flusher.flush()
        os.kill(nbdkit_pid(served), signal.SIGKILL)
        served.proc.wait(30)

    assert qemu_raw(chain4["D"], tmp_path / "after.raw") == model
    result = qemu_img_check(chain4["D"])  # leaks are allowed after a kill; corruption is not
    assert result.get("corruptions", 0) == 0 and result["check-errors"] == 0, result


# --- block status -------------------------------------------------------------------------------------------


def test_block_status_equals_the_chains_allocation(chain4):
    with serve(chain4["D"]) as served:
        h = connect(served)
        assert h.can_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
        assert nbd_block_status(h) == qemu_map_runs(chain4["D"])

        h.pwrite(b"\x77" * 100, 5 * MiB + 1000)  # a new cluster where the chain has nothing
        h.zero(CLUSTER, 0)  # over A's data: a zero cluster
        h.zero(2 * CLUSTER, 4 * MiB, nbd.CMD_FLAG_NO_HOLE)
        h.trim(CLUSTER, 6 * MiB)  # over B's data
        h.flush()

        status = nbd_block_status(h)
        assert status == qemu_map_runs(chain4["D"])
        assert (5 * MiB, CLUSTER, 0) in status
        assert status[0] == (0, CLUSTER, HOLE_ZERO)
        one: list[int] = []
        h.block_status(DISK_SIZE, 0, lambda _c, _o, entries, _e: one.extend(entries) or 0, nbd.CMD_FLAG_REQ_ONE)
        assert one == [CLUSTER, HOLE_ZERO]
        h.shutdown()


def test_nbdinfo_map_agrees_with_qemu_img_map(chain4):
    with serve(chain4["D"]) as served:
        entries = json.loads(run("nbdinfo", "--map", "--json", served.uri).stdout)
        text = run("nbdinfo", "--map", served.uri).stdout

    assert runs([(e["offset"], e["length"], e["type"]) for e in entries]) == qemu_map_runs(chain4["D"])
    assert text.split("\n")[0].split() == ["0", str(3 * MiB), "0", "data"]


# --- nbdcopy ------------------------------------------------------------------------------------------------


def test_nbdcopy_of_the_export_equals_qemu_img_convert_of_the_chain(chain4, tmp_path):
    with serve(chain4["D"]) as served:
        run("nbdcopy", served.uri, tmp_path / "copy.raw")

    assert (tmp_path / "copy.raw").read_bytes() == qemu_raw(chain4["D"], tmp_path / "qemu.raw")


@pytest.mark.parametrize("thread_model", [(), ("--parallel",)], ids=["serialize", "parallel"])
def test_nbdcopy_into_the_export_leaves_the_image_holding_the_file(chain4, tmp_path, thread_model):
    """nbdcopy uses four connections with many requests each, and turns zero runs into zero requests."""
    rng = random.Random(11)
    source = bytearray(rng.randbytes(DISK_SIZE))
    source[2 * MiB : 3 * MiB + 4096] = bytes(MiB + 4096)  # zero runs: sent as NBD_CMD_WRITE_ZEROES
    source[6 * MiB + 512 : 7 * MiB] = bytes(MiB - 512)
    (tmp_path / "source.raw").write_bytes(source)

    with serve(chain4["D"], *thread_model) as served:
        run("nbdcopy", "--connections=4", "--requests=32", tmp_path / "source.raw", served.uri)
        run("nbdcopy", served.uri, tmp_path / "back.raw")

    assert (tmp_path / "back.raw").read_bytes() == source
    assert qemu_img_compare(chain4["D"], tmp_path / "source.raw")
    assert_clean(chain4["D"])


# --- bad requests, read-only, full disk ----------------------------------------------------------------------


def test_bad_requests_get_an_error_reply_and_the_connection_stays_usable(chain4):
    with serve(chain4["D"]) as served:
        h = connect(served)
        h.set_strict_mode(0)  # let libnbd send what the protocol forbids
        h.pwrite(b"\x42" * 4096, 0)
        unknown_flag = 1 << 9

        bad = {
            "read past the end": lambda: h.pread(4096, DISK_SIZE - 1),
            "read starting past the end": lambda: h.pread(512, DISK_SIZE + 512),
            "zero-length read": lambda: h.pread(0, 0),
            "zero-length write": lambda: h.pwrite(b"", 4096),
            "write past the end": lambda: h.pwrite(b"\x01" * 1024, DISK_SIZE - 512),
            "read with an unknown flag": lambda: h.pread(512, 0, unknown_flag),
            "write with an unknown flag": lambda: h.pwrite(b"\x02" * 512, 0, unknown_flag),
            "trim past the end": lambda: h.trim(2 * CLUSTER, DISK_SIZE - CLUSTER),
            "zero past the end": lambda: h.zero(2 * CLUSTER, DISK_SIZE - CLUSTER),
            "zero with an unknown flag": lambda: h.zero(512, 0, unknown_flag),
            "block status past the end": lambda: h.block_status(512, DISK_SIZE, lambda *a: 0),
        }
        for what, call in bad.items():
            code = nbd_errno(call)
            assert code in (errno.EINVAL, errno.ENOSPC, errno.EOVERFLOW), f"{what}: {errno.errorcode.get(code)}"
            assert h.aio_is_ready(), f"connection unusable after {what}"
            assert h.pread(4096, 0) == b"\x42" * 4096, f"data wrong after {what}"

        assert h.pread(512, DISK_SIZE - 512) == b"\x00" * 512
        h.pwrite(b"\x43" * 512, DISK_SIZE - 512)
        assert h.pread(512, DISK_SIZE - 512) == b"\x43" * 512
        h.shutdown()
    assert_clean(chain4["D"])


def _open_image_fds(pid: int, images: set[Path]) -> dict[str, int]:
    """Path -> open flags of every fd of ``pid`` on one of ``images``."""
    found = {}
    fd_dir = Path(f"/proc/{pid}/fd")
    for fd in fd_dir.iterdir():
        with contextlib.suppress(FileNotFoundError):
            target = Path(os.readlink(fd))
            if target in images:
                fdinfo = Path(f"/proc/{pid}/fdinfo/{fd.name}").read_text()
                flags = int(next(line.split()[1] for line in fdinfo.splitlines() if line.startswith("flags:")), 8)
                found[f"{target}#{fd.name}"] = flags
    return found


def test_read_only_export_refuses_writes_and_never_opens_the_image_for_writing(chain4):
    images = {p.resolve() for p in chain4.values()}
    before = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in images}
    with serve(chain4["D"], "--read-only") as served:
        fds = _open_image_fds(nbdkit_pid(served), images)
        assert any(name.startswith(str(chain4["D"].resolve())) for name in fds), fds
        assert all(flags & os.O_ACCMODE == os.O_RDONLY for flags in fds.values()), fds

        h = connect(served)
        assert h.is_read_only()
        assert not h.can_trim() and not h.can_zero()
        assert nbd_errno(lambda: h.pwrite(b"x" * 512, 0)) == errno.EPERM  # refused by libnbd itself
        h.set_strict_mode(0)  # now the server must refuse them
        assert nbd_errno(lambda: h.pwrite(b"x" * 512, 0)) == errno.EPERM
        assert nbd_errno(lambda: h.zero(CLUSTER, 0)) == errno.EPERM
        assert nbd_errno(lambda: h.trim(CLUSTER, 0)) == errno.EPERM
        h.flush()
        assert h.pread(4096, 0) == b"\xa1" * 4096
        h.shutdown()

    assert {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in images} == before


def test_full_disk_gives_enospc_and_the_server_keeps_serving(tmp_path):
    with tmpfs(tmp_path / "small", "2M") as small:
        image = small / "disk.qcow2"
        run("qemu-img", "create", "-q", "-f", "qcow2", image, "64M")
        rng = random.Random(5)
        written: dict[int, bytes] = {}
        with serve(image) as served:
            h = connect(served)
            failure = None
            for offset in range(0, 64 * MiB, CLUSTER):
                data = rng.randbytes(CLUSTER)
                try:
                    h.pwrite(data, offset)
                except nbd.Error as exc:
                    failure = (offset, exc.errnum)
                    break
                written[offset] = data
            assert failure is not None, "a 2 MiB file system held 64 MiB"
            assert failure[1] == errno.ENOSPC, f"write at {failure[0]} failed with {errno.errorcode[failure[1]]}"
            assert h.aio_is_ready()

            for offset, data in written.items():  # everything acknowledged is still there
                assert h.pread(CLUSTER, offset) == data
            h.pwrite(b"\x99" * 4096, 0)  # an allocated cluster needs no space
            assert h.pread(4096, 0) == b"\x99" * 4096
            other = connect(served)
            assert other.pread(CLUSTER, CLUSTER) == written[CLUSTER]
            other.shutdown()
            h.shutdown()
            assert served.stop() == 0
        result = qemu_img_check(image)
        assert result.get("corruptions", 0) == 0 and result["check-errors"] == 0, result


# --- the server process ---------------------------------------------------------------------------------------


def test_socket_is_private_and_the_pid_file_appears_when_clients_can_connect(chain4):
    with serve(chain4["D"]) as served:
        pid_file = served.socket.with_suffix(".pid")
        # serve() returns as soon as the pid file exists: a client must be able to connect right then.
        h = connect(served)
        assert h.get_size() == DISK_SIZE
        mode = served.socket.stat().st_mode
        assert stat.S_ISSOCK(mode)
        assert stat.S_IMODE(mode) == 0o600
        assert int(pid_file.read_text()) == served.proc.pid
        h.shutdown()
        assert served.stop() == 0
        assert not served.socket.exists()
        assert not pid_file.exists()
        assert [p.name for p in served.socket.parent.iterdir() if p.name.startswith(".vd")] == []


def test_serve_fails_fast_with_one_line_on_a_broken_image(tmp_path):
    bad = tmp_path / "bad.qcow2"
    bad.write_bytes(b"QFI\xfb" + b"\x00" * 4092)
    proc = vdisk("serve", str(bad), "--socket", str(tmp_path / "s.sock"), check=False)
    assert proc.returncode != 0
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert str(bad) in proc.stderr
    assert not (tmp_path / "s.sock").exists()


def test_sigterm_stops_the_server_while_a_client_stays_connected(chain4, tmp_path):
    """nbdkit alone would wait for the client to leave; vdisk serve ends idle connections and exits cleanly."""
    with serve(chain4["D"]) as served:
        h = connect(served)
        h.pwrite(b"\x66" * 100_000, 2 * MiB + 7)

        assert served.stop(signal.SIGTERM, timeout=15) == 0

        assert nbd_errno(lambda: h.pread(512, 0)) in (errno.ENOTCONN, errno.ECONNRESET, errno.EPIPE)
    model = bytearray(qemu_raw(chain4["C"], tmp_path / "c.raw"))
    model[2 * MiB + 7 : 2 * MiB + 7 + 100_000] = b"\x66" * 100_000
    assert qemu_raw(chain4["D"], tmp_path / "d.raw") == model
    assert_clean(chain4["D"])


def test_qmp_quit_answers_and_stops_the_server_while_a_client_stays_connected(chain4):
    with serve(chain4["D"], qmp=True) as served:
        h = connect(served)
        h.pwrite(b"\x67" * 4096, 0)
        with socket.socket(socket.AF_UNIX) as monitor:
            monitor.connect(str(served.qmp))
            stream = monitor.makefile("rw")
            assert "QMP" in json.loads(stream.readline())
            for command in ("qmp_capabilities", "quit"):
                stream.write(json.dumps({"execute": command}) + "\n")
                stream.flush()
                reply = json.loads(stream.readline())
                while "event" in reply:  # events may come before the answer
                    reply = json.loads(stream.readline())
                assert reply == {"return": {}}, command

        assert served.proc.wait(15) == 0
    assert_clean(chain4["D"])
