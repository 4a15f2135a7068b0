"""`edgeswarm fleet`: what the fleet runs, the fleet service, one device's history and requests."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import typer
from rich.table import Table

from services.cli.common import (
    ConfigOption,
    HomeOption,
    JsonOption,
    VerboseOption,
    err,
    fail,
    make_console,
    operator_client,
    operator_home,
    operator_settings,
    run_until_signal,
    setup_logging,
)

if TYPE_CHECKING:  # asyncio loads when a command runs, not for --help
    import asyncio

fleet_app = typer.Typer(help="What the fleet runs, from the devices' retained reports.", no_args_is_help=True)


# -- fleet ------------------------------------------------------------------------------------------


@fleet_app.command("status")
def fleet_status(
    config: ConfigOption = None,
    wait: Annotated[float, typer.Option(help="seconds to collect retained reports")] = 1.5,
    as_json: JsonOption = False,
) -> None:
    """Every device's version and phase, grouped by device class."""
    import asyncio
    from services.operator.fleet import FleetTracker
    from services.runtime.messaging import MqttError

    settings = operator_settings(config)
    tracker = FleetTracker(settings.fleet)

    async def go() -> None:
        async with operator_client(settings, f"status-{os.getpid()}") as client:
            await tracker.subscribe(client)
            await tracker.follow(client, duration=wait)

    try:
        asyncio.run(go())
    except MqttError as exc:
        fail(str(exc))
    if as_json:
        out = []
        for view in sorted(tracker.devices.values(), key=lambda v: v.device):
            entry = json.loads(view.state.model_dump_json()) if view.state else {"device": view.device}
            entry["online"] = view.online
            out.append(entry)
        print(json.dumps({"fleet": settings.fleet, "devices": out}))
        return
    console = make_console()
    if not tracker.devices:
        console.print(f"no devices have reported in fleet {settings.fleet} on {settings.mqtt.host}:{settings.mqtt.port}")
        return
    for device_class, views in tracker.by_class().items():
        versions = ", ".join(f"{v}: {n}" for v, n in sorted(tracker.version_counts(device_class).items()))
        table = Table(title=f"{device_class} — {versions}")
        for column in ("device", "online", "installed", "phase", "progress", "reason", "reported"):
            table.add_column(column)
        for view in views:
            s = view.state
            table.add_row(
                view.device, {True: "yes", False: "[red]no[/]", None: "?"}[view.online],
                s.installed_version if s else "?", s.phase.value if s else "?", f"{s.progress}%" if s else "",
                (s.reason or "") if s else "", f"{s.timestamp:%Y-%m-%d %H:%M:%S}" if s else "",
            )
        console.print(table)


@fleet_app.command("serve")
def fleet_serve(
    config: ConfigOption = None,
    home: HomeOption = None,
    homeassistant: Annotated[Optional[bool], typer.Option("--homeassistant/--no-homeassistant", help="publish Home Assistant MQTT discovery (default: settings key homeassistant.enabled, else false)")] = None,
    discovery_prefix: Annotated[Optional[str], typer.Option(help="Home Assistant's discovery prefix (default: settings key homeassistant.discovery_prefix, else homeassistant)")] = None,
    trusted_root: Annotated[Optional[Path], typer.Option(help="the fleet's signed root.json, against which every release is verified (default: <home>/root.json)")] = None,
    verbose: VerboseOption = False,
) -> None:
    """Run the fleet service: tracking, staged rollouts, operator requests, Home Assistant.

    Records the fleet in <home>/fleet.sqlite, runs staged rollouts, answers operator requests on
    edgeswarm/<fleet>/ops/ and (with --homeassistant) shows every device in Home Assistant as an
    update entity. Releases are verified against the root of trust (and the root chain published
    on the broker) as devices verify them: one that does not verify is neither shown nor rolled out.
    """
    from importlib.metadata import version as package_version

    from schemas import topics
    from services.operator.fleet_service import FleetService, OpsTokens
    from services.operator.fleet_store import FleetStore
    from services.operator.homeassistant import HomeAssistantBridge
    from services.runtime.trust import TrustedSet, TrustError

    settings = operator_settings(config)
    operator = operator_home(settings, home)
    setup_logging(verbose)
    tokens = OpsTokens.load_or_create(operator.path / "tokens")
    bridge = None
    if homeassistant if homeassistant is not None else settings.homeassistant.enabled:
        try:
            bridge = HomeAssistantBridge(settings.fleet, discovery_prefix or settings.homeassistant.discovery_prefix,
                                         tokens.homeassistant, origin_version=package_version("edgeswarm"))
        except ValueError as exc:
            fail(str(exc))
    root_file = trusted_root or operator.root_file
    try:
        root = TrustedSet.load_initial_root(root_file.read_bytes())
    except FileNotFoundError:
        fail(f"{root_file} does not exist: the fleet service verifies every release against the fleet's root of "
             "trust; pass --trusted-root with the operator's root.json")
    except TrustError as exc:
        fail(f"{root_file} is not a valid signed root: {exc}")
    if root.fleet != settings.fleet:
        fail(f"{root_file} is the root of fleet {root.fleet!r}, the settings say {settings.fleet!r}")
    store = FleetStore(operator.path / "fleet.sqlite")
    service = FleetService(settings.fleet, store, tokens, root, bridge=bridge)

    async def main(stop: asyncio.Event) -> None:
        # A persistent session: reports sent while this service was down are queued for it.
        async with operator_client(settings, "fleet-service", persistent=True) as client:
            err.print(f"fleet service for {settings.fleet}: recording in {operator.path / 'fleet.sqlite'}, "
                      f"operator requests on {topics.ops_wildcard(settings.fleet)}"
                      + (f", Home Assistant discovery under {bridge.prefix}/" if bridge else ""))
            await service.run(client, stop)

    try:
        run_until_signal(main)
    finally:
        store.close()


def _device_request(action: str, device: str, config: Path | None, home: Path | None, as_json: bool) -> None:
    from schemas import topics
    from schemas.ops import DeviceRequest
    from services.cli.rollout import operator_token, report, send

    settings = operator_settings(config)
    try:
        topic = topics.ops_device_topic(settings.fleet, device, action)
    except ValueError as exc:
        fail(str(exc))
        return
    report(send(settings, topic, DeviceRequest(token=operator_token(settings, home))), as_json)


@fleet_app.command("install")
def fleet_install(
    device: Annotated[str, typer.Argument(help="device id")],
    config: ConfigOption = None,
    home: HomeOption = None,
    as_json: JsonOption = False,
) -> None:
    """Install its class's latest release on one device now (refused while that rollout is paused or aborted)."""
    _device_request("install", device, config, home, as_json)


@fleet_app.command("check")
def fleet_check(
    device: Annotated[str, typer.Argument(help="device id")],
    config: ConfigOption = None,
    home: HomeOption = None,
    as_json: JsonOption = False,
) -> None:
    """Ask one device to evaluate its class's release again and report."""
    _device_request("check", device, config, home, as_json)


@fleet_app.command("retire")
def fleet_retire(
    device: Annotated[str, typer.Argument(help="device id")],
    config: ConfigOption = None,
    home: HomeOption = None,
    as_json: JsonOption = False,
) -> None:
    """Forget a decommissioned device: its retained reports and its Home Assistant entity are removed."""
    _device_request("retire", device, config, home, as_json)


@fleet_app.command("show")
def fleet_show(
    device: Annotated[str, typer.Argument(help="device id")],
    config: ConfigOption = None,
    home: HomeOption = None,
    as_json: JsonOption = False,
) -> None:
    """One device: its latest state and every update attempt (recorded by `edgeswarm fleet serve`)."""
    from dataclasses import asdict

    from services.operator.fleet_store import FleetStore

    operator = operator_home(operator_settings(config), home)
    path = operator.path / "fleet.sqlite"
    if not path.exists():
        fail(f"{path} does not exist: run `edgeswarm fleet serve` to record the fleet")
    store = FleetStore(path)
    rows = [r for r in store.devices() if r.device == device]
    if not rows:
        fail(f"no device {device!r} has reported")
    attempts = store.attempts(device)
    store.close()
    if as_json:
        print(json.dumps({"device": asdict(rows[0]), "attempts": [asdict(a) for a in attempts]}))
        return
    row = rows[0]
    console = make_console()
    console.print(f"[bold]{row.device}[/] ({row.device_class}): {row.installed_version}, {row.phase} "
                  f"{row.progress or 0}%, {'online' if row.online else 'offline'}, last seen {row.last_seen}")
    if row.last_error:
        console.print(f"last error: {row.last_error}")
    table = Table(title="update attempts")
    for column in ("target", "started", "finished", "outcome", "delta", "from origin", "from peers", "ms", "reason"):
        table.add_column(column)
    for a in attempts:
        table.add_row(a.target_version, a.started, a.finished or "", a.outcome or "in progress",
                      {True: "yes", False: "no", None: ""}[a.used_delta], str(a.bytes_from_origin or ""),
                      str(a.bytes_from_peers or ""), str(a.millis or ""), (a.reason or "")[:60])
    console.print(table)
