"""One factor for every deadline the tests wait on: `EDGESWARM_TEST_SLOWNESS=3` gives a slow or
loaded machine three times the time for start-ups, waits and pytest's per-test timeouts. It
never weakens a check: only how long a test waits for the event it checks."""

from __future__ import annotations

import os
import time
from collections.abc import Callable


def slowness() -> float:
    try:
        return max(1.0, float(os.environ.get("EDGESWARM_TEST_SLOWNESS", "1")))
    except ValueError:
        return 1.0


def scaled(seconds: float) -> float:
    return seconds * slowness()


def wait_until(predicate: Callable[[], object], timeout: float, what: str, log: Callable[[], str]) -> None:
    """Poll `predicate` until it holds, for `timeout` s scaled; fail with the end of `log()` if it never does."""
    end = time.monotonic() + scaled(timeout)
    while time.monotonic() < end:
        if predicate():
            return
        time.sleep(0.25)
    raise AssertionError(f"timed out waiting for {what}:\n{log()[-4000:]}")
