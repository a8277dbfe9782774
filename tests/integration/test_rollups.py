"""Rollups on real NATS JetStream and InfluxDB: exact against a query over the raw data.

The projection runs in-process with rollups on; every test compares each 1-minute and 1-hour
window with InfluxDB's own aggregation of the raw points of that window (count, min, max, mean,
last), after duplicated messages, late readings into windows already rolled up, and a batch
handled twice (a redelivery).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import math
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import nats
import pytest
from nats.aio.client import Client as NATS

from commands.migrate import migrate_influx
from domain.ingest import Reading, Telemetry, encode_ingest
from infra.replay import Progress, ReplayContext
from infra.rollups import HOUR, MINUTE, Level
from infra.settings import Settings
from infra.streams import Streams
from projections import timeseries
from projections.influx import InfluxClient
from projections.rollups import Rollups, rollup_lock
from projections.timeseries import JetStreamDeadLetters, PointWriter, TimeseriesProjection
from projections.timeseries_replay import TimeseriesReplay

pytestmark = pytest.mark.integration

NOW_MS = int(time.time() * 1000)
T0 = NOW_MS - NOW_MS % HOUR.ms - 3 * HOUR.ms  # three whole hours ago: inside every retention

Table = dict[tuple[str, int, str], Any]  # (device, window start, "<kind>_<metric>") -> value


@pytest.fixture
def settings(migrated: Settings) -> Iterator[Settings]:
    """A database of the test's own (its rollup policies are created by the projector)."""
    own = dataclasses.replace(migrated, influx_db=migrated.namespace)
    yield own

    async def drop() -> None:
        async with InfluxClient(own.influx_url, own.influx_db) as influx:
            with contextlib.suppress(Exception):
                await influx.drop_database()

    asyncio.run(drop())


class Harness:
    def __init__(self, settings: Settings, nc: NATS) -> None:
        self.settings = settings
        self.nc = nc
        self.js = nc.jetstream()
        self.streams = Streams(settings.namespace)
        self.influx = InfluxClient(settings.influx_url, settings.influx_db)
        self.projection = self.replica()

    def replica(self) -> TimeseriesProjection:
        """A projection as one projector process has it (its own rollups, the shared lock)."""
        return TimeseriesProjection(
            PointWriter(self.influx),
            JetStreamDeadLetters(self.js, self.streams),
            rollups=Rollups(
                self.influx,
                retention_1m="90d",
                retention_1h="1095d",
                shared=rollup_lock(self.js, self.streams, self.settings.influx_db),
            ),
        )

    async def publish(self, message: Telemetry) -> None:
        subject = self.streams.ingest_subject("telemetry", message.device_id)
        await self.js.publish(subject, encode_ingest(message), stream=self.streams.ingest)

    @contextlib.asynccontextmanager
    async def projector(self, replicas: int = 1) -> AsyncIterator[None]:
        """`replicas` projections on the one durable consumer, as the deployment runs them."""
        stop = asyncio.Event()
        projections = [self.projection] + [self.replica() for _ in range(replicas - 1)]
        tasks = [
            asyncio.create_task(timeseries.run_projection(self.js, self.streams, p, stop))
            for p in projections
        ]
        try:
            yield
        finally:
            stop.set()
            await asyncio.gather(*tasks)

    async def all_acked(self) -> bool:
        with contextlib.suppress(Exception):
            info = await self.js.consumer_info(
                self.streams.ingest, self.streams.consumer(timeseries.PROJECTION)
            )
            return not info.num_ack_pending and not info.num_pending
        return False

    async def settled(self, within: float = 30.0) -> None:
        """Every published message handled and acknowledged (rollups included)."""
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            if await self.all_acked():
                return
            await asyncio.sleep(0.05)
        raise AssertionError("the projector did not acknowledge everything")

    async def raw(self, level: Level) -> Table:
        """InfluxDB's aggregation of the raw points by window."""
        return await self._table(
            "SELECT count(*), min(*), max(*), mean(*), last(*) FROM telemetry "
            f"WHERE time >= {T0 - HOUR.ms}ms AND time < {NOW_MS}ms "
            f"GROUP BY time({level.ms}ms), device_id fill(none)"
        )

    async def rollup(self, level: Level) -> Table:
        policy = level.policy(await self.influx.default_policy())
        return await self._table(f'SELECT * FROM "{policy}"."{level.measurement}" GROUP BY *')

    async def _table(self, statement: str) -> Table:
        results = await self.influx.query(statement)
        table: Table = {}
        for series in results[0].get("series") or []:
            device = series["tags"]["device_id"]
            for row in series["values"]:
                for column, value in zip(series["columns"][1:], row[1:], strict=True):
                    if value is not None:
                        table[(device, row[0], column)] = value
        return table

    async def close(self) -> None:
        await self.influx.aclose()
        await self.nc.close()


@pytest.fixture
async def harness(settings: Settings) -> AsyncIterator[Harness]:
    h = Harness(settings, await nats.connect(settings.nats_url))
    yield h
    await h.close()


def assert_exact(raw: Table, rollup: Table) -> None:
    """Every raw aggregate the rollups keep is there and equal (means to rounding)."""
    kept = {
        key: value
        for key, value in raw.items()
        if key[2].startswith(("count_", "last_"))
        or (key[2].startswith(("min_", "max_", "mean_")) and isinstance(value, float))
    }
    assert kept, "no raw data"
    missing = sorted(set(kept) - set(rollup))
    assert not missing, f"windows missing from the rollups: {missing[:5]}"
    wrong = [
        (key, value, rollup[key])
        for key, value in kept.items()
        if not (
            math.isclose(value, rollup[key], rel_tol=1e-12)
            if isinstance(value, float)
            else value == rollup[key]
        )
    ]
    assert not wrong, f"rollup windows differ from the raw data: {wrong[:5]}"
    counts = {k: v for k, v in rollup.items() if k[2].startswith("count_")}
    assert counts == {k: v for k, v in kept.items() if k[2].startswith("count_")}


def readings(start: int, n: int, step: int, base: float) -> list[Reading]:
    return [
        Reading(
            start + k * step,
            {"temperature": base + (k * 7919 % 101) / 4, "mode": f"m{k % 3}", "on": k % 2 == 0},
        )
        for k in range(n)
    ]


async def test_rollups_are_exact_after_duplicates_late_readings_and_a_redelivery(
    harness: Harness,
) -> None:
    """Two replicas share the consumer: each batch's windows may be another's too."""
    messages = []
    for d, device in enumerate(("boiler-1", "boiler-2", "boiler-3")):
        # two hours and a bit, a reading every 37 s, 10 readings a message
        rs = readings(T0 + d * 1_000, 220, 37_000, 20.0 + d)
        messages += [
            Telemetry(device_id=device, received_at=NOW_MS, readings=rs[i : i + 10])
            for i in range(0, len(rs), 10)
        ]
    async with harness.projector(replicas=2):
        for message in messages:
            await harness.publish(message)
        for message in messages[::7]:  # duplicated deliveries: the same readings again
            await harness.publish(message)
        await harness.settled()
        first = await harness.rollup(MINUTE)
        # late readings into windows rolled up already, one of them changing a minimum
        late = Telemetry(
            device_id="boiler-2",
            received_at=NOW_MS,
            readings=[
                Reading(T0 + 59_500, {"temperature": -40.0, "mode": "late"}),
                Reading(T0 + 3_600_500, {"temperature": 99.5}),
                Reading(T0 + 90 * 60_000 + 1, {"temperature": 21.25, "on": True}),
            ],
        )
        await harness.publish(late)
        await asyncio.sleep(0.2)
        await harness.settled()
    # a redelivery: the handler sees batches it stored already
    redelivered = [_Delivery(encode_ingest(m)) for m in [*messages[:12], late]]
    await harness.projection.handle(redelivered)  # type: ignore[arg-type]
    for level in (MINUTE, HOUR):
        assert_exact(await harness.raw(level), await harness.rollup(level))
    minute = await harness.rollup(MINUTE)
    assert minute[("boiler-2", T0, "min_temperature")] == -40.0
    assert minute[("boiler-2", T0, "last_mode")] == "late"  # 59.5 s is after 38 s
    assert (
        minute[("boiler-2", T0, "count_temperature")]
        == first[("boiler-2", T0, "count_temperature")] + 1
    )


class _Delivery:
    """A message as the handler reads it (not a JetStream delivery: no metadata)."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.subject = "ingest.telemetry.x"
        self.headers: dict[str, str] | None = None

    async def in_progress(self) -> None:
        return None


def _same(a: Table, b: Table) -> bool:
    return a.keys() == b.keys() and all(
        math.isclose(v, b[k], rel_tol=1e-12) if isinstance(v, float) else v == b[k]
        for k, v in a.items()
    )


async def test_a_replay_rebuilds_the_rollups_identically_and_switches_them_with_the_raw_data(
    harness: Harness,
) -> None:
    rs = readings(T0 + 250, 300, 29_000, 10.0)
    messages = [
        Telemetry(device_id=f"meter-{i % 2}", received_at=NOW_MS, readings=rs[i : i + 15])
        for i in range(0, len(rs), 15)
    ]
    async with harness.projector():
        for message in messages:
            await harness.publish(message)
        await harness.settled()
    old = await harness.influx.default_policy()
    before = {level: await harness.rollup(level) for level in (MINUTE, HOUR)}
    # an old window whose raw data is gone (a shorter raw retention): carried over as it is
    async with InfluxClient(
        harness.settings.influx_url, harness.settings.influx_db, retention_policy=MINUTE.policy(old)
    ) as rollup_writer:
        await rollup_writer.write(
            f"telemetry_1m,device_id=gone count_x=3i {T0 - HOUR.ms}\n".encode()
        )
    before[MINUTE][("gone", T0 - HOUR.ms, "count_x")] = 3

    replay = TimeseriesReplay(ReplayContext(harness.settings, harness.nc, grace=0.2, caught_up=50))
    await replay.run(Progress(enabled=False))

    new = await harness.influx.default_policy()
    assert new != old
    names = {p.name for p in await harness.influx.retention_policies()}
    assert names == {new, MINUTE.policy(new), HOUR.policy(new)}
    for level in (MINUTE, HOUR):
        assert _same(await harness.rollup(level), before[level]), level.name
        rollup = {k: v for k, v in (await harness.rollup(level)).items() if k[0] != "gone"}
        assert_exact(await harness.raw(level), rollup)


async def test_migrate_gives_the_live_generation_the_configured_retention(
    settings: Settings,
) -> None:
    configured = dataclasses.replace(
        settings, retention_raw="30d", retention_1m="2d", retention_1h="INF"
    )
    steps = await migrate_influx(configured)
    assert "retention policy autogen_1m: 2160h0m0s -> 2d" in steps  # migrated with 90d first
    async with InfluxClient(settings.influx_url, settings.influx_db) as influx:
        durations = {p.name: (p.duration, p.default) for p in await influx.retention_policies()}
        assert durations == {
            "autogen": ("720h0m0s", True),
            "autogen_1m": ("48h0m0s", False),
            "autogen_1h": ("0s", False),
        }
        assert await migrate_influx(configured) == [
            "retention policy autogen: 30d",
            "retention policy autogen_1m: 2d",
            "retention policy autogen_1h: INF",
        ]
        await migrate_influx(dataclasses.replace(configured, retention_1m="12w"))
        minute = next(p for p in await influx.retention_policies() if p.name == "autogen_1m")
        assert minute.duration == "2016h0m0s"
