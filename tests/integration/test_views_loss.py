"""The views projector when Redis loses its data, restarts, or goes away, against a Redis of the
test's own (random port, temporary directory) and the shared NATS and PostgreSQL.

The projector runs in-process (`projections.views.serve_views`) with its HTTP port; domain events
go into the event store and through a relay, device messages straight into INGEST. A flush is
flagged (the projector's `/readyz` says `"views": false`, the gateway answers 503) while the
rebuild is held back by the replay lock the test holds, and the views then converge to what a
replay gives; a restart that keeps the data (appendonly) only reconnects.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import nats
import pytest
import redis.asyncio as aioredis
from nats.aio.client import Client as NATS

from commands.relay import Relay
from domain.device import Device
from domain.ingest import Reading, Status, Telemetry, encode_ingest
from gateway.api import create_app
from gateway.main import build_gateway, readiness
from infra.eventstore import DeviceStore, open_store
from infra.replay import Progress, ReplayContext, replay_lock
from infra.settings import Settings
from infra.streams import Streams
from infra.views import current_key, marker_key, rebuilding_key, views_root
from projections.views import consumer_specs, rules_spec, serve_views
from projections.views_replay import ViewsReplay
from tests.conftest import TOKENS
from tests.e2e.processes import free_port

pytestmark = pytest.mark.integration

VIEWER = {"Authorization": "Bearer viewer-token-0123456789"}
assert TOKENS
SETTLE_S = 60.0


class PrivateRedis:
    """A redis-server of the test's own; `appendonly` keeps its data across a restart."""

    def __init__(self, directory: Path, *, appendonly: bool) -> None:
        self.directory = directory
        self.appendonly = appendonly
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        directory.mkdir(parents=True, exist_ok=True)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        options = {
            "port": str(self.port),
            "bind": "127.0.0.1",
            "dir": str(self.directory),
            "save": "",
            "appendonly": "yes" if self.appendonly else "no",
            "logfile": str(self.directory / "redis.log"),
        }
        args = [part for name, value in options.items() for part in (f"--{name}", value)]
        self.proc = subprocess.Popen(["redis-server", *args], stdout=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            answer = subprocess.run(
                ["redis-cli", "-p", str(self.port), "ping"], capture_output=True, check=False
            )
            if answer.stdout.strip() == b"PONG":
                return
            time.sleep(0.05)
        raise TimeoutError(f"redis-server on {self.port} did not start")

    def stop(self) -> None:
        """SIGTERM: Redis writes (and syncs) its append-only file before it exits."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(30)
        self.proc = None


@dataclasses.dataclass
class Loss:
    settings: Settings
    server: PrivateRedis
    store: DeviceStore
    nc: NATS
    redis: aioredis.Redis
    http: httpx.AsyncClient
    projector: asyncio.Task[None] | None = None
    stop: asyncio.Event | None = None
    devices: int = 0
    sent: int = 0
    reader: aioredis.Redis | None = None
    client: httpx.AsyncClient | None = None

    # --- the projector ------------------------------------------------------------------

    def start_projector(self) -> None:
        self.stop = asyncio.Event()
        self.projector = asyncio.create_task(serve_views(self.settings, self.stop))

    async def stop_projector(self) -> None:
        if self.stop is not None and self.projector is not None:
            self.stop.set()
            await self.projector
        self.projector = self.stop = None

    async def readyz(self) -> tuple[int, dict[str, Any]]:
        port = self.settings.http_port
        try:
            answer = await self.http.get(f"http://127.0.0.1:{port}/readyz", timeout=5)
        except httpx.HTTPError:
            return 0, {}
        checks: dict[str, Any] = answer.json()["checks"]
        return answer.status_code, checks

    # --- input ----------------------------------------------------------------------------

    async def add_devices(self, n: int) -> None:
        """Register `n` devices, configure each twice and connect it (event store, relayed)."""
        now = datetime.now(UTC)

        def write() -> None:
            for i in range(self.devices, self.devices + n):
                labels = {"k": str(i % 3)}
                device = Device.register(f"d-{i:03d}", f"n{i}", "sensor", labels, "h", now)
                device.configure({"setpoint": i}, now)
                device.configure({"setpoint": i + 1}, now)
                device.connect(now)
                self.store.save_device(device)

        await asyncio.to_thread(write)
        self.devices += n

    async def send(self, per_device: int) -> None:
        """Telemetry and a status from every device, straight into INGEST."""
        js = self.nc.jetstream()
        streams = Streams(self.settings.namespace)
        now = int(time.time() * 1000)
        for i in range(self.devices):
            device = f"d-{i:03d}"
            for k in range(per_device):
                self.sent += 1
                message = Telemetry(
                    device_id=device,
                    received_at=now,
                    readings=[Reading(now - 1000 + self.sent, {"t": float(self.sent), "k": k})],
                )
                await js.publish(
                    streams.ingest_subject("telemetry", device), encode_ingest(message)
                )
            status = Status(device_id=device, received_at=now + self.sent, online=True)
            await js.publish(streams.ingest_subject("status", device), encode_ingest(status))

    # --- state ------------------------------------------------------------------------------

    async def settled(self) -> bool:
        """The relay published every stored event and the projector's consumers are drained."""
        js = self.nc.jetstream()
        streams = Streams(self.settings.namespace)
        position = await asyncio.to_thread(self.store.max_position)
        info = await js.stream_info(streams.events)
        if position and not info.state.last_seq:
            return False
        if info.state.last_seq:
            last = await js.get_msg(streams.events, info.state.last_seq)
            if int((last.headers or {}).get("Iot-Position", 0)) < position:
                return False
        events, ingest = consumer_specs(self.settings.namespace)
        for spec in (events, ingest, rules_spec(self.settings.namespace)):
            consumer = await js.consumer_info(spec.stream, spec.durable)
            if consumer.num_pending or consumer.num_ack_pending:
                return False
        return True

    async def generation(self) -> str:
        raw = await self.redis.get(current_key(self.settings.namespace))
        return raw.decode() if isinstance(raw, bytes) else "live"

    async def marker(self) -> bytes | None:
        raw = await self.redis.get(marker_key(self.settings.namespace))
        return raw if isinstance(raw, bytes) else None

    async def differences(self) -> list[str]:
        """What a replay of the log builds, compared with the views in use (none: equal)."""
        replay = ViewsReplay(ReplayContext(self.settings, self.nc, grace=0.1))
        report = await replay.verify(Progress(enabled=False))
        return report.differences

    async def gateway(self, path: str) -> httpx.Response:
        """A read from one gateway (the same all test long, as a running one is)."""
        if self.reader is None:
            self.reader = aioredis.Redis.from_url(self.settings.redis_url, decode_responses=True)
            gw = build_gateway(self.settings, self.reader, self.http)

            async def ready() -> dict[str, bool]:
                return dict(await readiness(gw))

            transport = httpx.ASGITransport(app=create_app(gw, ready))
            self.client = httpx.AsyncClient(transport=transport, base_url="http://gw")
        assert self.client is not None
        return await self.client.get(path, headers=VIEWER)

    async def close(self) -> None:
        await self.stop_projector()
        if self.client is not None:
            await self.client.aclose()
        if self.reader is not None:
            await self.reader.aclose()


async def eventually(check: Callable[[], Awaitable[Any]], what: str) -> Any:
    """Poll `check` until it answers something truthy (the system converging, not a timing
    claim: the bound only keeps a broken run from hanging)."""
    deadline = time.monotonic() + SETTLE_S
    while time.monotonic() < deadline:
        result = await check()
        if result:
            return result
        await asyncio.sleep(0.1)
    raise AssertionError(f"never: {what}")


@contextlib.asynccontextmanager
async def loss_env(migrated: Settings, directory: Path, *, appendonly: bool) -> AsyncIterator[Loss]:
    server = PrivateRedis(directory, appendonly=appendonly)
    server.start()
    settings = dataclasses.replace(migrated, redis_url=server.url, http_port=free_port())
    store = await asyncio.to_thread(open_store, settings)
    nc = await nats.connect(settings.nats_url)
    redis = aioredis.Redis.from_url(settings.redis_url)
    http = httpx.AsyncClient()
    pg = settings.postgres
    relay = Relay(
        store,
        nc,
        Streams(settings.namespace),
        f"host={pg.host} port={pg.port} user={pg.user} dbname={pg.dbname}",
    )
    relay_stop = asyncio.Event()
    relaying = asyncio.create_task(relay.run(relay_stop))
    env = Loss(settings, server, store, nc, redis, http)
    try:
        yield env
    finally:
        await env.close()
        relay_stop.set()
        await relaying
        await http.aclose()
        await redis.aclose()
        await nc.close()
        await asyncio.to_thread(store.close)
        server.stop()


async def ready(env: Loss) -> bool:
    status, _ = await env.readyz()
    return status == 200


async def test_a_flush_is_flagged_then_rebuilt_from_the_log(
    migrated: Settings, tmp_path: Path
) -> None:
    async with loss_env(migrated, tmp_path / "redis", appendonly=False) as env:
        env.start_projector()
        await eventually(lambda: ready(env), "the projector ready")
        await env.add_devices(6)
        await env.send(5)
        await eventually(env.settled, "the first input projected")
        assert (await env.gateway("/api/v1/devices")).status_code == 200

        # The rebuild waits for the replay lock the test holds, so the flag can be seen.
        async with replay_lock(env.settings, "views"):
            await env.redis.flushall()
            await env.add_devices(3)
            await env.send(4)

            async def flagged() -> bool:
                status, checks = await env.readyz()
                return status == 503 and checks.get("views") is False

            await eventually(flagged, "the projector's /readyz says the views are lost")
            answer = await env.gateway("/api/v1/devices/d-000")
            assert answer.status_code == 503
            assert answer.headers["Retry-After"] == "2"
            assert answer.json()["rebuilding"] is True
            gateway_ready = await env.gateway("/readyz")
            assert gateway_ready.status_code == 503
            assert gateway_ready.json()["checks"]["views"] is False

            async def flag_written() -> bool:
                return bool(await env.redis.exists(rebuilding_key(env.settings.namespace)))

            await eventually(flag_written, "the views flagged in Redis for every gateway")
            # nothing was written into the emptied Redis: no partial view to be served
            prefix = views_root(env.settings.namespace)
            written = {k async for k in env.redis.scan_iter(match=f"{prefix}:*")}
            assert written == {rebuilding_key(env.settings.namespace).encode()}

        await eventually(lambda: ready(env), "the views rebuilt")
        await eventually(env.settled, "everything projected after the rebuild")
        assert (await env.generation()).startswith("r")
        assert await env.marker() is not None
        assert await env.differences() == []
        listed = await env.gateway("/api/v1/devices?limit=500")
        assert listed.status_code == 200
        assert len(listed.json()["items"]) == 9
        one = (await env.gateway("/api/v1/devices/d-008")).json()
        assert one["desired"]["config"] == {"setpoint": 9}
        assert one["online"] is True
        assert set(one["metrics"]) == {"t", "k"}


async def test_a_restart_keeping_the_data_only_reconnects(
    migrated: Settings, tmp_path: Path
) -> None:
    async with loss_env(migrated, tmp_path / "redis", appendonly=True) as env:
        env.start_projector()
        await eventually(lambda: ready(env), "the projector ready")
        await env.add_devices(4)
        await env.send(5)
        await eventually(env.settled, "the first input projected")
        marker, generation = await env.marker(), await env.generation()
        assert marker is not None

        env.server.stop()

        async def redis_down() -> bool:
            status, checks = await env.readyz()
            return status == 503 and checks.get("redis") is False

        await eventually(redis_down, "/readyz 503 while Redis is away")
        await env.add_devices(2)  # arrives while Redis is away: held, not acknowledged
        await env.send(3)
        env.server.start()

        await eventually(lambda: ready(env), "/readyz 200 once Redis is back")
        await eventually(env.settled, "everything projected after the restart")
        assert await env.marker() == marker  # no rebuild: the same views, reconnected
        assert await env.generation() == generation
        assert await env.differences() == []
        listed = (await env.gateway("/api/v1/devices?limit=500")).json()
        assert len(listed["items"]) == 6


async def test_a_restart_that_lost_the_data_while_the_projector_was_away_is_rebuilt(
    migrated: Settings, tmp_path: Path
) -> None:
    async with loss_env(migrated, tmp_path / "redis", appendonly=False) as env:
        env.start_projector()
        await eventually(lambda: ready(env), "the projector ready")
        await env.add_devices(3)
        await env.send(4)
        await eventually(env.settled, "the first input projected")
        await env.stop_projector()

        env.server.stop()  # no persistence: it comes back empty
        env.server.start()
        await env.add_devices(2)
        await env.send(2)
        env.start_projector()  # JetStream remembers what the consumers acknowledged

        await eventually(lambda: ready(env), "the views rebuilt at start")
        await eventually(env.settled, "everything projected after the rebuild")
        assert (await env.generation()).startswith("r")
        assert await env.differences() == []
        listed = (await env.gateway("/api/v1/devices?limit=500")).json()
        assert len(listed["items"]) == 5
