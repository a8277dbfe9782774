"""`iot migrate`: create or upgrade the PostgreSQL schema, the JetStream streams and the InfluxDB
database. Idempotent: running it again changes nothing."""

from __future__ import annotations

import asyncio
import logging

import httpx
import nats
import psycopg
from nats.js.errors import BucketNotFoundError, NotFoundError
from psycopg import sql

from infra.eventstore import open_store
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
        for config in streams.configs(replicas):
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


async def migrate_influx(settings: Settings) -> None:
    async with httpx.AsyncClient(base_url=settings.influx_url, timeout=10) as client:
        response = await client.post(
            "/query", data={"q": f'CREATE DATABASE "{settings.influx_db}"'}
        )
        response.raise_for_status()
        body = response.json()
        errors = [r["error"] for r in body.get("results", []) if "error" in r]
        if errors:
            raise RuntimeError(f"InfluxDB refused CREATE DATABASE: {errors[0]}")


async def migrate(settings: Settings, replicas: int = 1) -> list[str]:
    """Run every migration; return a line per step for the operator."""
    created = await asyncio.to_thread(ensure_database, settings)
    steps = [f"postgres database {settings.postgres.dbname}: {'created' if created else 'exists'}"]
    await asyncio.to_thread(migrate_postgres, settings)
    steps.append(f"postgres schema {settings.pg_schema}: event store and idempotency tables ready")
    steps += [f"jetstream: {line}" for line in await migrate_streams(settings, replicas)]
    await migrate_influx(settings)
    steps.append(f"influxdb database {settings.influx_db}: ready")
    return steps
