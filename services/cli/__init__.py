"""The `edgeswarm` command line."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
from datetime import timedelta
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

from schemas.models import Role
from services.cli.common import (
    PASSPHRASE_ENV, ConfigOption, JsonOption, err, fail, operator_client, operator_home, operator_settings,
    run_until_signal, setup_logging,
)
from services.cli.delta import delta_app
from services.cli.rollout import rollout_app
from services.runtime.settings import DeviceSettings, load_settings

app = typer.Typer(
    help="edgeswarm: secure peer-to-peer software updates for edge fleets.", no_args_is_help=True,
    pretty_exceptions_show_locals=False,  # locals can hold passphrases and keys
)
keys_app = typer.Typer(help="Signing keys and the fleet's root of trust.", no_args_is_help=True)
device_app = typer.Typer(help="Run the device agent.", no_args_is_help=True)
fleet_app = typer.Typer(help="What the fleet runs, from the devices' retained reports.", no_args_is_help=True)
root_app = typer.Typer(help="Root metadata: show, sign offline, commit, publish.", no_args_is_help=True)
pki_app = typer.Typer(help="The fleet's TLS certificates for the broker and its clients.", no_args_is_help=True)
broker_app = typer.Typer(help="MQTT brokers: run the embedded one, configure Mosquitto.", no_args_is_help=True,
                         invoke_without_command=True)
app.add_typer(pki_app, name="pki")
app.add_typer(keys_app, name="keys")
app.add_typer(root_app, name="root")
app.add_typer(device_app, name="device")
app.add_typer(fleet_app, name="fleet")
app.add_typer(delta_app, name="delta")
app.add_typer(rollout_app, name="rollout")

_logging = setup_logging
_operator = operator_settings
_home = operator_home
_operator_client = operator_client
_fail = fail


# -- keys ---------------------------------------------------------------------------------------


@keys_app.command("init")
def keys_init(
    config: ConfigOption = None,
    home: Annotated[Optional[Path], typer.Option(help="operator home (default from settings)")] = None,
    fleet: Annotated[Optional[str], typer.Option(help="fleet name (default from settings)")] = None,
    root_keys: Annotated[int, typer.Option(min=1, max=32)] = 1,
    root_threshold: Annotated[int, typer.Option(min=1, max=32)] = 1,
    release_keys: Annotated[int, typer.Option(min=1, max=32)] = 1,
    release_threshold: Annotated[int, typer.Option(min=1, max=32)] = 1,
    expires_days: Annotated[int, typer.Option(min=1, help="root metadata lifetime")] = 365,
    encrypt: Annotated[bool, typer.Option(help=f"seal key files with a passphrase (${PASSPHRASE_ENV} or a prompt)")] = False,
    as_json: JsonOption = False,
) -> None:
    """Generate root, release and timestamp keys (files 0600) and sign root metadata v1."""
    settings = _operator(config)
    operator = _home(settings, home)
    if encrypt and operator.passphrase is None:
        operator.passphrase = typer.prompt("passphrase for the key files", hide_input=True, confirmation_prompt=True)
    if not encrypt:
        operator.passphrase = None
    try:
        root = operator.init(
            fleet or settings.fleet, root_keys=root_keys, root_threshold=root_threshold,
            release_keys=release_keys, release_threshold=release_threshold, expires_days=expires_days,
        )
    except (FileExistsError, ValueError) as exc:
        _fail(str(exc))
    if as_json:
        print(json.dumps({"fleet": root.fleet, "root_version": root.version, "root_file": str(operator.root_file),
                          "roles": {r.value: {"keyids": k.keyids, "threshold": k.threshold} for r, k in root.roles.items()}}))
        return
    table = Table(title=f"fleet {root.fleet}: root v{root.version}, expires {root.expires:%Y-%m-%d}")
    for column in ("role", "threshold", "key ids"):
        table.add_column(column)
    for role, spec in root.roles.items():
        table.add_row(role.value, str(spec.threshold), "\n".join(k[:16] + "…" for k in spec.keyids))
    Console().print(table)
    Console().print(f"provision devices with [bold]{operator.root_file}[/]; private keys are in {operator.keys_dir}")


def _root_change(operator, proposed, offline: bool, as_json: bool) -> None:  # noqa: ANN001
    """Sign a proposed root with the local root keys and make it current, or leave it for offline signing."""
    from services.operator.home import RootChangeError

    envelope = operator.start_proposal(proposed)
    if not offline:
        envelope = operator.sign_with_local_root_keys(envelope)
        try:
            update = operator.commit_root(envelope.canonical_bytes())
        except RootChangeError as exc:
            operator.proposal_file.write_bytes(envelope.canonical_bytes())
            _report_root(operator, envelope, as_json, committed=False, why=str(exc))
            return
        _report_root(operator, envelope, as_json, committed=True, revoked=sorted(r.value for r in update.revoked_roles))
        return
    _report_root(operator, envelope, as_json, committed=False, why="--offline: sign it where the root keys are")


def _report_root(operator, envelope, as_json: bool, *, committed: bool, why: str = "", revoked: list[str] | None = None) -> None:  # noqa: ANN001
    from schemas.models import RootMetadata
    from services.runtime.trust import payload_bytes

    root = RootMetadata.model_validate_json(payload_bytes(envelope))
    if as_json:
        print(json.dumps({"version": root.version, "committed": committed, "signatures": len(envelope.signatures),
                          "proposal": None if committed else str(operator.proposal_file), "revoked_roles": revoked or [],
                          "reason": why or None}))
        return
    console = Console()
    if committed:
        console.print(f"root v{root.version} is current ({len(envelope.signatures)} signatures); keys removed from: "
                      f"{', '.join(revoked or []) or 'none'}. Publish it: [bold]edgeswarm root publish[/]")
    else:
        console.print(f"root v{root.version} proposed in [bold]{operator.proposal_file}[/] with "
                      f"{len(envelope.signatures)} signature(s); {why}\n"
                      f"sign it: edgeswarm root sign {operator.proposal_file} --key ROOT.key, then: edgeswarm root commit FILE")


@keys_app.command("rotate")
def keys_rotate(
    role: Annotated[Role, typer.Argument(help="root, release or timestamp")],
    config: ConfigOption = None,
    home: Annotated[Optional[Path], typer.Option(help="operator home (default from settings)")] = None,
    count: Annotated[Optional[int], typer.Option(min=1, max=32, help="number of new keys (default: as many as now)")] = None,
    threshold: Annotated[Optional[int], typer.Option(min=1, max=32, help="new threshold (default: unchanged)")] = None,
    offline: Annotated[bool, typer.Option(help="only write the unsigned proposal (root keys kept elsewhere)")] = False,
    as_json: JsonOption = False,
) -> None:
    """Replace every key of a role with new ones in root N+1, signed by old and new root keys."""
    from services.operator.home import RootChangeError

    operator = _home(_operator(config), home)
    try:
        _root_change(operator, operator.propose_rotation(role, count=count, threshold=threshold), offline, as_json)
    except (RootChangeError, FileNotFoundError) as exc:
        _fail(str(exc))


@keys_app.command("revoke")
def keys_revoke(
    keyid: Annotated[str, typer.Argument(help="key id (or a unique prefix) to remove from every role")],
    config: ConfigOption = None,
    home: Annotated[Optional[Path], typer.Option(help="operator home (default from settings)")] = None,
    offline: Annotated[bool, typer.Option(help="only write the unsigned proposal (root keys kept elsewhere)")] = False,
    as_json: JsonOption = False,
) -> None:
    """Remove a (compromised) key from root N+1; refused if a role would fall below its threshold."""
    from services.operator.home import RootChangeError

    operator = _home(_operator(config), home)
    try:
        _root_change(operator, operator.propose_revocation(keyid), offline, as_json)
    except (RootChangeError, FileNotFoundError) as exc:
        _fail(str(exc))


@keys_app.command("class-key")
def keys_class_key(
    device_class: Annotated[str, typer.Argument(help="device class whose releases become confidential")],
    config: ConfigOption = None,
    home: Annotated[Optional[Path], typer.Option(help="operator home (default from settings)")] = None,
) -> None:
    """Create the symmetric key that encrypts this class's artifacts and deltas from now on.

    Provision the same file on the class's devices (`content.class_key_file`): peers that cache
    and serve the content only ever hold ciphertext.
    """
    from schemas.topics import check_identifier
    from services.runtime.confidential import generate_class_key

    operator = _home(_operator(config), home)
    path = operator.class_key_file(check_identifier(device_class, "device class"))
    try:
        generate_class_key(path)
    except FileExistsError:
        _fail(f"{path} exists; a class key is never overwritten")
    Console().print(f"class key for {device_class} written to {path} (0600); releases of {device_class} are now encrypted")


@keys_app.command("swarm-key")
def keys_swarm_key(
    config: ConfigOption = None,
    home: Annotated[Optional[Path], typer.Option(help="operator home (default from settings)")] = None,
) -> None:
    """Create the fleet's private IPFS swarm key: nodes without it cannot connect to fleet nodes."""
    from services.runtime.content import generate_swarm_key

    operator = _home(_operator(config), home)
    try:
        generate_swarm_key(operator.swarm_key_file)
    except FileExistsError:
        _fail(f"{operator.swarm_key_file} exists; a swarm key is never overwritten")
    Console().print(f"swarm key written to {operator.swarm_key_file} (0600); give it to every device "
                    "(content.swarm_key_file) and restart the origin")


@root_app.command("show")
def root_show(
    config: ConfigOption = None,
    home: Annotated[Optional[Path], typer.Option(help="operator home (default from settings)")] = None,
    as_json: JsonOption = False,
) -> None:
    """The current root: version, expiry, keys and thresholds per role."""
    operator = _home(_operator(config), home)
    try:
        root = operator.root()
    except FileNotFoundError as exc:
        _fail(str(exc))
    if as_json:
        print(root.model_dump_json())
        return
    table = Table(title=f"fleet {root.fleet}: root v{root.version}, expires {root.expires:%Y-%m-%d}")
    for column in ("role", "threshold", "key ids"):
        table.add_column(column)
    for role, spec in root.roles.items():
        table.add_row(role.value, str(spec.threshold), "\n".join(k[:16] + "…" for k in spec.keyids))
    Console().print(table)


@root_app.command("sign")
def root_sign(
    file: Annotated[Path, typer.Argument(exists=True, dir_okay=False, help="proposed root (root-proposed.json)")],
    key: Annotated[list[Path], typer.Option("--key", exists=True, dir_okay=False, help="root key file; repeatable")],
) -> None:
    """Add signatures to a proposed root, e.g. on the offline machine that holds the root keys."""
    from services.runtime.keys import KeyLocked, SigningKey
    from services.operator.home import OperatorHome, RootChangeError
    from services.runtime.trust import TrustError, decode_envelope

    try:
        envelope = decode_envelope(file.read_bytes())
        keys = [SigningKey.load(path, os.environ.get(PASSPHRASE_ENV)) for path in key]
        signed = OperatorHome.add_signatures(envelope, keys)
    except (TrustError, KeyLocked, RootChangeError, PermissionError) as exc:
        _fail(str(exc))
    file.write_bytes(signed.canonical_bytes())
    Console().print(f"{file}: {len(signed.signatures)} signature(s)")


@root_app.command("commit")
def root_commit(
    file: Annotated[Path, typer.Argument(exists=True, dir_okay=False, help="signed root N+1")],
    config: ConfigOption = None,
    home: Annotated[Optional[Path], typer.Option(help="operator home (default from settings)")] = None,
) -> None:
    """Check a signed root N+1 exactly as devices will, and make it current."""
    from services.operator.home import RootChangeError

    operator = _home(_operator(config), home)
    try:
        update = operator.commit_root(file.read_bytes())
    except RootChangeError as exc:
        _fail(str(exc))
    Console().print(f"root v{update.root.version} is current. Publish it: edgeswarm root publish")


@root_app.command("publish")
def root_publish(
    config: ConfigOption = None,
    home: Annotated[Optional[Path], typer.Option(help="operator home (default from settings)")] = None,
) -> None:
    """Publish every root of the chain (retained) and a fresh timestamp made under the newest."""
    from services.runtime.messaging import MqttError
    from services.operator.release import publish_release, publish_timestamp, publish_trust

    settings = _operator(config)
    operator = _home(settings, home)

    async def go() -> dict[str, bytes]:
        async with _operator_client(settings, "root") as client:
            # In this order, which devices see in turn: the root that trusts the new keys, the
            # releases re-signed with them, then a timestamp (which makes devices re-check releases).
            await publish_trust(client, operator)
            resigned = operator.resign_latest_manifests()
            for device_class, envelope in resigned.items():
                await publish_release(client, settings.fleet, device_class, envelope)
            await publish_timestamp(client, operator, expires_in=timedelta(hours=settings.timestamp_expires_hours))
            return resigned

    try:
        resigned = asyncio.run(go())
    except (MqttError, FileNotFoundError, ValueError) as exc:
        _fail(str(exc))
    Console().print(f"published root chain up to v{operator.root().version} and a fresh timestamp"
                    + (f"; re-signed the latest release of {', '.join(resigned)} with the current release keys" if resigned else ""))


# -- release --------------------------------------------------------------------------------------


@app.command("release")
def release(
    device_class: Annotated[str, typer.Argument(help="device class, e.g. ipc-x86_64")],
    version: Annotated[str, typer.Argument(help="new version, e.g. 2.0.0")],
    file: Annotated[Path, typer.Argument(exists=True, dir_okay=False, readable=True, help="the full artifact")],
    config: ConfigOption = None,
    home: Annotated[Optional[Path], typer.Option(help="operator home (default from settings)")] = None,
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
    from services.runtime.content import HashOnlyStore
    from services.runtime.messaging import MqttError
    from services.operator.release import ReleaseError, ReleasePipeline, publish_release, publish_timestamp, publish_trust

    settings = _operator(config)
    operator = _home(settings, home)
    if settings.content.backend == "kubo-rpc":
        from services.runtime.content import KuboRpcStore

        store = KuboRpcStore(settings.content.rpc_api)  # the daemon keeps serving: no seed directory needed
    else:
        store = HashOnlyStore(operator.path / "cid-scratch", operator.seed_dir)
    pipeline = ReleasePipeline(operator, store, delta_bases=settings.delta_bases, expires_days=settings.release_expires_days)

    import shlex

    import pydantic

    from schemas.models import InstallSpec

    try:
        install = InstallSpec(handler=handler, target=target, command=shlex.split(command) if command else None,  # type: ignore[arg-type]
                              rollback=shlex.split(rollback_command) if rollback_command else None)
    except pydantic.ValidationError as exc:
        _fail(f"install spec: {exc.errors()[0]['msg']}")

    if canary_percent and not staged:
        _fail("--canary-percent only means something with --staged")
    import secrets

    from schemas.models import RolloutRule

    rollout = RolloutRule(canary_percent=canary_percent, salt=secrets.token_hex(8)) if staged else None
    fleet_versions = _fleet_versions(operator.path / "fleet.sqlite", device_class)
    if fleet_versions:
        err.print(f"delta bases from fleet tracking: {dict(fleet_versions)}")

    async def go() -> None:
        async with store:
            built = await pipeline.build(device_class, version, file, target=target, summary=summary, install=install,
                                         fleet_versions=fleet_versions, rollout=rollout, release_url=url)
        if publish:
            async with _operator_client(settings, "release") as client:
                await publish_trust(client, operator)
                # The timestamp first: a device must never see a release no fresh timestamp names.
                await publish_timestamp(client, operator, expires_in=timedelta(hours=settings.timestamp_expires_hours))
                await publish_release(client, built.manifest.fleet, device_class, built.envelope)
        m = built.manifest
        if as_json:
            print(json.dumps({"device_class": device_class, "version": m.version, "sequence": m.sequence,
                              "artifact": m.artifact.model_dump(), "deltas": {k: v.model_dump() for k, v in m.deltas.items()},
                              "rollout": m.rollout.model_dump() if m.rollout else None, "published": publish}))
        else:
            Console().print(f"released {device_class} {m.version} (sequence {m.sequence}): artifact {m.artifact.size} bytes "
                            f"{m.artifact.cid}; {len(m.deltas)} delta(s) "
                            + ", ".join(f"from {d.base_version}: {d.size} bytes" for d in m.deltas.values()))

    try:
        asyncio.run(go())
    except (ReleaseError, FileNotFoundError, ValueError, MqttError) as exc:
        _fail(str(exc))
    except pydantic.ValidationError as exc:
        _fail(f"release: {exc.errors()[0]['loc']}: {exc.errors()[0]['msg']}")


def _fleet_versions(path: Path, device_class: str) -> dict[str, int]:
    """How many tracked devices of the class run each version (empty without `fleet serve`)."""
    if not path.exists():
        return {}
    from collections import Counter

    from services.operator.fleet_store import FleetStore

    store = FleetStore(path)
    try:
        return dict(Counter(d.installed_version for d in store.devices()
                            if d.device_class == device_class and d.installed_version))
    finally:
        store.close()


@app.command("timestamp")
def timestamp_cmd(
    config: ConfigOption = None,
    home: Annotated[Optional[Path], typer.Option(help="operator home (default from settings)")] = None,
    every: Annotated[Optional[float], typer.Option(help="re-sign and publish every this many seconds (e.g. 3600)")] = None,
    expires_hours: Annotated[Optional[float], typer.Option(help="lifetime of each timestamp (default from settings)")] = None,
    verbose: bool = False,
) -> None:
    """Sign and publish a fresh timestamp naming the latest release of every class.

    Devices refuse releases no fresh timestamp names and report `frozen` when the last one
    expires, so run this on a schedule (`--every 3600`) shorter than the lifetime.
    """
    from services.runtime.messaging import MqttError
    from services.operator.release import publish_timestamp

    settings = _operator(config)
    operator = _home(settings, home)
    lifetime = timedelta(hours=expires_hours or settings.timestamp_expires_hours)
    if every is not None and every >= lifetime.total_seconds():
        _fail(f"--every {every:.0f} s must be shorter than the timestamp lifetime ({lifetime.total_seconds():.0f} s)")
    _logging(verbose)

    async def main(stop: asyncio.Event) -> None:
        async with _operator_client(settings, "timestamp") as client:
            while True:
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
        _run_until_signal(main)
    except (MqttError, FileNotFoundError, ValueError) as exc:
        _fail(str(exc))


# -- origin, broker, device -------------------------------------------------------------------------


_run_until_signal = run_until_signal


@app.command("origin")
def origin(
    config: ConfigOption = None,
    home: Annotated[Optional[Path], typer.Option(help="operator home (default from settings)")] = None,
    verbose: bool = False,
) -> None:
    """Run the origin IPFS node: serves every file `edgeswarm release` put in <home>/seed."""
    from services.runtime.content import EmbeddedKuboNode, KuboConfig, load_swarm_key, prepare_process_dir

    settings = _operator(config)
    operator = _home(settings, home)
    _logging(verbose)
    prepare_process_dir(operator.path / "origin")

    async def main(stop: asyncio.Event) -> None:
        swarm_key_file = settings.content.swarm_key_file or operator.swarm_key_file
        cfg = KuboConfig(repo=operator.path / "origin" / "ipfs", listen_host=settings.content.listen_host,
                         swarm_port=settings.content.swarm_port, peers=list(settings.content.peers),
                         swarm_key=load_swarm_key(swarm_key_file) if swarm_key_file.exists() else None,
                         routing=settings.content.routing, max_connections=settings.content.max_connections)
        async with EmbeddedKuboNode(cfg) as node:
            err.print(f"origin node {node.multiaddr}")
            # Devices list this address as a peer; scripts and tests read it from here.
            (operator.path / "origin" / "multiaddr").write_text(node.multiaddr + "\n")
            seeded: set[str] = set()
            while not stop.is_set():
                operator.seed_dir.mkdir(parents=True, exist_ok=True)
                for path in sorted(operator.seed_dir.iterdir()):
                    if path.name not in seeded:
                        cid = await node.add(path)
                        seeded.add(path.name)
                        logging.info("serving %s (%d bytes)", cid, path.stat().st_size)
                try:
                    await asyncio.wait_for(stop.wait(), timeout=2)
                except TimeoutError:
                    pass

    _run_until_signal(main)


app.add_typer(broker_app, name="broker")


@broker_app.callback()
def broker(
    ctx: typer.Context,
    host: Annotated[str, typer.Option(help="address to listen on")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port")] = 1883,
    verbose: bool = False,
) -> None:
    """Run the embedded MQTT broker (amqtt) until interrupted; `broker config` writes a Mosquitto setup."""
    if ctx.invoked_subcommand is not None:
        return
    from services.operator.broker import EmbeddedBroker

    _logging(verbose)

    async def main(stop: asyncio.Event) -> None:
        async with EmbeddedBroker(host, port):
            err.print(f"MQTT broker listening on {host}:{port}; Ctrl-C stops it")
            await stop.wait()

    _run_until_signal(main)


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
            _fail(f"--device {entry!r}: expected DEVICE_ID:CLASS")
        principals.append(DevicePrincipal(device_id, device_class))
    plan = BrokerPlan(fleet=fleet, directory=out.resolve(), host=host, port=port, devices=principals,
                      tls=pki is not None, mutual_tls=mutual_tls, bridge_sites=list(bridge_site))
    if bridge_to is not None:
        import tomllib

        from services.operator.mosquitto import Bridge

        if bridge_credentials is None:
            _fail("--bridge-to needs --bridge-credentials (from the central broker's credentials/ directory)")
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
        _fail(str(exc))
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
        _fail(str(exc))
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
    _logging(verbose)
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

    _run_until_signal(main)


async def _stop_when_orphaned(parent: int, stop: asyncio.Event) -> None:
    """Started by a demo or test that died without stopping us (e.g. SIGKILL): stop cleanly too."""
    while not stop.is_set():
        if os.getppid() != parent:
            logging.warning("parent process %d is gone; stopping", parent)
            stop.set()
            return
        await asyncio.sleep(1.0)


# -- fleet ------------------------------------------------------------------------------------------


@fleet_app.command("status")
def fleet_status(
    config: ConfigOption = None,
    wait: Annotated[float, typer.Option(help="seconds to collect retained reports")] = 1.5,
    as_json: JsonOption = False,
) -> None:
    """Every device's version and phase, grouped by device class."""
    from services.operator.fleet import FleetTracker
    from services.runtime.messaging import MqttError

    settings = _operator(config)
    tracker = FleetTracker(settings.fleet)

    async def go() -> None:
        async with _operator_client(settings, f"status-{os.getpid()}") as client:
            await tracker.subscribe(client)
            await tracker.follow(client, duration=wait)

    try:
        asyncio.run(go())
    except MqttError as exc:
        _fail(str(exc))
    if as_json:
        out = []
        for view in sorted(tracker.devices.values(), key=lambda v: v.device):
            entry = json.loads(view.state.model_dump_json()) if view.state else {"device": view.device}
            entry["online"] = view.online
            out.append(entry)
        print(json.dumps({"fleet": settings.fleet, "devices": out}))
        return
    console = Console()
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
    home: Annotated[Optional[Path], typer.Option(help="operator home (default from settings)")] = None,
    homeassistant: Annotated[Optional[bool], typer.Option("--homeassistant/--no-homeassistant", help="publish Home Assistant MQTT discovery (default from settings)")] = None,
    discovery_prefix: Annotated[Optional[str], typer.Option(help="Home Assistant's discovery prefix (default from settings: homeassistant)")] = None,
    verbose: bool = False,
) -> None:
    """Run the fleet service: tracking, staged rollouts, operator requests, Home Assistant.

    Records the fleet in <home>/fleet.sqlite, runs staged rollouts, answers operator requests on
    edgeswarm/<fleet>/ops/ and (with --homeassistant) shows every device in Home Assistant as an
    update entity.
    """
    from importlib.metadata import version as package_version

    from schemas import topics
    from services.operator.fleet_service import FleetService, OpsTokens
    from services.operator.fleet_store import FleetStore
    from services.operator.homeassistant import HomeAssistantBridge

    settings = _operator(config)
    operator = _home(settings, home)
    _logging(verbose)
    tokens = OpsTokens.load_or_create(operator.path / "tokens")
    bridge = None
    if homeassistant if homeassistant is not None else settings.homeassistant.enabled:
        try:
            bridge = HomeAssistantBridge(settings.fleet, discovery_prefix or settings.homeassistant.discovery_prefix,
                                         tokens.homeassistant, origin_version=package_version("edgeswarm"))
        except ValueError as exc:
            _fail(str(exc))
    store = FleetStore(operator.path / "fleet.sqlite")
    service = FleetService(settings.fleet, store, tokens, bridge=bridge)

    async def main(stop: asyncio.Event) -> None:
        # A persistent session: reports sent while this service was down are queued for it.
        async with _operator_client(settings, "fleet-service", persistent=True) as client:
            err.print(f"fleet service for {settings.fleet}: recording in {operator.path / 'fleet.sqlite'}, "
                      f"operator requests on {topics.ops_wildcard(settings.fleet)}"
                      + (f", Home Assistant discovery under {bridge.prefix}/" if bridge else ""))
            await service.run(client, stop)

    try:
        _run_until_signal(main)
    finally:
        store.close()


def _device_request(action: str, device: str, config: Path | None, home: Path | None, as_json: bool) -> None:
    from schemas import topics
    from schemas.ops import DeviceRequest
    from services.cli.rollout import operator_token, report, send

    settings = _operator(config)
    try:
        topic = topics.ops_device_topic(settings.fleet, device, action)
    except ValueError as exc:
        _fail(str(exc))
        return
    report(send(settings, topic, DeviceRequest(token=operator_token(settings, home))), as_json)


@fleet_app.command("install")
def fleet_install(
    device: Annotated[str, typer.Argument(help="device id")],
    config: ConfigOption = None,
    home: Annotated[Optional[Path], typer.Option(help="operator home (default from settings)")] = None,
    as_json: JsonOption = False,
) -> None:
    """Install its class's latest release on one device now (refused while that rollout is paused or aborted)."""
    _device_request("install", device, config, home, as_json)


@fleet_app.command("check")
def fleet_check(
    device: Annotated[str, typer.Argument(help="device id")],
    config: ConfigOption = None,
    home: Annotated[Optional[Path], typer.Option(help="operator home (default from settings)")] = None,
    as_json: JsonOption = False,
) -> None:
    """Ask one device to evaluate its class's release again and report."""
    _device_request("check", device, config, home, as_json)


@fleet_app.command("retire")
def fleet_retire(
    device: Annotated[str, typer.Argument(help="device id")],
    config: ConfigOption = None,
    home: Annotated[Optional[Path], typer.Option(help="operator home (default from settings)")] = None,
    as_json: JsonOption = False,
) -> None:
    """Forget a decommissioned device: its retained reports and its Home Assistant entity are removed."""
    _device_request("retire", device, config, home, as_json)


@fleet_app.command("show")
def fleet_show(
    device: Annotated[str, typer.Argument(help="device id")],
    config: ConfigOption = None,
    home: Annotated[Optional[Path], typer.Option(help="operator home (default from settings)")] = None,
    as_json: JsonOption = False,
) -> None:
    """One device: its latest state and every update attempt (recorded by `edgeswarm fleet serve`)."""
    from dataclasses import asdict

    from services.operator.fleet_store import FleetStore

    operator = _home(_operator(config), home)
    path = operator.path / "fleet.sqlite"
    if not path.exists():
        _fail(f"{path} does not exist: run `edgeswarm fleet serve` to record the fleet")
    store = FleetStore(path)
    rows = [r for r in store.devices() if r.device == device]
    if not rows:
        _fail(f"no device {device!r} has reported")
    attempts = store.attempts(device)
    store.close()
    if as_json:
        print(json.dumps({"device": asdict(rows[0]), "attempts": [asdict(a) for a in attempts]}))
        return
    row = rows[0]
    console = Console()
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


# -- demo -------------------------------------------------------------------------------------------


@app.command("demo")
def demo(
    devices: Annotated[int, typer.Option(min=2, max=64, help="number of simulated devices (two classes)")] = 6,
    timeout: Annotated[float, typer.Option(help="seconds to wait for the fleet")] = 300.0,
    keep: Annotated[bool, typer.Option(help="keep the work directory (logs, state) for inspection")] = False,
    as_json: JsonOption = False,
    verbose: bool = False,
) -> None:
    """Run a whole fleet on this machine: broker, origin, N devices; release v2; show who got what."""
    from services.demo.run import DemoOptions, print_summary, run_demo

    console = Console(stderr=as_json)
    _logging(verbose, console if not as_json else err)
    if not verbose:
        logging.getLogger().setLevel(logging.WARNING)
    try:
        result = asyncio.run(run_demo(DemoOptions(devices=devices, timeout=timeout, keep=keep), console,
                                      live_display=not as_json and console.is_terminal))
    except KeyboardInterrupt:
        err.print("interrupted: every process stopped and the work directory removed")
        raise typer.Exit(130) from None
    except RuntimeError as exc:
        _fail(str(exc))
    if as_json:
        print(json.dumps(result.to_json()))
    else:
        print_summary(result, console)
        if keep:
            console.print(f"work directory kept: {result.workdir}")
    raise typer.Exit(0 if result.ok else 1)


def main() -> None:
    from services.runtime.keys import KeyLocked

    try:
        app()
    except KeyLocked as exc:
        err.print(f"[bold red]error:[/] {exc}; set ${PASSPHRASE_ENV} to the key files' passphrase")
        sys.exit(2)
    except PermissionError as exc:
        err.print(f"[bold red]error:[/] {exc}")
        sys.exit(2)

