"""An evaluation set for the `anomaly` detector: real-shaped series on fixed seeds, each with its
labelled anomaly windows in the Numenta Anomaly Benchmark's manner.

Families (each a few series on their own seeds):

- `machine_temp`: a machine's temperature every 5 min, AR(1) noise on a mild daily swing; a slow
  drift that ends in a failure (the reading falls), and a short overheating;
- `cpu`: a server's CPU utilisation every 5 min; level shifts (a misconfiguration), a variance
  that triples, a value stuck flat;
- `latency`: request latencies sampled irregularly every 5 to 60 s, lognormal (heavy-tailed)
  noise; bursts of slow requests and a level rise;
- `traffic`: counts every 5 min with daily and weekly seasonality (Poisson noise, quiet
  weekends); a weekday that keeps the night's level (a broken rhythm), a dip, a surge;
- `artificial`: the shapes of NAB's artificial corpus, a daily bump with small noise of which
  one day jumps up, jumps down, stays flat in the middle, or has no bump (broken rhythms);
- `drift`: slow drifts of other shapes (a developing fault): a bearing's vibration every minute
  rising over 900 readings before a failure, a coolant temperature every 10 min that drifts up
  and recovers by itself (labelled: an operator wants to know), and a slight drift over 1,500
  readings of a quiet sensor every 30 s;
- `quiet`: one series of each shape with no anomaly at all (false alarms only), with gaps and
  irregular sampling; and small integer counts (sparse, skewed) and a sensor reported at a
  0.1 resolution (long runs of one value), which punish a detector that takes quantisation
  steps for spikes; a noiseless square wave; and a daily cycle whose amplitude and level change
  slowly, as seasons do (no anomaly either).

Several series have gaps (hours without a reading) and jittered intervals. Each anomaly is
labelled at its onset; its window, as NAB builds them, is centred on the onset and 10 % of the
series' length divided by the number of anomalies wide. A series' first 15 % is NAB's
probationary period: not scored.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field

T0 = 1_767_225_600_000  # 2026-01-01T00:00Z, a Thursday
MIN = 60_000


@dataclass
class Series:
    name: str
    family: str
    ts: list[int]
    values: list[float]
    onsets: list[int] = field(default_factory=list)  # reading indices of each labelled onset
    windows: list[tuple[int, int]] = field(default_factory=list)  # inclusive reading indices

    def __len__(self) -> int:
        return len(self.ts)


def _windows(n: int, onsets: list[int]) -> list[tuple[int, int]]:
    if not onsets:
        return []
    width = max(2, int(0.10 * n / len(onsets)))
    out = []
    for onset in sorted(onsets):
        start = max(0, onset - width // 2)
        out.append((start, min(n - 1, start + width - 1)))
    return out


def _times(
    rng: random.Random, n: int, every_s: float, jitter: float, gaps: list[tuple[int, float]]
) -> list[int]:
    """`n` device times about `every_s` apart (± `jitter` of it); after reading i of a gap
    (i, hours), nothing for that many hours."""
    at = {i: h for i, h in gaps}
    ts = []
    t = float(T0)
    for i in range(n):
        ts.append(int(t))
        step = every_s * (1.0 + jitter * (2.0 * rng.random() - 1.0))
        t += max(1.0, step) * 1000.0 + at.get(i, 0.0) * 3_600_000.0
    return ts


def _finish(
    name: str, family: str, ts: list[int], values: list[float], onsets: list[int]
) -> Series:
    return Series(name, family, ts, values, onsets, _windows(len(ts), onsets))


def machine_temp(seed: int, *, anomalies: bool = True) -> Series:
    rng = random.Random(seed)
    n = 9000
    ts = _times(rng, n, 300, 0.05, [(2500, 6.0)] if seed % 2 else [])
    values = []
    ar = 0.0
    drift_start, failure = int(n * 0.62), int(n * 0.62) + 500
    hot = int(n * 0.35)
    for i, t in enumerate(ts):
        ar = 0.9 * ar + rng.gauss(0, 0.6)
        day = 2.0 * math.sin(2 * math.pi * ((t - T0) % 86_400_000) / 86_400_000)
        v = 85.0 + day + ar
        if anomalies:
            if drift_start <= i < failure:
                v += 12.0 * (i - drift_start) / (failure - drift_start)
            elif failure <= i < failure + 120:
                v = 30.0 + rng.gauss(0, 2.0)  # the machine is down
            if hot <= i < hot + 15:
                v += 9.0
        values.append(v)
    onsets = [hot, drift_start, failure] if anomalies else []
    return _finish(
        f"machine_temp_{seed}", "quiet" if not anomalies else "machine_temp", ts, values, onsets
    )


def cpu(seed: int, *, anomalies: bool = True) -> Series:
    rng = random.Random(seed)
    n = 5000
    ts = _times(rng, n, 300, 0.1, [(1800, 3.0)] if seed % 2 == 0 else [])
    base = 22.0 + 6.0 * rng.random()
    shift, noisy, flat = int(n * 0.3), int(n * 0.55), int(n * 0.8)
    values = []
    for i in range(n):
        level, sd = base, 2.0
        if anomalies:
            if shift <= i < shift + 400:
                level = base + 25.0  # a misconfigured service keeps the CPU busy
            if noisy <= i < noisy + 300:
                sd = 6.0
        v = level + rng.gauss(0, sd) + (8.0 if rng.random() < 0.01 else 0.0)
        if anomalies and flat <= i < flat + 200:
            v = 0.0  # the agent reports a stuck 0
        values.append(min(100.0, max(0.0, v)))
    onsets = [shift, noisy, flat] if anomalies else []
    return _finish(f"cpu_{seed}", "quiet" if not anomalies else "cpu", ts, values, onsets)


def latency(seed: int, *, anomalies: bool = True) -> Series:
    rng = random.Random(seed)
    n = 8000
    ts = _times(rng, n, 20, 0.9, [(3000, 2.0)])
    burst, rise = int(n * 0.4), int(n * 0.72)
    values = []
    for i in range(n):
        mu = math.log(120.0)
        if anomalies and rise <= i < rise + 600:
            mu += math.log(1.8) * min(1.0, (i - rise) / 100)
        v = math.exp(rng.gauss(mu, 0.35))
        if anomalies and burst <= i < burst + 12:
            v *= 8.0
        values.append(v)
    onsets = [burst, rise] if anomalies else []
    return _finish(f"latency_{seed}", "quiet" if not anomalies else "latency", ts, values, onsets)


def traffic(seed: int, *, anomalies: bool = True) -> Series:
    rng = random.Random(seed)
    n = 5 * 7 * 288  # five weeks every 5 min
    ts = _times(rng, n, 300, 0.02, [(4000, 4.0)] if seed % 2 else [])
    peak = 400.0 + 100.0 * rng.random()
    broken_day = 4 * 7 * 288 + 4 * 288  # week 5, a Monday
    dip, surge = int(n * 0.6) + 150, int(n * 0.45)  # the dip at about noon
    values = []
    for i, t in enumerate(ts):
        day = ((t - T0) // 86_400_000 + 3) % 7  # 0 = Monday
        hour = ((t - T0) % 86_400_000) / 3_600_000
        shape = 0.15 + 0.85 * max(0.0, math.sin(math.pi * (hour - 6) / 16)) ** 2
        if day >= 5:
            shape *= 0.45
        if anomalies and broken_day <= i < broken_day + 288:
            shape = 0.15  # the day never starts: the rhythm is broken
        lam = peak * shape
        if anomalies and dip <= i < dip + 24:
            lam *= 0.3
        if anomalies and surge <= i < surge + 6:
            lam *= 2.5
        values.append(max(0.0, lam + rng.gauss(0, math.sqrt(lam))))
    onsets = [surge, dip, broken_day + 96] if anomalies else []  # the rhythm breaks at 8:00
    return _finish(f"traffic_{seed}", "quiet" if not anomalies else "traffic", ts, values, onsets)


def counts(seed: int) -> Series:
    """Quiet: small integer counts every minute (Poisson, a daily swing of 1 to 5), and hours
    with none at night: quantised, sparse and skewed, with no anomaly."""
    rng = random.Random(seed)
    n = 6000
    ts = _times(rng, n, 60, 0.2, [(3000, 3.0)])
    values = []
    for t in ts:
        hour = ((t - T0) % 86_400_000) / 3_600_000
        lam = 0.2 + 4.8 * max(0.0, math.sin(math.pi * (hour - 6) / 16)) ** 2
        k, p, u = 0, math.exp(-lam), rng.random()
        while u > p:  # Poisson by inversion
            u -= p
            k += 1
            p *= lam / k
        values.append(float(k))
    return _finish(f"counts_{seed}", "quiet", ts, values, [])


def sensor(seed: int) -> Series:
    """Quiet: a room temperature at a 0.1 resolution every 30 s, a slow swing: long runs of the
    same value and single steps, with no anomaly."""
    rng = random.Random(seed)
    n = 6000
    ts = _times(rng, n, 30, 0.3, [])
    values = []
    slow = 0.0
    for t in ts:
        slow = 0.999 * slow + rng.gauss(0, 0.01)
        day = 0.6 * math.sin(2 * math.pi * ((t - T0) % 86_400_000) / 86_400_000)
        values.append(round(21.0 + day + slow + rng.gauss(0, 0.03), 1))
    return _finish(f"sensor_{seed}", "quiet", ts, values, [])


def artificial(kind: str, seed: int) -> Series:
    """NAB's artificial shapes: two weeks every 5 min of a daily bump (20 at night, 80 at noon)
    with small noise; one day (the 10th) breaks it: `jumpsup` (its peak at 110), `jumpsdown`
    (50), `flatmiddle` (flat at 50 all day), `nojump` (no bump). Labelled at 6:00 of that day,
    when its bump should start. `square` (a noiseless square wave, 20 and 80) has no anomaly."""
    rng = random.Random(seed)
    n = 14 * 288
    ts = _times(rng, n, 300, 0.0, [])
    day0 = 10 * 288  # midnight starting the 11th day (T0 is a midnight, the sampling exact)
    values = []
    for i, t in enumerate(ts):
        hour = ((t - T0) % 86_400_000) / 3_600_000
        bump = math.sin(math.pi * (hour - 6) / 12) ** 0.5 if 6 <= hour <= 18 else 0.0
        odd = day0 <= i < day0 + 288
        if kind == "square":
            values.append(80.0 if 8 <= hour < 20 else 20.0)
            continue
        peak = 60.0
        if odd and kind == "jumpsup":
            peak = 90.0
        elif odd and kind == "jumpsdown":
            peak = 30.0
        elif odd and kind == "nojump":
            peak = 0.0
        v = 20.0 + peak * bump
        if odd and kind == "flatmiddle":
            v = 50.0
        values.append(v + rng.gauss(0, 2.0))
    onsets = [] if kind == "square" else [day0 + 72]
    family = "quiet" if kind == "square" else "artificial"
    return _finish(f"art_{kind}_{seed}", family, ts, values, onsets)


def drift(kind: str, seed: int) -> Series:
    """A slow drift, three shapes (see the module docstring): `fail` (AR(0.7) noise of sd 1, a
    rise of 6 over 900 readings, then the machine stops: readings near 0 for 100), `recover`
    (a mild daily swing, AR(0.8) noise, up 5 over 300 readings, 200 readings there, back over
    300) and `slight` (white noise of sd 0.2, up 1.2 over 1,500 readings, and it stays)."""
    rng = random.Random(seed)
    every = {"fail": 60, "recover": 600, "slight": 30}[kind]
    n = {"fail": 7000, "recover": 5000, "slight": 8000}[kind]
    ts = _times(rng, n, every, 0.1, [(n // 3, 2.0)] if kind == "slight" else [])
    start = int(n * 0.6)
    values = []
    ar = 0.0
    for i, t in enumerate(ts):
        k = i - start
        if kind == "fail":
            ar = 0.7 * ar + rng.gauss(0, 0.71)
            v = 40.0 + ar + (6.0 * min(1.0, k / 900) if k >= 0 else 0.0)
            if 900 <= k < 1000:
                v = 0.5 + rng.gauss(0, 0.2)
        elif kind == "recover":
            ar = 0.8 * ar + rng.gauss(0, 0.5)
            day = 1.5 * math.sin(2 * math.pi * ((t - T0) % 86_400_000) / 86_400_000)
            up = 0.0
            if 0 <= k < 300:
                up = 5.0 * k / 300
            elif 300 <= k < 500:
                up = 5.0
            elif 500 <= k < 800:
                up = 5.0 * (800 - k) / 300
            v = 60.0 + day + ar + up
        else:
            v = 12.0 + rng.gauss(0, 0.2) + (1.2 * min(1.0, k / 1500) if k >= 0 else 0.0)
        values.append(v)
    onsets = [start, start + 900] if kind == "fail" else [start]
    return _finish(f"drift_{kind}_{seed}", "drift", ts, values, onsets)


def seasons(seed: int) -> Series:
    """Quiet: a daily cycle every 5 min over six weeks whose amplitude grows from 4 to 7 and
    whose level wanders by 3 over three weeks (seasons changing), AR(0.8) noise of sd 1."""
    rng = random.Random(seed)
    n = 6 * 7 * 288
    ts = _times(rng, n, 300, 0.05, [])
    values = []
    ar = 0.0
    for i, t in enumerate(ts):
        ar = 0.8 * ar + rng.gauss(0, 0.6)
        amplitude = 4.0 + 3.0 * i / n
        day = amplitude * math.sin(2 * math.pi * ((t - T0) % 86_400_000) / 86_400_000)
        level = 15.0 + 1.5 * math.sin(2 * math.pi * i / (6 * 7 * 288))
        values.append(level + day + ar)
    return _finish(f"seasons_{seed}", "quiet", ts, values, [])


FAMILIES = ("machine_temp", "cpu", "latency", "traffic", "artificial", "drift", "quiet")


def evaluation_set(seeds: tuple[int, ...] = (1, 2)) -> list[Series]:
    """Every family on each seed, plus one series of each artificial and drift shape, one quiet
    series of each shape, counts and a quantised sensor per seed, and changing seasons."""
    out: list[Series] = []
    for seed in seeds:
        out += [machine_temp(seed), cpu(seed), latency(seed), traffic(seed)]
    for seed, kind in enumerate(("jumpsup", "jumpsdown", "flatmiddle", "nojump"), start=seeds[0]):
        out.append(artificial(kind, 400 + seed))
    for seed, kind in enumerate(("fail", "recover", "slight"), start=seeds[0]):
        out.append(drift(kind, 600 + seed))
    for seed in seeds:
        out += [
            machine_temp(100 + seed, anomalies=False),
            cpu(100 + seed, anomalies=False),
            latency(100 + seed, anomalies=False),
            traffic(100 + seed, anomalies=False),
            counts(200 + seed),
            sensor(300 + seed),
        ]
    out.append(artificial("square", 500))
    out.append(seasons(700))
    return out
