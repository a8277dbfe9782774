"""Alerts as events of the Device aggregate, their published form and their place in the view."""

from __future__ import annotations

from typing import Any
from uuid import UUID

import pytest
from eventsourcing.application import Application

from domain.device import RECENT_ALERTS, Device, UnknownAlert, device_uuid
from domain.errors import IllegalTransition
from domain.published import (
    DeviceAlertAcknowledged,
    DeviceAlertCleared,
    DeviceAlertRaised,
    DeviceAlertRetriggered,
    decode_event,
    encode_event,
    to_published,
)
from infra.views import ViewKeys
from projections.views_plan import DeviceState, plan_event
from tests.unit.support import DEVICE_ID, T0, at, event_names, registered

RULE = "boiler-hot"
T0_MS = 1_767_225_600_000


def raised(device: Device, rule_id: str = RULE, at_ms: int = T0_MS, value: float = 91.0) -> str:
    alert_id = device.raise_alert(rule_id, "critical", "temperature", value, at_ms, at(1))
    assert alert_id is not None
    return alert_id


def test_a_raised_alert_is_open_with_its_trigger_and_a_decodable_id() -> None:
    device = registered()
    alert_id = raised(device)
    assert alert_id == f"{DEVICE_ID}.{RULE}.{T0_MS}"
    assert device.open_alert(RULE) == alert_id
    alert = device.alert_states()[alert_id]
    assert (alert.status, alert.raised_value, alert.raised_at_ms) == ("active", 91.0, T0_MS)
    assert (alert.severity, alert.metric, alert.retriggers) == ("critical", "temperature", 0)
    assert event_names(device)[-1] == "AlertRaised"


def test_a_second_raise_of_the_same_rule_while_open_records_nothing() -> None:
    device = registered()
    raised(device)
    device.collect_events()
    assert device.raise_alert(RULE, "critical", "temperature", 99.0, T0_MS + 5, at(2)) is None
    assert device.collect_events() == []


def test_each_rule_has_its_own_open_alert() -> None:
    device = registered()
    first, second = raised(device), raised(device, "other-rule")
    assert first != second
    assert device.open_alert("other-rule") == second


def test_a_retrigger_counts_once_and_a_repeated_or_older_one_is_stale() -> None:
    device = registered()
    alert_id = raised(device)
    assert device.retrigger_alert(RULE, 95.0, T0_MS + 10, at(2))
    assert not device.retrigger_alert(RULE, 95.0, T0_MS + 10, at(3))
    assert not device.retrigger_alert(RULE, 96.0, T0_MS + 5, at(3))
    alert = device.alert_states()[alert_id]
    assert (alert.retriggers, alert.last_value) == (1, 95.0)


def test_clearing_closes_the_alert_and_a_repeated_clear_records_nothing() -> None:
    device = registered()
    alert_id = raised(device)
    assert device.clear_alert(RULE, 79.0, T0_MS + 60_000, at(60))
    assert device.open_alert(RULE) is None
    alert = device.alert_states()[alert_id]
    assert (alert.status, alert.cleared_value, alert.cleared_at_ms) == (
        "cleared",
        79.0,
        T0_MS + 60_000,
    )
    assert not device.clear_alert(RULE, 78.0, T0_MS + 61_000, at(61))


def test_the_same_trigger_raised_again_after_clearing_is_a_duplicate() -> None:
    device = registered()
    raised(device)
    device.clear_alert(RULE, 79.0, T0_MS + 60_000, at(60))
    assert device.raise_alert(RULE, "critical", "temperature", 91.0, T0_MS, at(61)) is None
    assert raised(device, at_ms=T0_MS + 120_000) == f"{DEVICE_ID}.{RULE}.{T0_MS + 120_000}"


def test_acknowledging_twice_is_an_illegal_transition() -> None:
    device = registered()
    alert_id = raised(device)
    device.acknowledge_alert(alert_id, "token:abc", "on it", at(5))
    alert = device.alert_states()[alert_id]
    assert (alert.status, alert.acknowledged_by, alert.note) == (
        "acknowledged",
        "token:abc",
        "on it",
    )
    with pytest.raises(IllegalTransition, match="already acknowledged"):
        device.acknowledge_alert(alert_id, "token:def", None, at(6))


def test_a_cleared_unacknowledged_alert_can_be_acknowledged_once() -> None:
    device = registered()
    alert_id = raised(device)
    device.clear_alert(RULE, 79.0, T0_MS + 60_000, at(60))
    device.acknowledge_alert(alert_id, "token:abc", None, at(70))
    alert = device.alert_states()[alert_id]
    assert (alert.status, alert.acknowledged) == ("cleared", True)
    with pytest.raises(IllegalTransition, match="cleared and acknowledged"):
        device.acknowledge_alert(alert_id, "token:abc", None, at(71))


def test_acknowledging_an_unknown_alert_is_refused() -> None:
    device = registered()
    with pytest.raises(UnknownAlert):
        device.acknowledge_alert(f"{DEVICE_ID}.{RULE}.1", "token:abc", None, at(5))


def test_the_device_remembers_only_its_recent_cleared_alerts() -> None:
    device = registered()
    ids = []
    for n in range(RECENT_ALERTS + 3):
        ids.append(raised(device, at_ms=T0_MS + n * 1000))
        device.clear_alert(RULE, 1.0, T0_MS + n * 1000 + 500, at(n))
    remembered = device.alert_states()
    assert len(remembered) == RECENT_ALERTS
    assert ids[0] not in remembered
    assert ids[-1] in remembered


def test_a_device_without_alerts_state_has_none_open() -> None:
    device = registered()  # as restored from a snapshot taken before alerts existed, too
    assert "alerts" not in vars(device)
    assert device.open_alert(RULE) is None
    assert raised(device) in device.alert_states()


def test_alert_events_are_stored_reloaded_and_published() -> None:
    app: Application[UUID] = Application(env={"PERSISTENCE_MODULE": "eventsourcing.popo"})
    device = registered()
    alert_id = raised(device)
    device.retrigger_alert(RULE, 95.0, T0_MS + 10, at(2))
    device.acknowledge_alert(alert_id, "token:abc", "note", at(3))
    device.clear_alert(RULE, 79.0, T0_MS + 60_000, at(60))
    app.save(device)
    loaded: Any = app.repository.get(device_uuid(DEVICE_ID))
    assert isinstance(loaded, Device)
    assert loaded.alert_states() == device.alert_states()
    notifications = app.recorder.select_notifications(1, 10)
    published: list[Any] = [
        decode_event(encode_event(to_published(app.mapper.to_domain_event(n), n.id)))
        for n in notifications
    ]
    kinds = [type(e) for e in published[1:]]
    assert kinds == [
        DeviceAlertRaised,
        DeviceAlertRetriggered,
        DeviceAlertAcknowledged,
        DeviceAlertCleared,
    ]
    raise_event = published[1]
    assert (raise_event.alert_id, raise_event.rule_id, raise_event.value) == (alert_id, RULE, 91.0)


def test_the_view_shows_open_alerts_and_counts_them_by_severity() -> None:
    keys = ViewKeys.for_namespace("unit")
    doc = plan_event(keys, _registered_event(), DeviceState(None))[1]
    alert_id = f"{DEVICE_ID}.{RULE}.{T0_MS}"
    common: dict[str, Any] = {"device_id": DEVICE_ID, "at": at(1), "alert_id": alert_id}
    raise_plan, state = plan_event(
        keys,
        DeviceAlertRaised(
            **common,
            version=2,
            position=2,
            rule_id=RULE,
            severity="warning",
            metric="temperature",
            value=91.0,
            at_ms=T0_MS,
        ),
        doc,
    )
    assert [op for op in raise_plan.ops if op[0] in ("incr", "decr")] == [
        ("incr", keys.alerts_open("warning"))
    ]
    assert (f"zadds\x1f{T0_MS}\x1f{alert_id}", keys.alerts_in("open")) in raise_plan.ops
    assert state.doc is not None
    assert state.doc["alerts"][alert_id]["status"] == "active"
    ack_plan, state = plan_event(
        keys, DeviceAlertAcknowledged(**common, version=3, position=3, by="t", note=None), state
    )
    assert {key for _, key in ack_plan.ops} == {keys.alert(alert_id)}  # its own hash only
    assert state.doc is not None
    assert state.doc["alerts"][alert_id]["status"] == "acknowledged"
    clear_plan, state = plan_event(
        keys,
        DeviceAlertCleared(**common, version=4, position=4, value=70.0, at_ms=T0_MS + 1),
        state,
    )
    assert [op for op in clear_plan.ops if op[0] in ("incr", "decr")] == [
        ("decr", keys.alerts_open("warning"))
    ]
    assert (f"zrem\x1f{alert_id}", keys.alerts_in("open")) in clear_plan.ops
    assert state.doc is not None
    assert state.doc["alerts"] == {}


def _registered_event() -> Any:
    from domain.published import DeviceRegistered

    return DeviceRegistered(
        device_id=DEVICE_ID, version=1, at=T0, position=1, name="n", type="t", labels={}
    )


def test_re_raising_an_alert_that_has_aged_out_of_the_recent_ones_records_nothing() -> None:
    device = registered()
    first = T0_MS
    for i in range(RECENT_ALERTS + 5):  # the first alert is no longer among the recent ones
        raised(device, at_ms=first + i * 10)
        assert device.clear_alert(RULE, 10.0, first + i * 10 + 5, at(2))
    assert f"{DEVICE_ID}.{RULE}.{first}" not in device.alert_states()
    device.collect_events()
    assert device.raise_alert(RULE, "critical", "temperature", 91.0, first, at(3)) is None
    assert device.collect_events() == []


def test_a_clear_older_than_the_open_alert_is_stale_and_records_nothing() -> None:
    device = registered()
    raised(device, at_ms=T0_MS)
    assert device.clear_alert(RULE, 10.0, T0_MS + 10, at(2))
    raised(device, at_ms=T0_MS + 20)
    device.collect_events()
    assert not device.clear_alert(RULE, 10.0, T0_MS + 10, at(3))  # the first clear, evaluated again
    assert device.collect_events() == []
    assert device.open_alert(RULE) == f"{DEVICE_ID}.{RULE}.{T0_MS + 20}"
