"""One trace from the device's MQTT message through the bridge and JetStream to the InfluxDB
write: the bridge pipeline and the timeseries projection in-process, real Mosquitto, NATS and
InfluxDB, spans kept by the SDK's in-memory exporter."""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import nats
import paho.mqtt.client as paho
import pytest
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from bridges.mqtt import MqttSource
from bridges.pipeline import Pipeline, pump
from bridges.publisher import Publisher
from infra.settings import Settings
from infra.streams import Streams
from iot.broker import PrivateBroker
from projections.influx import InfluxClient
from projections.timeseries import (
    JetStreamDeadLetters,
    PointWriter,
    TimeseriesProjection,
    run_projection,
)
from tests.e2e.processes import free_port

pytestmark = pytest.mark.integration

DEVICE_TRACE = 0x0AF7651916CD43DD8448EB211C80319C
DEVICE_SPAN = 0xB7AD6B7169203331


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[PrivateBroker]:
    mosquitto = PrivateBroker(tmp_path / "mosquitto", free_port())
    mosquitto.start()
    yield mosquitto
    mosquitto.stop()


@dataclass
class Running:
    """The bridge pipeline and the timeseries projection, running in this process."""

    influx: InfluxClient
    pipeline: Pipeline


@pytest.fixture
async def running(migrated: Settings, broker: PrivateBroker) -> AsyncIterator[Running]:
    streams = Streams(migrated.namespace)
    nc = await nats.connect(migrated.nats_url)
    js = nc.jetstream()
    publisher = Publisher(nc)
    await publisher.start()
    source = MqttSource("127.0.0.1", broker.port, f"bridge-{secrets.token_hex(4)}", 10)
    pipeline = Pipeline(publisher, streams, {"dev-1": "active"}, source)
    influx = InfluxClient(migrated.influx_url, migrated.influx_db)
    stop = asyncio.Event()
    projection = TimeseriesProjection(
        PointWriter(influx), JetStreamDeadLetters(js, streams), stop=stop
    )
    tasks = [
        asyncio.create_task(pump(source.inbox, source.wakeup, pipeline)),
        asyncio.create_task(run_projection(js, streams, projection, stop)),
    ]
    source.start()
    try:
        await wait_until(lambda: source.connected)
        yield Running(influx, pipeline)
    finally:
        stop.set()
        pipeline.close()
        source.wakeup.set()
        await asyncio.to_thread(source.stop)
        await asyncio.gather(*tasks)
        await influx.aclose()
        await nc.close()


def publish(port: int, topic: str, payload: str, traceparent: str | None = None) -> None:
    """Publish one QoS 1 message over MQTT 5, with a `traceparent` user property if given."""
    client = paho.Client(
        CallbackAPIVersion.VERSION2, client_id=f"dev-{secrets.token_hex(4)}", protocol=paho.MQTTv5
    )
    client.connect("127.0.0.1", port)
    client.loop_start()
    try:
        properties = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
        if traceparent is not None:
            properties.UserProperty = ("traceparent", traceparent)
        client.publish(topic, payload, qos=1, properties=properties).wait_for_publish(10)
    finally:
        client.disconnect()
        client.loop_stop()


async def wait_until(condition: Callable[[], bool], wait: float = 30.0) -> None:
    deadline = time.monotonic() + wait
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met")
        await asyncio.sleep(0.05)


def named(exporter: InMemorySpanExporter, name: str) -> list[ReadableSpan]:
    return [s for s in exporter.get_finished_spans() if s.name == name]


def trace_of(exporter: InMemorySpanExporter, trace_id: int) -> dict[str, ReadableSpan]:
    spans = [s for s in exporter.get_finished_spans() if s.context.trace_id == trace_id]
    by_name = {s.name: s for s in spans}
    assert len(by_name) == len(spans), f"one span per step expected: {[s.name for s in spans]}"
    return by_name


async def test_a_reading_with_a_device_traceparent_is_traced_from_the_bridge_to_the_influx_write(
    running: Running, broker: PrivateBroker, spans: InMemorySpanExporter
) -> None:
    device_parent = f"00-{DEVICE_TRACE:032x}-{DEVICE_SPAN:016x}-01"

    await asyncio.to_thread(
        publish, broker.port, "devices/dev-1/telemetry", '{"t": 21.5}', device_parent
    )
    await wait_until(lambda: bool(named(spans, "projection.timeseries.write")))

    steps = trace_of(spans, DEVICE_TRACE)
    assert set(steps) == {"bridge.receive", "bridge.publish", "projection.timeseries.write"}
    receive, publish_, write = (
        steps["bridge.receive"],
        steps["bridge.publish"],
        steps["projection.timeseries.write"],
    )
    assert receive.parent is not None
    assert receive.parent.span_id == DEVICE_SPAN
    assert receive.parent.is_remote
    assert publish_.parent is not None
    assert publish_.parent.span_id == receive.context.span_id
    assert write.parent is not None
    assert write.parent.span_id == publish_.context.span_id
    assert write.parent.is_remote  # it came through the NATS header
    assert (receive.kind, publish_.kind, write.kind) == (
        SpanKind.CONSUMER,
        SpanKind.PRODUCER,
        SpanKind.CONSUMER,
    )
    assert receive.attributes is not None
    assert publish_.attributes is not None
    assert receive.attributes["iot.outcome"] == "stored"
    assert receive.attributes["messaging.destination.name"] == "devices/dev-1/telemetry"
    assert str(publish_.attributes["messaging.destination.name"]).endswith(".telemetry.dev-1")
    results = await running.influx.query("SELECT t FROM telemetry WHERE device_id = 'dev-1'")
    assert results[0]["series"][0]["values"][0][1] == 21.5


async def test_a_reading_without_a_traceparent_starts_its_trace_at_the_bridge(
    running: Running, broker: PrivateBroker, spans: InMemorySpanExporter
) -> None:
    await asyncio.to_thread(publish, broker.port, "devices/dev-1/telemetry", '{"t": 1}')
    await wait_until(lambda: bool(named(spans, "projection.timeseries.write")))

    (receive,) = named(spans, "bridge.receive")
    assert receive.parent is None  # a new root
    steps = trace_of(spans, receive.context.trace_id)
    assert set(steps) == {"bridge.receive", "bridge.publish", "projection.timeseries.write"}
    write = steps["projection.timeseries.write"]
    assert write.parent is not None
    assert write.parent.span_id == steps["bridge.publish"].context.span_id


async def test_a_dead_lettered_message_is_traced_with_its_outcome(
    running: Running, broker: PrivateBroker, spans: InMemorySpanExporter
) -> None:
    await asyncio.to_thread(publish, broker.port, "devices/nobody/telemetry", '{"t": 1}')
    await wait_until(lambda: bool(named(spans, "bridge.receive")))

    (receive,) = named(spans, "bridge.receive")
    assert receive.attributes is not None
    assert receive.attributes["iot.outcome"] == "dead_letter"
    (publish_,) = named(spans, "bridge.publish")
    assert publish_.attributes is not None
    subject = publish_.attributes["messaging.destination.name"]
    assert isinstance(subject, str)
    assert ".deadletter." in f".{subject}."
