"""The relay: publishes stored domain events to JetStream in commit order, each exactly once.

- Its position is the stream itself: every message carries `Iot-Position` (the event's
  notification id), so after any crash the relay reads the stream's last message and goes on
  from the next notification. Nothing is checkpointed elsewhere that could disagree.
- Order is fenced with `Nats-Expected-Last-Sequence`: a publish lands only directly after the
  message this relay last saw, so a lost publish, or a second relay, cannot interleave out of
  order; on a fence failure the relay re-reads its position and goes on.
- `Nats-Msg-Id = "<device_id>:<version>"` makes any republish a duplicate JetStream drops.
- One relay at a time publishes: a PostgreSQL advisory lock; the others wait as standbys.
- New events are noticed through LISTEN/NOTIFY on the event store's channel, not a busy poll.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import psycopg
from eventsourcing.persistence import InterfaceError, Notification, OperationalError
from nats.aio.client import Client as NATS
from nats.errors import Error as NatsError
from nats.js.errors import APIError

from domain.published import (
    DeviceCommandAcknowledged,
    DeviceCommandCancelled,
    DeviceCommandExpired,
    DeviceCommandFailed,
    DeviceCommandRequested,
    DeviceCommandSent,
    RuleEvent,
    StreamEvent,
    encode_event,
    to_published,
)
from infra import metrics
from infra.eventstore import DeviceStore
from infra.streams import Streams

log = logging.getLogger(__name__)
POSITION_HEADER = "Iot-Position"
COMMAND_STEPS = {
    DeviceCommandRequested: "requested",
    DeviceCommandSent: "sent",
    DeviceCommandAcknowledged: "acknowledged",
    DeviceCommandFailed: "failed",
    DeviceCommandExpired: "expired",
    DeviceCommandCancelled: "cancelled",
}


def count_command_step(event: StreamEvent) -> None:
    """Count a command event in `iot_device_commands_total` (the relay publishes each once)."""
    step = COMMAND_STEPS.get(type(event))
    if step is not None:
        metrics.DEVICE_COMMANDS.labels(step).inc()


class FenceError(Exception):
    """JetStream refused a publish: the stream is not where this relay thought it was."""


@dataclass
class RelayState:
    leader: bool = False
    position: int = 0
    last_seq: int = 0
    healthy: bool = True


class Relay:
    def __init__(
        self,
        store: DeviceStore,
        nc: NATS,
        streams: Streams,
        lock_dsn: str,
        batch_size: int = 500,
        ack_timeout: float = 5.0,
    ) -> None:
        self.store = store
        self.ack_timeout = ack_timeout
        self.nc = nc
        self.js = nc.jetstream()
        self.jsm = nc.jsm()
        self.streams = streams
        self.lock_dsn = lock_dsn
        self.batch_size = batch_size
        self.state = RelayState()
        self._wakeup = asyncio.Event()
        schema = store.recorder.datastore.schema  # type: ignore[attr-defined]
        self._lock_name = f"iot-relay:{schema}"  # one leader per event store

    async def run(self, stop: asyncio.Event) -> None:
        """Wait for leadership, then publish until `stop` is set or the lock is lost."""
        while not stop.is_set():
            try:
                async with await psycopg.AsyncConnection.connect(
                    self.lock_dsn, autocommit=True, connect_timeout=5
                ) as conn:
                    if await self._acquire(conn, stop):
                        await self._lead(conn, stop)
            except (psycopg.OperationalError, OperationalError, InterfaceError, OSError) as e:
                # Its lock session, or the store's pool (a PostgreSQL restart): lead again once
                # the database is back; the position is re-read from the stream, so nothing is
                # published twice or skipped.
                log.warning("relay lost its database session; retrying", extra={"error": str(e)})
            finally:
                self.state.leader = False
                metrics.RELAY_LEADER.set(0)
            if not stop.is_set():
                await _sleep_or_stop(stop, 1.0)

    async def _acquire(self, conn: psycopg.AsyncConnection[Any], stop: asyncio.Event) -> bool:
        announced = False
        while not stop.is_set():
            cur = await conn.execute(
                "SELECT pg_try_advisory_lock(hashtextextended(%s, 0))", (self._lock_name,)
            )
            row = await cur.fetchone()
            if row and row[0]:
                log.info("relay is the leader")
                self.state.leader = True
                metrics.RELAY_LEADER.set(1)
                return True
            if not announced:
                log.info("another relay holds the lock; standing by")
                announced = True
            await _sleep_or_stop(stop, 1.0)
        return False

    async def _lead(self, conn: psycopg.AsyncConnection[Any], stop: asyncio.Event) -> None:
        channel = self.store.recorder.channel_name  # type: ignore[attr-defined]
        await conn.execute(psycopg.sql.SQL("LISTEN {}").format(psycopg.sql.Identifier(channel)))
        listener = asyncio.create_task(self._listen(conn))
        try:
            await self._recover(stop)
            while not stop.is_set():
                if listener.done():  # the lock session died: so did the lock
                    listener.result()
                    return
                # Any commit the select below cannot see notifies after this clear.
                self._wakeup.clear()
                batch = await asyncio.to_thread(
                    self.store.recorder.select_notifications,
                    self.state.position + 1,
                    self.batch_size,
                )
                try:
                    if batch:
                        await self._publish(batch)
                except FenceError as e:
                    log.warning("relay fence failed; re-reading position", extra={"error": str(e)})
                    await self._recover(stop)
                    continue
                except (NatsError, TimeoutError) as e:
                    log.warning("publishing failed; re-reading position", extra={"error": repr(e)})
                    await _sleep_or_stop(stop, 1.0)
                    await self._recover(stop)
                    continue
                if len(batch) < self.batch_size:  # caught up: sleep until NOTIFY (or 5 s)
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._wait(stop), timeout=5.0)
        finally:
            listener.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await listener

    async def _listen(self, conn: psycopg.AsyncConnection[Any]) -> None:
        while True:
            async for _ in conn.notifies(timeout=1.0):
                self._wakeup.set()
            await conn.execute("SELECT 1")  # notices a dead session between notifications

    async def _wait(self, stop: asyncio.Event) -> None:
        stopper = asyncio.create_task(stop.wait())
        waker = asyncio.create_task(self._wakeup.wait())
        try:
            await asyncio.wait({stopper, waker}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopper.cancel()
            waker.cancel()

    async def _recover(self, stop: asyncio.Event) -> None:
        """Re-read the position from the stream, retrying while NATS is unreachable."""
        metrics.RELAY_RESYNCS.inc()
        while not stop.is_set():
            try:
                await self._resync()
            except (NatsError, TimeoutError) as e:
                self.state.healthy = False
                log.warning("cannot read the events stream; retrying", extra={"error": repr(e)})
                await _sleep_or_stop(stop, 1.0)
            else:
                self.state.healthy = True
                return

    async def _resync(self) -> None:
        """Read the position from the stream's last message."""
        info = await self.jsm.stream_info(self.streams.events)
        last_seq = info.state.last_seq
        position = 0
        if last_seq:
            msg = await self.jsm.get_msg(self.streams.events, seq=last_seq)
            position = int((msg.headers or {})[POSITION_HEADER])
        self.state.position = position
        self.state.last_seq = last_seq
        metrics.RELAY_POSITION.set(position)
        log.info("relay position", extra={"position": position, "stream_seq": last_seq})

    async def _publish(self, batch: Sequence[Notification]) -> None:
        """Publish a batch pipelined and wait (bounded) for every answer. nats-py's futures
        have no timeout: an answer lost with a connection (a paused or partitioned server)
        would otherwise hold the relay forever. On a timeout the caller re-reads the position
        from the stream, which says what was stored."""
        mapper = self.store.mapper
        futures: list[asyncio.Future[Any]] = []
        published = []
        try:
            for i, notification in enumerate(batch):
                event = to_published(mapper.to_domain_event(notification), notification.id)
                subject, msg_id = self._address(event)
                headers = {
                    "Nats-Msg-Id": msg_id,
                    "Nats-Expected-Last-Sequence": str(self.state.last_seq + i),
                    POSITION_HEADER: str(notification.id),
                }
                futures.append(
                    await self.js.publish_async(
                        subject,
                        encode_event(event),
                        headers=headers,
                        wait_stall=self.ack_timeout,
                    )
                )
                published.append(event)
            acks = await asyncio.wait_for(
                asyncio.gather(*futures, return_exceptions=True), self.ack_timeout
            )
        except BaseException:
            for future in futures:  # frees their slots in the client's pending window
                future.cancel()
            raise
        now = datetime.now(UTC)
        for notification, event, ack in zip(batch, published, acks, strict=True):
            if isinstance(ack, APIError):
                raise FenceError(str(ack))
            if isinstance(ack, BaseException):
                raise ack
            if ack.duplicate:
                raise FenceError(f"duplicate of {self._address(event)[1]}")
            self.state.position = notification.id
            self.state.last_seq = ack.seq
            metrics.RELAY_PUBLISHED.inc()
            count_command_step(event)
            metrics.RELAY_LAG.observe(max(0.0, (now - event.at).total_seconds()))
        metrics.RELAY_POSITION.set(self.state.position)

    def _address(self, event: StreamEvent) -> tuple[str, str]:
        """Subject and Nats-Msg-Id: `events.<device>` and `<device>:<version>` for a device's
        events, `rules.<rule>` and `rule:<rule>:<version>` for a rule's (device ids cannot hold
        a ':', so the two never collide)."""
        if isinstance(event, RuleEvent):
            return self.streams.rule_subject(event.rule_id), f"rule:{event.rule_id}:{event.version}"
        return self.streams.event_subject(event.device_id), f"{event.device_id}:{event.version}"


async def _sleep_or_stop(stop: asyncio.Event, seconds: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), timeout=seconds)
