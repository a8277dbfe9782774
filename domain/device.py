"""The Device aggregate: registration, desired configuration, lifecycle, credentials, connectivity,
commands to the device and the alerts raised for it.

Public methods check the rules and raise a DomainError with a reason; the `@event` methods only
apply a decided change, so replaying stored events never re-checks a rule. Time is an argument.
"""

from __future__ import annotations

import re
import uuid
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any

import msgspec
from eventsourcing.domain import Aggregate, event

from domain.errors import DomainError, IllegalTransition, InvalidCommand

DEVICE_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
LABEL_KEY = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
DEVICE_NAMESPACE = uuid.UUID("6f1c1b8e-3f0c-5b7a-9d57-1b0f3e0c9a41")
MAX_LABELS = 64
MAX_LABEL_VALUE = 256
MAX_NAME = 200
MAX_TYPE = 64
COMMAND_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
MIN_TTL_S = 1
MAX_TTL_S = 7 * 24 * 3600
MAX_PENDING_COMMANDS = 100
RECENT_COMMANDS = 5  # finished commands the aggregate remembers (the view keeps 20)
RECENT_ALERTS = 20  # cleared alerts the aggregate remembers (an operator may still acknowledge)


class CommandState(StrEnum):
    REQUESTED = "requested"
    SENT = "sent"
    ACKNOWLEDGED = "acknowledged"
    FAILED = "failed"
    EXPIRED = "expired"
    CANCELLED = "cancelled"


PENDING = (CommandState.REQUESTED.value, CommandState.SENT.value)


class UnknownAlert(DomainError):
    """The device has no alert with this id (never raised, or cleared long ago)."""


class Status(StrEnum):
    PROVISIONED = "provisioned"
    ACTIVE = "active"
    SUSPENDED = "suspended"
    DECOMMISSIONED = "decommissioned"


def device_uuid(device_id: str) -> uuid.UUID:
    """The aggregate id of a device id (stable, so a second registration of an id conflicts)."""
    return uuid.uuid5(DEVICE_NAMESPACE, device_id)


def check_device_id(device_id: str) -> None:
    if not DEVICE_ID.fullmatch(device_id):
        raise InvalidCommand(f"device_id must match {DEVICE_ID.pattern}")


def check_labels(labels: dict[str, str]) -> None:
    if len(labels) > MAX_LABELS:
        raise InvalidCommand(f"at most {MAX_LABELS} labels")
    for key, value in labels.items():
        if not LABEL_KEY.fullmatch(key):
            raise InvalidCommand(f"label key {key!r} must match {LABEL_KEY.pattern}")
        if not isinstance(value, str) or len(value) > MAX_LABEL_VALUE:
            raise InvalidCommand(f"label {key!r} must be a string of at most {MAX_LABEL_VALUE}")


class Device(Aggregate):
    """A device known to the system; every change of it is a domain event."""

    class Event(Aggregate.Event):
        device_id: str

    @staticmethod
    def create_id(device_id: str, **_: Any) -> uuid.UUID:
        return device_uuid(device_id)

    @classmethod
    def register(
        cls,
        device_id: str,
        name: str,
        type: str,
        labels: dict[str, str],
        secret_hash: str,
        at: datetime,
    ) -> Device:
        check_device_id(device_id)
        if not 1 <= len(name) <= MAX_NAME:
            raise InvalidCommand(f"name must be 1 to {MAX_NAME} characters")
        if not 1 <= len(type) <= MAX_TYPE:
            raise InvalidCommand(f"type must be 1 to {MAX_TYPE} characters")
        check_labels(labels)
        return cls(
            device_id=device_id,
            name=name,
            type=type,
            labels=dict(labels),
            secret_hash=secret_hash,
            timestamp=at,
        )

    @event("Registered")
    def __init__(
        self,
        device_id: str,
        name: str,
        type: str,
        labels: dict[str, str],
        secret_hash: str,
        timestamp: datetime,
    ) -> None:
        self.device_id = device_id
        self.name = name
        self.type = type
        self.labels = labels
        self.secret_hash = secret_hash
        self.status = Status.PROVISIONED.value
        self.config: dict[str, Any] = {}
        self.config_version = 0
        self.online = False
        self.connectivity_at: datetime | None = None
        self.first_connected_at: datetime | None = None
        self.last_connected_at: datetime | None = None
        self.last_disconnected_at: datetime | None = None
        self.suspended_reason: str | None = None
        # command_id -> {"name", "args", "expires_at", "state", "requested_at"}; every pending
        # command plus the last RECENT_COMMANDS finished ones, in request order.
        self.commands: dict[str, dict[str, Any]] = {}

    def trigger_event(self, event_class: Any, **kwargs: Any) -> None:
        kwargs.setdefault("device_id", self.device_id)
        super().trigger_event(event_class, **kwargs)

    # -- decisions -------------------------------------------------------------------------

    def _refuse_if_decommissioned(self, what: str) -> None:
        if self.status == Status.DECOMMISSIONED:
            raise IllegalTransition(f"cannot {what}: device {self.device_id} is decommissioned")

    def configure(self, config: dict[str, Any], at: datetime) -> None:
        self._refuse_if_decommissioned("change the configuration")
        self._configured(config=dict(config), config_version=self.config_version + 1, timestamp=at)

    def suspend(self, reason: str, at: datetime) -> None:
        self._refuse_if_decommissioned("suspend")
        if self.status == Status.SUSPENDED:
            raise IllegalTransition(f"device {self.device_id} is already suspended")
        self._suspended(reason=reason, timestamp=at)
        self._cancel_pending("device suspended", at)
        self._kicked(at)

    def resume(self, at: datetime) -> None:
        self._refuse_if_decommissioned("resume")
        if self.status != Status.SUSPENDED:
            raise IllegalTransition(f"cannot resume: device {self.device_id} is {self.status}")
        restored = Status.ACTIVE if self.first_connected_at is not None else Status.PROVISIONED
        self._resumed(status=restored.value, timestamp=at)

    def decommission(self, reason: str, at: datetime) -> None:
        self._refuse_if_decommissioned("decommission")
        self._kicked(at)
        self._decommissioned(reason=reason, timestamp=at)
        self._cancel_pending("device decommissioned", at)

    def rotate_secret(self, secret_hash: str, at: datetime) -> None:
        self._refuse_if_decommissioned("rotate the secret")
        self._secret_rotated(secret_hash=secret_hash, timestamp=at)
        self._kicked(at)

    def _kicked(self, at: datetime) -> None:
        """The broker drops the device's connection when its access changes (suspension,
        rotation, decommissioning) without publishing its last will: record the disconnection."""
        if self.online and not self._is_stale(at):
            self._disconnected(timestamp=at)

    def connect(self, at: datetime) -> bool:
        """Record a connection; a repeated or stale one changes nothing and returns False."""
        self._refuse_if_decommissioned("connect")
        if self._is_stale(at) or self.online:
            return False
        self._connected(timestamp=at)
        return True

    def disconnect(self, at: datetime) -> bool:
        """Record a disconnection; a repeated or stale one changes nothing and returns False."""
        self._refuse_if_decommissioned("disconnect")
        if self._is_stale(at) or not self.online:
            return False
        self._disconnected(timestamp=at)
        return True

    def _is_stale(self, at: datetime) -> bool:
        return self.connectivity_at is not None and at <= self.connectivity_at

    # -- commands to the device: requested -> sent -> acknowledged | failed | expired | cancelled

    def request_command(
        self, command_id: str, name: str, args: dict[str, Any], ttl_s: int, at: datetime
    ) -> datetime:
        """Record a command for the device; return when it expires."""
        if self.status in (Status.SUSPENDED, Status.DECOMMISSIONED):
            raise IllegalTransition(
                f"cannot send a command: device {self.device_id} is {self.status}"
            )
        if not COMMAND_NAME.fullmatch(name):
            raise InvalidCommand(f"command name must match {COMMAND_NAME.pattern}")
        if not isinstance(ttl_s, int) or not MIN_TTL_S <= ttl_s <= MAX_TTL_S:
            raise InvalidCommand(f"ttl_s must be an integer from {MIN_TTL_S} to {MAX_TTL_S}")
        if command_id in self.commands:
            raise IllegalTransition(f"command {command_id} exists already")
        if len(self.pending_commands()) >= MAX_PENDING_COMMANDS:
            raise IllegalTransition(
                f"device {self.device_id} has {MAX_PENDING_COMMANDS} pending commands; "
                "wait for them to be acknowledged or to expire"
            )
        expires_at = at + timedelta(seconds=ttl_s)
        self._command_requested(
            command_id=command_id, name=name, args=dict(args), expires_at=expires_at, timestamp=at
        )
        return expires_at

    def pending_commands(self) -> list[str]:
        """Ids of the commands not finished yet, in request order."""
        return [cid for cid, c in self.commands.items() if c["state"] in PENDING]

    def mark_command_sent(self, command_id: str, at: datetime) -> bool:
        """Record that the bridge handed the command to the broker; only a requested one moves."""
        command = self.commands.get(command_id)
        if command is None or command["state"] != CommandState.REQUESTED:
            return False
        self._command_sent(command_id=command_id, timestamp=at)
        return True

    def acknowledge_command(
        self, command_id: str, ok: bool, result: dict[str, Any], at: datetime
    ) -> bool:
        """Record the device's ack; an unknown, finished or repeated one changes nothing."""
        command = self.commands.get(command_id)
        if command is None or command["state"] not in PENDING:
            return False
        if ok:
            self._command_acknowledged(command_id=command_id, result=dict(result), timestamp=at)
        else:
            self._command_failed(command_id=command_id, result=dict(result), timestamp=at)
        return True

    def expire_command(self, command_id: str, at: datetime) -> bool:
        """Expire a pending command whose time is up; anything else changes nothing."""
        command = self.commands.get(command_id)
        if command is None or command["state"] not in PENDING or at < command["expires_at"]:
            return False
        self._command_expired(command_id=command_id, timestamp=at)
        return True

    def cancel_command(self, command_id: str, reason: str, at: datetime) -> None:
        command = self.commands.get(command_id)
        if command is None:
            raise InvalidCommand(f"device {self.device_id} has no command {command_id}")
        if command["state"] not in PENDING:
            raise IllegalTransition(f"command {command_id} is {command['state']} already")
        self._command_cancelled(command_id=command_id, reason=reason, timestamp=at)

    def _cancel_pending(self, reason: str, at: datetime) -> None:
        for command_id in self.pending_commands():
            self._command_cancelled(command_id=command_id, reason=reason, timestamp=at)

    # -- alerts: raised -> retriggered* -> cleared, acknowledged once at any point -----------
    # Raised, retriggered and cleared by the analytics service from the readings; a repeated or
    # stale decision (a re-evaluation after a crash, a replay) changes nothing, so each
    # transition is recorded exactly once. The alert state is `domain.alerts.AlertState`.

    def alert_states(self) -> dict[str, Any]:
        """alert_id -> AlertState: the open alerts and the last RECENT_ALERTS cleared ones."""
        from domain.alerts import AlertState

        return {aid: msgspec.convert(a, AlertState) for aid, a in self._alerts().items()}

    def _alerts(self) -> dict[str, dict[str, Any]]:
        # A device restored from a snapshot taken before alerts existed has no attribute yet.
        alerts: dict[str, dict[str, Any]] = self.__dict__.setdefault("alerts", {})
        return alerts

    def _raised_marks(self) -> dict[str, int]:
        """rule_id -> the device time of the rule's newest alert, however long ago it cleared."""
        marks: dict[str, int] | None = self.__dict__.get("alert_marks")
        if marks is None:  # restored from a snapshot taken before marks existed
            marks = {}
            for alert in self._alerts().values():
                rule, at_ms = alert["rule_id"], alert["raised_at_ms"]
                marks[rule] = max(at_ms, marks.get(rule, at_ms))
            self.__dict__["alert_marks"] = marks
        return marks

    def open_alert(self, rule_id: str) -> str | None:
        """The id of the rule's open alert for this device, if any."""
        for aid, alert in self._alerts().items():
            if alert["rule_id"] == rule_id and alert["cleared_at_ms"] is None:
                return aid
        return None

    def raise_alert(
        self,
        rule_id: str,
        severity: str,
        metric: str,
        value: float | None,
        at_ms: int,
        at: datetime,
    ) -> str | None:
        """Raise the rule's alert at device time `at_ms`; None (nothing recorded) while one is
        open for the rule, when the rule raised at or after `at_ms` before (a re-evaluation of
        readings already evaluated), or once decommissioned."""
        from domain.alerts import alert_id, raise_alert

        state = raise_alert(rule_id, self.device_id, severity, metric, value, at_ms)  # type: ignore[arg-type]
        if (
            self.status == Status.DECOMMISSIONED
            or self.open_alert(rule_id) is not None
            or alert_id(self.device_id, rule_id, at_ms) in self._alerts()
            or at_ms <= self._raised_marks().get(rule_id, -1)
        ):
            return None
        self._alert_raised(
            alert_id=state.alert_id,
            rule_id=rule_id,
            severity=severity,
            metric=metric,
            value=value,
            at_ms=at_ms,
            timestamp=at,
        )
        return state.alert_id

    def retrigger_alert(self, rule_id: str, value: float | None, at_ms: int, at: datetime) -> bool:
        """Count a re-trigger of the rule's open alert; one at or before the last is stale."""
        aid = self.open_alert(rule_id)
        if aid is None or at_ms <= self._alerts()[aid]["last_at_ms"]:
            return False
        self._alert_retriggered(alert_id=aid, value=value, at_ms=at_ms, timestamp=at)
        return True

    def clear_alert(self, rule_id: str, value: float | None, at_ms: int, at: datetime) -> bool:
        """Clear the rule's open alert at device time `at_ms`; none open, or one raised after
        `at_ms` (a stale clear of an earlier alert), changes nothing."""
        from domain.alerts import AlertState, clear

        aid = self.open_alert(rule_id)
        if aid is None or at_ms < self._alerts()[aid]["raised_at_ms"]:
            return False
        clear(msgspec.convert(self._alerts()[aid], AlertState), value, at_ms)  # checks the time
        self._alert_cleared(alert_id=aid, value=value, at_ms=at_ms, timestamp=at)
        return True

    def acknowledge_alert(self, alert_id: str, by: str, note: str | None, at: datetime) -> None:
        from domain.alerts import AlertState, acknowledge

        stored = self._alerts().get(alert_id)
        if stored is None:
            raise UnknownAlert(f"device {self.device_id} has no alert {alert_id}")
        acknowledge(msgspec.convert(stored, AlertState), by, at, note)  # the rules of the lifecycle
        self._alert_acknowledged(alert_id=alert_id, by=by, note=note, timestamp=at)

    # -- events ----------------------------------------------------------------------------

    @event("Configured")
    def _configured(self, config: dict[str, Any], config_version: int, timestamp: datetime) -> None:
        self.config = config
        self.config_version = config_version

    @event("Suspended")
    def _suspended(self, reason: str, timestamp: datetime) -> None:
        self.status = Status.SUSPENDED.value
        self.suspended_reason = reason

    @event("Resumed")
    def _resumed(self, status: str, timestamp: datetime) -> None:
        self.status = status
        self.suspended_reason = None

    @event("Decommissioned")
    def _decommissioned(self, reason: str, timestamp: datetime) -> None:
        self.status = Status.DECOMMISSIONED.value
        self.online = False

    @event("SecretRotated")
    def _secret_rotated(self, secret_hash: str, timestamp: datetime) -> None:
        self.secret_hash = secret_hash

    @event("CommandRequested")
    def _command_requested(
        self,
        command_id: str,
        name: str,
        args: dict[str, Any],
        expires_at: datetime,
        timestamp: datetime,
    ) -> None:
        self.commands[command_id] = {
            "name": name,
            "args": args,
            "expires_at": expires_at,
            "state": CommandState.REQUESTED.value,
            "requested_at": timestamp,
        }

    @event("CommandSent")
    def _command_sent(self, command_id: str, timestamp: datetime) -> None:
        self.commands[command_id]["state"] = CommandState.SENT.value

    @event("CommandAcknowledged")
    def _command_acknowledged(
        self, command_id: str, result: dict[str, Any], timestamp: datetime
    ) -> None:
        self._finish(command_id, CommandState.ACKNOWLEDGED)

    @event("CommandFailed")
    def _command_failed(self, command_id: str, result: dict[str, Any], timestamp: datetime) -> None:
        self._finish(command_id, CommandState.FAILED)

    @event("CommandExpired")
    def _command_expired(self, command_id: str, timestamp: datetime) -> None:
        self._finish(command_id, CommandState.EXPIRED)

    @event("CommandCancelled")
    def _command_cancelled(self, command_id: str, reason: str, timestamp: datetime) -> None:
        self._finish(command_id, CommandState.CANCELLED)

    def _finish(self, command_id: str, state: CommandState) -> None:
        """Move a command to a final state and forget the oldest finished beyond the recent few."""
        command = self.commands.pop(command_id)
        command["state"] = state.value
        self.commands[command_id] = command
        finished = [cid for cid, c in self.commands.items() if c["state"] not in PENDING]
        for cid in finished[: max(0, len(finished) - RECENT_COMMANDS)]:
            del self.commands[cid]

    @event("Connected")
    def _connected(self, timestamp: datetime) -> None:
        self.online = True
        self.connectivity_at = timestamp
        self.last_connected_at = timestamp
        if self.first_connected_at is None:
            self.first_connected_at = timestamp
        if self.status == Status.PROVISIONED:
            self.status = Status.ACTIVE.value

    @event("Disconnected")
    def _disconnected(self, timestamp: datetime) -> None:
        self.online = False
        self.connectivity_at = timestamp
        self.last_disconnected_at = timestamp

    @event("AlertRaised")
    def _alert_raised(
        self,
        alert_id: str,
        rule_id: str,
        severity: str,
        metric: str,
        value: float | None,
        at_ms: int,
        timestamp: datetime,
    ) -> None:
        self._alerts()[alert_id] = {
            "alert_id": alert_id,
            "rule_id": rule_id,
            "device_id": self.device_id,
            "severity": severity,
            "metric": metric,
            "status": "active",
            "acknowledged": False,
            "raised_value": value,
            "raised_at_ms": at_ms,
            "retriggers": 0,
            "last_value": value,
            "last_at_ms": at_ms,
            "cleared_value": None,
            "cleared_at_ms": None,
            "acknowledged_by": None,
            "acknowledged_at": None,
            "note": None,
        }
        marks = self._raised_marks()
        marks[rule_id] = max(at_ms, marks.get(rule_id, at_ms))

    @event("AlertRetriggered")
    def _alert_retriggered(
        self, alert_id: str, value: float | None, at_ms: int, timestamp: datetime
    ) -> None:
        alert = self._alerts()[alert_id]
        alert.update(retriggers=alert["retriggers"] + 1, last_value=value, last_at_ms=at_ms)

    @event("AlertAcknowledged")
    def _alert_acknowledged(
        self, alert_id: str, by: str, note: str | None, timestamp: datetime
    ) -> None:
        alert = self._alerts()[alert_id]
        alert.update(
            acknowledged=True, acknowledged_by=by, note=note, acknowledged_at=timestamp.isoformat()
        )
        if alert["cleared_at_ms"] is None:
            alert["status"] = "acknowledged"

    @event("AlertCleared")
    def _alert_cleared(
        self, alert_id: str, value: float | None, at_ms: int, timestamp: datetime
    ) -> None:
        alerts = self._alerts()
        alert = alerts.pop(alert_id)
        alert.update(status="cleared", cleared_value=value, cleared_at_ms=at_ms)
        alerts[alert_id] = alert
        cleared = [aid for aid, a in alerts.items() if a["cleared_at_ms"] is not None]
        for aid in cleared[: max(0, len(cleared) - RECENT_ALERTS)]:
            del alerts[aid]
