"""vdisk.io.native: the compiled core and the pure-Python reference, held to the same results.

Every behavioural test runs once per implementation (``core`` is parametrised over ``c`` and ``python``);
the C run is skipped when the extension is not built, except in CI where a test insists it is.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vdisk.io import native
from vdisk.errors import OutOfRange, StorageError

pytestmark = pytest.mark.timeout(300)  # a broken loop in either core hangs rather than fails

IMPLS = native.implementations()
CORES = [
    pytest.param(IMPLS.get("c"), id="c", marks=pytest.mark.skipif("c" not in IMPLS, reason="C core not built")),
    pytest.param(IMPLS["python"], id="python"),
]
parametrize_core = pytest.mark.parametrize("core", CORES)

MiB = 1 << 20
SHM = Path("/dev/shm")
HYPOTHESIS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# --- helpers ----------------------------------------------------------------------------------------------


def model_zero_map(data: bytes, cluster_size: int) -> list[bool]:
    return [not any(data[i : i + cluster_size]) for i in range(0, len(data), cluster_size)]


def write_file(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


class Fds:
    """Opens files and closes them all at the end of a test."""

    def __init__(self) -> None:
        self.fds: list[int] = []

    def open(self, path: Path | str, flags: int, mode: int = 0o644) -> int:
        fd = os.open(path, flags, mode)
        self.fds.append(fd)
        return fd

    def close(self) -> None:
        for fd in self.fds:
            os.close(fd)


@pytest.fixture
def fds():
    opened = Fds()
    yield opened
    opened.close()


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("native")


@pytest.fixture
def shm_dir(tmp_path):
    """A directory on tmpfs (a different file system from tmp_path on most machines)."""
    if not SHM.is_dir() or not os.access(SHM, os.W_OK):
        pytest.skip("/dev/shm is not available")
    path = SHM / f"vdisk-test-{os.getpid()}-{tmp_path.name}"
    path.mkdir()
    yield path
    for child in path.iterdir():
        child.unlink()
    path.rmdir()


def rng_bytes(seed: int, length: int) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, length, dtype=np.uint8).tobytes()


# --- loading and the version stamp ----------------------------------------------------------------------


def test_ci_has_the_compiled_core():
    if not os.environ.get("CI"):
        pytest.skip("only enforced in CI ($CI set)")
    assert native.BACKEND == "c", "the C core must be built in CI (pip install -e .)"


def test_module_functions_are_bound_to_the_preferred_backend():
    preferred = IMPLS["c"] if "c" in IMPLS else IMPLS["python"]
    assert native.BACKEND == preferred.name
    for name in ("zero_map", "is_zero", "pread_full", "pwrite_full", "pwrite_selected", "copy_range"):
        assert getattr(native, name).__self__ is preferred


def test_header_version_stamp_matches_the_python_constant():
    header = Path(__file__).resolve().parent.parent / "native" / "copier.h"
    if not header.exists():
        pytest.skip("no source tree")
    match = re.search(r"#define\s+VDISK_COPIER_VERSION\s+(\d+)", header.read_text())
    assert match, "copier.h must define VDISK_COPIER_VERSION"
    assert int(match.group(1)) == native.EXPECTED_VERSION


@pytest.mark.skipif("c" not in IMPLS, reason="C core not built")
def test_loaded_c_core_carries_the_expected_stamp():
    assert IMPLS["c"].version == native.EXPECTED_VERSION


def test_stale_compiled_core_is_refused_with_a_warning(caplog):
    stale = SimpleNamespace(
        __file__="/x/_copier.so", ffi=None, lib=SimpleNamespace(vdisk_version=lambda: native.EXPECTED_VERSION + 1)
    )
    with caplog.at_level(logging.WARNING, logger="vdisk.io.native"):
        assert native.core_from_module(stale) is None
    assert "stale" in caplog.text and "/x/_copier.so" in caplog.text


def test_compiled_core_without_a_stamp_is_refused(caplog):
    stampless = SimpleNamespace(__file__="/x/_copier.so", ffi=None, lib=SimpleNamespace())
    with caplog.at_level(logging.WARNING, logger="vdisk.io.native"):
        assert native.core_from_module(stampless) is None
    assert "stale" in caplog.text


# --- zero_map / is_zero ---------------------------------------------------------------------------------


@parametrize_core
@HYPOTHESIS
@given(
    cluster_size=st.sampled_from([1, 3, 8, 24, 64, 72, 512, 4096]),
    clusters=st.lists(
        st.one_of(st.none(), st.tuples(st.floats(0, 1, exclude_max=True), st.integers(1, 255))), max_size=24
    ),
    misalign=st.integers(0, 7),
)
def test_zero_map_agrees_with_a_bytewise_model(core, cluster_size, clusters, misalign):
    """Each cluster is all zeros (None) or has one nonzero byte at a relative position."""
    data = bytearray(misalign + cluster_size * len(clusters))
    for cluster_index, spec in enumerate(clusters):
        if spec is not None:
            where, value = spec
            data[misalign + cluster_index * cluster_size + int(where * cluster_size)] = value
    view = memoryview(data)[misalign:]  # also exercises unaligned buffers
    result = core.zero_map(view, cluster_size)
    assert result.dtype == np.bool_
    assert result.tolist() == model_zero_map(bytes(view), cluster_size)
    assert core.is_zero(view) == all(spec is None for spec in clusters)


@parametrize_core
@pytest.mark.parametrize("cluster_size", [512, 4096, 65536])
def test_zero_map_on_random_data_has_no_zero_clusters(core, cluster_size):
    data = np.frombuffer(rng_bytes(1, 64 * cluster_size), dtype=np.uint8)
    assert not core.zero_map(data, cluster_size).any()


@parametrize_core
def test_zero_map_on_all_zero_buffer(core):
    assert core.zero_map(bytes(4 * MiB), 65536).all()
    assert core.is_zero(bytes(4 * MiB))


@parametrize_core
@pytest.mark.parametrize("cluster_size", [512, 65536])
def test_zero_map_finds_zero_clusters_at_start_and_end(core, cluster_size):
    data = bytearray(rng_bytes(2, 8 * cluster_size))
    data[: 2 * cluster_size] = bytes(2 * cluster_size)
    data[-cluster_size:] = bytes(cluster_size)
    assert core.zero_map(data, cluster_size).tolist() == [True, True] + [False] * 5 + [True]


@parametrize_core
@pytest.mark.parametrize("position", [0, 1, 7, 8, 63, 64, 65, 4095])
def test_zero_map_sees_a_single_bit_anywhere_in_the_cluster(core, position):
    data = bytearray(3 * 4096)
    data[4096 + position] = 0x80
    assert core.zero_map(data, 4096).tolist() == [True, False, True]
    assert not core.is_zero(data)


@parametrize_core
def test_zero_map_of_empty_buffer_is_empty(core):
    assert core.zero_map(b"", 4096).shape == (0,)
    assert core.is_zero(b"")


@parametrize_core
@pytest.mark.parametrize("length", [1, 7, 9, 63, 65, 1000])
def test_is_zero_checks_the_tail_of_odd_lengths(core, length):
    data = bytearray(length)
    assert core.is_zero(data)
    data[-1] = 1
    assert not core.is_zero(data)


@parametrize_core
def test_zero_map_accepts_every_buffer_kind(core):
    words = np.zeros(1024, dtype=">u8")  # a qcow2 table view: big-endian 8-byte entries
    words[600] = 1
    expected = [True, False]
    for buf in (
        words,
        words.tobytes(),
        bytearray(words.tobytes()),
        memoryview(words.tobytes()),
        words.view(np.uint8),
        words.reshape(2, 512),
    ):
        assert core.zero_map(buf, 4096).tolist() == expected


# --- pread_full / pwrite_full -----------------------------------------------------------------------------


@parametrize_core
@HYPOTHESIS
@given(file_len=st.integers(0, 20000), offset=st.integers(0, 25000), length=st.integers(0, 20000))
def test_pread_full_reads_zeros_past_eof(core, workdir, file_len, offset, length):
    data = rng_bytes(file_len, file_len)
    path = write_file(workdir / f"pread-{core.name}", data)
    fd = os.open(path, os.O_RDONLY)
    try:
        buf = bytearray(b"\xaa" * length)
        core.pread_full(fd, buf, offset)
    finally:
        os.close(fd)
    expected = data[offset : offset + length]
    assert bytes(buf) == expected + bytes(length - len(expected))


@parametrize_core
def test_pread_full_into_numpy_array_and_memoryview_slice(core, tmp_path, fds):
    data = rng_bytes(3, 3 * MiB + 17)
    fd = fds.open(write_file(tmp_path / "f", data), os.O_RDONLY)
    words = np.empty(3 * MiB // 8 + 8, dtype=np.uint64)
    core.pread_full(fd, words, 0)
    assert words.tobytes() == data + bytes(words.nbytes - len(data))
    backing = bytearray(100)
    core.pread_full(fd, memoryview(backing)[10:20], 5)
    assert backing[10:20] == data[5:15] and backing[:10] == bytes(10) and backing[20:] == bytes(80)


@parametrize_core
@HYPOTHESIS
@given(initial_len=st.integers(0, 10000), offset=st.integers(0, 15000), length=st.integers(0, 10000))
def test_pwrite_full_matches_a_bytearray_model(core, workdir, initial_len, offset, length):
    initial = rng_bytes(1000 + initial_len, initial_len)
    payload = rng_bytes(2000 + length, length)
    path = write_file(workdir / f"pwrite-{core.name}", initial)
    fd = os.open(path, os.O_WRONLY)
    try:
        core.pwrite_full(fd, payload, offset)
    finally:
        os.close(fd)
    model = bytearray(initial)
    if length:
        model.extend(bytes(max(0, offset + length - len(model))))
        model[offset : offset + length] = payload
    assert path.read_bytes() == bytes(model)


# --- pwrite_selected --------------------------------------------------------------------------------------


def check_pwrite_selected(
    core, path: Path, cluster_size: int, select: np.ndarray, host_offset: int, seed: int = 0
) -> None:
    data = rng_bytes(seed, len(select) * cluster_size)
    initial = rng_bytes(seed + 1, 3000)
    write_file(path, initial)
    fd = os.open(path, os.O_WRONLY)
    try:
        written = core.pwrite_selected(fd, data, cluster_size, select, host_offset)
    finally:
        os.close(fd)
    packed = b"".join(data[i * cluster_size : (i + 1) * cluster_size] for i in np.flatnonzero(select))
    model = bytearray(initial)
    if packed:
        model.extend(bytes(max(0, host_offset + len(packed) - len(model))))
        model[host_offset : host_offset + len(packed)] = packed
    assert written == int(np.count_nonzero(select))
    assert path.read_bytes() == bytes(model)


@parametrize_core
@HYPOTHESIS
@given(
    cluster_size=st.sampled_from([1, 512, 520, 4096]),
    select=st.lists(st.booleans(), max_size=40),
    host_offset=st.integers(0, 5000),
)
def test_pwrite_selected_packs_selected_clusters(core, workdir, cluster_size, select, host_offset):
    check_pwrite_selected(core, workdir / f"sel-{core.name}", cluster_size, np.array(select, dtype=bool), host_offset)


@parametrize_core
@pytest.mark.parametrize(
    "pattern",
    ["none", "all", "first", "last", "alternating", "every_third", "runs_of_five"],
)
def test_pwrite_selected_patterns(core, tmp_path, pattern):
    n = 3000  # alternating gives 1500 runs: more than one pwritev batch (IOV_MAX = 1024)
    index = np.arange(n)
    select = {
        "none": np.zeros(n, bool),
        "all": np.ones(n, bool),
        "first": index == 0,
        "last": index == n - 1,
        "alternating": index % 2 == 0,
        "every_third": index % 3 == 1,
        "runs_of_five": (index // 5) % 2 == 1,
    }[pattern]
    check_pwrite_selected(core, tmp_path / "f", 512, select, 4096, seed=7)


@parametrize_core
def test_pwrite_selected_accepts_integer_flags(core, tmp_path):
    check_pwrite_selected(core, tmp_path / "f", 512, np.array([0, 3, 0, 1], dtype=np.uint8), 0)


# --- copy_range --------------------------------------------------------------------------------------------


def check_copy(core, src: Path, dst: Path, src_offset: int, dst_offset: int, length: int) -> None:
    source = src.read_bytes()
    before = dst.read_bytes()
    src_fd = os.open(src, os.O_RDONLY)
    dst_fd = os.open(dst, os.O_WRONLY)
    try:
        core.copy_range(src_fd, src_offset, dst_fd, dst_offset, length)
    finally:
        os.close(src_fd)
        os.close(dst_fd)
    piece = source[src_offset : src_offset + length]
    piece += bytes(length - len(piece))
    model = bytearray(before)
    model.extend(bytes(max(0, dst_offset + length - len(model))))
    model[dst_offset : dst_offset + length] = piece
    assert dst.read_bytes() == bytes(model)


COPY_CASES = [
    # (source length, src_offset, dst_offset, length)
    pytest.param(100_000, 0, 0, 100_000, id="whole"),
    pytest.param(100_000, 4096, 12288, 50_000, id="middle"),
    pytest.param(100_000, 90_000, 0, 30_000, id="past_eof"),
    pytest.param(100_000, 200_000, 512, 10_000, id="entirely_past_eof"),
    pytest.param(3 * MiB + 12345, 17, 4096, 3 * MiB + 12328, id="larger_than_bounce"),
    pytest.param(MiB + 5, 0, 0, 4 * MiB + 3, id="larger_than_bounce_past_eof"),
]


@parametrize_core
@pytest.mark.parametrize("source_len, src_offset, dst_offset, length", COPY_CASES)
def test_copy_range_within_one_directory(core, tmp_path, source_len, src_offset, dst_offset, length):
    src = write_file(tmp_path / "src", rng_bytes(11, source_len))
    dst = write_file(tmp_path / "dst", b"\xff" * (source_len // 2))
    check_copy(core, src, dst, src_offset, dst_offset, length)


@parametrize_core
@pytest.mark.parametrize("direction", ["to_tmpfs", "from_tmpfs"])
@pytest.mark.parametrize("source_len, src_offset, dst_offset, length", COPY_CASES)
def test_copy_range_across_file_systems(core, tmp_path, shm_dir, direction, source_len, src_offset, dst_offset, length):
    """Between tmpfs and the disk copy_file_range fails with EXDEV: the bounce-buffer path does the copy."""
    src_dir, dst_dir = (tmp_path, shm_dir) if direction == "to_tmpfs" else (shm_dir, tmp_path)
    src = write_file(src_dir / "src", rng_bytes(12, source_len))
    dst = write_file(dst_dir / "dst", b"\xff" * (source_len // 2))
    check_copy(core, src, dst, src_offset, dst_offset, length)


def test_tmpfs_and_disk_really_take_the_fallback_path(tmp_path, shm_dir, fds):
    """Documents what the cross-file-system tests exercise on this machine."""
    src = fds.open(write_file(shm_dir / "src", b"x" * 4096), os.O_RDONLY)
    dst = fds.open(tmp_path / "dst", os.O_WRONLY | os.O_CREAT)
    if os.stat(shm_dir).st_dev == os.stat(tmp_path).st_dev:
        pytest.skip("tmp_path is on tmpfs too")
    try:
        copied = os.copy_file_range(src, dst, 4096, 0, 0)
    except OSError as exc:
        assert exc.errno in native._COPY_FALLBACK_ERRNOS
    else:
        pytest.skip(f"this kernel copies across these file systems ({copied} bytes)")


@parametrize_core
def test_copy_range_from_a_character_device_uses_the_bounce_buffer(core, tmp_path, fds):
    """copy_file_range refuses /dev/zero (EINVAL): the copy still happens, through pread/pwrite."""
    dst_path = write_file(tmp_path / "dst", b"\xff" * (3 * MiB))
    src = fds.open("/dev/zero", os.O_RDONLY)
    dst = fds.open(dst_path, os.O_WRONLY)
    core.copy_range(src, 0, dst, 1000, 2 * MiB + 1)
    assert dst_path.read_bytes() == b"\xff" * 1000 + bytes(2 * MiB + 1) + b"\xff" * (MiB - 1001)


def test_python_copy_range_falls_back_when_the_kernel_has_no_copy_file_range(tmp_path, monkeypatch):
    def no_copy_file_range(*args):
        raise OSError(errno.ENOSYS, "Function not implemented")

    monkeypatch.setattr(native.os, "copy_file_range", no_copy_file_range)
    src = write_file(tmp_path / "src", rng_bytes(13, 2 * MiB + 99))
    dst = write_file(tmp_path / "dst", b"")
    check_copy(IMPLS["python"], src, dst, 99, 0, 3 * MiB)


@parametrize_core
def test_copy_range_within_one_file_without_overlap(core, tmp_path):
    path = write_file(tmp_path / "f", rng_bytes(14, 300_000))
    check_copy(core, path, path, 0, 150_000, 150_000)


@parametrize_core
def test_copy_range_of_zero_bytes_does_nothing(core, tmp_path, fds):
    path = write_file(tmp_path / "f", b"abc")
    fd = fds.open(path, os.O_RDWR)
    core.copy_range(fd, 0, fd, 0, 0)
    assert path.read_bytes() == b"abc"


@parametrize_core
def test_concurrent_copies_use_separate_bounce_buffers(core, tmp_path, shm_dir):
    jobs = []
    for job_index in range(4):
        src = write_file(shm_dir / f"src{job_index}", rng_bytes(100 + job_index, 5 * MiB + job_index))
        jobs.append((src, write_file(tmp_path / f"dst{job_index}", b"")))
    errors: list[BaseException] = []

    def run(src: Path, dst: Path) -> None:
        try:
            for _ in range(3):
                check_copy(core, src, dst, 0, 0, 5 * MiB + 1000)
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=run, args=job) for job in jobs]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors


# --- argument validation --------------------------------------------------------------------------------

BAD_CALLS = {
    "length_not_multiple_of_cluster": lambda c, fd, fd2: c.zero_map(bytes(4097), 4096),
    "cluster_size_zero": lambda c, fd, fd2: c.zero_map(bytes(4096), 0),
    "cluster_size_negative": lambda c, fd, fd2: c.zero_map(bytes(4096), -512),
    "cluster_size_float": lambda c, fd, fd2: c.zero_map(bytes(4096), 512.0),
    "not_a_buffer": lambda c, fd, fd2: c.zero_map([0] * 512, 512),
    "str_is_not_a_buffer": lambda c, fd, fd2: c.is_zero("abc"),
    "strided_buffer": lambda c, fd, fd2: c.zero_map(np.zeros(1024, np.uint8)[::2], 512),
    "read_into_bytes": lambda c, fd, fd2: c.pread_full(fd, bytes(10), 0),
    "read_into_readonly_array": lambda c, fd, fd2: c.pread_full(fd, np.frombuffer(bytes(8), np.uint8), 0),
    "negative_read_offset": lambda c, fd, fd2: c.pread_full(fd, bytearray(10), -1),
    "read_past_off_max": lambda c, fd, fd2: c.pread_full(fd, bytearray(10), native.OFF_MAX - 5),
    "negative_fd": lambda c, fd, fd2: c.pwrite_full(-1, b"x", 0),
    "fd_too_large": lambda c, fd, fd2: c.pwrite_full(1 << 40, b"x", 0),
    "bool_offset": lambda c, fd, fd2: c.pwrite_full(fd, b"x", True),
    "negative_write_offset": lambda c, fd, fd2: c.pwrite_full(fd, b"x", -4096),
    "select_too_short": lambda c, fd, fd2: c.pwrite_selected(fd, bytes(2048), 512, np.ones(3, bool), 0),
    "select_too_long": lambda c, fd, fd2: c.pwrite_selected(fd, bytes(2048), 512, np.ones(5, bool), 0),
    "select_two_dimensional": lambda c, fd, fd2: c.pwrite_selected(fd, bytes(2048), 512, np.ones((2, 2), bool), 0),
    "select_floats": lambda c, fd, fd2: c.pwrite_selected(fd, bytes(2048), 512, np.ones(4), 0),
    "selected_length_not_multiple": lambda c, fd, fd2: c.pwrite_selected(fd, bytes(2000), 512, np.ones(4, bool), 0),
    "negative_host_offset": lambda c, fd, fd2: c.pwrite_selected(fd, bytes(2048), 512, np.ones(4, bool), -512),
    "negative_copy_length": lambda c, fd, fd2: c.copy_range(fd, 0, fd, 4096, -1),
    "negative_src_offset": lambda c, fd, fd2: c.copy_range(fd, -1, fd, 4096, 10),
    "copy_past_off_max": lambda c, fd, fd2: c.copy_range(fd, 0, fd, native.OFF_MAX, 10),
    "overlapping_copy_in_one_file": lambda c, fd, fd2: c.copy_range(fd, 0, fd, 100, 200),
    "overlapping_copy_via_two_fds": lambda c, fd, fd2: c.copy_range(fd, 100, fd2, 0, 200),
}


@parametrize_core
@pytest.mark.parametrize("call", BAD_CALLS.values(), ids=BAD_CALLS.keys())
def test_bad_arguments_raise_out_of_range(core, tmp_path, fds, call):
    path = write_file(tmp_path / "f", rng_bytes(5, 8192))
    fd = fds.open(path, os.O_RDWR)
    fd2 = fds.open(path, os.O_RDWR)
    with pytest.raises(OutOfRange):
        call(core, fd, fd2)
    assert path.read_bytes() == rng_bytes(5, 8192)


# --- OS errors -------------------------------------------------------------------------------------------


@parametrize_core
@pytest.mark.parametrize("operation", ["pwrite_full", "pwrite_selected", "copy_range"])
def test_writing_through_a_read_only_fd_raises_storage_error_ebadf(core, tmp_path, fds, operation):
    path = write_file(tmp_path / "image.qcow2", b"\0" * 8192)
    read_only = fds.open(path, os.O_RDONLY)
    source = fds.open(write_file(tmp_path / "src", b"y" * 4096), os.O_RDONLY)
    with pytest.raises(StorageError) as info:
        if operation == "pwrite_full":
            core.pwrite_full(read_only, b"x" * 512, 0)
        elif operation == "pwrite_selected":
            core.pwrite_selected(read_only, b"x" * 1024, 512, np.array([True, False]), 0)
        else:
            core.copy_range(source, 0, read_only, 0, 4096)
    assert info.value.errno == errno.EBADF
    assert "EBADF" in str(info.value) and "image.qcow2" in str(info.value)
    assert path.read_bytes() == b"\0" * 8192


@parametrize_core
def test_reading_through_a_write_only_fd_raises_storage_error_ebadf(core, tmp_path, fds):
    fd = fds.open(write_file(tmp_path / "f", b"x" * 100), os.O_WRONLY)
    with pytest.raises(StorageError) as info:
        core.pread_full(fd, bytearray(10), 0)
    assert info.value.errno == errno.EBADF


@parametrize_core
def test_reading_a_directory_raises_storage_error_eisdir(core, tmp_path, fds):
    fd = fds.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    with pytest.raises(StorageError) as info:
        core.pread_full(fd, bytearray(10), 0)
    assert info.value.errno == errno.EISDIR


@parametrize_core
def test_closed_fd_raises_storage_error_ebadf(core, tmp_path):
    fd = os.open(write_file(tmp_path / "f", b"x"), os.O_RDONLY)
    os.close(fd)
    with pytest.raises(StorageError) as info:
        core.pread_full(fd, bytearray(1), 0)
    assert info.value.errno == errno.EBADF


def test_python_core_loops_on_short_transfers(tmp_path, monkeypatch):
    """The kernel may move fewer bytes than asked; the reference must loop exactly as copier.c does."""
    real_preadv, real_pwritev, real_copy_file_range = os.preadv, os.pwritev, os.copy_file_range
    cap = 777

    def short_preadv(fd, buffers, offset):
        return real_preadv(fd, [memoryview(buffers[0])[:cap]], offset)

    def short_pwritev(fd, buffers, offset):
        limited, left = [], cap
        for buffer in buffers:
            piece = memoryview(buffer)[:left]
            limited.append(piece)
            left -= len(piece)
            if not left:
                break
        return real_pwritev(fd, limited, offset)

    def short_copy_file_range(src, dst, count, offset_src, offset_dst):
        return real_copy_file_range(src, dst, min(count, cap), offset_src, offset_dst)

    monkeypatch.setattr(native.os, "preadv", short_preadv)
    monkeypatch.setattr(native.os, "pwritev", short_pwritev)
    monkeypatch.setattr(native.os, "copy_file_range", short_copy_file_range)
    core = IMPLS["python"]

    data = rng_bytes(21, 20_000)
    src = write_file(tmp_path / "src", data)
    fd = os.open(src, os.O_RDONLY)
    try:
        buf = bytearray(25_000)
        core.pread_full(fd, buf, 100)
    finally:
        os.close(fd)
    assert bytes(buf) == data[100:] + bytes(5100)

    check_copy(core, src, write_file(tmp_path / "dst", b""), 3, 5, 30_000)
    for pattern in (np.arange(40) % 2 == 0, np.ones(40, bool), (np.arange(40) // 3) % 2 == 1):
        check_pwrite_selected(core, tmp_path / "sel", 100, pattern, 50)


EFBIG_SCRIPT = """
import os, resource, signal, sys
import numpy as np
from vdisk.io import native
from vdisk.errors import StorageError
core = native.implementations()[sys.argv[1]]
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[3]), resource.RLIM_INFINITY))
fd = os.open(sys.argv[2], os.O_WRONLY)
data = bytes(range(256)) * 64
try:
    if sys.argv[4] == "pwrite_full":
        core.pwrite_full(fd, data, 0)
    else:
        core.pwrite_selected(fd, data, 512, np.arange(32) % 2 == 0, 0)
except StorageError as exc:
    print(exc.errno)
"""


@parametrize_core
@pytest.mark.parametrize("operation", ["pwrite_full", "pwrite_selected"])
def test_write_past_the_file_size_limit_is_short_then_efbig(core, tmp_path, operation):
    """RLIMIT_FSIZE makes the first write short (a real short write), the next one fails with EFBIG."""
    limit = 3000  # inside the sixth 512-byte cluster
    path = write_file(tmp_path / "f", b"")
    result = subprocess.run(
        [sys.executable, "-c", EFBIG_SCRIPT, core.name, str(path), str(limit), operation],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": str(Path(native.__file__).resolve().parent.parent)},
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(errno.EFBIG)
    data = bytes(range(256)) * 64
    if operation == "pwrite_selected":
        data = b"".join(data[i * 512 : (i + 1) * 512] for i in range(0, 32, 2))
    assert path.read_bytes() == data[:limit]


# --- the GIL --------------------------------------------------------------------------------------------


@pytest.mark.skipif("c" not in IMPLS, reason="C core not built")
def test_c_calls_run_without_the_gil(fds):
    """While one thread is inside a long C call, another thread keeps running Python code.

    If the call held the GIL, the main thread could run only within a switch interval of the call's
    start; here it must be seen running well inside the call."""
    core = IMPLS["c"]
    src = fds.open("/dev/zero", os.O_RDONLY)
    dst = fds.open("/dev/null", os.O_WRONLY)
    window: dict[str, float] = {}
    started = threading.Event()

    def worker() -> None:
        started.set()
        window["start"] = time.monotonic()
        core.copy_range(src, 0, dst, 0, 8 << 30)  # /dev/zero -> /dev/null through the bounce buffer
        window["end"] = time.monotonic()

    thread = threading.Thread(target=worker)
    thread.start()
    started.wait()
    seen: list[float] = []
    while thread.is_alive():
        seen.append(time.monotonic())
    thread.join()
    margin = 4 * sys.getswitchinterval() + 0.02
    if window["end"] - window["start"] < 4 * margin:
        pytest.skip("the C call was too quick to observe")
    inside = [t for t in seen if window["start"] + margin < t < window["end"] - margin]
    assert inside, "the main thread did not run while the C call was in progress"
