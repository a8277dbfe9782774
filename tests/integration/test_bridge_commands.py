"""Server -> device through the bridge: commands and desired state from domain events on the
EVENTS stream (published here as the relay would) to MQTT devices on a private Mosquitto."""

from __future__ import annotations

import asyncio
import contextlib
import json
import statistics
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from datetime import UTC, datetime, timedelta
from functools import partial
from typing import Any

import httpx
import nats
import paho.mqtt.client as paho
import pytest
from nats.aio.client import Client as NATS
from paho.mqtt.enums import CallbackAPIVersion

from domain.ingest import CommandSent, decode_ingest
from domain.published import (
    DeviceCommandRequested,
    DeviceConfigured,
    DeviceConnected,
    DeviceDecommissioned,
    DeviceRegistered,
    PublishedEvent,
    encode_event,
)
from infra.settings import Settings
from infra.streams import LEASE_TTL_S, Streams
from iot.broker import PrivateBroker
from tests.e2e.processes import Component
from tests.integration.test_bridge import bridge_env, broker, metric, wait_until

pytestmark = pytest.mark.integration
assert broker  # the fixture


class Events:
    """Publishes one namespace's domain events to EVENTS as the relay does."""

    def __init__(self, nc: NATS, streams: Streams) -> None:
        self.js = nc.jetstream()
        self.streams = streams
        self.versions: dict[str, int] = {}
        self.position = 0

    def common(self, device_id: str) -> dict[str, Any]:
        self.versions[device_id] = version = self.versions.get(device_id, 0) + 1
        self.position += 1
        return {
            "device_id": device_id,
            "version": version,
            "at": datetime.now(UTC),
            "position": self.position,
        }

    async def publish(self, event: PublishedEvent) -> None:
        await self.js.publish(
            self.streams.event_subject(event.device_id),
            encode_event(event),
            headers={"Nats-Msg-Id": f"{event.device_id}:{event.version}"},
        )

    async def registered(self, device_id: str) -> None:
        await self.publish(
            DeviceRegistered(**self.common(device_id), name="n", type="t", labels={})
        )

    async def connected(self, device_id: str) -> None:
        await self.publish(DeviceConnected(**self.common(device_id)))

    async def configured(self, device_id: str, version: int, config: dict[str, Any]) -> None:
        await self.publish(
            DeviceConfigured(**self.common(device_id), config=config, config_version=version)
        )

    async def decommissioned(self, device_id: str) -> None:
        await self.publish(DeviceDecommissioned(**self.common(device_id), reason="scrap"))

    async def requested(
        self, device_id: str, command_id: str, ttl_s: float = 3600.0, name: str = "reboot"
    ) -> None:
        common = self.common(device_id)
        await self.publish(
            DeviceCommandRequested(
                **common,
                command_id=command_id,
                name=name,
                args={"n": command_id},
                expires_at=common["at"] + timedelta(seconds=ttl_s),
            )
        )


class DeviceClient:
    """An MQTT device subscribed to its commands and desired state, recording what arrives."""

    def __init__(
        self, port: int, device_id: str, topics: Sequence[str] = (), client_id: str = ""
    ) -> None:
        self.device_id = device_id
        self.received: list[tuple[str, bytes, bool, float]] = []  # topic, payload, retain, when
        self._lock = threading.Lock()
        self._subscribed = threading.Event()
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id or device_id)
        self.client.on_message = self._on_message
        self.client.on_subscribe = lambda *_: self._subscribed.set()
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        wanted = topics or (f"devices/{device_id}/commands", f"devices/{device_id}/desired")
        self.client.subscribe([(t, 1) for t in wanted])
        if not self._subscribed.wait(10):
            raise TimeoutError("not subscribed")

    def _on_message(self, _client: paho.Client, _: Any, message: paho.MQTTMessage) -> None:
        with self._lock:
            self.received.append(
                (message.topic, bytes(message.payload), bool(message.retain), time.perf_counter())
            )

    def on(self, suffix: str) -> list[tuple[bytes, bool, float]]:
        topic = f"devices/{self.device_id}/{suffix}"
        with self._lock:
            return [(p, r, t) for top, p, r, t in self.received if top == topic]

    def commands(self) -> list[dict[str, Any]]:
        return [json.loads(p) for p, _, _ in self.on("commands")]

    def desired_versions(self) -> list[int]:
        return [json.loads(p)["version"] for p, _, _ in self.on("desired") if p]

    def has_commands(self, count: int) -> bool:
        return len(self.on("commands")) >= count

    def command_ids(self) -> list[str]:
        return [c["command_id"] for c in self.commands()]

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
async def events(migrated: Settings) -> AsyncIterator[Events]:
    nc = await nats.connect(migrated.nats_url)
    yield Events(nc, Streams(migrated.namespace))
    await nc.close()


def start_bridge(settings: Settings, broker: PrivateBroker) -> Component:
    bridge = Component(settings, "bridge", **bridge_env(broker))
    bridge.wait_ready(30)
    return bridge


async def metrics_of(bridge: Component) -> str:
    async with httpx.AsyncClient() as http:
        return (await http.get(f"{bridge.url}/metrics", timeout=5)).text


async def leaders(bridges: Sequence[Component]) -> list[Component]:
    found = []
    for bridge in bridges:
        with contextlib.suppress(httpx.HTTPError):
            if metric(await metrics_of(bridge), "iot_bridge_dispatcher_leader") == 1.0:
                found.append(bridge)
    return found


async def wait_leader(bridges: Sequence[Component], wait: float = 30.0) -> Component:
    """The one leader among `bridges`, once there is one."""
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        found = await leaders(bridges)
        if found:
            assert len(found) == 1
            return found[0]
        await asyncio.sleep(0.1)
    raise TimeoutError("no dispatcher leader")


async def wait_for(condition: Callable[[], Any], wait: float = 30.0) -> None:
    await wait_until(lambda: bool(condition()), wait)


async def sent_reports(settings: Settings, expected: int) -> list[tuple[str, bytes, str]]:
    """(subject, data, Nats-Msg-Id) of every CommandSent on INGEST, once there are `expected`."""
    streams = Streams(settings.namespace)
    nc = await nats.connect(settings.nats_url)
    try:
        jsm = nc.jsm()
        found: list[tuple[str, bytes, str]] = []
        deadline = time.monotonic() + 30
        while len(found) < expected and time.monotonic() < deadline:
            info = await jsm.stream_info(streams.ingest)
            found = []
            for seq in range(info.state.first_seq, info.state.last_seq + 1):
                msg = await jsm.get_msg(streams.ingest, seq)
                found.append(
                    (str(msg.subject), msg.data or b"", (msg.headers or {})["Nats-Msg-Id"])
                )
            await asyncio.sleep(0.05)
        return found
    finally:
        await nc.close()


async def test_a_command_to_an_online_device_is_delivered_once_and_reported_sent(
    migrated: Settings, broker: PrivateBroker, events: Events
) -> None:
    await events.registered("dev-1")
    await events.connected("dev-1")
    device = DeviceClient(broker.port, "dev-1")
    bridge = await asyncio.to_thread(start_bridge, migrated, broker)
    try:
        await wait_leader([bridge])
        latencies = []
        for i in range(30):  # one at a time: the path from EVENTS to the device
            started = time.perf_counter()
            await events.requested("dev-1", f"c{i}")
            await wait_for(partial(device.has_commands, i + 1))
            latencies.append(device.on("commands")[i][2] - started)
        reports = await sent_reports(migrated, 30)
        text = await metrics_of(bridge)
    finally:
        bridge.stop()
        device.close()

    commands = device.commands()
    assert [c["command_id"] for c in commands] == [f"c{i}" for i in range(30)]
    first = commands[0]
    assert set(first) == {"command_id", "name", "args", "expires_at"}
    assert (first["name"], first["args"]) == ("reboot", {"n": "c0"})
    assert first["expires_at"].endswith("Z")
    expires = datetime.fromisoformat(first["expires_at"])
    assert expires > datetime.now(UTC) + timedelta(minutes=50)
    streams = Streams(migrated.namespace)
    assert len(reports) == 30
    for i, (subject, data, msg_id) in enumerate(reports):
        assert subject == streams.ingest_subject("ack", "dev-1")
        assert msg_id == f"sent:c{i}"
        sent = decode_ingest(data)
        assert isinstance(sent, CommandSent)
        assert (sent.device_id, sent.command_id) == ("dev-1", f"c{i}")
    assert metric(text, "iot_bridge_commands_dispatched_total", outcome="published") == 30
    ms = sorted(x * 1000 for x in latencies)
    inside = metric(text, "iot_bridge_command_dispatch_seconds_sum") * 1000
    print(
        f"\nEVENTS publish -> device receipt: p50 {statistics.median(ms):.1f} ms,"
        f" p90 {ms[int(len(ms) * 0.9)]:.1f} ms, max {ms[-1]:.1f} ms (n={len(ms)});"
        f" bridge EVENTS receipt -> PUBACK: mean {inside / len(ms):.2f} ms"
    )


async def test_commands_for_an_offline_device_are_held_and_delivered_once_it_connects(
    migrated: Settings, broker: PrivateBroker, events: Events
) -> None:
    await events.registered("dev-1")
    device = DeviceClient(broker.port, "dev-1")  # subscribed, but not online for the system
    bridge = await asyncio.to_thread(start_bridge, migrated, broker)
    try:
        await wait_leader([bridge])
        await events.requested("dev-1", "held-1")
        requested_at = datetime.now(UTC)
        await events.requested("dev-1", "gone", ttl_s=1)
        await events.requested("dev-1", "held-2")
        await events.configured("dev-1", 1, {"rate": 5})
        # the bridge follows EVENTS in order: once the desired state is out, it has seen the
        # commands too, and held them
        await wait_for(lambda: device.on("desired"))
        assert device.on("commands") == []
        await wait_until(lambda: datetime.now(UTC) > requested_at + timedelta(seconds=1.5))
        await events.connected("dev-1")
        await wait_for(lambda: len(device.on("commands")) >= 2)
        await events.requested("dev-1", "after")  # per-device order: a duplicate comes first
        await wait_for(lambda: "after" in device.command_ids())
        text = await metrics_of(bridge)
    finally:
        bridge.stop()
        device.close()
    assert device.command_ids() == ["held-1", "held-2", "after"]
    assert metric(text, "iot_bridge_commands_dispatched_total", outcome="skipped_expired") == 1


async def test_an_expired_command_is_never_delivered(
    migrated: Settings, broker: PrivateBroker, events: Events
) -> None:
    await events.registered("dev-1")
    await events.connected("dev-1")
    device = DeviceClient(broker.port, "dev-1")
    bridge = await asyncio.to_thread(start_bridge, migrated, broker)
    try:
        await wait_leader([bridge])
        common = events.common("dev-1")
        await events.publish(
            DeviceCommandRequested(
                **common,
                command_id="late",
                name="reboot",
                args={},
                expires_at=common["at"] - timedelta(seconds=1),  # e.g. the relay was behind
            )
        )
        await events.requested("dev-1", "fresh")
        await wait_for(device.command_ids)
        text = await metrics_of(bridge)
    finally:
        bridge.stop()
        device.close()
    assert device.command_ids() == ["fresh"]
    assert metric(text, "iot_bridge_commands_dispatched_total", outcome="skipped_expired") == 1


async def test_desired_state_is_retained_for_a_device_subscribing_later_and_cleared_on_decommission(
    migrated: Settings, broker: PrivateBroker, events: Events
) -> None:
    await events.registered("dev-1")
    await events.configured("dev-1", 1, {"rate": 1})
    observer = DeviceClient(broker.port, "dev-1", client_id="observer")
    bridge = await asyncio.to_thread(start_bridge, migrated, broker)
    try:
        await wait_leader([bridge])
        await events.configured("dev-1", 2, {"rate": 2, "mode": "eco"})
        await events.configured("dev-1", 3, {"rate": 3})
        await wait_for(lambda: observer.desired_versions()[-1:] == [3])
        late = DeviceClient(broker.port, "dev-1")
        try:
            await wait_for(lambda: late.on("desired"))
            [(payload, retained, _)] = late.on("desired")
        finally:
            late.close()
        assert retained
        assert json.loads(payload) == {"version": 3, "config": {"rate": 3}}
        versions = observer.desired_versions()
        assert versions == sorted(versions)  # never an older version after a newer one

        await events.decommissioned("dev-1")
        await wait_for(lambda: observer.on("desired")[-1][0] == b"")
        # the marker's retained message comes after any retained desired state (one SUBSCRIBE)
        marker = "devices/dev-1/marker"
        setter = DeviceClient(broker.port, "dev-1", client_id="setter", topics=[marker])
        setter.client.publish(marker, b"m", qos=1, retain=True).wait_for_publish(10)
        setter.close()
        after = DeviceClient(broker.port, "dev-1", topics=["devices/dev-1/desired", marker])
        try:
            await wait_for(lambda: after.on("marker"))
        finally:
            after.close()
        assert after.on("desired") == []
    finally:
        bridge.stop()
        observer.close()


async def test_two_bridges_elect_one_leader_and_deliver_each_command_once(
    migrated: Settings, broker: PrivateBroker, events: Events
) -> None:
    await events.registered("dev-1")
    await events.connected("dev-1")
    device = DeviceClient(broker.port, "dev-1")
    bridges = await asyncio.gather(
        asyncio.to_thread(start_bridge, migrated, broker),
        asyncio.to_thread(start_bridge, migrated, broker),
    )
    try:
        leader = await wait_leader(bridges)
        ids = [f"c{i}" for i in range(20)]
        for command_id in ids:
            await events.requested("dev-1", command_id)
        await wait_for(lambda: len(device.command_ids()) >= len(ids))
        texts = [await metrics_of(b) for b in bridges]
        assert await leaders(bridges) == [leader]
        received = device.command_ids()
    finally:
        # closed first: stopping the leader hands the lease over, and the new leader re-delivers
        # what it has not seen reported sent (no command service records it in this test)
        device.close()
        for bridge in bridges:
            bridge.stop()
    assert received == ids
    dispatched = [
        metric(t, "iot_bridge_commands_dispatched_total", outcome="published") for t in texts
    ]
    assert sorted(dispatched) == [0, len(ids)]


async def test_when_the_leader_is_killed_the_other_bridge_takes_over_and_delivers(
    migrated: Settings, broker: PrivateBroker, events: Events
) -> None:
    await events.registered("dev-1")
    await events.connected("dev-1")
    await events.configured("dev-1", 1, {"rate": 1})
    device = DeviceClient(broker.port, "dev-1")
    bridges = await asyncio.gather(
        asyncio.to_thread(start_bridge, migrated, broker),
        asyncio.to_thread(start_bridge, migrated, broker),
    )
    try:
        leader = await wait_leader(bridges)
        [survivor] = [b for b in bridges if b is not leader]
        await events.requested("dev-1", "before")
        await wait_for(lambda: device.command_ids() == ["before"])
        leader.kill()
        killed = time.perf_counter()
        await events.requested("dev-1", "during-1")
        await events.requested("dev-1", "during-2")
        await events.configured("dev-1", 2, {"rate": 2})
        await wait_for(lambda: "during-2" in device.command_ids(), LEASE_TTL_S + 20)
        took_over = time.perf_counter() - killed
        assert await leaders([survivor]) == [survivor]
    finally:
        for bridge in bridges:
            bridge.stop()
        device.close()
    received = device.command_ids()
    # "before" was sent and not acknowledged: the new leader re-delivers it (at least once)
    assert [c for c in received if c != "before"] == ["during-1", "during-2"]
    assert received.index("during-1") < received.index("during-2")
    assert json.loads(device.on("desired")[-1][0])["version"] == 2
    print(f"\nleader killed -> commands delivered by the other bridge after {took_over:.2f} s")
