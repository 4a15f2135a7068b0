"""`edgeswarm release` and `edgeswarm timestamp`: sign and publish (the rules live in services.operator.release)."""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path
from typing import Annotated, Optional

import typer

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

app = typer.Typer()  # its commands are top-level ones: services.cli registers them


# -- release --------------------------------------------------------------------------------------


@app.command("release")
def release(
    device_class: Annotated[str, typer.Argument(help="device class, e.g. ipc-x86_64")],
    version: Annotated[str, typer.Argument(help="new version, e.g. 2.0.0")],
    file: Annotated[Path, typer.Argument(exists=True, dir_okay=False, readable=True, help="the full artifact")],
    config: ConfigOption = None,
    home: HomeOption = None,
    target: Annotated[str, typer.Option(help="absolute path the device installs to")] = "/opt/edgeswarm/firmware.img",
    summary: Annotated[str, typer.Option(help="release notes shown to operators")] = "",
    handler: Annotated[str, typer.Option(help="install handler: file, ab (two slots) or command")] = "file",
    command: Annotated[Optional[str], typer.Option(help="command handler: program and arguments, e.g. 'dpkg -i {artifact}' (split like a shell, never run by one)")] = None,
    rollback_command: Annotated[Optional[str], typer.Option(help="command handler: run when the install or its health check fails")] = None,
    publish: Annotated[bool, typer.Option(help="publish the signed manifest to the broker (retained)")] = True,
    staged: Annotated[bool, typer.Option(help="devices wait for `edgeswarm rollout start` (or an install command) instead of installing at once")] = False,
    canary_percent: Annotated[int, typer.Option(min=0, max=100, help="with --staged: this share of the class installs at once (signed rule)")] = 0,
    url: Annotated[Optional[str], typer.Option(help="release notes URL shown by Home Assistant")] = None,
    as_json: JsonOption = False,
) -> None:
    """Sign a release: full artifact plus deltas from previous versions, published retained over MQTT.

    The files are placed in <home>/seed for `edgeswarm origin` to serve over IPFS. With --staged
    the manifest carries a signed rollout rule: only the canary share installs by itself, the rest
    of the class waits for its wave of `edgeswarm rollout start`.
    """
    import asyncio
    from services.operator.fleet_store import versions_of_class
    from services.operator.record_database import RecordUnavailable
    from services.operator.release import (
        ReleaseError,
        ReleasePipeline,
        publish_release,
        release_store,
    )
    from services.runtime.messaging import MqttError

    settings = operator_settings(config)
    operator = operator_home(settings, home)
    store = release_store(settings.content, operator)
    pipeline = ReleasePipeline(operator, store, delta_bases=settings.delta_bases, expires_days=settings.release_expires_days)

    import shlex

    import pydantic

    from schemas.models import InstallSpec

    try:
        install = InstallSpec(handler=handler, target=target, command=shlex.split(command) if command else None,  # type: ignore[arg-type]
                              rollback=shlex.split(rollback_command) if rollback_command else None)
    except pydantic.ValidationError as exc:
        fail(f"install spec: {exc.errors()[0]['msg']}")

    if canary_percent and not staged:
        fail("--canary-percent only means something with --staged")
    import secrets

    from schemas.models import RolloutRule

    rollout = RolloutRule(canary_percent=canary_percent, salt=secrets.token_hex(8)) if staged else None
    try:
        fleet_versions = versions_of_class(settings.record.database, operator.path, device_class)
    except RecordUnavailable as exc:
        err.print(f"[yellow]warning:[/] {exc}; deltas are made from the latest versions released instead")
        fleet_versions = {}
    if fleet_versions:
        err.print(f"delta bases from fleet tracking: {dict(fleet_versions)}")

    async def go() -> None:
        async with store:
            built = await pipeline.build(device_class, version, file, target=target, summary=summary, install=install,
                                         fleet_versions=fleet_versions, rollout=rollout, release_url=url)
        if publish:
            async with operator_client(settings, "release") as client:
                await publish_release(client, operator, device_class, built.envelope,
                                      timestamp_expires=timedelta(hours=settings.timestamp_expires_hours))
        m = built.manifest
        if as_json:
            print(json.dumps({"device_class": device_class, "version": m.version, "sequence": m.sequence,
                              "artifact": m.artifact.model_dump(), "deltas": {k: v.model_dump() for k, v in m.deltas.items()},
                              "rollout": m.rollout.model_dump() if m.rollout else None, "published": publish}))
        else:
            make_console().print(f"released {device_class} {m.version} (sequence {m.sequence}): artifact {m.artifact.size} bytes "
                            f"{m.artifact.cid}; {len(m.deltas)} delta(s) "
                            + ", ".join(f"from {d.base_version}: {d.size} bytes" for d in m.deltas.values()))

    try:
        asyncio.run(go())
    except (ReleaseError, FileNotFoundError, ValueError, MqttError) as exc:
        fail(str(exc))
    except pydantic.ValidationError as exc:
        fail(f"release: {exc.errors()[0]['loc']}: {exc.errors()[0]['msg']}")


@app.command("timestamp")
def timestamp_cmd(
    config: ConfigOption = None,
    home: HomeOption = None,
    every: Annotated[Optional[float], typer.Option(help="re-sign and publish every this many seconds (e.g. 3600)")] = None,
    expires_hours: Annotated[Optional[float], typer.Option(help="lifetime of each timestamp in hours (default: settings key timestamp_expires_hours, else 4)")] = None,
    republish: Annotated[bool, typer.Option("--republish", help="with each timestamp, publish the root chain and every class's latest release again (retained): a broker that lost them in a crash serves them again")] = False,
    verbose: VerboseOption = False,
) -> None:
    """Sign and publish a fresh timestamp naming the latest release of every class.

    Devices refuse releases no fresh timestamp names and report `frozen` when the last one
    expires, so run this on a schedule (`--every 3600`) shorter than the lifetime. A broker that
    saves every few seconds (large fleets, docs/scale.md) loses what a crash catches unsaved:
    `--republish` publishes the roots and releases again with every timestamp.
    """
    import asyncio
    from services.operator.release import publish_everything_again, publish_timestamp
    from services.runtime.messaging import MqttError

    settings = operator_settings(config)
    operator = operator_home(settings, home)
    lifetime = timedelta(hours=expires_hours or settings.timestamp_expires_hours)
    if every is not None and every >= lifetime.total_seconds():
        fail(f"--every {every:.0f} s must be shorter than the timestamp lifetime ({lifetime.total_seconds():.0f} s)")
    setup_logging(verbose)

    async def main(stop: asyncio.Event) -> None:
        async with operator_client(settings, "timestamp") as client:
            while True:
                if republish:
                    version = await publish_everything_again(client, operator, timestamp_expires=lifetime)
                    err.print(f"published the root chain, timestamp v{version} (expires in {lifetime}) and the "
                              f"latest release of {len(operator.device_classes())} class(es)")
                else:
                    version = await publish_timestamp(client, operator, expires_in=lifetime)
                    err.print(f"published timestamp v{version}, expires in {lifetime}")
                if every is None:
                    return
                try:
                    await asyncio.wait_for(stop.wait(), timeout=every)
                    return
                except TimeoutError:
                    pass

    try:
        run_until_signal(main)
    except (MqttError, FileNotFoundError, ValueError) as exc:
        fail(str(exc))
