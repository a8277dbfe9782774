"""The policies' batch handler and the expiry scheduler, with fakes and a fixed clock."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any, cast

import pytest
from nats.aio.msg import Msg

from commands import handlers
from commands.expiry import RETRY_AFTER, ExpiryScheduler, PendingCommands, expire_with
from commands.policy import Policies
from domain.ingest import CommandAck, CommandSent, IngestMessage, Status, Telemetry, encode_ingest
from domain.published import (
    DeviceCommandAcknowledged,
    DeviceCommandCancelled,
    DeviceCommandExpired,
    DeviceCommandRequested,
    DeviceCommandSent,
    encode_event,
)
from tests.unit.support import DEVICE_ID, T0, at
from tests.unit.test_handlers import FakeStore, register_device


class FakeMsg:
    def __init__(self, data: bytes) -> None:
        self.data = data


def msgs(*items: IngestMessage | bytes) -> list[Msg]:
    return [
        cast(Msg, FakeMsg(item if isinstance(item, bytes) else encode_ingest(item)))
        for item in items
    ]


def ms(when: datetime) -> int:
    return int(when.timestamp() * 1000)


async def inline(fn: Callable[[], handlers.Outcome]) -> handlers.Outcome:
    return fn()


class BrokenStore(FakeStore):
    """Once `broken`, loads devices but fails every save, like a store that went away."""

    broken = False

    def save_device(self, device: Any, idempotency: Any = None) -> int:
        if self.broken:
            raise ConnectionError("store down")
        return super().save_device(device, idempotency)


def store_with(*device_ids: str, store: FakeStore | None = None) -> FakeStore:
    store = store or FakeStore()
    for device_id in device_ids:
        register_device(store, device_id)
    return store


def requested(store: FakeStore, command_id: str, device_id: str = DEVICE_ID) -> None:
    decide = handlers.request_command(command_id, "reboot", {}, 60, at(0))
    handlers.change(store, device_id, decide)


# -- policies ----------------------------------------------------------------------------------


async def test_batch_applies_each_devices_reports_in_order_in_one_append() -> None:
    store = store_with("a", "b")
    requested(store, "c1", "a")
    policies = Policies(store, inline)
    store.save_attempts = 0

    outcome = await policies.handle(
        msgs(
            Status(device_id="a", received_at=ms(at(1)), online=True),
            Status(device_id="b", received_at=ms(at(1)), online=True),
            CommandSent(device_id="a", received_at=ms(at(2)), command_id="c1"),
            Status(device_id="b", received_at=ms(at(3)), online=False),
            CommandAck(device_id="a", received_at=ms(at(4)), command_id="c1", status="ok"),
        )
    )

    assert (outcome.retry, outcome.poison) == (set(), set())
    assert store.save_attempts == 2
    assert store.events_of("a")[1:] == [
        "CommandRequested",
        "Connected",
        "CommandSent",
        "CommandAcknowledged",
    ]
    assert store.events_of("b")[1:] == ["Connected", "Disconnected"]


async def test_reports_are_applied_at_the_bridges_receipt_time() -> None:
    store = store_with(DEVICE_ID)

    await Policies(store, inline).handle(
        msgs(Status(device_id=DEVICE_ID, received_at=ms(at(7.25)), online=True))
    )

    device = store.get(DEVICE_ID)
    assert device is not None
    assert device.last_connected_at == at(7.25)


async def test_error_ack_fails_and_ok_ack_acknowledges() -> None:
    store = store_with(DEVICE_ID)
    requested(store, "c1")
    requested(store, "c2")

    await Policies(store, inline).handle(
        msgs(
            CommandAck(device_id=DEVICE_ID, received_at=1, command_id="c1", status="error"),
            CommandAck(device_id=DEVICE_ID, received_at=1, command_id="c2", status="ok"),
        )
    )

    device = store.get(DEVICE_ID)
    assert device is not None
    assert device.commands["c1"]["state"] == "failed"
    assert device.commands["c2"]["state"] == "acknowledged"


async def test_unknown_devices_undecodable_and_unhandled_messages_are_acked_not_retried() -> None:
    store = store_with(DEVICE_ID)
    telemetry = Telemetry(device_id=DEVICE_ID, received_at=1, readings=[])

    outcome = await Policies(store, inline).handle(
        msgs(
            Status(device_id="ghost", received_at=1, online=True),
            b"{not json",
            telemetry,
            Status(device_id=DEVICE_ID, received_at=1, online=True),
        )
    )

    assert (outcome.retry, outcome.poison) == (set(), set())
    assert store.events_of(DEVICE_ID) == ["Registered", "Connected"]


async def test_a_refused_report_does_not_block_the_devices_other_reports() -> None:
    store = store_with(DEVICE_ID, "gone")
    handlers.change(store, "gone", handlers.decommission("eol", at(0)))

    outcome = await Policies(store, inline).handle(
        msgs(
            Status(device_id="gone", received_at=ms(at(1)), online=True),
            Status(device_id=DEVICE_ID, received_at=ms(at(1)), online=True),
        )
    )

    assert outcome.retry == set()
    assert store.events_of("gone") == ["Registered", "Decommissioned"]
    assert store.events_of(DEVICE_ID) == ["Registered", "Connected"]


async def test_store_failures_are_retried_for_the_affected_messages_only() -> None:
    store = BrokenStore()
    store_with(DEVICE_ID, "other", store=store)
    store.broken = True

    outcome = await Policies(store, inline).handle(
        msgs(
            Status(device_id="ghost", received_at=1, online=True),
            Status(device_id=DEVICE_ID, received_at=1, online=True),
            Status(device_id="other", received_at=1, online=True),
        )
    )

    assert outcome.retry == {1, 2}


async def test_reports_that_change_nothing_save_nothing() -> None:
    store = store_with(DEVICE_ID)
    policies = Policies(store, inline)
    online = Status(device_id=DEVICE_ID, received_at=ms(at(1)), online=True)
    await policies.handle(msgs(online))
    store.save_attempts = 0

    outcome = await policies.handle(msgs(online, online))

    assert outcome.retry == set()
    assert store.save_attempts == 0


# -- pending commands --------------------------------------------------------------------------


def test_pending_commands_come_due_in_expiry_order() -> None:
    pending = PendingCommands()
    pending.add(("d", "late"), at(30))
    assert pending.add(("d", "early"), at(10)) is True
    assert pending.add(("d", "middle"), at(20)) is False

    assert pending.next_due() == at(10)
    assert pending.pop_due(at(25), limit=10) == [
        (("d", "early"), at(10)),
        (("d", "middle"), at(20)),
    ]
    assert len(pending) == 1
    assert pending.pop_due(at(25), limit=10) == []


def test_removed_commands_never_come_due() -> None:
    pending = PendingCommands()
    pending.add(("d", "c1"), at(10))
    pending.add(("d", "c2"), at(20))

    pending.remove(("d", "c1"))
    pending.remove(("d", "never-added"))

    assert pending.next_due() == at(20)
    assert [key for key, _ in pending.pop_due(at(100), limit=10)] == [("d", "c2")]


def test_pop_due_stops_at_its_limit() -> None:
    pending = PendingCommands()
    for n in range(5):
        pending.add(("d", f"c{n}"), at(n))

    assert len(pending.pop_due(at(100), limit=2)) == 2
    assert len(pending) == 3


def test_heap_of_removed_entries_is_compacted() -> None:
    pending = PendingCommands()
    for n in range(10_000):
        pending.add(("d", f"c{n}"), at(n))
        pending.remove(("d", f"c{n}"))

    assert len(pending) == 0
    assert len(pending._heap) <= 1024 + 1
    assert pending.next_due() is None


# -- expiry scheduler --------------------------------------------------------------------------


class Expiries:
    """A fake expire handler that records its calls; `failing` makes it ask for a retry."""

    def __init__(self, stop: asyncio.Event, after: int = 1) -> None:
        self.calls: list[tuple[str, str, datetime]] = []
        self.failing = False
        self.stop = stop
        self.after = after

    async def __call__(self, device_id: str, command_id: str, when: datetime) -> bool:
        self.calls.append((device_id, command_id, when))
        if len(self.calls) >= self.after:
            self.stop.set()
        return not self.failing


def request_event(command_id: str, expires_at: datetime, version: int = 2) -> bytes:
    return encode_event(
        DeviceCommandRequested(
            device_id=DEVICE_ID,
            version=version,
            at=T0,
            position=version,
            command_id=command_id,
            name="reboot",
            args={},
            expires_at=expires_at,
        )
    )


def test_scheduler_watches_requested_commands_until_they_finish() -> None:
    scheduler = ExpiryScheduler(Expiries(asyncio.Event()))
    common: dict[str, Any] = {"device_id": DEVICE_ID, "at": T0, "position": 1}

    scheduler.apply_raw(1, request_event("c1", at(10)))
    scheduler.apply_raw(2, request_event("c2", at(20)))
    scheduler.apply_raw(3, request_event("c3", at(30)))
    scheduler.apply_raw(4, encode_event(DeviceCommandSent(**common, version=5, command_id="c1")))
    scheduler.apply_raw(
        5, encode_event(DeviceCommandAcknowledged(**common, version=6, command_id="c2", result={}))
    )
    scheduler.apply_raw(
        6, encode_event(DeviceCommandCancelled(**common, version=7, command_id="c3", reason="x"))
    )
    scheduler.apply_raw(7, b'garbage with "device.command_ in it')

    assert scheduler.sequence == 7
    assert len(scheduler.pending) == 1
    assert scheduler.pending.next_due() == at(10)
    scheduler.apply_raw(8, encode_event(DeviceCommandExpired(**common, version=8, command_id="c1")))
    assert len(scheduler.pending) == 0


async def test_scheduler_expires_what_is_due_at_no_earlier_than_its_expiry() -> None:
    stop = asyncio.Event()
    expiries = Expiries(stop, after=2)
    scheduler = ExpiryScheduler(expiries, clock=lambda: at(100))
    scheduler.apply_raw(1, request_event("c1", at(50)))
    scheduler.apply_raw(2, request_event("c2", at(100)))
    scheduler.apply_raw(3, request_event("c3", at(1000)))
    scheduler.caught_up.set()

    await asyncio.wait_for(scheduler.run(stop), 5)

    assert sorted(expiries.calls) == [(DEVICE_ID, "c1", at(100)), (DEVICE_ID, "c2", at(100))]
    assert scheduler.pending.next_due() == at(1000)


async def test_scheduler_waits_until_it_has_caught_up_with_the_log() -> None:
    stop = asyncio.Event()
    expiries = Expiries(stop)
    scheduler = ExpiryScheduler(expiries, clock=lambda: at(100))
    scheduler.apply_raw(1, request_event("c1", at(50)))
    running = asyncio.create_task(scheduler.run(stop))
    await asyncio.sleep(0)  # let it start: it must not expire anything yet

    assert expiries.calls == []
    scheduler.caught_up.set()
    await asyncio.wait_for(running, 5)
    assert expiries.calls == [(DEVICE_ID, "c1", at(100))]


async def test_failed_expiry_is_retried_later() -> None:
    stop = asyncio.Event()
    expiries = Expiries(stop)
    expiries.failing = True
    scheduler = ExpiryScheduler(expiries, clock=lambda: at(100))
    scheduler.apply_raw(1, request_event("c1", at(50)))
    scheduler.caught_up.set()

    await asyncio.wait_for(scheduler.run(stop), 5)

    assert scheduler.pending.next_due() == at(100) + RETRY_AFTER


async def test_new_earlier_command_wakes_the_scheduler() -> None:
    stop = asyncio.Event()
    expiries = Expiries(stop)
    now = [at(0)]
    scheduler = ExpiryScheduler(expiries, clock=lambda: now[0])
    scheduler.apply_raw(1, request_event("late", at(10_000)))
    scheduler.caught_up.set()
    running = asyncio.create_task(scheduler.run(stop))
    await asyncio.sleep(0)

    now[0] = at(60)
    scheduler.apply_raw(2, request_event("soon", at(30)))

    await asyncio.wait_for(running, 5)
    assert expiries.calls == [(DEVICE_ID, "soon", at(60))]


# -- the expire handler --------------------------------------------------------------------------


async def test_expire_handler_expires_a_due_command_and_settles_no_ops() -> None:
    store = store_with(DEVICE_ID)
    requested(store, "c1")
    expire = expire_with(store, inline)

    assert await expire(DEVICE_ID, "c1", at(60)) is True
    assert await expire(DEVICE_ID, "c1", at(61)) is True
    assert await expire("ghost", "c1", at(61)) is True

    assert store.events_of(DEVICE_ID)[-1] == "CommandExpired"
    assert store.events_of(DEVICE_ID).count("CommandExpired") == 1


async def test_expire_handler_asks_for_a_retry_when_the_store_fails() -> None:
    store = BrokenStore()
    store.broken = True

    async def broken_run(fn: Callable[[], handlers.Outcome]) -> handlers.Outcome:
        raise ConnectionError("store down")

    assert await expire_with(store, broken_run)(DEVICE_ID, "c1", at(60)) is False


@pytest.mark.parametrize("delta", [timedelta(0), timedelta(milliseconds=1)])
def test_pending_commands_keep_distinct_due_times_per_command(delta: timedelta) -> None:
    pending = PendingCommands()
    pending.add(("d", "c1"), at(10))
    pending.add(("d", "c1"), at(10) + delta)  # re-added (retry): the later time wins

    assert pending.next_due() == at(10) + delta
    assert len(pending.pop_due(at(11), limit=10)) == 1
    assert pending.pop_due(at(11), limit=10) == []
