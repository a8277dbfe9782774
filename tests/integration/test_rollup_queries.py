"""The gateway's telemetry from rollups and its fleet aggregates, on real Redis and InfluxDB.

Raw points are written straight into InfluxDB and rolled up by the projection's own code
(`Rollups.rebuild`); the answers from the rollups must equal InfluxDB's aggregation of the raw
points of the same range, whose edges are not whole hours.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from redis.asyncio import Redis

from gateway.aggregates import telemetry_series
from gateway.influx import InfluxQL
from gateway.telemetry import TelemetryQuery
from infra.rollups import HOUR, MINUTE
from infra.settings import Settings
from infra.timefmt import parse_duration
from infra.views import ViewKeys
from projections.influx import InfluxClient
from projections.rollups import Rollups
from tests.integration.test_gateway import (
    VIEWER,
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

NOW_MS = int(time.time() * 1000)
END = NOW_MS - NOW_MS % HOUR.ms - HOUR.ms + 17 * MINUTE.ms + 4_321  # not a whole minute
START = END - 30 * HOUR.ms - 23 * MINUTE.ms - 1_234
STEP = 45_000  # a reading every 45 s
DEVICES = {"t-1": ("thermo", "north"), "t-2": ("thermo", "south"), "m-1": ("meter", "north")}


def value(device: str, ts: int) -> float:
    return (ts // STEP * 7919 + len(device) * 13) % 1000 / 8 - 40


@pytest.fixture
async def data(settings: Settings, redis: Redis, keys: ViewKeys) -> Settings:
    lines = []
    for device, (kind, site) in DEVICES.items():
        for ts in range(START - 2 * HOUR.ms, END + 2 * HOUR.ms, STEP):
            lines.append(
                f"telemetry,device_id={device} temperature={value(device, ts)},"
                f'state="s{ts % 3}" {ts}\n'
            )
        await put_device(redis, keys, device, type_=kind, labels={"site": site})
    await put_device(redis, keys, "unlabelled", type_="thermo", labels={})
    lines.append(f"telemetry,device_id=unlabelled temperature=1.0 {START + 1}\n")
    async with InfluxClient(settings.influx_url, settings.influx_db) as influx:
        await influx.write("".join(lines).encode())
        rollups = Rollups(influx, retention_1m="90d", retention_1h="1095d")
        await rollups.rebuild("autogen", START - 3 * HOUR.ms, END + 3 * HOUR.ms)
    return settings


@pytest.fixture
async def client(
    data: Settings, redis: Redis, influx_http: httpx.AsyncClient
) -> AsyncIterator[httpx.AsyncClient]:
    gw = dataclasses.replace(make_gateway(data, redis, influx_http), clock=time.time)
    async with client_for(gw) as c:
        yield c


def close(a: list[list[Any]], b: list[list[Any]]) -> bool:
    return len(a) == len(b) and all(
        x[0] == y[0]
        and (math.isclose(x[1], y[1], rel_tol=1e-12) if isinstance(x[1], float) else x[1] == y[1])
        for x, y in zip(a, b, strict=True)
    )


async def test_long_ranges_are_answered_from_the_rollups_exactly_as_from_raw(
    client: httpx.AsyncClient, data: Settings, influx_http: httpx.AsyncClient
) -> None:
    reader = InfluxQL(influx_http, data.influx_url, data.influx_db)
    for every, source in (("1h", "rollup_1h"), ("2h", "rollup_1h"), ("30m", "rollup_1m")):
        for agg in ("mean", "min", "max", "count", "last"):
            answer = await client.get(
                "/api/v1/devices/t-1/telemetry",
                params={
                    "metric": "temperature",
                    "from": START,
                    "to": END,
                    "every": every,
                    "agg": agg,
                },
                headers=VIEWER,
            )
            assert answer.status_code == 200, answer.text
            body = answer.json()
            assert body["source"] == source
            query = TelemetryQuery(
                "t-1",
                START,
                END,
                ("temperature",),
                parse_duration(every),
                agg,
            )
            raw = await telemetry_series(reader, query, NOW_MS, rollups=False)
            assert raw.source == "raw"
            assert close(body["series"]["temperature"], raw.series["temperature"]), (every, agg)
            assert len(raw.series["temperature"]) > 15
    # every metric of the device, strings included (count and last)
    everything = await client.get(
        "/api/v1/devices/t-1/telemetry",
        params={"from": START, "to": END, "every": "1h", "agg": "last"},
        headers=VIEWER,
    )
    raw = await telemetry_series(
        reader, TelemetryQuery("t-1", START, END, (), HOUR.ms, "last"), NOW_MS, rollups=False
    )
    assert everything.json()["series"].keys() == {"temperature", "state"}
    assert everything.json()["series"]["state"] == raw.series["state"]
    # a short range, or an `every` that is no multiple of a minute: the raw points
    short: list[dict[str, str | int]] = [
        {"every": "1h", "from": END - HOUR.ms},
        {"every": "90s", "from": START},
    ]
    for params in short:
        answer = await client.get(
            "/api/v1/devices/t-1/telemetry",
            params={"metric": "temperature", "to": END, **params},
            headers=VIEWER,
        )
        assert answer.json()["source"] == "raw"


async def test_fleet_aggregates_by_type_and_by_label(client: httpx.AsyncClient) -> None:
    start = START - START % HOUR.ms + HOUR.ms
    end = start + 6 * HOUR.ms
    by_type = await client.get(
        "/api/v1/fleet/aggregates",
        params={"metric": "temperature", "group_by": "type", "from": start, "to": end},
        headers=VIEWER,
    )
    assert by_type.status_code == 200, by_type.text
    body = by_type.json()
    assert body["source"] == "rollup_1h"
    assert body["ungrouped_devices"] == 0
    groups = {g["group"]: g for g in body["groups"]}
    assert {name: g["devices"] for name, g in groups.items()} == {"thermo": 2, "meter": 1}
    for name, members in (("thermo", ("t-1", "t-2")), ("meter", ("m-1",))):
        buckets = groups[name]["buckets"]
        assert len(buckets) == 6
        for bucket in buckets:
            values = [
                value(d, ts)
                for d in members
                for ts in range(START - 2 * HOUR.ms, END + 2 * HOUR.ms, STEP)
                if bucket["time"] <= ts < bucket["time"] + HOUR.ms
            ]
            assert bucket["count"] == len(values)
            assert bucket["min"] == min(values)
            assert bucket["max"] == max(values)
            assert math.isclose(bucket["mean"], sum(values) / len(values), rel_tol=1e-12)

    by_site = await client.get(
        "/api/v1/fleet/aggregates",
        params={
            "metric": "temperature",
            "group_by": "label:site",
            "from": START,
            "to": END,
            "every": "6h",
        },
        headers=VIEWER,
    )
    assert by_site.status_code == 200, by_site.text
    site = by_site.json()
    assert site["ungrouped_devices"] == 1  # "unlabelled" has no site
    sites = {g["group"]: g for g in site["groups"]}
    assert {name: g["devices"] for name, g in sites.items()} == {"north": 2, "south": 1}
    north = sum(b["count"] for b in sites["north"]["buckets"])
    expected = sum(
        1
        for d in ("t-1", "m-1")
        for ts in range(START - 2 * HOUR.ms, END + 2 * HOUR.ms, STEP)
        if START <= ts < END
    )
    assert north == expected  # edges that are no whole hours come from finer data


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"group_by": "type"}, "metric"),
        ({"metric": "temperature", "group_by": "site"}, "group_by"),
        ({"metric": "temperature"}, "group_by"),
        ({"metric": "temperature", "group_by": "type", "from": "2000", "to": "1000"}, "from"),
        ({"metric": "temperature", "group_by": "type", "every": "1m", "from": "0"}, "every"),
        ({"metric": "temperature", "group_by": "type", "every": "90s"}, "every"),
    ],
)
async def test_fleet_aggregates_refuse_bad_parameters(
    client: httpx.AsyncClient, params: dict[str, str], field: str
) -> None:
    answer = await client.get("/api/v1/fleet/aggregates", params=params, headers=VIEWER)
    assert answer.status_code == 422
    assert answer.headers["content-type"].startswith("application/problem+json")
    assert answer.json()["errors"][0]["field"] == field
