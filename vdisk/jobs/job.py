"""The job engine core: QEMU's job state machine, verb table, rate limiter and events, without threads or I/O.

Design notes
============

What this module is
-------------------
A :class:`Job` is plain state.  Every method that changes it returns the list of :class:`Event` s to send
(``JOB_STATUS_CHANGE`` and, for block jobs, ``BLOCK_JOB_*``), in the order QEMU sends them; the caller
turns each into bytes with ``vdisk.qmp.protocol.event(ev.name, ev.data, time.time())``.  Nothing here
sleeps, locks, reads a clock or touches a disk.  The thread that copies clusters (``stream.py``) and the
QMP command functions drive a job; they share it under one lock (the equivalent of QEMU's ``job_mutex``)
held around *every* call here.  After any call that may wake the worker (pause/resume/cancel/set-speed/
complete) the caller notifies the worker's condition variable; waking it early is always safe because the
worker re-checks :attr:`Job.pause_requested`, :attr:`Job.is_cancelled` and re-asks the rate limiter.

Tables (job.c, checked against qemu-storage-daemon 7.2)
-------------------------------------------------------
:data:`JOB_STATUS_TRANSITIONS` is QEMU's ``JobSTT`` and :data:`JOB_VERB_TABLE` its ``JobVerbTable``, both
written as QEMU's 0/1 matrices so they can be compared with job.c by eye.  :func:`transition` and
:func:`check_verb` are the only ways the status changes or a verb is admitted; a pair not in a table
raises :class:`~vdisk.errors.StateError` (QEMU asserts on a bad transition; a verb refused gives
"Job 'job0' in state 'concluded' cannot accept command verb 'pause'", class GenericError).

Lifecycle (one job = one transaction; multi-job transactions are not modelled)
-----------------------------------------------------------------------------
::

    Job(...); create()   undefined -> created            (pause_count = 1: a created job is held)
    start()              created -> running          (pause_count -= 1, busy)
    worker: on_pause_point() / leave_pause_point()   running <-> paused, ready <-> standby
    worker: transition_to_ready()                    running -> ready          (mirror-like jobs only)
    worker: complete_run(error)  ok:   running|ready -> waiting -> pending [-> finalize]
                                 fail: running|ready -> aborting -> concluded [-> null]
    finalize()  (auto-finalize, or job-finalize)     pending -> (prepare) -> concluded, or aborting on failure
    dismiss()   (auto-dismiss, or job-dismiss)       concluded -> null
    cancel(force)        sets the flags; a job not started is finished at once, a job whose run already
                         ended (waiting/pending) is aborted at once, a running one waits for its worker
                         to notice :attr:`Job.is_cancelled` and call complete_run().

Pausing follows QEMU's counters: ``pause_count`` counts every reason to pause (a created job, a user
pause, an internal pause such as a drain, an error with on-error=stop); ``user_paused`` marks the one
user pause that job-resume may undo ("Job is already paused", "Can't resume a job that was not paused").
``paused`` (in query-block-jobs) is ``pause_count > 0``: a pause that was asked for, while ``status`` says
whether the worker has actually reached a pause point.  ``busy`` is false while the worker sleeps or
waits; the worker says so with :meth:`Job.set_busy`.

Hooks for subclasses (all optional): ``_prepare`` (the one that may fail and turn success into abort; the
stream job rewrites the backing chain there), ``_commit``, ``_abort``, ``_clean``, ``_driver_complete``
(job-complete; absent = "cannot be completed"), ``_driver_cancel`` (return the effective ``force``; absent =
every cancel is a force-cancel, as for QEMU's stream job), ``_driver_change``.  Hooks run under the
caller's lock (QEMU drops ``job_mutex`` around them; a worker that needs the lock inside a hook must not
be waiting for it).  A failing ``_prepare`` raises; the message becomes the job's error.

Rate limiting is :class:`RateLimiter`, ratelimit.h's slice accounting with time passed in: the worker
calls :meth:`Job.ratelimit_processed` after each chunk and sleeps :meth:`Job.ratelimit_delay` seconds
(``block_job_ratelimit_sleep``).  Speed 0 means unlimited.
"""

from __future__ import annotations

import enum
import errno as _errno
import logging
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from vdisk.errors import GenericError, InvalidArgument, StateError, VdiskError

logger = logging.getLogger(__name__)


class JobStatus(enum.StrEnum):
    """qapi/job.json JobStatus, in QEMU's order (the order of the table columns)."""

    UNDEFINED = "undefined"
    CREATED = "created"
    RUNNING = "running"
    PAUSED = "paused"
    READY = "ready"
    STANDBY = "standby"
    WAITING = "waiting"
    PENDING = "pending"
    ABORTING = "aborting"
    CONCLUDED = "concluded"
    NULL = "null"


class JobVerb(enum.StrEnum):
    """qapi/job.json JobVerb."""

    CANCEL = "cancel"
    PAUSE = "pause"
    RESUME = "resume"
    SET_SPEED = "set-speed"
    COMPLETE = "complete"
    DISMISS = "dismiss"
    FINALIZE = "finalize"
    CHANGE = "change"


class JobType(enum.StrEnum):
    """qapi/job.json JobType."""

    COMMIT = "commit"
    STREAM = "stream"
    MIRROR = "mirror"
    BACKUP = "backup"
    CREATE = "create"
    AMEND = "amend"
    SNAPSHOT_LOAD = "snapshot-load"
    SNAPSHOT_SAVE = "snapshot-save"
    SNAPSHOT_DELETE = "snapshot-delete"


#: blockjob.c is_block_job(): the types that emit BLOCK_JOB_* events and show in query-block-jobs.
BLOCK_JOB_TYPES = frozenset({JobType.BACKUP, JobType.COMMIT, JobType.MIRROR, JobType.STREAM})

_STATUS_ORDER = tuple(JobStatus)

# job.c JobSTT: row = from, column = to.
#                         U  C  R  P  Y  S  W  D  X  E  N
_JOB_STT_ROWS = {
    JobStatus.UNDEFINED: (0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0),
    JobStatus.CREATED:   (0, 0, 1, 0, 0, 0, 0, 0, 1, 0, 1),
    JobStatus.RUNNING:   (0, 0, 0, 1, 1, 0, 1, 0, 1, 0, 0),
    JobStatus.PAUSED:    (0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0),
    JobStatus.READY:     (0, 0, 0, 0, 0, 1, 1, 0, 1, 0, 0),
    JobStatus.STANDBY:   (0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0),
    JobStatus.WAITING:   (0, 0, 0, 0, 0, 0, 0, 1, 1, 0, 0),
    JobStatus.PENDING:   (0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 0),
    JobStatus.ABORTING:  (0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 0),
    JobStatus.CONCLUDED: (0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1),
    JobStatus.NULL:      (0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0),
}  # fmt: skip

# job.c JobVerbTable: row = verb, column = current status.
#                          U  C  R  P  Y  S  W  D  X  E  N
_JOB_VERB_ROWS = {
    JobVerb.CANCEL:       (0, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0),
    JobVerb.PAUSE:        (0, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0),
    JobVerb.RESUME:       (0, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0),
    JobVerb.SET_SPEED:    (0, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0),
    JobVerb.COMPLETE:     (0, 0, 0, 0, 1, 1, 0, 0, 0, 0, 0),
    JobVerb.FINALIZE:     (0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0),
    JobVerb.DISMISS:      (0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0),
    JobVerb.CHANGE:       (0, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0),
}  # fmt: skip

#: Every (from, to) pair, True where QEMU's JobSTT allows it.
JOB_STATUS_TRANSITIONS: dict[tuple[JobStatus, JobStatus], bool] = {
    (src, dst): bool(allowed)
    for src, row in _JOB_STT_ROWS.items()
    for dst, allowed in zip(_STATUS_ORDER, row, strict=True)
}

#: Every (status, verb) pair, True where QEMU's JobVerbTable allows the verb.
JOB_VERB_TABLE: dict[tuple[JobStatus, JobVerb], bool] = {
    (status, verb): bool(allowed)
    for verb, row in _JOB_VERB_ROWS.items()
    for status, allowed in zip(_STATUS_ORDER, row, strict=True)
}


def transition(status: JobStatus | str, new_status: JobStatus | str) -> JobStatus:
    """``new_status`` if JobSTT allows ``status -> new_status``; else :class:`StateError`."""
    try:
        src, dst = JobStatus(status), JobStatus(new_status)
    except ValueError:
        raise StateError(f"unknown job states {status!r} -> {new_status!r}") from None
    if not JOB_STATUS_TRANSITIONS[(src, dst)]:
        raise StateError(f"Job state transition '{src}' -> '{dst}' is not allowed", state=str(src), action=str(dst))
    return dst


def check_verb(status: JobStatus | str, verb: JobVerb | str, job_id: str | None = None) -> None:
    """Raise :class:`StateError` (QMP class GenericError) with QEMU's words if ``verb`` is refused."""
    try:
        current, wanted = JobStatus(status), JobVerb(verb)
    except ValueError:
        raise StateError(f"unknown job state/verb {status!r} {verb!r}") from None
    if not JOB_VERB_TABLE[(current, wanted)]:
        raise StateError(
            f"Job '{job_id}' in state '{current}' cannot accept command verb '{wanted}'",
            state=str(current),
            action=str(wanted),
        )


_JOB_ID = re.compile(r"[A-Za-z][A-Za-z0-9._-]*\Z")


def validate_job_id(job_id: str) -> str:
    """util/id.c id_wellformed: a letter, then letters, digits, '-', '.', '_'."""
    if not isinstance(job_id, str) or not _JOB_ID.match(job_id):
        raise GenericError(f"Invalid job ID '{job_id}'")
    return job_id


# --- rate limiting (include/qemu/ratelimit.h) --------------------------------------------------------------

BLOCK_JOB_SLICE_TIME = 0.1  # seconds; blockjob_int.h BLOCK_JOB_SLICE_TIME (100 ms)
_NS = 1_000_000_000


class RateLimiter:
    """Slice-based accounting: ``speed * slice`` units may go out per slice; a request past the quota
    gets a delay that ends the (possibly extended) slice.  Units are whatever the caller counts (bytes).
    Time is passed in, in seconds (e.g. ``time.monotonic()``); kept internally in integer nanoseconds.

    ``speed == 0`` disables throttling: every delay is 0.
    """

    def __init__(self, speed: int = 0, slice_seconds: float = BLOCK_JOB_SLICE_TIME):
        self.slice_start_ns = 0
        self.slice_end_ns = 0
        self.slice_quota = 0
        self.slice_ns = 0
        self.dispatched = 0
        self.set_speed(speed, slice_seconds)

    def set_speed(self, speed: int, slice_seconds: float = BLOCK_JOB_SLICE_TIME) -> None:
        """ratelimit_set_speed: ``speed`` units per second, accounted per ``slice_seconds``."""
        if speed < 0:
            raise ValueError(f"speed must not be negative, got {speed}")
        if slice_seconds <= 0:
            raise ValueError(f"slice must be positive, got {slice_seconds}")
        self.slice_ns = round(slice_seconds * _NS)
        self.slice_quota = 0 if speed == 0 else max(int(speed * self.slice_ns / _NS), 1)

    def calculate_delay(self, now: float, n: int) -> float:
        """ratelimit_calculate_delay: record ``n`` units sent at ``now``; return seconds to wait before the
        next request (0 while the current slice has quota left)."""
        if not self.slice_quota:
            return 0.0
        now_ns = round(now * _NS)
        if self.slice_end_ns < now_ns:
            # the previous (possibly extended) slice is over: start accounting afresh
            self.slice_start_ns = now_ns
            self.slice_end_ns = now_ns + self.slice_ns
            self.dispatched = 0
        self.dispatched += n
        if self.dispatched < self.slice_quota:
            return 0.0
        # quota exceeded: wait in proportion to the excess, then start a new slice
        delay_slices = self.dispatched / self.slice_quota
        self.slice_end_ns = self.slice_start_ns + int(delay_slices * self.slice_ns)
        return max(self.slice_end_ns - now_ns, 0) / _NS


# --- events ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Event:
    """One QMP event to emit: ``protocol.event(ev.name, ev.data, timestamp)``."""

    name: str
    data: dict[str, Any]


#: BlockdevOnError values (qapi/block-core.json) and what block_job_error_action() makes of them.
ON_ERROR_VALUES = ("report", "ignore", "enospc", "stop", "auto")


def _error_message(error: BaseException | str | None, default_errno: int = _errno.EIO) -> tuple[int, str | None]:
    """(negative errno, message) for what a worker reports; (0, None) for success."""
    if error is None:
        return 0, None
    if isinstance(error, str):
        return -default_errno, error
    code = getattr(error, "errno", None)
    if not isinstance(code, int) or code <= 0:
        code = default_errno
    if isinstance(error, OSError) and not isinstance(error, VdiskError):
        return -code, os.strerror(code)
    return -code, str(error) or os.strerror(code)


# --- the job ----------------------------------------------------------------------------------------------


class Job:
    """One job's state.  See the module notes for the protocol between the worker, QMP and this object."""

    #: set by subclasses that implement ``_driver_complete`` (job-complete in ready/standby)
    supports_complete = False

    def __init__(
        self,
        job_id: str | None,
        job_type: JobType | str,
        *,
        auto_finalize: bool = True,
        auto_dismiss: bool = True,
    ):
        if job_id is not None:
            validate_job_id(job_id)
        self.id = job_id
        self.type = JobType(job_type)
        self.status = JobStatus.UNDEFINED
        self.auto_finalize = auto_finalize
        self.auto_dismiss = auto_dismiss
        self.progress_current = 0
        self.progress_total = 0
        self.speed = 0
        self.limiter = RateLimiter()
        self.ret = 0  # 0, or a negative errno once the job failed or was cancelled
        self.error: str | None = None
        self.iostatus = "ok"  # BlockDeviceIoStatus: ok / failed / nospace
        self.pause_count = 1
        self.user_paused = False
        self.paused = True  # the worker is parked at a pause point (or not started)
        self.busy = False
        self.cancelled = False  # a cancel was requested (job_cancel_requested)
        self.force_cancel = False  # ... and it is a real cancel (job_is_cancelled)
        self.started = False
        self.run_finished = False  # QEMU's deferred_to_main_loop: the worker's run is over
        self._status_before_pause: JobStatus | None = None
        self._aborting_txn = False

    # -- small views

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.id!r} {self.type} {self.status}>"

    @property
    def is_block_job(self) -> bool:
        return self.type in BLOCK_JOB_TYPES

    @property
    def is_internal(self) -> bool:
        return self.id is None

    @property
    def is_cancelled(self) -> bool:
        """job_is_cancelled: a (force) cancel the worker must obey: stop and call complete_run()."""
        return self.force_cancel

    @property
    def cancel_requested(self) -> bool:
        return self.cancelled

    @property
    def pause_requested(self) -> bool:
        """The worker should park at its next pause point (and stay parked while this holds)."""
        return self.pause_count > 0 and not self.is_cancelled

    @property
    def is_ready(self) -> bool:
        return self.status in (JobStatus.READY, JobStatus.STANDBY)

    @property
    def is_completed(self) -> bool:
        """job_is_completed: the worker's run is over (or the job never ran)."""
        return self.status in (
            JobStatus.WAITING,
            JobStatus.PENDING,
            JobStatus.ABORTING,
            JobStatus.CONCLUDED,
            JobStatus.NULL,
        )

    # -- the one place the status changes

    def _transition(self, new_status: JobStatus, events: list[Event]) -> None:
        old = self.status
        self.status = transition(old, new_status)
        logger.debug("job %s: %s -> %s", self.id, old, new_status)
        if not self.is_internal and new_status != old:
            events.append(Event("JOB_STATUS_CHANGE", {"status": new_status.value, "id": self.id}))

    def _check_verb(self, verb: JobVerb) -> None:
        check_verb(self.status, verb, self.id)

    def _block_event(self, name: str, events: list[Event], **extra: Any) -> None:
        if not self.is_block_job or self.is_internal:
            return
        if name == "BLOCK_JOB_PENDING":
            data: dict[str, Any] = {"type": self.type.value, "id": self.id}
        else:
            data = {
                "device": self.id,
                "len": self.progress_total,
                "offset": self.progress_current,
                "speed": self.speed,
                "type": self.type.value,
            }
        data.update(extra)
        events.append(Event(name, data))

    # -- creation and start

    def create(self) -> list[Event]:
        """job_create: undefined -> created, held (pause_count 1) until start().

        block_job_create() then applies the requested speed; do the same with set_speed() and, if that
        raises (a negative speed), call early_fail() and report the error: QEMU emits created, then null.
        """
        events: list[Event] = []
        self._transition(JobStatus.CREATED, events)
        return events

    def early_fail(self) -> list[Event]:
        """job_early_fail: a created job that must not run (creation failed half-way): created -> null."""
        if self.status is not JobStatus.CREATED:
            raise StateError(f"Job '{self.id}' can only fail early while created, not {self.status}")
        events: list[Event] = []
        self._do_dismiss(events)
        return events

    def start(self) -> list[Event]:
        """job_start: created -> running.  The worker then begins with on_pause_point()."""
        if self.started:
            raise StateError(f"Job '{self.id}' was already started", state=str(self.status), action="start")
        events: list[Event] = []
        self._transition(JobStatus.RUNNING, events)
        self.started = True
        self.pause_count -= 1
        self.busy = True
        self.paused = False
        return events

    # -- user verbs (QMP job-* / block-job-*)

    def user_pause(self) -> list[Event]:
        """job_user_pause: the worker parks at its next pause point; events come from on_pause_point()."""
        self._check_verb(JobVerb.PAUSE)
        if self.user_paused:
            raise GenericError("Job is already paused")
        self.user_paused = True
        self.pause_count += 1
        return []

    def user_resume(self) -> list[Event]:
        """job_user_resume; the worker leaves its pause point when pause_requested turns false."""
        if not self.user_paused or self.pause_count <= 0:
            raise GenericError("Can't resume a job that was not paused")
        self._check_verb(JobVerb.RESUME)
        self._user_resume_hook()
        self.user_paused = False
        self.pause_count -= 1
        return []

    def pause(self) -> None:
        """job_pause: an internal reason to pause (a drain); pairs with resume()."""
        self.pause_count += 1

    def resume(self) -> None:
        """job_resume: undo one pause()."""
        if self.pause_count <= 0:
            raise StateError(f"Job '{self.id}' is not paused", state=str(self.status), action="resume")
        self.pause_count -= 1

    def set_speed(self, speed: int) -> list[Event]:
        """block_job_set_speed: bytes per second, 0 = unlimited."""
        self._check_verb(JobVerb.SET_SPEED)
        if speed < 0:
            raise InvalidArgument("Parameter 'speed' expects a non-negative value")
        self.limiter.set_speed(speed, BLOCK_JOB_SLICE_TIME)
        self.speed = speed
        return []

    def complete(self) -> list[Event]:
        """job_complete (job-complete / block-job-complete): only in ready/standby, only for job types
        with a completion step."""
        self._check_verb(JobVerb.COMPLETE)
        if self.cancel_requested or not self.supports_complete:
            raise GenericError(f"The active block job '{self.id}' cannot be completed")
        return self._driver_complete()

    def change(self, options: Mapping[str, Any]) -> list[Event]:
        """block_job_change (block-job-change)."""
        self._check_verb(JobVerb.CHANGE)
        return self._driver_change(options)

    def finalize(self) -> list[Event]:
        """job_finalize (job-finalize / block-job-finalize): pending -> concluded (or aborting)."""
        self._check_verb(JobVerb.FINALIZE)
        events: list[Event] = []
        self._do_finalize(events)
        return events

    def dismiss(self) -> list[Event]:
        """job_dismiss (job-dismiss / block-job-dismiss): concluded -> null."""
        self._check_verb(JobVerb.DISMISS)
        events: list[Event] = []
        self._do_dismiss(events)
        return events

    def cancel(self, force: bool = False) -> list[Event]:
        """job_user_cancel (job-cancel passes force=True)."""
        self._check_verb(JobVerb.CANCEL)
        return self.cancel_unchecked(force)

    def block_job_cancel(self, force: bool = False) -> list[Event]:
        """qmp_block_job_cancel: like cancel(), but a user-paused job needs force."""
        if self.user_paused and not force:
            raise GenericError(f"The block job for device '{self.id}' is currently paused")
        return self.cancel(force)

    def cancel_unchecked(self, force: bool = True) -> list[Event]:
        """job_cancel: the internal cancel (shutdown, a failed sibling); a concluded job is dismissed."""
        events: list[Event] = []
        if self.status is JobStatus.CONCLUDED:
            self._do_dismiss(events)
            return events
        if self.status is JobStatus.NULL:
            return events
        self._cancel_async(force)
        if not self.started:
            self._completed(events)
        elif self.run_finished:
            if self.is_cancelled:
                self._completed_txn_abort(events)
        # else: the worker notices is_cancelled at its next check and calls complete_run()
        return events

    # -- the worker's side

    def set_busy(self, busy: bool) -> None:
        """False while the worker sleeps (rate limit) or waits; True while it works."""
        self.busy = bool(busy)

    def on_pause_point(self) -> list[Event]:
        """job_pause_point, first half: if a pause is requested, running -> paused (ready -> standby).
        The worker then waits while :attr:`pause_requested` and calls leave_pause_point()."""
        if not self.started or self.run_finished:
            raise StateError(f"Job '{self.id}' has no running worker", state=str(self.status), action="pause")
        if self.paused:
            raise StateError(f"Job '{self.id}' is already at a pause point", state=str(self.status))
        if not self.pause_requested:
            return []
        events: list[Event] = []
        self._status_before_pause = self.status
        self._transition(JobStatus.STANDBY if self.status is JobStatus.READY else JobStatus.PAUSED, events)
        self.paused = True
        self.busy = False
        return events

    def leave_pause_point(self) -> list[Event]:
        """job_pause_point, second half: paused -> running (standby -> ready)."""
        if not self.paused or self._status_before_pause is None:
            raise StateError(f"Job '{self.id}' is not at a pause point", state=str(self.status))
        events: list[Event] = []
        self.paused = False
        self.busy = True
        previous, self._status_before_pause = self._status_before_pause, None
        self._transition(previous, events)
        return events

    def transition_to_ready(self) -> list[Event]:
        """job_transition_to_ready: running -> ready, BLOCK_JOB_READY (jobs that wait for job-complete)."""
        events: list[Event] = []
        self._transition(JobStatus.READY, events)
        self._block_event("BLOCK_JOB_READY", events)
        return events

    def complete_run(self, error: BaseException | str | None = None) -> list[Event]:
        """The worker's run is over (job_co_entry returning, then job_exit/job_completed).

        ``error`` is None on success, else a message or an exception (its ``str()`` becomes the job's error,
        its ``errno`` the return code; a plain OSError is shown as strerror like QEMU).  A cancelled job
        may pass None: it is recorded as ECANCELED.
        """
        if not self.started or self.run_finished:
            raise StateError(f"Job '{self.id}' has no running worker to complete", state=str(self.status))
        if self.paused:
            raise StateError(f"Job '{self.id}' cannot finish while parked at a pause point", state=str(self.status))
        ret, message = _error_message(error)
        if ret and not self.ret:
            self.ret, self.error = ret, message
        self.run_finished = True
        self.busy = False
        events: list[Event] = []
        self._completed(events)
        return events

    def error_action(self, on_error: str, is_read: bool, os_errno: int) -> tuple[str, list[Event]]:
        """block_job_error_action: what to do about an I/O error; emits BLOCK_JOB_ERROR.

        Returns ``(action, events)``, action one of "report" (fail the job with this error), "ignore"
        (carry on), "stop" (the job is now user-paused; the worker should park at its pause point and
        retry after job-resume).
        """
        if on_error in ("enospc", "auto"):
            action = "stop" if os_errno == _errno.ENOSPC else "report"
        elif on_error in ("stop", "report", "ignore"):
            action = on_error
        else:
            raise InvalidArgument(f"Parameter 'on-error' does not accept value '{on_error}'")
        events: list[Event] = []
        if self.is_block_job and not self.is_internal:
            events.append(
                Event("BLOCK_JOB_ERROR", {"device": self.id, "operation": "read" if is_read else "write",
                                          "action": action})
            )
        if action == "stop":
            if not self.user_paused:
                self.pause_count += 1
                self.user_paused = True  # a pause the user sees and resumes
            if self.iostatus == "ok":
                self.iostatus = "nospace" if os_errno == _errno.ENOSPC else "failed"
        return action, events

    # -- progress and rate limit

    def progress_update(self, done: int) -> None:
        self.progress_current += done

    def progress_set_remaining(self, remaining: int) -> None:
        self.progress_total = self.progress_current + remaining

    def progress_increase_remaining(self, delta: int) -> None:
        self.progress_total += delta

    def ratelimit_processed(self, now: float, n_bytes: int) -> None:
        """block_job_ratelimit_processed_bytes: account ``n_bytes`` copied at ``now``."""
        self.limiter.calculate_delay(now, n_bytes)

    def ratelimit_delay(self, now: float) -> float:
        """Seconds to sleep before the next chunk (block_job_ratelimit_sleep asks with n = 0; it asks again
        after every wake-up, so a speed change takes effect at once)."""
        if not self.speed:
            return 0.0
        return self.limiter.calculate_delay(now, 0)

    # -- queries

    def info(self) -> dict[str, Any]:
        """query-block-jobs' BlockJobInfo."""
        result: dict[str, Any] = {
            "type": self.type.value,
            "device": self.id,
            "len": self.progress_total,
            "offset": self.progress_current,
            "busy": self.busy,
            "paused": self.pause_count > 0,
            "speed": self.speed,
            "io-status": self.iostatus,
            "ready": self.is_ready,
            "status": self.status.value,
            "auto-finalize": self.auto_finalize,
            "auto-dismiss": self.auto_dismiss,
        }
        if self.ret:
            result["error"] = self._error_text()
        return result

    def query_jobs_info(self) -> dict[str, Any]:
        """query-jobs' JobInfo."""
        result: dict[str, Any] = {
            "id": self.id,
            "type": self.type.value,
            "status": self.status.value,
            "current-progress": self.progress_current,
            "total-progress": self.progress_total,
        }
        if self.ret:
            result["error"] = self._error_text()
        return result

    def _error_text(self) -> str:
        return self.error if self.error is not None else os.strerror(-self.ret)

    # -- job.c's internal steps

    def _cancel_async(self, force: bool) -> None:
        # a job that never ran has nothing to complete softly: its cancel is always a real one
        force = self._driver_cancel(force) or not self.started
        if self.user_paused:
            self._user_resume_hook()
            self.user_paused = False
            self.pause_count -= 1
        # a soft cancel after the run is over is ignored (the job has finished anyway)
        if force or not self.run_finished:
            self.cancelled = True
            self.force_cancel |= force

    def _update_rc(self, events: list[Event]) -> None:
        if not self.ret and self.is_cancelled:
            self.ret = -_errno.ECANCELED
        if self.ret:
            if self.error is None:
                self.error = os.strerror(-self.ret)
            self._transition(JobStatus.ABORTING, events)

    def _completed(self, events: list[Event]) -> None:
        """job_completed."""
        self._update_rc(events)
        if self.ret:
            self._completed_txn_abort(events)
        else:
            self._completed_txn_success(events)

    def _completed_txn_success(self, events: list[Event]) -> None:
        self._transition(JobStatus.WAITING, events)
        self._transition(JobStatus.PENDING, events)
        if not self.auto_finalize:
            self._block_event("BLOCK_JOB_PENDING", events)
        else:
            self._do_finalize(events)

    def _completed_txn_abort(self, events: list[Event]) -> None:
        if self._aborting_txn:
            return
        self._aborting_txn = True
        self._finalize_single(events)

    def _do_finalize(self, events: list[Event]) -> None:
        """job_do_finalize: prepare, then commit or abort."""
        if not self.ret:
            try:
                self._prepare()
            except Exception as exc:  # noqa: BLE001 - any failure of prepare fails the job, like a bad ret
                logger.warning("job %s: prepare failed: %s", self.id, exc)
                self.ret, self.error = _error_message(exc)
            self._update_rc(events)
        if self.ret:
            self._completed_txn_abort(events)
        else:
            self._finalize_single(events)

    def _finalize_single(self, events: list[Event]) -> None:
        """job_finalize_single: commit/abort, clean, the completion event, conclude (and maybe dismiss)."""
        self._update_rc(events)
        self._run_hook(self._commit if not self.ret else self._abort)
        self._run_hook(self._clean)
        if self.started:
            if self.is_cancelled:
                self._block_event("BLOCK_JOB_CANCELLED", events)
            elif self.ret:
                self._block_event("BLOCK_JOB_COMPLETED", events, error=self._error_text())
            else:
                self._block_event("BLOCK_JOB_COMPLETED", events)
        self._transition(JobStatus.CONCLUDED, events)
        if self.auto_dismiss or not self.started:
            self._do_dismiss(events)

    def _do_dismiss(self, events: list[Event]) -> None:
        self.busy = False
        self.paused = False
        self.run_finished = True
        self._transition(JobStatus.NULL, events)

    def _run_hook(self, hook: Any) -> None:
        try:
            hook()
        except Exception:  # noqa: BLE001 - QEMU ignores these results; we log and finish the job
            logger.exception("job %s: %s failed", self.id, getattr(hook, "__name__", hook))

    # -- hooks for subclasses

    def _prepare(self) -> None:
        """Make the job's result visible (stream: drop the streamed part of the backing chain).
        Raise to fail the job; not called for a failed or cancelled job."""

    def _commit(self) -> None:
        """After a successful prepare."""

    def _abort(self) -> None:
        """After a failure or cancel: undo what the job did."""

    def _clean(self) -> None:
        """Always, after commit or abort: release what the job holds."""

    def _driver_complete(self) -> list[Event]:
        raise GenericError(f"The active block job '{self.id}' cannot be completed")

    def _driver_cancel(self, force: bool) -> bool:
        """Return the effective force; jobs without a soft cancel treat every cancel as forced.
        (QEMU's mirror: ``force or not self.is_ready`` -- a soft cancel exists only in ready/standby.)"""
        return True

    def _driver_change(self, options: Mapping[str, Any]) -> list[Event]:
        raise GenericError("Job type does not support change")

    def _user_resume_hook(self) -> None:
        """block_job_user_resume: a user resume clears the I/O error status."""
        if self.is_block_job:
            self.iostatus = "ok"
