"""Two `iot run projector views` processes, one SIGKILLed mid-way: every view ends up right."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import msgspec
import nats
import pytest
import redis

from domain.ingest import Reading, Telemetry, encode_ingest
from domain.published import (
    DeviceCommandAcknowledged,
    DeviceCommandRequested,
    DeviceConfigured,
    DeviceRegistered,
    PublishedEvent,
    encode_event,
)
from infra.settings import Settings
from infra.streams import Streams
from infra.views import ViewKeys
from tests.e2e.processes import Component

pytestmark = pytest.mark.e2e

DEVICES = 50
READINGS = 400
NOW_MS = int(time.time() * 1000)
BASE_TS = NOW_MS - 3_600_000
T0 = datetime.fromtimestamp(NOW_MS // 1000, UTC)


def device_time(i: int) -> int:
    """The device time of reading i: a permutation, so arrival order is not device-time order."""
    return BASE_TS + (i * 7919 % READINGS) * 10


NEWEST = max(range(READINGS), key=device_time)


def events_for(d: int, versions: range) -> list[PublishedEvent]:
    device_id = f"dev-{d:02d}"
    out: list[PublishedEvent] = []
    for v in versions:
        at = T0 + timedelta(seconds=v)
        if v == 1:
            out.append(
                DeviceRegistered(
                    device_id=device_id,
                    version=1,
                    at=at,
                    position=v,
                    name=f"n{d}",
                    type="meter",
                    labels={"group": str(d % 5)},
                )
            )
        elif v in (4, 6):
            out.append(
                DeviceCommandRequested(
                    device_id=device_id,
                    version=v,
                    at=at,
                    position=v,
                    command_id=f"c-{v}",
                    name="reboot",
                    args={},
                    expires_at=at + timedelta(hours=1),
                )
            )
        elif v == 5:
            out.append(
                DeviceCommandAcknowledged(
                    device_id=device_id,
                    version=v,
                    at=at,
                    position=v,
                    command_id="c-4",
                    result={"ok": d},
                )
            )
        else:
            out.append(
                DeviceConfigured(
                    device_id=device_id,
                    version=v,
                    at=at,
                    position=v,
                    config={"round": v},
                    config_version=v - 1,
                )
            )
    return out


async def publish(settings: Settings, readings: range, versions: range, received_ms: int) -> None:
    streams = Streams(settings.namespace)
    nc = await nats.connect(settings.nats_url)
    try:
        js = nc.jetstream()
        for d in range(DEVICES):
            for event in events_for(d, versions):
                await js.publish(streams.event_subject(event.device_id), encode_event(event))
        for i in readings:
            acks = []
            for d in range(DEVICES):
                message = Telemetry(
                    device_id=f"dev-{d:02d}",
                    received_at=received_ms + i,
                    readings=[Reading(device_time(i), {"v": i, "d": d})],
                )
                subject = streams.ingest_subject("telemetry", message.device_id)
                acks.append(js.publish(subject, encode_ingest(message)))
            await asyncio.gather(*acks)
    finally:
        await nc.close()


def views_complete(client: redis.Redis, keys: ViewKeys) -> bool:
    pipe = client.pipeline(transaction=False)
    for d in range(DEVICES):
        pipe.hmget(keys.device(f"dev-{d:02d}"), ["version", "m:v"])
    rows: list[list[Any]] = pipe.execute()
    expected = f'{{"ts":{device_time(NEWEST)},"value":{NEWEST}}}'.encode()
    return all(version == b"6" and latest == expected for version, latest in rows)


def applied(component: Component) -> float:
    """Ingest messages the component has applied, from its /metrics."""
    text = httpx.get(f"{component.url}/metrics", timeout=5).text
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith('iot_views_messages_total{input="ingest",outcome="applied"}')
    )


@pytest.fixture
def views_redis(migrated: Settings) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(migrated.redis_url)
    yield client
    keys = list(client.scan_iter(match=f"{migrated.namespace}:views:*", count=1000))
    for start in range(0, len(keys), 500):
        client.delete(*keys[start : start + 500])
    client.close()


def test_two_projectors_one_killed_mid_way_leave_every_view_at_its_last_reading(
    migrated: Settings, views_redis: redis.Redis
) -> None:
    keys = ViewKeys.for_namespace(migrated.namespace)
    # Receipt times from now, not from import: the per-minute reading counts expire 3 minutes
    # after their minute, and the suite may reach this test later than that.
    received_ms = int(time.time() * 1000)
    first = Component(migrated, "projector", "views")
    second = Component(migrated, "projector", "views")
    try:
        first.wait_ready()
        second.wait_ready()
        asyncio.run(publish(migrated, range(READINGS // 2), range(1, 3), received_ms))
        deadline = time.monotonic() + 20
        while applied(first) == 0:  # both instances take part before one is killed
            assert time.monotonic() < deadline, "the first instance applied nothing"
            time.sleep(0.05)
        first.kill()  # with a backlog in flight: its unacknowledged batches go to the others
        first = Component(migrated, "projector", "views")
        asyncio.run(publish(migrated, range(READINGS // 2, READINGS), range(3, 7), received_ms))
        first.wait_ready()
        deadline = time.monotonic() + 120
        minutes = {keys.readings((received_ms + i) // 60_000) for i in (0, READINGS)}
        # the killed instance's unacknowledged batches come back after ack_wait: wait for them
        while not views_complete(views_redis, keys) or (
            abs(views_redis.pfcount(*minutes) - DEVICES * READINGS) > DEVICES * READINGS * 0.02
        ):
            assert time.monotonic() < deadline, "views did not reach the last readings"
            time.sleep(0.2)
    finally:
        first.stop()
        second.stop()

    for d in range(DEVICES):
        fields = views_redis.hgetall(keys.device(f"dev-{d:02d}"))
        doc = msgspec.json.decode(fields[b"doc"])
        assert doc["name"] == f"n{d}"
        assert doc["labels"] == {"group": str(d % 5)}
        assert doc["status"] == "provisioned"
        assert doc["desired"] == {"version": 2, "config": {"round": 3}}
        assert msgspec.json.decode(fields[b"m:d"]) == {"ts": device_time(NEWEST), "value": d}
        assert int(fields[b"last_seen"]) == device_time(NEWEST)
        commands = msgspec.json.decode(fields[b"commands"])
        assert [c["command_id"] for c in commands["pending"]] == ["c-6"]
        assert [(c["command_id"], c["result"]) for c in commands["recent"]] == [("c-4", {"ok": d})]
    assert views_redis.get(keys.commands_pending) == str(DEVICES).encode()
    assert views_redis.zcard(keys.devices) == DEVICES
    assert views_redis.scard(keys.status("provisioned")) == DEVICES
    assert views_redis.scard(keys.label("group", "0")) == DEVICES // 5
    minutes = {keys.readings((received_ms + i) // 60_000) for i in (0, READINGS)}
    counted = views_redis.pfcount(*minutes)
    assert abs(counted - DEVICES * READINGS) <= DEVICES * READINGS * 0.02  # HLL's error is ~1%
