"""A locked-down Mosquitto configuration for one fleet: TLS, per-principal credentials, ACLs.

Principals and what the ACL lets them do (everything else is denied; Mosquitto drops a denied
publish silently and never delivers a denied subscription):

| principal | publish | subscribe |
|---|---|---|
| device `<id>` (class C) | its own `devices/<id>/state`, `online`, `peer`, `relay` | `trust/root/+`, `timestamp`, `releases/C`, its own `devices/<id>/cmd`, every `devices/+/peer` |
| `edgeswarm-release` | `trust/root/+`, `timestamp`, `releases/+` | `devices/+/state`, `devices/+/online` |
| `edgeswarm-operator` (fleet service) | `devices/+/cmd`, `ops/#`, `ha/#`, `homeassistant/#`; `devices/+/state`, `online` (to clear a retired device) | `devices/#`, `ops/#`, `releases/+`, `timestamp` |
| `edgeswarm-homeassistant` | `ops/device/+/install`, `ops/device/+/check`, `homeassistant/status` | `homeassistant/#`, `ha/#`, `devices/+/online`, `ops/rollout/+/status` |
| `edgeswarm-nodered` | `ops/rollout/+` (start, pause, resume, abort) | `ops/results`, `ops/rollout/+/status`, `devices/+/state` |
| `edgeswarm-bridge-<site>` | `devices/+/state`, `online`, `peer`, `relay` (the site's devices) | `trust/root/+`, `timestamp`, `releases/+`, `devices/+/cmd` |

Two tiers: a site broker bridges to the central one. Releases, roots, timestamps and commands flow
in (central -> site); device reports flow out. The central broker cannot tell which site device
sent a report: the site broker's ACL is what binds a report to its device.

Two listeners: the public one (TLS) names every client after its login (`use_username_as_clientid`),
so a device with valid credentials cannot connect under another device's client id to push it off
the broker or take over its queued session; the loopback one (`--local-port`) serves the release
and operator logins of services on the broker host, which open several connections with one login.
Mosquitto logs a refused publish only at `log_type debug` ("Denied PUBLISH from ..."): add it to
mosquitto.conf while investigating an ACL.

Retained release metadata must survive a crash: persistence saves after every change.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
import os
import secrets
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from schemas import topics

RELEASE_PRINCIPAL = "edgeswarm-release"
BRIDGE_LOCAL_PRINCIPAL = "edgeswarm-bridge-local"
OPERATOR_PRINCIPAL = "edgeswarm-operator"
HOMEASSISTANT_PRINCIPAL = "edgeswarm-homeassistant"
NODERED_PRINCIPAL = "edgeswarm-nodered"


def password_hash(password: str, *, salt: bytes | None = None, iterations: int = 101) -> str:
    """Mosquitto 2.0's `$7$` password-file entry: PBKDF2-HMAC-SHA512 (as `mosquitto_passwd` writes)."""
    salt = salt or secrets.token_bytes(12)
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, iterations)
    return f"$7${iterations}${base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}"


@dataclass(frozen=True)
class DevicePrincipal:
    device_id: str
    device_class: str


@dataclass(frozen=True)
class Bridge:
    """This broker dials a central broker and relays the fleet's topics in their directions."""

    name: str
    host: str
    port: int
    username: str
    password: str
    ca_file: Path | None = None


def bridge_topics(fleet: str) -> list[tuple[str, str]]:
    root = f"{topics.ROOT}/{topics.check_identifier(fleet, 'fleet')}"
    return [
        (f"{root}/trust/root/+", "in"),
        (f"{root}/timestamp", "in"),
        (f"{root}/releases/+", "in"),
        (f"{root}/devices/+/cmd", "in"),
        (f"{root}/devices/+/state", "out"),
        (f"{root}/devices/+/online", "out"),
        (f"{root}/devices/+/peer", "out"),
        (f"{root}/devices/+/relay", "out"),
    ]


@dataclass
class BrokerPlan:
    """Everything `broker config` was told, kept in the broker's directory (PLAN_FILE) so that adding
    or removing one device rewrites the configuration without touching anyone else's password."""

    fleet: str
    directory: Path
    host: str = "127.0.0.1"  # the listener's address
    port: int = 8883
    public_host: str | None = None  # what clients dial (the name on the certificate); default: `host`
    local_port: int | None = None  # a loopback listener for the services on the broker host (LOCAL_PRINCIPALS)
    devices: list[DevicePrincipal] = field(default_factory=list)
    tls: bool = True
    mutual_tls: bool = False  # client certificates; the certificate's CN becomes the username
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    bridge_sites: list[str] = field(default_factory=list)  # site brokers allowed to bridge to this one
    bridge: Bridge | None = None  # this (site) broker bridges to a central one
    autosave_seconds: int | None = None  # 0: save after every change; None: by the fleet's size (autosave_policy)

    @property
    def config_file(self) -> Path:
        return self.directory / "mosquitto.conf"

    def credentials_file(self, principal: str) -> Path:
        return self.directory / "credentials" / f"{principal}.toml"

    @property
    def dial_host(self) -> str:
        """The host written into every principal's credentials."""
        if self.public_host:
            return self.public_host
        if self.host in ("0.0.0.0", "::", ""):
            raise ValueError(f"the broker listens on {self.host!r}, which no client can dial: "
                             "give --public-host (the broker's name on its certificate)")
        return self.host

    def dial_host_or_none(self) -> str | None:
        try:
            return self.dial_host
        except ValueError:
            return None

    def principals(self) -> list[str]:
        return [RELEASE_PRINCIPAL, OPERATOR_PRINCIPAL, HOMEASSISTANT_PRINCIPAL, NODERED_PRINCIPAL,
                *(bridge_principal(s) for s in self.bridge_sites), *([BRIDGE_LOCAL_PRINCIPAL] if self.bridge else []),
                *(dev.device_id for dev in self.devices)]


PLAN_FILE = "edgeswarm-broker.json"
# Services that open several connections with one login at once (`timestamp --every` beside a `release`,
# `fleet serve` beside `rollout start`). The public listener names every client after its login (so no
# login can take over another's session by its client id), where two such connections would keep
# kicking each other off; on the broker host they use the loopback listener, which does not.
LOCAL_PRINCIPALS = (RELEASE_PRINCIPAL, OPERATOR_PRINCIPAL)


def save_plan(plan: BrokerPlan) -> None:
    """The plan, 0600 (a bridge's plan holds its password on the central broker)."""
    def plain(value: object) -> object:
        if isinstance(value, Path):
            return str(value)
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        if isinstance(value, list):
            return [plain(v) for v in value]
        return value

    body = plain(dataclasses.asdict(plan))
    _write(plan.directory / PLAN_FILE, json.dumps(body, indent=2) + "\n", 0o600)


def load_plan(directory: Path) -> BrokerPlan:
    """The plan `broker config` wrote in `directory`.

    Raises:
        FileNotFoundError: no plan there (run `broker config` first).
        ValueError: the file is not a plan.
    """
    path = directory / PLAN_FILE
    try:
        raw = json.loads(path.read_text())
        paths = {k: Path(raw[k]) if raw.get(k) else None for k in ("ca_file", "cert_file", "key_file")}
        bridge = raw.get("bridge")
        return BrokerPlan(
            fleet=raw["fleet"], directory=Path(raw["directory"]), host=raw["host"], port=int(raw["port"]),
            public_host=raw.get("public_host"), local_port=raw.get("local_port"),
            devices=[DevicePrincipal(**d) for d in raw["devices"]],
            tls=bool(raw["tls"]), mutual_tls=bool(raw["mutual_tls"]), bridge_sites=list(raw["bridge_sites"]),
            autosave_seconds=raw.get("autosave_seconds"),
            bridge=Bridge(**{**bridge, "ca_file": Path(bridge["ca_file"]) if bridge.get("ca_file") else None}) if bridge else None,
            **paths,
        )
    except FileNotFoundError:
        raise FileNotFoundError(f"no broker plan in {directory} ({PLAN_FILE}): run `edgeswarm broker config` first") from None
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"{path} is not a broker plan: {exc}") from exc


def existing_password(plan: BrokerPlan, principal: str) -> str | None:
    """The password a principal already has (its credentials file), so a rewrite keeps it."""
    try:
        found = tomllib.loads(plan.credentials_file(principal).read_text()).get("mqtt", {}).get("password")
    except (OSError, tomllib.TOMLDecodeError):
        return None
    return found if isinstance(found, str) and found else None


# Mosquitto writes its whole database (every session, every retained message) when it saves, in
# its only thread, and with `autosave_on_changes` it saves after every loop pass that changed
# anything. Saved after every change, a crash loses nothing, but each save costs time in proportion
# to the fleet, and while it saves nothing else moves. Measured here (benchmarks/scale_bench.py):
# with 10,000 devices the database is 8.6 MB, a save ~0.25 s, and 10,000 devices could not all
# connect within minutes; with 1,000, a broker restart took 39 s instead of 5 s until a release
# reached every device, and the fleet service's answers waited over 15 s for their PUBACKs. So
# only small fleets save after every change; from PER_CHANGE_DEVICES on, every
# DEVICES_PER_SAVE_SECOND devices add a second between saves (1 s up to 2,000; 5 s at 10,000). A
# central broker that site brokers bridge into saves every second at least.
PER_CHANGE_DEVICES = 100
DEVICES_PER_SAVE_SECOND = 2000


def autosave_policy(plan: BrokerPlan) -> int:
    """Seconds between saves of the broker's database; 0: after every change."""
    if plan.autosave_seconds is not None:
        return plan.autosave_seconds
    if len(plan.devices) <= PER_CHANGE_DEVICES and not plan.bridge_sites:
        return 0
    # A central broker holds the retained reports of every site's devices, which its plan does not list.
    return max(1, -(-len(plan.devices) // DEVICES_PER_SAVE_SECOND))


CENTRAL_QUEUED_MESSAGES = 200_000  # a central broker's plan lists none of the sites' devices


def queued_messages(plan: BrokerPlan) -> int:
    """QoS 1 messages Mosquitto queues for one client (the fleet service) before it drops them."""
    return max(1000, 10 * len(plan.devices), CENTRAL_QUEUED_MESSAGES if plan.bridge_sites else 0)


def _acl(plan: BrokerPlan) -> str:
    f = topics.check_identifier(plan.fleet, "fleet")
    root = f"{topics.ROOT}/{f}"
    lines = [
        "# edgeswarm ACL for fleet " + f + " (generated by `edgeswarm broker config`)",
        "# Anything not listed is denied.",
        "",
        f"user {RELEASE_PRINCIPAL}",
        f"topic write {root}/trust/root/+",
        f"topic write {root}/timestamp",
        f"topic write {root}/releases/+",
        f"topic read {root}/devices/+/state",
        f"topic read {root}/devices/+/online",
        "",
        f"user {OPERATOR_PRINCIPAL}",
        f"topic read {root}/devices/#",
        f"topic write {root}/devices/+/cmd",
        f"topic readwrite {root}/ops/#",
        f"topic read {root}/releases/+",
        f"topic read {root}/trust/root/+",
        f"topic read {root}/timestamp",
        f"topic write {root}/ha/#",
        f"topic write {root}/devices/+/state",
        f"topic write {root}/devices/+/online",
        "topic readwrite homeassistant/#",
        "",
        f"user {HOMEASSISTANT_PRINCIPAL}",
        "topic read homeassistant/#",
        "topic write homeassistant/status",
        f"topic read {root}/ha/#",
        f"topic read {root}/devices/+/online",
        f"topic read {root}/ops/rollout/+/status",
        f"topic write {root}/ops/device/+/install",
        f"topic write {root}/ops/device/+/check",
        "",
        f"user {NODERED_PRINCIPAL}",
        f"topic write {root}/ops/rollout/+",
        f"topic read {root}/ops/rollout/+/status",
        f"topic read {root}/ops/results",
        f"topic read {root}/devices/+/state",
        "",
    ]
    for site in plan.bridge_sites:
        lines += [f"user {bridge_principal(site)}"]
        for topic, direction in bridge_topics(f):
            lines.append(f"topic {'read' if direction == 'in' else 'write'} {topic}")
        lines.append("")
    if plan.bridge is not None:
        # The bridge's local end publishes what comes in and reads what goes out, under the site's ACL.
        lines += [f"user {BRIDGE_LOCAL_PRINCIPAL}"]
        for topic, direction in bridge_topics(f):
            lines.append(f"topic {'write' if direction == 'in' else 'read'} {topic}")
        lines.append("")
    for device in plan.devices:
        topics.check_identifier(device.device_id, "device")
        lines += [
            f"user {device.device_id}",
            f"topic read {root}/trust/root/+",
            f"topic read {root}/timestamp",
            f"topic read {topics.release_topic(f, device.device_class)}",
            f"topic read {topics.command_topic(f, device.device_id)}",
            f"topic read {topics.all_devices_wildcard(f, 'peer')}",  # the rendezvous: where peers can be dialed
            f"topic write {topics.state_topic(f, device.device_id)}",
            f"topic write {topics.online_topic(f, device.device_id)}",
            f"topic write {topics.device_topic(f, device.device_id, 'peer')}",
            f"topic write {topics.relay_topic(f, device.device_id)}",  # peers' signed reports it carries
            "",
        ]
    return "\n".join(lines)


def write_config(plan: BrokerPlan) -> dict[str, str]:
    """Write mosquitto.conf, the password file, the ACL and one credentials file per principal.

    Returns the generated passwords by principal (also written, 0600, under credentials/).
    """
    d = plan.directory
    (d / "data").mkdir(parents=True, exist_ok=True)
    (d / "credentials").mkdir(exist_ok=True)
    os.chmod(d / "credentials", 0o700)
    dial_host = plan.dial_host
    principals = plan.principals()
    # A principal that has credentials keeps its password: re-running for one new device must not
    # lock every other device out. Credentials of principals no longer in the plan are removed.
    passwords = {p: existing_password(plan, p) or secrets.token_urlsafe(24) for p in principals}
    for stale in (d / "credentials").glob("*.toml"):
        if stale.stem not in passwords:
            stale.unlink()
    _write(d / "passwd", "".join(f"{p}:{password_hash(pw)}\n" for p, pw in passwords.items()), 0o640)
    _write(d / "acl", _acl(plan), 0o640)
    conf = [
        "# Mosquitto for edgeswarm fleet " + plan.fleet + " (generated by `edgeswarm broker config`)",
        "per_listener_settings false",
        "allow_anonymous false",
        f"password_file {d / 'passwd'}",
        f"acl_file {d / 'acl'}",
        "persistence true",
        f"persistence_location {d / 'data'}/",
        # A crash loses what changed since the last save: retained roots, timestamps and releases
        # among it. Small fleets save after every change; large ones every few seconds (autosave_policy).
        *(["autosave_on_changes true", "autosave_interval 1"] if (every := autosave_policy(plan)) == 0
          else ["autosave_on_changes false", f"autosave_interval {every}"]),
        "max_packet_size 262144",  # devices refuse documents over 64 KiB anyway; nothing bigger passes
        # Per client: the fleet service receives every device's reports, a few per device in a burst
        # after a release. At Mosquitto's default (1,000) the broker dropped reports meant for it
        # once 10,000 devices updated at once ("Outgoing messages are being dropped").
        f"max_queued_messages {queued_messages(plan)}",
        "log_dest stderr",
        "log_type error",
        "log_type warning",
        "log_type notice",
        "",
        f"listener {plan.port} {plan.host}",
        # Every client's id is its login: a device with valid credentials cannot connect under another
        # device's client id and keep kicking it off the broker (or take over its queued session).
        "use_username_as_clientid true",
    ]
    if plan.tls:
        if not (plan.ca_file and plan.cert_file and plan.key_file):
            raise ValueError("TLS needs the CA, server certificate and key (edgeswarm pki init)")
        # Copies inside the broker's directory, so that handing it over covers them too.
        (d / "tls").mkdir(exist_ok=True)
        for source, name, mode in ((plan.ca_file, "ca.crt", 0o644), (plan.cert_file, "server.crt", 0o644),
                                   (plan.key_file, "server.key", 0o600)):
            _write(d / "tls" / name, source.read_text(), mode)
        conf += [f"cafile {d / 'tls/ca.crt'}", f"certfile {d / 'tls/server.crt'}", f"keyfile {d / 'tls/server.key'}",
                 "tls_version tlsv1.2"]
        if plan.mutual_tls:
            conf += ["require_certificate true", "use_identity_as_username true"]
    if plan.local_port is not None:
        # After the public listener's TLS lines, which belong to it: this one is plaintext on loopback.
        conf += ["", f"listener {plan.local_port} 127.0.0.1"]
    if plan.bridge is not None:
        b = plan.bridge
        conf += [
            "",
            f"connection {b.name}",
            f"address {b.host}:{b.port}",
            f"remote_clientid edgeswarm-bridge-{b.name}",
            f"remote_username {b.username}",
            f"remote_password {b.password}",
            f"local_username {BRIDGE_LOCAL_PRINCIPAL}",
            f"local_password {passwords[BRIDGE_LOCAL_PRINCIPAL]}",
            "cleansession false",  # the central broker queues what arrives while the site is cut off
            "restart_timeout 2 30",
            "bridge_protocol_version mqttv311",
            "try_private true",  # Mosquitto-to-Mosquitto: keeps the retain flag on what crosses the bridge
            *([f"bridge_cafile {d / 'tls' / 'bridge-ca.crt'}"] if b.ca_file else []),
            *(f"topic {topic} {direction} 1" for topic, direction in bridge_topics(plan.fleet)),
        ]
        if b.ca_file:
            (d / "tls").mkdir(exist_ok=True)
            _write(d / "tls" / "bridge-ca.crt", b.ca_file.read_text(), 0o644)
    save_plan(plan)
    _write(plan.config_file, "\n".join(conf) + "\n", 0o640 if plan.bridge else 0o644)
    for principal, password in passwords.items():
        remote = [f'host = "{dial_host}"', f"port = {plan.port}", *([f'ca_file = "{plan.ca_file}"'] if plan.tls else [])]
        if plan.local_port is not None and principal in LOCAL_PRINCIPALS:
            body = ["# For services on the broker host. From elsewhere, one connection at a time:",
                    *(f"# {line}" for line in remote),
                    "[mqtt]", 'host = "127.0.0.1"', f"port = {plan.local_port}"]
        else:
            body = ["[mqtt]", *remote]
        body += [f'username = "{principal}"', f'password = "{password}"']
        _write(plan.credentials_file(principal), "\n".join(body) + "\n", 0o600)
    return passwords


def bridge_principal(site: str) -> str:
    return f"edgeswarm-bridge-{topics.check_identifier(site, 'site')}"


def _write(path: Path, text: str, mode: int) -> None:
    path.write_text(text)
    os.chmod(path, mode)


def hand_over(directory: Path, user: str = "mosquitto") -> None:
    """Make the broker's files readable by the user Mosquitto drops privileges to (when run as root)."""
    import pwd

    try:
        entry = pwd.getpwnam(user)
    except KeyError:
        return
    for path in [directory, *directory.rglob("*")]:
        if "credentials" in path.parts or path.name == PLAN_FILE:
            continue  # principals' secrets (and the bridge's, in the plan) are not the broker's business
        os.chown(path, entry.pw_uid, entry.pw_gid)
