"""Small pure parts: canonical JSON, keys on disk, topics, settings, installer, traffic."""

from __future__ import annotations

import hashlib

import os
import stat
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from schemas import export, topics
from schemas.canonical import MalformedDocument, canonical_json, strict_loads
from schemas.models import PayloadType
from services.runtime.keys import SigningKey, sign_envelope, verify_signature
from services.runtime.settings import DeviceSettings, SettingsError, load_settings
from services.runtime.traffic import parse_ss, received_since
from device_client.installer import FileInstaller


def test_canonical_json_sorts_keys_and_has_no_whitespace() -> None:
    assert canonical_json({"b": 1, "a": [1, {"d": "é", "c": None}]}) == '{"a":[1,{"c":null,"d":"é"}],"b":1}'.encode()


def test_canonical_json_refuses_nan() -> None:
    with pytest.raises(ValueError):
        canonical_json({"x": float("nan")})


@pytest.mark.parametrize("raw", [b'{"a":1.5}', b'{"a":Infinity}', b'{"a":-Infinity}'])
def test_strict_loads_refuses_floats_and_infinities(raw: bytes) -> None:
    with pytest.raises(MalformedDocument):
        strict_loads(raw, max_bytes=1000)


def test_strict_loads_counts_brackets_inside_strings_as_text() -> None:
    raw = b'{"a":"' + b"[" * 40 + b'"}'
    assert strict_loads(raw, max_bytes=1000) == {"a": "[" * 40}


def test_strict_loads_refuses_depth_beyond_the_limit() -> None:
    with pytest.raises(MalformedDocument, match="nesting"):
        strict_loads(b'{"a":' * 20 + b"1" + b"}" * 20, max_bytes=1000)


def test_private_keys_are_written_0600_and_refused_when_readable_by_others(tmp_path: Path) -> None:
    key = SigningKey.generate("release")
    path = tmp_path / "keys" / "release.key"
    key.save(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert SigningKey.load(path).keyid == key.keyid
    os.chmod(path, 0o644)
    with pytest.raises(PermissionError):
        SigningKey.load(path)


def test_saving_never_overwrites_an_existing_key(tmp_path: Path) -> None:
    path = tmp_path / "k.key"
    SigningKey.generate("root").save(path)
    with pytest.raises(FileExistsError):
        SigningKey.generate("root").save(path)


def test_a_signature_does_not_verify_for_another_payload_type() -> None:
    key = SigningKey.generate("release")
    signature = key.sign(PayloadType.RELEASE, b"{}")
    assert verify_signature(key.public_key(), signature, PayloadType.RELEASE.value, b"{}")
    assert not verify_signature(key.public_key(), signature, PayloadType.ROOT.value, b"{}")
    assert sign_envelope(PayloadType.RELEASE, b"{}", [key]).signatures[0] == signature


def test_topics_are_built_from_checked_identifiers() -> None:
    assert topics.release_topic("f1", "ipc-x86_64") == "edgeswarm/f1/releases/ipc-x86_64"
    assert topics.state_topic("f1", "dev-1") == "edgeswarm/f1/devices/dev-1/state"
    assert topics.root_topic("f1", 3) == "edgeswarm/f1/trust/root/3"
    assert topics.device_from_topic("f1", "edgeswarm/f1/devices/dev-1/online") == ("dev-1", "online")
    assert topics.device_from_topic("f1", "edgeswarm/f2/devices/dev-1/online") is None
    for bad in ("", "Dev", "a/b", "+", "#", "x" * 64):
        with pytest.raises(ValueError):
            topics.state_topic("f1", bad)


def test_the_checked_in_json_schemas_are_current() -> None:
    for filename, text in export.rendered().items():
        path = export.OUT_DIR / filename
        assert path.exists() and path.read_text() == text, f"{filename} is stale: run `python -m schemas.export`"


def test_settings_come_from_toml_and_the_environment_overrides(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "device.toml"
    config.write_text(
        'device_id = "d1"\nfleet = "f1"\ndevice_class = "ipc"\nstate_dir = "/var/lib/x"\n'
        'install_target = "/opt/app.img"\ntrusted_root = "/etc/root.json"\n[mqtt]\nhost = "broker.lan"\nport = 1884\n'
    )
    monkeypatch.setenv("EDGESWARM_MQTT__PORT", "8883")
    settings = load_settings(DeviceSettings, config)
    assert settings.mqtt.host == "broker.lan" and settings.mqtt.port == 8883
    assert settings.install_path == Path("/opt/app.img")


def test_settings_refuse_unknown_keys(tmp_path: Path) -> None:
    config = tmp_path / "device.toml"
    config.write_text('device_id = "d1"\nfleet = "f1"\ndevice_class = "ipc"\nstate_dir = "/x"\n'
                      'install_target = "/a"\ntrusted_root = "/r"\ntypo_key = 1\n')
    with pytest.raises(SettingsError, match="typo_key: Extra inputs are not permitted"):
        load_settings(DeviceSettings, config)


def test_the_installer_replaces_atomically_and_keeps_the_previous_version(tmp_path: Path) -> None:
    target = tmp_path / "firmware.img"
    target.write_bytes(b"v1")
    new = tmp_path / "new"
    new.write_bytes(b"v2")
    installer = FileInstaller(target)
    installer.install(new)
    assert target.read_bytes() == b"v2" and installer.previous.read_bytes() == b"v1"
    installer.rollback(None, hashlib.sha256(b"v1").hexdigest())
    assert target.read_bytes() == b"v1"


SS_OUTPUT = """0      0      127.0.0.1:4101 127.0.0.1:4102
\t bbr wscale:10,10 rto:204 bytes_sent:3008818 bytes_acked:3008818 bytes_received:9579 segs_out:225
0      0      127.0.0.1:4101 127.0.0.1:5000
\t cubic bytes_acked:10 bytes_received:700
"""


def test_ss_output_gives_bytes_per_remote_endpoint() -> None:
    sockets = {(s.local, s.remote): s for s in parse_ss(SS_OUTPUT)}
    first = sockets[(("127.0.0.1", 4101), ("127.0.0.1", 4102))]
    assert (first.bytes_sent, first.bytes_received) == (3008818, 9579)
    before = {k: v for k, v in sockets.items() if k[1][1] == 4102}
    assert received_since(before, sockets) == {("127.0.0.1", 5000): 700}


def test_the_example_settings_files_load() -> None:
    from services.runtime.settings import OperatorSettings

    config = Path(__file__).resolve().parents[2] / "config"
    device = load_settings(DeviceSettings, config / "device.example.toml")
    assert device.device_class == "gateway-armv7" and device.limits.max_message_bytes == 65536
    operator = load_settings(OperatorSettings, config / "operator.example.toml")
    assert operator.fleet == "plant-7" and operator.delta_bases == 3


def test_the_systemd_units_are_valid() -> None:
    import shutil
    import subprocess

    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed")
    units = sorted((Path(__file__).resolve().parents[2] / "config" / "systemd").glob("*.service"))
    assert len(units) == 5
    for unit in units:
        result = subprocess.run(["systemd-analyze", "verify", "--man=no", str(unit)], capture_output=True, text=True)
        problems = [line for line in (result.stdout + result.stderr).splitlines()
                    if line.strip() and "is not executable" not in line and "No such file" not in line]
        assert not problems, f"{unit.name}: {problems}"
        text = unit.read_text()
        assert "NoNewPrivileges=true" in text and "ProtectSystem=strict" in text


def test_the_fleet_store_opens_and_closes_attempts_and_ignores_replayed_reports(tmp_path: Path) -> None:
    from datetime import UTC, datetime, timedelta

    from schemas.models import DeviceState, Phase
    from services.operator.fleet_store import FleetStore

    store = FleetStore.sqlite(tmp_path / "fleet.sqlite")
    t0 = datetime(2026, 1, 1, tzinfo=UTC)

    def report(seconds: int, phase: Phase, **fields: object) -> bool:
        return store.record_state(DeviceState(
            device="d1", fleet="f1", device_class="ipc", installed_version=str(fields.pop("installed", "1.0.0")),
            installed_sha256="1" * 64, phase=phase, timestamp=t0 + timedelta(seconds=seconds), **fields))

    assert report(0, Phase.IDLE)
    assert report(1, Phase.DOWNLOADING, target_version="2.0.0")
    assert report(2, Phase.PATCHING, target_version="2.0.0")
    assert report(3, Phase.DONE, target_version="2.0.0", installed="2.0.0", used_delta=True, update_millis=900)
    assert not report(3, Phase.DONE, target_version="2.0.0", installed="2.0.0")  # the retained copy, again
    assert report(4, Phase.REFUSED, target_version="3.0.0", installed="2.0.0", reason="bad bytes", reason_code="hash_mismatch")
    attempts = store.attempts("d1")
    assert [(a.target_version, a.outcome) for a in attempts] == [("2.0.0", "done"), ("3.0.0", "refused")]
    assert attempts[0].used_delta is True and attempts[0].millis == 900
    (row,) = store.devices()
    assert row.installed_version == "2.0.0" and row.last_error == "hash_mismatch: bad bytes"
    store.close()
    reopened = FleetStore.sqlite(tmp_path / "fleet.sqlite")
    assert len(reopened.attempts("d1")) == 2


@settings(max_examples=60, deadline=None)
@given(reports=st.lists(st.tuples(st.sampled_from(["d1", "d2", "d3"]), st.integers(0, 6),
                                  st.sampled_from(["idle", "downloading", "installing", "done", "failed", "refused"]),
                                  st.booleans()), max_size=25))
def test_the_fleet_store_records_a_batch_as_it_records_one_report_at_a_time(
        tmp_path_factory: pytest.TempPathFactory, reports: list[tuple[str, int, str, bool]]) -> None:
    """The fleet service writes a tick's reports in one transaction; the record must be the same as
    when each report was its own (order kept, replayed copies ignored, online flags between them)."""
    from datetime import UTC, datetime, timedelta

    from schemas.models import DeviceState, Phase
    from services.operator.fleet_store import FleetStore, OnlineSeen

    t0 = datetime(2026, 1, 1, tzinfo=UTC)
    updates: list[DeviceState | OnlineSeen] = []
    for device, seconds, phase, online in reports:
        updates.append(DeviceState(device=device, fleet="f1", device_class="ipc", installed_version="1.0.0",
                                   installed_sha256="1" * 64, phase=Phase(phase), timestamp=t0 + timedelta(seconds=seconds),
                                   target_version=None if phase == "idle" else "2.0.0", reason="r" if phase == "failed" else None))
        updates.append(OnlineSeen(device, online, t0 + timedelta(seconds=seconds)))
    directory = tmp_path_factory.mktemp("store")
    one, batch = FleetStore.sqlite(directory / "one.sqlite"), FleetStore.sqlite(directory / "batch.sqlite")
    newer = sum(one.record([u]) for u in updates)
    assert batch.record(updates) == newer
    assert one.devices() == batch.devices()
    assert one.status_lines() == batch.status_lines() and one.reports_json() == batch.reports_json()
    for device in ("d1", "d2", "d3"):
        assert one.attempts(device) == batch.attempts(device)
        assert one.device(device) == batch.device(device)
    one.close()
    batch.close()


def test_demo_images_use_only_packages_edgeswarm_installs() -> None:
    from importlib.metadata import requires

    from services.demo.sample_images import RECIPES

    declared = {r.split(";")[0].split(">")[0].split("=")[0].split("<")[0].strip().lower().replace("-", "_")
                for r in requires("edgeswarm") or [] if "extra ==" not in r}
    # import name -> the declared distribution that guarantees it
    provided_by = {"nacl": "pynacl", "paho": "paho_mqtt", "pydantic_core": "pydantic", "markdown_it": "rich",
                   "mdurl": "rich", "pydantic_settings": "pydantic_settings"}
    for versions in RECIPES.values():
        for recipe in versions.values():
            for package in recipe.packages:
                assert provided_by.get(package, package) in declared, f"{package} is not guaranteed by edgeswarm's dependencies"
