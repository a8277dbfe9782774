"""Composition root of `iot run gateway`: the read-only API for dashboards (port 8082)."""

from __future__ import annotations

import logging
from collections.abc import Mapping

import httpx
from redis.asyncio import Redis

from gateway.api import Gateway, create_app
from gateway.influx import InfluxQL
from gateway.loghead import LogHead
from gateway.ratelimit import RateLimiter, rate_limit_prefix
from gateway.views import ViewReader
from infra.httpkit import Authorizer, serve
from infra.runtime import stop_on_signals
from infra.settings import Settings
from infra.streams import Streams

log = logging.getLogger(__name__)
GATEWAY_PORT = 8082


def build_gateway(
    settings: Settings, redis: Redis, http: httpx.AsyncClient, log_head: LogHead | None = None
) -> Gateway:
    return Gateway(
        views=ViewReader(redis, settings.namespace),
        influx=InfluxQL(http, settings.influx_url, settings.influx_db),
        authorizer=Authorizer(settings.api_tokens, settings.api_token_names),
        limiter=RateLimiter(
            redis, rate_limit_prefix(settings.namespace), settings.rate_limit_per_minute
        ),
        redis=redis,
        log_head=log_head,
        commands_url=settings.commands_public_url,
    )


async def readiness(gateway: Gateway) -> Mapping[str, bool]:
    """Redis and InfluxDB, what reads need, and the views complete (false while they are being
    rebuilt after Redis lost them). Not NATS: only a consistency token ahead of the views reads
    the log's head, and without NATS such a token waits as before."""
    try:
        redis_ok = bool(await gateway.redis.ping())
        views_ok = await gateway.views.complete(fresh=True)
    except Exception:
        redis_ok = views_ok = False
    return {"redis": redis_ok, "influxdb": await gateway.influx.ping(), "views": views_ok}


async def run(settings: Settings) -> None:
    stop = stop_on_signals()
    redis = Redis.from_url(
        settings.redis_url, decode_responses=True, socket_timeout=5, health_check_interval=30
    )
    http = httpx.AsyncClient(timeout=httpx.Timeout(30.0, connect=3.0))
    log_head = LogHead(Streams(settings.namespace))
    log_head.start(settings.nats_url)  # in the background: reads never wait for NATS
    gateway = build_gateway(settings, redis, http, log_head)

    async def ready() -> Mapping[str, bool]:
        return await readiness(gateway)

    app = create_app(gateway, ready)
    port = settings.port_for(GATEWAY_PORT)
    log.info("gateway listening", extra={"port": port})
    try:
        await serve(app, settings.http_host, port, stop)
    finally:
        await log_head.close()
        await http.aclose()
        await redis.aclose()
