"""The lifecycle of one alert (a rule firing for a device) as a pure state machine.

raised -> retriggered* -> cleared, with an acknowledgement possible at any point, once. The shown
`status` is "cleared" once cleared (whether acknowledged or not: see `acknowledged`), else
"acknowledged" if acknowledged, else "active". Rules of the lifecycle:

- a second acknowledgement is refused, whether the alert is active or cleared ("already
  acknowledged"); acknowledging a cleared but unacknowledged alert is allowed;
- a cleared alert cannot be retriggered or cleared again (a new breach raises a new alert);
- a retrigger keeps the acknowledgement.

Device times (`*_ms`) are epoch ms from the readings; `acknowledged_at` is the operator's
(server) time as ISO 8601. Alert ids are `{device_id}.{rule_id}.{raised_at_ms}`, decodable back
(neither id may contain a '.').
"""

from __future__ import annotations

import re
from datetime import datetime
from typing import Literal

import msgspec

from domain.device import DEVICE_ID
from domain.errors import IllegalTransition, InvalidCommand
from domain.rules import RULE_ID, SEVERITIES, Severity

MAX_BY = 200
MAX_NOTE = 2000
_MS = re.compile(r"^(0|[1-9][0-9]{0,18})$")
_INT64_MAX = 2**63 - 1

AlertStatus = Literal["active", "acknowledged", "cleared"]


class AlertState(msgspec.Struct, frozen=True, kw_only=True):
    alert_id: str
    rule_id: str
    device_id: str
    severity: Severity
    metric: str
    status: AlertStatus
    acknowledged: bool
    raised_value: float | None  # None for an absent condition
    raised_at_ms: int
    retriggers: int
    last_value: float | None  # the latest breaching value (at raise or retrigger)
    cleared_value: float | None = None
    cleared_at_ms: int | None = None
    acknowledged_by: str | None = None
    acknowledged_at: str | None = None
    note: str | None = None

    @property
    def cleared(self) -> bool:
        return self.cleared_at_ms is not None


def alert_id(device_id: str, rule_id: str, raised_at_ms: int) -> str:
    _check_ids(device_id, rule_id)
    if type(raised_at_ms) is not int or not 0 <= raised_at_ms <= _INT64_MAX:
        raise InvalidCommand("raised_at_ms must be epoch milliseconds (a non-negative integer)")
    return f"{device_id}.{rule_id}.{raised_at_ms}"


def parse_alert_id(value: str) -> tuple[str, str, int]:
    """(device_id, rule_id, raised_at_ms) of an alert id; raises InvalidCommand if malformed."""
    parts = value.split(".")
    if len(parts) != 3 or not _MS.fullmatch(parts[2]) or int(parts[2]) > _INT64_MAX:
        raise InvalidCommand(
            f"alert id must be <device_id>.<rule_id>.<raised_at_ms>, got {value[:200]!r}"
        )
    device_id, rule_id, ms = parts
    _check_ids(device_id, rule_id)
    return device_id, rule_id, int(ms)


def _check_ids(device_id: str, rule_id: str) -> None:
    if not DEVICE_ID.fullmatch(device_id):
        raise InvalidCommand(f"device_id must match {DEVICE_ID.pattern}")
    if not RULE_ID.fullmatch(rule_id):
        raise InvalidCommand(f"rule_id must match {RULE_ID.pattern}")


def _status(cleared: bool, acknowledged: bool) -> AlertStatus:
    if cleared:
        return "cleared"
    return "acknowledged" if acknowledged else "active"


def raise_alert(
    rule_id: str,
    device_id: str,
    severity: Severity,
    metric: str,
    value: float | None,
    at_ms: int,
) -> AlertState:
    """A new active alert of the rule for the device, raised at device time `at_ms`."""
    if severity not in SEVERITIES:
        raise InvalidCommand(f"severity must be one of {', '.join(SEVERITIES)}")
    return AlertState(
        alert_id=alert_id(device_id, rule_id, at_ms),
        rule_id=rule_id,
        device_id=device_id,
        severity=severity,
        metric=metric,
        status="active",
        acknowledged=False,
        raised_value=value,
        raised_at_ms=at_ms,
        retriggers=0,
        last_value=value,
    )


def _refuse_if_cleared(state: AlertState, what: str) -> None:
    if state.cleared:
        raise IllegalTransition(f"cannot {what}: alert {state.alert_id} is cleared")


def _refuse_if_before_raise(state: AlertState, at_ms: int, what: str) -> None:
    if at_ms < state.raised_at_ms:
        raise IllegalTransition(
            f"cannot {what} alert {state.alert_id} at {at_ms}, before it was raised "
            f"({state.raised_at_ms})"
        )


def retrigger(state: AlertState, value: float | None, at_ms: int) -> AlertState:
    """The condition breached again while the alert is open (after readings that did not)."""
    _refuse_if_cleared(state, "retrigger")
    _refuse_if_before_raise(state, at_ms, "retrigger")
    return msgspec.structs.replace(state, retriggers=state.retriggers + 1, last_value=value)


def clear(state: AlertState, value: float | None, at_ms: int) -> AlertState:
    _refuse_if_cleared(state, "clear")
    _refuse_if_before_raise(state, at_ms, "clear")
    return msgspec.structs.replace(
        state,
        status=_status(True, state.acknowledged),
        cleared_value=value,
        cleared_at_ms=at_ms,
    )


def acknowledge(state: AlertState, by: str, at: datetime, note: str | None) -> AlertState:
    """An operator has seen the alert; allowed once, while active or after it cleared."""
    if state.acknowledged:
        shown = "cleared and acknowledged" if state.cleared else "acknowledged"
        raise IllegalTransition(
            f"alert {state.alert_id} is already {shown} (by {state.acknowledged_by})"
        )
    if not isinstance(by, str) or not 1 <= len(by) <= MAX_BY:
        raise InvalidCommand(f"by must be a string of 1 to {MAX_BY} characters")
    if note is not None and (not isinstance(note, str) or len(note) > MAX_NOTE):
        raise InvalidCommand(f"note must be a string of at most {MAX_NOTE} characters")
    if at.tzinfo is None:
        raise InvalidCommand("the acknowledgement time must carry a time zone")
    return msgspec.structs.replace(
        state,
        status=_status(state.cleared, True),
        acknowledged=True,
        acknowledged_by=by,
        acknowledged_at=at.isoformat(),
        note=note,
    )
