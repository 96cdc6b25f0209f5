"""Guest buffer helpers that every format (and the block layer above them) shares."""

from __future__ import annotations

import numpy as np


def zero_fill(view: memoryview) -> None:
    """Zero a buffer in place (numpy, no Python loop)."""
    if len(view):
        np.frombuffer(view, dtype=np.uint8)[:] = 0
