"""Running block jobs in threads beside the block devices."""

from __future__ import annotations


def cancel_all(server) -> None:
    """Cancel every job of the server and wait for its thread (shutdown)."""
    for job in list(server.jobs.values()):
        job.cancel_and_wait()
