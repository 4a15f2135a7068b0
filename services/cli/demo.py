"""`edgeswarm demo`: a whole fleet on this machine (services.demo does the work)."""

from __future__ import annotations

import json
import logging
import signal
from collections.abc import Coroutine
from typing import Annotated, Any, TypeVar

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
T = TypeVar("T")


class Terminated(Exception):
    """The demo got SIGTERM and has stopped."""


async def _until_sigterm(work: Coroutine[Any, Any, T]) -> T:
    """Run `work`; SIGTERM (`timeout`, `kill`, a supervisor) cancels it as asyncio cancels on Ctrl-C, so
    the same clean-up runs: agents stopped, the work directory with the operator's keys removed."""
    import asyncio  # here, not at the top: every CLI module's imports slow down `edgeswarm --help`

    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    assert task is not None
    terminated = False

    def terminate() -> None:
        nonlocal terminated
        terminated = True
        task.cancel()

    loop.add_signal_handler(signal.SIGTERM, terminate)
    try:
        return await work
    except asyncio.CancelledError:
        if terminated:
            raise Terminated from None
        raise
    finally:
        loop.remove_signal_handler(signal.SIGTERM)


# -- demo -------------------------------------------------------------------------------------------


@app.command("demo")
def demo(
    devices: Annotated[int, typer.Option(min=2, max=64, help="number of simulated devices (two classes)")] = 6,
    timeout: Annotated[float, typer.Option(help="seconds to wait for the fleet")] = 300.0,
    keep: Annotated[bool, typer.Option(help="keep the work directory (logs, state) for inspection")] = False,
    island: Annotated[int, typer.Option(min=0, help="cut this many devices off from the broker: they hear the release from "
                                               "their peers and send their signed reports back through them")] = 0,
    as_json: JsonOption = False,
    verbose: VerboseOption = False,
) -> None:
    """Run a whole fleet on this machine: broker, origin, N devices; release v2; show who got what.

    With --island K, the last K devices get a broker address that accepts connections and never
    answers: they run offline, hear releases from their neighbours over gossip, and their signed
    reports reach the fleet service (run by the demo) through a neighbour; the table's note says
    which one carried each.

    Example: edgeswarm demo --devices 6 --island 2
    """
    import asyncio
    from services.demo.run import DemoOptions, print_summary, run_demo

    if island >= devices:
        fail(f"--island {island} leaves no device that reaches the broker (of --devices {devices}): the island "
             "needs at least one neighbour with a way out")

    console = make_console(stderr=as_json)
    setup_logging(verbose, console if not as_json else err)
    if not verbose:
        logging.getLogger().setLevel(logging.WARNING)
    kept = "; the work directory is kept (named above)" if keep else ""
    try:
        result = asyncio.run(_until_sigterm(run_demo(DemoOptions(devices=devices, timeout=timeout, keep=keep, island=island),
                                                     console, live_display=not as_json and console.is_terminal)))
    except KeyboardInterrupt:
        # Everything is stopped; a further Ctrl-C (asyncio.run has put Python's handler back) must not
        # turn the exit into death by SIGINT halfway through this message (seen under CI load).
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        err.print("interrupted" + kept)
        raise typer.Exit(130) from None
    except Terminated:
        err.print("terminated" + kept)
        raise typer.Exit(128 + signal.SIGTERM) from None
    except RuntimeError as exc:
        fail(str(exc))
    if as_json:
        print(json.dumps(result.to_json()))
    else:
        print_summary(result, console)
        if keep:
            console.print(f"work directory kept: {result.workdir}")
    raise typer.Exit(0 if result.ok else 1)
