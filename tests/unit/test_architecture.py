"""The architecture as import contracts ([tool.importlinter] in pyproject.toml), checked on every run.

Dependencies point one way: services.cli / services.demo -> device_client -> services.runtime ->
schemas, and services.operator -> services.runtime. Each test that plants a forbidden import
checks that the contracts would catch it, so a contract that can no longer fail does not pass
silently.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("schemas", "services", "device_client")


def lint_imports(root: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(root), "COLUMNS": "300"}
    return subprocess.run(
        [sys.executable, "-c", "import sys; from importlinter.cli import lint_imports_command; sys.exit(lint_imports_command())",
         "--no-cache"],
        cwd=root, env=env, capture_output=True, text=True, timeout=120,
    )


def copy_tree(tmp_path: Path) -> Path:
    root = tmp_path / "repo"
    root.mkdir()
    shutil.copy(REPO / "pyproject.toml", root)
    for package in PACKAGES:
        shutil.copytree(REPO / package, root / package, ignore=shutil.ignore_patterns("__pycache__", "json"))
    return root


def test_the_tree_keeps_every_import_contract() -> None:
    result = lint_imports(REPO)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert "0 broken" in result.stdout


@pytest.mark.parametrize(
    ("module", "planted", "contract"),
    [
        ("schemas/topics.py", "import services.runtime.files", "schemas (the wire contract) imports nothing of ours"),
        ("device_client/reporter.py", "import services.operator.release", "the device runtime never imports"),
        ("services/runtime/trust.py", "import services.cli", "the device runtime never imports"),
        ("services/operator/fleet.py", "import device_client.agent", "only the CLI and the demo import the device agent"),
        ("services/operator/rollout.py", "import services.demo.run", "the operator side never imports the demo"),
        ("device_client/agent.py", "import services.runtime.content._embedded", "underscore modules are private"),
        ("services/runtime/keys.py", "import services.runtime.trust", "no import cycles"),
    ],
)
def test_a_forbidden_import_breaks_its_contract(tmp_path: Path, module: str, planted: str, contract: str) -> None:
    root = copy_tree(tmp_path)
    path = root / module
    path.write_text(path.read_text() + f"\n{planted}  # planted by the test\n")
    result = lint_imports(root)
    assert result.returncode != 0, result.stdout[-3000:]
    broken = [line for line in result.stdout.splitlines() if line.rstrip().endswith("BROKEN")]
    assert any(contract in line for line in broken), result.stdout[-3000:]
