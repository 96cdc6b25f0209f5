"""Fuzz targets: our parsers and the qcow2 open/read path, fed bytes.  Shared by the atheris harness
(``fuzz/run.py``, long coverage-guided runs) and the Hypothesis tests (``tests/test_fuzz_parsers.py``, short
seeded runs in CI).

Each target takes one input and returns normally when vdisk behaved: an input may be refused only with a
:class:`vdisk.errors.VdiskError` (our format errors, our QMP errors); any other exception escapes and is a
finding.  The targets also check what a correct result must look like (replies are whole ASCII messages,
chunking does not change what the QMP core reads, a parsed header obeys every limit parse_header promises,
reads fill exactly the buffer they were given).  Bounded time and memory are the harness's job (libFuzzer's
-timeout and -rss_limit_mb; tracemalloc and a clock in the tests).
"""

from __future__ import annotations

import itertools
import os
import shutil
import tempfile
from pathlib import Path

from vdisk.block import chain
from vdisk.errors import VdiskError
from vdisk.formats.qcow2 import format as fmt
from vdisk.qmp import connection, json_parser
from vdisk.qmp.commands import COMMANDS
from vdisk.qmp.connection import Command, Negotiated, QMPConnectionCore, Rejected
from vdisk.qmp.schema import validate_arguments

SCHEMAS = sorted(COMMANDS.items())

# Small limits so short inputs reach the size and nesting limits too.
QMP_LIMITS = {"max_message_size": 2048, "max_nesting": 48}
BYTEWISE_MAX = 256  # inputs up to this long are also fed one byte at a time


# --- QMP framing and arguments -----------------------------------------------------------------------------------


def _replies(core: QMPConnectionCore, chunks: list[bytes]) -> list[bytes]:
    """What the socket loop would send for these chunks: the core's own replies, and for a command the reply
    of argument validation against our schema (a stand-in for dispatch that runs no command)."""
    out = []
    for chunk in chunks:
        for item in core.receive_data(chunk):
            if isinstance(item, Command):
                assert isinstance(item.name, str) and isinstance(item.arguments, dict), item
                out.append(_validate_reply(item))
            else:
                assert isinstance(item, (Rejected, Negotiated)), item
                if isinstance(item, Rejected):
                    assert isinstance(item.error, VdiskError), repr(item.error)
                out.append(item.reply)
    for reply in out:
        assert reply.endswith(b"\r\n") and reply.isascii() and b"\n" not in reply[:-2], reply
    return out


def _validate_reply(command: Command) -> bytes:
    entry = COMMANDS.get(command.name)
    if entry is None:
        return connection.reply_exception(connection.command_not_found(command.name), command.id)
    try:
        checked = validate_arguments(entry[0], command.arguments)
    except VdiskError as exc:
        return connection.reply_exception(exc, command.id)
    return connection.reply_return(checked, command.id)


def _cuts(data: bytes) -> list[int]:
    """Chunk boundaries derived from the input itself (so a crash reproduces from the input alone)."""
    if not data:
        return []
    step = 1 + data[0] % 7
    return sorted({(i * step * 13 + data[i % len(data)]) % (len(data) + 1) for i in range(1, 1 + len(data) // 8)})


def qmp_framing(data: bytes) -> None:
    """Feed ``data`` to a QMP connection core whole, in input-derived chunks and (if short) byte by byte:
    every reply is a whole ASCII message, and chunking never changes the replies."""
    whole = _replies(QMPConnectionCore(capabilities=("oob",), **QMP_LIMITS), [data])
    bounds = [0, *_cuts(data), len(data)]
    chunked = _replies(QMPConnectionCore(capabilities=("oob",), **QMP_LIMITS),
                       [data[a:b] for a, b in itertools.pairwise(bounds)])
    assert chunked == whole, (whole, chunked)
    if len(data) <= BYTEWISE_MAX:
        bytewise = _replies(QMPConnectionCore(capabilities=("oob",), **QMP_LIMITS),
                            [data[i:i + 1] for i in range(len(data))])
        assert bytewise == whole, (whole, bytewise)


def qmp_arguments(data: bytes) -> None:
    """Parse ``data`` as JSON with our parser; validate every object it holds against every command schema.
    Only InvalidArgument may refuse it; an accepted result has only declared members and encodes as a reply."""
    parser = json_parser.JSONStreamParser(**QMP_LIMITS)
    values = [item.value for item in parser.feed(data + b"\x01") if isinstance(item, json_parser.JSONValue)]
    for value in values:
        if not isinstance(value, dict):
            continue
        for name, (schema, _handler) in SCHEMAS:
            arguments = value.get(name) if isinstance(value.get(name), dict) else value
            try:
                checked = validate_arguments(schema, arguments)
            except VdiskError:
                continue
            declared = {member.lstrip("*") for member in schema}
            assert set(checked) <= declared, (name, checked)
            assert connection.reply_return(checked, 1).endswith(b"\r\n")


# --- qcow2 header ------------------------------------------------------------------------------------------------


def qcow2_header(data: bytes) -> None:
    """parse_header on arbitrary bytes (the file size is the input's, or claimed larger): our error, or a header
    that obeys every limit parse_header promises."""
    for file_size in (len(data), None):
        try:
            h = fmt.parse_header(data, path="fuzz.qcow2", file_size=file_size)
        except VdiskError:
            continue
        cs = h.cluster_size
        assert h.version in (2, 3) and fmt.MIN_CLUSTER_BITS <= h.cluster_bits <= fmt.MAX_CLUSTER_BITS, h
        assert h.refcount_order <= fmt.MAX_REFCOUNT_ORDER and h.size <= fmt.MAX_VIRTUAL_SIZE, h
        assert h.l1_size * 8 <= fmt.MAX_L1_BYTES and h.l1_size * h.l2_entries * cs >= h.size, h
        assert 0 < h.refcount_table_clusters * cs <= fmt.MAX_REFCOUNT_TABLE_BYTES, h
        for offset, length in ((h.l1_table_offset, h.l1_size * 8),
                               (h.refcount_table_offset, h.refcount_table_clusters * cs)):
            assert offset % cs == 0 and offset + length <= fmt.MAX_HOST_OFFSET, h
            assert file_size is None or not length or offset + length <= file_size, h
        assert h.header_length <= cs and h.crypt_method == 0, h
        if h.backing_file is not None:
            assert len(h.backing_file.encode()) <= fmt.MAX_BACKING_FILE_NAME and "\0" not in h.backing_file, h
        assert not h.incompatible_features & ~fmt.INCOMPAT_SUPPORTED, h


# --- the qcow2 open/read (and write) path ------------------------------------------------------------------------

READ_SPANS = 64 * 1024  # bytes per read span: head, middle, tail of the disk
STATUS_SPAN = 1 << 20


class ImageWorkdir:
    """A private directory (tmpfs when there is one) holding the fuzzed image and a clean base image under the
    backing name the seeds use, plus a sentinel file: nothing but the image may ever change in it."""

    def __init__(self, base_image: bytes):
        self.path = Path(tempfile.mkdtemp(prefix=f"vdisk-fuzz-{os.getpid()}-", dir=self.parent()))
        self.image = self.path / "fuzz.qcow2"
        (self.path / "base.qcow2").write_bytes(base_image)
        (self.path / "sentinel").write_bytes(b"must not change")
        self._others = self._stamp()

    def _stamp(self) -> dict[str, tuple[int, int, int]]:
        out = {}
        for p in self.path.iterdir():
            if p != self.image:
                st = p.stat()
                out[p.name] = (st.st_mtime_ns, st.st_size, st.st_ino)
        return out

    def assert_only_the_image_changed(self) -> None:
        now = self._stamp()
        assert now == self._others, f"files beside the image changed: {self._others} -> {now}"

    def cleanup(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)

    @staticmethod
    def parent() -> str | None:
        return "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None

    @classmethod
    def remove_stale(cls) -> None:
        """Remove the directories of harness processes that are gone (libFuzzer exits without atexit)."""
        for path in Path(cls.parent() or tempfile.gettempdir()).glob("vdisk-fuzz-*-*"):
            pid = path.name.split("-")[2]
            if pid.isdigit() and not os.path.exists(f"/proc/{pid}"):
                shutil.rmtree(path, ignore_errors=True)


def _read_everywhere(top) -> None:
    size = top.size
    spans = [(0, min(size, 4 * READ_SPANS))]
    if size > 4 * READ_SPANS:
        spans += [((size // 2) & ~511, READ_SPANS), (size - READ_SPANS, READ_SPANS), (size - 1, 1)]
    for offset, length in spans:
        buf = bytearray(length)
        top.pread(buf, offset)
        assert len(buf) == length
    extents = top.block_status(0, min(size, STATUS_SPAN))
    assert sum(e.length for e in extents) == min(size, STATUS_SPAN), extents
    top.top.unallocated_clusters(0, min(-(-size // top.cluster_size), 4096))


def qcow2_image(data: bytes, workdir: ImageWorkdir, *, write: bool = False) -> None:
    """Open ``data`` as the top of a chain (read-only, or read-write with a dirty-bit repair) and read it,
    bounded: the head, the middle and the tail of the disk, block status over its first MiB.  With ``write``
    also write, zero and discard a little and flush.  Only our errors may refuse it, and nothing but the image
    file changes."""
    workdir.image.write_bytes(data)
    try:
        top = chain.open_chain(str(workdir.image), "qcow2", read_only=not write, allowed_dirs=[str(workdir.path)],
                               max_depth=4)
    except VdiskError:
        workdir.assert_only_the_image_changed()
        return
    try:
        _read_everywhere(top)
        if write:
            size = top.size
            for offset in {0, min(size // 2, 1 << 30) & ~511, max(0, size - 1536)}:
                length = min(1536, size - offset)
                if length > 0:
                    top.pwrite(bytes([0xA5]) * length, offset)
                    top.write_zeroes(offset, min(length, 512))
                    top.trim(offset, length)
            top.flush()
            _read_everywhere(top)
    except VdiskError:
        pass
    finally:
        try:
            top.close()
        except VdiskError:
            pass
    workdir.assert_only_the_image_changed()
