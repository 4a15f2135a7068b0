"""`edgeswarm demo`: a whole fleet on this machine, from provisioning to every device on v2.

Starts the embedded broker and an origin IPFS node in this process, N device agents as separate
processes (each with its own IPFS node and state directory), releases v1 then v2 of two device
classes with deltas, shows the devices' progress live, and summarises what moved where.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console
from rich.live import Live
from rich.table import Table

from schemas import topics
from schemas.models import PeerAnnouncement, Phase
from services.operator.broker import EmbeddedBroker
from services.runtime.content import EmbeddedKuboNode, KuboConfig
from services.operator.fleet import FleetTracker
from services.operator.fleet_service import FleetService, OpsTokens
from services.operator.fleet_store import FleetStore
from services.operator.identities import DeviceIdentities
from services.runtime.messaging import MqttClient
from services.operator.home import OperatorHome
from services.demo.processes import AgentProcess
from services.demo.provision import DEFAULT_TARGET, DeviceSpec, provision
from services.operator.release import BuiltRelease, ReleasePipeline, publish_release
from services.demo.sample_images import RECIPES, build_image
from services.runtime.traffic import TrafficMeter

log = logging.getLogger(__name__)
FLEET = "demo"
CLASSES = ("ipc-x86_64", "gateway-armv7")


@dataclass
class DemoOptions:
    devices: int = 6
    timeout: float = 300.0
    keep: bool = False
    workdir: Path | None = None
    delta_bases: int = 3  # 0 ships full artifacts only (the baseline of benchmarks/fleet_bench.py)
    island: int = 0  # devices cut off from the broker: they update and report through their peers


@dataclass
class Island:
    """What cuts `count` devices off from the broker, and what takes their reports back: a broker
    address that accepts connections and never answers (as a firewall that swallows MQTT would),
    and the fleet service, which believes a report a peer carried only signed by its device."""

    count: int
    service: FleetService
    silent_port: int

    def heard(self, device: str) -> str | None:
        view = self.service.tracker.devices.get(device)
        return view.heard.describe(view.state) if view is not None and view.heard is not None else None


@dataclass
class DeviceResult:
    device: str
    device_class: str
    version: str
    sha256: str
    seconds: float | None
    bytes_from_origin: int
    bytes_from_peers: int
    phase: str
    used_delta: bool | None
    reason: str | None = None
    island: bool = False
    heard: str | None = None  # how the fleet service last heard it (with --island): direct, relayed by <peer>


@dataclass
class DemoResult:
    devices: list[DeviceResult] = field(default_factory=list)
    origin_egress_bytes: int = 0
    artifact_bytes: int = 0
    delta_bytes: int = 0
    wall_seconds: float = 0.0
    ok: bool = False
    workdir: str = ""

    def to_json(self) -> dict[str, object]:
        return {
            "devices": [
                {
                    "device": d.device, "class": d.device_class, "version": d.version, "sha256": d.sha256,
                    "seconds": d.seconds, "bytes_from_origin": d.bytes_from_origin,
                    "bytes_from_peers": d.bytes_from_peers, "phase": d.phase, "used_delta": d.used_delta,
                    "reason": d.reason, "island": d.island, "heard": d.heard,
                }
                for d in self.devices
            ],
            "origin_egress_bytes": self.origin_egress_bytes,
            "artifact_bytes": self.artifact_bytes,
            "delta_bytes": self.delta_bytes,
            "wall_seconds": round(self.wall_seconds, 2),
            "ok": self.ok,
        }


def fleet_table(tracker: FleetTracker, target: dict[str, str], title: str, caption: str = "",
                island: Island | None = None) -> Table:
    table = Table(title=title, caption=caption or None, expand=False)
    for column in ("device", "class", "installed", "phase", "progress", "target", "from origin", "from peers", "note"):
        table.add_column(column, justify="right" if column in ("progress", "from origin", "from peers") else "left",
                         no_wrap=column == "device")
    for device_class, views in tracker.by_class().items():
        for view in views:
            s = view.state
            if s is None:
                table.add_row(view.device, device_class, "?", "…", "", "", "", "", "")
                continue
            colour = {"done": "green", "failed": "red", "refused": "red", "idle": "white"}.get(s.phase.value, "yellow")
            bar = "█" * (s.progress // 10) + "░" * (10 - s.progress // 10)
            heard = island.heard(view.device) if island is not None else None
            note = (f"island: {heard}" if heard and heard != "direct" else
                    "offline" if view.online is False else "") + (s.reason or "")[:40]
            table.add_row(
                view.device, s.device_class, s.installed_version, f"[{colour}]{s.phase.value}[/]",
                f"{bar} {s.progress:3d}%", target.get(s.device_class, ""), _size(s.bytes_from_origin),
                _size(s.bytes_from_peers), note,
            )
    return table


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return str(n)


async def _wait_for(tracker: FleetTracker, client: MqttClient, agents: list[AgentProcess], predicate, timeout: float,  # noqa: ANN001
                    live: Live | None, render) -> bool:  # noqa: ANN001
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not predicate():
        remaining = end - loop.time()
        if remaining <= 0:
            return False
        _check_agents_run(agents)
        await tracker.follow(client, duration=min(0.25, remaining))
        if live is not None:
            live.update(render())
    return True


def _check_agents_run(agents: list[AgentProcess]) -> None:
    """An agent never exits by itself during the demo: one that did cannot report, so waiting for it
    would only end at the timeout (minutes) with nothing said. Say at once which one and why."""
    for agent in agents:
        if agent.alive():
            continue
        tail = agent.log_tail() or "(empty)"
        raise RuntimeError(f"device agent {agent.pid} exited with code {agent.returncode} before the fleet "
                           f"finished (--keep keeps every agent's log); its log ends with:\n{tail}")


async def run_demo(options: DemoOptions, console: Console, *, live_display: bool) -> DemoResult:
    workdir = options.workdir or Path(tempfile.mkdtemp(prefix="edgeswarm-demo-"))
    workdir.mkdir(parents=True, exist_ok=True)
    previous_cwd = Path.cwd()
    os.chdir(workdir)  # the embedded Kubo writes ./kubo.log
    agents: list[AgentProcess] = []
    result = DemoResult(workdir=str(workdir))
    started = time.monotonic()
    try:
        images = workdir / "images"
        images.mkdir()
        console.log(f"work directory {workdir}")
        # Port 0 everywhere: each listener takes a free port as it binds, so nothing else can take it first.
        # Agents stop first on every way out (the end, an error, Ctrl-C), while the broker and the origin
        # still run: an agent still starting up waits on them and would not notice SIGTERM.
        async with EmbeddedBroker("127.0.0.1", 0) as broker, EmbeddedKuboNode(
            KuboConfig(repo=workdir / "origin" / "ipfs", swarm_port=0)
        ) as origin, _agents_stopped_on_exit(agents, console):
            broker_port = broker.port
            home = OperatorHome(workdir / "operator")
            home.init(FLEET)
            console.log(f"operator keys and root v1 in {home.path}; origin IPFS node {origin.peer_id[:16]}…")
            pipeline = ReleasePipeline(home, origin, delta_bases=options.delta_bases)
            firmware: dict[tuple[str, str], Path] = {}
            for device_class in CLASSES:
                for version in RECIPES[device_class]:
                    firmware[(device_class, version)] = build_image(
                        device_class, version, images / f"{device_class}-{version}.img"
                    )
            async with (MqttClient("127.0.0.1", broker_port, "edgeswarm-demo-operator", clean_session=True) as client,
                        contextlib.AsyncExitStack() as stack):
                for device_class in CLASSES:
                    v1 = await pipeline.build(device_class, "1.0.0", firmware[(device_class, "1.0.0")], target=DEFAULT_TARGET)
                    await publish_release(client, home, device_class, v1.envelope)
                tracker = FleetTracker(FLEET)
                await tracker.subscribe(client)
                island = await stack.enter_async_context(_island(options.island, home, broker_port, workdir))

                island_ids: set[str] = set()

                def start_device(index: int, broker_port: int, peers: tuple[str, ...],
                                 content: tuple[tuple[str, str], ...] = (),
                                 mqtt: tuple[tuple[str, str], ...] = ()) -> str:
                    device_class = CLASSES[index % len(CLASSES)]
                    spec = DeviceSpec(
                        device_id=f"{device_class.split('-')[0]}-{index + 1:02d}", fleet=FLEET, device_class=device_class,
                        base_dir=workdir / "devices" / f"device-{index + 1:02d}", swarm_port=0,
                        broker_host="127.0.0.1", broker_port=broker_port, root_file=home.root_file,
                        identities_dir=home.identities_dir,
                        firmware=firmware[(device_class, "1.0.0")], firmware_version="1.0.0",
                        peers=(origin.multiaddr, *peers), origin=origin.multiaddr, content_settings=content,
                        mqtt_settings=mqtt,
                    )
                    agent = AgentProcess(provision(spec), spec.base_dir / "agent.log")
                    agent.start()
                    agents.append(agent)
                    return spec.device_id

                connected = options.devices - options.island
                for index in range(connected):
                    # With an island, the connected devices announce where they can be dialed (the rendezvous).
                    start_device(index, broker_port, (), (("rendezvous", "true"),) if island is not None else ())
                if island is not None:
                    # Island devices know their neighbours as a LAN would tell them (here: the addresses the
                    # connected devices announced on the broker, which the island devices cannot read).
                    neighbours = await _announced_addresses(client, connected, agents)
                    # They stay on the gossip path the demo shows: no tunnel to the broker through a
                    # neighbour (docs/p2p.md), which a slow machine could otherwise reach after 60 s.
                    island_ids = {start_device(index, island.silent_port, neighbours, mqtt=(("tunnel_after", "0"),))
                                  for index in range(connected, options.devices)}
                    console.log(f"{options.island} island device(s) get a broker address that never answers: they "
                                "hear releases from their peers and send their signed reports back through them")
                console.log(f"started {len(agents)} device agents (PIDs {', '.join(str(a.pid) for a in agents)})")

                target: dict[str, str] = {c: "1.0.0" for c in CLASSES}
                live = Live(console=console, refresh_per_second=4, transient=False) if live_display else None
                with live or contextlib.nullcontext():
                    def starting() -> str:
                        ready = sum(1 for v in tracker.devices.values() if v.state and v.state.last_sequence >= 1)
                        return (f"starting {options.devices} device agents: each starts its IPFS node, connects to "
                                f"the broker and verifies release 1.0.0 ({ready}/{options.devices} ready)")

                    stage = starting
                    render = lambda: fleet_table(tracker, target, "edgeswarm demo fleet", stage(), island)  # noqa: E731
                    if live is None:
                        console.log(f"waiting for the {options.devices} devices to verify release 1.0.0")
                    ready = await _wait_for(
                        tracker, client, agents,
                        lambda: len(tracker.devices) >= options.devices
                        and all(v.state and v.state.last_sequence >= 1 for v in tracker.devices.values()),
                        options.timeout / 2, live, render,
                    )
                    if not ready:
                        raise RuntimeError("devices did not come up on v1: see agent.log files in " + str(workdir))
                    meter = TrafficMeter(origin.config.swarm_port)
                    before = meter.snapshot()
                    released_at = time.monotonic()
                    releases: dict[str, BuiltRelease] = {}
                    for device_class in CLASSES:
                        releases[device_class] = await pipeline.build(
                            device_class, "2.0.0", firmware[(device_class, "2.0.0")], target=DEFAULT_TARGET,
                            summary=f"{device_class} 2.0.0: adds packages to the demo image",
                        )
                        await publish_release(client, home, device_class, releases[device_class].envelope)
                        target[device_class] = "2.0.0"
                    stage = lambda: ("released 2.0.0: devices verify it, fetch its delta from peers and the origin, "  # noqa: E731
                                     "patch, install and confirm")
                    if live is None:
                        console.log("released 2.0.0 for " + ", ".join(CLASSES))

                    def finished() -> bool:
                        states = [v.state for v in tracker.devices.values()]
                        return all(
                            s is not None and (s.installed_version == "2.0.0" and s.phase == Phase.DONE)
                            or (s is not None and s.phase == Phase.FAILED and "retry" not in (s.reason or ""))
                            for s in states
                        )

                    await _wait_for(tracker, client, agents, finished, options.timeout, live, render)
                    after = meter.snapshot()
                result.origin_egress_bytes = sum(
                    s.bytes_sent - (before[k].bytes_sent if k in before else 0) for k, s in after.items()
                )
                result.artifact_bytes = sum(r.manifest.artifact.size for r in releases.values())
                result.delta_bytes = sum(r.delta_bytes for r in releases.values())
                for view in sorted(tracker.devices.values(), key=lambda v: v.device):
                    s = view.state
                    assert s is not None
                    result.devices.append(DeviceResult(
                        device=s.device, device_class=s.device_class, version=s.installed_version,
                        sha256=s.installed_sha256,
                        seconds=round(s.update_millis / 1000, 3) if s.update_millis is not None else None,
                        bytes_from_origin=s.bytes_from_origin, bytes_from_peers=s.bytes_from_peers,
                        phase=s.phase.value, used_delta=s.used_delta, reason=s.reason,
                        island=s.device in island_ids,
                        heard=island.heard(s.device) if island is not None else None,
                    ))
                expected = {c: releases[c].manifest.artifact.sha256 for c in CLASSES}
                result.ok = len(result.devices) == options.devices and all(
                    d.version == "2.0.0" and d.sha256 == expected[d.device_class] for d in result.devices
                )
                result.wall_seconds = time.monotonic() - released_at
    finally:
        # A second Ctrl-C must not cut this short: the agents would keep running and the work
        # directory (with the operator's private keys) would stay behind. Stopping is bounded instead.
        with _interrupts_deferred(console):
            _stop_all(agents, console)
            os.chdir(previous_cwd)
            if not options.keep:
                shutil.rmtree(workdir, ignore_errors=True)
                if workdir.exists():
                    console.print(f"[bold red]could not remove the work directory {workdir}: remove it by hand[/]")
    log.debug("demo took %.1f s in all", time.monotonic() - started)
    return result


@contextlib.asynccontextmanager
async def _island(count: int, home: OperatorHome, broker_port: int, workdir: Path) -> AsyncIterator[Island | None]:
    """With `count` > 0: a silent broker address for the island devices, and the fleet service (on the
    real broker) that takes their reports back from the peers that carry them."""
    if count == 0:
        yield None
        return

    async def swallow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError):
            while await reader.read(65536):
                pass  # accepted and never answered
        writer.close()

    silent = await asyncio.start_server(swallow, "127.0.0.1", 0)
    service = FleetService(FLEET, FleetStore.sqlite(workdir / "operator" / "fleet.sqlite"),
                           OpsTokens.load_or_create(home.path / "tokens"), home.root(),
                           identities=DeviceIdentities(home.identities_dir))
    stop = asyncio.Event()
    client = MqttClient("127.0.0.1", broker_port, "edgeswarm-demo-fleet-service", clean_session=True)
    async with client:
        running = asyncio.ensure_future(service.run(client, stop))
        try:
            yield Island(count, service, silent.sockets[0].getsockname()[1])
        finally:
            stop.set()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(running, 10)
            service.store.close()
            silent.close()


async def _announced_addresses(client: MqttClient, devices: int, agents: list[AgentProcess],
                               timeout: float = 60.0) -> tuple[str, ...]:
    """The addresses the first `devices` devices announced on the rendezvous (retained peer topics)."""
    addresses: dict[str, list[str]] = {}
    async with MqttClient("127.0.0.1", client.port, "edgeswarm-demo-neighbours", clean_session=True) as reader:
        await reader.subscribe(topics.all_devices_wildcard(FLEET, "peer"))
        loop = asyncio.get_running_loop()
        end = loop.time() + timeout
        while len(addresses) < devices:
            _check_agents_run(agents)
            if loop.time() > end:
                raise RuntimeError(f"only {len(addresses)} of {devices} connected devices announced their address "
                                   "in time: the island devices would have no neighbour")
            with contextlib.suppress(TimeoutError):
                message = await reader.next_message(0.5)
                with contextlib.suppress(ValueError):
                    announced = PeerAnnouncement.model_validate_json(message.payload)
                    addresses[announced.device] = announced.addrs
    return tuple(addr for addrs in addresses.values() for addr in addrs[:1])


@contextlib.asynccontextmanager
async def _agents_stopped_on_exit(agents: list[AgentProcess], console: Console) -> AsyncIterator[None]:
    try:
        yield
    finally:
        with _interrupts_deferred(console):
            _stop_all(agents, console)


@contextlib.contextmanager
def _interrupts_deferred(console: Console) -> Iterator[None]:
    previous = signal.getsignal(signal.SIGINT)
    signal.signal(signal.SIGINT, lambda *_: console.print("still stopping the device agents (at most 10 s); "
                                                          "the work directory is removed after them"))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _stop_all(agents: list[AgentProcess], console: Console, timeout: float = 10.0) -> None:
    """SIGTERM to every agent at once, then SIGKILL to any still running after `timeout`."""
    running = [a for a in agents if a.alive()]
    if not running:
        return
    console.print(f"stopping {len(running)} device agents (PIDs {', '.join(str(a.pid) for a in running)})")
    for agent in running:
        agent.signal(signal.SIGTERM)
    end = time.monotonic() + timeout
    while any(a.alive() for a in running) and time.monotonic() < end:
        time.sleep(0.05)
    for agent in running:
        agent.kill()  # a no-op for those that stopped
    console.print(f"stopped {len(running)} device agents")


def summary_table(result: DemoResult) -> Table:
    table = Table(title="summary: v1 → v2")
    island = any(d.island for d in result.devices)  # then: how the fleet service heard each device's report
    for column in ("device", "class", "version", "sha256", "delta", "seconds", "from origin", "from peers",
                   *(("report heard",) if island else ())):
        table.add_column(column, justify="right" if column in ("seconds", "from origin", "from peers") else "left",
                         no_wrap=column == "device")
    for d in result.devices:
        table.add_row(
            d.device, d.device_class, d.version if d.phase == "done" else f"{d.version} ({d.phase})", d.sha256[:12],
            {True: "yes", False: "no", None: "-"}[d.used_delta], f"{d.seconds:.2f}" if d.seconds is not None else "-",
            _size(d.bytes_from_origin), _size(d.bytes_from_peers),
            *(((f"island: {d.heard}" if d.island else d.heard) or "?",) if island else ()),
        )
    return table


def print_summary(result: DemoResult, console: Console) -> None:
    console.print(summary_table(result))
    ratio = result.delta_bytes / result.artifact_bytes if result.artifact_bytes else 0.0
    from_origin = sum(d.bytes_from_origin for d in result.devices)
    from_peers = sum(d.bytes_from_peers for d in result.devices)
    console.print(
        f"origin egress {_size(result.origin_egress_bytes)} for {len(result.devices)} devices "
        f"(full artifacts {_size(result.artifact_bytes)}, deltas {_size(result.delta_bytes)}: delta/full {ratio:.3f}); "
        f"devices received {_size(from_origin)} from the origin and {_size(from_peers)} from peers; "
        f"fleet updated in {result.wall_seconds:.1f} s"
    )
    console.print("[bold green]all devices run 2.0.0[/]" if result.ok else "[bold red]not every device reached 2.0.0[/]")
