"""Power cuts at random moments of real updates, every cell once (issue 15, CI-sized).

The same lab and judge as `benchmarks/chaos_bench.py` (tests/support/power_chaos.py): each phase
of each install handler, each persisted file cut each way (torn, before and after its rename), and
patching in place, one random moment each from a fixed seed. The benchmark runs 200 and more.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.power_chaos import PHASES, WRITES, PowerLab, power_lab

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]

SEED = 15


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PowerLab]:
    with power_lab(tmp_path_factory.mktemp("chaos")) as lab:
        yield lab


def test_the_listing_runs_saw_every_phase_and_every_persisted_file(lab: PowerLab) -> None:
    for handler, listing in lab.listings.items():
        expected = set(PHASES) - ({"patching"} if handler == "file" else set())
        assert expected <= set(listing.widths), (handler, listing.widths)
        assert set(WRITES) <= set(listing.writes), (handler, listing.writes)
    assert lab.in_place_width > 0


def test_a_cut_at_a_random_moment_of_every_phase_and_write_leaves_a_device_that_reaches_the_new_version(
        lab: PowerLab, tmp_path: Path) -> None:
    rng = random.Random(SEED)
    cuts = lab.plan(rng, lab.cell_count)
    assert {c.cell for c in cuts} == {c.cell for c in lab.plan(random.Random(SEED + 1), lab.cell_count)}, \
        "every cell once, whatever the seed"
    outcomes = [lab.run(cut, tmp_path, SEED * 1000 + index) for index, cut in enumerate(cuts)]
    failed = {o.cut.describe(): (o.landed, o.problems) for o in outcomes if o.problems or not o.reached_new_version}
    assert not failed, failed
    assert not any(o.bricked or o.mixed for o in outcomes)
    # The cuts hit what they aimed at: each write cut fired in its own file's write, and the timed
    # cuts landed in most phases (a phase of a few milliseconds may end before its timer fires).
    for outcome in outcomes:
        if outcome.cut.kind == "write":
            assert outcome.landed.startswith(str(outcome.cut.file)), (outcome.cut, outcome.landed)
    landed_phases = {o.landed for o in outcomes if o.cut.kind == "phase"}
    assert len(landed_phases & set(PHASES)) >= 4, landed_phases
