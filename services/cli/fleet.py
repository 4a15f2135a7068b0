"""`edgeswarm fleet`: what the fleet runs, the fleet service, one device's history and requests."""

from __future__ import annotations

import json
import os
from collections import Counter
from enum import Enum
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

    from rich.console import Console

    from services.operator.fleet import DeviceView, StatusLine
    from services.operator.fleet_store import FleetStore, RecordedReport
    from services.runtime.settings import OperatorSettings

fleet_app = typer.Typer(help="What the fleet runs, from the devices' retained reports.", no_args_is_help=True)


# -- fleet ------------------------------------------------------------------------------------------


class StatusSource(str, Enum):
    broker = "broker"
    record = "record"


ATTENTION = {"failed", "refused", "rolled_back", "frozen"}


@fleet_app.command("status")
def fleet_status(
    config: ConfigOption = None,
    home: HomeOption = None,
    wait: Annotated[float, typer.Option(help="seconds to collect retained reports (more while they keep coming)")] = 1.5,
    source: Annotated[StatusSource, typer.Option(
        "--from", help="broker: the devices' retained reports; record: the fleet record `fleet serve` keeps in "
                       "<home>/fleet.sqlite or [record] database (no broker needed, fast at any fleet size)")] = StatusSource.broker,
    show_all: Annotated[bool, typer.Option(
        "--all", help="list every device; a class of more than --limit devices is otherwise summarised by "
                      "phase, with only its devices that need attention listed")] = False,
    limit: Annotated[int, typer.Option(min=1, help="devices listed per class without --all")] = 200,
    as_json: JsonOption = False,
) -> None:
    """Every device's version and phase, grouped by device class."""
    from services.operator.fleet import StatusLine

    settings = operator_settings(config)
    lines: list[StatusLine]
    where: str
    if source == StatusSource.record:
        store = _open_record(settings, home, hint=" (or use --from broker)")
        try:
            if as_json:
                print(_record_json(settings.fleet, store.reports_json()))
                return
            lines = store.status_lines()
        finally:
            store.close()
        where = f"the fleet record {store.where}"
    else:
        views = _from_broker(settings, wait)
        if as_json:
            out = []
            for view in views:
                entry = view.state.model_dump(mode="json") if view.state else {"device": view.device}
                entry["online"] = view.online
                out.append(entry)
            print(json.dumps({"fleet": settings.fleet, "source": source.value, "devices": out}))
            return
        lines = [StatusLine.of(view) for view in views]
        where = f"{settings.mqtt.host}:{settings.mqtt.port}"
    console = make_console()
    if not lines:
        console.print(f"no devices have reported in fleet {settings.fleet} ({where})")
        return
    by_class: dict[str, list[StatusLine]] = {}
    for line in lines:
        by_class.setdefault(line.device_class, []).append(line)
    for device_class, members in by_class.items():
        _print_class(console, device_class, members, limit=None if show_all else limit)


def _open_record(settings: OperatorSettings, home: Path | None, *, hint: str = "") -> FleetStore:
    """The fleet record for reading: it must exist already (an empty one would answer wrongly)."""
    from services.operator.fleet_store import RecordMissing, open_fleet_store
    from services.operator.record_database import RecordUnavailable

    try:
        return open_fleet_store(settings.record.database, operator_home(settings, home).path, must_exist=True)
    except (RecordMissing, RecordUnavailable) as exc:
        fail(f"{exc}{hint}")
        raise


def _record_json(fleet: str, rows: list[RecordedReport]) -> str:
    """The same document as from the broker, spliced from the reports as recorded (each a JSON object
    written by the fleet service from a validated report), with each device's online flag added and
    how its report was heard ("heard": "direct", "tunnel via <peer>" or "relayed by <peer>", and for a relayed one "heard_at",
    when the peer's copy arrived)."""
    entries = []
    for row in rows:
        extra: dict[str, object] = {"online": row.online}
        if row.heard is not None:
            extra["heard"] = row.heard
        if row.heard_at is not None:
            extra["heard_at"] = row.heard_at
        entries.append(f'{row.state_json[:-1]},{json.dumps(extra)[1:-1]}}}' if row.state_json
                       else json.dumps({"device": row.device, **extra}))
    return f'{{"fleet":{json.dumps(fleet)},"source":"record","devices":[{",".join(entries)}]}}'


def _from_broker(settings: OperatorSettings, wait: float) -> list[DeviceView]:
    import asyncio

    from services.operator.fleet import FleetTracker
    from services.runtime.messaging import MqttError

    tracker = FleetTracker(settings.fleet)

    async def go() -> None:
        async with operator_client(settings, f"status-{os.getpid()}") as client:
            await tracker.subscribe(client)
            # A large fleet's retained reports take longer than `wait` to arrive: read on while they do.
            await tracker.follow(client, duration=wait, settle=0.5)

    try:
        asyncio.run(go())
    except MqttError as exc:
        fail(str(exc))
    return sorted(tracker.devices.values(), key=lambda v: v.device)


def _print_class(console: Console, device_class: str, lines: list[StatusLine], *, limit: int | None) -> None:
    versions = Counter(line.installed_version for line in lines if line.installed_version)
    title = f"{device_class} — {', '.join(f'{v}: {n:,}' for v, n in sorted(versions.items()))}"
    candidates = lines
    if limit is not None and len(lines) > limit:
        summary = Table(title=f"{title} — {len(lines):,} devices")
        summary.add_column("phase")
        for column in ("devices", "online", "offline", "unknown"):
            summary.add_column(column, justify="right")
        by_phase: dict[str, Counter[bool | None]] = {}
        for line in lines:
            by_phase.setdefault(line.phase or "?", Counter())[line.online] += 1
        for phase, online in sorted(by_phase.items(), key=lambda item: -sum(item[1].values())):
            summary.add_row(phase, f"{sum(online.values()):,}", f"{online[True]:,}", f"{online[False]:,}",
                            f"{online[None]:,}")
        console.print(summary)
        candidates = [line for line in lines
                      if line.online is False or line.phase is None or line.phase in ATTENTION or line.reason]
        if not candidates:
            return
        title = f"{device_class}: devices that need attention ({len(candidates):,})"
    listed = candidates if limit is None else candidates[:limit]
    table = Table(title=title)
    heard = any(line.heard and line.heard != "direct" for line in listed)  # from the record: shown once a peer carried one
    for column in ("device", "online", "installed", "phase", "progress", "reason", "reported",
                   *(("heard",) if heard else ())):
        table.add_column(column)
    for line in listed:
        reported = line.phase is not None
        table.add_row(
            line.device, {True: "yes", False: "[red]no[/]", None: "?"}[line.online],
            line.installed_version or "?", line.phase or "?", f"{line.progress or 0}%" if reported else "",
            line.reason or "", f"{line.reported:%Y-%m-%d %H:%M:%S}" if line.reported else "",
            *((f"{line.heard or '?'}{f' at {line.heard_at:%H:%M:%S}' if line.heard_at else ''}",) if heard else ()),
        )
    console.print(table)
    if len(candidates) > len(listed):
        console.print(f"... and {len(candidates) - len(listed):,} more: --all lists every device, --json prints "
                      "them for scripts")


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

    Records the fleet in <home>/fleet.sqlite (or in PostgreSQL, [record] database), runs staged
    rollouts, answers operator requests on edgeswarm/<fleet>/ops/ and (with --homeassistant) shows
    devices in Home Assistant (every one up to [homeassistant] all_devices_up_to, 200, then only
    those listed in its `devices`) as an update entity. A second `fleet serve` on the same record
    waits as standby and takes over when the active one stops. Releases are verified against the root of trust (and the root chain published
    on the broker) as devices verify them: one that does not verify is neither shown nor rolled out.
    """
    from importlib.metadata import version as package_version

    from schemas import topics
    from services.operator.fleet_service import FleetService, OpsTokens
    from services.operator.fleet_store import open_fleet_store
    from services.operator.homeassistant import HomeAssistantBridge
    from services.operator.identities import DeviceIdentities
    from services.operator.standby import wait_until_active
    from services.runtime.trust import TrustedSet, TrustError

    settings = operator_settings(config)
    operator = operator_home(settings, home)
    setup_logging(verbose)
    tokens = OpsTokens.load_or_create(operator.path / "tokens")
    bridge = None
    if homeassistant if homeassistant is not None else settings.homeassistant.enabled:
        try:
            bridge = HomeAssistantBridge(settings.fleet, discovery_prefix or settings.homeassistant.discovery_prefix,
                                         tokens.homeassistant, origin_version=package_version("edgeswarm"),
                                         all_devices_up_to=settings.homeassistant.all_devices_up_to,
                                         selected=settings.homeassistant.devices)
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
    store = open_fleet_store(settings.record.database, operator.path)

    async def main(stop: asyncio.Event) -> None:
        if not await wait_until_active(store, settings.fleet, stop, poll=settings.record.standby_poll):
            return
        # Made once active: the rollouts it resumes are those the record holds now, not at start.
        service = FleetService(settings.fleet, store, tokens, root, bridge=bridge,
                               identities=DeviceIdentities(operator.identities_dir))
        # A persistent session: reports sent while this service was down (or none was active) are queued for it.
        async with operator_client(settings, "fleet-service", persistent=True) as client:
            err.print(f"fleet service for {settings.fleet} (active): recording in {store.where}, "
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

    store = _open_record(operator_settings(config), home)
    row = store.device(device)
    if row is None:
        fail(f"no device {device!r} has reported")
    attempts = store.attempts(device)
    store.close()
    if as_json:
        print(json.dumps({"device": asdict(row), "attempts": [asdict(a) for a in attempts]}))
        return
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
