"""The commands process's policies and command expiry on real NATS JetStream and PostgreSQL.

Ingest messages are published to the namespace's INGEST stream the way the bridge does; the
policies, the relay and the expiry scheduler run as tasks against the `migrated` namespace.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import nats
import pytest
from nats.aio.client import Client as NATS
from nats.js.client import JetStreamContext

from commands import handlers
from commands.api import StoreAdapter
from commands.expiry import ExpiryScheduler, expire_with, run_expiry
from commands.policy import Policies, run_policies
from commands.relay import Relay
from domain.device import Device, device_uuid
from domain.ingest import CommandAck, CommandSent, IngestMessage, Status, encode_ingest
from infra.eventstore import DeviceStore, GroupCommitter
from infra.settings import Settings
from infra.streams import Streams

pytestmark = pytest.mark.integration

T0 = datetime(2026, 1, 1, tzinfo=UTC)
DEADLINE_S = 30.0


def ms(at: datetime) -> int:
    return int(at.timestamp() * 1000)


async def wait_until(condition: Callable[[], Awaitable[bool]], what: str) -> None:
    deadline = time.monotonic() + DEADLINE_S
    while not await condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting until {what}")
        await asyncio.sleep(0.02)


@dataclass
class Harness:
    settings: Settings
    store: DeviceStore
    adapter: StoreAdapter
    executor: ThreadPoolExecutor
    nc: NATS
    js: JetStreamContext
    streams: Streams
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    tasks: list[asyncio.Task[Any]] = field(default_factory=list)

    async def run(self, fn: Callable[[], Any]) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn)

    def device(self, device_id: str = "dev-1") -> Device:
        device = self.store.get(device_id)
        assert device is not None
        return device

    def register(self, device_id: str = "dev-1") -> None:
        credentials = handlers.Credentials(
            new_secret=lambda: "secret-0123456789", new_salt=lambda: b"0123456789abcdef"
        )
        handlers.register(
            self.adapter,
            device_id=device_id,
            name="n",
            type="t",
            labels={},
            credentials=credentials,
            at=T0,
        )

    def request(self, command_id: str, ttl_s: int = 3600, at: datetime = T0) -> None:
        decide = handlers.request_command(command_id, "reboot", {}, ttl_s, at)
        handlers.change(self.adapter, "dev-1", decide)

    async def publish(self, message: IngestMessage, kind: str) -> None:
        subject = self.streams.ingest_subject(kind, message.device_id)
        await self.js.publish(subject, encode_ingest(message), stream=self.streams.ingest)

    async def published(self, count: int) -> None:
        """Wait until the relay has published `count` events to the EVENTS stream."""

        async def done() -> bool:
            info = await self.js.stream_info(self.streams.events)
            return int(info.state.messages) >= count

        await wait_until(done, f"{count} events are published")

    async def settled(self, kind: str) -> None:
        """Wait until the policy consumer of `kind` has acknowledged everything published."""
        durable = self.streams.consumer(f"commands-{kind}")

        async def done() -> bool:
            try:
                info = await self.js.consumer_info(self.streams.ingest, durable)
            except Exception:
                return False
            return bool(info.num_pending == 0 and info.num_ack_pending == 0)

        await wait_until(done, f"{kind} reports are applied")

    def start_policies(self) -> None:
        policies = Policies(self.adapter, self.run)
        self.tasks.append(
            asyncio.create_task(run_policies(self.js, self.streams, policies, self.stop))
        )

    def start_relay(self) -> None:
        pg = self.settings.postgres
        dsn = f"host={pg.host} port={pg.port} user={pg.user} dbname={pg.dbname}"
        relay = Relay(self.store, self.nc, self.streams, dsn)
        self.tasks.append(asyncio.create_task(relay.run(self.stop)))

    def start_expiry(self, stop: asyncio.Event | None = None) -> ExpiryScheduler:
        scheduler = ExpiryScheduler(expire_with(self.adapter, self.run))
        self.tasks.append(
            asyncio.create_task(run_expiry(self.js, self.streams, scheduler, stop or self.stop))
        )
        return scheduler

    def events(self, device_id: str = "dev-1") -> list[Any]:
        return list(self.store.events.get(device_uuid(device_id)))


@pytest.fixture
def committer(store: DeviceStore) -> Iterator[GroupCommitter]:
    committer = GroupCommitter(store)
    yield committer
    committer.close()


@pytest.fixture
async def harness(
    migrated: Settings, store: DeviceStore, committer: GroupCommitter
) -> AsyncIterator[Harness]:
    executor = ThreadPoolExecutor(8)
    nc = await nats.connect(migrated.nats_url)
    h = Harness(
        settings=migrated,
        store=store,
        adapter=StoreAdapter(store, committer),
        executor=executor,
        nc=nc,
        js=nc.jetstream(),
        streams=Streams(migrated.namespace),
    )
    yield h
    h.stop.set()
    results = await asyncio.gather(*h.tasks, return_exceptions=True)
    with contextlib.suppress(Exception):
        await nc.close()
    executor.shutdown()
    assert [r for r in results if isinstance(r, BaseException)] == []


# -- connectivity ------------------------------------------------------------------------------


async def test_online_status_connects_and_activates_a_provisioned_device(harness: Harness) -> None:
    harness.register()
    harness.start_policies()

    at = T0 + timedelta(seconds=5)
    await harness.publish(Status(device_id="dev-1", received_at=ms(at), online=True), "status")
    await harness.settled("status")

    device = harness.device()
    assert device.online is True
    assert device.status == "active"
    assert device.last_connected_at == at
    assert [type(e).__name__ for e in harness.events()] == ["Registered", "Connected"]


async def test_repeated_online_changes_nothing(harness: Harness) -> None:
    harness.register()
    harness.start_policies()
    first = T0 + timedelta(seconds=5)
    await harness.publish(Status(device_id="dev-1", received_at=ms(first), online=True), "status")
    await harness.settled("status")
    version = harness.device().version

    later = first + timedelta(seconds=1)
    await harness.publish(Status(device_id="dev-1", received_at=ms(later), online=True), "status")
    await harness.publish(Status(device_id="dev-1", received_at=ms(first), online=True), "status")
    await harness.settled("status")

    assert harness.device().version == version
    assert harness.device().last_connected_at == first


async def test_older_offline_after_newer_online_changes_nothing(harness: Harness) -> None:
    harness.register()
    harness.start_policies()
    online = T0 + timedelta(seconds=10)
    offline = T0 + timedelta(seconds=5)

    await harness.publish(Status(device_id="dev-1", received_at=ms(online), online=True), "status")
    await harness.publish(
        Status(device_id="dev-1", received_at=ms(offline), online=False), "status"
    )
    await harness.settled("status")

    device = harness.device()
    assert device.online is True
    assert [type(e).__name__ for e in harness.events()] == ["Registered", "Connected"]


async def test_newer_offline_disconnects(harness: Harness) -> None:
    harness.register()
    harness.start_policies()
    online = T0 + timedelta(seconds=5)
    offline = T0 + timedelta(seconds=10)

    await harness.publish(Status(device_id="dev-1", received_at=ms(online), online=True), "status")
    await harness.publish(
        Status(device_id="dev-1", received_at=ms(offline), online=False), "status"
    )
    await harness.settled("status")

    device = harness.device()
    assert device.online is False
    assert device.last_disconnected_at == offline


async def test_reports_of_unknown_and_decommissioned_devices_are_skipped_not_retried(
    harness: Harness,
) -> None:
    harness.register()
    harness.register("dev-2")
    handlers.change(harness.adapter, "dev-2", handlers.decommission("scrap", T0))
    harness.start_policies()
    at = T0 + timedelta(seconds=5)

    await harness.publish(Status(device_id="ghost", received_at=ms(at), online=True), "status")
    await harness.publish(Status(device_id="dev-2", received_at=ms(at), online=True), "status")
    await harness.js.publish(
        harness.streams.ingest_subject("status", "dev-1"),
        b"not json",
        stream=harness.streams.ingest,
    )
    await harness.publish(Status(device_id="dev-1", received_at=ms(at), online=True), "status")
    await harness.settled("status")

    assert harness.device().online is True
    assert harness.device("dev-2").version == 2
    assert harness.store.get("ghost") is None


# -- command reports ---------------------------------------------------------------------------


async def test_ok_ack_acknowledges_with_its_result_and_a_duplicate_ack_adds_nothing(
    harness: Harness,
) -> None:
    harness.register()
    harness.request("cmd-1")
    harness.start_policies()
    at = T0 + timedelta(seconds=2)
    ack = CommandAck(
        device_id="dev-1", received_at=ms(at), command_id="cmd-1", status="ok", result={"n": 1}
    )

    await harness.publish(ack, "ack")
    await harness.settled("ack")
    version = harness.device().version
    await harness.publish(ack, "ack")
    await harness.settled("ack")

    device = harness.device()
    assert device.commands["cmd-1"]["state"] == "acknowledged"
    assert device.version == version == 3
    last = harness.events()[-1]
    assert type(last).__name__ == "CommandAcknowledged"
    assert (last.command_id, last.result, last.timestamp) == ("cmd-1", {"n": 1}, at)


async def test_error_ack_fails_the_command(harness: Harness) -> None:
    harness.register()
    harness.request("cmd-1")
    harness.start_policies()
    at = T0 + timedelta(seconds=2)

    await harness.publish(
        CommandAck(
            device_id="dev-1",
            received_at=ms(at),
            command_id="cmd-1",
            status="error",
            result={"error": "busy"},
        ),
        "ack",
    )
    await harness.settled("ack")

    assert harness.device().commands["cmd-1"]["state"] == "failed"
    assert harness.events()[-1].result == {"error": "busy"}


async def test_ack_of_an_unknown_command_changes_nothing(harness: Harness) -> None:
    harness.register()
    harness.start_policies()
    at = T0 + timedelta(seconds=2)

    await harness.publish(
        CommandAck(device_id="dev-1", received_at=ms(at), command_id="nope", status="ok"), "ack"
    )
    await harness.settled("ack")

    assert harness.device().version == 1


async def test_sent_report_marks_the_command_sent_once(harness: Harness) -> None:
    harness.register()
    harness.request("cmd-1")
    harness.start_policies()
    sent = CommandSent(
        device_id="dev-1", received_at=ms(T0 + timedelta(seconds=1)), command_id="cmd-1"
    )

    await harness.publish(sent, "ack")  # the bridge reports on the ack subject
    await harness.publish(sent, "ack")
    await harness.settled("ack")

    device = harness.device()
    assert device.commands["cmd-1"]["state"] == "sent"
    assert [type(e).__name__ for e in harness.events()] == [
        "Registered",
        "CommandRequested",
        "CommandSent",
    ]


async def test_reports_of_many_devices_in_one_batch_all_apply(harness: Harness) -> None:
    ids = [f"dev-{n}" for n in range(1, 21)]
    for device_id in ids:
        harness.register(device_id)
    harness.start_policies()
    at = T0 + timedelta(seconds=1)

    for device_id in ids:
        await harness.publish(
            Status(device_id=device_id, received_at=ms(at), online=True), "status"
        )
        await harness.publish(
            Status(device_id=device_id, received_at=ms(at + timedelta(seconds=1)), online=False),
            "status",
        )
    await harness.settled("status")

    for device_id in ids:
        device = harness.device(device_id)
        assert (device.status, device.online, device.version) == ("active", False, 3)


# -- expiry ------------------------------------------------------------------------------------


def requested_now(harness: Harness, command_id: str, ttl_s: int) -> None:
    harness.request(command_id, ttl_s=ttl_s, at=datetime.now(UTC))


async def expired(harness: Harness, command_id: str) -> None:
    async def check() -> bool:
        return bool(harness.device().commands[command_id]["state"] == "expired")

    await wait_until(check, f"{command_id} is expired")


async def test_command_with_a_1s_ttl_expires_without_anyone_touching_it(harness: Harness) -> None:
    harness.register()
    harness.start_relay()
    scheduler = harness.start_expiry()
    await wait_until(scheduler_caught_up(scheduler), "the scheduler has caught up")

    requested_now(harness, "cmd-1", ttl_s=1)
    requested_now(harness, "cmd-2", ttl_s=3600)
    await expired(harness, "cmd-1")

    device = harness.device()
    assert device.commands["cmd-2"]["state"] == "requested"
    last = harness.events()[-1]
    assert type(last).__name__ == "CommandExpired"
    assert last.timestamp >= device.commands["cmd-1"]["expires_at"]

    async def forgotten() -> bool:
        return len(scheduler.pending) == 1

    await wait_until(forgotten, "the scheduler forgets the expired command")


async def test_scheduler_started_after_the_request_still_expires_it(harness: Harness) -> None:
    harness.register()
    harness.start_relay()
    first_stop = asyncio.Event()
    first = harness.start_expiry(first_stop)
    await wait_until(scheduler_caught_up(first), "the first scheduler has caught up")
    requested_now(harness, "cmd-1", ttl_s=2)

    async def watched() -> bool:
        return len(first.pending) == 1

    await wait_until(watched, "the first scheduler watches the command")
    first_stop.set()  # the process stops before the command is due
    await asyncio.wait_for(harness.tasks.pop(), 10)
    assert harness.device().commands["cmd-1"]["state"] == "requested"

    harness.start_expiry()  # restarted: learns of the command from the log alone
    await expired(harness, "cmd-1")


async def test_finished_commands_are_not_watched(harness: Harness) -> None:
    harness.register()
    now = datetime.now(UTC)
    for command_id in ("cmd-1", "cmd-2", "cmd-3"):
        harness.request(command_id, ttl_s=3600, at=now)
    handlers.change(harness.adapter, "dev-1", handlers.acknowledge("cmd-1", True, {}, now))
    handlers.change(harness.adapter, "dev-1", handlers.cancel("cmd-2", "no", now))
    harness.start_relay()
    await harness.published(6)

    scheduler = harness.start_expiry()
    await wait_until(scheduler_caught_up(scheduler), "the scheduler has caught up")

    assert len(scheduler.pending) == 1
    assert scheduler.pending.next_due() == harness.device().commands["cmd-3"]["expires_at"]


def scheduler_caught_up(scheduler: ExpiryScheduler) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        return scheduler.caught_up.is_set()

    return check
