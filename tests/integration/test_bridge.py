"""The bridge against real NATS JetStream and a private Mosquitto with this project's config."""

from __future__ import annotations

import asyncio
import json
import secrets
import socket
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path

import httpx
import nats
import paho.mqtt.client as paho
import pytest
from nats.aio.client import Client as NATS
from paho.mqtt.enums import CallbackAPIVersion
from prometheus_client import REGISTRY

from bridges.mqtt import MqttSource
from bridges.pipeline import Pipeline, pump
from bridges.publisher import Publisher
from domain.ingest import IngestMessage, Telemetry, decode_ingest
from domain.published import DeviceDecommissioned, DeviceRegistered, encode_event
from infra.settings import Settings
from infra.streams import Streams
from iot.broker import PrivateBroker
from tests.e2e.processes import free_port, running

pytestmark = pytest.mark.integration

DAY_MS = 24 * 3600 * 1000


# --- helpers shared with the e2e tests -------------------------------------------------------
@pytest.fixture
def broker(tmp_path: Path) -> Iterator[PrivateBroker]:
    mosquitto = PrivateBroker(tmp_path / "mosquitto", free_port())
    mosquitto.start()
    yield mosquitto
    mosquitto.stop()


def bridge_env(broker: PrivateBroker, client_id: str = "", **extra: str) -> dict[str, str]:
    return {
        "IOT_MQTT_URL": broker.url,
        "IOT_MQTT_CLIENT_ID": client_id or f"bridge-{secrets.token_hex(4)}",
        **extra,
    }


async def register_devices(
    settings: Settings, device_ids: Sequence[str], decommissioned: Sequence[str] = ()
) -> None:
    """Publish DeviceRegistered (and DeviceDecommissioned) events as the relay would."""
    streams = Streams(settings.namespace)
    nc = await nats.connect(settings.nats_url)
    try:
        js = nc.jetstream()
        at = datetime.now(UTC)
        position = 0
        for device_id in [*device_ids, *decommissioned]:
            position += 1
            event = DeviceRegistered(
                device_id=device_id,
                version=1,
                at=at,
                position=position,
                name="n",
                type="t",
                labels={},
            )
            await js.publish(streams.event_subject(device_id), encode_event(event))
        for device_id in decommissioned:
            position += 1
            gone = DeviceDecommissioned(
                device_id=device_id, version=2, at=at, position=position, reason="scrap"
            )
            await js.publish(streams.event_subject(device_id), encode_event(gone))
    finally:
        await nc.close()


class Device:
    """A paho MQTT client publishing QoS 1 like a device."""

    def __init__(self, broker_port: int, client_id: str = "") -> None:
        self.client = paho.Client(
            CallbackAPIVersion.VERSION2, client_id=client_id or f"dev-{secrets.token_hex(4)}"
        )
        self.client.max_inflight_messages_set(1000)
        self.client.max_queued_messages_set(0)
        self.client.connect("127.0.0.1", broker_port)
        self.client.loop_start()

    def publish(self, topic: str, payload: bytes | str, qos: int = 1) -> paho.MQTTMessageInfo:
        return self.client.publish(topic, payload, qos=qos)

    def publish_all(self, messages: Sequence[tuple[str, bytes | str]]) -> None:
        infos = [self.publish(topic, payload) for topic, payload in messages]
        for info in infos:
            info.wait_for_publish(30)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


async def stream_messages(
    settings: Settings, stream: str, expected: int, wait: float = 60.0
) -> list[tuple[str, bytes, dict[str, str]]]:
    """(subject, data, headers) of every message in `stream`, once it holds `expected`."""
    nc = await nats.connect(settings.nats_url)
    try:
        jsm = nc.jsm()
        deadline = time.monotonic() + wait
        while True:
            info = await jsm.stream_info(stream)
            if info.state.messages >= expected or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.1)
        await asyncio.sleep(0.3)  # anything beyond `expected` would show up too
        info = await jsm.stream_info(stream)
        found = []
        for seq in range(info.state.first_seq, info.state.last_seq + 1):
            msg = await jsm.get_msg(stream, seq)
            found.append((str(msg.subject), msg.data or b"", dict(msg.headers or {})))
        return found
    finally:
        await nc.close()


def metric(text: str, name: str, **labels: str) -> float:
    """The value of one sample in Prometheus text (0 when absent)."""
    wanted = name + (
        "{" + ",".join(f'{k}="{v}"' for k, v in labels.items()) + "}" if labels else ""
    )
    for line in text.splitlines():
        if line.startswith(wanted + " "):
            return float(line.split()[-1])
    return 0.0


# --- the bridge as a process -----------------------------------------------------------------
async def test_every_payload_shape_is_stored_and_every_bad_input_dead_lettered(
    migrated: Settings, broker: PrivateBroker
) -> None:
    await register_devices(migrated, ["dev-1", "dev-2"], decommissioned=["dead-1"])
    streams = Streams(migrated.namespace)
    now = int(time.time() * 1000)
    valid: list[tuple[str, bytes | str]] = [
        ("devices/dev-1/telemetry", b'{"temperature": 21.5, "on": true, "mode": "eco", "n": 3}'),
        ("devices/dev-1/telemetry", json.dumps({"ts": now - 1000, "values": {"t": 1.5}})),
        (
            "devices/dev-2/telemetry",
            json.dumps([{"ts": now - 2000, "values": {"t": 1}}, {"humidity": 40}]),
        ),
        ("devices/dev-1/status", "online"),
        ("devices/dev-1/reported", b'{"fw": "1.2", "nested": {"a": [1, 2]}}'),
        ("devices/dev-2/commands/ack", b'{"command_id": "c1", "status": "ok", "result": {"x": 1}}'),
    ]
    invalid: list[tuple[str, str, bytes | str]] = [
        ("too_large", "devices/dev-1/telemetry", json.dumps({"a": "x" * 70_000})),
        ("too_many_readings", "devices/dev-1/telemetry", json.dumps([{"a": 1}] * 1001)),
        ("malformed_json", "devices/dev-1/telemetry", b"{nope"),
        ("malformed_json", "devices/dev-1/reported", b'{"a": "\xff"}'),
        ("invalid_payload", "devices/dev-1/telemetry", b'"just a string"'),
        ("invalid_payload", "devices/dev-1/status", "maybe"),
        ("invalid_payload", "devices/dev-1/commands/ack", b'{"command_id": "c", "status": "?"}'),
        ("invalid_value", "devices/dev-1/telemetry", b'{"a": null}'),
        ("non_finite", "devices/dev-1/telemetry", b'{"a": 1e999}'),
        ("invalid_metric_name", "devices/dev-1/telemetry", b'{"bad name": 1}'),
        (
            "future_timestamp",
            "devices/dev-1/telemetry",
            json.dumps({"ts": now + 2 * DAY_MS, "values": {"a": 1}}),
        ),
        ("unknown_device", "devices/ghost/telemetry", b'{"a": 1}'),
        ("decommissioned_device", "devices/dead-1/telemetry", b'{"a": 1}'),
        ("invalid_topic", "devices/bad.id/telemetry", b'{"a": 1}'),
    ]
    # valid messages before, between and after the bad ones
    messages: list[tuple[str, bytes | str]] = list(valid[:3])
    for reason_topic_payload in invalid:
        messages.append(reason_topic_payload[1:])
    messages += valid[3:]

    with running(migrated, "bridge", **bridge_env(broker)) as bridge:
        await asyncio.to_thread(bridge.wait_ready)
        device = Device(broker.port)
        try:
            await asyncio.to_thread(device.publish_all, messages)
        finally:
            device.close()
        stored = await stream_messages(migrated, streams.ingest, len(valid))
        dead = await stream_messages(migrated, streams.deadletter, len(invalid))
        async with httpx.AsyncClient() as http:
            text = (await http.get(f"{bridge.url}/metrics")).text

    assert len(stored) == len(valid)
    by_subject: dict[str, list[IngestMessage]] = {}
    for subject, data, headers in stored:
        by_subject.setdefault(subject, []).append(decode_ingest(data))
        assert headers["Nats-Msg-Id"]
    telemetry_1 = by_subject[streams.ingest_subject("telemetry", "dev-1")]
    assert isinstance(telemetry_1[0], Telemetry)
    assert telemetry_1[0].server_time
    assert telemetry_1[0].readings[0].values == {
        "temperature": 21.5,
        "on": True,
        "mode": "eco",
        "n": 3,
    }
    assert isinstance(telemetry_1[1], Telemetry)
    assert not telemetry_1[1].server_time
    assert telemetry_1[1].readings[0].ts == now - 1000
    batch = by_subject[streams.ingest_subject("telemetry", "dev-2")][0]
    assert isinstance(batch, Telemetry)
    assert [r.values for r in batch.readings] == [{"t": 1}, {"humidity": 40}]
    assert batch.readings[0].ts == now - 2000
    assert streams.ingest_subject("status", "dev-1") in by_subject
    assert streams.ingest_subject("reported", "dev-1") in by_subject
    assert streams.ingest_subject("ack", "dev-2") in by_subject

    assert len(dead) == len(invalid)
    for (reason, topic, payload), (subject, data, headers) in zip(invalid, dead, strict=True):
        raw = payload.encode() if isinstance(payload, str) else payload
        assert subject == streams.deadletter_subject(reason)
        assert headers["Iot-Reason"] == reason
        assert headers["Iot-Topic"] == topic
        assert headers["Iot-Detail"]
        assert int(headers["Iot-Received-At"]) >= now
        assert headers["Nats-Msg-Id"].startswith("dlq:")
        assert data == raw
    for reason in {r for r, _, _ in invalid}:
        expected = sum(1 for r, _, _ in invalid if r == reason)
        assert metric(text, "iot_bridge_dead_letters_total", reason=reason) == expected
    assert metric(text, "iot_bridge_messages_total", kind="telemetry", outcome="stored") == 3
    assert metric(text, "iot_bridge_inflight") == 0


async def test_readyz_is_503_until_the_broker_is_reachable(
    migrated: Settings, tmp_path: Path
) -> None:
    port = free_port()
    mosquitto = PrivateBroker(tmp_path / "late", port)
    with running(migrated, "bridge", IOT_MQTT_URL=mosquitto.url) as bridge:
        deadline = time.monotonic() + 20
        answer = None
        while time.monotonic() < deadline:
            try:
                async with httpx.AsyncClient() as http:
                    answer = await http.get(f"{bridge.url}/readyz", timeout=1)
                break
            except httpx.HTTPError:
                await asyncio.sleep(0.1)
        assert answer is not None
        assert answer.status_code == 503
        assert answer.json()["checks"]["mqtt"] is False
        mosquitto.start()
        try:
            await asyncio.to_thread(bridge.wait_ready, 30.0)
        finally:
            mosquitto.stop()


# --- the pipeline in-process, to force a redelivery ------------------------------------------
@pytest.fixture
async def nc(migrated: Settings) -> AsyncIterator[NATS]:
    client = await nats.connect(migrated.nats_url)
    yield client
    await client.close()


async def test_a_message_redelivered_after_a_lost_ack_is_stored_once(
    migrated: Settings, broker: PrivateBroker, nc: NATS
) -> None:
    streams = Streams(migrated.namespace)
    devices = {"dev-1": "active"}
    publisher = Publisher(nc)
    await publisher.start()
    source = MqttSource("127.0.0.1", broker.port, f"bridge-{secrets.token_hex(4)}", 10)
    pipeline = Pipeline(publisher, streams, devices, source, is_connected=lambda: nc.is_connected)
    dropped: list[int] = []
    real_ack = source.ack

    def lose_first_ack(packet_id: int, qos: int) -> None:
        if not dropped:  # JetStream has it; the PUBACK is lost with the connection
            dropped.append(packet_id)
            sock = source.client.socket()
            assert isinstance(sock, socket.socket)
            sock.shutdown(socket.SHUT_RDWR)
            return
        real_ack(packet_id, qos)

    source.ack = lose_first_ack  # type: ignore[method-assign]
    duplicates_before = duplicates()
    feeder = asyncio.create_task(pump(source.inbox, source.wakeup, pipeline))
    source.start()
    try:
        await wait_until(lambda: source.connected)
        device = Device(broker.port)
        try:
            device.publish_all([("devices/dev-1/status", "online")])
        finally:
            device.close()
        await wait_until(
            lambda: len(dropped) == 1 and source.generation >= 3 and not len(pipeline.window)
        )
        stored = await stream_messages(migrated, streams.ingest, 1)
    finally:
        pipeline.close()
        source.wakeup.set()
        await asyncio.to_thread(source.stop)
        await feeder

    assert len(stored) == 1
    assert duplicates() == duplicates_before + 1  # the redelivery reached JetStream, was dropped


def duplicates() -> float:
    value = REGISTRY.get_sample_value(
        "iot_bridge_messages_total", {"kind": "status", "outcome": "duplicate"}
    )
    return value or 0.0


async def wait_until(condition: Callable[[], bool], wait: float = 30.0) -> None:
    deadline = time.monotonic() + wait
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met")
        await asyncio.sleep(0.05)
