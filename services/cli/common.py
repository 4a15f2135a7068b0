"""What every `edgeswarm` sub-command module shares: options, the error console, the operator's
settings, home and MQTT connection, and running until a signal."""

from __future__ import annotations

import logging
import os
import signal
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import typer
from rich.console import Console

if TYPE_CHECKING:
    from services.runtime.settings import OperatorSettings

ConfigOption = Annotated[Optional[Path], typer.Option("--config", "-c", help="settings file (TOML; config/operator.example.toml shows every key); EDGESWARM_* variables override it")]
HomeOption = Annotated[Optional[Path], typer.Option(help="operator home directory (default: settings key home)")]
VerboseOption = Annotated[bool, typer.Option("--verbose", "-v", help="log every step (debug level); errors show a traceback")]
JsonOption = Annotated[bool, typer.Option("--json", help="print JSON for scripts instead of tables")]
PASSPHRASE_ENV = "EDGESWARM_KEY_PASSPHRASE"


def make_console(*, stderr: bool = False) -> Console:
    """Rich output that a pipe or a log file receives whole: lines not wrapped, table cells not cut to
    80 columns (rich's width when there is no terminal)."""
    found = Console(stderr=stderr, soft_wrap=True, log_path=False)
    return found if found.is_terminal else Console(stderr=stderr, soft_wrap=True, log_path=False,
                                                   width=max(found.width, 200))


err = make_console(stderr=True)


def fail(message: str, code: int = 1) -> None:
    err.print(f"[bold red]error:[/] {message}")
    raise typer.Exit(code)


def setup_logging(verbose: bool, console: Console | None = None) -> None:
    level = logging.DEBUG if verbose else logging.INFO
    console = console or err
    if console.is_terminal:
        from rich.logging import RichHandler

        handler: logging.Handler = RichHandler(console=console, show_path=False, rich_tracebacks=False)
        logging.basicConfig(level=level, format="%(message)s", handlers=[handler], force=True)
    else:
        # Log files and journald get one plain line per event, never wrapped.
        logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)
    for noisy in ("amqtt", "transitions", "asyncio"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def operator_settings(config: Path | None) -> OperatorSettings:
    from services.runtime.settings import (  # pydantic models: ~100 ms to build
        OperatorSettings,
        load_settings,
    )

    return load_settings(OperatorSettings, config)


def operator_home(settings: OperatorSettings, home: Path | None):  # noqa: ANN201
    """The operator home; sealed key files are opened with $EDGESWARM_KEY_PASSPHRASE."""
    from services.operator.home import OperatorHome

    return OperatorHome(home or settings.home, passphrase=os.environ.get(PASSPHRASE_ENV))


def operator_client(settings: OperatorSettings, role: str, *, persistent: bool = False):  # noqa: ANN201
    """The operator side's MQTT connection, named after what it does (one client id per role)."""
    from services.runtime.messaging import MqttClient

    # A persistent session is a service's (fleet serve): what it has not taken yet stays with the broker.
    return MqttClient(settings.mqtt.host, settings.mqtt.port, f"edgeswarm-{settings.fleet}-{role}",
                      clean_session=not persistent, acknowledge="when_full" if persistent else "on_arrival",
                      **settings.mqtt.client_options())


def run_until_signal(main) -> None:  # noqa: ANN001
    """asyncio.run(main(stop)), where `stop` is set by SIGINT or SIGTERM."""
    import asyncio

    async def runner() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await main(stop)

    asyncio.run(runner())
