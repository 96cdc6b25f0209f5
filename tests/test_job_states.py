"""vdisk.jobs.job: QEMU's job state table and verb table, the Job lifecycle and its events, the rate limiter.

The expected tables below are written out from QEMU's job.c in a different form from the module's own
matrices, so a typo in one does not hide in the other.  The lifecycle traces are what qemu-storage-daemon
7.2 sent for a block-stream job driven through the same steps.
"""

from __future__ import annotations

import copy
import errno
import itertools
import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from vdisk.errors import GenericError, InvalidArgument, StateError, StorageError
from vdisk.jobs.job import (
    BLOCK_JOB_SLICE_TIME,
    JOB_STATUS_TRANSITIONS,
    JOB_VERB_TABLE,
    Event,
    Job,
    JobStatus,
    JobType,
    JobVerb,
    RateLimiter,
    check_verb,
    transition,
    validate_job_id,
)
from vdisk.qmp import connection

HYPOTHESIS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# job.c JobSTT, one line per source state
ALLOWED_TRANSITIONS = """
    undefined -> created
    created   -> running aborting null
    running   -> paused ready waiting aborting
    paused    -> running
    ready     -> standby waiting aborting
    standby   -> ready
    waiting   -> pending aborting
    pending   -> aborting concluded
    aborting  -> aborting concluded
    concluded -> null
"""
# job.c JobVerbTable, one line per verb
ALLOWED_VERBS = """
    cancel:    created running paused ready standby waiting pending
    pause:     created running paused ready standby
    resume:    created running paused ready standby
    set-speed: created running paused ready standby
    complete:  ready standby
    finalize:  pending
    dismiss:   concluded
    change:    created running paused ready standby
"""


def parse_transitions() -> set[tuple[str, str]]:
    allowed = set()
    for line in ALLOWED_TRANSITIONS.strip().splitlines():
        src, dsts = line.split("->")
        allowed |= {(src.strip(), dst) for dst in dsts.split()}
    return allowed


def parse_verbs() -> set[tuple[str, str]]:
    allowed = set()
    for line in ALLOWED_VERBS.strip().splitlines():
        verb, states = line.split(":")
        allowed |= {(state, verb.strip()) for state in states.split()}
    return allowed


EXPECTED_TRANSITIONS = parse_transitions()
EXPECTED_VERBS = parse_verbs()


# --- the tables, every pair -------------------------------------------------------------------------------


def test_enums_match_qapi():
    assert [s.value for s in JobStatus] == ["undefined", "created", "running", "paused", "ready", "standby",
                                            "waiting", "pending", "aborting", "concluded", "null"]
    assert {v.value for v in JobVerb} == {"cancel", "pause", "resume", "set-speed", "complete", "finalize",
                                          "dismiss", "change"}
    assert len(JOB_STATUS_TRANSITIONS) == 11 * 11 and len(JOB_VERB_TABLE) == 11 * 8


@pytest.mark.parametrize(("src", "dst"), list(itertools.product(JobStatus, JobStatus)),
                         ids=lambda s: s.value)
def test_every_state_pair_against_jobstt(src, dst):
    if (src.value, dst.value) in EXPECTED_TRANSITIONS:
        assert transition(src, dst) is dst
    else:
        with pytest.raises(StateError) as info:
            transition(src, dst)
        assert info.value.state == src.value and info.value.action == dst.value


@pytest.mark.parametrize(("status", "verb"), list(itertools.product(JobStatus, JobVerb)), ids=lambda s: s.value)
def test_every_state_verb_pair_against_jobverbtable(status, verb):
    if (status.value, verb.value) in EXPECTED_VERBS:
        check_verb(status, verb, "job0")
    else:
        with pytest.raises(StateError) as info:
            check_verb(status, verb, "job0")
        assert str(info.value) == f"Job 'job0' in state '{status.value}' cannot accept command verb '{verb.value}'"
        assert info.value.qmp_class == "GenericError"


def test_pairs_outside_the_tables_raise():
    with pytest.raises(StateError):
        transition("sleeping", JobStatus.PAUSED)
    with pytest.raises(StateError):
        transition(JobStatus.RUNNING, None)
    with pytest.raises(StateError):
        check_verb(JobStatus.RUNNING, "explode")
    # the enums are str-valued: QEMU's own spelling names the same state
    assert transition("running", "paused") is JobStatus.PAUSED


def test_verb_error_text_is_qemus():
    with pytest.raises(StateError, match=r"^Job 'job0' in state 'concluded' cannot accept command verb 'pause'$"):
        check_verb(JobStatus.CONCLUDED, JobVerb.PAUSE, "job0")


# --- lifecycle traces from qemu-storage-daemon 7.2 ----------------------------------------------------------

TIMESTAMP_PREFIX = b'{"timestamp": {"seconds": 0, "microseconds": 0}, '


def wire(events: list[Event]) -> list[str]:
    """The events as QEMU writes them, less the timestamp."""
    out = []
    for ev in events:
        message = connection.event(ev.name, ev.data, 0.0)
        assert message.startswith(TIMESTAMP_PREFIX)
        out.append(message[len(TIMESTAMP_PREFIX):-2].decode())
    return out


def status(name: str) -> str:
    return f'"event": "JOB_STATUS_CHANGE", "data": {{"status": "{name}", "id": "job0"}}}}'


MiB64 = 64 << 20


def stream_job(**kwargs) -> tuple[Job, list[Event]]:
    job = Job("job0", JobType.STREAM, **kwargs)
    events = job.create()
    return job, events


def run_to_end(job: Job) -> None:
    job.progress_set_remaining(MiB64)
    job.progress_update(MiB64)


def test_manual_finalize_and_dismiss_trace_matches_qemu():
    job, events = stream_job(auto_finalize=False, auto_dismiss=False)
    events += job.set_speed(1 << 20) + job.start() + job.on_pause_point()
    assert wire(events) == [status("created"), status("running")]
    assert job.info() == {"type": "stream", "device": "job0", "len": 0, "offset": 0, "busy": True, "paused": False,
                          "speed": 1048576, "io-status": "ok", "ready": False, "status": "running",
                          "auto-finalize": False, "auto-dismiss": False}
    assert job.user_pause() == []
    assert wire(job.on_pause_point()) == [status("paused")]
    with pytest.raises(GenericError, match="^Job is already paused$"):
        job.user_pause()
    assert job.info()["paused"] is True and job.info()["status"] == "paused" and job.info()["busy"] is False
    with pytest.raises(StateError, match="^Job 'job0' in state 'paused' cannot accept command verb 'complete'$"):
        job.complete()
    assert job.user_resume() == [] and not job.pause_requested
    assert wire(job.leave_pause_point()) == [status("running")]
    with pytest.raises(GenericError, match="^Can't resume a job that was not paused$"):
        job.user_resume()
    with pytest.raises(InvalidArgument, match="^Parameter 'speed' expects a non-negative value$"):
        job.set_speed(-1)
    job.set_speed(0)
    run_to_end(job)
    assert wire(job.complete_run()) == [
        status("waiting"), status("pending"),
        '"event": "BLOCK_JOB_PENDING", "data": {"type": "stream", "id": "job0"}}',
    ]
    assert job.query_jobs_info() == {"id": "job0", "type": "stream", "status": "pending",
                                     "current-progress": MiB64, "total-progress": MiB64}
    with pytest.raises(StateError, match="^Job 'job0' in state 'pending' cannot accept command verb 'pause'$"):
        job.user_pause()
    assert wire(job.finalize()) == [
        '"event": "BLOCK_JOB_COMPLETED", "data": {"device": "job0", "len": 67108864, "offset": 67108864, '
        '"speed": 0, "type": "stream"}}',
        status("concluded"),
    ]
    assert job.query_jobs_info()["status"] == "concluded" and "error" not in job.query_jobs_info()
    assert wire(job.dismiss()) == [status("null")]


def test_block_job_cancel_refuses_a_user_paused_job_without_force():
    job, _ = stream_job(auto_dismiss=False)
    job.start()
    job.user_pause()
    assert wire(job.on_pause_point()) == [status("paused")]
    with pytest.raises(GenericError, match="^The block job for device 'job0' is currently paused$"):
        job.block_job_cancel()
    with pytest.raises(StateError, match="^Job 'job0' in state 'paused' cannot accept command verb 'dismiss'$"):
        job.dismiss()
    assert job.status is JobStatus.PAUSED and job.user_paused


def test_cancel_while_pending_trace_matches_qemu():
    job, _ = stream_job(auto_finalize=False)
    job.start()
    run_to_end(job)
    job.complete_run()
    assert wire(job.cancel()) == [
        status("aborting"),
        '"event": "BLOCK_JOB_CANCELLED", "data": {"device": "job0", "len": 67108864, "offset": 67108864, '
        '"speed": 0, "type": "stream"}}',
        status("concluded"), status("null"),
    ]


def test_automatic_finalize_and_dismiss_trace_matches_qemu():
    job, events = stream_job()
    events += job.set_speed(1) + job.start()
    run_to_end(job)
    job.set_speed(0)
    events += job.complete_run()
    assert wire(events) == [
        status("created"), status("running"), status("waiting"), status("pending"),
        '"event": "BLOCK_JOB_COMPLETED", "data": {"device": "job0", "len": 67108864, "offset": 67108864, '
        '"speed": 0, "type": "stream"}}',
        status("concluded"), status("null"),
    ]


# --- lifecycle details ------------------------------------------------------------------------------------


def test_created_job_is_held_until_started():
    job, events = stream_job()
    assert [e.data["status"] for e in events] == ["created"]
    assert job.pause_count == 1 and job.info()["paused"] is True and job.pause_requested
    assert wire(job.start()) == [status("running")]
    assert job.pause_count == 0 and job.busy and not job.paused
    with pytest.raises(StateError):
        job.start()


def test_pause_before_start_parks_the_worker_at_its_first_pause_point():
    job, _ = stream_job()
    job.user_pause()
    job.start()
    assert job.pause_requested
    assert wire(job.on_pause_point()) == [status("paused")]
    job.user_resume()
    assert wire(job.leave_pause_point()) == [status("running")]


def test_cancel_before_start_finishes_without_block_events():
    job, _ = stream_job(auto_dismiss=False)
    job.user_pause()
    events = job.cancel()
    assert wire(events) == [status("aborting"), status("concluded"), status("null")]
    assert job.status is JobStatus.NULL and job.pause_count == 1


def test_cancel_of_a_running_job_waits_for_the_worker():
    job, _ = stream_job(auto_dismiss=False)
    job.start()
    assert job.cancel() == [] and job.is_cancelled and job.cancel_requested
    assert job.status is JobStatus.RUNNING
    assert not job.on_pause_point()  # a cancelled job does not park
    events = job.complete_run()
    assert [e.name for e in events] == ["JOB_STATUS_CHANGE", "BLOCK_JOB_CANCELLED", "JOB_STATUS_CHANGE"]
    assert job.query_jobs_info()["error"] == os.strerror(errno.ECANCELED) == "Operation canceled"
    assert job.info()["error"] == "Operation canceled"
    assert wire(job.dismiss()) == [status("null")]


def test_cancel_of_a_paused_job_releases_the_user_pause():
    job, _ = stream_job()
    job.start()
    job.user_pause()
    job.on_pause_point()
    assert job.cancel(force=True) == []
    assert not job.user_paused and job.pause_count == 0 and not job.pause_requested
    assert wire(job.leave_pause_point())[0] == status("running")
    assert wire(job.complete_run())[0] == status("aborting")


def test_failed_run_reports_its_error():
    job, _ = stream_job(auto_dismiss=False)
    job.start()
    job.progress_set_remaining(100)
    events = job.complete_run(StorageError("read failed", path="/img/top.qcow2", os_errno=errno.EIO))
    assert [e.name for e in events] == ["JOB_STATUS_CHANGE", "BLOCK_JOB_COMPLETED", "JOB_STATUS_CHANGE"]
    assert events[1].data == {"device": "job0", "len": 100, "offset": 0, "speed": 0, "type": "stream",
                              "error": "/img/top.qcow2: read failed"}
    assert job.ret == -errno.EIO
    assert job.query_jobs_info()["error"] == "/img/top.qcow2: read failed"


@pytest.mark.parametrize(("error", "text", "code"), [
    (OSError(errno.ENOSPC, "No space left on device"), "No space left on device", errno.ENOSPC),
    (OSError(errno.EIO, "boom"), "Input/output error", errno.EIO),
    ("copy-on-read failed at offset 0x10000", "copy-on-read failed at offset 0x10000", errno.EIO),
    (RuntimeError("unexpected"), "unexpected", errno.EIO),
])
def test_error_text_and_code(error, text, code):
    job, _ = stream_job(auto_dismiss=False)
    job.start()
    job.complete_run(error)
    assert job.error == text and job.ret == -code


def test_prepare_failure_turns_success_into_abort():
    class Failing(Job):
        def __init__(self):
            super().__init__("job0", "stream")
            self.calls = []

        def _prepare(self):
            self.calls.append("prepare")
            raise StorageError("cannot rewrite backing file", path="/img/top.qcow2", os_errno=errno.EACCES)

        def _commit(self):
            self.calls.append("commit")

        def _abort(self):
            self.calls.append("abort")

        def _clean(self):
            self.calls.append("clean")

    job = Failing()
    job.create()
    job.start()
    events = job.complete_run()
    assert [e.data.get("status", e.name) for e in events] == [
        "waiting", "pending", "aborting", "BLOCK_JOB_COMPLETED", "concluded", "null"]
    assert events[3].data["error"] == "/img/top.qcow2: cannot rewrite backing file"
    assert job.calls == ["prepare", "abort", "clean"]
    assert job.ret == -errno.EACCES


def test_hooks_run_in_qemus_order_on_success_and_on_cancel():
    class Recording(Job):
        def __init__(self, **kw):
            super().__init__("job0", "stream", **kw)
            self.calls = []

        def _prepare(self):
            self.calls.append("prepare")

        def _commit(self):
            self.calls.append("commit")

        def _abort(self):
            self.calls.append("abort")

        def _clean(self):
            self.calls.append("clean")
            raise RuntimeError("clean failed")  # logged, the job still concludes

    job = Recording()
    job.create()
    job.start()
    job.complete_run()
    assert job.calls == ["prepare", "commit", "clean"] and job.status is JobStatus.NULL
    job = Recording(auto_finalize=False)
    job.create()
    job.start()
    job.complete_run()
    job.cancel()
    assert job.calls == ["abort", "clean"] and job.status is JobStatus.NULL


def test_internal_job_emits_no_events():
    job = Job(None, "stream")
    assert job.create() + job.start() + job.complete_run() == []
    assert job.status is JobStatus.NULL
    assert job.error_action("report", True, errno.EIO) == ("report", [])


def test_non_block_job_emits_only_status_changes():
    job = Job("create0", "create", auto_finalize=False)
    events = job.create() + job.start() + job.complete_run() + job.finalize()
    assert {e.name for e in events} == {"JOB_STATUS_CHANGE"}
    assert job.status is JobStatus.NULL and not job.is_block_job


def test_early_fail_after_a_bad_speed():
    job, events = stream_job()
    with pytest.raises(InvalidArgument):
        job.set_speed(-5)
    events += job.early_fail()
    assert wire(events) == [status("created"), status("null")]
    with pytest.raises(StateError):
        job.early_fail()


def test_complete_and_change_need_a_job_type_that_has_them():
    job, _ = stream_job()
    job.start()
    with pytest.raises(StateError, match="cannot accept command verb 'complete'"):
        job.complete()
    with pytest.raises(GenericError, match="^Job type does not support change$"):
        job.change({})
    job.transition_to_ready()
    with pytest.raises(GenericError, match="^The active block job 'job0' cannot be completed$"):
        job.complete()


class MirrorLike(Job):
    """A job with a ready phase, job-complete and a soft cancel (like QEMU's mirror)."""

    supports_complete = True

    def __init__(self, job_id="job0", **kwargs):
        super().__init__(job_id, "mirror", **kwargs)
        self.complete_requested = False

    def _driver_complete(self):
        self.complete_requested = True
        return []

    def _driver_cancel(self, force):
        return force or not self.is_ready  # mirror_cancel()


def test_ready_standby_and_complete():
    job = MirrorLike()
    job.create()
    job.start()
    events = job.transition_to_ready()
    assert wire(events) == [
        status("ready"),
        '"event": "BLOCK_JOB_READY", "data": {"device": "job0", "len": 0, "offset": 0, "speed": 0, "type": "mirror"}}',
    ]
    job.user_pause()
    assert wire(job.on_pause_point()) == [status("standby")]
    assert job.info()["ready"] is True
    job.complete()  # allowed in standby too
    assert job.complete_requested
    job.user_resume()
    assert wire(job.leave_pause_point()) == [status("ready")]
    assert [e.data.get("status", e.name) for e in job.complete_run()] == [
        "waiting", "pending", "BLOCK_JOB_COMPLETED", "concluded", "null"]


def test_soft_cancel_of_a_job_that_never_ran_is_a_real_cancel():
    class AlwaysSoft(MirrorLike):
        def _driver_cancel(self, force):
            return False

    job = AlwaysSoft()
    job.create()
    assert [e.data["status"] for e in job.cancel(force=False)] == ["aborting", "concluded", "null"]
    assert job.is_cancelled


def test_soft_cancel_of_a_ready_job_completes_it():
    job = MirrorLike()
    job.create()
    job.start()
    job.transition_to_ready()
    assert job.cancel(force=False) == []
    assert job.cancel_requested and not job.is_cancelled
    with pytest.raises(GenericError, match="cannot be completed"):
        job.complete()
    names = [e.name for e in job.complete_run()]
    assert "BLOCK_JOB_COMPLETED" in names and "BLOCK_JOB_CANCELLED" not in names


def test_error_action_stop_pauses_and_resume_clears_io_status():
    job, _ = stream_job()
    job.start()
    action, events = job.error_action("enospc", is_read=False, os_errno=errno.ENOSPC)
    assert action == "stop"
    assert wire(events) == ['"event": "BLOCK_JOB_ERROR", "data": {"device": "job0", "operation": "write", '
                            '"action": "stop"}}']
    assert job.user_paused and job.pause_requested and job.info()["io-status"] == "nospace"
    job.on_pause_point()
    job.user_resume()
    assert job.info()["io-status"] == "ok" and not job.pause_requested
    assert job.error_action("auto", True, errno.EIO)[0] == "report"
    assert job.error_action("ignore", True, errno.EIO)[0] == "ignore"
    assert job.error_action("stop", True, errno.EIO)[0] == "stop" and job.iostatus == "failed"
    with pytest.raises(InvalidArgument):
        job.error_action("explode", True, errno.EIO)


def test_internal_pause_and_resume_nest_with_user_pause():
    job, _ = stream_job()
    job.start()
    job.pause()
    job.user_pause()
    job.user_resume()
    assert job.pause_requested
    job.resume()
    assert not job.pause_requested
    with pytest.raises(StateError):
        job.resume()


def test_worker_protocol_misuse_raises():
    job, _ = stream_job()
    with pytest.raises(StateError):
        job.on_pause_point()
    with pytest.raises(StateError):
        job.complete_run()
    job.start()
    with pytest.raises(StateError):
        job.leave_pause_point()
    job.user_pause()
    job.on_pause_point()
    with pytest.raises(StateError):
        job.on_pause_point()
    with pytest.raises(StateError):
        job.complete_run()


@pytest.mark.parametrize("job_id", ["job0", "a", "A.b-c_d9"])
def test_well_formed_job_ids(job_id):
    assert validate_job_id(job_id) == job_id


@pytest.mark.parametrize("job_id", ["", "0job", "-x", "job 0", "job/0", "#block123", "jöb"])
def test_malformed_job_ids(job_id):
    with pytest.raises(GenericError, match=f"^Invalid job ID '{job_id}'$"):
        validate_job_id(job_id)
    with pytest.raises(GenericError):
        Job(job_id, "stream")


# --- random verb sequences never reach an undefined state ---------------------------------------------------


def snapshot(job: Job) -> dict:
    state = {}
    for name, value in vars(job).items():
        state[name] = dict(vars(value)) if isinstance(value, RateLimiter) else copy.copy(value)
    return state


class JobMachine(RuleBasedStateMachine):
    """Random interleavings of user verbs and worker steps against the tables."""

    @initialize(kind=st.sampled_from(["stream", "mirror", "create"]), auto_finalize=st.booleans(),
                auto_dismiss=st.booleans())
    def setup(self, kind, auto_finalize, auto_dismiss):
        if kind == "mirror":
            self.job = MirrorLike(auto_finalize=auto_finalize, auto_dismiss=auto_dismiss)
        else:
            self.job = Job("job0", kind, auto_finalize=auto_finalize, auto_dismiss=auto_dismiss)
        self.last_status = JobStatus.UNDEFINED
        self.internal_pauses = 0
        self.finished_events = 0
        self.record(self.job.create())

    def record(self, events):
        for ev in events:
            if ev.name == "JOB_STATUS_CHANGE":
                new = JobStatus(ev.data["status"])
                assert (self.last_status.value, new.value) in EXPECTED_TRANSITIONS
                assert new is not self.last_status
                self.last_status = new
            else:
                assert self.job.is_block_job and ev.name.startswith("BLOCK_JOB_")
                assert self.last_status not in (JobStatus.CONCLUDED, JobStatus.NULL)
                if ev.name in ("BLOCK_JOB_COMPLETED", "BLOCK_JOB_CANCELLED"):
                    self.finished_events += 1
                if ev.name == "BLOCK_JOB_PENDING":
                    assert not self.job.auto_finalize

    def verb(self, fn, *args):
        before = snapshot(self.job)
        try:
            events = fn(*args)
        except (StateError, GenericError) as exc:
            assert exc.qmp_class == "GenericError"
            assert snapshot(self.job) == before, "a refused verb changed the job"
            return
        self.record(events)

    # user verbs
    @rule()
    def user_pause(self):
        self.verb(self.job.user_pause)

    @rule()
    def user_resume(self):
        self.verb(self.job.user_resume)

    @rule(force=st.booleans())
    def cancel(self, force):
        self.verb(self.job.cancel, force)

    @rule(force=st.booleans())
    def block_job_cancel(self, force):
        self.verb(self.job.block_job_cancel, force)

    @rule(speed=st.integers(-2, 1 << 30))
    def set_speed(self, speed):
        self.verb(self.job.set_speed, speed)

    @rule()
    def complete(self):
        self.verb(self.job.complete)

    @rule()
    def finalize(self):
        self.verb(self.job.finalize)

    @rule()
    def dismiss(self):
        self.verb(self.job.dismiss)

    @rule()
    def change(self):
        self.verb(self.job.change, {})

    @rule(on_error=st.sampled_from(["report", "ignore", "enospc", "stop", "auto"]), is_read=st.booleans(),
          code=st.sampled_from([errno.EIO, errno.ENOSPC]))
    def io_error(self, on_error, is_read, code):
        if not self.worker_active:
            return
        self.record(self.job.error_action(on_error, is_read, code)[1])

    # internal pauses (a drain)
    @rule()
    def drain_begin(self):
        self.job.pause()
        self.internal_pauses += 1

    @precondition(lambda self: self.internal_pauses > 0)
    @rule()
    def drain_end(self):
        self.job.resume()
        self.internal_pauses -= 1

    # the worker
    @property
    def worker_active(self):
        return self.job.started and not self.job.run_finished

    @precondition(lambda self: self.job.status is JobStatus.CREATED and not self.job.started)
    @rule()
    def start(self):
        self.record(self.job.start())

    @precondition(lambda self: self.worker_active and not self.job.paused)
    @rule(n=st.integers(0, 1 << 20))
    def copy_chunk(self, n):
        self.job.progress_update(n)
        self.job.progress_increase_remaining(n)
        self.job.ratelimit_processed(1000.0, n)
        self.job.set_busy(False)
        self.job.set_busy(True)

    @precondition(lambda self: self.worker_active and not self.job.paused)
    @rule()
    def pause_point(self):
        self.record(self.job.on_pause_point())

    @precondition(lambda self: self.worker_active and self.job.paused and not self.job.pause_requested)
    @rule()
    def leave_pause_point(self):
        self.record(self.job.leave_pause_point())

    @precondition(lambda self: self.worker_active and not self.job.paused
                  and self.job.status is JobStatus.RUNNING and isinstance(self.job, MirrorLike))
    @rule()
    def become_ready(self):
        self.record(self.job.transition_to_ready())

    @precondition(lambda self: self.worker_active and not self.job.paused)
    @rule(fail=st.booleans())
    def finish(self, fail):
        self.record(self.job.complete_run(OSError(errno.EIO, "x") if fail else None))

    # invariants
    @invariant()
    def status_is_defined_and_events_agree(self):
        assert self.job.status is not JobStatus.UNDEFINED
        assert self.job.status is self.last_status
        assert self.job.status not in (JobStatus.WAITING, JobStatus.ABORTING)  # transient inside one call
        assert self.job.pause_count >= 0 and self.finished_events <= 1

    @invariant()
    def paused_status_means_parked_worker(self):
        parked = self.job.status in (JobStatus.PAUSED, JobStatus.STANDBY)
        assert parked == (self.job.paused and self.worker_active)

    @invariant()
    def null_job_accepts_no_verb(self):
        if self.job.status is JobStatus.NULL:
            for verb in JobVerb:
                with pytest.raises(StateError):
                    check_verb(self.job.status, verb, self.job.id)

    def teardown(self):
        """Whatever happened, releasing the pauses and letting the worker finish ends in null."""
        job = self.job
        for _ in range(self.internal_pauses):
            job.resume()
        if job.status is JobStatus.CREATED and not job.started:
            self.record(job.start())
        if job.user_paused and JOB_VERB_TABLE[(job.status, JobVerb.RESUME)]:
            self.record(job.user_resume())
        if self.worker_active:
            if job.paused:
                self.record(job.leave_pause_point())
            self.record(job.complete_run())
        if job.status is JobStatus.PENDING:
            self.record(job.finalize())
        if job.status is JobStatus.CONCLUDED:
            self.record(job.dismiss())
        assert job.status is JobStatus.NULL
        if job.started and job.is_block_job:
            assert self.finished_events == 1


TestJobMachine = JobMachine.TestCase
TestJobMachine.settings = settings(max_examples=300, stateful_step_count=40, deadline=None,
                                   suppress_health_check=[HealthCheck.too_slow])


# --- rate limiter -----------------------------------------------------------------------------------------


def test_speed_zero_never_delays():
    limiter = RateLimiter()
    for i in range(100):
        assert limiter.calculate_delay(1000.0 + i * 1e-6, 1 << 40) == 0.0
    job, _ = stream_job()
    job.ratelimit_processed(1000.0, 1 << 40)
    assert job.ratelimit_delay(1000.0) == 0.0


def test_quota_arithmetic_matches_ratelimit_h():
    limiter = RateLimiter(1 << 20)
    assert limiter.slice_ns == 100_000_000 and limiter.slice_quota == 104857
    assert limiter.calculate_delay(1000.0, 65536) == 0.0
    # 131072 / 104857 slices after the slice start, measured from now
    delay = limiter.calculate_delay(1000.01, 65536)
    assert delay == pytest.approx(int(131072 / 104857 * 100_000_000) / 1e9 - 0.01, abs=1e-9)
    # recording past the quota extends the slice further
    assert limiter.calculate_delay(1000.01, 104857) > delay
    assert RateLimiter(1).slice_quota == 1  # at least one unit per slice


def test_a_new_slice_starts_after_the_old_one_ends():
    limiter = RateLimiter(1000)  # quota 100 per 0.1 s
    assert limiter.calculate_delay(50.0, 99) == 0.0
    assert limiter.calculate_delay(50.05, 1) == pytest.approx(0.05)
    assert limiter.calculate_delay(50.2, 99) == 0.0  # fresh slice


def test_speed_change_takes_effect_on_the_next_delay():
    job, _ = stream_job()
    job.set_speed(1000)
    job.ratelimit_processed(10.0, 10_000)
    assert job.ratelimit_delay(10.0) == pytest.approx(10.0)
    job.set_speed(0)
    assert job.ratelimit_delay(10.0) == 0.0


def test_limiter_refuses_nonsense():
    with pytest.raises(ValueError):
        RateLimiter(-1)
    with pytest.raises(ValueError):
        RateLimiter(1, slice_seconds=0)


@HYPOTHESIS
@given(speed=st.integers(1024, 512 << 20), chunks=st.lists(st.integers(1, 4 << 20), min_size=1, max_size=60))
def test_throttled_copy_runs_at_the_set_speed(speed, chunks):
    """block_job_ratelimit_sleep with fake time: copies take no time, sleeps are exactly what was asked."""
    job, _ = stream_job()
    job.set_speed(speed)
    quota = job.limiter.slice_quota
    start = now = 1000.0
    copied = 0
    for chunk in chunks:
        job.ratelimit_processed(now, chunk)
        copied += chunk
        while (delay := job.ratelimit_delay(now)) > 0:
            now += delay
    elapsed = now - start
    units_per_second = quota / BLOCK_JOB_SLICE_TIME
    assert elapsed <= copied / units_per_second + 1e-6
    assert elapsed >= (copied - quota) / units_per_second - 1e-6
    assert copied <= speed * elapsed * (1 + 1 / quota) + quota + 1


def test_slow_copy_is_never_delayed():
    job, _ = stream_job()
    job.set_speed(1 << 20)
    now = 1000.0
    for _ in range(50):
        now += 0.2  # each 64 KiB chunk takes 200 ms: well under 1 MiB/s
        job.ratelimit_processed(now, 65536)
        assert job.ratelimit_delay(now) == 0.0
