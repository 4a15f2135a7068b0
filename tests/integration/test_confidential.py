"""Confidential payloads (per-class encryption) and a private IPFS swarm (issue #4, item 8)."""

from __future__ import annotations

from pathlib import Path

import pytest

from schemas.models import Phase
from services.runtime.confidential import DEFAULT_CHUNK, generate_class_key
from services.runtime.files import sha256_file
from tests.support.harness import Fleet

KEY = bytes(range(32))
RECORD = DEFAULT_CHUNK + 16

@pytest.mark.integration
def test_an_encrypted_release_in_a_private_swarm_reaches_only_devices_holding_the_keys(tmp_path: Path) -> None:
    fleet = Fleet(tmp_path)
    try:
        fleet.start(with_origin=False)
        config = str(fleet.operator_config)
        fleet.cli("keys", "swarm-key", "--config", config)
        fleet.cli("keys", "class-key", "ipc-x86_64", "--config", config)
        fleet.start_origin()
        swarm_key, class_key = fleet.home.swarm_key_file, fleet.home.class_key_file("ipc-x86_64")
        fleet.release("ipc-x86_64", "1.0.0")
        member = fleet.add_device("member", "ipc-x86_64", swarm_key_file=swarm_key, class_key_file=class_key)
        keyless = fleet.add_device("keyless", "ipc-x86_64", swarm_key_file=swarm_key)
        outsider = fleet.add_device("outsider", "ipc-x86_64", class_key_file=class_key, stall_timeout=3.0)
        wrong_key = tmp_path / "another-class.key"
        generate_class_key(wrong_key)
        stranger = fleet.add_device("stranger", "ipc-x86_64", swarm_key_file=swarm_key, class_key_file=wrong_key)
        for name in ("member", "keyless", "outsider", "stranger"):
            fleet.watcher.wait(name, lambda s: s.phase == Phase.IDLE and s.last_sequence == 1)
        v1 = member.installed_sha256()

        v2 = fleet.release("ipc-x86_64", "2.0.0")
        assert v2.artifact.encryption is not None and all(d.encryption for d in v2.deltas.values())
        plain_v2 = sha256_file(fleet.image("ipc-x86_64", "2.0.0"))
        assert v2.artifact.encryption.plain_sha256 == plain_v2 != v2.artifact.sha256

        done = fleet.watcher.wait("member", lambda s: s.phase == Phase.DONE, timeout=60)
        assert done.installed_version == "2.0.0" and done.used_delta
        assert member.installed_sha256() == plain_v2 == done.installed_sha256

        refused = fleet.watcher.wait("keyless", lambda s: s.reason_code == "no_class_key", timeout=60)
        assert refused.phase == Phase.REFUSED and refused.installed_version == "1.0.0"
        assert keyless.installed_sha256() == v1, "refused: the working version is intact, byte for byte"

        stuck = fleet.watcher.wait("outsider", lambda s: s.reason_code == "slow_retrieval", timeout=60)
        assert stuck.installed_version == "1.0.0" and stuck.bytes_from_origin == 0
        assert outsider.installed_sha256() == v1

        # In the swarm, with a class key, but not this class's: the ciphertext fetches and verifies
        # (its signed hash), the decryption fails, nothing is installed.
        wrong = fleet.watcher.wait("stranger", lambda s: s.reason_code == "decrypt_failed", timeout=60)
        assert wrong.phase == Phase.REFUSED and wrong.installed_version == "1.0.0"
        assert stranger.installed_sha256() == v1

        # What the origin serves (and any peer caches) is ciphertext: no plaintext marker in it.
        marker = b'VERSION_ID="2.0.0"'
        assert marker in fleet.image("ipc-x86_64", "2.0.0").read_bytes()
        served = list(fleet.home.seed_dir.iterdir())
        assert served and not any(marker in p.read_bytes() for p in served)
    finally:
        fleet.stop()
