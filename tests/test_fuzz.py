"""A bounded fuzzing run of the trust parsers (atheris); fails on any untyped exception."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

FUZZ_SECONDS = int(os.environ.get("EDGESWARM_FUZZ_SECONDS", "60"))


def test_fuzzing_the_trust_parsers_finds_no_untyped_exception(tmp_path: Path) -> None:
    pytest.importorskip("atheris", reason="atheris has no wheel for this Python/architecture")
    target = Path(__file__).parent / "fuzz" / "fuzz_trust.py"
    result = subprocess.run(
        [sys.executable, str(target), f"-max_total_time={FUZZ_SECONDS}", "-rss_limit_mb=4096", "-print_final_stats=1",
         str(tmp_path / "corpus")],
        capture_output=True, text=True, timeout=FUZZ_SECONDS + 240, cwd=Path(__file__).parents[1],
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    runs = re.search(r"stat::number_of_executed_units:\s*(\d+)", output)
    assert runs and int(runs.group(1)) > 100, output[-2000:]
    print(f"fuzzing: {runs.group(1)} executions in {FUZZ_SECONDS} s")
