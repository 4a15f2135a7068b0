"""The fleet-record benchmark at CI size (20,000 devices against 1,000): it runs from a clean checkout
and its scenario holds (timings are the benchmark's to print, never asserted here)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]


def test_the_fleet_record_benchmark_runs_its_scenario_at_ci_size() -> None:
    result = subprocess.run([sys.executable, "benchmarks/fleet_record_bench.py", "--quick", "--json"], cwd=REPO,
                            capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stderr[-3000:]
    figures = json.loads(result.stdout)
    for size, run in ((1_000, figures["baseline"]), (20_000, figures["measured"])):
        assert run["devices"] == size
        assert run["commands"] == size * 5 // 100, "the first wave is 5% of the class, each told once"
        assert run["paused"], "2% of the first wave failed, above its 1%: the next tick pauses"
        assert run["reports_per_second"] > 0 and run["service_mib"] > 0
    assert set(figures["targets"]) == {"tick_under_100ms", "status_under_2s", "service_under_500mb",
                                       "paused_on_the_first_wave"}
