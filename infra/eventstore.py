"""The event store: the eventsourcing library's PostgreSQL persistence, plus idempotency records.

An idempotency record is inserted in the same transaction as the events it answers for, so a
retried request either finds the first answer or finds nothing was stored.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, ClassVar
from uuid import UUID

import psycopg
from eventsourcing.application import AggregateNotFoundError, Application
from eventsourcing.persistence import IntegrityError
from eventsourcing.postgres import PostgresApplicationRecorder
from psycopg.rows import DictRow
from psycopg.sql import SQL, Identifier

from domain.device import Device, device_uuid
from domain.rules import Rule, rule_uuid
from infra import metrics
from infra.settings import Settings

APPLICATION_NAME = "Devices"
EVENTS_TABLE = "devices_events"
IDEMPOTENCY_TABLE = "idempotency_keys"


@dataclass(frozen=True)
class IdempotencyRecord:
    """The first answer to a request carrying an Idempotency-Key."""

    principal: str
    key: str
    fingerprint: str
    status: int
    body: bytes
    created_at: datetime


class IdempotentRecorder(PostgresApplicationRecorder):
    """Application recorder that also stores idempotency records in the events' transaction."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # The library names the NOTIFY channel after the table alone; with one schema per
        # instance that would wake every instance's relay for every instance's commits.
        self.channel_name = f"{self.datastore.schema}_{self.events_table_name}"
        table = Identifier(self.datastore.schema, IDEMPOTENCY_TABLE)
        self.sql_create_statements.append(
            SQL(
                "CREATE TABLE IF NOT EXISTS {} ("
                "principal text NOT NULL, key text NOT NULL, fingerprint text NOT NULL, "
                "status integer NOT NULL, body bytea NOT NULL, created_at timestamptz NOT NULL, "
                "PRIMARY KEY (principal, key))"
            ).format(table)
        )
        self._insert_idem = SQL(
            "INSERT INTO {} (principal, key, fingerprint, status, body, created_at) "
            "VALUES (%s, %s, %s, %s, %s, %s)"
        ).format(table)
        self._insert_idem_if_absent = self._insert_idem + SQL(" ON CONFLICT DO NOTHING")
        self._select_idem = SQL(
            "SELECT fingerprint, status, body, created_at FROM {} WHERE principal=%s AND key=%s"
        ).format(table)
        self._purge_idem = SQL("DELETE FROM {} WHERE created_at < %s").format(table)
        self._select_position = SQL(
            "SELECT notification_id FROM {} WHERE originator_id=%s AND originator_version=%s"
        ).format(Identifier(self.datastore.schema, self.events_table_name))

    def _insert_events(
        self, curs: psycopg.Cursor[DictRow], stored_events: Any, **kwargs: Any
    ) -> None:
        records: Sequence[IdempotencyRecord] = kwargs.get("idempotency") or ()
        for record in records:
            curs.execute(self._insert_idem, _row(record), prepare=True)
        super()._insert_events(curs, stored_events, **kwargs)

    def get_idempotency(self, principal: str, key: str) -> IdempotencyRecord | None:
        with self.datastore.get_connection() as conn, conn.cursor() as curs:
            curs.execute(self._select_idem, (principal, key), prepare=True)
            row = curs.fetchone()
        if row is None:
            return None
        return IdempotencyRecord(
            principal=principal,
            key=key,
            fingerprint=row["fingerprint"],
            status=row["status"],
            body=bytes(row["body"]),
            created_at=row["created_at"],
        )

    def put_idempotency(self, record: IdempotencyRecord) -> None:
        """Store an answer that wrote no events (an error), unless one is there already."""
        with self.datastore.transaction(commit=True) as curs:
            curs.execute(self._insert_idem_if_absent, _row(record), prepare=True)

    def position_of(self, originator_id: UUID, version: int) -> int | None:
        """The position (notification id) of one stored event; None if there is none."""
        with self.datastore.get_connection() as conn, conn.cursor() as curs:
            curs.execute(self._select_position, (originator_id, version), prepare=True)
            row = curs.fetchone()
        return None if row is None else int(row["notification_id"])

    def purge_idempotency(self, older_than: datetime) -> int:
        with self.datastore.transaction(commit=True) as curs:
            curs.execute(self._purge_idem, (older_than,))
            return curs.rowcount


def _row(record: IdempotencyRecord) -> tuple[Any, ...]:
    return (
        record.principal,
        record.key,
        record.fingerprint,
        record.status,
        record.body,
        record.created_at,
    )


class DeviceStore(Application[UUID]):
    """The Device event store (an eventsourcing Application on PostgreSQL)."""

    name = APPLICATION_NAME
    snapshotting_intervals: ClassVar[dict[type[Any], int]] = {Device: 100}

    @property
    def idem(self) -> IdempotentRecorder:
        assert isinstance(self.recorder, IdempotentRecorder)
        return self.recorder

    def get(self, device_id: str) -> Device | None:
        try:
            device: Device = self.repository.get(device_uuid(device_id))
        except AggregateNotFoundError:
            return None
        assert isinstance(device, Device)
        return device

    def save_device(self, device: Device, idempotency: IdempotencyRecord | None = None) -> int:
        """Append the device's pending events; return the position of the last one."""
        recordings = self.save(device, idempotency=[idempotency] if idempotency else None)
        return recordings[-1].notification.id if recordings else 0

    def position_of(self, device_id: str, version: int) -> int | None:
        """The position of the device's event at `version` (None if it has none)."""
        return self.idem.position_of(device_uuid(device_id), version)

    def get_rule(self, rule_id: str) -> Rule | None:
        try:
            rule: Rule = self.repository.get(rule_uuid(rule_id))
        except AggregateNotFoundError:
            return None
        assert isinstance(rule, Rule)
        return rule

    def save_rule(self, rule: Rule, idempotency: IdempotencyRecord | None = None) -> int:
        """Append the rule's pending events; return the position of the last one."""
        recordings = self.save(rule, idempotency=[idempotency] if idempotency else None)
        return recordings[-1].notification.id if recordings else 0

    def rule_position_of(self, rule_id: str, version: int) -> int | None:
        return self.idem.position_of(rule_uuid(rule_id), version)

    def max_position(self) -> int:
        return self.recorder.max_notification_id() or 0


def store_env(settings: Settings, *, create_tables: bool = False) -> dict[str, str]:
    """The eventsourcing library's settings, derived from ours."""
    pg = settings.postgres
    env = {
        "PERSISTENCE_MODULE": "eventsourcing.postgres",
        "APPLICATION_RECORDER_TOPIC": f"{IdempotentRecorder.__module__}:IdempotentRecorder",
        "POSTGRES_DBNAME": pg.dbname,
        "POSTGRES_HOST": pg.host,
        "POSTGRES_PORT": str(pg.port),
        "POSTGRES_USER": pg.user,
        "POSTGRES_PASSWORD": pg.password,
        "POSTGRES_SCHEMA": settings.pg_schema,
        "POSTGRES_POOL_SIZE": str(settings.db_pool_size),
        "POSTGRES_MAX_OVERFLOW": "4",
        "POSTGRES_PRE_PING": "n",  # a dead connection fails its statement and is retried
        "POSTGRES_CONNECT_TIMEOUT": "5",
        "POSTGRES_LOCK_TIMEOUT": "10",
        "CREATE_TABLE": "y" if create_tables else "n",
    }
    if settings.aggregate_cache > 0:  # the library reads 0 as "unbounded"
        # Cached devices are fast-forwarded from the store on every load (one indexed query
        # instead of a snapshot and an events query), so this is correct with many replicas.
        env["AGGREGATE_CACHE_MAXSIZE"] = str(settings.aggregate_cache)
        env["AGGREGATE_CACHE_FASTFORWARD"] = "y"
    return env


def open_store(settings: Settings, *, create_tables: bool = False) -> DeviceStore:
    return DeviceStore(env=store_env(settings, create_tables=create_tables))


def idempotency_cutoff(now: datetime, ttl: timedelta = timedelta(hours=24)) -> datetime:
    return now - ttl


@dataclass
class _Pending:
    device: Device
    idempotency: IdempotencyRecord | None
    future: Future[int] = field(default_factory=Future)


class GroupCommitter:
    """Saves concurrent commands' events in shared transactions (group commit).

    The event store serialises inserts with a table lock, so one transaction per command caps
    throughput at one commit round trip per command. Callers in worker threads hand their
    device to one committer thread, which saves whatever has queued up while the previous
    transaction ran, as one transaction. If that transaction conflicts (one device lost an
    optimistic-concurrency race, or an idempotency key was taken), the batch is halved and
    each half retried, down to single devices, so only the loser sees the conflict. Nothing
    waits on a timer: a lone command is committed at once. The queue is bounded; callers block
    when it is full.
    """

    def __init__(self, store: DeviceStore, max_batch: int = 64, max_queue: int = 1024) -> None:
        self.store = store
        self.max_batch = max_batch
        self._queue: queue.Queue[_Pending | None] = queue.Queue(maxsize=max_queue)
        self._thread = threading.Thread(target=self._run, name="group-commit", daemon=True)
        self._thread.start()

    def save_device(self, device: Device, idempotency: IdempotencyRecord | None = None) -> int:
        pending = _Pending(device, idempotency)
        self._queue.put(pending)
        return pending.future.result()

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join()

    def _run(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            batch = [first]
            closing = False
            while len(batch) < self.max_batch:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    closing = True
                    break
                batch.append(item)
            self._commit(batch)
            if closing:
                return

    def _commit(self, batch: list[_Pending]) -> None:
        # Two changes of one device in a batch were decided on the same version: the later
        # would make the whole shared transaction fail. It loses its race now, alone, and its
        # caller re-runs it on the fresh state; the others commit together.
        seen: set[Any] = set()
        unique = []
        for pending in batch:
            if pending.device.id in seen:
                pending.device.collect_events()
                pending.future.set_exception(IntegrityError("another change of this device won"))
            else:
                seen.add(pending.device.id)
                unique.append(pending)
        batch = unique
        if len(batch) == 1:
            started = time.perf_counter()
            metrics.GROUP_COMMIT_SIZE.observe(1)
            self._commit_one(batch[0], batch[0].device)
            metrics.GROUP_COMMIT_SECONDS.observe(time.perf_counter() - started)
            return
        events = [list(p.device.pending_events) for p in batch]
        started = time.perf_counter()
        metrics.GROUP_COMMIT_SIZE.observe(len(batch))
        self._group(list(zip(batch, events, strict=True)), whole=True)
        metrics.GROUP_COMMIT_SECONDS.observe(time.perf_counter() - started)

    def _group(self, items: list[tuple[_Pending, list[Any]]], whole: bool = False) -> None:
        """Save the items in one transaction. On a conflict (a stale change) halve and retry,
        so one or two losers cost a few transactions, not one per device. The whole batch is
        saved as devices (the cache takes their new state); after a conflict emptied them, as
        their collected events."""
        if len(items) == 1 and not whole:
            self._commit_one(items[0][0], *items[0][1])
            return
        objs = [p.device for p, _ in items] if whole else [e for _, own in items for e in own]
        records = [p.idempotency for p, _ in items if p.idempotency is not None]
        try:
            recordings = self.store.save(*objs, idempotency=records)
        except IntegrityError:
            metrics.GROUP_COMMIT_CONFLICTS.inc()
            half = len(items) // 2
            self._group(items[:half])
            self._group(items[half:])
            return
        except BaseException as e:
            for pending, _ in items:
                pending.future.set_exception(e)
            return
        last = {r.domain_event.originator_id: r.notification.id for r in recordings}
        for pending, _ in items:
            pending.future.set_result(last.get(pending.device.id, 0))

    def _commit_one(self, pending: _Pending, *objs: Any) -> None:
        records = [pending.idempotency] if pending.idempotency else None
        try:
            recordings = self.store.save(*objs, idempotency=records)
        except BaseException as e:
            pending.future.set_exception(e)
            return
        pending.future.set_result(recordings[-1].notification.id if recordings else 0)
