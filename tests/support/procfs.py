"""What /proc says of a running process, for tests and benchmarks that bound its memory."""

from __future__ import annotations

from pathlib import Path


def rss_kib(pid: int) -> int:
    """Resident memory of process `pid`, in KiB (/proc/<pid>/status, VmRSS)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise ProcessLookupError(f"no VmRSS for {pid}: not a running process")
