"""`edgeswarm demo`: a whole fleet on this machine (services.demo does the work)."""

from __future__ import annotations

import json
import logging
from typing import Annotated

import typer

from services.cli.common import (
    JsonOption,
    VerboseOption,
    err,
    fail,
    make_console,
    setup_logging,
)

app = typer.Typer()  # a top-level command: services.cli registers it


# -- demo -------------------------------------------------------------------------------------------


@app.command("demo")
def demo(
    devices: Annotated[int, typer.Option(min=2, max=64, help="number of simulated devices (two classes)")] = 6,
    timeout: Annotated[float, typer.Option(help="seconds to wait for the fleet")] = 300.0,
    keep: Annotated[bool, typer.Option(help="keep the work directory (logs, state) for inspection")] = False,
    as_json: JsonOption = False,
    verbose: VerboseOption = False,
) -> None:
    """Run a whole fleet on this machine: broker, origin, N devices; release v2; show who got what."""
    import asyncio
    from services.demo.run import DemoOptions, print_summary, run_demo

    console = make_console(stderr=as_json)
    setup_logging(verbose, console if not as_json else err)
    if not verbose:
        logging.getLogger().setLevel(logging.WARNING)
    try:
        result = asyncio.run(run_demo(DemoOptions(devices=devices, timeout=timeout, keep=keep), console,
                                      live_display=not as_json and console.is_terminal))
    except KeyboardInterrupt:
        err.print("interrupted" + ("; the work directory is kept (named above)" if keep else ""))
        raise typer.Exit(130) from None
    except RuntimeError as exc:
        fail(str(exc))
    if as_json:
        print(json.dumps(result.to_json()))
    else:
        print_summary(result, console)
        if keep:
            console.print(f"work directory kept: {result.workdir}")
    raise typer.Exit(0 if result.ok else 1)
