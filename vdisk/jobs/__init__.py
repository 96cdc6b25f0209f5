"""Long-running block jobs: the job state machine and rate limiter (job.py), and the jobs built on it."""
