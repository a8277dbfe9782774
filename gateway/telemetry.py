"""Telemetry queries: parameters, InfluxQL building (quoted, injection-safe), the point bound."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from infra.timefmt import UNIT_MS, parse_duration

MEASUREMENT = "telemetry"
DEVICE_TAG = "device_id"
MAX_POINTS = 10_000
METRIC = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
AGGS = ("mean", "min", "max", "count", "last")
# Candidate `every` values for the hint, smallest first.
_NICE = (
    "1s", "2s", "5s", "10s", "15s", "30s", "1m", "2m", "5m", "10m", "15m", "30m",
    "1h", "2h", "3h", "6h", "12h", "1d", "2d", "7d", "14d", "30d", "90d", "365d",
)  # fmt: skip


def quote_ident(name: str) -> str:
    """An InfluxQL double-quoted identifier."""
    return '"' + name.replace("\\", "\\\\").replace('"', '\\"') + '"'


def quote_string(value: str) -> str:
    """An InfluxQL single-quoted string literal."""
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def buckets(start_ms: int, end_ms: int, every_ms: int) -> int:
    """How many GROUP BY time(every) intervals (aligned to the epoch) meet [start, end)."""
    if end_ms <= start_ms:
        return 0
    return (end_ms - 1) // every_ms - start_ms // every_ms + 1


def suggest_every(start_ms: int, end_ms: int, metrics: int, max_points: int = MAX_POINTS) -> str:
    """The smallest round `every` whose downsampled answer fits within max_points."""
    metrics = max(metrics, 1)
    for text in _NICE:
        if buckets(start_ms, end_ms, parse_duration(text)) * metrics <= max_points:
            return text
    per_metric = max(max_points // metrics, 1)
    days = -(-(end_ms - start_ms) // (per_metric * UNIT_MS["d"])) + 1
    return f"{days}d"


@dataclass(frozen=True)
class TelemetryQuery:
    device_id: str
    start_ms: int
    end_ms: int
    metrics: tuple[str, ...] = ()
    every_ms: int | None = None
    agg: str | None = None

    @property
    def downsampled(self) -> bool:
        return self.every_ms is not None

    def estimated_points(self, known_metrics: int) -> int:
        """Upper bound of a downsampled answer: intervals x metrics."""
        assert self.every_ms is not None
        count = len(self.metrics) or max(known_metrics, 1)
        return buckets(self.start_ms, self.end_ms, self.every_ms) * count


def build_influxql(query: TelemetryQuery, max_points: int = MAX_POINTS) -> str:
    """The InfluxQL statement; raw queries are limited to max_points + 1 rows."""
    where = (
        f"WHERE {quote_ident(DEVICE_TAG)}::tag = {quote_string(query.device_id)} "
        f"AND time >= {int(query.start_ms)}ms AND time < {int(query.end_ms)}ms"
    )
    source = f"FROM {quote_ident(MEASUREMENT)}"
    if query.every_ms is None:
        if query.metrics:
            fields = ", ".join(
                f"{quote_ident(m)}::field AS {quote_ident(m)}" for m in query.metrics
            )
        else:
            fields = "*::field"
        return f"SELECT {fields} {source} {where} ORDER BY time ASC LIMIT {max_points + 1}"
    agg = query.agg or "mean"
    if agg not in AGGS:
        raise ValueError(f"agg must be one of {', '.join(AGGS)}")
    if query.metrics:
        fields = ", ".join(
            f"{agg}({quote_ident(m)}::field) AS {quote_ident(m)}" for m in query.metrics
        )
    else:
        fields = f"{agg}(*)"
    return f"SELECT {fields} {source} {where} GROUP BY time({int(query.every_ms)}ms) fill(none)"


class TooManyPoints(Exception):
    """The answer would exceed the point bound."""


def series_from_rows(
    query: TelemetryQuery,
    columns: Sequence[str],
    rows: Sequence[Sequence[Any]],
    max_points: int = MAX_POINTS,
) -> dict[str, list[list[Any]]]:
    """Per-metric [[epoch ms, value], ...] from InfluxDB rows; TooManyPoints past the bound."""
    if len(rows) > max_points:
        raise TooManyPoints
    strip = f"{query.agg or 'mean'}_" if query.downsampled and not query.metrics else ""
    names = [c[len(strip) :] if strip and c.startswith(strip) else c for c in columns]
    series: dict[str, list[list[Any]]] = {m: [] for m in query.metrics}
    indexes = [(i, name) for i, name in enumerate(names) if name != "time"]
    time_index = names.index("time") if "time" in names else 0
    points = 0
    for row in rows:
        ts = row[time_index]
        for i, name in indexes:
            value = row[i]
            if value is None:
                continue
            series.setdefault(name, []).append([ts, value])
            points += 1
        if points > max_points:
            raise TooManyPoints
    return series
