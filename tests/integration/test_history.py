"""A device's history from the views projection on real Redis: its events page by page, its
state at every version's time, and what changed between two times."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from redis.asyncio import Redis

from domain.ingest import Reported
from domain.published import (
    DeviceAlertAcknowledged,
    DeviceAlertCleared,
    DeviceAlertRaised,
    DeviceCommandAcknowledged,
    DeviceCommandRequested,
    DeviceCommandSent,
    DeviceConfigured,
    DeviceConnected,
    DeviceDecommissioned,
    DeviceDisconnected,
    DeviceRegistered,
    DeviceResumed,
    DeviceSecretRotated,
    DeviceSuspended,
    PublishedEvent,
)
from gateway.history import HistoryQuery, HistoryReader, decode_cursor, diff
from infra.views import HISTORY_SNAPSHOT_EVERY, ViewKeys
from projections.views import ViewsProjector
from projections.views_plan import IngestPlan
from tests.conftest import settings_for, unique_namespace

pytestmark = pytest.mark.integration

T0 = datetime(2026, 1, 1, tzinfo=UTC)
DEVICE = "hist-1"


def at(version: int) -> datetime:
    return T0 + timedelta(seconds=version)


def ms(version: int) -> int:
    return int(at(version).timestamp() * 1000)


def life(versions: int) -> tuple[list[PublishedEvent], dict[int, dict[str, Any]]]:
    """A device taken through its whole life (every kind of event), and the state after each
    version computed here, independently of the projection."""
    events: list[PublishedEvent] = []
    states: dict[int, dict[str, Any]] = {}
    state: dict[str, Any] = {}
    config_version = 0
    for v in range(1, versions + 1):
        common: dict[str, Any] = {"device_id": DEVICE, "version": v, "at": at(v), "position": v}
        event: PublishedEvent
        if v == 1:
            event = DeviceRegistered(**common, name="Boiler", type="boiler", labels={"site": "a"})
            state = {
                "name": "Boiler",
                "type": "boiler",
                "labels": {"site": "a"},
                "status": "provisioned",
                "desired": {"version": 0, "config": {}},
                "online": False,
            }
        elif v == versions:
            event = DeviceDecommissioned(**common, reason="end of life")
            state.update(status="decommissioned", online=False)
        elif v % 11 == 0:
            event = DeviceSuspended(**common, reason="maintenance")
            state["status"] = "suspended"
        elif v % 11 == 1:
            event = DeviceResumed(**common, status="active")
            state["status"] = "active"
        elif v % 5 == 0 and isinstance(events[-1], DeviceCommandSent):
            event = DeviceCommandAcknowledged(
                **common, command_id=events[-1].command_id, result={"ok": True}
            )
        elif v % 5 == 0 and isinstance(events[-1], DeviceAlertAcknowledged):
            event = DeviceAlertCleared(
                **common, alert_id=events[-1].alert_id, value=1.0, at_ms=ms(v)
            )
        elif v % 5 == 0:
            config_version += 1
            config = {"setpoint": 20 + v % 7}
            event = DeviceConfigured(**common, config=config, config_version=config_version)
            state["desired"] = {"version": config_version, "config": config}
        elif v % 5 == 1:
            event = DeviceConnected(**common, actor=None)
            if state["status"] == "provisioned":
                state["status"] = "active"
            state["online"] = True
        elif v % 5 == 2:
            event = DeviceDisconnected(**common)
            state["online"] = False
        elif v % 5 == 3:
            if v % 3 == 0:
                event = DeviceCommandRequested(
                    **common,
                    actor="ops-alice",
                    command_id=f"c{v}",
                    name="reboot",
                    args={},
                    expires_at=at(v) + timedelta(hours=1),
                )
            elif v % 3 == 1:
                event = DeviceSecretRotated(**common, actor="ops-bob")
            else:
                event = DeviceAlertRaised(
                    **common,
                    alert_id=f"{DEVICE}.r1.{ms(v)}",
                    rule_id="r1",
                    severity="warning",
                    metric="t",
                    value=90.0,
                    at_ms=ms(v),
                )
        else:
            last = events[-1]
            if isinstance(last, DeviceCommandRequested):
                event = DeviceCommandSent(**common, command_id=last.command_id)
            elif isinstance(last, DeviceAlertRaised):
                event = DeviceAlertAcknowledged(**common, alert_id=last.alert_id, by="x", note=None)
            else:
                event = DeviceSecretRotated(**common)
        events.append(event)
        states[v] = {**state, "labels": dict(state["labels"]), "desired": dict(state["desired"])}
    return events, states


@pytest.fixture
async def redis() -> AsyncIterator[tuple[Redis, ViewKeys, ViewsProjector]]:
    namespace = unique_namespace()
    client = Redis.from_url(settings_for(namespace).redis_url, decode_responses=True)
    keys = ViewKeys.for_namespace(namespace).silent()
    projector = ViewsProjector(client, None, namespace, keys=keys)
    await projector.scripts.load()
    yield client, keys, projector
    async for key in client.scan_iter(match=f"{namespace}:*", count=1000):
        await client.delete(key)
    await client.aclose()


async def apply(projector: ViewsProjector, keys: ViewKeys, events: list[PublishedEvent]) -> None:
    for start in range(0, len(events), 50):
        page = events[start : start + 50]
        await projector.apply_events(keys, list(enumerate(page)))


async def test_as_of_each_version_answers_that_versions_state(
    redis: tuple[Redis, ViewKeys, ViewsProjector],
) -> None:
    client, keys, projector = redis
    versions = 3 * HISTORY_SNAPSHOT_EVERY + 9  # past several snapshots
    events, states = life(versions)
    await apply(projector, keys, events)
    reader = HistoryReader(client)
    assert await reader.state_at(keys, DEVICE, ms(1) - 1) is None  # before registration
    for v in range(1, versions + 1):
        found = await reader.state_at(keys, DEVICE, ms(v) + 500)  # between v and v + 1
        assert found is not None
        assert (found.version, found.state) == (v, {**states[v], "reported": None}), v
    # Re-applying the whole life (a redelivery) changes nothing.
    await apply(projector, keys, events)
    assert await client.zcard(keys.history(DEVICE)) == versions
    changed = diff(states[20], states[70])
    found20 = await reader.state_at(keys, DEVICE, ms(20))
    found70 = await reader.state_at(keys, DEVICE, ms(70))
    assert found20 is not None
    assert found70 is not None
    assert diff(found20.state, found70.state) == changed
    assert changed["desired"]["to"] == states[70]["desired"]
    assert await reader.count_between(keys, DEVICE, 20, 70) == 50


async def test_entries_say_what_happened_who_caused_it_and_what_it_changed(
    redis: tuple[Redis, ViewKeys, ViewsProjector],
) -> None:
    client, keys, projector = redis
    events, _ = life(40)
    await apply(projector, keys, events)
    reader = HistoryReader(client)
    items, _ = await reader.page(keys, DEVICE, HistoryQuery(limit=500))
    by_version = {item["version"]: item for item in items}
    assert sorted(by_version) == list(range(1, 41))
    assert by_version[1]["type"] == "registered"
    assert by_version[1]["changes"]["labels"] == {"site": "a"}
    configured = next(e for e in events if isinstance(e, DeviceConfigured))
    entry = by_version[configured.version]
    assert entry["type"] == "configured"
    assert entry["data"] == {"config": configured.config, "config_version": 1}
    assert entry["changes"] == {"desired": {"version": 1, "config": configured.config}}
    requested = next(e for e in events if isinstance(e, DeviceCommandRequested))
    assert by_version[requested.version]["type"] == "command_requested"
    assert by_version[requested.version]["caused_by"] == "ops-alice"
    connected = next(e for e in events if isinstance(e, DeviceConnected))
    assert by_version[connected.version]["caused_by"] == "device"
    assert by_version[connected.version]["changes"] == {"online": True, "status": "active"}
    assert by_version[40]["type"] == "decommissioned"
    assert by_version[40]["at"].startswith("2026-01-01T00:00:40")
    commands, _ = await reader.page(
        keys, DEVICE, HistoryQuery(types=frozenset({"command_requested"}), limit=500)
    )
    wanted = [e.version for e in reversed(events) if isinstance(e, DeviceCommandRequested)]
    assert [e["version"] for e in commands] == wanted
    window, _ = await reader.page(keys, DEVICE, HistoryQuery(start_ms=ms(10), end_ms=ms(12)))
    assert [e["version"] for e in window] == [12, 11, 10]


async def test_pages_are_stable_while_events_are_appended(
    redis: tuple[Redis, ViewKeys, ViewsProjector],
) -> None:
    client, keys, projector = redis
    events, _ = life(300)
    await apply(projector, keys, events[:150])
    reader = HistoryReader(client)
    seen: list[int] = []
    cursor: int | None = None
    appended = 150
    while True:
        items, next_cursor = await reader.page(
            keys, DEVICE, HistoryQuery(before_version=cursor, limit=13)
        )
        seen += [e["version"] for e in items]
        if appended < 300:  # more events land between pages
            await apply(projector, keys, events[appended : appended + 30])
            appended += 30
        if next_cursor is None:
            break
        cursor = decode_cursor(next_cursor)
    assert seen == list(range(150, 0, -1))  # each once, newest first, none of the later ones
    filtered: list[int] = []
    cursor = None
    while True:  # a sparse filter pages through with cursors, never scanning everything
        items, next_cursor = await reader.page(
            keys,
            DEVICE,
            HistoryQuery(types=frozenset({"suspended"}), before_version=cursor, limit=5),
        )
        filtered += [e["version"] for e in items]
        if next_cursor is None:
            break
        cursor = decode_cursor(next_cursor)
    assert filtered == [e.version for e in reversed(events) if isinstance(e, DeviceSuspended)]


async def test_as_of_answers_the_state_the_device_last_reported_by_then(
    redis: tuple[Redis, ViewKeys, ViewsProjector],
) -> None:
    client, keys, projector = redis
    events, _ = life(10)
    await apply(projector, keys, events)
    plan = IngestPlan()
    for i, (version, setpoint) in enumerate([(3, 20), (7, 22)]):  # reported after v3, v7
        state = {"setpoint": setpoint, "config_version": i + 1}
        plan.add(i, Reported(device_id=DEVICE, received_at=ms(version) + 100, state=state))
    await projector.apply_ingest(keys, plan)
    reader = HistoryReader(client)
    answers = [await reader.state_at(keys, DEVICE, ms(v) + 500) for v in (2, 3, 6, 7, 9)]
    assert [a.state["reported"] if a else "missing" for a in answers] == [
        None,
        {"config": {"setpoint": 20}, "config_version": 1},
        {"config": {"setpoint": 20}, "config_version": 1},
        {"config": {"setpoint": 22}, "config_version": 2},
        {"config": {"setpoint": 22}, "config_version": 2},
    ]
