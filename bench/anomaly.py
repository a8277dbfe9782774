"""`python -m bench anomaly`: the `anomaly` condition's detector on the evaluation set
(bench/anomaly_data.py) against a windowed z-score baseline, scored as the streaming
anomaly-detection literature does (bench/anomaly_score.py), and what it costs.

Per family and overall, for the detector (at `--anomaly-sensitivity`) and the baseline (a
z-score over the previous 100 readings, at the threshold among 3, 4, 5, 6 and 8 with the best
overall NAB score on this set, so the baseline is given its best chance): precision, recall,
false alarms per 1,000 readings, median detection delay (readings after the labelled onset, and
as a fraction of the window's width), NAB standard-profile score. The quality figures are
deterministic (fixed seeds): every run gives the same. Each run also times the detector over the
whole set (µs per reading, pure Python, one core) and the evaluator's `evaluate` over it in
batches of 50 readings (what the service runs: a copy of the state per reading), and measures
the largest state of a series serialised (msgpack, the whole `SeriesState`) at its end.
"""

from __future__ import annotations

import argparse
import math
import time

import msgspec

from analytics import anomaly
from analytics.evaluator import SeriesState, evaluate
from bench.anomaly_data import FAMILIES, Series, evaluation_set
from bench.anomaly_score import Tally, detect, median, tally, zscore
from bench.registry import register
from bench.report import Report
from domain.rules import Anomaly

BASELINE_WINDOW = 100
BASELINE_LIMITS = (3.0, 4.0, 5.0, 6.0, 8.0)


def configure(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("anomaly")
    g.add_argument(
        "--anomaly-sensitivity",
        type=float,
        default=anomaly.DEFAULT_SENSITIVITY,
        help=f"the detector's sensitivity ({anomaly.DEFAULT_SENSITIVITY})",
    )


def _tallies(data: list[Series], detections: list[list[int]]) -> dict[str, Tally]:
    out = {family: Tally() for family in (*FAMILIES, "all")}
    for series, found in zip(data, detections, strict=True):
        t = tally(series, found)
        out[series.family].add(t)
        out["all"].add(t)
    return out


def _quality(report: Report, run: int, who: str, tallies: dict[str, Tally]) -> None:
    for family, t in tallies.items():
        report.section = f"{who}: {family}"
        report.add(run, f"{who} {family} precision", "", t.precision, 2)
        report.add(run, f"{who} {family} recall", "", t.recall, 2)
        report.add(run, f"{who} {family} false alarms", "/1k", t.false_per_1k, 3)
        report.add(run, f"{who} {family} delay", "readings", median(t.delays), 0)
        report.add(run, f"{who} {family} delay, of window", "", median(t.fractions), 2)
        report.add(run, f"{who} {family} NAB standard", "", t.nab(), 1)


def _cost(data: list[Series], sensitivity: float) -> tuple[float, float, list[int]]:
    limit = anomaly.threshold(sensitivity)
    readings = sum(len(s) for s in data)
    sizes: list[int] = []
    started = time.perf_counter()
    for s in data:
        d = anomaly.Detector()
        for t, x in zip(s.ts, s.values, strict=True):
            anomaly.step(d, t, x, limit)
        sizes.append(len(anomaly.dump(d)))
    step_us = (time.perf_counter() - started) / readings * 1e6
    condition = Anomaly(sensitivity=sensitivity)
    started = time.perf_counter()
    for s in data:
        state = SeriesState()
        pairs = list(zip(s.ts, s.values, strict=True))
        for i in range(0, len(pairs), 50):
            state = evaluate(condition, state, pairs[i : i + 50]).state
        sizes.append(len(msgspec.msgpack.encode(state)))  # the whole series state, too
    evaluate_us = (time.perf_counter() - started) / readings * 1e6
    return step_us, evaluate_us, sizes


@register(
    "anomaly",
    "anomaly detector vs windowed z-score on labelled series (NAB score), and its cost",
    configure,
)
def run(args: argparse.Namespace) -> Report:
    sensitivity = float(args.anomaly_sensitivity)
    data = evaluation_set()
    report = Report(f"anomaly: detector (sensitivity {sensitivity:g}) vs windowed z-score")
    ours = _tallies(data, [detect(s, sensitivity) for s in data])
    baselines = {
        z: _tallies(data, [zscore(s, BASELINE_WINDOW, z) for s in data]) for z in BASELINE_LIMITS
    }
    best = max(baselines, key=lambda z: baselines[z]["all"].nab())
    for run_number in range(max(1, args.repeats)):
        _quality(report, run_number, "detector", ours)
        _quality(report, run_number, "z-score", baselines[best])
        step_us, evaluate_us, sizes = _cost(data, sensitivity)
        report.section = "cost"
        report.add(run_number, "detector per reading", "µs", step_us, 1)
        report.add(run_number, "evaluate per reading (batches of 50)", "µs", evaluate_us, 1)
        report.add(run_number, "state per series (SeriesState), largest", "bytes", max(sizes), 0)
    readings = sum(len(s) for s in data)
    windows = ours["all"].windows
    report.note(
        f"{len(data)} series, {readings} readings, {windows} labelled windows; "
        f"baseline: z-score over {BASELINE_WINDOW} readings at its best threshold, z > {best:g}"
    )
    others = ", ".join(
        f"z > {z:g}: {baselines[z]['all'].nab():.1f}" for z in BASELINE_LIMITS if z != best
    )
    report.note(f"baseline's NAB standard score at its other thresholds: {others}")
    if math.isnan(ours["quiet"].nab()):
        report.note("quiet: series without anomalies; only false alarms count (no NAB score)")
    return report
