"""The network-namespace NAT lab behaves like the NATs devices sit behind (issue #7, testbed).

Each assertion is a property later peer-to-peer tests rely on: plain MASQUERADE keeps one external
port per socket (so peers can reach back through it), --random-fully picks a new one per
destination (symmetric), nothing gets in unasked, UPnP/NAT-PMP mappings (miniupnpd, external
address learnt from coturn over STUN) let the WAN in, neighbours behind one router talk over the
LAN, links are shaped, and nothing of the lab survives it.
"""

from __future__ import annotations

import re
import sys
import time
from pathlib import Path

import pytest

from tests.support import netlab
from tests.support.netlab import NatLab

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(netlab.available() is not None, reason=f"NAT lab unavailable: {netlab.available()}"),
]
PROBE = [sys.executable, "-m", "tests.support.netlab_probe"]
REPO = Path(__file__).resolve().parents[2]


def probe(ns: netlab.Namespace, *args: str, check: bool = True) -> str:
    return ns.run(*PROBE, *args, check=check).stdout.strip()


def serve(lab: NatLab, ns: netlab.Namespace, ip: str, port: int) -> None:
    lab.popen(ns, [*PROBE, "serve", ip, str(port)], f"serve-{ns.name}-{port}.log", cwd=REPO)


def wait_listening(ns: netlab.Namespace, port: int) -> None:
    end = time.monotonic() + 10
    while f":{port} " not in ns.run("ss", "-ltn", check=False).stdout:
        if time.monotonic() > end:
            raise AssertionError(f"nothing listens on {port} in {ns.name}")
        time.sleep(0.1)


@pytest.mark.skipif(netlab.upnp_available() is not None, reason=f"{netlab.upnp_available()}")
def test_nat_kinds_mappings_lan_shaping_and_teardown(tmp_path: Path) -> None:
    with NatLab(tmp_path / "lab") as lab:
        origin, other = lab.add_wan_host("origin"), lab.add_wan_host("other")
        lab.start_stun(origin)
        upnp, plain, symmetric = lab.add_router("upnp"), lab.add_router("masquerade"), lab.add_router("symmetric")
        inner = lab.add_router("masquerade", behind=plain)
        mapped, neighbour = lab.add_device(upnp, "du1"), lab.add_device(upnp, "du2")
        behind_plain, behind_symmetric, behind_two = (lab.add_device(plain, "dm"), lab.add_device(symmetric, "ds"),
                                                      lab.add_device(inner, "dd"))
        lab.start_upnp(upnp)
        for host in (origin, other):
            serve(lab, host, host.ip, 7000)
            wait_listening(host, 7000)
        names = tuple(lab.namespaces)

        def seen_by_both(device: netlab.Namespace) -> list[str]:
            return [probe(device, "whoami", host.ip, "7000", "40000") for host in (origin, other)]

        # Endpoint-independent mapping: one external address:port for the socket, whoever it talks to.
        first, second = seen_by_both(behind_plain)
        assert first == second and first.startswith(f"{plain.ip}:")
        # Symmetric: a new external port per destination.
        first, second = seen_by_both(behind_symmetric)
        assert first.split(":")[0] == second.split(":")[0] == symmetric.ip and first != second
        # Double NAT: the world sees the outer router.
        assert probe(behind_two, "whoami", origin.ip, "7000").startswith(f"{plain.ip}:")

        # Nothing gets in unasked: no route to private LANs, and the router forwards nothing.
        serve(lab, behind_plain, "0.0.0.0", 7100)
        wait_listening(behind_plain, 7100)
        assert origin.run(*PROBE, "whoami", plain.ip, "7100", check=False).returncode != 0
        assert origin.run(*PROBE, "whoami", behind_plain.ip, "7100", check=False).returncode != 0

        # NAT-PMP (miniupnpd): the external address it learnt over STUN, and a mapping that lets the WAN in.
        serve(lab, mapped, "0.0.0.0", 41000)
        wait_listening(mapped, 41000)
        external = ""
        for _ in range(50):  # miniupnpd needs its STUN round before it maps anything
            result = mapped.run(*PROBE, "natpmp", upnp.lan_ip, "41000", check=False)
            if result.returncode == 0:
                external = result.stdout.strip()
                break
            time.sleep(0.2)
        assert external == f"{upnp.ip} 41000"
        assert probe(origin, "whoami", upnp.ip, "41000").startswith(f"{origin.ip}:")
        assert probe(behind_symmetric, "whoami", upnp.ip, "41000").startswith(f"{symmetric.ip}:")

        # Neighbours behind one router meet on the LAN, unNATed.
        assert probe(neighbour, "whoami", mapped.ip, "41000").startswith(f"{neighbour.ip}:")

        # Shaping: 20 Mbit/s on a device's uplink. A lower bound only: a busy machine is slower, never faster.
        lab.shape(behind_plain, rate_mbit=20)
        lab.popen(origin, [*PROBE, "sink", origin.ip, "7200"], "sink.log", cwd=REPO)
        wait_listening(origin, 7200)
        seconds = float(probe(behind_plain, "send", origin.ip, "7200", str(5_000_000)))
        assert seconds >= 0.8 * 5_000_000 * 8 / 20e6

        # Loss: 10% of what a device sends is dropped (netem, or iptables where netem is missing).
        lab.shape(behind_symmetric, loss_percent=10)
        pings = behind_symmetric.run("ping", "-q", "-c", "400", "-i", "0.005", "-W", "1", origin.ip, check=False).stdout
        received = int(re.search(r"(\d+) received", pings).group(1))
        assert 290 <= received <= 392, pings  # 360 expected; outside this band has odds below 1e-6
    assert not set(names) & set(netlab.leftover_namespaces())


def _first_json(log: Path, timeout: float = 60.0) -> dict:
    import json

    end = time.monotonic() + timeout
    while time.monotonic() < end:
        for line in (log.read_text() if log.exists() else "").splitlines():
            if line.startswith("{"):
                return json.loads(line)
        time.sleep(0.2)
    raise AssertionError(f"no JSON line in {log}: {log.read_text()[-2000:] if log.exists() else ''}")


@pytest.mark.skipif(netlab.upnp_available() is not None, reason=f"{netlab.upnp_available()}")
def test_embedded_kubo_crosses_nats_through_a_upnp_mapping_and_shares_on_the_lan(tmp_path: Path) -> None:
    """The paths issue #7 builds on, with the embedded Kubo (v0.22): a device behind a UPnP router
    gets a port mapping by itself (Swarm.DisableNatPortMap false); devices behind plain and symmetric
    NATs fetch from it once they know the mapped address (what an MQTT rendezvous hands out), and a
    neighbour on its LAN finds it by mDNS. The origin never has the file: every byte comes from the peer."""
    import json
    import os

    node = [sys.executable, "-m", "tests.support.netlab_node"]
    env = {"PYTHONPATH": str(REPO)}
    with NatLab(tmp_path / "lab") as lab:
        origin = lab.add_wan_host("origin")
        lab.start_stun(origin)
        upnp, plain, symmetric = lab.add_router("upnp"), lab.add_router("masquerade"), lab.add_router("symmetric")
        seeder, neighbour = lab.add_device(upnp, "seed"), lab.add_device(upnp, "lan")
        behind_plain, behind_symmetric = lab.add_device(plain, "dm"), lab.add_device(symmetric, "ds")
        lab.start_upnp(upnp)
        blob = tmp_path / "blob"
        blob.write_bytes(os.urandom(4 << 20))
        lab.popen(origin, [*node, "--repo", str(tmp_path / "origin" / "ipfs"), "--listen", origin.ip], "origin-node.log",
                  env=env)
        bootstrap = _first_json(lab.workdir / "origin-node.log")["multiaddr"]
        lab.popen(seeder, [*node, "--repo", str(tmp_path / "seed" / "ipfs"), "--port", "4101", "--peer", bootstrap,
                           "--nat-port-map", "--mdns", "--add", str(blob)], "seed-node.log", env=env)
        seed = _first_json(lab.workdir / "seed-node.log")
        mapping = None
        end = time.monotonic() + 30
        while mapping is None and time.monotonic() < end:
            found = re.findall(r"AddPortMapping: ext port (\d+) to (\S+):4101", (lab.workdir / "miniupnpd-1.log").read_text())
            mapping = found[-1] if found else None
            time.sleep(0.3)
        assert mapping is not None and mapping[1] == seeder.ip, "Kubo asked miniupnpd for no mapping"
        reachable = f"/ip4/{upnp.ip}/tcp/{mapping[0]}/p2p/{seed['peer_id']}"

        def fetch(device: netlab.Namespace, name: str, *peers: str) -> dict:
            args = [*node, "--repo", str(tmp_path / name / "ipfs"), "--port", "4201", "--mdns", "--fetch", seed["cid"],
                    "--out", str(tmp_path / f"{name}.out"), "--deadline", "60"]
            for peer in peers:
                args += ["--peer", peer]
            result = device.run(*args, check=False)
            lines = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
            assert result.returncode == 0 and "fetched" in lines[-1], result.stdout[-2000:]
            assert (tmp_path / f"{name}.out").read_bytes() == blob.read_bytes()
            return lines[-1]

        lan = fetch(neighbour, "lan", bootstrap)  # no address given: mDNS finds the seeder on the LAN
        assert any(seeder.ip in p for p in lan["peers"]), lan
        for device, name in ((behind_plain, "dm"), (behind_symmetric, "ds")):
            crossed = fetch(device, name, bootstrap, reachable)
            assert any(f"/ip4/{upnp.ip}/tcp/{mapping[0]}" in p for p in crossed["peers"]), crossed
