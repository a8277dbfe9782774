"""Alert-rule events beside the device events, on real PostgreSQL and NATS JetStream: the relay
publishes them on `rules.<rule_id>` in commit order, `iot migrate` adds `rules.>` to an EVENTS
stream made before there were rules, and the replays' event-store reader yields them."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import nats
import pytest
from nats.aio.client import Client as NATS
from nats.js.api import StreamConfig
from prometheus_client import REGISTRY

from commands.migrate import migrate_streams
from commands.relay import POSITION_HEADER, Relay
from domain.device import Device
from domain.published import (
    DeviceConfigured,
    DeviceRegistered,
    RuleCreated,
    RuleDisabled,
    RuleEnabled,
    RuleUpdated,
    StreamEvent,
    decode_stream_event,
)
from domain.rules import Rule, spec_to_dict, validate_rule
from infra.eventstore import DeviceStore
from infra.replay import store_pages
from infra.settings import Settings
from infra.streams import Streams
from tests.conftest import drop_namespace, settings_for, unique_namespace

pytestmark = pytest.mark.integration

T0 = datetime(2026, 1, 1, tzinfo=UTC)
DEADLINE_S = 30.0
HOT = {
    "name": "Boiler overheating",
    "metric": "temperature",
    "severity": "critical",
    "condition": {"kind": "threshold", "op": ">", "value": 90, "clear": 80},
}


def at(seconds: int) -> datetime:
    return T0 + timedelta(seconds=seconds)


def interleaved(store: DeviceStore) -> None:
    """Device and rule events, alternating: dev-1 registered, hot created, dev-1 configured,
    hot updated, hot disabled (positions 1 to 5)."""
    device = Device.register("dev-1", "Boiler", "thermostat", {}, "hash", at(0))
    store.save_device(device)
    rule = Rule.create("hot", validate_rule(HOT), at(1))
    store.save_rule(rule)
    device.configure({"target": 21}, at(2))
    store.save_device(device)
    rule.update(validate_rule({**HOT, "severity": "warning"}), at(3))
    rule.disable(at(4))
    store.save_rule(rule)


def counter(name: str, labels: dict[str, str] | None = None) -> float:
    return REGISTRY.get_sample_value(name, labels or {}) or 0.0


@pytest.fixture
async def nc(migrated: Settings) -> AsyncIterator[NATS]:
    client = await nats.connect(migrated.nats_url)
    yield client
    await client.close()


class RelayTask:
    def __init__(self, settings: Settings, store: DeviceStore, nc: NATS) -> None:
        pg = settings.postgres
        dsn = f"host={pg.host} port={pg.port} user={pg.user} dbname={pg.dbname}"
        self.relay = Relay(store, nc, Streams(settings.namespace), dsn)
        self.stop = asyncio.Event()
        self.task = asyncio.create_task(self.relay.run(self.stop))

    async def close(self) -> None:
        self.stop.set()
        await asyncio.wait_for(self.task, 10)


async def stream_messages(nc: NATS, streams: Streams, count: int) -> list[Any]:
    """The EVENTS stream's messages once it holds `count` (waiting for the relay)."""
    jsm = nc.jsm()
    deadline = time.monotonic() + DEADLINE_S
    while (info := await jsm.stream_info(streams.events)).state.messages < count:
        if time.monotonic() > deadline:
            raise AssertionError(f"the relay published {info.state.messages} of {count} events")
        await asyncio.sleep(0.02)
    return [await jsm.get_msg(streams.events, seq) for seq in range(1, info.state.last_seq + 1)]


async def test_the_relay_publishes_rule_events_on_their_subject_in_commit_order_with_device_events(
    migrated: Settings, store: DeviceStore, nc: NATS
) -> None:
    streams = Streams(migrated.namespace)
    interleaved(store)
    published_before = counter("iot_relay_published_total")
    lag_before = counter("iot_relay_lag_seconds_count")
    relay = RelayTask(migrated, store, nc)
    try:
        msgs = await stream_messages(nc, streams, 5)
    finally:
        await relay.close()

    assert [(m.subject, m.headers["Nats-Msg-Id"]) for m in msgs] == [
        (streams.event_subject("dev-1"), "dev-1:1"),
        (streams.rule_subject("hot"), "rule:hot:1"),
        (streams.event_subject("dev-1"), "dev-1:2"),
        (streams.rule_subject("hot"), "rule:hot:2"),
        (streams.rule_subject("hot"), "rule:hot:3"),
    ]
    assert streams.rule_subject("hot") == f"{migrated.namespace}.rules.hot"
    assert [int(m.headers[POSITION_HEADER]) for m in msgs] == [1, 2, 3, 4, 5]
    events = [decode_stream_event(m.data) for m in msgs]
    assert [type(e) for e in events] == [
        DeviceRegistered,
        RuleCreated,
        DeviceConfigured,
        RuleUpdated,
        RuleDisabled,
    ]
    created, updated = events[1], events[3]
    assert isinstance(created, RuleCreated)
    assert isinstance(updated, RuleUpdated)
    assert created.spec == spec_to_dict(validate_rule(HOT))
    assert (created.rule_id, created.version, created.at, created.position) == ("hot", 1, at(1), 2)
    assert updated.spec["severity"] == "warning"
    assert counter("iot_relay_published_total") - published_before == 5
    assert counter("iot_relay_lag_seconds_count") - lag_before == 5


async def test_a_relay_restarted_after_a_rule_event_goes_on_from_it_without_repeating_it(
    migrated: Settings, store: DeviceStore, nc: NATS
) -> None:
    streams = Streams(migrated.namespace)
    interleaved(store)
    first = RelayTask(migrated, store, nc)
    try:
        await stream_messages(nc, streams, 5)  # the last one is rule:hot:3
    finally:
        await first.close()
    rule = store.get_rule("hot")
    assert rule is not None
    rule.enable(at(5))
    store.save_rule(rule)

    second = RelayTask(migrated, store, nc)
    try:
        msgs = await stream_messages(nc, streams, 6)
        await asyncio.sleep(0.3)  # time to publish anything more it wrongly would
        info = await nc.jsm().stream_info(streams.events)
    finally:
        await second.close()
    assert info.state.messages == 6
    assert msgs[-1].headers["Nats-Msg-Id"] == "rule:hot:4"
    assert isinstance(decode_stream_event(msgs[-1].data), RuleEnabled)
    assert second.relay.state.position == 6


async def test_consumers_of_device_events_do_not_see_rule_events(
    migrated: Settings, store: DeviceStore, nc: NATS
) -> None:
    streams = Streams(migrated.namespace)
    interleaved(store)
    relay = RelayTask(migrated, store, nc)
    try:
        await stream_messages(nc, streams, 5)
    finally:
        await relay.close()
    sub = await nc.jetstream().subscribe(
        streams.events_wildcard, stream=streams.events, ordered_consumer=True
    )
    try:
        seen = [await sub.next_msg(timeout=5) for _ in range(2)]
        with pytest.raises(nats.errors.TimeoutError):
            await sub.next_msg(timeout=0.5)
    finally:
        await sub.unsubscribe()
    assert [(m.headers or {}).get("Nats-Msg-Id") for m in seen] == ["dev-1:1", "dev-1:2"]


async def test_store_pages_yield_rule_events_in_commit_order_with_device_events(
    store: DeviceStore,
) -> None:
    interleaved(store)
    for size in (1, 2, 2000):  # pages of rule events alone, mixed, everything at once
        pages = [page async for page in store_pages(store, size=size)]
        events: list[StreamEvent] = [e for page in pages for e in page]
        assert [(type(e), e.position) for e in events] == [
            (DeviceRegistered, 1),
            (RuleCreated, 2),
            (DeviceConfigured, 3),
            (RuleUpdated, 4),
            (RuleDisabled, 5),
        ]
        assert all(len(page) <= size for page in pages)
    tail = [e async for page in store_pages(store, start=4, upto=4) for e in page]
    assert [(type(e), e.version) for e in tail] == [(RuleUpdated, 2)]


@pytest.fixture
def bare() -> Iterator[Settings]:
    """A namespace with nothing made yet (no `iot migrate`), dropped afterwards."""
    settings = settings_for(unique_namespace())
    yield settings
    drop_namespace(settings)


async def test_migrate_adds_the_rules_subjects_to_an_events_stream_made_before_rules(
    bare: Settings,
) -> None:
    streams = Streams(bare.namespace)
    nc = await nats.connect(bare.nats_url)
    try:
        jsm = nc.jsm()
        current = next(c for c in streams.configs() if c.name == streams.events)
        before_rules = {**current.as_dict(), "subjects": [streams.events_wildcard]}
        old = StreamConfig.from_response(before_rules)
        await jsm.add_stream(old)
        js = nc.jetstream()
        await js.publish(streams.event_subject("dev-1"), b"{}", stream=streams.events)
        with pytest.raises(nats.js.errors.NoStreamResponseError):
            await js.publish(streams.rule_subject("hot"), b"{}", timeout=1)

        steps = await migrate_streams(bare)

        assert f"updated {streams.events}" in steps
        info = await jsm.stream_info(streams.events)
        assert info.config.subjects == [streams.events_wildcard, streams.rules_wildcard]
        assert info.state.messages == 1  # what it held is kept
        ack = await js.publish(streams.rule_subject("hot"), b"{}", stream=streams.events)
        assert ack.seq == 2
        again = await migrate_streams(bare)  # again: everything exists, nothing changes
        assert all(s.startswith("updated ") or s.endswith(" exists") for s in again), again
        info = await jsm.stream_info(streams.events)
        assert info.config.subjects == [streams.events_wildcard, streams.rules_wildcard]
        assert info.state.messages == 2
    finally:
        await nc.close()
