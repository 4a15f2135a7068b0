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


def root_wildcard(fleet: str) -> str:
    return f"{ROOT}/{check_identifier(fleet, 'fleet')}/trust/root/+"


def release_topic(fleet: str, device_class: str) -> str:
    return f"{ROOT}/{check_identifier(fleet, 'fleet')}/releases/{check_identifier(device_class, 'device class')}"


def timestamp_topic(fleet: str) -> str:
    return f"{ROOT}/{check_identifier(fleet, 'fleet')}/timestamp"


def device_topic(fleet: str, device: str, leaf: str) -> str:
    if leaf not in ("state", "online", "cmd", "peer"):
        raise ValueError(f"unknown device topic {leaf!r}")
    return f"{ROOT}/{check_identifier(fleet, 'fleet')}/devices/{check_identifier(device, 'device')}/{leaf}"


def state_topic(fleet: str, device: str) -> str:
    return device_topic(fleet, device, "state")


def online_topic(fleet: str, device: str) -> str:
    return device_topic(fleet, device, "online")


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
