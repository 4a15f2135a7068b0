"""The broker and the fleet service killed in the middle of a staged rollout (issue 15, CI-sized).

The same lab and checks as `benchmarks/chaos_bench.py --rollout-trials N` (tests/support/
rollout_chaos.py), a few trials per broker: after a SIGKILL at a random moment and a restart, the
rollout completes, every device runs the new version, the fleet record agrees with what each
device persisted, and no device installs the version twice.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.harness import mosquitto_available
from tests.support.rollout_chaos import RolloutLab, rollout_lab

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

BROKERS = ["embedded", pytest.param("mosquitto", marks=pytest.mark.skipif(not mosquitto_available(),
                                                                           reason="Debian's mosquitto is not installed"))]


@pytest.fixture(params=BROKERS)
def lab(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[RolloutLab]:
    lab = rollout_lab(tmp_path / "fleet", request.param, devices=4)
    try:
        yield lab
    finally:
        lab.stop()


def test_a_rollout_completes_through_a_broker_crash_and_a_service_crash_with_nothing_lost(lab: RolloutLab) -> None:
    rng = random.Random(15)
    outcomes = [lab.trial(rng, fault) for fault in ("broker", "service")]
    for outcome in outcomes:
        assert not outcome.problems, outcome.as_json()
        assert outcome.completed and outcome.devices_on_new == outcome.devices == 4
        assert not outcome.missing_from_record and not outcome.installed_twice
