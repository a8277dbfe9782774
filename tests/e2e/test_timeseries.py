"""`iot run projector timeseries` as a process: a SIGKILL mid-stream loses and repeats nothing,
in the raw points and in the rollups (late readings among them)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from collections.abc import Iterator

import httpx
import nats
import pytest

from domain.ingest import Reading, Telemetry, encode_ingest
from infra.rollups import HOUR, MINUTE, Level
from infra.settings import Settings
from infra.streams import Streams
from projections.influx import InfluxClient
from projections.timeseries import consumer_spec
from tests.e2e.processes import Component, free_port
from tests.integration.test_rollups import Table, assert_exact

pytestmark = pytest.mark.e2e

NOW_MS = int(time.time() * 1000)
T0 = NOW_MS - NOW_MS % 3_600_000 - 2 * 3_600_000  # recent: inside the rollups' retention
DEVICES = 20
MESSAGES = 4_000
PER_MESSAGE = 5  # 20,000 readings


@pytest.fixture
def settings(migrated: Settings) -> Iterator[Settings]:
    """The namespace's settings with an InfluxDB database of its own (dropped afterwards)."""
    own = dataclasses.replace(migrated, influx_db=migrated.namespace)
    yield own

    async def drop() -> None:
        async with InfluxClient(own.influx_url, own.influx_db) as influx:
            with contextlib.suppress(Exception):
                await influx.drop_database()

    asyncio.run(drop())


def projector(settings: Settings, **env: str) -> Component:
    return Component(settings, "projector", "timeseries", IOT_INFLUX_DB=settings.influx_db, **env)


async def point_count(influx: InfluxClient) -> int:
    with contextlib.suppress(Exception):  # the database may not exist yet
        results = await influx.query("SELECT count(v) FROM telemetry")
        series = results[0].get("series")
        return int(series[0]["values"][0][1]) if series else 0
    return 0


async def publish_paced(settings: Settings, done: asyncio.Event) -> None:
    """Publish the 20,000 readings in small bursts, so the projector is killed mid-stream."""
    streams = Streams(settings.namespace)
    nc = await nats.connect(settings.nats_url)
    js = nc.jetstream()
    try:
        for m in range(MESSAGES):
            device_id = f"dev-{m % DEVICES:02d}"
            base = T0 + (m // DEVICES) * 1_000  # a message a second per device
            if m % 10 == 9 and base >= T0 + 60_000:  # late: into a window a minute back
                base -= 59_500  # (at times of their own)
            message = Telemetry(
                device_id=device_id,
                received_at=int(time.time() * 1000),
                readings=[Reading(base + r, {"v": float(m), "r": r}) for r in range(PER_MESSAGE)],
            )
            await js.publish(
                streams.ingest_subject("telemetry", device_id),
                encode_ingest(message),
                stream=streams.ingest,
            )
            if m % 100 == 99:
                await asyncio.sleep(0.05)
    finally:
        done.set()
        await nc.close()


async def wait_for(influx: InfluxClient, at_least: int, within: float = 60.0) -> int:
    deadline = time.monotonic() + within
    count = 0
    while time.monotonic() < deadline:
        count = await point_count(influx)
        if count >= at_least:
            return count
        await asyncio.sleep(0.1)
    return count


async def all_acked(settings: Settings) -> bool:
    streams = Streams(settings.namespace)
    nc = await nats.connect(settings.nats_url)
    try:
        for name in ("timeseries", "timeseries-rollups"):  # the raw points, then the rollups
            info = await nc.jsm().consumer_info(streams.ingest, streams.consumer(name))
            if info.num_ack_pending or info.num_pending:
                return False
        return True
    finally:
        await nc.close()


async def settled(settings: Settings, within: float) -> None:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if await all_acked(settings):
            return
        await asyncio.sleep(0.1)


async def raw_table(influx: InfluxClient, level: Level) -> Table:
    return await table(
        influx,
        f"SELECT count(*), min(*), max(*), mean(*), last(*) FROM telemetry "
        f"WHERE time >= {T0 - HOUR.ms}ms AND time < {T0 + 2 * HOUR.ms}ms "
        f"GROUP BY time({level.ms}ms), device_id fill(none)",
    )


async def rollup_table(influx: InfluxClient, level: Level) -> Table:
    policy = level.policy(await influx.default_policy())
    return await table(influx, f'SELECT * FROM "{policy}"."{level.measurement}" GROUP BY *')


async def table(influx: InfluxClient, statement: str) -> Table:
    out: Table = {}
    for series in (await influx.query(statement))[0].get("series") or []:
        for row in series["values"]:
            for column, value in zip(series["columns"][1:], row[1:], strict=True):
                if value is not None:
                    out[(series["tags"]["device_id"], row[0], column)] = value
    return out


async def kill_with_messages_in_flight(
    settings: Settings, component: Component, done: asyncio.Event
) -> None:
    """SIGKILL the projector, preferably while it holds delivered, unacknowledged messages."""
    streams = Streams(settings.namespace)
    nc = await nats.connect(settings.nats_url)
    try:
        while not done.is_set():
            info = await nc.jsm().consumer_info(streams.ingest, streams.consumer("timeseries"))
            if info.num_ack_pending:
                break
            await asyncio.sleep(0.005)
    finally:
        component.kill()
        await nc.close()


async def test_projector_killed_mid_way_and_restarted_stores_every_reading_exactly_once(
    settings: Settings,
) -> None:
    total = MESSAGES * PER_MESSAGE
    influx = InfluxClient(settings.influx_url, settings.influx_db)
    done = asyncio.Event()
    first = projector(settings)
    second: Component | None = None
    try:
        await asyncio.to_thread(first.wait_ready)
        publisher = asyncio.create_task(publish_paced(settings, done))
        assert await wait_for(influx, 2_000) >= 2_000
        await kill_with_messages_in_flight(settings, first, done)
        assert not done.is_set(), "the kill must land while readings are still being published"
        assert await point_count(influx) < total

        second = projector(settings)
        await asyncio.to_thread(second.wait_ready)
        await publisher
        # A message the killed projector held comes back after the consumer's ack wait; a
        # redelivery can itself land in a pull request that expired and wait once more.
        ack_wait = consumer_spec(Streams(settings.namespace)).ack_wait
        assert await wait_for(influx, total, within=3 * ack_wait) == total
        await asyncio.sleep(1.0)  # a duplicate or a stray point, if any, would land now
        assert await point_count(influx) == total
        results = await influx.query("SELECT count(v) FROM telemetry WHERE device_id = 'dev-07'")
        assert results[0]["series"][0]["values"][0][1] == total // DEVICES

        await settled(settings, within=3 * ack_wait)  # the last batches' rollups, then the ack
        for level in (MINUTE, HOUR):
            raw = await raw_table(influx, level)
            assert_exact(raw, await rollup_table(influx, level))

        async with httpx.AsyncClient() as client:
            metrics = (await client.get(f"{second.url}/metrics")).text
        assert "iot_timeseries_points_written_total" in metrics
        assert 'iot_projection_lag_seconds{projection="timeseries"}' in metrics
    finally:
        first.stop()
        if second is not None:
            second.stop()
        await influx.aclose()


def test_projector_is_not_ready_while_influx_is_unreachable(settings: Settings) -> None:
    component = projector(settings, IOT_INFLUX_URL=f"http://127.0.0.1:{free_port()}")
    try:
        deadline = time.monotonic() + 20
        status = None
        while time.monotonic() < deadline and status is None:
            with contextlib.suppress(httpx.HTTPError):
                status = httpx.get(f"{component.url}/readyz", timeout=5).status_code
            time.sleep(0.05)
        assert status == 503
        body = httpx.get(f"{component.url}/readyz", timeout=5).json()
        assert body["checks"] == {"nats": True, "influxdb": False}
    finally:
        component.stop()
