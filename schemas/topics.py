"""MQTT topic names: built here and only here, from validated identifiers."""

from __future__ import annotations

import re

IDENTIFIER = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")
ROOT = "edgeswarm"


def check_identifier(value: str, what: str = "identifier") -> str:
    if not IDENTIFIER.fullmatch(value):
        raise ValueError(
            f"{what} {value!r} must be 1-63 characters of a-z, 0-9, '-' or '_', starting alphanumeric"
        )
    return value


def root_topic(fleet: str, version: int) -> str:
    return f"{ROOT}/{check_identifier(fleet, 'fleet')}/trust/root/{int(version)}"


def root_version(topic: str) -> int | None:
    """The version a root topic (root_topic) names; None when its last level is no number."""
    try:
        return int(topic.rsplit("/", 1)[1])
    except (ValueError, IndexError):
        return None


def root_wildcard(fleet: str) -> str:
    return f"{ROOT}/{check_identifier(fleet, 'fleet')}/trust/root/+"


def release_topic(fleet: str, device_class: str) -> str:
    return f"{ROOT}/{check_identifier(fleet, 'fleet')}/releases/{check_identifier(device_class, 'device class')}"


def timestamp_topic(fleet: str) -> str:
    return f"{ROOT}/{check_identifier(fleet, 'fleet')}/timestamp"


def gossip_topic(fleet: str) -> str:
    """The fleet's pubsub topic on the peers' IPFS nodes (not an MQTT topic): signed documents between
    peers, each framed with the MQTT topic it belongs to (services.runtime.gossip)."""
    return f"{ROOT}/{check_identifier(fleet, 'fleet')}/gossip/1"


def device_topic(fleet: str, device: str, leaf: str) -> str:
    if leaf not in ("state", "online", "cmd", "peer", "relay"):
        raise ValueError(f"unknown device topic {leaf!r}")
    return f"{ROOT}/{check_identifier(fleet, 'fleet')}/devices/{check_identifier(device, 'device')}/{leaf}"


def state_topic(fleet: str, device: str) -> str:
    return device_topic(fleet, device, "state")


def online_topic(fleet: str, device: str) -> str:
    return device_topic(fleet, device, "online")


def relay_topic(fleet: str, device: str) -> str:
    """Where a device hands on, under its own login, reports its peers signed and could not send."""
    return device_topic(fleet, device, "relay")


def command_topic(fleet: str, device: str) -> str:
    return device_topic(fleet, device, "cmd")


def all_devices_wildcard(fleet: str, leaf: str) -> str:
    return f"{ROOT}/{check_identifier(fleet, 'fleet')}/devices/+/{leaf}"


def device_from_topic(fleet: str, topic: str) -> tuple[str, str] | None:
    """Return (device, leaf) for a device topic of this fleet, else None."""
    parts = topic.split("/")
    if len(parts) != 5 or parts[0] != ROOT or parts[1] != fleet or parts[2] != "devices":
        return None
    if not IDENTIFIER.fullmatch(parts[3]):
        return None
    return parts[3], parts[4]


# -- operator topics and Home Assistant discovery -------------------------------------------------

OPS_ROLLOUT_ACTIONS = ("start", "pause", "resume", "abort")
OPS_DEVICE_ACTIONS = ("install", "check", "retire")


def ops_wildcard(fleet: str) -> str:
    return f"{ROOT}/{check_identifier(fleet, 'fleet')}/ops/#"


def ops_rollout_topic(fleet: str, action: str) -> str:
    if action not in OPS_ROLLOUT_ACTIONS:
        raise ValueError(f"unknown rollout action {action!r}")
    return f"{ROOT}/{check_identifier(fleet, 'fleet')}/ops/rollout/{action}"


def ops_device_topic(fleet: str, device: str, action: str) -> str:
    if action not in OPS_DEVICE_ACTIONS:
        raise ValueError(f"unknown device action {action!r}")
    return f"{ROOT}/{check_identifier(fleet, 'fleet')}/ops/device/{check_identifier(device, 'device')}/{action}"


def ops_results_topic(fleet: str) -> str:
    return f"{ROOT}/{check_identifier(fleet, 'fleet')}/ops/results"


def rollout_status_topic(fleet: str, device_class: str) -> str:
    return f"{ROOT}/{check_identifier(fleet, 'fleet')}/ops/rollout/{check_identifier(device_class, 'device class')}/status"


def rollout_status_wildcard(fleet: str) -> str:
    return f"{ROOT}/{check_identifier(fleet, 'fleet')}/ops/rollout/+/status"


def releases_wildcard(fleet: str) -> str:
    return f"{ROOT}/{check_identifier(fleet, 'fleet')}/releases/+"


def parse_ops_topic(fleet: str, topic: str) -> tuple[str, str | None] | None:
    """(action, device) of an operator request topic, e.g. ("rollout/start", None) or ("device/install", "d1")."""
    parts = topic.split("/")
    if len(parts) < 5 or parts[:3] != [ROOT, fleet, "ops"]:
        return None
    if len(parts) == 5 and parts[3] == "rollout" and parts[4] in OPS_ROLLOUT_ACTIONS:
        return f"rollout/{parts[4]}", None
    if len(parts) == 6 and parts[3] == "device" and IDENTIFIER.fullmatch(parts[4]) and parts[5] in OPS_DEVICE_ACTIONS:
        return f"device/{parts[5]}", parts[4]
    return None


def ops_probe_topic(fleet: str) -> str:
    """Where the fleet service checks, at start, that its broker login may write and read ops topics."""
    return f"{ROOT}/{check_identifier(fleet, 'fleet')}/ops/probe"


def ha_state_topic(fleet: str, device: str) -> str:
    """What the Home Assistant bridge publishes for one device's update entity (retained JSON)."""
    return f"{ROOT}/{check_identifier(fleet, 'fleet')}/ha/{check_identifier(device, 'device')}/update"


DISCOVERY_PREFIX = re.compile(r"^[A-Za-z0-9_-]{1,64}(/[A-Za-z0-9_-]{1,64}){0,3}$")


def ha_discovery_topic(prefix: str, component: str, fleet: str, name: str) -> str:
    """Home Assistant's discovery topic for the entity `{fleet}_{name}` (e.g. homeassistant/update/demo_d1/config)."""
    if not DISCOVERY_PREFIX.fullmatch(prefix):
        raise ValueError(f"discovery prefix {prefix!r} must be topic levels of letters, digits, '-' or '_'")
    if component not in ("update", "sensor"):
        raise ValueError(f"unexpected Home Assistant component {component!r}")
    return f"{prefix}/{component}/{check_identifier(fleet, 'fleet')}_{check_identifier(name, 'name')}/config"


def topic_matches_release(fleet: str, topic: str) -> bool:
    parts = topic.split("/")
    return len(parts) == 4 and parts[:3] == [ROOT, fleet, "releases"] and bool(IDENTIFIER.fullmatch(parts[3]))
