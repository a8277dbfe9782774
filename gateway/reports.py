"""Fleet reports over a period [from, to): uptime, readings, metric statistics, alerts and
commands per device and for the whole fleet, built from the projections only.

Sources (layout in `infra.views`; nothing here reads the event store):
- uptime: the device's connectivity history `{p}:connectivity:{id}` (its connected and
  disconnected events); the state at `from` is the last change before it (offline if none);
- alerts: the device's alert hashes (`{p}:alerts:device:{id}`), by `raised_at_ms`,
  `acknowledged_at` and `cleared_at_ms`;
- commands: the device's finished commands `{p}:commands_done:{id}` by finishing time;
- readings and min/mean/max per metric: one InfluxQL aggregate over the raw `telemetry`
  points per page of devices.

Bounded work: devices are read a page (`PAGE`) at a time, each with a bounded amount of history
(`HISTORY_KEPT` entries per set, at most the kept cleared alerts); a report covers at most
`MAX_PERIOD_MS` and `MAX_DEVICES` (`ReportRefused` otherwise, a 422 at the API). The rows (one
small record per device) are the only thing held for the whole report.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, cast

import msgspec
from redis.asyncio import Redis

from gateway.influx import InfluxQL, InfluxQueryError
from gateway.telemetry import DEVICE_TAG, MEASUREMENT, quote_ident, quote_string
from gateway.views import ViewReader
from infra.timefmt import rfc3339
from infra.views import CLEARED_ALERTS_KEPT, HISTORY_KEPT, SEVERITIES, ViewKeys

DAY_MS = 86_400_000
MAX_PERIOD_MS = 93 * DAY_MS  # a quarter
MAX_DEVICES = 10_000
PAGE = 200  # devices per round of Redis reads and per InfluxQL statement
BEFORE = 8  # connectivity changes read before `from` to find the state at `from`
FORMATS = ("json", "csv", "html")
COMMAND_STATES = ("acknowledged", "failed", "expired", "cancelled")
_decode = msgspec.json.decode

NOTES = (
    "uptime: the share of the observed period [from, min(to, generation time)) the device was "
    "connected, from its connected and disconnected events; offline before its first one",
    "readings: per device the largest count of any one metric in the period (a reading carries "
    "one or more metrics: exact when one metric is in every reading); fleet readings are the "
    "sum over devices",
    "min, mean and max cover numeric metrics (min and max also booleans); count covers every "
    "metric",
    "alerts: raised, acknowledged and cleared in the period, each by its own time (raise and "
    "clear in device time, acknowledgement in server time); mean times to acknowledge and to "
    "clear are over the alerts acknowledged or cleared in the period, from their raise; the "
    f"views keep the newest {HISTORY_KEPT} connectivity changes and finished commands and the "
    "newest 100 cleared alerts of each device: older ones are not counted "
    "(history_complete is false where the kept history starts after `from`)",
    "commands: finished in the period (acknowledged, failed, expired or cancelled); the success "
    "rate is acknowledged / finished",
)


class ReportRefused(Exception):
    """The report's parameters are invalid or the report would be too large."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


@dataclass(frozen=True)
class ReportQuery:
    start_ms: int
    end_ms: int
    now_ms: int

    @property
    def observed_end_ms(self) -> int:
        """Where the observed part of the period ends: the future is not known yet."""
        return min(self.end_ms, self.now_ms)

    def check(self) -> None:
        if self.start_ms >= self.end_ms:
            raise ReportRefused("from", "must be before `to`")
        if self.start_ms >= self.now_ms:
            raise ReportRefused("from", "must be in the past")
        if self.end_ms - self.start_ms > MAX_PERIOD_MS:
            raise ReportRefused("to", f"a report covers at most {MAX_PERIOD_MS // DAY_MS} days")


# -- statistics ------------------------------------------------------------------------------


@dataclass
class MetricStats:
    count: int = 0
    numeric: int = 0  # values behind `mean`
    total: float = 0.0  # mean * numeric, summed
    min: float | bool | None = None
    max: float | bool | None = None

    def merge(self, other: MetricStats) -> None:
        self.count += other.count
        self.numeric += other.numeric
        self.total += other.total
        self.min = _pick(self.min, other.min, min)
        self.max = _pick(self.max, other.max, max)

    def doc(self) -> dict[str, Any]:
        mean = self.total / self.numeric if self.numeric else None
        return {"count": self.count, "min": self.min, "mean": mean, "max": self.max}


def _pick(a: Any, b: Any, choose: Any) -> Any:
    if a is None:
        return b
    if b is None or type(a) is not type(b):
        return a
    return choose(a, b)


@dataclass
class AlertStats:
    raised: int = 0
    acknowledged: int = 0
    cleared: int = 0
    by_severity: dict[str, int] = field(default_factory=lambda: dict.fromkeys(SEVERITIES, 0))
    ack_ms: int = 0  # summed time to acknowledge of the acknowledged ones
    clear_ms: int = 0

    def merge(self, other: AlertStats) -> None:
        self.raised += other.raised
        self.acknowledged += other.acknowledged
        self.cleared += other.cleared
        for severity, n in other.by_severity.items():
            self.by_severity[severity] = self.by_severity.get(severity, 0) + n
        self.ack_ms += other.ack_ms
        self.clear_ms += other.clear_ms

    def doc(self) -> dict[str, Any]:
        return {
            "raised": self.raised,
            "acknowledged": self.acknowledged,
            "cleared": self.cleared,
            "raised_by_severity": dict(self.by_severity),
            "mean_time_to_acknowledge_s": _mean_s(self.ack_ms, self.acknowledged),
            "mean_time_to_clear_s": _mean_s(self.clear_ms, self.cleared),
        }


def _mean_s(total_ms: int, n: int) -> float | None:
    return round(total_ms / n / 1000, 3) if n else None


@dataclass
class CommandStats:
    by_state: dict[str, int] = field(default_factory=lambda: dict.fromkeys(COMMAND_STATES, 0))

    def merge(self, other: CommandStats) -> None:
        for state, n in other.by_state.items():
            self.by_state[state] = self.by_state.get(state, 0) + n

    def doc(self) -> dict[str, Any]:
        finished = sum(self.by_state.values())
        ok = self.by_state.get("acknowledged", 0)
        return {
            "finished": finished,
            **self.by_state,
            "success_rate": round(ok / finished, 4) if finished else None,
        }


@dataclass
class DeviceRow:
    device_id: str
    name: str
    type: str
    status: str
    labels: dict[str, str]
    online_ms: int = 0
    readings: int = 0
    metrics: dict[str, MetricStats] = field(default_factory=dict)
    alerts: AlertStats = field(default_factory=AlertStats)
    commands: CommandStats = field(default_factory=CommandStats)
    history_complete: bool = True


def uptime(online_ms: int, observed_ms: int) -> float | None:
    return round(online_ms / observed_ms, 4) if observed_ms > 0 else None


def online_time(
    before: Sequence[tuple[str, float]], changes: Sequence[tuple[str, float]], start: int, end: int
) -> int:
    """Milliseconds connected within [start, end), from the changes (member `version:flag`,
    score epoch ms) before `start` (the newest few) and within the window."""

    def order(entry: tuple[str, float]) -> tuple[float, int]:
        version, _, _ = entry[0].partition(":")
        return entry[1], int(version) if version.isdigit() else 0

    state = max(before, key=order)[0].endswith(":1") if before else False
    at = start
    total = 0
    for member, score in sorted(changes, key=order):
        moment = min(max(int(score), start), end)
        if state:
            total += moment - at
        at = moment
        state = member.endswith(":1")
    if state:
        total += end - at
    return total


def _iso_ms(text: Any) -> int | None:
    if not isinstance(text, str):
        return None
    try:
        return math.floor(datetime.fromisoformat(text).timestamp() * 1000)
    except ValueError:
        return None


def alert_stats(alerts: Iterable[Mapping[str, Any]], start: int, end: int) -> AlertStats:
    stats = AlertStats()
    for alert in alerts:
        raised = alert.get("raised_at_ms")
        if not isinstance(raised, int):
            continue
        if start <= raised < end:
            stats.raised += 1
            severity = str(alert.get("severity"))
            stats.by_severity[severity] = stats.by_severity.get(severity, 0) + 1
        acknowledged = _iso_ms(alert.get("acknowledged_at"))
        if acknowledged is not None and start <= acknowledged < end:
            stats.acknowledged += 1
            stats.ack_ms += max(0, acknowledged - raised)
        cleared = alert.get("cleared_at_ms")
        if isinstance(cleared, int) and start <= cleared < end:
            stats.cleared += 1
            stats.clear_ms += max(0, cleared - raised)
    return stats


def alerts_complete(alerts: Iterable[Mapping[str, Any]], cleared_kept: int, start: int) -> bool:
    """Whether the device's kept alerts cover `start`: the views never dropped a cleared one, or
    the oldest clear they keep is no later than `start` (the dropped ones cleared before it)."""
    if cleared_kept < CLEARED_ALERTS_KEPT:
        return True
    clears = [a.get("cleared_at_ms") for a in alerts]
    oldest = min((c for c in clears if isinstance(c, int)), default=None)
    return oldest is not None and oldest <= start


def command_stats(members: Iterable[str]) -> CommandStats:
    stats = CommandStats()
    for member in members:
        state, _, _ = member.partition(":")
        stats.by_state[state] = stats.by_state.get(state, 0) + 1
    return stats


def _complete(card: int, oldest: Sequence[tuple[str, float]], start: int) -> bool:
    """Whether a history set still covers `start`: it never dropped, or its oldest is older."""
    return card < HISTORY_KEPT or (bool(oldest) and oldest[0][1] <= start)


# -- building --------------------------------------------------------------------------------


def influxql(device_ids: Sequence[str], start_ms: int, end_ms: int) -> str:
    """Count, min, mean and max of every field of these devices' raw points, per device."""
    tag = f"{quote_ident(DEVICE_TAG)}::tag"
    devices = " OR ".join(f"{tag} = {quote_string(d)}" for d in device_ids)
    return (  # every identifier and literal quoted
        f"SELECT count(*), min(*), mean(*), max(*) FROM {quote_ident(MEASUREMENT)} "  # noqa: S608
        f"WHERE ({devices}) AND time >= {int(start_ms)}ms AND time < {int(end_ms)}ms "
        f"GROUP BY {quote_ident(DEVICE_TAG)}"
    )


def metric_stats(columns: Sequence[str], row: Sequence[Any]) -> dict[str, MetricStats]:
    """Per metric statistics from one row of `influxql`'s answer (`count_t`, `min_t`, ...)."""
    out: dict[str, MetricStats] = {}
    for name, value in zip(columns, row, strict=False):
        agg, _, metric = name.partition("_")
        if value is None or agg not in ("count", "min", "mean", "max") or not metric:
            continue
        stats = out.setdefault(metric, MetricStats())
        if agg == "count":
            stats.count = int(value)
        elif agg == "mean":
            stats.total = float(value)  # made a total below, once count is known
            stats.numeric = 1
        elif agg == "min":
            stats.min = value
        else:
            stats.max = value
    for stats in out.values():
        if stats.numeric:
            stats.numeric = stats.count
            stats.total *= stats.count
    return out


class ReportBuilder:
    """Builds a fleet report from the views (Redis) and the time series (InfluxDB)."""

    def __init__(self, views: ViewReader, redis: Redis, influx: InfluxQL) -> None:
        self._views = views
        self._redis = redis
        self._influx = influx

    async def build(self, query: ReportQuery) -> dict[str, Any]:
        query.check()
        keys = await self._views.keys()
        count: int = await self._redis.zcard(keys.devices)
        if count > MAX_DEVICES:
            raise ReportRefused(
                "devices", f"the fleet has {count} devices; a report covers at most {MAX_DEVICES}"
            )
        rows: list[DeviceRow] = []
        after: str | None = None
        while True:
            start = f"({after}" if after else "-"
            ids = cast(list[str], await self._redis.zrangebylex(keys.devices, start, "+", 0, PAGE))
            if not ids:
                break
            rows += await self._page(keys, ids, query)
            after = ids[-1]
            if len(ids) < PAGE:
                break
        return report_doc(rows, query)

    async def _page(
        self, keys: ViewKeys, ids: Sequence[str], query: ReportQuery
    ) -> list[DeviceRow]:
        """One page of devices: the views and the time series read at the same time."""
        rows, metrics = await asyncio.gather(
            self._views_page(keys, ids, query),
            self._telemetry(ids, query.start_ms, query.end_ms),
        )
        for row in rows:
            row.metrics = metrics.get(row.device_id, {})
            row.readings = max((m.count for m in row.metrics.values()), default=0)
        return rows

    async def _views_page(
        self, keys: ViewKeys, ids: Sequence[str], query: ReportQuery
    ) -> list[DeviceRow]:
        start, end = query.start_ms, query.end_ms
        observed = query.observed_end_ms
        async with self._redis.pipeline(transaction=False) as pipe:
            for device_id in ids:
                conn, done = keys.connectivity(device_id), keys.commands_done(device_id)
                pipe.hget(keys.device(device_id), "doc")
                pipe.zrevrangebyscore(conn, f"({start}", "-inf", 0, BEFORE, withscores=True)
                pipe.zrangebyscore(conn, start, f"({observed}", withscores=True)
                pipe.zcard(conn)
                pipe.zrange(conn, 0, 0, withscores=True)
                pipe.zrangebyscore(done, start, f"({end}")
                pipe.zcard(done)
                pipe.zrange(done, 0, 0, withscores=True)
                pipe.zrangebyscore(keys.alerts_of_device(device_id), "-inf", f"({end}")
                pipe.zcard(keys.alerts_cleared_of(device_id))
            answers: list[Any] = await pipe.execute()
        per = 10
        rows: list[DeviceRow] = []
        alert_ids: list[tuple[DeviceRow, list[str], int]] = []
        for i, device_id in enumerate(ids):
            (
                doc_raw,
                before,
                changes,
                conn_n,
                conn_old,
                done,
                done_n,
                done_old,
                alerts,
                cleared_n,
            ) = answers[i * per : (i + 1) * per]
            doc = _decode(doc_raw) if doc_raw else None
            if not isinstance(doc, dict):
                continue  # indexed, hash not written yet
            registered = _iso_ms(doc.get("registered_at"))
            if registered is not None and registered >= end:
                continue  # did not exist in the period
            labels = doc.get("labels") or {}
            row = DeviceRow(
                device_id=device_id,
                name=str(doc.get("name") or ""),
                type=str(doc.get("type") or ""),
                status=str(doc.get("status") or ""),
                labels={str(k): str(v) for k, v in labels.items()},
                online_ms=online_time(before, changes, start, observed),
                commands=command_stats(done),
                history_complete=_complete(conn_n, conn_old, start)
                and _complete(done_n, done_old, start),
            )
            rows.append(row)
            alert_ids.append((row, alerts, cleared_n))
        async with self._redis.pipeline(transaction=False) as pipe:
            for _, found, _ in alert_ids:
                for alert_id in found:
                    pipe.hgetall(keys.alert(alert_id))
            hashes = cast(list[dict[str, str]], await pipe.execute())
        position = 0
        for row, found, cleared_n in alert_ids:
            mine = hashes[position : position + len(found)]
            position += len(found)
            decoded = [{k: _decode(v) for k, v in h.items()} for h in mine if h]
            row.alerts = alert_stats(decoded, start, end)
            if not alerts_complete(decoded, cleared_n, start):
                row.history_complete = False
        return rows

    async def _telemetry(
        self, ids: Sequence[str], start: int, end: int
    ) -> dict[str, dict[str, MetricStats]]:
        """Per device id, its metrics' statistics in [start, end)."""
        series, partial = await self._influx.query(influxql(ids, start, end))
        if partial:
            raise InfluxQueryError("InfluxDB cut the aggregate answer short")
        out: dict[str, dict[str, MetricStats]] = {}
        for found in series:
            if found.values:
                out[found.tags.get(DEVICE_TAG, "")] = metric_stats(found.columns, found.values[0])
        return out


def device_doc(row: DeviceRow, observed_ms: int) -> dict[str, Any]:
    return {
        "device_id": row.device_id,
        "name": row.name,
        "type": row.type,
        "status": row.status,
        "labels": row.labels,
        "uptime": uptime(row.online_ms, observed_ms),
        "online_s": round(row.online_ms / 1000, 3),
        "readings": row.readings,
        "metrics": {name: row.metrics[name].doc() for name in sorted(row.metrics)},
        "alerts": row.alerts.doc(),
        "commands": row.commands.doc(),
        "history_complete": row.history_complete,
    }


def report_doc(rows: Sequence[DeviceRow], query: ReportQuery) -> dict[str, Any]:
    """The report in its JSON shape (the CSV and HTML forms are built from it)."""
    observed_ms = max(0, query.observed_end_ms - query.start_ms)
    metrics: dict[str, MetricStats] = {}
    alerts, commands = AlertStats(), CommandStats()
    online_ms = readings = 0
    for row in rows:
        online_ms += row.online_ms
        readings += row.readings
        alerts.merge(row.alerts)
        commands.merge(row.commands)
        for name, stats in row.metrics.items():
            metrics.setdefault(name, MetricStats()).merge(stats)
    return {
        "from": rfc3339(query.start_ms),
        "to": rfc3339(query.end_ms),
        "observed_to": rfc3339(query.observed_end_ms),
        "totals": {
            "devices": len(rows),
            "uptime": uptime(online_ms, observed_ms * len(rows)),
            "online_s": round(online_ms / 1000, 3),
            "readings": readings,
            "metrics": {name: metrics[name].doc() for name in sorted(metrics)},
            "alerts": alerts.doc(),
            "commands": commands.doc(),
            "history_complete": all(row.history_complete for row in rows),
        },
        "devices": [device_doc(row, observed_ms) for row in rows],
        "notes": list(NOTES),
    }
