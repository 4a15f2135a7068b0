"""What /proc says of a running process, for tests and benchmarks that bound its memory."""

from __future__ import annotations

from pathlib import Path


def rss_kib(pid: int) -> int:
    """Resident memory of process `pid`, in KiB (/proc/<pid>/status, VmRSS)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise ProcessLookupError(f"no VmRSS for {pid}: not a running process")


def peak_rss_kib(pid: int) -> int:
    """The highest resident memory of process `pid` since it started or since `reset_peak_rss`, in KiB
    (VmHWM: the kernel's own high-water mark, which no sampling interval can miss)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise ProcessLookupError(f"no VmHWM for {pid}: not a running process")


def reset_peak_rss(pid: int) -> None:
    """Start `peak_rss_kib` over from the process's memory now (Linux: "5" to /proc/<pid>/clear_refs)."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")
