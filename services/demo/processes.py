"""Child processes (device agents, origin) started and stopped by their PID, with logs in a file."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path


PARENT_ENV = "EDGESWARM_PARENT_PID"


def terminate(proc: subprocess.Popen[bytes] | None, timeout: float = 10.0) -> int | None:
    """SIGTERM, wait up to `timeout`, then SIGKILL: every process we start is stopped by its PID."""
    if proc is None:
        return None
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


class AgentProcess:
    """`edgeswarm device run --config FILE` as a child process."""

    def __init__(self, config: Path, log_file: Path, *, env: dict[str, str] | None = None) -> None:
        self.config = config
        self.log_file = log_file
        self.env = env
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        env = dict(os.environ)
        env.update(self.env or {})
        env[PARENT_ENV] = str(os.getpid())  # the agent stops itself if this process dies, even by SIGKILL
        with open(self.log_file, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "services.cli", "device", "run", "--config", str(self.config)],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                start_new_session=True,  # Ctrl-C reaches the orchestrator, which stops children in order
            )

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def returncode(self) -> int | None:
        return self.proc.returncode if self.proc else None

    def log_tail(self, lines: int = 12) -> str:
        """The last lines of the agent's log: why it stopped, when it stopped by itself."""
        try:
            text = self.log_file.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.rstrip().splitlines()[-lines:])

    def stop(self, timeout: float = 10.0) -> int | None:
        return terminate(self.proc, timeout)

    def signal(self, signum: int) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signum)

    def kill(self) -> None:
        """SIGKILL, as a power cut would: no clean disconnect, no state flushed."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
