"""The alert lifecycle: raise, retrigger, acknowledge, clear, and alert ids."""

from __future__ import annotations

from datetime import datetime

import msgspec
import pytest

from domain.alerts import (
    AlertState,
    acknowledge,
    alert_id,
    clear,
    parse_alert_id,
    raise_alert,
    retrigger,
)
from domain.errors import IllegalTransition, InvalidCommand
from tests.unit.support import DEVICE_ID, at

RAISED_MS = 1_767_225_600_000


def raised() -> AlertState:
    return raise_alert("boiler-hot", DEVICE_ID, "critical", "temperature", 91.5, RAISED_MS)


def test_a_raised_alert_is_active_and_unacknowledged() -> None:
    alert = raised()

    assert alert == AlertState(
        alert_id=f"{DEVICE_ID}.boiler-hot.{RAISED_MS}",
        rule_id="boiler-hot",
        device_id=DEVICE_ID,
        severity="critical",
        metric="temperature",
        status="active",
        acknowledged=False,
        raised_value=91.5,
        raised_at_ms=RAISED_MS,
        retriggers=0,
        last_value=91.5,
    )
    assert alert.cleared is False


def test_an_absent_alert_is_raised_without_a_value() -> None:
    alert = raise_alert("silent", DEVICE_ID, "warning", "*", None, RAISED_MS)

    assert alert.raised_value is None
    assert alert.last_value is None


def test_raising_with_an_unknown_severity_is_rejected() -> None:
    with pytest.raises(InvalidCommand) as caught:
        raise_alert("r1", DEVICE_ID, "fatal", "m", 1.0, RAISED_MS)  # type: ignore[arg-type]

    assert "severity" in caught.value.reason


def test_each_retrigger_counts_and_keeps_the_latest_value() -> None:
    alert = retrigger(raised(), 92.0, RAISED_MS + 10_000)
    alert = retrigger(alert, 95.0, RAISED_MS + 20_000)

    assert alert.retriggers == 2
    assert alert.last_value == 95.0
    assert alert.raised_value == 91.5
    assert alert.status == "active"


def test_clearing_records_the_value_and_device_time() -> None:
    alert = clear(raised(), 74.0, RAISED_MS + 60_000)

    assert alert.status == "cleared"
    assert alert.cleared is True
    assert alert.cleared_value == 74.0
    assert alert.cleared_at_ms == RAISED_MS + 60_000
    assert alert.acknowledged is False


def test_acknowledging_an_active_alert_shows_it_acknowledged() -> None:
    alert = acknowledge(raised(), "alice", at(5), "on it")

    assert alert.status == "acknowledged"
    assert alert.acknowledged is True
    assert alert.acknowledged_by == "alice"
    assert alert.acknowledged_at == "2026-01-01T00:00:05+00:00"
    assert alert.note == "on it"


def test_an_acknowledged_alert_that_clears_shows_cleared_and_stays_acknowledged() -> None:
    alert = clear(acknowledge(raised(), "alice", at(5), None), 70.0, RAISED_MS + 1)

    assert alert.status == "cleared"
    assert alert.acknowledged is True
    assert alert.acknowledged_by == "alice"


def test_a_cleared_alert_not_yet_acknowledged_can_be_acknowledged() -> None:
    alert = acknowledge(clear(raised(), 70.0, RAISED_MS + 1), "bob", at(9), None)

    assert alert.status == "cleared"
    assert alert.acknowledged is True
    assert alert.note is None


def test_a_retrigger_keeps_the_acknowledgement() -> None:
    alert = retrigger(acknowledge(raised(), "alice", at(5), None), 99.0, RAISED_MS + 5)

    assert alert.status == "acknowledged"
    assert alert.retriggers == 1


def test_acknowledging_an_acknowledged_active_alert_is_an_illegal_transition() -> None:
    alert = acknowledge(raised(), "alice", at(5), None)

    with pytest.raises(IllegalTransition) as caught:
        acknowledge(alert, "bob", at(6), None)

    assert caught.value.reason == (
        f"alert {DEVICE_ID}.boiler-hot.{RAISED_MS} is already acknowledged (by alice)"
    )


def test_acknowledging_a_cleared_and_acknowledged_alert_is_an_illegal_transition() -> None:
    alert = clear(acknowledge(raised(), "alice", at(5), None), 70.0, RAISED_MS + 1)

    with pytest.raises(IllegalTransition) as caught:
        acknowledge(alert, "bob", at(6), None)

    assert "is already cleared and acknowledged" in caught.value.reason


def test_retriggering_a_cleared_alert_is_an_illegal_transition() -> None:
    alert = clear(raised(), 70.0, RAISED_MS + 1)

    with pytest.raises(IllegalTransition) as caught:
        retrigger(alert, 95.0, RAISED_MS + 2)

    assert caught.value.reason == (
        f"cannot retrigger: alert {DEVICE_ID}.boiler-hot.{RAISED_MS} is cleared"
    )


def test_clearing_a_cleared_alert_is_an_illegal_transition() -> None:
    alert = clear(raised(), 70.0, RAISED_MS + 1)

    with pytest.raises(IllegalTransition) as caught:
        clear(alert, 60.0, RAISED_MS + 2)

    assert "cannot clear" in caught.value.reason


def test_clearing_or_retriggering_before_the_raise_is_an_illegal_transition() -> None:
    with pytest.raises(IllegalTransition) as caught:
        clear(raised(), 70.0, RAISED_MS - 1)
    assert "before it was raised" in caught.value.reason

    with pytest.raises(IllegalTransition):
        retrigger(raised(), 95.0, RAISED_MS - 1)


@pytest.mark.parametrize("by", ["", "x" * 201])
def test_acknowledging_needs_who_acknowledged(by: str) -> None:
    with pytest.raises(InvalidCommand) as caught:
        acknowledge(raised(), by, at(1), None)

    assert "by" in caught.value.reason


def test_acknowledging_with_an_overlong_note_is_rejected() -> None:
    with pytest.raises(InvalidCommand) as caught:
        acknowledge(raised(), "alice", at(1), "n" * 2001)

    assert "note" in caught.value.reason


def test_acknowledging_at_a_time_without_zone_is_rejected() -> None:
    with pytest.raises(InvalidCommand):
        acknowledge(raised(), "alice", datetime(2026, 1, 1), None)


def test_transitions_leave_the_previous_state_unchanged() -> None:
    alert = raised()
    acknowledge(alert, "alice", at(1), None)
    clear(alert, 1.0, RAISED_MS + 1)

    assert alert == raised()


def test_an_alert_state_round_trips_through_json() -> None:
    alert = acknowledge(retrigger(raised(), 93.0, RAISED_MS + 1), "alice", at(1), "n")

    assert msgspec.json.decode(msgspec.json.encode(alert), type=AlertState) == alert


# -- alert ids --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("device_id", "rule_id", "raised_at_ms"),
    [(DEVICE_ID, "boiler-hot", RAISED_MS), ("a", "b", 0), ("x" * 64, "y" * 64, 2**63 - 1)],
)
def test_an_alert_id_decodes_back_to_its_device_rule_and_raise_time(
    device_id: str, rule_id: str, raised_at_ms: int
) -> None:
    value = alert_id(device_id, rule_id, raised_at_ms)

    assert value == f"{device_id}.{rule_id}.{raised_at_ms}"
    assert parse_alert_id(value) == (device_id, rule_id, raised_at_ms)


@pytest.mark.parametrize(
    "value",
    [
        "",
        "sensor-001.boiler-hot",
        "sensor-001.boiler.hot.1",
        "sensor-001.boiler-hot.-1",
        "sensor-001.boiler-hot.01",
        "sensor-001.boiler-hot.1e3",
        "sensor-001.boiler-hot.",
        "sensor-001.boiler-hot.99999999999999999999",
        ".boiler-hot.1",
        "sensor-001..1",
        "sensor 001.boiler-hot.1",
        "sensor-001.boiler/hot.1",
    ],
)
def test_a_malformed_alert_id_is_rejected(value: str) -> None:
    with pytest.raises(InvalidCommand):
        parse_alert_id(value)


@pytest.mark.parametrize(
    ("device_id", "rule_id", "raised_at_ms"),
    [("dot.inside", "r", 1), ("d", "dot.inside", 1), ("d", "r", -1), ("", "r", 1)],
)
def test_an_alert_id_of_invalid_parts_is_rejected(
    device_id: str, rule_id: str, raised_at_ms: int
) -> None:
    with pytest.raises(InvalidCommand):
        alert_id(device_id, rule_id, raised_at_ms)
