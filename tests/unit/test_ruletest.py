"""The rule test's evaluation (a draft over messages, raising nothing) and its request checks."""

from __future__ import annotations

from typing import Any

import pytest

from analytics.catalog import DeviceInfo
from analytics.http import period
from analytics.ruletest import MAX_ALERTS, Simulation, parse_since
from domain.ingest import Reading, Telemetry, encode_ingest
from domain.rules import validate_rule
from infra.httpkit import Problem

T = 1_767_225_600_000
S = 1000
HOT = {
    "name": "Hot",
    "metric": "temperature",
    "severity": "critical",
    "scope": {"type": "boiler"},
    "condition": {"kind": "threshold", "op": ">", "value": 80, "clear": 75},
}
DEVICES = {
    "b1": DeviceInfo("boiler", {}, 0),
    "b2": DeviceInfo("boiler", {}, 0),
    "f1": DeviceInfo("fridge", {}, 0),
}


def telemetry(device_id: str, ts: int, value: float) -> bytes:
    return encode_ingest(
        Telemetry(
            device_id=device_id, received_at=ts, readings=[Reading(ts, {"temperature": value})]
        )
    )


def simulate(spec: dict[str, Any], rows: list[tuple[str, int, float]]) -> Simulation:
    sim = Simulation(validate_rule(spec), DEVICES)
    for seq, (device_id, ts, value) in enumerate(rows, start=1):
        sim.feed(seq, ts, telemetry(device_id, ts, value))
    return sim


def test_a_draft_raises_retriggers_and_clears_for_the_devices_in_its_scope() -> None:
    sim = simulate(
        HOT,
        [
            ("b1", T, 70),
            ("b1", T + S, 85),  # raised
            ("f1", T + S, 99),  # out of scope
            ("b1", T + 2 * S, 78),  # under value, above clear: still open
            ("b1", T + 3 * S, 90),  # re-trigger
            ("b1", T + 4 * S, 70),  # cleared
            ("b2", T + 5 * S, 81),  # raised, open at the end
        ],
    )
    result = sim.result({}, T, T + 10 * S, truncated=False, read_to=None, elapsed_s=0.0)
    assert (result.raised, result.retriggered, result.cleared, result.open_at_end) == (2, 1, 1, 1)
    first, second = result.alerts
    assert (first.device_id, first.raised_at, first.value) == ("b1", T + S, 85)
    assert (first.retriggers, first.last_value) == (1, 90)
    assert (first.cleared_at, first.cleared_value) == (T + 4 * S, 70)
    assert (second.device_id, second.cleared_at) == ("b2", None)
    assert result.messages == 7
    assert result.evaluations == 6  # the fridge's reading is not the rule's
    assert result.devices == 2


def test_an_absent_draft_raises_at_the_end_of_the_period_when_due_by_then() -> None:
    silent = {**HOT, "condition": {"kind": "absent", "for_s": 60}}
    sim = simulate(silent, [("b1", T, 70), ("b2", T + 50 * S, 70)])
    sim.finish(T + 100 * S)
    result = sim.result({}, T, T + 100 * S, truncated=False, read_to=None, elapsed_s=0.0)
    assert [(a.device_id, a.raised_at) for a in result.alerts] == [("b1", T + 60 * S)]


def test_undecodable_messages_are_counted_and_skipped() -> None:
    sim = Simulation(validate_rule(HOT), DEVICES)
    sim.feed(1, T, b"not msgpack")
    sim.feed(2, T, telemetry("b1", T, 85))
    assert sim.messages == 2
    assert sim.counts["raised"] == 1


def test_the_alerts_listed_are_capped_and_the_counts_stay_exact() -> None:
    devices = {f"d{i}": DeviceInfo("boiler", {}, 0) for i in range(MAX_ALERTS + 5)}
    sim = Simulation(validate_rule(HOT), devices)
    for seq, device_id in enumerate(devices, start=1):
        sim.feed(seq, T, telemetry(device_id, T, 90))
    result = sim.result({}, T, T + S, truncated=False, read_to=None, elapsed_s=0.0)
    assert result.raised == MAX_ALERTS + 5
    assert len(result.alerts) == MAX_ALERTS
    assert result.alerts_truncated


def test_the_period_defaults_to_the_last_24_hours_and_checks_its_bounds() -> None:
    now = T + 100 * 86_400_000
    assert period({}, now) == (now - 86_400_000, now)
    assert period({"since": "90m"}, now) == (now - 90 * 60_000, now)
    assert period({"from": "2026-01-01T00:00:00Z", "to": T + S}, now) == (T, T + S)
    for body, field in (
        ({"since": "forever"}, "since"),
        ({"since": "32d"}, "since"),
        ({"from": T + S, "to": T}, "from"),
        ({"from": "2026-01-01T00:00:00"}, "from"),  # no offset
        ({"from": T, "since": "1h"}, "since"),
        ({"to": True}, "to"),
    ):
        with pytest.raises(Problem) as caught:
            period(body, now)
        assert caught.value.status == 422
        assert caught.value.extra["errors"][0]["field"] == field, body


def test_since_parses_units_and_refuses_the_rest() -> None:
    assert parse_since("30s") == 30_000
    assert parse_since("7d") == 7 * 86_400_000
    assert parse_since("2w") == 14 * 86_400_000
    for text in ("", "0h", "1y", "1.5h", "-1h", "5w"):
        with pytest.raises(ValueError):
            parse_since(text)
