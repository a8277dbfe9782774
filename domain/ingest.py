"""The ingest schema: device messages as the bridge publishes them on JetStream `ingest.*`.

A public contract between the bridge and the projections (msgspec tagged union of frozen
structs, versioned by tag). Times are epoch milliseconds (UTC). The bridge has validated
everything here; consumers trust the shape.
"""

from __future__ import annotations

from typing import Any

import msgspec

Value = float | int | bool | str


class Reading(msgspec.Struct, frozen=True, array_like=True):
    """One timestamped set of metric values (`ts` epoch ms, device or server time)."""

    ts: int
    values: dict[str, Value]


class _Ingest(msgspec.Struct, frozen=True, tag_field="kind", kw_only=True):
    device_id: str
    received_at: int  # epoch ms at the bridge


class Telemetry(_Ingest, frozen=True, tag="telemetry.v1"):
    """Readings of one MQTT message; `server_time` when the device sent no `ts`."""

    readings: list[Reading]
    server_time: bool = False


class Status(_Ingest, frozen=True, tag="status.v1"):
    online: bool


class Reported(_Ingest, frozen=True, tag="reported.v1"):
    state: dict[str, Any]


class CommandAck(_Ingest, frozen=True, tag="ack.v1"):
    command_id: str
    status: str  # "ok" or "error"
    result: dict[str, Any] = {}


class CommandSent(_Ingest, frozen=True, tag="sent.v1"):
    """The bridge published a command to the device and the broker acknowledged it (PUBACK);
    `received_at` is when. Not a device message: the bridge's own report for the aggregate."""

    command_id: str


IngestMessage = Telemetry | Status | Reported | CommandAck | CommandSent

KINDS = {
    Telemetry: "telemetry",
    Status: "status",
    Reported: "reported",
    CommandAck: "ack",
    CommandSent: "sent",
}

_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(IngestMessage)


def encode_ingest(message: IngestMessage) -> bytes:
    return _encoder.encode(message)


def decode_ingest(data: bytes) -> IngestMessage:
    decoded: IngestMessage = _decoder.decode(data)
    return decoded
