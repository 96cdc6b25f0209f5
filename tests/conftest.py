"""Fixtures shared by the test files; the helpers they use live in ``tests.support``."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.images import make_chain4


@pytest.fixture
def chain4(tmp_path: Path) -> dict[str, Path]:
    """The brief's chain [A] -> [B] -> [C] -> [D] in tmp_path (see make_chain4)."""
    return make_chain4(tmp_path)
