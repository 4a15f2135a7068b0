"""Home Assistant MQTT discovery: every device an `update` entity, every rollout a sensor.

Past `all_devices_up_to` devices only the devices an operator selects get an entity: Home
Assistant keeps every discovered entity in its registry and state machine, and thousands of
firmware entities make its UI and recorder slow without helping anyone; the rollout sensors
cover the rest of the fleet.

Pure message building; the fleet service publishes what these return (retained) and only when it
changed. Entities use the device's own retained `online` topic (its last will) for availability,
so Home Assistant greys a device out the moment the broker notices it is gone.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from fnmatch import fnmatchcase

from schemas import topics
from schemas.models import DeviceState, ReleaseManifest
from schemas.ops import DeviceRequest, RolloutStatus
from services.operator.rollout import WORKING

SUMMARY_LIMIT = 255  # Home Assistant shows a short excerpt; longer notes belong behind release_url


@dataclass(frozen=True)
class Retained:
    topic: str
    payload: bytes  # empty: delete the retained message (and with it the discovered entity)


class HomeAssistantBridge:
    def __init__(self, fleet: str, prefix: str, install_token: str, *, origin_version: str = "",
                 all_devices_up_to: int = 200, selected: Sequence[str] = ()) -> None:
        self.fleet = fleet
        self.all_devices_up_to = all_devices_up_to
        self.selected = tuple(selected)  # device ids or glob patterns (gw-00*)
        self.prefix = prefix
        self.install_token = install_token
        self.origin_version = origin_version
        topics.ha_discovery_topic(prefix, "update", fleet, "probe")  # refuses a bad prefix now, not later
        self.status_topic = f"{prefix}/status"  # Home Assistant's birth message: "online" after every start

    def shows(self, device: str, fleet_size: int) -> bool:
        """Whether `device` has an entity in a fleet of `fleet_size` devices."""
        return fleet_size <= self.all_devices_up_to or any(fnmatchcase(device, p) for p in self.selected)

    def discovery_topic(self, device: str) -> str:
        return topics.ha_discovery_topic(self.prefix, "update", self.fleet, device)

    def _unique(self, name: str) -> str:
        return f"edgeswarm_{self.fleet}_{name}".replace("-", "_")

    def device(self, state: DeviceState, release: ReleaseManifest | None) -> list[Retained]:
        """The update entity of one device: its discovery config and its state."""
        device = state.device
        unique = self._unique(device)
        config = {
            "name": "Firmware",
            "unique_id": unique,
            "object_id": unique,
            "device_class": "firmware",
            "state_topic": topics.ha_state_topic(self.fleet, device),
            "command_topic": topics.ops_device_topic(self.fleet, device, "install"),
            "payload_install": DeviceRequest(token=self.install_token).model_dump_json(exclude_none=True),
            "availability_topic": topics.online_topic(self.fleet, device),
            "payload_available": "online",
            "payload_not_available": "offline",
            "device": {
                "name": device,
                "model": state.device_class,
                "manufacturer": "edgeswarm",
                "sw_version": state.installed_version,
                "identifiers": [unique],
            },
            "origin": {"name": "edgeswarm", "sw_version": self.origin_version},
        }
        installing = state.phase in WORKING and release is not None and state.target_version == release.version
        body: dict[str, object] = {
            "installed_version": state.installed_version,
            "latest_version": release.version if release is not None else state.installed_version,
            "title": f"{state.device_class} firmware",
            "release_summary": (release.summary[:SUMMARY_LIMIT] if release is not None else "") or None,
            "release_url": release.release_url if release is not None else None,
            "in_progress": installing,
            "update_percentage": state.progress if installing else None,
        }
        return [
            Retained(self.discovery_topic(device), _json(config)),
            Retained(topics.ha_state_topic(self.fleet, device), _json(body)),
        ]

    def retire(self, device: str) -> list[Retained]:
        return [Retained(self.discovery_topic(device), b""),
                Retained(topics.ha_state_topic(self.fleet, device), b"")]

    def rollout(self, status: RolloutStatus) -> list[Retained]:
        """A sensor per class whose state is the rollout's state; wave and failures are its attributes."""
        name = f"rollout-{status.device_class}"[:63]
        unique = self._unique(name)
        status_topic = topics.rollout_status_topic(self.fleet, status.device_class)
        config = {
            "name": f"Rollout {status.device_class}",
            "unique_id": unique,
            "object_id": unique,
            "state_topic": status_topic,
            "value_template": "{{ value_json.state }}",
            "json_attributes_topic": status_topic,
            "icon": "mdi:progress-upload",
            "device": {"name": f"edgeswarm fleet {self.fleet}", "manufacturer": "edgeswarm",
                       "model": "fleet", "identifiers": [self._unique("fleet")]},
            "origin": {"name": "edgeswarm", "sw_version": self.origin_version},
        }
        return [Retained(topics.ha_discovery_topic(self.prefix, "sensor", self.fleet, name), _json(config))]


def _json(value: object) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":")).encode()
