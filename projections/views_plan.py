"""Pure decisions of the `views` projection: what each input does to the Redis layout.

Nothing here does I/O. Domain events become `EventPlan`s (the new doc and index changes, applied
by a compare-and-set Lua script on the device version); an ingest batch is reduced to one
`IngestPlan` (per device: the latest value of each metric, last seen, status, reported state;
per minute: reading ids for the HyperLogLog). The reductions are maxima under a total order, so
applying them is commutative and idempotent: the order or repetition of delivery changes nothing.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import msgspec

from domain.ingest import CommandAck, IngestMessage, Reported, Status, Telemetry, Value
from domain.published import (
    DeviceConfigured,
    DeviceConnected,
    DeviceDecommissioned,
    DeviceDisconnected,
    DeviceRegistered,
    DeviceResumed,
    DeviceSecretRotated,
    DeviceSuspended,
    PublishedEvent,
)
from iot.views import METRIC_FIELD, ViewKeys

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MS = timedelta(milliseconds=1)
HLL_TTL_S = 180
_encode = msgspec.json.encode
_decode_doc = msgspec.json.Decoder(dict[str, Any]).decode


def epoch_ms(at: datetime) -> int:
    return (at - _EPOCH) // _MS


def iso(at: datetime) -> str:
    text: str = msgspec.json.decode(_encode(at))
    return text


class MissingRegistration(Exception):
    """A device event other than the registration found no doc: the view is inconsistent."""


# -- domain events ---------------------------------------------------------------------------


@dataclass(frozen=True)
class EventPlan:
    """One event's effect: set `version` (CAS on version - 1), `doc`, online, index changes."""

    device_id: str
    version: int
    doc: bytes
    online: str  # "1", "0" or "" (unchanged)
    online_at: int
    ops: tuple[tuple[str, str], ...]  # (op, key): op in zadd, sadd, srem
    at: datetime

    def script_args(self, keys: ViewKeys) -> tuple[list[str], list[str | bytes | int]]:
        """KEYS and ARGV of the event script."""
        script_keys = [keys.device(self.device_id), keys.online, *(key for _, key in self.ops)]
        args: list[str | bytes | int] = [
            self.version,
            self.doc,
            self.online,
            self.online_at,
            self.device_id,
            keys.changes,
            *(op for op, _ in self.ops),
        ]
        return script_keys, args


def decode_doc(raw: bytes | None) -> dict[str, Any] | None:
    return None if raw is None else _decode_doc(raw)


def plan_event(
    keys: ViewKeys, event: PublishedEvent, doc: dict[str, Any] | None
) -> tuple[EventPlan, dict[str, Any]]:
    """The effect of `event` on a device whose doc (at version - 1) is `doc`; and the new doc."""
    at = iso(event.at)
    ops: list[tuple[str, str]] = []
    online, online_at = "", 0
    if isinstance(event, DeviceRegistered):
        new: dict[str, Any] = {
            "device_id": event.device_id,
            "name": event.name,
            "type": event.type,
            "labels": dict(event.labels),
            "status": event.status,
            "registered_at": at,
            "updated_at": at,
            "desired": {"version": 0, "config": {}},
        }
        ops.append(("zadd", keys.devices))
        ops.append(("sadd", keys.status(event.status)))
        ops.extend(("sadd", keys.label(k, v)) for k, v in sorted(event.labels.items()))
    else:
        if doc is None:
            raise MissingRegistration(
                f"{type(event).__name__} v{event.version} of {event.device_id} has no doc"
            )
        new = dict(doc)
        new["updated_at"] = at
        status = new.get("status", "")
        if isinstance(event, DeviceConfigured):
            new["desired"] = {"version": event.config_version, "config": event.config}
        elif isinstance(event, DeviceSuspended):
            status = "suspended"
        elif isinstance(event, DeviceResumed):
            status = event.status
        elif isinstance(event, DeviceDecommissioned):
            status = "decommissioned"
            online, online_at = "0", epoch_ms(event.at)
        elif isinstance(event, DeviceConnected):
            if status == "provisioned":
                status = "active"
            online, online_at = "1", epoch_ms(event.at)
        elif isinstance(event, DeviceDisconnected):
            online, online_at = "0", epoch_ms(event.at)
        else:
            assert isinstance(event, DeviceSecretRotated)
        old_status = doc.get("status", "")
        if status != old_status:
            new["status"] = status
            if old_status:
                ops.append(("srem", keys.status(old_status)))
            ops.append(("sadd", keys.status(status)))
    plan = EventPlan(
        device_id=event.device_id,
        version=event.version,
        doc=_encode(new),
        online=online,
        online_at=online_at,
        ops=tuple(ops),
        at=event.at,
    )
    return plan, new


# -- ingest ----------------------------------------------------------------------------------


def metric_json(ts: int, value: Value) -> str:
    """The stored form of a metric's latest value: `{"ts":..,"value":..}` (ts first, always)."""
    return '{"ts":' + str(ts) + ',"value":' + _encode(value).decode() + "}"


@dataclass
class DeviceDelta:
    """What one batch says about one device, reduced to maxima."""

    metrics: dict[str, tuple[int, Value]] = field(default_factory=dict)
    last_seen: int | None = None
    status: tuple[int, str] | None = None  # (received_at, "1" or "0")
    reported: tuple[int, str] | None = None  # (received_at, JSON)

    def see(self, at: int) -> None:
        if self.last_seen is None or at > self.last_seen:
            self.last_seen = at

    def metric(self, name: str, ts: int, value: Value) -> None:
        best = self.metrics.get(name)
        if (
            best is None
            or ts > best[0]
            or (ts == best[0] and metric_json(ts, value) > metric_json(*best))
        ):
            self.metrics[name] = (ts, value)


@dataclass
class IngestPlan:
    devices: dict[str, DeviceDelta] = field(default_factory=dict)
    readings: dict[int, list[str]] = field(default_factory=dict)  # minute -> reading ids
    newest: int | None = None  # received_at of the newest message, epoch ms

    def device(self, device_id: str) -> DeviceDelta:
        delta = self.devices.get(device_id)
        if delta is None:
            delta = self.devices[device_id] = DeviceDelta()
        return delta

    def add(self, seq: int, message: IngestMessage) -> None:
        """Fold one ingest message (stream sequence `seq`) into the plan."""
        if isinstance(message, CommandAck):
            return  # issue 4: pending commands
        if self.newest is None or message.received_at > self.newest:
            self.newest = message.received_at
        delta = self.device(message.device_id)
        if isinstance(message, Telemetry):
            ids = self.readings.setdefault(message.received_at // 60_000, [])
            for index, reading in enumerate(message.readings):
                ids.append(f"{seq}:{index}")
                delta.see(reading.ts)
                for name, value in reading.values.items():
                    delta.metric(name, reading.ts, value)
        elif isinstance(message, Status):
            candidate = (message.received_at, "1" if message.online else "0")
            if delta.status is None or candidate > delta.status:
                delta.status = candidate
            if message.online:
                delta.see(message.received_at)
        else:
            assert isinstance(message, Reported)
            state = (message.received_at, _encode(message.state).decode())
            if delta.reported is None or state > delta.reported:
                delta.reported = state
            delta.see(message.received_at)

    def script_args(self, keys: ViewKeys, now_ms: int) -> tuple[list[str], list[str | bytes]]:
        """KEYS and ARGV of the ingest script (see views_scripts.INGEST).

        The batch travels as one JSON argument (numbers as text, so Lua never reformats them):
        packing thousands of separate arguments costs more than the whole script.
        """
        devices = []
        for device_id, delta in self.devices.items():
            status_at, flag = delta.status if delta.status else ("", "")
            reported_at, reported = delta.reported if delta.reported else ("", "")
            metrics: list[str] = []
            for name, (ts, value) in delta.metrics.items():
                metrics += [METRIC_FIELD + name, str(ts), metric_json(ts, value)]
            devices.append(
                [
                    device_id,
                    "" if delta.last_seen is None else str(delta.last_seen),
                    str(status_at),
                    flag,
                    str(reported_at),
                    reported,
                    metrics,
                ]
            )
        readings = []
        for minute, ids in sorted(self.readings.items()):
            expire_at = (minute + 1) * 60 + HLL_TTL_S
            if expire_at * 1000 > now_ms:  # else the key would be gone already (old input)
                readings.append([keys.readings(minute), str(expire_at), ids])
        payload = _encode([devices, readings])
        return [keys.online], [keys.device(""), keys.changes, payload]
