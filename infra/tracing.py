"""OpenTelemetry tracing: off (and free) unless `OTEL_EXPORTER_OTLP_ENDPOINT` is set.

A reading's trace runs from the device to the projection write:

- `bridge.receive` (CONSUMER): the bridge's handling of one MQTT message, from its receipt to
  JetStream's acknowledgement. Its parent is the MQTT 5 user property `traceparent` (W3C trace
  context) when the device sent one; otherwise it starts a new trace.
- `bridge.publish` (PRODUCER), its child: the JetStream publish. Its context travels with the
  message as the NATS header `traceparent`.
- `projection.timeseries.write` / `projection.views.apply` (CONSUMER): one span per consumed
  batch (InfluxDB write, Redis script). Its parent is the first sampled message of the batch
  carrying a `traceparent`; the other messages' contexts are span links.

Hot paths test `TRACER is not None` and do nothing else while tracing is off. The standard
`OTEL_*` variables apply (`OTEL_SERVICE_NAME`, `OTEL_TRACES_SAMPLER`, `OTEL_EXPORTER_OTLP_*`);
the exporter is OTLP over HTTP/protobuf.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.trace import Link, Span, SpanContext, SpanKind, TraceFlags, Tracer

TRACEPARENT = "traceparent"
MAX_LINKS = 64  # span links per batch span: enough to follow a batch, bounded in size
_VERSION = "00"

# The process's tracer, or None while tracing is off (the hot paths' one test).
TRACER: Tracer | None = None


def configure(component: str, env: Mapping[str, str] = os.environ) -> bool:
    """Trace this process over OTLP when the standard endpoint variable is set; else do nothing.

    Returns whether tracing is on. The provider is made global too, so any instrumented
    library joins the same traces; it flushes what is buffered when the process exits.
    """
    endpoints = ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
    if not any(env.get(name) for name in endpoints):
        return False
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    attributes = {} if env.get("OTEL_SERVICE_NAME") else {SERVICE_NAME: f"iot-{component}"}
    provider = TracerProvider(resource=Resource.create(attributes))
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    trace.set_tracer_provider(provider)
    install(provider)
    return True


def install(provider: TracerProvider | None) -> None:
    """Trace with `provider` from now on (None: tracing off). Tests pass an in-memory one."""
    global TRACER  # noqa: PLW0603 - the one switch the hot paths read
    TRACER = provider.get_tracer("iot") if provider is not None else None


def traceparent(context: SpanContext) -> str:
    """The W3C `traceparent` value of a span context."""
    return f"{_VERSION}-{context.trace_id:032x}-{context.span_id:016x}-{context.trace_flags:02x}"


def parse_traceparent(value: str | bytes | None) -> SpanContext | None:
    """The remote span context a W3C `traceparent` names; None when absent or malformed."""
    if value is None:
        return None
    if isinstance(value, bytes):
        value = value.decode("ascii", "replace")
    parts = value.strip().split("-")
    if len(parts) < 4 or len(parts[0]) != 2 or parts[0] == "ff":
        return None
    version, trace_hex, span_hex, flags_hex = parts[:4]
    if len(trace_hex) != 32 or len(span_hex) != 16 or len(flags_hex) != 2:
        return None
    if version == _VERSION and len(parts) != 4:
        return None
    try:
        trace_id, span_id, flags = int(trace_hex, 16), int(span_hex, 16), int(flags_hex, 16)
    except ValueError:
        return None
    if not trace_id or not span_id:
        return None
    return SpanContext(trace_id, span_id, is_remote=True, trace_flags=TraceFlags(flags & 1))


def parent_context(value: str | bytes | None) -> Context | None:
    """A context whose current span is the remote parent `value` names (None: a new trace)."""
    remote = parse_traceparent(value)
    if remote is None:
        return None
    return trace.set_span_in_context(trace.NonRecordingSpan(remote))


def mqtt_traceparent(properties: Any) -> str | None:
    """The `traceparent` MQTT 5 user property of a message's properties, if it has one."""
    pairs = getattr(properties, "UserProperty", None)
    if not pairs:
        return None
    for key, value in pairs:
        if key == TRACEPARENT:
            return str(value)
    return None


def start_bridge_spans(
    topic: str, received_at_ns: int, parent: str | None, headers: dict[str, str]
) -> tuple[Span, Span] | None:
    """Start `bridge.receive` (at the MQTT receipt) and its child `bridge.publish`; put the
    publish span's context in `headers` for the JetStream message. None while tracing is off."""
    tracer = TRACER
    if tracer is None:
        return None
    receive = tracer.start_span(
        "bridge.receive",
        context=parent_context(parent),
        kind=SpanKind.CONSUMER,
        start_time=received_at_ns,
        attributes={"messaging.system": "mqtt", "messaging.destination.name": topic},
    )
    publish = tracer.start_span(
        "bridge.publish",
        context=trace.set_span_in_context(receive),
        kind=SpanKind.PRODUCER,
        attributes={"messaging.system": "nats"},
    )
    context = publish.get_span_context()
    if context.is_valid:
        headers[TRACEPARENT] = traceparent(context)
    return receive, publish


def end_bridge_spans(spans: tuple[Span, Span], subject: str, outcome: str) -> None:
    """End a message's bridge spans with where it went and how (stored, duplicate, ...)."""
    receive, publish = spans
    for span in (publish, receive):
        span.set_attribute("iot.outcome", outcome)
    publish.set_attribute("messaging.destination.name", subject)
    publish.end()
    receive.end()


def _header(msg: Any) -> str | None:
    headers = msg.headers
    return headers.get(TRACEPARENT) if headers else None


@contextlib.contextmanager
def batch_span(name: str, msgs: Sequence[Any], **attributes: str | int) -> Iterator[Span | None]:
    """A CONSUMER span around the handling of one batch of NATS messages (None while off).

    Its parent is the first sampled message's `traceparent`; the others become links, so a
    reading's trace reaches the write that stored it without one span per message.
    """
    tracer = TRACER
    if tracer is None:
        yield None
        return
    parent: SpanContext | None = None
    links: list[Link] = []
    for msg in msgs:
        remote = parse_traceparent(_header(msg))
        if remote is None or not remote.trace_flags.sampled:
            continue
        if parent is None:
            parent = remote
        elif len(links) < MAX_LINKS:
            links.append(Link(remote))
    context = trace.set_span_in_context(trace.NonRecordingSpan(parent)) if parent else None
    values: dict[str, str | int] = {
        "messaging.system": "nats",
        "messaging.batch.message_count": len(msgs),
        **attributes,
    }
    with tracer.start_as_current_span(
        name, context=context, kind=SpanKind.CONSUMER, links=links, attributes=values
    ) as span:
        yield span
