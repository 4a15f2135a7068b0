"""The broker through a peer (issue 14, item 2), with real parts on loopback: embedded Kubo nodes
carrying the MQTT connection over a libp2p stream to an embedded broker, and to a Mosquitto with TLS
whose certificate names a host nobody can resolve (so only the tunnel reaches it, and only by the
broker's real name)."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from device_client.broker_tunnel import BrokerPath, TunnelDialer, TunnelOffer, TunnelRefused
from services.operator.broker import EmbeddedBroker
from services.runtime.content import EmbeddedKuboNode, KuboConfig
from services.runtime.messaging import MqttClient, MqttError
from tests.support.ports import free_port
from tests.support.trickle_proxy import pipe

pytestmark = pytest.mark.integration


@contextlib.asynccontextmanager
async def nodes(tmp_path: Path, *names: str) -> AsyncIterator[dict[str, EmbeddedKuboNode]]:
    async with contextlib.AsyncExitStack() as stack:
        started = {n: await stack.enter_async_context(EmbeddedKuboNode(KuboConfig(repo=tmp_path / n, swarm_port=0)))
                   for n in names}
        first = started[names[0]]
        for other in list(started.values())[1:]:
            assert await first.connect(other.multiaddr)
        yield started


def closed_port() -> int:
    return free_port()  # nothing listens there: a direct dial is refused at once


async def echo_over(client: MqttClient, topic: str) -> bytes:
    await client.subscribe(topic)
    await client.publish(topic, b"through the tunnel", qos=1)
    return (await client.next_message(timeout=10)).payload


def test_a_device_reaches_the_broker_through_a_peer_that_offers_it_within_its_limit(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with EmbeddedBroker("127.0.0.1", 0) as broker, nodes(tmp_path, "cut", "bridge", "origin") as n:
            live = True
            async with TunnelOffer(n["bridge"], ("127.0.0.1", broker.port), "bridge", limit=1,
                                   live=lambda: live) as offer:
                dialer = TunnelDialer(("127.0.0.1", closed_port()))
                # The origin offers no tunnel: its stream closes at once and the next peer is asked.
                dialer.routes = [(n["origin"].peer_id, n["cut"].p2p_forward("/x/edgeswarm/mqtt/1", n["origin"].peer_id)),
                                 (n["bridge"].peer_id, n["cut"].p2p_forward("/x/edgeswarm/mqtt/1", n["bridge"].peer_id))]
                client = MqttClient("127.0.0.1", closed_port(), "dev-cut", clean_session=True, connect_timeout=10)
                client.connector = dialer.connect
                async with client:
                    assert client.connected
                    assert dialer.via == "bridge" and dialer.via_peer == n["bridge"].peer_id
                    assert offer.carried == 1
                    assert await echo_over(client, "t/echo") == b"through the tunnel"

                    # The limit: a second device is refused ("busy"), then the broker directly fails too.
                    second = TunnelDialer(("127.0.0.1", closed_port()))
                    second.routes = dialer.routes[1:]
                    with pytest.raises(TunnelRefused, match="busy"):
                        await asyncio.to_thread(second.connect, 5)
                    assert offer.refused == 1
                await _until(lambda: offer.carried == 0)
                live = False  # the bridge lost its own broker: it carries nobody
                with pytest.raises(TunnelRefused, match="no-broker"):
                    await asyncio.to_thread(dialer.connect, 5)

    asyncio.run(scenario())


def test_tls_goes_end_to_end_through_the_tunnel_and_names_the_real_broker(tmp_path: Path) -> None:
    from services.operator.pki import Pki
    from tests.support.harness import MosquittoProcess, mosquitto_available, mosquitto_dir

    if not mosquitto_available():
        pytest.skip("Mosquitto is not installed (apt-get install mosquitto)")
    port = free_port()
    run = lambda *a: subprocess.run([sys.executable, "-m", "services.cli", *a], check=True, capture_output=True)  # noqa: E731
    real_name = "broker.plant7.invalid"  # resolves nowhere: only the tunnel can reach it
    run("pki", "init", "--out", str(tmp_path / "pki"), "--fleet", "f1", "--host", real_name)
    run("pki", "client", "dev-a", "--out", str(tmp_path / "pki"))
    broker_dir = mosquitto_dir()
    run("broker", "config", "--out", str(broker_dir), "--fleet", "f1", "--port", str(port),
        "--pki", str(tmp_path / "pki"), "--mutual-tls", "--device", "dev-a:ipc", "--public-host", real_name)
    mosquitto = MosquittoProcess(broker_dir / "mosquitto.conf", port, tmp_path / "mosquitto.log")
    mosquitto.start()
    pki = Pki(tmp_path / "pki")

    async def attempt(name: str, routes_from: dict[str, EmbeddedKuboNode]) -> str:
        dialer = TunnelDialer((name, port))
        dialer.routes = [(routes_from["bridge"].peer_id,
                          routes_from["cut"].p2p_forward("/x/edgeswarm/mqtt/1", routes_from["bridge"].peer_id))]
        client = MqttClient(name, port, "dev-a", clean_session=True, ca_file=pki.ca_cert,
                            cert_file=pki.client_cert("dev-a"), key_file=pki.client_key("dev-a"), connect_timeout=8)
        client.connector = dialer.connect
        try:
            async with client:
                return f"connected via {dialer.via}"
        except MqttError as exc:
            return f"refused: {exc}"

    async def scenario() -> tuple[str, str]:
        async with nodes(tmp_path, "cut", "bridge") as n, \
                TunnelOffer(n["bridge"], ("127.0.0.1", port), "bridge", limit=4, live=lambda: True):
            return await attempt(real_name, n), await attempt("impostor.invalid", n)

    try:
        right, wrong = asyncio.run(scenario())
    finally:
        mosquitto.stop()
        shutil.rmtree(broker_dir.parent, ignore_errors=True)
    assert right == "connected via bridge"
    assert wrong.startswith("refused"), wrong  # same bytes, another name: the certificate does not match


def test_the_path_switches_to_a_peer_after_the_grace_and_back_once_the_broker_answers(tmp_path: Path) -> None:
    async def scenario() -> list[str | None]:
        async with EmbeddedBroker("127.0.0.1", 0) as broker, nodes(tmp_path, "cut", "bridge") as n:
            # The cut-off device's own way to the broker: a port that forwards to it only when "up".
            uplink = _Uplink(("127.0.0.1", broker.port))
            async with TunnelOffer(n["bridge"], ("127.0.0.1", broker.port), "bridge", limit=2, live=lambda: True):
                client = MqttClient("127.0.0.1", uplink.port, "dev-cut", clean_session=False, connect_timeout=2,
                                    start_offline=True)
                dialer = TunnelDialer(("127.0.0.1", uplink.port))
                paths: list[str | None] = []

                async def changed() -> None:
                    paths.append(dialer.via if client.connector is not None else None)

                # (paho dials again 1-4 s after the switch back: within the grace, so it stays direct)
                path = BrokerPath(client, n["cut"], dialer, after=5.0, changed=changed, check_every=0.2,
                                  probe_every=1.0)
                async with client:
                    assert not client.connected
                    looking = asyncio.ensure_future(path.run())
                    try:
                        await _until(lambda: paths == ["bridge"], 40)
                        assert await echo_over(client, "t/path") == b"through the tunnel"
                        await uplink.go_up()
                        await _until(lambda: paths == ["bridge", None], 40)
                        await _until(lambda: client.connected, 30)
                        assert client.connector is None and uplink.carried >= 1
                    finally:
                        looking.cancel()
            await uplink.stop()
            return paths

    assert asyncio.run(scenario()) == ["bridge", None]


class _Uplink:
    """A TCP port in front of the broker where nothing listens (a dial is refused) until `go_up`."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target, self.port, self.carried = target, free_port(), 0
        self._server: asyncio.Server | None = None

    async def go_up(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.carried += 1
        up_reader, up_writer = await asyncio.open_connection(*self.target)
        await asyncio.gather(pipe(reader, up_writer, None), pipe(up_reader, writer, None))


async def _until(predicate, timeout: float = 20) -> None:  # noqa: ANN001
    end = asyncio.get_running_loop().time() + timeout
    while not predicate():
        if asyncio.get_running_loop().time() > end:
            raise AssertionError("timed out")
        await asyncio.sleep(0.1)


@pytest.mark.parametrize("greeting", [
    b"edgeswarm-tunnel/1 busy\n",
    b"edgeswarm-tunnel/1 no-broker\n",
    b"edgeswarm-tunnel/1 ok\n",  # no name
    b"edgeswarm-tunnel/1 ok ../../etc\n",  # not an identifier
    b"edgeswarm-tunnel/1 ok bridge extra\n",
    b"SSH-2.0-OpenSSH_9.2\n",  # not a tunnel at all
    b"edgeswarm-tunnel/1 ok " + b"x" * 200 + b"\n",  # overlong
    b"",  # closed at once
])
def test_a_greeting_that_is_not_ok_is_not_a_tunnel(greeting: bytes) -> None:
    """The dialer takes a route only on an exact `ok <identifier>` line; anything else moves on to the
    broker directly (here refused), so the client is never handed a stream nobody vouched for."""

    async def scenario() -> str:
        async def greet(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writer.write(greeting)
            await writer.drain()
            writer.close()

        server = await asyncio.start_server(greet, "127.0.0.1", 0)
        dialer = TunnelDialer(("127.0.0.1", closed_port()))
        dialer.routes = [("QmPeer", int(server.sockets[0].getsockname()[1]))]
        try:
            await asyncio.to_thread(dialer.connect, 3)
        except TunnelRefused as exc:
            return str(exc)
        finally:
            server.close()
        return "connected"

    outcome = asyncio.run(scenario())
    assert outcome.startswith("no way to the broker"), outcome
    assert "QmPeer"[-8:] in outcome


def test_an_ok_greeting_hands_over_exactly_the_bytes_that_follow_it() -> None:
    async def scenario() -> tuple[str | None, bytes]:
        async def greet(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writer.write(b"edgeswarm-tunnel/1 ok bridge-7\nMQTT")
            await writer.drain()
            await reader.read(1)
            writer.close()

        server = await asyncio.start_server(greet, "127.0.0.1", 0)
        dialer = TunnelDialer(("127.0.0.1", closed_port()))
        dialer.routes = [("QmPeer", int(server.sockets[0].getsockname()[1]))]
        sock = await asyncio.to_thread(dialer.connect, 3)
        try:
            return dialer.via, await asyncio.to_thread(sock.recv, 16)
        finally:
            sock.close()
            server.close()

    assert asyncio.run(scenario()) == ("bridge-7", b"MQTT")
