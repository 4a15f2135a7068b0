"""`edgeswarm keys` and `edgeswarm root`: signing keys and the root of trust (parse, call services.operator.home, render)."""

from __future__ import annotations

import json
import os
from datetime import timedelta
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from schemas.roles import Role
from services.cli.common import (
    PASSPHRASE_ENV,
    ConfigOption,
    HomeOption,
    JsonOption,
    fail,
    make_console,
    operator_client,
    operator_home,
    operator_settings,
)

keys_app = typer.Typer(help="Signing keys and the fleet's root of trust.", no_args_is_help=True)
root_app = typer.Typer(help="Root metadata: show, sign offline, commit, publish.", no_args_is_help=True)


# -- keys ---------------------------------------------------------------------------------------


@keys_app.command("init")
def keys_init(
    config: ConfigOption = None,
    home: HomeOption = None,
    fleet: Annotated[Optional[str], typer.Option(help="fleet name (default: settings key fleet)")] = None,
    root_keys: Annotated[int, typer.Option(min=1, max=32, help="root keys to generate (keep them offline)")] = 1,
    root_threshold: Annotated[int, typer.Option(min=1, max=32, help="root signatures a new root needs")] = 1,
    release_keys: Annotated[int, typer.Option(min=1, max=32, help="release keys to generate")] = 1,
    release_threshold: Annotated[int, typer.Option(min=1, max=32, help="release signatures a release needs")] = 1,
    expires_days: Annotated[int, typer.Option(min=1, help="root metadata lifetime in days")] = 365,
    encrypt: Annotated[bool, typer.Option(help=f"seal key files with a passphrase (${PASSPHRASE_ENV} or a prompt)")] = False,
    as_json: JsonOption = False,
) -> None:
    """Generate root, release and timestamp keys (files 0600) and sign root metadata v1."""
    settings = operator_settings(config)
    operator = operator_home(settings, home)
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
        fail(str(exc))
    if as_json:
        print(json.dumps({"fleet": root.fleet, "root_version": root.version, "root_file": str(operator.root_file),
                          "roles": {r.value: {"keyids": k.keyids, "threshold": k.threshold} for r, k in root.roles.items()}}))
        return
    table = Table(title=f"fleet {root.fleet}: root v{root.version}, expires {root.expires:%Y-%m-%d}")
    for column in ("role", "threshold", "key ids"):
        table.add_column(column)
    for role, spec in root.roles.items():
        table.add_row(role.value, str(spec.threshold), "\n".join(k[:16] + "…" for k in spec.keyids))
    make_console().print(table)
    make_console().print(f"provision devices with [bold]{operator.root_file}[/]; private keys are in {operator.keys_dir}")


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
    console = make_console()
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
    home: HomeOption = None,
    count: Annotated[Optional[int], typer.Option(min=1, max=32, help="number of new keys (default: as many as now)")] = None,
    threshold: Annotated[Optional[int], typer.Option(min=1, max=32, help="new threshold (default: unchanged)")] = None,
    offline: Annotated[bool, typer.Option(help="only write the unsigned proposal (root keys kept elsewhere)")] = False,
    as_json: JsonOption = False,
) -> None:
    """Replace every key of a role with new ones in root N+1, signed by old and new root keys."""
    from services.operator.home import RootChangeError

    operator = operator_home(operator_settings(config), home)
    try:
        _root_change(operator, operator.propose_rotation(role, count=count, threshold=threshold), offline, as_json)
    except (RootChangeError, FileNotFoundError) as exc:
        fail(str(exc))


@keys_app.command("revoke")
def keys_revoke(
    keyid: Annotated[str, typer.Argument(help="key id (or a unique prefix) to remove from every role")],
    config: ConfigOption = None,
    home: HomeOption = None,
    offline: Annotated[bool, typer.Option(help="only write the unsigned proposal (root keys kept elsewhere)")] = False,
    as_json: JsonOption = False,
) -> None:
    """Remove a (compromised) key from root N+1; refused if a role would fall below its threshold."""
    from services.operator.home import RootChangeError

    operator = operator_home(operator_settings(config), home)
    try:
        _root_change(operator, operator.propose_revocation(keyid), offline, as_json)
    except (RootChangeError, FileNotFoundError) as exc:
        fail(str(exc))


@keys_app.command("class-key")
def keys_class_key(
    device_class: Annotated[str, typer.Argument(help="device class whose releases become confidential")],
    config: ConfigOption = None,
    home: HomeOption = None,
) -> None:
    """Create the symmetric key that encrypts this class's artifacts and deltas from now on.

    Provision the same file on the class's devices (`content.class_key_file`): peers that cache
    and serve the content only ever hold ciphertext.
    """
    from schemas.topics import check_identifier
    from services.runtime.confidential import generate_class_key

    operator = operator_home(operator_settings(config), home)
    path = operator.class_key_file(check_identifier(device_class, "device class"))
    try:
        generate_class_key(path)
    except FileExistsError:
        fail(f"{path} exists; a class key is never overwritten")
    make_console().print(f"class key for {device_class} written to {path} (0600); releases of {device_class} are now encrypted")


@keys_app.command("swarm-key")
def keys_swarm_key(
    config: ConfigOption = None,
    home: HomeOption = None,
) -> None:
    """Create the fleet's private IPFS swarm key: nodes without it cannot connect to fleet nodes."""
    from services.runtime.content import generate_swarm_key

    operator = operator_home(operator_settings(config), home)
    try:
        generate_swarm_key(operator.swarm_key_file)
    except FileExistsError:
        fail(f"{operator.swarm_key_file} exists; a swarm key is never overwritten")
    make_console().print(f"swarm key written to {operator.swarm_key_file} (0600); give it to every device "
                    "(content.swarm_key_file) and restart the origin")


@root_app.command("show")
def root_show(
    config: ConfigOption = None,
    home: HomeOption = None,
    as_json: JsonOption = False,
) -> None:
    """The current root: version, expiry, keys and thresholds per role."""
    operator = operator_home(operator_settings(config), home)
    try:
        root = operator.root()
    except FileNotFoundError as exc:
        fail(str(exc))
    if as_json:
        print(root.model_dump_json())
        return
    table = Table(title=f"fleet {root.fleet}: root v{root.version}, expires {root.expires:%Y-%m-%d}")
    for column in ("role", "threshold", "key ids"):
        table.add_column(column)
    for role, spec in root.roles.items():
        table.add_row(role.value, str(spec.threshold), "\n".join(k[:16] + "…" for k in spec.keyids))
    make_console().print(table)


@root_app.command("sign")
def root_sign(
    file: Annotated[Path, typer.Argument(exists=True, dir_okay=False, help="proposed root (root-proposed.json)")],
    key: Annotated[list[Path], typer.Option("--key", exists=True, dir_okay=False, help="root key file; repeatable")],
) -> None:
    """Add signatures to a proposed root, e.g. on the offline machine that holds the root keys."""
    from services.operator.home import OperatorHome, RootChangeError
    from services.runtime.keys import KeyLocked, SigningKey
    from services.runtime.trust import TrustError, decode_envelope

    try:
        envelope = decode_envelope(file.read_bytes())
        keys = [SigningKey.load(path, os.environ.get(PASSPHRASE_ENV)) for path in key]
        signed = OperatorHome.add_signatures(envelope, keys)
    except (TrustError, KeyLocked, RootChangeError, PermissionError) as exc:
        fail(str(exc))
    file.write_bytes(signed.canonical_bytes())
    make_console().print(f"{file}: {len(signed.signatures)} signature(s)")


@root_app.command("commit")
def root_commit(
    file: Annotated[Path, typer.Argument(exists=True, dir_okay=False, help="signed root N+1")],
    config: ConfigOption = None,
    home: HomeOption = None,
) -> None:
    """Check a signed root N+1 exactly as devices will, and make it current."""
    from services.operator.home import RootChangeError

    operator = operator_home(operator_settings(config), home)
    try:
        update = operator.commit_root(file.read_bytes())
    except RootChangeError as exc:
        fail(str(exc))
    make_console().print(f"root v{update.root.version} is current. Publish it: edgeswarm root publish")


@root_app.command("publish")
def root_publish(
    config: ConfigOption = None,
    home: HomeOption = None,
) -> None:
    """Publish every root of the chain (retained) and a fresh timestamp made under the newest."""
    import asyncio
    from services.operator.release import publish_root_change
    from services.runtime.messaging import MqttError

    settings = operator_settings(config)
    operator = operator_home(settings, home)

    async def go() -> dict[str, bytes]:
        async with operator_client(settings, "root") as client:
            return await publish_root_change(client, operator,
                                             timestamp_expires=timedelta(hours=settings.timestamp_expires_hours))

    try:
        resigned = asyncio.run(go())
    except (MqttError, FileNotFoundError, ValueError) as exc:
        fail(str(exc))
    make_console().print(f"published root chain up to v{operator.root().version} and a fresh timestamp"
                    + (f"; re-signed the latest release of {', '.join(resigned)} with the current release keys" if resigned else ""))
