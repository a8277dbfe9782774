"""The pure evaluation engine: a rule's condition applied to one device's readings of its metric.

Per (rule, device) the caller keeps a `SeriesState` (small, fixed size, msgspec-serialisable for
durable checkpoints) and feeds each batch of readings, `(device ts ms, value)`, to `evaluate`,
which returns the new state, the alert transitions (`Raise`, `Retrigger`, `Clear`) and how many
readings were late.

The evaluation point (`point_ms`) only moves forward in device time. A batch is evaluated in
device-time order (stable for equal times); a reading at or before the evaluation point is
late: it is not evaluated, only counted (the time-series projection still stores it). A reading
with the same time as one already evaluated is therefore skipped too: the first one wins. So the
same log gives the same alerts whatever the batching: readings in device-time order give the
same transitions however they are split into consecutive batches and however each batch is
ordered (for distinct times); a log out of order gives the same transitions as long as each
message is one batch, in log order.

Booleans count as 1 and 0; threshold, rate and anomaly ignore string values entirely (they are
neither evaluated nor late). For `anomaly`, the series' detector (`analytics.anomaly.Detector`,
fixed size) lives in the state, so it is checkpointed with it. For `absent`, any reading counts
as seen (the caller feeds every message of the device when the rule's metric is "*"); `tick`
raises once the series has been silent for `for_s` against the caller's clock. Every time here
is epoch milliseconds.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Sequence
from typing import NamedTuple

import msgspec

from analytics import anomaly
from domain.ingest import Value
from domain.rules import Absent, Anomaly, Condition, Rate, Threshold

_OPS: dict[str, Callable[[float, float], bool]] = {
    ">": operator.gt,
    ">=": operator.ge,
    "<": operator.lt,
    "<=": operator.le,
}


class SeriesState(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """Where the evaluation of one (rule, device) series stands."""

    point_ms: int | None = None  # the last evaluated device time
    value_ms: int | None = None  # the time of `value`, the last numeric value (for rate)
    value: float | None = None
    pending_since_ms: int | None = None  # a breach under way, not held for `for_s` yet
    open: bool = False  # an alert is open
    breached: bool = False  # the last evaluated reading (or pair, for rate) breached
    last_seen_ms: int | None = None  # the latest reading (for absent)
    detector: anomaly.Detector | None = None  # the learned normal (for anomaly)


class Raise(msgspec.Struct, frozen=True):
    at_ms: int
    value: float | None  # the reading's value (threshold, anomaly), the rate per second for rate,
    # None for absent


class Retrigger(msgspec.Struct, frozen=True):
    at_ms: int
    value: float | None


class Clear(msgspec.Struct, frozen=True):
    at_ms: int
    value: float | None  # the reading's value, the rate per second for rate, None for absent


Transition = Raise | Retrigger | Clear


class Evaluation(NamedTuple):
    state: SeriesState
    transitions: list[Transition]
    late: int  # readings at or before the evaluation point, skipped


def for_ms(for_s: float) -> int:
    """A duration in whole milliseconds (rounded up, so a raise never comes early)."""
    return math.ceil(for_s * 1000)


def numeric(value: Value) -> float | None:
    """The number a threshold or rate compares: booleans as 1 and 0; None for a string."""
    if isinstance(value, str):
        return None
    return float(value)


def evaluate(
    condition: Condition, state: SeriesState, readings: Sequence[tuple[int, Value]]
) -> Evaluation:
    """Evaluate a batch of readings of the series in device-time order, after `state`."""
    transitions: list[Transition] = []
    late = 0
    if state.detector is not None and not isinstance(condition, Anomaly):
        state = msgspec.structs.replace(state, detector=None)  # the rule is no anomaly any more
    for ts, raw in sorted(readings, key=lambda reading: reading[0]):
        number = numeric(raw)
        if number is None and not isinstance(condition, Absent):
            continue  # threshold and rate ignore strings
        if state.point_ms is not None and ts <= state.point_ms:
            late += 1
        elif isinstance(condition, Absent):
            state = _seen(condition, state, ts, transitions)
        elif number is None:
            continue
        elif isinstance(condition, Threshold):
            state = _threshold(condition, state, ts, number, transitions)
        elif isinstance(condition, Anomaly):
            state = _anomaly(condition, state, ts, number, transitions)
        else:
            state = _rate(condition, state, ts, number, transitions)
    return Evaluation(state, transitions, late)


def tick(
    condition: Condition, state: SeriesState, now_ms: int, start_ms: int | None = None
) -> tuple[SeriesState, list[Transition]]:
    """Raise an absent alert once the series has been silent for `for_s` at `now_ms`."""
    # `start_ms` counts as the first sighting of a series never seen (a device known but silent
    # from the start); without it, a never-seen series raises nothing. Other kinds never tick.
    if not isinstance(condition, Absent):
        return state, []
    last_seen_ms = state.last_seen_ms if state.last_seen_ms is not None else start_ms
    if last_seen_ms is None:
        return state, []
    state = msgspec.structs.replace(state, last_seen_ms=last_seen_ms)
    due_ms = last_seen_ms + for_ms(condition.for_s)
    if state.open or now_ms < due_ms:
        return state, []
    return msgspec.structs.replace(state, open=True, breached=True), [Raise(due_ms, None)]


def _breach(
    for_s: float,
    state: SeriesState,
    ts: int,
    breached: bool,
    value: float,
    transitions: list[Transition],
) -> SeriesState:
    """A closed series: start, hold or reset the pending breach; raise once held for `for_s`."""
    if not breached:
        return msgspec.structs.replace(state, pending_since_ms=None, breached=False)
    since = ts if state.pending_since_ms is None else state.pending_since_ms
    if ts - since >= for_ms(for_s):
        transitions.append(Raise(ts, value))
        return msgspec.structs.replace(state, pending_since_ms=None, open=True, breached=True)
    return msgspec.structs.replace(state, pending_since_ms=since, breached=True)


def _threshold(
    condition: Threshold,
    state: SeriesState,
    ts: int,
    value: float,
    transitions: list[Transition],
) -> SeriesState:
    compare = _OPS[condition.op]
    breached = compare(value, condition.value)
    state = msgspec.structs.replace(state, point_ms=ts)
    if not state.open:
        return _breach(condition.for_s, state, ts, breached, value, transitions)
    if not compare(value, condition.clear_level):
        transitions.append(Clear(ts, value))
        return msgspec.structs.replace(state, open=False, breached=False, pending_since_ms=None)
    if breached and not state.breached:
        transitions.append(Retrigger(ts, value))
    return msgspec.structs.replace(state, breached=breached)


def _rate(
    condition: Rate,
    state: SeriesState,
    ts: int,
    value: float,
    transitions: list[Transition],
) -> SeriesState:
    previous_ms, previous = state.value_ms, state.value
    state = msgspec.structs.replace(state, point_ms=ts, value_ms=ts, value=value)
    if previous_ms is None or previous is None or ts <= previous_ms:
        return state
    rate = (value - previous) / ((ts - previous_ms) / 1000)
    breached = abs(rate) > condition.max_per_s
    if not state.open:
        return _breach(condition.for_s, state, ts, breached, rate, transitions)
    if not breached:
        transitions.append(Clear(ts, rate))
        return msgspec.structs.replace(state, open=False, breached=False, pending_since_ms=None)
    return msgspec.structs.replace(state, breached=True)


def _anomaly(
    condition: Anomaly,
    state: SeriesState,
    ts: int,
    value: float,
    transitions: list[Transition],
) -> SeriesState:
    """Learn the reading; raise, re-trigger or clear as the detector concludes."""
    if not math.isfinite(value):
        return msgspec.structs.replace(state, point_ms=ts)
    if state.detector is None:
        detector = anomaly.Detector(open=state.open)
    else:
        detector = anomaly.copy(state.detector)
    limit = anomaly.threshold(condition.sensitivity)
    outcome = anomaly.step(detector, ts, value, limit)
    breached = detector.score > limit
    if outcome > 0:
        transitions.append(Raise(ts, value))
    elif outcome < 0:
        transitions.append(Clear(ts, value))
    elif detector.open and breached and not state.breached:
        transitions.append(Retrigger(ts, value))
    return msgspec.structs.replace(
        state, point_ms=ts, detector=detector, open=detector.open, breached=breached
    )


def _seen(
    condition: Absent, state: SeriesState, ts: int, transitions: list[Transition]
) -> SeriesState:
    """Any reading: the series is seen; an open absent alert clears (never before it was raised)."""
    if state.open:
        assert state.last_seen_ms is not None
        raised_ms = state.last_seen_ms + for_ms(condition.for_s)
        transitions.append(Clear(max(ts, raised_ms), None))
    last_seen = ts if state.last_seen_ms is None else max(ts, state.last_seen_ms)
    return msgspec.structs.replace(
        state, point_ms=ts, last_seen_ms=last_seen, open=False, breached=False
    )
