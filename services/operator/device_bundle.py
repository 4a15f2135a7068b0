"""A device's provisioning bundle, written on the operator host and copied to the device as its
/etc/edgeswarm: device.toml (its identity, broker login and the origin's address), the fleet's
root of trust, the broker's CA and the device's identity key (identity.key, which signs its reports;
its public half is registered in the operator's home). Everything secret in it is the device's own:
its broker password and its identity key."""

from __future__ import annotations

import os
import shutil
import tomllib
from dataclasses import dataclass
from pathlib import Path

from schemas import topics
from services.operator.identities import DeviceIdentities, provision_identity

__all__ = ["BundleError", "DeviceBundle", "write_bundle"]


class BundleError(ValueError):
    """A part the bundle needs is missing or does not fit (no origin address yet, wrong login)."""


@dataclass(frozen=True)
class DeviceBundle:
    device_id: str
    device_class: str
    fleet: str
    root_file: Path  # the operator's root.json
    credentials_file: Path  # credentials/<device>.toml from `broker config`
    origin_address_file: Path  # <home>/origin/multiaddr, written by a running origin
    device_dir: str = "/etc/edgeswarm"  # where the bundle lives on the device
    state_dir: str = "/var/lib/edgeswarm"
    install_target: str = "/opt/edgeswarm/firmware.img"
    initial_version: str = "0"
    handlers: tuple[str, ...] = ("file", "ab")
    identities_dir: Path | None = None  # <home>/identities: the device's identity key is registered there
    new_identity: bool = False  # replace the key registered for the device (a re-provisioned device)


def _toml(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def write_bundle(bundle: DeviceBundle, out: Path) -> list[Path]:
    """Write device.toml (0600), root.json, ca.crt (when the login has one) and identity.key (0600, with
    `identities_dir`) into `out`.

    Raises:
        BundleError: the origin has not written its address, or the credentials are not the device's.
        IdentityConflict: the device has another identity key registered and `new_identity` is not set.
    """
    topics.check_identifier(bundle.device_id, "device")
    topics.check_identifier(bundle.device_class, "device class")
    try:
        login = tomllib.loads(bundle.credentials_file.read_text())["mqtt"]
    except (OSError, KeyError, tomllib.TOMLDecodeError) as exc:
        raise BundleError(f"{bundle.credentials_file}: not a credentials file of `broker config` ({exc})") from exc
    if login.get("username") != bundle.device_id:
        raise BundleError(f"{bundle.credentials_file} is the login of {login.get('username')!r}, not of {bundle.device_id!r}")
    try:
        origin = bundle.origin_address_file.read_text().split()[0]
    except (OSError, IndexError):
        raise BundleError(f"no origin address in {bundle.origin_address_file}: start the origin "
                          "(edgeswarm origin) first; it writes its address there") from None
    out.mkdir(parents=True, exist_ok=True)
    written = [out / "device.toml", out / "root.json"]
    identity = []
    if bundle.identities_dir is not None:
        if bundle.new_identity:
            (out / "identity.key").unlink(missing_ok=True)
        provision_identity(out / "identity.key", bundle.device_id, DeviceIdentities(bundle.identities_dir),
                           replace=bundle.new_identity)
        written.append(out / "identity.key")
        identity = [f"identity_key = {_toml(bundle.device_dir + '/identity.key')}"]
    shutil.copyfile(bundle.root_file, out / "root.json")
    mqtt = [f"host = {_toml(login['host'])}", f"port = {int(login['port'])}", f"username = {_toml(login['username'])}",
            f"password = {_toml(login['password'])}"]
    if login.get("ca_file"):
        shutil.copyfile(login["ca_file"], out / "ca.crt")
        written.append(out / "ca.crt")
        mqtt.append(f"ca_file = {_toml(bundle.device_dir + '/ca.crt')}")
    text = "\n".join([
        f"# edgeswarm device {bundle.device_id}: written by `edgeswarm device config`; lives in {bundle.device_dir}",
        f"device_id = {_toml(bundle.device_id)}",
        f"fleet = {_toml(bundle.fleet)}",
        f"device_class = {_toml(bundle.device_class)}",
        f"state_dir = {_toml(bundle.state_dir)}",
        f"install_target = {_toml(bundle.install_target)}",
        f"trusted_root = {_toml(bundle.device_dir + '/root.json')}",
        f"initial_version = {_toml(bundle.initial_version)}",
        *identity,
        "",
        "[mqtt]",
        *mqtt,
        "",
        "[content]",
        'listen_host = "0.0.0.0"',
        f"peers = [{_toml(origin)}]",
        f"origin = {_toml(origin)}",
        "",
        "[install]",
        "allowed_handlers = [" + ", ".join(_toml(h) for h in bundle.handlers) + "]",
        "",
    ])
    # Created 0600 from the start: it holds the device's broker password.
    tmp = out / ".device.toml.tmp"
    tmp.unlink(missing_ok=True)
    with open(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600), "w") as handle:
        handle.write(text)
    os.replace(tmp, out / "device.toml")
    return written
