"""`vdisk serve` against QEMU's own NBD client (qemu-io), with qemu-nbd as the oracle, and QEMU's image locks.

The same qemu-io operations (random writes, zero writes with and without unmap, discards, partial-sector
writes, FUA, vectored and aio writes) go to `vdisk serve` of the chain4 fixture and to `qemu-nbd` serving a
copy of the same chain; afterwards both active images must hold the same bytes, and ours must be clean.
"""

from __future__ import annotations

import contextlib
import json
import random
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.commands import run, vdisk
from tests.support.images import assert_clean, qemu_raw
from tests.support.serving import serve

pytestmark = pytest.mark.timeout(90)

MiB = 1 << 20
DISK_SIZE = 8 * MiB
CLUSTER = 64 * 1024


@contextlib.contextmanager
def qemu_nbd(image: Path, socket: Path, *extra: str) -> Iterator[str]:
    """qemu-nbd serving ``image`` (qcow2, its chain behind it) on a unix socket; yields the NBD URI."""
    proc = subprocess.Popen(["qemu-nbd", "-f", "qcow2", "--persistent", "--discard=unmap", "--cache=writeback",
                             "-k", str(socket), *extra, str(image)], stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 30
    while not socket.exists():
        if proc.poll() is not None:
            raise AssertionError(f"qemu-nbd exited {proc.returncode}: {proc.stderr.read()}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError("qemu-nbd did not start")
        time.sleep(0.02)
    try:
        yield f"nbd+unix:///?socket={socket}"
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)


def copy_chain(chain: dict[str, Path], dest: Path) -> dict[str, Path]:
    """A copy of the chain's files in ``dest`` (backing names are relative, so it stands on its own)."""
    dest.mkdir()
    return {name: Path(shutil.copy2(path, dest / path.name)) for name, path in chain.items()}


def random_operations(seed: int, count: int) -> list[str]:
    """qemu-io commands; every kind of guest write, at cluster-aligned, sector-aligned and odd offsets."""
    rng = random.Random(seed)
    ops = []
    for _ in range(count):
        kind = rng.choices(["write", "partial", "zero", "zero-unmap", "discard", "fua", "writev", "aio"],
                           weights=[25, 15, 12, 12, 12, 8, 8, 8])[0]
        if kind == "partial":  # inside one sector, or across a sector boundary
            length = rng.randint(1, 700)
            offset = rng.randrange(0, DISK_SIZE - length)
        elif rng.random() < 0.4:  # whole clusters
            length = rng.randint(1, 4) * CLUSTER
            offset = rng.randrange(0, DISK_SIZE - length, CLUSTER)
        else:
            length = rng.randint(1, 3 * CLUSTER)
            offset = rng.randrange(0, DISK_SIZE - length)
        pattern = rng.randint(1, 255)
        if kind in ("write", "partial"):
            ops.append(f"write -P {pattern} {offset} {length}")
        elif kind == "zero":
            ops.append(f"write -z {offset} {length}")
        elif kind == "zero-unmap":
            ops.append(f"write -z -u {offset} {length}")
        elif kind == "discard":
            ops.append(f"discard {offset} {length}")
        elif kind == "fua":
            ops.append(f"write -f -P {pattern} {offset} {length}")
        elif kind == "writev":
            split = rng.randint(1, length - 1) if length > 1 else 1
            ops.append(f"writev -P {pattern} {offset} {split} {max(length - split, 1)}")
        else:
            ops += [f"aio_write -P {pattern} {offset} {length}", "aio_flush"]
        if rng.random() < 0.1:
            ops.append("flush")
    return ops


def allocation(image: Path) -> list[tuple[int, int, int, bool, bool]]:
    """`qemu-img map` as (start, length, depth, zero, data) runs; host offsets left out."""
    out: list[tuple[int, int, int, bool, bool]] = []
    for e in json.loads(run("qemu-img", "map", "-U", "--output=json", image).stdout):
        key = (e["depth"], e["zero"], e["data"])
        if out and out[-1][2:] == key and out[-1][0] + out[-1][1] == e["start"]:
            out[-1] = (out[-1][0], out[-1][1] + e["length"], *key)
        else:
            out.append((e["start"], e["length"], *key))
    return out


def _range(op: str) -> tuple[int, int] | None:
    words = op.split()
    if words[0] in ("flush", "aio_flush"):
        return None
    if words[0] == "writev":
        return int(words[3]), int(words[3]) + int(words[4]) + int(words[5])
    return int(words[-2]), int(words[-2]) + int(words[-1])


def read_backs(ops: list[str]) -> list[str]:
    """`read -P` checks for the plain writes that no later operation overlaps."""
    checks = []
    for i, op in enumerate(ops):
        if not op.startswith("write -P"):
            continue
        start, end = _range(op)
        later = (_range(o) for o in ops[i + 1 :])
        if not any(r and r[0] < end and start < r[1] for r in later):
            pattern, offset, length = op.split()[-3:]
            checks.append(f"read -P {pattern} {offset} {length}")
    return checks


def qemu_io(uri: str, ops: list[str], *options: str) -> str:
    args = ["qemu-io", "-f", "raw", *options, uri]
    for op in ops:
        args += ["-c", op]
    out = run(*args).stdout
    assert "failed" not in out.lower() and "error" not in out.lower(), out
    return out


def test_qemu_io_writes_leave_the_same_disk_as_qemu_nbd(chain4, tmp_path):
    twin = copy_chain(chain4, tmp_path / "qemu")
    ops = random_operations(seed=4242, count=220)
    checks = read_backs(ops)
    assert len(checks) >= 20

    with serve(chain4["D"]) as served:
        vdisk_out = qemu_io(served.uri, ops + checks)
        assert served.stop() == 0
    with qemu_nbd(twin["D"], tmp_path / "qemu.sock") as uri:
        qemu_out = qemu_io(uri, ops + checks)

    assert vdisk_out.count("wrote") == qemu_out.count("wrote") > 150
    assert run("qemu-img", "compare", "-f", "qcow2", "-F", "qcow2", chain4["D"], twin["D"], check=False).returncode == 0
    assert qemu_raw(chain4["D"], tmp_path / "vdisk.formats.raw") == qemu_raw(twin["D"], tmp_path / "qemu.raw")
    # Zero writes, unmapping zero writes and discards leave the same cluster kinds as QEMU's qcow2 driver.
    assert allocation(chain4["D"]) == allocation(twin["D"])
    assert_clean(chain4["D"])
    assert run("qemu-img", "check", chain4["D"]).returncode == 0  # without -U: nobody holds the lock any more


def test_qemu_io_sees_the_chain_as_qemu_nbd_does(chain4, tmp_path):
    """Reads only, through QEMU's NBD client: the chain's patterns, B's zero cluster, C's compressed cluster."""
    reads = ["read -P 0xa1 0 1M", "read -P 0xb2 1M 512k", "read -P 0xc3 1536k 256k", "read -P 0xb2 1792k 256k",
             "read -P 0xa1 2M 1M", "read -P 0 3M 64k", "read -P 0xa1 3136k 960k", "read -P 0 4M 2M",
             "read -P 0xb3 6M 512k", "read -P 0 6656k 512k", "read -P 0xc4 7M 64k", "read -P 0 7232k 960k",
             "read -P 0xa1 1000 3"]
    with serve(chain4["D"], "--read-only") as served:
        out = qemu_io(served.uri, reads, "-r")
    assert out.count("read ") == len(reads)


def test_second_server_on_a_served_image_is_refused_with_one_line(chain4, tmp_path):
    other_socket = tmp_path / "other.sock"
    with serve(chain4["D"]) as served:
        started = time.monotonic()
        proc = vdisk("serve", str(chain4["D"]), "--socket", str(other_socket), check=False)
        assert time.monotonic() - started < 20
        assert proc.returncode != 0
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1, proc.stderr
        assert "lock" in lines[0] and str(chain4["D"]) in lines[0]
        assert not other_socket.exists()

        # The first server is unharmed.
        assert run("nbdinfo", "--size", served.uri).stdout.strip() == str(DISK_SIZE)


def test_qemu_tools_are_refused_write_access_while_the_image_is_served(chain4, tmp_path):
    with serve(chain4["D"]) as served:
        check = run("qemu-img", "check", chain4["D"], check=False)
        assert check.returncode != 0
        assert 'Failed to get shared "write" lock' in check.stderr

        write = run("qemu-io", "-c", "write 0 512", chain4["D"], check=False)
        assert "lock" in write.stderr

        nbd = subprocess.run(["qemu-nbd", "-f", "qcow2", "-k", str(tmp_path / "q.sock"), str(chain4["D"])],
                             capture_output=True, text=True, timeout=30)
        assert nbd.returncode != 0 and "lock" in nbd.stderr

        assert run("qemu-img", "check", "-U", chain4["D"]).returncode == 0  # -U: shared read is fine
        assert run("nbdinfo", "--size", served.uri).stdout.strip() == str(DISK_SIZE)
