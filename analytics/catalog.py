"""What the analytics service knows from the EVENTS stream: devices (type, labels), every
version of every rule with the time it took effect, and the alerts' states.

A rule version takes effect at the time JetStream stored its event (`stored_ms`); a reading is
evaluated by the rules in effect when JetStream stored the reading. Both are times of the log,
so the same log gives the same rules for every reading, live or replayed, whatever the service
was doing meanwhile. Devices are known from their registration on (their type and labels never
change afterwards). The whole catalog serialises (msgpack) for a snapshot beside the position
it reflects.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

import msgspec

from domain import alerts as lifecycle
from domain.alerts import AlertState, parse_alert_id
from domain.errors import DomainError
from domain.published import (
    DeviceAlertAcknowledged,
    DeviceAlertCleared,
    DeviceAlertRaised,
    DeviceAlertRetriggered,
    DeviceDecommissioned,
    DeviceRegistered,
    RuleCreated,
    RuleDisabled,
    RuleEnabled,
    RuleUpdated,
    StreamEvent,
)
from domain.rules import RuleSpec, spec_from_dict


class DeviceInfo(msgspec.Struct, frozen=True, array_like=True):
    type: str
    labels: dict[str, str]
    registered_ms: int
    decommissioned: bool = False


class RuleVersion(msgspec.Struct, frozen=True, array_like=True):
    """One version of a rule and the log time from which it is in effect."""

    rule_id: str
    version: int
    effective_ms: int
    spec: RuleSpec
    enabled: bool


class CatalogSnapshot(msgspec.Struct, frozen=True):
    events_seq: int
    devices: dict[str, DeviceInfo]
    rules: dict[str, list[RuleVersion]]
    alerts: dict[str, AlertState]


@dataclass
class AlertChange:
    """An alert's new state after an event of the log (for notifications and gauges)."""

    state: AlertState
    new: bool  # raised by this event


@dataclass
class Catalog:
    events_seq: int = 0  # the last EVENTS stream sequence applied
    devices: dict[str, DeviceInfo] = field(default_factory=dict)
    rules: dict[str, list[RuleVersion]] = field(default_factory=dict)
    alerts: dict[str, AlertState] = field(default_factory=dict)  # open alerts only
    _changes: list[int] = field(default_factory=list)  # effective_ms of every rule version
    _current: list[RuleVersion] | None = None  # the rules in effect now (cache)
    generation: int = 0  # moves on every change of a rule or a device (scope caches)

    def apply(self, seq: int, stored_ms: int, event: StreamEvent) -> AlertChange | None:
        """Apply one event of the stream; events at or before `events_seq` change nothing."""
        if seq <= self.events_seq:
            return None
        self.events_seq = seq
        match event:
            case DeviceRegistered() | DeviceDecommissioned():
                self.generation += 1
        match event:
            case DeviceRegistered():
                self.devices[event.device_id] = DeviceInfo(event.type, event.labels, stored_ms)
            case DeviceDecommissioned():
                info = self.devices.get(event.device_id)
                if info is not None:
                    self.devices[event.device_id] = msgspec.structs.replace(
                        info, decommissioned=True
                    )
            case RuleCreated() | RuleUpdated():
                previous = self.rules.get(event.rule_id)
                enabled = True if previous is None else previous[-1].enabled
                self._add_rule(
                    RuleVersion(
                        event.rule_id,
                        event.version,
                        stored_ms,
                        spec_from_dict(event.spec),
                        enabled if isinstance(event, RuleUpdated) else True,
                    )
                )
            case RuleEnabled() | RuleDisabled():
                versions = self.rules.get(event.rule_id)
                if versions:
                    self._add_rule(
                        msgspec.structs.replace(
                            versions[-1],
                            version=event.version,
                            effective_ms=stored_ms,
                            enabled=isinstance(event, RuleEnabled),
                        )
                    )
            case DeviceAlertRaised():
                state = lifecycle.raise_alert(
                    event.rule_id,
                    event.device_id,
                    event.severity,  # type: ignore[arg-type]
                    event.metric,
                    event.value,
                    event.at_ms,
                )
                self.alerts[state.alert_id] = state
                return AlertChange(state, new=True)
            case DeviceAlertRetriggered() | DeviceAlertCleared() | DeviceAlertAcknowledged():
                return self._alert_event(event)
        return None

    def _alert_event(
        self, event: DeviceAlertRetriggered | DeviceAlertCleared | DeviceAlertAcknowledged
    ) -> AlertChange | None:
        state = self.alerts.get(event.alert_id)
        if state is None:
            return None  # cleared before the history this catalog holds
        try:
            match event:
                case DeviceAlertRetriggered():
                    state = lifecycle.retrigger(state, event.value, event.at_ms)
                case DeviceAlertCleared():
                    state = lifecycle.clear(state, event.value, event.at_ms)
                case DeviceAlertAcknowledged():
                    state = lifecycle.acknowledge(state, event.by, event.at, event.note)
        except DomainError:  # the aggregate recorded it, so it was legal there: keep ours
            return None
        if state.cleared:
            del self.alerts[event.alert_id]  # the catalog holds open alerts only
        else:
            self.alerts[event.alert_id] = state
        return AlertChange(state, new=False)

    def _add_rule(self, version: RuleVersion) -> None:
        self.rules.setdefault(version.rule_id, []).append(version)
        bisect.insort(self._changes, version.effective_ms)
        self._current = None
        self.generation += 1

    def is_current(self, stored_ms: int) -> bool:
        """Whether the rules in effect at `stored_ms` are the newest ones."""
        return not self._changes or stored_ms >= self._changes[-1]

    def rules_at(self, stored_ms: int) -> list[RuleVersion]:
        """The enabled rules in effect for a reading stored at `stored_ms`, by rule id."""
        if not self._changes:
            return []
        if stored_ms >= self._changes[-1]:
            if self._current is None:
                self._current = self._in_effect(self._changes[-1])
            return self._current
        return self._in_effect(stored_ms)

    def _in_effect(self, stored_ms: int) -> list[RuleVersion]:
        out = []
        for rule_id in sorted(self.rules):
            version = _version_at(self.rules[rule_id], stored_ms)
            if version is not None and version.enabled:
                out.append(version)
        return out

    def rule_at(self, rule_id: str, stored_ms: int) -> RuleVersion | None:
        """The rule's version in effect at `stored_ms`, if it existed and was enabled then."""
        version = _version_at(self.rules.get(rule_id, []), stored_ms)
        return version if version is not None and version.enabled else None

    def rule_name(self, rule_id: str) -> str:
        versions = self.rules.get(rule_id)
        return versions[-1].spec.name if versions else rule_id

    def open_alerts_of(self, device_ids: set[str] | None = None) -> list[AlertState]:
        return [
            state
            for state in self.alerts.values()
            if device_ids is None or state.device_id in device_ids
        ]

    def snapshot(self) -> bytes:
        return _encode(CatalogSnapshot(self.events_seq, self.devices, self.rules, self.alerts))

    @classmethod
    def restore(cls, blob: bytes) -> Catalog:
        snap = _decode_snapshot(blob)
        catalog = cls(snap.events_seq, dict(snap.devices), dict(snap.rules), dict(snap.alerts))
        catalog._changes = sorted(v.effective_ms for vs in snap.rules.values() for v in vs)
        return catalog


def _version_at(versions: list[RuleVersion], stored_ms: int) -> RuleVersion | None:
    found = None
    for version in versions:  # in log order, so effective times only grow
        if version.effective_ms > stored_ms:
            break
        found = version
    return found


def rule_of_alert(alert_id: str) -> str:
    return parse_alert_id(alert_id)[1]


_encode = msgspec.msgpack.Encoder().encode
_decode_snapshot = msgspec.msgpack.Decoder(CatalogSnapshot).decode
