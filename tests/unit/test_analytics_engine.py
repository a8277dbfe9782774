"""The analytics engine: rules in effect by log time, partitions, absent ticks on the log's clock,
checkpoints that continue exactly, and alert decisions applied to the Device aggregate once."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from analytics.catalog import Catalog
from analytics.engine import Decision, Engine, Partition, partition_of
from analytics.position import position
from analytics.writer import apply
from domain.ingest import Reading, Status, Telemetry
from domain.published import (
    DeviceAlertAcknowledged,
    DeviceAlertCleared,
    DeviceAlertRaised,
    DeviceRegistered,
    RuleCreated,
    RuleDisabled,
    RuleUpdated,
)
from tests.unit.support import at, registered

PARTS = 4
T = 1_767_225_600_000  # device time and log time of the first message
S = 1000
AT = datetime(2026, 1, 1, tzinfo=UTC)
HOT = {
    "name": "Hot",
    "metric": "temperature",
    "severity": "critical",
    "condition": {"kind": "threshold", "op": ">", "value": 80, "clear": 75},
}
SILENT = {
    "name": "Silent",
    "metric": "*",
    "severity": "warning",
    "condition": {"kind": "absent", "for_s": 60},
}


class Log:
    """A catalog fed like the service feeds it, with the stream's sequence numbers."""

    def __init__(self) -> None:
        self.catalog = Catalog()
        self.seq = 0

    def event(self, event: Any, stored_ms: int) -> None:
        self.seq += 1
        self.catalog.apply(self.seq, stored_ms, event)

    def rule(self, rule_id: str, spec: dict[str, Any], stored_ms: int, version: int = 1) -> None:
        cls = RuleCreated if version == 1 else RuleUpdated
        self.event(
            cls(rule_id=rule_id, version=version, at=AT, position=self.seq + 1, spec=spec),
            stored_ms,
        )

    def device(self, device_id: str, stored_ms: int = 0, type_: str = "boiler") -> None:
        self.event(
            DeviceRegistered(
                device_id=device_id,
                version=1,
                at=AT,
                position=self.seq + 1,
                name=device_id,
                type=type_,
                labels={"site": "north"},
            ),
            stored_ms,
        )


def engine_holding_all(log: Log) -> Engine:
    engine = Engine(log.catalog, PARTS)
    for p in range(PARTS):
        engine.hold(Partition(p))
    return engine


def telemetry(device_id: str, ts: int, **values: float) -> Telemetry:
    return Telemetry(device_id=device_id, received_at=ts, readings=[Reading(ts, dict(values))])


def feed(engine: Engine, messages: list[tuple[int, Any]]) -> list[Decision]:
    out: list[Decision] = []
    for seq, (stored_ms, message) in enumerate(messages, start=1):
        engine.evaluate(seq, stored_ms, message, out)
    return out


def kinds(decisions: list[Decision]) -> list[tuple[str, str, int]]:
    return [(d.kind, d.rule_id, d.at_ms) for d in decisions]


def test_a_device_always_falls_in_the_same_partition_in_range() -> None:
    ids = [f"dev-{i}" for i in range(200)]
    first = [partition_of(d, 16) for d in ids]
    assert first == [partition_of(d, 16) for d in ids]
    assert set(first) == set(range(16))  # all used: the hash spreads


def test_threshold_with_hysteresis_raises_once_and_clears_below_clear() -> None:
    log = Log()
    log.device("b1")
    log.rule("hot", HOT, stored_ms=0)
    engine = engine_holding_all(log)
    values = [70, 85, 78, 90, 77, 74, 70]
    out = feed(
        engine,
        [(T + i * S, telemetry("b1", T + i * S, temperature=v)) for i, v in enumerate(values)],
    )
    assert kinds(out) == [
        ("raised", "hot", T + 1 * S),
        ("retriggered", "hot", T + 3 * S),
        ("cleared", "hot", T + 5 * S),
    ]
    assert out[0].value == 85
    assert out[0].severity == "critical"
    assert out[0].metric == "temperature"


def test_a_rule_only_judges_messages_stored_after_it_took_effect() -> None:
    log = Log()
    log.device("b1")
    log.rule("hot", HOT, stored_ms=T + 10 * S)
    engine = engine_holding_all(log)
    out = feed(
        engine,
        [
            (T + 5 * S, telemetry("b1", T + 5 * S, temperature=99)),  # before the rule
            (T + 11 * S, telemetry("b1", T + 11 * S, temperature=98)),
        ],
    )
    assert kinds(out) == [("raised", "hot", T + 11 * S)]


def test_an_update_applies_from_its_log_time_and_a_disabled_rule_judges_nothing() -> None:
    log = Log()
    log.device("b1")
    log.rule("hot", HOT, stored_ms=0)
    log.rule(
        "hot", {**HOT, "condition": {"kind": "threshold", "op": ">", "value": 95}}, T + 2 * S, 2
    )
    log.event(RuleDisabled(rule_id="hot", version=3, at=AT, position=9), T + 4 * S)
    engine = engine_holding_all(log)
    out = feed(
        engine,
        [
            (T, telemetry("b1", T, temperature=70)),
            (T + 3 * S, telemetry("b1", T + 3 * S, temperature=90)),  # under the new 95
            (T + 5 * S, telemetry("b1", T + 5 * S, temperature=99)),  # disabled
        ],
    )
    assert out == []


def test_scope_by_type_leaves_other_devices_alone() -> None:
    log = Log()
    log.device("b1", type_="boiler")
    log.device("f1", type_="fridge")
    log.rule("hot", {**HOT, "scope": {"type": "fridge"}}, stored_ms=0)
    engine = engine_holding_all(log)
    out = feed(
        engine,
        [(T, telemetry("b1", T, temperature=99)), (T + S, telemetry("f1", T + S, temperature=99))],
    )
    assert [d.device_id for d in out] == ["f1"]


def test_absent_raises_on_the_log_clock_before_the_next_message_and_clears_on_it() -> None:
    log = Log()
    log.device("b1")
    log.device("b2")
    log.rule("silent", SILENT, stored_ms=0)
    engine = engine_holding_all(log)
    out = feed(
        engine,
        [
            (T, telemetry("b1", T, temperature=20)),
            (T + 30 * S, Status(device_id="b1", received_at=T + 30 * S, online=True)),
            (T + 200 * S, telemetry("b2", T + 200 * S, temperature=20)),  # the log moves on
            (T + 300 * S, telemetry("b1", T + 300 * S, temperature=20)),
        ],
    )
    assert kinds(out) == [
        ("raised", "silent", T + 90 * S),  # 60 s after the status message, device time
        ("cleared", "silent", T + 300 * S),
    ]
    assert out[0].value is None


def test_tick_all_raises_absent_series_due_by_the_watermark_only() -> None:
    log = Log()
    log.device("b1")
    log.rule("silent", SILENT, stored_ms=0)
    engine = engine_holding_all(log)
    feed(engine, [(T, telemetry("b1", T, temperature=20))])
    out: list[Decision] = []
    engine.tick_all(T + 59 * S, out)
    assert out == []
    engine.tick_all(T + 61 * S, out)
    assert kinds(out) == [("raised", "silent", T + 60 * S)]
    engine.tick_all(T + 500 * S, out)
    assert len(out) == 1  # raised once


def test_messages_of_partitions_not_held_and_already_evaluated_are_skipped() -> None:
    log = Log()
    log.device("b1")
    log.rule("hot", HOT, stored_ms=0)
    engine = Engine(log.catalog, PARTS)
    mine = partition_of("b1", PARTS)
    engine.hold(Partition(mine, seq=5))
    out: list[Decision] = []
    assert not engine.evaluate(5, T, telemetry("b1", T, temperature=99), out)
    assert engine.evaluate(6, T, telemetry("b1", T, temperature=99), out)
    other = next(d for d in (f"x{i}" for i in range(100)) if partition_of(d, PARTS) != mine)
    assert not engine.evaluate(7, T, telemetry(other, T, temperature=99), out)
    assert len(out) == 1


STEP = st.tuples(st.integers(0, 3), st.integers(0, 120), st.sampled_from([60.0, 78.0, 90.0]))


@settings(max_examples=60, deadline=None)
@given(st.lists(STEP, min_size=1, max_size=60), st.integers(0, 60))
def test_a_checkpoint_restored_mid_stream_gives_the_same_decisions_as_one_run(
    steps: list[tuple[int, int, float]], cut: int
) -> None:
    log = Log()
    for d in range(4):
        log.device(f"d{d}")
    log.rule(
        "hot",
        {
            **HOT,
            "condition": {"kind": "threshold", "op": ">", "value": 80, "clear": 75, "for_s": 5},
        },
        0,
    )
    log.rule("silent", {**SILENT, "condition": {"kind": "absent", "for_s": 20}}, 0)
    messages, now = [], T
    for device, gap, value in steps:
        now += gap * S
        messages.append((now, telemetry(f"d{device}", now, temperature=value)))
    whole = feed(engine_holding_all(log), messages)

    first = engine_holding_all(log)
    out: list[Decision] = []
    cut = min(cut, len(messages))
    for seq, (stored_ms, message) in enumerate(messages[:cut], start=1):
        first.evaluate(seq, stored_ms, message, out)
    saved = [(p.number, p.seq, p.dump()) for p in first.held.values()]
    second = Engine(log.catalog, PARTS)  # a new process (or replica) from the checkpoints
    for number, seq, blob in saved:
        second.hold(Partition.load(number, seq, blob, log.catalog))
    for seq, (stored_ms, message) in enumerate(messages, start=1):  # re-read from the start
        second.evaluate(seq, stored_ms, message, out)
    assert kinds(out) == kinds(whole)


def test_the_catalog_tracks_open_alerts_and_survives_a_snapshot() -> None:
    log = Log()
    log.device("b1")
    log.rule("hot", HOT, stored_ms=0)
    aid = f"b1.hot.{T}"
    raised = DeviceAlertRaised(
        device_id="b1", version=2, at=AT, position=3, alert_id=aid, rule_id="hot",
        severity="critical", metric="temperature", value=91.0, at_ms=T,
    )  # fmt: skip
    log.event(raised, T)
    log.event(
        DeviceAlertAcknowledged(
            device_id="b1", version=3, at=AT, position=4, alert_id=aid, by="token:ab", note="on it"
        ),
        T + S,
    )
    restored = Catalog.restore(log.catalog.snapshot())
    assert restored.alerts[aid].status == "acknowledged"
    assert restored.devices["b1"].labels == {"site": "north"}
    assert restored.rule_at("hot", T) is not None
    assert restored.rule_name("hot") == "Hot"
    assert restored.events_seq == log.seq
    cleared = DeviceAlertCleared(
        device_id="b1", version=4, at=AT, position=5, alert_id=aid, value=70.0, at_ms=T + 9 * S
    )
    change = restored.apply(log.seq + 1, T + 9 * S, cleared)
    assert change is not None
    assert change.state.status == "cleared"
    assert change.state.acknowledged
    assert aid not in restored.alerts
    assert restored.apply(log.seq + 1, T + 9 * S, cleared) is None  # the same sequence again


def decision(kind: str, at_ms: int, value: float | None = 91.0) -> Decision:
    return Decision(kind, "hot", "sensor-001", "critical", "temperature", value, at_ms, at_ms)  # type: ignore[arg-type]


def test_decisions_applied_twice_record_each_transition_once() -> None:
    device = registered()
    sequence = [
        decision("raised", T),
        decision("retriggered", T + S),
        decision("cleared", T + 2 * S),
    ]
    assert [apply(device, d, at(1)) for d in sequence] == [True, True, True]
    device.collect_events()
    assert [apply(device, d, at(2)) for d in sequence] == [False, False, False]
    assert device.collect_events() == []


@pytest.mark.parametrize(
    ("reply", "expected"),
    [
        ("$JS.ACK.INGEST.c1.1.42.40.1767225600123456789.0", (42, 1767225600123)),
        ("$JS.ACK.hub.acc.INGEST.c1.1.42.40.1767225600123456789.0.tok", (42, 1767225600123)),
    ],
)
def test_the_sequence_and_stored_time_come_from_the_reply_subject(
    reply: str, expected: tuple[int, int]
) -> None:
    class Msg:
        pass

    msg: Any = Msg()
    msg.reply = reply
    assert position(msg) == expected
