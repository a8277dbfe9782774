"""The views projection on real Redis and NATS, in the layout of `infra.views` (the gateway's)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, cast

import msgspec
import nats
import pytest
import redis.asyncio as aioredis
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js.client import JetStreamContext

from domain.ingest import (
    KINDS,
    CommandAck,
    CommandSent,
    IngestMessage,
    Reading,
    Reported,
    Status,
    Telemetry,
    encode_ingest,
)
from domain.published import (
    DeviceAlertAcknowledged,
    DeviceAlertCleared,
    DeviceAlertRaised,
    DeviceAlertRetriggered,
    DeviceCommandAcknowledged,
    DeviceCommandCancelled,
    DeviceCommandExpired,
    DeviceCommandFailed,
    DeviceCommandRequested,
    DeviceCommandSent,
    DeviceConfigured,
    DeviceConnected,
    DeviceDecommissioned,
    DeviceDisconnected,
    DeviceRegistered,
    DeviceResumed,
    DeviceSuspended,
    PublishedEvent,
    encode_event,
)
from infra.jetstream import ConsumerSpec, Outcome, consume, ensure_consumer
from infra.settings import Settings
from infra.streams import Streams
from infra.views import CLEARED_ALERTS_KEPT, ViewKeys
from projections.views import ViewsProjector, consumer_specs, seed_checkpoint

pytestmark = pytest.mark.integration

NOW_MS = int(time.time() * 1000)
T0 = datetime.fromtimestamp(NOW_MS // 1000, UTC)


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


@dataclass
class Env:
    settings: Settings
    redis: aioredis.Redis
    nc: NATS
    js: JetStreamContext
    projector: ViewsProjector
    keys: ViewKeys
    streams: Streams
    pulls: dict[str, Any]

    async def publish_events(self, *events: PublishedEvent) -> None:
        for event in events:
            await self.js.publish(self.streams.event_subject(event.device_id), encode_event(event))

    async def publish_ingest(self, *messages: IngestMessage | bytes, device: str = "d1") -> None:
        for message in messages:
            if isinstance(message, bytes):
                subject, data = self.streams.ingest_subject("telemetry", device), message
            else:
                kind = KINDS[type(message)]
                subject = self.streams.ingest_subject(kind, message.device_id)
                data = encode_ingest(message)
            await self.js.publish(subject, data)

    async def pull(self, stream: str, subject: str, n: int) -> list[Msg]:
        """The next `n` messages of a stream (without acknowledging them)."""
        sub = self.pulls.get(stream)
        if sub is None:
            sub = self.pulls[stream] = await self.js.pull_subscribe(
                subject, durable="test_" + stream.lower(), stream=stream
            )
        got: list[Msg] = []
        while len(got) < n:
            got += await sub.fetch(n - len(got), timeout=5)
        return got

    async def events(self, *events: PublishedEvent) -> tuple[Outcome, list[Msg]]:
        """Publish events, pull them back in one batch, hand the batch to the projector."""
        await self.publish_events(*events)
        msgs = await self.pull(self.streams.events, self.streams.events_wildcard, len(events))
        return await self.projector.handle_events(msgs), msgs

    async def ingest(self, *messages: IngestMessage | bytes) -> tuple[Outcome, list[Msg]]:
        await self.publish_ingest(*messages)
        msgs = await self.pull(self.streams.ingest, self.streams.ingest_wildcard, len(messages))
        return await self.projector.handle_ingest(msgs), msgs

    async def hash(self, device_id: str) -> dict[str, str]:
        raw = await self.redis.hgetall(self.keys.device(device_id))
        return {text(k): text(v) for k, v in raw.items()}

    async def doc(self, device_id: str) -> dict[str, Any]:
        doc: dict[str, Any] = msgspec.json.decode((await self.hash(device_id))["doc"])
        return doc

    async def members(self, key: str) -> set[str]:
        return {text(m) for m in await self.redis.smembers(key)}

    async def dump(self) -> dict[bytes, bytes | None]:
        """Every key of the views, as Redis serialises it (byte-identical or not), but the
        checkpoint's stream sequence (it moves on with every message, repeated or not)."""
        dumped = await dump_keys(self.redis, self.keys.prefix)
        dumped.pop(self.keys.position_seq.encode(), None)
        return dumped

    async def position(self) -> int:
        return int(await self.redis.get(self.keys.position) or 0)


def text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


async def dump_keys(redis: aioredis.Redis, prefix: str) -> dict[bytes, bytes | None]:
    keys = [k async for k in redis.scan_iter(match=f"{prefix}:*", count=1000)]
    return {k: await redis.dump(k) for k in sorted(keys)}


async def delete_keys(redis: aioredis.Redis, pattern: str) -> None:
    keys = [k async for k in redis.scan_iter(match=pattern, count=1000)]
    for start in range(0, len(keys), 500):
        await redis.delete(*keys[start : start + 500])


@pytest.fixture
async def env(migrated: Settings) -> AsyncIterator[Env]:
    redis = aioredis.Redis.from_url(migrated.redis_url)
    nc = await nats.connect(migrated.nats_url)
    js = nc.jetstream()
    projector = ViewsProjector(redis, js, migrated.namespace)
    await projector.scripts.load()
    try:
        yield Env(
            migrated,
            redis,
            nc,
            js,
            projector,
            projector.keys,
            Streams(migrated.namespace),
            {},
        )
    finally:
        await delete_keys(redis, f"{migrated.namespace}*:views:*")
        await nc.close()
        await redis.aclose()


def registered(device_id: str = "d1", labels: dict[str, str] | None = None) -> DeviceRegistered:
    return DeviceRegistered(
        device_id=device_id,
        version=1,
        at=T0,
        position=1,
        name="Boiler",
        type="thermostat",
        labels={"site": "north", "floor": "2"} if labels is None else labels,
    )


def configured(version: int, config: dict[str, Any], device_id: str = "d1") -> DeviceConfigured:
    return DeviceConfigured(
        device_id=device_id,
        version=version,
        at=at(version),
        position=version,
        config=config,
        config_version=version - 1,
    )


def telemetry(
    received_at: int, *readings: tuple[int, dict[str, Any]], device: str = "d1"
) -> Telemetry:
    return Telemetry(
        device_id=device,
        received_at=received_at,
        readings=[Reading(ts, values) for ts, values in readings],
    )


async def test_registration_builds_doc_device_list_status_and_label_sets(env: Env) -> None:
    outcome, _ = await env.events(registered())
    assert outcome == Outcome()
    fields = await env.hash("d1")
    assert fields["version"] == "1"
    assert await env.doc("d1") == {
        "device_id": "d1",
        "name": "Boiler",
        "type": "thermostat",
        "labels": {"site": "north", "floor": "2"},
        "status": "provisioned",
        "registered_at": msgspec.json.decode(msgspec.json.encode(T0)),
        "updated_at": msgspec.json.decode(msgspec.json.encode(T0)),
        "desired": {"version": 0, "config": {}},
    }
    assert await env.redis.zrange(env.keys.devices, 0, -1) == [b"d1"]
    assert await env.members(env.keys.status("provisioned")) == {"d1"}
    assert await env.members(env.keys.label("site", "north")) == {"d1"}
    assert await env.members(env.keys.label("floor", "2")) == {"d1"}


async def test_lifecycle_events_update_doc_desired_state_and_status_sets(env: Env) -> None:
    outcome, _ = await env.events(
        registered(),
        configured(2, {"setpoint": 21.5, "modes": [], "deep": {"x": 0.1234567890123456789}}),
        DeviceSuspended(device_id="d1", version=3, at=at(3), position=3, reason="maint"),
        DeviceResumed(device_id="d1", version=4, at=at(4), position=4, status="provisioned"),
        DeviceConnected(device_id="d1", version=5, at=at(5), position=5),
    )
    assert outcome == Outcome()
    doc = await env.doc("d1")
    assert doc["status"] == "active"
    assert doc["desired"] == {
        "version": 1,
        "config": {"setpoint": 21.5, "modes": [], "deep": {"x": 0.1234567890123456789}},
    }
    fields = await env.hash("d1")
    assert (fields["version"], fields["online"]) == ("5", "1")
    assert await env.members(env.keys.status("active")) == {"d1"}
    for status in ("provisioned", "suspended"):
        assert await env.members(env.keys.status(status)) == set()
    assert await env.members(env.keys.online) == {"d1"}

    await env.events(
        DeviceDecommissioned(device_id="d1", version=6, at=at(6), position=6, reason="eol")
    )
    assert (await env.doc("d1"))["status"] == "decommissioned"
    assert await env.members(env.keys.status("active")) == set()
    assert await env.members(env.keys.status("decommissioned")) == {"d1"}
    assert await env.members(env.keys.online) == set()
    assert await env.redis.zrange(env.keys.devices, 0, -1) == [b"d1"]


async def test_repeated_events_change_nothing(env: Env) -> None:
    events = (registered(), configured(2, {"a": 1}), configured(3, {"a": 2}))
    _, msgs = await env.events(*events)
    before = await env.dump()
    assert await env.projector.handle_events(msgs) == Outcome()  # the batch redelivered
    outcome, _ = await env.events(*events)  # the same events published again
    assert outcome == Outcome()
    assert await env.dump() == before
    assert (await env.hash("d1"))["version"] == "3"


async def test_event_after_a_gap_is_retried_then_applied_once_its_predecessor_arrives(
    env: Env,
) -> None:
    await env.events(registered())
    outcome, later = await env.events(configured(3, {"a": 2}))
    assert outcome.retry == {0}
    assert (await env.hash("d1"))["version"] == "1"

    await env.events(configured(2, {"a": 1}))
    assert await env.projector.handle_events(later) == Outcome()
    fields = await env.hash("d1")
    assert fields["version"] == "3"
    assert (await env.doc("d1"))["desired"] == {"version": 2, "config": {"a": 2}}


async def test_events_of_one_batch_apply_in_version_order_whatever_their_order(env: Env) -> None:
    outcome, _ = await env.events(configured(3, {"a": 2}), configured(2, {"a": 1}), registered())
    assert outcome == Outcome()
    assert (await env.hash("d1"))["version"] == "3"
    assert (await env.doc("d1"))["desired"] == {"version": 2, "config": {"a": 2}}


async def test_latest_metric_value_is_by_device_time_not_arrival_order(env: Env) -> None:
    await env.ingest(telemetry(NOW_MS, (NOW_MS - 100, {"t": 3.0, "h": 40})))
    await env.ingest(telemetry(NOW_MS + 1, (NOW_MS - 300, {"t": 1.0, "h": 41})))
    await env.ingest(
        telemetry(NOW_MS + 2, (NOW_MS - 200, {"t": 2.0}), (NOW_MS - 50, {"h": 42, "s": "ok"}))
    )
    fields = await env.hash("d1")
    assert msgspec.json.decode(fields["m:t"]) == {"ts": NOW_MS - 100, "value": 3.0}
    assert msgspec.json.decode(fields["m:h"]) == {"ts": NOW_MS - 50, "value": 42}
    assert msgspec.json.decode(fields["m:s"]) == {"ts": NOW_MS - 50, "value": "ok"}
    assert fields["last_seen"] == str(NOW_MS - 50)


async def test_stale_or_repeated_status_changes_nothing(env: Env) -> None:
    await env.ingest(Status(device_id="d1", received_at=NOW_MS, online=True))
    fields = await env.hash("d1")
    assert (fields["online"], fields["online_at"]) == ("1", str(NOW_MS))
    assert await env.members(env.keys.online) == {"d1"}
    before = await env.dump()

    await env.ingest(Status(device_id="d1", received_at=NOW_MS, online=True))
    await env.ingest(Status(device_id="d1", received_at=NOW_MS - 1000, online=False))
    assert await env.dump() == before

    await env.ingest(Status(device_id="d1", received_at=NOW_MS + 1000, online=False))
    fields = await env.hash("d1")
    assert (fields["online"], fields["online_at"]) == ("0", str(NOW_MS + 1000))
    assert await env.members(env.keys.online) == set()


async def test_connection_event_older_than_the_last_status_leaves_online_alone(env: Env) -> None:
    await env.events(registered())
    await env.ingest(Status(device_id="d1", received_at=NOW_MS + 10_000, online=False))
    await env.events(DeviceConnected(device_id="d1", version=2, at=at(5), position=2))
    fields = await env.hash("d1")
    assert (fields["version"], fields["online"]) == ("2", "0")
    assert (await env.doc("d1"))["status"] == "active"


async def test_reported_state_keeps_the_newest(env: Env) -> None:
    await env.ingest(Reported(device_id="d1", received_at=NOW_MS, state={"fw": "2.0"}))
    await env.ingest(Reported(device_id="d1", received_at=NOW_MS - 5, state={"fw": "1.0"}))
    fields = await env.hash("d1")
    assert msgspec.json.decode(fields["reported"]) == {"fw": "2.0"}
    assert fields["reported_at"] == str(NOW_MS)


def mixed_batch() -> list[IngestMessage]:
    out: list[IngestMessage] = []
    for d in range(3):
        device = f"d{d}"
        for i in range(10):
            ts = NOW_MS - 1000 + (i * 7919 % 10) * 10  # device times out of order
            out.append(
                telemetry(NOW_MS + i, (ts, {"t": i, "d": d}), (ts + 1, {"u": i}), device=device)
            )
        out.append(Status(device_id=device, received_at=NOW_MS + d, online=d != 1))
        out.append(Reported(device_id=device, received_at=NOW_MS, state={"fw": d}))
        out.append(CommandAck(device_id=device, received_at=NOW_MS, command_id="c", status="ok"))
    return out


async def test_redelivered_ingest_batch_leaves_every_key_byte_identical(env: Env) -> None:
    batch = mixed_batch()
    outcome, msgs = await env.ingest(*batch)
    assert outcome == Outcome()
    before = await env.dump()
    assert await env.projector.handle_ingest(msgs) == Outcome()
    assert await env.projector.handle_ingest(list(reversed(msgs))) == Outcome()
    for msg in msgs[::3]:
        await env.projector.handle_ingest([msg])
    assert await env.dump() == before


async def test_one_message_at_a_time_in_any_order_gives_the_same_views(env: Env) -> None:
    _, msgs = await env.ingest(*mixed_batch())
    other = ViewsProjector(env.redis, env.js, env.settings.namespace + "r")
    for msg in reversed(msgs):
        await other.handle_ingest([msg])
    for d in ("d0", "d1", "d2"):
        mine = await env.hash(d)
        theirs = await env.redis.hgetall(other.keys.device(d))
        assert mine == {text(k): text(v) for k, v in theirs.items()}
        newest = max(range(10), key=lambda i: i * 7919 % 10)
        assert mine["m:t"] == f'{{"ts":{NOW_MS - 1000 + 90},"value":{newest}}}'
    assert await env.members(env.keys.online) == {"d0", "d2"}
    assert {text(m) for m in await env.redis.smembers(other.keys.online)} == {"d0", "d2"}


async def test_readings_are_counted_once_per_minute_of_receipt(env: Env) -> None:
    now = int(time.time() * 1000)  # not the module's NOW_MS: the count expires 3 min after
    _, msgs = await env.ingest(
        telemetry(now, (now, {"a": 1}), (now + 1, {"a": 2}), (now + 2, {"a": 3})),
        telemetry(now, (now + 3, {"a": 4}), (now + 4, {"a": 5})),
    )
    await env.projector.handle_ingest(msgs)
    key = env.keys.readings(now // 60_000)
    assert await env.redis.pfcount(key) == 5
    ttl = await env.redis.ttl(key)
    assert 0 < ttl <= 240


async def test_each_changed_device_is_published_once_per_batch(env: Env) -> None:
    pubsub = env.redis.pubsub()
    await pubsub.subscribe(env.keys.changes)
    await pubsub.get_message(timeout=5)  # the subscription confirmation
    _, msgs = await env.ingest(
        telemetry(NOW_MS, (NOW_MS, {"a": 1}), device="d1"),
        telemetry(NOW_MS, (NOW_MS + 1, {"a": 2}), device="d1"),
        telemetry(NOW_MS, (NOW_MS, {"a": 1}), device="d2"),
    )
    await env.projector.handle_ingest(msgs)  # a redelivery: nothing changes, nothing published
    await env.redis.publish(env.keys.changes, "sentinel")
    seen: list[str] = []
    while not seen or seen[-1] != "sentinel":
        message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=5)
        assert message is not None
        seen.append(message["data"].decode())
    assert sorted(seen[:-1]) == ["d1", "d2"]
    await pubsub.aclose()


async def test_each_applied_event_is_published_and_a_repeated_one_is_not(env: Env) -> None:
    pubsub = env.redis.pubsub()
    await pubsub.subscribe(env.keys.changes)
    await pubsub.get_message(timeout=5)
    _, msgs = await env.events(registered("e1"), configured(2, {"a": 1}, device_id="e1"))
    await env.projector.handle_events(msgs)
    await env.redis.publish(env.keys.changes, "sentinel")
    seen: list[str] = []
    while not seen or seen[-1] != "sentinel":
        message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=5)
        assert message is not None
        seen.append(message["data"].decode())
    assert seen == ["e1", "e1", "sentinel"]
    await pubsub.aclose()


async def test_undecodable_input_is_dead_lettered_and_terminated(env: Env) -> None:
    outcome, _ = await env.ingest(b"{not json", telemetry(NOW_MS, (NOW_MS, {"a": 1})))
    assert outcome.poison == {0}
    assert "m:a" in await env.hash("d1")
    info = await env.js.stream_info(env.streams.deadletter)
    assert info.state.messages == 1
    dead = await env.js.get_msg(env.streams.deadletter, info.state.last_seq)
    assert dead.data == b"{not json"
    assert (dead.headers or {})["Iot-Reason"] == "undecodable_ingest"


# -- commands, twin, connectivity --------------------------------------------------------------


def requested(cid: str, version: int, device_id: str = "d1") -> DeviceCommandRequested:
    return DeviceCommandRequested(
        device_id=device_id,
        version=version,
        at=at(version),
        position=version,
        command_id=cid,
        name="reboot",
        args={"delay_s": 5},
        expires_at=at(version + 3600),
    )


def command_lifecycle(device_id: str = "d1") -> list[PublishedEvent]:
    """Registration, four commands, and each of them finished a different way (or not)."""
    common: dict[str, Any] = {"device_id": device_id, "position": 0}
    return [
        registered(device_id),
        requested("c1", 2, device_id),
        requested("c2", 3, device_id),
        requested("c3", 4, device_id),
        requested("c4", 5, device_id),
        requested("c5", 6, device_id),
        DeviceCommandSent(**common, version=7, at=at(7), command_id="c1"),
        DeviceCommandSent(**common, version=8, at=at(8), command_id="c2"),
        DeviceCommandAcknowledged(**common, version=9, at=at(9), command_id="c1", result={"x": 1}),
        DeviceCommandFailed(**common, version=10, at=at(10), command_id="c2", result={"e": "no"}),
        DeviceCommandExpired(**common, version=11, at=at(11), command_id="c3"),
        DeviceCommandCancelled(**common, version=12, at=at(12), command_id="c4", reason="op"),
    ]


async def commands_of(env: Env, device_id: str) -> dict[str, Any]:
    stored: dict[str, Any] = msgspec.json.decode((await env.hash(device_id))["commands"])
    return stored


async def test_command_events_keep_pending_and_recent_commands_and_the_fleet_count(
    env: Env,
) -> None:
    outcome, _ = await env.events(*command_lifecycle())
    assert outcome == Outcome()
    commands = await commands_of(env, "d1")
    assert commands["pending"] == [
        {
            "command_id": "c5",
            "name": "reboot",
            "args": {"delay_s": 5},
            "state": "requested",
            "requested_at": iso(at(6)),
            "sent_at": None,
            "expires_at": iso(at(3606)),
        }
    ]
    assert [(c["command_id"], c["state"]) for c in commands["recent"]] == [
        ("c4", "cancelled"),
        ("c3", "expired"),
        ("c2", "failed"),
        ("c1", "acknowledged"),
    ]
    assert commands["recent"][3] == {
        "command_id": "c1",
        "name": "reboot",
        "state": "acknowledged",
        "requested_at": iso(at(2)),
        "finished_at": iso(at(9)),
        "result": {"x": 1},
    }
    assert commands["recent"][0]["reason"] == "op"
    assert await env.redis.get(env.keys.commands_pending) == b"1"
    assert (await env.hash("d1"))["version"] == "12"
    assert (await env.doc("d1"))["updated_at"] == iso(at(12))


async def test_redelivered_and_republished_command_events_change_nothing(env: Env) -> None:
    events = command_lifecycle()
    _, msgs = await env.events(*events)
    before = await env.dump()
    assert await env.projector.handle_events(msgs) == Outcome()
    assert await env.projector.handle_events(list(reversed(msgs))) == Outcome()
    outcome, _ = await env.events(*events[::-1])
    assert outcome == Outcome()
    assert await env.dump() == before
    assert await env.redis.get(env.keys.commands_pending) == b"1"


async def test_command_events_out_of_order_apply_in_version_order(env: Env) -> None:
    await env.events(registered())
    common: dict[str, Any] = {"device_id": "d1", "position": 0}
    ack = DeviceCommandAcknowledged(**common, version=4, at=at(4), command_id="c1", result={})
    outcome, later = await env.events(ack)
    assert outcome.retry == {0}
    await env.events(
        requested("c1", 2), DeviceCommandSent(**common, version=3, at=at(3), command_id="c1")
    )
    assert (await commands_of(env, "d1"))["pending"][0]["state"] == "sent"
    assert await env.projector.handle_events(later) == Outcome()
    commands = await commands_of(env, "d1")
    assert commands["pending"] == []
    assert [c["command_id"] for c in commands["recent"]] == ["c1"]
    assert await env.redis.get(env.keys.commands_pending) == b"0"


async def test_reported_config_version_is_kept_apart_and_moves_only_forward(env: Env) -> None:
    await env.ingest(
        Reported(device_id="d1", received_at=NOW_MS, state={"sp": 21, "config_version": 3})
    )
    fields = await env.hash("d1")
    assert msgspec.json.decode(fields["reported"]) == {"sp": 21}
    assert fields["reported_config_version"] == "3"
    history = env.keys.history_reported("d1").encode()
    before = await env.dump()
    await env.ingest(
        Reported(device_id="d1", received_at=NOW_MS - 10, state={"sp": 20, "config_version": 2})
    )
    after = await env.dump()
    # an older report changes nothing in the view; the device's reported history records it
    assert {k: v for k, v in after.items() if k != history} == {
        k: v for k, v in before.items() if k != history
    }
    reported = cast(
        list[tuple[bytes, float]], await env.redis.zrange(history, 0, -1, withscores=True)
    )
    assert [(msgspec.json.decode(m), s) for m, s in reported] == [
        ({"reported": {"sp": 20}, "config_version": 2}, NOW_MS - 10),
        ({"reported": {"sp": 21}, "config_version": 3}, NOW_MS),
    ]
    await env.ingest(
        Reported(device_id="d1", received_at=NOW_MS + 10, state={"sp": 22, "config_version": 4})
    )
    fields = await env.hash("d1")
    assert (fields["reported"], fields["reported_config_version"]) == ('{"sp":22}', "4")
    await env.ingest(Reported(device_id="d1", received_at=NOW_MS + 20, state={"sp": 23}))
    fields = await env.hash("d1")
    assert fields["reported"] == '{"sp":23}'
    assert "reported_config_version" not in fields  # the newest report names no version


async def test_reported_messages_in_any_order_end_in_the_same_view(env: Env) -> None:
    messages = [
        Reported(device_id="d1", received_at=NOW_MS + i % 3, state={"v": i, "config_version": i})
        for i in range(6)
    ]
    _, msgs = await env.ingest(*messages)
    other = ViewsProjector(env.redis, env.js, env.settings.namespace + "r")
    for msg in reversed(msgs):
        await other.handle_ingest([msg])
    mine = await env.hash("d1")
    theirs = await env.redis.hgetall(other.keys.device("d1"))
    assert mine == {text(k): text(v) for k, v in theirs.items()}
    assert mine["reported_config_version"] == "5"


async def test_connectivity_events_out_of_order_leave_the_newest_state(env: Env) -> None:
    common: dict[str, Any] = {"device_id": "d1", "position": 0}
    events: list[PublishedEvent] = [
        registered(),
        DeviceConnected(**common, version=2, at=at(2)),
        DeviceDisconnected(**common, version=3, at=at(3)),
        DeviceConnected(**common, version=4, at=at(4)),
        DeviceDisconnected(**common, version=5, at=at(5)),
    ]
    outcome, _ = await env.events(*events[::-1])
    assert outcome == Outcome()
    fields = await env.hash("d1")
    assert (fields["version"], fields["online"]) == ("5", "0")
    assert fields["online_at"] == str(NOW_MS // 1000 * 1000 + 5000)
    assert await env.members(env.keys.online) == set()
    assert (await env.doc("d1"))["status"] == "active"
    # A status message older than the disconnection leaves the device offline.
    await env.ingest(Status(device_id="d1", received_at=NOW_MS // 1000 * 1000 + 4500, online=True))
    after = await env.hash("d1")
    assert (after["online"], after["online_at"]) == ("0", fields["online_at"])
    assert await env.members(env.keys.online) == set()


async def test_bridge_sent_reports_are_ignored_and_acks_count_as_seen(env: Env) -> None:
    outcome, _ = await env.ingest(
        CommandSent(device_id="d1", received_at=NOW_MS, command_id="c1"),
        CommandAck(device_id="d2", received_at=NOW_MS, command_id="c1", status="ok"),
    )
    assert outcome == Outcome()
    assert await env.hash("d1") == {}
    assert (await env.hash("d2"))["last_seen"] == str(NOW_MS)


def iso(value: datetime) -> str:
    text: str = msgspec.json.decode(msgspec.json.encode(value))
    return text


async def wait_for(check: Any, what: str, seconds: float = 30.0) -> None:
    deadline = time.monotonic() + seconds
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"not reached: {what}")
        await asyncio.sleep(0.05)


async def test_consumers_apply_published_input_with_gaps_and_redeliveries(env: Env) -> None:
    stop = asyncio.Event()
    events_spec, ingest_spec = consumer_specs(env.settings.namespace)
    tasks = [
        asyncio.create_task(consume(env.js, events_spec, env.projector.handle_events, stop)),
        asyncio.create_task(consume(env.js, ingest_spec, env.projector.handle_ingest, stop)),
    ]
    try:
        # Version 2 before its predecessor: retried until version 1 is there.
        await env.publish_events(configured(2, {"a": 1}, device_id="x"))
        await env.publish_ingest(telemetry(NOW_MS, (NOW_MS + 5, {"v": 5}), device="x"))
        await asyncio.sleep(0.3)
        await env.publish_events(registered("x"))
        await env.publish_ingest(telemetry(NOW_MS, (NOW_MS + 1, {"v": 1}), device="x"))

        async def done() -> bool:
            fields = await env.hash("x")
            return fields.get("version") == "2" and "m:v" in fields

        await wait_for(done, "version 2 and the metric")
        fields = await env.hash("x")
        assert msgspec.json.decode(fields["m:v"]) == {"ts": NOW_MS + 5, "value": 5}
        assert (await env.doc("x"))["desired"] == {"version": 1, "config": {"a": 1}}
    finally:
        stop.set()
        await asyncio.gather(*tasks)


async def test_batches_split_across_two_projectors_end_in_the_same_views(env: Env) -> None:
    """Two instances sharing the durable consumers: each device still ends at its last event."""
    stop = asyncio.Event()
    events_spec, ingest_spec = consumer_specs(env.settings.namespace)
    second = ViewsProjector(env.redis, env.js, env.settings.namespace)
    tasks = [
        asyncio.create_task(consume(env.js, spec, handler, stop))
        for projector in (env.projector, second)
        for spec, handler in (
            (events_spec, projector.handle_events),
            (ingest_spec, projector.handle_ingest),
        )
    ]
    try:
        for version in range(1, 6):
            await env.publish_events(
                *(
                    registered(f"p{d}")
                    if version == 1
                    else configured(version, {"v": version}, f"p{d}")
                    for d in range(10)
                )
            )

        async def done() -> bool:
            versions: Sequence[bytes | str | None] = [
                await env.redis.hget(env.keys.device(f"p{d}"), "version") for d in range(10)
            ]
            return all(v == b"5" for v in versions)

        await wait_for(done, "every device at version 5", seconds=60)
        for d in range(10):
            assert (await env.doc(f"p{d}"))["desired"] == {"version": 4, "config": {"v": 5}}
    finally:
        stop.set()
        await asyncio.gather(*tasks)
    with contextlib.suppress(Exception):
        await env.js.delete_consumer(env.streams.events, events_spec.durable)


# -- the views position (consistency token) ----------------------------------------------------


def at_position(event: PublishedEvent, position: int) -> PublishedEvent:
    return msgspec.structs.replace(event, position=position)


async def test_position_advances_to_the_last_event_of_an_applied_batch(env: Env) -> None:
    assert await env.position() == 0
    await env.events(at_position(registered(), 7), at_position(configured(2, {"a": 1}), 9))
    assert await env.position() == 9
    await env.events(at_position(configured(3, {"a": 2}), 12))
    assert await env.position() == 12


async def test_position_stops_before_a_retried_gap_and_moves_on_once_it_is_applied(
    env: Env,
) -> None:
    await env.events(
        at_position(registered("d1"), 10),
        at_position(registered("d2"), 11),
    )
    outcome, batch = await env.events(
        at_position(configured(2, {"a": 1}, "d2"), 12),
        at_position(configured(3, {"a": 2}, "d1"), 13),  # its predecessor comes later: a gap
        at_position(configured(3, {"b": 2}, "d2"), 14),
    )
    assert outcome.retry == {1}
    assert await env.position() == 12  # the message before the gap, not past it

    outcome, _ = await env.events(at_position(configured(4, {"b": 3}, "d2"), 15))
    assert outcome == Outcome()
    assert await env.position() == 12  # still held back by the retried message

    await env.events(at_position(configured(2, {"a": 1}, "d1"), 16))
    assert await env.position() == 12
    assert await env.projector.handle_events([batch[1]]) == Outcome()  # the retry succeeds
    assert await env.position() == 16
    assert await env.redis.exists(env.keys.position_ahead) == 0  # nothing left parked


async def test_position_never_moves_backwards(env: Env) -> None:
    _, msgs = await env.events(at_position(registered(), 20), at_position(configured(2, {}), 21))
    assert await env.position() == 21
    assert await env.projector.handle_events(msgs) == Outcome()  # the batch redelivered
    assert await env.projector.handle_events(list(reversed(msgs[:1]))) == Outcome()
    assert await env.position() == 21
    await env.events(at_position(configured(2, {}), 5))  # an old event published again
    assert await env.position() == 21


async def test_dead_lettered_events_do_not_hold_the_position_back(env: Env) -> None:
    await env.js.publish(env.streams.event_subject("d1"), b"{not json")
    await env.publish_events(at_position(registered(), 30))
    msgs = await env.pull(env.streams.events, env.streams.events_wildcard, 2)
    assert (await env.projector.handle_events(msgs)).poison == {0}
    assert await env.position() == 30


async def test_a_batch_that_fails_moves_no_position(env: Env) -> None:
    await env.events(at_position(registered(), 40))
    await env.publish_events(at_position(configured(2, {"a": 1}), 41))
    msgs = await env.pull(env.streams.events, env.streams.events_wildcard, 1)
    await env.redis.set(env.keys.device("d1"), "not a hash")  # the event script will fail
    with pytest.raises(Exception, match="WRONGTYPE"):
        await env.projector.handle_events(msgs)
    assert await env.position() == 40


async def test_checkpoint_is_seeded_from_the_consumer_ack_floor_once(env: Env) -> None:
    spec = ConsumerSpec(
        stream=env.streams.events,
        durable=env.streams.consumer("seed_test"),
        filter_subject=env.streams.events_wildcard,
    )
    await ensure_consumer(env.js, spec)
    await env.publish_events(at_position(registered(), 50), at_position(configured(2, {}), 52))
    sub = await env.js.pull_subscribe_bind(spec.durable, stream=spec.stream)
    for msg in await sub.fetch(2, timeout=5):
        await msg.ack_sync()
    await seed_checkpoint(env.redis, env.js, env.keys, spec)
    assert await env.position() == 52
    assert await env.redis.get(env.keys.position_seq) == b"2"
    await env.redis.set(env.keys.position, "60")
    await seed_checkpoint(env.redis, env.js, env.keys, spec)  # a checkpoint exists: untouched
    assert await env.position() == 60


# -- alerts --------------------------------------------------------------------------------------


def alert_lifecycle(device_id: str = "d1") -> list[PublishedEvent]:
    hot, cold = f"{device_id}.hot.1000", f"{device_id}.cold.2000"
    common = {"device_id": device_id}
    return [
        registered(device_id),
        DeviceAlertRaised(
            **common,
            version=2,
            at=at(2),
            position=2,
            alert_id=hot,
            rule_id="hot",
            severity="critical",
            metric="t",
            value=91.0,
            at_ms=1000,
        ),
        DeviceAlertRaised(
            **common,
            version=3,
            at=at(3),
            position=3,
            alert_id=cold,
            rule_id="cold",
            severity="warning",
            metric="t",
            value=None,
            at_ms=2000,
        ),
        DeviceAlertRetriggered(
            **common, version=4, at=at(4), position=4, alert_id=hot, value=95.0, at_ms=3000
        ),
        DeviceAlertAcknowledged(
            **common, version=5, at=at(5), position=5, alert_id=hot, by="token:x", note="ok"
        ),
        DeviceAlertCleared(
            **common, version=6, at=at(6), position=6, alert_id=cold, value=None, at_ms=4000
        ),
    ]


async def test_alert_events_keep_the_open_alerts_in_the_doc_and_count_them_by_severity(
    env: Env,
) -> None:
    outcome, _ = await env.events(*alert_lifecycle())
    assert outcome == Outcome()
    alerts = (await env.doc("d1"))["alerts"]
    assert list(alerts) == ["d1.hot.1000"]
    hot = alerts["d1.hot.1000"]
    assert (hot["status"], hot["retriggers"], hot["last_value"]) == ("acknowledged", 1, 95.0)
    assert (hot["acknowledged_by"], hot["note"]) == ("token:x", "ok")
    assert await env.redis.get(env.keys.alerts_open("critical")) == b"1"
    assert await env.redis.get(env.keys.alerts_open("warning")) == b"0"


async def test_redelivered_alert_events_change_nothing(env: Env) -> None:
    events = alert_lifecycle()
    await env.events(*events)
    before = await env.dump()
    await env.events(*events[1:])
    assert await env.dump() == before


async def test_each_device_keeps_its_newest_cleared_alerts_and_forgets_older_ones(
    env: Env,
) -> None:
    kept = CLEARED_ALERTS_KEPT
    events: list[PublishedEvent] = [registered("d1")]
    ids = [f"d1.hot.{1000 * (n + 1)}" for n in range(kept + 3)]
    for n, alert_id in enumerate(ids):
        version = 2 + 2 * n
        at_ms = 1000 * (n + 1)
        events += [
            DeviceAlertRaised(
                device_id="d1",
                alert_id=alert_id,
                at_ms=at_ms,
                version=version,
                at=at(version),
                position=version,
                rule_id="hot",
                severity="critical",
                metric="t",
                value=91.0,
            ),
            DeviceAlertCleared(
                device_id="d1",
                alert_id=alert_id,
                at_ms=at_ms,
                version=version + 1,
                at=at(version + 1),
                position=version + 1,
                value=70.0,
            ),
        ]
    outcome, _ = await env.events(*events)
    assert outcome == Outcome()
    keys, redis = env.keys, env.redis
    gone, left = ids[:3], ids[3:]
    for index in (
        keys.alerts,
        keys.alerts_in("cleared"),
        keys.alerts_of_device("d1"),
        keys.alerts_of_rule("hot"),
        keys.alerts_cleared_of("d1"),
    ):
        members = await redis.zrange(index, 0, -1)
        assert [text(m) for m in members if isinstance(m, bytes | str)] == left, index
    assert not any([await redis.exists(keys.alert(alert_id)) for alert_id in gone])
    assert all([await redis.exists(keys.alert(alert_id)) for alert_id in left])
    assert await redis.get(keys.alerts_open("critical")) == b"0"
    # an event of an alert the views forgot changes only the device's doc and history (and the
    # position)
    late = DeviceAlertAcknowledged(
        device_id="d1",
        version=len(events) + 1,
        at=at(len(events) + 1),
        position=len(events) + 1,
        alert_id=gone[0],
        by="token:x",
        note="late",
    )
    before = await env.dump()
    await env.events(late)
    after = await env.dump()
    assert not await redis.exists(keys.alert(gone[0]))
    changed = {key for key in after if before.get(key) != after[key]}
    history = {keys.history("d1").encode(), keys.history_at("d1").encode()}  # its history too
    assert changed <= {keys.device("d1").encode(), keys.position.encode(), *history}
