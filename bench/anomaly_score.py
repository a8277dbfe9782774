"""Scoring streaming detectors on labelled series, as the streaming anomaly-detection literature
does, and the detectors compared: the `anomaly` condition's and a windowed z-score baseline.

A detection is an alert raised (one per episode: an alert open does not raise again until it has
cleared), at a reading index. Readings of a series' probationary period (its first 15 %) are not
scored. Figures:

- precision: detections inside a labelled window over all detections;
- recall: windows with at least one detection over all windows;
- false alarms per 1,000 readings: detections outside every window, per 1,000 scored readings;
- delay: from the labelled onset to the window's first detection, in readings (median over the
  windows detected; negative if it came before the onset, inside the window) and as a fraction
  of the window's width from its start;
- NAB score, standard profile (A_TP 1, A_FP 0.11, A_FN 1): the first detection in a window earns
  sigma(y) = 2 / (1 + e^(5y)) - 1 with y = -(end - i + 1) / width (about 0.99 at the window's
  start, 0 at its end); later ones in it earn nothing; a miss costs 1; a detection outside every
  window costs 0.11 * sigma(y), y its distance after the preceding window's end in widths (up to
  3, after which, or with no window before it, the full 0.11); the sum is normalised to 0 for
  the null detector (no detection at all) and 100 for the perfect one (each window detected at
  its first reading, nothing else). The "reward low FP" profile (A_FP 0.22) is given too.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field

from analytics import anomaly
from bench.anomaly_data import Series

PROBATION = 0.15
PROFILES = {"standard": (1.0, 0.11, 1.0), "low_fp": (1.0, 0.22, 1.0)}


def detect(series: Series, sensitivity: float = anomaly.DEFAULT_SENSITIVITY) -> list[int]:
    """The reading indices at which the anomaly detector raises."""
    d = anomaly.Detector()
    limit = anomaly.threshold(sensitivity)
    out = []
    for i, (t, x) in enumerate(zip(series.ts, series.values, strict=True)):
        if anomaly.step(d, t, x, limit) == 1:
            out.append(i)
    return out


def scores(series: Series) -> list[float]:
    """The detector's score of each reading (independent of the sensitivity)."""
    d = anomaly.Detector()
    out = []
    for t, x in zip(series.ts, series.values, strict=True):
        anomaly.step(d, t, x, math.inf)
        out.append(d.score)
    return out


def zscore(series: Series, window: int = 100, limit: float = 4.0) -> list[int]:
    """The windowed z-score baseline: |x - mean| / std over the previous `window` readings,
    with the same raise and clear rule as the detector (clears after 30 readings below half)."""
    recent: deque[float] = deque(maxlen=window)
    total = square = 0.0
    out = []
    open_ = False
    calm = 0
    for i, x in enumerate(series.values):
        if len(recent) == window:
            mean = total / window
            sd = math.sqrt(max(0.0, square / window - mean * mean))
            z = abs(x - mean) / sd if sd > 0 else (0.0 if x == mean else math.inf)
            if not open_ and z > limit:
                open_, calm = True, 0
                out.append(i)
            elif open_:
                calm = calm + 1 if z < anomaly.CLEAR_FRACTION * limit else 0
                if calm >= anomaly.CLEAR_READINGS:
                    open_ = False
            old = recent[0]
            total -= old
            square -= old * old
        recent.append(x)
        total += x
        square += x * x
    return out


def _sigma(y: float) -> float:
    return 2.0 / (1.0 + math.exp(5.0 * y)) - 1.0


@dataclass
class Tally:
    windows: int = 0
    detected: int = 0
    detections: int = 0
    inside: int = 0
    false: int = 0
    readings: int = 0
    delays: list[float] = field(default_factory=list)
    fractions: list[float] = field(default_factory=list)
    raw: dict[str, float] = field(default_factory=lambda: dict.fromkeys(PROFILES, 0.0))
    perfect: dict[str, float] = field(default_factory=lambda: dict.fromkeys(PROFILES, 0.0))

    def add(self, other: Tally) -> None:
        for name in ("windows", "detected", "detections", "inside", "false", "readings"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.delays += other.delays
        self.fractions += other.fractions
        for p in PROFILES:
            self.raw[p] += other.raw[p]
            self.perfect[p] += other.perfect[p]

    @property
    def precision(self) -> float:
        return self.inside / self.detections if self.detections else math.nan

    @property
    def recall(self) -> float:
        return self.detected / self.windows if self.windows else math.nan

    @property
    def false_per_1k(self) -> float:
        return 1000.0 * self.false / self.readings if self.readings else math.nan

    def nab(self, profile: str = "standard") -> float:
        null = -PROFILES[profile][2] * self.windows
        best = self.perfect[profile]
        if best == null:  # no window (series without anomalies): only false alarms count
            return math.nan
        return 100.0 * (self.raw[profile] - null) / (best - null)


def tally(series: Series, detections: list[int]) -> Tally:
    n = len(series)
    start = int(PROBATION * n)
    out = Tally(windows=len(series.windows), readings=n - start)
    scored = [i for i in detections if i >= start]
    out.detections = len(scored)
    first: dict[int, int] = {}
    for i in scored:
        w = next((k for k, (a, b) in enumerate(series.windows) if a <= i <= b), None)
        if w is not None:
            out.inside += 1
            first.setdefault(w, i)
            continue
        out.false += 1
        before = [b - a + 1 for a, b in series.windows if b < i]
        ends = [b for a, b in series.windows if b < i]
        for p, (_, a_fp, _) in PROFILES.items():
            if before:
                y = (i - ends[-1]) / before[-1]
                out.raw[p] += a_fp * (-1.0 if y > 3.0 else _sigma(y))
            else:
                out.raw[p] -= a_fp
    for k, (a, b) in enumerate(series.windows):
        width = b - a + 1
        for p, (a_tp, _, a_fn) in PROFILES.items():
            out.perfect[p] += a_tp * _sigma(-1.0)
            if k in first:
                out.raw[p] += a_tp * _sigma(-(b - first[k] + 1) / width)
            else:
                out.raw[p] -= a_fn
        if k in first:
            out.detected += 1
            out.delays.append(first[k] - series.onsets[k])
            out.fractions.append((first[k] - a) / width)
    return out


def median(values: list[float]) -> float:
    if not values:
        return math.nan
    s = sorted(values)
    mid = len(s) // 2
    return s[mid] if len(s) % 2 else (s[mid - 1] + s[mid]) / 2
