"""The read-only gateway on real Redis and InfluxDB: views written in the documented layout."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import re
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest
from redis import Redis as SyncRedis
from redis.asyncio import Redis

import gateway.views
from gateway.api import Gateway, create_app
from gateway.main import build_gateway, readiness
from gateway.ratelimit import RateLimiter, rate_limit_prefix
from infra.httpkit import serve
from infra.settings import Settings
from infra.views import ViewKeys
from tests.conftest import settings_for, unique_namespace
from tests.e2e.processes import free_port

pytestmark = pytest.mark.integration

VIEWER, OPERATOR, ADMIN = (
    {"Authorization": f"Bearer {t}"}
    for t in ("viewer-token-0123456789", "operator-token-012345678", "admin-token-0123456789ab")
)
T0 = 1_767_225_600_000  # 2026-01-01T00:00:00Z, a whole minute
SECOND = 1_000
MINUTE = 60 * SECOND
HOUR = 60 * MINUTE
NOW_MS = T0 + 2 * HOUR + 30 * SECOND  # half-way through a minute
NOW_S = NOW_MS / 1000


def clock() -> float:
    return NOW_S


# --- fixtures -------------------------------------------------------------------------------------


@pytest.fixture
def settings() -> Iterator[Settings]:
    """A fresh namespace with its own InfluxDB database; its keys and database dropped after."""
    namespace = unique_namespace()
    settings = dataclasses.replace(settings_for(namespace), influx_db=namespace)
    httpx.post(f"{settings.influx_url}/query", data={"q": f'CREATE DATABASE "{namespace}"'})
    yield settings
    httpx.post(f"{settings.influx_url}/query", data={"q": f'DROP DATABASE "{namespace}"'})
    sync = SyncRedis.from_url(settings.redis_url)
    try:
        for key in sync.scan_iter(match=f"{namespace}:*", count=1000):
            sync.delete(key)
    finally:
        sync.close()


@pytest.fixture
async def redis(settings: Settings) -> AsyncIterator[Redis]:
    client = Redis.from_url(settings.redis_url, decode_responses=True)
    yield client
    await client.aclose()


@pytest.fixture
async def influx_http() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(timeout=30) as client:
        yield client


@pytest.fixture
def keys(settings: Settings) -> ViewKeys:
    return ViewKeys.for_namespace(settings.namespace)


def make_gateway(
    settings: Settings, redis: Redis, http: httpx.AsyncClient, limit: int = 10_000
) -> Gateway:
    built = build_gateway(settings, redis, http)
    limiter = RateLimiter(redis, rate_limit_prefix(settings.namespace), limit, clock=clock)
    return dataclasses.replace(built, limiter=limiter, clock=clock)


@contextlib.asynccontextmanager
async def client_for(gw: Gateway) -> AsyncIterator[httpx.AsyncClient]:
    async def ready() -> dict[str, bool]:
        return dict(await readiness(gw))

    transport = httpx.ASGITransport(app=create_app(gw, ready))
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        yield client


@pytest.fixture
async def client(
    settings: Settings, redis: Redis, influx_http: httpx.AsyncClient
) -> AsyncIterator[httpx.AsyncClient]:
    async with client_for(make_gateway(settings, redis, influx_http)) as c:
        yield c


# --- writing fixture data in the documented layouts -----------------------------------------------


async def put_device(
    redis: Redis,
    keys: ViewKeys,
    device_id: str,
    *,
    name: str = "Sensor",
    type_: str = "thermometer",
    labels: dict[str, str] | None = None,
    status: str = "active",
    online: bool = False,
    last_seen: int | None = None,
    metrics: dict[str, tuple[int, Any]] | None = None,
    config: dict[str, Any] | None = None,
    config_version: int = 0,
    reported: dict[str, Any] | None = None,
    reported_config_version: int | None = None,
    commands: dict[str, list[dict[str, Any]]] | None = None,
    version: int = 1,
) -> None:
    """A device's view exactly as `infra.views` documents it: the hash and every index."""
    labels = labels or {}
    doc = {
        "device_id": device_id,
        "name": name,
        "type": type_,
        "labels": labels,
        "status": status,
        "registered_at": "2026-01-01T00:00:00Z",
        "updated_at": "2026-01-01T00:05:00Z",
        "desired": {"version": config_version, "config": config or {}},
    }
    fields: dict[str, str] = {
        "version": str(version),
        "doc": json.dumps(doc),
        "online": "1" if online else "0",
    }
    if last_seen is not None:
        fields["last_seen"] = str(last_seen)
    for metric, (ts, value) in (metrics or {}).items():
        fields[f"m:{metric}"] = json.dumps({"ts": ts, "value": value})
    if reported is not None:
        fields["reported"] = json.dumps(reported)
        fields["reported_at"] = str(T0)
    if reported_config_version is not None:
        fields["reported_config_version"] = str(reported_config_version)
    if commands is not None:
        fields["commands"] = json.dumps(commands)
    async with redis.pipeline(transaction=True) as pipe:
        pipe.hset(keys.device(device_id), mapping=dict[Any, Any](fields))
        pipe.zadd(keys.devices, {device_id: 0})
        pipe.sadd(keys.status(status), device_id)
        for k, v in labels.items():
            pipe.sadd(keys.label(k, v), device_id)
        if online:
            pipe.sadd(keys.online, device_id)
        await pipe.execute()


async def write_points(http: httpx.AsyncClient, settings: Settings, lines: list[str]) -> None:
    response = await http.post(
        f"{settings.influx_url}/write",
        params={"db": settings.influx_db, "precision": "ms"},
        content="\n".join(lines).encode(),
    )
    assert response.status_code == 204, response.text


def assert_problem(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"
    body: dict[str, Any] = response.json()
    assert body["status"] == status
    return body


# --- device list ----------------------------------------------------------------------------------


async def test_device_list_pages_through_every_device_in_id_order(
    client: httpx.AsyncClient, redis: Redis, keys: ViewKeys
) -> None:
    ids = [f"dev-{i}" for i in (5, 1, 7, 3, 2, 6, 4)]
    for device_id in ids:
        await put_device(redis, keys, device_id)
    seen: list[str] = []
    sizes: list[int] = []
    cursor: str | None = None
    while True:
        params = {"limit": "3", **({"cursor": cursor} if cursor else {})}
        response = await client.get("/api/v1/devices", params=params, headers=VIEWER)
        assert response.status_code == 200, response.text
        page = response.json()
        sizes.append(len(page["items"]))
        seen += [item["device_id"] for item in page["items"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == sorted(ids)
    assert sizes == [3, 3, 1]


async def test_device_list_entries_carry_the_contract_fields(
    client: httpx.AsyncClient, redis: Redis, keys: ViewKeys
) -> None:
    await put_device(
        redis,
        keys,
        "boiler-1",
        name="Boiler",
        type_="thermostat",
        labels={"site": "north"},
        online=True,
        last_seen=T0 + 1500,
    )
    response = await client.get("/api/v1/devices", headers=VIEWER)
    assert response.json() == {
        "items": [
            {
                "device_id": "boiler-1",
                "name": "Boiler",
                "type": "thermostat",
                "labels": {"site": "north"},
                "status": "active",
                "online": True,
                "last_seen": "2026-01-01T00:00:01.500Z",
            }
        ],
        "next_cursor": None,
    }


@pytest.mark.parametrize("strategy", ["intersect", "scan"])
async def test_device_list_filters_combine_as_an_intersection_across_pages(
    client: httpx.AsyncClient,
    redis: Redis,
    keys: ViewKeys,
    monkeypatch: pytest.MonkeyPatch,
    strategy: str,
) -> None:
    if strategy == "scan":
        monkeypatch.setattr(gateway.views, "INTERSECT_MAX", 0)
        monkeypatch.setattr(gateway.views, "SCAN_CHUNK", 2)
    for i in range(12):
        await put_device(
            redis,
            keys,
            f"dev-{i:02d}",
            status="suspended" if i % 3 == 0 else "active",
            labels={"site": "north" if i % 2 == 0 else "south", "floor": str(i % 4)},
        )
    expected = [f"dev-{i:02d}" for i in range(12) if i % 3 != 0 and i % 2 == 0 and i % 4 == 2]
    assert expected == ["dev-02", "dev-10"]

    async def all_pages(params: list[tuple[str, str]]) -> list[str]:
        found: list[str] = []
        cursor: str | None = None
        while True:
            query = httpx.QueryParams([*params, ("limit", "1")])
            if cursor:
                query = query.add("cursor", cursor)
            response = await client.get("/api/v1/devices", params=query, headers=VIEWER)
            assert response.status_code == 200, response.text
            found += [d["device_id"] for d in response.json()["items"]]
            cursor = response.json()["next_cursor"]
            if cursor is None:
                return found

    both = [("status", "active"), ("label", "site:north"), ("label", "floor:2")]
    assert await all_pages(both) == expected
    north = [f"dev-{i:02d}" for i in range(0, 12, 2)]
    assert await all_pages([("label", "site:north")]) == north
    assert await all_pages([("status", "decommissioned")]) == []
    assert await all_pages([("label", "site:nowhere"), ("status", "active")]) == []
    # a search by id prefix narrows each strategy's walk the same way
    assert await all_pages([("label", "site:north"), ("prefix", "dev-1")]) == ["dev-10"]
    assert await all_pages([*both, ("prefix", "dev-0")]) == ["dev-02"]
    assert await all_pages([("status", "active"), ("prefix", "nope")]) == []


async def test_device_list_searches_by_id_prefix_across_pages(
    client: httpx.AsyncClient, redis: Redis, keys: ViewKeys
) -> None:
    ids = ["boiler-1", "boiler-10", "boiler-2", "boilerx", "pump-1", "boil", "a-boiler"]
    for device_id in ids:
        await put_device(redis, keys, device_id)

    async def search(prefix: str, limit: int) -> tuple[list[str], int]:
        found: list[str] = []
        pages = 0
        cursor: str | None = None
        while True:
            params = {
                "prefix": prefix,
                "limit": str(limit),
                **({"cursor": cursor} if cursor else {}),
            }
            response = await client.get("/api/v1/devices", params=params, headers=VIEWER)
            assert response.status_code == 200, response.text
            pages += 1
            found += [d["device_id"] for d in response.json()["items"]]
            cursor = response.json()["next_cursor"]
            if cursor is None:
                return found, pages

    assert await search("boiler-", 2) == (["boiler-1", "boiler-10", "boiler-2"], 2)
    assert await search("boiler", 10) == (["boiler-1", "boiler-10", "boiler-2", "boilerx"], 1)
    assert await search("pump-1", 1) == (["pump-1"], 1)
    assert await search("zzz", 5) == ([], 1)
    assert await search("", 50) == (sorted(ids), 1)


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"limit": "501"}, "limit"),
        ({"limit": "0"}, "limit"),
        ({"cursor": "not a cursor!"}, "cursor"),
        ({"status": "sleeping"}, "status"),
        ({"label": "no-colon"}, "label"),
        ({"prefix": "x" * 129}, "prefix"),
    ],
)
async def test_bad_list_parameters_are_422_naming_the_field(
    client: httpx.AsyncClient, params: dict[str, str], field: str
) -> None:
    response = await client.get("/api/v1/devices", params=params, headers=VIEWER)
    body = assert_problem(response, 422)
    assert body["errors"][0]["field"] == field


# --- device view ----------------------------------------------------------------------------------


async def test_device_view_shows_desired_reported_delta_and_latest_metrics(
    client: httpx.AsyncClient, redis: Redis, keys: ViewKeys
) -> None:
    await put_device(
        redis,
        keys,
        "boiler-1",
        name="Boiler",
        labels={"site": "north"},
        online=True,
        last_seen=T0 + 2000,
        metrics={"temperature": (T0 + 1000, 21.5), "mode": (T0 + 2000, "eco")},
        config={"setpoint": 22, "fan": "auto"},
        config_version=2,
        reported={"setpoint": 20, "fan": "auto"},
        reported_config_version=1,
        version=4,
    )
    response = await client.get("/api/v1/devices/boiler-1", headers=VIEWER)
    assert response.status_code == 200, response.text
    view = response.json()
    assert view == {
        "device_id": "boiler-1",
        "name": "Boiler",
        "type": "thermometer",
        "labels": {"site": "north"},
        "status": "active",
        "registered_at": "2026-01-01T00:00:00Z",
        "updated_at": "2026-01-01T00:05:00Z",
        "version": 4,
        "desired": {"version": 2, "config": {"setpoint": 22, "fan": "auto"}},
        "reported": {"setpoint": 20, "fan": "auto"},
        "reported_at": "2026-01-01T00:00:00.000Z",
        "reported_config_version": 1,
        "delta": {"setpoint": 22},
        "in_sync": False,
        "online": True,
        "last_seen": "2026-01-01T00:00:02.000Z",
        "metrics": {
            "mode": {"value": "eco", "ts": "2026-01-01T00:00:02.000Z"},
            "temperature": {"value": 21.5, "ts": "2026-01-01T00:00:01.000Z"},
        },
        "pending_commands": [],
        "recent_commands": [],
        "alerts": [],
    }


async def test_device_view_shows_pending_commands_recent_outcomes_and_sync(
    client: httpx.AsyncClient, redis: Redis, keys: ViewKeys
) -> None:
    pending = {
        "command_id": "c2",
        "name": "reboot",
        "args": {"delay_s": 1},
        "state": "sent",
        "requested_at": "2026-01-01T00:00:02Z",
        "sent_at": "2026-01-01T00:00:03Z",
        "expires_at": "2026-01-01T01:00:02Z",
    }
    recent = {
        "command_id": "c1",
        "name": "ping",
        "state": "acknowledged",
        "requested_at": "2026-01-01T00:00:01Z",
        "finished_at": "2026-01-01T00:00:01.5Z",
        "result": {"pong": True},
    }
    await put_device(
        redis,
        keys,
        "dev-c",
        config={"rate": 5},
        config_version=3,
        reported={"rate": 5, "fw": "1.2"},
        reported_config_version=3,
        commands={"pending": [pending], "recent": [recent]},
    )
    await redis.set(keys.commands_pending, 1)
    view = (await client.get("/api/v1/devices/dev-c", headers=VIEWER)).json()
    assert view["pending_commands"] == [pending]
    assert view["recent_commands"] == [recent]
    assert (view["delta"], view["reported_config_version"], view["in_sync"]) == ({}, 3, True)
    fleet = (await client.get("/api/v1/fleet", headers=VIEWER)).json()
    assert fleet["commands_pending"] == 1


async def test_device_never_reported_has_null_reported_and_full_delta(
    client: httpx.AsyncClient, redis: Redis, keys: ViewKeys
) -> None:
    await put_device(redis, keys, "fresh", status="provisioned", config={"a": 1})
    view = (await client.get("/api/v1/devices/fresh", headers=VIEWER)).json()
    assert view["reported"] is None
    assert view["delta"] == {"a": 1}
    assert view["online"] is False
    assert view["last_seen"] is None
    assert view["metrics"] == {}


@pytest.mark.parametrize("device_id", ["ghost", "bad.id"])
async def test_unknown_device_is_a_404_problem(client: httpx.AsyncClient, device_id: str) -> None:
    assert_problem(await client.get(f"/api/v1/devices/{device_id}", headers=VIEWER), 404)
    response = await client.get(f"/api/v1/devices/{device_id}/telemetry", headers=VIEWER)
    assert_problem(response, 404)


# --- ETag, auth, rate limit -----------------------------------------------------------------------


async def test_unchanged_view_answers_304_to_its_etag_and_changed_view_a_new_body(
    client: httpx.AsyncClient, redis: Redis, keys: ViewKeys
) -> None:
    await put_device(redis, keys, "dev-1", online=False)
    first = await client.get("/api/v1/devices/dev-1", headers=VIEWER)
    etag = first.headers["etag"]
    again = await client.get("/api/v1/devices/dev-1", headers={**VIEWER, "If-None-Match": etag})
    assert again.status_code == 304
    assert again.content == b""
    assert again.headers["etag"] == etag
    await put_device(redis, keys, "dev-1", online=True)
    changed = await client.get("/api/v1/devices/dev-1", headers={**VIEWER, "If-None-Match": etag})
    assert changed.status_code == 200
    assert changed.headers["etag"] != etag
    assert changed.json()["online"] is True
    for path in ("/api/v1/devices", "/api/v1/fleet"):
        listed = await client.get(path, headers=VIEWER)
        cached = await client.get(path, headers={**VIEWER, "If-None-Match": listed.headers["etag"]})
        assert cached.status_code == 304


@pytest.mark.parametrize(
    "headers",
    [{}, {"Authorization": "Bearer wrong-token-000000000"}, {"Authorization": "Basic abc"}],
)
async def test_requests_without_a_valid_token_are_401(
    client: httpx.AsyncClient, headers: dict[str, str]
) -> None:
    for path in ("/api/v1/devices", "/api/v1/devices/x", "/api/v1/fleet", "/api/v1/stream"):
        response = await client.get(path, headers=headers)
        assert_problem(response, 401)
        assert response.headers["www-authenticate"].startswith("Bearer")


async def test_every_role_may_read(client: httpx.AsyncClient) -> None:
    for headers in (VIEWER, OPERATOR, ADMIN):
        assert (await client.get("/api/v1/fleet", headers=headers)).status_code == 200


async def test_requests_beyond_the_limit_get_429_with_retry_after_per_token(
    settings: Settings, redis: Redis, influx_http: httpx.AsyncClient
) -> None:
    async with client_for(make_gateway(settings, redis, influx_http, limit=3)) as client:
        for _ in range(3):
            ok = await client.get("/api/v1/fleet", headers=VIEWER)
            assert ok.status_code == 200
        assert ok.headers["ratelimit-remaining"] == "0"
        refused = await client.get("/api/v1/devices", headers=VIEWER)
        body = assert_problem(refused, 429)
        assert refused.headers["retry-after"] == "30"  # the clock is half-way through a minute
        assert "3" in body["detail"]
        other = await client.get("/api/v1/fleet", headers=OPERATOR)
        assert other.status_code == 200
        exposition = (await client.get("/metrics")).text
        assert "iot_gateway_rate_limited_total" in exposition


# --- telemetry ------------------------------------------------------------------------------------


@pytest.fixture
async def sensor(
    settings: Settings, redis: Redis, keys: ViewKeys, influx_http: httpx.AsyncClient
) -> str:
    """Device `s-1` with two minutes of per-second `temp` = i, plus `mode` and `ok` fields."""
    await put_device(redis, keys, "s-1", metrics={"temp": (T0, 0.0)})
    await put_device(redis, keys, "s-2")
    lines = [f"telemetry,device_id=s-1 temp={float(i)} {T0 + i * SECOND}" for i in range(120)]
    lines += [
        f'telemetry,device_id=s-1 mode="eco",ok=true {T0 + 500}',
        f'telemetry,device_id=s-1 mode="boost",ok=false {T0 + 70_500}',
        f"telemetry,device_id=s-2 temp=999.0 {T0 + 5 * SECOND}",
    ]
    await write_points(influx_http, settings, lines)
    return "s-1"


async def get_telemetry(client: httpx.AsyncClient, **params: Any) -> httpx.Response:
    return await client.get("/api/v1/devices/s-1/telemetry", params=params, headers=VIEWER)


async def test_raw_telemetry_returns_the_points_written_in_the_half_open_range(
    client: httpx.AsyncClient, sensor: str
) -> None:
    response = await get_telemetry(
        client, metric="temp", **{"from": "2026-01-01T00:00:00Z", "to": str(T0 + 5 * SECOND)}
    )
    assert response.status_code == 200, response.text
    assert response.json() == {
        "device_id": "s-1",
        "from": "2026-01-01T00:00:00.000Z",
        "to": "2026-01-01T00:00:05.000Z",
        "every": None,
        "agg": None,
        "series": {"temp": [[T0 + i * SECOND, float(i)] for i in range(5)]},
    }


async def test_raw_telemetry_without_metric_returns_every_field_of_that_device_only(
    client: httpx.AsyncClient, sensor: str
) -> None:
    response = await get_telemetry(client, **{"from": str(T0), "to": str(T0 + 2 * SECOND)})
    assert response.json()["series"] == {
        "temp": [[T0, 0.0], [T0 + SECOND, 1.0]],
        "mode": [[T0 + 500, "eco"]],
        "ok": [[T0 + 500, True]],
    }


@pytest.mark.parametrize(
    ("agg", "expected"),
    [("mean", [29.5, 89.5]), ("min", [0.0, 60.0]), ("max", [59.0, 119.0]), ("count", [60, 60])],
)
async def test_downsampled_telemetry_aggregates_each_interval(
    client: httpx.AsyncClient, sensor: str, agg: str, expected: list[float]
) -> None:
    response = await get_telemetry(
        client, metric="temp", every="1m", agg=agg, **{"from": str(T0), "to": str(T0 + HOUR)}
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert (body["every"], body["agg"]) == ("1m", agg)
    assert body["series"] == {"temp": [[T0, expected[0]], [T0 + MINUTE, expected[1]]]}


async def test_downsampled_last_of_every_field_includes_strings_and_booleans(
    client: httpx.AsyncClient, sensor: str
) -> None:
    response = await get_telemetry(
        client, every="1m", agg="last", **{"from": str(T0), "to": str(T0 + 2 * MINUTE)}
    )
    assert response.json()["series"] == {
        "temp": [[T0, 59.0], [T0 + MINUTE, 119.0]],
        "mode": [[T0, "eco"], [T0 + MINUTE, "boost"]],
        "ok": [[T0, True], [T0 + MINUTE, False]],
    }


async def test_telemetry_defaults_to_the_last_hour(
    client: httpx.AsyncClient, settings: Settings, sensor: str, influx_http: httpx.AsyncClient
) -> None:
    inside, before = NOW_MS - 10 * MINUTE, NOW_MS - HOUR - SECOND
    await write_points(
        influx_http,
        settings,
        [
            f"telemetry,device_id=s-1 late=1.0 {inside}",
            f"telemetry,device_id=s-1 late=2.0 {before}",
        ],
    )
    response = await get_telemetry(client, metric="late")
    body = response.json()
    assert body["series"] == {"late": [[inside, 1.0]]}
    assert body["to"] == "2026-01-01T02:00:30.000Z"
    assert body["from"] == "2026-01-01T01:00:30.000Z"


async def test_a_downsampled_query_over_10000_points_is_refused_with_the_fitting_every(
    client: httpx.AsyncClient, sensor: str
) -> None:
    day = {"from": "2026-01-01T00:00:00Z", "to": "2026-01-02T00:00:00Z"}
    response = await get_telemetry(client, metric="temp", every="1s", agg="mean", **day)
    body = assert_problem(response, 400)
    assert body["suggested_every"] == "10s"
    assert "every=10s" in body["hint"]
    assert body["max_points"] == 10_000
    assert body["estimated_points"] == 86_400
    fits = await get_telemetry(client, metric="temp", every="10s", agg="mean", **day)
    assert fits.status_code == 200, fits.text
    assert len(fits.json()["series"]["temp"]) == 12


async def test_a_raw_query_over_10000_points_is_refused_with_a_hint(
    client: httpx.AsyncClient, settings: Settings, redis: Redis, keys: ViewKeys,
    influx_http: httpx.AsyncClient,
) -> None:  # fmt: skip
    await put_device(redis, keys, "busy")
    lines = [f"telemetry,device_id=busy v={i}.0 {T0 + i * 100}" for i in range(10_001)]
    await write_points(influx_http, settings, lines)
    window = {"from": str(T0), "to": str(T0 + HOUR)}
    url = "/api/v1/devices/busy/telemetry"
    refused = await client.get(url, params={"metric": "v", **window}, headers=VIEWER)
    body = assert_problem(refused, 400)
    assert body["suggested_every"] == "1s"
    assert "every=1s" in body["hint"]
    exactly = {"from": str(T0), "to": str(T0 + 10_000 * 100)}  # 10,000 points: allowed
    allowed = await client.get(url, params={"metric": "v", **exactly}, headers=VIEWER)
    assert allowed.status_code == 200, allowed.text
    assert len(allowed.json()["series"]["v"]) == 10_000


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"metric": 'temp" FROM x --'}, "metric"),
        ({"agg": "mean"}, "agg"),
        ({"every": "1m", "agg": "sum"}, "agg"),
        ({"every": "fast"}, "every"),
        ({"from": "yesterday"}, "from"),
        ({"from": str(T0 + 10), "to": str(T0)}, "from"),
        ({"metric": "mode", "every": "1m", "agg": "mean", "from": str(T0)}, "agg"),
    ],
)
async def test_bad_telemetry_parameters_are_422_naming_the_field(
    client: httpx.AsyncClient, sensor: str, params: dict[str, str], field: str
) -> None:
    body = assert_problem(await get_telemetry(client, **params), 422)
    assert body["errors"][0]["field"] == field


# --- fleet, openapi, readiness, stream ------------------------------------------------------------


async def test_fleet_counts_statuses_online_devices_and_recent_readings(
    client: httpx.AsyncClient, redis: Redis, keys: ViewKeys
) -> None:
    for i, status in enumerate(["active", "active", "active", "suspended", "provisioned"]):
        await put_device(redis, keys, f"d{i}", status=status, online=i < 2)
    minute = int(NOW_S // 60)
    await redis.pfadd(keys.readings(minute), *[f"7:{i}" for i in range(10)])
    await redis.pfadd(keys.readings(minute - 1), *[f"6:{i}" for i in range(40)])
    await redis.pfadd(keys.readings(minute - 2), *[f"5:{i}" for i in range(99)])
    await redis.set(keys.alerts_open("critical"), 2)
    await redis.set(keys.alerts_open("info"), -1)  # a counter is never shown below 0
    response = await client.get("/api/v1/fleet", headers=VIEWER)
    assert response.json() == {
        "devices": 5,
        "by_status": {"provisioned": 1, "active": 3, "suspended": 1, "decommissioned": 0},
        "online": 2,
        "readings_last_minute": 10 + 20,  # half of the previous minute is within the last 60 s
        "commands_pending": 0,
        "alerts_open": {"critical": 2, "warning": 0, "info": 0},
    }


def refs(node: Any) -> list[str]:
    """Every `$ref` in a JSON document."""
    if isinstance(node, dict):
        found = [node["$ref"]] if isinstance(node.get("$ref"), str) else []
        return found + [r for value in node.values() for r in refs(value)]
    if isinstance(node, list):
        return [r for value in node for r in refs(value)]
    return []


async def test_openapi_document_parses_and_describes_every_endpoint(
    client: httpx.AsyncClient,
) -> None:
    response = await client.get("/openapi.json")
    assert response.status_code == 200
    document = response.json()
    assert document["openapi"].startswith("3.")
    assert set(document["paths"]) == {
        "/devices",
        "/devices/{device_id}",
        "/devices/{device_id}/telemetry",
        "/devices/{device_id}/history",
        "/fleet",
        "/stream",
        "/alerts",
        "/alerts/{alert_id}",
        "/rules",
        "/rules/{rule_id}",
        "/reports/fleet",
        "/fleet/aggregates",
        "/deadletters",
        "/me",
    }
    assert document["servers"] == [{"url": "/api/v1"}]
    for ref in refs(document):
        node: Any = document
        for part in ref.removeprefix("#/").split("/"):
            node = node[part]  # every reference resolves
    device = document["components"]["schemas"]["Device"]["properties"]
    for name in ("pending_commands", "recent_commands", "reported_config_version", "in_sync"):
        assert name in device
    assert (await client.get("/api/v1/openapi.json")).json() == document
    cached = await client.get("/openapi.json", headers={"If-None-Match": response.headers["etag"]})
    assert cached.status_code == 304


async def test_ready_when_redis_and_influxdb_answer(client: httpx.AsyncClient) -> None:
    response = await client.get("/readyz")
    checks = {"redis": True, "influxdb": True, "views": True}
    assert response.json() == {"ready": True, "checks": checks}


async def test_not_ready_when_influxdb_is_unreachable(
    settings: Settings, redis: Redis, influx_http: httpx.AsyncClient
) -> None:
    dead = dataclasses.replace(settings, influx_url=f"http://127.0.0.1:{free_port()}")
    async with client_for(make_gateway(dead, redis, influx_http)) as client:
        response = await client.get("/readyz")
        assert response.status_code == 503
        assert response.json()["checks"] == {"redis": True, "influxdb": False, "views": True}


async def test_dashboard_page_and_its_files_are_served_with_a_strict_policy(
    client: httpx.AsyncClient,
) -> None:
    page = await client.get("/")
    assert page.status_code == 200, page.text
    assert page.headers["content-type"].startswith("text/html")
    policy = page.headers["content-security-policy"]
    assert "script-src 'self'" in policy
    assert "frame-ancestors 'none'" in policy
    # every file the page names is served by the gateway itself: nothing from elsewhere
    assets = re.findall(r'(?:src|href)="([^"#]+)"', page.text)
    assert "/ui/app.js" in assets
    assert "/ui/app.css" in assets
    for asset in assets:
        if asset.startswith("data:"):
            continue
        assert asset.startswith("/ui/"), asset
        response = await client.get(asset)
        assert response.status_code == 200, asset
        assert response.headers["etag"]
    script = (await client.get("/ui/app.js")).text
    for imported in re.findall(r'from "([^"]+)"', script):
        assert (await client.get(imported)).status_code == 200, imported
    assert (await client.get("/ui/nothing-here.js")).status_code == 404
    assert (await client.get("/ui/config.json")).json() == {"commands_url": None}
    icon = await client.get("/favicon.ico")  # asked for by browsers on any page, JSON too
    assert icon.status_code == 200
    assert icon.headers["content-type"].startswith("image/svg+xml")


async def test_me_names_the_tokens_role_for_the_dashboard(client: httpx.AsyncClient) -> None:
    for headers, role in ((VIEWER, "viewer"), (OPERATOR, "operator")):
        response = await client.get("/api/v1/me", headers=headers)
        assert response.status_code == 200, response.text
        assert response.json()["role"] == role
        assert response.json()["name"].startswith("token-")
    assert_problem(await client.get("/api/v1/me"), 401)


async def test_stream_sends_an_event_per_view_change(
    settings: Settings, redis: Redis, keys: ViewKeys, influx_http: httpx.AsyncClient
) -> None:
    gw = make_gateway(settings, redis, influx_http)

    async def ready() -> dict[str, bool]:
        return {}

    stop = asyncio.Event()
    port = free_port()
    server = asyncio.create_task(serve(create_app(gw, ready), "127.0.0.1", port, stop))
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10) as http:
            for _ in range(100):  # wait until the server listens
                with contextlib.suppress(httpx.ConnectError):
                    await http.get("/healthz")
                    break
                await asyncio.sleep(0.05)
            async with http.stream("GET", "/api/v1/stream", headers=VIEWER) as response:
                assert response.status_code == 200
                assert response.headers["content-type"].startswith("text/event-stream")
                lines = (line async for line in response.aiter_lines() if line)
                assert await anext(lines) == ": connected"
                await redis.publish(keys.changes, "dev-9")
                received = [await anext(lines) for _ in range(2)]
        assert received == ["event: change", 'data: {"device_id":"dev-9"}']
        for _ in range(200):  # the client went away: the server drops its subscription
            numsub = await redis.pubsub_numsub(keys.changes)
            if numsub[0][1] == 0:
                break
            await asyncio.sleep(0.05)
        assert numsub[0][1] == 0
    finally:
        stop.set()
        await server


async def test_unreachable_redis_is_503_with_retry_after(
    settings: Settings, influx_http: httpx.AsyncClient
) -> None:
    dead = Redis.from_url(f"redis://127.0.0.1:{free_port()}/0", decode_responses=True)
    try:
        async with client_for(make_gateway(settings, dead, influx_http)) as client:
            response = await client.get("/api/v1/fleet", headers=VIEWER)
            assert_problem(response, 503)
            assert response.headers["retry-after"] == "1"
    finally:
        await dead.aclose()


async def test_unreachable_influxdb_makes_telemetry_503(
    settings: Settings, redis: Redis, keys: ViewKeys, influx_http: httpx.AsyncClient
) -> None:
    await put_device(redis, keys, "s-1")
    dead = dataclasses.replace(settings, influx_url=f"http://127.0.0.1:{free_port()}")
    async with client_for(make_gateway(dead, redis, influx_http)) as client:
        response = await client.get("/api/v1/devices/s-1/telemetry", headers=VIEWER)
        assert_problem(response, 503)


# --- consistency token: ?after= / Iot-After ------------------------------------------------------


async def test_reads_carry_the_views_position(
    client: httpx.AsyncClient, redis: Redis, keys: ViewKeys
) -> None:
    await put_device(redis, keys, "p1")
    for path in ("/api/v1/devices", "/api/v1/devices/p1", "/api/v1/fleet"):
        assert (await client.get(path, headers=VIEWER)).headers["iot-position"] == "0"
    await redis.set(keys.position, "41")
    response = await client.get("/api/v1/devices/p1", headers=VIEWER)
    assert response.headers["iot-position"] == "41"
    cached = await client.get(
        "/api/v1/devices/p1", headers={**VIEWER, "If-None-Match": response.headers["etag"]}
    )
    assert cached.status_code == 304
    assert cached.headers["iot-position"] == "41"


async def test_a_read_after_a_position_already_reached_answers_at_once(
    client: httpx.AsyncClient, redis: Redis, keys: ViewKeys
) -> None:
    await put_device(redis, keys, "p1")
    await redis.set(keys.position, "10")
    for params, headers in (({"after": "10"}, VIEWER), ({}, {**VIEWER, "Iot-After": "3"})):
        for path in ("/api/v1/devices", "/api/v1/devices/p1", "/api/v1/fleet"):
            response = await client.get(path, params=params, headers=headers)
            assert response.status_code == 200, response.text
            assert response.headers["iot-position"] == "10"


async def test_a_read_after_a_later_position_waits_until_the_views_reach_it(
    settings: Settings, redis: Redis, influx_http: httpx.AsyncClient, keys: ViewKeys
) -> None:
    await put_device(redis, keys, "p1", config={"mode": "old"})
    await redis.set(keys.position, "4")
    gw = dataclasses.replace(make_gateway(settings, redis, influx_http), after_wait_s=60.0)
    async with client_for(gw) as client:
        read = asyncio.create_task(client.get("/api/v1/devices/p1?after=5", headers=VIEWER))
        await asyncio.sleep(0.1)
        assert not read.done()  # waiting for position 5
        await put_device(redis, keys, "p1", config={"mode": "new"}, version=2)
        await redis.set(keys.position, "5")
        response = await read
    assert response.status_code == 200
    assert response.headers["iot-position"] == "5"
    assert response.json()["desired"]["config"] == {"mode": "new"}


async def test_a_read_after_a_position_not_reached_in_time_is_503_with_retry_after(
    settings: Settings, redis: Redis, influx_http: httpx.AsyncClient, keys: ViewKeys
) -> None:
    await put_device(redis, keys, "p1")
    await redis.set(keys.position, "7")
    gw = dataclasses.replace(make_gateway(settings, redis, influx_http), after_wait_s=0.1)
    async with client_for(gw) as client:
        for path in ("/api/v1/devices/p1", "/api/v1/devices", "/api/v1/fleet"):
            response = await client.get(path, params={"after": "8"}, headers=VIEWER)
            body = assert_problem(response, 503)
            assert response.headers["retry-after"] == "1"
            assert response.headers["iot-position"] == "7"
            assert body["position"] == 7
            assert body["after"] == 8


@pytest.mark.parametrize("value", ["abc", "-1", "1.5", "", "1e3", "٣", "99999999999999999999"])
async def test_a_malformed_position_is_400(client: httpx.AsyncClient, value: str) -> None:
    as_header = [(k.encode(), v.encode()) for k, v in {**VIEWER, "Iot-After": value}.items()]
    response = await client.get("/api/v1/devices", params={"after": value}, headers=VIEWER)
    assert "position" in assert_problem(response, 400)["detail"]
    response = await client.get("/api/v1/devices", headers=as_header)
    assert "position" in assert_problem(response, 400)["detail"]


async def test_openapi_document_describes_the_consistency_token(
    client: httpx.AsyncClient,
) -> None:
    document = (await client.get("/openapi.json")).json()
    for path in ("/devices", "/devices/{device_id}", "/devices/{device_id}/telemetry", "/fleet"):
        operation = document["paths"][path]["get"]
        names = {(p["name"], p["in"]) for p in operation["parameters"]}
        assert {("after", "query"), ("Iot-After", "header")} <= names
        assert "Iot-Position" in operation["responses"]["200"]["headers"]
        assert operation["responses"]["503"] == {"$ref": "#/components/responses/Unavailable"}
    unavailable = document["components"]["responses"]["Unavailable"]
    assert {"Retry-After", "Iot-Position"} <= set(unavailable["headers"])


# --- alerts and rules, written by the real views projector ---------------------------------------


async def project(settings: Settings, *events: Any) -> None:
    """Apply published events with the views projector's own code, as it does off the stream."""
    from projections.views import ViewsProjector

    raw = Redis.from_url(settings.redis_url)
    try:
        projector = ViewsProjector(raw, None, settings.namespace)
        await projector.scripts.load()
        keys = await projector.resolve_keys()
        applied = await projector.apply_events(keys, list(enumerate(events)))
        assert not applied.retry
        assert not applied.missing
    finally:
        await raw.aclose()


def _alert_story() -> list[Any]:
    """A rule; two devices; five alerts: raised, acknowledged, cleared, re-triggered."""
    from datetime import UTC, datetime

    from domain.published import (
        DeviceAlertAcknowledged,
        DeviceAlertCleared,
        DeviceAlertRaised,
        DeviceAlertRetriggered,
        DeviceRegistered,
        RuleCreated,
        RuleDisabled,
    )

    at = datetime(2026, 1, 1, tzinfo=UTC)
    spec = {
        "name": "Hot",
        "metric": "t",
        "scope": {},
        "severity": "critical",
        "condition": {"kind": "threshold", "op": ">", "value": 80.0, "clear": None, "for_s": 0.0},
    }
    out: list[Any] = [
        RuleCreated(rule_id="hot", version=1, at=at, position=1, spec=spec),
        RuleCreated(rule_id="cold", version=1, at=at, position=2, spec={**spec, "name": "Cold"}),
        RuleDisabled(rule_id="cold", version=2, at=at, position=3),
    ]
    versions = {}
    for d in ("d1", "d2"):
        out.append(
            DeviceRegistered(
                device_id=d, version=1, at=at, position=4, name=d, type="boiler", labels={}
            )
        )
        versions[d] = 1

    def next_version(d: str) -> int:
        versions[d] += 1
        return versions[d]

    for n, (d, ms) in enumerate([("d1", 1000), ("d2", 2000), ("d1", 3000), ("d2", 4000)]):
        aid = f"{d}.hot.{ms}"
        out.append(
            DeviceAlertRaised(
                device_id=d, version=next_version(d), at=at, position=10 + n, alert_id=aid,
                rule_id="hot", severity="critical" if d == "d1" else "warning", metric="t",
                value=90.0 + n, at_ms=ms,
            )
        )  # fmt: skip
        if ms in (1000, 2000):  # the first two clear before the next raise of their device
            out.append(
                DeviceAlertCleared(
                    device_id=d, version=next_version(d), at=at, position=20 + n,
                    alert_id=aid, value=70.0, at_ms=ms + 500,
                )
            )  # fmt: skip
    out.append(
        DeviceAlertAcknowledged(
            device_id="d1", version=next_version("d1"), at=at, position=30,
            alert_id="d1.hot.1000", by="token:abc", note="late look",
        )
    )  # fmt: skip
    out.append(
        DeviceAlertRetriggered(
            device_id="d2", version=next_version("d2"), at=at, position=31,
            alert_id="d2.hot.4000", value=99.0, at_ms=4100,
        )
    )  # fmt: skip
    return out


async def test_alerts_are_listed_newest_first_with_each_filter_and_a_cursor(
    settings: Settings, client: httpx.AsyncClient
) -> None:
    await project(settings, *_alert_story())

    async def ids(**params: Any) -> list[str]:
        response = await client.get("/api/v1/alerts", params=params, headers=VIEWER)
        assert response.status_code == 200, response.text
        return [a["alert_id"] for a in response.json()["items"]]

    assert await ids() == ["d2.hot.4000", "d1.hot.3000", "d2.hot.2000", "d1.hot.1000"]
    assert await ids(status="open") == ["d2.hot.4000", "d1.hot.3000"]
    assert await ids(status="cleared") == ["d2.hot.2000", "d1.hot.1000"]
    assert await ids(status="active") == ["d2.hot.4000", "d1.hot.3000"]
    assert await ids(severity="warning") == ["d2.hot.4000", "d2.hot.2000"]
    assert await ids(device_id="d1") == ["d1.hot.3000", "d1.hot.1000"]
    assert await ids(rule_id="hot", status="cleared", device_id="d2") == ["d2.hot.2000"]
    assert await ids(rule_id="cold") == []
    pages, cursor = [], None
    while True:
        params = {"limit": 1, **({"cursor": cursor} if cursor else {})}
        body = (await client.get("/api/v1/alerts", params=params, headers=VIEWER)).json()
        pages += [a["alert_id"] for a in body["items"]]
        cursor = body["next_cursor"]
        if cursor is None:
            break
    assert pages == await ids()  # no duplicates, no gaps
    one = (await client.get("/api/v1/alerts/d1.hot.1000", headers=VIEWER)).json()
    assert (one["status"], one["acknowledged"], one["acknowledged_by"]) == (
        "cleared",
        True,
        "token:abc",
    )
    assert (one["raised_value"], one["cleared_value"], one["cleared_at_ms"]) == (90.0, 70.0, 1500)
    retriggered = (await client.get("/api/v1/alerts/d2.hot.4000", headers=VIEWER)).json()
    assert (retriggered["retriggers"], retriggered["last_value"]) == (1, 99.0)
    missing = await client.get("/api/v1/alerts/d9.hot.1", headers=VIEWER)
    assert missing.status_code == 404
    bad = await client.get("/api/v1/alerts", params={"status": "sleeping"}, headers=VIEWER)
    assert bad.status_code == 422
    foreign = await client.get("/api/v1/alerts", params={"cursor": "xyz"}, headers=VIEWER)
    assert foreign.status_code == 422


async def test_rules_are_listed_with_their_open_alert_counts(
    settings: Settings, client: httpx.AsyncClient
) -> None:
    await project(settings, *_alert_story())
    body = (await client.get("/api/v1/rules", headers=VIEWER)).json()
    rules = {r["rule_id"]: r for r in body["items"]}
    assert list(rules) == ["cold", "hot"]
    assert (rules["hot"]["open_alerts"], rules["hot"]["enabled"]) == (2, True)
    assert (rules["cold"]["open_alerts"], rules["cold"]["enabled"]) == (0, False)
    assert rules["hot"]["condition"]["value"] == 80.0
    enabled = (await client.get("/api/v1/rules", params={"enabled": "true"}, headers=VIEWER)).json()
    assert [r["rule_id"] for r in enabled["items"]] == ["hot"]
    hot = (await client.get("/api/v1/rules/hot", headers=VIEWER)).json()
    assert hot == rules["hot"]
    assert (await client.get("/api/v1/rules/nope", headers=VIEWER)).status_code == 404
    await project(settings, *_alert_story())  # redelivered: nothing counts twice
    again = (await client.get("/api/v1/rules/hot", headers=VIEWER)).json()
    assert again["open_alerts"] == 2
