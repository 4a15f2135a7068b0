"""The `edgeswarm` command line: one module per command group, each thin (parse, call, render).

The work lives in services.operator, services.demo and device_client; modules import them inside
each command so that `edgeswarm --help` stays quick.
"""

from __future__ import annotations

import sys

import typer

from services.cli import demo, fleet, keys, release, serve
from services.cli.common import PASSPHRASE_ENV, err
from services.cli.delta import delta_app
from services.cli.rollout import rollout_app

app = typer.Typer(
    help="edgeswarm: secure peer-to-peer software updates for edge fleets.", no_args_is_help=True,
    pretty_exceptions_show_locals=False,  # locals can hold passphrases and keys
)
for group in (release.app, serve.app, demo.app):
    for command in group.registered_commands:
        app.registered_commands.append(command)
app.add_typer(serve.pki_app, name="pki")
app.add_typer(keys.keys_app, name="keys")
app.add_typer(keys.root_app, name="root")
app.add_typer(serve.device_app, name="device")
app.add_typer(fleet.fleet_app, name="fleet")
app.add_typer(delta_app, name="delta")
app.add_typer(rollout_app, name="rollout")
app.add_typer(serve.broker_app, name="broker")


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
