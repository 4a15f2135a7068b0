"""A data mule (issue 14, items 4 and 5; CI-sized): a LAN with no path out at all, and a device that
travels. The mule gets 2.0.0 on a connected LAN, is moved (its link unplugged from one router and
plugged into the other's LAN) to the isolated LAN, where the devices update from it, and is moved
back: the isolated devices' signed reports, which it held while it had no broker, reach the fleet
record through it."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import pytest

from services.demo.provision import DEFAULT_TARGET
from tests.support import netlab
from tests.support.deadlines import scaled
from tests.support.island import start_wan_side

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(netlab.available() is not None, reason=f"NAT lab unavailable: {netlab.available()}"),
]


def installed_version(state_file: Path) -> str | None:
    try:
        return json.loads(state_file.read_text())["installed_version"]
    except (OSError, ValueError, KeyError):
        return None


def wait(predicate, timeout: float, what: str, logs) -> None:  # noqa: ANN001
    end = time.monotonic() + scaled(timeout)
    while not predicate():
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}:\n{logs()}")
        time.sleep(0.5)


def test_a_data_mule_carries_the_release_into_an_isolated_lan_and_the_reports_back(tmp_path: Path) -> None:
    with netlab.NatLab(tmp_path / "lab") as lab:
        wan = lab.add_wan_host("origin")
        depot, isolated = lab.add_router("masquerade"), lab.add_router("masquerade")
        lab.firewall(isolated, f"{netlab.WAN_NET}.0/24")  # nothing in or out
        mule_ns = lab.add_device(depot, "mule")
        names = ["i01", "i02"]
        spaces = {name: lab.add_device(isolated, name) for name in names}
        side = start_wan_side(lab, wan, tmp_path, 4 << 20)
        states = {"mule": side.start_agent(mule_ns, "mule")} | {n: side.start_agent(ns, n) for n, ns in spaces.items()}
        log = lambda name: (lab.workdir / f"agent-{name}.log").read_text(errors="replace")  # noqa: E731
        logs = lambda: "\n\n".join(f"{n}:\n{log(n)[-2500:]}" for n in states)  # noqa: E731
        wait(lambda: all("carrying on offline" in log(n) for n in names), 60, "the isolated devices to go offline", logs)

        side.release("2.0.0")
        wait(lambda: installed_version(states["mule"]) == "2.0.0", 90, "the mule to install 2.0.0 at the depot", logs)
        assert all(installed_version(states[n]) == "1.0.0" for n in names), "nothing reaches the isolated LAN"

        lab.move_device(mule_ns, isolated)
        wait(lambda: all(installed_version(states[n]) == "2.0.0" for n in names), 120,
             "the isolated devices to install 2.0.0 from the mule", logs)
        expected = hashlib.sha256(side.artifacts["2.0.0"].read_bytes()).hexdigest()
        for name in names:
            installed = tmp_path / "devices" / name / "sysroot" / DEFAULT_TARGET.lstrip("/")
            assert hashlib.sha256(installed.read_bytes()).hexdigest() == expected
            assert "heard edgeswarm/lab/releases/gw from peer" in log(name)
        # The mule notices its move by polling its addresses (two looks 2 s apart), so its IPFS node may
        # restart after the isolated devices already found it by their own mDNS queries.
        wait(lambda: "addresses changed" in log("mule"), 30, "the mule to notice it moved", logs)
        wait(lambda: "holding i0" in log("mule"), 30, "the mule to hold the isolated devices' reports", logs)
        reported, _ = side.wait_recorded(names, len(names), 0)
        assert reported == {}, "no report can leave the isolated LAN before the mule does"

        lab.move_device(mule_ns, depot)
        reported, heard = side.wait_recorded(names, len(names), scaled(90))
        assert sorted(reported) == names, (reported, logs())
        assert set(heard.values()) == {"relayed by mule"}, heard
        print(json.dumps({"reported_after_the_mule_returned": reported}))


def blocks_bytes(state_dir: Path) -> int:
    return sum(p.stat().st_size for p in (state_dir / "ipfs" / "blocks").rglob("*") if p.is_file())


@pytest.mark.skipif(netlab.upnp_available() is not None, reason=f"{netlab.upnp_available()}")
def test_a_device_moved_to_another_lan_in_the_middle_of_a_fetch_completes_it(tmp_path: Path) -> None:
    from tests.support.p2p_scenario import ORIGIN_PORT, egress_bytes

    size = 8 << 20
    with netlab.NatLab(tmp_path / "lab") as lab:
        wan = lab.add_wan_host("origin")
        # Both LANs' routers map ports by NAT-PMP (miniupnpd): the device must ask the new one.
        home_lan, other_lan = lab.add_router("upnp"), lab.add_router("upnp")
        lab.start_stun(wan)
        lab.start_upnp(home_lan)
        lab.start_upnp(other_lan)
        mobile = lab.add_device(home_lan, "mobile")
        lab.shape(home_lan, rate_mbit=8, interface=lab.lan_port(mobile))  # ~8 s for the artifact
        side = start_wan_side(lab, wan, tmp_path, size)
        state = side.start_agent(mobile, "mobile", nat_pmp=True)
        log = lambda: (lab.workdir / "agent-mobile.log").read_text(errors="replace")  # noqa: E731
        wait(lambda: installed_version(state) == "1.0.0" and "phase idle" in log(), 60, "the device to settle", log)
        before = blocks_bytes(state.parent)
        wan.run("iptables-legacy", "-A", "OUTPUT", "-p", "tcp", "--sport", str(ORIGIN_PORT))  # counts egress
        side.release("2.0.0")
        wait(lambda: blocks_bytes(state.parent) - before >= size // 3, 60, "a third of the fetch", log)
        lab.move_device(mobile, other_lan)
        wait(lambda: installed_version(state) == "2.0.0", 180, "the moved device to finish its fetch and install", log)
        installed = tmp_path / "devices" / "mobile" / "sysroot" / DEFAULT_TARGET.lstrip("/")
        assert hashlib.sha256(installed.read_bytes()).hexdigest() == hashlib.sha256(
            side.artifacts["2.0.0"].read_bytes()).hexdigest()
        # It resumed with the blocks it held: the origin sent about one copy, not one and a third.
        egress = egress_bytes(wan, ORIGIN_PORT) / size
        print(json.dumps({"origin_egress_x_artifact": round(egress, 3)}))
        assert egress <= 1.25, egress
        # It re-mapped its port on the new network, and announced the new mapping on the rendezvous.
        text = log()
        assert f"router {home_lan.lan_ip} maps {home_lan.ip}:" in text, text[-3000:]
        moved = text[text.index("this device's addresses changed"):]
        assert f"router {other_lan.lan_ip} maps {other_lan.ip}:" in moved, moved[-3000:]
        assert f"rendezvous: announced /ip4/{other_lan.ip}/tcp/" in moved, moved[-3000:]
