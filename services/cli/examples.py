"""One worked example per command, shown at the end of its `--help`.

Kept in one table so that a test can parse every example against the command it belongs to
(tests/unit/test_cli_help.py): an option renamed in the code fails there, not in a user's shell.
"""

from __future__ import annotations

import typer

__all__ = ["EXAMPLES", "add_examples"]

EXAMPLES: dict[str, str] = {
    "release": "edgeswarm release gateway-armv7 1.1.0 build/gateway-1.1.0.img --config operator.toml "
               "--handler ab --summary 'Fixes the modbus timeout'",
    "timestamp": "edgeswarm timestamp --config operator.toml --every 3600",
    "origin": "edgeswarm origin --config operator.toml",
    "demo": "edgeswarm demo --devices 6 --json",
    "pki init": "edgeswarm pki init --out pki --fleet plant-7 --host broker.plant7.example --host 192.0.2.10",
    "pki client": "edgeswarm pki client gw-0001 --out pki",
    "keys init": "edgeswarm keys init --home /media/keys/plant-7 --fleet plant-7 --root-keys 3 --root-threshold 2",
    "keys rotate": "edgeswarm keys rotate release --config operator.toml --count 2 --threshold 2",
    "keys revoke": "edgeswarm keys revoke 3f2a9c81d0e4b7a6 --config operator.toml",
    "keys class-key": "edgeswarm keys class-key gateway-armv7 --config operator.toml",
    "keys swarm-key": "edgeswarm keys swarm-key --config operator.toml",
    "root show": "edgeswarm root show --config operator.toml --json",
    "root sign": "edgeswarm root sign root-proposal.json --key keys/root-3f2a9c81.key",
    "root commit": "edgeswarm root commit root-proposal.json --config operator.toml",
    "root publish": "edgeswarm root publish --config operator.toml",
    "device run": "edgeswarm device run --config /etc/edgeswarm/device.toml",
    "device config": "edgeswarm device config gw-0001 gateway-armv7 --broker-dir /etc/edgeswarm/broker "
                     "--config /etc/edgeswarm/operator.toml --out provision/gw-0001",
    "fleet status": "edgeswarm fleet status --config operator.toml --json",
    "fleet serve": "edgeswarm fleet serve --config service.toml --homeassistant",
    "fleet install": "edgeswarm fleet install gw-0001 --config service.toml",
    "fleet check": "edgeswarm fleet check gw-0001 --config service.toml",
    "fleet retire": "edgeswarm fleet retire gw-0002 --config service.toml",
    "fleet show": "edgeswarm fleet show gw-0001 --config service.toml --json",
    "delta create": "edgeswarm delta create gateway-1.0.0.img gateway-1.1.0.img -o 1.0.0-to-1.1.0.esdelta",
    "delta apply": "edgeswarm delta apply gateway-1.0.0.img 1.0.0-to-1.1.0.esdelta -o gateway-1.1.0.img",
    "delta info": "edgeswarm delta info 1.0.0-to-1.1.0.esdelta --json",
    "rollout start": "edgeswarm rollout start gateway-armv7 1.1.0 --wave 10% --wave 100% --soak 600 --config service.toml",
    "rollout pause": "edgeswarm rollout pause gateway-armv7 --reason 'field reports' --config service.toml",
    "rollout resume": "edgeswarm rollout resume gateway-armv7 --config service.toml",
    "rollout abort": "edgeswarm rollout abort gateway-armv7 --reason 'bad build' --config service.toml",
    "rollout status": "edgeswarm rollout status gateway-armv7 --config service.toml",
    "broker run": "edgeswarm broker run --port 1883",
    "broker add-device": "edgeswarm broker add-device /etc/edgeswarm/broker gw-0003:gateway-armv7",
    "broker remove-device": "edgeswarm broker remove-device /etc/edgeswarm/broker gw-0002",
    "broker config": "edgeswarm broker config --out /etc/edgeswarm/broker --fleet plant-7 --pki pki "
                     "--public-host broker.plant7.example --device gw-0001:gateway-armv7",
}


def add_examples(app: typer.Typer, prefix: str = "") -> None:
    """Put each command's example into its help epilog (typer keeps them on the registered commands)."""
    for command in app.registered_commands:
        name = command.name or (command.callback.__name__.replace("_", "-") if command.callback else "")
        path = f"{prefix}{name}"
        if path in EXAMPLES:
            command.epilog = f"Example: {EXAMPLES[path]}"
    for group in app.registered_groups:
        if group.typer_instance is not None:
            add_examples(group.typer_instance, f"{prefix}{group.name} ")
