"""The operator's path through the CLI: help that shows what to type, one-line errors that say what
to do next, broker configurations that can grow one device at a time, addresses devices can dial."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
import typer.main

from services.cli import app
from services.cli.examples import EXAMPLES
from services.operator.mosquitto import BrokerPlan, DevicePrincipal, load_plan, write_config
from services.operator.origin import dialable_addresses
from services.runtime.content import KuboConfig
from services.runtime.settings import DeviceSettings, OperatorSettings, SettingsError, load_settings

REPO = Path(__file__).resolve().parents[2]


def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "services.cli", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=60, env={**os.environ, "PYTHONPATH": str(REPO)}, stdin=subprocess.DEVNULL)


def commands() -> dict[str, Any]:
    """Every leaf command by its path ("broker config"), as the parser typer builds sees them."""
    root = typer.main.get_command(app)
    found: dict[str, Any] = {}

    def walk(command: Any, path: list[str], ctx: Any) -> None:
        if hasattr(command, "list_commands"):
            for name in command.list_commands(ctx):
                sub = command.get_command(ctx, name)
                assert sub is not None
                walk(sub, [*path, name], sub.context_class(sub, parent=ctx, info_name=name))
        else:
            found[" ".join(path)] = command

    walk(root, [], root.context_class(root, info_name="edgeswarm"))
    return found


def test_every_command_has_an_example_that_its_parser_accepts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    found = commands()
    assert set(found) == set(EXAMPLES), "one example per command, none for a command that is gone"
    for path, command in found.items():
        words = shlex.split(EXAMPLES[path])
        assert words[: 1 + len(path.split())] == ["edgeswarm", *path.split()], path
        # Files the parser wants to exist (an image, a patch, a settings file) are created empty, absolute
        # ones under tmp_path.
        args = [str(tmp_path) + w if w.startswith("/") else w for w in words[1 + len(path.split()):]]
        for word in args:
            if not word.startswith("-") and "." in word and " " not in word:
                (tmp_path / word).parent.mkdir(parents=True, exist_ok=True)
                (tmp_path / word).touch()
        command.make_context(path, list(args))  # raises on an unknown option or a missing argument
        assert EXAMPLES[path] in " ".join((command.epilog or "").split()), path


def test_help_shows_flags_as_flags_and_no_internal_type_names() -> None:
    for path, command in commands().items():
        text = cli(*path.split(), "--help", cwd=REPO).stdout
        assert "<bool>" not in text and "list[" not in text and "Example: edgeswarm" in text, (path, text)


def test_help_loads_no_models_no_mqtt_and_no_codecs() -> None:
    """`--help` stays under 0.3 s (benchmarks/cli_bench.py) because commands import their work, and
    asyncio with its ssl and socket, when they run."""
    code = ("import sys, services.cli; heavy = [m for m in ('pydantic', 'paho', 'numpy', 'schemas.models', "
            "'services.runtime.settings', 'services.runtime.delta', 'asyncio', 'ssl', 'rich.logging') "
            "if m in sys.modules]; print(heavy)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert result.stdout.strip() == "[]", result.stdout + result.stderr


@pytest.mark.parametrize(("content", "expected"), [
    (None, "does not exist; start from config/operator.example.toml"),
    ('fleet = "f"\n[mqtt\n', "is not valid TOML"),
    ('fleet = "f"\n[mqtt]\nport = 99999\n', "mqtt.port: Input should be less than or equal to 65535"),
    ('fleet = "f"\n[content]\nswarm_port = 0\nnat_pmp = true\n', "swarm_port = 0"),
    ('fleet = "f"\nunknown_key = 1\n', "unknown_key"),
])
def test_settings_errors_name_the_file_and_the_key(tmp_path: Path, content: str | None, expected: str) -> None:
    path = tmp_path / "operator.toml"
    if content is not None:
        path.write_text(content)
    with pytest.raises(SettingsError, match=expected.replace("[", r"\[").replace(".", r"\.")):
        load_settings(OperatorSettings, path)
    result = cli("fleet", "status", "--config", str(path), cwd=tmp_path)
    assert result.returncode == 2 and result.stderr.startswith("error: ") and expected in result.stderr, result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1
    verbose = cli("--verbose", "fleet", "status", "--config", str(path), cwd=tmp_path)
    assert verbose.returncode != 0 and "Traceback" in verbose.stderr


def test_a_device_settings_file_that_is_missing_points_at_the_device_example(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match="config/device.example.toml"):
        load_settings(DeviceSettings, tmp_path / "device.toml")


def test_an_unreachable_broker_is_one_line_that_names_the_settings_to_check(tmp_path: Path) -> None:
    (tmp_path / "operator.toml").write_text('fleet = "f"\nhome = "h"\n[mqtt]\nport = 1\n')
    result = cli("root", "publish", "--config", "operator.toml", cwd=tmp_path)
    assert result.returncode != 0 and "Traceback" not in result.stderr


def test_rewriting_a_broker_keeps_passwords_and_drops_only_removed_principals(tmp_path: Path) -> None:
    plan = BrokerPlan(fleet="f1", directory=tmp_path / "b", port=8883, tls=False,
                      devices=[DevicePrincipal("a", "c1"), DevicePrincipal("b", "c1")])
    first = write_config(plan)
    plan.devices = [DevicePrincipal("a", "c1"), DevicePrincipal("c", "c2")]
    second = write_config(plan)
    assert {k: second[k] for k in first if k != "b"} == {k: v for k, v in first.items() if k != "b"}
    assert "c" in second and "b" not in second and second["c"] not in first.values()
    assert not (plan.directory / "credentials" / "b.toml").exists()
    passwd = (plan.directory / "passwd").read_text()
    assert passwd.startswith(tuple(f"{p}:" for p in second)) and "\nb:" not in passwd and not passwd.startswith("b:")
    again = load_plan(plan.directory)
    assert again.devices == plan.devices and again.fleet == "f1"
    assert oct((plan.directory / "edgeswarm-broker.json").stat().st_mode & 0o777) == "0o600"


def test_credentials_name_a_host_clients_can_dial(tmp_path: Path) -> None:
    pki = tmp_path / "pki"
    assert cli("pki", "init", "--out", str(pki), "--fleet", "f1", "--host", "broker.example", "--host", "localhost",
               cwd=tmp_path).returncode == 0
    everywhere = cli("broker", "config", "--out", "b", "--fleet", "f1", "--pki", str(pki), "--host", "0.0.0.0",
                     "--owner", "", cwd=tmp_path)
    assert everywhere.returncode == 0, everywhere.stderr
    login = tomllib.loads((tmp_path / "b/credentials/edgeswarm-homeassistant.toml").read_text())["mqtt"]
    assert (login["host"], login["port"]) == ("broker.example", 8883)
    local = tomllib.loads((tmp_path / "b/credentials/edgeswarm-release.toml").read_text())["mqtt"]
    assert (local["host"], local["port"], "ca_file" in local) == ("127.0.0.1", 8884, False)  # the broker host's services
    wrong = cli("broker", "config", "--out", "b2", "--fleet", "f1", "--pki", str(pki), "--public-host", "other.example",
                "--owner", "", cwd=tmp_path)
    assert wrong.returncode != 0 and "not on the broker's certificate" in wrong.stderr
    plain = cli("broker", "config", "--out", "b3", "--fleet", "f1", "--host", "0.0.0.0", "--owner", "", cwd=tmp_path)
    assert plain.returncode != 0 and "plaintext" in plain.stderr and "--public-host" in plain.stderr
    assert cli("broker", "config", "--out", "b4", "--owner", "", cwd=tmp_path).returncode != 0  # no fleet at all
    (tmp_path / "operator.toml").write_text('fleet = "from-settings"\n')
    from_settings = cli("broker", "config", "--out", "b5", "--config", "operator.toml", "--owner", "", cwd=tmp_path)
    assert from_settings.returncode == 0 and load_plan(tmp_path / "b5").fleet == "from-settings"


def test_an_origin_on_every_interface_writes_addresses_devices_can_dial(tmp_path: Path) -> None:
    trie = tmp_path / "fib_trie"
    trie.write_text("Local:\n  +-- 0.0.0.0/0 3 0 5\n     |-- 127.0.0.1\n        /32 host LOCAL\n"
                    "     |-- 10.1.2.3\n        /32 host LOCAL\n     |-- 10.1.2.255\n        /32 link BROADCAST\n")
    config = KuboConfig(repo=tmp_path, listen_host="0.0.0.0", swarm_port=4001, append_announce=["/ip4/203.0.113.7/tcp/4101"])
    # The broker on this very host (loopback): its other addresses are what devices dial.
    assert dialable_addresses(config, "QmPeer", broker_host="127.0.0.1", fib_trie=trie) == [
        "/ip4/203.0.113.7/tcp/4101/p2p/QmPeer", "/ip4/10.1.2.3/tcp/4001/p2p/QmPeer"]
    trie.write_text("")
    assert dialable_addresses(config, "QmPeer", broker_host="127.0.0.1", fib_trie=trie)[-1] == "/ip4/127.0.0.1/tcp/4001/p2p/QmPeer"
    config.listen_host = "10.1.2.3"
    assert dialable_addresses(config, "QmPeer", broker_host="127.0.0.1")[-1] == "/ip4/10.1.2.3/tcp/4001/p2p/QmPeer"


@pytest.mark.parametrize(("example", "model"), [("device.example.toml", DeviceSettings),
                                                ("operator.example.toml", OperatorSettings)])
def test_the_example_settings_load_as_they_are(example: str, model: type) -> None:
    settings = load_settings(model, REPO / "config" / example)
    assert settings.fleet == "plant-7"


def test_fleet_status_from_the_record_summarises_a_large_class_and_lists_who_needs_attention(tmp_path: Path) -> None:
    """A class of thousands is not a table of thousands of rows: the phases are counted, and the
    devices that failed, went offline or carry a reason are listed; --all and --json give everyone."""
    import json
    from datetime import UTC, datetime

    from schemas.models import DeviceState, Phase
    from services.operator.fleet_store import FleetStore, OnlineSeen

    home = tmp_path / "home"
    config = tmp_path / "operator.toml"
    config.write_text(f'fleet = "f1"\nhome = "{home}"\n[mqtt]\nport = 1\n')  # no broker: the record is enough
    missing = cli("fleet", "status", "--from", "record", "--config", str(config), cwd=tmp_path)
    assert missing.returncode == 1 and "fleet.sqlite does not exist" in missing.stderr

    now = datetime.now(UTC)
    updates: list[DeviceState | OnlineSeen] = []
    for i in range(250):
        device = f"gw-{i:03d}"
        phase = Phase.ROLLED_BACK if i in (7, 70, 170) else Phase.IDLE
        updates.append(DeviceState(device=device, fleet="f1", device_class="gw", installed_version="1.0.0",
                                   installed_sha256="1" * 64, phase=phase, target_version="2.0.0" if phase != Phase.IDLE else None,
                                   reason="health check failed" if phase != Phase.IDLE else None, timestamp=now))
        updates.append(OnlineSeen(device, i != 99, now))
    updates.append(DeviceState(device="ipc-1", fleet="f1", device_class="ipc", installed_version="3.1.0",
                               installed_sha256="3" * 64, phase=Phase.IDLE, timestamp=now))
    updates.append(OnlineSeen("not-reported-yet", True, now))
    store = FleetStore.sqlite(home / "fleet.sqlite")
    store.record(updates)
    store.close()

    table = cli("fleet", "status", "--from", "record", "--config", str(config), cwd=tmp_path)
    assert table.returncode == 0, table.stderr
    out = table.stdout
    assert "gw — 1.0.0: 250 — 250 devices" in out and "devices that need attention (4)" in out
    listed = {line.split("│")[1].strip() for line in out.splitlines() if line.startswith("│ gw-")}
    assert listed == {"gw-007", "gw-070", "gw-170", "gw-099"}
    assert "ipc-1" in out and "--all lists every device" not in out
    assert cli("fleet", "status", "--from", "record", "--limit", "2", "--config", str(config),
               cwd=tmp_path).stdout.count("│ gw-") == 2
    everyone = cli("fleet", "status", "--from", "record", "--all", "--config", str(config), cwd=tmp_path).stdout
    assert everyone.count("│ gw-") == 250
    as_json = json.loads(cli("fleet", "status", "--from", "record", "--json", "--config", str(config), cwd=tmp_path).stdout)
    assert as_json["source"] == "record" and len(as_json["devices"]) == 252
    by_device = {d["device"]: d for d in as_json["devices"]}
    assert by_device["not-reported-yet"] == {"device": "not-reported-yet", "online": True}
    for update in updates:  # each report as the broker's retained copy reads, plus its online flag
        if isinstance(update, DeviceState):
            entry = dict(by_device[update.device])
            online = entry.pop("online")
            assert entry.pop("heard") == "direct"  # (recorded from its own topic, not carried by a peer)
            assert entry == update.model_dump(mode="json")
            assert online is (None if update.device == "ipc-1" else update.device != "gw-099")
