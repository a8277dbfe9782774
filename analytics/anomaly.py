"""The `anomaly` condition's detector: learns one series' own normal online and flags departures.

No threshold is given: each reading is scored against what the series itself has shown so far,
by five features of the deseasonalised value `y` (the reading less the series' daily or weekly
profile, once one explains the series better than none; a reading after one that scored over
`SEASON_GATE` teaches the profiles nothing, so an anomaly is not echoed a period later):

- spike: the innovation, `y` less a fast level (EWMA), over the innovations' robust scale
  (spikes, dips, outliers);
- shift: a short EWMA of `y` against a long one (level shifts, a broken daily rhythm);
- drift: the short EWMA against a much longer reference (slow drifts);
- variance: log of the short-term over the long-term mean squared innovation (changed variance,
  a sensor stuck on one value);
- trend: a medium-term EWMA of `y` (about 50 readings) against a long baseline (about 1,000)
  that stops learning while the trend is suspected (over `SUSPECT` of its scale), while the
  scale learns slowly from the trend winsorised to `SUSPECT` scales: a slow drift cannot teach
  itself as normal, so it is flagged while it develops
  (a developing fault), well before the failure it may end in. After `HOLD` readings in a row
  suspected the new level is accepted (the baseline jumps to it). The medium-term level is
  smooth (about one independent value per few dozen readings), so its departure is worth more
  than a single reading's: it is scaled by `TREND_GAIN`. It learns for `TREND_WARMUP` readings
  before it scores, and again after the seasonal model changes.

The spike's innovation is scored against the innovations' running 99th percentile (a
multiplicative stochastic quantile estimate, so a quantised, sparse or heavy-tailed series
learns its usual jumps) as 2.576 times a Gaussian's; shift, drift and variance are divided by
their own running root mean square (learned from values clipped to three of it, so a slow drift
cannot teach itself as normal), the trend by its own (winsorised to two of it, see above).
Either way a series that is naturally noisy, wandering or heavy-tailed needs a larger departure
than a quiet one, and the score is in the units of a Gaussian's standard deviation. The
reading's score is the largest of the five; an alert raises when it exceeds the threshold that
`sensitivity` maps to, and clears once the score has stayed under max(half of it, 3) for
`CLEAR_READINGS` readings in a row.

Learning is robust and does not depend on the alert: each update uses the reading clipped to a
few scales of the current estimate, so a spike barely moves the estimates, a level shift is
absorbed over a few hundred readings (then the alert clears: the new level is the new normal),
and the score sequence is the same whatever the sensitivity (so a higher sensitivity flags a
superset of readings). Nothing raises during warm-up (`WARMUP` readings, and again after the
seasonal model changes). A gap (an interval over `GAP_FACTOR` times the usual one) re-seeds the
short-term estimates from the long-term ones instead of reading the jump as a spike.

The state is a msgspec struct of fixed size (about 1 KB serialised, the weekly profile's 168
float32 bins being most of it), updated in pure Python floats: deterministic, checkpointed with
the series, about fifteen microseconds a reading. Fields added later (the trend's) come last,
with defaults, so a checkpoint written before them still decodes (its trend starts learning).
"""

from __future__ import annotations

import math
import struct

import msgspec

WARMUP = 150  # readings learned before anything can raise
CLEAR_READINGS = 30  # readings in a row below the clear level before an open alert clears
CLEAR_FRACTION = 0.5  # the clear level, as a fraction of the raise threshold
CLEAR_FLOOR = 3.0  # ... but never under this (a normal reading's score is mostly 1 to 2.5)
GAP_FACTOR = 20.0  # an interval over this many usual intervals is a gap
MIN_GAP_MS = 60_000  # ... and over this
HOUR_MS = 3_600_000
DAY_MS = 24 * HOUR_MS
WEEK_MS = 7 * DAY_MS
DAILY_BINS = 24
WEEKLY_BINS = 168
# EWMA weights per reading
A_LEVEL = 0.3  # the fast level the innovation is measured from
A_SHORT = 0.1
A_LONG = 0.005
A_REF = 0.0005
A_SCALE = 0.01  # the innovations' mean absolute value
A_VSHORT = 0.05
A_VLONG = 0.005
A_ERR = 0.002  # the seasonal models' squared errors
CLIP = 4.0  # updates see the reading clipped to this many scales
# each feature's mean square (its scale), learned from the feature clipped to GROSS scales
# (the spike's entry is unused: the spike is scaled by the innovations' percentile below)
A_FEATURE = (0.0, 0.002, 0.001, 0.002)
GROSS = 3.0
FLOOR = (0.0, 1.0, 1.0, 0.01)  # least scale of each feature (shift, drift: times `tiny`)
# the innovations' scale is at least their running 99th percentile (a multiplicative stochastic
# quantile estimate) over 2.576 (a Gaussian's): intermittent large innovations (a quantised,
# sparse or bursty series) are learned as normal instead of being clipped as outliers forever
Q_P = 0.01
Q_STEP = 0.1
Q_GROSS = 10.0  # an innovation over this many times the percentile does not move it
GAUSS_Q99 = 2.576
SEASON_MEMORY = 0.3  # how far a profile bin moves per visit of its period (about 3 periods)
SEASON_GAIN = 0.85  # a profile must explain at least 15 % more than the simpler model
SEASON_GATE = 6.0  # a reading scoring over this does not teach the profiles
# the trend: a medium-term level against a long baseline frozen while a drift is suspected
A_MID = 0.02  # the medium-term level's weight (about 50 readings)
A_BASE = 0.001  # the baseline's, while nothing is suspected (about 1,000 readings)
A_TREND = 0.001  # the trend's mean square (from the trend winsorised to SUSPECT scales)
TREND_WARMUP = 1000  # readings the trend learns before it scores
SUSPECT = 2.0  # a trend over this many scales freezes the baseline, and its scale learns no more
HOLD = 300  # ... for at most this many readings in a row, then the new level is accepted
TREND_GAIN = 1.5  # a smooth statistic: fewer independent values than readings, so a lower z
TREND_FLOOR = 0.5  # least scale of the trend, as a fraction of the drift feature's
SPIKE, SHIFT, DRIFT, VAR, TREND = range(5)
FEATURES = ("spike", "shift", "drift", "variance", "trend")
# sensitivity 0 .. 1 -> threshold on the score
THRESHOLD_AT_0 = 10.5
THRESHOLD_AT_1 = 2.625
DEFAULT_SENSITIVITY = 0.5


def threshold(sensitivity: float) -> float:
    """The score that raises: geometric from 10.5 (sensitivity 0) through 5.25 (0.5) to 2.6."""
    s = min(1.0, max(0.0, sensitivity))
    return THRESHOLD_AT_0 * float((THRESHOLD_AT_1 / THRESHOLD_AT_0) ** s)


class Detector(msgspec.Struct, array_like=True, kw_only=True):
    """The learned normal of one series, and whether its alert is open."""

    n: int = 0  # readings seen
    age: int = 0  # readings since the last (re)start of learning
    first_ms: int = 0
    last_ms: int = 0
    dt: float = 0.0  # the usual interval between readings (ms)
    level: float = 0.0
    short: float = 0.0
    long: float = 0.0
    ref: float = 0.0
    scale: float = 0.0  # mean absolute innovation
    v_short: float = 0.0
    v_long: float = 0.0
    m: list[float] = msgspec.field(default_factory=lambda: [0.0] * 4)  # features' mean square
    q_abs: float = 0.0  # the innovations' 99th percentile of absolute value
    model: int = 0  # 0 none, 1 daily, 2 weekly profile
    err: list[float] = msgspec.field(default_factory=lambda: [0.0] * 3)
    daily: bytes = bytes(4 * DAILY_BINS)  # the profiles' bins, float32 little-endian: half
    weekly: bytes = bytes(4 * WEEKLY_BINS)  # the size of float64, and immutable (no copy)
    open: bool = False
    calm: int = 0  # readings in a row below the clear level while open
    score: float = 0.0  # the last reading's score
    feature: int = 0  # which feature gave it
    # the trend (fields added later: a checkpoint without them starts learning it afresh)
    t_age: int = 0  # readings the trend has learned (0: not started)
    mid: float = 0.0  # the medium-term level
    base: float = 0.0  # the long baseline, frozen while a drift is suspected
    m_trend: float = 0.0  # the trend's mean square (winsorised to SUSPECT scales)
    held: int = 0  # readings in a row the baseline has been frozen


def copy(d: Detector) -> Detector:
    return msgspec.structs.replace(d, m=list(d.m), err=list(d.err))


_BIN = struct.Struct("<f")
_encode = msgspec.msgpack.Encoder().encode
_decode = msgspec.msgpack.Decoder(Detector).decode


def dump(d: Detector) -> bytes:
    return _encode(d)


def load(blob: bytes) -> Detector:
    return _decode(blob)


def _profile(bins: bytes, ts: int, period: int) -> tuple[float, int, int, float]:
    """The profile's value at `ts` (linear between bin centres), the two bins and the weight."""
    n = len(bins) // 4
    p = (ts % period) * n / period - 0.5
    base = math.floor(p)
    frac = p - base
    i0 = base % n
    i1 = (i0 + 1) % n
    (b0,) = _BIN.unpack_from(bins, 4 * i0)
    (b1,) = _BIN.unpack_from(bins, 4 * i1)
    return b0 * (1.0 - frac) + b1 * frac, i0, i1, frac


def _learn(bins: bytes, i0: int, i1: int, frac: float, step: float) -> bytes:
    """The bins with `step` shared between bins i0 and i1 (weights 1 - frac and frac)."""
    out = bytearray(bins)
    (b0,) = _BIN.unpack_from(out, 4 * i0)
    _BIN.pack_into(out, 4 * i0, b0 + step * (1.0 - frac))
    (b1,) = _BIN.unpack_from(out, 4 * i1)
    _BIN.pack_into(out, 4 * i1, b1 + step * frac)
    return bytes(out)


def _clip(x: float, centre: float, width: float) -> float:
    if width <= 0.0:
        return x
    return min(centre + width, max(centre - width, x))


def _trend(d: Detector, yc: float, tiny: float) -> float:
    """Learn the medium-term level from `yc` (the clipped reading); its departure from the
    baseline (before this reading) over its usual size, times TREND_GAIN, or 0 while the trend
    is still learning.

    The baseline stops learning while the departure is over SUSPECT scales, and the scale then
    learns SUSPECT scales instead (winsorised: leaving those readings out would bias it low), so
    a slow drift does not teach itself as normal; after HOLD readings in a row of that the new
    level is accepted (the baseline jumps to it), as a level shift is by the other features.
    """
    if d.t_age == 0:  # a new series, or a checkpoint from before the trend
        d.mid = d.base = yc
        d.m_trend = 0.0
        d.held = 0
    d.t_age += 1
    settling = d.t_age <= TREND_WARMUP
    dev = abs(d.mid - d.base)
    rms = max(math.sqrt(d.m_trend), TREND_FLOOR * math.sqrt(d.m[DRIFT]), tiny)
    z = 0.0 if settling else dev / rms
    d.mid += max(A_MID, 1.0 / d.t_age) * (yc - d.mid)
    if settling:
        d.base += max(A_BASE, 1.0 / d.t_age) * (d.mid - d.base)
        settled = d.t_age - TREND_WARMUP // 2
        if settled > 0:
            d.m_trend += max(A_TREND, 1.0 / settled) * (dev * dev - d.m_trend)
        return 0.0
    if z <= SUSPECT:
        d.held = 0
        d.base += A_BASE * (d.mid - d.base)
        d.m_trend += A_TREND * (dev * dev - d.m_trend)
    else:
        d.m_trend += A_TREND * ((SUSPECT * rms) ** 2 - d.m_trend)  # winsorised, not left out
        d.held += 1
        if d.held > HOLD:  # the new level is accepted, and such a departure learned as normal
            d.m_trend = max(d.m_trend, (dev / SUSPECT) ** 2)
            d.base = d.mid
            d.held = 0
    return TREND_GAIN * z


def step(d: Detector, ts: int, x: float, limit: float) -> int:
    """Learn reading `x` at `ts` (ms, after the last one) in place; +1 raise, -1 clear, 0 else.

    `limit` is the score that raises (`threshold(sensitivity)`); learning does not depend on it.
    """
    d.n += 1
    d.age += 1
    if d.n == 1:
        d.first_ms = d.last_ms = ts
        d.level = d.short = d.long = d.ref = x
        return 0
    interval = ts - d.last_ms
    d.last_ms = ts
    gap = False
    if d.dt > 0.0 and interval > max(GAP_FACTOR * d.dt, MIN_GAP_MS):
        gap = True
    else:
        d.dt = interval if d.dt == 0.0 else d.dt + 0.01 * (interval - d.dt)

    # the seasonal profiles: learn them all, use the simplest that explains the series best;
    # a reading that looks anomalous (the last score over SEASON_GATE) teaches them nothing,
    # so an anomaly is not echoed a period later
    span = ts - d.first_ms
    around = x - d.long
    s_day, d0, d1, dfrac = _profile(d.daily, ts, DAY_MS)
    s_week, w0, w1, wfrac = _profile(d.weekly, ts, WEEK_MS)
    season = (0.0, s_day, s_week)
    learn = d.age <= WARMUP or d.score <= SEASON_GATE
    if learn:
        width = 3.0 * CLIP * max(1.25 * d.scale, d.q_abs / GAUSS_Q99) if d.age > WARMUP else 0.0
        for i, s in enumerate(season):
            e = _clip(around - s, 0.0, width)
            d.err[i] += A_ERR * (e * e - d.err[i])
    if learn and d.dt > 0.0:
        # per visit of a bin: the mean of the visits so far, then an EWMA of about 3 visits
        per_day = max(SEASON_MEMORY, 1.0 / (1 + span // DAY_MS))
        per_week = max(SEASON_MEMORY, 1.0 / (1 + span // WEEK_MS))
        a_day = min(0.5, per_day * DAILY_BINS * d.dt / DAY_MS)
        a_week = min(0.5, per_week * WEEKLY_BINS * d.dt / WEEK_MS)
        e_day = _clip(around - s_day, 0.0, width)
        e_week = _clip(around - s_week, 0.0, width)
        d.daily = _learn(d.daily, d0, d1, dfrac, a_day * e_day)
        d.weekly = _learn(d.weekly, w0, w1, wfrac, a_week * e_week)
    model = d.model
    if span >= 2 * DAY_MS and d.err[1] < SEASON_GAIN * d.err[0] and model == 0:
        model = 1
    if span >= WEEK_MS + DAY_MS and d.err[2] < SEASON_GAIN * d.err[min(model, 1)] and model < 2:
        model = 2
    if model != d.model:
        y_old = x - season[d.model]
        y_new = x - season[model]
        shift = y_new - y_old
        d.level += shift
        d.short += shift
        d.t_age = 0  # the trend re-learns the deseasonalised series from scratch
        d.model = model
        d.age = WARMUP // 2  # re-learn the scales a little before raising again
    y = x - season[d.model]

    if gap:
        d.level = y
        d.short = d.long

    warm = d.age <= WARMUP
    a_fast = 1.0 / d.age if warm else 0.0
    # features, before this reading is learned
    innovation = y - d.level
    scale = max(1.25 * d.scale, d.q_abs / GAUSS_Q99)  # the innovations' usual size
    f = [0.0, 0.0, 0.0, 0.0]
    tiny = 1e-9 + 1e-6 * abs(d.long)  # a flat series: any change is a departure
    a = abs(innovation)
    if warm:  # start from the largest innovation of the warm-up's second half
        if d.age == WARMUP // 2 + 1:
            d.q_abs = a
        elif d.age > WARMUP // 2 + 1:
            d.q_abs = max(d.q_abs, a)
    else:
        q = max(d.q_abs, GAUSS_Q99 * scale, tiny)
        if a <= Q_GROSS * q and not gap:
            d.q_abs = q * (1.0 + Q_STEP * (1.0 - Q_P)) if a > q else q * (1.0 - Q_STEP * Q_P)
    if not gap:  # in units of a Gaussian's standard deviation, from the 99th percentile
        f[SPIKE] = GAUSS_Q99 * a / max(d.q_abs, tiny)
    f[SHIFT] = abs(d.short - d.long)
    f[DRIFT] = abs(d.short - d.ref)
    if d.v_long > 0.0 and d.v_short > 0.0:
        f[VAR] = abs(math.log(d.v_short / d.v_long))

    # learn, robustly: the reading clipped to a few scales of the current estimates
    width = CLIP * max(scale, tiny) if not warm else 0.0
    yc = _clip(y, d.level, width)
    ic = yc - d.level
    d.level += A_LEVEL * ic
    d.short += max(A_SHORT, a_fast) * (yc - d.short)
    d.long += max(A_LONG, a_fast) * (yc - d.long)
    d.ref += max(A_REF, a_fast) * (d.long - d.ref)
    d.scale += max(A_SCALE, a_fast) * (abs(ic) - d.scale)
    d.v_short += max(A_VSHORT, a_fast) * (abs(ic) - d.v_short)
    d.v_long += max(A_VLONG, a_fast) * (abs(ic) - d.v_long)
    trend = _trend(d, yc, tiny)

    score = 0.0
    feature = 0
    for i in range(4):
        fi = f[i]
        if i == SPIKE:  # already scaled, by the percentile
            if not warm and fi > score:
                score, feature = fi, i
            continue
        m = d.m[i]
        if warm:  # the features' scales from the second half of the warm-up only
            settled = d.age - WARMUP // 2
            if settled > 0:
                d.m[i] = m + max(A_FEATURE[i], 1.0 / settled) * (fi * fi - m)
            continue
        rms = max(math.sqrt(m), FLOOR[i] * tiny if i in (SHIFT, DRIFT) else FLOOR[i])
        z = fi / rms
        if z > score:
            score, feature = z, i
        fc = min(fi, GROSS * rms)
        d.m[i] = m + A_FEATURE[i] * (fc * fc - m)
    if not warm and trend > score:
        score, feature = trend, TREND
    d.score = score
    d.feature = feature
    if warm:
        return 0
    if not d.open:
        if score > limit:
            d.open = True
            d.calm = 0
            return 1
        return 0
    if score < max(CLEAR_FRACTION * limit, CLEAR_FLOOR):
        d.calm += 1
        if d.calm >= CLEAR_READINGS:
            d.open = False
            d.calm = 0
            return -1
    else:
        d.calm = 0
    return 0
