"""Pure validation of device MQTT messages into the ingest schema (no I/O; clock is an argument).

Topics (contract): `devices/{id}/telemetry`, `devices/{id}/status`, `devices/{id}/reported`,
`devices/{id}/commands/ack`. A message is either accepted (an `IngestMessage`) or rejected with
one of the reasons below; a batch with one bad reading is rejected whole.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import msgspec

from domain.ingest import CommandAck, IngestMessage, Reading, Reported, Status, Telemetry

MAX_PAYLOAD = 64 * 1024
MAX_READINGS = 1000
MAX_FUTURE_MS = 24 * 3600 * 1000
MAX_DEPTH = 32  # JSON objects and arrays nested in reported state or a command ack's result
_INT64 = (-(2**63), 2**63 - 1)

DEVICE_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
METRIC_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")

TOO_LARGE = "too_large"
TOO_MANY_READINGS = "too_many_readings"
MALFORMED_JSON = "malformed_json"
INVALID_PAYLOAD = "invalid_payload"
INVALID_VALUE = "invalid_value"
NON_FINITE = "non_finite"
INVALID_METRIC_NAME = "invalid_metric_name"
FUTURE_TIMESTAMP = "future_timestamp"
UNKNOWN_DEVICE = "unknown_device"
DECOMMISSIONED_DEVICE = "decommissioned_device"
INVALID_TOPIC = "invalid_topic"
REASONS = (
    TOO_LARGE,
    TOO_MANY_READINGS,
    MALFORMED_JSON,
    INVALID_PAYLOAD,
    INVALID_VALUE,
    NON_FINITE,
    INVALID_METRIC_NAME,
    FUTURE_TIMESTAMP,
    UNKNOWN_DEVICE,
    DECOMMISSIONED_DEVICE,
    INVALID_TOPIC,
)

# topic suffix -> ingest kind (the `kind` token of `ingest.<kind>.<device_id>`)
TOPIC_KINDS = {
    ("telemetry",): "telemetry",
    ("status",): "status",
    ("reported",): "reported",
    ("commands", "ack"): "ack",
}
KINDS = ("telemetry", "status", "reported", "ack")


@dataclass(frozen=True, slots=True)
class Accepted:
    kind: str
    device_id: str
    message: IngestMessage
    device_time: bool  # every reading carries the device's own `ts` (telemetry only)


@dataclass(frozen=True, slots=True)
class Rejection:
    reason: str
    detail: str
    kind: str = ""  # "" when the topic itself is invalid
    device_id: str = ""


class _Reject(Exception):
    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


class _AckPayload(msgspec.Struct, frozen=True):
    command_id: str
    status: Literal["ok", "error"]
    result: dict[str, Any] = {}


_any_decoder = msgspec.json.Decoder()


def _parse_topic(topic: str) -> tuple[str, str]:
    """(kind, device_id) of a device topic; raises `_Reject` (invalid_topic) otherwise."""
    parts = topic.split("/")
    if len(parts) < 3 or parts[0] != "devices":
        raise _Reject(INVALID_TOPIC, f"not a device topic: {topic!r}")
    kind = TOPIC_KINDS.get(tuple(parts[2:]))
    if kind is None:
        raise _Reject(INVALID_TOPIC, f"unknown topic suffix: {topic!r}")
    device_id = parts[1]
    if not DEVICE_ID.fullmatch(device_id):
        raise _Reject(INVALID_TOPIC, f"device id must match {DEVICE_ID.pattern}: {device_id!r}")
    return kind, device_id


def validate(
    topic: str, payload: bytes, received_at_ms: int, devices: Mapping[str, str]
) -> Accepted | Rejection:
    """Validate one MQTT message; `devices` maps known device ids to their lifecycle status."""
    kind = device_id = ""
    try:
        kind, device_id = _parse_topic(topic)
        if len(payload) > MAX_PAYLOAD:
            raise _Reject(TOO_LARGE, f"payload of {len(payload)} bytes; the limit is {MAX_PAYLOAD}")
        status = devices.get(device_id)
        if status is None:
            raise _Reject(UNKNOWN_DEVICE, f"device {device_id!r} is not registered")
        if status == "decommissioned":
            raise _Reject(DECOMMISSIONED_DEVICE, f"device {device_id!r} is decommissioned")
        if kind == "telemetry":
            readings, device_time = _telemetry_readings(payload, received_at_ms)
            message: IngestMessage = Telemetry(
                device_id=device_id,
                received_at=received_at_ms,
                readings=readings,
                server_time=not device_time,
            )
            return Accepted(kind, device_id, message, device_time)
        if kind == "status":
            message = Status(
                device_id=device_id, received_at=received_at_ms, online=_status(payload)
            )
        elif kind == "reported":
            message = Reported(
                device_id=device_id, received_at=received_at_ms, state=_reported(payload)
            )
        else:
            ack = _ack(payload)
            message = CommandAck(
                device_id=device_id,
                received_at=received_at_ms,
                command_id=ack.command_id,
                status=ack.status,
                result=ack.result,
            )
        return Accepted(kind, device_id, message, False)
    except _Reject as e:
        return Rejection(e.reason, e.detail, kind, device_id)


def _decode_json(payload: bytes) -> Any:
    try:
        return _any_decoder.decode(payload)
    except msgspec.ValidationError as e:  # msgspec refuses numbers beyond float range
        raise _Reject(NON_FINITE, f"non-finite number: {e}") from e
    except (msgspec.DecodeError, UnicodeDecodeError) as e:
        raise _Reject(MALFORMED_JSON, f"malformed JSON or not UTF-8: {e}") from e
    except RecursionError as e:  # nesting deeper than the interpreter's stack (found by fuzzing)
        raise _Reject(MALFORMED_JSON, "JSON nested too deeply") from e


def _telemetry_readings(payload: bytes, now_ms: int) -> tuple[list[Reading], bool]:
    """The readings of a telemetry payload and whether all carry device time."""
    data = _decode_json(payload)
    batch = isinstance(data, list)
    items: list[Any] = data if batch else [data]
    if not items:
        raise _Reject(INVALID_PAYLOAD, "empty batch: a telemetry array needs at least one reading")
    if len(items) > MAX_READINGS:
        raise _Reject(
            TOO_MANY_READINGS, f"{len(items)} readings in one message; the limit is {MAX_READINGS}"
        )
    readings: list[Reading] = []
    device_time = True
    for i, item in enumerate(items):
        try:
            ts, values = _reading(item, now_ms)
        except _Reject as e:
            if batch:
                raise _Reject(
                    e.reason, f"reading {i}: {e.detail}; the whole batch is rejected"
                ) from None
            raise
        if ts is None:
            device_time = False
            ts = now_ms
        readings.append(Reading(ts, values))
    return readings, device_time


def _reading(item: Any, now_ms: int) -> tuple[int | None, dict[str, Any]]:
    if not isinstance(item, dict):
        raise _Reject(
            INVALID_PAYLOAD,
            'a reading must be a JSON object: {"metric": value} or {"ts": ms, "values": {...}}',
        )
    ts: int | None = None
    values: Any = item
    if "ts" in item or "values" in item:
        if item.keys() != {"ts", "values"}:
            raise _Reject(
                INVALID_PAYLOAD, 'a timestamped reading has exactly the keys "ts" and "values"'
            )
        ts = item["ts"]
        if type(ts) is not int or not 0 <= ts <= _INT64[1]:
            raise _Reject(INVALID_PAYLOAD, f'"ts" must be epoch milliseconds, got {ts!r}')
        if ts > now_ms + MAX_FUTURE_MS:
            raise _Reject(
                FUTURE_TIMESTAMP, f'"ts" {ts} is more than 1 day ahead of server time {now_ms}'
            )
        values = item["values"]
        if not isinstance(values, dict):
            raise _Reject(INVALID_PAYLOAD, '"values" must be a JSON object')
    if not values:
        raise _Reject(INVALID_PAYLOAD, "a reading needs at least one metric")
    for name, value in values.items():
        _check_metric(name, value)
    return ts, values


def _check_metric(name: str, value: Any) -> None:
    if not METRIC_NAME.fullmatch(name):
        raise _Reject(
            INVALID_METRIC_NAME, f"metric name must match {METRIC_NAME.pattern}: {name[:80]!r}"
        )
    t = type(value)
    if t is float:
        if not math.isfinite(value):
            raise _Reject(NON_FINITE, f"metric {name!r} is not finite")
    elif t is int:
        if not _INT64[0] <= value <= _INT64[1]:
            raise _Reject(INVALID_VALUE, f"metric {name!r} is outside the 64-bit integer range")
    elif t is not bool and t is not str:
        raise _Reject(
            INVALID_VALUE,
            f"metric {name!r} must be a number, boolean or string, got {_json_type(value)}",
        )


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


def _status(payload: bytes) -> bool:
    text = payload.strip()
    if text == b"online":
        return True
    if text == b"offline":
        return False
    raise _Reject(INVALID_PAYLOAD, f'status must be "online" or "offline", got {payload[:40]!r}')


def _reported(payload: bytes) -> dict[str, Any]:
    data = _decode_json(payload)
    if not isinstance(data, dict):
        raise _Reject(INVALID_PAYLOAD, "reported state must be a JSON object")
    _check_finite(data)
    return data


def _ack(payload: bytes) -> _AckPayload:
    data = _decode_json(payload)
    try:
        ack = msgspec.convert(data, _AckPayload)
    except msgspec.ValidationError as e:
        raise _Reject(INVALID_PAYLOAD, f"command ack: {e}") from e
    if not ack.command_id:
        raise _Reject(INVALID_PAYLOAD, "command ack: command_id must not be empty")
    _check_finite(ack.result)
    return ack


def _check_finite(value: Any) -> None:
    """Every number finite, and nesting at most MAX_DEPTH deep (what is stored must decode again
    in every consumer, whatever its stack); without recursion."""
    pending = [(value, 1)]
    while pending:
        item, depth = pending.pop()
        if type(item) is float and not math.isfinite(item):
            raise _Reject(NON_FINITE, "non-finite number")
        if isinstance(item, dict | list):
            if depth > MAX_DEPTH:
                raise _Reject(INVALID_PAYLOAD, f"nested deeper than {MAX_DEPTH} levels")
            children = item.values() if isinstance(item, dict) else item
            pending.extend((child, depth + 1) for child in children)
