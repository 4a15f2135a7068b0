"""What every `edgeswarm` sub-command module shares: options, the error console, the operator's
settings, home and MQTT connection, and running until a signal."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.logging import RichHandler

from services.runtime.settings import OperatorSettings, load_settings

ConfigOption = Annotated[Optional[Path], typer.Option("--config", "-c", help="settings file (TOML)")]
HomeOption = Annotated[Optional[Path], typer.Option(help="operator home (default from settings)")]
JsonOption = Annotated[bool, typer.Option("--json", help="print JSON for scripts instead of tables")]
PASSPHRASE_ENV = "EDGESWARM_KEY_PASSPHRASE"

err = Console(stderr=True)


def fail(message: str, code: int = 1) -> None:
    err.print(f"[bold red]error:[/] {message}")
    raise typer.Exit(code)


def setup_logging(verbose: bool, console: Console | None = None) -> None:
    level = logging.DEBUG if verbose else logging.INFO
    console = console or err
    if console.is_terminal:
        handler: logging.Handler = RichHandler(console=console, show_path=False, rich_tracebacks=False)
        logging.basicConfig(level=level, format="%(message)s", handlers=[handler], force=True)
    else:
        # Log files and journald get one plain line per event, never wrapped.
        logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)
    for noisy in ("amqtt", "transitions", "asyncio"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def operator_settings(config: Path | None) -> OperatorSettings:
    return load_settings(OperatorSettings, config)


def operator_home(settings: OperatorSettings, home: Path | None):  # noqa: ANN201
    """The operator home; sealed key files are opened with $EDGESWARM_KEY_PASSPHRASE."""
    from services.operator.home import OperatorHome

    return OperatorHome(home or settings.home, passphrase=os.environ.get(PASSPHRASE_ENV))


def operator_client(settings: OperatorSettings, role: str, *, persistent: bool = False):  # noqa: ANN201
    """The operator side's MQTT connection, named after what it does (one client id per role)."""
    from services.runtime.messaging import MqttClient

    return MqttClient(settings.mqtt.host, settings.mqtt.port, f"edgeswarm-{settings.fleet}-{role}",
                      clean_session=not persistent, **settings.mqtt.client_options())


def run_until_signal(main) -> None:  # noqa: ANN001
    """asyncio.run(main(stop)), where `stop` is set by SIGINT or SIGTERM."""
    async def runner() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await main(stop)

    asyncio.run(runner())
