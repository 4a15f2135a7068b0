"""Bounded fuzzing runs (atheris) of the trust parsers and the delta patch applier; fail on any untyped exception."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

# 30 s per target in the suite; a longer hunt: EDGESWARM_FUZZ_SECONDS=3600 python3 -m pytest tests/fuzz
FUZZ_SECONDS = int(os.environ.get("EDGESWARM_FUZZ_SECONDS", "30"))


@pytest.mark.parametrize("target_name", ["fuzz_trust.py", "fuzz_patch.py"])
def test_fuzzing_finds_no_untyped_exception(tmp_path: Path, target_name: str) -> None:
    """fuzz_trust: every parser a hostile broker reaches; fuzz_patch: delta patches, applied both ways."""
    pytest.importorskip("atheris", reason="atheris has no wheel for this Python/architecture")
    target = Path(__file__).parent / target_name
    result = subprocess.run(
        [sys.executable, str(target), f"-max_total_time={FUZZ_SECONDS}", "-rss_limit_mb=4096", "-print_final_stats=1",
         str(tmp_path / "corpus")],
        capture_output=True, text=True, timeout=FUZZ_SECONDS + 240, cwd=Path(__file__).parents[2],
        env={**os.environ, "EDGESWARM_FUZZ_TMP": str(tmp_path)},  # its work files go with tmp_path
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    runs = re.search(r"stat::number_of_executed_units:\s*(\d+)", output)
    assert runs and int(runs.group(1)) > 100, output[-2000:]
    print(f"fuzzing {target_name}: {runs.group(1)} executions in {FUZZ_SECONDS} s")
