"""Command expiry: a scheduler driven by the log, so it survives restarts.

It follows the EVENTS stream from the start with an ordered ephemeral consumer and keeps the
pending commands by due time (requested adds one; acknowledged, failed, expired and cancelled
remove it). Once it has caught up with the stream, it runs the expire handler for each command
whose `expires_at` has passed. The aggregate decides: a command finished meanwhile, or expired
by another replica first, changes nothing. Memory is bounded by the pending commands (the
aggregate caps them per device) plus lazily deleted heap entries, compacted when they pile up.
"""

from __future__ import annotations

import asyncio
import heapq
import logging
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta

import msgspec
from nats.js.client import JetStreamContext
from prometheus_client import Counter, Gauge

from commands import handlers
from domain.errors import DomainError
from domain.published import (
    DeviceCommandAcknowledged,
    DeviceCommandCancelled,
    DeviceCommandExpired,
    DeviceCommandFailed,
    DeviceCommandRequested,
    PublishedEvent,
    decode_event,
)
from infra.jetstream import follow_events
from infra.streams import Streams

log = logging.getLogger(__name__)

MAX_SLEEP_S = 30.0
RETRY_AFTER = timedelta(seconds=1)
CONCURRENCY = 16
BATCH = 256
_COMMAND_TAG = b'"device.command_'

PENDING_COMMANDS = Gauge("iot_expiry_pending_commands", "Pending commands the scheduler watches")
EXPIRY_RUNS = Counter("iot_expiry_runs_total", "Expire handler runs by outcome", ["outcome"])

Key = tuple[str, str]  # (device_id, command_id)
# Runs the expire handler; True when settled (expired, or nothing to do), False to retry.
Expire = Callable[[str, str, datetime], Awaitable[bool]]
# Runs a blocking handler on the service's thread pool.
Run = Callable[[Callable[[], handlers.Outcome]], Awaitable[handlers.Outcome]]


class PendingCommands:
    """Pending commands by due time: a heap with lazy deletion plus the live entries."""

    def __init__(self) -> None:
        self._due: dict[Key, datetime] = {}
        self._heap: list[tuple[float, str, str]] = []

    def __len__(self) -> int:
        return len(self._due)

    def add(self, key: Key, expires_at: datetime) -> bool:
        """Watch a command; True if it is now the first one due."""
        self._due[key] = expires_at
        entry = (expires_at.timestamp(), *key)
        heapq.heappush(self._heap, entry)
        self._compact()
        return self._heap[0] == entry

    def remove(self, key: Key) -> None:
        self._due.pop(key, None)
        self._compact()

    def next_due(self) -> datetime | None:
        self._drop_stale_head()
        if not self._heap:
            return None
        return self._due[(self._heap[0][1], self._heap[0][2])]

    def pop_due(self, now: datetime, limit: int) -> list[tuple[Key, datetime]]:
        """Up to `limit` commands due by `now`, no longer watched."""
        found: list[tuple[Key, datetime]] = []
        cutoff = now.timestamp()
        while len(found) < limit:
            self._drop_stale_head()
            if not self._heap or self._heap[0][0] > cutoff:
                break
            _, device_id, command_id = heapq.heappop(self._heap)
            key = (device_id, command_id)
            found.append((key, self._due.pop(key)))
        return found

    def _drop_stale_head(self) -> None:
        while self._heap:
            ts, device_id, command_id = self._heap[0]
            due = self._due.get((device_id, command_id))
            if due is not None and due.timestamp() == ts:
                return
            heapq.heappop(self._heap)

    def _compact(self) -> None:
        if len(self._heap) > 2 * len(self._due) + 1024:
            self._heap = [(due.timestamp(), *key) for key, due in self._due.items()]
            heapq.heapify(self._heap)


class ExpiryScheduler:
    """Expires commands at their `expires_at`, from what the EVENTS stream says is pending."""

    def __init__(
        self,
        expire: Expire,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        concurrency: int = CONCURRENCY,
    ) -> None:
        self.pending = PendingCommands()
        self.sequence = 0  # last stream sequence applied
        self.caught_up = asyncio.Event()
        self._expire = expire
        self._clock = clock
        self._limit = asyncio.Semaphore(concurrency)
        self._wakeup = asyncio.Event()

    def apply(self, event: PublishedEvent) -> None:
        match event:
            case DeviceCommandRequested():
                if self.pending.add((event.device_id, event.command_id), event.expires_at):
                    self._wakeup.set()
            case (
                DeviceCommandAcknowledged()
                | DeviceCommandFailed()
                | DeviceCommandExpired()
                | DeviceCommandCancelled()
            ):
                self.pending.remove((event.device_id, event.command_id))
            case _:
                pass

    def apply_raw(self, sequence: int, data: bytes) -> None:
        """Apply one stream message; an undecodable one is logged and skipped."""
        self.sequence = max(self.sequence, sequence)
        if _COMMAND_TAG not in data:  # most events are not about commands
            return
        try:
            self.apply(decode_event(data))
        except msgspec.DecodeError as e:
            log.warning("skipping undecodable event", extra={"seq": sequence, "error": str(e)})
        PENDING_COMMANDS.set(len(self.pending))

    async def run(self, stop: asyncio.Event) -> None:
        """Once caught up with the log, expire what is due until `stop` is set."""
        await _first(self.caught_up, stop)
        while not stop.is_set():
            now = self._clock()
            due = self.pending.pop_due(now, BATCH)
            if due:
                await asyncio.gather(*(self._run_one(key, at, now) for key, at in due))
                PENDING_COMMANDS.set(len(self.pending))
                continue
            self._wakeup.clear()
            next_due = self.pending.next_due()
            wait = MAX_SLEEP_S
            if next_due is not None:
                wait = min(max((next_due - now).total_seconds(), 0.0), MAX_SLEEP_S)
            await _first(self._wakeup, stop, seconds=wait)

    async def _run_one(self, key: Key, expires_at: datetime, now: datetime) -> None:
        device_id, command_id = key
        async with self._limit:
            try:
                settled = await self._expire(device_id, command_id, max(now, expires_at))
            except Exception as e:
                log.warning(
                    "expiring a command failed; retrying",
                    extra={"device_id": device_id, "command_id": command_id, "error": repr(e)},
                )
                settled = False
        if not settled:
            self.pending.add(key, max(now, expires_at) + RETRY_AFTER)


def expire_with(store: handlers.Store, run: Run) -> Expire:
    """The expire handler on the store, run on the service's thread pool."""

    async def expire(device_id: str, command_id: str, at: datetime) -> bool:
        try:
            outcome = await run(
                lambda: handlers.change(store, device_id, handlers.expire(command_id, at))
            )
        except handlers.TooMuchContention:
            EXPIRY_RUNS.labels("retry").inc()
            return False
        except DomainError as e:  # unknown device, or one that refuses: nothing to expire
            EXPIRY_RUNS.labels("refused").inc()
            log.info("command not expired", extra={"device_id": device_id, "reason": e.reason})
            return True
        except Exception as e:
            EXPIRY_RUNS.labels("retry").inc()
            log.warning(
                "could not store an expiry; retrying",
                extra={"device_id": device_id, "command_id": command_id, "error": repr(e)},
            )
            return False
        EXPIRY_RUNS.labels("expired" if outcome.changed else "unchanged").inc()
        return True

    return expire


async def run_expiry(
    js: JetStreamContext, streams: Streams, scheduler: ExpiryScheduler, stop: asyncio.Event
) -> None:
    """Follow the log and expire due commands until `stop` is set."""
    await asyncio.gather(
        follow_events(js, streams, scheduler, scheduler.caught_up, stop), scheduler.run(stop)
    )


async def _first(*events: asyncio.Event, seconds: float | None = None) -> None:
    """Wait until one of `events` is set, or `seconds` pass."""
    waits = {asyncio.ensure_future(event.wait()) for event in events}
    try:
        await asyncio.wait(waits, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waits:
            waiter.cancel()
