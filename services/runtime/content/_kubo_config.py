"""What edgeswarm sets in a Kubo repo's config: listen and announce addresses, discovery, routing,
the origin's one-peer limit, the peers it refuses, and the private swarm key."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["KuboConfig", "write_repo_config"]

_PEER_SCOPES = ("Conns", "ConnsInbound", "ConnsOutbound", "Streams", "StreamsInbound", "StreamsOutbound")


@dataclass
class KuboConfig:
    repo: Path
    listen_host: str = "127.0.0.1"
    swarm_port: int = 4001  # 0: any free port; the node writes the one it bound back here (EmbeddedKuboNode)
    peers: list[str] = field(default_factory=list)  # multiaddrs with /p2p/<id>, dialed at start
    mdns: bool = False
    nat_port_map: bool = False
    announce: list[str] = field(default_factory=list)  # replaces the addresses Kubo announces (a NAT-PMP mapping)
    append_announce: list[str] = field(default_factory=list)  # announced besides them (a static port forward)
    listen: bool = True  # False: no swarm listener at all (a node that only computes CIDs)
    swarm_key: str | None = None  # hex; a private network (Kubo pnet): only nodes with the same key connect
    routing: str = "dht"  # Kubo's Routing.Type; "none": no DHT, peers come only from config and the MQTT rendezvous
    max_connections: int | None = None  # an origin that serves only this many peers at once, never dials, announces nothing
    fetch_in_memory_bytes: int = 64 << 20  # items up to this size: Kubo's sequential reader (whole file in memory)
    fetch_spread: int = 0  # besides that reader, ask for this many blocks at a time in a random order (_spread.py)
    blocked: list[str] = field(default_factory=list)  # peer ids whose connections the node refuses (a flooding peer)
    kept: list[str] = field(default_factory=list)  # peer ids never blocked besides `peers` (the origin, dialed after a grace)


def write_repo_config(config: KuboConfig) -> None:
    """Write our settings into the repo's Kubo config (and its resource limits and swarm key)."""
    path = config.repo / "config"
    cfg = json.loads(path.read_text())
    cfg["Bootstrap"] = []  # never dial the public network's bootstrap nodes
    cfg["Addresses"]["Swarm"] = (
        [f"/ip4/{config.listen_host}/tcp/{config.swarm_port}"] if config.listen else []
    )
    cfg["Addresses"]["API"] = []
    cfg["Addresses"]["Gateway"] = []
    cfg["Addresses"]["Announce"] = list(config.announce)
    cfg["Addresses"]["AppendAnnounce"] = list(config.append_announce)
    cfg["Discovery"]["MDNS"]["Enabled"] = config.mdns
    cfg["Swarm"]["DisableNatPortMap"] = not config.nat_port_map
    cfg.setdefault("Routing", {})["Type"] = config.routing
    limits = config.repo / "libp2p-resource-limit-overrides.json"
    overrides: dict[str, object] = {}
    if config.blocked:
        # libp2p's resource manager refuses every connection and stream of these peers, whatever
        # address they come from (an address filter would not hold: a peer picks its source address).
        overrides["Peer"] = {peer: dict.fromkeys(_PEER_SCOPES, "blockAll") for peer in config.blocked}
    if config.max_connections is not None:
        # Exactly n peers: the resource manager refuses the next inbound connection, and there is no
        # connection manager (Kubo would want its limit above the manager's high-water mark, i.e.
        # n + 1 peers, and measured in the NAT lab both pulled the whole artifact: 2.0x). A device
        # frees its slot once it has the whole artifact (Updater: `hang_up`), so the next one that
        # no peer can serve gets a turn. No outbound connections: measured in the NAT lab, an origin
        # that may dial out connects to the devices it learns of within ~40 ms and serves them all.
        n = config.max_connections
        cfg["Swarm"]["ConnMgr"] = {"Type": "none"}
        overrides["System"] = {"Conns": n, "ConnsInbound": n, "ConnsOutbound": 0}
        # Nor does it tell its addresses to anyone: devices that learnt them from a peer dialed it by
        # themselves (measured: every device of the lab within 40 ms). Devices know it from settings.
        cfg["Addresses"]["NoAnnounce"] = ["/ip4/0.0.0.0/ipcidr/0", "/ip6/::/ipcidr/0"]
    if overrides:
        limits.write_text(json.dumps(overrides))
    else:
        limits.unlink(missing_ok=True)
    path.write_text(json.dumps(cfg, indent=2))
    key_file = config.repo / "swarm.key"
    if config.swarm_key is not None:
        key_file.write_text(f"/key/swarm/psk/1.0.0/\n/base16/\n{config.swarm_key}\n")
        key_file.chmod(0o600)
    else:
        key_file.unlink(missing_ok=True)

