"""The bridge's pipeline: MQTT messages -> validation -> JetStream, acked in receive order.

Each received message becomes an `Entry` in the ack window and is published with
`publish_async` (pipelined); the MQTT message is acknowledged only once JetStream has
acknowledged it (stored or duplicate) and every earlier message is done too. A publish that
fails or gets no answer within `ack_timeout` is retried with backoff by its own task, forever:
nothing is dropped, and nothing more is read than the broker's Receive Maximum lets in.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Mapping
from typing import Any, Protocol

from bridges import ids, metrics
from bridges.mqtt import Inbound
from bridges.validation import Accepted, validate
from bridges.window import AckWindow, Entry
from domain.ingest import encode_ingest
from infra import tracing
from infra.streams import Streams

log = logging.getLogger(__name__)


class Acker(Protocol):
    generation: int

    def ack(self, packet_id: int, qos: int) -> None: ...


class PubAck(Protocol):
    duplicate: bool


class Publisher(Protocol):
    async def publish_async(
        self, subject: str, payload: bytes, headers: dict[str, str] | None = None
    ) -> asyncio.Future[Any]: ...

    async def publish(
        self, subject: str, payload: bytes, wait: float, headers: dict[str, str] | None = None
    ) -> Any: ...


def _header_safe(text: str, limit: int = 1024) -> str:
    """A header value: no control characters, bounded length."""
    cleaned = "".join(c if c >= " " and c != "\x7f" else f"\\x{ord(c):02x}" for c in text)
    return cleaned[:limit]


class Pipeline:
    def __init__(
        self,
        js: Publisher,
        streams: Streams,
        devices: Mapping[str, str],
        source: Acker,
        *,
        is_connected: Any = lambda: True,
        ack_timeout: float = 5.0,
        max_dead_letter_bytes: int = 1024 * 1024 - 4096,
    ) -> None:
        self.js = js
        self.streams = streams
        self.devices = devices
        self.source = source
        self.is_connected = is_connected
        self.ack_timeout = ack_timeout
        self.max_dead_letter_bytes = max_dead_letter_bytes
        self.window = AckWindow(self._ack)
        self.generation = 0
        self.stopping = False
        self._idle = asyncio.Event()
        self._idle.set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._outcomes: dict[tuple[str, str], Any] = {}
        self._reasons: dict[str, Any] = {}
        metrics.INFLIGHT.set_function(lambda: len(self.window))

    # --- entry points ----------------------------------------------------------------------
    async def handle(self, item: Inbound) -> None:
        """Take one inbound item (called in receive order)."""
        if item.generation != self.generation:
            self._abandon(item.generation)
        if item.payload is None or item.generation != self.source.generation:
            return  # a connection marker, or a message of a connection already gone
        entry = self.prepare(item)
        self.window.add(entry)
        self._idle.clear()
        await self._publish(entry)

    def prepare(self, item: Inbound) -> Entry:
        """Validate and build the JetStream message of one MQTT message (traced if on)."""
        entry = self._build(item)
        if tracing.TRACER is not None:
            entry.spans = tracing.start_bridge_spans(
                item.topic, item.received_at_ns, item.traceparent, entry.headers
            )
        return entry

    def _build(self, item: Inbound) -> Entry:
        assert item.payload is not None
        payload = item.payload
        received_ms = item.received_at_ns // 1_000_000
        entry = Entry(item.packet_id, item.qos, item.dup, item.received_at_ns)
        result = validate(item.topic, payload, received_ms, self.devices)
        if isinstance(result, Accepted):
            entry.kind = result.kind
            entry.subject = self.streams.ingest_subject(result.kind, result.device_id)
            entry.body = encode_ingest(result.message)
            msg_id = ids.message_id(
                result.kind, result.device_id, payload, item.packet_id, result.device_time
            )
            entry.headers = {"Nats-Msg-Id": msg_id}
            entry.salt_allowed = not result.device_time and not item.dup
            return entry
        entry.kind = result.kind or "unknown"
        entry.reason = result.reason
        entry.subject = self.streams.deadletter_subject(result.reason)
        detail = result.detail
        body = payload
        if len(body) > self.max_dead_letter_bytes:
            body = body[: self.max_dead_letter_bytes]
            detail += f" (data truncated to the first {len(body)} bytes)"
        entry.body = body
        entry.headers = {
            "Nats-Msg-Id": ids.dead_letter_id(
                result.kind, result.device_id, item.topic, payload, item.packet_id
            ),
            "Iot-Reason": result.reason,
            "Iot-Topic": _header_safe(item.topic),
            "Iot-Detail": _header_safe(detail),
            "Iot-Received-At": str(received_ms),
        }
        entry.salt_allowed = not item.dup
        return entry

    async def sweep(self, stop: asyncio.Event, every: float = 0.5) -> None:
        """Cancel publishes JetStream has not answered within `ack_timeout` (they retry)."""
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), every)
            deadline = time.monotonic() - self.ack_timeout
            for entry in list(self.window):
                future = entry.future
                if future is not None and not future.done() and entry.started < deadline:
                    future.cancel()

    async def drain(self, within: float) -> None:
        """Wait (bounded) for what is in flight to be stored and acked."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._idle.wait(), within)

    def close(self) -> None:
        """Stop taking messages and cancel retries (their messages stay unacknowledged)."""
        self.stopping = True
        for task in list(self._tasks):
            task.cancel()

    # --- publishing ------------------------------------------------------------------------
    async def _publish(self, entry: Entry) -> None:
        if not self.is_connected():
            self._retry(entry, None)  # waits for NATS instead of filling its reconnect buffer
            return
        entry.attempts += 1
        entry.started = time.monotonic()
        try:
            future = await self.js.publish_async(entry.subject, entry.body, entry.headers)
        except Exception as e:
            self._retry(entry, e)
            return
        entry.future = future
        future.add_done_callback(lambda f: self._answered(entry, f))

    def _answered(self, entry: Entry, future: asyncio.Future[Any]) -> None:
        entry.future = None
        if entry.abandoned:
            return
        if future.cancelled():
            self._retry(entry, TimeoutError("no JetStream acknowledgement"))
            return
        error = future.exception()
        if error is not None:
            self._retry(entry, error)
            return
        self._stored(entry, future.result())

    def _stored(self, entry: Entry, ack: PubAck) -> None:
        duplicate = bool(ack.duplicate)
        if duplicate and entry.salt_allowed and entry.attempts == 1:
            # Never delivered before (MQTT DUP 0) and never published by us: not a redelivery
            # but a new message whose id collides with an earlier one. Store it under a new id.
            entry.salt_allowed = False
            entry.headers["Nats-Msg-Id"] = ids.salted(
                entry.headers["Nats-Msg-Id"], entry.received_at_ns
            )
            metrics.SALTED.inc()
            self._retry(entry, None, delay=0.0)
            return
        if entry.reason:
            entry.outcome = "dead_letter"
            self._count_reason(entry.reason)
        else:
            entry.outcome = "duplicate" if duplicate else "stored"
        self._count(entry.kind, entry.outcome)
        metrics.PUBLISH_LATENCY.observe((time.time_ns() - entry.received_at_ns) / 1e9)
        if entry.spans is not None:
            tracing.end_bridge_spans(entry.spans, entry.subject, entry.outcome)
        self.window.complete(entry)
        if not len(self.window):
            self._idle.set()

    def _retry(self, entry: Entry, error: BaseException | None, delay: float = 0.05) -> None:
        if error is not None:
            metrics.PUBLISH_RETRIES.inc()
            log.debug("JetStream publish failed; retrying", extra={"error": repr(error)})
        task = asyncio.get_running_loop().create_task(self._retry_loop(entry, delay))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _retry_loop(self, entry: Entry, delay: float) -> None:
        warned = False
        while not entry.abandoned and not self.stopping:
            if delay:
                await asyncio.sleep(delay)
            delay = min(max(delay * 2, 0.1), 5.0)
            if not self.is_connected():
                continue
            entry.attempts += 1
            try:
                ack = await self.js.publish(
                    entry.subject, entry.body, self.ack_timeout, entry.headers
                )
            except Exception as e:
                metrics.PUBLISH_RETRIES.inc()
                if not warned:
                    log.warning("JetStream publish failing; retrying", extra={"error": repr(e)})
                    warned = True
                continue
            if not entry.abandoned:
                self._stored(entry, ack)
            return

    # --- acknowledgements ------------------------------------------------------------------
    def _ack(self, packet_id: int, qos: int) -> None:
        if self.generation == self.source.generation:
            self.source.ack(packet_id, qos)

    def _abandon(self, generation: int) -> None:
        dropped = self.window.abandon()
        self._idle.set()
        for entry in dropped:
            if entry.spans is not None:
                tracing.end_bridge_spans(entry.spans, entry.subject, "abandoned")
        if dropped:
            log.info(
                "MQTT connection changed; in-flight messages will be redelivered",
                extra={"count": len(dropped)},
            )
        self.generation = generation

    def _count(self, kind: str, outcome: str) -> None:
        child = self._outcomes.get((kind, outcome))
        if child is None:
            child = self._outcomes[(kind, outcome)] = metrics.MESSAGES.labels(kind, outcome)
        child.inc()

    def _count_reason(self, reason: str) -> None:
        child = self._reasons.get(reason)
        if child is None:
            child = self._reasons[reason] = metrics.DEAD_LETTERS.labels(reason)
        child.inc()


async def pump(inbox: deque[Inbound], wakeup: asyncio.Event, pipeline: Pipeline) -> None:
    """Feed the pipeline from the MQTT adapter's inbox, in receive order, until stopping."""
    while not pipeline.stopping:
        wakeup.clear()
        while inbox and not pipeline.stopping:
            await pipeline.handle(inbox.popleft())
        await wakeup.wait()
