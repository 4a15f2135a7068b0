"""A whole fleet in the NAT lab: broker and origin on the WAN, device agents behind NAT routers,
one release, and what it cost (used by tests/lab/test_p2p.py and benchmarks/p2p_bench.py).

Every part is the real one, each in its own process and namespace: the embedded amqtt broker and
the origin node in the WAN host's namespace, `edgeswarm device run` in each device's. The operator
CLI runs in the WAN host's namespace too, as it would on a machine next to the broker. An HTTP
baseline serves the same artifact from the same WAN host to the same device namespaces.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import datetime
from dataclasses import asdict, dataclass, field
from pathlib import Path

from services.demo.processes import PARENT_ENV
from services.demo.provision import DeviceSpec, provision
from tests.support.netlab import Namespace, NatLab, Router, RouterKind
from tests.support.swarm_timeline import DeviceTimeline, TimelineSampler, Watched, cpu_seconds, log_events

FLEET = "lab"
CLASS = "gw"
BROKER_PORT = 1883
ORIGIN_PORT = 4001
HTTP_PORT = 8080
PY = sys.executable


@dataclass(frozen=True)
class NatPlan:
    kind: RouterKind
    devices: int
    behind: RouterKind | None = None  # double NAT: this router sits on the LAN of another of this kind
    forward: bool = False  # a static port forward to its first device, announced by that device

    @property
    def label(self) -> str:
        return f"{self.kind} behind {self.behind}" if self.behind else self.kind


def nat_plan(devices: int, nats: int) -> tuple[NatPlan, ...]:
    """The benchmarks' lab: `devices` spread over `nats` routers, three UPnP, one MASQUERADE, one symmetric."""
    kinds = (["upnp"] * 3 + ["masquerade", "symmetric"]) if nats >= 5 else (["upnp", "masquerade", "symmetric", "upnp"][:nats])
    kinds = (kinds + ["upnp"] * nats)[:nats]
    counts = [devices // nats + (1 if i < devices % nats else 0) for i in range(nats)]
    return tuple(NatPlan(kind, count) for kind, count in zip(kinds, counts, strict=True) if count)  # type: ignore[arg-type]


@dataclass(frozen=True)
class Plan:
    nats: tuple[NatPlan, ...]
    size: int = 8 << 20
    origin_mbit: float | None = None  # the origin host's uplink
    device_mbit: float | None = None  # every device's uplink and downlink
    origin_grace: float = 2.0
    rendezvous_peers: int = 32
    timeout: float = 300.0
    http_baseline: bool = False
    sample_interval: float | None = 1.0  # seconds between timeline samples; None: no timeline


@dataclass
class DeviceResult:
    device: str
    nat: str
    version: str
    seconds: float | None
    from_origin: int
    from_peers: int
    from_lan_peers: int
    peers_direct: int | None = None
    peers_relayed: int | None = None


@dataclass
class Result:
    artifact_size: int
    devices: list[DeviceResult] = field(default_factory=list)
    origin_egress: int = 0
    completion_seconds: float | None = None
    http_origin_egress: int | None = None
    http_completion_seconds: float | None = None
    http_device_seconds: list[float] = field(default_factory=list)
    timelines: list[DeviceTimeline] = field(default_factory=list)  # empty without Plan.sample_interval
    origin_cpu_seconds: float | None = None  # the origin's CPU time from the release to the last device's done
    sampling_cpu_seconds: float = 0.0  # what taking the timeline cost (CPU time of its counter listings)

    def to_json(self) -> dict:
        return asdict(self)


def egress_bytes(host: Namespace, port: int) -> int:
    """Bytes `host` sent from TCP `port`, by the counting rule `-A OUTPUT -p tcp --sport <port>` in its iptables."""
    out = host.run("iptables-legacy", "-L", "OUTPUT", "-v", "-x", "-n").stdout
    for line in out.splitlines():
        if f"spt:{port}" in line:
            return int(line.split()[1])
    return 0


class FleetLab:
    """Build the lab of `plan`, start everything, release once; `close()` removes it all."""

    def __init__(self, workdir: Path, plan: Plan) -> None:
        self.workdir = workdir
        self.plan = plan
        self.lab = NatLab(workdir / "lab")
        self.devices: list[tuple[Namespace, NatPlan, str]] = []
        self.agent_pids: dict[str, int] = {}  # `ip netns exec` execs the agent: its PID is the agent's
        self.specs: dict[str, DeviceSpec] = {}
        self._agents: dict[str, tuple[Namespace, list[str], dict[str, str]]] = {}  # how to start each again
        self._running: dict[str, subprocess.Popen[bytes]] = {}

    def __enter__(self) -> FleetLab:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.lab.close()

    # -- set-up ------------------------------------------------------------------------------

    def cli(self, *args: str, check: bool = True) -> str:
        result = self.wan.run(PY, "-m", "services.cli", *args, check=check)
        return result.stdout

    def build(self) -> None:
        lab, plan = self.lab, self.plan
        self.wan = lab.add_wan_host("origin")
        lab.start_stun(self.wan)
        self.forwards: dict[str, str] = {}  # device -> the address its router forwards to it
        self.router_of: dict[str, Router] = {}
        for nat in plan.nats:
            router = lab.add_router(nat.kind, behind=lab.add_router(nat.behind) if nat.behind else None)
            for i in range(nat.devices):
                name = f"d{len(self.devices) + 1:02d}"
                device = lab.add_device(router, name)
                self.router_of[name] = router
                if nat.forward and i == 0:
                    self.forwards[name] = lab.forward_port(router, device, 4100 + len(self.devices) + 1)
                self.devices.append((device, nat, name))
        if plan.origin_mbit:
            lab.shape(self.wan, rate_mbit=plan.origin_mbit)
        for router in lab.routers:
            if router.kind == "upnp":
                lab.start_upnp(router)
        home = self.workdir / "operator"
        self.config = self.workdir / "operator.toml"
        self.config.write_text(
            f'fleet = "{FLEET}"\nhome = "{home}"\ndelta_bases = 0\n'
            f'[mqtt]\nhost = "{self.wan.ip}"\nport = {BROKER_PORT}\n'
            f'[content]\nlisten_host = "{self.wan.ip}"\nswarm_port = {ORIGIN_PORT}\nrouting = "none"\nmax_connections = 1\n'
        )
        self.cli("keys", "init", "--config", str(self.config))
        env = {PARENT_ENV: str(os.getpid())}
        lab.popen(self.wan, [PY, "-m", "services.cli", "broker", "run", "--host", self.wan.ip, "--port", str(BROKER_PORT)],
                  "broker.log", env=env)
        self.origin_pid = lab.popen(self.wan, [PY, "-m", "services.cli", "origin", "--config", str(self.config)],
                                    "origin.log", env=env, cwd=self.workdir).pid
        address_file = home / "origin" / "multiaddr"
        if not _wait(lambda: address_file.exists(), 60, None):
            log = (lab.workdir / "origin.log").read_text(errors="replace")[-2000:]
            raise TimeoutError(f"the origin node did not start:\n{log}")
        self.origin = address_file.read_text().splitlines()[0]
        self.artifacts = {v: self.workdir / f"fw-{v}.img" for v in ("1.0.0", "2.0.0")}
        for path in self.artifacts.values():
            path.write_bytes(os.urandom(plan.size))
        for ns, _, name in self.devices:
            spec = DeviceSpec(
                device_id=name, fleet=FLEET, device_class=CLASS, base_dir=self.workdir / "devices" / name,
                swarm_port=4001, broker_host=self.wan.ip, broker_port=BROKER_PORT, root_file=home / "root.json",
                firmware=self.artifacts["1.0.0"], firmware_version="1.0.0", peers=(self.origin,), origin=self.origin,
                stall_timeout=60, retry_interval=5,
                content_settings=(("listen_host", "0.0.0.0"), ("mdns", "true"), ("nat_pmp", "true"),
                                  ("rendezvous", "true"), ("origin_grace", str(plan.origin_grace)), ("routing", "none"),
                                  ("rendezvous_peers", str(plan.rendezvous_peers))),
            )
            config = provision(spec)
            self.specs[name] = spec
            announce = {"EDGESWARM_CONTENT__ANNOUNCE": json.dumps([self.forwards[name]])} if name in self.forwards else {}
            self._agents[name] = (ns, [PY, "-m", "services.cli", "device", "run", "--config", str(config)],
                                  {**env, **announce})
            self.start_agent(name)
            if plan.device_mbit:
                lab.shape(ns, rate_mbit=plan.device_mbit)
                lab.shape(self.router_of[name], rate_mbit=plan.device_mbit, interface=lab.lan_port(ns))
        _wait(lambda: len([d for d in self.states().values() if d.get("phase") in ("idle", "frozen")]) == len(self.devices),
              90, "devices did not all report")
        self.wan.run("iptables-legacy", "-A", "OUTPUT", "-p", "tcp", "--sport", str(ORIGIN_PORT))
        self.wan.run("iptables-legacy", "-A", "OUTPUT", "-p", "tcp", "--sport", str(HTTP_PORT))

    def start_agent(self, name: str) -> None:
        ns, argv, env = self._agents[name]
        process = self.lab.popen(ns, argv, f"agent-{name}.log", env=env)
        self._running[name], self.agent_pids[name] = process, process.pid

    def stop_agent(self, name: str, sig: int) -> None:
        """Stop a device's agent with `sig` (SIGKILL: its power is cut) and wait until its whole
        process group is gone; start_agent() brings it back on the same disk."""
        process = self._running.pop(name)
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            pass
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()

    # -- observing ---------------------------------------------------------------------------

    def states(self) -> dict[str, dict]:
        out = self.cli("fleet", "status", "--config", str(self.config), "--json", "--wait", "1", check=False)
        try:
            return {d["device"]: d for d in json.loads(out)["devices"]}
        except (ValueError, KeyError):
            return {}

    def egress(self, port: int) -> int:
        return egress_bytes(self.wan, port)

    # -- the release and the baseline -----------------------------------------------------------

    def release(self, on_published: Callable[[float], None] | None = None) -> Result:
        """Release 2.0.0 and wait until every device reports it done; `on_published(started)` runs
        once the release command returned (faults start there)."""
        result = Result(artifact_size=self.plan.size)
        before = self.egress(ORIGIN_PORT)
        started = time.time()  # wall clock: the devices' reports carry their own (same machine) timestamps
        sampler = self._sampler()
        origin_cpu = cpu_seconds(self.origin_pid)
        if sampler is not None:
            sampler.start(started)
        try:
            self.cli("release", CLASS, "2.0.0", str(self.artifacts["2.0.0"]), "--config", str(self.config))
            if on_published is not None:
                on_published(started)
            self._await_done(result, started)
        finally:
            device_cpu = sampler.stop() if sampler is not None else {}
        result.origin_egress = self.egress(ORIGIN_PORT) - before
        origin_cpu_now = cpu_seconds(self.origin_pid)
        if origin_cpu is not None and origin_cpu_now is not None:
            result.origin_cpu_seconds = round(origin_cpu_now - origin_cpu, 2)
        if sampler is not None:
            result.sampling_cpu_seconds = round(sampler.sample_cpu_seconds, 2)
            for d in result.devices:
                restarts, dials = log_events((self.lab.workdir / f"agent-{d.device}.log").read_text(errors="replace"),
                                             started)
                result.timelines.append(DeviceTimeline(
                    device=d.device, nat=d.nat, samples=sampler.samples[d.device], done_seconds=d.seconds,
                    cpu_seconds=device_cpu.get(self.agent_pids[d.device]), restarts=restarts, origin_dials=dials))
        return result

    def _sampler(self) -> TimelineSampler | None:
        if self.plan.sample_interval is None:
            return None
        watched = [Watched(name, ns.name, ns.ip.rsplit(".", 1)[0], self.agent_pids[name]) for ns, _, name in self.devices]
        return TimelineSampler(watched, origin_ip=self.wan.ip, broker_port=BROKER_PORT, interval=self.plan.sample_interval)

    def _await_done(self, result: Result, started: float) -> None:
        done: dict[str, dict] = {}

        def all_done() -> bool:
            for device, state in self.states().items():
                # `idle` on 2.0.0: a device restarted right after its `done` (a chaos run), whose
                # retained report the poll never saw; its report's time is then an upper bound.
                if state.get("installed_version") == "2.0.0" and state.get("phase") in ("done", "idle"):
                    # From the release to the device's own `done` report: polling (a CLI process per
                    # poll, slow on a loaded machine) would round every device up to the same poll.
                    reported = datetime.fromisoformat(state["timestamp"]).timestamp()
                    done.setdefault(device, {**state, "seen": reported - started})
            return len(done) == len(self.devices)

        finished = _wait(all_done, self.plan.timeout, None)
        result.completion_seconds = round(max(d["seen"] for d in done.values()), 2) if finished else None
        last = self.states()
        for ns, nat, name in self.devices:
            state = done.get(name) or last.get(name, {})
            result.devices.append(DeviceResult(
                device=name, nat=nat.label, version=state.get("installed_version", "?"),
                # Not update_millis: that covers only the last attempt when a stalled fetch was retried.
                seconds=round(state["seen"], 1) if "seen" in state else None,
                from_origin=state.get("bytes_from_origin", 0), from_peers=state.get("bytes_from_peers", 0),
                from_lan_peers=state.get("bytes_from_lan_peers", 0),
                peers_direct=state.get("peers_direct"), peers_relayed=state.get("peers_relayed"),
            ))

    def http_baseline(self, result: Result) -> None:
        """Every device downloads the same artifact over plain HTTP from the WAN host, all at once."""
        serve_dir = self.workdir / "http"
        serve_dir.mkdir(exist_ok=True)
        (serve_dir / "fw.img").write_bytes(self.artifacts["2.0.0"].read_bytes())
        self.lab.popen(self.wan, [PY, "-m", "http.server", str(HTTP_PORT), "--bind", self.wan.ip, "--directory",
                                  str(serve_dir)], "http.log")
        _wait(lambda: f":{HTTP_PORT} " in self.wan.run("ss", "-ltn").stdout, 20, "http.server did not start")
        before = self.egress(HTTP_PORT)
        url = f"http://{self.wan.ip}:{HTTP_PORT}/fw.img"
        script = ("import sys,time,urllib.request;t=time.monotonic();"
                  "d=urllib.request.urlopen(sys.argv[1],timeout=600).read();print(len(d),time.monotonic()-t)")
        started = time.monotonic()
        clients = [self.lab.popen(ns, [PY, "-c", script, url], f"http-{name}.log") for ns, _, name in self.devices]
        for client in clients:
            client.wait(self.plan.timeout)
        result.http_completion_seconds = round(time.monotonic() - started, 2)
        result.http_origin_egress = self.egress(HTTP_PORT) - before
        for _, _, name in self.devices:
            size, seconds = (self.lab.workdir / f"http-{name}.log").read_text().split()[:2]
            if int(size) != self.plan.size:
                raise RuntimeError(f"{name} downloaded {size} bytes over HTTP, expected {self.plan.size}")
            result.http_device_seconds.append(round(float(seconds), 2))


def _wait(predicate, timeout: float, message: str | None) -> bool:  # noqa: ANN001
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(0.5)
    if message is not None:
        raise TimeoutError(message)
    return False
