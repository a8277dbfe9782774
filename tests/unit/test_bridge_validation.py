"""Validation of device MQTT messages: every payload shape and every rejection reason."""

from __future__ import annotations

import json
from typing import Any

import pytest

from bridges.validation import MAX_PAYLOAD, Accepted, Rejection, validate
from domain.ingest import CommandAck, Reading, Reported, Status, Telemetry

NOW = 1_764_201_600_000
DAY = 24 * 3600 * 1000
DEVICES = {
    "dev-1": "active",
    "new-1": "provisioned",
    "off-1": "suspended",
    "gone": "decommissioned",
}


def check(topic: str, payload: bytes | str | Any) -> Accepted | Rejection:
    if not isinstance(payload, (bytes, str)):
        payload = json.dumps(payload)
    raw = payload.encode() if isinstance(payload, str) else payload
    return validate(topic, raw, NOW, DEVICES)


def accepted(topic: str, payload: bytes | str | Any) -> Accepted:
    result = check(topic, payload)
    assert isinstance(result, Accepted), result
    return result


def rejected(topic: str, payload: bytes | str | Any) -> Rejection:
    result = check(topic, payload)
    assert isinstance(result, Rejection), result
    return result


def test_flat_telemetry_gets_server_time() -> None:
    result = accepted("devices/dev-1/telemetry", {"temperature": 21.5, "on": True, "m": "eco"})
    assert result.message == Telemetry(
        device_id="dev-1",
        received_at=NOW,
        readings=[Reading(NOW, {"temperature": 21.5, "on": True, "m": "eco"})],
        server_time=True,
    )
    assert not result.device_time
    assert result.kind == "telemetry"


def test_timestamped_telemetry_keeps_device_time() -> None:
    result = accepted("devices/dev-1/telemetry", {"ts": NOW - 5, "values": {"t": 1}})
    assert isinstance(result.message, Telemetry)
    assert result.message.readings == [Reading(NOW - 5, {"t": 1})]
    assert not result.message.server_time
    assert result.device_time


def test_batch_of_timestamped_readings_is_device_time() -> None:
    batch = [{"ts": NOW - 2, "values": {"a": 1}}, {"ts": NOW - 1, "values": {"a": 2}}]
    result = accepted("devices/dev-1/telemetry", batch)
    assert isinstance(result.message, Telemetry)
    assert [r.ts for r in result.message.readings] == [NOW - 2, NOW - 1]
    assert result.device_time


def test_mixed_batch_gives_flat_readings_server_time() -> None:
    result = accepted("devices/dev-1/telemetry", [{"ts": NOW - 2, "values": {"a": 1}}, {"b": 2}])
    assert isinstance(result.message, Telemetry)
    assert result.message.readings == [Reading(NOW - 2, {"a": 1}), Reading(NOW, {"b": 2})]
    assert result.message.server_time
    assert not result.device_time


def test_a_timestamp_just_under_a_day_ahead_is_accepted() -> None:
    accepted("devices/dev-1/telemetry", {"ts": NOW + DAY, "values": {"a": 1}})


def test_telemetry_of_provisioned_and_suspended_devices_is_accepted() -> None:
    accepted("devices/new-1/telemetry", {"a": 1})
    accepted("devices/off-1/telemetry", {"a": 1})


def test_status_online_and_offline() -> None:
    assert accepted("devices/dev-1/status", "online").message == Status(
        device_id="dev-1", received_at=NOW, online=True
    )
    result = accepted("devices/dev-1/status", b"offline")
    assert isinstance(result.message, Status)
    assert not result.message.online
    assert result.kind == "status"


def test_reported_state_is_any_json_object() -> None:
    result = accepted("devices/dev-1/reported", {"fw": "1.2", "nested": {"a": [1, None]}})
    assert result.message == Reported(
        device_id="dev-1", received_at=NOW, state={"fw": "1.2", "nested": {"a": [1, None]}}
    )


def test_command_ack_with_and_without_result() -> None:
    result = accepted(
        "devices/dev-1/commands/ack", {"command_id": "c1", "status": "ok", "result": {"x": 1}}
    )
    assert result.kind == "ack"
    assert result.message == CommandAck(
        device_id="dev-1", received_at=NOW, command_id="c1", status="ok", result={"x": 1}
    )
    bare = accepted("devices/dev-1/commands/ack", {"command_id": "c2", "status": "error"})
    assert isinstance(bare.message, CommandAck)
    assert bare.message.result == {}


@pytest.mark.parametrize(
    ("topic", "payload", "reason"),
    [
        ("devices/dev-1/telemetry", {"a": "x" * MAX_PAYLOAD}, "too_large"),
        ("devices/dev-1/reported", {"a": "x" * MAX_PAYLOAD}, "too_large"),
        ("devices/dev-1/telemetry", [{"a": 1}] * 1001, "too_many_readings"),
        ("devices/dev-1/telemetry", b"{nope", "malformed_json"),
        ("devices/dev-1/telemetry", b'{"a": 1} trailing', "malformed_json"),
        ("devices/dev-1/telemetry", b'{"a": "\xff"}', "malformed_json"),
        ("devices/dev-1/telemetry", b"\xff\xfe", "malformed_json"),
        ("devices/dev-1/telemetry", b"NaN", "malformed_json"),
        ("devices/dev-1/reported", b"{", "malformed_json"),
        ("devices/dev-1/commands/ack", b"[", "malformed_json"),
        ("devices/dev-1/telemetry", b'"text"', "invalid_payload"),
        ("devices/dev-1/telemetry", b"42", "invalid_payload"),
        ("devices/dev-1/telemetry", [], "invalid_payload"),
        ("devices/dev-1/telemetry", {}, "invalid_payload"),
        ("devices/dev-1/telemetry", [[1]], "invalid_payload"),
        ("devices/dev-1/telemetry", {"ts": NOW}, "invalid_payload"),
        ("devices/dev-1/telemetry", {"values": {"a": 1}}, "invalid_payload"),
        ("devices/dev-1/telemetry", {"ts": NOW, "values": {"a": 1}, "x": 1}, "invalid_payload"),
        ("devices/dev-1/telemetry", {"ts": "now", "values": {"a": 1}}, "invalid_payload"),
        ("devices/dev-1/telemetry", {"ts": 1.5, "values": {"a": 1}}, "invalid_payload"),
        ("devices/dev-1/telemetry", {"ts": True, "values": {"a": 1}}, "invalid_payload"),
        ("devices/dev-1/telemetry", {"ts": -1, "values": {"a": 1}}, "invalid_payload"),
        ("devices/dev-1/telemetry", {"ts": NOW, "values": [1]}, "invalid_payload"),
        ("devices/dev-1/telemetry", {"ts": NOW, "values": {}}, "invalid_payload"),
        ("devices/dev-1/status", "maybe", "invalid_payload"),
        ("devices/dev-1/status", b'"online"', "invalid_payload"),
        ("devices/dev-1/reported", [1, 2], "invalid_payload"),
        ("devices/dev-1/commands/ack", {"status": "ok"}, "invalid_payload"),
        ("devices/dev-1/commands/ack", {"command_id": "c", "status": "done"}, "invalid_payload"),
        ("devices/dev-1/commands/ack", {"command_id": "", "status": "ok"}, "invalid_payload"),
        (
            "devices/dev-1/commands/ack",
            {"command_id": "c", "status": "ok", "result": 1},
            "invalid_payload",
        ),
        ("devices/dev-1/telemetry", {"a": None}, "invalid_value"),
        ("devices/dev-1/telemetry", {"a": [1]}, "invalid_value"),
        ("devices/dev-1/telemetry", {"a": {"b": 1}}, "invalid_value"),
        ("devices/dev-1/telemetry", {"a": 2**64}, "invalid_value"),
        ("devices/dev-1/telemetry", b'{"a": 1e999}', "non_finite"),
        ("devices/dev-1/telemetry", b'{"a": -1e999}', "non_finite"),
        ("devices/dev-1/reported", b'{"a": {"b": 1e999}}', "non_finite"),
        (
            "devices/dev-1/commands/ack",
            b'{"command_id":"c","status":"ok","result":{"a":1e999}}',
            "non_finite",
        ),
        ("devices/dev-1/telemetry", {"bad name": 1}, "invalid_metric_name"),
        ("devices/dev-1/telemetry", {"": 1}, "invalid_metric_name"),
        ("devices/dev-1/telemetry", {"a" * 65: 1}, "invalid_metric_name"),
        ("devices/dev-1/telemetry", {"temp\n": 1}, "invalid_metric_name"),
        ("devices/dev-1/telemetry", {"tëmp": 1}, "invalid_metric_name"),
        ("devices/dev-1/telemetry", {"ts": NOW + DAY + 1, "values": {"a": 1}}, "future_timestamp"),
        ("devices/ghost/telemetry", {"a": 1}, "unknown_device"),
        ("devices/ghost/status", "online", "unknown_device"),
        ("devices/gone/telemetry", {"a": 1}, "decommissioned_device"),
        ("devices/gone/commands/ack", {"command_id": "c", "status": "ok"}, "decommissioned_device"),
        ("devices/bad.id/telemetry", {"a": 1}, "invalid_topic"),
        ("devices/dev 1/telemetry", {"a": 1}, "invalid_topic"),
        (f"devices/{'d' * 65}/telemetry", {"a": 1}, "invalid_topic"),
        ("devices//telemetry", {"a": 1}, "invalid_topic"),
        ("devices/dev-1/commands", {"a": 1}, "invalid_topic"),
        ("devices/dev-1/telemetry/extra", {"a": 1}, "invalid_topic"),
        ("things/dev-1/telemetry", {"a": 1}, "invalid_topic"),
        ("devices/dev-1", {"a": 1}, "invalid_topic"),
    ],
)
def test_bad_input_is_rejected_with_its_reason(topic: str, payload: Any, reason: str) -> None:
    result = rejected(topic, payload)
    assert result.reason == reason
    assert result.detail


def test_metric_name_accepts_dots_dashes_underscores_up_to_64() -> None:
    accepted("devices/dev-1/telemetry", {"a.b-c_D9": 1, "x" * 64: 2})


def test_one_bad_reading_rejects_the_whole_batch_and_says_so() -> None:
    result = rejected("devices/dev-1/telemetry", [{"a": 1}, {"b": None}])
    assert result.reason == "invalid_value"
    assert "reading 1" in result.detail
    assert "whole batch" in result.detail


def test_a_batch_of_exactly_1000_readings_is_accepted() -> None:
    result = accepted("devices/dev-1/telemetry", [{"a": i} for i in range(1000)])
    assert isinstance(result.message, Telemetry)
    assert len(result.message.readings) == 1000


def test_rejection_names_kind_and_device_when_the_topic_is_valid() -> None:
    result = rejected("devices/dev-1/reported", b"[")
    assert (result.kind, result.device_id) == ("reported", "dev-1")
    bad = rejected("devices/a.b/status", "online")
    assert (bad.kind, bad.device_id) == ("", "")


def test_payload_at_the_limit_is_not_too_large() -> None:
    body = b'{"a": "' + b"x" * (MAX_PAYLOAD - 9) + b'"}'
    assert len(body) == MAX_PAYLOAD
    accepted("devices/dev-1/telemetry", body)
