"""An asyncio MQTT client over paho-mqtt 2.x, in the spirit of aiomqtt.

paho's callbacks and its network thread stay inside this module: callers `await` connects,
publishes and subscriptions, iterate `messages`, and catch `MqttError`. By default paho runs its
own network thread per client; `driver="loop"` drives its socket from the running event loop
instead (no thread per client), for processes that hold thousands of connections (the device
simulator). Sessions are persistent by
default (clean_session=False) so a device that was offline gets queued messages, and every
subscription is made again after a reconnect in case the broker lost the session.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import random
import socket
import ssl
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

from schemas.errors import EdgeswarmError, ReasonCode

log = logging.getLogger(__name__)


class MqttError(EdgeswarmError):
    code = ReasonCode.BROKER_ERROR


class SubscriptionRefused(MqttError):
    """The broker answered a SUBSCRIBE with a failure code (an ACL, a limit on subscriptions)."""

    def __init__(self, topic: str, reason: str) -> None:
        super().__init__(f"the broker refused the subscription to {topic}: {reason}")
        self.topic, self.reason = topic, reason


@dataclass(frozen=True)
class Message:
    topic: str
    payload: bytes
    retain: bool
    qos: int
    dropped_bytes: int = 0  # the payload was larger than the client's max_payload_bytes: this many, not kept
    held_mid: int = field(default=0, repr=False, compare=False)  # not acknowledged yet: the PUBACK goes out when taken


@dataclass(frozen=True)
class Will:
    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = True


def topic_matches(pattern: str, topic: str) -> bool:
    return paho.topic_matches_sub(pattern, topic)


Connector = Callable[[float], socket.socket]  # connect timeout (s) -> a connected socket, or OSError


class _RoutedClient(paho.Client):
    """paho's client, able to reach its broker some other way than a TCP connection to host:port
    (through a peer's libp2p tunnel). TLS still names the broker's real host: paho wraps whatever
    socket comes back and checks the certificate against `host`, so whoever carries the bytes sees
    only ciphertext and cannot pose as the broker."""

    connector: Connector | None = None

    def _create_socket_connection(self) -> socket.socket:
        connector = self.connector
        if connector is None:
            return super()._create_socket_connection()
        return connector(self._connect_timeout)


class MqttClient:
    """`async with MqttClient(host, port, client_id) as client:`; `await client.next_message()` for each message."""

    def __init__(
        self,
        host: str,
        port: int,
        client_id: str,
        *,
        clean_session: bool = False,
        will: Will | None = None,
        birth: Will | None = None,
        username: str | None = None,
        password: str | None = None,
        ca_file: Path | None = None,
        cert_file: Path | None = None,
        key_file: Path | None = None,
        keepalive: int = 15,
        connect_timeout: float = 15.0,
        max_queued: int = 10_000,
        max_payload_bytes: int | None = None,
        driver: Literal["thread", "loop"] = "thread",
        acknowledge: Literal["on_arrival", "when_full"] = "on_arrival",
        start_offline: bool = False,
    ) -> None:
        self.host, self.port = host, port
        # A device that boots without its uplink must still work (resume a fetch from LAN peers,
        # serve its neighbours): with start_offline, a broker that does not answer within
        # connect_timeout leaves the client unconnected and dialing; a broker that refuses still raises.
        self.start_offline = start_offline
        self.driver = driver
        # on_arrival: paho acknowledges a QoS 1 message as it arrives, and a full receive queue drops
        # it (a device flooded by its broker keeps its memory). when_full: messages are acknowledged
        # as they arrive while fewer than max_queued wait here; beyond that, each is acknowledged
        # only when next_message() hands it over, so nothing is dropped and the broker holds the rest
        # (Mosquitto sends at most max_inflight_messages unacknowledged). For services that must see
        # every report. Not every message is held: a broker may deliver retained messages before it
        # answers the SUBSCRIBE and wait for their acknowledgements (amqtt does), which a consumer
        # still waiting for that answer would never give.
        self.acknowledge = acknowledge
        self._hold_above = max_queued
        if acknowledge == "when_full":
            max_queued = 0
        self.username = username
        self.connect_timeout = connect_timeout
        self._client = _RoutedClient(
            CallbackAPIVersion.VERSION2,
            client_id=client_id,
            clean_session=clean_session,
            protocol=MQTTProtocolVersion.MQTTv311,  # amqtt speaks 3.1.1 only; Mosquitto speaks both
        )
        # paho doubles its wait between reconnects, without jitter: a fleet dropped by one broker
        # restart would come back in lockstep, all at 1, 3, 7, 15 ... s. A first wait of its own per
        # client (1-4 s) spreads every later attempt too.
        self._min_delay, self._max_delay = random.uniform(1.0, 4.0), random.uniform(10.0, 15.0)
        if acknowledge == "when_full":
            self._client.manual_ack_set(True)
        self._client.reconnect_delay_set(min_delay=self._min_delay, max_delay=self._max_delay)  # type: ignore[arg-type]
        if will is not None:
            self._client.will_set(will.topic, will.payload, qos=will.qos, retain=will.retain)
        if username is not None:
            self._client.username_pw_set(username, password)
        if ca_file is not None:
            # Verifies the broker's certificate against the fleet CA and its host name.
            self._client.tls_set(
                ca_certs=str(ca_file), certfile=str(cert_file) if cert_file else None,
                keyfile=str(key_file) if key_file else None, tls_version=ssl.PROTOCOL_TLS_CLIENT,
            )
        self._keepalive = keepalive
        self._birth = birth  # published on every (re)connect, e.g. "online" over a retained "offline" will
        self._loop: asyncio.AbstractEventLoop | None = None
        self._connected: asyncio.Event | None = None
        self._queue: asyncio.Queue[Message] = asyncio.Queue(maxsize=max_queued)
        # Bytes nobody verified yet are bounded where they arrive: a larger payload is dropped on
        # paho's thread and only its size is queued (so a flood costs at most max_queued x this).
        self.max_payload_bytes = max_payload_bytes
        self._subscriptions: dict[str, int] = {}
        # A broker grants or refuses each SUBSCRIBE: a refusal is a gap in what this client hears, so it is
        # raised (subscribe) or kept here (the renewal after a reconnect), never ignored, and every
        # reconnect asks again.
        self.refused: dict[str, str] = {}
        self.refusals_changed = asyncio.Event()  # set whenever `refused` changes (a renewal refused or granted)
        self._renewals: dict[int, str] = {}  # mid -> topic, for subscriptions renewed on reconnect
        self._pending: dict[int, asyncio.Future[str | None]] = {}  # mid -> the refusal, None when granted
        self._connect_error: str | None = None
        self.connections = 0  # connections the broker accepted so far (each reconnect counts)
        self._driven: _LoopDriver | None = None
        self._client.on_connect = self._on_connect
        self._client.on_disconnect = self._on_disconnect
        self._client.on_message = self._on_message
        self._client.on_publish = self._on_ack
        self._client.on_subscribe = self._on_subscribe

    # -- paho callbacks: run on paho's thread, hand over to the event loop ----------------------

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:  # noqa: ANN001
        assert self._loop is not None
        if reason_code.is_failure:
            self._connect_error = str(reason_code)
            if self.start_offline:  # nobody awaits connect() any more: say it where a person looks
                log.error("the MQTT broker %s:%d refused the connection: %s", self.host, self.port, reason_code)
            self._hand_over(self._refused.set)
            return
        for topic, qos in list(self._subscriptions.items()):
            rc, mid = client.subscribe(topic, qos)
            if rc == paho.MQTT_ERR_SUCCESS:
                self._renewals[mid] = topic
        if self._birth is not None:
            client.publish(self._birth.topic, self._birth.payload, qos=self._birth.qos, retain=self._birth.retain)
        if self._driven is not None:
            self._driven.connected()
        self._hand_over(self._set_connected, True)

    def _hand_over(self, callback: Callable[..., object], *args: object) -> None:
        """Run `callback` on the event loop: paho's own thread must hand over; the loop driver is on it already."""
        assert self._loop is not None
        if self._driven is not None:
            self._loop.call_soon(callback, *args)
        else:
            self._loop.call_soon_threadsafe(callback, *args)

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:  # noqa: ANN001
        if self._loop is not None and not self._loop.is_closed():
            self._hand_over(self._set_connected, False)

    def _set_connected(self, value: bool) -> None:
        assert self._connected is not None
        if value:
            self.connections += 1
            self._connected.set()
        else:
            self._connected.clear()

    def _on_message(self, client, userdata, msg: paho.MQTTMessage) -> None:  # noqa: ANN001
        assert self._loop is not None
        size = len(msg.payload)
        if self.max_payload_bytes is not None and size > self.max_payload_bytes:
            message = Message(msg.topic, b"", bool(msg.retain), msg.qos, dropped_bytes=size)
        else:
            message = Message(msg.topic, bytes(msg.payload), bool(msg.retain), msg.qos)
        if self.acknowledge == "when_full" and msg.qos > 0:
            if self._queue.qsize() < self._hold_above:  # (read on paho's thread: may lag, never by much)
                self._client.ack(msg.mid, msg.qos)
            else:
                message = dataclasses.replace(message, held_mid=msg.mid)
        self._hand_over(self._enqueue, message)

    def _enqueue(self, message: Message) -> None:
        try:
            self._queue.put_nowait(message)
        except asyncio.QueueFull:
            log.warning("dropping message on %s: receive queue full", message.topic)

    def _on_ack(self, client, userdata, mid, *rest) -> None:  # noqa: ANN001
        assert self._loop is not None
        self._hand_over(self._resolve, mid)

    def _on_subscribe(self, client, userdata, mid, reason_codes, properties) -> None:  # noqa: ANN001
        assert self._loop is not None
        refusal = next((str(code) for code in reason_codes if code.is_failure), None)
        self._hand_over(self._resolve, mid, refusal)

    def _resolve(self, mid: int, refusal: str | None = None) -> None:
        if (topic := self._renewals.pop(mid, None)) is not None:
            if refusal is not None:
                log.error("the broker refused the renewed subscription to %s (%s): asked again on the next reconnect",
                          topic, refusal)
            self._set_refusal(topic, refusal)
        future = self._pending.pop(mid, None)
        if future is not None and not future.done():
            future.set_result(refusal)

    def _set_refusal(self, topic: str, refusal: str | None) -> None:
        before = self.refused.get(topic)
        if refusal is None:
            self.refused.pop(topic, None)
        else:
            self.refused[topic] = refusal
        if before != refusal:
            self.refusals_changed.set()

    # -- public API ---------------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        return self._connected is not None and self._connected.is_set()

    async def __aenter__(self) -> MqttClient:
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.disconnect()

    async def connect(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._connected = asyncio.Event()
        self._refused = asyncio.Event()
        self._client.connect_async(self.host, self.port, keepalive=self._keepalive)
        if self.driver == "loop":
            self._driven = _LoopDriver(self._client, self._loop, self._min_delay, self._max_delay, self._keepalive)
            self._driven.dial()
        else:
            self._client.loop_start()
        waiters = {asyncio.ensure_future(self._connected.wait()), asyncio.ensure_future(self._refused.wait())}
        done, pending = await asyncio.wait(waiters, timeout=self.connect_timeout, return_when=asyncio.FIRST_COMPLETED)
        for waiter in pending:
            waiter.cancel()
        if not self._connected.is_set():
            if self.start_offline and not self._refused.is_set():
                log.warning("the MQTT broker %s:%d does not answer: carrying on offline and dialing it again",
                            self.host, self.port)
                return
            await self._stop_network()  # stop paho retrying credentials the broker refused
            why = self._connect_error or "no answer"
            raise MqttError(f"could not connect to MQTT broker {self.host}:{self.port}: {why}")

    async def disconnect(self) -> None:
        if self._driven is not None:
            self._driven.stop_dialing()
        self._client.disconnect()
        if self._driven is not None:
            await self._driven.flushed(timeout=2.0)
        await self._stop_network()

    async def _stop_network(self) -> None:
        if self._driven is not None:
            self._driven.close()
        else:
            await asyncio.to_thread(self._client.loop_stop)

    @property
    def connector(self) -> Connector | None:
        """How the next connection attempt reaches the broker: None, a TCP connection to host:port."""
        return self._client.connector

    @connector.setter
    def connector(self, connector: Connector | None) -> None:
        self._client.connector = connector  # read by paho's next attempt, on its own thread

    def redial(self) -> None:
        """Drop the connection (no DISCONNECT: the broker publishes the will) and let paho dial again,
        through the connector then set."""
        sock = self._client.socket()
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def abort(self) -> None:
        """Drop the connection without DISCONNECT, as a crash would: the broker publishes the will."""
        sock = self._client.socket()
        if self._driven is not None:
            self._driven.close()
        else:
            self._client.loop_stop()
        if sock is not None:
            sock.close()

    async def publish(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False, timeout: float = 15.0,
                      wait: bool = True) -> None:
        """Publish; with qos > 0 and `wait`, until the broker acknowledged it. Without `wait` it returns
        once paho holds it: an unconnected client sends it after reconnecting."""
        assert self._loop is not None
        info = self._client.publish(topic, payload, qos=qos, retain=retain)
        if info.rc not in (paho.MQTT_ERR_SUCCESS, paho.MQTT_ERR_NO_CONN):
            raise MqttError(f"publish to {topic} failed: {paho.error_string(info.rc)}")
        if qos == 0 or not wait:
            return
        future = self._loop.create_future()
        self._pending[info.mid] = future
        # Not connected: paho keeps a QoS>0 message and sends it after reconnecting; wait for that.
        if info.rc == paho.MQTT_ERR_SUCCESS and info.is_published():
            self._resolve(info.mid)
        try:
            async with asyncio.timeout(timeout):
                await future
        except TimeoutError:
            self._pending.pop(info.mid, None)
            raise MqttError(f"publish to {topic} not acknowledged within {timeout:.0f} s") from None

    async def subscribe(self, topic: str, qos: int = 1, timeout: float = 15.0) -> None:
        """Subscribe, and keep the subscription across reconnects.

        Raises:
            SubscriptionRefused: the broker's SUBACK refused it; it stays asked for on every reconnect.
            MqttError: no SUBACK within `timeout`.
        """
        assert self._loop is not None
        self._subscriptions[topic] = qos
        if self.start_offline and not self.connected:
            # Kept in _subscriptions: made on connect, where a refusal lands in `refused`. Not even
            # sent now: a connection that is open but unanswered (a middlebox, a stuck broker) would
            # hold this call for its whole timeout.
            return
        rc, mid = self._client.subscribe(topic, qos)
        if rc == paho.MQTT_ERR_NO_CONN and self.start_offline:
            return
        if rc != paho.MQTT_ERR_SUCCESS:
            raise MqttError(f"subscribe to {topic} failed: {paho.error_string(rc)}")
        future: asyncio.Future[str | None] = self._loop.create_future()
        self._pending[mid] = future
        try:
            async with asyncio.timeout(timeout):
                refusal = await future
        except TimeoutError:
            self._pending.pop(mid, None)
            raise MqttError(f"subscription to {topic} not acknowledged within {timeout:.0f} s") from None
        self._set_refusal(topic, refusal)
        if refusal is not None:
            raise SubscriptionRefused(topic, refusal)

    def waiting_message(self) -> Message | None:
        """A message that has arrived already, without waiting; None if there is none. A consumer
        of a flood takes these between its waits (each wait costs a loop turn and two futures)."""
        try:
            message = self._queue.get_nowait()
        except asyncio.QueueEmpty:
            return None
        if message.held_mid:
            self._client.ack(message.held_mid, message.qos)
        return message

    async def next_message(self, timeout: float | None = None) -> Message:
        # asyncio.timeout, not wait_for: on 3.11, wait_for returns a message that arrived in the same
        # loop turn as a cancellation and drops the cancellation (Ctrl-C then did not stop the demo).
        async with asyncio.timeout(timeout):
            message = await self._queue.get()
        if message.held_mid:
            self._client.ack(message.held_mid, message.qos)
        return message


class _LoopDriver:
    """paho's network work on an asyncio loop: its socket read and written when the loop says it is
    ready, its keepalive checked on a timer, and a lost connection dialled again after a jittered,
    doubling wait, as paho's thread would. Runs only on the loop's thread."""

    def __init__(self, client: paho.Client, loop: asyncio.AbstractEventLoop, min_delay: float, max_delay: float,
                 keepalive: int) -> None:
        self._client, self._loop = client, loop
        self._min_delay, self._max_delay = min_delay, max_delay
        self._delay = min_delay
        self._dialing = True
        self._sock: socket.socket | None = None
        self._dial_later: asyncio.TimerHandle | None = None
        # Keepalive pings and the broker's silence are noticed within a third of the interval.
        self._tick_every = max(0.5, min(5.0, keepalive / 3))
        self._ticker = loop.call_later(self._tick_every * random.random(), self._tick)
        client.on_socket_open = self._opened
        client.on_socket_close = self._closed_socket
        client.on_socket_register_write = self._want_write
        client.on_socket_unregister_write = self._wrote

    def dial(self) -> None:
        self._dial_later = None
        if not self._dialing:
            return
        try:
            self._client.reconnect()
        except (OSError, ValueError) as exc:  # refused, unreachable, TLS: tried again later, as paho's thread would
            log.debug("connection to the broker failed: %s", exc)
            self._redial()

    def connected(self) -> None:
        self._delay = self._min_delay

    def stop_dialing(self) -> None:
        self._dialing = False
        if self._dial_later is not None:
            self._dial_later.cancel()
            self._dial_later = None

    def _redial(self) -> None:
        if not self._dialing or self._dial_later is not None:
            return
        self._dial_later = self._loop.call_later(self._delay, self.dial)
        self._delay = min(self._delay * 2, self._max_delay)

    def _opened(self, client, userdata, sock) -> None:  # noqa: ANN001
        self._sock = sock
        self._loop.add_reader(sock, self._read)

    def _closed_socket(self, client, userdata, sock) -> None:  # noqa: ANN001
        self._loop.remove_reader(sock)
        self._loop.remove_writer(sock)
        self._sock = None
        self._redial()

    def _want_write(self, client, userdata, sock) -> None:  # noqa: ANN001
        self._loop.add_writer(sock, self._write)

    def _wrote(self, client, userdata, sock) -> None:  # noqa: ANN001
        self._loop.remove_writer(sock)

    def _read(self) -> None:
        self._client.loop_read()

    def _write(self) -> None:
        self._client.loop_write()

    def _tick(self) -> None:
        self._client.loop_misc()
        self._ticker = self._loop.call_later(self._tick_every, self._tick)

    async def flushed(self, timeout: float) -> None:
        """Until paho closed the socket after sending what it queued (a DISCONNECT), or `timeout`."""
        end = self._loop.time() + timeout
        while self._sock is not None and self._loop.time() < end:
            await asyncio.sleep(0.02)

    def close(self) -> None:
        self._ticker.cancel()
        self.stop_dialing()
        if self._sock is not None:  # still open: a connection given up (refused, no CONNACK) or aborted
            self._loop.remove_reader(self._sock)
            self._loop.remove_writer(self._sock)
            self._sock.close()
            self._sock = None
