"""MQTT adapter: paho-mqtt 2.x with manual acknowledgements, its network loop in its own thread.

Why paho directly rather than aiomqtt: aiomqtt 2.x acknowledges on receipt and drops on a full
queue; paho gives native manual acks (`manual_ack_set`) and its threaded loop reconnects by
itself with exponential backoff, keeping the persistent session's properties. Messages are
converted to `Inbound` at this edge and handed to asyncio through a deque plus one wake-up per
burst (`call_soon_threadsafe`), so the event loop pays no per-message cross-thread call.

The bound on what is in flight is MQTT 5's Receive Maximum: the broker sends no more than that
many unacknowledged QoS 1 messages, so neither this adapter nor the pipeline buffers more.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from bridges import metrics
from infra import tracing
from infra.runtime import paho_client

log = logging.getLogger(__name__)

SHARE_GROUP = "iot-bridge"
TOPICS = ("telemetry", "status", "reported", "commands/ack")
SESSION_EXPIRY = 24 * 3600  # seconds the broker keeps our session (and queues for it) offline


@dataclass(frozen=True, slots=True)
class Inbound:
    """One received MQTT message (payload None: a connection change marker)."""

    generation: int  # connection number: packet ids are only meaningful within one
    topic: str
    payload: bytes | None
    packet_id: int
    qos: int
    dup: bool
    received_at_ns: int
    traceparent: str | None = None  # the MQTT 5 user property, read only while tracing


def subscriptions(group: str = SHARE_GROUP, *, shared: bool = True) -> list[tuple[str, int]]:
    """The bridge's QoS 1 subscriptions: in a share group (replicas split the messages), or
    plain (one bridge takes them all; see `IOT_BRIDGE_SUBSCRIPTION`)."""
    prefix = f"$share/{group}/" if shared else ""
    return [(f"{prefix}devices/+/{suffix}", 1) for suffix in TOPICS]


class MqttSource:
    """A persistent-session, manually acknowledging MQTT 5 subscriber."""

    def __init__(
        self,
        host: str,
        port: int,
        client_id: str,
        receive_maximum: int,
        *,
        username: str = "",
        password: str = "",
        tls: bool = False,
        keepalive: int = 5,  # a broker that stops answering is noticed within ~2 keepalives
        shared: bool = True,
    ) -> None:
        self.inbox: deque[Inbound] = deque()
        self.wakeup = asyncio.Event()
        self.connected = False
        self.generation = 0
        self._loop = asyncio.get_running_loop()
        self._scheduled = False
        self._stopping = False
        self._host = host
        self._port = port
        self._keepalive = keepalive
        self._receive_maximum = receive_maximum
        self._subscriptions = subscriptions(shared=shared)
        # Back within 2 s of the broker: what devices publish between a broker's restart and our
        # return depends on the broker keeping our restored subscription (docs/reliability.md).
        client = paho_client(client_id, username, password, tls=tls, max_reconnect_delay=2)
        client.manual_ack_set(True)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        self.client = client

    def start(self) -> None:
        props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        props.SessionExpiryInterval = SESSION_EXPIRY
        props.ReceiveMaximum = self._receive_maximum
        self.client.connect_async(
            self._host, self._port, self._keepalive, clean_start=False, properties=props
        )
        self.client.loop_start()

    def stop(self) -> None:
        """Disconnect (the session and its unacknowledged messages stay with the broker)."""
        self._stopping = True
        self.client.disconnect()
        self.client.loop_stop()
        self.connected = False
        metrics.MQTT_CONNECTED.set(0)

    def ack(self, packet_id: int, qos: int) -> None:
        self.client.ack(packet_id, qos)

    # --- paho's network thread -------------------------------------------------------------
    def _push(self, item: Inbound) -> None:
        self.inbox.append(item)
        if not self._scheduled:
            self._scheduled = True
            self._loop.call_soon_threadsafe(self._wake)

    def _wake(self) -> None:
        self._scheduled = False
        self.wakeup.set()

    def _on_connect(
        self, client: paho.Client, _: Any, flags: Any, reason: Any, properties: Any
    ) -> None:
        if reason.is_failure:
            log.warning("MQTT connection refused", extra={"reason": str(reason)})
            return
        self.generation += 1
        self.connected = True
        metrics.MQTT_CONNECTED.set(1)
        log.info(
            "MQTT connected",
            extra={"session_present": bool(flags.session_present), "gen": self.generation},
        )
        client.subscribe(self._subscriptions)
        self._push(Inbound(self.generation, "", None, 0, 0, False, time.time_ns()))

    def _on_disconnect(
        self, _client: paho.Client, _: Any, _flags: Any, reason: Any, _properties: Any
    ) -> None:
        if self.connected and not self._stopping:
            log.warning("MQTT disconnected", extra={"reason": str(reason)})
        self.connected = False
        metrics.MQTT_CONNECTED.set(0)
        self.generation += 1  # anything still in flight belongs to a dead connection
        self._push(Inbound(self.generation, "", None, 0, 0, False, time.time_ns()))

    def _on_message(self, _client: paho.Client, _: Any, message: paho.MQTTMessage) -> None:
        payload = message.payload
        try:
            topic = message.topic
        except UnicodeDecodeError:
            topic = message._topic.decode("utf-8", "replace")
        parent = None
        if tracing.TRACER is not None and message.properties is not None:
            parent = tracing.mqtt_traceparent(message.properties)
        self._push(
            Inbound(
                self.generation,
                topic,
                payload if isinstance(payload, bytes) else bytes(payload),
                message.mid,
                message.qos,
                bool(message.dup),
                time.time_ns(),
                parent,
            )
        )


class PublishFailed(Exception):
    """The broker did not take a message (not connected, refused, or no PUBACK in time)."""


class MqttSink:
    """The dispatcher's own MQTT 5 client (clean session, nothing subscribed): QoS 1 publishes
    awaited until the broker's PUBACK. Separate from `MqttSource`, so commands and desired
    state never wait behind the ingestion flow's socket, thread or Receive Maximum.

    PUBACKs reach asyncio through `call_soon_threadsafe`; a future is registered in the same
    loop step as its publish, so an early PUBACK cannot be missed. paho resends what is still
    unacknowledged after a reconnect, so a PUBACK can also arrive after one.
    """

    def __init__(
        self,
        host: str,
        port: int,
        client_id: str,
        *,
        username: str = "",
        password: str = "",
        tls: bool = False,
        keepalive: int = 5,
        max_inflight: int = 1000,
        puback_timeout: float = 10.0,
    ) -> None:
        self.connected = False
        self.puback_timeout = puback_timeout
        self._stopping = False
        self._ready = asyncio.Event()
        self._loop = asyncio.get_running_loop()
        self._futures: dict[int, asyncio.Future[None]] = {}
        self._host = host
        self._port = port
        self._keepalive = keepalive
        client = paho_client(client_id, username, password, tls=tls, max_reconnect_delay=10)
        client.max_inflight_messages_set(max_inflight)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_publish = self._on_publish
        self.client = client

    def start(self) -> None:
        self.client.connect_async(self._host, self._port, self._keepalive, clean_start=True)
        self.client.loop_start()

    def stop(self) -> None:
        self._stopping = True
        self.client.disconnect()
        self.client.loop_stop()
        self.connected = False
        metrics.MQTT_OUT_CONNECTED.set(0)

    def pending(self) -> int:
        return len(self._futures)

    async def wait_connected(self, within: float) -> bool:
        if not self.connected:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._ready.wait(), within)
        return self.connected

    async def publish(
        self,
        topic: str,
        payload: bytes,
        *,
        retain: bool = False,
        expiry_s: int | None = None,
    ) -> None:
        """Publish QoS 1 and wait for the broker's PUBACK (`expiry_s`: MQTT message expiry)."""
        if not self.connected:
            raise PublishFailed("not connected to the broker")
        props = None
        if expiry_s is not None:
            props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
            props.MessageExpiryInterval = max(1, expiry_s)
        info = self.client.publish(topic, payload, qos=1, retain=retain, properties=props)
        if info.rc not in (paho.MQTT_ERR_SUCCESS, paho.MQTT_ERR_NO_CONN):
            raise PublishFailed(f"publish refused: {paho.error_string(info.rc)}")
        future: asyncio.Future[None] = self._loop.create_future()
        self._futures[info.mid] = future
        try:
            await asyncio.wait_for(future, self.puback_timeout)
        except TimeoutError:
            raise PublishFailed(f"no PUBACK within {self.puback_timeout}s") from None
        finally:
            if self._futures.get(info.mid) is future:
                del self._futures[info.mid]

    # --- paho's network thread -------------------------------------------------------------
    def _on_connect(
        self, _client: paho.Client, _: Any, _flags: Any, reason: Any, _properties: Any
    ) -> None:
        if reason.is_failure:
            log.warning("MQTT (dispatcher) connection refused", extra={"reason": str(reason)})
            return
        self._loop.call_soon_threadsafe(self._set_connected, True)

    def _on_disconnect(
        self, _client: paho.Client, _: Any, _flags: Any, reason: Any, _properties: Any
    ) -> None:
        self._loop.call_soon_threadsafe(self._set_connected, False)

    def _on_publish(
        self, _client: paho.Client, _: Any, mid: int, reason: Any, _properties: Any
    ) -> None:
        failure = str(reason) if reason is not None and reason.is_failure else ""
        self._loop.call_soon_threadsafe(self._published, mid, failure)

    # --- the event loop --------------------------------------------------------------------
    def _set_connected(self, up: bool) -> None:
        if up != self.connected and not self._stopping:
            log.log(
                logging.INFO if up else logging.WARNING,
                "MQTT (dispatcher) connected" if up else "MQTT (dispatcher) disconnected",
            )
        self.connected = up
        metrics.MQTT_OUT_CONNECTED.set(int(up))
        if up:
            self._ready.set()
        else:
            self._ready.clear()

    def _published(self, mid: int, failure: str) -> None:
        future = self._futures.pop(mid, None)
        if future is None or future.done():
            return
        if failure:
            future.set_exception(PublishFailed(f"broker refused the message: {failure}"))
        else:
            future.set_result(None)
