"""Composition roots of the write side: `iot run commands` and `iot run relay`."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime

from commands.api import CommandService, StoreAdapter, create_app
from commands.expiry import ExpiryScheduler, expire_with, run_expiry
from commands.handlers import Credentials
from commands.policy import Policies, run_policies
from commands.relay import Relay
from infra import secrets as secret_handover
from infra.eventstore import DeviceStore, GroupCommitter, idempotency_cutoff, open_store
from infra.httpkit import Admission, Authorizer, serve
from infra.runtime import close_nats, connect_nats, retry_async, retry_start, stop_on_signals
from infra.settings import Settings
from infra.streams import Streams

log = logging.getLogger(__name__)
COMMANDS_PORT = 8080
RELAY_PORT = 8084


def new_device_id() -> str:
    return "dev-" + secrets.token_hex(8)


def production_credentials() -> Credentials:
    return Credentials(
        new_secret=lambda: secrets.token_urlsafe(32), new_salt=lambda: os.urandom(16)
    )


def store_ping(store: DeviceStore) -> bool:
    with store.recorder.datastore.get_connection() as conn:  # type: ignore[attr-defined]
        conn.execute("SELECT 1")
    return True


async def _purge_idempotency(store: DeviceStore, stop: asyncio.Event) -> None:
    while not stop.is_set():
        try:
            removed = await asyncio.to_thread(
                store.idem.purge_idempotency, idempotency_cutoff(datetime.now(UTC))
            )
            if removed:
                log.info("purged expired idempotency keys", extra={"removed": removed})
        except Exception as e:
            log.warning("idempotency purge failed", extra={"error": repr(e)})
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=3600)


async def run_commands(settings: Settings) -> None:
    """The command API, the policies applying device reports, and command expiry."""
    stop = stop_on_signals()
    store = await retry_start("event store", lambda: open_store(settings))
    nc = await retry_async("NATS", lambda: connect_nats(settings.nats_url, "iot-commands"))
    js = nc.jetstream()
    streams = Streams(settings.namespace)
    executor = ThreadPoolExecutor(settings.store_threads, thread_name_prefix="store")
    committer = GroupCommitter(store)

    async def hand_over(device_id: str, version: int, secret: str) -> None:
        await secret_handover.hand_over(js, streams, device_id, version, secret)

    service = CommandService(
        store=store,
        committer=committer,
        executor=executor,
        credentials=production_credentials(),
        new_device_id=new_device_id,
        hand_over=hand_over,
    )

    async def ready() -> Mapping[str, bool]:
        try:
            ok = await service.run(lambda: store_ping(store))
        except Exception:
            ok = False
        return {"postgres": ok, "nats": nc.is_connected}

    adapter = StoreAdapter(store, committer)
    scheduler = ExpiryScheduler(expire_with(adapter, service.run))
    app = create_app(
        service,
        Authorizer(settings.api_tokens, settings.api_token_names),
        ready,
        Admission(settings.commands_max_requests, what="command requests"),
        cors_origins=settings.cors_origins,
    )
    tasks = [
        asyncio.create_task(_purge_idempotency(store, stop)),
        asyncio.create_task(run_policies(js, streams, Policies(adapter, service.run), stop)),
        asyncio.create_task(run_expiry(js, streams, scheduler, stop)),
    ]
    port = settings.port_for(COMMANDS_PORT)
    server = asyncio.create_task(serve(app, settings.http_host, port, stop))
    log.info("command API listening", extra={"port": port})
    try:
        # Any of them ending before `stop` is a failure: stop the process, to be restarted.
        done, _ = await asyncio.wait({server, *tasks}, return_when=asyncio.FIRST_COMPLETED)
        for task in done:
            task.result()
    finally:
        stop.set()
        await asyncio.gather(server, *tasks, return_exceptions=True)
        with contextlib.suppress(Exception):
            await close_nats(nc)
        executor.shutdown(wait=True)
        committer.close()
        store.close()


async def run_relay(settings: Settings) -> None:
    from starlette.routing import BaseRoute

    from infra.httpkit import build_app

    stop = stop_on_signals()
    store = await retry_start("event store", lambda: open_store(settings))
    nc = await retry_async("NATS", lambda: connect_nats(settings.nats_url, "iot-relay"))
    pg = settings.postgres
    dsn = f"host={pg.host} port={pg.port} user={pg.user} dbname={pg.dbname}"
    if pg.password:
        dsn += f" password={pg.password}"
    relay = Relay(store, nc, Streams(settings.namespace), dsn)

    async def ready() -> Mapping[str, bool]:
        try:
            ok = await asyncio.to_thread(store_ping, store)
        except Exception:
            ok = False
        return {"postgres": ok, "nats": nc.is_connected, "stream": relay.state.healthy}

    routes: list[BaseRoute] = []
    app = build_app(routes, ready)
    port = settings.port_for(RELAY_PORT)
    log.info("relay listening", extra={"port": port})
    server = asyncio.create_task(serve(app, settings.http_host, port, stop))
    try:
        await relay.run(stop)
    finally:
        stop.set()
        await server
        await nc.drain()
        store.close()
