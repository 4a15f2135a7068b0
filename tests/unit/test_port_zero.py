"""Port 0: edgeswarm's listeners bind a free port themselves and say which, so no other process can
take a port between its choice and its bind. A node keeps its port across restarts (peers know it)."""

from __future__ import annotations

import asyncio
import json
import os
import socket
from pathlib import Path

import pydantic
import pytest

from services.operator.broker import EmbeddedBroker
from services.runtime.content import EmbeddedKuboNode, KuboConfig
from services.runtime.messaging import MqttClient
from services.runtime.settings import ContentSettings, DeviceSettings, OperatorSettings


def listening(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def test_a_node_on_port_zero_names_its_bound_port_and_keeps_it_across_restarts(tmp_path: Path) -> None:
    previous = Path.cwd()
    os.chdir(tmp_path)  # kubo.log

    async def scenario() -> tuple[int, int, bool, bool]:
        config = KuboConfig(repo=tmp_path / "a", swarm_port=0, routing="none")
        async with EmbeddedKuboNode(config) as a, \
                EmbeddedKuboNode(KuboConfig(repo=tmp_path / "b", swarm_port=0, routing="none")) as b:
            bound = int(a.multiaddr.split("/tcp/")[1].split("/")[0])
            assert bound != 0 and config.swarm_port == bound and listening(bound)
            assert json.loads((tmp_path / "a" / "config").read_text())["Addresses"]["Swarm"] == [f"/ip4/127.0.0.1/tcp/{bound}"]
            first = await b.connect(a.multiaddr)
            await a.restart()
            after = int(a.multiaddr.split("/tcp/")[1].split("/")[0])
            return bound, after, first, await b.connect(a.multiaddr)

    try:
        bound, after, first, again = asyncio.run(scenario())
    finally:
        os.chdir(previous)
    assert (after, first, again) == (bound, True, True)


def test_the_embedded_broker_on_port_zero_serves_on_the_port_it_reports() -> None:
    async def scenario() -> bytes:
        async with EmbeddedBroker("127.0.0.1", 0) as broker:
            assert broker.port != 0
            async with MqttClient("127.0.0.1", broker.port, "a", clean_session=True) as client:
                await client.subscribe("t")
                await client.publish("t", b"here", retain=False)
                return (await client.next_message(5)).payload

    assert asyncio.run(scenario()) == b"here"


def test_port_zero_is_refused_where_the_port_is_needed_before_the_node_binds() -> None:
    assert ContentSettings(swarm_port=0).swarm_port == 0
    with pytest.raises(pydantic.ValidationError, match="swarm_port = 0"):
        ContentSettings(swarm_port=0, nat_pmp=True)
    device = {"device_id": "d1", "fleet": "f", "device_class": "c", "state_dir": "/tmp/s",
              "install_target": "/opt/fw.img", "trusted_root": "/tmp/root.json"}
    assert DeviceSettings(**device, content={"swarm_port": 0}).content.swarm_port == 0
    with pytest.raises(pydantic.ValidationError, match="daemon's swarm port"):
        DeviceSettings(**device, content={"swarm_port": 0, "backend": "kubo-rpc"})
    # The operator's origin with a daemon: its swarm_port is not used, so 0 is fine there.
    assert OperatorSettings(content={"swarm_port": 0, "backend": "kubo-rpc"}).content.backend == "kubo-rpc"
