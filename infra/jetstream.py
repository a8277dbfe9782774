"""A durable JetStream pull consumer that hands batches to a handler and acks after it.

The handler's contract: return only once the batch's effects are durable (written and
checkpointed). Each message is then acknowledged; a message the handler marks as `retry` is
nak'ed with a delay (redelivered later), one marked `poison` is terminated (never redelivered;
the handler must have dead-lettered it). If the handler raises, nothing is acknowledged and
the batch is redelivered after `ack_wait`; the loop backs off and goes on.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from nats.aio.msg import Msg
from nats.errors import Error as NatsError
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.client import JetStreamContext
from prometheus_client import Counter, Gauge

from infra.streams import Streams

log = logging.getLogger(__name__)
STATUS_HEADER = "Status"

CONSUMED = Counter(
    "iot_consumer_messages_total", "Messages handled by a consumer", ["consumer", "outcome"]
)
PENDING = Gauge("iot_consumer_pending", "Messages in the stream not yet delivered", ["consumer"])
ACK_PENDING = Gauge("iot_consumer_ack_pending", "Messages delivered, not yet acked", ["consumer"])
BATCH_FAILURES = Counter(
    "iot_consumer_batch_failures_total", "Batches whose handler raised", ["consumer"]
)


@dataclass
class Outcome:
    """What the handler decided for messages that are not plainly done."""

    retry: set[int] = field(default_factory=set)  # indexes into the batch: nak with delay
    poison: set[int] = field(default_factory=set)  # indexes: terminate (already dead-lettered)


Handler = Callable[[Sequence[Msg]], Awaitable[Outcome | None]]


@dataclass(frozen=True)
class ConsumerSpec:
    stream: str
    durable: str
    filter_subject: str
    batch: int = 500
    ack_wait: float = 30.0
    max_ack_pending: int = 20_000
    retry_delay: float = 1.0
    fetch_wait: float = 0.05  # a fetch returns what arrived by then: latency, not batch size
    # With linger, a fetch returns this long after its first message instead of waiting out
    # fetch_wait: a long fetch_wait (cheap when idle) with little added latency when busy.
    linger: float | None = None


async def ensure_consumer(js: JetStreamContext, spec: ConsumerSpec) -> None:
    config = ConsumerConfig(
        durable_name=spec.durable,
        deliver_policy=DeliverPolicy.ALL,
        ack_policy=AckPolicy.EXPLICIT,
        ack_wait=spec.ack_wait,
        max_ack_pending=spec.max_ack_pending,
        filter_subject=spec.filter_subject,
        max_deliver=-1,
    )
    await js.add_consumer(spec.stream, config)


class Puller:
    """Pull requests answered into one core subscription (no task per message).

    nats-py's `fetch` waits on each message in a task of its own, which cost a projector more
    CPU than its own work; here the subscription's callback collects a request's messages and
    a status message (no messages, request expired) or a full batch ends the request.
    """

    def __init__(self, js: JetStreamContext, spec: ConsumerSpec) -> None:
        self._nc = js._nc
        self._api = f"{js._prefix}.CONSUMER.MSG.NEXT.{spec.stream}.{spec.durable}"
        self._inbox = self._nc.new_inbox()
        self._msgs: list[Msg] = []
        self._wanted = 0
        self._done = asyncio.Event()
        self._sub: Any = None
        self._linger: float | None = spec.linger
        self._timer: asyncio.TimerHandle | None = None

    async def start(self) -> None:
        self._sub = await self._nc.subscribe(self._inbox, cb=self._on_msg)

    async def stop(self) -> None:
        if self._sub is not None:
            with contextlib.suppress(Exception):
                await self._sub.unsubscribe()

    async def _on_msg(self, msg: Msg) -> None:
        if msg.headers and msg.headers.get(STATUS_HEADER):
            self._done.set()  # 404 no messages, 408 request expired, 409 ...: request over
            return
        self._msgs.append(msg)
        if len(self._msgs) >= self._wanted:
            self._done.set()
        elif self._linger is not None and self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(self._linger, self._done.set)

    async def fetch(self, batch: int, wait: float) -> list[Msg]:
        """Up to `batch` messages: what is there at once, plus what arrives within `wait`."""
        if not self._msgs:  # late arrivals of an earlier request are served first
            self._wanted = batch
            self._done.clear()
            request = json.dumps({"batch": batch, "expires": int(wait * 1e9)}).encode()
            await self._nc.publish(self._api, request, reply=self._inbox)
            # The server ends an expired request with a 408 status, but not always (2.9 stays
            # silent after a partial delivery): stop waiting when the request expires.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._done.wait(), timeout=wait * 1.2)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        msgs, self._msgs = self._msgs, []
        return msgs


async def consume(
    js: JetStreamContext, spec: ConsumerSpec, handler: Handler, stop: asyncio.Event
) -> None:
    """Fetch, handle, ack until `stop` is set; survive NATS outages and handler failures."""
    puller: Puller | None = None
    backoff = 0.5
    while not stop.is_set():
        try:
            if puller is None:
                await ensure_consumer(js, spec)
                puller = Puller(js, spec)
                await puller.start()
            msgs = await puller.fetch(spec.batch, spec.fetch_wait)
            if not msgs:
                continue
            try:
                outcome = await handler(msgs) or Outcome()
            except Exception:
                BATCH_FAILURES.labels(spec.durable).inc()
                log.exception(
                    "consumer handler failed; batch will be redelivered",
                    extra={"consumer": spec.durable, "size": len(msgs)},
                )
                await _sleep_or_stop(stop, backoff)
                backoff = min(backoff * 2, 10.0)
                continue
            backoff = 0.5
            await _settle(spec, msgs, outcome)
        except (TimeoutError, NatsError, OSError) as e:
            log.warning(
                "consumer lost NATS; retrying", extra={"consumer": spec.durable, "error": repr(e)}
            )
            if puller is not None:
                await puller.stop()
            puller = None
            await _sleep_or_stop(stop, backoff)
            backoff = min(backoff * 2, 10.0)
    if puller is not None:
        await puller.stop()


async def _settle(spec: ConsumerSpec, msgs: Sequence[Msg], outcome: Outcome) -> None:
    done = 0
    for i, msg in enumerate(msgs):
        if i in outcome.poison:
            await msg.term()
            CONSUMED.labels(spec.durable, "poison").inc()
        elif i in outcome.retry:
            await msg.nak(delay=spec.retry_delay)
            CONSUMED.labels(spec.durable, "retry").inc()
        else:
            await msg.ack()
            done += 1
    CONSUMED.labels(spec.durable, "done").inc(done)


async def report_lag(js: JetStreamContext, spec: ConsumerSpec, stop: asyncio.Event) -> None:
    """Publish the consumer's pending and ack-pending counts as gauges, every 5 s."""
    while not stop.is_set():
        with contextlib.suppress(Exception):
            info = await js.consumer_info(spec.stream, spec.durable)
            PENDING.labels(spec.durable).set(info.num_pending or 0)
            ACK_PENDING.labels(spec.durable).set(info.num_ack_pending or 0)
        await _sleep_or_stop(stop, 5.0)


async def _sleep_or_stop(stop: asyncio.Event, seconds: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), timeout=seconds)


class Follower(Protocol):
    """What `follow_events` feeds: the last stream sequence it applied, and one message."""

    sequence: int

    def apply_raw(self, sequence: int, data: bytes) -> None: ...


async def follow_events(
    js: JetStreamContext,
    streams: Streams,
    follower: Follower,
    caught_up: asyncio.Event,
    stop: asyncio.Event,
) -> None:
    """Feed the whole EVENTS stream, from its start and then live, into `follower` with an
    ordered consumer; set `caught_up` once the last sequence seen at start is applied. Survives
    NATS outages (the ordered consumer recreates itself) until `stop` is set."""
    target = None
    backoff = 0.2
    while target is None and not stop.is_set():
        try:
            info = await js.stream_info(streams.events)
            target = int(info.state.last_seq)
        except Exception as e:
            log.warning("EVENTS stream not reachable; retrying", extra={"error": repr(e)})
            await _sleep_or_stop(stop, backoff)
            backoff = min(backoff * 2, 5.0)
    if target is None:
        return

    def check() -> None:
        if follower.sequence >= target:
            caught_up.set()

    async def on_message(msg: Msg) -> None:
        follower.apply_raw(msg.metadata.sequence.stream, msg.data)
        if not caught_up.is_set():
            check()

    check()
    sub = None
    while sub is None and not stop.is_set():
        try:
            sub = await js.subscribe(
                streams.events_wildcard,
                stream=streams.events,
                cb=on_message,
                ordered_consumer=True,
                idle_heartbeat=2.0,
                deliver_policy=DeliverPolicy.ALL,
            )
        except Exception as e:
            log.warning("cannot follow EVENTS; retrying", extra={"error": repr(e)})
            await _sleep_or_stop(stop, backoff)
            backoff = min(backoff * 2, 5.0)
    await stop.wait()
    if sub is not None:
        with contextlib.suppress(Exception):
            await sub.unsubscribe()


MAX_DETAIL = 1024  # characters of a rejection's detail kept in its header


async def publish_dead_letter(
    js: JetStreamContext,
    streams: Streams,
    *,
    source: str,
    reason: str,
    topic: str,
    detail: str,
    data: bytes,
    msg_id: str | None = None,
) -> None:
    """Store rejected input on the DEADLETTER stream with its reason (the headers described in
    docs/operations.md, "Dead letters"); `msg_id` makes a repeated rejection of one message a
    duplicate."""
    headers = {
        "Iot-Reason": reason,
        "Iot-Topic": topic,
        "Iot-Detail": " ".join(detail.split())[:MAX_DETAIL],  # no line breaks in a header
        "Iot-Source": source,
    }
    if msg_id:
        headers["Nats-Msg-Id"] = msg_id
    await js.publish(
        streams.deadletter_subject(reason), data, stream=streams.deadletter, headers=headers
    )


async def dead_letter_message(
    js: JetStreamContext, streams: Streams, source: str, reason: str, msg: Msg, detail: str
) -> None:
    """Dead-letter a consumed stream message, named by its stream sequence (stored once)."""
    msg_id = None
    with contextlib.suppress(Exception):  # a message without JetStream metadata
        meta = msg.metadata
        msg_id = f"{source}:{meta.stream}:{meta.sequence.stream}"
    await publish_dead_letter(
        js,
        streams,
        source=source,
        reason=reason,
        topic=msg.subject,
        detail=detail,
        data=msg.data,
        msg_id=msg_id,
    )
