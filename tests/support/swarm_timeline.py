"""Where a fleet's time goes in the NAT lab: each device's bytes over time, by where they came from.

Counting rules in every device's namespace (iptables: TCP received from the origin, from the
device's LAN, from anywhere else; the broker's port apart) keep counting after a connection
closes, which per-socket counters (`ss -ti`, what the agents use) do not: a node that restarts
or hangs up on the origin takes its sockets' counts with it. A sampler thread reads them all once
an `interval` with one `ip -all netns exec` (a process per namespace would cost the CPU-bound lab
more than it measures). The agents' logs give their node restarts and origin dials; /proc gives
each node's CPU time (the embedded Kubo runs in the agent).
"""

from __future__ import annotations

import os
import re
import subprocess
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Literal

from tests.support.netlab import IPT

Source = Literal["origin", "lan", "across"]
SOURCES: tuple[Source, ...] = ("origin", "lan", "across")
IDLE_SECONDS = 2.0  # a stretch at least this long in which a device received nothing counts as idle
# Less than this between two samples is a connection's own chatter (identify, pings, want lists), not
# content: Bitswap blocks are up to 256 KiB, and a 20 Mbit/s link moves 2.5 MB in a second.
DELIVERY_BYTES = 32 << 10
# What a TCP segment carries besides its payload on Linux (IPv4 20, TCP 20, timestamps 12): the rules
# count packets, so payload = bytes - HEADER_BYTES * packets (pure ACKs, when the device serves, are 0).
# Handshakes and resets carry other headers (a SYN-ACK's options take 60 bytes, a RST has no timestamps:
# 40) and no payload, so the rules leave them out rather than guess their size.
HEADER_BYTES = 52
CHAIN = "ES_RX"
_LOG_TIME = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) ")
RESTART_MARKS = ("restarting the node to ask its peers again", "leaving the origin to the next device")
ORIGIN_DIAL_MARK = "dialing the origin"


@dataclass(frozen=True)
class Watched:
    """A device the sampler watches: its namespace, its LAN's first three octets, its agent's PID."""

    device: str
    namespace: str
    lan_prefix: str
    pid: int


def counting_rules(origin_ip: str, lan_prefix: str, broker_port: int) -> str:
    """iptables-restore input (with --noflush) that counts what a device receives, by source, in
    rules whose order `parse_counters` relies on: broker, origin, LAN, everything else."""
    return "\n".join([
        "*filter", f":{CHAIN} - [0:0]", f"-A INPUT -p tcp ! -i lo --tcp-flags SYN,RST NONE -j {CHAIN}",
        f"-A {CHAIN} -p tcp --sport {broker_port} -j RETURN",
        f"-A {CHAIN} -s {origin_ip} -j RETURN",
        f"-A {CHAIN} -s {lan_prefix}.0/24 -j RETURN",
        f"-A {CHAIN} -j RETURN",
        "COMMIT", ""])


def parse_counters(listing: str) -> dict[Source, int] | None:
    """Payload bytes per source from `iptables -L ES_RX -v -x -n` (None: not that listing)."""
    rows = [line.split() for line in listing.splitlines() if line.strip() and line.split()[0].isdigit()]
    if len(rows) != 4:
        return None
    return {source: max(int(row[1]) - HEADER_BYTES * int(row[0]), 0) for source, row in zip(SOURCES, rows[1:])}


def split_by_namespace(output: str) -> dict[str, str]:
    """`ip -all netns exec`'s output, one text per namespace (each begins with a `netns: NAME` line)."""
    sections: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in output.splitlines():
        if line.startswith("netns: "):
            current = sections.setdefault(line.removeprefix("netns: ").strip(), [])
        elif current is not None:
            current.append(line)
    return {name: "\n".join(lines) for name, lines in sections.items()}


def cpu_seconds(pid: int) -> float | None:
    """User and system CPU time of process `pid` so far (None once it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@dataclass
class DeviceTimeline:
    device: str
    nat: str
    # (seconds since the release, cumulative bytes from the origin, from LAN peers, from peers across NATs)
    samples: list[tuple[float, int, int, int]] = field(default_factory=list)
    done_seconds: float | None = None
    cpu_seconds: float | None = None
    restarts: list[float] = field(default_factory=list)  # seconds since the release
    origin_dials: list[float] = field(default_factory=list)

    @property
    def received(self) -> int:
        return sum(self.samples[-1][1:]) if self.samples else 0

    def idle_stretches(self, threshold: float = IDLE_SECONDS) -> list[tuple[float, float]]:
        """Stretches of at least `threshold` s, from the release to the device's last byte, in which it
        received nothing."""
        end = self.done_seconds if self.done_seconds is not None else (self.samples[-1][0] if self.samples else 0.0)
        # Growth seen at a sample happened since the one before it: a stretch runs from the sample
        # that last saw growth to the last sample that saw none.
        stretches, since, previous, last_total = [], 0.0, 0.0, 0
        for t, *counts in self.samples:
            if t > end:
                break
            total = sum(counts)
            if total - last_total >= DELIVERY_BYTES:
                if previous - since >= threshold:
                    stretches.append((round(since, 2), round(previous, 2)))
                since = t
            last_total, previous = total, t
        # After a finished device's last byte comes its install, not a wait for peers; an unfinished
        # device's silence at the end is the wait that kept it from finishing.
        if self.done_seconds is None and end - since >= threshold:
            stretches.append((round(since, 2), round(end, 2)))
        return stretches


class TimelineSampler:
    """Sample every watched device's received bytes by source, in a thread, until `stop()`."""

    def __init__(self, watched: list[Watched], *, origin_ip: str, broker_port: int, interval: float = 1.0) -> None:
        self.watched = {w.namespace: w for w in watched}
        self.origin_ip, self.broker_port = origin_ip, broker_port
        self.interval = interval
        self.samples: dict[str, list[tuple[float, int, int, int]]] = {w.device: [] for w in watched}
        self.sample_cpu_seconds = 0.0  # what sampling itself cost the machine
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="timeline", daemon=True)
        self.started = 0.0
        self._cpu_at_start: dict[int, float | None] = {}
        self._baseline: dict[str, dict[Source, int]] = {}  # what the device had received before the release

    def start(self, started: float) -> None:
        """Install the counting rules (once per namespace) and begin; `started`: the release's
        wall-clock time, from which sample times count."""
        for w in self.watched.values():
            present = subprocess.run(["ip", "netns", "exec", w.namespace, IPT, "-w", "-n", "-L", CHAIN],
                                     capture_output=True, check=False).returncode == 0
            if not present:
                subprocess.run(["ip", "netns", "exec", w.namespace, f"{IPT}-restore", "--noflush", "-w"], check=True,
                               input=counting_rules(self.origin_ip, w.lan_prefix, self.broker_port).encode())
        self.started = started
        self._cpu_at_start = {w.pid: cpu_seconds(w.pid) for w in self.watched.values()}
        self._sample()
        self._thread.start()

    def stop(self) -> dict[int, float | None]:
        """Stop sampling (after one last sample); the CPU seconds each watched PID used since `start`."""
        self._stop.set()
        self._thread.join()
        self._sample()
        used: dict[int, float | None] = {}
        for pid, before in self._cpu_at_start.items():
            now = cpu_seconds(pid)
            used[pid] = round(now - before, 2) if now is not None and before is not None else None
        return used

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def _sample(self) -> None:
        began = time.time()
        listing = subprocess.Popen(["ip", "-all", "netns", "exec", IPT, "-w", "-L", CHAIN, "-v", "-x", "-n"],
                                   stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        assert listing.stdout is not None
        output = listing.stdout.read()
        # wait4, not wait: the listing's own CPU time (its namespaces' iptables included), which the
        # lab's nodes did not get: the run reports it beside theirs.
        _, status, usage = os.wait4(listing.pid, 0)
        listing.returncode = os.waitstatus_to_exitcode(status)
        listing.stdout.close()
        self.sample_cpu_seconds += usage.ru_utime + usage.ru_stime
        # The namespaces are read one after another while the lab runs on: the middle of the listing.
        t = round((began + time.time()) / 2 - self.started, 2)
        for namespace, text in split_by_namespace(output).items():
            watched = self.watched.get(namespace)
            totals = parse_counters(text) if watched is not None else None
            if watched is None or totals is None:
                continue
            baseline = self._baseline.setdefault(watched.device, totals)
            self.samples[watched.device].append(
                (t, *(totals[source] - baseline[source] for source in SOURCES)))  # type: ignore[arg-type]


def log_events(log_text: str, started: float) -> tuple[list[float], list[float]]:
    """Node restarts and origin dials in an agent's log, in seconds since `started` (wall clock)."""
    restarts, dials = [], []
    for line in log_text.splitlines():
        match = _LOG_TIME.match(line)
        if match is None:
            continue
        at = datetime.strptime(match.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp() - started
        if at < 0:
            continue
        if any(mark in line for mark in RESTART_MARKS):
            restarts.append(round(at, 2))
        elif ORIGIN_DIAL_MARK in line:
            dials.append(round(at, 2))
    return restarts, dials
