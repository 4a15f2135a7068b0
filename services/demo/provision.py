"""Provisioning simulated devices on this machine: a state directory, a firmware file and a settings file."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from services.operator.identities import DeviceIdentities, provision_identity

DEFAULT_TARGET = "/opt/edgeswarm/firmware.img"


@dataclass(frozen=True)
class DeviceSpec:
    device_id: str
    fleet: str
    device_class: str
    base_dir: Path
    swarm_port: int
    broker_host: str
    broker_port: int
    root_file: Path
    firmware: Path
    firmware_version: str
    peers: tuple[str, ...] = ()
    origin: str | None = None
    install_target: str = DEFAULT_TARGET
    stall_timeout: float = 30.0
    retry_interval: float = 5.0
    swarm_key_file: Path | None = None
    class_key_file: Path | None = None
    mqtt_settings: tuple[tuple[str, str], ...] = ()  # extra [mqtt] keys: username, password, ca_file, ...
    extra_toml: str = ""  # further sections, e.g. "[install]\nallowed_handlers = [...]"
    content_settings: tuple[tuple[str, str], ...] = ()  # extra [content] keys, e.g. backend, rpc_api
    identities_dir: Path | None = None  # the operator's register of identity keys: the device gets one

    @property
    def config_file(self) -> Path:
        return self.base_dir / "device.toml"

    @property
    def sysroot(self) -> Path:
        return self.base_dir / "sysroot"

    @property
    def installed_file(self) -> Path:
        return self.sysroot / self.install_target.lstrip("/")

    @property
    def state_dir(self) -> Path:
        return self.base_dir / "state"


def _toml_str(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def provision(spec: DeviceSpec) -> Path:
    """Lay out the device's files and write its settings; returns the settings file."""
    spec.installed_file.parent.mkdir(parents=True, exist_ok=True)
    spec.state_dir.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(spec.firmware, spec.installed_file)
    trusted_root = spec.base_dir / "provisioned-root.json"
    shutil.copyfile(spec.root_file, trusted_root)
    lines = [
        f"device_id = {_toml_str(spec.device_id)}",
        f"fleet = {_toml_str(spec.fleet)}",
        f"device_class = {_toml_str(spec.device_class)}",
        f"state_dir = {_toml_str(str(spec.state_dir))}",
        f"sysroot = {_toml_str(str(spec.sysroot))}",
        f"install_target = {_toml_str(spec.install_target)}",
        f"trusted_root = {_toml_str(str(trusted_root))}",
        f"initial_version = {_toml_str(spec.firmware_version)}",
        "",
        "[mqtt]",
        f"host = {_toml_str(spec.broker_host)}",
        f"port = {spec.broker_port}",
        *(f"{key} = {_toml_str(value)}" for key, value in spec.mqtt_settings),
        "",
        "[content]",
        f"swarm_port = {spec.swarm_port}",
        "peers = [" + ", ".join(_toml_str(p) for p in spec.peers) + "]",
        *(f"{key} = {_toml_str(value)}" for key, value in spec.content_settings),
    ]
    if spec.origin:
        lines.append(f"origin = {_toml_str(spec.origin)}")
    if spec.identities_dir is not None:
        key_file = spec.base_dir / "identity.key"
        provision_identity(key_file, spec.device_id, DeviceIdentities(spec.identities_dir))
        lines.insert(lines.index(""), f"identity_key = {_toml_str(str(key_file))}")
    for name, source in (("swarm_key_file", spec.swarm_key_file), ("class_key_file", spec.class_key_file)):
        if source is not None:
            copy = spec.base_dir / source.name
            shutil.copyfile(source, copy)
            copy.chmod(0o600)
            lines.append(f"{name} = {_toml_str(str(copy))}")
    lines += ["", "[limits]", f"stall_timeout = {spec.stall_timeout}", f"retry_interval = {spec.retry_interval}", ""]
    if spec.extra_toml:
        lines += [spec.extra_toml, ""]
    spec.config_file.write_text("\n".join(lines))
    return spec.config_file
