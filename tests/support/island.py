"""An island in the NAT lab (issue 14): devices behind a router whose firewall drops everything
towards the broker and the origin, and one device on that LAN with a second link out.

Everything is real: the embedded broker and the origin on a WAN host, each device's agent in its
own network namespace. Island devices dial the broker, get no answer (they run offline), find the
bridging device by mDNS, hear the release, timestamp and root from it over gossip and fetch the
blocks from it; their signed reports go back the same way, through the bridge, to the fleet
service on the WAN host. `run_island` returns when every device runs the new version (or its
deadline passes) and the fleet record holds their reports (or 20 s more passed).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from services.demo.processes import PARENT_ENV
from services.demo.provision import DeviceSpec, provision
from tests.support.netlab import Namespace, NatLab
from tests.support.p2p_scenario import BROKER_PORT, CLASS, FLEET, ORIGIN_PORT, PY, egress_bytes

__all__ = ["IslandResult", "WanSide", "run_island", "start_wan_side"]


@dataclass
class IslandResult:
    devices: int
    artifact_size: int
    installed: dict[str, float] = field(default_factory=dict)  # device -> seconds from the release to its install
    bridge_seconds: float | None = None
    origin_egress: int = 0
    # device -> seconds from its report of 2.0.0 (made at its install) to the fleet record holding it
    reported: dict[str, float] = field(default_factory=dict)
    heard: dict[str, str] = field(default_factory=dict)  # device -> how the record heard it ("relayed by bridge")
    commanded: dict[str, bool] = field(default_factory=dict)  # tunnelled device -> a command reached it (fleet check)
    logs: dict[str, str] = field(default_factory=dict)

    @property
    def completed(self) -> int:
        return len(self.installed)


def _installed_version(state_file: Path) -> str | None:
    try:
        return json.loads(state_file.read_text())["installed_version"]
    except (OSError, ValueError, KeyError):
        return None


@dataclass
class WanSide:
    """The operator's side on a WAN host: keys, broker, origin and fleet service, release 1.0.0 out."""

    lab: NatLab
    wan: Namespace
    workdir: Path
    config: Path
    home: Path
    origin: str
    artifacts: dict[str, Path]
    env: dict[str, str]

    def cli(self, *args: str) -> str:
        return self.wan.run(PY, "-m", "services.cli", *args).stdout

    def release(self, version: str) -> None:
        self.cli("release", CLASS, version, str(self.artifacts[version]), "--config", str(self.config))

    def start_agent(self, ns: Namespace, name: str, *, tunnel_after: float | None = None, nat_pmp: bool = False) -> Path:
        """Provision and start device `name` in `ns`; returns its state.json. `tunnel_after`: reach the
        broker through a peer after this long without it (0: never; None: the default); `nat_pmp`:
        ask its router for a port mapping (a `upnp` router with `start_upnp`)."""
        spec = DeviceSpec(
            device_id=name, fleet=FLEET, device_class=CLASS, base_dir=self.workdir / "devices" / name,
            swarm_port=4001, broker_host=self.wan.ip, broker_port=BROKER_PORT, root_file=self.home / "root.json",
            firmware=self.artifacts["1.0.0"], firmware_version="1.0.0", peers=(self.origin,), origin=self.origin,
            stall_timeout=60, retry_interval=5, identities_dir=self.home / "identities",
            mqtt_settings=(("tunnel_after", str(tunnel_after)),) if tunnel_after is not None else (),
            # What docs/p2p.md recommends (peers first, the origin after a grace), in every run.
            content_settings=(("listen_host", "0.0.0.0"), ("mdns", "true"), ("routing", "none"),
                              ("rendezvous", "true"), ("origin_grace", "2.0"), ("gossip_interval", "15"),
                              *((("nat_pmp", "true"),) if nat_pmp else ())),
        )
        self.lab.popen(ns, [PY, "-m", "services.cli", "device", "run", "--config", str(provision(spec))],
                       f"agent-{name}.log", env=self.env)
        return spec.state_dir / "state.json"

    def wait_recorded(self, names: list[str], expected: int, timeout: float) -> tuple[dict[str, float], dict[str, str]]:
        """`_recorded` from the fleet record, once it holds `expected` of `names` at 2.0.0 or `timeout` passed."""
        end = time.monotonic() + timeout
        while True:
            found = _recorded(self.cli("fleet", "status", "--from", "record", "--json", "--config", str(self.config)),
                              names)
            if len(found[1]) >= expected or time.monotonic() > end:
                return found
            time.sleep(0.5)


def start_wan_side(lab: NatLab, wan: Namespace, workdir: Path, size: int) -> WanSide:
    home = workdir / "operator"
    config = workdir / "operator.toml"
    config.write_text(f'fleet = "{FLEET}"\nhome = "{home}"\ndelta_bases = 0\n'
                      f'[mqtt]\nhost = "{wan.ip}"\nport = {BROKER_PORT}\n'
                      f'[content]\nlisten_host = "{wan.ip}"\nswarm_port = {ORIGIN_PORT}\nrouting = "none"\n')
    wan.run(PY, "-m", "services.cli", "keys", "init", "--config", str(config))
    env = {PARENT_ENV: str(os.getpid())}
    lab.popen(wan, [PY, "-m", "services.cli", "broker", "run", "--host", wan.ip, "--port", str(BROKER_PORT)],
              "broker.log", env=env)
    lab.popen(wan, [PY, "-m", "services.cli", "origin", "--config", str(config)], "origin.log", env=env, cwd=workdir)
    lab.popen(wan, [PY, "-m", "services.cli", "fleet", "serve", "--config", str(config), "--no-homeassistant"],
              "fleet-service.log", env=env, cwd=workdir)
    address_file = home / "origin" / "multiaddr"
    end = time.monotonic() + 60
    while not address_file.exists():
        if time.monotonic() > end:
            raise TimeoutError("the origin did not start: " + (lab.workdir / "origin.log").read_text()[-2000:])
        time.sleep(0.1)
    artifacts = {v: workdir / f"fw-{v}.img" for v in ("1.0.0", "2.0.0")}
    for path in artifacts.values():
        path.write_bytes(os.urandom(size))
    side = WanSide(lab, wan, workdir, config, home, address_file.read_text().splitlines()[0], artifacts, env)
    side.release("1.0.0")
    return side


def _recorded(status_json: str, names: list[str]) -> tuple[dict[str, float], dict[str, str]]:
    """(relayed device -> seconds from its report of 2.0.0 to the record, device at 2.0.0 -> how it was
    heard). A report the device sent itself (direct or through a tunnel) has no separate arrival time."""
    lags, heard = {}, {}
    for entry in json.loads(status_json)["devices"]:
        if entry["device"] in names and entry.get("installed_version") == "2.0.0" and entry.get("heard"):
            heard[entry["device"]] = entry["heard"]
            if entry.get("heard_at"):
                lags[entry["device"]] = round((datetime.fromisoformat(entry["heard_at"])
                                               - datetime.fromisoformat(entry["timestamp"])).total_seconds(), 2)
    return lags, heard


def run_island(workdir: Path, *, devices: int = 3, size: int = 4 << 20, timeout: float = 240.0,
               island: bool = True, device_mbit: float | None = None, tunnelled: int = 0) -> IslandResult:
    """`island=False`: the same LAN with nothing blocked (every device reaches the broker and the
    origin; the "bridge" is one more device), the baseline the island is measured against.

    The last `tunnelled` island devices reach the broker through the bridge's tunnel 3 s after they
    find it silent; the others never do, so their updates and reports take the gossip path."""
    with NatLab(workdir / "lab") as lab:
        wan = lab.add_wan_host("origin")
        router = lab.add_router("masquerade")
        if island:
            lab.firewall(router, wan.ip)
        names = [f"i{n:02d}" for n in range(1, devices + 1)]
        spaces = {name: lab.add_device(router, name) for name in ["bridge", *names]}
        if device_mbit:
            for ns in spaces.values():
                lab.shape(ns, rate_mbit=device_mbit)
                lab.shape(router, rate_mbit=device_mbit, interface=lab.lan_port(ns))
            lab.shape(wan, rate_mbit=device_mbit)
        if island:
            lab.add_wan_link(spaces["bridge"])
            if device_mbit:
                lab.shape(spaces["bridge"], rate_mbit=device_mbit, interface="eth1")

        wan_side = start_wan_side(lab, wan, workdir, size)
        tunnelling = set(names[len(names) - tunnelled:]) if tunnelled else set()
        states = {name: wan_side.start_agent(ns, name, tunnel_after=None if name == "bridge" else
                                             3.0 if name in tunnelling else 0.0)
                  for name, ns in spaces.items()}
        # Island devices go offline 15 s after they start (no answer from the broker); connected
        # ones have settled on 1.0.0 by then too.
        end = time.monotonic() + 60
        settled = "carrying on offline" if island else "phase idle"
        while time.monotonic() < end and not all(
                settled in (lab.workdir / f"agent-{n}.log").read_text(errors="replace") for n in names):
            time.sleep(0.5)
        # ... and the tunnelled ones reach the broker through the bridge before the release.
        while time.monotonic() < end + 30 and not all(
                "reaching the broker through peer" in (lab.workdir / f"agent-{n}.log").read_text(errors="replace")
                for n in tunnelling):
            time.sleep(0.5)

        wan.run("iptables-legacy", "-A", "OUTPUT", "-p", "tcp", "--sport", str(ORIGIN_PORT))
        result = IslandResult(devices=devices, artifact_size=size)
        started = time.monotonic()
        wan_side.release("2.0.0")
        while time.monotonic() - started < timeout and len(result.installed) < devices:
            now = time.monotonic() - started
            for name, state_file in states.items():
                if _installed_version(state_file) != "2.0.0":
                    continue
                if name == "bridge":
                    result.bridge_seconds = result.bridge_seconds or round(now, 1)
                else:
                    result.installed.setdefault(name, round(now, 1))
            time.sleep(0.5)
        result.origin_egress = egress_bytes(wan, ORIGIN_PORT)
        # Each device's report of 2.0.0 in the fleet record: relayed by the bridge on the island.
        result.reported, result.heard = wan_side.wait_recorded(names, len(result.installed), 20)
        for name in sorted(tunnelling):
            # Its report through the tunnel replaces the copy the bridge carried while a node restart
            # (the end of a fetch) had dropped the tunnel for a moment.
            end = time.monotonic() + 30
            while result.heard.get(name) != "tunnel via bridge" and time.monotonic() < end:
                time.sleep(0.5)
                result.reported, result.heard = wan_side.wait_recorded(names, len(result.installed), 0)
            # Commands reach it through the tunnel. Asked up to three times: the embedded broker keeps
            # nothing for an anonymous session while the tunnel is down (DESIGN.md; Mosquitto does).
            log_file = lab.workdir / f"agent-{name}.log"
            for _ in range(3):
                wan_side.cli("fleet", "check", name, "--config", str(wan_side.config))
                end = time.monotonic() + 8
                while "CheckRequested" not in log_file.read_text(errors="replace") and time.monotonic() < end:
                    time.sleep(0.3)
                if "CheckRequested" in log_file.read_text(errors="replace"):
                    break
            result.commanded[name] = "CheckRequested" in log_file.read_text(errors="replace")
        result.logs = {name: (lab.workdir / f"agent-{name}.log").read_text(errors="replace") for name in spaces}
        return result
