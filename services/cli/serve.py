"""Long-running parts and their set-up: `origin`, `broker` (embedded / Mosquitto config), `pki`, `device run`."""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

from services.cli.common import (
    ConfigOption, err, fail, operator_home, operator_settings,
    run_until_signal, setup_logging,
)
from services.runtime.settings import DeviceSettings, load_settings

device_app = typer.Typer(help="Run the device agent.", no_args_is_help=True)
pki_app = typer.Typer(help="The fleet's TLS certificates for the broker and its clients.", no_args_is_help=True)
broker_app = typer.Typer(help="MQTT brokers: run the embedded one, configure Mosquitto.", no_args_is_help=True,
                         invoke_without_command=True)
app = typer.Typer()  # top-level commands: services.cli registers them


# -- origin, broker, device -------------------------------------------------------------------------




@app.command("origin")
def origin(
    config: ConfigOption = None,
    home: Annotated[Optional[Path], typer.Option(help="operator home (default from settings)")] = None,
    verbose: bool = False,
) -> None:
    """Run the origin IPFS node: serves every file `edgeswarm release` put in <home>/seed."""
    from services.operator.origin import origin_config, serve_origin
    from services.runtime.content import prepare_process_dir

    settings = operator_settings(config)
    operator = operator_home(settings, home)
    setup_logging(verbose)
    prepare_process_dir(operator.path / "origin")
    node_config = origin_config(settings, operator)

    async def main(stop: asyncio.Event) -> None:
        await serve_origin(node_config, operator.seed_dir, operator.path / "origin" / "multiaddr", stop)

    run_until_signal(main)




@broker_app.callback()
def broker(
    ctx: typer.Context,
    host: Annotated[str, typer.Option(help="address to listen on")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port; 0: any free one (see --port-file)")] = 1883,
    port_file: Annotated[Optional[Path], typer.Option(help="write the port it listens on to this file once it does")] = None,
    verbose: bool = False,
) -> None:
    """Run the embedded MQTT broker (amqtt) until interrupted; `broker config` writes a Mosquitto setup."""
    if ctx.invoked_subcommand is not None:
        return
    from services.operator.broker import EmbeddedBroker
    from services.runtime.files import atomic_write

    setup_logging(verbose)

    async def main(stop: asyncio.Event) -> None:
        async with EmbeddedBroker(host, port) as running:
            if port_file is not None:
                atomic_write(port_file, f"{running.port}\n".encode())
            err.print(f"MQTT broker listening on {host}:{running.port}; Ctrl-C stops it")
            await stop.wait()

    run_until_signal(main)


@broker_app.command("config")
def broker_config(
    out: Annotated[Path, typer.Option(help="directory for mosquitto.conf, passwd, acl, credentials/")],
    fleet: Annotated[str, typer.Option(help="fleet name")],
    device: Annotated[list[str], typer.Option(help="DEVICE_ID:CLASS, repeatable: who may connect, and what they read")] = [],  # noqa: B006
    host: Annotated[str, typer.Option(help="listener address")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="listener port")] = 8883,
    pki: Annotated[Optional[Path], typer.Option(help="directory of `edgeswarm pki init` (TLS)")] = None,
    mutual_tls: Annotated[bool, typer.Option("--mutual-tls", help="require client certificates (CN = username)")] = False,
    owner: Annotated[Optional[str], typer.Option(help="chown the broker's files to this user (as root)")] = "mosquitto",
    bridge_site: Annotated[list[str], typer.Option(help="central broker: let this site's broker bridge in; repeatable")] = [],  # noqa: B006
    bridge_to: Annotated[Optional[str], typer.Option(help="site broker: bridge to the central broker at HOST:PORT")] = None,
    bridge_credentials: Annotated[Optional[Path], typer.Option(help="site broker: the central's credentials/edgeswarm-bridge-<site>.toml")] = None,
) -> None:
    """Write a locked-down Mosquitto configuration: TLS, per-device credentials and ACLs.

    Run the broker with `mosquitto -c OUT/mosquitto.conf`; each principal's [mqtt] settings
    (username, password, CA) are in OUT/credentials/<principal>.toml.
    """
    from services.operator.mosquitto import BrokerPlan, DevicePrincipal, hand_over, write_config
    from services.operator.pki import Pki

    principals = []
    for entry in device:
        device_id, sep, device_class = entry.partition(":")
        if not sep:
            fail(f"--device {entry!r}: expected DEVICE_ID:CLASS")
        principals.append(DevicePrincipal(device_id, device_class))
    plan = BrokerPlan(fleet=fleet, directory=out.resolve(), host=host, port=port, devices=principals,
                      tls=pki is not None, mutual_tls=mutual_tls, bridge_sites=list(bridge_site))
    if bridge_to is not None:
        import tomllib

        from services.operator.mosquitto import Bridge

        if bridge_credentials is None:
            fail("--bridge-to needs --bridge-credentials (from the central broker's credentials/ directory)")
        remote = tomllib.loads(bridge_credentials.read_text())["mqtt"]
        central_host, _, central_port = bridge_to.rpartition(":")
        plan.bridge = Bridge(name=remote["username"].removeprefix("edgeswarm-bridge-"), host=central_host,
                             port=int(central_port), username=remote["username"], password=remote["password"],
                             ca_file=Path(remote["ca_file"]) if remote.get("ca_file") else None)
    if pki is not None:
        bundle = Pki(pki.resolve())
        plan.ca_file, plan.cert_file, plan.key_file = bundle.ca_cert, bundle.server_cert, bundle.server_key
    try:
        write_config(plan)
    except ValueError as exc:
        fail(str(exc))
    if owner and os.geteuid() == 0:
        hand_over(plan.directory, owner)
    Console().print(f"wrote {plan.config_file}; run: mosquitto -c {plan.config_file}")


@pki_app.command("init")
def pki_init(
    out: Annotated[Path, typer.Option(help="directory for the CA and the broker's certificate")],
    fleet: Annotated[str, typer.Option(help="fleet name (in the CA's name)")],
    host: Annotated[list[str], typer.Option(help="broker host name or IP for its certificate; repeatable")] = ["localhost", "127.0.0.1"],  # noqa: B006
) -> None:
    """Create the fleet CA (EC P-256) and a certificate for the broker."""
    from services.operator.pki import Pki

    try:
        Pki(out).init(fleet, host)
    except FileExistsError as exc:
        fail(str(exc))
    Console().print(f"CA {out / 'ca.crt'} and broker certificate for {', '.join(host)} written; keys are 0600")


@pki_app.command("client")
def pki_client(
    name: Annotated[str, typer.Argument(help="device id or principal: becomes the certificate's CN (the MQTT username)")],
    out: Annotated[Path, typer.Option(help="directory of `edgeswarm pki init`")],
) -> None:
    """Issue a client certificate for mutual TLS."""
    from services.operator.pki import Pki

    cert, key = Pki(out).issue_client(name)
    Console().print(f"{cert} and {key} written")


@device_app.command("run")
def device_run(
    config: Annotated[Path, typer.Option("--config", "-c", exists=True, dir_okay=False, help="device settings (TOML)")],
    verbose: bool = False,
) -> None:
    """Run the device agent: listen for signed releases, fetch, verify, patch, install, report."""
    # The one edge from services to device_client: the command line is where the parts are composed.
    from device_client.agent import DeviceAgent
    from services.runtime.content import prepare_process_dir
    from services.demo.processes import PARENT_ENV

    settings = load_settings(DeviceSettings, config)
    setup_logging(verbose)
    prepare_process_dir(settings.state_dir)
    agent = DeviceAgent(settings)

    async def main(stop: asyncio.Event) -> None:
        parent = os.environ.get(PARENT_ENV)
        watcher = asyncio.ensure_future(_stop_when_orphaned(int(parent), stop)) if parent else None
        try:
            await agent.run(stop)
        finally:
            if watcher is not None:
                watcher.cancel()

    run_until_signal(main)


async def _stop_when_orphaned(parent: int, stop: asyncio.Event) -> None:
    """Started by a demo or test that died without stopping us (e.g. SIGKILL): stop cleanly too."""
    while not stop.is_set():
        if os.getppid() != parent:
            logging.warning("parent process %d is gone; stopping", parent)
            stop.set()
            return
        await asyncio.sleep(1.0)
