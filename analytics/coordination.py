"""How analytics replicas share the partitions, and where their checkpoints live: PostgreSQL.

Each replica holds one session (connection) with session-level advisory locks: one member lock
(a slot among `MAX_MEMBERS`) saying it is alive, and one lock per partition it owns. A replica
owns at most its fair share, ceil(partitions / members); it takes free partitions up to that
share and releases what is above it (after checkpointing). A replica that dies, kill -9
included, loses its session and with it every lock at once: the others take its partitions
over on their next rebalance (every second).

Checkpoints (a partition's series state and the INGEST sequence it reflects) are written on
that same session, so a replica that lost its locks cannot write one any more, and a
checkpoint never moves back (`WHERE ingest_seq <= EXCLUDED.ingest_seq`). The catalog snapshot
(the EVENTS stream side: devices, rules, open alerts) is one row any replica may advance.

`iot replay analytics` holds the replay lock: while it is held, every live replica releases
all its partitions and waits.
"""

from __future__ import annotations

import hashlib
import logging
import math
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg.sql import SQL, Identifier

from infra.settings import Settings

log = logging.getLogger(__name__)
MAX_MEMBERS = 64
CHECKPOINTS = "analytics_checkpoints"
CATALOG = "analytics_catalog"


class PartitionsChanged(Exception):
    """The checkpoints were written with another number of partitions."""


def lock_key(schema: str, name: str) -> int:
    """A positive 64-bit advisory lock key for one lock name of one event store schema."""
    digest = hashlib.blake2b(f"iot-analytics:{schema}:{name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") & 0x7FFF_FFFF_FFFF_FFFF


@dataclass(frozen=True)
class Checkpoint:
    partition: int
    seq: int
    state: bytes


class Coordinator:
    """One replica's PostgreSQL session: membership, partition locks and checkpoints."""

    def __init__(self, settings: Settings, partitions: int) -> None:
        self.settings = settings
        self.partitions = partitions
        self.schema = settings.pg_schema
        self.owned: set[int] = set()
        self.member: int | None = None
        self._conn: psycopg.AsyncConnection[Any] | None = None
        self._member_keys = [lock_key(self.schema, f"member:{i}") for i in range(MAX_MEMBERS)]
        self._replay_key = lock_key(self.schema, "replay")
        table = Identifier(self.schema, CHECKPOINTS)
        catalog = Identifier(self.schema, CATALOG)
        self._create = [
            SQL(
                "CREATE TABLE IF NOT EXISTS {} (partition integer PRIMARY KEY, "
                "partitions integer NOT NULL, ingest_seq bigint NOT NULL, state bytea NOT NULL, "
                "updated_at timestamptz NOT NULL DEFAULT now())"
            ).format(table),
            SQL(
                "CREATE TABLE IF NOT EXISTS {} (id integer PRIMARY KEY, events_seq bigint NOT "
                "NULL, state bytea NOT NULL, updated_at timestamptz NOT NULL DEFAULT now())"
            ).format(catalog),
        ]
        self._save = SQL(
            "INSERT INTO {t} (partition, partitions, ingest_seq, state) VALUES (%s, %s, %s, %s) "
            "ON CONFLICT (partition) DO UPDATE SET ingest_seq = EXCLUDED.ingest_seq, "
            "state = EXCLUDED.state, partitions = EXCLUDED.partitions, updated_at = now() "
            "WHERE {t}.ingest_seq <= EXCLUDED.ingest_seq"
        ).format(t=table)
        self._load = SQL("SELECT ingest_seq, state FROM {} WHERE partition = %s").format(table)
        self._count = SQL("SELECT DISTINCT partitions FROM {}").format(table)
        self._wipe = [SQL("DELETE FROM {}").format(table), SQL("DELETE FROM {}").format(catalog)]
        self._save_catalog = SQL(
            "INSERT INTO {t} (id, events_seq, state) VALUES (1, %s, %s) ON CONFLICT (id) DO "
            "UPDATE SET events_seq = EXCLUDED.events_seq, state = EXCLUDED.state, "
            "updated_at = now() WHERE {t}.events_seq < EXCLUDED.events_seq"
        ).format(t=catalog)
        self._load_catalog = SQL("SELECT state FROM {} WHERE id = 1").format(catalog)

    @property
    def conn(self) -> psycopg.AsyncConnection[Any]:
        if self._conn is None or self._conn.closed:
            raise psycopg.OperationalError("the coordination session is closed")
        return self._conn

    @property
    def connected(self) -> bool:
        return self._conn is not None and not self._conn.closed

    async def connect(self) -> None:
        self._conn = await psycopg.AsyncConnection.connect(
            **self.settings.postgres.connect_kwargs(),
            autocommit=True,
            connect_timeout=5,
            application_name="iot-analytics",
        )
        for statement in self._create:
            await self.conn.execute(statement)
        cur = await self.conn.execute(self._count)
        stored = {row[0] for row in await cur.fetchall()}
        if stored and stored != {self.partitions}:
            raise PartitionsChanged(
                f"the analytics checkpoints were written with {sorted(stored)} partitions, "
                f"IOT_ANALYTICS_PARTITIONS is {self.partitions}: set it back, or run "
                "`iot replay analytics` to re-partition"
            )

    async def close(self) -> None:
        if self._conn is not None:
            await self._conn.close()
        self._conn = None
        self.owned.clear()
        self.member = None

    async def _try(self, key: int) -> bool:
        cur = await self.conn.execute("SELECT pg_try_advisory_lock(%s)", (key,))
        row = await cur.fetchone()
        return bool(row and row[0])

    async def _unlock(self, key: int) -> None:
        await self.conn.execute("SELECT pg_advisory_unlock(%s)", (key,))

    def partition_key(self, partition: int) -> int:
        return lock_key(self.schema, f"partition:{partition}")

    async def join(self) -> int:
        """Take a member slot; raises if all are taken."""
        for slot, key in enumerate(self._member_keys):
            if await self._try(key):
                self.member = slot
                return slot
        raise RuntimeError(f"more than {MAX_MEMBERS} analytics replicas")

    async def _held(self, keys: list[int]) -> set[int]:
        """Which of `keys` some session of this database holds as an advisory lock."""
        cur = await self.conn.execute(
            "SELECT (classid::bigint << 32) | objid::bigint FROM pg_locks "
            "WHERE locktype = 'advisory' AND granted AND objsubid = 1 "
            "AND database = (SELECT oid FROM pg_database WHERE datname = current_database()) "
            "AND ((classid::bigint << 32) | objid::bigint) = ANY(%s)",
            (keys,),
        )
        return {int(row[0]) for row in await cur.fetchall()}

    async def members(self) -> int:
        return max(1, len(await self._held(self._member_keys)))

    async def replay_running(self) -> bool:
        return bool(await self._held([self._replay_key]))

    async def fair_share(self) -> int:
        if await self.replay_running():
            return 0
        return math.ceil(self.partitions / await self.members())

    async def acquire(self, limit: int) -> list[int]:
        """Take free partitions until this replica owns `limit`; the ones taken."""
        taken: list[int] = []
        if len(self.owned) >= limit:
            return taken
        held = await self._held([self.partition_key(p) for p in range(self.partitions)])
        start = ((self.member or 0) * limit) % self.partitions  # replicas start apart
        for i in range(self.partitions):
            p = (start + i) % self.partitions
            if len(self.owned) >= limit:
                break
            if p in self.owned or self.partition_key(p) in held:
                continue
            if await self._try(self.partition_key(p)):
                self.owned.add(p)
                taken.append(p)
        return taken

    def surplus(self, limit: int) -> list[int]:
        """The partitions above `limit` this replica should hand over (highest first)."""
        return sorted(self.owned, reverse=True)[: max(0, len(self.owned) - limit)]

    async def release(self, partition: int) -> None:
        if partition in self.owned:
            self.owned.discard(partition)
            await self._unlock(self.partition_key(partition))

    async def load(self, partition: int) -> Checkpoint | None:
        cur = await self.conn.execute(self._load, (partition,))
        row = await cur.fetchone()
        return None if row is None else Checkpoint(partition, int(row[0]), bytes(row[1]))

    async def save(self, checkpoints: list[Checkpoint]) -> None:
        """Write checkpoints of owned partitions in one transaction."""
        mine = [c for c in checkpoints if c.partition in self.owned]
        if not mine:
            return
        async with self.conn.transaction(), self.conn.cursor() as cur:
            await cur.executemany(
                self._save,
                [(c.partition, self.partitions, c.seq, c.state) for c in mine],
            )

    async def load_catalog(self) -> bytes | None:
        cur = await self.conn.execute(self._load_catalog)
        row = await cur.fetchone()
        return None if row is None else bytes(row[0])

    async def save_catalog(self, events_seq: int, state: bytes) -> None:
        await self.conn.execute(self._save_catalog, (events_seq, state))

    async def take_replay_lock(self) -> bool:
        return await self._try(self._replay_key)

    async def wipe(self) -> None:
        """Forget every checkpoint and the catalog snapshot (the replay's first step)."""
        async with self.conn.transaction():
            for statement in self._wipe:
                await self.conn.execute(statement)
