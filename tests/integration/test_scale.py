"""benchmarks/scale_bench.py at CI size: 1,000 simulated devices (each its own login, session and
trust state) on a real Mosquitto over TLS with the fleet service, against 100 in the same run.

Asserts what must hold at any size (every device connects, verifies the release, reports it into
the fleet record, comes back after a broker restart and updates again; the staged rollout pauses on
its first wave); the timings are printed by the benchmark, never asserted here."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.harness import mosquitto_available

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]


def _bench(tmp_path: Path, *args: str) -> dict:
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "scale_bench.py"), *args, "--json",
                           "--keep", str(tmp_path / "work")],
                          capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout)


def _holds_at_every_size(figures: dict) -> None:
    for size in ("baseline", "large"):
        f = figures[size]
        n = f["devices"]
        assert f["problems"] == [], f["problems"]
        assert f["connected"] == f["verified"] == n
        # downloading, installing, done from every device, each found in the fleet record
        assert f["reports_after_release"] == 3 * n
        assert f["record_samples"] > 0
        assert f["reconnect_seconds"] is not None and f["reconnect_caught_up_seconds"] is not None
        assert f["rollout_paused_on_wave"] == 1
        assert "wave 1" in f["rollout_reason"] and "above 1%" in f["rollout_reason"]


@pytest.mark.skipif(not mosquitto_available(), reason="mosquitto is not installed (.ci/run installs it)")
def test_a_thousand_simulated_devices_update_report_and_come_back_after_a_broker_restart(tmp_path: Path) -> None:
    figures = _bench(tmp_path, "--devices", "1000", "--baseline", "100", "--broker", "mosquitto", "--tls")
    _holds_at_every_size(figures)
    assert figures["large"]["devices"] == 1000 and figures["large"]["tls"] is True


@pytest.mark.parametrize("broker", ["embedded", "tiers"])
def test_the_benchmark_runs_on_the_embedded_broker_and_on_bridged_site_brokers(tmp_path: Path, broker: str) -> None:
    """`--quick` (what README.md suggests first) uses the embedded broker; `tiers` four site Mosquittos
    bridged to a central one, where commands and reports cross the bridges. At a size CI can afford."""
    if broker == "tiers" and not mosquitto_available():
        pytest.skip("mosquitto is not installed (.ci/run installs it)")
    figures = _bench(tmp_path, "--devices", "60", "--baseline", "20", "--broker", broker)
    _holds_at_every_size(figures)
    assert figures["large"]["broker"] == broker
