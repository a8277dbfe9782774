"""Server -> device: commands on `devices/{id}/commands` and desired state on
`devices/{id}/desired`, published by the one bridge replica holding the dispatcher lease.

Work is per device: `kick` merges what a device needs (deliver requested commands, re-deliver
sent ones, publish or clear its desired state) and queues the device once; `workers` tasks
take devices from the queue, so one device's messages go out one after another in order and
different devices in parallel, at most `workers` at a time. Nothing is published before the
registry has caught up with the EVENTS stream, and nothing while this replica is not leader.

A command is published QoS 1 (with an MQTT message expiry at its `expires_at`), never once its
`expires_at` has passed; after the broker's PUBACK the bridge reports `CommandSent` on
`ingest.ack.<id>` (beside the device's acks; Nats-Msg-Id `sent:<command_id>`) and marks it
sent, so it is not published again unless the device reconnects (a clean session lost it) or
the leader changes (the new leader cannot know what the old one published). Delivery is at
least once: a device deduplicates by `command_id`.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol

import msgspec

from bridges import metrics
from bridges.registry import EXPIRED, REQUESTED, SENT, DeviceRegistry, PendingCommand
from domain.ingest import CommandSent, encode_ingest
from domain.published import (
    DeviceCommandRequested,
    DeviceConfigured,
    DeviceConnected,
    DeviceDecommissioned,
    PublishedEvent,
)
from infra.streams import Streams

log = logging.getLogger(__name__)

LEASE_KEY = "command-dispatcher"


class Sink(Protocol):
    """The MQTT side (`bridges.mqtt.MqttSink`)."""

    connected: bool

    async def wait_connected(self, within: float) -> bool: ...

    async def publish(
        self,
        topic: str,
        payload: bytes,
        *,
        retain: bool = False,
        expiry_s: int | None = None,
    ) -> None: ...


class Journal(Protocol):
    """The JetStream side (`bridges.publisher.Publisher`)."""

    async def publish(
        self, subject: str, payload: bytes, wait: float, headers: dict[str, str] | None = None
    ) -> Any: ...


class CommandMessage(msgspec.Struct, frozen=True):
    command_id: str
    name: str
    args: dict[str, Any]
    expires_at: datetime


class DesiredMessage(msgspec.Struct, frozen=True):
    version: int
    config: dict[str, Any]


_encode = msgspec.json.Encoder().encode


def command_payload(command: PendingCommand) -> bytes:
    expires = command.expires_at.astimezone(UTC)
    return _encode(CommandMessage(command.command_id, command.name, command.args, expires))


def commands_topic(device_id: str) -> str:
    return f"devices/{device_id}/commands"


def desired_topic(device_id: str) -> str:
    return f"devices/{device_id}/desired"


@dataclass(slots=True)
class Work:
    """What one device needs; merged by `kick` while it waits or is being worked on."""

    commands: bool = False  # deliver `requested` commands
    resend: bool = False  # ... and re-deliver `sent` ones
    desired: bool = False  # publish the desired state if newer than the last published
    force_desired: bool = False  # ... even if that version was published already
    clear: bool = False  # empty the retained desired state (decommissioned)

    def merge(self, other: Work) -> None:
        self.commands |= other.commands
        self.resend |= other.resend
        self.desired |= other.desired
        self.force_desired |= other.force_desired
        self.clear |= other.clear


class Retry(Exception):
    """This device's work could not be finished now; retry it later."""


class Dispatcher:
    def __init__(
        self,
        registry: DeviceRegistry,
        sink: Sink,
        journal: Journal,
        streams: Streams,
        *,
        is_leader: Callable[[], bool],
        caught_up: asyncio.Event,
        workers: int = 32,
        retry_after: float = 1.0,
        now: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.registry = registry
        self.sink = sink
        self.journal = journal
        self.streams = streams
        self.is_leader = is_leader
        self.caught_up = caught_up
        self.workers = workers
        self.retry_after = retry_after
        self.now = now
        self.published_desired: dict[str, int] = {}  # device -> version published by us
        self._work: dict[str, Work] = {}
        self._scheduled: set[str] = set()
        self._queue: asyncio.Queue[str] = asyncio.Queue()
        self._arrived: dict[str, int] = {}  # command id -> perf_counter_ns of its event
        self._idle = asyncio.Event()
        self._idle.set()

    # --- triggers --------------------------------------------------------------------------
    def on_event(self, event: PublishedEvent) -> None:
        """Registry listener: react to live events (after catch-up) while leader."""
        if not self.caught_up.is_set() or not self.is_leader():
            return
        if isinstance(event, DeviceCommandRequested):
            state = self.registry.states.get(event.device_id)
            if state is not None and state.online and len(self._arrived) < 10_000:
                self._arrived[event.command_id] = time.perf_counter_ns()
            self.kick(event.device_id, Work(commands=True))
        elif isinstance(event, DeviceConnected):
            self.kick(event.device_id, Work(commands=True, resend=True))
        elif isinstance(event, DeviceConfigured):
            self.kick(event.device_id, Work(desired=True))
        elif isinstance(event, DeviceDecommissioned):
            self.kick(event.device_id, Work(clear=True))

    def on_leadership(self, leader: bool) -> None:
        if leader and self.caught_up.is_set():
            self.sweep()

    async def on_caught_up(self) -> None:
        await self.caught_up.wait()
        if self.is_leader():
            self.sweep()

    def sweep(self) -> None:
        """Everything a new leader owes: pending commands of online devices (sent ones too),
        the desired state of every configured device, cleared for decommissioned ones."""
        count = 0
        for device_id, state in self.registry.states.items():
            work = Work()
            if state.status == "decommissioned":
                work.clear = state.desired is not None
            else:
                work.desired = work.force_desired = state.desired is not None
                work.commands = work.resend = state.online and bool(state.pending)
            if work.clear or work.desired or work.commands:
                self.kick(device_id, work)
                count += 1
        log.info("dispatcher sweep", extra={"devices": count})

    def kick(self, device_id: str, work: Work) -> None:
        queued = self._work.get(device_id)
        if queued is None:
            self._work[device_id] = work
        else:
            queued.merge(work)
        if device_id not in self._scheduled:
            self._scheduled.add(device_id)
            self._queue.put_nowait(device_id)
            self._idle.clear()

    # --- workers ---------------------------------------------------------------------------
    async def run(self, stop: asyncio.Event) -> None:
        tasks = [asyncio.create_task(self._worker()) for _ in range(self.workers)]
        tasks.append(asyncio.create_task(self.on_caught_up()))
        try:
            await stop.wait()
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def wait_idle(self) -> None:
        """Until no device has work queued or in progress (for tests)."""
        await self._idle.wait()

    async def _worker(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            device_id = await self._queue.get()
            try:
                while (work := self._work.pop(device_id, None)) is not None:
                    try:
                        await self.process(device_id, work)
                    except Retry as e:
                        metrics.DISPATCH_FAILURES.labels(str(e)).inc()
                        log.warning(
                            "device dispatch postponed",
                            extra={"device_id": device_id, "reason": str(e)},
                        )
                        loop.call_later(self.retry_after, self.kick, device_id, work)
                        break
                    except Exception:
                        log.exception("device dispatch failed", extra={"device_id": device_id})
                        loop.call_later(self.retry_after, self.kick, device_id, work)
                        break
            finally:
                self._scheduled.discard(device_id)
                if not self._scheduled:
                    self._idle.set()

    async def process(self, device_id: str, work: Work) -> None:
        """Do one device's work in order: desired state first, then commands."""
        state = self.registry.states.get(device_id)
        if state is None or not self._may_publish():
            return
        if not await self.sink.wait_connected(5.0):
            raise Retry("mqtt_disconnected")
        if state.status == "decommissioned":
            if work.clear:
                await self._clear_desired(device_id)
            return
        if work.desired and state.desired is not None:
            desired = state.desired
            last = self.published_desired.get(device_id, 0)
            if desired.version > last or (work.force_desired and desired.version >= last):
                payload = _encode(DesiredMessage(desired.version, desired.config))
                await self._publish(desired_topic(device_id), payload, retain=True)
                self.published_desired[device_id] = desired.version
                metrics.DESIRED_PUBLISHED.labels("published").inc()
        if work.commands:
            await self._deliver(device_id, resend=work.resend)

    async def _deliver(self, device_id: str, *, resend: bool) -> None:
        state = self.registry.states[device_id]
        wanted = (REQUESTED, SENT) if resend else (REQUESTED,)
        for command in [c for c in state.pending.values() if c.state in wanted]:
            if not state.online or not self._may_publish():
                return  # held until the device's next Connected event / the next leader
            if state.pending.get(command.command_id) is not command:
                continue  # finished (acked, expired, cancelled) meanwhile
            remaining = (command.expires_at - self.now()).total_seconds()
            if remaining <= 0:
                command.state = EXPIRED
                self._arrived.pop(command.command_id, None)
                metrics.COMMANDS_DISPATCHED.labels("skipped_expired").inc()
                continue
            first = command.state == REQUESTED
            await self._publish(
                commands_topic(device_id), command_payload(command), expiry_s=math.ceil(remaining)
            )
            started = self._arrived.pop(command.command_id, None)
            if started is not None:
                metrics.DISPATCH_LATENCY.observe((time.perf_counter_ns() - started) / 1e9)
            metrics.COMMANDS_DISPATCHED.labels("published" if first else "redelivered").inc()
            if first:
                command.state = SENT
                await self._report_sent(device_id, command.command_id)

    async def _report_sent(self, device_id: str, command_id: str) -> None:
        """Publish CommandSent to JetStream, retrying until stored (or no longer leader)."""
        received_at = int(self.now().timestamp() * 1000)
        body = encode_ingest(
            CommandSent(device_id=device_id, received_at=received_at, command_id=command_id)
        )
        # On the ack subject, so the policy that records acks sees a command's sent report and
        # its ack in order, often in one batch (one aggregate write for both).
        subject = self.streams.ingest_subject("ack", device_id)
        headers = {"Nats-Msg-Id": f"sent:{command_id}"}
        delay = 0.1
        while True:
            try:
                await self.journal.publish(subject, body, 5.0, headers)
                return
            except Exception as e:
                metrics.DISPATCH_FAILURES.labels("jetstream").inc()
                log.warning(
                    "CommandSent not stored; retrying",
                    extra={"command_id": command_id, "error": repr(e)},
                )
            if not self.is_leader():
                return  # the next leader re-delivers it; the device deduplicates
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)

    async def _clear_desired(self, device_id: str) -> None:
        await self._publish(desired_topic(device_id), b"", retain=True)
        self.published_desired.pop(device_id, None)
        metrics.DESIRED_PUBLISHED.labels("cleared").inc()

    async def _publish(
        self, topic: str, payload: bytes, *, retain: bool = False, expiry_s: int | None = None
    ) -> None:
        try:
            await self.sink.publish(topic, payload, retain=retain, expiry_s=expiry_s)
        except Exception as e:
            raise Retry("mqtt_publish") from e

    def _may_publish(self) -> bool:
        return self.caught_up.is_set() and self.is_leader()
