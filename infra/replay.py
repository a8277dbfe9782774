"""The replay framework every projection's replay is built on (`projections/*_replay.py`).

A replay rebuilds one projection from the log into a fresh namespace, then switches readers:

1. one replay of a projection at a time: a PostgreSQL advisory lock held on a dedicated
   connection (`replay_lock`; released by the server when the process dies, even by SIGKILL);
2. clean up what an interrupted replay left (its unfinished namespace), then build a new
   namespace beside the live one; the live projection keeps running and readers keep reading
   the live namespace;
3. follow the log (`LogTail`: an ephemeral consumer without acks, removed by the server when
   the process dies) until the rebuild is within a batch of the stream's end;
4. switch readers (and the live projector's writes) to the new namespace in one atomic step;
5. keep following up to the stream's end as read right after the switch: a live projector
   resolves the namespace after fetching a batch, so whatever it wrote into the old namespace
   before it noticed the switch was fetched earlier and is in the new one too; then, once the
   readers' grace period has passed, remove the old namespace.

An interruption before step 4 leaves the live namespace untouched; one after it leaves the
switched, complete namespace live and only garbage to collect, which the next run removes.
The domain events of the event store are read in commit order with `store_pages`.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import sys
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol, TextIO

import psycopg
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.client import JetStreamContext

from domain.published import (
    StreamEvent,
    UnpublishableEvent,
    decode_stream_event,
    encode_event,
    to_published,
)
from infra.eventstore import DeviceStore
from infra.settings import Settings

SWITCH_GRACE_S = 1.0  # after a switch, the old namespace is kept this long for readers that
# resolved it just before (the gateway caches the generation for 0.5 s)
CAUGHT_UP_MESSAGES = 1_000  # "caught up": at most this many messages left to read per stream
TAIL_BATCH = 2_000  # messages per pull request of a log tail
STORE_PAGE = 2_000  # notifications per event-store read
REQUEST_GRACE_S = 0.1  # a pull request is over this long after it expired, status or not


class ReplayError(Exception):
    """The replay cannot go on; the message says why (the live projection is untouched)."""


@dataclass
class Report:
    """What a replay (or verification) did; `lines` are printed, `differences` make exit 1."""

    lines: list[str] = field(default_factory=list)
    differences: list[str] = field(default_factory=list)


class Replayer(Protocol):
    """One projection's replay (constructed with the settings and an open `ReplayContext`)."""

    async def plan(self) -> list[str]:
        """The dry run: what would be rebuilt, from where, how far the log reaches."""
        ...

    async def run(self, progress: Progress) -> Report:
        """Rebuild, switch readers, retire the old namespace."""
        ...

    async def verify(self, progress: Progress) -> Report:
        """Rebuild, compare with the live namespace, discard the rebuild."""
        ...


class Progress:
    """A progress line on a terminal (redrawn in place), plain lines every few seconds when the
    output is not a terminal (logs of a Job). Rates and ETA from the start of the phase."""

    def __init__(
        self,
        out: TextIO = sys.stderr,
        *,
        enabled: bool = True,
        clock: Callable[[], float] = time.monotonic,
        every: float | None = None,
    ) -> None:
        self.out = out
        self.enabled = enabled
        self.clock = clock
        self.tty = bool(getattr(out, "isatty", lambda: False)())
        self.every = every if every is not None else (0.2 if self.tty else 5.0)
        self.label = ""
        self.unit = ""
        self.total: int | None = None
        self.done = 0
        self._start = clock()
        self._drawn = 0.0
        self._open = False

    def phase(self, label: str, total: int | None, unit: str = "events") -> None:
        """Start a new counted phase (closing the previous line)."""
        self._close()
        self.label, self.total, self.unit, self.done = label, total, unit, 0
        self._start = self.clock()
        self._drawn = 0.0

    def advance(self, n: int, total: int | None = None) -> None:
        self.done += n
        if total is not None:
            self.total = total
        now = self.clock()
        if now - self._drawn >= self.every:
            self._drawn = now
            self._draw(now)

    def note(self, text: str) -> None:
        """A line of its own (a step of the replay)."""
        self._close()
        if self.enabled:
            print(text, file=self.out, flush=True)

    def finish(self) -> None:
        self._draw(self.clock())
        self._close()

    def render(self, now: float) -> str:
        elapsed = max(now - self._start, 1e-9)
        rate = self.done / elapsed
        if self.total:
            share = min(self.done / self.total, 1.0)
            bar = "#" * int(share * 24)
            left = max(self.total - self.done, 0)
            eta = _duration(left / rate) if rate > 0 else "?"
            return (
                f"{self.label:<22} [{bar:<24}] {share:4.0%} {self.done:,}/{self.total:,} "
                f"{self.unit} {rate:,.0f}/s ETA {eta}"
            )
        return f"{self.label:<22} {self.done:,} {self.unit} {rate:,.0f}/s {_duration(elapsed)}"

    def _draw(self, now: float) -> None:
        if not self.enabled or not self.label:
            return
        line = self.render(now)
        if self.tty:
            self.out.write("\r\x1b[2K" + line)
            self._open = True
        else:
            self.out.write(line + "\n")
        self.out.flush()

    def _close(self) -> None:
        if self._open:
            self.out.write("\n")
            self.out.flush()
            self._open = False


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


@dataclass
class ReplayContext:
    """What every replay needs: settings, NATS (JetStream), the switch timing."""

    settings: Settings
    nc: NATS
    grace: float = SWITCH_GRACE_S
    caught_up: int = CAUGHT_UP_MESSAGES

    @property
    def js(self) -> JetStreamContext:
        return self.nc.jetstream()


@dataclass
class StreamReach:
    """How far a stream reaches: its first and last sequence, message count, first time."""

    stream: str
    first_seq: int
    last_seq: int
    messages: int
    first_time: str | None

    def describe(self) -> str:
        if not self.messages:
            return f"stream {self.stream}: empty (last sequence {self.last_seq:,})"
        since = f", first message stored {self.first_time}" if self.first_time else ""
        return (
            f"stream {self.stream}: {self.messages:,} messages, sequences "
            f"{self.first_seq:,}..{self.last_seq:,}{since}"
        )


async def stream_reach(js: JetStreamContext, stream: str) -> StreamReach:
    info = await js.stream_info(stream)
    state = info.state
    first_time = None
    if state.messages:
        raw: Any = getattr(state, "first_ts", None)
        first_time = str(raw) if raw else None
    return StreamReach(
        stream, int(state.first_seq or 0), int(state.last_seq or 0), state.messages, first_time
    )


class LogTail:
    """Reads one stream (one subject filter) from a sequence on, without acknowledgements.

    The consumer is ephemeral: the server removes it once nobody pulled for
    `inactive_threshold` seconds, so a killed replay leaves nothing behind. `fetch()` hands out
    batches in stream order; `remaining()` says how many messages are still to be handed out.

    nats-py's `fetch` waits for every message of a batch with its own task and timer (some
    50 µs a message here), which caps a replay near 20,000 messages/s before decoding or
    writing anything. This tail publishes the pull request (`CONSUMER.MSG.NEXT`) itself and
    collects the answer with a subscription callback, some 100,000 messages/s. One request is
    out at a time and the next is sent as soon as a batch is handed out, so the server sends
    the next batch while the replay writes the last one, and at most two batches are held.
    A request expires after the fetch timeout; one the server served in part ends without a
    status message, so its end is taken from the clock.

    A live reader passes `linger`: `fetch` then hands out at once what arrived while the
    caller was busy, or else what has arrived `linger` seconds after the first message, rather
    than waiting for a full batch or the request's end; and it sends the next request as soon
    as one expires (no grace). A message then waits about `linger` at most, whatever the rate.
    """

    def __init__(
        self,
        nc: NATS,
        stream: str,
        subject: str,
        start_seq: int,
        *,
        batch: int = TAIL_BATCH,
        inactive_threshold: float = 30.0,
        start_time: datetime | None = None,
    ) -> None:
        self.nc = nc
        self.start_time = start_time  # given: from the first message stored at or after it
        self.js = nc.jetstream()
        self.stream = stream
        self.subject = subject
        self.start_seq = max(start_seq, 1)
        self.batch = batch
        self.inactive_threshold = inactive_threshold
        self.last_seq = self.start_seq - 1  # every message up to here has been handed out
        self._sub: Any = None
        self._buffer: deque[Msg] = deque()
        self._changed = asyncio.Event()
        self._arrived = asyncio.Event()  # something came in since it was cleared
        self._owed = 0  # messages the request out may still bring
        self._expires_at = 0.0  # when the server gives up on that request
        self._consumer = ""
        self._inbox = ""

    async def open(self) -> None:
        by_time = self.start_time is not None
        config = ConsumerConfig(
            deliver_policy=DeliverPolicy.BY_START_TIME
            if by_time
            else DeliverPolicy.BY_START_SEQUENCE,
            opt_start_seq=None if by_time else self.start_seq,
            opt_start_time=self.start_time,
            ack_policy=AckPolicy.NONE,
            filter_subject=self.subject or None,  # "": the whole stream
            inactive_threshold=self.inactive_threshold,
            max_waiting=4,
        )
        info = await self.js.add_consumer(self.stream, config)
        self._consumer = info.name
        self._inbox = self.nc.new_inbox()

        async def arrive(msg: Msg) -> None:
            if msg.reply:  # a stream message ($JS.ACK... carries its sequence)
                self._buffer.append(msg)
                self._owed -= 1
            else:  # a status: the request ended (408 expired, 404 nothing, 409 ...)
                self._owed = 0
            if self._owed <= 0 or len(self._buffer) >= self.batch:
                self._changed.set()
            self._arrived.set()

        self._sub = await self.nc.subscribe(self._inbox, cb=arrive)

    async def _request(self, expires: float) -> None:
        self._owed = self.batch
        self._expires_at = time.monotonic() + expires
        body = {"batch": self.batch, "expires": int(expires * 1e9)}
        await self.nc.publish(
            f"$JS.API.CONSUMER.MSG.NEXT.{self.stream}.{self._consumer}",
            json.dumps(body).encode(),
            reply=self._inbox,
        )

    async def fetch(self, wait: float = 0.5, linger: float | None = None) -> list[Msg]:
        """The next batch (empty when nothing arrived within `wait` seconds); with `linger`,
        what has arrived `linger` seconds after the first message of this turn."""
        assert self._sub is not None, "open() first"
        grace = REQUEST_GRACE_S if linger is None else 0.0
        if self._owed > 0 and time.monotonic() > self._expires_at + grace:
            self._owed = 0  # expired; a partly served request ends without a status
        if self._owed <= 0 and len(self._buffer) < self.batch:
            await self._request(wait)
        if len(self._buffer) < self.batch and self._owed > 0:
            if linger is None:
                self._changed.clear()
                await self._wait(self._changed, self._expires_at + grace)
            elif not self._buffer:  # (what is here already waited long enough: at once)
                self._arrived.clear()  # the first message, or the request's end
                await self._wait(self._arrived, self._expires_at)
                if self._buffer and self._owed > 0 and len(self._buffer) < self.batch:
                    self._changed.clear()
                    await self._wait(
                        self._changed, min(time.monotonic() + linger, self._expires_at)
                    )
        buffer = self._buffer
        msgs = [buffer.popleft() for _ in range(min(len(buffer), self.batch))]
        if msgs:
            self.last_seq = msgs[-1].metadata.sequence.stream
            if self._owed <= 0:
                await self._request(wait)  # the next batch comes while this one is written
        return msgs

    @staticmethod
    async def _wait(event: asyncio.Event, until: float) -> None:
        """Until `event` is set or the monotonic clock reaches `until`."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(event.wait(), max(until - time.monotonic(), 0.0))

    async def remaining(self) -> int:
        """Not yet handed out: still on the server, or received and waiting here."""
        assert self._sub is not None, "open() first"
        info = await self.js.consumer_info(self.stream, self._consumer)
        return int(info.num_pending or 0) + len(self._buffer)

    async def at_most_remaining(self) -> int:
        """An upper bound of `remaining()` from the stream's last sequence: cheap, where the
        consumer's pending count of a filtered consumer makes the server scan the stream."""
        info = await self.js.stream_info(self.stream)
        return max(int(info.state.last_seq or 0) - self.last_seq, 0) + len(self._buffer)

    async def close(self) -> None:
        if self._sub is None:
            return
        with contextlib.suppress(Exception):
            await self._sub.unsubscribe()
        with contextlib.suppress(Exception):
            await self.js.delete_consumer(self.stream, self._consumer)
        self._sub = None


async def follow(
    tail: LogTail,
    handle: Callable[[Sequence[Msg]], Awaitable[None]],
    stop: asyncio.Event,
    until: Callable[[], int | None] = lambda: None,
) -> None:
    """Hand every batch to `handle` until `stop` is set, or until the tail has read the stream
    up to the sequence `until()` returns (None: no such bound yet): it delivered that sequence,
    or nothing more matching its filter is left."""
    while not stop.is_set():
        bound = until()
        if bound is not None and tail.last_seq >= bound:
            return
        msgs = await tail.fetch()
        if msgs:
            await handle(msgs)
        elif bound is not None and await tail.remaining() == 0:
            return


async def wait_caught_up(
    tails: Sequence[LogTail],
    done: Sequence[asyncio.Task[Any]],
    threshold: int,
    poll: float = 0.25,
    on_wait: Callable[[int], None] = lambda _: None,
    exact_every: float = 2.0,
) -> None:
    """Return once every tail has at most `threshold` messages left; raise the first failure
    of the `done` tasks (the followers) if one ends meanwhile.

    Polled from the streams' last sequences (an upper bound, cheap); the exact count, which
    costs the server a scan of the stream for a filtered consumer, only every `exact_every`
    seconds, for a tail whose filter leaves out messages the bound counts."""
    exact_at = time.monotonic()
    while True:
        for task in done:
            if task.done():
                task.result()  # raises its exception
                raise ReplayError("a log reader stopped before catching up")
        left = [await tail.at_most_remaining() for tail in tails]
        if any(n > threshold for n in left) and time.monotonic() - exact_at >= exact_every:
            exact_at = time.monotonic()
            left = [
                n if n <= threshold else await tail.remaining()
                for n, tail in zip(left, tails, strict=True)
            ]
        on_wait(sum(left))
        if all(n <= threshold for n in left):
            return
        await asyncio.sleep(poll)


def digest(fields: dict[Any, Any]) -> str:
    """A stable digest of a hash's fields (sorted by name, bytes as they are stored)."""
    h = hashlib.sha256()
    for name in sorted(fields):
        for part in (name, fields[name]):
            raw = part if isinstance(part, bytes) else str(part).encode()
            h.update(len(raw).to_bytes(4, "big"))
            h.update(raw)
    return h.hexdigest()


@contextlib.asynccontextmanager
async def replay_lock(settings: Settings, name: str) -> AsyncIterator[None]:
    """One replay of `name` per event store at a time; released when the process dies."""
    key = f"iot-replay:{settings.pg_schema}:{name}"
    conn = await psycopg.AsyncConnection.connect(
        **settings.postgres.connect_kwargs(), autocommit=True, connect_timeout=5
    )
    try:
        cur = await conn.execute("SELECT pg_try_advisory_lock(hashtext(%s))", (key,))
        row = await cur.fetchone()
        if not row or not row[0]:
            raise ReplayError(f"another replay of {name!r} is running (lock {key})")
        try:
            yield
        finally:  # at once: closing alone frees the lock a moment later
            with contextlib.suppress(psycopg.Error):
                await conn.execute("SELECT pg_advisory_unlock(hashtext(%s))", (key,))
    finally:
        await conn.close()


async def store_pages(
    store: DeviceStore, *, start: int = 1, upto: int | None = None, size: int = STORE_PAGE
) -> AsyncIterator[list[StreamEvent]]:
    """The event store's domain events (devices and alert rules) from position `start` up to
    `upto` (to its end when None) in commit order, a page at a time, in their published form
    exactly as a consumer decodes them off the stream; the next page is read (in a thread)
    while this one is handled."""

    def read(first: int) -> list[StreamEvent]:
        page = []
        for notification in store.recorder.select_notifications(first, size, upto):
            try:
                event = to_published(store.mapper.to_domain_event(notification), notification.id)
            except UnpublishableEvent as e:  # the relay refuses it too: a schema gap to fix first
                raise ReplayError(f"event store position {notification.id}: {e}") from e
            page.append(decode_stream_event(encode_event(event)))
        return page

    if upto is not None and upto < start:
        return
    pending: asyncio.Task[list[StreamEvent]] | None = asyncio.create_task(
        asyncio.to_thread(read, start)
    )
    try:
        while pending is not None:
            page = await pending
            pending = None
            if not page:
                return
            last = page[-1].position
            if len(page) == size and (upto is None or last < upto):
                pending = asyncio.create_task(asyncio.to_thread(read, last + 1))
            yield page
    finally:
        if pending is not None:
            pending.cancel()
            with contextlib.suppress(BaseException):
                await pending
