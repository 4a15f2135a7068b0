"""A swarm through a cut uplink, lossy links and restarting devices (issue 15, item 4; CI-sized).

Six real device agents behind four NAT routers fetch one release from each other and the origin
while one router's uplink is cut for 30-40 s, two devices' links drop 10-30% of their packets
(iptables `statistic`) and three devices are restarted (SIGKILL or SIGTERM) at random moments of
their fetch. The faults are drawn from a seed printed first (EDGESWARM_CHAOS_SEED repeats a run).
Every device must end on the new version with every invariant of a power cut holding
(tests/support/device_invariants.py). `benchmarks/chaos_bench.py --swarm-devices 20` runs the
full-sized lab against a fault-free run of the same benchmark.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

from tests.support import netlab
from tests.support.p2p_scenario import NatPlan, Plan
from tests.support.swarm_chaos import plan_swarm_faults, run_swarm

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(netlab.available() is not None, reason=f"NAT lab unavailable: {netlab.available()}"),
    pytest.mark.skipif(netlab.upnp_available() is not None, reason=f"{netlab.upnp_available()}"),
]


def test_a_swarm_completes_through_a_cut_uplink_lossy_links_and_half_its_devices_restarting(tmp_path: Path) -> None:
    seed = int(os.environ.get("EDGESWARM_CHAOS_SEED") or random.SystemRandom().randrange(1 << 31))
    print(f"seed {seed}: repeat with EDGESWARM_CHAOS_SEED={seed}")
    plan = Plan(nats=(NatPlan("upnp", 2), NatPlan("upnp", 2), NatPlan("masquerade", 1, forward=True),
                      NatPlan("symmetric", 1)),
                size=8 << 20, device_mbit=20, timeout=300, sample_interval=None)
    faults = plan_swarm_faults(random.Random(seed), len(plan.nats), [f"d{i:02d}" for i in range(1, 7)],
                               partition_seconds=(30, 40), partition_at=(1, 4), lossy=2, into_fetch=(0.2, 2.0))
    print(faults.describe())
    outcome = run_swarm(tmp_path, plan, faults)
    landed = outcome.landed
    assert landed is not None and landed.partition is not None and landed.partition[1] > landed.partition[0]
    assert len(landed.restarts) + len(landed.missed) == 3, landed
    assert outcome.problems == [], (outcome.problems, landed, outcome.result.to_json())
    result = outcome.result
    print(f"restarts {landed.restarts}; fleet done in {result.completion_seconds} s, "
          f"origin egress {result.origin_egress / plan.size:.2f}x the artifact")
