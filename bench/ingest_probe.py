"""What the ingest benchmark observes: readings visible in InfluxDB and in the Redis views,
publish-to-visible latency of sampled devices, CPU per process group and peak memory."""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
import redis.asyncio as aioredis

from bench.ingest_load import Load
from bench.stats import percentile
from bench.system import CLOCK_TICKS, _busy_seconds
from infra.views import METRIC_FIELD, ViewKeys
from projections.influx import InfluxClient

MEASUREMENT = "telemetry"
_metric_value = msgspec.json.Decoder(dict[str, Any])


def _quote(text: str) -> str:
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


class Visibility:
    """Reads back what a phase stored: InfluxDB points and the Redis views' latest values."""

    def __init__(self, redis: aioredis.Redis, influx: InfluxClient, namespace: str) -> None:
        self.redis = redis
        self.influx = influx
        self.keys = ViewKeys.for_namespace(namespace)

    async def influx_count(self, metric: str) -> int:
        results = await self.influx.query(f'SELECT count("{metric}") FROM "{MEASUREMENT}"')
        for result in results:
            for series in result.get("series", []):
                return int(series["values"][0][1])
        return 0

    async def influx_last(self, metric: str, devices: Sequence[str]) -> dict[str, int]:
        where = " OR ".join(f'"device_id" = {_quote(d)}' for d in devices)
        results = await self.influx.query(
            f'SELECT last("{metric}") FROM "{MEASUREMENT}" WHERE {where} GROUP BY "device_id"'
        )
        found: dict[str, int] = {}
        for result in results:
            for series in result.get("series", []):
                found[series["tags"]["device_id"]] = int(series["values"][0][1])
        return found

    async def redis_last(self, metric: str, devices: Sequence[str]) -> list[int | None]:
        pipe = self.redis.pipeline(transaction=False)
        for device in devices:
            pipe.hget(self.keys.device(device), METRIC_FIELD + metric)
        raw: list[bytes | None] = await pipe.execute()
        return [None if r is None else int(_metric_value.decode(r)["value"]) for r in raw]

    async def redis_matching(self, metric: str, expected: Mapping[str, int]) -> int:
        """How many devices' views show their expected last value."""
        devices = list(expected)
        values = await self.redis_last(metric, devices)
        return sum(1 for d, v in zip(devices, values, strict=True) if v == expected[d])


@dataclass
class Completion:
    """Whether (and when) every reading of a phase was visible in both stores."""

    readings: int
    in_influx: int
    devices: int
    views_matching: int
    visible_at: float | None  # monotonic time the last check found everything, else None
    influx_at: float | None = None  # monotonic time InfluxDB first held every reading

    @property
    def completeness(self) -> float:
        """The smaller of points stored / readings sent and views up to date / devices."""
        if not self.readings:
            return math.nan
        influx = self.in_influx / self.readings
        views = self.views_matching / self.devices if self.devices else 1.0
        return min(influx, views)


async def wait_visible(
    vis: Visibility, load: Load, within: float, interval: float = 0.1
) -> Completion:
    """Poll until InfluxDB holds every reading of `load` and every view its last value."""
    expected = load.last_values()
    deadline = time.monotonic() + within
    influx = matching = 0
    influx_at: float | None = None
    while True:
        if influx_at is None:
            influx = await vis.influx_count(load.metric)
            if influx >= load.readings:
                influx_at = time.monotonic()
        if influx_at is not None:
            matching = await vis.redis_matching(load.metric, expected)
            if matching == len(expected):
                done = time.monotonic()
                return Completion(load.readings, influx, len(expected), matching, done, influx_at)
        if time.monotonic() >= deadline:
            matching = await vis.redis_matching(load.metric, expected)
            return Completion(load.readings, influx, len(expected), matching, None, influx_at)
        await asyncio.sleep(interval)


@dataclass
class _Seen:
    last: int = -1
    at: dict[int, float] = field(default_factory=dict)  # value -> first poll that showed it

    def saw(self, value: int | None, now: float) -> None:
        # Values grow with device time, so every value up to the one shown is visible by now
        # and was not at the previous poll: its visibility lies in (previous poll, now].
        if value is not None and value > self.last:
            for v in range(self.last + 1, value + 1):
                self.at[v] = now
            self.last = value


class LatencyProbe:
    """Polls the views (Redis) and InfluxDB for a few devices' latest value of a metric."""

    def __init__(
        self,
        vis: Visibility,
        metric: str,
        devices: Sequence[str],
        redis_every: float = 0.005,
        influx_every: float = 0.02,
    ) -> None:
        self.vis = vis
        self.metric = metric
        self.devices = list(devices)
        self.redis_every = redis_every
        self.influx_every = influx_every
        self.redis_seen = {d: _Seen() for d in self.devices}
        self.influx_seen = {d: _Seen() for d in self.devices}
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        self._tasks = [
            asyncio.create_task(self._poll_redis()),
            asyncio.create_task(self._poll_influx()),
        ]

    async def stop(self) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks)

    async def _poll_redis(self) -> None:
        while not self._stop.is_set():
            values = await self.vis.redis_last(self.metric, self.devices)
            now = time.monotonic()
            for device, value in zip(self.devices, values, strict=True):
                self.redis_seen[device].saw(value, now)
            await asyncio.sleep(self.redis_every)

    async def _poll_influx(self) -> None:
        while not self._stop.is_set():
            found = await self.vis.influx_last(self.metric, self.devices)
            now = time.monotonic()
            for device, value in found.items():
                if device in self.influx_seen:
                    self.influx_seen[device].saw(value, now)
            await asyncio.sleep(self.influx_every)

    def latencies(self, load: Load, skip: float) -> tuple[list[float], list[float], list[float]]:
        """Seconds from publish to visible in the views, in InfluxDB, and in both, for readings
        published `skip` s or more after the phase started."""
        views: list[float] = []
        influx: list[float] = []
        both: list[float] = []
        for d, times in load.times.items():
            device = load.devices[d]
            seen_r = self.redis_seen[device].at
            seen_i = self.influx_seen[device].at
            for value, published in enumerate(times):
                if published < load.started + skip:
                    continue
                r = seen_r.get(value)
                i = seen_i.get(value)
                if r is not None:
                    views.append(r - published)
                if i is not None:
                    influx.append(i - published)
                if r is not None and i is not None:
                    both.append(max(r, i) - published)
        return views, influx, both


def ms(samples: Sequence[float], q: float) -> float:
    return 1000 * percentile(samples, q)


# --- processes: CPU and memory ------------------------------------------------------------


def _cpu_seconds(pid: int) -> float:
    raw = Path(f"/proc/{pid}/stat").read_text()
    rest = raw[raw.rindex(")") + 2 :].split()
    return (int(rest[11]) + int(rest[12])) / CLOCK_TICKS


def _comm(pid: int) -> str:
    return Path(f"/proc/{pid}/comm").read_text().strip()


def pids_named(prefix: str) -> list[int]:
    found = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if _comm(int(entry.name)).startswith(prefix):
                    found.append(int(entry.name))
    return found


def listening_pid(port: int) -> int | None:
    """The process listening on a local TCP port (by socket inode), if we can see it."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(table).read_text().splitlines()[1:]:
                cols = line.split()
                if cols[3] == "0A" and int(cols[1].rsplit(":", 1)[1], 16) == port:
                    inodes.add(f"socket:[{cols[9]}]")
    if not inodes:
        return None
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            for fd in os.scandir(f"/proc/{entry.name}/fd"):
                with contextlib.suppress(OSError):
                    if os.readlink(fd.path) in inodes:
                        return int(entry.name)
    return None


def memory_kib(pid: int, field_name: str) -> int:
    """VmRSS or VmHWM of a process, KiB (0 when gone)."""
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    return 0


@dataclass(frozen=True)
class CpuSnapshot:
    at: float
    seconds: Mapping[str, float]
    busy: float


@dataclass(frozen=True)
class CpuSpan:
    """CPU between two snapshots: % of one core per group, and of the whole machine."""

    wall: float
    percent: Mapping[str, float]
    machine: float

    def per_reading_us(self, group: str, readings: int) -> float:
        """CPU microseconds of `group` per reading."""
        if not readings:
            return math.nan
        return 1e6 * self.percent[group] / 100 * self.wall / readings


class GroupMeter:
    """CPU seconds of process groups (each a list of pids, read from /proc)."""

    def __init__(self, groups: Mapping[str, Sequence[int]]) -> None:
        self.groups = {g: list(p) for g, p in groups.items()}
        self.extra: dict[str, float] = {}  # CPU seconds of processes that exited meanwhile

    def set(self, group: str, pids: Sequence[int]) -> None:
        self.groups[group] = list(pids)

    def snapshot(self) -> CpuSnapshot:
        seconds = {}
        for group, pids in self.groups.items():
            total = self.extra.get(group, 0.0)
            for pid in pids:
                with contextlib.suppress(OSError, ValueError, IndexError):
                    total += _cpu_seconds(pid)
            seconds[group] = total
        return CpuSnapshot(time.monotonic(), seconds, _busy_seconds())


def cpu_span(start: CpuSnapshot, end: CpuSnapshot) -> CpuSpan:
    wall = max(1e-9, end.at - start.at)
    percent = {g: 100 * (end.seconds[g] - start.seconds.get(g, 0.0)) / wall for g in end.seconds}
    return CpuSpan(wall, percent, 100 * (end.busy - start.busy) / wall)


class RssWatch:
    """Samples VmRSS of process groups in the background; keeps each group's largest process."""

    def __init__(self, groups: Mapping[str, Sequence[int]], every: float = 0.25) -> None:
        self.groups = {g: list(p) for g, p in groups.items()}
        self.every = every
        self.peak_kib: dict[str, int] = dict.fromkeys(self.groups, 0)
        self._task: asyncio.Task[None] | None = None

    def sample(self) -> None:
        for group, pids in self.groups.items():
            for pid in pids:
                self.peak_kib[group] = max(self.peak_kib[group], memory_kib(pid, "VmRSS"))

    async def _run(self) -> None:
        while True:
            await asyncio.to_thread(self.sample)
            await asyncio.sleep(self.every)

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self.sample()
