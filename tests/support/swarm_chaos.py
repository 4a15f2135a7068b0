"""Faults on the links and devices of a swarm in the NAT lab (issue 15, item 4).

While a release spreads through a `FleetLab`, a `FaultInjector` (one thread) cuts one router's
uplink for a while, drops a share of the packets on some devices' links (iptables `statistic`) and
restarts half the devices at random moments of their fetch: SIGKILL (power cut) or SIGTERM
(shutdown), down for a few seconds, then the same agent on the same disk. Every moment is drawn
from a seeded `random.Random`, so a run repeats from its printed seed. Afterwards every device is
judged by the same rules as a power cut (tests/support/device_invariants.py).
"""

from __future__ import annotations

import json
import random
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from schemas.models import DeviceState
from services.runtime.files import sha256_file
from tests.support.device_invariants import Evidence, Floors, Verdict, active_sha256, group_members, leftovers, problems, read_floors
from tests.support.netlab import Router
from tests.support.p2p_scenario import FleetLab, Plan, Result

KEPT = {"firmware.img.previous"}  # the lab's devices install with the file handler
SIGNALS = {"SIGKILL": signal.SIGKILL, "SIGTERM": signal.SIGTERM}


@dataclass(frozen=True)
class Partition:
    router: int  # index into the lab's routers that have devices (an outer router of a double NAT has none)
    at: float  # seconds after the release was published
    seconds: float


@dataclass(frozen=True)
class Churn:
    device: str
    into_fetch: float  # seconds after the device's state first says downloading
    how: str  # a key of SIGNALS
    down: float  # seconds before it starts again


@dataclass(frozen=True)
class SwarmFaults:
    partition: Partition | None
    loss: dict[str, float]  # device -> percent of packets dropped each way on its link
    churn: tuple[Churn, ...]

    def describe(self) -> str:
        parts = []
        if self.partition:
            parts.append(f"router {self.partition.router + 1}'s uplink cut {self.partition.at:.1f} s in "
                         f"for {self.partition.seconds:.0f} s")
        if self.loss:
            parts.append("loss " + ", ".join(f"{d} {p:.0f}%" for d, p in sorted(self.loss.items())))
        if self.churn:
            parts.append(f"{len(self.churn)} devices restarted during their fetch")
        return "; ".join(parts) or "no faults"


def plan_swarm_faults(rng: random.Random, routers: int, devices: list[str], *, partition_seconds: tuple[float, float],
                      partition_at: tuple[float, float], lossy: int, loss_percent: tuple[float, float] = (10, 30),
                      churn_share: float = 0.5, into_fetch: tuple[float, float], down: tuple[float, float] = (1, 5)
                      ) -> SwarmFaults:
    """One draw of every fault for a lab of `routers` routers and `devices` devices."""
    partition = Partition(rng.randrange(routers), rng.uniform(*partition_at), rng.uniform(*partition_seconds)) \
        if routers and partition_seconds[1] > 0 else None
    loss = {d: round(rng.uniform(*loss_percent), 1) for d in rng.sample(devices, min(lossy, len(devices)))}
    restarted = rng.sample(devices, round(len(devices) * churn_share))
    churn = tuple(Churn(d, rng.uniform(*into_fetch), rng.choice(sorted(SIGNALS)), rng.uniform(*down))
                  for d in sorted(restarted))
    return SwarmFaults(partition, loss, churn)


@dataclass
class Landed:
    """What the injector really did, in seconds after the release was published."""

    partition: tuple[float, float] | None = None  # cut at, restored at
    restarts: list[dict] = field(default_factory=list)  # device, how, at, phase, down, stray_pids
    missed: list[str] = field(default_factory=list)  # devices already done when their restart came


def read_progress(state_file: Path) -> tuple[str | None, str | None]:
    """(the phase of the update a device's state.json records, "settled" without one; the version it
    says is installed), both None when it is unreadable (being replaced)."""
    try:
        state = json.loads(state_file.read_text())
    except (OSError, ValueError):
        return None, None
    pending = state.get("pending")
    return (pending["phase"] if pending else "settled"), state.get("installed_version")


class FaultInjector:
    """Applies `faults` to `fleet` from the moment the release was published until `stop()`."""

    def __init__(self, fleet: FleetLab, faults: SwarmFaults) -> None:
        self.fleet = fleet
        self.faults = faults
        self.landed = Landed()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._started = 0.0
        self._cut = False
        self._seen_fetching: dict[str, float] = {}
        self._down_until: dict[str, float] = {}
        self._done: set[str] = set()
        self._stopping: list[threading.Thread] = []

    def apply_loss(self) -> None:
        """Lossy links from the start (before the release): the devices live on them."""
        by_name = {name: ns for ns, _, name in self.fleet.devices}
        for device, percent in self.faults.loss.items():
            self.fleet.lab.lose(by_name[device], percent)

    def start(self, _published_wall: float) -> None:
        self._started = time.monotonic()
        self._thread = threading.Thread(target=self._run, name="fault-injector", daemon=True)
        self._thread.start()

    def stop(self) -> Landed:
        """Undo what still holds (the partition, a device still down) and return what landed."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(60)
        for thread in self._stopping:
            thread.join(60)
        if self._cut:
            self._restore()
        for device in list(self._down_until):
            self.fleet.start_agent(device)
            self._done.add(device)
        self._down_until.clear()
        return self.landed

    def _now(self) -> float:
        return time.monotonic() - self._started

    def _run(self) -> None:
        while not self._stop.wait(0.1):
            self._partition()
            for churn in self.faults.churn:
                self._churn(churn)

    def _partition(self) -> None:
        partition = self.faults.partition
        if partition is None:
            return
        now = self._now()
        if not self._cut and self.landed.partition is None and now >= partition.at:
            self.fleet.lab.cut_uplink(self._router())
            self._cut = True
            self.landed.partition = (round(now, 2), 0.0)
        elif self._cut and self.landed.partition is not None and now >= self.landed.partition[0] + partition.seconds:
            self._restore()

    def _restore(self) -> None:
        assert self.faults.partition is not None and self.landed.partition is not None
        self.fleet.lab.restore_uplink(self._router())
        self._cut = False
        self.landed.partition = (self.landed.partition[0], round(self._now(), 2))

    def _router(self) -> Router:
        assert self.faults.partition is not None
        return [r for r in self.fleet.lab.routers if r.devices][self.faults.partition.router]

    def _churn(self, churn: Churn) -> None:
        device, now = churn.device, self._now()
        if device in self._done:
            return
        if device in self._down_until:
            if now >= self._down_until[device]:
                del self._down_until[device]
                self.fleet.start_agent(device)
                self._done.add(device)
            return
        phase, installed = read_progress(self.fleet.specs[device].state_dir / "state.json")
        if phase == "settled" and installed == "2.0.0":  # finished before its moment: not a restart mid-fetch
            self._done.add(device)
            self.landed.missed.append(device)
            return
        if device not in self._seen_fetching:
            if phase == "downloading":
                self._seen_fetching[device] = now
            return
        if now < self._seen_fetching[device] + churn.into_fetch:
            return
        self._down_until[device] = float("inf")  # until its stop is over
        thread = threading.Thread(target=self._restart, args=(churn, now, phase), name=f"restart-{device}", daemon=True)
        self._stopping.append(thread)
        thread.start()

    def _restart(self, churn: Churn, at: float, phase: str | None) -> None:
        """Stop one device (a graceful stop may take a moment) on a thread of its own, so that the
        partition and the other devices keep their moments."""
        pid = self.fleet.agent_pids[churn.device]
        self.fleet.stop_agent(churn.device, SIGNALS[churn.how])
        stopped = self._now()
        self.landed.restarts.append({"device": churn.device, "how": churn.how, "at": round(at, 2), "phase": phase,
                                     "stop_seconds": round(stopped - at, 2), "down": round(churn.down, 2),
                                     "stray_pids": group_members(pid)})
        self._down_until[churn.device] = stopped + churn.down


def judge(fleet: FleetLab, before: dict[str, Floors]) -> dict[str, Verdict]:
    """Every device of the lab, after the release settled, against the signed versions."""
    signed = {sha256_file(path): version for version, path in fleet.artifacts.items()}
    reported = fleet.states()
    verdicts = {}
    for _, _, name in fleet.devices:
        spec = fleet.specs[name]
        try:
            persisted = json.loads((spec.state_dir / "state.json").read_text())
        except (OSError, ValueError):
            persisted = None
        state = dict(reported.get(name) or {})
        state.pop("online", None)  # the status view's, not the device's
        evidence = Evidence(
            active_sha256=active_sha256(spec.installed_file), persisted=persisted,
            reported=DeviceState.model_validate_json(json.dumps(state)) if "installed_version" in state else None,
            floors=read_floors(spec.state_dir, spec.base_dir / "provisioned-root.json"),
            leftovers=leftovers(spec.state_dir, spec.installed_file.parent, spec.installed_file, KEPT))
        verdicts[name] = problems(evidence, signed, before[name])
    return verdicts


def floors(fleet: FleetLab) -> dict[str, Floors]:
    return {name: read_floors(fleet.specs[name].state_dir, fleet.specs[name].base_dir / "provisioned-root.json")
            for _, _, name in fleet.devices}


@dataclass
class SwarmOutcome:
    faults: SwarmFaults | None
    result: Result
    landed: Landed | None
    verdicts: dict[str, Verdict]

    @property
    def problems(self) -> list[str]:
        found = [f"{device}: {p}" for device, verdict in sorted(self.verdicts.items()) for p in verdict.problems]
        found += [f"{device}: not on 2.0.0" for device, verdict in sorted(self.verdicts.items())
                  if verdict.version != "2.0.0"]
        if self.result.completion_seconds is None:
            found.append("the fleet did not finish in time")
        for restart in self.landed.restarts if self.landed else []:
            found += [f"{restart['device']}: process {pid} outlived its {restart['how']}" for pid in restart["stray_pids"]]
        return found


def run_swarm(workdir: Path, plan: Plan, faults: SwarmFaults | None) -> SwarmOutcome:
    """Build the lab of `plan`, release 2.0.0 with `faults` injected (None: a fault-free run), judge."""
    with FleetLab(workdir, plan) as fleet:
        fleet.build()
        before = floors(fleet)
        injector = FaultInjector(fleet, faults) if faults else None
        landed = None
        if injector is not None:
            injector.apply_loss()
        try:
            result = fleet.release(on_published=injector.start if injector else None)
        finally:
            if injector is not None:
                landed = injector.stop()
        # A device restarted after it reported done sends its settled state again: let it land.
        time.sleep(2)
        return SwarmOutcome(faults, result, landed, judge(fleet, before))
