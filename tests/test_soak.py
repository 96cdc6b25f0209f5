"""A bounded soak: 16 libnbd connections at queue depth 16 doing mixed I/O while a stream runs and QMP is polled.

Each connection owns one sixteenth of the disk, cut into 16 slots; an in-flight request always has a slot to
itself, so a bytearray model predicts every read exactly even at queue depth 16.  Afterwards the disk equals the
model (qemu-img compare), the image is clean, nbdkit's memory did not keep growing, and no request waited
longer than the stated bound.  CI runs it for a few seconds; VDISK_DEEP=1 runs it for minutes.  Loopback only.

It runs twice: with QEMU's default caches on 64 KiB clusters, and with the smallest caches (one L2 table,
one refcount block) on 4 KiB clusters, where the 64 MiB disk spans 32 L2 tables per image and nearly every
request evicts, reloads or writes back a table (with 64 KiB clusters one table maps the whole disk).
"""

from __future__ import annotations

import os
import random
import threading
import time
from pathlib import Path

import nbd
import pytest

from tests.support.commands import run
from tests.support.images import assert_clean, chain_info, qemu_img_compare, qemu_raw
from tests.support.serving import nbdkit_pid, serve
from vdisk.qmp.client import Monitor
from vdisk.errors import QMPError

MiB = 1 << 20
CLUSTER = 65536  # the unit of the guests' trims, whatever the images' cluster size
TINY_CACHE_FLAGS = ("--l2-cache-size", "1", "--refcount-cache-size", "1")
CONNECTIONS = 16
QUEUE_DEPTH = 16
SIZE = 64 * MiB
REGION = SIZE // CONNECTIONS
SLOT = REGION // QUEUE_DEPTH
DEEP = bool(os.environ.get("VDISK_DEEP"))
DURATION = float(os.environ.get("VDISK_SOAK_SECONDS", 180 if DEEP else 6))
LATENCY_BOUND = 5.0  # seconds: generous for a loaded 2-core CI machine; the figures are printed

pytestmark = pytest.mark.timeout(int(DURATION) + 240)


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


class Worker:
    """One connection: random aio requests into free slots of its region, checked against the model."""

    def __init__(self, uri: str, index: int, model: bytearray, seed: int, deadline: float):
        self.h = nbd.NBD()
        self.h.connect_uri(uri)
        self.base = index * REGION
        self.model = model
        self.rng = random.Random(seed)
        self.deadline = deadline
        self.free = list(range(QUEUE_DEPTH))
        # python3-libnbd 1.14 (Debian 12) never frees an nbd.Buffer handed to aio_pread: 4,000 reads of 256 KiB
        # into fresh buffers keep 1 GiB.  A 180 s soak read about 20 GiB that way, and its second run took the
        # 24 GiB machine down with it.  So each slot reuses one buffer per read length (at most one request
        # is in flight per slot).
        self.read_buffers: dict[tuple[int, int], nbd.Buffer] = {}
        self.latencies: list[float] = []
        self.errors: list[str] = []
        self.ops = 0

    def _submit(self) -> None:
        slot = self.free.pop(self.rng.randrange(len(self.free)))
        slot_start = self.base + slot * SLOT
        kind = self.rng.choices(["read", "write", "zero", "trim", "flush"], [45, 35, 8, 7, 5])[0]
        if kind == "trim":  # whole clusters: on a v3 image with a backing file they read as zeros
            first = self.rng.randrange(SLOT // CLUSTER)
            count = self.rng.randint(1, SLOT // CLUSTER - first)
            offset, length = slot_start + first * CLUSTER, count * CLUSTER
        else:
            length = self.rng.choice([512, 4096, 65536, 131072, SLOT])
            offset = slot_start + self.rng.randrange(0, SLOT - length + 1, 512)
        started = time.monotonic()

        def done(error: int, kind=kind, offset=offset, length=length, slot=slot, buf=None) -> int:
            self.latencies.append(time.monotonic() - started)
            if error:
                self.errors.append(f"{kind} {offset}+{length}: errno {error}")
            elif kind == "read" and bytes(buf) != self.model[offset : offset + length]:
                self.errors.append(f"read {offset}+{length} differs from the model")
            self.free.append(slot)
            self.ops += 1
            return 1

        if kind == "read":
            buf = self.read_buffers.get((slot, length))
            if buf is None:
                buf = self.read_buffers[slot, length] = nbd.Buffer(length)
            self.h.aio_pread(buf, offset, completion=lambda e, b=buf: done(e, buf=b.to_bytearray()))
        elif kind == "write":
            data = self.rng.randbytes(length)
            self.model[offset : offset + length] = data
            flags = nbd.CMD_FLAG_FUA if self.rng.random() < 0.1 else 0
            self.h.aio_pwrite(data, offset, completion=done, flags=flags)
        elif kind in ("zero", "trim"):
            self.model[offset : offset + length] = bytes(length)
            submit = self.h.aio_zero if kind == "zero" else self.h.aio_trim
            submit(length, offset, completion=done)
        else:
            self.h.aio_flush(completion=done)

    def run(self) -> None:
        try:
            while time.monotonic() < self.deadline or self.h.aio_in_flight():
                while self.free and time.monotonic() < self.deadline:
                    self._submit()
                self.h.poll(-1)
            self.h.flush()
        except nbd.Error as exc:
            self.errors.append(f"libnbd: {exc}")
        finally:
            self.h.shutdown()


@pytest.mark.parametrize(("cluster_size", "cache_flags"), [
    pytest.param(CLUSTER, (), id="default-caches"),
    pytest.param(4096, TINY_CACHE_FLAGS, id="4k-tiny-caches"),
])
def test_soak_sixteen_connections_during_a_stream(tmp_path, cluster_size, cache_flags):
    paths = {n: tmp_path / f"{n}.qcow2" for n in "ABD"}
    options = f"cluster_size={cluster_size}"
    run("qemu-img", "create", "-q", "-f", "qcow2", "-o", options, paths["A"], str(SIZE))
    run("qemu-io", "-c", f"write -P 0xa1 0 {SIZE}", paths["A"])
    run("qemu-img", "create", "-q", "-f", "qcow2", "-o", options, "-b", "A.qcow2", "-F", "qcow2", paths["B"])
    run("qemu-io", "-c", "write -P 0xb2 8M 16M", "-c", "write -z 40M 1M", paths["B"])
    run("qemu-img", "create", "-q", "-f", "qcow2", "-o", options, "-b", "B.qcow2", "-F", "qcow2", paths["D"])
    model = bytearray(qemu_raw(paths["D"], tmp_path / "before.raw"))

    with serve(paths["D"], *cache_flags, qmp=True) as served:
        server_pid = nbdkit_pid(served)
        rss = [_rss_kib(server_pid)]
        with Monitor(str(served.qmp)) as monitor:
            # slow enough to be running for the whole soak, then let go
            monitor.execute("block-stream", device="drive0", base="A.qcow2",
                            speed=max(1, int(16 * MiB / (2 * DURATION))))
            deadline = time.monotonic() + DURATION
            workers = [Worker(served.uri, i, model, 1000 + i, deadline) for i in range(CONNECTIONS)]
            threads = [threading.Thread(target=w.run) for w in workers]
            for t in threads:
                t.start()
            polls = polls_during_stream = 0
            while any(t.is_alive() for t in threads):
                if monitor.execute("query-block-jobs"):
                    polls_during_stream += 1
                monitor.hmp("info block-jobs")
                polls += 1
                rss.append(_rss_kib(server_pid))
                time.sleep(0.2)
            for t in threads:
                t.join()
            # Copy-on-read and the guests' own writes leave the copier little to do: it may end before the soak.
            assert polls_during_stream, "the stream was not running during the soak"
            try:
                monitor.execute("block-job-set-speed", device="drive0", speed=0)
            except QMPError:
                pass  # finished meanwhile
            while monitor.execute("query-block-jobs"):
                time.sleep(0.1)

    errors = [e for w in workers for e in w.errors]
    assert not errors, errors[:10]
    latencies = sorted(x for w in workers for x in w.latencies)
    ops = sum(w.ops for w in workers)
    p50, p99, worst = (latencies[len(latencies) // 2], latencies[int(len(latencies) * 0.99)], latencies[-1])
    print(f"\nsoak ({cluster_size}-byte clusters, serve flags {list(cache_flags)}): "
          f"{DURATION:.0f} s, {CONNECTIONS} connections x QD{QUEUE_DEPTH}, {ops} requests "
          f"({ops / DURATION:.0f}/s), {polls} QMP polls ({polls_during_stream} during the stream); latency p50 {p50 * 1e3:.2f} ms, p99 {p99 * 1e3:.2f} ms, "
          f"max {worst * 1e3:.1f} ms; nbdkit RSS {rss[0] // 1024} -> max {max(rss) // 1024} MiB")
    assert ops > CONNECTIONS * QUEUE_DEPTH
    assert worst < LATENCY_BOUND, f"a request waited {worst:.2f} s"
    third = max(1, len(rss) // 3)
    assert max(rss[-third:]) < max(rss[:third]) + 128 * 1024, f"nbdkit memory kept growing: {rss}"

    (tmp_path / "model.raw").write_bytes(model)
    assert qemu_img_compare(paths["D"], tmp_path / "model.raw")
    assert_clean(paths["D"])
    assert [Path(i["filename"]).name for i in chain_info(paths["D"])] == ["D.qcow2", "A.qcow2"]
