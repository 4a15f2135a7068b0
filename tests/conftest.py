from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.harness import Fleet


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[Fleet]:
    """A started broker + origin + initialised operator home; devices are added by the test."""
    f = Fleet(tmp_path)
    try:
        f.start()
        yield f
    finally:
        f.stop()
