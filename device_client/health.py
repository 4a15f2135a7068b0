"""The post-install health check: a command (exit 0) and/or an HTTP probe (2xx), retried until a deadline."""

from __future__ import annotations

import asyncio
import time
import urllib.error
import urllib.request

from services.runtime.settings import InstallSettings


async def _command_ok(argv: list[str], timeout: float) -> tuple[bool, str]:
    try:
        proc = await asyncio.create_subprocess_exec(*argv, stdin=asyncio.subprocess.DEVNULL,
                                                    stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
    except OSError as exc:
        return False, f"health command {argv[0]!r} could not run: {exc}"
    try:
        _, stderr = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        return False, f"health command {argv[0]!r} did not finish within {timeout:.0f} s"
    if proc.returncode != 0:
        return False, f"health command {argv[0]!r} exited with {proc.returncode}: {stderr.decode(errors='replace').strip()[-200:]}"
    return True, "healthy"


def _http_ok(url: str, timeout: float) -> tuple[bool, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:  # noqa: S310 - URL from the device's own settings
            return 200 <= response.status < 300, f"health probe {url} answered {response.status}"
    except (urllib.error.URLError, OSError) as exc:
        return False, f"health probe {url} failed: {exc}"


async def wait_healthy(settings: InstallSettings) -> tuple[bool, str]:
    """Healthy once every configured check passes; (False, last reason) if the deadline passes first."""
    if settings.health_command is None and settings.health_url is None:
        return True, "no health check configured"
    deadline = time.monotonic() + settings.confirm_deadline
    reason = "not checked"
    while True:
        ok, reason = True, "healthy"
        if settings.health_command is not None:
            ok, reason = await _command_ok(settings.health_command, settings.health_timeout)
        if ok and settings.health_url is not None:
            ok, reason = await asyncio.to_thread(_http_ok, settings.health_url, settings.health_timeout)
        if ok:
            return True, reason
        if time.monotonic() + 1.0 > deadline:
            return False, f"not healthy within {settings.confirm_deadline:.0f} s: {reason}"
        await asyncio.sleep(1.0)
