"""The command dispatcher and its leader lease, with a fake broker, journal, KV bucket and clock."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError

from bridges.dispatch import Dispatcher, Work, command_payload
from bridges.lease import Lease
from bridges.mqtt import PublishFailed
from bridges.registry import SENT, DeviceRegistry, PendingCommand
from domain.ingest import CommandSent, decode_ingest
from domain.published import PublishedEvent
from infra.streams import Streams
from tests.unit.support import at
from tests.unit.test_bridge_registry import Log

NOW = at(60)
CET = timezone(timedelta(hours=1))
STREAMS = Streams("ns")


# --- fakes ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Message:
    topic: str
    payload: bytes
    retain: bool
    expiry_s: int | None

    def json(self) -> Any:
        return json.loads(self.payload)


@dataclass
class FakeSink:
    connected: bool = True
    failures: int = 0
    published: list[Message] = field(default_factory=list)
    gates: dict[str, asyncio.Event] = field(default_factory=dict)

    async def wait_connected(self, within: float) -> bool:
        return self.connected

    async def publish(
        self, topic: str, payload: bytes, *, retain: bool = False, expiry_s: int | None = None
    ) -> None:
        if self.failures:
            self.failures -= 1
            raise PublishFailed("no PUBACK")
        gate = self.gates.get(topic)
        if gate is not None:
            await gate.wait()
        self.published.append(Message(topic, payload, retain, expiry_s))

    def on(self, topic: str) -> list[Message]:
        return [m for m in self.published if m.topic == topic]


@dataclass
class FakeJournal:
    stored: list[tuple[str, bytes, dict[str, str]]] = field(default_factory=list)
    failures: int = 0

    async def publish(
        self, subject: str, payload: bytes, wait: float, headers: dict[str, str] | None = None
    ) -> Any:
        if self.failures:
            self.failures -= 1
            raise TimeoutError
        self.stored.append((subject, payload, dict(headers or {})))
        return None


class Harness:
    def __init__(self, caught_up: bool = True) -> None:
        self.registry = DeviceRegistry()
        self.sink = FakeSink()
        self.journal = FakeJournal()
        self.leader = True
        self.caught_up = asyncio.Event()
        if caught_up:
            self.caught_up.set()
        self.dispatcher = Dispatcher(
            self.registry,
            self.sink,
            self.journal,
            STREAMS,
            is_leader=lambda: self.leader,
            caught_up=self.caught_up,
            workers=4,
            retry_after=0.01,
            now=lambda: NOW,
        )
        self.registry.listener = self.dispatcher.on_event
        self.logs: dict[str, Log] = {}

    def log(self, device_id: str = "dev-1") -> Log:
        if device_id not in self.logs:
            self.logs[device_id] = Log(device_id)
        return self.logs[device_id]

    async def apply(self, *events: PublishedEvent) -> None:
        for event in events:
            self.registry.apply(event)
        await self.settle()

    async def settle(self) -> None:
        for _ in range(3):  # a retry re-queues after `retry_after`
            await asyncio.sleep(0.03)
            await self.dispatcher.wait_idle()

    def commands(self, device_id: str = "dev-1") -> list[str]:
        return [m.json()["command_id"] for m in self.sink.on(f"devices/{device_id}/commands")]


@asynccontextmanager
async def running(h: Harness) -> AsyncIterator[Harness]:
    stop = asyncio.Event()
    task = asyncio.create_task(h.dispatcher.run(stop))
    try:
        yield h
    finally:
        stop.set()
        await task


@pytest.fixture
async def harness() -> AsyncIterator[Harness]:
    async with running(Harness()) as h:
        yield h


# --- commands ---------------------------------------------------------------------------------
async def test_a_command_for_an_online_device_is_published_once_with_the_contract_payload(
    harness: Harness,
) -> None:
    log = harness.log()
    await harness.apply(log.registered(), log.connected(), log.requested("c1", ttl_s=3600))
    [message] = harness.sink.published
    assert message.topic == "devices/dev-1/commands"
    assert not message.retain
    assert message.json() == {
        "command_id": "c1",
        "name": "reboot",
        "args": {"delay": 1},
        "expires_at": "2026-01-01T01:00:00Z",
    }
    assert message.expiry_s == 3600 - 60
    [(subject, body, headers)] = harness.journal.stored
    assert subject == "ns.ingest.ack.dev-1"  # acks and sent reports share a subject
    assert headers == {"Nats-Msg-Id": "sent:c1"}
    sent = decode_ingest(body)
    assert isinstance(sent, CommandSent)
    assert (sent.device_id, sent.command_id, sent.received_at) == (
        "dev-1",
        "c1",
        int(NOW.timestamp() * 1000),
    )
    assert harness.registry.states["dev-1"].pending["c1"].state == SENT
    harness.dispatcher.kick("dev-1", Work(commands=True))
    await harness.apply(log.requested("c2"))
    assert harness.commands() == ["c1", "c2"]


def test_expires_at_is_rfc3339_utc_whatever_the_zone_it_came_in() -> None:
    command = PendingCommand("c1", "reboot", {}, datetime(2026, 1, 1, 2, 0, 0, 500_000, CET))
    assert json.loads(command_payload(command))["expires_at"] == "2026-01-01T01:00:00.500000Z"


async def test_commands_for_an_offline_device_are_held_until_it_connects(
    harness: Harness,
) -> None:
    log = harness.log()
    await harness.apply(log.registered(), log.requested("c1"), log.requested("c2"))
    assert harness.sink.published == []
    await harness.apply(log.connected())
    assert harness.commands() == ["c1", "c2"]
    assert [h["Nats-Msg-Id"] for _, _, h in harness.journal.stored] == ["sent:c1", "sent:c2"]


async def test_a_reconnect_redelivers_sent_unacknowledged_commands_without_a_second_sent_report(
    harness: Harness,
) -> None:
    log = harness.log()
    await harness.apply(log.registered(), log.connected(), log.requested("c1"), log.requested("c2"))
    await harness.apply(log.sent("c1"), log.sent("c2"), log.acknowledged("c1"))
    await harness.apply(log.disconnected(), log.requested("c3"), log.connected())
    assert harness.commands() == ["c1", "c2", "c2", "c3"]
    assert [h["Nats-Msg-Id"] for _, _, h in harness.journal.stored] == [
        "sent:c1",
        "sent:c2",
        "sent:c3",
    ]


async def test_an_expired_command_is_never_published(harness: Harness) -> None:
    log = harness.log()
    await harness.apply(log.registered(), log.requested("old", ttl_s=30), log.requested("new"))
    await harness.apply(log.connected())
    assert harness.commands() == ["new"]
    assert len(harness.journal.stored) == 1


async def test_one_devices_commands_go_in_order_while_another_device_proceeds(
    harness: Harness,
) -> None:
    slow, fast = harness.log("slow"), harness.log("fast")
    gate = harness.sink.gates["devices/slow/commands"] = asyncio.Event()
    await harness.apply(slow.registered(), slow.connected(), fast.registered(), fast.connected())
    for i in range(5):
        harness.registry.apply(slow.requested(f"s{i}"))
        harness.registry.apply(fast.requested(f"f{i}"))
    await asyncio.sleep(0.05)
    assert harness.commands("fast") == [f"f{i}" for i in range(5)]
    assert harness.commands("slow") == []
    gate.set()
    await harness.settle()
    assert harness.commands("slow") == [f"s{i}" for i in range(5)]


async def test_a_failed_publish_is_retried_and_delivered_once(harness: Harness) -> None:
    log = harness.log()
    harness.sink.failures = 2
    harness.journal.failures = 2
    await harness.apply(log.registered(), log.connected(), log.requested("c1"))
    await harness.settle()
    assert harness.commands() == ["c1"]
    assert [h["Nats-Msg-Id"] for _, _, h in harness.journal.stored] == ["sent:c1"]


async def test_a_command_finished_before_its_turn_is_not_published(harness: Harness) -> None:
    log = harness.log()
    await harness.apply(log.registered(), log.requested("c1"), log.cancelled("c1"))
    await harness.apply(log.connected())
    assert harness.sink.published == []


# --- leadership and catch-up ------------------------------------------------------------------
async def test_a_follower_publishes_nothing(harness: Harness) -> None:
    harness.leader = False
    log = harness.log()
    await harness.apply(log.registered(), log.connected(), log.configured(1, {"a": 1}))
    await harness.apply(log.requested("c1"))
    assert harness.sink.published == []


async def test_nothing_is_published_before_the_registry_has_caught_up() -> None:
    async with running(Harness(caught_up=False)) as harness:
        log = harness.log()
        await harness.apply(log.registered(), log.connected(), log.requested("c1"))
        assert harness.sink.published == []
        harness.caught_up.set()
        await harness.settle()  # the dispatcher sweeps once caught up
        assert harness.commands() == ["c1"]


async def test_a_new_leader_delivers_everything_pending_and_republishes_desired_state(
    harness: Harness,
) -> None:
    harness.leader = False
    online, offline, gone = harness.log("online"), harness.log("offline"), harness.log("gone")
    await harness.apply(
        online.registered(),
        online.configured(3, {"mode": "eco"}),
        online.connected(),
        online.requested("c1"),
        online.requested("c2"),
        online.sent("c1"),
        offline.registered(),
        offline.requested("c3"),
        gone.registered(),
        gone.configured(1, {"x": 1}),
        gone.decommissioned(),
    )
    harness.leader = True
    harness.dispatcher.on_leadership(True)
    await harness.settle()
    assert harness.commands("online") == ["c1", "c2"]
    assert harness.commands("offline") == []
    [desired] = harness.sink.on("devices/online/desired")
    assert desired.retain
    assert desired.json() == {"version": 3, "config": {"mode": "eco"}}
    [cleared] = harness.sink.on("devices/gone/desired")
    assert (cleared.payload, cleared.retain) == (b"", True)
    assert [h["Nats-Msg-Id"] for _, _, h in harness.journal.stored] == ["sent:c2"]
    harness.dispatcher.on_leadership(True)  # leadership regained: desired republished (same)
    await harness.settle()
    assert [m.json()["version"] for m in harness.sink.on("devices/online/desired")] == [3, 3]


# --- desired state ----------------------------------------------------------------------------
async def test_desired_state_is_published_retained_and_never_goes_back_a_version(
    harness: Harness,
) -> None:
    log = harness.log()
    await harness.apply(log.registered(), log.configured(1, {"a": 1}))
    await harness.apply(log.configured(3, {"a": 3}))
    await harness.apply(log.configured(2, {"a": 2}))  # out of order: changes nothing
    harness.dispatcher.kick("dev-1", Work(desired=True))  # a redelivery: nothing new
    await harness.settle()
    messages = harness.sink.on("devices/dev-1/desired")
    assert [m.json() for m in messages] == [
        {"version": 1, "config": {"a": 1}},
        {"version": 3, "config": {"a": 3}},
    ]
    assert all(m.retain and m.expiry_s is None for m in messages)


async def test_decommissioning_clears_the_retained_desired_state(harness: Harness) -> None:
    log = harness.log()
    await harness.apply(log.registered(), log.configured(1, {"a": 1}), log.decommissioned())
    assert [m.payload for m in harness.sink.on("devices/dev-1/desired")][-1] == b""


async def test_a_disconnected_broker_postpones_the_work(harness: Harness) -> None:
    harness.sink.connected = False
    log = harness.log()
    await harness.apply(log.registered(), log.connected(), log.requested("c1"))
    assert harness.sink.published == []
    harness.sink.connected = True
    await harness.settle()
    assert harness.commands() == ["c1"]


# --- the lease ----------------------------------------------------------------------------------
class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


@dataclass
class Entry:
    value: bytes
    revision: int


class FakeBucket:
    """One KV key with a TTL on the fake clock, and optionally lost answers."""

    def __init__(self, clock: Clock, ttl: float = 10.0) -> None:
        self.clock = clock
        self.ttl = ttl
        self.value: bytes | None = None
        self.revision = 0
        self.stored_at = 0.0
        self.lose_answer = False
        self.down = False
        self.renewed = asyncio.Event()  # set by the third write

    def _live(self) -> bool:
        return self.value is not None and self.clock() < self.stored_at + self.ttl

    def _store(self, value: bytes) -> int:
        if self.down:
            raise TimeoutError
        self.revision += 1
        self.value, self.stored_at = value, self.clock()
        if self.revision >= 3:
            self.renewed.set()
        if self.lose_answer:
            self.lose_answer = False
            raise TimeoutError
        return self.revision

    async def create(self, key: str, value: bytes) -> int:
        if self._live():
            raise KeyWrongLastSequenceError
        return self._store(value)

    async def update(self, key: str, value: bytes, last: int | None = None) -> int:
        if not self._live() and self.down:
            raise TimeoutError
        if not self._live() or last != self.revision:
            raise KeyWrongLastSequenceError
        return self._store(value)

    async def get(self, key: str) -> Entry:
        if not self._live():
            raise KeyNotFoundError
        assert self.value is not None
        return Entry(self.value, self.revision)

    async def delete(self, key: str, last: int | None = None) -> bool:
        self.value = None
        return True


def lease(bucket: FakeBucket, owner: str, clock: Clock, changes: list[bool]) -> Lease:
    async def open_bucket() -> FakeBucket:
        return bucket

    return Lease(open_bucket, "command-dispatcher", owner, clock=clock, on_change=changes.append)


async def test_only_one_replica_holds_the_lease_and_renewing_keeps_it() -> None:
    clock = Clock()
    bucket = FakeBucket(clock)
    a_changes: list[bool] = []
    b_changes: list[bool] = []
    a, b = lease(bucket, "a", clock, a_changes), lease(bucket, "b", clock, b_changes)
    await a.step()
    await b.step()
    assert (a.is_leader(), b.is_leader()) == (True, False)
    for _ in range(10):  # 30 s of renewals every 3 s
        clock.t += 3
        await a.step()
        await b.step()
    assert (a.is_leader(), b.is_leader()) == (True, False)
    assert (a_changes, b_changes) == ([True], [])


async def test_a_holder_that_stops_renewing_steps_down_before_another_takes_over() -> None:
    clock = Clock()
    bucket = FakeBucket(clock)
    a_changes: list[bool] = []
    a, b = lease(bucket, "a", clock, a_changes), lease(bucket, "b", clock, [])
    await a.step()
    clock.t += 9.0  # a is stalled: no renewal since it sent its write
    assert not a.is_leader()  # ttl 10 s minus the 1 s margin
    await b.step()
    assert not b.is_leader()  # the key has not expired yet
    clock.t += 1.0
    await b.step()
    assert b.is_leader()
    await a.step()
    assert not a.is_leader()
    assert a_changes == [True, False]


async def test_a_renewal_failing_with_nats_down_keeps_the_lease_until_its_deadline_only() -> None:
    clock = Clock()
    bucket = FakeBucket(clock)
    a = lease(bucket, "a", clock, [])
    await a.step()
    bucket.down = True
    clock.t += 3
    await a.step()
    assert a.is_leader()
    clock.t += 6
    await a.step()
    assert not a.is_leader()


async def test_a_renewal_with_a_wrong_revision_steps_down_at_once() -> None:
    clock = Clock()
    bucket = FakeBucket(clock)
    a = lease(bucket, "a", clock, [])
    await a.step()
    bucket.revision += 5  # someone else wrote the key
    clock.t += 3
    await a.step()
    assert not a.is_leader()


async def test_a_create_whose_answer_was_lost_is_adopted() -> None:
    clock = Clock()
    bucket = FakeBucket(clock)
    bucket.lose_answer = True
    a = lease(bucket, "a", clock, [])
    await a.step()
    assert not a.is_leader()
    clock.t += 0.5
    await a.step()
    assert a.is_leader()


async def test_releasing_the_lease_lets_another_replica_take_it_at_once() -> None:
    clock = Clock()
    bucket = FakeBucket(clock)
    changes: list[bool] = []
    a, b = lease(bucket, "a", clock, changes), lease(bucket, "b", clock, [])
    await a.step()
    await a.release()
    await b.step()
    assert b.is_leader()
    assert changes == [True, False]


async def test_run_renews_until_stopped_then_releases() -> None:
    clock = Clock()
    bucket = FakeBucket(clock)
    changes: list[bool] = []
    a = lease(bucket, "a", clock, changes)
    a.renew_every = 0.01
    stop = asyncio.Event()
    task = asyncio.create_task(a.run(stop))
    await bucket.renewed.wait()
    stop.set()
    await task
    assert bucket.value is None
    assert changes == [True, False]
