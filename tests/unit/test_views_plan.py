"""The pure decisions of the views projection: event plans and the reduction of ingest batches."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import msgspec
import pytest

from domain.ingest import CommandAck, CommandSent, Reading, Reported, Status, Telemetry
from domain.published import (
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
)
from infra.views import HISTORY_KEPT, ViewKeys
from projections.views_plan import (
    Commands,
    DeviceState,
    EventPlan,
    IngestPlan,
    MissingRegistration,
    epoch_ms,
    metric_json,
    plan_event,
    split_reported,
)

KEYS = ViewKeys.for_namespace("unit")
T0 = datetime(2026, 1, 1, tzinfo=UTC)
T0_MS = 1_767_225_600_000


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def history(key: str, seconds: float, member: str) -> tuple[tuple[str, str], ...]:
    """The operations recording `member` in a device's history set (see infra.views)."""
    return (
        (f"zadds\x1f{T0_MS + round(seconds * 1000)}\x1f{member}", key),
        (f"ztrim\x1f{HISTORY_KEPT}", key),
    )


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
    _, doc = apply(event)
    return doc


def apply(
    event: PublishedEvent, doc: dict[str, Any] | None = None
) -> tuple[EventPlan, dict[str, Any]]:
    """The plan of `event` on a device whose doc is `doc` (no commands), and the new doc."""
    plan, state = plan_event(KEYS, event, DeviceState(doc))
    assert state.doc is not None
    return plan, state.doc


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
    plan, doc = apply(event)
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
    plan, doc = apply(event, registered())
    assert doc["desired"] == {"version": 1, "config": {"sp": 21.5}}
    assert doc["updated_at"] == "2026-01-01T00:00:01Z"
    assert plan.ops == ()


def test_suspension_moves_the_device_between_status_sets() -> None:
    event = DeviceSuspended(device_id="d1", version=2, at=at(1), position=8, reason="x")
    plan, doc = apply(event, registered())
    assert doc["status"] == "suspended"
    assert plan.ops == (("srem", KEYS.status("provisioned")), ("sadd", KEYS.status("suspended")))


def test_resumption_takes_the_status_the_event_names() -> None:
    suspended = {**registered(), "status": "suspended"}
    event = DeviceResumed(device_id="d1", version=3, at=at(2), position=9, status="active")
    plan, doc = apply(event, suspended)
    assert doc["status"] == "active"
    assert plan.ops == (("srem", KEYS.status("suspended")), ("sadd", KEYS.status("active")))


def test_decommission_sets_status_and_offline() -> None:
    event = DeviceDecommissioned(device_id="d1", version=2, at=at(3), position=9, reason="eol")
    plan, doc = apply(event, registered())
    assert doc["status"] == "decommissioned"
    assert (plan.online, plan.online_at) == ("0", T0_MS + 3000)


def test_first_connection_activates_a_provisioned_device_and_sets_online() -> None:
    event = DeviceConnected(device_id="d1", version=2, at=at(4), position=9)
    plan, doc = apply(event, registered())
    assert doc["status"] == "active"
    assert (plan.online, plan.online_at) == ("1", T0_MS + 4000)


def test_connection_of_a_suspended_device_keeps_it_suspended() -> None:
    event = DeviceConnected(device_id="d1", version=3, at=at(4), position=9)
    plan, doc = apply(event, {**registered(), "status": "suspended"})
    assert doc["status"] == "suspended"
    assert plan.ops == history(KEYS.connectivity("d1"), 4, "3:1")


def test_disconnection_and_rotation_change_no_index() -> None:
    off = DeviceDisconnected(device_id="d1", version=2, at=at(5), position=9)
    plan, _ = apply(off, registered())
    assert (plan.online, plan.ops) == ("0", history(KEYS.connectivity("d1"), 5, "2:0"))
    rotated = DeviceSecretRotated(device_id="d1", version=2, at=at(5), position=9)
    plan, doc = apply(rotated, registered())
    assert (plan.online, plan.ops) == ("", ())
    assert doc["updated_at"] == "2026-01-01T00:00:05Z"


def test_event_without_registered_doc_is_refused() -> None:
    event = DeviceSuspended(device_id="d1", version=2, at=at(1), position=8, reason="x")
    with pytest.raises(MissingRegistration):
        apply(event)


def test_event_script_arguments_align_operations_with_keys() -> None:
    event = DeviceSuspended(device_id="d1", version=2, at=at(1), position=8, reason="x")
    plan, _ = apply(event, registered())
    keys, args = plan.script_args(KEYS)
    assert keys == [
        KEYS.device("d1"),
        KEYS.online,
        KEYS.history("d1"),  # the history first: an alert's `ifexists` may skip what follows
        KEYS.history_at("d1"),
        KEYS.status("provisioned"),
        KEYS.status("suspended"),
    ]
    assert args[:7] == [2, plan.doc, "", 0, "d1", KEYS.changes, b""]
    assert [str(op).split("\x1f")[0] for op in args[7:]] == ["zadds", "zadds", "srem", "sadd"]


# -- commands --------------------------------------------------------------------------------


def requested(cid: str, version: int, ttl_s: float = 60) -> DeviceCommandRequested:
    return DeviceCommandRequested(
        device_id="d1",
        version=version,
        at=at(version),
        position=version,
        command_id=cid,
        name="reboot",
        args={"delay": 1},
        expires_at=at(version + ttl_s),
    )


def run(events: list[PublishedEvent]) -> tuple[list[EventPlan], DeviceState]:
    """Plan the events one after the other from a registered device without commands."""
    state = DeviceState(registered())
    plans = []
    for event in events:
        plan, state = plan_event(KEYS, event, state)
        plans.append(plan)
    return plans, state


def test_requested_command_is_pending_with_its_details_and_counted() -> None:
    plans, state = run([requested("c1", 2)])
    assert state.commands.pending == (
        {
            "command_id": "c1",
            "name": "reboot",
            "args": {"delay": 1},
            "state": "requested",
            "requested_at": "2026-01-01T00:00:02Z",
            "sent_at": None,
            "expires_at": "2026-01-01T00:01:02Z",
        },
    )
    assert state.commands.recent == ()
    assert plans[0].ops == (("incr", KEYS.commands_pending),)
    assert msgspec.json.decode(plans[0].commands) == {
        "pending": list(state.commands.pending),
        "recent": [],
    }
    assert state.doc is not None
    assert state.doc["updated_at"] == "2026-01-01T00:00:02Z"


def test_sent_command_stays_pending_in_request_order() -> None:
    plans, state = run(
        [
            requested("c1", 2),
            requested("c2", 3),
            DeviceCommandSent(device_id="d1", version=4, at=at(4), position=4, command_id="c2"),
        ]
    )
    assert [(c["command_id"], c["state"]) for c in state.commands.pending] == [
        ("c1", "requested"),
        ("c2", "sent"),
    ]
    assert state.commands.pending[1]["sent_at"] == "2026-01-01T00:00:04Z"
    assert plans[2].ops == ()


def test_finished_commands_leave_pending_and_are_recent_newest_first() -> None:
    common: dict[str, Any] = {"device_id": "d1", "position": 0}
    plans, state = run(
        [
            requested("ok", 2),
            requested("bad", 3),
            requested("late", 4),
            requested("off", 5),
            DeviceCommandAcknowledged(
                **common, version=6, at=at(6), command_id="ok", result={"r": 1}
            ),
            DeviceCommandFailed(**common, version=7, at=at(7), command_id="bad", result={"e": "x"}),
            DeviceCommandExpired(**common, version=8, at=at(8), command_id="late"),
            DeviceCommandCancelled(**common, version=9, at=at(9), command_id="off", reason="why"),
        ]
    )
    assert state.commands.pending == ()
    assert [c["command_id"] for c in state.commands.recent] == ["off", "late", "bad", "ok"]
    off, late, bad, ok = state.commands.recent
    assert ok == {
        "command_id": "ok",
        "name": "reboot",
        "state": "acknowledged",
        "requested_at": "2026-01-01T00:00:02Z",
        "finished_at": "2026-01-01T00:00:06Z",
        "result": {"r": 1},
    }
    assert (bad["state"], bad["result"]) == ("failed", {"e": "x"})
    assert late["state"] == "expired"
    assert "result" not in late
    assert "reason" not in late
    assert (off["state"], off["reason"]) == ("cancelled", "why")
    done = KEYS.commands_done("d1")
    assert [p.ops for p in plans[4:]] == [
        (("decr", KEYS.commands_pending), *history(done, 6, "acknowledged:ok")),
        (("decr", KEYS.commands_pending), *history(done, 7, "failed:bad")),
        (("decr", KEYS.commands_pending), *history(done, 8, "expired:late")),
        (("decr", KEYS.commands_pending), *history(done, 9, "cancelled:off")),
    ]


def test_only_the_last_twenty_finished_commands_are_kept() -> None:
    events: list[PublishedEvent] = []
    version = 1
    for i in range(25):
        events.append(requested(f"c{i}", version := version + 1))
        version += 1
        events.append(
            DeviceCommandExpired(
                device_id="d1", version=version, at=at(version), position=0, command_id=f"c{i}"
            )
        )
    _, state = run(events)
    assert [c["command_id"] for c in state.commands.recent] == [f"c{i}" for i in range(24, 4, -1)]


def test_commands_round_trip_through_their_stored_form() -> None:
    _, state = run([requested("c1", 2)])
    assert Commands.decode(state.commands.encode()) == state.commands
    assert Commands.decode(None) == Commands()


def test_events_other_than_commands_leave_the_commands_unchanged() -> None:
    _, state = run([requested("c1", 2)])
    event = DeviceConfigured(
        device_id="d1", version=3, at=at(3), position=3, config={}, config_version=1
    )
    plan, after = plan_event(KEYS, event, state)
    assert plan.commands == b""
    assert after.commands == state.commands


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
    assert plan.devices["d1"].reported == (30, '{"fw":"2"}', "")
    assert plan.newest == 30


def test_command_ack_counts_as_seen_and_the_bridges_sent_report_is_ignored() -> None:
    plan = IngestPlan()
    plan.add(1, CommandAck(device_id="d1", received_at=5, command_id="c", status="ok"))
    assert plan.devices["d1"].last_seen == 5
    assert plan.devices["d1"].metrics == {}
    plan.add(2, CommandSent(device_id="d2", received_at=9, command_id="c"))
    assert "d2" not in plan.devices
    assert plan.newest == 5


def test_reported_config_version_is_split_from_the_reported_state() -> None:
    assert split_reported({"a": 1, "config_version": 3}) == ({"a": 1}, 3)
    assert split_reported({"a": 1}) == ({"a": 1}, None)
    assert split_reported({"config_version": True}) == ({}, None)  # reserved, but no integer
    assert split_reported({"config_version": "3"}) == ({}, None)


def test_reported_config_version_travels_with_the_newest_reported_state() -> None:
    plan = IngestPlan()
    plan.add(1, Reported(device_id="d1", received_at=30, state={"sp": 2, "config_version": 2}))
    plan.add(2, Reported(device_id="d1", received_at=10, state={"sp": 1, "config_version": 1}))
    assert plan.devices["d1"].reported == (30, '{"sp":2}', "2")
    plan.add(3, Reported(device_id="d1", received_at=40, state={"sp": 3}))
    assert plan.devices["d1"].reported == (40, '{"sp":3}', "")


def test_ingest_script_arguments_carry_the_batch_as_json_with_numbers_as_text() -> None:
    plan = IngestPlan()
    plan.add(1, telemetry(T0_MS, (100, {"t": 1.5})))
    plan.add(2, Status(device_id="d2", received_at=T0_MS + 1, online=True))
    plan.add(
        3, Reported(device_id="d2", received_at=T0_MS + 2, state={"fw": 1, "config_version": 4})
    )
    keys, args = plan.script_args(KEYS, now_ms=T0_MS)
    assert keys == [KEYS.online]
    assert args[:2] == [KEYS.device(""), KEYS.changes]
    minute = T0_MS // 60_000
    assert msgspec.json.decode(args[2]) == [
        [
            ["d1", "100", "", "", "", "", ["m:t", "100", '{"ts":100,"value":1.5}'], "", ""],
            [
                "d2",
                str(T0_MS + 2),
                str(T0_MS + 1),
                "1",
                str(T0_MS + 2),
                '{"fw":1}',
                [],
                "4",
                [  # the reported history: key, kept, then each state received
                    KEYS.history_reported("d2"),
                    "2000",
                    str(T0_MS + 2),
                    '{"reported":{"fw":1},"config_version":4}',
                ],
            ],
        ],
        [[KEYS.readings(minute), str((minute + 1) * 60 + 180), ["1:0"]]],
    ]


def test_readings_of_minutes_already_expired_are_left_out() -> None:
    plan = IngestPlan()
    plan.add(1, telemetry(T0_MS, (100, {"t": 1.5})))
    _, args = plan.script_args(KEYS, now_ms=T0_MS + 240_000)
    assert msgspec.json.decode(args[2])[1] == []
