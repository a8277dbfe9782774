"""Composition root of `iot run bridge`: MQTT (devices) -> validation -> JetStream `ingest.*`,
and back: commands and desired state from the EVENTS stream -> MQTT (the dispatcher).

Start-up order: HTTP (so /readyz answers 503 meanwhile), NATS, the dispatcher's MQTT client,
the device registry from the EVENTS stream up to its last sequence, then the dispatcher lease
and the ingesting MQTT client. Messages are acknowledged to MQTT only once JetStream has them;
on SIGTERM what is in flight gets a moment to finish, the rest stays with the broker's
persistent session and is redelivered to the next bridge run; the lease is given up so another
replica takes over dispatching at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from collections.abc import Mapping

from nats.aio.client import Client as NATS
from starlette.routing import BaseRoute

from bridges import metrics
from bridges.dispatch import LEASE_KEY, Dispatcher
from bridges.lease import Bucket, Lease
from bridges.mqtt import MqttSink, MqttSource
from bridges.pipeline import Pipeline, pump
from bridges.publisher import Publisher
from bridges.registry import DeviceRegistry
from infra.httpkit import build_app, serve
from infra.jetstream import follow_events
from infra.runtime import connect_nats, stop_on_signals
from infra.settings import Settings
from infra.streams import Streams, open_bucket

log = logging.getLogger(__name__)
BRIDGE_PORT = 8081


async def run(settings: Settings) -> None:
    stop = stop_on_signals()
    streams = Streams(settings.namespace)
    registry = DeviceRegistry()
    caught_up = asyncio.Event()
    nc: NATS | None = None
    source: MqttSource | None = None
    sink: MqttSink | None = None

    def nats_up() -> bool:
        return nc is not None and bool(nc.is_connected)

    def mqtt_up() -> bool:
        return source is not None and source.connected

    metrics.NATS_CONNECTED.set_function(lambda: float(nats_up()))

    async def ready() -> Mapping[str, bool]:
        return {
            "nats": nats_up(),
            "registry": caught_up.is_set(),
            "mqtt": mqtt_up(),
            "mqtt_out": sink is not None and sink.connected,
        }

    routes: list[BaseRoute] = []
    port = settings.port_for(BRIDGE_PORT)
    server = asyncio.create_task(serve(build_app(routes, ready), settings.http_host, port, stop))
    log.info("bridge listening", extra={"port": port})
    tasks: list[asyncio.Task[None]] = []
    pipeline: Pipeline | None = None
    lease_task: asyncio.Task[None] | None = None
    try:
        nc = await _connect(settings, stop)
        if nc is None:
            return
        publisher = Publisher(nc)
        await publisher.start()
        js = nc.jetstream()
        host, mqtt_port, tls = settings.mqtt
        sink = MqttSink(
            host,
            mqtt_port,
            f"{settings.mqtt_client_id}-out",
            username=settings.mqtt_username,
            password=settings.mqtt_password,
            tls=tls,
        )
        sink.start()

        async def leases() -> Bucket:
            return await open_bucket(js, streams, streams.leases_bucket)

        lease = Lease(leases, LEASE_KEY, f"{settings.mqtt_client_id}:{secrets.token_hex(6)}")
        dispatcher = Dispatcher(
            registry, sink, publisher, streams, is_leader=lease.is_leader, caught_up=caught_up
        )
        registry.listener = dispatcher.on_event
        lease.on_change = dispatcher.on_leadership
        metrics.LEADER.set_function(lambda: float(lease.is_leader()))
        tasks.append(asyncio.create_task(follow_events(js, streams, registry, caught_up, stop)))
        tasks.append(asyncio.create_task(dispatcher.run(stop)))
        await _first(caught_up.wait(), stop.wait())
        if stop.is_set():
            return
        log.info("device registry caught up", extra={"devices": len(registry.devices)})
        lease_task = asyncio.create_task(lease.run(stop))
        source = MqttSource(
            host,
            mqtt_port,
            settings.mqtt_client_id,
            settings.bridge_inflight,
            username=settings.mqtt_username,
            password=settings.mqtt_password,
            tls=tls,
            shared=settings.bridge_subscription == "shared",
        )
        pipeline = Pipeline(publisher, streams, registry.devices, source, is_connected=nats_up)
        tasks.append(asyncio.create_task(pump(source.inbox, source.wakeup, pipeline)))
        tasks.append(asyncio.create_task(pipeline.sweep(stop)))
        source.start()
        await stop.wait()
    finally:
        stop.set()
        if pipeline is not None:
            await pipeline.drain(2.0)
            pipeline.close()
        if source is not None:
            source.wakeup.set()
            await asyncio.to_thread(source.stop)
        if lease_task is not None:
            await lease_task  # gives the lease up
        if sink is not None:
            await asyncio.to_thread(sink.stop)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await server
        if nc is not None:
            with contextlib.suppress(Exception):
                await nc.close()


async def _connect(settings: Settings, stop: asyncio.Event) -> NATS | None:
    """Connect to NATS, retrying with backoff until it answers or `stop` is set."""
    backoff = 0.5
    while not stop.is_set():
        try:
            return await connect_nats(settings.nats_url, "iot-bridge")
        except Exception as e:
            log.warning("NATS not reachable; retrying", extra={"error": repr(e)})
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), backoff)
            backoff = min(backoff * 2, 10.0)
    return None


async def _first(*waits: object) -> None:
    tasks = [asyncio.ensure_future(w) for w in waits]  # type: ignore[call-overload]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
