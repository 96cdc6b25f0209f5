"""The jobs of a process: QEMU's job list and job_mutex, and where their events go.

Design notes
============
``lock`` is QEMU's job_mutex: every call into a job, every lookup in ``jobs`` and every ``emit`` happen under
it.  Events are handed to ``broadcast`` while it is held, so every monitor client sees them in the order they
happened.  A job that reached the null state is forgotten by the ``emit`` that reported it.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from typing import Any, Protocol

from vdisk.errors import DeviceNotActive, GenericError
from vdisk.jobs.job import Event, JobStatus

EventSink = Callable[[str, dict], None]


class BlockJob(Protocol):
    """What the registry needs of a job (the stream job, and the jobs to come)."""

    id: str
    status: JobStatus
    device: Any  # the block device it runs on; block-job-* commands may name a job by its device's name

    def cancel_and_wait(self) -> None: ...


class JobRegistry:
    """The running jobs by id, their lock, and the sink their events go to (the monitor's broadcast)."""

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.jobs: dict[str, BlockJob] = {}
        self.broadcast: EventSink | None = None  # set while a monitor serves clients

    def emit(self, events: list[Event]) -> None:
        """Broadcast events (caller holds ``lock``); forget jobs that reached the null state."""
        sink = self.broadcast
        for event in events:
            if sink is not None:
                sink(event.name, event.data)
        for job_id, job in list(self.jobs.items()):
            if job.status is JobStatus.NULL:
                del self.jobs[job_id]

    def check_unused(self, job_id: str) -> None:
        """QEMU's refusal of a job ID already taken (asked before a job's set-up, and again by ``add``)."""
        if job_id in self.jobs:
            raise GenericError(f"Job ID '{job_id}' already in use")

    def add(self, job: BlockJob) -> None:
        self.check_unused(job.id)
        self.jobs[job.id] = job

    def __iter__(self) -> Iterator[BlockJob]:
        return iter(list(self.jobs.values()))

    def find(self, job_id: str) -> BlockJob:
        """By job id, as job-* commands look jobs up."""
        job = self.jobs.get(job_id)
        if job is None:
            raise GenericError("Job not found")
        return job

    def find_block_job(self, name: str) -> BlockJob:
        """By job id or device name, as block-job-* commands look jobs up."""
        job = self.jobs.get(name)
        if job is not None:
            return job
        for candidate in self.jobs.values():
            if candidate.device.name == name:
                return candidate
        raise DeviceNotActive(f"Block job '{name}' not found")

    def cancel_all(self) -> None:
        """Cancel every job and wait for its thread (shutdown)."""
        for job in list(self.jobs.values()):
            job.cancel_and_wait()
