"""`edgeswarm rollout`: staged rollouts, run by `edgeswarm fleet serve`, driven over the ops topics."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import typer
from rich.table import Table

from schemas import topics
from services.cli.common import (
    ConfigOption,
    HomeOption,
    JsonOption,
    fail,
    make_console,
    operator_client,
    operator_home,
    operator_settings,
)

if TYPE_CHECKING:  # pydantic models: imported where used, so that --help stays quick
    import pydantic

    from schemas.ops import OpsResult, RolloutStatus, Wave
    from services.runtime.settings import OperatorSettings

rollout_app = typer.Typer(help="Staged rollouts: waves, soak time, automatic pause on failures.", no_args_is_help=True)
TOKEN_ENV = "EDGESWARM_OPS_TOKEN"


def operator_token(settings: OperatorSettings, home: Path | None) -> str:
    """$EDGESWARM_OPS_TOKEN, else the operator token of the home `fleet serve` runs in."""
    from services.operator.fleet_service import OpsTokens

    if os.environ.get(TOKEN_ENV):
        return os.environ[TOKEN_ENV]
    return OpsTokens.load_or_create(operator_home(settings, home).path / "tokens").operator


def send(settings: OperatorSettings, topic: str, body: pydantic.BaseModel, timeout: float = 10.0) -> OpsResult:
    import asyncio
    from services.operator.ops_client import NoAnswer, request
    from services.runtime.messaging import MqttError

    async def go() -> OpsResult:
        async with operator_client(settings, f"ops-{os.getpid()}") as client:
            return await request(client, settings.fleet, topic, body, timeout=timeout)

    try:
        return asyncio.run(go())
    except (MqttError, NoAnswer) as exc:
        fail(str(exc))
        raise  # unreachable: fail() exits


def report(result: OpsResult, as_json: bool) -> None:
    if as_json:
        print(result.model_dump_json())
    elif result.ok:
        make_console().print(result.message)
    if not result.ok:
        fail(result.message)


def parse_wave(text: str) -> Wave:
    from schemas.ops import Wave

    text = text.strip()
    if text.rstrip("%").isdigit():
        return Wave(percent=int(text.rstrip("%")))
    return Wave(devices=[d.strip() for d in text.split(",") if d.strip()])


@rollout_app.command("start")
def start(
    device_class: Annotated[str, typer.Argument(help="device class")],
    version: Annotated[str, typer.Argument(help="the class's latest release, published with --staged")],
    wave: Annotated[list[str], typer.Option(help="a wave: a cumulative share ('25%') or devices ('gw-1,gw-2'); repeatable, in order")] = ["5%", "25%", "100%"],  # noqa: B006
    soak: Annotated[int, typer.Option(min=0, help="seconds every wave must stay healthy before the next starts")] = 300,
    max_failed: Annotated[int, typer.Option(min=0, max=100, help="pause when more than this percentage of a wave failed")] = 20,
    config: ConfigOption = None,
    home: HomeOption = None,
    as_json: JsonOption = False,
) -> None:
    """Start rolling a staged release out, wave by wave (run by `edgeswarm fleet serve`)."""
    import pydantic

    from schemas.ops import RolloutPlan, StartRollout

    settings = operator_settings(config)
    try:
        plan = RolloutPlan(device_class=device_class, version=version, waves=[parse_wave(w) for w in wave],
                           soak_seconds=soak, max_failed_percent=max_failed)
    except pydantic.ValidationError as exc:
        fail(f"rollout plan: {exc.errors()[0]['msg']}")
        return
    body = StartRollout(token=operator_token(settings, home), plan=plan)
    report(send(settings, topics.ops_rollout_topic(settings.fleet, "start"), body), as_json)


def _control(action: str, device_class: str, reason: str, config: Path | None, home: Path | None, as_json: bool) -> None:
    from schemas.ops import ControlRollout

    settings = operator_settings(config)
    body = ControlRollout(token=operator_token(settings, home), device_class=device_class, reason=reason)
    report(send(settings, topics.ops_rollout_topic(settings.fleet, action), body), as_json)


ReasonOption = Annotated[str, typer.Option(help="why (shown in the status and in Home Assistant)")]


@rollout_app.command("pause")
def pause(device_class: Annotated[str, typer.Argument(help="device class")], reason: ReasonOption = "",
          config: ConfigOption = None, home: HomeOption = None, as_json: JsonOption = False) -> None:
    """Stop admitting devices; installs already under way finish."""
    _control("pause", device_class, reason, config, home, as_json)


@rollout_app.command("resume")
def resume(device_class: Annotated[str, typer.Argument(help="device class")], reason: ReasonOption = "",
           config: ConfigOption = None, home: HomeOption = None, as_json: JsonOption = False) -> None:
    """Go on; the failures seen so far are accepted, only new ones pause again."""
    _control("resume", device_class, reason, config, home, as_json)


@rollout_app.command("abort")
def abort(device_class: Annotated[str, typer.Argument(help="device class")], reason: ReasonOption = "",
          config: ConfigOption = None, home: HomeOption = None, as_json: JsonOption = False) -> None:
    """End the rollout: devices not yet admitted stay on their version; none is left half-installed."""
    _control("abort", device_class, reason, config, home, as_json)


@rollout_app.command("status")
def status(
    device_class: Annotated[Optional[str], typer.Argument(help="only this class")] = None,
    config: ConfigOption = None,
    wait: Annotated[float, typer.Option(help="seconds to collect the retained statuses")] = 1.5,
    as_json: JsonOption = False,
) -> None:
    """Every class's rollout: state, wave, done / installing / waiting / failed."""
    import asyncio
    from services.operator.ops_client import rollout_statuses
    from services.runtime.messaging import MqttError

    settings = operator_settings(config)

    async def go() -> list[RolloutStatus]:
        async with operator_client(settings, f"rollout-status-{os.getpid()}") as client:
            return await rollout_statuses(client, settings.fleet, wait=wait)

    try:
        found = [s for s in asyncio.run(go()) if device_class in (None, s.device_class)]
    except MqttError as exc:
        fail(str(exc))
        return
    if as_json:
        print(json.dumps({"fleet": settings.fleet, "rollouts": [json.loads(s.model_dump_json()) for s in found]}))
        return
    console = make_console()
    if not found:
        console.print(f"no rollouts in fleet {settings.fleet}")
        return
    table = Table(title=f"rollouts in fleet {settings.fleet}")
    for column in ("class", "version", "state", "wave", "devices", "done", "installing", "waiting", "failed", "reason"):
        table.add_column(column)
    colour = {"running": "cyan", "paused": "yellow", "aborted": "red", "completed": "green"}
    for s in found:
        table.add_row(s.device_class, s.version, f"[{colour[s.state.value]}]{s.state.value}[/]", f"{s.wave}/{s.waves}",
                      f"{s.wave_devices}/{s.class_devices}", str(s.done), str(s.in_progress), str(s.waiting),
                      f"{s.failed} ({s.failure_rate:.0%})" if s.failed else "0", s.reason)
    console.print(table)
