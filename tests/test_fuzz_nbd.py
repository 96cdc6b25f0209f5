"""Hostile NBD clients against a real `vdisk serve` (nbdkit + our plugin), on its unix socket only.

Three kinds of clients: fixed malformed handshakes and requests on a raw socket (``fuzz.nbd_wire``, a client
that checks every reply against the spec), seeded random sessions (``fuzz.nbd_sessions``: mutated handshakes,
requests with lengths near 2^32, offsets past the end, unknown commands and flags, bad magic, short write
payloads), and libnbd with strict mode off doing the same through its API.

The only allowed outcomes are the spec's replies (errors included) or a clean disconnect.  After every batch
the server still serves: a libnbd client reads what a model of the disk says.  After SIGTERM: vdisk serve
exits 0, its stderr (nbdkit's and our plugin's) holds no Python traceback and no error from our loggers, the
image is clean for ``qemu-img check`` and reads back as the model says through qemu-img.  Bounded loops.
"""

from __future__ import annotations

import contextlib
import errno
import random
import struct
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import nbd
import pytest

from fuzz import nbd_sessions
from fuzz import nbd_wire as w
from fuzz.nbd_sessions import WINDOW, Model
from tests.support.commands import run
from tests.support.images import assert_clean
from tests.support.serving import Served, serve

pytestmark = pytest.mark.timeout(150)

MiB = 1 << 20
SIZE = 128 * MiB  # room for a 64 MiB + 1 request inside the disk
HEAD = b"\x5a" * MiB + bytes(MiB)  # what the base holds in the first and last windows
TAIL = bytes(MiB) + b"\x6b" * MiB
RANDOM_SESSIONS = 400
LIBNBD_CALLS = 400
SEED = 20240605


# --- fixtures and checks ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """A 128 MiB base made by qemu-img/qemu-io with patterns in its first and last MiB."""
    path = tmp_path_factory.mktemp("nbd-fuzz") / "base.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", path, str(SIZE))
    run("qemu-io", "-c", "write -P 0x5a 0 1M", "-c", f"write -P 0x6b {SIZE - MiB} 1M", path)
    return path


@pytest.fixture
def top(base: Path, tmp_path: Path) -> Path:
    """An empty overlay on the shared base: the image each test serves (and may write)."""
    path = tmp_path / "top.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", "-b", str(base), "-F", "qcow2", path)
    return path


@pytest.fixture
def model() -> Model:
    return Model(SIZE, HEAD, TAIL)


@contextlib.contextmanager
def hostile_server(image: Path, model: Model, *extra: str) -> Iterator[Served]:
    """`vdisk serve` whose stderr is drained as it runs (nbdkit logs every bad request: an undrained pipe
    would stall it), then checked, with the image, after SIGTERM."""
    lines: list[str] = []
    with serve(image, *extra) as served:
        drain = threading.Thread(target=lambda: lines.extend(served.proc.stderr), daemon=True)
        drain.start()
        yield served
        assert served.proc.poll() is None, f"vdisk serve died: {''.join(lines)[-3000:]}"
        assert_serves(served, model)
    drain.join(30)
    log = "".join(lines)
    assert served.proc.returncode == 0, log[-3000:]
    assert "Traceback" not in log, log[-5000:]
    for line in lines:
        assert not line.startswith("vdisk[") or (": ERROR:" not in line and ": CRITICAL:" not in line), line
        assert "unexpected error" not in line and "assertion" not in line.lower(), line
    assert_clean(image)
    assert_image_agrees(image, model)


def assert_serves(served: Served, model: Model) -> None:
    """A well-behaved libnbd client connects and reads both windows as the model says."""
    h = nbd.NBD()
    h.connect_unix(str(served.socket))
    try:
        assert h.get_size() == model.size
        for start in model.data:
            got = b"".join(h.pread(MiB, start + i) for i in range(0, WINDOW, MiB))
            problem = model.mismatch(start, got)
            assert problem is None, problem
    finally:
        h.shutdown()


def assert_image_agrees(image: Path, model: Model) -> None:
    """The windows as qemu-img reads them from the chain (the oracle for what reached the image)."""
    raw = image.parent / "image.raw"
    run("qemu-img", "convert", "-U", "-f", "qcow2", "-O", "raw", image, raw)  # sparse: zeros stay holes
    try:
        with open(raw, "rb") as f:
            for start in model.data:
                f.seek(start)
                problem = model.mismatch(start, f.read(WINDOW))
                assert problem is None, f"qemu-img reads the image differently: {problem}"
    finally:
        raw.unlink()


def wire(served: Served) -> w.Wire:
    return w.Wire(str(served.socket), timeout=15)


# --- malformed handshakes -----------------------------------------------------------------------------------------


def _closed(c: w.Wire) -> None:
    c.wait_closed()


def _option_error(option: int, data: bytes, *, length: int | None = None, errors=None) -> Callable[[w.Wire], None]:
    """After a good start, ``option`` gets one of the spec's error replies and the handshake goes on."""

    def case(c: w.Wire) -> None:
        c.greeting()
        c.client_flags()
        c.option(option, data, length=length)
        reply = c.option_replies(option)[-1]
        assert reply.is_error, reply
        if errors is not None:
            assert reply.reply_type in errors, reply
        c.option(w.OPT_GO, w.go_data())  # and the session is still usable
        assert c.option_replies(w.OPT_GO)[-1].reply_type == w.REP_ACK

    return case


def _start(c: w.Wire) -> None:
    c.greeting()
    c.client_flags()


def _unknown_client_flags(c: w.Wire) -> None:
    c.greeting()
    c.client_flags(0xFFFFFFFF)
    _closed(c)


def _truncated_client_flags(c: w.Wire) -> None:
    c.greeting()
    c.send(b"\0\0")


def _bad_option_magic(c: w.Wire) -> None:
    _start(c)
    c.option(w.OPT_GO, w.go_data(), magic=0x4948415645AAAAAA)
    _closed(c)


def _truncated_option_header(c: w.Wire) -> None:
    _start(c)
    c.send(struct.pack(">Q", w.IHAVEOPT) + b"\0\0")


def _option_length_over_64_MiB(length: int) -> Callable[[w.Wire], None]:
    def case(c: w.Wire) -> None:
        _start(c)
        c.option(w.OPT_GO, b"", length=length)
        _closed(c)  # nbdkit refuses to read that much option data: "client option data too long"

    return case


def _option_data_shorter_than_length(c: w.Wire) -> None:
    _start(c)
    c.option(w.OPT_GO, w.go_data()[:4], length=100)  # then we leave


def _option_64_MiB_announced_then_leave(c: w.Wire) -> None:
    _start(c)
    c.option(w.OPT_INFO, b"\0" * 1000, length=64 * MiB)


def _more_than_32_options(c: w.Wire) -> None:
    """nbdkit ends a handshake after 32 options (MAX_NR_OPTIONS; each NBD_OPT_LIST buys 32 more per export)."""
    _start(c)
    for sent in range(1, 41):
        try:
            c.option(12)
            c.option_replies(12)
        except w.Disconnected:
            assert sent > 8, "closed after only a few options"
            return
    raise AssertionError("40 options in one handshake were all answered (nbdkit allows 32)")


def _go_then_read(name_infos: tuple[bytes, tuple[int, ...]]) -> Callable[[w.Wire], None]:
    """GO with unknown info requests: the server ignores what it does not know and the export works."""

    def case(c: w.Wire) -> None:
        _start(c)
        c.option(w.OPT_GO, w.go_data(*name_infos))
        replies = c.option_replies(w.OPT_GO)
        assert replies[-1].reply_type == w.REP_ACK, replies
        infos = {struct.unpack_from(">H", r.data)[0] for r in replies if r.reply_type == w.REP_INFO}
        assert w.INFO_EXPORT in infos
        c.request(w.CMD_READ, 0, 512, cookie=9)
        assert c.reply(9, 0, 512).data == b"\x5a" * 512

    return case


def _meta_contexts_listed(c: w.Wire) -> None:
    """LIST_META_CONTEXT with odd names: the server answers each query (maybe with no context) and ACKs."""
    c.greeting()
    c.client_flags()
    c.option(w.OPT_STRUCTURED_REPLY)
    assert c.option_reply(w.OPT_STRUCTURED_REPLY).reply_type == w.REP_ACK
    odd = (b"base:allocation\0junk", b"\xff\xfe", b"\xc0\x80", b"qemu:dirty-bitmap:\x01\x02", b":", b"",
           b"base:", "base:allocationé".encode(), b"\n")
    for name in odd:
        c.option(w.OPT_LIST_META_CONTEXT, w.meta_context_data(b"", (name,)))
        replies = c.option_replies(w.OPT_LIST_META_CONTEXT)
        for reply in replies[:-1]:
            assert reply.reply_type == w.REP_META_CONTEXT, (name, replies)
            assert reply.data[4:] != name or name == b"base:allocation", (name, replies)
    c.option(w.OPT_SET_META_CONTEXT, w.meta_context_data(b"", (b"base:allocation\0", b"\xff")))
    replies = c.option_replies(w.OPT_SET_META_CONTEXT)
    assert replies[-1].reply_type == w.REP_ACK or replies[-1].is_error, replies
    c.option(w.OPT_GO, w.go_data())
    assert c.option_replies(w.OPT_GO)[-1].reply_type == w.REP_ACK
    c.structured = True
    c.request(w.CMD_BLOCK_STATUS, 0, 4096, cookie=3)  # no context was selected: EINVAL
    assert c.reply(3).error == errno.EINVAL


HANDSHAKE_CASES: dict[str, Callable[[w.Wire], None]] = {
    "unknown-client-flags": _unknown_client_flags,
    "truncated-client-flags": _truncated_client_flags,
    "bad-option-magic": _bad_option_magic,
    "truncated-option-header": _truncated_option_header,
    "option-length-2^32-1": _option_length_over_64_MiB(0xFFFFFFFF),
    "option-length-2^31": _option_length_over_64_MiB(1 << 31),
    "option-length-64MiB+1": _option_length_over_64_MiB(64 * MiB + 1),
    "option-data-shorter-than-length": _option_data_shorter_than_length,
    "option-64MiB-announced-then-leave": _option_64_MiB_announced_then_leave,
    "unknown-option-0": _option_error(0, b"", errors={w.REP_ERR_UNSUP}),
    "unknown-option-12": _option_error(12, b"xyz", errors={w.REP_ERR_UNSUP}),
    "unknown-option-2^31": _option_error(1 << 31, b"", errors={w.REP_ERR_UNSUP}),
    "unknown-option-2^32-1": _option_error(0xFFFFFFFF, b"\0" * 64, errors={w.REP_ERR_UNSUP}),
    "extended-headers-unsupported": _option_error(w.OPT_EXTENDED_HEADERS, b""),
    "starttls-without-tls": _option_error(w.OPT_STARTTLS, b""),
    "list-with-payload": _option_error(w.OPT_LIST, b"junk", errors={w.REP_ERR_INVALID}),
    "structured-reply-with-payload": _option_error(w.OPT_STRUCTURED_REPLY, b"x", errors={w.REP_ERR_INVALID}),
    "info-name-longer-than-option": _option_error(w.OPT_INFO, w.go_data(b"ab", name_length=1000)),
    "info-name-length-2^32-1": _option_error(w.OPT_INFO, w.go_data(b"", name_length=0xFFFFFFFF)),
    "info-count-lies": _option_error(w.OPT_INFO, w.go_data(b"", (3,), info_count=0xFFFF)),
    "info-name-over-4096": _option_error(w.OPT_INFO, w.go_data(b"x" * (w.MAX_STRING + 1))),
    "go-name-with-nul": _option_error(w.OPT_GO, w.go_data(b"a\0b")),
    "go-truncated-payload": _option_error(w.OPT_GO, b"\0\0"),
    "set-meta-context-before-structured": _option_error(
        w.OPT_SET_META_CONTEXT, w.meta_context_data(b"", (b"base:allocation",))),
    "list-meta-context-count-lies": _option_error(
        w.OPT_LIST_META_CONTEXT, w.meta_context_data(b"", (b"base:allocation",), query_count=0xFFFFFFFF)),
    "list-meta-context-name-over-4096": _option_error(
        w.OPT_LIST_META_CONTEXT, w.meta_context_data(b"", (b"base:" + b"x" * w.MAX_STRING,))),
    "go-with-unknown-info-requests": _go_then_read((b"", (7, 0xFFFF, w.INFO_BLOCK_SIZE, w.INFO_NAME))),
    "more-than-32-options": _more_than_32_options,
    "meta-context-names-with-odd-bytes": _meta_contexts_listed,
}


def test_malformed_handshakes_get_error_replies_or_a_disconnect(top, model):
    with hostile_server(top, model) as served:
        for name, case in HANDSHAKE_CASES.items():
            with wire(served) as c:
                try:
                    case(c)
                except (AssertionError, w.SpecViolation, w.Disconnected, TimeoutError) as exc:
                    raise AssertionError(f"handshake case {name}: {exc!r}") from exc
        assert_serves(served, model)


# --- malformed requests after a good handshake ----------------------------------------------------------------------


def _expect_error(c: w.Wire, errors: set[int], command: int, offset: int, length: int, flags: int = 0,
                  payload: bytes = b"") -> None:
    c.request(command, offset, length, flags=flags, cookie=0xDEADBEEF00 + command, payload=payload)
    reply = c.reply(0xDEADBEEF00 + command)
    assert reply.error in errors, (command, offset, length, flags, reply)


def _still_reads(c: w.Wire) -> None:
    c.request(w.CMD_READ, 4096, 512, cookie=77)
    assert c.reply(77, 4096, 512).data == b"\x5a" * 512


EINVAL, ENOSPC, ENOMEM, ENOTSUP = errno.EINVAL, errno.ENOSPC, errno.ENOMEM, errno.ENOTSUP
UNKNOWN_FLAGS = [1 << bit for bit in range(5, 16)]


def _refused_requests(c: w.Wire) -> None:
    """Requests nbdkit must answer with an error, each followed by a read that still works."""
    either = {EINVAL, ENOSPC}
    cases = [
        (EINVAL, w.CMD_READ, SIZE - 1, 2, 0),
        (EINVAL, w.CMD_READ, SIZE, 1, 0),
        (EINVAL, w.CMD_READ, (1 << 64) - 1, 1, 0),
        (EINVAL, w.CMD_READ, 1 << 63, 512, 0),
        (EINVAL, w.CMD_READ, 0, 0xFFFFFFFF, 0),
        (EINVAL, w.CMD_READ, 0, 0, 0),
        (ENOMEM, w.CMD_READ, 0, 64 * MiB + 1, 0),
        (EINVAL, w.CMD_READ, 0, 512, w.CMD_FLAG_REQ_ONE),
        (EINVAL, w.CMD_READ, 0, 512, w.CMD_FLAG_FAST_ZERO),
        (EINVAL, w.CMD_TRIM, 0, 512, w.CMD_FLAG_NO_HOLE),
        (either, w.CMD_WRITE_ZEROES, 0, 0xFFFFFFFF, 0),
        (EINVAL, w.CMD_TRIM, (1 << 64) - 512, 1024, 0),
        (EINVAL, w.CMD_CACHE, SIZE, 1, 0),
        (EINVAL, w.CMD_FLUSH, 0, 512, 0),
        (EINVAL, w.CMD_FLUSH, 1, 0, 0),
        (EINVAL, w.CMD_BLOCK_STATUS, 0, 512, 0),  # no meta context negotiated
        *[(EINVAL, cmd, 0, 512, 0) for cmd in (8, 9, 63, 0x7FFF, 0xFFFF)],
        *[(EINVAL, w.CMD_READ, 0, 512, flag) for flag in UNKNOWN_FLAGS],
        *[(EINVAL, w.CMD_WRITE_ZEROES, 0, 512, flag) for flag in UNKNOWN_FLAGS[:3]],
        (EINVAL, 0xFFFF, 0, 0xFFFFFFFF, 0),  # unknown command announcing 4 GiB: no payload follows
    ]
    if not c.structured:
        cases.append((EINVAL, w.CMD_READ, 0, 512, w.CMD_FLAG_DF))  # DF needs structured replies
    for expected, command, offset, length, flags in cases:
        _expect_error(c, expected if isinstance(expected, set) else {expected}, command, offset, length, flags)
        _still_reads(c)


def _refused_writes_have_their_payload_skipped(c: w.Wire) -> None:
    for offset, length, errors in [
        (SIZE - 100, 4096, {ENOSPC}),  # past the end
        ((1 << 64) - 512, 4096, {ENOSPC, EINVAL}),
        (0, 64 * MiB + 1, {ENOMEM}),  # over nbdkit's 64 MiB limit, but it reads and drops the payload
    ]:
        _expect_error(c, errors, w.CMD_WRITE, offset, length, payload=b"\xee" * length)
        _still_reads(c)
    for flag in UNKNOWN_FLAGS[:4] + [w.CMD_FLAG_DF, w.CMD_FLAG_REQ_ONE]:
        _expect_error(c, {EINVAL}, w.CMD_WRITE, 0, 512, flag, payload=b"\xee" * 512)
        _still_reads(c)


def _closes_on(send: Callable[[w.Wire], None]) -> Callable[[w.Wire], None]:
    def case(c: w.Wire) -> None:
        send(c)
        assert c.wait_closed() == b""

    return case


REQUEST_CASES: dict[str, Callable[[w.Wire], None]] = {
    "refused-requests": _refused_requests,
    "refused-writes-payload-skipped": _refused_writes_have_their_payload_skipped,
    "bad-request-magic": _closes_on(lambda c: c.request(w.CMD_READ, 0, 512, magic=0x25609514)),
    "zero-request-magic": _closes_on(lambda c: c.request(w.CMD_READ, 0, 512, magic=0)),
    "write-2^32-1-without-payload": _closes_on(lambda c: c.request(w.CMD_WRITE, 0, 0xFFFFFFFF)),
    "write-over-128MiB-inside-nothing": _closes_on(lambda c: c.request(w.CMD_WRITE, 0, 128 * MiB + 1)),
    "disconnect-command": _closes_on(lambda c: c.request(w.CMD_DISC, 0, 0)),
    "disconnect-command-with-junk-fields": _closes_on(lambda c: c.request(w.CMD_DISC, 1 << 63, 0xFFFFFFFF, flags=7)),
    "write-payload-shorter-then-leave": lambda c: c.request(w.CMD_WRITE, 0, MiB, payload=b"\xee" * 1000),
    "write-64MiB-payload-shorter-then-leave": lambda c: c.request(w.CMD_WRITE, 0, 64 * MiB, payload=b"\xee" * 4096),
    "request-header-truncated": lambda c: c.send(struct.pack(">IHH", w.REQUEST_MAGIC, 0, w.CMD_WRITE)),
    "garbage-after-handshake": _closes_on(lambda c: c.send(random.Random(7).randbytes(4096))),
}


@pytest.mark.parametrize("structured", [False, True], ids=["simple", "structured"])
def test_malformed_requests_get_error_replies_or_a_disconnect(top, model, structured):
    with hostile_server(top, model) as served:
        for name, case in REQUEST_CASES.items():
            with wire(served) as c:
                c.handshake(structured=structured)
                try:
                    case(c)
                except (AssertionError, w.SpecViolation, w.Disconnected, TimeoutError) as exc:
                    raise AssertionError(f"request case {name}: {exc!r}") from exc
            assert_serves(served, model)


# --- random sessions ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("thread_model", [(), ("--parallel",)], ids=["serialized", "parallel"])
def test_random_hostile_sessions_leave_the_server_serving_and_the_image_clean(top, model, thread_model):
    rng = random.Random(SEED + len(thread_model))
    stats = nbd_sessions.Stats()
    with hostile_server(top, model, *thread_model) as served:
        for number in range(RANDOM_SESSIONS // 2):
            try:
                nbd_sessions.session(str(served.socket), rng, model, stats)
            except Exception as exc:
                raise AssertionError(f"session {number} (seed {SEED}): {exc!r}; so far {stats}") from exc
            if number % 50 == 49:
                assert_serves(served, model)
    # the seeded run must have reached the plugin and the error paths alike
    assert stats.replies > 100 and stats.error_replies > 50 and stats.disconnects > 5, stats


# --- libnbd with strict mode off --------------------------------------------------------------------------------------

# Errors a call may end with: the server's (the spec's NBD errors) or libnbd's own for what it refuses to send.
LIBNBD_ERRORS = w.NBD_ERRORS | {errno.ERANGE, errno.ENOTSUP, errno.EOVERFLOW, errno.ENOTCONN, errno.EINVAL}


def _libnbd(served: Served) -> nbd.NBD:
    h = nbd.NBD()
    h.set_strict_mode(0)  # send what the protocol forbids
    h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
    h.connect_unix(str(served.socket))
    return h


def _random_call(rng: random.Random, h: nbd.NBD, model: Model) -> None:
    size = model.size
    kind = rng.choice(["pread", "pread", "pwrite", "pwrite", "zero", "trim", "cache", "flush", "status"])
    offset = rng.choice([0, 1, 4096, size - 512, size - 1, size, size + 1, (1 << 63) - 1, (1 << 64) - 1,
                         rng.randrange(size)])
    length = rng.choice([0, 1, 512, 4096, 65536, 64 * MiB + 1, (1 << 32) - 1, 1 << 32, rng.randrange(1, 1 << 20)])
    flags = rng.choice([0, 0, nbd.CMD_FLAG_FUA, nbd.CMD_FLAG_DF, nbd.CMD_FLAG_REQ_ONE, nbd.CMD_FLAG_FAST_ZERO,
                        nbd.CMD_FLAG_NO_HOLE, 1 << 7, 0xFFFF])
    in_range = 0 < length and offset + length <= size
    if kind in ("pwrite", "zero", "trim") and in_range:  # data changes only inside the model's windows
        length = min(length, WINDOW // 2)
        offset = rng.choice(list(model.data)) + rng.randrange(WINDOW - length + 1)
    if kind == "pread":
        length = min(length, 4 * MiB)  # libnbd refuses reads over 64 MiB itself; raw sockets test those
        data = h.pread(length, offset, flags)
        problem = model.mismatch(offset, data)
        assert problem is None, problem
    elif kind == "pwrite":
        length = min(length, 64 * MiB + 1)  # libnbd itself refuses payloads over 64 MiB (ERANGE)
        payload = rng.randbytes(length) if length <= MiB else bytes(length)
        h.pwrite(payload, offset, flags)
        model.apply(nbd_sessions.w.CMD_WRITE, offset, payload, len(payload))
    elif kind == "zero":
        h.zero(length, offset, flags)
        model.apply(nbd_sessions.w.CMD_WRITE_ZEROES, offset, b"", length)
    elif kind == "trim":
        h.trim(length, offset, flags)
        model.apply(nbd_sessions.w.CMD_TRIM, offset, b"", length)
    elif kind == "cache":
        h.cache(length, offset, flags)
    elif kind == "flush":
        h.flush(flags)
    else:
        h.block_status(length, offset, lambda *args: 0, flags)


def test_libnbd_without_strict_mode_gets_only_nbd_errors(top, model):
    rng = random.Random(SEED)
    failures = reconnects = 0
    with hostile_server(top, model) as served:
        h = _libnbd(served)
        for number in range(LIBNBD_CALLS):
            try:
                _random_call(rng, h, model)
            except nbd.Error as exc:
                failures += 1
                assert exc.errnum in LIBNBD_ERRORS, f"call {number}: {exc}"
            if not h.aio_is_ready():  # the server (or libnbd) ended the connection: reconnect
                reconnects += 1
                h.close()
                h = _libnbd(served)
            if number % 100 == 99:
                assert_serves(served, model)
        h.shutdown()
    assert failures > 50 and reconnects < LIBNBD_CALLS // 4, (failures, reconnects)


def test_libnbd_options_with_odd_names_and_contexts(top, model):
    """Opt mode with strict mode off: odd export names and meta context queries never break the handshake
    (libnbd 1.14 lists contexts in opt mode; GO then sets the odd one beside base:allocation)."""
    names = ["", "x" * 4096, "é", "\x01", "a/b", "..", " "]
    contexts = ["base:allocation\x01", ":", "", "base:", "qemu:dirty-bitmap:" + "é" * 100, "x" * 5000]
    with hostile_server(top, model) as served:
        for name in names:
            h = nbd.NBD()
            h.set_strict_mode(0)
            h.set_opt_mode(True)
            h.connect_unix(str(served.socket))
            h.set_export_name(name)
            for context in contexts:
                h.clear_meta_contexts()
                with contextlib.suppress(nbd.Error):  # libnbd refuses names over 4096 bytes itself
                    h.add_meta_context(context)
                    h.opt_list_meta_context(lambda *args: 0)
            h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)  # GO sets the odd one and base:allocation
            with contextlib.suppress(nbd.Error):
                h.opt_info()
            with contextlib.suppress(nbd.Error):
                h.opt_go()
            if h.aio_is_ready():
                assert h.pread(512, 0) == b"\x5a" * 512
                h.shutdown()
            else:
                h.close()
        assert_serves(served, model)
