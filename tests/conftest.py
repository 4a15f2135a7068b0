from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from services.runtime.settings import ContentSettings
from tests.support.deadlines import slowness
from tests.support.harness import Fleet

REPO = Path(__file__).resolve().parent.parent


def pytest_configure(config: pytest.Config) -> None:
    """Every process a test starts (`python -m services.cli ...`, agents, lab nodes) runs the code
    under test, this checkout's: children start in temporary directories, where `python -m` would
    find whatever checkout `pip install -e` last pointed at (another clone's suite, running now)."""
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    # The agent's own default GOGC, given up front: otherwise every agent start would execute itself
    # again to set it (~0.25 s each, hundreds of starts per run). tests/integration/test_go_runtime.py
    # removes it to test that exec.
    os.environ.setdefault("GOGC", str(ContentSettings.model_fields["go_gc_percent"].default))


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[Fleet]:
    """A started broker + origin + initialised operator home; devices are added by the test."""
    f = Fleet(tmp_path)
    try:
        f.start()
        yield f
    finally:
        f.stop()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Per-test timeouts (the ini's, or a test's own `timeout` mark) scaled by EDGESWARM_TEST_SLOWNESS,
    like every deadline the tests wait on (tests/support/deadlines.py)."""
    factor = slowness()
    if factor == 1.0:
        return
    default = float(config.getini("timeout") or 0)
    for item in items:
        marker = item.get_closest_marker("timeout")
        base = float(marker.args[0]) if marker is not None and marker.args else default
        if base:
            item.add_marker(pytest.mark.timeout(base * factor), append=False)
