"""Key management from the command line, as an operator runs it (no broker needed)."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from schemas.models import Role
from services.runtime.keys import KeyLocked, SigningKey
from services.operator.home import OperatorHome

ENV = {**os.environ, "COLUMNS": "400"}


def cli(tmp: Path, *args: str, env: dict[str, str] | None = None, ok: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([sys.executable, "-m", "services.cli", *args], capture_output=True, text=True, cwd=tmp,
                            env=env or ENV, timeout=120, stdin=subprocess.DEVNULL)
    assert (result.returncode == 0) == ok, result.stdout + result.stderr
    return result


def test_init_creates_thresholds_and_0600_key_files(tmp_path: Path) -> None:
    out = json.loads(cli(tmp_path, "keys", "init", "--home", "h", "--fleet", "f1", "--root-keys", "3",
                         "--root-threshold", "2", "--release-keys", "2", "--release-threshold", "2", "--json").stdout)
    assert out["roles"]["root"]["threshold"] == 2 and len(out["roles"]["root"]["keyids"]) == 3
    assert out["roles"]["release"]["threshold"] == 2
    keys = list((tmp_path / "h" / "keys").iterdir())
    assert len(keys) == 6
    assert all(stat.S_IMODE(k.stat().st_mode) == 0o600 for k in keys)
    cli(tmp_path, "keys", "init", "--home", "h", "--fleet", "f1", ok=False)  # never overwrites a home


def test_a_threshold_above_the_key_count_is_refused(tmp_path: Path) -> None:
    result = cli(tmp_path, "keys", "init", "--home", "h", "--root-keys", "1", "--root-threshold", "2", ok=False)
    assert "threshold" in result.stderr


def test_rotating_the_root_offline_needs_old_and_new_signatures(tmp_path: Path) -> None:
    cli(tmp_path, "keys", "init", "--home", "h", "--fleet", "f1", "--root-keys", "2", "--root-threshold", "2")
    home = OperatorHome(tmp_path / "h")
    old_root_files = sorted((tmp_path / "h" / "keys").glob("root-*.key"))
    proposal = json.loads(cli(tmp_path, "keys", "rotate", "root", "--home", "h", "--offline", "--json").stdout)
    assert proposal["committed"] is False and proposal["signatures"] == 0
    proposed = tmp_path / "h" / "root-proposed.json"
    # Old keys alone are not enough: the new root keys must prove themselves.
    cli(tmp_path, "root", "sign", str(proposed), *sum((["--key", str(p)] for p in old_root_files), []))
    assert "not signed by a threshold of its own root keys" in cli(tmp_path, "root", "commit", str(proposed), "--home", "h", ok=False).stderr
    new_root_files = [p for p in sorted((tmp_path / "h" / "keys").glob("root-*.key")) if p not in old_root_files]
    cli(tmp_path, "root", "sign", str(proposed), *sum((["--key", str(p)] for p in new_root_files), []))
    cli(tmp_path, "root", "commit", str(proposed), "--home", "h")
    assert home.root().version == 2
    assert set(home.root().roles[Role.ROOT].keyids) == {SigningKey.load(p).keyid for p in new_root_files}
    assert not proposed.exists()


def test_revoking_a_key_removes_it_unless_a_threshold_would_break(tmp_path: Path) -> None:
    cli(tmp_path, "keys", "init", "--home", "h", "--fleet", "f1", "--release-keys", "3", "--release-threshold", "2")
    home = OperatorHome(tmp_path / "h")
    victim = home.root().roles[Role.RELEASE].keyids[0]
    out = json.loads(cli(tmp_path, "keys", "revoke", victim[:10], "--home", "h", "--json").stdout)
    assert out["committed"] and out["revoked_roles"] == ["release"]
    assert victim not in home.root().keys
    second = home.root().roles[Role.RELEASE].keyids[0]
    refused = cli(tmp_path, "keys", "revoke", second, "--home", "h", ok=False)
    assert "threshold 2" in refused.stderr
    assert home.root().version == 2


def test_sealed_key_files_need_the_passphrase(tmp_path: Path) -> None:
    env = {**ENV, "EDGESWARM_KEY_PASSPHRASE": "correct horse battery staple"}
    cli(tmp_path, "keys", "init", "--home", "h", "--fleet", "f1", "--encrypt", env=env)
    key_file = next((tmp_path / "h" / "keys").glob("release-*.key"))
    assert SigningKey.is_sealed(key_file) and "seed" not in key_file.read_text().replace("sealed_seed", "")
    with pytest.raises(KeyLocked):
        SigningKey.load(key_file)
    with pytest.raises(KeyLocked):
        SigningKey.load(key_file, "wrong")
    assert SigningKey.load(key_file, "correct horse battery staple").role == "release"
    # Rotation works with the passphrase in the environment, and fails clearly without it.
    cli(tmp_path, "keys", "rotate", "timestamp", "--home", "h", env=env)
    result = cli(tmp_path, "keys", "rotate", "timestamp", "--home", "h", ok=False)
    assert "EDGESWARM_KEY_PASSPHRASE" in result.stderr and "Traceback" not in result.stderr
