"""Consistency tokens against the log's head, on real NATS JetStream and Redis: a token the views
have reached answers at once, one the log has reached waits (503 with Retry-After after the
bound), one beyond the log's head is a 400 that says so; without NATS, every token waits."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from collections.abc import AsyncIterator

import httpx
import pytest
from nats.aio.client import Client as NATS
from redis.asyncio import Redis

from gateway.api import Gateway
from gateway.loghead import POSITION_HEADER, LogHead
from infra.runtime import connect_nats
from infra.settings import Settings
from infra.streams import Streams
from infra.views import ViewKeys
from tests.integration.test_gateway import (
    ADMIN,
    OPERATOR,
    VIEWER,
    assert_problem,
    client_for,
    influx_http,
    keys,
    make_gateway,
    put_device,
    redis,
    settings,
)

pytestmark = pytest.mark.integration
__all__ = ["influx_http", "keys", "redis", "settings"]  # fixtures of test_gateway
PATHS = ("/api/v1/devices", "/api/v1/devices/p1", "/api/v1/fleet", "/api/v1/alerts")


@pytest.fixture
async def nc(settings: Settings) -> AsyncIterator[NATS]:
    """A connection, and the namespace's EVENTS stream (empty), deleted afterwards."""
    client = await connect_nats(settings.nats_url, "test-gateway")
    streams = Streams(settings.namespace)
    await client.jsm().add_stream(streams.configs()[0])
    yield client
    with contextlib.suppress(Exception):
        await client.jsm().delete_stream(streams.events)
    await client.close()


async def publish(nc: NATS, settings: Settings, position: int) -> None:
    """A domain event as the relay publishes it: its store position in `Iot-Position`."""
    streams = Streams(settings.namespace)
    await nc.jetstream().publish(
        streams.event_subject("p1"), b"{}", headers={POSITION_HEADER: str(position)}
    )


@pytest.fixture
def gateway(settings: Settings, redis: Redis, influx_http: httpx.AsyncClient, nc: NATS) -> Gateway:
    head = LogHead(Streams(settings.namespace), nc)
    return dataclasses.replace(
        make_gateway(settings, redis, influx_http), log_head=head, after_wait_s=0.3
    )


async def test_the_head_is_the_last_messages_position_and_0_for_an_empty_stream(
    settings: Settings, nc: NATS
) -> None:
    head = LogHead(Streams(settings.namespace), nc)
    assert await head.head() == 0
    await publish(nc, settings, 3)
    await publish(nc, settings, 9)
    assert await head.head() == 9
    assert await LogHead(Streams("tnostream00"), nc).head() is None  # no stream: unknown
    assert await LogHead(Streams(settings.namespace)).head() is None  # no connection: unknown


async def test_a_token_the_views_have_reached_answers_at_once(
    gateway: Gateway, nc: NATS, settings: Settings, redis: Redis, keys: ViewKeys
) -> None:
    await put_device(redis, keys, "p1")
    await redis.set(keys.position, "5")  # the log's head is 0: never read for these
    async with client_for(gateway) as client:
        for path in PATHS:
            started = time.monotonic()
            response = await client.get(path, params={"after": "5"}, headers=VIEWER)
            assert response.status_code == 200, response.text
            assert response.headers["iot-position"] == "5"
            assert time.monotonic() - started < 0.2


async def test_a_token_the_log_has_reached_waits_for_the_views_then_503_with_retry_after(
    gateway: Gateway, nc: NATS, settings: Settings, redis: Redis, keys: ViewKeys
) -> None:
    await put_device(redis, keys, "p1")
    await redis.set(keys.position, "7")
    await publish(nc, settings, 8)
    async with client_for(gateway) as client:
        for path in PATHS:
            response = await client.get(path, headers={**VIEWER, "Iot-After": "8"})
            body = assert_problem(response, 503)
            assert response.headers["retry-after"] == "1"
            assert response.headers["iot-position"] == "7"
            assert (body["position"], body["after"]) == (7, 8)
        read = asyncio.create_task(client.get("/api/v1/devices/p1?after=8", headers=VIEWER))
        await asyncio.sleep(0.05)
        assert not read.done()  # waiting for the views
        await redis.set(keys.position, "8")
        response = await read
    assert response.status_code == 200, response.text
    assert response.headers["iot-position"] == "8"


async def test_a_token_beyond_the_logs_head_is_a_400_that_says_so(
    gateway: Gateway, nc: NATS, settings: Settings, redis: Redis, keys: ViewKeys
) -> None:
    await put_device(redis, keys, "p1")
    await redis.set(keys.position, "4")
    await publish(nc, settings, 4)
    async with client_for(gateway) as client:
        for path in PATHS:
            for params, headers in (
                ({"after": "157959"}, VIEWER),
                ({}, {**VIEWER, "Iot-After": "5"}),
            ):
                started = time.monotonic()
                response = await client.get(path, params=params, headers=headers)
                elapsed = time.monotonic() - started
                body = assert_problem(response, 400)
                after = int(params.get("after") or headers["Iot-After"])
                assert body["detail"] == (
                    f"position {after} is beyond the log's head 4: it was never issued"
                )
                assert (body["after"], body["head"]) == (after, 4)
                assert "retry-after" not in response.headers
                assert gateway.beyond_head_grace_s <= elapsed < gateway.beyond_head_grace_s + 0.3


async def test_a_token_just_ahead_of_the_relays_publish_waits_for_it_and_answers(
    gateway: Gateway, nc: NATS, settings: Settings, redis: Redis, keys: ViewKeys
) -> None:
    """The command API answered position 6; the relay publishes it a moment later, the views
    apply it a moment after: within the grace, the read answers as if the log had had it."""
    await put_device(redis, keys, "p1")
    await redis.set(keys.position, "5")
    await publish(nc, settings, 5)
    gw = dataclasses.replace(gateway, after_wait_s=5.0)
    async with client_for(gw) as client:
        read = asyncio.create_task(client.get("/api/v1/devices/p1?after=6", headers=VIEWER))
        await asyncio.sleep(0.1)
        await publish(nc, settings, 6)
        await asyncio.sleep(0.1)
        await redis.set(keys.position, "6")
        response = await read
    assert response.status_code == 200, response.text
    assert response.headers["iot-position"] == "6"


async def test_without_nats_a_token_ahead_of_the_views_waits_as_before(
    gateway: Gateway, settings: Settings, redis: Redis, keys: ViewKeys
) -> None:
    await put_device(redis, keys, "p1")
    await redis.set(keys.position, "2")
    unreachable = await connect_nats(settings.nats_url, "test-gateway-closed")
    await unreachable.close()
    gw = dataclasses.replace(gateway, log_head=LogHead(Streams(settings.namespace), unreachable))
    async with client_for(gw) as client:
        response = await client.get("/api/v1/devices/p1?after=157959", headers=VIEWER)
    body = assert_problem(response, 503)
    assert (body["position"], body["after"]) == (2, 157959)
    assert response.headers["retry-after"] == "1"


async def test_readiness_does_not_depend_on_nats(gateway: Gateway, settings: Settings) -> None:
    gw = dataclasses.replace(gateway, log_head=LogHead(Streams(settings.namespace)))
    async with client_for(gw) as client:
        response = await client.get("/readyz")
    assert response.status_code == 200
    assert response.json()["checks"] == {"redis": True, "influxdb": True, "views": True}


# --- GET /deadletters (admin), over the same NATS connection ------------------------------------


@pytest.fixture
async def dead_letters(settings: Settings, nc: NATS) -> AsyncIterator[None]:
    """The namespace's DEADLETTER stream with three letters as the bridge writes them."""
    streams = Streams(settings.namespace)
    await nc.jsm().add_stream(streams.configs()[2])
    js = nc.jetstream()
    for device, reason, received in (
        ("d1", "unknown_device", 1_767_225_600_000),
        ("d2", "unknown_device", 1_767_225_601_000),
        ("d1", "invalid_payload", 1_767_225_602_000),
    ):
        await js.publish(
            streams.deadletter_subject(reason),
            b'{"temperature": 21.5}',
            headers={
                "Iot-Reason": reason,
                "Iot-Topic": f"devices/{device}/telemetry",
                "Iot-Detail": "test",
                "Iot-Received-At": str(received),
            },
        )
    yield
    with contextlib.suppress(Exception):
        await nc.jsm().delete_stream(streams.deadletter)


async def test_dead_letters_are_listed_filtered_and_paged_for_an_admin(
    gateway: Gateway, dead_letters: None
) -> None:
    url = "/api/v1/deadletters"
    async with client_for(gateway) as client:
        response = await client.get(url, headers=ADMIN)
        assert response.status_code == 200, response.text
        body = response.json()
        assert [(d["device_id"], d["reason"]) for d in body["items"]] == [
            ("d1", "unknown_device"),
            ("d2", "unknown_device"),
            ("d1", "invalid_payload"),
        ]
        first = body["items"][0]
        assert first["topic"] == "devices/d1/telemetry"
        assert first["preview"] == '{"temperature": 21.5}'
        assert first["received_at_ms"] == 1_767_225_600_000
        by_device = (await client.get(url, params={"device_id": "d1"}, headers=ADMIN)).json()
        assert [d["reason"] for d in by_device["items"]] == ["unknown_device", "invalid_payload"]
        by_reason = (
            await client.get(url, params={"reason": "invalid_payload"}, headers=ADMIN)
        ).json()
        assert [d["device_id"] for d in by_reason["items"]] == ["d1"]
        since = (
            await client.get(url, params={"since": "2026-01-01T00:00:01Z"}, headers=ADMIN)
        ).json()
        assert [d["device_id"] for d in since["items"]] == ["d2", "d1"]
        seen, cursor = [], None
        while True:
            params = {"limit": "1", **({"cursor": cursor} if cursor else {})}
            page = (await client.get(url, params=params, headers=ADMIN)).json()
            seen += [d["seq"] for d in page["items"]]
            cursor = page["next_cursor"]
            if cursor is None:
                break
        assert seen == [d["seq"] for d in body["items"]]


async def test_dead_letters_need_the_admin_role_and_valid_parameters(
    gateway: Gateway, dead_letters: None
) -> None:
    async with client_for(gateway) as client:
        for headers in (VIEWER, OPERATOR):
            response = await client.get("/api/v1/deadletters", headers=headers)
            assert "admin" in assert_problem(response, 403)["detail"]
        assert_problem(await client.get("/api/v1/deadletters"), 401)
        for name, value in (
            ("device_id", "a/b"),
            ("reason", "no such.reason"),
            ("since", "yesterday"),
            ("cursor", "-1"),
            ("limit", "0"),
            ("limit", "1001"),
        ):
            response = await client.get("/api/v1/deadletters", params={name: value}, headers=ADMIN)
            assert assert_problem(response, 422)["errors"][0]["field"] == name


async def test_dead_letters_without_nats_are_503_with_retry_after(
    gateway: Gateway, settings: Settings
) -> None:
    gw = dataclasses.replace(gateway, log_head=LogHead(Streams(settings.namespace)))
    async with client_for(gw) as client:
        response = await client.get("/api/v1/deadletters", headers=ADMIN)
    assert_problem(response, 503)
    assert response.headers["retry-after"] == "1"
