"""The staged-rollout rules (services.operator.rollout, services.runtime.trust.rollout_admits): pure, so tested exhaustively here."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pydantic
import pytest
from hypothesis import given
from hypothesis import strategies as st

from schemas.models import CommandName, DeviceCommand, Phase, RolloutRule
from schemas.ops import RolloutPlan, RolloutState, Wave
from services.operator.fleet_service import OpsTokens
from services.operator.rollout import RESEND_AFTER, Member, Rollout
from services.runtime.trust import BUCKETS, Admission, rollout_admits, rollout_bucket
from tests.support.factories import manifest as make_manifest

T0 = datetime(2026, 11, 25, 12, 0, tzinfo=UTC)
SALT = "0123456789abcdef"
DIGEST = "d" * 64


def plan(*waves: Wave, soak: int = 0, failed_percent: int = 20) -> RolloutPlan:
    return RolloutPlan(device_class="ipc", version="2.0.0", waves=list(waves), soak_seconds=soak,
                       max_failed_percent=failed_percent)


def pct(p: int) -> Wave:
    return Wave(percent=p)


def on_v1(device: str, phase: Phase = Phase.WAITING, online: bool = True) -> Member:
    return Member(device, "1.0.0", phase, "2.0.0", online)


def done(device: str) -> Member:
    return Member(device, "2.0.0", Phase.DONE, "2.0.0", True)


def failed(device: str, phase: Phase = Phase.ROLLED_BACK, retrying: bool = False) -> Member:
    return Member(device, "1.0.0", phase, "2.0.0", True, retrying)


def fleet(n: int) -> dict[str, Member]:
    return {f"d{i:02d}": on_v1(f"d{i:02d}") for i in range(n)}


def rollout(p: RolloutPlan) -> Rollout:
    return Rollout(plan=p, sequence=7, salt=SALT, wave_started=T0)


def by_bucket(devices: list[str]) -> list[str]:
    return sorted(devices, key=lambda d: (rollout_bucket(SALT, d), d))


# -- membership --------------------------------------------------------------------------------


def test_percent_waves_are_cumulative_in_bucket_order_and_round_up() -> None:
    r = rollout(plan(pct(10), pct(50), pct(100)))
    devices = sorted(fleet(20))
    order = by_bucket(devices)
    assert r.members(devices, 0) == set(order[:2])
    assert r.members(devices, 1) == set(order[:10])
    assert r.members(devices, 2) == set(devices)
    assert rollout(plan(pct(1))).members(devices, 0) == {order[0]}  # 1% of 20 is still one device


def test_named_waves_take_only_known_devices_and_add_up() -> None:
    r = rollout(plan(Wave(devices=["d01", "ghost"]), pct(100)))
    assert r.members(["d00", "d01"], 0) == {"d01"}
    assert r.members(["d00", "d01"], 1) == {"d00", "d01"}


def test_the_signed_canary_devices_come_first_in_every_wave() -> None:
    manifest = make_manifest(version="2.0.0", sequence=7).model_copy(
        update={"rollout": RolloutRule(canary_percent=25, salt=SALT)})
    devices = [f"dev-{i}" for i in range(200)]
    canaries = {d for d in devices if rollout_admits(manifest, DIGEST, d, None)}
    assert 25 <= len(canaries) <= 75  # ~25% of 200
    first_wave = rollout(plan(pct(50))).members(devices, 0)
    assert canaries <= first_wave


@given(st.text(min_size=1, max_size=30), st.integers(0, 100))
def test_admission_follows_the_bucket_rule_or_an_install_command(device: str, percent: int) -> None:
    manifest = make_manifest(version="2.0.0", sequence=7).model_copy(
        update={"rollout": RolloutRule(canary_percent=percent, salt=SALT)})
    canary = rollout_bucket(SALT, device) < percent * BUCKETS // 100
    assert rollout_admits(manifest, DIGEST, device, None) == canary
    assert rollout_admits(manifest, DIGEST, device, Admission(7, DIGEST))  # the command for exactly this release
    assert rollout_admits(manifest, DIGEST, device, Admission(6, DIGEST)) == canary  # an older command does not carry over
    # A command for another release with the same sequence (a forged one, say) admits nothing.
    assert rollout_admits(manifest, DIGEST, device, Admission(7, "f" * 64)) == canary
    assert rollout_admits(make_manifest(version="2.0.0", sequence=7), DIGEST, device, None)  # not staged


@pytest.mark.parametrize(("salt", "device", "bucket"), [
    ("0123456789abcdef", "dev-1", 3661), ("0123456789abcdef", "gateway-7", 5350), ("fedcba9876543210", "dev-1", 4625),
])
def test_buckets_are_pinned_because_devices_and_the_service_must_agree(salt: str, device: str, bucket: int) -> None:
    """Known values (docs/wire-contract.md gives the formula): a change here would split a fleet's
    view of who is a canary between devices on the old and the new code."""
    assert rollout_bucket(salt, device) == bucket
    manifest = make_manifest(version="2.0.0", sequence=7).model_copy(
        update={"rollout": RolloutRule(canary_percent=37, salt=salt)})
    assert rollout_admits(manifest, DIGEST, device, None) == (bucket < 3700)


def test_buckets_are_spread_evenly() -> None:
    buckets = [rollout_bucket(SALT, f"device-{i}") for i in range(10_000)]
    below_half = sum(b < BUCKETS // 2 for b in buckets)
    assert 4_700 < below_half < 5_300
    devices = [f"device-{i}" for i in range(100)]
    other = sorted(devices, key=lambda d: rollout_bucket("fedcba9876543210", d))
    assert by_bucket(devices)[:10] != other[:10]  # a new release's salt picks other canaries


# -- commands and waves ------------------------------------------------------------------------


def test_a_wave_commands_its_devices_once_then_again_only_while_they_still_wait() -> None:
    r = rollout(plan(pct(50), pct(100)))
    f = fleet(4)
    first = r.step(f, T0)
    assert len(first) == 2 and set(first) == r.members(sorted(f), 0)
    assert r.step(f, T0 + timedelta(seconds=1)) == []
    assert sorted(r.step(f, T0 + RESEND_AFTER)) == sorted(first)  # still `waiting`: the command was lost
    f[first[0]] = on_v1(first[0], Phase.DOWNLOADING)
    assert r.step(f, T0 + 3 * RESEND_AFTER) == [first[1]]


def test_the_next_wave_starts_when_every_online_device_ended_and_the_soak_time_passed() -> None:
    r = rollout(plan(pct(50), pct(100), soak=60))
    f = fleet(4)
    first = r.step(f, T0)
    f[first[0]] = done(first[0])
    f[first[1]] = on_v1(first[1], online=False)  # offline: does not hold the fleet back
    assert r.step(f, T0 + timedelta(seconds=10)) == [] and r.wave_index == 0
    assert r.settled_at == T0 + timedelta(seconds=10)
    assert r.step(f, T0 + timedelta(seconds=69)) == [] and r.wave_index == 0
    second = r.step(f, T0 + timedelta(seconds=70))
    assert r.wave_index == 1 and set(second) == set(f) - set(first)
    for d in f:
        f[d] = done(d)
    r.step(f, T0 + timedelta(seconds=80))
    assert r.state == RolloutState.RUNNING  # soaking the last wave
    r.step(f, T0 + timedelta(seconds=140))
    assert r.state == RolloutState.COMPLETED


def test_a_device_that_fails_again_during_the_soak_resets_nothing_but_counts() -> None:
    r = rollout(plan(pct(100), soak=60, failed_percent=20))
    f = fleet(5)
    r.step(f, T0)
    for d in f:
        f[d] = done(d)
    r.step(f, T0 + timedelta(seconds=1))
    f["d00"] = failed("d00")  # a later report: rolled back by its health check
    f["d01"] = failed("d01")
    assert r.step(f, T0 + timedelta(seconds=30)) == []
    assert r.state == RolloutState.PAUSED and "2 of 5" in r.reason


def test_too_many_failures_pause_and_resume_accepts_them() -> None:
    r = rollout(plan(pct(40), pct(100), failed_percent=30))
    f = fleet(5)
    first = r.step(f, T0)
    assert len(first) == 2
    f[first[0]], f[first[1]] = failed(first[0]), done(first[1])
    assert r.step(f, T0 + timedelta(seconds=1)) == []
    assert r.state == RolloutState.PAUSED and first[0] in r.reason and "1 of 2" in r.reason
    assert r.step(f, T0 + timedelta(seconds=2)) == []  # paused: nothing moves
    r.resume(f)
    assert r.acknowledged == [first[0]] and r.state == RolloutState.RUNNING
    second = r.step(f, T0 + timedelta(seconds=3))
    assert r.wave_index == 1 and set(second) == set(f) - set(first)
    status = r.status(f, T0 + timedelta(seconds=3))
    assert (status.wave, status.failed, status.failure_rate) == (2, 1, 0.0)


def test_a_failure_with_a_retry_scheduled_is_not_a_failure_yet() -> None:
    r = rollout(plan(pct(100), failed_percent=0))
    f = {"d00": failed("d00", Phase.FAILED, retrying=True)}
    r.step(f, T0)
    assert r.state == RolloutState.RUNNING and r.outcome(f["d00"]) == "installing"
    f["d00"] = failed("d00", Phase.FAILED, retrying=False)
    r.step(f, T0 + timedelta(seconds=1))
    assert r.state == RolloutState.PAUSED


def test_abort_and_pause_send_nothing_and_reject_wrong_transitions() -> None:
    r = rollout(plan(pct(100)))
    f = fleet(3)
    r.pause("look at logs")
    assert r.step(f, T0) == [] and r.reason == "look at logs"
    with pytest.raises(ValueError, match="not running"):
        r.pause("")
    r.abort("")
    assert r.step(f, T0) == [] and r.state == RolloutState.ABORTED
    with pytest.raises(ValueError, match="not paused"):
        r.resume(f)
    with pytest.raises(ValueError, match="aborted already"):
        r.abort("")


def test_a_completed_rollout_still_admits_a_device_that_comes_back() -> None:
    r = rollout(plan(pct(100)))
    f = {"a": done("a"), "b": on_v1("b", online=False)}
    r.step(f, T0)
    assert r.state == RolloutState.COMPLETED
    f["b"] = on_v1("b")
    assert r.step(f, T0 + timedelta(seconds=1)) == ["b"]


def test_status_counts() -> None:
    r = rollout(plan(pct(100)))
    f = {"a": done("a"), "b": failed("b"), "c": on_v1("c", Phase.PATCHING), "d": on_v1("d")}
    s = r.status(f, T0)
    assert (s.done, s.failed, s.in_progress, s.waiting, s.class_devices, s.wave_devices) == (1, 1, 1, 1, 4, 4)
    assert s.failed_devices == ["b"] and s.failure_rate == 0.25


# -- wire models and tokens -----------------------------------------------------------------------


def test_wire_rules_for_plans_and_commands() -> None:
    with pytest.raises(pydantic.ValidationError, match="cumulative"):
        plan(pct(50), pct(10))
    with pytest.raises(pydantic.ValidationError, match="either"):
        Wave(percent=5, devices=["a"])
    with pytest.raises(pydantic.ValidationError, match="sequence"):
        DeviceCommand(command=CommandName.INSTALL)
    with pytest.raises(pydantic.ValidationError, match="release_sha256"):
        DeviceCommand(command=CommandName.INSTALL, sequence=3)  # an admission names the release by hash too
    with pytest.raises(pydantic.ValidationError, match="sequence"):
        DeviceCommand(command=CommandName.CHECK, sequence=3)
    assert DeviceCommand(command=CommandName.INSTALL, sequence=3, release_sha256=DIGEST).sequence == 3
    with pytest.raises(pydantic.ValidationError):
        RolloutRule(canary_percent=101, salt=SALT)


def test_tokens_are_created_private_and_scoped(tmp_path) -> None:  # noqa: ANN001
    tokens = OpsTokens.load_or_create(tmp_path / "tokens")
    assert tokens == OpsTokens.load_or_create(tmp_path / "tokens")  # stable across restarts
    assert (tmp_path / "tokens" / "operator").stat().st_mode & 0o777 == 0o600
    assert tokens.allows(tokens.operator, "rollout/start") and tokens.allows(tokens.operator, "device/retire")
    assert tokens.allows(tokens.homeassistant, "device/install") and tokens.allows(tokens.homeassistant, "device/check")
    assert not tokens.allows(tokens.homeassistant, "rollout/start") and not tokens.allows(tokens.homeassistant, "rollout/abort")
    assert not tokens.allows(tokens.homeassistant, "device/retire") and not tokens.allows("x" * 43, "device/check")


# -- the caches a large class needs --------------------------------------------------------------

phases = st.sampled_from([Phase.IDLE, Phase.WAITING, Phase.DOWNLOADING, Phase.DONE, Phase.FAILED, Phase.ROLLED_BACK])
changes = st.lists(st.tuples(st.integers(0, 29), phases, st.booleans(), st.sampled_from(["1.0.0", "2.0.0", None]),
                             st.booleans()), max_size=12)


@given(ticks=st.lists(changes, min_size=1, max_size=8), waves=st.sampled_from([(5, 50, 100), (34, 100), (100,)]))
def test_a_rollout_with_its_caches_decides_as_one_rebuilt_from_its_json_every_tick(
        ticks: list[list[tuple[int, Phase, bool, str | None, bool]]], waves: tuple[int, ...]) -> None:
    """The bucket order, waves and outcomes are cached between ticks (a class of 100,000 devices):
    a rollout that kept them decides exactly as one that starts from its persisted JSON each tick,
    while devices join, leave, report and go offline."""
    r = rollout(plan(*(pct(p) for p in waves), failed_percent=30))
    members: dict[str, Member] = {}
    now = T0
    for tick in ticks:
        for index, phase, online, installed, leave in tick:
            device = f"d{index:02d}"
            if leave:
                members.pop(device, None)
            else:
                target = "2.0.0" if phase != Phase.IDLE else None
                members[device] = Member(device, installed, phase, target, online)
        fresh = Rollout.model_validate_json(r.model_dump_json())
        assert r.step(members, now) == fresh.step(dict(members), now)
        assert r.model_dump_json() == fresh.model_dump_json()
        assert r.status(members, now) == fresh.status(dict(members), now)
        now += timedelta(seconds=30)


kinds = st.sampled_from(["ipc", "gw", "online", "offline", "cleared", "malformed", "other device's state"])


@given(messages=st.lists(st.tuples(st.sampled_from(["d1", "d2", "d3"]), kinds), max_size=25))
def test_the_members_a_tick_reads_are_kept_as_reports_arrive(
        tmp_path_factory: pytest.TempPathFactory, messages: list[tuple[str, str]]) -> None:
    """The fleet service no longer rebuilds every class's members from the tracker at each tick: what
    it keeps as messages arrive must be that rebuild, whatever came (a class change, a cleared
    retained report, online flags before the first report, garbage)."""
    import asyncio

    from schemas import topics
    from schemas.models import DeviceState
    from services.operator.fleet_service import FleetService
    from services.operator.fleet_store import FleetStore
    from services.runtime.messaging import Message
    from services.runtime.trust import TrustedSet
    from tests.support.factories import Keyring, sign_root

    keys = Keyring()
    directory = tmp_path_factory.mktemp("members")
    service = FleetService("f1", FleetStore.sqlite(directory / "fleet.sqlite"), OpsTokens.load_or_create(directory / "tokens"),
                           TrustedSet.load_initial_root(sign_root(keys.root_metadata(), keys.root[:2])))

    def state(device: str, device_class: str, claimed: str | None = None) -> bytes:
        return DeviceState(device=claimed or device, fleet="f1", device_class=device_class, installed_version="1.0.0",
                           installed_sha256="1" * 64, phase=Phase.IDLE, timestamp=T0).canonical_bytes()

    async def feed() -> None:
        for device, kind in messages:
            leaf = "online" if kind in ("online", "offline") else "state"
            payload = {"online": b"online", "offline": b"offline", "cleared": b"", "malformed": b"{",
                       "other device's state": state(device, "ipc", claimed="d9")}.get(kind) or state(device, kind)
            await service.handle(None, Message(topics.device_topic("f1", device, leaf), payload, True, 1))  # type: ignore[arg-type]

    asyncio.run(feed())
    rebuilt: dict[str, dict[str, Member]] = {}
    for device, view in service.tracker.devices.items():
        if view.state is not None:
            s = view.state
            rebuilt.setdefault(s.device_class, {})[device] = Member(device, s.installed_version, s.phase, s.target_version,
                                                                    view.online, bool(s.retrying))
    kept = {c: members for c, members in service._members.items() if members}
    assert kept == rebuilt
    service.flush()
    assert {r.device for r in service.store.devices() if r.device_class} >= set().union(*rebuilt.values())
    service.store.close()
