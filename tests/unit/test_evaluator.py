"""The evaluation engine: when each condition raises, retriggers and clears, in device time."""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from analytics.evaluator import (
    Clear,
    Evaluation,
    Raise,
    Retrigger,
    SeriesState,
    Transition,
    evaluate,
    tick,
)
from domain.alerts import AlertState, clear, raise_alert, retrigger
from domain.ingest import Value
from domain.rules import Absent, Condition, Rate, Threshold

S = 1000  # one second of device time in ms
T = 1_767_225_600_000  # device time of the first reading
FRESH = SeriesState()
HOT = Threshold(op=">", value=80.0, clear=75.0)


def run(
    condition: Condition, values: Sequence[tuple[float, Value]], state: SeriesState = FRESH
) -> Evaluation:
    """Evaluate one batch of readings given as (seconds after T, value)."""
    return evaluate(condition, state, [(T + round(s * S), v) for s, v in values])


def transitions(condition: Condition, values: Sequence[tuple[float, Value]]) -> list[Transition]:
    return run(condition, values).transitions


# -- threshold ----------------------------------------------------------------------------------


def test_threshold_raises_at_the_first_breaching_reading() -> None:
    assert transitions(HOT, [(0, 70), (1, 80), (2, 85), (3, 90)]) == [Raise(T + 2 * S, 85.0)]


def test_threshold_clears_at_the_first_reading_past_the_clear_level() -> None:
    found = transitions(HOT, [(0, 85), (1, 78), (2, 76), (3, 75), (4, 70)])

    assert found == [Raise(T, 85.0), Clear(T + 3 * S, 75.0)]


def test_threshold_without_clear_level_clears_at_the_first_reading_not_breaching() -> None:
    found = transitions(Threshold(op=">", value=80.0), [(0, 85), (1, 80.5), (2, 80)])

    assert found == [Raise(T, 85.0), Clear(T + 2 * S, 80.0)]


@pytest.mark.parametrize(
    ("condition", "values", "expected"),
    [
        (Threshold(op=">=", value=80.0), [(0, 79), (1, 80), (2, 79.9)], ["raise@1", "clear@2"]),
        (
            Threshold(op="<", value=10.0, clear=12.0),
            [(0, 10), (1, 9), (2, 11), (3, 12)],
            ["raise@1", "clear@3"],
        ),
        (Threshold(op="<=", value=10.0), [(0, 10), (1, 10.5)], ["raise@0", "clear@1"]),
        (Threshold(op=">", value=0.0), [(0, -1), (1, 0), (2, 1)], ["raise@2"]),
    ],
)
def test_each_comparison_raises_and_clears_on_its_own_side(
    condition: Threshold, values: list[tuple[float, Value]], expected: list[str]
) -> None:
    shown = [
        f"{type(t).__name__.lower()}@{(t.at_ms - T) // S}" for t in transitions(condition, values)
    ]

    assert shown == expected


def test_values_oscillating_between_clear_and_value_raise_one_alert_that_retriggers() -> None:
    values: list[tuple[float, Value]] = [(0, 85), (1, 78), (2, 86), (3, 79), (4, 90), (5, 70)]

    found = transitions(HOT, values)

    assert found == [
        Raise(T, 85.0),
        Retrigger(T + 2 * S, 86.0),
        Retrigger(T + 4 * S, 90.0),
        Clear(T + 5 * S, 70.0),
    ]
    alert = apply(found)
    assert alert is not None
    assert alert.retriggers == 2


def test_readings_that_stay_breached_do_not_retrigger() -> None:
    assert transitions(HOT, [(0, 85), (1, 90), (2, 95)]) == [Raise(T, 85.0)]


def test_a_new_breach_after_a_clear_raises_again() -> None:
    found = transitions(HOT, [(0, 85), (1, 70), (2, 81)])

    assert found == [Raise(T, 85.0), Clear(T + S, 70.0), Raise(T + 2 * S, 81.0)]


def test_threshold_with_for_s_raises_once_the_breach_has_held_that_long() -> None:
    held = Threshold(op=">", value=80.0, for_s=30)

    found = transitions(held, [(0, 85), (10, 86), (29.999, 87), (30, 88), (40, 89)])

    assert found == [Raise(T + 30 * S, 88.0)]


def test_threshold_for_s_interrupted_by_a_normal_reading_raises_nothing() -> None:
    held = Threshold(op=">", value=80.0, for_s=30)

    assert transitions(held, [(0, 85), (20, 70), (25, 85), (50, 90)]) == []
    assert transitions(held, [(0, 85), (20, 70), (25, 85), (55, 90)]) == [Raise(T + 55 * S, 90.0)]


def test_a_pending_breach_carries_over_to_the_next_batch() -> None:
    held = Threshold(op=">", value=80.0, for_s=30)
    first = run(held, [(0, 85)])

    assert first.transitions == []
    assert first.state.pending_since_ms == T
    assert run(held, [(30, 90)], first.state).transitions == [Raise(T + 30 * S, 90.0)]


def test_booleans_count_as_one_and_zero() -> None:
    on = Threshold(op=">=", value=1.0)

    assert transitions(on, [(0, False), (1, True), (2, False)]) == [
        Raise(T + S, 1.0),
        Clear(T + 2 * S, 0.0),
    ]


def test_string_values_are_ignored_by_threshold_neither_evaluated_nor_late() -> None:
    result = run(HOT, [(0, "hot"), (1, 85), (1, "again"), (2, "cold")])

    assert result.transitions == [Raise(T + S, 85.0)]
    assert result.late == 0
    assert result.state.point_ms == T + S


# -- order and late readings --------------------------------------------------------------------


def test_a_batch_is_evaluated_in_device_time_order() -> None:
    found = transitions(HOT, [(2, 70), (0, 85), (1, 90)])

    assert found == [Raise(T, 85.0), Clear(T + 2 * S, 70.0)]


def test_readings_at_or_before_the_evaluation_point_are_late_and_skipped() -> None:
    first = run(HOT, [(10, 85)])

    second = run(HOT, [(5, 60), (10, 60), (11, 90)], first.state)

    assert second.late == 2
    assert second.transitions == []
    assert second.state.point_ms == T + 11 * S
    assert second.state.open is True


def test_of_readings_at_the_same_time_the_first_wins() -> None:
    result = run(HOT, [(0, 85), (0, 60), (1, 90)])

    assert result.transitions == [Raise(T, 85.0)]
    assert result.late == 1


def test_an_empty_batch_changes_nothing() -> None:
    state = run(HOT, [(0, 85)]).state

    assert evaluate(HOT, state, []) == Evaluation(state, [], 0)


# -- rate ---------------------------------------------------------------------------------------

FAST = Rate(max_per_s=1.0)


def test_rate_raises_at_the_first_pair_changing_faster_than_the_limit() -> None:
    found = transitions(FAST, [(0, 10), (1, 10.5), (2, 11.5), (3, 14)])

    assert found == [Raise(T + 3 * S, 2.5)]


def test_rate_reports_the_signed_rate_and_compares_its_absolute_value() -> None:
    assert transitions(FAST, [(0, 10), (2, 4)]) == [Raise(T + 2 * S, -3.0)]


def test_rate_clears_at_the_first_pair_back_within_the_limit() -> None:
    found = transitions(FAST, [(0, 0), (1, 5), (2, 10), (3, 11), (4, 20)])

    assert found == [Raise(T + S, 5.0), Clear(T + 3 * S, 1.0), Raise(T + 4 * S, 9.0)]


def test_rate_is_per_second_of_device_time_between_consecutive_readings() -> None:
    assert transitions(FAST, [(0, 0), (10, 9), (10.5, 9.4)]) == []
    assert transitions(FAST, [(0, 0), (0.25, 0.5)]) == [Raise(T + 250, 2.0)]


def test_a_single_reading_has_no_rate() -> None:
    result = run(FAST, [(0, 1000)])

    assert result.transitions == []
    assert result.state.value == 1000.0
    assert result.state.value_ms == T


def test_rate_keeps_the_first_of_readings_at_the_same_time() -> None:
    result = run(FAST, [(0, 0), (1, 0.5), (1, 50), (2, 1)])

    assert result.transitions == []
    assert result.late == 1


def test_rate_with_for_s_needs_the_breach_to_hold() -> None:
    held = Rate(max_per_s=1.0, for_s=2)

    assert transitions(held, [(0, 0), (1, 5), (2, 10), (3, 15)]) == [Raise(T + 3 * S, 5.0)]
    assert transitions(held, [(0, 0), (1, 5), (2, 5.5), (3, 10), (4, 15)]) == []


def test_rate_ignores_strings_and_counts_booleans() -> None:
    found = transitions(FAST, [(0, False), (0.25, "noise"), (0.5, True), (1.5, True)])

    assert found == [Raise(T + 500, 2.0), Clear(T + 1500, 0.0)]
    assert transitions(Rate(max_per_s=0.5), [(0, False), (1, "x"), (2, True)]) == []


def test_a_rate_alert_goes_through_the_alert_lifecycle() -> None:
    alert = apply(transitions(FAST, [(0, 0), (1, 5), (2, 10), (3, 10)]))

    assert alert is not None
    assert alert.status == "cleared"
    assert alert.raised_value == 5.0
    assert alert.cleared_value == 0.0


# -- absent -------------------------------------------------------------------------------------

SILENT = Absent(for_s=60)


def test_a_series_never_seen_raises_nothing_without_a_start_time() -> None:
    assert tick(SILENT, FRESH, T + 3600 * S) == (FRESH, [])


def test_a_device_silent_from_its_start_time_raises_after_for_s() -> None:
    state, found = tick(SILENT, FRESH, T + 59 * S, start_ms=T)
    assert found == []
    assert state.last_seen_ms == T

    _, found = tick(SILENT, state, T + 60 * S)
    assert found == [Raise(T + 60 * S, None)]


def test_absent_raises_for_s_after_the_last_reading_whenever_the_tick_comes() -> None:
    state = run(SILENT, [(0, 1), (10, "text counts as seen")]).state

    assert tick(SILENT, state, T + 69 * S)[1] == []
    later, found = tick(SILENT, state, T + 500 * S)

    assert found == [Raise(T + 70 * S, None)]
    assert later.open is True
    assert tick(SILENT, later, T + 900 * S) == (later, [])


def test_absent_clears_at_the_next_reading() -> None:
    state, _ = tick(SILENT, run(SILENT, [(0, 1)]).state, T + 100 * S)

    result = run(SILENT, [(120, 2), (130, 3)], state)

    assert result.transitions == [Clear(T + 120 * S, None)]
    assert result.state.open is False
    assert result.state.last_seen_ms == T + 130 * S


def test_a_reading_from_before_the_absent_raise_clears_it_at_the_raise_time() -> None:
    state, _ = tick(SILENT, run(SILENT, [(0, 1)]).state, T + 100 * S)

    assert run(SILENT, [(30, 1)], state).transitions == [Clear(T + 60 * S, None)]


def test_an_absent_alert_goes_through_the_alert_lifecycle() -> None:
    state, raised = tick(SILENT, run(SILENT, [(0, 1)]).state, T + 100 * S)
    found = raised + run(SILENT, [(120, 2)], state).transitions

    alert = apply(found)

    assert alert is not None
    assert alert.raised_at_ms == T + 60 * S
    assert alert.cleared_at_ms == T + 120 * S


def test_threshold_and_rate_never_tick() -> None:
    state = run(HOT, [(0, 1)]).state

    assert tick(HOT, state, T + 10**9) == (state, [])
    assert tick(FAST, state, T + 10**9, start_ms=T) == (state, [])


# -- state --------------------------------------------------------------------------------------


def test_series_state_round_trips_through_json_and_starts_empty() -> None:
    state = run(Threshold(op=">", value=80.0, for_s=9), [(0, 70), (1, 85)]).state

    assert msgspec.json.decode(msgspec.json.encode(state), type=SeriesState) == state
    assert msgspec.json.encode(FRESH) == b"{}"


# -- batching independence (properties) ---------------------------------------------------------

numbers = st.integers(min_value=-5, max_value=105)
values = st.one_of(
    numbers,
    numbers,
    numbers,
    st.floats(min_value=-5, max_value=105, allow_nan=False),
    st.booleans(),
    st.just("text"),
)
thresholds = st.builds(
    lambda op, value, gap, for_s, has_clear: Threshold(
        op=op,
        value=value,
        clear=(value - gap if op in (">", ">=") else value + gap) if has_clear else None,
        for_s=for_s,
    ),
    st.sampled_from([">", ">=", "<", "<="]),
    st.integers(min_value=0, max_value=100).map(float),
    st.integers(min_value=0, max_value=30).map(float),
    st.sampled_from([0.0, 0.5, 1.0, 3.0, 10.0]),
    st.booleans(),
)
rates = st.builds(
    Rate,
    max_per_s=st.sampled_from([0.5, 1.0, 10.0, 50.0]),
    for_s=st.sampled_from([0.0, 0.5, 2.0, 10.0]),
)


def log_of(gaps: list[int], vals: list[Value]) -> list[tuple[int, Value]]:
    """Readings in device-time order, `gaps` ms apart."""
    ts = T
    log: list[tuple[int, Value]] = []
    for gap, value in zip(gaps, vals, strict=False):
        ts += gap
        log.append((ts, value))
    return log


def in_batches(
    condition: Condition, batches: list[list[tuple[int, Value]]]
) -> tuple[SeriesState, list[Transition]]:
    """Evaluate batch after batch, through a JSON checkpoint between them."""
    state = FRESH
    found: list[Transition] = []
    for batch in batches:
        result = evaluate(condition, state, batch)
        state = msgspec.json.decode(msgspec.json.encode(result.state), type=SeriesState)
        found += result.transitions
    return state, found


def split(
    data: st.DataObject, log: list[tuple[int, Value]], shuffle: bool
) -> list[list[tuple[int, Value]]]:
    cuts = sorted(data.draw(st.sets(st.integers(0, len(log)), max_size=len(log) + 1)))
    bounds = [0, *cuts, len(log)]
    batches = [log[a:b] for a, b in itertools.pairwise(bounds)]
    if shuffle:
        batches = [data.draw(st.permutations(batch)) for batch in batches]
    return batches


def check_batching_independence(
    condition: Condition, log: list[tuple[int, Value]], data: st.DataObject, shuffle: bool
) -> None:
    whole = in_batches(condition, [log])
    one_by_one = in_batches(condition, [[reading] for reading in log])
    batched = in_batches(condition, split(data, log, shuffle))

    assert batched == whole
    assert one_by_one == whole
    apply(whole[1])  # always a lifecycle the alert accepts


@given(
    condition=thresholds,
    gaps=st.lists(st.integers(min_value=1, max_value=4000), min_size=10, max_size=40),
    vals=st.lists(values, min_size=40, max_size=40),
    data=st.data(),
)
def test_threshold_alerts_do_not_depend_on_the_batching(
    condition: Threshold, gaps: list[int], vals: list[Value], data: st.DataObject
) -> None:
    check_batching_independence(condition, log_of(gaps, vals), data, shuffle=True)


@given(
    condition=rates,
    gaps=st.lists(st.integers(min_value=1, max_value=4000), min_size=10, max_size=40),
    vals=st.lists(values, min_size=40, max_size=40),
    data=st.data(),
)
def test_rate_alerts_do_not_depend_on_the_batching(
    condition: Rate, gaps: list[int], vals: list[Value], data: st.DataObject
) -> None:
    check_batching_independence(condition, log_of(gaps, vals), data, shuffle=True)


@given(
    condition=st.one_of(thresholds, rates),
    gaps=st.lists(st.integers(min_value=0, max_value=3), min_size=10, max_size=40),
    vals=st.lists(values, min_size=40, max_size=40),
    data=st.data(),
)
def test_readings_at_equal_times_give_the_same_alerts_whatever_the_batching(
    condition: Condition, gaps: list[int], vals: list[Value], data: st.DataObject
) -> None:
    check_batching_independence(condition, log_of(gaps, vals), data, shuffle=False)


@given(
    condition=st.one_of(thresholds, rates),
    readings=st.lists(
        st.tuples(st.integers(min_value=T, max_value=T + 60 * S), values), max_size=40
    ),
    data=st.data(),
)
def test_an_unordered_log_gives_a_valid_lifecycle_and_a_point_that_only_moves_forward(
    condition: Condition, readings: list[tuple[int, Value]], data: st.DataObject
) -> None:
    state = FRESH
    found: list[Transition] = []
    for batch in split(data, readings, shuffle=False):
        before = state.point_ms
        result = evaluate(condition, state, batch)
        state = result.state
        found += result.transitions
        assert before is None or (state.point_ms is not None and state.point_ms >= before)
    times = [t.at_ms for t in found]
    assert times == sorted(times)
    apply(found)


# -- helpers ------------------------------------------------------------------------------------


def apply(found: list[Transition]) -> AlertState | None:
    """Feed transitions to the alert lifecycle (one alert at a time); return the last alert."""
    alert: AlertState | None = None
    for t in found:
        match t:
            case Raise(at_ms, value):
                assert alert is None or alert.cleared
                alert = raise_alert("r1", "sensor-001", "warning", "m", value, at_ms)
            case Retrigger(at_ms, value):
                assert alert is not None
                alert = retrigger(alert, value, at_ms)
            case Clear(at_ms, value):
                assert alert is not None
                alert = clear(alert, value, at_ms)
    return alert
