"""`iot backup` and `iot restore` on the real PostgreSQL and NATS: drop everything, restore, and
find the event store and every stream exactly as they were; the relay then goes on without
publishing anything twice."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import nats
import psycopg
import pytest
from nats.js.errors import NotFoundError
from psycopg import sql

from commands.relay import POSITION_HEADER, Relay
from domain.device import Device
from infra.eventstore import DeviceStore, IdempotencyRecord, open_store
from infra.settings import Settings
from infra.streams import Streams
from iot.backup import BackupError, Refused, backup, restore

pytestmark = pytest.mark.integration

Row = tuple[Any, ...]
Message = tuple[int, str, bytes, dict[str, str], datetime]


def lines() -> tuple[list[str], Any]:
    seen: list[str] = []
    return seen, seen.append


def names(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def pg_conn(settings: Settings) -> psycopg.Connection[Any]:
    pg = settings.postgres
    return psycopg.connect(
        host=pg.host, port=pg.port, user=pg.user, dbname=pg.dbname, autocommit=True
    )


def event_rows(settings: Settings) -> list[Row]:
    with pg_conn(settings) as conn:
        query = sql.SQL(
            "SELECT notification_id, originator_id, originator_version, topic, state FROM {} "
            "ORDER BY notification_id"
        )
        events = conn.execute(query.format(sql.Identifier(settings.pg_schema, "devices_events")))
        return [tuple(r) for r in events]


def table_rows(settings: Settings, table: str) -> list[Row]:
    with pg_conn(settings) as conn:
        query = sql.SQL("SELECT * FROM {} ORDER BY 1, 2").format(
            sql.Identifier(settings.pg_schema, table)
        )
        return [tuple(r) for r in conn.execute(query)]


async def stream_messages(settings: Settings, name: str) -> list[Message]:
    nc = await nats.connect(settings.nats_url)
    try:
        jsm = nc.jsm()
        state = (await jsm.stream_info(name)).state
        out = []
        for seq in range(state.first_seq, state.last_seq + 1):
            msg = await jsm.get_msg(name, seq)
            assert msg.seq is not None
            assert msg.subject is not None
            headers = dict(msg.headers or {})
            assert msg.time is not None
            out.append((msg.seq, msg.subject, msg.data or b"", headers, msg.time))
        return out
    finally:
        await nc.close()


async def all_streams(settings: Settings) -> dict[str, list[Message]]:
    streams = Streams(settings.namespace)
    names = (streams.events, streams.ingest, streams.deadletter)
    return {name: await stream_messages(settings, name) for name in names}


@contextlib.asynccontextmanager
async def running_relay(settings: Settings, store: DeviceStore) -> AsyncIterator[Relay]:
    nc = await nats.connect(settings.nats_url)
    pg = settings.postgres
    relay = Relay(
        store,
        nc,
        Streams(settings.namespace),
        f"host={pg.host} port={pg.port} user={pg.user} dbname={pg.dbname}",
    )
    stop = asyncio.Event()
    task = asyncio.create_task(relay.run(stop))
    try:
        yield relay
    finally:
        stop.set()
        await task
        await nc.close()


async def relayed_up_to(settings: Settings, position: int) -> None:
    """Wait until the EVENTS stream's last message carries `position`."""
    nc = await nats.connect(settings.nats_url)
    try:
        jsm = nc.jsm()
        name = Streams(settings.namespace).events
        while True:
            state = (await jsm.stream_info(name)).state
            if state.last_seq:
                last = await jsm.get_msg(name, state.last_seq)
                if int((last.headers or {})[POSITION_HEADER]) >= position:
                    return
            await asyncio.sleep(0.05)
    finally:
        await nc.close()


def populate(store: DeviceStore) -> None:
    now = datetime.now(UTC)
    for i in range(5):
        store.save_device(Device.register(f"dev-{i}", f"n{i}", "sensor", {"site": "a"}, "h", now))
    busy = store.get("dev-0")
    assert busy is not None
    for round_ in range(105):  # past the snapshotting interval: a snapshot row too
        busy.configure({"round": round_}, now)
        store.save_device(busy)
    other = store.get("dev-1")
    assert other is not None
    other.suspend("maintenance", now)
    store.save_device(
        other,
        IdempotencyRecord("operator", "key-1", "fp", 200, b'{"ok": true}', now),
    )


async def publish_ingest_and_deadletter(settings: Settings) -> None:
    streams = Streams(settings.namespace)
    nc = await nats.connect(settings.nats_url)
    try:
        js = nc.jetstream()
        for i in range(40):
            await js.publish(
                streams.ingest_subject("telemetry", f"dev-{i % 5}"),
                b'{"temperature": %d}' % i,
                headers={"Nats-Msg-Id": f"mqtt-{i}", "Iot-Received": str(i)},
            )
        await js.publish(
            streams.ingest_subject("status", "dev-2"), b"online", headers={"Nats-Msg-Id": "st-1"}
        )
        await js.publish(
            streams.deadletter_subject("malformed"),
            b"{not json",
            headers={"Iot-Reason": "malformed", "Iot-Topic": "devices/dev-9/telemetry"},
        )
    finally:
        await nc.close()


async def drop_schema_and_streams(settings: Settings) -> None:
    with pg_conn(settings) as conn:
        conn.execute(sql.SQL("DROP SCHEMA {} CASCADE").format(sql.Identifier(settings.pg_schema)))
    streams = Streams(settings.namespace)
    nc = await nats.connect(settings.nats_url)
    try:
        for name in (streams.events, streams.ingest, streams.deadletter):
            await nc.jsm().delete_stream(name)
        for bucket in (streams.secrets_bucket, streams.leases_bucket):
            await nc.jetstream().delete_key_value(bucket)
    finally:
        await nc.close()


async def kv_buckets_exist(settings: Settings) -> bool:
    streams = Streams(settings.namespace)
    nc = await nats.connect(settings.nats_url)
    try:
        for bucket in (streams.secrets_bucket, streams.leases_bucket):
            kv = await nc.jetstream().key_value(bucket)
            assert (await kv.status()).values == 0
        return True
    except NotFoundError:
        return False
    finally:
        await nc.close()


@pytest.fixture
def store(migrated: Settings) -> Iterator[DeviceStore]:
    opened = open_store(migrated)
    yield opened
    opened.close()


async def test_backup_drop_restore_gives_back_the_same_store_and_streams(
    migrated: Settings, store: DeviceStore, tmp_path: Path
) -> None:
    settings = migrated
    await asyncio.to_thread(populate, store)
    max_position = store.max_position()
    async with running_relay(settings, store):
        await relayed_up_to(settings, max_position)
    await publish_ingest_and_deadletter(settings)

    events_before = event_rows(settings)
    snapshots_before = table_rows(settings, "devices_snapshots")
    idempotency_before = table_rows(settings, "idempotency_keys")
    streams_before = await all_streams(settings)
    assert snapshots_before
    assert idempotency_before
    assert len(events_before) == max_position

    progress, report = lines()
    manifest = await backup(settings, tmp_path / "backup", report)
    assert manifest["postgres"]["max_position"] == max_position
    assert manifest["relay_position"] == max_position
    counts = {s["name"]: s["messages"] for s in manifest["streams"]}
    assert counts == {name: len(msgs) for name, msgs in streams_before.items()}
    assert names(tmp_path / "backup") == [
        "manifest.json",
        "postgres",
        "streams",
    ]
    assert names(tmp_path) == ["backup"]  # no staging left behind
    assert any("receiving snapshot" in line for line in progress)

    # The namespace holds data: a restore over it is refused, and nothing is touched.
    with pytest.raises(Refused, match=r"not empty.*--force"):
        await restore(settings, tmp_path / "backup", report)
    assert event_rows(settings) == events_before

    await drop_schema_and_streams(settings)
    store.close()
    summary = await restore(settings, tmp_path / "backup", report)
    assert any("as backed up" in line for line in summary)

    assert event_rows(settings) == events_before
    assert table_rows(settings, "devices_snapshots") == snapshots_before
    assert table_rows(settings, "idempotency_keys") == idempotency_before
    assert await all_streams(settings) == streams_before
    assert await kv_buckets_exist(settings)

    # The relay on the restored namespace resumes after the last Iot-Position: a new event is
    # published once, and nothing from before is published again.
    restored = open_store(settings)
    try:
        device = restored.get("dev-3")
        assert device is not None
        device.configure({"after": "restore"}, datetime.now(UTC))
        position = await asyncio.to_thread(restored.save_device, device)
        assert position == max_position + 1
        async with running_relay(settings, restored):
            await relayed_up_to(settings, position)
    finally:
        restored.close()
    events_after = (await all_streams(settings))[Streams(settings.namespace).events]
    before = streams_before[Streams(settings.namespace).events]
    assert events_after[: len(before)] == before
    assert len(events_after) == len(before) + 1
    positions = [int(m[3][POSITION_HEADER]) for m in events_after]
    assert positions == list(range(1, position + 1))
    assert len({m[3]["Nats-Msg-Id"] for m in events_after}) == len(events_after)

    # --force drops what is there (saying so) and restores the backup again.
    progress.clear()
    summary = await restore(settings, tmp_path / "backup", report, force=True)
    assert any("dropping schema" in line for line in progress)
    assert any("deleting stream" in line for line in progress)
    assert event_rows(settings) == events_before
    assert await all_streams(settings) == streams_before


async def test_backup_into_a_non_empty_directory_is_refused(
    migrated: Settings, tmp_path: Path
) -> None:
    (tmp_path / "old").write_text("something")
    _, report = lines()
    with pytest.raises(Refused, match="not an empty directory"):
        await backup(migrated, tmp_path, report)
    assert names(tmp_path) == ["old"]


async def test_restore_of_a_directory_without_a_manifest_fails_clearly(
    migrated: Settings, tmp_path: Path
) -> None:
    _, report = lines()
    with pytest.raises(BackupError, match=r"manifest\.json not found"):
        await restore(migrated, tmp_path, report)
