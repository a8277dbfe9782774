"""The pure decisions of the views projection: event plans and the reduction of ingest batches."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import msgspec
import pytest

from domain.ingest import CommandAck, Reading, Reported, Status, Telemetry
from domain.published import (
    DeviceConfigured,
    DeviceConnected,
    DeviceDecommissioned,
    DeviceDisconnected,
    DeviceRegistered,
    DeviceResumed,
    DeviceSecretRotated,
    DeviceSuspended,
)
from iot.views import ViewKeys
from projections.views_plan import (
    IngestPlan,
    MissingRegistration,
    epoch_ms,
    metric_json,
    plan_event,
)

KEYS = ViewKeys.for_namespace("unit")
T0 = datetime(2026, 1, 1, tzinfo=UTC)
T0_MS = 1_767_225_600_000


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def registered(labels: dict[str, str] | None = None) -> dict[str, Any]:
    event = DeviceRegistered(
        device_id="d1",
        version=1,
        at=T0,
        position=1,
        name="Boiler",
        type="thermostat",
        labels={"site": "north"} if labels is None else labels,
    )
    _, doc = plan_event(KEYS, event, None)
    return doc


def test_epoch_ms_of_a_utc_time() -> None:
    assert epoch_ms(T0) == T0_MS
    assert epoch_ms(at(0.0015)) == T0_MS + 1


def test_registration_builds_the_contract_doc_and_indexes() -> None:
    event = DeviceRegistered(
        device_id="d1",
        version=1,
        at=T0,
        position=7,
        name="B",
        type="t",
        labels={"b": "2", "a": "1"},
    )
    plan, doc = plan_event(KEYS, event, None)
    assert doc == {
        "device_id": "d1",
        "name": "B",
        "type": "t",
        "labels": {"b": "2", "a": "1"},
        "status": "provisioned",
        "registered_at": "2026-01-01T00:00:00Z",
        "updated_at": "2026-01-01T00:00:00Z",
        "desired": {"version": 0, "config": {}},
    }
    assert msgspec.json.decode(plan.doc) == doc
    assert plan.ops == (
        ("zadd", KEYS.devices),
        ("sadd", KEYS.status("provisioned")),
        ("sadd", KEYS.label("a", "1")),
        ("sadd", KEYS.label("b", "2")),
    )
    assert plan.online == ""


def test_configuration_sets_desired_state_without_touching_indexes() -> None:
    event = DeviceConfigured(
        device_id="d1", version=2, at=at(1), position=8, config={"sp": 21.5}, config_version=1
    )
    plan, doc = plan_event(KEYS, event, registered())
    assert doc["desired"] == {"version": 1, "config": {"sp": 21.5}}
    assert doc["updated_at"] == "2026-01-01T00:00:01Z"
    assert plan.ops == ()


def test_suspension_moves_the_device_between_status_sets() -> None:
    event = DeviceSuspended(device_id="d1", version=2, at=at(1), position=8, reason="x")
    plan, doc = plan_event(KEYS, event, registered())
    assert doc["status"] == "suspended"
    assert plan.ops == (("srem", KEYS.status("provisioned")), ("sadd", KEYS.status("suspended")))


def test_resumption_takes_the_status_the_event_names() -> None:
    suspended = {**registered(), "status": "suspended"}
    event = DeviceResumed(device_id="d1", version=3, at=at(2), position=9, status="active")
    plan, doc = plan_event(KEYS, event, suspended)
    assert doc["status"] == "active"
    assert plan.ops == (("srem", KEYS.status("suspended")), ("sadd", KEYS.status("active")))


def test_decommission_sets_status_and_offline() -> None:
    event = DeviceDecommissioned(device_id="d1", version=2, at=at(3), position=9, reason="eol")
    plan, doc = plan_event(KEYS, event, registered())
    assert doc["status"] == "decommissioned"
    assert (plan.online, plan.online_at) == ("0", T0_MS + 3000)


def test_first_connection_activates_a_provisioned_device_and_sets_online() -> None:
    event = DeviceConnected(device_id="d1", version=2, at=at(4), position=9)
    plan, doc = plan_event(KEYS, event, registered())
    assert doc["status"] == "active"
    assert (plan.online, plan.online_at) == ("1", T0_MS + 4000)


def test_connection_of_a_suspended_device_keeps_it_suspended() -> None:
    event = DeviceConnected(device_id="d1", version=3, at=at(4), position=9)
    plan, doc = plan_event(KEYS, event, {**registered(), "status": "suspended"})
    assert doc["status"] == "suspended"
    assert plan.ops == ()


def test_disconnection_and_rotation_change_no_index() -> None:
    off = DeviceDisconnected(device_id="d1", version=2, at=at(5), position=9)
    plan, _ = plan_event(KEYS, off, registered())
    assert (plan.online, plan.ops) == ("0", ())
    rotated = DeviceSecretRotated(device_id="d1", version=2, at=at(5), position=9)
    plan, doc = plan_event(KEYS, rotated, registered())
    assert (plan.online, plan.ops) == ("", ())
    assert doc["updated_at"] == "2026-01-01T00:00:05Z"


def test_event_without_registered_doc_is_refused() -> None:
    event = DeviceSuspended(device_id="d1", version=2, at=at(1), position=8, reason="x")
    with pytest.raises(MissingRegistration):
        plan_event(KEYS, event, None)


def test_event_script_arguments_align_operations_with_keys() -> None:
    event = DeviceSuspended(device_id="d1", version=2, at=at(1), position=8, reason="x")
    plan, _ = plan_event(KEYS, event, registered())
    keys, args = plan.script_args(KEYS)
    assert keys == [
        KEYS.device("d1"),
        KEYS.online,
        KEYS.status("provisioned"),
        KEYS.status("suspended"),
    ]
    assert args[:6] == [2, plan.doc, "", 0, "d1", KEYS.changes]
    assert args[6:] == ["srem", "sadd"]


def telemetry(received_at: int, *readings: tuple[int, dict[str, Any]]) -> Telemetry:
    return Telemetry(
        device_id="d1",
        received_at=received_at,
        readings=[Reading(ts, values) for ts, values in readings],
    )


def test_metric_json_puts_the_timestamp_first() -> None:
    assert metric_json(5, 21.5) == '{"ts":5,"value":21.5}'
    assert metric_json(5, "on") == '{"ts":5,"value":"on"}'
    assert metric_json(5, True) == '{"ts":5,"value":true}'


def test_batch_keeps_the_latest_value_of_each_metric_by_device_time() -> None:
    plan = IngestPlan()
    plan.add(1, telemetry(T0_MS, (300, {"t": 3.0}), (100, {"t": 1.0, "h": 50})))
    plan.add(2, telemetry(T0_MS, (200, {"t": 2.0, "h": 60})))
    delta = plan.devices["d1"]
    assert delta.metrics == {"t": (300, 3.0), "h": (200, 60)}
    assert delta.last_seen == 300


def test_batch_reduction_does_not_depend_on_arrival_order() -> None:
    messages = [
        telemetry(T0_MS, (100, {"t": 1})),
        telemetry(T0_MS, (100, {"t": 2})),  # same device time: a fixed tie-break decides
        telemetry(T0_MS, (50, {"t": 9})),
    ]
    one, other = IngestPlan(), IngestPlan()
    for seq, message in enumerate(messages):
        one.add(seq, message)
    for seq, message in reversed(list(enumerate(messages))):
        other.add(seq, message)
    assert one.devices["d1"].metrics == other.devices["d1"].metrics == {"t": (100, 2)}


def test_reading_ids_are_stream_sequence_and_index_per_minute_of_receipt() -> None:
    plan = IngestPlan()
    plan.add(7, telemetry(T0_MS + 59_999, (1, {"a": 1}), (2, {"a": 2})))
    plan.add(8, telemetry(T0_MS + 60_000, (3, {"a": 3})))
    minute = T0_MS // 60_000
    assert plan.readings == {minute: ["7:0", "7:1"], minute + 1: ["8:0"]}


def test_newest_status_wins_and_online_breaks_a_tie() -> None:
    plan = IngestPlan()
    plan.add(1, Status(device_id="d1", received_at=20, online=False))
    plan.add(2, Status(device_id="d1", received_at=10, online=True))
    assert plan.devices["d1"].status == (20, "0")
    plan.add(3, Status(device_id="d1", received_at=20, online=True))
    assert plan.devices["d1"].status == (20, "1")
    assert plan.devices["d1"].last_seen == 20


def test_offline_status_does_not_count_as_seen() -> None:
    plan = IngestPlan()
    plan.add(1, Status(device_id="d1", received_at=20, online=False))
    assert plan.devices["d1"].last_seen is None


def test_newest_reported_state_wins() -> None:
    plan = IngestPlan()
    plan.add(1, Reported(device_id="d1", received_at=30, state={"fw": "2"}))
    plan.add(2, Reported(device_id="d1", received_at=10, state={"fw": "1"}))
    assert plan.devices["d1"].reported == (30, '{"fw":"2"}')
    assert plan.newest == 30


def test_command_acks_are_ignored() -> None:
    plan = IngestPlan()
    plan.add(1, CommandAck(device_id="d1", received_at=5, command_id="c", status="ok"))
    assert plan.devices == {}
    assert plan.newest is None


def test_ingest_script_arguments_carry_the_batch_as_json_with_numbers_as_text() -> None:
    plan = IngestPlan()
    plan.add(1, telemetry(T0_MS, (100, {"t": 1.5})))
    plan.add(2, Status(device_id="d2", received_at=T0_MS + 1, online=True))
    plan.add(3, Reported(device_id="d2", received_at=T0_MS + 2, state={"fw": 1}))
    keys, args = plan.script_args(KEYS, now_ms=T0_MS)
    assert keys == [KEYS.online]
    assert args[:2] == [KEYS.device(""), KEYS.changes]
    minute = T0_MS // 60_000
    assert msgspec.json.decode(args[2]) == [
        [
            ["d1", "100", "", "", "", "", ["m:t", "100", '{"ts":100,"value":1.5}']],
            ["d2", str(T0_MS + 2), str(T0_MS + 1), "1", str(T0_MS + 2), '{"fw":1}', []],
        ],
        [[KEYS.readings(minute), str((minute + 1) * 60 + 180), ["1:0"]]],
    ]


def test_readings_of_minutes_already_expired_are_left_out() -> None:
    plan = IngestPlan()
    plan.add(1, telemetry(T0_MS, (100, {"t": 1.5})))
    _, args = plan.script_args(KEYS, now_ms=T0_MS + 240_000)
    assert msgspec.json.decode(args[2])[1] == []
