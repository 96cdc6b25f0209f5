"""Live block streaming driven over QMP with ``qemu.qmp``: QEMU's iotest 030, re-expressed for vdisk.

Each test serves a real chain with ``vdisk serve --qmp`` and talks to it the way management software talks
to QEMU.  Where 030 slows a job down with blkdebug's ``pause_drive``, these tests use ``speed`` (the job
copies one 1 MiB chunk, then waits for the rate limiter); where 030 injects errors with blkdebug, they use
``VDISK_FAULTS`` in the served process's environment.  Expectations (event sequences, error texts, offsets
at an error) are QEMU 7.2's; ``test_stream_qsd.py`` checks the same against qemu-storage-daemon.
"""

from __future__ import annotations

import asyncio
import json
import re
import socket
import threading
import time
from pathlib import Path

import nbd
import pytest

from tests.support.commands import run
from tests.support.images import assert_clean, chain_info, file_digest, qemu_img_check, qemu_map, qemu_raw
from tests.support.qmp import qmp_session, run_async
from tests.support.serving import serve
from vdisk.jobs.stream import CHUNK

pytestmark = pytest.mark.timeout(120)

MiB = 1 << 20
DISK = 8 * MiB
SLOW = 1  # bytes/s: the job copies its first chunk, then waits (for hours) until the speed changes
# An injected error reading B (whose first data is at 1 MiB) fails the copier's chunk holding that offset;
# the job reports the chunks before it as done.
ERROR_AT = MiB // CHUNK * CHUNK

SUCCESS = ["status:created", "status:running", "status:waiting", "status:pending", "BLOCK_JOB_COMPLETED",
           "status:concluded", "status:null"]


def map_flags(path: Path, *, depth: bool = False) -> list[tuple]:
    """qemu-img map as (start, end, data, zero[, depth]) runs, adjacent equal runs merged."""
    out: list[list] = []
    for e in qemu_map(path):
        key = (e["data"], e["zero"]) + ((e["depth"],) if depth else ())
        if out and out[-1][2:] == list(key) and out[-1][1] == e["start"]:
            out[-1][1] = e["start"] + e["length"]
        else:
            out.append([e["start"], e["start"] + e["length"], *key])
    return [tuple(r) for r in out]


def held_above(path: Path, depth_limit: int) -> list[tuple[int, int]]:
    """Ranges of the chain at ``path`` that nodes at depth 1 .. depth_limit-1 hold (data or zero clusters)."""
    return [(e["start"], e["start"] + e["length"]) for e in qemu_map(path)
            if 1 <= e["depth"] < depth_limit and (e["data"] or e["zero"]) and e.get("present", True)]


def backing_names(path: Path) -> list[str | None]:
    return [info.get("backing-filename") for info in chain_info(path)]


def digests(paths) -> dict[str, str]:
    return {p.name: file_digest(p) for p in paths}


# --- full stream, stream with base, no-op stream ------------------------------------------------------


def test_full_stream_keeps_the_data_and_the_image_stands_alone(chain4, tmp_path):
    before = qemu_raw(chain4["D"], tmp_path / "before.raw")
    chain_map = map_flags(chain4["D"])
    backing = digests(chain4[n] for n in "ABC")

    async def scenario(served):
        async with qmp_session(served.qmp) as qmp:
            assert await qmp.execute("query-block-jobs") == []
            assert await qmp.execute("block-stream", {"device": "drive0"}) == {}
            done = await qmp.wait_gone("drive0")
            assert "error" not in done["data"]
            assert done["data"]["offset"] == done["data"]["len"] == DISK
            assert done["data"]["type"] == "stream" and done["data"]["speed"] == 0
            assert await qmp.execute("query-block-jobs") == []
            inserted = (await qmp.execute("query-block"))[0]["inserted"]
            assert inserted["backing_file_depth"] == 0 and "backing_file" not in inserted

    with serve(chain4["D"], qmp=True) as served:
        run_async(scenario(served))

    assert backing_names(chain4["D"]) == [None]
    assert len(chain_info(chain4["D"])) == 1
    assert qemu_raw(chain4["D"], tmp_path / "after.raw") == before
    # What the chain held is now in D, as data or zero clusters; what nobody held stays unallocated.
    assert map_flags(chain4["D"]) == chain_map
    assert all(depth == 0 for *_, depth in map_flags(chain4["D"], depth=True))
    assert_clean(chain4["D"])
    assert digests(chain4[n] for n in "ABC") == backing, "streaming changed a backing image"


@pytest.mark.parametrize("how", ["relative", "absolute", "base-node"])
def test_stream_with_base_keeps_the_base_and_its_relative_name(chain4, tmp_path, how):
    before = qemu_raw(chain4["D"], tmp_path / "before.raw")
    from_b_or_c = held_above(chain4["D"], 3)  # depth 1 = C, 2 = B; A (depth 3) stays the backing file
    a_map = map_flags(chain4["A"])
    backing = digests(chain4[n] for n in "ABC")

    async def scenario(served):
        async with qmp_session(served.qmp) as qmp:
            args = {"device": "drive0"}
            if how == "relative":
                args["base"] = "A.qcow2"
            elif how == "absolute":
                args["base"] = str(chain4["A"])
            else:
                nodes = await qmp.execute("query-named-block-nodes")
                args["base-node"] = next(n["node-name"] for n in nodes if n["file"] == str(chain4["A"]))
            await qmp.execute("block-stream", args)
            done = await qmp.wait_gone("drive0")
            assert "error" not in done["data"], done
            inserted = (await qmp.execute("query-block"))[0]["inserted"]
            assert inserted["backing_file"] == "A.qcow2" and inserted["backing_file_depth"] == 1

    with serve(chain4["D"], qmp=True) as served:
        run_async(scenario(served))

    info = chain_info(chain4["D"])
    assert [i["filename"] for i in info] == [str(chain4["D"]), str(chain4["A"])]
    assert info[0]["backing-filename"] == "A.qcow2", "the relative name must stay relative"
    assert info[0]["backing-filename-format"] == "qcow2"
    assert qemu_raw(chain4["D"], tmp_path / "after.raw") == before
    for start, end in from_b_or_c:
        for e in qemu_map(chain4["D"]):
            if e["start"] < end and start < e["start"] + e["length"]:
                assert e["depth"] == 0, f"{start:#x}-{end:#x} was held by B or C but is not in D: {e}"
    # nothing that only A holds was copied: every depth-1 range now is A's
    assert [r for r in map_flags(chain4["D"], depth=True) if r[4] == 0 and (r[2] or r[3])]
    assert map_flags(chain4["A"]) == a_map
    assert_clean(chain4["D"])
    assert digests(chain4[n] for n in "ABC") == backing


def test_no_op_stream_when_the_backing_file_is_already_the_base(chain4):
    empty_map = map_flags(chain4["D"], depth=True)

    async def scenario(served):
        async with qmp_session(served.qmp) as qmp:
            await qmp.execute("block-stream", {"device": "drive0", "base": "C.qcow2"})
            done = await qmp.wait_gone("drive0")
            assert "error" not in done["data"] and done["data"]["offset"] == DISK
            assert qmp.sequence() == SUCCESS

    with serve(chain4["D"], qmp=True) as served:
        run_async(scenario(served))

    assert map_flags(chain4["D"], depth=True) == empty_map, "a no-op stream copied data"
    assert backing_names(chain4["D"]) == ["C.qcow2", "B.qcow2", "A.qcow2", None]
    assert_clean(chain4["D"])


def test_stream_into_an_intermediate_node(chain4, tmp_path):
    """030's test_stream_intermediate / live-block-ops' `block_stream node-D file-B.img`: fill C from B, D
    untouched, and the chain becomes D -> C -> A."""
    before = qemu_raw(chain4["D"], tmp_path / "before.raw")
    from_b = held_above(chain4["C"], 2)
    assert from_b

    async def scenario(served):
        async with qmp_session(served.qmp) as qmp:
            nodes = {n["file"]: n["node-name"] for n in await qmp.execute("query-named-block-nodes")}
            c_node = nodes[str(chain4["C"])]
            # QEMU: a node that is not a device needs an explicit job ID
            assert await qmp.error("block-stream", {"device": c_node}) == ("GenericError", "Invalid job ID ''")
            assert await qmp.error("block-stream", {"device": c_node, "job-id": "x", "base": "D.qcow2"}) == (
                "GenericError", "Can't find 'D.qcow2' in the backing chain")
            await qmp.execute("block-stream", {"device": c_node, "job-id": "stream-C", "base": "A.qcow2",
                                               "speed": SLOW})
            # C is open read-write (QEMU's write lock bytes) while the job runs, read-only again after
            locked = run("qemu-img", "info", chain4["C"], check=False)
            assert locked.returncode != 0 and "lock" in locked.stderr
            assert await qmp.error("block-stream", {"device": "drive0"}) == (
                "GenericError", "Node 'drive0' is busy: block device is in use by block job: stream")
            await qmp.execute("block-job-set-speed", {"device": "stream-C", "speed": 0})
            done = await qmp.wait_gone("stream-C")
            assert "error" not in done["data"], done
            run("qemu-img", "info", chain4["C"])
            inserted = (await qmp.execute("query-block"))[0]["inserted"]
            assert inserted["backing_file_depth"] == 2
            assert inserted["image"]["backing-image"]["backing-filename"] == "A.qcow2"
            assert nodes[str(chain4["C"])] in {n["node-name"] for n in await qmp.execute("query-named-block-nodes")}
            h = nbd.NBD()
            h.connect_uri(served.uri)
            assert h.pread(DISK, 0) == before
            h.shutdown()

    with serve(chain4["D"], qmp=True) as served:
        run_async(scenario(served))

    assert backing_names(chain4["D"]) == ["C.qcow2", "A.qcow2", None]
    assert qemu_raw(chain4["D"], tmp_path / "after.raw") == before
    for start, end in from_b:
        for e in qemu_map(chain4["C"]):
            if e["start"] < end and start < e["start"] + e["length"]:
                assert e["depth"] == 0, f"{start:#x}-{end:#x} was held by B but is not in C: {e}"
    assert map_flags(chain4["D"], depth=True)[0][4] >= 1, "D itself must not have been filled"
    assert_clean(chain4["C"])
    assert_clean(chain4["D"])


# --- events -------------------------------------------------------------------------------------------


def test_successful_stream_sends_qemus_event_sequence_to_every_client(chain4):
    async def scenario(served):
        async with qmp_session(served.qmp) as a, qmp_session(served.qmp) as b, qmp_session(served.qmp) as c:
            await b.execute("block-stream", {"device": "drive0", "job-id": "job0"})
            for qmp in (a, b, c):
                await qmp.wait_gone("job0")
                assert qmp.sequence() == SUCCESS
                assert all(ev["data"].get("id", "job0") == "job0" for ev in qmp.events)
                stamps = [ev["timestamp"]["seconds"] + ev["timestamp"]["microseconds"] / 1e6 for ev in qmp.events]
                assert stamps == sorted(stamps) and abs(stamps[0] - time.time()) < 60

    with serve(chain4["D"], qmp=True) as served:
        run_async(scenario(served))


def test_manual_finalize_and_dismiss(chain4):
    async def scenario(served):
        async with qmp_session(served.qmp) as qmp:
            await qmp.execute("block-stream", {"device": "drive0", "job-id": "job0", "base": "A.qcow2",
                                               "auto-finalize": False, "auto-dismiss": False})
            pending = await qmp.wait_event("BLOCK_JOB_PENDING", id="job0")
            assert pending["data"] == {"type": "stream", "id": "job0"}
            info = await qmp.job("job0")
            assert info["status"] == "pending" and info["offset"] == info["len"] == DISK
            assert info["auto-finalize"] is False and info["auto-dismiss"] is False
            # not finalized: the chain is unchanged so far
            assert backing_names(chain4["D"])[0] == "C.qcow2"
            assert await qmp.error("job-dismiss", {"id": "job0"}) == (
                "GenericError", "Job 'job0' in state 'pending' cannot accept command verb 'dismiss'")
            await qmp.execute("job-finalize", {"id": "job0"})
            await qmp.wait_status("job0", "concluded")
            assert (await qmp.job("job0"))["status"] == "concluded"
            assert backing_names(chain4["D"])[0] == "A.qcow2"
            await qmp.execute("job-dismiss", {"id": "job0"})
            await qmp.wait_status("job0", "null")
            assert await qmp.execute("query-block-jobs") == []
            assert qmp.sequence() == ["status:created", "status:running", "status:waiting", "status:pending",
                                      "BLOCK_JOB_PENDING", "BLOCK_JOB_COMPLETED", "status:concluded",
                                      "status:null"]

    with serve(chain4["D"], qmp=True) as served:
        run_async(scenario(served))
    assert_clean(chain4["D"])


# --- pause, speed, cancel -------------------------------------------------------------------------------


def test_pause_keeps_the_offset_still_and_resume_finishes(chain4, tmp_path):
    before = qemu_raw(chain4["D"], tmp_path / "before.raw")

    async def scenario(served):
        async with qmp_session(served.qmp) as qmp:
            await qmp.execute("block-stream", {"device": "drive0", "speed": 2 * MiB})
            await qmp.wait_status("drive0", "running")
            await qmp.execute("block-job-pause", {"device": "drive0"})
            assert (await qmp.job("drive0"))["paused"] is True
            await qmp.wait_status("drive0", "paused")
            first = await qmp.job("drive0")
            assert first["status"] == "paused" and first["busy"] is False and first["offset"] < DISK
            await asyncio.sleep(1.0)
            second = await qmp.job("drive0")
            assert second["offset"] == first["offset"], "a paused job copied data"
            assert await qmp.error("block-job-pause", {"device": "drive0"}) == ("GenericError",
                                                                                "Job is already paused")
            await qmp.execute("block-job-resume", {"device": "drive0"})
            await qmp.wait_status("drive0", "running")
            await qmp.execute("block-job-set-speed", {"device": "drive0", "speed": 0})
            done = await qmp.wait_gone("drive0")
            assert "error" not in done["data"] and done["data"]["offset"] == DISK
            cls, desc = await qmp.error("block-job-resume", {"device": "drive0"})
            assert (cls, desc) == ("DeviceNotActive", "Block job 'drive0' not found")

    with serve(chain4["D"], qmp=True) as served:
        run_async(scenario(served))
    assert backing_names(chain4["D"]) == [None]
    assert qemu_raw(chain4["D"], tmp_path / "after.raw") == before


def test_set_speed_while_running_and_speed_at_start(chain4):
    async def scenario(served):
        async with qmp_session(served.qmp) as qmp:
            await qmp.execute("block-stream", {"device": "drive0", "speed": SLOW})
            assert (await qmp.job("drive0"))["speed"] == SLOW
            await qmp.execute("block-job-set-speed", {"device": "drive0", "speed": 8 * MiB})
            assert (await qmp.job("drive0"))["speed"] == 8 * MiB
            await qmp.execute("block-job-set-speed", {"device": "drive0", "speed": SLOW})
            await qmp.execute("block-job-cancel", {"device": "drive0"})
            cancelled = await qmp.wait_gone("drive0")
            assert cancelled["event"] == "BLOCK_JOB_CANCELLED" and cancelled["data"]["speed"] == SLOW

            await qmp.execute("block-stream", {"device": "drive0", "speed": 4 * MiB})
            info = await qmp.job("drive0")
            assert info["speed"] == 4 * MiB and info["len"] == DISK
            await qmp.execute("block-job-cancel", {"device": "drive0"})
            await qmp.wait_gone("drive0")

    with serve(chain4["D"], qmp=True) as served:
        run_async(scenario(served))


def test_a_speed_limited_stream_progresses_at_about_that_rate(tmp_path):
    """Four chunks to copy at two chunks a second: the first at once, then one every 0.5 s (about 1.5 s)."""
    size, speed = 4 * CHUNK, 2 * CHUNK
    run("qemu-img", "create", "-q", "-f", "qcow2", tmp_path / "A.qcow2", str(size))
    run("qemu-io", "-c", f"write -P 0xa1 0 {size}", tmp_path / "A.qcow2")
    run("qemu-img", "create", "-q", "-f", "qcow2", "-b", "A.qcow2", "-F", "qcow2", tmp_path / "D.qcow2")

    async def scenario(served):
        async with qmp_session(served.qmp) as qmp:
            started = time.monotonic()
            await qmp.execute("block-stream", {"device": "drive0", "speed": speed})
            await asyncio.sleep(0.75)
            midway = (await qmp.job("drive0"))["offset"]
            done = await qmp.wait_gone("drive0")
            elapsed = time.monotonic() - started
            assert "error" not in done["data"] and done["data"]["offset"] == size
            assert 1.2 < elapsed < 8, f"4 chunks at 2 chunks/s took {elapsed:.2f} s"
            assert CHUNK <= midway <= 3 * CHUNK, f"offset {midway} after 0.75 s at 2 chunks/s"

    with serve(tmp_path / "D.qcow2", qmp=True) as served:
        run_async(scenario(served))


def test_the_speed_limit_counts_only_what_is_copied(tmp_path):
    """QEMU's stream rate-limits the ranges it copies; ranges that nothing above the base holds are free."""
    run("qemu-img", "create", "-q", "-f", "qcow2", tmp_path / "A.qcow2", "64M")
    run("qemu-io", "-c", "write -P 0xa1 0 1M", "-c", "write -P 0xa2 63M 64k", tmp_path / "A.qcow2")
    run("qemu-img", "create", "-q", "-f", "qcow2", "-b", "A.qcow2", "-F", "qcow2", tmp_path / "D.qcow2")

    async def scenario(served):
        async with qmp_session(served.qmp) as qmp:
            started = time.monotonic()
            await qmp.execute("block-stream", {"device": "drive0", "speed": MiB})
            done = await qmp.wait_gone("drive0")
            elapsed = time.monotonic() - started
            assert "error" not in done["data"] and done["data"]["offset"] == 64 * MiB
            # 1 MiB + 64 KiB to copy at 1 MiB/s: about a second, not the 64 s that counting holes would take
            assert elapsed < 5, f"a sparse 64 MiB disk at 1 MiB/s took {elapsed:.2f} s"

    with serve(tmp_path / "D.qcow2", qmp=True) as served:
        run_async(scenario(served))


def test_negative_speed_is_refused(chain4):
    async def scenario(served):
        async with qmp_session(served.qmp) as qmp:
            cls, desc = await qmp.error("block-stream", {"device": "drive0", "speed": -1})
            assert (cls, desc) == ("GenericError", "Parameter 'speed' expects a non-negative value")
            assert await qmp.execute("query-block-jobs") == []
            # QEMU creates the job, then fails it early: created, null
            assert qmp.sequence() == ["status:created", "status:null"]
            await qmp.wait_status("drive0", "null")

            await qmp.execute("block-stream", {"device": "drive0", "speed": SLOW})
            cls, desc = await qmp.error("block-job-set-speed", {"device": "drive0", "speed": -1})
            assert (cls, desc) == ("GenericError", "Parameter 'speed' expects a non-negative value")
            assert (await qmp.job("drive0"))["speed"] == SLOW
            await qmp.execute("block-job-cancel", {"device": "drive0"})
            await qmp.wait_gone("drive0")

    with serve(chain4["D"], qmp=True) as served:
        run_async(scenario(served))
    assert backing_names(chain4["D"])[0] == "C.qcow2"


def test_cancel_leaves_the_chain_and_the_data_unchanged(chain4, tmp_path):
    before = qemu_raw(chain4["D"], tmp_path / "before.raw")
    backing = digests(chain4[n] for n in "ABC")

    async def scenario(served):
        async with qmp_session(served.qmp) as qmp:
            await qmp.execute("block-stream", {"device": "drive0", "speed": SLOW})
            await qmp.wait_status("drive0", "running")
            await qmp.execute("block-job-cancel", {"device": "drive0"})
            cancelled = await qmp.wait_gone("drive0")
            assert cancelled["event"] == "BLOCK_JOB_CANCELLED"
            assert cancelled["data"]["len"] == DISK and cancelled["data"]["offset"] < DISK
            assert "BLOCK_JOB_COMPLETED" not in qmp.sequence()
            assert qmp.sequence() == ["status:created", "status:running", "status:aborting",
                                      "BLOCK_JOB_CANCELLED", "status:concluded", "status:null"]

    with serve(chain4["D"], qmp=True) as served:
        run_async(scenario(served))
    assert backing_names(chain4["D"]) == ["C.qcow2", "B.qcow2", "A.qcow2", None]
    assert qemu_raw(chain4["D"], tmp_path / "after.raw") == before
    assert_clean(chain4["D"])
    assert digests(chain4[n] for n in "ABC") == backing


def test_paused_job_needs_force_to_cancel(chain4):
    async def scenario(served):
        async with qmp_session(served.qmp) as qmp:
            await qmp.execute("block-stream", {"device": "drive0", "speed": SLOW})
            await qmp.execute("block-job-pause", {"device": "drive0"})
            await qmp.wait_status("drive0", "paused")
            assert await qmp.error("block-job-cancel", {"device": "drive0"}) == (
                "GenericError", "The block job for device 'drive0' is currently paused")
            await qmp.execute("block-job-cancel", {"device": "drive0", "force": True})
            assert (await qmp.wait_gone("drive0"))["event"] == "BLOCK_JOB_CANCELLED"

    with serve(chain4["D"], qmp=True) as served:
        run_async(scenario(served))


# --- refusals ---------------------------------------------------------------------------------------------


def test_device_not_found(chain4):
    async def scenario(served):
        async with qmp_session(served.qmp) as qmp:
            assert await qmp.error("block-stream", {"device": "nonexistent"}) == (
                "GenericError", "Cannot find device='nonexistent' nor node-name='nonexistent'")
            assert await qmp.error("block-job-pause", {"device": "nonexistent"}) == (
                "DeviceNotActive", "Block job 'nonexistent' not found")
            assert await qmp.error("block-stream", {"device": "drive0", "base": "nonexistent.qcow2"}) == (
                "GenericError", "Can't find 'nonexistent.qcow2' in the backing chain")
            assert await qmp.error("job-pause", {"id": "nonexistent"}) == ("GenericError", "Job not found")
            assert await qmp.execute("query-block-jobs") == []
            assert qmp.sequence() == []

    with serve(chain4["D"], qmp=True) as served:
        run_async(scenario(served))


def test_a_second_job_on_the_same_device_is_refused(chain4):
    async def scenario(served):
        async with qmp_session(served.qmp) as qmp:
            await qmp.execute("block-stream", {"device": "drive0", "job-id": "job0", "speed": SLOW})
            for args in ({"device": "drive0", "job-id": "job1"}, {"device": "drive0", "job-id": "job1",
                                                                 "base": "A.qcow2"}):
                cls, desc = await qmp.error("block-stream", args)
                assert cls == "GenericError"
                assert desc == "Node 'drive0' is busy: block device is in use by block job: stream"
            assert [j["device"] for j in await qmp.execute("query-block-jobs")] == ["job0"]
            await qmp.execute("block-job-cancel", {"device": "job0"})
            await qmp.wait_gone("job0")
            # and once it is gone the device is free again
            await qmp.execute("block-stream", {"device": "drive0", "job-id": "job1"})
            assert "error" not in (await qmp.wait_gone("job1"))["data"]

    with serve(chain4["D"], qmp=True) as served:
        run_async(scenario(served))
    assert backing_names(chain4["D"]) == [None]


def test_two_streams_on_two_served_devices_run_at_once(tmp_path):
    """vdisk serves one device per process: two servers, one job each, at the same time."""
    chains = []
    for name in ("left", "right"):
        d = tmp_path / name
        d.mkdir()
        run("qemu-img", "create", "-q", "-f", "qcow2", d / "base.qcow2", "4M")
        run("qemu-io", "-c", f"write -P {0x11 if name == 'left' else 0x22} 0 4M", d / "base.qcow2")
        run("qemu-img", "create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", d / "top.qcow2")
        chains.append(d / "top.qcow2")

    async def scenario(left, right):
        async with qmp_session(left.qmp) as a, qmp_session(right.qmp) as b:
            await a.execute("block-stream", {"device": "vda", "speed": 4 * MiB})
            await b.execute("block-stream", {"device": "vdb", "speed": 4 * MiB})
            assert (await a.job("vda"))["status"] == "running"
            assert (await b.job("vdb"))["status"] == "running"
            done = await asyncio.gather(a.wait_gone("vda"), b.wait_gone("vdb"))
            assert all("error" not in ev["data"] for ev in done)

    with serve(chains[0], "--device", "vda", qmp=True) as left, \
            serve(chains[1], "--device", "vdb", qmp=True) as right:
        run_async(scenario(left, right))
    for top, byte in zip(chains, (0x11, 0x22)):
        assert backing_names(top) == [None]
        assert qemu_raw(top, tmp_path / "out.raw") == bytes([byte]) * (4 * MiB)


def test_two_streams_on_two_devices_of_one_server_in_process(tmp_path):
    """The job engine itself runs jobs on several devices of one server at once."""
    from vdisk.block import chain
    from vdisk.block.device import BlockDevice
    from vdisk.qmp import commands
    from vdisk.qmp.context import CommandContext

    context = CommandContext()
    for name in ("vda", "vdb"):
        d = tmp_path / name
        d.mkdir()
        run("qemu-img", "create", "-q", "-f", "qcow2", d / "base.qcow2", "4M")
        run("qemu-io", "-c", "write -P 0x33 0 4M", d / "base.qcow2")
        run("qemu-img", "create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", d / "top.qcow2")
        context.devices[name] = BlockDevice(name, chain.open_chain(str(d / "top.qcow2")))
    try:
        commands.block_stream(context, device="vda", speed=4 * MiB)
        commands.block_stream(context, device="vdb", speed=4 * MiB)
        assert sorted(j["device"] for j in commands.query_block_jobs(context)) == ["vda", "vdb"]
        threads = [job.thread for job in context.jobs]
        for thread in threads:
            thread.join(30)
        assert commands.query_block_jobs(context) == []
        assert all(len(dev.nodes()) == 1 for dev in context.devices.values())
    finally:
        context.jobs.cancel_all()
        for dev in context.devices.values():
            dev.close()
    for name in ("vda", "vdb"):
        assert backing_names(tmp_path / name / "top.qcow2") == [None]
        assert_clean(tmp_path / name / "top.qcow2")


# --- a backing file smaller than the top ----------------------------------------------------------------


def test_backing_file_smaller_than_the_top(tmp_path):
    """030's TestSmallerBackingFile: the stream ends; past the backing file's end the disk reads zeros."""
    run("qemu-img", "create", "-q", "-f", "qcow2", tmp_path / "A.qcow2", "2M")
    run("qemu-io", "-c", "write -P 0xa1 0 2M", tmp_path / "A.qcow2")
    run("qemu-img", "create", "-q", "-f", "qcow2", "-b", "A.qcow2", "-F", "qcow2", tmp_path / "B.qcow2", "5M")
    run("qemu-io", "-c", "write -P 0xb2 1M 3M", tmp_path / "B.qcow2")
    run("qemu-img", "create", "-q", "-f", "qcow2", "-b", "B.qcow2", "-F", "qcow2", tmp_path / "D.qcow2", "8M")
    run("qemu-io", "-c", "write -P 0xd4 7M 64k", tmp_path / "D.qcow2")
    expected = b"\xa1" * MiB + b"\xb2" * 3 * MiB + bytes(3 * MiB) + b"\xd4" * 65536 + bytes(MiB - 65536)
    assert qemu_raw(tmp_path / "D.qcow2", tmp_path / "before.raw") == expected

    async def scenario(served):
        async with qmp_session(served.qmp) as qmp:
            await qmp.execute("block-stream", {"device": "drive0"})
            done = await qmp.wait_gone("drive0")
            assert "error" not in done["data"] and done["data"]["offset"] == done["data"]["len"] == 8 * MiB

    with serve(tmp_path / "D.qcow2", qmp=True) as served:
        run_async(scenario(served))
        h = nbd.NBD()
        h.connect_uri(served.uri)
        assert h.pread(8 * MiB, 0) == expected
        h.shutdown()
    assert backing_names(tmp_path / "D.qcow2") == [None]
    assert qemu_raw(tmp_path / "D.qcow2", tmp_path / "after.raw") == expected
    assert_clean(tmp_path / "D.qcow2")


# --- error policies (030's TestEIO / TestENOSPC), errors injected with VDISK_FAULTS ------------------------


def _faults(monkeypatch, path: Path, *, op: str = "read", errno: str = "EIO", count: int = -1) -> None:
    monkeypatch.setenv("VDISK_FAULTS", json.dumps([{"path": str(path), "op": op, "errno": errno,
                                                    "count": count}]))


async def _errors_and_end(qmp, job_id: str = "drive0") -> tuple[list[dict], dict]:
    end = await qmp.wait_gone(job_id)
    return [ev["data"] for ev in qmp.events if ev["event"] == "BLOCK_JOB_ERROR"], end


@pytest.mark.parametrize("on_error", ["report", "enospc"])
def test_read_error_with_report_fails_the_job_where_it_happened(chain4, tmp_path, monkeypatch, on_error):
    """EIO reading B, whose first data is in the second chunk: the job ends with QEMU's error text."""
    before = qemu_raw(chain4["D"], tmp_path / "before.raw")
    _faults(monkeypatch, chain4["B"])

    async def scenario(served):
        async with qmp_session(served.qmp) as qmp:
            await qmp.execute("block-stream", {"device": "drive0", "on-error": on_error})
            errors, end = await _errors_and_end(qmp)
            assert errors == [{"device": "drive0", "operation": "read", "action": "report"}]
            assert end["event"] == "BLOCK_JOB_COMPLETED"
            assert end["data"]["error"] == "Input/output error"
            assert end["data"]["offset"] == ERROR_AT and end["data"]["len"] == DISK
            assert qmp.sequence() == ["status:created", "status:running", "BLOCK_JOB_ERROR", "status:aborting",
                                      "BLOCK_JOB_COMPLETED", "status:concluded", "status:null"]

    with serve(chain4["D"], qmp=True) as served:
        run_async(scenario(served))
    monkeypatch.delenv("VDISK_FAULTS")
    assert backing_names(chain4["D"])[0] == "C.qcow2", "a failed stream must not change the chain"
    assert qemu_raw(chain4["D"], tmp_path / "after.raw") == before
    assert_clean(chain4["D"])


def test_read_error_with_ignore_copies_the_rest_but_keeps_the_chain(chain4, tmp_path, monkeypatch):
    """QEMU: an ignored error still fails the job at its end, so the backing file is not dropped."""
    before = qemu_raw(chain4["D"], tmp_path / "before.raw")
    _faults(monkeypatch, chain4["B"])

    async def scenario(served):
        async with qmp_session(served.qmp) as qmp:
            await qmp.execute("block-stream", {"device": "drive0", "on-error": "ignore"})
            errors, end = await _errors_and_end(qmp)
            assert errors and all(e == {"device": "drive0", "operation": "read", "action": "ignore"}
                                  for e in errors)
            assert end["event"] == "BLOCK_JOB_COMPLETED"
            assert end["data"]["error"] == "Input/output error"
            assert end["data"]["offset"] == end["data"]["len"] == DISK

    with serve(chain4["D"], qmp=True) as served:
        run_async(scenario(served))
    monkeypatch.delenv("VDISK_FAULTS")
    assert backing_names(chain4["D"])[0] == "C.qcow2"
    assert qemu_raw(chain4["D"], tmp_path / "after.raw") == before
    # the chunks without errors were copied all the same
    assert any(e["depth"] == 0 and e["data"] for e in qemu_map(chain4["D"]))
    assert_clean(chain4["D"])


@pytest.mark.parametrize(("errno", "io_status", "on_error"),
                         [("EIO", "failed", "stop"), ("ENOSPC", "nospace", "enospc"), ("ENOSPC", "nospace", "stop")])
def test_read_error_with_stop_pauses_and_resume_retries(chain4, tmp_path, monkeypatch, errno, io_status, on_error):
    before = qemu_raw(chain4["D"], tmp_path / "before.raw")
    _faults(monkeypatch, chain4["B"], errno=errno, count=1)

    async def scenario(served):
        async with qmp_session(served.qmp) as qmp:
            await qmp.execute("block-stream", {"device": "drive0", "on-error": on_error})
            error = await qmp.wait_event("BLOCK_JOB_ERROR")
            assert error["data"] == {"device": "drive0", "operation": "read", "action": "stop"}
            await qmp.wait_status("drive0", "paused")
            info = await qmp.job("drive0")
            assert info["paused"] is True and info["status"] == "paused"
            assert info["io-status"] == io_status and info["offset"] == ERROR_AT
            await asyncio.sleep(0.2)
            assert (await qmp.job("drive0"))["offset"] == ERROR_AT
            await qmp.execute("block-job-resume", {"device": "drive0"})
            info = await qmp.job("drive0")
            if info is not None:
                assert info["io-status"] == "ok" and info["paused"] is False
            end = await qmp.wait_gone("drive0")
            assert end["event"] == "BLOCK_JOB_COMPLETED" and "error" not in end["data"]
            assert end["data"]["offset"] == end["data"]["len"] == DISK

    with serve(chain4["D"], qmp=True) as served:
        run_async(scenario(served))
    monkeypatch.delenv("VDISK_FAULTS")
    assert backing_names(chain4["D"]) == [None]
    assert qemu_raw(chain4["D"], tmp_path / "after.raw") == before
    assert_clean(chain4["D"])


@pytest.mark.parametrize("on_error", ["report", "stop", "ignore"])
def test_write_error_in_the_active_image(chain4, tmp_path, monkeypatch, on_error):
    """A failed write of a copied chunk: reported as a write error; the device stays fully writable after."""
    before = bytearray(qemu_raw(chain4["D"], tmp_path / "before.raw"))
    _faults(monkeypatch, chain4["D"], op="write", count=1)

    async def scenario(served):
        async with qmp_session(served.qmp) as qmp:
            await qmp.execute("block-stream", {"device": "drive0", "on-error": on_error})
            error = await qmp.wait_event("BLOCK_JOB_ERROR")
            assert error["data"] == {"device": "drive0", "operation": "write", "action": on_error}
            if on_error == "stop":
                await qmp.wait_status("drive0", "paused")
                assert (await qmp.job("drive0"))["io-status"] == "failed"
                await qmp.execute("block-job-resume", {"device": "drive0"})
            end = await qmp.wait_gone("drive0")
            assert end["event"] == "BLOCK_JOB_COMPLETED"
            assert end["data"]["offset"] == DISK or on_error == "report"
            assert end["data"]["offset"] <= DISK
            if on_error == "stop":
                assert "error" not in end["data"]
            else:
                assert end["data"]["error"] == "Input/output error"

    with serve(chain4["D"], qmp=True) as served:
        run_async(scenario(served))
        # Every cluster must still take guest writes: no copy lock may outlive the failed job.
        data = bytes([0x5A]) * DISK
        errors = []

        def write_all():
            try:
                h = nbd.NBD()
                h.connect_uri(served.uri)
                h.pwrite(data, 0)
                h.flush()
                h.shutdown()
            except Exception as exc:  # noqa: BLE001
                errors.append(exc)

        writer = threading.Thread(target=write_all, daemon=True)
        writer.start()
        writer.join(20)
        assert not writer.is_alive(), "a guest write hangs after the job failed: a copy lock was leaked"
        assert not errors, errors
        before[:] = data
    monkeypatch.delenv("VDISK_FAULTS")
    assert backing_names(chain4["D"])[0] == (None if on_error == "stop" else "C.qcow2")
    assert qemu_raw(chain4["D"], tmp_path / "after.raw") == before
    assert qemu_img_check_ok(chain4["D"])


def qemu_img_check_ok(path: Path) -> bool:
    result = qemu_img_check(path)
    return result.get("corruptions", 0) == 0 and result["check-errors"] == 0


# --- HMP ----------------------------------------------------------------------------------------------------


def test_hmp_info_block_jobs_block_stream_and_cancel(chain4, tmp_path):
    before = qemu_raw(chain4["D"], tmp_path / "before.raw")

    async def scenario(served):
        async with qmp_session(served.qmp) as qmp:
            assert await qmp.hmp("info block-jobs") == "No active jobs\r\n"
            assert await qmp.hmp("block_stream drive0 1") == ""  # QEMU's [speed [base]] form: 1 byte/s
            await qmp.wait_status("drive0", "running")
            text = await qmp.hmp("info block-jobs")
            match = re.fullmatch(rf"Streaming device drive0: Completed (\d+) of {DISK} bytes, speed limit 1 bytes/s\r\n",
                                 text)
            assert match and int(match.group(1)) in (0, CHUNK), text
            assert await qmp.hmp("block_job_set_speed drive0 2048") == ""
            assert "speed limit 2048 bytes/s" in await qmp.hmp("info block-jobs")
            assert await qmp.hmp("block_job_pause drive0") == ""
            await qmp.wait_status("drive0", "paused")
            assert await qmp.hmp("block_job_cancel drive0") == \
                "Error: The block job for device 'drive0' is currently paused\r\n"
            assert await qmp.hmp("block_job_cancel -f drive0") == ""
            assert (await qmp.wait_gone("drive0"))["event"] == "BLOCK_JOB_CANCELLED"
            assert await qmp.hmp("info block-jobs") == "No active jobs\r\n"
            assert backing_names(chain4["D"])[0] == "C.qcow2"

            assert await qmp.hmp("block_stream drive0 A.qcow2") == ""
            assert "error" not in (await qmp.wait_gone("drive0"))["data"]
            assert await qmp.hmp("info block-jobs") == "No active jobs\r\n"
            assert "Backing file:     A.qcow2 (chain depth: 1)" in await qmp.hmp("info block")
            assert await qmp.hmp("block_stream drive0") == ""
            assert "error" not in (await qmp.wait_gone("drive0"))["data"]
            assert await qmp.hmp("block_stream nonexistent") == \
                "Error: Cannot find device='nonexistent' nor node-name='nonexistent'\r\n"

    with serve(chain4["D"], qmp=True) as served:
        run_async(scenario(served))
    assert backing_names(chain4["D"]) == [None]
    assert qemu_raw(chain4["D"], tmp_path / "after.raw") == before


# --- QMP wire details -----------------------------------------------------------------------------------------


def test_greeting_and_commands_before_negotiation(chain4):
    async def scenario(served):
        async with qmp_session(served.qmp, negotiate=False) as qmp:
            greeting = qmp.client.greeting.QMP
            assert greeting.version["qemu"] == {"major": 7, "minor": 2, "micro": 0}
            assert greeting.version["package"].startswith("vdisk-")
            assert list(greeting.capabilities) == []
            for command in ("query-block-jobs", "block-stream"):
                assert await qmp.error(command, {"device": "drive0"} if command == "block-stream" else None) == (
                    "CommandNotFound", "Expecting capabilities negotiation with 'qmp_capabilities'")
            assert await qmp.execute("qmp_capabilities") == {}
            assert await qmp.error("qmp_capabilities") == (
                "CommandNotFound", "Capabilities negotiation is already complete, command ignored")
            assert await qmp.execute("query-block-jobs") == []
            names = {c["name"] for c in await qmp.execute("query-commands")}
            assert {"block-stream", "query-block-jobs", "block-job-set-speed", "block-job-pause",
                    "block-job-resume", "block-job-cancel", "job-finalize", "job-dismiss",
                    "blockdev-snapshot-sync", "human-monitor-command", "qmp_capabilities"} <= names

    with serve(chain4["D"], qmp=True) as served:
        run_async(scenario(served))


def _raw_exchange(sock: socket.socket, data: bytes) -> dict:
    sock.sendall(data)
    buffer = b""
    while not buffer.endswith(b"\r\n"):
        chunk = sock.recv(65536)
        assert chunk, f"the monitor closed the connection after {data!r}"
        buffer += chunk
    return json.loads(buffer)


def test_malformed_json_gets_an_error_and_the_connection_stays_usable(chain4):
    """qemu.qmp cannot send broken JSON, so this one test writes bytes to the socket itself."""
    with serve(chain4["D"], qmp=True) as served, socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(10)
            sock.connect(str(served.qmp))
            greeting = b""
            while not greeting.endswith(b"\r\n"):
                greeting += sock.recv(65536)
            assert json.loads(greeting)["QMP"]["version"]["qemu"]["major"] == 7
            assert _raw_exchange(sock, b'{"execute": "qmp_capabilities"}\r\n') == {"return": {}}
            error = _raw_exchange(sock, b'{"execute": nonsense}\r\n')
            assert error["error"]["class"] == "GenericError" and "JSON parse error" in error["error"]["desc"]
            assert "id" not in error
            assert _raw_exchange(sock, b'{"execute": "query-block-jobs", "id": 7}\r\n') == {"return": [], "id": 7}
