"""The anomaly condition: its detector's quality on the evaluation set (fixed seeds) against the
windowed z-score baseline, determinism and exact continuation from a checkpoint, bounded state,
sensitivity, validation, and raising and clearing through the engine.

The quality bounds are floors and ceilings a regression must not cross, set below what the
detector measures on this set at the default sensitivity (recall 0.90, 0.155 false alarms per
1,000 readings, 0.25 on the series without anomalies, NAB standard score 77.7; the best
windowed z-score measures 25, with recall 0.33):

- recall (labelled windows detected) at least 0.85;
- false alarms at most 0.4 per 1,000 scored readings (at most 0.4 on the series without any
  anomaly too);
- a NAB standard-profile score at least 70, and at least 40 points above the best windowed
  z-score baseline (100 readings, z in 3 to 8), whose recall must also be lower;
- slow drifts (the machine temperature's before its failure, and the drift family's) flagged
  while they develop: at least 3 of the 5 drift windows detected inside the window, each within
  160 readings of the drift's onset (measured: 3 of 5, 88 to 153 readings; the two missed raise
  just after their window's end, before the failure).
"""

from __future__ import annotations

import math
import random
from typing import Any

import msgspec
import pytest

from analytics import anomaly
from analytics.engine import Decision, Engine, Partition
from analytics.evaluator import Clear, Raise, SeriesState, evaluate
from bench.anomaly_data import cpu, evaluation_set, machine_temp, traffic
from bench.anomaly_score import Tally, detect, scores, tally, zscore
from domain.rules import Anomaly, RuleInvalid, Threshold, validate_rule
from tests.unit.test_analytics_engine import (
    PARTS,
    Log,
    engine_holding_all,
    feed,
    kinds,
    telemetry,
)

T = 1_767_225_600_000
S = 1000


@pytest.fixture(scope="module")
def data() -> list[Any]:
    return evaluation_set()


def total(data: list[Any], detections: list[list[int]]) -> Tally:
    out = Tally()
    for series, found in zip(data, detections, strict=True):
        out.add(tally(series, found))
    return out


def test_quality_on_the_evaluation_set_beats_the_windowed_z_score(data: list[Any]) -> None:
    ours = total(data, [detect(s) for s in data])
    quiet = total(
        [s for s in data if s.family == "quiet"], [detect(s) for s in data if s.family == "quiet"]
    )
    baselines = [total(data, [zscore(s, 100, z) for s in data]) for z in (3, 4, 5, 6, 8)]
    best = max(baselines, key=lambda t: t.nab())

    assert ours.recall >= 0.85
    assert ours.false_per_1k <= 0.4
    assert quiet.false_per_1k <= 0.4
    assert ours.nab() >= 70
    assert ours.nab() >= best.nab() + 40
    assert best.recall < ours.recall


def test_a_slow_drift_is_flagged_inside_its_window_before_the_failure(data: list[Any]) -> None:
    # the machine temperature's drift (12 degrees over 500 readings, AR(0.9) noise of sd 1.4 on
    # a daily swing; its second window) and each drift shape's first window
    cases = [(s, 1) for s in data if s.family == "machine_temp"]
    cases += [(s, 0) for s in data if s.family == "drift"]
    assert len(cases) == 5
    delays = []
    for series, k in cases:
        start, end = series.windows[k]
        onset = series.onsets[k]
        inside = [i for i in detect(series) if start <= i <= end]
        if inside:
            delays.append(inside[0] - onset)
    assert len(delays) >= 3
    assert all(0 <= delay <= 160 for delay in delays)


def test_a_checkpoint_from_before_the_trend_still_decodes_and_learns_it_afresh() -> None:
    series = machine_temp(1)
    limit = anomaly.threshold(0.5)
    d = anomaly.Detector()
    for t, x in zip(series.ts[:3000], series.values[:3000], strict=True):
        anomaly.step(d, t, x, limit)
    fields = anomaly.Detector.__struct_fields__
    old = msgspec.msgpack.decode(anomaly.dump(d))[: fields.index("t_age")]  # the older layout
    restored = anomaly.load(msgspec.msgpack.encode(old))
    assert restored.t_age == 0
    assert restored.n == d.n
    assert restored.weekly == d.weekly
    assert restored.m == d.m
    later = [
        anomaly.step(restored, t, x, limit)
        for t, x in zip(series.ts[3000:], series.values[3000:], strict=True)
    ]
    assert restored.t_age == len(series) - 3000
    assert 1 in later


def test_the_same_input_gives_the_same_decisions() -> None:
    series = cpu(7)
    assert detect(series) == detect(series)
    assert scores(series) == scores(series)


def test_a_detector_restored_mid_stream_decides_exactly_as_the_uninterrupted_one() -> None:
    series = traffic(3)
    limit = anomaly.threshold(0.6)
    whole = anomaly.Detector()
    outcomes = [
        anomaly.step(whole, t, x, limit) for t, x in zip(series.ts, series.values, strict=True)
    ]
    for cut in (200, len(series) // 2, len(series) - 100):
        d = anomaly.Detector()
        for t, x in zip(series.ts[:cut], series.values[:cut], strict=True):
            anomaly.step(d, t, x, limit)
        d = anomaly.load(anomaly.dump(d))  # a checkpoint and a restart
        later = [
            anomaly.step(d, t, x, limit)
            for t, x in zip(series.ts[cut:], series.values[cut:], strict=True)
        ]
        assert later == outcomes[cut:]
    assert 1 in outcomes
    assert -1 in outcomes


def test_the_state_stays_the_same_small_size_however_long_the_series() -> None:
    series = machine_temp(5)
    d = anomaly.Detector()
    sizes = []
    for i, (t, x) in enumerate(zip(series.ts, series.values, strict=True)):
        anomaly.step(d, t, x, anomaly.threshold(0.5))
        if i in (500, 4000, len(series) - 1):
            sizes.append(len(anomaly.dump(d)))
    assert max(sizes) <= 1200
    assert max(sizes) - min(sizes) <= 64  # integers grow a byte or two, nothing else


def test_a_higher_sensitivity_flags_at_least_as_many_readings(data: list[Any]) -> None:
    # The scores do not depend on the sensitivity, only the level that raises: so the readings
    # over it, and the windows holding one, can only grow with it. Alerts raised can not be
    # compared that way at the top of the range (an alert that stays open longer can span two
    # episodes), so they are compared over 0 to 0.75, on the series with anomalies.
    levels = [0.0, 0.25, 0.5, 0.75, 1.0]
    limits = [anomaly.threshold(s) for s in levels]
    assert limits == sorted(limits, reverse=True)
    anomalous = [s for s in data if s.windows]
    for series in anomalous[:4]:
        score = scores(series)
        flagged = [sum(z > limit for z in score) for limit in limits]
        assert flagged == sorted(flagged)
        windows = [
            sum(any(z > limit for z in score[a : b + 1]) for a, b in series.windows)
            for limit in limits
        ]
        assert windows == sorted(windows)
    detected = [
        total(anomalous, [detect(s, level) for s in anomalous]).detected for level in levels[:4]
    ]
    assert detected == sorted(detected)


def test_nothing_raises_during_warm_up_however_wild_the_values() -> None:
    rng = random.Random(1)
    d = anomaly.Detector()
    limit = anomaly.threshold(1.0)
    outcomes = [
        anomaly.step(d, T + i * S, rng.choice([0.0, 1e6]) * rng.random(), limit)
        for i in range(anomaly.WARMUP)
    ]
    assert outcomes == [0] * anomaly.WARMUP


def test_a_gap_is_not_read_as_a_spike_but_a_spike_after_it_is() -> None:
    rng = random.Random(2)
    d = anomaly.Detector()
    limit = anomaly.threshold(0.5)
    t = T
    for _ in range(2000):
        t += 10 * S
        assert anomaly.step(d, t, 50 + rng.gauss(0, 1), limit) == 0
    t += 6 * 3600 * S  # six hours without a reading
    outcomes = []
    for _ in range(100):
        t += 10 * S
        outcomes.append(anomaly.step(d, t, 50.5 + rng.gauss(0, 1), limit))
    assert 1 not in outcomes
    t += 10 * S
    assert anomaly.step(d, t, 80, limit) == 1


def test_the_sensitivity_is_validated() -> None:
    def problems(condition: dict[str, Any]) -> list[tuple[str, str]]:
        rule = {"name": "n", "metric": "temperature", "severity": "info", "condition": condition}
        with pytest.raises(RuleInvalid) as caught:
            validate_rule(rule)
        return caught.value.problems

    assert problems({"kind": "anomaly", "sensitivity": 2}) == [
        ("condition.sensitivity", "must be at most 1")
    ]
    assert problems({"kind": "anomaly", "sensitivity": "x"}) == [
        ("condition.sensitivity", "must be a number")
    ]
    ok = {"name": "n", "metric": "t", "severity": "info", "condition": {"kind": "anomaly"}}
    assert validate_rule(ok).condition == Anomaly(sensitivity=0.5)


def test_the_evaluator_keeps_the_detector_in_the_series_state() -> None:
    series = cpu(8)
    readings = list(zip(series.ts, series.values, strict=True))
    condition = Anomaly(sensitivity=0.5)
    whole = evaluate(condition, SeriesState(), readings)
    state = SeriesState()
    transitions = []
    for start in range(0, len(readings), 700):  # batches, each state through a checkpoint
        result = evaluate(condition, state, readings[start : start + 700])
        transitions += result.transitions
        blob = msgspec.msgpack.encode(result.state)
        state = msgspec.msgpack.decode(blob, type=SeriesState)
    assert transitions == whole.transitions
    assert [type(t) for t in transitions][:2] == [Raise, Clear]
    assert state == whole.state
    assert state.detector is not None
    assert state.open == state.detector.open


def test_an_anomaly_rule_raises_and_clears_through_the_engine() -> None:
    log = Log()
    log.device("b1")
    rule = {
        "name": "Odd temperature",
        "metric": "temperature",
        "severity": "warning",
        "condition": {"kind": "anomaly"},
    }
    log.rule("odd", rule, stored_ms=0)
    engine = engine_holding_all(log)
    rng = random.Random(3)
    values = [20 + rng.gauss(0, 0.5) for _ in range(400)]
    values[300:310] = [35.0] * 10  # a burst of heat, then back to normal
    messages = [
        (T + i * 10 * S, telemetry("b1", T + i * 10 * S, temperature=v))
        for i, v in enumerate(values)
    ]
    out = feed(engine, messages)
    assert [k for k, _, _ in kinds(out)] == ["raised", "cleared"]
    assert out[0].at_ms == T + 300 * 10 * S
    assert out[0].value == 35.0
    assert out[1].at_ms > T + 310 * 10 * S
    assert not math.isnan(out[1].value or 0.0)


def test_a_series_whose_rule_is_no_anomaly_any_more_drops_its_detector() -> None:
    readings: list[tuple[int, float]] = [(T + i * S, 20.0 + (i % 3)) for i in range(200)]
    learned = evaluate(Anomaly(), SeriesState(), readings).state
    assert learned.detector is not None
    after = evaluate(Threshold(op=">", value=90), learned, [(T + 300 * S, 21.0)]).state
    assert after.detector is None
    assert after.point_ms == T + 300 * S


def test_an_engine_restored_from_its_checkpoints_decides_as_the_uninterrupted_one() -> None:
    log = Log()
    log.device("b1")
    rule = {"name": "Odd", "metric": "cpu", "severity": "info", "condition": {"kind": "anomaly"}}
    log.rule("odd", rule, stored_ms=0)
    series = cpu(9)
    messages = [
        (t, telemetry("b1", t, cpu=v)) for t, v in zip(series.ts, series.values, strict=True)
    ]
    whole = feed(engine_holding_all(log), messages)
    cut = len(messages) // 2
    first = engine_holding_all(log)
    before = feed(first, messages[:cut])
    blobs = {n: (p.seq, p.dump()) for n, p in first.held.items()}
    second = Engine(log.catalog, PARTS)
    for n, (seq, blob) in blobs.items():
        second.hold(Partition.load(n, seq, blob, log.catalog))
    after: list[Decision] = []
    for seq, (stored_ms, message) in enumerate(messages[cut:], start=cut + 1):
        second.evaluate(seq, stored_ms, message, after)
    assert before + after == whole
    assert len(whole) >= 4
