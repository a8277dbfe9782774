"""The auth projection against a real Mosquitto with the dynamic security plugin and real NATS.

Events are published to the namespace's EVENTS stream as the relay publishes them, secrets are
handed over as the command API hands them over; the projector runs in-process as a task.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import nats
import paho.mqtt.client as paho
import pytest
from nats.aio.client import Client as NATS
from nats.js.client import JetStreamContext
from paho.mqtt.enums import CallbackAPIVersion
from prometheus_client import REGISTRY

from domain.published import (
    DeviceDecommissioned,
    DeviceRegistered,
    DeviceResumed,
    DeviceSecretRotated,
    DeviceSuspended,
    PublishedEvent,
    encode_event,
)
from infra import dynsec
from infra import secrets as handover
from infra.dynsec import DynsecClient
from infra.jetstream import consume
from infra.settings import Settings
from infra.streams import Streams
from iot.broker import BrokerAuth, PrivateBroker
from projections.auth import AuthProjector, KvSecrets, consumer_spec

pytestmark = pytest.mark.integration

WAIT_S = 20.0


# --- fixtures ---------------------------------------------------------------------------------
@dataclass
class Harness:
    settings: Settings
    broker: PrivateBroker
    auth: BrokerAuth
    nc: NATS
    js: JetStreamContext
    projector: AuthProjector
    versions: dict[str, int] = field(default_factory=dict)
    position: int = 0

    @property
    def streams(self) -> Streams:
        return Streams(self.settings.namespace)

    async def publish(self, event: PublishedEvent) -> None:
        """As the relay does: subject per device, Nats-Msg-Id `<id>:<version>`."""
        await self.js.publish(
            self.streams.event_subject(event.device_id),
            encode_event(event),
            headers={"Nats-Msg-Id": f"{event.device_id}:{event.version}"},
        )

    def next(self, device_id: str) -> dict[str, Any]:
        self.versions[device_id] = self.versions.get(device_id, 0) + 1
        self.position += 1
        return {
            "device_id": device_id,
            "version": self.versions[device_id],
            "at": datetime.now(UTC),
            "position": self.position,
        }

    async def register(self, device_id: str, *, hand_over: bool = True) -> str:
        """Register a device and hand its secret over as the command API does; the secret."""
        secret = secrets.token_urlsafe(32)
        event = DeviceRegistered(**self.next(device_id), name=device_id, type="sensor", labels={})
        if hand_over:
            await handover.hand_over(self.js, self.streams, device_id, event.version, secret)
        await self.publish(event)
        return secret

    async def rotate(self, device_id: str) -> str:
        secret = secrets.token_urlsafe(32)
        event = DeviceSecretRotated(**self.next(device_id))
        await handover.hand_over(self.js, self.streams, device_id, event.version, secret)
        await self.publish(event)
        return secret

    async def suspend(self, device_id: str) -> None:
        await self.publish(DeviceSuspended(**self.next(device_id), reason="test"))

    async def resume(self, device_id: str) -> None:
        await self.publish(DeviceResumed(**self.next(device_id), status="active"))

    async def decommission(self, device_id: str) -> None:
        await self.publish(DeviceDecommissioned(**self.next(device_id), reason="test"))


@pytest.fixture
async def harness(
    migrated: Settings, secured_broker: PrivateBroker, auth: BrokerAuth
) -> AsyncIterator[Harness]:
    nc = await nats.connect(migrated.nats_url)
    js = nc.jetstream()
    client = DynsecClient(
        "127.0.0.1", secured_broker.port, dynsec.ADMIN_USERNAME, auth.admin_password
    )
    await client.start()
    await client.wait_ready(within=WAIT_S)
    streams = Streams(migrated.namespace)
    projector = AuthProjector(client, KvSecrets(js, streams), js, migrated.namespace)
    stop = asyncio.Event()
    task = asyncio.create_task(
        consume(js, consumer_spec(migrated.namespace), projector.handle, stop)
    )
    try:
        yield Harness(migrated, secured_broker, auth, nc, js, projector)
    finally:
        stop.set()
        await task
        await client.stop()
        with contextlib.suppress(Exception):
            await js.delete_key_value(streams.secrets_bucket)
            await js.delete_key_value(streams.leases_bucket)
        await nc.close()


# --- MQTT clients -----------------------------------------------------------------------------
class Mqtt:
    """A paho MQTT 5 client in its own network thread, recording what happens to it."""

    def __init__(
        self, port: int, username: str | None, password: str | None, client_id: str = ""
    ) -> None:
        self.port = port
        self.connects: list[bool] = []  # each CONNACK: accepted or not
        self.disconnects = 0
        self.messages: list[tuple[str, bytes]] = []
        self.subacks: dict[int, list[bool]] = {}
        self.pubacks: dict[int, bool] = {}
        self._lock = threading.Lock()
        client = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id or username or f"anon-{secrets.token_hex(4)}",
            protocol=paho.MQTTv5,
        )
        client.reconnect_delay_set(min_delay=1, max_delay=1)
        if username is not None:
            client.username_pw_set(username, password)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.on_subscribe = self._on_subscribe
        client.on_publish = self._on_publish
        self.client = client

    def start(self) -> Mqtt:
        self.client.connect_async("127.0.0.1", self.port, keepalive=30)
        self.client.loop_start()
        return self

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    @property
    def connected(self) -> bool:
        return bool(self.client.is_connected())

    def subscribe(self, topic: str) -> int:
        result, mid = self.client.subscribe(topic, qos=1)
        assert result == paho.MQTT_ERR_SUCCESS
        assert mid is not None
        return mid

    def publish(self, topic: str, payload: bytes, retain: bool = False) -> int:
        info = self.client.publish(topic, payload, qos=1, retain=retain)
        assert info.rc == paho.MQTT_ERR_SUCCESS
        return info.mid

    def received(self, topic: str) -> list[bytes]:
        with self._lock:
            return [p for t, p in self.messages if t == topic]

    def _on_connect(self, _c: paho.Client, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
        self.connects.append(not reason.is_failure)

    def _on_disconnect(self, _c: paho.Client, _u: Any, _f: Any, _r: Any, _p: Any) -> None:
        self.disconnects += 1

    def _on_message(self, _c: paho.Client, _u: Any, message: paho.MQTTMessage) -> None:
        with self._lock:
            self.messages.append((message.topic, bytes(message.payload)))

    def _on_subscribe(self, _c: paho.Client, _u: Any, mid: int, reasons: Any, _p: Any) -> None:
        self.subacks[mid] = [not r.is_failure for r in reasons]

    def _on_publish(self, _c: paho.Client, _u: Any, mid: int, reason: Any, _p: Any) -> None:
        self.pubacks[mid] = not reason.is_failure


@contextlib.contextmanager
def mqtt(
    port: int, username: str | None, password: str | None, client_id: str = ""
) -> Iterator[Mqtt]:
    client = Mqtt(port, username, password, client_id).start()
    try:
        yield client
    finally:
        client.stop()


async def eventually(check: Callable[[], object], what: str, within: float = WAIT_S) -> None:
    """Poll until `check()` is truthy; fail naming `what` otherwise."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while not check():
        if loop.time() > deadline:
            pytest.fail(f"timed out waiting until {what}")
        await asyncio.sleep(0.05)


async def login(port: int, username: str | None, password: str | None, client_id: str = "") -> bool:
    """One connection attempt: accepted or refused."""
    with mqtt(port, username, password, client_id) as client:
        await eventually(lambda: client.connects, "the broker answers the CONNECT")
        return client.connects[0]


async def accepts(port: int, username: str, password: str, what: str) -> None:
    """Wait until the broker accepts this login (the projector applies events asynchronously)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + WAIT_S
    while not await login(port, username, password):
        if loop.time() > deadline:
            pytest.fail(f"timed out waiting until {what}")
        await asyncio.sleep(0.05)


def counter(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def device_id() -> str:
    return f"dev-{secrets.token_hex(4)}"


# --- tests ------------------------------------------------------------------------------------
async def test_registered_device_logs_in_with_its_secret_and_nothing_else(harness: Harness) -> None:
    port = harness.broker.port
    device = device_id()
    secret = await harness.register(device)
    await accepts(port, device, secret, "the registered device may log in")
    assert not await login(port, device, "wrong-" + secret)
    assert not await login(port, device, secret, client_id=f"{device}-other")
    assert not await login(port, None, None)
    assert not await login(port, device_id(), secret)
    # the secret was handed over once and is gone from the bucket
    assert await handover.take(harness.js, harness.streams, device, 1) is None


async def test_device_is_confined_to_its_own_topics(harness: Harness) -> None:
    port = harness.broker.port
    a, b = device_id(), device_id()
    secret_a = await harness.register(a)
    await harness.register(b)
    await accepts(port, a, secret_a, "device A may log in")
    with (
        mqtt(port, dynsec.BRIDGE_USERNAME, harness.auth.bridge_password) as bridge,
        mqtt(port, a, secret_a) as device,
    ):
        await eventually(lambda: bridge.connected and device.connected, "both are connected")
        sub = bridge.subscribe("devices/+/telemetry")
        await eventually(lambda: sub in bridge.subacks, "the bridge's subscription is answered")
        assert bridge.subacks[sub] == [True]

        forbidden_sub = device.subscribe(f"devices/{b}/commands")
        own_sub = device.subscribe(f"devices/{a}/commands")
        await eventually(lambda: own_sub in device.subacks, "A's subscriptions are answered")
        assert device.subacks[forbidden_sub] == [False]
        assert device.subacks[own_sub] == [True]

        forbidden = device.publish(f"devices/{b}/telemetry", b'{"temperature": 99}')
        allowed = device.publish(f"devices/{a}/telemetry", b'{"temperature": 21}')
        # one connection is handled in order: once A's own reading has reached the bridge, the
        # forbidden one has been dealt with too
        await eventually(
            lambda: bridge.received(f"devices/{a}/telemetry"), "A's own reading reaches the bridge"
        )
        await eventually(lambda: allowed in device.pubacks, "A's publishes are acknowledged")
        assert device.pubacks[forbidden] is False  # PUBACK 0x87 not authorized
        assert bridge.received(f"devices/{b}/telemetry") == []
        assert device.connects == [True]  # refused, not dropped
        assert device.disconnects == 0


async def test_suspended_device_is_disconnected_and_refused_until_resumed(
    harness: Harness,
) -> None:
    port = harness.broker.port
    device = device_id()
    secret = await harness.register(device)
    await accepts(port, device, secret, "the device may log in")
    with mqtt(port, device, secret) as connected:
        await eventually(lambda: connected.connected, "the device is connected")
        await harness.suspend(device)
        await eventually(lambda: connected.disconnects >= 1, "the suspended device is dropped")
        # paho reconnects by itself once a second: every attempt is refused
        await eventually(lambda: False in connected.connects, "its reconnection is refused")
        assert connected.connects[0] is True
        assert not connected.connected
    assert not await login(port, device, secret)

    await harness.resume(device)
    await accepts(port, device, secret, "the resumed device may log in again")


async def test_rotation_invalidates_the_old_secret_and_drops_its_connection(
    harness: Harness,
) -> None:
    port = harness.broker.port
    device = device_id()
    old = await harness.register(device)
    await accepts(port, device, old, "the device may log in")
    with mqtt(port, device, old) as connected:
        await eventually(lambda: connected.connected, "the device is connected")
        new = await harness.rotate(device)
        await eventually(lambda: connected.disconnects >= 1, "the old secret's connection drops")
    await accepts(port, device, new, "the new secret works")
    assert not await login(port, device, old)


async def test_decommissioned_device_cannot_connect(harness: Harness) -> None:
    port = harness.broker.port
    device = device_id()
    secret = await harness.register(device)
    await accepts(port, device, secret, "the device may log in")
    with mqtt(port, device, secret) as connected:
        await eventually(lambda: connected.connected, "the device is connected")
        await harness.decommission(device)
        await eventually(lambda: connected.disconnects >= 1, "the device is dropped")
    assert not await login(port, device, secret)
    role = dynsec.device_role(device)
    with pytest.raises(dynsec.DynsecCommandError, match="not found"):
        await harness.projector.plugin.command("getRole", rolename=role)


async def test_bridge_user_receives_device_messages_and_sends_commands_and_desired_state(
    harness: Harness,
) -> None:
    port = harness.broker.port
    device = device_id()
    secret = await harness.register(device)
    await accepts(port, device, secret, "the device may log in")
    with (
        mqtt(port, dynsec.BRIDGE_USERNAME, harness.auth.bridge_password, "bridge-1") as bridge,
        mqtt(port, device, secret) as dev,
    ):
        await eventually(lambda: bridge.connected and dev.connected, "both are connected")
        shared = [
            bridge.subscribe(f"$share/iot-bridge/devices/+/{suffix}")
            for suffix in ("telemetry", "status", "reported", "commands/ack")
        ]
        outside = bridge.subscribe("devices/#")
        own = dev.subscribe(f"devices/{device}/commands")
        await eventually(lambda: outside in bridge.subacks, "the bridge's subscriptions answered")
        assert all(bridge.subacks[mid] == [True] for mid in shared)
        assert bridge.subacks[outside] == [False]
        await eventually(lambda: own in dev.subacks, "the device's subscription is answered")

        dev.publish(f"devices/{device}/status", b"online", retain=True)
        await eventually(
            lambda: bridge.received(f"devices/{device}/status"), "the bridge gets the status"
        )
        bridge.publish(f"devices/{device}/commands", b'{"command_id": "c1"}')
        bridge.publish(f"devices/{device}/desired", b'{"version": 1, "config": {}}', retain=True)
        await eventually(
            lambda: dev.received(f"devices/{device}/commands"), "the device gets its command"
        )
        telemetry = bridge.publish(f"devices/{device}/telemetry", b"{}")
        await eventually(lambda: telemetry in bridge.pubacks, "the bridge's publish is answered")
        assert bridge.pubacks[telemetry] is False  # the bridge does not speak for devices

    with mqtt(port, device, secret) as dev:  # the retained desired state waits for the device
        await eventually(lambda: dev.connected, "the device is connected again")
        desired = dev.subscribe(f"devices/{device}/desired")
        await eventually(lambda: dev.received(f"devices/{device}/desired"), "desired arrives")
        assert dev.subacks[desired] == [True]


async def test_admin_user_may_only_manage_the_plugin(harness: Harness) -> None:
    port = harness.broker.port
    with mqtt(port, dynsec.ADMIN_USERNAME, harness.auth.admin_password) as admin:
        await eventually(lambda: admin.connected, "the admin is connected")
        mid = admin.subscribe("devices/#")
        sent = admin.publish("devices/x/commands", b"{}")
        await eventually(lambda: mid in admin.subacks and sent in admin.pubacks, "answers")
        assert admin.subacks[mid] == [False]
        assert admin.pubacks[sent] is False
    assert not await login(port, dynsec.BRIDGE_USERNAME, harness.auth.admin_password)


async def test_redelivered_registration_keeps_the_issued_secret(harness: Harness) -> None:
    port = harness.broker.port
    device = device_id()
    secret = await harness.register(device)
    await accepts(port, device, secret, "the device may log in")
    again = DeviceRegistered(
        device_id=device,
        version=1,
        at=datetime.now(UTC),
        position=1,
        name=device,
        type="sensor",
        labels={},
    )
    await harness.projector.apply(again, deliveries=2)  # the secret is gone by now
    assert await login(port, device, secret)


async def test_secret_that_never_arrives_gives_an_unusable_password_and_is_counted(
    harness: Harness,
) -> None:
    harness.projector.secret_wait = 0.2
    port = harness.broker.port
    device = device_id()
    before = counter("iot_auth_missing_secrets_total", event="registered")
    await harness.register(device, hand_over=False)
    await eventually(
        lambda: counter("iot_auth_missing_secrets_total", event="registered") > before,
        "the missing secret is counted",
    )
    client = await harness.projector.plugin.command("getClient", username=device)
    assert client["client"]["clientid"] == device
    assert not await login(port, device, "")
    # a rotation with a secret brings the device in
    secret = await harness.rotate(device)
    await accepts(port, device, secret, "the rotated secret works")
