"""The `edgeswarm` command line: one module per command group, each thin (parse, call, render).

The work lives in services.operator, services.demo and device_client; modules import them inside
each command so that `edgeswarm --help` stays quick.
"""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from services.cli import demo, fleet, keys, release, serve
from services.cli.common import PASSPHRASE_ENV, err
from services.cli.delta import delta_app
from services.cli.examples import add_examples
from services.cli.rollout import rollout_app

app = typer.Typer(
    help="edgeswarm: secure peer-to-peer software updates for edge fleets.", no_args_is_help=True,
    pretty_exceptions_show_locals=False,  # locals can hold passphrases and keys
)


@app.callback()
def _root(
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="show a traceback when a command fails")] = False,
) -> None:
    """edgeswarm: secure peer-to-peer software updates for edge fleets. `edgeswarm demo` runs one here."""


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
add_examples(app)


def main() -> None:
    """`edgeswarm`: expected failures (settings, broker, keys, files) end in one line saying what to
    do next; `--verbose` shows the traceback as well."""
    from rich.markup import escape

    from schemas.errors import EdgeswarmError

    try:
        app()
    except (EdgeswarmError, PermissionError) as exc:
        if "--verbose" in sys.argv or "-v" in sys.argv:
            raise
        from services.runtime.keys import KeyLocked
        from services.runtime.messaging import MqttError

        hint = ""
        if isinstance(exc, KeyLocked):
            hint = f"; set ${PASSPHRASE_ENV} to the key files' passphrase"
        elif isinstance(exc, MqttError):
            hint = " (check host, port, username, password and ca_file in the settings' [mqtt] section)"
        err.print(f"[bold red]error:[/] {escape(str(exc) + hint)}")
        sys.exit(2)
