"""Long-running parts and their set-up: `origin`, `broker` (embedded / Mosquitto config), `pki`, `device run`."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import typer

from services.cli.common import (
    ConfigOption,
    HomeOption,
    VerboseOption,
    err,
    fail,
    make_console,
    operator_home,
    operator_settings,
    run_until_signal,
    setup_logging,
)

if TYPE_CHECKING:  # asyncio loads when a command runs, not for --help
    import asyncio

device_app = typer.Typer(help="Run the device agent.", no_args_is_help=True)
pki_app = typer.Typer(help="The fleet's TLS certificates for the broker and its clients.", no_args_is_help=True)
broker_app = typer.Typer(help="MQTT brokers: run the embedded one, configure Mosquitto.", no_args_is_help=True)
app = typer.Typer()  # top-level commands: services.cli registers them


# -- origin, broker, device -------------------------------------------------------------------------




@app.command("origin")
def origin(
    config: ConfigOption = None,
    home: HomeOption = None,
    verbose: VerboseOption = False,
) -> None:
    """Run the origin IPFS node: serves every file `edgeswarm release` put in <home>/seed."""
    from services.operator.origin import home_documents, origin_config, serve_origin
    from services.runtime.content import prepare_process_dir

    settings = operator_settings(config)
    operator = operator_home(settings, home)
    setup_logging(verbose)
    prepare_process_dir(operator.path / "origin")
    node_config = origin_config(settings, operator)

    async def main(stop: asyncio.Event) -> None:
        fleet = operator.root().fleet if settings.content.gossip and operator.root_file.exists() else None
        await serve_origin(node_config, operator.seed_dir, operator.path / "origin" / "multiaddr", stop,
                           broker_host=settings.mqtt.host,
                           documents=home_documents(operator, fleet) if fleet is not None else None,
                           fleet=fleet, gossip_interval=settings.content.gossip_interval)

    run_until_signal(main)




@broker_app.command("run")
def broker_run(
    host: Annotated[str, typer.Option(help="address to listen on")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port; 0: any free one (see --port-file)")] = 1883,
    port_file: Annotated[Optional[Path], typer.Option(help="write the port it listens on to this file once it does")] = None,
    verbose: VerboseOption = False,
) -> None:
    """Run the embedded MQTT broker (amqtt, no TLS or passwords: for demos, tests and one trusted LAN)."""
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
    fleet: Annotated[Optional[str], typer.Option(help="fleet name (default: settings key fleet of --config)")] = None,
    config: ConfigOption = None,
    device: Annotated[list[str], typer.Option(help="DEVICE_ID:CLASS, repeatable: who may connect, and what they read")] = [],  # noqa: B006
    host: Annotated[str, typer.Option(help="listener address (0.0.0.0: every interface)")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="listener port")] = 8883,
    local_port: Annotated[Optional[int], typer.Option(help="loopback listener for the release and operator logins of services on this host (default: --port + 1; 0: none)")] = None,
    public_host: Annotated[Optional[str], typer.Option(help="the name clients dial, written into their credentials; with --pki one of its --host names (default: the only non-loopback name on the certificate, else --host)")] = None,
    pki: Annotated[Optional[Path], typer.Option(help="directory of `edgeswarm pki init` (TLS)")] = None,
    mutual_tls: Annotated[bool, typer.Option("--mutual-tls", help="require client certificates (CN = username)")] = False,
    owner: Annotated[Optional[str], typer.Option(help="chown the broker's files to this user (as root)")] = "mosquitto",
    bridge_site: Annotated[list[str], typer.Option(help="central broker: let this site's broker bridge in; repeatable")] = [],  # noqa: B006
    bridge_to: Annotated[Optional[str], typer.Option(help="site broker: bridge to the central broker at HOST:PORT")] = None,
    bridge_credentials: Annotated[Optional[Path], typer.Option(help="site broker: the central's credentials/edgeswarm-bridge-<site>.toml")] = None,
    autosave: Annotated[Optional[int], typer.Option(min=0, help="seconds between saves of the broker's database, 0: after every change (default: after every change up to 100 devices, then every 1 s, 1 s more per 2,000 devices; docs/scale.md)")] = None,
) -> None:
    """Write a locked-down Mosquitto configuration: TLS, per-device credentials and ACLs.

    Run the broker with `mosquitto -c OUT/mosquitto.conf`; each principal's [mqtt] settings
    (host, port, username, password, CA) are in OUT/credentials/<principal>.toml. Run again on the
    same OUT, it keeps every password and every device it already had and adds the --device ones;
    `broker add-device` and `broker remove-device` change only the device list.
    """
    from services.operator.mosquitto import PLAN_FILE, BrokerPlan, load_plan
    from services.operator.pki import Pki

    if fleet is None:
        if config is None:
            fail("give --fleet, or --config with the fleet's settings file")
        fleet = operator_settings(config).fleet
    kept = _plan_or_fail(out, load_plan).devices if (out / PLAN_FILE).exists() else []
    local = port + 1 if local_port is None else local_port or None
    plan = BrokerPlan(fleet=fleet, directory=out.resolve(), host=host, port=port, public_host=public_host, local_port=local,
                      devices=_merge_devices(kept, device), tls=pki is not None, mutual_tls=mutual_tls,
                      bridge_sites=list(bridge_site), autosave_seconds=autosave)
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
        names = bundle.server_names() if bundle.server_cert.exists() else []
        if plan.public_host is None and host in ("0.0.0.0", "::"):
            outside = [n for n in names if n not in ("localhost", "127.0.0.1", "::1")]
            if len(outside) != 1:
                fail(f"the broker listens on every interface: give --public-host, the name devices dial "
                     f"(one of the certificate's: {', '.join(names)})")
            plan.public_host = outside[0]
        if names and plan.dial_host_or_none() not in (None, *names):
            fail(f"clients would dial {plan.dial_host_or_none()}, which is not on the broker's certificate "
                 f"({', '.join(names)}): give --public-host one of those, or add it with `pki init --host`")
    elif host not in ("127.0.0.1", "localhost", "::1"):
        err.print(f"[yellow]warning:[/] no --pki: the listener on {host}:{port} is plaintext, and every password "
                  "crosses the network readable; use --pki (edgeswarm pki init) for anything beyond one host")
    _write_broker(plan, owner, kept=len(kept))


def _merge_devices(kept: list, entries: list[str]) -> list:
    from services.operator.mosquitto import DevicePrincipal

    devices = {d.device_id: d for d in kept}
    for entry in entries:
        device_id, sep, device_class = entry.partition(":")
        if not sep or not device_id or not device_class:
            fail(f"--device {entry!r}: expected DEVICE_ID:CLASS")
        devices[device_id] = DevicePrincipal(device_id, device_class)
    return list(devices.values())


def _write_broker(plan, owner: str | None, *, kept: int = 0) -> None:  # noqa: ANN001
    from services.operator.mosquitto import hand_over, write_config

    try:
        write_config(plan)
    except ValueError as exc:
        fail(str(exc))
    if owner and os.geteuid() == 0:
        hand_over(plan.directory, owner)
    devices = ", ".join(d.device_id for d in plan.devices) or "none"
    make_console().print(f"wrote {plan.config_file} (devices: {devices}); clients dial {plan.dial_host}:{plan.port}\n"
                    f"run: mosquitto -c {plan.config_file}   (running already: reload it, e.g. systemctl reload "
                    "edgeswarm-mosquitto or kill -HUP its PID)")


@broker_app.command("add-device")
def broker_add_device(
    out: Annotated[Path, typer.Argument(help="the broker directory `broker config` wrote")],
    device: Annotated[list[str], typer.Argument(help="DEVICE_ID:CLASS, one or more")],
    owner: Annotated[Optional[str], typer.Option(help="chown the broker's files to this user (as root)")] = "mosquitto",
) -> None:
    """Let devices connect: their credentials are written; nobody else's password changes."""
    from services.operator.mosquitto import load_plan

    plan = _plan_or_fail(out, load_plan)
    plan.devices = _merge_devices(plan.devices, device)
    _write_broker(plan, owner)


@broker_app.command("remove-device")
def broker_remove_device(
    out: Annotated[Path, typer.Argument(help="the broker directory `broker config` wrote")],
    device_id: Annotated[list[str], typer.Argument(help="DEVICE_ID, one or more")],
    owner: Annotated[Optional[str], typer.Option(help="chown the broker's files to this user (as root)")] = "mosquitto",
) -> None:
    """Stop devices from connecting: their credentials and ACL entries go; restart the broker to cut a
    session it still holds."""
    from services.operator.mosquitto import load_plan

    plan = _plan_or_fail(out, load_plan)
    unknown = sorted(set(device_id) - {d.device_id for d in plan.devices})
    if unknown:
        fail(f"not in {out}: {', '.join(unknown)}")
    plan.devices = [d for d in plan.devices if d.device_id not in device_id]
    _write_broker(plan, owner)


def _plan_or_fail(out: Path, load_plan):  # noqa: ANN001, ANN202
    try:
        return load_plan(out.resolve())
    except (FileNotFoundError, ValueError) as exc:
        fail(str(exc))


@pki_app.command("init")
def pki_init(
    out: Annotated[Path, typer.Option(help="directory for the CA and the broker's certificate")],
    fleet: Annotated[Optional[str], typer.Option(help="fleet name, in the CA's name (default: settings key fleet of --config)")] = None,
    config: ConfigOption = None,
    host: Annotated[list[str], typer.Option(help="broker host name or IP for its certificate; repeatable")] = ["localhost", "127.0.0.1"],  # noqa: B006
) -> None:
    """Create the fleet CA (EC P-256) and a certificate for the broker, naming every --host clients dial."""
    from services.operator.pki import Pki

    if fleet is None:
        if config is None:
            fail("give --fleet, or --config with the fleet's settings file")
        fleet = operator_settings(config).fleet
    try:
        Pki(out).init(fleet, host)
    except FileExistsError as exc:
        fail(str(exc))
    make_console().print(f"CA {out / 'ca.crt'} and broker certificate for {', '.join(host)} written; keys are 0600")


@pki_app.command("client")
def pki_client(
    name: Annotated[str, typer.Argument(help="device id or principal: becomes the certificate's CN (the MQTT username)")],
    out: Annotated[Path, typer.Option(help="directory of `edgeswarm pki init`")],
) -> None:
    """Issue a client certificate for mutual TLS."""
    from services.operator.pki import Pki

    cert, key = Pki(out).issue_client(name)
    make_console().print(f"{cert} and {key} written")


@device_app.command("run")
def device_run(
    config: Annotated[Path, typer.Option("--config", "-c", exists=True, dir_okay=False, help="device settings (TOML)")],
    verbose: VerboseOption = False,
) -> None:
    """Run the device agent: listen for signed releases, fetch, verify, patch, install, report."""
    import asyncio
    # The one edge from services to device_client: the command line is where the parts are composed.
    from device_client.agent import DeviceAgent
    from services.demo.processes import PARENT_ENV
    from services.runtime.content import prepare_process_dir, use_go_gc_percent
    from services.runtime.settings import DeviceSettings, load_settings

    settings = load_settings(DeviceSettings, config)
    if settings.content.backend == "embedded":
        use_go_gc_percent(settings.content.go_gc_percent)  # (may start this process again, before anything else)
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


@device_app.command("config")
def device_config(
    device_id: Annotated[str, typer.Argument(help="the device's id (its broker username)")],
    device_class: Annotated[str, typer.Argument(help="its class: which releases it installs")],
    out: Annotated[Path, typer.Option(help="directory for the bundle: copy it to the device as --device-dir")],
    credentials: Annotated[Optional[Path], typer.Option(help="its login from `broker config` (default: BROKER_DIR/credentials/DEVICE_ID.toml with --broker-dir)")] = None,
    broker_dir: Annotated[Optional[Path], typer.Option(help="the directory `broker config` wrote")] = None,
    config: ConfigOption = None,
    home: HomeOption = None,
    device_dir: Annotated[str, typer.Option(help="where the bundle lives on the device")] = "/etc/edgeswarm",
    install_target: Annotated[str, typer.Option(help="the file the device runs (must match releases' --target)")] = "/opt/edgeswarm/firmware.img",
    initial_version: Annotated[str, typer.Option(help="the version that file holds now")] = "0",
    handler: Annotated[list[str], typer.Option(help="install handlers the device accepts (file, ab, command); repeatable")] = ["file", "ab"],  # noqa: B006
    new_identity: Annotated[bool, typer.Option(help="give the device a new identity key, replacing the one registered for it (reports signed by the old key are then refused)")] = False,
) -> None:
    """Write a device's provisioning bundle: device.toml (0600), the root of trust, the broker's CA and
    the device's identity key (identity.key, 0600), whose public half is registered in <home>/identities
    so the fleet service believes the device's reports when peers carry them. Written again, the bundle
    keeps the key it holds.

    The origin must be running (its address goes into device.toml). Copy the bundle to the device
    as DEVICE_DIR and start `edgeswarm device run --config DEVICE_DIR/device.toml`.
    """
    from services.operator.device_bundle import BundleError, DeviceBundle, write_bundle
    from services.operator.identities import IdentityConflict

    settings = operator_settings(config)
    operator = operator_home(settings, home)
    if credentials is None:
        if broker_dir is None:
            fail("give --credentials FILE, or --broker-dir with the directory of `broker config`")
        credentials = broker_dir / "credentials" / f"{device_id}.toml"
    bundle = DeviceBundle(device_id=device_id, device_class=device_class, fleet=settings.fleet,
                          root_file=operator.root_file, credentials_file=credentials,
                          origin_address_file=operator.path / "origin" / "multiaddr", device_dir=device_dir.rstrip("/"),
                          install_target=install_target, initial_version=initial_version, handlers=tuple(handler),
                          identities_dir=operator.identities_dir, new_identity=new_identity)
    try:
        written = write_bundle(bundle, out)
    except (BundleError, IdentityConflict, ValueError, OSError) as exc:
        fail(str(exc))
    make_console().print(f"wrote {', '.join(str(p) for p in written)}; copy {out}/ to {device_id} as {device_dir}/")


async def _stop_when_orphaned(parent: int, stop: asyncio.Event) -> None:
    """Started by a demo or test that died without stopping us (e.g. SIGKILL): stop cleanly too."""
    import asyncio

    while not stop.is_set():
        if os.getppid() != parent:
            logging.warning("parent process %d is gone; stopping", parent)
            stop.set()
            return
        await asyncio.sleep(1.0)
