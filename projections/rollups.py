"""Rollups of the raw telemetry, kept exact by the `timeseries` projection's own writer.

After a batch's raw points are stored (204), the projection recomputes every window the batch
touched, level by level, each level from the one below, with `SELECT ... INTO` statements that
InfluxDB runs in one request (so no data crosses the wire):

1. the 1-second partials (`<P>.telemetry_1s`) of the touched (device, 1 s) pairs, from the
   raw points: count, sum, min, max, last of every field;
2. the 1-minute windows (`<P>_1m.telemetry_1m`) containing them, from the partials: sum of
   counts, sum of sums, min of mins, max of maxes, sum / count as the mean, last of lasts;
3. the 1-hour windows (`<P>_1h.telemetry_1h`), the same way from the 1-minute windows.

A window is identified by measurement, device and start time, so writing it again overwrites
it: a redelivered batch, a late (out-of-order) reading or a restart after kill -9 recomputes the
windows from what is stored, never adds twice. Updates run one at a time: per process (an
asyncio lock), and across the projector's replicas and a replay (`SharedLock`, a key created in
the namespace's JetStream `LEASES` bucket for the length of one request), so the last
recomputation of a window always started after the last raw write into it. The
consumer acknowledges a batch only after its rollups are written, so a crash in between leaves
the batch to be redelivered, which recomputes the same windows. See `infra.rollups` for names.

Each level reads at most a few windows of the level below per touched window: the partials
read at most a second of raw data per touched device, not whole minutes, which is what keeps a
dense device (1,000 readings a second) cheap to roll up; a minute reads at most 60 partials.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence

from nats.js.client import JetStreamContext
from nats.js.errors import KeyWrongLastSequenceError, NoStreamResponseError
from nats.js.kv import KeyValue
from prometheus_client import Counter, Histogram

from domain.ingest import Reading
from infra.rollups import DEVICE_TAG, HOUR, KINDS, MINUTE, PARTIAL, RAW_MEASUREMENT, Level
from infra.streams import Streams, open_bucket
from projections.influx import (
    DatabaseNotFound,
    InfluxClient,
    InfluxError,
    InfluxUnavailable,
    quote_ident,
    quote_string,
)

log = logging.getLogger(__name__)

DEVICES_PER_STATEMENT = 1_000  # a statement names its devices: InfluxDB 1.6 opens iterators
# for every series a statement matches, so one without a device filter costs as many as the
# measurement has devices (1 s against 0.1 s for 500 of 10,000 devices)
RUN_GAP = 10  # touched windows at most this many windows apart share a statement
BULK_TIMEOUT_S = 3_600.0

ROLLUP_LATENCY = Histogram(
    "iot_timeseries_rollup_duration_seconds",
    "Latency of one batch's rollup update (all levels)",
    buckets=(0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
)
ROLLUP_WINDOWS = Counter(
    "iot_timeseries_rollup_windows_total", "(device, 1 s) partial windows recomputed"
)
ROLLUP_RETRIES = Counter(
    "iot_timeseries_rollup_retries_total", "Rollup updates repeated while InfluxDB was unavailable"
)

Keepalive = Callable[[], Awaitable[None]]


class Stopping(Exception):
    """The process is stopping while InfluxDB is unavailable: leave the batch unacknowledged."""


class SharedLock:
    """Mutual exclusion across processes: key `key` created (only if absent) in a JetStream KV
    bucket with a TTL, deleted on release at the revision we created. A holder that dies
    leaves it to the bucket's TTL (10 s for `LEASES`). The bucket is opened by `open`, again
    after a failure: `infra.streams.open_bucket` creates it again if a NATS restart lost it
    (it is held in memory)."""

    def __init__(self, open_bucket: Callable[[], Awaitable[KeyValue]], key: str) -> None:
        self._open = open_bucket
        self.key = key
        self._kv: KeyValue | None = None
        self._revision: int | None = None

    async def __aenter__(self) -> SharedLock:
        if self._kv is None:
            self._kv = await self._open()
        delay = 0.001
        reopened = False
        while True:
            try:
                self._revision = await self._kv.create(self.key, b"rollups")
                return self
            except KeyWrongLastSequenceError:  # held by another process
                await asyncio.sleep(delay)
                delay = min(delay * 2, 0.05)
            except NoStreamResponseError:  # the bucket is gone: open (create) it once more
                self._kv = None
                if reopened:
                    raise
                reopened = True
                self._kv = await self._open()

    async def __aexit__(self, *_: object) -> None:
        if self._kv is not None and self._revision is not None:
            revision, self._revision = self._revision, None
            with contextlib.suppress(Exception):  # it expires with the bucket's TTL anyway
                await self._kv.delete(self.key, last=revision)


def rollup_lock(js: JetStreamContext, streams: Streams, database: str) -> SharedLock:
    """The lock every rollup writer of one InfluxDB database takes (projectors, replays)."""
    return SharedLock(
        lambda: open_bucket(js, streams, streams.leases_bucket), f"rollups.{database}"
    )


class Touched:
    """What a batch wrote: the (1 s window, device) pairs and each metric's kind."""

    __slots__ = ("numeric", "partials")

    def __init__(self) -> None:
        self.partials: dict[int, set[str]] = {}  # window start (ms) -> devices
        self.numeric: dict[str, bool] = {}  # metric -> has numeric values

    def __bool__(self) -> bool:
        return bool(self.partials)

    def add(self, device_id: str, readings: Iterable[Reading]) -> None:
        width = PARTIAL.ms
        partials = self.partials
        numeric = self.numeric
        last = -1
        for reading in readings:
            values = reading.values
            if not values:
                continue
            start = reading.ts - reading.ts % width
            if start != last:  # a device's readings mostly share a window
                partials.setdefault(start, set()).add(device_id)
                last = start
            for name, value in values.items():
                if not numeric.get(name, False):
                    kind = type(value)
                    numeric[name] = kind is float or kind is int

    def update(self, other: Touched) -> None:
        """Add what `other` touched (a replay collects the windows it wrote after a switch)."""
        for start, devices in other.partials.items():
            self.partials.setdefault(start, set()).update(devices)
        for name, numeric in other.numeric.items():
            self.numeric[name] = self.numeric.get(name, False) or numeric


def _coarsen(windows: Mapping[int, set[str]], width: int) -> dict[int, set[str]]:
    coarse: dict[int, set[str]] = {}
    for start, devices in windows.items():
        coarse.setdefault(start - start % width, set()).update(devices)
    return coarse


def _runs(windows: Mapping[int, set[str]], width: int) -> list[tuple[int, int, set[str]]]:
    """Windows less than `RUN_GAP` windows apart merged into time ranges [start, end), each
    with its devices (recomputing an untouched window in between is correct, and cheaper than
    a statement of its own)."""
    runs: list[tuple[int, int, set[str]]] = []
    for start in sorted(windows):
        if runs and start - runs[-1][1] <= RUN_GAP * width:
            first, _, devices = runs[-1]
            runs[-1] = (first, start + width, devices | windows[start])
        else:
            runs.append((start, start + width, set(windows[start])))
    return runs


def _where(start: int, end: int, devices: Iterable[str] | None) -> str:
    time_range = f"time >= {int(start)}ms AND time < {int(end)}ms"
    if devices is None:
        return time_range
    terms = " OR ".join(f"{quote_ident(DEVICE_TAG)} = {quote_string(d)}" for d in sorted(devices))
    return f"({terms}) AND {time_range}"


def merge_fields(numeric: Mapping[str, bool]) -> str:
    """The SELECT list that merges windows of one level into the next (per metric)."""
    parts = []
    for metric in sorted(numeric):
        count, total, low, high, mean, last = (quote_ident(f"{kind}_{metric}") for kind in KINDS)
        parts.append(f"sum({count}) AS {count}")
        if numeric[metric]:
            parts += [
                f"sum({total}) AS {total}",
                f"min({low}) AS {low}",
                f"max({high}) AS {high}",
                f"sum({total}) / sum({count}) AS {mean}",
            ]
        parts.append(f"last({last}) AS {last}")
    return ", ".join(parts)


class Statements:
    """InfluxQL of one generation (`raw_policy`) of database `db`."""

    def __init__(self, db: str, raw_policy: str) -> None:
        self.db = db
        self.raw_policy = raw_policy

    def target(self, level: Level) -> str:
        return f"{quote_ident(self.db)}.{quote_ident(level.policy(self.raw_policy))}." + (
            quote_ident(level.measurement)
        )

    @property
    def raw(self) -> str:
        return f"{quote_ident(self.db)}.{quote_ident(self.raw_policy)}.{RAW_MEASUREMENT}"

    def partials(self, start: int, end: int, devices: Iterable[str] | None) -> str:
        return (
            "SELECT count(*), sum(*), min(*), max(*), last(*) "  # noqa: S608
            f"INTO {self.target(PARTIAL)} FROM {self.raw} WHERE {_where(start, end, devices)} "
            f"GROUP BY time({PARTIAL.ms}ms), *"
        )

    def merge(
        self,
        level: Level,
        below: Level,
        numeric: Mapping[str, bool],
        start: int,
        end: int,
        devices: Iterable[str] | None,
    ) -> str:
        return (
            f"SELECT {merge_fields(numeric)} INTO {self.target(level)} "  # noqa: S608
            f"FROM {self.target(below)} WHERE {_where(start, end, devices)} "
            f"GROUP BY time({level.ms}ms), *"
        )

    def for_touched(self, touched: Touched) -> list[str]:
        """Every level's statements for the windows a batch touched, in order."""
        if not touched or not touched.numeric:
            return []
        statements = []
        levels = ((PARTIAL, None), (MINUTE, PARTIAL), (HOUR, MINUTE))
        windows: Mapping[int, set[str]] = touched.partials
        for level, below in levels:
            if below is not None:
                windows = _coarsen(windows, level.ms)
            for start, end, devices in _runs(windows, level.ms):
                ordered = sorted(devices)
                for i in range(0, len(ordered), DEVICES_PER_STATEMENT):
                    chosen = ordered[i : i + DEVICES_PER_STATEMENT]
                    if below is None:
                        statements.append(self.partials(start, end, chosen))
                    else:
                        statements.append(
                            self.merge(level, below, touched.numeric, start, end, chosen)
                        )
        return statements

    def for_range(self, numeric: Mapping[str, bool], start: int, end: int) -> list[str]:
        """Every level's statements for all devices over [start, end) (a rebuild)."""
        if not numeric:
            return []
        lo, hi = start - start % HOUR.ms, end + (-end % HOUR.ms)
        return [
            self.partials(lo, hi, None),
            self.merge(MINUTE, PARTIAL, numeric, lo, hi, None),
            self.merge(HOUR, MINUTE, numeric, lo, hi, None),
        ]


class _Group:
    """Batches whose windows one update recomputes."""

    def __init__(self) -> None:
        self.touched = Touched()
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()


def _beyond_retention(error: InfluxError) -> bool:
    """A window older than its level's retention: InfluxDB drops it, which is what we want."""
    return "beyond retention policy" in str(error)


class Rollups:
    """Recomputes the windows batches touched, in one generation of the database."""

    def __init__(
        self,
        influx: InfluxClient,
        *,
        retention_1m: str,
        retention_1h: str,
        initial_backoff: float = 0.2,
        max_backoff: float = 5.0,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        shared: SharedLock | None = None,
    ) -> None:
        self.influx = influx
        self.shared = shared
        self.retention = {MINUTE: retention_1m, HOUR: retention_1h}
        self.initial_backoff = initial_backoff
        self.max_backoff = max_backoff
        self._sleep = sleep
        self._lock = asyncio.Lock()
        self._groups: dict[str | None, _Group] = {}
        self._ensured: set[str] = set()

    async def generation(self) -> str:
        """The default retention policy now: where the live raw data is."""
        return await self.influx.default_policy()

    async def ensure_policies(self, raw_policy: str) -> None:
        """Create the generation's rollup policies that are missing (with the configured
        durations; `iot migrate` and the replay normally did)."""
        existing = {p.name for p in await self.influx.retention_policies()}
        for level, duration in self.retention.items():
            name = level.policy(raw_policy)
            if name not in existing:
                try:
                    await self.influx.create_retention_policy(
                        name, duration=duration, shard_duration=None
                    )
                except InfluxError as e:
                    if "already exists" not in str(e):
                        raise
                log.info("created rollup retention policy", extra={"policy": name})
        self._ensured.add(raw_policy)

    async def update(
        self,
        touched: Touched,
        *,
        policy: str | None = None,
        keepalive: Keepalive | None = None,
        stop: asyncio.Event | None = None,
    ) -> None:
        """Recompute every window `touched` names (in `policy`'s generation; by default the
        live one), retrying while InfluxDB is unavailable.

        Callers that arrive while an update runs join one group, and the first of them to get
        the lock updates the group's windows for all (each joined after its raw points were
        stored, and the group's statements start after the last joined): a group commit, so
        batches handled concurrently cost one update, not one each."""
        if not touched:
            return
        group = self._groups.get(policy)
        if group is None:
            group = self._groups[policy] = _Group()
        group.touched.update(touched)
        async with self._lock:
            if group.done.done():  # another member ran it
                return
            if self._groups.get(policy) is group:
                del self._groups[policy]  # from now on callers join the next group
            started = time.perf_counter()
            # a failure leaves the group undone: the next member to get the lock runs it again
            await self._retrying(
                lambda raw: Statements(self.influx.database, raw).for_touched(group.touched),
                policy,
                keepalive,
                stop,
                shared=self.shared,
            )
            group.done.set_result(None)
            ROLLUP_LATENCY.observe(time.perf_counter() - started)
            ROLLUP_WINDOWS.inc(sum(len(d) for d in group.touched.partials.values()))

    async def rebuild(self, policy: str, start: int, end: int) -> None:
        """Recompute every window of [start, end) (widened to whole hours) for all devices
        and metrics of `policy`'s raw data: a replay's bulk pass."""
        numeric = await self.metric_kinds(policy)
        async with self._lock:
            await self._retrying(
                lambda raw: Statements(self.influx.database, raw).for_range(numeric, start, end),
                policy,
                None,
                None,
                max_seconds=BULK_TIMEOUT_S,
            )

    async def metric_kinds(self, policy: str) -> dict[str, bool]:
        """Every field of the raw measurement of `policy`, True when numeric."""
        results = await self.influx.query(
            f"SHOW FIELD KEYS FROM {quote_ident(policy)}.{quote_ident(RAW_MEASUREMENT)}"
        )
        series = results[0].get("series") if results else None
        kinds: dict[str, bool] = {}
        for s in series or []:
            for name, kind in s.get("values", []):
                kinds[str(name)] = kinds.get(str(name), False) or kind in ("float", "integer")
        return kinds

    async def _retrying(
        self,
        build: Callable[[str], Sequence[str]],
        policy: str | None,
        keepalive: Keepalive | None,
        stop: asyncio.Event | None,
        *,
        max_seconds: float | None = None,
        shared: SharedLock | None = None,
    ) -> None:
        backoff = self.initial_backoff
        attempt = 0
        last_keepalive = time.monotonic()
        raw = policy or ""
        while True:
            try:
                raw = policy or await self.generation()
                if raw not in self._ensured:
                    await self.ensure_policies(raw)
                statements = build(raw)
                if statements:
                    async with shared or contextlib.nullcontext():
                        await self._run(statements, max_seconds)
                return
            except InfluxUnavailable as e:  # DatabaseNotFound included: the writer creates it
                attempt += 1
                ROLLUP_RETRIES.inc()
                if attempt & (attempt - 1) == 0:
                    log.warning(
                        "InfluxDB unavailable; retrying the rollup update",
                        extra={"error": str(e), "attempt": attempt},
                    )
                if isinstance(e, DatabaseNotFound):
                    self._ensured.clear()
                if stop is not None and stop.is_set():
                    raise Stopping("stopping while InfluxDB is unavailable") from e
                if keepalive is not None and time.monotonic() - last_keepalive >= 10.0:
                    last_keepalive = time.monotonic()
                    await keepalive()
                await self._sleep(backoff * random.uniform(0.8, 1.2))
                backoff = min(backoff * 2, self.max_backoff)
            except InfluxError as e:
                if "retention policy not found" in str(e) and raw in self._ensured:
                    self._ensured.discard(raw)  # dropped behind our back: create it again
                    continue
                raise

    async def _run(self, statements: Sequence[str], max_seconds: float | None) -> None:
        """All statements in one request. InfluxDB stops at the first failing statement, and
        when that is the first one it answers only "not executed", so after any failure the
        statements run one by one: a window beyond its level's retention is dropped, which is
        what retention means; anything else is raised."""
        try:
            await self.influx.query(";\n".join(statements), max_seconds=max_seconds)
            return
        except InfluxUnavailable:
            raise
        except InfluxError:
            pass
        for statement in statements:
            try:
                await self.influx.query(statement, max_seconds=max_seconds)
            except InfluxUnavailable:
                raise
            except InfluxError as e:
                if not _beyond_retention(e):
                    raise
