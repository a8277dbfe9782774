"""The timeseries projection on real NATS JetStream and InfluxDB 1.6, run in-process.

Each test writes to its own InfluxDB database named after its namespace, dropped afterwards.
The outage test starts a private `influxd` on random ports in a temporary directory.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import nats
import nats.js.errors
import pytest
from nats.aio.client import Client as NATS
from nats.js.client import JetStreamContext

from domain.ingest import Reading, Telemetry, encode_ingest
from infra.settings import Settings
from infra.streams import Streams
from projections import timeseries
from projections.influx import InfluxClient
from projections.timeseries import (
    JetStreamDeadLetters,
    PointWriter,
    TimeseriesProjection,
    run_projection,
)

pytestmark = pytest.mark.integration

T0 = 1_764_201_600_000  # epoch ms


@pytest.fixture
def settings(migrated: Settings) -> Iterator[Settings]:
    """The namespace's settings with an InfluxDB database of its own (dropped afterwards)."""
    own = dataclasses.replace(migrated, influx_db=migrated.namespace)
    yield own
    asyncio.run(_drop(own))


async def _drop(settings: Settings) -> None:
    async with InfluxClient(settings.influx_url, settings.influx_db) as influx:
        with contextlib.suppress(Exception):
            await influx.drop_database()


async def eventually(
    check: Callable[[], Awaitable[bool]], within: float = 30.0, what: str = "condition"
) -> None:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if await check():
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"{what} not reached within {within}s")


class Pipeline:
    """NATS connection, the namespace's streams and an InfluxDB client for one test."""

    def __init__(self, settings: Settings, nc: NATS) -> None:
        self.settings = settings
        self.nc = nc
        self.js: JetStreamContext = nc.jetstream()
        self.streams = Streams(settings.namespace)
        self.influx = InfluxClient(settings.influx_url, settings.influx_db)

    async def publish(self, message: Telemetry) -> bytes:
        body = encode_ingest(message)
        await self.publish_raw(message.device_id, body)
        return body

    async def publish_raw(self, device_id: str, body: bytes) -> None:
        subject = self.streams.ingest_subject("telemetry", device_id)
        await self.js.publish(subject, body, stream=self.streams.ingest)

    @contextlib.asynccontextmanager
    async def projector(self, influx_url: str | None = None) -> AsyncIterator[asyncio.Event]:
        """Run the projection in-process (two fetch loops, as in production) until the exit."""
        stop = asyncio.Event()
        influx = InfluxClient(influx_url or self.settings.influx_url, self.settings.influx_db)
        projection = TimeseriesProjection(
            PointWriter(influx, max_backoff=0.5),
            JetStreamDeadLetters(self.js, self.streams),
            stop=stop,
            keepalive_every=5.0,
        )
        task = asyncio.create_task(run_projection(self.js, self.streams, projection, stop))
        try:
            await eventually(self.consumer_exists, what="the durable consumer")
            yield stop
        finally:
            stop.set()
            await task
            await influx.aclose()

    async def count(self) -> int:
        """Points in the database, counted by the most frequent field."""
        results = await self.influx.query("SELECT count(*) FROM telemetry")
        series = results[0].get("series")
        if not series:
            return 0
        counts = [v for v in series[0]["values"][0][1:] if v is not None]
        return max(counts, default=0)

    async def points(self, device_id: str) -> list[dict[str, Any]]:
        results = await self.influx.query(
            f"SELECT * FROM telemetry WHERE device_id = '{device_id}'"
        )
        series = results[0].get("series")
        if not series:
            return []
        columns = series[0]["columns"]
        return [
            {c: v for c, v in zip(columns, row, strict=True) if v is not None}
            for row in series[0]["values"]
        ]

    async def consumer_exists(self) -> bool:
        try:
            await self.consumer()
        except nats.js.errors.NotFoundError:
            return False
        return True

    async def consumer(self) -> tuple[int, int, int]:
        """(ack floor stream sequence, ack pending, not yet delivered) of the durable."""
        info = await self.js.consumer_info(
            self.streams.ingest, self.streams.consumer(timeseries.PROJECTION)
        )
        floor = info.ack_floor.stream_seq if info.ack_floor else 0
        return floor, info.num_ack_pending or 0, info.num_pending or 0

    async def all_acked(self) -> bool:
        _, ack_pending, pending = await self.consumer()
        return ack_pending == 0 and pending == 0

    async def deadletters(self) -> list[Any]:
        info = await self.js.stream_info(self.streams.deadletter)
        return [
            await self.js.get_msg(self.streams.deadletter, seq)
            for seq in range(info.state.first_seq, info.state.last_seq + 1)
            if info.state.messages
        ]

    async def close(self) -> None:
        await self.influx.aclose()
        await self.nc.close()


@pytest.fixture
async def pipeline(settings: Settings) -> AsyncIterator[Pipeline]:
    nc = await nats.connect(settings.nats_url)
    p = Pipeline(settings, nc)
    yield p
    await p.close()


def sample(device_id: str, n: int, *, per_message: int = 1) -> list[Telemetry]:
    """`n` messages of `per_message` readings each, one millisecond apart, mixed value types."""
    messages = []
    for m in range(n):
        readings = []
        for r in range(per_message):
            k = m * per_message + r
            values: dict[str, float | int | bool | str] = {
                "temperature": 20 + k / 4,  # a float, and an integer every 4th reading
                "count": k,
                "on": k % 2 == 0,
                "mode": f'mode {k}, "quoted" \\ x=y',
            }
            readings.append(Reading(T0 + k, values))
        messages.append(Telemetry(device_id=device_id, received_at=T0 + 10_000, readings=readings))
    return messages


async def test_readings_become_points_with_device_time_and_one_field_per_metric(
    pipeline: Pipeline,
) -> None:
    for device_id in ("boiler-1", "boiler-2"):
        for message in sample(device_id, 10, per_message=5):
            await pipeline.publish(message)
    async with pipeline.projector():
        await eventually(pipeline.all_acked, what="all acknowledged")
    assert await pipeline.count() == 100
    points = await pipeline.points("boiler-2")
    assert len(points) == 50
    assert points[0] == {
        "time": T0,
        "device_id": "boiler-2",
        "temperature": 20.0,
        "count": 0.0,
        "on": True,
        "mode": 'mode 0, "quoted" \\ x=y',
    }
    assert points[49]["time"] == T0 + 49
    assert points[49]["temperature"] == 20 + 49 / 4
    assert points[49]["on"] is False
    fields = await pipeline.influx.query("SHOW FIELD KEYS FROM telemetry")
    types = dict(fields[0]["series"][0]["values"])
    assert types == {"count": "float", "mode": "string", "on": "boolean", "temperature": "float"}
    assert await pipeline.deadletters() == []


async def test_redelivered_and_republished_messages_leave_the_points_unchanged(
    pipeline: Pipeline,
) -> None:
    messages = sample("dev-a", 40, per_message=3)
    for message in messages:
        await pipeline.publish(message)
    async with pipeline.projector():
        await eventually(pipeline.all_acked, what="all acknowledged")
    assert await pipeline.count() == 120
    before = await pipeline.points("dev-a")

    # The same messages again on the stream (a republish), and the whole stream redelivered
    # to a consumer that starts from scratch.
    for message in messages:
        await pipeline.publish(message)
    await pipeline.js.delete_consumer(
        pipeline.streams.ingest, pipeline.streams.consumer(timeseries.PROJECTION)
    )
    async with pipeline.projector():
        await eventually(pipeline.all_acked, what="all acknowledged again")
    assert await pipeline.count() == 120
    assert await pipeline.points("dev-a") == before


async def test_a_field_type_conflict_dead_letters_that_message_and_stores_the_rest(
    pipeline: Pipeline,
) -> None:
    first = Telemetry(device_id="d1", received_at=T0, readings=[Reading(T0, {"level": 1.5})])
    await pipeline.publish(first)
    async with pipeline.projector():
        await eventually(pipeline.all_acked, what="first acknowledged")

    conflicting = Telemetry(
        device_id="d2", received_at=T0, readings=[Reading(T0 + 1, {"level": "high"})]
    )
    for i, message in enumerate(sample("d3", 30)):
        await pipeline.publish(message)
        if i == 10:  # a new field, numeric in one message and a string in the next
            await pipeline.publish(
                Telemetry(device_id="d5", received_at=T0, readings=[Reading(T0, {"fresh": 1.0})])
            )
            await pipeline.publish(
                Telemetry(device_id="d6", received_at=T0, readings=[Reading(T0, {"fresh": "x"})])
            )
        if i == 17:  # a string for a field already stored as a float
            bad = await pipeline.publish(conflicting)
    await pipeline.publish_raw("d4", b'{"kind": "telemetry.v1", "nonsense')
    async with pipeline.projector():
        await eventually(pipeline.all_acked, what="all settled")

    assert len(await pipeline.points("d1")) == 1
    assert len(await pipeline.points("d3")) == 30
    assert await pipeline.points("d2") == []
    fresh = await pipeline.points("d5") + await pipeline.points("d6")
    assert len(fresh) == 1  # whichever InfluxDB saw first; the other is dead-lettered
    letters = await pipeline.deadletters()
    assert sorted(letter.headers["Iot-Reason"] for letter in letters) == [
        "influx_rejected",
        "influx_rejected",
        "undecodable",
    ]
    topics = {letter.headers["Iot-Topic"]: letter for letter in letters}
    rejected = topics[pipeline.streams.ingest_subject("telemetry", "d2")]
    assert rejected.headers["Iot-Reason"] == "influx_rejected"
    assert rejected.data == bad
    assert rejected.subject == pipeline.streams.deadletter_subject("influx_rejected")
    assert "field type conflict" in rejected.headers["Iot-Detail"]
    other = {pipeline.streams.ingest_subject("telemetry", d) for d in ("d5", "d6")} & set(topics)
    assert len(other) == 1
    assert "field type conflict" in topics[other.pop()].headers["Iot-Detail"]
    undecodable = topics[pipeline.streams.ingest_subject("telemetry", "d4")]
    assert undecodable.headers["Iot-Reason"] == "undecodable"
    assert undecodable.data == b'{"kind": "telemetry.v1", "nonsense'


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class PrivateInflux:
    """An influxd of our own on random ports in a temporary directory, to stop and restart."""

    def __init__(self, root: Path) -> None:
        self.port = _free_port()
        self.config = root / "influxdb.conf"
        self.config.write_text(
            f"""
reporting-disabled = true
bind-address = "127.0.0.1:{_free_port()}"
[meta]
  dir = "{root}/meta"
[data]
  dir = "{root}/data"
  wal-dir = "{root}/wal"
  query-log-enabled = false
[http]
  bind-address = "127.0.0.1:{self.port}"
  log-enabled = false
[monitor]
  store-enabled = false
[continuous_queries]
  enabled = false
[subscriber]
  enabled = false
"""
        )
        self.log = root / "influxd.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                ["/usr/bin/influxd", "run", "-config", str(self.config)],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.url}/ping", timeout=1).status_code == 204:
                    return
            time.sleep(0.05)
        raise RuntimeError(f"private influxd did not start: {self.log.read_text()[-2000:]}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None


@pytest.fixture
def private_influx(tmp_path: Path) -> Iterator[PrivateInflux]:
    server = PrivateInflux(tmp_path)
    server.start()
    yield server
    server.stop()


async def test_nothing_is_acknowledged_while_influx_is_down_and_all_is_written_once_back(
    settings: Settings, private_influx: PrivateInflux
) -> None:
    own = dataclasses.replace(settings, influx_url=private_influx.url)
    nc = await nats.connect(own.nats_url)
    pipeline = Pipeline(own, nc)
    try:
        private_influx.stop()
        for message in sample("dev-down", 25, per_message=4):
            await pipeline.publish(message)
        retries = timeseries.RETRIES._value.get()
        async with pipeline.projector():

            async def delivered_and_retrying() -> bool:
                _, ack_pending, pending = await pipeline.consumer()
                return (
                    ack_pending == 25
                    and pending == 0
                    and timeseries.RETRIES._value.get() >= retries + 3
                )

            await eventually(delivered_and_retrying, what="retrying while InfluxDB is down")
            floor, ack_pending, _ = await pipeline.consumer()
            assert (floor, ack_pending) == (0, 25)

            await asyncio.to_thread(private_influx.start)  # the database does not exist yet
            await eventually(pipeline.all_acked, what="all acknowledged once InfluxDB is back")
        assert await pipeline.count() == 100
        assert len(await pipeline.points("dev-down")) == 100
        assert await pipeline.deadletters() == []
    finally:
        await pipeline.close()


async def test_influx_ping_is_true_only_for_a_reachable_server(settings: Settings) -> None:
    reachable = InfluxClient(settings.influx_url, settings.influx_db)
    closed = InfluxClient(f"http://127.0.0.1:{_free_port()}", settings.influx_db)
    try:
        assert await reachable.ping() is True
        assert await closed.ping() is False
    finally:
        await reachable.aclose()
        await closed.aclose()
