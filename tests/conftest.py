"""Shared fixtures. Integration tests isolate themselves by a unique namespace (PostgreSQL
schema, JetStream stream prefix) on the shared services; they never wipe shared state."""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
from collections.abc import Iterator
from typing import TYPE_CHECKING

import pytest

from infra.settings import Settings, load

if TYPE_CHECKING:
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from infra.eventstore import DeviceStore

TOKENS = {
    "viewer-token-0123456789": "viewer",
    "operator-token-012345678": "operator",
    "admin-token-0123456789ab": "admin",
}


def unique_namespace() -> str:
    return "t" + secrets.token_hex(5)


def settings_for(namespace: str) -> Settings:
    env = dict(os.environ)
    env["IOT_NAMESPACE"] = namespace
    env["IOT_INFLUX_DB"] = namespace
    env["IOT_API_TOKENS"] = ",".join(f"{t}={r}" for t, r in TOKENS.items())
    return load(env)


def drop_namespace(settings: Settings) -> None:
    """Remove what a test namespace created: schema, streams, InfluxDB database, Redis keys."""
    if not settings.namespace:  # the default namespace's schema is `public`, its database `iot`
        raise ValueError("refusing to drop the default namespace")
    import nats
    import psycopg
    from psycopg import sql

    from infra.streams import Streams

    pg = settings.postgres
    with psycopg.connect(
        host=pg.host, port=pg.port, user=pg.user, dbname=pg.dbname, autocommit=True
    ) as conn:
        conn.execute(
            sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(settings.pg_schema))
        )

    async def drop_streams() -> None:
        nc = await nats.connect(settings.nats_url)
        try:
            streams = Streams(settings.namespace)
            for name in (streams.events, streams.ingest, streams.deadletter):
                with contextlib.suppress(Exception):  # absent already
                    await nc.jsm().delete_stream(name)
            for bucket in (streams.secrets_bucket, streams.leases_bucket):
                with contextlib.suppress(Exception):
                    await nc.jetstream().delete_key_value(bucket)
        finally:
            await nc.close()

    asyncio.run(drop_streams())

    import httpx
    import redis

    httpx.post(
        f"{settings.influx_url}/query", data={"q": f'DROP DATABASE "{settings.influx_db}"'}
    ).raise_for_status()
    client = redis.Redis.from_url(settings.redis_url)
    try:
        keys = list(client.scan_iter(match=f"{settings.namespace}:*", count=1000))
        for start in range(0, len(keys), 500):
            client.delete(*keys[start : start + 500])
    finally:
        client.close()


@contextlib.contextmanager
def migrated_namespace() -> Iterator[Settings]:
    """Settings of a fresh namespace on the real services, migrated, dropped afterwards."""
    from commands.migrate import migrate

    settings = settings_for(unique_namespace())
    asyncio.run(migrate(settings))
    try:
        yield settings
    finally:
        drop_namespace(settings)


@pytest.fixture
def migrated() -> Iterator[Settings]:
    """Settings of a fresh namespace on the real services, migrated, dropped afterwards."""
    with migrated_namespace() as settings:
        yield settings


@pytest.fixture(scope="module")
def migrated_module() -> Iterator[Settings]:
    """`migrated`, shared by a module's tests (a system started once for several)."""
    with migrated_namespace() as settings:
        yield settings


@pytest.fixture
def store(migrated: Settings) -> Iterator[DeviceStore]:
    from infra.eventstore import open_store

    opened = open_store(migrated)
    yield opened
    opened.close()


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    """Tracing on for the test, into memory (`infra.tracing`); off again afterwards."""
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from infra import tracing

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing.install(provider)
    yield exporter
    tracing.install(None)
    provider.shutdown()
