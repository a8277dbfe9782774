"""Trace context parsing and propagation, batch spans, trace ids in logs, command-step counts."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from dataclasses import dataclass
from datetime import UTC, datetime

import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from prometheus_client import REGISTRY

from commands.relay import count_command_step
from domain.published import DeviceCommandAcknowledged, DeviceCommandExpired, DeviceConnected
from infra import tracing
from infra.logs import JsonFormatter

TRACE = 0x4BF92F3577B34DA6A3CE929D0E0E4736
SPAN = 0x00F067AA0BA902B7
SAMPLED = f"00-{TRACE:032x}-{SPAN:016x}-01"


@dataclass
class Msg:
    headers: dict[str, str] | None


def test_a_w3c_traceparent_round_trips() -> None:
    context = tracing.parse_traceparent(SAMPLED)
    assert context is not None
    assert (context.trace_id, context.span_id, context.is_remote) == (TRACE, SPAN, True)
    assert context.trace_flags.sampled
    assert tracing.traceparent(context) == SAMPLED
    assert tracing.parse_traceparent(SAMPLED.encode()) == context


@pytest.mark.parametrize(
    "value",
    [
        None,
        "",
        "garbage",
        f"ff-{TRACE:032x}-{SPAN:016x}-01",  # version ff is invalid
        f"00-{0:032x}-{SPAN:016x}-01",  # all-zero trace id
        f"00-{TRACE:032x}-{0:016x}-01",  # all-zero span id
        f"00-{TRACE:032x}"[:-1] + f"-{SPAN:016x}-01",  # a short trace id
        f"00-{TRACE:032x}-{SPAN:016x}-01-extra",  # version 00 has exactly four parts
        f"00-{'z' * 32}-{SPAN:016x}-01",
    ],
)
def test_a_malformed_traceparent_means_a_new_trace(value: str | None) -> None:
    assert tracing.parse_traceparent(value) is None
    assert tracing.parent_context(value) is None


def test_a_future_version_with_more_fields_is_read() -> None:
    context = tracing.parse_traceparent(f"01-{TRACE:032x}-{SPAN:016x}-01-more")
    assert context is not None
    assert context.trace_id == TRACE


def test_the_traceparent_user_property_is_found_among_others() -> None:
    properties = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
    properties.UserProperty = [("site", "north"), ("traceparent", SAMPLED)]
    assert tracing.mqtt_traceparent(properties) == SAMPLED
    assert tracing.mqtt_traceparent(Properties(PacketTypes.PUBLISH)) is None  # type: ignore[no-untyped-call]
    assert tracing.mqtt_traceparent(None) is None


def test_while_tracing_is_off_nothing_is_started_or_injected() -> None:
    headers: dict[str, str] = {}
    assert tracing.TRACER is None
    assert tracing.start_bridge_spans("devices/d/telemetry", 1, SAMPLED, headers) is None
    assert headers == {}
    with tracing.batch_span("x", [Msg({"traceparent": SAMPLED})]) as span:
        assert span is None


def test_bridge_spans_continue_the_device_trace_and_put_the_publish_span_in_the_headers(
    spans: InMemorySpanExporter,
) -> None:
    headers = {"Nats-Msg-Id": "x"}
    started = tracing.start_bridge_spans("devices/d/telemetry", 1_000_000_000, SAMPLED, headers)
    assert started is not None
    tracing.end_bridge_spans(started, "ingest.telemetry.d", "stored")

    publish, receive = spans.get_finished_spans()
    assert receive.name == "bridge.receive"
    assert publish.name == "bridge.publish"
    assert receive.parent is not None
    assert receive.parent.span_id == SPAN
    assert publish.parent is not None
    assert publish.parent.span_id == receive.context.span_id
    assert receive.context.trace_id == publish.context.trace_id == TRACE
    assert receive.start_time == 1_000_000_000  # the MQTT receipt
    assert headers["traceparent"] == tracing.traceparent(publish.context)
    assert headers["Nats-Msg-Id"] == "x"
    assert receive.attributes is not None
    assert receive.attributes["iot.outcome"] == "stored"


def test_a_batch_span_is_a_child_of_its_first_sampled_message_and_links_the_others(
    spans: InMemorySpanExporter,
) -> None:
    unsampled = f"00-{1:032x}-{2:016x}-00"
    other = f"00-{3:032x}-{4:016x}-01"
    msgs = [Msg(None), Msg({"traceparent": unsampled}), Msg({"traceparent": SAMPLED})]
    msgs += [Msg({}), Msg({"traceparent": other})]

    with tracing.batch_span("projection.test", msgs, **{"iot.input": "ingest"}) as span:
        assert span is not None

    (finished,) = spans.get_finished_spans()
    assert finished.kind == SpanKind.CONSUMER
    assert finished.parent is not None
    assert (finished.parent.trace_id, finished.parent.span_id) == (TRACE, SPAN)
    assert [(link.context.trace_id, link.context.span_id) for link in finished.links] == [(3, 4)]
    assert finished.attributes is not None
    assert finished.attributes["messaging.batch.message_count"] == 5
    assert finished.attributes["iot.input"] == "ingest"


def test_a_batch_without_trace_context_gets_a_root_span(spans: InMemorySpanExporter) -> None:
    with tracing.batch_span("projection.test", [Msg(None)]):
        pass
    (finished,) = spans.get_finished_spans()
    assert finished.parent is None


def test_batch_span_links_are_bounded(spans: InMemorySpanExporter) -> None:
    msgs = [Msg({"traceparent": f"00-{i + 1:032x}-{i + 1:016x}-01"}) for i in range(200)]
    with tracing.batch_span("projection.test", msgs):
        pass
    (finished,) = spans.get_finished_spans()
    assert len(finished.links) == tracing.MAX_LINKS


def record(message: str) -> logging.LogRecord:
    return logging.LogRecord("iot.test", logging.INFO, __file__, 1, message, None, None)


def test_a_log_line_inside_a_span_carries_its_trace_and_span_ids(
    spans: InMemorySpanExporter,
) -> None:
    formatter = JsonFormatter("bridge")
    assert tracing.TRACER is not None
    with tracing.TRACER.start_as_current_span("work") as span:
        inside = json.loads(formatter.format(record("in")))
    outside = json.loads(formatter.format(record("out")))

    context = span.get_span_context()
    assert inside["trace_id"] == f"{context.trace_id:032x}"
    assert inside["span_id"] == f"{context.span_id:016x}"
    assert list(inside)[:5] == ["ts", "level", "component", "logger", "msg"]
    assert "trace_id" not in outside
    assert "span_id" not in outside


def test_tracing_is_configured_only_when_an_otlp_endpoint_is_set() -> None:
    assert tracing.configure("bridge", {}) is False
    assert tracing.TRACER is None
    script = (
        "from infra import tracing; "
        "on = tracing.configure('bridge', {'OTEL_EXPORTER_OTLP_ENDPOINT': 'http://127.0.0.1:9'}); "
        "print(on, tracing.TRACER is not None)"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=60
    )
    assert done.stdout.split() == ["True", "True"]


def steps(outcome: str) -> float:
    return REGISTRY.get_sample_value("iot_device_commands_total", {"outcome": outcome}) or 0.0


def test_command_events_are_counted_by_step_and_other_events_not_at_all() -> None:
    at = datetime(2026, 1, 1, tzinfo=UTC)
    before = {o: steps(o) for o in ("acknowledged", "expired")}
    count_command_step(
        DeviceCommandAcknowledged(
            device_id="d", version=3, at=at, position=9, command_id="c", result={}
        )
    )
    count_command_step(
        DeviceCommandExpired(device_id="d", version=4, at=at, position=10, command_id="c2")
    )
    count_command_step(DeviceConnected(device_id="d", version=5, at=at, position=11))
    assert steps("acknowledged") == before["acknowledged"] + 1
    assert steps("expired") == before["expired"] + 1
