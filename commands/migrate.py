"""`iot migrate`: create or upgrade the PostgreSQL schema, the JetStream streams and the InfluxDB
database. Idempotent: running it again changes nothing."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import httpx
import nats
import psycopg
from nats.js.errors import BucketNotFoundError, NotFoundError
from psycopg import sql

from infra.eventstore import open_store
from infra.rollups import HOUR, MINUTE, duration_ms
from infra.settings import Settings
from infra.streams import Streams, kv_configs

log = logging.getLogger(__name__)
MIGRATION_LOCK = 0x107_0001


def ensure_database(settings: Settings) -> bool:
    """Create the database if it is missing; return True if it was created."""
    pg = settings.postgres
    with psycopg.connect(
        **pg.connect_kwargs("postgres"),
        autocommit=True,
        connect_timeout=5,
    ) as conn:
        exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (pg.dbname,))
        if exists.fetchone():
            return False
        try:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(pg.dbname)))
        except psycopg.errors.DuplicateDatabase:
            return False
        return True


def migrate_postgres(settings: Settings) -> None:
    pg = settings.postgres
    with psycopg.connect(
        **pg.connect_kwargs(),
        autocommit=True,
        connect_timeout=5,
    ) as conn:
        conn.execute("SELECT pg_advisory_lock(%s)", (MIGRATION_LOCK,))
        try:
            conn.execute(
                sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(settings.pg_schema))
            )
            store = open_store(settings, create_tables=True)
            store.close()
        finally:
            conn.execute("SELECT pg_advisory_unlock(%s)", (MIGRATION_LOCK,))


async def migrate_streams(settings: Settings, replicas: int = 1) -> list[str]:
    nc = await nats.connect(settings.nats_url, connect_timeout=5, max_reconnect_attempts=0)
    try:
        jsm = nc.jsm()
        done = []
        streams = Streams(settings.namespace)
        configs = streams.configs(
            replicas,
            deadletter_max_age=settings.deadletter_max_age_ms / 1000,
            deadletter_max_bytes=settings.deadletter_max_bytes,
        )
        for config in configs:
            assert config.name is not None
            try:
                await jsm.stream_info(config.name)
            except NotFoundError:
                await jsm.add_stream(config)
                done.append(f"created {config.name}")
            else:
                await jsm.update_stream(config)
                done.append(f"updated {config.name}")
        js = nc.jetstream()
        for kv in kv_configs(streams, replicas):
            try:
                await js.key_value(kv.bucket)
                done.append(f"kv {kv.bucket} exists")
            except BucketNotFoundError:
                await js.create_key_value(kv)
                done.append(f"created kv {kv.bucket}")
        return done
    finally:
        await nc.close()


async def migrate_influx(settings: Settings) -> list[str]:
    """The database, and the retention policies of its live generation: the default policy
    (raw telemetry) gets `IOT_RETENTION_RAW`, `<default>_1m` and `<default>_1h` (the rollups)
    `IOT_RETENTION_1M` and `IOT_RETENTION_1H`; created when missing, altered when different."""
    db = settings.influx_db
    async with httpx.AsyncClient(base_url=settings.influx_url, timeout=10) as client:

        async def query(statement: str) -> list[dict[str, Any]]:
            response = await client.post("/query", data={"q": statement, "db": db})
            response.raise_for_status()
            results: list[dict[str, Any]] = response.json().get("results", [])
            errors = [r["error"] for r in results if "error" in r]
            if errors:
                raise RuntimeError(f"InfluxDB refused {statement!r}: {errors[0]}")
            return results

        await query(f'CREATE DATABASE "{db}"')
        results = await query(f'SHOW RETENTION POLICIES ON "{db}"')
        series = results[0].get("series") or [{"columns": [], "values": []}]
        columns = series[0]["columns"]
        policies = {row[0]: dict(zip(columns, row, strict=True)) for row in series[0]["values"]}
        default = next((name for name, p in policies.items() if p["default"]), None)
        if default is None:
            raise RuntimeError(f"InfluxDB database {db!r} has no default retention policy")
        wanted = {
            default: settings.retention_raw,
            MINUTE.policy(default): settings.retention_1m,
            HOUR.policy(default): settings.retention_1h,
        }
        steps = []
        for name, duration in wanted.items():
            existing = policies.get(name)
            if existing is None:
                await query(
                    f'CREATE RETENTION POLICY "{name}" ON "{db}" DURATION {duration} REPLICATION 1'
                )
                steps.append(f"retention policy {name}: created, {duration}")
            elif duration_ms(existing["duration"]) != duration_ms(duration):
                shards = duration_ms(existing["shardGroupDuration"]) or 0
                limit = duration_ms(duration)
                # a policy's shard groups may not outlast it: shorten them for a short policy
                shard = " SHARD DURATION 1h" if limit is not None and shards > limit else ""
                await query(f'ALTER RETENTION POLICY "{name}" ON "{db}" DURATION {duration}{shard}')
                steps.append(f"retention policy {name}: {existing['duration']} -> {duration}")
            else:
                steps.append(f"retention policy {name}: {duration}")
        return steps


async def migrate(settings: Settings, replicas: int = 1) -> list[str]:
    """Run every migration; return a line per step for the operator."""
    created = await asyncio.to_thread(ensure_database, settings)
    steps = [f"postgres database {settings.postgres.dbname}: {'created' if created else 'exists'}"]
    await asyncio.to_thread(migrate_postgres, settings)
    steps.append(f"postgres schema {settings.pg_schema}: event store and idempotency tables ready")
    steps += [f"jetstream: {line}" for line in await migrate_streams(settings, replicas)]
    influx = await migrate_influx(settings)
    steps.append(f"influxdb database {settings.influx_db}: ready; " + "; ".join(influx))
    return steps
