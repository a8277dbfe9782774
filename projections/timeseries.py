"""The `timeseries` projection: telemetry from JetStream `ingest.telemetry.*` into InfluxDB.

A durable pull consumer hands batches of messages to `TimeseriesProjection.handle`, which
decodes them, encodes every reading as one line-protocol point (measurement `telemetry`, tag
`device_id`, one field per metric, the reading's time in ms) and writes the whole batch in as few
requests as possible. The consumer acknowledges a batch only after the handler returns, and the
handler returns only once InfluxDB answered 204 for every point it did not reject:

- InfluxDB down, 5xx or timing out: the handler retries with backoff, keeping the messages in
  progress so JetStream does not redeliver them meanwhile; nothing is acknowledged before stored.
- a write InfluxDB refuses (400: field type conflict, unable to parse; it may have stored the
  other points): the batch is bisected and rewritten until the refused messages are isolated;
  exactly those are dead-lettered (`influx_rejected`) and terminated, the rest acknowledged.
- a message that does not decode as telemetry is dead-lettered (`undecodable`) and terminated.

The rollups (1-minute and 1-hour windows, `projections.rollups`) follow on a durable consumer
of their own (`RollupFollower`): once the raw consumer has acknowledged a batch's messages, the
windows they touched are recomputed in the same database generation, and only then is the
rollup consumer's batch acknowledged. (A replay, and tests, may also pass `rollups` to
`TimeseriesProjection`, which then recomputes them before each raw batch is acknowledged.)

A point is identified by measurement, tags and timestamp, so a redelivered message overwrites
itself: at-least-once delivery gives exactly-once contents. `PointWriter` and `TelemetryEncoder`
carry no consumer state, so a replay can drive them directly.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import msgspec
from nats.aio.msg import Msg
from nats.js.client import JetStreamContext
from prometheus_client import Counter, Histogram

from domain.ingest import Telemetry, decode_ingest
from infra import metrics, tracing
from infra.jetstream import (
    ConsumerSpec,
    Outcome,
    consume,
    ensure_consumer,
    publish_dead_letter,
    report_lag,
)
from infra.settings import Settings
from infra.streams import Streams
from projections.influx import DatabaseNotFound, InfluxError, InfluxRejected, InfluxUnavailable
from projections.lineproto import LineProtocolError, TelemetryEncoder
from projections.rollups import Rollups, Touched, rollup_lock
from projections.rollups import Stopping as Stopping  # noqa: PLC0414 (re-exported)

log = logging.getLogger(__name__)

PORT = 8083
PROJECTION = "timeseries"
FETCH_BATCH = 500  # messages per consumer fetch
FETCHERS = 4  # concurrent fetch loops: they decode and write while one waits on InfluxDB
ROLLUP_PROJECTION = "timeseries-rollups"
ROLLUP_BATCH = 5000  # messages per rollup update at most: one update costs about the same
ROLLUP_FETCH_WAIT_S = 1.0  # what arrived by then makes a batch: an update a second at most
FLOOR_POLL_S = 0.02  # how often the rollups look at the raw consumer's acknowledgement floor
MAX_REQUEST_BYTES = 2 * 1024 * 1024  # a batch is split into requests of about this size

POINTS_WRITTEN = Counter("iot_timeseries_points_written_total", "Points stored in InfluxDB")
WRITE_BATCHES = Counter(
    "iot_timeseries_write_batches_total", "Write requests InfluxDB answered", ["outcome"]
)
WRITE_LATENCY = Histogram(
    "iot_timeseries_write_duration_seconds",
    "Latency of one InfluxDB write request",
    buckets=(0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
)
REJECTED_POINTS = Counter(
    "iot_timeseries_rejected_points_total", "Points InfluxDB refused (their messages dead-lettered)"
)
DEADLETTERED = Counter(
    "iot_timeseries_deadlettered_total", "Messages dead-lettered by the projection", ["reason"]
)
RETRIES = Counter(
    "iot_timeseries_write_retries_total", "Write attempts repeated while InfluxDB was unavailable"
)


PROJECTION_LAG = metrics.PROJECTION_LAG.labels(PROJECTION)


class LineWriter(Protocol):
    """The port to a time-series store that takes line protocol (InfluxClient)."""

    async def write(self, lines: bytes) -> None: ...

    async def create_database(self) -> None: ...


class DeadLetterSink(Protocol):
    """Where refused input goes, with its reason; returns once stored."""

    async def publish(
        self, reason: str, topic: str, detail: str, data: bytes, msg_id: str | None
    ) -> None: ...


Keepalive = Callable[[], Awaitable[None]]


@dataclass
class _Throttled:
    """Calls `keepalive` at most once per `every` seconds."""

    keepalive: Keepalive | None
    every: float
    last: float

    async def __call__(self) -> None:
        now = time.monotonic()
        if self.keepalive is not None and now - self.last >= self.every:
            self.last = now
            await self.keepalive()


class PointWriter:
    """Writes groups of line-protocol points to InfluxDB until they are stored or refused.

    A group is the points of one message. `write_groups` returns only once every group is
    stored (204) or refused; it retries with backoff while InfluxDB is unavailable (creating the
    database if it is missing) and isolates refused groups by bisection: InfluxDB may store some
    points of a refused request and not others, and rewriting a stored point is harmless.
    """

    def __init__(
        self,
        influx: LineWriter,
        *,
        max_request_bytes: int = MAX_REQUEST_BYTES,
        initial_backoff: float = 0.2,
        max_backoff: float = 5.0,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.influx = influx
        self.max_request_bytes = max_request_bytes
        self.initial_backoff = initial_backoff
        self.max_backoff = max_backoff
        self._sleep = sleep

    async def write_groups(
        self,
        groups: Sequence[bytes],
        *,
        keepalive: Keepalive | None = None,
        keepalive_every: float = 10.0,
        stop: asyncio.Event | None = None,
    ) -> dict[int, str]:
        """Store every group; return {index: InfluxDB's error} for the groups it refused."""
        items = [(i, g) for i, g in enumerate(groups) if g]
        if not items:
            return {}
        throttled = _Throttled(keepalive, keepalive_every, time.monotonic())
        chunks = list(_chunks(items, self.max_request_bytes))
        if len(chunks) == 1:
            return await self._write_isolating(chunks[0], throttled, stop)
        refused: dict[int, str] = {}
        for part in await asyncio.gather(
            *(self._write_isolating(chunk, throttled, stop) for chunk in chunks)
        ):
            refused.update(part)
        return refused

    async def _write_isolating(
        self, items: Sequence[tuple[int, bytes]], keepalive: _Throttled, stop: asyncio.Event | None
    ) -> dict[int, str]:
        try:
            await self._write_until_stored(b"".join(g for _, g in items), keepalive, stop)
            return {}
        except InfluxRejected as e:
            if len(items) == 1:
                return {items[0][0]: e.detail}
            mid = len(items) // 2
            refused = await self._write_isolating(items[:mid], keepalive, stop)
            refused.update(await self._write_isolating(items[mid:], keepalive, stop))
            return refused

    async def _write_until_stored(
        self, body: bytes, keepalive: _Throttled, stop: asyncio.Event | None
    ) -> None:
        backoff = self.initial_backoff
        attempt = 0
        while True:
            start = time.perf_counter()
            try:
                await self.influx.write(body)
            except InfluxRejected:
                WRITE_BATCHES.labels("rejected").inc()
                raise
            except InfluxUnavailable as e:
                attempt += 1
                RETRIES.inc()
                if attempt & (attempt - 1) == 0:  # 1, 2, 4, 8...: a line per doubling
                    log.warning(
                        "InfluxDB unavailable; retrying the write",
                        extra={"error": str(e), "attempt": attempt},
                    )
                if isinstance(e, DatabaseNotFound):
                    with contextlib.suppress(InfluxError):
                        await self.influx.create_database()
                if stop is not None and stop.is_set():
                    raise Stopping("stopping while InfluxDB is unavailable") from e
                await keepalive()
                await self._sleep(backoff * random.uniform(0.8, 1.2))
                backoff = min(backoff * 2, self.max_backoff)
                continue
            WRITE_LATENCY.observe(time.perf_counter() - start)
            WRITE_BATCHES.labels("stored").inc()
            if attempt:
                log.info("InfluxDB write stored after retries", extra={"attempts": attempt + 1})
            return


def _chunks(
    items: Sequence[tuple[int, bytes]], max_bytes: int
) -> list[Sequence[tuple[int, bytes]]]:
    chunks: list[Sequence[tuple[int, bytes]]] = []
    start = 0
    size = 0
    for n, (_, group) in enumerate(items):
        if size and size + len(group) > max_bytes:
            chunks.append(items[start:n])
            start, size = n, 0
        size += len(group)
    chunks.append(items[start:])
    return chunks


class JetStreamDeadLetters:
    """Dead letters on JetStream `deadletter.<reason>`: headers name why, data is the input."""

    def __init__(self, js: JetStreamContext, streams: Streams) -> None:
        self.js = js
        self.streams = streams

    async def publish(
        self, reason: str, topic: str, detail: str, data: bytes, msg_id: str | None
    ) -> None:
        await publish_dead_letter(
            self.js,
            self.streams,
            source=PROJECTION,
            reason=reason,
            topic=topic,
            detail=detail,
            data=data,
            msg_id=msg_id,
        )


@dataclass(frozen=True)
class DeadLetter:
    index: int
    reason: str
    detail: str


def _stream_sequence(msg: Msg) -> int | None:
    try:
        return int(msg.metadata.sequence.stream)
    except Exception:  # not a JetStream delivery (tests, replays from a plain subscription)
        return None


class TimeseriesProjection:
    """The consumer's handler: batch of ingest messages in, points in InfluxDB, outcome out."""

    def __init__(
        self,
        writer: PointWriter,
        deadletters: DeadLetterSink,
        *,
        encoder: TelemetryEncoder | None = None,
        stop: asyncio.Event | None = None,
        keepalive_every: float = 10.0,
        clock: Callable[[], float] = time.time,
        rollups: Rollups | None = None,
    ) -> None:
        self.writer = writer
        self.rollups = rollups
        self.deadletters = deadletters
        self.encoder = encoder or TelemetryEncoder()
        self.stop = stop
        self.keepalive_every = keepalive_every
        self.clock = clock

    async def handle(self, msgs: Sequence[Msg]) -> Outcome:
        """Store a batch; its span `projection.timeseries.write` continues the readings' traces."""
        with tracing.batch_span("projection.timeseries.write", msgs, **{"db.system": "influxdb"}):
            return await self._handle(msgs)

    async def _handle(self, msgs: Sequence[Msg]) -> Outcome:
        groups: list[bytes] = [b""] * len(msgs)
        lines: list[int] = [0] * len(msgs)
        dead: list[DeadLetter] = []
        newest = 0
        encode = self.encoder.encode
        touched = Touched()
        for i, msg in enumerate(msgs):
            try:
                message = decode_ingest(msg.data)
            except (msgspec.DecodeError, msgspec.ValidationError) as e:
                dead.append(DeadLetter(i, "undecodable", str(e)))
                continue
            if not isinstance(message, Telemetry):
                dead.append(DeadLetter(i, "undecodable", f"not telemetry: {type(message)}"))
                continue
            try:
                text = encode(message)
            except LineProtocolError as e:
                dead.append(DeadLetter(i, "influx_rejected", f"not representable: {e}"))
                continue
            groups[i] = text.encode()
            lines[i] = text.count("\n")
            newest = max(newest, message.received_at)
            touched.add(message.device_id, message.readings)

        async def keepalive() -> None:
            for msg in msgs:
                await msg.in_progress()

        refused = await self.writer.write_groups(
            groups, keepalive=keepalive, keepalive_every=self.keepalive_every, stop=self.stop
        )
        if self.rollups is not None:  # before the batch is acknowledged
            await self.rollups.update(touched, keepalive=keepalive, stop=self.stop)
        for i, detail in refused.items():
            dead.append(DeadLetter(i, "influx_rejected", detail))
            REJECTED_POINTS.inc(lines[i])
        for letter in dead:
            msg = msgs[letter.index]
            seq = _stream_sequence(msg)
            await self.deadletters.publish(
                letter.reason,
                msg.subject,
                letter.detail,
                msg.data,
                f"{PROJECTION}:{seq}" if seq is not None else None,
            )
            DEADLETTERED.labels(letter.reason).inc()
            log.warning(
                "telemetry dead-lettered",
                extra={"reason": letter.reason, "detail": letter.detail, "topic": msg.subject},
            )
        POINTS_WRITTEN.inc(sum(lines) - sum(lines[i] for i in refused))
        if newest:
            PROJECTION_LAG.set(max(0.0, self.clock() - newest / 1000))
        return Outcome(poison={letter.index for letter in dead})


class RollupFollower:
    """The rollups of what the raw consumer stored, on a durable consumer of their own.

    Recomputing the windows a batch touched costs about the same for a batch of 10 messages as
    for one of 5,000, so it is done off the raw path: the raw consumer stores and acknowledges
    as before, and this consumer (`timeseries-rollups`, same filter) takes large batches, waits
    until the raw consumer's acknowledgement floor has passed the batch's last message (its
    raw points are stored), recomputes the touched windows and only then acknowledges. A crash
    in between redelivers the batch, which recomputes the same windows; a late reading arrives
    in a later batch and recomputes its window again. Rollups trail the raw points by about
    one batch's update (`iot_timeseries_rollup_duration_seconds`)."""

    def __init__(
        self,
        js: JetStreamContext,
        raw: ConsumerSpec,
        rollups: Rollups,
        *,
        stop: asyncio.Event | None = None,
        keepalive_every: float = 10.0,
        poll_s: float = FLOOR_POLL_S,
    ) -> None:
        self.js = js
        self.raw = raw
        self.rollups = rollups
        self.stop = stop
        self.keepalive_every = keepalive_every
        self.poll_s = poll_s

    async def handle(self, msgs: Sequence[Msg]) -> Outcome:
        touched = Touched()
        top = 0
        for msg in msgs:
            top = max(top, _stream_sequence(msg) or 0)
            try:
                message = decode_ingest(msg.data)
            except (msgspec.DecodeError, msgspec.ValidationError):
                continue  # the raw consumer dead-letters it
            if isinstance(message, Telemetry):
                touched.add(message.device_id, message.readings)

        async def keepalive() -> None:
            for msg in msgs:
                await msg.in_progress()

        await self._stored(top, keepalive)
        await self.rollups.update(touched, keepalive=keepalive, stop=self.stop)
        return Outcome()

    async def _stored(self, seq: int, keepalive: Callable[[], Awaitable[None]]) -> None:
        """Until every message up to `seq` is acknowledged by the raw consumer."""
        kept = time.monotonic()
        while True:
            info = await self.js.consumer_info(self.raw.stream, self.raw.durable)
            if int(info.ack_floor.stream_seq or 0) >= seq:
                return
            if self.stop is not None and self.stop.is_set():
                raise Stopping("stopping before the raw points of this batch were stored")
            if time.monotonic() - kept >= self.keepalive_every:
                await keepalive()
                kept = time.monotonic()
            await asyncio.sleep(self.poll_s)


def rollup_consumer_spec(streams: Streams, batch: int = ROLLUP_BATCH) -> ConsumerSpec:
    return ConsumerSpec(
        stream=streams.ingest,
        durable=streams.consumer(ROLLUP_PROJECTION),
        filter_subject=streams.ingest_kind_wildcard("telemetry"),
        batch=batch,
        fetch_wait=ROLLUP_FETCH_WAIT_S,
    )


def consumer_spec(streams: Streams, batch: int = FETCH_BATCH) -> ConsumerSpec:
    return ConsumerSpec(
        stream=streams.ingest,
        durable=streams.consumer(PROJECTION),
        filter_subject=streams.ingest_kind_wildcard("telemetry"),
        batch=batch,
    )


async def run_projection(
    js: JetStreamContext,
    streams: Streams,
    projection: TimeseriesProjection,
    stop: asyncio.Event,
    *,
    fetchers: int = FETCHERS,
    batch: int = FETCH_BATCH,
    follower: RollupFollower | None = None,
) -> None:
    """Consume until `stop` is set: `fetchers` pull loops on one durable consumer, lag reports;
    with a `follower`, its own loop on the rollup consumer."""
    spec = consumer_spec(streams, batch)
    await _ensure_consumer_once(js, spec)
    tasks = [consume(js, spec, projection.handle, stop) for _ in range(fetchers)]
    if follower is not None:
        rollup_spec = rollup_consumer_spec(streams)
        await _ensure_consumer_once(js, rollup_spec)
        tasks.append(consume(js, rollup_spec, follower.handle, stop))
    await asyncio.gather(*tasks, report_lag(js, spec, stop))


async def _ensure_consumer_once(js: JetStreamContext, spec: ConsumerSpec) -> None:
    """Create the durable before the loops start, so they do not race to create it."""
    with contextlib.suppress(Exception):  # NATS down: each loop retries on its own
        await ensure_consumer(js, spec)


async def run(settings: Settings) -> None:
    """Composition root of `iot run projector timeseries`."""
    from starlette.routing import BaseRoute

    from infra.httpkit import build_app, serve
    from infra.runtime import close_nats, connect_nats, retry_async, stop_on_signals
    from projections.influx import InfluxClient

    stop = stop_on_signals()
    streams = Streams(settings.namespace)
    nc = await retry_async(
        "NATS", lambda: connect_nats(settings.nats_url, "iot-projector-timeseries")
    )
    js = nc.jetstream()
    influx = InfluxClient(settings.influx_url, settings.influx_db)
    try:
        await influx.create_database()
    except InfluxError as e:  # created on the first write instead
        log.warning("could not create the InfluxDB database yet", extra={"error": str(e)})
    spec = consumer_spec(streams)
    projection = TimeseriesProjection(
        PointWriter(influx),
        JetStreamDeadLetters(js, streams),
        stop=stop,
        keepalive_every=spec.ack_wait / 3,
    )
    follower = RollupFollower(
        js,
        spec,
        Rollups(
            influx,
            retention_1m=settings.retention_1m,
            retention_1h=settings.retention_1h,
            shared=rollup_lock(js, streams, settings.influx_db),
        ),
        stop=stop,
        keepalive_every=spec.ack_wait / 3,
    )

    async def ready() -> Mapping[str, bool]:
        return {"nats": nc.is_connected, "influxdb": await influx.ping()}

    routes: list[BaseRoute] = []
    port = settings.port_for(PORT)
    server = asyncio.create_task(serve(build_app(routes, ready), settings.http_host, port, stop))
    consumer = asyncio.create_task(run_projection(js, streams, projection, stop, follower=follower))
    log.info(
        "timeseries projector running",
        extra={"port": port, "influx": settings.influx_url, "database": settings.influx_db},
    )
    try:
        done, _ = await asyncio.wait({server, consumer}, return_when=asyncio.FIRST_COMPLETED)
        for task in done:
            task.result()  # a server that could not start stops the process
    finally:
        stop.set()
        await asyncio.gather(server, consumer, return_exceptions=True)
        await influx.aclose()
        with contextlib.suppress(Exception):
            await close_nats(nc)
