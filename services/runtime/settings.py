"""Settings for devices and operators: a TOML file, overridden by `EDGESWARM_*` environment variables.

Nested fields use a double underscore in the environment: `EDGESWARM_MQTT__HOST=broker.local`.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Annotated, Literal, TypeVar

import pydantic
from pydantic import BaseModel, Field, StringConstraints, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from schemas.errors import EdgeswarmError, ReasonCode
from schemas.models import Identifier


class MqttSettings(BaseModel):
    host: str = "127.0.0.1"
    port: int = Field(1883, ge=1, le=65535)
    username: str | None = None
    password: str | None = None
    keepalive: int = Field(15, ge=5, le=3600)
    ca_file: Path | None = Field(None, description="TLS: the fleet CA that signed the broker's certificate")
    cert_file: Path | None = Field(None, description="mutual TLS: this client's certificate")
    key_file: Path | None = Field(None, description="mutual TLS: this client's private key")
    tunnel_after: float = Field(
        60.0, ge=0, description="device (embedded node): after this many seconds without its broker, reach it "
        "through a connected peer's tunnel (own credentials, TLS end to end); 0: never")
    tunnel_carry: int = Field(
        4, ge=0, le=1024, description="device (embedded node): carry at most this many peers' connections to "
        "this device's broker while it reaches it directly; 0: offer no tunnel")

    def client_options(self) -> dict[str, object]:
        """Keyword arguments for services.runtime.messaging.MqttClient."""
        return {"username": self.username, "password": self.password, "ca_file": self.ca_file,
                "cert_file": self.cert_file, "key_file": self.key_file}


class ContentSettings(BaseModel):
    backend: Literal["embedded", "kubo-rpc"] = "embedded"
    rpc_api: str = Field("/ip4/127.0.0.1/tcp/5001/http", description="kubo-rpc: the daemon's RPC API multiaddr")
    listen_host: str = "127.0.0.1"
    swarm_port: int = Field(
        4001, ge=0, le=65535, description="the embedded node's swarm port; 0: any free port, chosen when the node "
        "binds (logged, announced on the rendezvous, kept across node restarts). A daemon (kubo-rpc): its port")
    peers: list[str] = Field(default_factory=list, description="multiaddrs (with /p2p/<id>) dialed at start")
    origin: str | None = Field(None, description="the origin's multiaddr, to count bytes from origin vs peers")
    mdns: bool = False
    nat_port_map: bool = False
    swarm_key_file: Path | None = Field(None, description="private IPFS swarm: only nodes with this key connect")
    class_key_file: Path | None = Field(None, description="decrypts confidential payloads of this device's class")
    nat_pmp: bool = Field(False, description="ask the router (NAT-PMP) to map swarm_port and announce the mapping")
    announce: list[Annotated[str, StringConstraints(pattern=r"^/ip[46]/[0-9a-fA-F.:]+/tcp/[0-9]{1,5}$")]] = Field(
        default_factory=list, description="where a static port forward on the router reaches this node, e.g. "
        "/ip4/203.0.113.7/tcp/4101: announced by Kubo (Addresses.AppendAnnounce) and on the rendezvous")
    rendezvous: bool = Field(False, description="publish this node's addresses on MQTT; dial peers of the class that publish theirs")
    rendezvous_peers: int = Field(
        32, ge=1, le=1024, description="dial at most this many peers heard of on the rendezvous (others dial "
        "this device too); fewer peers, fewer duplicate blocks")
    max_connections: int | None = Field(
        None, ge=1, description="origin: admit at most this many peers at once, never dial out and announce "
        "no address, so devices take blocks from each other and the origin sends each about once (a device "
        "leaves once it has the artifact); devices must list the origin in `peers`/`origin`. Unset: an "
        "ordinary node")
    routing: Literal["dht", "dhtclient", "none"] = Field(
        "dht", description="Kubo's content routing; 'none' with rendezvous + origin_grace: a DHT would find "
        "the origin by itself and undo peers-first")
    origin_grace: float | None = Field(
        None, ge=0, description="dial the origin only after this many seconds without progress from peers "
        "(spread per device up to 4x more); unset: dial it at start")
    fetch_in_memory_mb: float = Field(
        64, ge=0, description="embedded node: items up to this size are fetched with Kubo's sequential reader, "
        "which swarms with fewer duplicate blocks but holds the whole item in memory; larger ones are pinned "
        "and written from the blockstore with bounded memory")
    fetch_spread: int = Field(
        4, ge=0, le=32, description="embedded node, items fetched with the sequential reader: besides it, ask "
        "for this many of the item's blocks at a time in this device's own random order, so that devices hold "
        "different blocks early and trade them instead of all waiting for the same next one; 0: off")
    go_gc_percent: int = Field(
        25, ge=10, le=1000, description="device, embedded node: Go's GOGC for the node in the agent's process "
        "(the agent starts itself again with it; a GOGC in its environment wins). Below Go's 100 because a node "
        "restart and a refused flood's messages turn into garbage at once: at 100 the heap grew 13-14 MB over a "
        "refused flood, at 25 6-9 MB")
    keep_releases: int = Field(
        2, ge=0, description="device: serve the content of this many installed releases (the newest) to peers")
    disk_budget_mb: float | None = Field(
        None, gt=0, description="device: the most content (MB) kept for peers; older releases go first, and a "
        "release bigger than this is not kept at all. Unset: only keep_releases limits it")
    gossip: bool = Field(
        True, description="device and origin (embedded node): exchange the fleet's signed documents (roots, "
        "timestamps, releases) with peers over IPFS pubsub, so a device that cannot reach the broker still hears them")
    gossip_interval: float = Field(
        60.0, gt=0, description="re-announce the signed documents this node carries this often (s); also "
        "5 s after a peer joins")

    @model_validator(mode="after")
    def _fixed_port_for_mappings(self) -> ContentSettings:
        # A router's mapping is asked for before the node binds its port.
        if self.swarm_port == 0 and self.nat_pmp:
            raise ValueError("swarm_port = 0 (any free port) cannot be mapped by NAT-PMP: give the port")
        return self


class Limits(BaseModel):
    max_message_bytes: int = Field(64 * 1024, ge=1024, le=16 * 1024 * 1024)
    stall_timeout: float = Field(30.0, gt=0, description="abandon a fetch with no progress for this long (s)")
    fetch_deadline: float = Field(900.0, gt=0, description="abandon a fetch not complete after this long (s)")
    retry_interval: float = Field(30.0, gt=0, description="wait before retrying a failed fetch (s)")
    max_attempts: int = Field(5, ge=1)
    freeze_grace: float = Field(10.0, gt=0, description="report frozen if no fresh timestamp this long after start (s)")
    resubscribe_interval: float = Field(
        30.0, gt=0, description="first retry of a subscription the broker refused (s); doubles up to 20x, jittered")


class InstallSettings(BaseModel):
    allowed_handlers: list[Literal["file", "ab", "command"]] = Field(
        default_factory=lambda: ["file", "ab"],
        description="install handlers this device accepts; `command` runs programs named by the manifest",
    )
    health_command: list[str] | None = Field(None, description="argv run after installing; exit 0 = healthy")
    health_url: str | None = Field(None, description="HTTP URL probed after installing; 2xx = healthy")
    health_timeout: float = Field(10.0, gt=0, description="one health check attempt (s)")
    confirm_deadline: float = Field(60.0, gt=0, description="healthy within this long, or roll back (s)")
    command_timeout: float = Field(600.0, gt=0, description="the command handler's programs (s)")


class HomeAssistantSettings(BaseModel):
    enabled: bool = Field(False, description="publish MQTT discovery so every device is a Home Assistant update entity")
    discovery_prefix: str = Field("homeassistant", pattern=r"^[A-Za-z0-9_-]{1,64}(/[A-Za-z0-9_-]{1,64}){0,3}$")
    all_devices_up_to: int = Field(200, ge=0, description="every device is an entity while the fleet has at most this many; above, only `devices`")
    devices: list[Annotated[str, StringConstraints(min_length=1, max_length=128)]] = Field(
        default_factory=list, max_length=10_000,
        description="device ids or glob patterns (gw-00*) that keep an entity once the fleet is larger than all_devices_up_to")


class RecordSettings(BaseModel):
    database: Annotated[str, StringConstraints(pattern=r"^postgres(ql)?://")] | None = Field(
        None, description="the fleet record in PostgreSQL (a libpq URL: postgresql://user@host/db, or "
        "postgresql:///db?host=/run/postgresql); two `fleet serve` on one database are active and standby. "
        "Unset: <home>/fleet.sqlite")
    standby_poll: float = Field(1.0, gt=0, le=60, description="a standby asks for the active lock this often (s)")


class _Settings(BaseSettings):
    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings, env_settings, TomlConfigSettingsSource(settings_cls))


class DeviceSettings(_Settings):
    model_config = SettingsConfigDict(env_prefix="EDGESWARM_", env_nested_delimiter="__", extra="forbid")

    device_id: Identifier
    fleet: Identifier
    device_class: Identifier
    state_dir: Path
    install_target: str = Field(
        pattern=r"^/[^\x00]*$", description="absolute path of the file the device runs; must match the manifest"
    )
    sysroot: Path = Field(Path("/"), description="install_target is resolved under this directory")
    trusted_root: Path = Field(description="the root metadata provisioned at manufacture (signed JSON)")
    initial_version: str = Field("0", description="version of install_target when there is no local state yet")
    identity_key: Path | None = Field(None, description="the device's own Ed25519 key (0600), made at provisioning: "
                                      "it signs every report, so peers can carry them to the fleet service")
    mqtt: MqttSettings = MqttSettings()
    content: ContentSettings = ContentSettings()
    limits: Limits = Limits()
    install: InstallSettings = InstallSettings()

    @property
    def install_path(self) -> Path:
        return self.sysroot / self.install_target.lstrip("/")

    @model_validator(mode="after")
    def _daemon_port_named(self) -> DeviceSettings:
        # With a daemon, swarm_port names the daemon's port, which the agent's traffic meter watches.
        if self.content.swarm_port == 0 and self.content.backend == "kubo-rpc":
            raise ValueError("content.swarm_port = 0 (any free port) is for the embedded node; with "
                             "kubo-rpc give the daemon's swarm port")
        return self


class OperatorSettings(_Settings):
    model_config = SettingsConfigDict(env_prefix="EDGESWARM_", env_nested_delimiter="__", extra="forbid")

    fleet: Identifier = "demo"
    home: Path = Path("edgeswarm-operator")
    mqtt: MqttSettings = MqttSettings()
    content: ContentSettings = ContentSettings(swarm_port=4001)
    release_expires_days: int = Field(30, ge=1)
    delta_bases: int = Field(3, ge=0, le=16, description="make deltas from this many previous versions")
    timestamp_expires_hours: float = Field(4.0, gt=0, description="lifetime of each signed timestamp")
    homeassistant: HomeAssistantSettings = HomeAssistantSettings()
    record: RecordSettings = RecordSettings()


S = TypeVar("S", bound=_Settings)


class SettingsError(EdgeswarmError):
    """A settings file that is missing, not TOML, or holds a value the settings do not accept."""

    code = ReasonCode.MALFORMED


EXAMPLES = {"DeviceSettings": "config/device.example.toml", "OperatorSettings": "config/operator.example.toml"}


def load_settings(cls: type[S], path: Path | None = None) -> S:
    """Settings from `path` (TOML) if given, then the environment on top.

    Raises:
        SettingsError: the file is missing or unreadable, or a value is invalid (each one named).
    """
    try:
        if path is None:
            return cls()
        if not path.is_file():
            example = EXAMPLES.get(cls.__name__, "")
            raise SettingsError(f"settings file {path} does not exist"
                                + (f"; start from {example} in the edgeswarm source" if example else ""))

        class FromFile(cls):  # type: ignore[valid-type,misc]
            model_config = SettingsConfigDict(toml_file=path)

        return cls.model_validate(FromFile().model_dump())
    except tomllib.TOMLDecodeError as exc:
        raise SettingsError(f"settings file {path} is not valid TOML: {exc}") from exc
    except pydantic.ValidationError as exc:
        where = f"settings file {path}" if path is not None else "settings (environment)"
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or '(top)'}: {e['msg']}" for e in exc.errors()[:5])
        raise SettingsError(f"{where}: {problems}") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise SettingsError(f"settings file {path} cannot be read: {exc}") from exc
