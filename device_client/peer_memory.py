"""The peers the rendezvous last connected this device to, kept across restarts.

A device that starts without its broker (it was moved, or its uplink is down) hears no rendezvous,
so without this it would know only the origin, mDNS neighbours and configured peers. The peers it
remembers are dialed at start: they are sources of blocks and gossip, and routes to the broker
through a peer's tunnel (device_client.broker_tunnel), which takes its routes from the connected peers.

The file (`<state_dir>/peers.json`) holds at most `limit` multiaddrs, newest first, one per peer.
A damaged one (not JSON, the wrong shape, too large) is set aside and nothing is remembered; an
address that does not look like `/ip4|ip6|dns*/<host>/tcp/<port>/p2p/<peer id>` is skipped.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

from services.runtime.files import atomic_write, read_capped, set_aside

__all__ = ["RememberedPeers"]

log = logging.getLogger(__name__)

_ADDRESS = re.compile(r"/(ip4|ip6|dns|dns4|dns6)/[0-9A-Za-z.:_-]{1,253}/tcp/[0-9]{1,5}/p2p/([1-9A-HJ-NP-Za-km-z]{32,64})")
_MAX_FILE_BYTES = 64 * 1024


class RememberedPeers:
    def __init__(self, path: Path, limit: int = 16) -> None:
        self.path = path
        self.limit = limit
        self._addresses: list[str] | None = None

    def load(self) -> list[str]:
        """The remembered multiaddrs, newest first (none when the file is missing or damaged)."""
        if self._addresses is None:
            self._addresses = self._read()
        return list(self._addresses)

    def remember(self, multiaddr: str) -> None:
        """`multiaddr` connected: it goes first, replacing what was kept for the same peer."""
        found = _ADDRESS.fullmatch(multiaddr)
        if found is None:
            return
        peer = found.group(2)
        kept = [a for a in self.load() if not a.endswith("/p2p/" + peer)]
        addresses = [multiaddr, *kept][: self.limit]
        if addresses == self._addresses:
            return
        self._addresses = addresses
        try:
            atomic_write(self.path, json.dumps({"peers": addresses}, indent=1).encode())
        except OSError as exc:  # a full disk: remembered for this run only
            log.warning("could not remember the rendezvous peers in %s: %s", self.path, exc)

    def _read(self) -> list[str]:
        try:
            document = json.loads(read_capped(self.path, _MAX_FILE_BYTES))
            if not isinstance(document, dict) or not isinstance(document.get("peers"), list):
                raise ValueError("not {\"peers\": [...]}")
        except FileNotFoundError:
            return []
        except (OSError, ValueError, RecursionError) as exc:  # JSON errors and undecodable bytes are ValueErrors
            log.warning("the remembered peers in %s are unreadable (%s): set aside, starting with none", self.path, exc)
            try:
                set_aside(self.path)
            except OSError:
                pass
            return []
        addresses: list[str] = []
        peers: set[str] = set()
        for item in document["peers"]:
            found = _ADDRESS.fullmatch(item) if isinstance(item, str) else None
            if found is not None and found.group(2) not in peers and len(addresses) < self.limit:
                peers.add(found.group(2))
                addresses.append(item)
        return addresses
