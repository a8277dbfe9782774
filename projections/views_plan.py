"""Pure decisions of the `views` projection: what each input does to the Redis layout.

Nothing here does I/O. Domain events become `EventPlan`s (the new doc, commands and index
changes, applied by a compare-and-set Lua script on the device version); an ingest batch is
reduced to one `IngestPlan` (per device: the latest value of each metric, last seen, status,
reported state and the config version it names; per minute: reading ids for the HyperLogLog).
The reductions are maxima under a total order, so applying them is commutative and idempotent:
the order or repetition of delivery changes nothing.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import msgspec

from domain.ingest import CommandAck, CommandSent, IngestMessage, Reported, Status, Telemetry, Value
from domain.published import (
    AlertEvent,
    CommandEvent,
    DeviceAlertAcknowledged,
    DeviceAlertCleared,
    DeviceAlertRaised,
    DeviceAlertRetriggered,
    DeviceCommandAcknowledged,
    DeviceCommandCancelled,
    DeviceCommandExpired,
    DeviceCommandFailed,
    DeviceCommandRequested,
    DeviceCommandSent,
    DeviceConfigured,
    DeviceConnected,
    DeviceDecommissioned,
    DeviceDisconnected,
    DeviceRegistered,
    DeviceResumed,
    DeviceSecretRotated,
    DeviceSuspended,
    PublishedEvent,
    RuleCreated,
    RuleEnabled,
    RuleEvent,
    RuleUpdated,
)
from infra.views import (
    CLEARED_ALERTS_KEPT,
    CONFIG_VERSION_KEY,
    HISTORY_KEPT,
    HISTORY_SNAPSHOT_EVERY,
    HISTORY_STATE_FIELDS,
    METRIC_FIELD,
    ViewKeys,
)

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MS = timedelta(milliseconds=1)
HLL_TTL_S = 180
RECENT_COMMANDS = 20  # finished commands a device view shows, newest first
_encode = msgspec.json.encode
_decode_doc = msgspec.json.Decoder(dict[str, Any]).decode
_decode_commands = msgspec.json.Decoder(dict[str, list[dict[str, Any]]]).decode


def epoch_ms(at: datetime) -> int:
    return (at - _EPOCH) // _MS


def iso(at: datetime) -> str:
    text: str = msgspec.json.decode(_encode(at))
    return text


class MissingRegistration(Exception):
    """A device event other than the registration found no doc: the view is inconsistent."""


# -- domain events ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Commands:
    """A device's commands in the view: pending in request order, recent finished newest first."""

    pending: tuple[dict[str, Any], ...] = ()
    recent: tuple[dict[str, Any], ...] = ()

    @classmethod
    def decode(cls, raw: bytes | None) -> Commands:
        if not raw:
            return cls()
        stored = _decode_commands(raw)
        return cls(tuple(stored.get("pending", ())), tuple(stored.get("recent", ())))

    def encode(self) -> bytes:
        return _encode({"pending": self.pending, "recent": self.recent})

    def apply(self, event: CommandEvent) -> tuple[Commands, int]:
        """The commands after `event`, and the change in the number pending (-1, 0 or 1)."""
        at = iso(event.at)
        if isinstance(event, DeviceCommandRequested):
            if any(c["command_id"] == event.command_id for c in self.pending):
                return self, 0
            command = {
                "command_id": event.command_id,
                "name": event.name,
                "args": event.args,
                "state": "requested",
                "requested_at": at,
                "sent_at": None,
                "expires_at": iso(event.expires_at),
            }
            return Commands((*self.pending, command), self.recent), 1
        index = next(
            (i for i, c in enumerate(self.pending) if c["command_id"] == event.command_id), None
        )
        found = self.pending[index] if index is not None else None
        if isinstance(event, DeviceCommandSent):
            if found is None or index is None:
                return self, 0
            sent = {**found, "state": "sent", "sent_at": at}
            pending = (*self.pending[:index], sent, *self.pending[index + 1 :])
            return Commands(pending, self.recent), 0
        finished: dict[str, Any] = {
            "command_id": event.command_id,
            "name": found["name"] if found else None,
            "state": _FINAL_STATE[type(event)],
            "requested_at": found["requested_at"] if found else None,
            "finished_at": at,
        }
        if isinstance(event, DeviceCommandAcknowledged | DeviceCommandFailed):
            finished["result"] = event.result
        elif isinstance(event, DeviceCommandCancelled):
            finished["reason"] = event.reason
        pending = (
            self.pending if index is None else (*self.pending[:index], *self.pending[index + 1 :])
        )
        recent = (finished, *self.recent)[:RECENT_COMMANDS]
        return Commands(pending, recent), 0 if index is None else -1


_FINAL_STATE: dict[type, str] = {
    DeviceCommandAcknowledged: "acknowledged",
    DeviceCommandFailed: "failed",
    DeviceCommandExpired: "expired",
    DeviceCommandCancelled: "cancelled",
}
_ALERT_EVENTS = (
    DeviceAlertRaised,
    DeviceAlertRetriggered,
    DeviceAlertAcknowledged,
    DeviceAlertCleared,
)


def apply_alert(
    alerts: dict[str, dict[str, Any]], event: AlertEvent
) -> tuple[dict[str, dict[str, Any]], int, str]:
    """The open alerts after `event`; the change in open alerts (+1, -1, 0) and its severity."""
    alerts = dict(alerts)
    if isinstance(event, DeviceAlertRaised):
        alerts[event.alert_id] = {
            "alert_id": event.alert_id,
            "rule_id": event.rule_id,
            "severity": event.severity,
            "metric": event.metric,
            "status": "active",
            "raised_value": event.value,
            "raised_at_ms": event.at_ms,
            "retriggers": 0,
            "last_value": event.value,
            "acknowledged_by": None,
            "acknowledged_at": None,
            "note": None,
        }
        return alerts, 1, event.severity
    alert = alerts.get(event.alert_id)
    if alert is None:  # acknowledged after it cleared: no longer open
        return alerts, 0, ""
    alert = dict(alert)
    if isinstance(event, DeviceAlertCleared):
        del alerts[event.alert_id]
        return alerts, -1, str(alert["severity"])
    if isinstance(event, DeviceAlertRetriggered):
        alert["retriggers"] = int(alert["retriggers"]) + 1
        alert["last_value"] = event.value
    else:
        alert.update(
            status="acknowledged",
            acknowledged_by=event.by,
            note=event.note,
            acknowledged_at=iso(event.at),
        )
    alerts[event.alert_id] = alert
    return alerts, 0, ""


_SEP = "\x1f"


def _op(*parts: str) -> str:
    return _SEP.join(parts)


def _fields(values: dict[str, Any]) -> list[str]:
    out: list[str] = []
    for name, value in values.items():
        out += [name, _encode(value).decode()]
    return out


def alert_ops(
    keys: ViewKeys, event: AlertEvent, before: dict[str, dict[str, Any]]
) -> list[tuple[str, str]]:
    """The alert's own hash and its indexes (`{p}:alert:*`, `{p}:alerts*`) for one event;
    `before` is the device's open alerts before it. They come last among the event's
    operations: past a raise, they apply only if the alert's hash exists (`ifexists`)."""
    alert_id = event.alert_id
    hash_key = keys.alert(alert_id)
    rule_id = alert_id.split(".")[1]  # <device_id>.<rule_id>.<raised_at_ms>
    if isinstance(event, DeviceAlertRaised):
        fields = {
            "alert_id": alert_id,
            "rule_id": event.rule_id,
            "device_id": event.device_id,
            "severity": event.severity,
            "metric": event.metric,
            "status": "active",
            "acknowledged": False,
            "raised_value": event.value,
            "raised_at_ms": event.at_ms,
            "retriggers": 0,
            "last_value": event.value,
            "cleared_value": None,
            "cleared_at_ms": None,
            "acknowledged_by": None,
            "acknowledged_at": None,
            "note": None,
        }
        score = str(event.at_ms)
        return [
            (_op("hset", *_fields(fields)), hash_key),
            (_op("zadds", score, alert_id), keys.alerts),
            (_op("zadds", score, alert_id), keys.alerts_in("open")),
            (_op("zadds", score, alert_id), keys.alerts_of_device(event.device_id)),
            (_op("zadds", score, alert_id), keys.alerts_of_rule(event.rule_id)),
            (_op("hincr", event.rule_id, "1"), keys.rules_open),
        ]
    open_alert = before.get(alert_id)
    exists = (_op("ifexists"), hash_key)
    if isinstance(event, DeviceAlertRetriggered):
        retriggers = int(open_alert["retriggers"]) + 1 if open_alert else 1
        fields = {"retriggers": retriggers, "last_value": event.value}
        return [exists, (_op("hset", *_fields(fields)), hash_key)]
    if isinstance(event, DeviceAlertAcknowledged):
        fields = {
            "acknowledged": True,
            "acknowledged_by": event.by,
            "acknowledged_at": iso(event.at),
            "note": event.note,
        }
        if open_alert is not None:
            fields["status"] = "acknowledged"
        return [exists, (_op("hset", *_fields(fields)), hash_key)]
    fields = {"status": "cleared", "cleared_value": event.value, "cleared_at_ms": event.at_ms}
    ops = [exists, (_op("hset", *_fields(fields)), hash_key)]
    if open_alert is not None:
        score = str(open_alert["raised_at_ms"])
        device_id = event.device_id
        cleared_of = keys.alerts_cleared_of(device_id)
        ops += [
            (_op("zrem", alert_id), keys.alerts_in("open")),
            (_op("zadds", score, alert_id), keys.alerts_in("cleared")),
            (_op("hincr", rule_id, "-1"), keys.rules_open),
            (_op("zadds", str(event.version), alert_id), cleared_of),
            (
                _op(
                    "keep",
                    str(CLEARED_ALERTS_KEPT),
                    keys.alert(""),
                    keys.alerts_of_rule(""),
                    keys.alerts,
                    keys.alerts_in("cleared"),
                    keys.alerts_of_device(device_id),
                ),
                cleared_of,
            ),
        ]
    return ops


def history_ops(key: str, at: datetime, member: str) -> list[tuple[str, str]]:
    """Record `member` at `at` in a device's history set, keeping its newest HISTORY_KEPT."""
    return [
        (_op("zadds", str(epoch_ms(at)), member), key),
        (_op("ztrim", str(HISTORY_KEPT)), key),
    ]


_COMMON_FIELDS = frozenset(("device_id", "version", "at", "position", "actor"))
# Who causes an event that no API token caused: the device, the bridge, the expiry sweep or
# the analytics service.
_CAUSED_BY_DEFAULT = {
    "connected": "device",
    "disconnected": "device",
    "command_sent": "bridge",
    "command_acknowledged": "device",
    "command_failed": "device",
    "command_expired": "system",
    "alert_raised": "analytics",
    "alert_retriggered": "analytics",
    "alert_cleared": "analytics",
}


def event_kind(event: PublishedEvent) -> str:
    """The short type of a device event: `device.command_sent.v1` -> `command_sent`."""
    tag = str(type(event).__struct_config__.tag)
    return tag.split(".")[1]


def history_state(doc: dict[str, Any]) -> dict[str, Any]:
    """The part of a device doc that `as_of` answers."""
    state = {name: doc.get(name) for name in HISTORY_STATE_FIELDS}
    state["online"] = bool(doc.get("connected", False))
    return state


def history_entry(event: PublishedEvent, before: dict[str, Any], after: dict[str, Any]) -> bytes:
    """One history entry: the event's version, type, time, position, cause, its own fields and
    `changes`, the state fields it changed (each with its new value)."""
    kind = event_kind(event)
    data = {
        name: value
        for name, value in msgspec.structs.asdict(event).items()
        if name not in _COMMON_FIELDS
    }
    changes = {name: value for name, value in after.items() if before.get(name) != value}
    return _encode(
        {
            "version": event.version,
            "type": kind,
            "at": event.at,
            "position": event.position,
            "caused_by": event.actor or _CAUSED_BY_DEFAULT.get(kind, "system"),
            "data": data,
            "changes": changes,
        }
    )


def device_history_ops(
    keys: ViewKeys, event: PublishedEvent, doc: dict[str, Any] | None, new: dict[str, Any]
) -> list[tuple[str, str]]:
    """Record `event` in the device's history: its entry, its time, and every
    HISTORY_SNAPSHOT_EVERY-th version the whole state after it."""
    before = history_state(doc) if doc is not None else {}
    after = history_state(new)
    entry = history_entry(event, before, after).decode()
    version = str(event.version)
    device_id = event.device_id
    ops = [
        (_op("zadds", version, entry), keys.history(device_id)),
        (_op("zadds", str(epoch_ms(event.at)), version), keys.history_at(device_id)),
    ]
    if event.version % HISTORY_SNAPSHOT_EVERY == 0:
        state = _encode(after).decode()
        ops.append((_op("hset", version, state), keys.history_state(device_id)))
    return ops


def plan_rule_event(keys: ViewKeys, event: RuleEvent, doc: dict[str, Any] | None) -> EventPlan:
    """A rule's doc after `event` (CAS on the rule's version, like a device's)."""
    at = iso(event.at)
    ops: list[tuple[str, str]] = []
    if isinstance(event, RuleCreated):
        new: dict[str, Any] = {
            "rule_id": event.rule_id,
            **event.spec,
            "enabled": True,
            "created_at": at,
        }
        ops.append(("zadd", keys.rules))
    else:
        new = dict(doc or {"rule_id": event.rule_id, "created_at": at})
        if isinstance(event, RuleUpdated):
            new.update(event.spec)
        else:
            new["enabled"] = isinstance(event, RuleEnabled)
    new.update(version=event.version, updated_at=at)
    return EventPlan(
        device_id=event.rule_id,
        version=event.version,
        doc=_encode(new),
        commands=b"",
        online="",
        online_at=0,
        ops=tuple(ops),
        at=event.at,
        key=keys.rule(event.rule_id),
        publish=False,
    )


_COMMAND_EVENTS = (
    DeviceCommandRequested,
    DeviceCommandSent,
    DeviceCommandAcknowledged,
    DeviceCommandFailed,
    DeviceCommandExpired,
    DeviceCommandCancelled,
)


@dataclass(frozen=True)
class DeviceState:
    """What the event plan of a device builds on: its doc and commands at the last version."""

    doc: dict[str, Any] | None = None
    commands: Commands = Commands()

    @classmethod
    def decode(cls, raw_doc: bytes | None, raw_commands: bytes | None) -> DeviceState:
        return cls(decode_doc(raw_doc), Commands.decode(raw_commands))


@dataclass(frozen=True)
class EventPlan:
    """One event's effect: set `version` (CAS on version - 1), `doc`, commands, online, indexes."""

    device_id: str  # or the rule id of a rule's event
    version: int
    doc: bytes
    commands: bytes  # b"" = unchanged
    online: str  # "1", "0" or "" (unchanged)
    online_at: int
    ops: tuple[tuple[str, str], ...]  # (op, key): see views_scripts.EVENTS
    at: datetime
    key: str = ""  # the hash versioned: "" = the device's
    publish: bool = True  # publish the id on the changes channel (devices only)
    history: tuple[tuple[str, str], ...] = ()  # the device's history: before `ops`, which an
    # alert's `ifexists` may cut short

    @property
    def all_ops(self) -> tuple[tuple[str, str], ...]:
        return self.history + self.ops

    def batch_entry(self, keys: ViewKeys) -> list[list[str]]:
        """This event's [keys, args] in the batch of the events script, all as text."""
        script_keys, args = self.script_args(keys)
        return [
            script_keys,
            [a.decode() if isinstance(a, bytes) else str(a) for a in args],
        ]

    def script_args(self, keys: ViewKeys) -> tuple[list[str], list[str | bytes | int]]:
        """Keys and arguments of this event in the events script (views_scripts.EVENTS)."""
        hash_key = self.key or keys.device(self.device_id)
        ops = self.all_ops
        script_keys = [hash_key, keys.online, *(key for _, key in ops)]
        args: list[str | bytes | int] = [
            self.version,
            self.doc,
            self.online,
            self.online_at,
            self.device_id,
            keys.changes if self.publish else "",
            self.commands,
            *(op for op, _ in ops),
        ]
        return script_keys, args


def decode_doc(raw: bytes | None) -> dict[str, Any] | None:
    return None if raw is None else _decode_doc(raw)


def plan_event(
    keys: ViewKeys, event: PublishedEvent, state: DeviceState
) -> tuple[EventPlan, DeviceState]:
    """The effect of `event` on a device in `state` (at version - 1); and the new state."""
    at = iso(event.at)
    ops: list[tuple[str, str]] = []
    online, online_at = "", 0
    doc = state.doc
    commands = state.commands
    changed_commands = False
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
        if isinstance(event, _COMMAND_EVENTS):
            commands, pending = commands.apply(event)
            changed_commands = True
            if pending:
                ops.append(("incr" if pending > 0 else "decr", keys.commands_pending))
            final = _FINAL_STATE.get(type(event))
            if final is not None:
                member = f"{final}:{event.command_id}"
                ops += history_ops(keys.commands_done(event.device_id), event.at, member)
        elif isinstance(event, _ALERT_EVENTS):
            before = new.get("alerts") or {}
            alerts, opened, severity = apply_alert(before, event)
            new["alerts"] = alerts
            if opened:
                ops.append(("incr" if opened > 0 else "decr", keys.alerts_open(severity)))
            ops.extend(alert_ops(keys, event, before))
        elif isinstance(event, DeviceConfigured):
            new["desired"] = {"version": event.config_version, "config": event.config}
        elif isinstance(event, DeviceSuspended):
            status = "suspended"
        elif isinstance(event, DeviceResumed):
            status = event.status
        elif isinstance(event, DeviceDecommissioned):
            status = "decommissioned"
            online, online_at = "0", epoch_ms(event.at)
            new["connected"] = False
        elif isinstance(event, DeviceConnected):
            if status == "provisioned":
                status = "active"
            online, online_at = "1", epoch_ms(event.at)
            new["connected"] = True
        elif isinstance(event, DeviceDisconnected):
            online, online_at = "0", epoch_ms(event.at)
            new["connected"] = False
        else:
            assert isinstance(event, DeviceSecretRotated)
        if isinstance(event, DeviceConnected | DeviceDisconnected | DeviceDecommissioned):
            member = f"{event.version}:{online}"
            ops += history_ops(keys.connectivity(event.device_id), event.at, member)
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
        commands=commands.encode() if changed_commands else b"",
        online=online,
        online_at=online_at,
        ops=tuple(ops),
        at=event.at,
        history=tuple(device_history_ops(keys, event, doc, new)),
    )
    return plan, DeviceState(new, commands)


# -- ingest ----------------------------------------------------------------------------------


def _reported_history(keys: ViewKeys, device_id: str, delta: DeviceDelta) -> list[str] | str:
    """The ingest script's reported-history argument: key, how many kept, then score, member."""
    if not delta.reported_all:
        return ""
    out = [keys.history_reported(device_id), str(HISTORY_KEPT)]
    for at, member in delta.reported_all:
        out += [str(at), member]
    return out


def metric_json(ts: int, value: Value) -> str:
    """The stored form of a metric's latest value: `{"ts":..,"value":..}` (ts first, always)."""
    return '{"ts":' + str(ts) + ',"value":' + _encode(value).decode() + "}"


def split_reported(state: dict[str, Any]) -> tuple[dict[str, Any], int | None]:
    """The reported state without its reserved `config_version` key, and that key's value
    (None when absent or not an integer: the key is reserved either way)."""
    if CONFIG_VERSION_KEY not in state:
        return state, None
    rest = dict(state)
    version = rest.pop(CONFIG_VERSION_KEY)
    if isinstance(version, bool) or not isinstance(version, int):
        return rest, None
    return rest, version


@dataclass
class DeviceDelta:
    """What one batch says about one device, reduced to maxima."""

    metrics: dict[str, tuple[int, Value]] = field(default_factory=dict)
    last_seen: int | None = None
    status: tuple[int, str] | None = None  # (received_at, "1" or "0")
    # (received_at, JSON without config_version, its config_version as text or "")
    reported: tuple[int, str, str] | None = None
    reported_all: list[tuple[int, str]] = field(default_factory=list)  # the reported history

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
        if isinstance(message, CommandSent):
            return  # the bridge's report, not a device message: the aggregate records it
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
        elif isinstance(message, CommandAck):
            delta.see(message.received_at)  # its outcome is the aggregate's event
        else:
            assert isinstance(message, Reported)
            state, config_version = split_reported(message.state)
            reported = (
                message.received_at,
                _encode(state).decode(),
                "" if config_version is None else str(config_version),
            )
            if delta.reported is None or reported > delta.reported:
                delta.reported = reported
            entry = {"reported": state, "config_version": config_version}
            delta.reported_all.append((message.received_at, _encode(entry).decode()))
            delta.see(message.received_at)

    def script_args(self, keys: ViewKeys, now_ms: int) -> tuple[list[str], list[str | bytes]]:
        """KEYS and ARGV of the ingest script (see views_scripts.INGEST).

        The batch travels as one JSON argument (numbers as text, so Lua never reformats them):
        packing thousands of separate arguments costs more than the whole script.
        """
        devices = []
        for device_id, delta in self.devices.items():
            status_at, flag = delta.status if delta.status else ("", "")
            reported_at, reported, config_version = delta.reported or ("", "", "")
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
                    config_version,
                    _reported_history(keys, device_id, delta),
                ]
            )
        readings = []
        for minute, ids in sorted(self.readings.items()):
            expire_at = (minute + 1) * 60 + HLL_TTL_S
            if expire_at * 1000 > now_ms:  # else the key would be gone already (old input)
                readings.append([keys.readings(minute), str(expire_at), ids])
        payload = _encode([devices, readings])
        return [keys.online], [keys.device(""), keys.changes, payload]
