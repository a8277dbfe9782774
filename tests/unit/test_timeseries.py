"""The timeseries projection's handler and writer, against fake InfluxDB and dead-letter sinks."""

from __future__ import annotations

import asyncio

import pytest
from nats.aio.msg import Msg

from domain.ingest import Reading, Status, Telemetry, encode_ingest
from projections.influx import DatabaseNotFound, InfluxRejected, InfluxUnavailable
from projections.timeseries import PROJECTION_LAG, PointWriter, Stopping, TimeseriesProjection

NOW = 1_764_201_700.0


class FakeInflux:
    """Stores lines by point identity; can be down, missing the database, or refuse a marker."""

    def __init__(self) -> None:
        self.points: dict[str, str] = {}  # "series ts" -> fields
        self.requests: list[bytes] = []
        self.down = 0
        self.missing = False
        self.created = 0
        self.refuse: str | None = None

    async def write(self, lines: bytes) -> None:
        self.requests.append(lines)
        if self.down:
            self.down -= 1
            raise InfluxUnavailable("connection refused")
        if self.missing:
            raise DatabaseNotFound("database not found")
        refused = 0
        for line in lines.decode().splitlines():
            if self.refuse and self.refuse in line:
                refused += 1
                continue
            series, fields, ts = line.split(" ")
            self.points[f"{series} {ts}"] = fields
        if refused:
            raise InfluxRejected(400, f"partial write: field type conflict dropped={refused}")

    async def create_database(self) -> None:
        self.created += 1
        self.missing = False


class FakeNats:
    def __init__(self) -> None:
        self.published: list[tuple[str, bytes]] = []

    async def publish(self, subject: str, payload: bytes) -> None:
        self.published.append((subject, payload))


class FakeDeadLetters:
    def __init__(self) -> None:
        self.letters: list[tuple[str, str, str, bytes, str | None]] = []

    async def publish(
        self, reason: str, topic: str, detail: str, data: bytes, msg_id: str | None
    ) -> None:
        self.letters.append((reason, topic, detail, data, msg_id))


class Sleeps:
    def __init__(self) -> None:
        self.slept: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.slept.append(seconds)


def delivery(nc: FakeNats, seq: int, data: bytes, device_id: str = "d1") -> Msg:
    reply = f"$JS.ACK.T_INGEST.t_timeseries.1.{seq}.{seq}.1764201600000000000.0"
    return Msg(_client=nc, subject=f"t.ingest.telemetry.{device_id}", reply=reply, data=data)  # type: ignore[arg-type]


def telemetry(device_id: str, ts: int, **values: float | bool | str) -> bytes:
    return encode_ingest(
        Telemetry(device_id=device_id, received_at=ts + 5, readings=[Reading(ts, dict(values))])
    )


class Harness:
    def __init__(self, **writer_options: float) -> None:
        self.influx = FakeInflux()
        self.sleeps = Sleeps()
        self.deadletters = FakeDeadLetters()
        self.nc = FakeNats()
        self.stop = asyncio.Event()
        self.projection = TimeseriesProjection(
            PointWriter(self.influx, sleep=self.sleeps, **writer_options),  # type: ignore[arg-type]
            self.deadletters,
            stop=self.stop,
            keepalive_every=0.0,
            clock=lambda: NOW,
        )

    def msgs(self, bodies: list[bytes]) -> list[Msg]:
        return [delivery(self.nc, seq, body) for seq, body in enumerate(bodies, start=1)]


async def test_a_batch_is_written_in_one_request_and_nothing_is_poison() -> None:
    h = Harness()
    bodies = [telemetry(f"d{i}", 1000 + i, temperature=20 + i, on=True) for i in range(50)]
    outcome = await h.projection.handle(h.msgs(bodies))
    assert outcome.poison == set()
    assert outcome.retry == set()
    assert len(h.influx.requests) == 1
    assert len(h.influx.points) == 50
    assert h.influx.points["telemetry,device_id=d7 1007"] == "temperature=27.0,on=true"
    assert h.deadletters.letters == []


async def test_a_batch_with_several_readings_per_message_gives_a_point_per_reading() -> None:
    h = Harness()
    body = encode_ingest(
        Telemetry(
            device_id="d1",
            received_at=10_000,
            readings=[Reading(ts, {"x": float(ts)}) for ts in range(1000, 1050)],
        )
    )
    await h.projection.handle(h.msgs([body, body]))
    assert len(h.influx.points) == 50  # the same message twice overwrites itself


async def test_a_large_batch_is_split_into_bounded_requests() -> None:
    h = Harness(max_request_bytes=200)
    bodies = [telemetry("d1", 1000 + i, temperature=20.5) for i in range(20)]
    outcome = await h.projection.handle(h.msgs(bodies))
    assert outcome.poison == set()
    assert len(h.influx.requests) > 1
    assert all(len(r) <= 200 for r in h.influx.requests)
    assert len(h.influx.points) == 20


async def test_undecodable_and_non_telemetry_messages_are_dead_lettered_and_poison() -> None:
    h = Harness()
    status = encode_ingest(Status(device_id="d1", received_at=1, online=True))
    bodies = [telemetry("d1", 1000, x=1), b"{not json", status, telemetry("d1", 1001, x=2)]
    outcome = await h.projection.handle(h.msgs(bodies))
    assert outcome.poison == {1, 2}
    assert [letter[0] for letter in h.deadletters.letters] == ["undecodable", "undecodable"]
    _, topic, _, data, msg_id = h.deadletters.letters[0]
    assert (topic, data, msg_id) == ("t.ingest.telemetry.d1", b"{not json", "timeseries:2")
    assert len(h.influx.points) == 2


async def test_a_refused_message_is_isolated_dead_lettered_and_the_rest_stored() -> None:
    h = Harness()
    h.influx.refuse = "mode="
    bodies = [telemetry(f"d{i}", 1000 + i, x=i) for i in range(16)]
    bodies[11] = telemetry("d11", 1011, mode="eco")
    outcome = await h.projection.handle(h.msgs(bodies))
    assert outcome.poison == {11}
    assert len(h.deadletters.letters) == 1
    reason, _, detail, data, msg_id = h.deadletters.letters[0]
    assert reason == "influx_rejected"
    assert "field type conflict" in detail
    assert data == bodies[11]
    assert msg_id == "timeseries:12"
    assert len(h.influx.points) == 15
    assert len(h.influx.requests) < 16  # bisection, not one request per message


async def test_several_refused_messages_are_each_dead_lettered_once() -> None:
    h = Harness()
    h.influx.refuse = "bad="
    bodies = [telemetry("d1", 1000 + i, bad="s") if i % 3 == 0 else telemetry("d1", 1000 + i, x=i)
              for i in range(10)]  # fmt: skip
    outcome = await h.projection.handle(h.msgs(bodies))
    assert outcome.poison == {0, 3, 6, 9}
    assert len(h.deadletters.letters) == 4
    assert len(h.influx.points) == 6


async def test_an_unencodable_value_is_dead_lettered_without_a_write() -> None:
    h = Harness()
    outcome = await h.projection.handle(h.msgs([telemetry("line\nbreak", 1000, x=1)]))
    assert outcome.poison == {0}
    assert h.deadletters.letters[0][0] == "influx_rejected"
    assert h.influx.requests == []


async def test_writes_are_retried_with_backoff_while_influx_is_down_keeping_messages_alive() -> (
    None
):
    h = Harness()
    h.influx.down = 4
    msgs = h.msgs([telemetry("d1", 1000, x=1), telemetry("d1", 1001, x=2)])
    outcome = await h.projection.handle(msgs)
    assert outcome.poison == set()
    assert len(h.influx.requests) == 5
    assert len(h.influx.points) == 2
    assert len(h.sleeps.slept) == 4
    assert h.sleeps.slept[3] > h.sleeps.slept[0]  # backing off
    progress = [p for _, p in h.nc.published if p == b"+WPI"]
    assert len(progress) == 4 * len(msgs)  # every message kept in progress on every retry


async def test_backoff_is_capped() -> None:
    h = Harness(max_backoff=1.0)
    h.influx.down = 12
    await h.projection.handle(h.msgs([telemetry("d1", 1000, x=1)]))
    assert max(h.sleeps.slept) <= 1.2


async def test_stopping_while_influx_is_down_raises_so_nothing_is_acknowledged() -> None:
    h = Harness()
    h.influx.down = 1_000_000
    h.stop.set()
    with pytest.raises(Stopping):
        await h.projection.handle(h.msgs([telemetry("d1", 1000, x=1)]))
    assert h.influx.points == {}


async def test_a_missing_database_is_created_and_the_write_repeated() -> None:
    h = Harness()
    h.influx.missing = True
    outcome = await h.projection.handle(h.msgs([telemetry("d1", 1000, x=1)]))
    assert outcome.poison == set()
    assert h.influx.created == 1
    assert len(h.influx.points) == 1


async def test_messages_without_values_are_acknowledged_without_a_write() -> None:
    h = Harness()
    empty = encode_ingest(Telemetry(device_id="d1", received_at=1, readings=[]))
    outcome = await h.projection.handle(h.msgs([empty]))
    assert outcome.poison == set()
    assert h.influx.requests == []


async def test_lag_is_now_minus_the_newest_receive_time_applied() -> None:
    h = Harness()
    newest_ms = int((NOW - 2.5) * 1000)
    await h.projection.handle(
        h.msgs([telemetry("d1", newest_ms - 1000, x=1), telemetry("d1", newest_ms - 5, x=2)])
    )
    assert PROJECTION_LAG._value.get() == pytest.approx(2.5)
