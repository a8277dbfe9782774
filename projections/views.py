"""`iot run projector views`: domain events and device messages -> the Redis device views.

Two durable pull consumers in one process: the EVENTS stream (doc, status and label indexes,
device list; one compare-and-set script per event on the device version, so several instances
keep per-device order; commands to devices ride on the same script) and the INGEST stream
(latest value of each metric by device time, last seen, online, reported state and its config
version, readings per minute; one script per batch, commutative and idempotent). The layout
is `infra.views`; the gateway reads it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import msgspec
import redis.asyncio as aioredis
from nats.aio.msg import Msg
from nats.js.client import JetStreamContext
from nats.js.errors import NotFoundError
from prometheus_client import Counter, Gauge, Histogram
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import NoScriptError, ResponseError
from starlette.routing import BaseRoute

from domain.ingest import CommandSent, decode_ingest
from domain.published import (
    PublishedEvent,
    RuleEvent,
    StreamEvent,
    decode_event,
    decode_stream_event,
)
from infra import metrics, tracing
from infra.httpkit import build_app, serve
from infra.jetstream import ConsumerSpec, Outcome, consume, dead_letter_message, report_lag
from infra.runtime import close_nats, connect_nats, retry_async, stop_on_signals
from infra.settings import Settings
from infra.streams import Streams
from infra.views import CurrentKeys, ViewKeys, marker_key
from projections import views_scripts
from projections.views_plan import (
    DeviceState,
    EventPlan,
    IngestPlan,
    MissingRegistration,
    decode_doc,
    plan_event,
    plan_rule_event,
)

log = logging.getLogger(__name__)
VIEWS_PORT = 8083
EVENTS_CONSUMER = "views_events"
INGEST_CONSUMER = "views_ingest"
RULES_CONSUMER = "views_rules"
POSITION_HEADER = "Iot-Position"  # set by the relay on every EVENTS message
ACK_WAIT_S = 10.0  # a batch takes milliseconds; a killed instance's batch moves on after this

MESSAGES = Counter(
    "iot_views_messages_total",
    "Messages handled by the views projection, by input and outcome",
    ["input", "outcome"],
)
SCRIPT_LATENCY = Histogram(
    "iot_views_redis_seconds",
    "Round trip of one batch's Redis scripts (pipelined)",
    ["input"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0),
)
CHANGES = Counter(
    "iot_views_changes_total", "Change notifications published on the changes channel"
)


LAG = metrics.PROJECTION_LAG.labels(projection="views")
POSITION = Gauge(
    "iot_views_position",
    "Event-store position up to which every domain event is applied in the views",
)


class ViewsLost(Exception):
    """A guarded write was refused: the loss marker is gone or not the token the projector knows
    (Redis lost its data, or the views were rebuilt since). Nothing of the batch was written by
    the script that refused; the batch must not be acknowledged."""


@dataclass
class Marker:
    """The loss marker as the live projector knows it: its key and the token it last saw
    (`infra.views.marker_key`); "" while the views are known lost."""

    key: str
    token: str = ""

    @classmethod
    def for_namespace(cls, namespace: str) -> Marker:
        return cls(marker_key(namespace))


class Scripts:
    """EVALSHA with a reload on NOSCRIPT (a restarted or flushed Redis)."""

    def __init__(self, redis: aioredis.Redis) -> None:
        self.redis = redis
        self.sha = {
            "events": _sha1(views_scripts.EVENTS),
            "ingest": _sha1(views_scripts.INGEST),
            "checkpoint": _sha1(views_scripts.CHECKPOINT),
        }

    async def load(self) -> None:
        await self.redis.script_load(views_scripts.EVENTS)
        await self.redis.script_load(views_scripts.INGEST)
        await self.redis.script_load(views_scripts.CHECKPOINT)

    async def pipeline(self, commands: Sequence[Sequence[Any]]) -> list[Any]:
        """Run commands (`(script name, keys, args)` or plain ones) in one round trip."""
        for attempt in (1, 2):
            pipe = self.redis.pipeline(transaction=False)
            for command in commands:
                if command[0] in self.sha:
                    name, keys, args = command
                    pipe.execute_command("EVALSHA", self.sha[name], len(keys), *keys, *args)
                else:
                    pipe.execute_command(*command)
            results: list[Any] = await pipe.execute(raise_on_error=False)
            if attempt == 1 and any(isinstance(r, NoScriptError) for r in results):
                await self.load()
                continue  # every effect is idempotent: running the batch again is safe
            for result in results:
                if isinstance(result, ResponseError) and str(result).startswith(views_scripts.LOST):
                    raise ViewsLost(str(result))
                if isinstance(result, Exception):
                    raise result
            return results
        raise AssertionError("unreachable")


def _sha1(source: str) -> str:
    import hashlib

    return hashlib.sha1(source.encode(), usedforsecurity=False).hexdigest()


@dataclass
class Applied:
    """What `apply_events` could not apply: indexes to retry later (a gap), and indexes of
    events for a device never registered (with the reason), which no retry will fix."""

    retry: set[int] = field(default_factory=set)
    missing: dict[int, str] = field(default_factory=dict)
    applied: int = 0


@dataclass
class DecodedEvents:
    events: list[tuple[int, StreamEvent]]  # (batch index, event)
    undecodable: dict[int, str]  # batch index -> why


def decode_events(msgs: Sequence[Msg]) -> DecodedEvents:
    """The batch's domain events (devices' or rules'), tagged with their index; the
    undecodable ones with why."""
    batch = DecodedEvents([], {})
    for i, msg in enumerate(msgs):
        try:
            batch.events.append((i, decode_stream_event(msg.data)))
        except (msgspec.DecodeError, msgspec.ValidationError) as e:
            batch.undecodable[i] = str(e)
    return batch


@dataclass
class PlannedIngest:
    plan: IngestPlan
    undecodable: dict[int, str]  # batch index -> why
    applied: int = 0
    ignored: int = 0  # the bridge's CommandSent reports: the aggregate's event shows them


def plan_ingest(msgs: Sequence[Msg]) -> PlannedIngest:
    """The batch's device messages reduced to one ingest plan; the undecodable ones with why."""
    batch = PlannedIngest(IngestPlan(), {})
    for i, msg in enumerate(msgs):
        try:
            message = decode_ingest(msg.data)
        except (msgspec.DecodeError, msgspec.ValidationError) as e:
            batch.undecodable[i] = str(e)
            continue
        if isinstance(message, CommandSent):
            batch.ignored += 1
            continue
        batch.plan.add(msg.metadata.sequence.stream, message)
        batch.applied += 1
    return batch


class ViewsProjector:
    """The two handlers; each returns only once its batch is applied in Redis.

    Live (`keys` None), each batch resolves the generation in use (`infra.views.CurrentKeys`)
    and lands wholly in it, so a replay's switch takes effect at the next batch; a replay
    passes the fixed, silent keys of the generation it builds.

    With a `marker` (the live process), every write names the loss marker's token and is
    refused (`ViewsLost`) unless Redis holds it: see `projections.views_recovery`.
    """

    def __init__(
        self,
        redis: aioredis.Redis,
        js: JetStreamContext | None,
        namespace: str,
        clock: Callable[[], float] = time.time,
        keys: ViewKeys | None = None,
        marker: Marker | None = None,
    ) -> None:
        self.redis = redis
        self.marker = marker if keys is None else None
        self.js = js
        self.current = CurrentKeys(redis, namespace)
        self.fixed = keys
        self.streams = Streams(namespace)
        self.scripts = Scripts(redis)
        self.clock = clock

    @property
    def keys(self) -> ViewKeys:
        """The keys of the generation the last batch went to."""
        return self.fixed if self.fixed is not None else self.current.cached

    async def resolve_keys(self) -> ViewKeys:
        if self.fixed is not None:
            return self.fixed
        keys = await self.current.resolve()
        if self.marker is not None and self.current.marker != self.marker.token:
            raise ViewsLost(f"views marker {self.marker.key} is gone or changed")
        return keys

    def _guard_args(self) -> list[str]:
        """The events and ingest scripts' trailing arguments: the marker and its token."""
        return [] if self.marker is None else [self.marker.key, self.marker.token]

    async def handle_events(self, msgs: Sequence[Msg]) -> Outcome:
        with tracing.batch_span("projection.views.apply", msgs, **{"iot.input": "events"}):
            return await self._handle_events(msgs)

    async def _handle_events(self, msgs: Sequence[Msg]) -> Outcome:
        keys = await self.resolve_keys()
        outcome = Outcome()
        batch = decode_events(msgs)
        for i, detail in batch.undecodable.items():
            await self._dead_letter(msgs[i], "undecodable_event", detail)
            outcome.poison.add(i)
        positions = {i: event.position for i, event in batch.events}
        applied = await self.apply_events(keys, batch.events)
        outcome.retry |= applied.retry
        for i, detail in applied.missing.items():
            await self._dead_letter(msgs[i], "missing_registration", detail)
            outcome.poison.add(i)
        await self.checkpoint(keys, msgs, positions, outcome)
        return outcome

    async def checkpoint(
        self,
        keys: ViewKeys,
        msgs: Sequence[Msg],
        positions: Mapping[int, int],
        outcome: Outcome,
    ) -> None:
        """Fold the batch's done messages (all but the retried) into the views position."""
        pairs: list[int] = []
        for i, msg in enumerate(msgs):
            if i not in outcome.retry:
                pairs += [msg.metadata.sequence.stream, positions.get(i, 0)]
        if not pairs:
            return
        script_keys = [keys.position, keys.position_seq, keys.position_ahead]
        args: list[int | str] = ["", *pairs]
        if self.marker is not None:
            script_keys.append(self.marker.key)
            args[0] = self.marker.token
        (position,) = await self.scripts.pipeline([("checkpoint", script_keys, args)])
        if self.fixed is None:
            POSITION.set(int(position))

    async def apply_events(
        self, keys: ViewKeys, events: Sequence[tuple[int, StreamEvent]]
    ) -> Applied:
        """Apply decoded events (each tagged with an index of the caller's) in Redis."""
        result = Applied()
        by_device: dict[str, list[tuple[int, PublishedEvent]]] = defaultdict(list)
        rules: dict[str, list[tuple[int, RuleEvent]]] = defaultdict(list)
        for i, event in events:
            if isinstance(event, RuleEvent):
                rules[event.rule_id].append((i, event))
            else:
                by_device[event.device_id].append((i, event))
        if rules:
            await self._apply_rules(keys, rules, result)
        if not by_device:
            return result
        devices = list(by_device)
        start = time.perf_counter()
        stored = await self.scripts.pipeline(
            [("HMGET", keys.device(d), "version", "doc", "commands") for d in devices]
        )
        plans: list[tuple[int, EventPlan]] = []
        for device_id, (raw_version, raw_doc, raw_commands) in zip(devices, stored, strict=True):
            version = int(raw_version or 0)
            state = DeviceState.decode(raw_doc, raw_commands)
            for i, event in sorted(by_device[device_id], key=lambda x: x[1].version):
                if event.version <= version:
                    MESSAGES.labels("events", "skipped").inc()
                elif event.version > version + 1:
                    result.retry.add(i)  # a gap: its predecessor is elsewhere or later
                    MESSAGES.labels("events", "retried").inc()
                else:
                    try:
                        plan, state = plan_event(keys, event, state)
                    except MissingRegistration as e:
                        result.missing[i] = str(e)
                        continue
                    plans.append((i, plan))
                    version = event.version
        if not plans:
            return result
        batch = msgspec.json.encode([plan.batch_entry(keys) for _, plan in plans])
        (results,) = await self.scripts.pipeline([("events", [], [batch, *self._guard_args()])])
        SCRIPT_LATENCY.labels("events").observe(time.perf_counter() - start)
        newest = None
        for (i, plan), outcome in zip(plans, results, strict=True):
            if outcome == 1:
                result.applied += 1
                MESSAGES.labels("events", "applied").inc()
                CHANGES.inc()
                newest = plan.at if newest is None or plan.at > newest else newest
            elif outcome == 0:
                MESSAGES.labels("events", "skipped").inc()
            else:
                result.retry.add(i)
                MESSAGES.labels("events", "retried").inc()
        if newest is not None and self.fixed is None:
            LAG.set(max(0.0, self.clock() - newest.timestamp()))
        return result

    async def _apply_rules(
        self, keys: ViewKeys, rules: dict[str, list[tuple[int, RuleEvent]]], result: Applied
    ) -> None:
        """Rule docs, compare-and-set on the rule's version like a device's."""
        ids = list(rules)
        stored = await self.scripts.pipeline(
            [("HMGET", keys.rule(r), "version", "doc") for r in ids]
        )
        plans: list[tuple[int, EventPlan]] = []
        for rule_id, (raw_version, raw_doc) in zip(ids, stored, strict=True):
            version = int(raw_version or 0)
            doc = decode_doc(raw_doc)
            for i, event in sorted(rules[rule_id], key=lambda x: x[1].version):
                if event.version <= version:
                    MESSAGES.labels("events", "skipped").inc()
                elif event.version > version + 1:
                    result.retry.add(i)
                    MESSAGES.labels("events", "retried").inc()
                else:
                    plan = plan_rule_event(keys, event, doc)
                    doc = decode_doc(plan.doc)
                    plans.append((i, plan))
                    version = event.version
        if not plans:
            return
        batch = msgspec.json.encode([plan.batch_entry(keys) for _, plan in plans])
        (results,) = await self.scripts.pipeline([("events", [], [batch, *self._guard_args()])])
        for (i, _), outcome in zip(plans, results, strict=True):
            if outcome == 1:
                result.applied += 1
                MESSAGES.labels("events", "applied").inc()
            elif outcome == 0:
                MESSAGES.labels("events", "skipped").inc()
            else:
                result.retry.add(i)
                MESSAGES.labels("events", "retried").inc()

    async def handle_ingest(self, msgs: Sequence[Msg]) -> Outcome:
        with tracing.batch_span("projection.views.apply", msgs, **{"iot.input": "ingest"}):
            return await self._handle_ingest(msgs)

    async def _handle_ingest(self, msgs: Sequence[Msg]) -> Outcome:
        outcome = Outcome()
        batch = plan_ingest(msgs)
        for i, detail in batch.undecodable.items():
            await self._dead_letter(msgs[i], "undecodable_ingest", detail)
            outcome.poison.add(i)
        await self.apply_ingest(await self.resolve_keys(), batch.plan)
        MESSAGES.labels("ingest", "applied").inc(batch.applied)
        MESSAGES.labels("ingest", "ignored").inc(batch.ignored)
        return outcome

    async def apply_ingest(self, keys: ViewKeys, plan: IngestPlan) -> None:
        """Apply one batch's reduced device messages in Redis (one script)."""
        if plan.devices or plan.readings:
            now_ms = int(self.clock() * 1000)
            script_keys, args = plan.script_args(keys, now_ms)
            args += self._guard_args()
            start = time.perf_counter()
            (changed,) = await self.scripts.pipeline([("ingest", script_keys, args)])
            CHANGES.inc(changed)
            SCRIPT_LATENCY.labels("ingest").observe(time.perf_counter() - start)
        if plan.newest is not None and self.fixed is None:
            LAG.set(max(0.0, self.clock() - plan.newest / 1000))

    async def _dead_letter(self, msg: Msg, reason: str, detail: str) -> None:
        """Keep an input we cannot apply on the dead-letter stream, with its reason."""
        log.error("views: message dead-lettered", extra={"reason": reason, "detail": detail})
        MESSAGES.labels(_input_of(msg.subject), "poison").inc()
        if self.js is None:
            raise RuntimeError(f"cannot dead-letter ({reason}): no JetStream")
        await dead_letter_message(self.js, self.streams, "views", reason, msg, detail)


async def report_online(projector: ViewsProjector, stop: asyncio.Event, every: float = 5.0) -> None:
    """Keep `iot_devices_online` at the size of the online set of the generation in use."""
    while not stop.is_set():
        with contextlib.suppress(Exception):  # Redis down: the readiness check says so
            keys = await projector.resolve_keys()
            metrics.DEVICES_ONLINE.set(await projector.redis.scard(keys.online))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), every)


def _input_of(subject: str) -> str:
    return "ingest" if ".ingest." in f".{subject}" else "events"


async def seed_checkpoint(
    redis: aioredis.Redis, js: JetStreamContext, keys: ViewKeys, spec: ConsumerSpec
) -> None:
    """Start the checkpoint at the consumer's ack floor when the views have none yet (views
    built before the checkpoint existed); a new consumer starts from 0."""
    if await redis.exists(keys.position_seq):
        return
    try:
        info = await js.consumer_info(spec.stream, spec.durable)
    except NotFoundError:
        return
    floor = int(info.ack_floor.stream_seq or 0) if info.ack_floor else 0
    if floor == 0:
        return
    stored = await js.get_msg(spec.stream, floor)
    position = _position_of(stored.headers, stored.data)
    await redis.eval(views_scripts.SEED, 2, keys.position, keys.position_seq, floor, position)
    log.info("views checkpoint seeded", extra={"stream_seq": floor, "position": position})


def _position_of(headers: Mapping[str, str] | None, data: bytes | None) -> int:
    """A stored message's event position: its `Iot-Position` header, else its body, else 0."""
    raw = (headers or {}).get(POSITION_HEADER, "")
    if raw.isdigit():
        return int(raw)
    try:
        return decode_event(data or b"").position
    except (msgspec.DecodeError, msgspec.ValidationError):
        return 0


def rules_spec(namespace: str) -> ConsumerSpec:
    """The rules' events of the EVENTS stream (NATS 2.9 gives a consumer one filter, and the
    events consumer's is `events.>`); it checkpoints into the same views position, so the
    stream's sequence has no gap where a rule's event is."""
    streams = Streams(namespace)
    return ConsumerSpec(
        stream=streams.events,
        durable=streams.consumer(RULES_CONSUMER),
        filter_subject=streams.rules_wildcard,
        batch=200,
        ack_wait=ACK_WAIT_S,
        retry_delay=0.2,
        fetch_wait=1.0,
        linger=0.002,
    )


def consumer_specs(namespace: str) -> tuple[ConsumerSpec, ConsumerSpec]:
    streams = Streams(namespace)
    events = ConsumerSpec(
        stream=streams.events,
        durable=streams.consumer(EVENTS_CONSUMER),
        filter_subject=streams.events_wildcard,
        batch=200,
        ack_wait=ACK_WAIT_S,
        retry_delay=0.2,
        fetch_wait=1.0,
        linger=0.002,  # domain events are few and on the command round trip: low latency
    )
    ingest = ConsumerSpec(
        stream=streams.ingest,
        durable=streams.consumer(INGEST_CONSUMER),
        filter_subject=streams.ingest_wildcard,
        batch=250,
        ack_wait=ACK_WAIT_S,
    )
    return events, ingest


async def run(settings: Settings) -> None:
    await serve_views(settings, stop_on_signals())


async def serve_views(settings: Settings, stop: asyncio.Event) -> None:
    """The projector until `stop` is set: consumers, the loss watcher, the HTTP port."""
    from projections.views_recovery import ViewsRecovery  # it builds on this module

    redis = aioredis.Redis.from_url(
        settings.redis_url,
        health_check_interval=10,
        socket_timeout=10,  # a batch is milliseconds; a stopped Redis must not hang it
        socket_connect_timeout=5,
        # a command retries briefly (a dropped connection), then fails: an outage is the
        # recovery's to handle (batches held and nak'ed), and /readyz must answer in time
        retry=Retry(ExponentialBackoff(cap=0.5, base=0.05), retries=2),
    )
    await retry_async("Redis", redis.ping)
    nc = await retry_async("NATS", lambda: connect_nats(settings.nats_url, "iot-views"))
    js = nc.jetstream()
    events, ingest = consumer_specs(settings.namespace)
    rules = rules_spec(settings.namespace)
    marker = Marker.for_namespace(settings.namespace)
    projector = ViewsProjector(redis, js, settings.namespace, marker=marker)
    recovery = ViewsRecovery(settings, redis, nc, (events, ingest, rules), marker=marker)
    await projector.scripts.load()

    async def ready() -> Mapping[str, bool]:
        try:
            redis_ok = bool(await redis.ping())
        except Exception:
            redis_ok = False
        return {"nats": nc.is_connected, "redis": redis_ok, **recovery.checks()}

    if await retry_async("views marker", recovery.start):
        keys = await retry_async("views generation", projector.resolve_keys)
        await retry_async("views checkpoint", lambda: seed_checkpoint(redis, js, keys, events))
    routes: list[BaseRoute] = []
    port = settings.port_for(VIEWS_PORT)
    log.info("views projector listening", extra={"port": port})
    tasks = [
        asyncio.create_task(recovery.watch(stop)),
        asyncio.create_task(consume(js, events, recovery.guarded(projector.handle_events), stop)),
        asyncio.create_task(consume(js, rules, recovery.guarded(projector.handle_events), stop)),
        asyncio.create_task(consume(js, ingest, recovery.guarded(projector.handle_ingest), stop)),
        asyncio.create_task(report_lag(js, events, stop)),
        asyncio.create_task(report_lag(js, ingest, stop)),
        asyncio.create_task(report_online(projector, stop)),
    ]
    try:
        await serve(build_app(routes, ready), settings.http_host, port, stop)
    finally:
        stop.set()
        await asyncio.gather(*tasks, return_exceptions=True)
        with contextlib.suppress(Exception):
            await close_nats(nc)
        await redis.aclose()
