"""Telemetry answered from the rollups, and fleet aggregates by device type or label.

The rollups (`infra.rollups`) live beside the raw series in the database's live generation:
the default retention policy `<P>` holds the raw points, `<P>_1m` and `<P>_1h` the 1-minute and
1-hour windows. Each read resolves `<P>` once (`SHOW RETENTION POLICIES`) and uses it for all
its statements, so it never mixes generations across a replay's switch.

A downsampled query whose `every` is a multiple of 1h (or 1m) over a long range is answered
from the coarsest level that covers its start (retention). Its range is cut into segments: the
whole windows of that level in the middle, whole 1-minute windows towards the edges, raw points
for the partial minutes at either end, so the answer is the raw aggregation's, exactly: counts
add up, min of mins, max of maxes, the mean weighted by counts (sum / count), the last value by
time. All segments go to InfluxDB in one request.

Fleet aggregates group the devices by their *current* type or label value, read from the views
at query time: a device relabelled today moves its whole history to the new group (the views
know only the current labels, and tagging points with labels would freeze them at write time
and split a device's series). Devices without a value for the key are counted, not grouped.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

from redis.asyncio import Redis

from gateway.influx import InfluxQL, InfluxUnavailable, Series
from gateway.telemetry import (
    DEVICE_TAG,
    MEASUREMENT,
    TelemetryQuery,
    TooManyPoints,
    build_influxql,
    quote_ident,
    quote_string,
    series_from_rows,
)
from gateway.views import ViewReader
from infra.rollups import HOUR, MINUTE, Level, duration_ms

LONG_RANGE_MS = 6 * HOUR.ms  # longer ranges are answered from rollups when `every` allows
MAX_BUCKETS = 1_000  # of a fleet aggregate, per group
MAX_GROUPS = 200
FUNCS = {"count": "sum", "sum": "sum", "min": "min", "max": "max", "last": "last"}
NEEDS = {  # the partial aggregates each answer needs
    "mean": ("count", "sum"),
    "count": ("count",),
    "min": ("min",),
    "max": ("max",),
    "last": ("last",),
}
FLEET_NEEDS = ("count", "sum", "min", "max")


@dataclass(frozen=True)
class Generation:
    """The live raw policy and the retention (ms, None: forever) of each policy."""

    raw: str
    retention: Mapping[str, int | None]

    def has(self, level: Level) -> bool:
        return level.policy(self.raw) in self.retention

    def covers(self, policy: str, start_ms: int, now_ms: int) -> bool:
        """The policy still holds data as old as `start_ms`."""
        if policy not in self.retention:
            return False
        kept = self.retention[policy]
        return kept is None or start_ms >= now_ms - kept


async def generation(influx: InfluxQL) -> Generation:
    found, _ = await influx.query("SHOW RETENTION POLICIES")
    raw = ""
    retention: dict[str, int | None] = {}
    for series in found:
        columns = series.columns
        for row in series.values:
            item = dict(zip(columns, row, strict=True))
            retention[str(item["name"])] = duration_ms(str(item["duration"]))
            if item.get("default"):
                raw = str(item["name"])
    if not raw:
        raise InfluxUnavailable("InfluxDB has no default retention policy for the database")
    return Generation(raw, retention)


def choose_level(
    start_ms: int, end_ms: int, every_ms: int, now_ms: int, gen: Generation
) -> Level | None:
    """The rollup level to answer from (None: the raw points)."""
    raw_gone = not gen.covers(gen.raw, start_ms, now_ms)
    if end_ms - start_ms <= LONG_RANGE_MS and not raw_gone:
        return None
    for level in (HOUR, MINUTE):
        if every_ms % level.ms == 0 and gen.covers(level.policy(gen.raw), start_ms, now_ms):
            return level
    return None


Segment = tuple[Level | None, int, int]  # level (None: raw), [start, end)


def segments(start: int, end: int, levels: Sequence[Level]) -> list[Segment]:
    """[start, end) as the whole windows of the coarsest level in the middle and finer data
    towards the edges, in time order."""
    if start >= end:
        return []
    if not levels:
        return [(None, start, end)]
    level, finer = levels[0], levels[1:]
    first = start + (-start % level.ms)
    last = end - end % level.ms
    if first >= last:
        return segments(start, end, finer)
    return [*segments(start, first, finer), (level, first, last), *segments(last, end, finer)]


def _field_regex(prefix: str, metrics: Sequence[str]) -> str:
    names = "|".join(re.escape(m) for m in metrics) if metrics else ".+"
    return f"/^{prefix}(?:{names})$/"


def segment_statement(
    db: str,
    gen: Generation,
    segment: Segment,
    metrics: Sequence[str],
    every_ms: int,
    devices: Iterable[str] | None,
    by_device: bool,
    kinds: Sequence[str] = tuple(FUNCS),
) -> str:
    level, start, end = segment
    where = f"time >= {int(start)}ms AND time < {int(end)}ms"
    if devices is not None:
        where = (
            "("
            + " OR ".join(
                f"{quote_ident(DEVICE_TAG)}::tag = {quote_string(d)}" for d in sorted(devices)
            )
            + f") AND {where}"
        )
    if level is None:
        source = f"{quote_ident(db)}.{quote_ident(gen.raw)}.{quote_ident(MEASUREMENT)}"
        fields = ", ".join(f"{k}({_field_regex('', metrics)})" for k in kinds)
    else:
        policy = level.policy(gen.raw)
        source = f"{quote_ident(db)}.{quote_ident(policy)}.{quote_ident(level.measurement)}"
        fields = ", ".join(f"{FUNCS[k]}({_field_regex(k + '_', metrics)})" for k in kinds)
    group = f"time({int(every_ms)}ms)" + (f", {quote_ident(DEVICE_TAG)}" if by_device else "")
    return f"SELECT {fields} FROM {source} WHERE {where} GROUP BY {group} fill(none)"  # noqa: S608


@dataclass
class Acc:
    """Partial aggregates of one metric in one bucket."""

    count: int = 0
    sum: float | None = None
    min: float | None = None
    max: float | None = None
    last: Any = None

    def add(self, kind: str, value: Any) -> None:
        if kind == "count":
            self.count += int(value)
        elif kind == "last":
            self.last = value
        elif isinstance(value, bool) or not isinstance(value, int | float):
            return  # min/max/sum of booleans: the rollups keep numbers only
        elif kind == "sum":
            self.sum = float(value) + (self.sum or 0.0)
        elif kind == "min":
            self.min = value if self.min is None else min(self.min, value)
        elif kind == "max":
            self.max = value if self.max is None else max(self.max, value)

    def merge(self, other: Acc) -> None:
        self.count += other.count
        if other.sum is not None:
            self.sum = other.sum + (self.sum or 0.0)
        for kind in ("min", "max"):
            if getattr(other, kind) is not None:
                self.add(kind, getattr(other, kind))

    @property
    def mean(self) -> float | None:
        return self.sum / self.count if self.sum is not None and self.count else None

    def value(self, agg: str) -> Any:
        if agg == "count":
            return self.count if self.count else None
        if agg == "mean":
            return self.mean
        return cast(Any, getattr(self, agg))


Buckets = dict[str, dict[int, Acc]]  # metric -> bucket start -> partial aggregates


def _kind_metric(column: str, rollup: bool) -> tuple[str, str] | None:
    """`sum_count_t` (a rollup's sum of counts) or `count_t` (a raw count) as (kind, metric)."""
    if rollup:
        _, _, column = column.partition("_")
    kind, _, metric = column.partition("_")
    return (kind, metric) if kind in FUNCS and metric else None


def accumulate(into: Buckets, series: Series, rollup: bool) -> None:
    parsed = [(i, _kind_metric(c, rollup)) for i, c in enumerate(series.columns) if c != "time"]
    time_index = series.columns.index("time") if "time" in series.columns else 0
    for row in series.values:
        ts = int(row[time_index])
        for i, km in parsed:
            value = row[i]
            if km is None or value is None:
                continue
            kind, metric = km
            into.setdefault(metric, {}).setdefault(ts, Acc()).add(kind, value)


@dataclass
class Answer:
    source: str
    series: dict[str, list[list[Any]]] = field(default_factory=dict)


def _levels_for(level: Level, gen: Generation, start_ms: int, now_ms: int) -> list[Level]:
    """The chosen level, and 1m for its edges when the 1m rollups reach back that far."""
    levels = [level]
    if level is HOUR and gen.covers(MINUTE.policy(gen.raw), start_ms, now_ms):
        levels.append(MINUTE)
    return levels


async def run_segments(
    influx: InfluxQL,
    db: str,
    gen: Generation,
    parts: Sequence[Segment],
    metrics: Sequence[str],
    every_ms: int,
    devices: Iterable[str] | None = None,
    by_device: bool = False,
    kinds: Sequence[str] = tuple(FUNCS),
) -> list[tuple[Segment, list[Series]]]:
    statements = [
        segment_statement(db, gen, part, metrics, every_ms, devices, by_device, kinds)
        for part in parts
    ]
    results = await influx.query_all(statements)
    return list(zip(parts, results, strict=True))


async def telemetry_series(
    influx: InfluxQL,
    query: TelemetryQuery,
    now_ms: int,
    *,
    rollups: bool = True,
    max_points: int = 10_000,
) -> Answer:
    """A device's downsampled telemetry, from the rollups when they can answer it."""
    assert query.every_ms is not None
    gen = await generation(influx) if rollups else None
    level = (
        choose_level(query.start_ms, query.end_ms, query.every_ms, now_ms, gen)
        if gen is not None
        else None
    )
    if gen is None or level is None:
        found, partial = await influx.query(build_influxql(query, max_points))
        if partial:
            raise TooManyPoints
        columns = found[0].columns if found else ["time"]
        rows = found[0].values if found else []
        return Answer("raw", series_from_rows(query, columns, rows, max_points))
    parts = segments(query.start_ms, query.end_ms, _levels_for(level, gen, query.start_ms, now_ms))
    buckets: Buckets = {}
    agg = query.agg or "mean"
    for (part_level, _, _), found in await run_segments(
        influx,
        influx.database,
        gen,
        parts,
        query.metrics,
        query.every_ms,
        [query.device_id],
        kinds=NEEDS[agg],
    ):
        for series in found:
            accumulate(buckets, series, part_level is not None)
    series_out: dict[str, list[list[Any]]] = {m: [] for m in query.metrics}
    points = 0
    for metric in sorted(buckets):
        values = [[ts, acc.value(agg)] for ts, acc in sorted(buckets[metric].items())]
        values = [v for v in values if v[1] is not None]
        if values or metric in series_out:
            series_out[metric] = values
        points += len(values)
        if points > max_points:
            raise TooManyPoints
    return Answer(level.source, series_out)


# --- fleet aggregates ------------------------------------------------------------------


class AggregateRefused(ValueError):
    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


def parse_group_by(text: str | None) -> tuple[str, str | None]:
    """`type` or `label:<key>` as ("type", None) or ("label", key)."""
    if not text:
        raise AggregateRefused("group_by", "required: type or label:<key>")
    if text == "type":
        return "type", None
    kind, sep, key = text.partition(":")
    if kind == "label" and sep and re.fullmatch(r"[A-Za-z0-9_.\-/]{1,63}", key):
        return "label", key
    raise AggregateRefused("group_by", f"type or label:<key>, got {text[:80]!r}")


async def device_groups(
    views: ViewReader, redis: Redis, devices: Sequence[str], kind: str, key: str | None
) -> dict[str, str | None]:
    """Each device's group now: its type, or its value of label `key` (None: none)."""
    keys = await views.keys()
    async with redis.pipeline(transaction=False) as pipe:
        for device_id in devices:
            pipe.hget(keys.device(device_id), "doc")
        docs: list[str | None] = await pipe.execute()
    groups: dict[str, str | None] = {}
    for device_id, raw in zip(devices, docs, strict=True):
        try:
            doc = json.loads(raw) if raw else None
        except ValueError:
            doc = None
        value: Any = None
        if isinstance(doc, dict):
            if kind == "type":
                value = doc.get("type")
            else:
                labels = doc.get("labels")
                value = labels.get(key) if isinstance(labels, dict) else None
        groups[device_id] = str(value) if value is not None else None
    return groups


@dataclass(frozen=True)
class AggregateQuery:
    metric: str
    kind: str  # "type" or "label"
    key: str | None
    start_ms: int
    end_ms: int
    every_ms: int


def check_aggregate(query: AggregateQuery) -> None:
    from gateway.telemetry import buckets

    if query.every_ms % MINUTE.ms:
        raise AggregateRefused("every", "a multiple of 1m (fleet aggregates come from rollups)")
    n = buckets(query.start_ms, query.end_ms, query.every_ms)
    if n > MAX_BUCKETS:
        raise AggregateRefused(
            "every", f"the range would have {n} buckets, more than {MAX_BUCKETS}: widen every"
        )


async def fleet_aggregates(
    influx: InfluxQL, views: ViewReader, redis: Redis, query: AggregateQuery, now_ms: int
) -> dict[str, Any]:
    """Per group and bucket: count, min, max and count-weighted mean of one metric."""
    check_aggregate(query)
    gen = await generation(influx)
    level = HOUR if query.every_ms % HOUR.ms == 0 and gen.has(HOUR) else MINUTE
    levels = _levels_for(level, gen, query.start_ms, now_ms)
    parts = segments(query.start_ms, query.end_ms, levels)
    per_device: dict[str, Buckets] = {}
    for (part_level, _, _), found in await run_segments(
        influx,
        influx.database,
        gen,
        parts,
        [query.metric],
        query.every_ms,
        by_device=True,
        kinds=FLEET_NEEDS,
    ):
        for series in found:
            device = series.tags.get(DEVICE_TAG, "")
            accumulate(per_device.setdefault(device, {}), series, part_level is not None)
    membership = await device_groups(views, redis, sorted(per_device), query.kind, query.key)
    grouped: dict[str, dict[int, Acc]] = {}
    members: dict[str, int] = {}
    ungrouped = 0
    for device, found_buckets in per_device.items():
        group = membership.get(device)
        if group is None:
            ungrouped += 1
            continue
        members[group] = members.get(group, 0) + 1
        target = grouped.setdefault(group, {})
        for ts, acc in found_buckets.get(query.metric, {}).items():
            target.setdefault(ts, Acc()).merge(acc)
    if len(grouped) > MAX_GROUPS:
        raise AggregateRefused("group_by", f"more than {MAX_GROUPS} groups")
    return {
        "source": level.source,
        "ungrouped_devices": ungrouped,
        "groups": [
            {
                "group": group,
                "devices": members[group],
                "buckets": [
                    {
                        "time": ts,
                        "count": acc.count,
                        "min": acc.min,
                        "max": acc.max,
                        "mean": _finite(acc.mean),
                    }
                    for ts, acc in sorted(grouped[group].items())
                    if acc.count
                ],
            }
            for group in sorted(grouped)
        ],
    }


def _finite(value: float | None) -> float | None:
    return value if value is None or math.isfinite(value) else None
