"""Fuzzing the device-facing decoder with hypothesis: whatever a device sends (arbitrary bytes,
deep JSON, huge numbers, unicode keys, mixed batches, any topic), no exception escapes the
bridge's `prepare`, and every message becomes exactly one JetStream message: an INGEST message
that decodes back to what was validated, or a dead letter on `deadletter.<reason>` with a known
reason, a header-safe detail and the original bytes (bounded)."""

from __future__ import annotations

import json
import math
from typing import Any

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from bridges.mqtt import Inbound
from bridges.pipeline import Pipeline
from bridges.validation import MAX_DEPTH, MAX_PAYLOAD, REASONS
from domain.ingest import Telemetry, decode_ingest
from infra.streams import Streams

RECEIVED_NS = 1_767_225_600_000 * 1_000_000
DEVICES = {"dev-1": "active", "old-1": "decommissioned", "new-1": "provisioned"}
STREAMS = Streams("fz")
SUFFIXES = ("telemetry", "status", "reported", "commands/ack")
FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


class _Unused:
    """The pipeline's publisher and acker: `prepare` builds a message and touches neither."""

    def __getattr__(self, name: str) -> Any:
        raise AssertionError(f"prepare must not call {name}")


PIPELINE = Pipeline(_Unused(), STREAMS, DEVICES, _Unused(), max_dead_letter_bytes=4096)

topics = st.one_of(
    st.builds(
        lambda d, s: f"devices/{d}/{s}",
        st.sampled_from([*DEVICES, "ghost-1", "bad id", "", "é"]),
        st.sampled_from(SUFFIXES),
    ),
    st.text(max_size=80),
)
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(10**30), max_value=10**30),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20),
)
json_values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=12), inner, max_size=5)
    ),
    max_leaves=40,
)
reading = st.dictionaries(
    st.one_of(st.sampled_from(["temperature", "ts", "h.1", "a-b"]), st.text(max_size=70)),
    scalars,
    max_size=6,
)
batches = st.lists(reading, max_size=12).map(lambda rs: {"readings": rs})


def dumps(value: Any) -> bytes:
    return json.dumps(value, allow_nan=True, ensure_ascii=False).encode("utf-8", "surrogatepass")


def check(topic: str, payload: bytes) -> None:
    item = Inbound(0, topic, payload, 1, 1, False, RECEIVED_NS)
    entry = PIPELINE.prepare(item)  # never raises
    if entry.reason:  # dead-lettered, with its reason
        assert entry.reason in REASONS
        assert entry.subject == STREAMS.deadletter_subject(entry.reason)
        assert entry.headers["Iot-Reason"] == entry.reason
        for value in entry.headers.values():
            assert all(c >= " " and c != "\x7f" for c in value), value
            assert len(value) <= 1024
        assert entry.body == payload[: PIPELINE.max_dead_letter_bytes]
        assert entry.headers["Nats-Msg-Id"]
        return
    assert entry.subject.startswith(STREAMS.ingest_subject(entry.kind, ""))
    message = decode_ingest(entry.body)  # what is stored decodes back
    assert message.received_at == RECEIVED_NS // 1_000_000
    assert entry.headers["Nats-Msg-Id"]
    if isinstance(message, Telemetry):
        for r in message.readings:
            for number in r.values.values():
                assert not isinstance(number, float) or math.isfinite(number)


@FUZZ
@given(topics, st.binary(max_size=2048))
def test_arbitrary_bytes_on_any_topic_are_stored_or_dead_lettered(topic: str, data: bytes) -> None:
    check(topic, data)


@FUZZ
@given(st.sampled_from([f"devices/dev-1/{s}" for s in SUFFIXES]), json_values)
def test_arbitrary_json_from_a_known_device_is_stored_or_dead_lettered(
    topic: str, value: Any
) -> None:
    check(topic, dumps(value))


@FUZZ
@given(batches)
@example({"readings": [{"temperature": 1.5}, {"temperature": float("nan")}]})
@example({"readings": [{"temperature": 10**400}]})
@example({"readings": [{"ts": 2**70, "t": 1}]})
@example({"readings": [{"\u00e9t\u00e9": 1}, {"t": "x"}]})
def test_a_mixed_batch_is_stored_whole_or_dead_lettered_whole(batch: dict[str, Any]) -> None:
    payload = dumps(batch)
    check("devices/dev-1/telemetry", payload)
    entry = PIPELINE.prepare(
        Inbound(0, "devices/dev-1/telemetry", payload, 1, 1, False, RECEIVED_NS)
    )
    if not entry.reason:
        stored = decode_ingest(entry.body)
        assert isinstance(stored, Telemetry)
        assert len(stored.readings) == len(batch["readings"])  # never a part of the batch


@settings(max_examples=20, deadline=None)
@given(st.integers(min_value=1, max_value=200_000), st.sampled_from(["[", '{"a":']))
def test_deeply_nested_json_is_dead_lettered_not_a_crash(depth: int, opener: str) -> None:
    closer = "]" if opener == "[" else "}"
    check("devices/dev-1/telemetry", (opener * depth + "1" + closer * depth).encode())


def test_a_payload_over_the_limit_is_dead_lettered_truncated() -> None:
    payload = b"{" + b" " * MAX_PAYLOAD + b"}"
    entry = PIPELINE.prepare(
        Inbound(0, "devices/dev-1/telemetry", payload, 1, 1, False, RECEIVED_NS)
    )
    assert entry.reason == "too_large"
    assert entry.body == payload[: PIPELINE.max_dead_letter_bytes]
    assert "truncated" in entry.headers["Iot-Detail"]


def test_reported_state_nested_beyond_the_limit_is_dead_lettered() -> None:
    def nested(depth: int) -> bytes:
        return ('{"a":' * depth + "1" + "}" * depth).encode()

    ok = PIPELINE.prepare(Inbound(0, "devices/dev-1/reported", nested(MAX_DEPTH), 1, 1, False, 0))
    assert not ok.reason
    deep = nested(MAX_DEPTH + 1)
    refused = PIPELINE.prepare(Inbound(0, "devices/dev-1/reported", deep, 1, 1, False, 0))
    assert refused.reason == "invalid_payload"
    assert "nested deeper" in refused.headers["Iot-Detail"]
