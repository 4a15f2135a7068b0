"""The P2P benchmark's timeline (tests/support/swarm_timeline.py) and its picture (benchmarks/p2p_plot.py):
what a device received from where, its idle stretches, its restarts, and the PNG drawn from them."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.support.netlab import IPT
from tests.support.swarm_timeline import (
    CHAIN,
    DELIVERY_BYTES,
    DeviceTimeline,
    counting_rules,
    cpu_seconds,
    log_events,
    parse_counters,
    split_by_namespace,
)

REPO = Path(__file__).resolve().parents[2]


LISTING = """Chain ES_RX (1 references)
    pkts      bytes target     prot opt in     out     source               destination
     100   100000 RETURN     6    --  *      *       0.0.0.0/0            0.0.0.0/0            tcp spt:1883
      10    10520 RETURN     0    --  *      *       10.99.0.1            0.0.0.0/0
       3      156 RETURN     0    --  *      *       10.101.0.0/24        0.0.0.0/0
    1000  1500000 RETURN     0    --  *      *       0.0.0.0/0            0.0.0.0/0
"""


def test_counters_are_payload_per_source_and_the_broker_is_left_out() -> None:
    assert parse_counters(LISTING) == {"origin": 10000, "lan": 0, "across": 1500000 - 52000}
    assert parse_counters("iptables: No chain/target/match by that name.") is None


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which(IPT) is None, reason="needs root and iptables-legacy")
def test_the_rules_count_what_arrives_by_source_after_the_connection_is_gone() -> None:
    """Two namespaces on a veth pair: one, "the origin", sends to the other, whose rules count it and
    keep the count after the connection closed (which per-socket counters lose), exactly: handshakes
    and refused dials are not counted as payload."""
    tag = f"est{os.getpid() % 100000}"
    a, b = f"{tag}a", f"{tag}b"
    try:
        for ns in (a, b):
            subprocess.run(["ip", "netns", "add", ns], check=True)
        subprocess.run(["ip", "link", "add", "va", "netns", a, "type", "veth", "peer", "name", "vb", "netns", b], check=True)
        for ns, dev, ip in ((a, "va", "10.250.7.1"), (b, "vb", "10.250.7.2")):
            subprocess.run(["ip", "netns", "exec", ns, "ip", "addr", "add", f"{ip}/24", "dev", dev], check=True)
            subprocess.run(["ip", "netns", "exec", ns, "ip", "link", "set", dev, "up"], check=True)
        subprocess.run(["ip", "netns", "exec", b, f"{IPT}-restore", "--noflush", "-w"], check=True,
                       input=counting_rules("10.250.7.1", "10.250.8", 1883).encode())
        server = subprocess.Popen(["ip", "netns", "exec", a, sys.executable, "-c", (
            "import socket;s=socket.create_server(('10.250.7.1',4001));c,_=s.accept();c.sendall(b'x'*300000);c.close()")])
        subprocess.run(["ip", "netns", "exec", b, sys.executable, "-c", (
            # A refused dial first (a RST, whose header is shorter): the count must not drift with it.
            "import socket,time\ntry: socket.create_connection(('10.250.7.1',4002))\nexcept OSError: pass\n"
            "for _ in range(100):\n try: c=socket.create_connection(('10.250.7.1',4001));break\n"
            " except OSError: time.sleep(0.1)\nn=0\n"
            "while (d:=c.recv(65536)): n+=len(d)\nassert n==300000")], check=True, timeout=20)
        server.wait(10)
        listing = subprocess.run(["ip", "netns", "exec", b, IPT, "-w", "-L", CHAIN, "-v", "-x", "-n"],
                                 capture_output=True, text=True, check=True).stdout
        counts = parse_counters(listing)
        assert counts is not None and 300000 <= counts["origin"] < 300000 * 1.01, counts
        assert counts["lan"] == 0 and counts["across"] == 0
    finally:
        for ns in (a, b):
            subprocess.run(["ip", "netns", "del", ns], check=False, capture_output=True)


def test_ip_all_netns_output_is_split_per_namespace() -> None:
    output = "\nnetns: es-d01\nESTAB 0 0 a:1 b:2\n\t bytes_received:5\n\nnetns: es-r1\n\nnetns: es-d02\nx\n"
    sections = split_by_namespace(output)
    assert set(sections) == {"es-d01", "es-r1", "es-d02"}
    assert "bytes_received:5" in sections["es-d01"] and sections["es-d02"].strip() == "x"


def test_idle_stretches_are_the_silences_before_the_last_byte() -> None:
    mb = 1 << 20
    samples = [(1.0, 0, 0, 0), (2.0, 0, 0, 0), (3.0, mb, 0, 0), (4.0, mb, 2 * mb, 0), (5.0, mb, 2 * mb, 100),
               (6.0, mb, 2 * mb, 200), (7.0, mb, 2 * mb, 300), (8.0, mb, 3 * mb, 0 + 300), (9.0, mb, 3 * mb, 300)]
    timeline = DeviceTimeline("d01", "upnp", samples=samples, done_seconds=11.0)
    # 0-2: nothing; 4-7: only chatter (100 bytes a second); after 8: the install, not a wait.
    assert timeline.idle_stretches() == [(0.0, 2.0), (4.0, 7.0)]
    assert timeline.idle_stretches(threshold=5) == []
    unfinished = DeviceTimeline("d02", "upnp", samples=samples, done_seconds=None)
    # A device that never finished: its silence at the end is what kept it from finishing.
    assert unfinished.idle_stretches(threshold=1) == [(0.0, 2.0), (4.0, 7.0), (8.0, 9.0)]
    assert timeline.idle_stretches(threshold=1) == [(0.0, 2.0), (4.0, 7.0)]
    assert timeline.received == mb + 3 * mb + 300


@given(st.lists(st.tuples(st.floats(0.2, 3.0), st.sampled_from([0, 10, DELIVERY_BYTES, 1 << 20])), max_size=40),
       st.floats(0.5, 5.0))
def test_idle_stretches_are_ordered_long_enough_and_free_of_deliveries(steps: list[tuple[float, int]],
                                                                       threshold: float) -> None:
    samples, t, total = [], 0.0, 0
    for dt, gain in steps:
        t, total = round(t + dt, 2), total + gain
        samples.append((t, total, 0, 0))
    stretches = DeviceTimeline("d", "upnp", samples=samples, done_seconds=t + 1).idle_stretches(threshold)
    last_delivery = max([s[0] for i, s in enumerate(samples)
                         if s[1] - (samples[i - 1][1] if i else 0) >= DELIVERY_BYTES], default=0.0)
    previous_end = -1.0
    for start, end in stretches:
        assert end - start >= threshold - 1e-6 and start >= previous_end and end <= last_delivery
        previous_end = end
        # Nothing delivered strictly inside a stretch: a sample at time s covers (previous sample, s].
        for i, (at, received, *_) in enumerate(samples):
            gain = received - (samples[i - 1][1] if i else 0)
            if start < at <= end:
                assert gain < DELIVERY_BYTES


def test_log_events_are_the_agents_restarts_and_origin_dials() -> None:
    log = ("2026-12-05 03:10:00,000 INFO x: release seen\n"
           "2026-12-05 03:10:02,500 INFO device_client.updater: no progress from peers for 2.0 s: dialing the origin\n"
           "2026-12-05 03:10:09,250 INFO services.runtime.content._embedded: no progress on bafy for 20 s: "
           "restarting the node to ask its peers again\n"
           "  a continuation line\n"
           "2026-12-05 03:10:12,000 INFO device_client.updater: fetch complete: leaving the origin to the next device\n"
           "2026-12-05 03:09:59,000 INFO x: dialing the origin (before the release: not counted)\n")
    from datetime import datetime

    started = datetime(2026, 12, 5, 3, 10, 0).timestamp()
    restarts, dials = log_events(log, started)
    assert restarts == [9.25, 12.0] and dials == [2.5]


def test_cpu_seconds_of_a_process_and_of_none() -> None:
    child = subprocess.Popen([sys.executable, "-c", "sum(range(10**7))"])
    child.wait()
    assert cpu_seconds(os.getpid()) > 0
    assert cpu_seconds(child.pid) is None  # reaped: gone


def _plot_module():  # noqa: ANN202
    spec = importlib.util.spec_from_file_location("p2p_plot", REPO / "benchmarks" / "p2p_plot.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_segments_go_to_the_source_that_delivered_most_and_merge() -> None:
    segments = _plot_module().segments
    mb = 1 << 20
    samples = [[1, 0, 0, 10], [2, mb, 0, 0], [3, 2 * mb, 0, 0], [4, 2 * mb, 3 * mb, 0], [5, 2 * mb, 3 * mb, 0],
               [6, 2 * mb, 3 * mb, 2 * mb], [7, 3 * mb, 3 * mb, 2 * mb]]
    spans = segments(samples, until=5.5)
    assert spans == {"origin": [(1, 2)], "lan": [(3, 1)], "across": [(5, 1)]}  # 0-1: chatter; after done: nothing


def test_a_run_is_drawn_as_a_png(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    mb = 1 << 20
    timeline = {
        f"d{i:02d}": {"nat": "upnp", "done": 10.0 + i, "cpu_seconds": 1.0, "received_x_artifact": 1.2,
                      "idle": [[0.0, 2.0]], "restarts": [5.0], "origin_dials": [2.0] if i == 1 else [],
                      "samples": [[t, 0 if i else t * mb, t * mb // 2, t * mb // 2] for t in range(1, 12 + i)]}
        for i in range(1, 4)}
    figures = {"timeline": timeline, "fleet_seconds_p2p": 13.0, "fleet_seconds_http": 40.0, "bound_seconds": 3.4,
               "artifact_bytes": 8 * mb, "fleet_x_bound": 3.8, "fleet_time_ratio": 0.33, "duplicate_x_artifact": 1.2,
               "cpu_seconds_per_mb": 0.1, "node_restarts": 3}
    path = tmp_path / "timeline.png"
    _plot_module().plot_run(figures, path, "test")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000
    with pytest.raises(ValueError, match="no timeline"):
        _plot_module().plot_run({**figures, "timeline": {}}, tmp_path / "none.png")
