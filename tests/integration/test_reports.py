"""Fleet reports on real Redis and InfluxDB: a fixture fleet whose figures are known, applied
through the views projection's own plans and scripts, and raw telemetry points in InfluxDB."""

from __future__ import annotations

import asyncio
import csv
import dataclasses
import io
import json
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis.asyncio as aioredis
from redis import Redis as SyncRedis

import projections.views_plan
from domain.published import (
    DeviceAlertAcknowledged,
    DeviceAlertCleared,
    DeviceAlertRaised,
    DeviceCommandAcknowledged,
    DeviceCommandCancelled,
    DeviceCommandExpired,
    DeviceCommandFailed,
    DeviceCommandRequested,
    DeviceConnected,
    DeviceDisconnected,
    DeviceRegistered,
    PublishedEvent,
)
from gateway.api import Gateway, create_app
from gateway.main import build_gateway, readiness
from gateway.ratelimit import RateLimiter, rate_limit_prefix
from infra.settings import Settings
from infra.views import ViewKeys
from iot.cli import main as iot_main
from projections.views import ViewsProjector
from tests.conftest import settings_for, unique_namespace

pytestmark = pytest.mark.integration

VIEWER = {"Authorization": "Bearer viewer-token-0123456789"}
T0 = datetime(2026, 1, 1, tzinfo=UTC)  # the report's `from`
T0_MS = 1_767_225_600_000
HOUR_MS = 3_600_000
TO = "2026-01-01T10:00:00Z"  # ten hours
NOW_S = (T0_MS + 12 * HOUR_MS) / 1000
NAME = '<b>Boiler & "Co"</b>'
PERIOD = {"from": "2026-01-01T00:00:00Z", "to": TO}


def at(hours: float) -> datetime:
    return T0 + timedelta(hours=hours)


def ms(hours: float) -> int:
    return T0_MS + round(hours * HOUR_MS)


class History:
    """A device's events with consecutive versions."""

    def __init__(self, device_id: str, name: str, registered: float, **labels: str) -> None:
        self.device_id = device_id
        self.events: list[PublishedEvent] = []
        self.add(DeviceRegistered, registered, name=name, type="boiler", labels=labels)

    def add(self, kind: type[Any], hours: float, **fields: Any) -> None:
        version = len(self.events) + 1
        self.events.append(
            kind(device_id=self.device_id, version=version, at=at(hours), position=0, **fields)
        )

    def command(self, command_id: str, hours: float) -> None:
        self.add(
            DeviceCommandRequested,
            hours,
            command_id=command_id,
            name="reboot",
            args={},
            expires_at=at(hours + 1),
        )

    def raised(self, rule: str, severity: str, hours: float) -> str:
        alert_id = f"{self.device_id}.{rule}.{ms(hours)}"
        self.add(
            DeviceAlertRaised,
            hours,
            alert_id=alert_id,
            rule_id=rule,
            severity=severity,
            metric="t",
            value=90.0,
            at_ms=ms(hours),
        )
        return alert_id

    def cleared(self, alert_id: str, hours: float) -> None:
        self.add(DeviceAlertCleared, hours, alert_id=alert_id, value=20.0, at_ms=ms(hours))


def fleet() -> list[PublishedEvent]:
    """d1: online 8 of the 10 hours; 2 of its commands finish in the period (1 succeeds); alerts:
    2 raised (critical, info), 1 acknowledged after 10 min, 2 cleared after 30 min and 2 h.
    d2: never connected; 1 command, acknowledged. d3: registered after the period."""
    d1 = History("d1", NAME, -1, site="<north>")
    d1.add(DeviceConnected, -0.5)
    old = d1.raised("cold", "warning", -1)
    d1.command("c3", -0.4)
    d1.add(DeviceCommandExpired, -1 / 6, command_id="c3")  # before the period
    d1.command("c1", 0.5)
    d1.command("c2", 0.5)
    hot = d1.raised("hot", "critical", 1)
    d1.add(DeviceCommandAcknowledged, 1, command_id="c1", result={})
    d1.cleared(old, 1)  # raised before the period: cleared 2 h after its raise
    d1.add(DeviceAlertAcknowledged, 1 + 1 / 6, alert_id=hot, by="token:op", note=None)
    d1.cleared(hot, 1.5)
    d1.add(DeviceDisconnected, 2)
    d1.add(DeviceCommandFailed, 2, command_id="c2", result={"error": "no"})
    d1.add(DeviceConnected, 4)
    d1.raised("smoke", "info", 9)
    d1.command("c4", 9.5)
    d1.add(DeviceCommandCancelled, 11, command_id="c4", reason="late")  # after the period
    d2 = History("d2", "Pump", -1)
    d2.command("c5", 2)
    d2.add(DeviceCommandAcknowledged, 3, command_id="c5", result={})
    d3 = History("d3", "Late", 11)
    return d1.events + d2.events + d3.events


POINTS = "\n".join(
    [
        f'telemetry,device_id=d1 t=1,h=50,s="x" {ms(1 / 60)}',
        f"telemetry,device_id=d1 t=2 {ms(2 / 60)}",
        f"telemetry,device_id=d1 t=3 {ms(3 / 60)}",
        f"telemetry,device_id=d1 t=100 {ms(-1 / 60)}",  # before the period
        f"telemetry,device_id=d2 t=10 {ms(5 / 60)}",
        f"telemetry,device_id=d2 t=20 {ms(6 / 60)}",
        f"telemetry,device_id=d2 t=30 {ms(10)}",  # at `to`: outside
        f"telemetry,device_id=d3 t=5 {ms(10.5)}",
    ]
)


async def seed(settings: Settings) -> None:
    raw = aioredis.Redis.from_url(settings.redis_url)
    try:
        projector = ViewsProjector(raw, None, settings.namespace)
        await projector.scripts.load()
        keys = ViewKeys.for_namespace(settings.namespace)
        applied = await projector.apply_events(keys, list(enumerate(fleet())))
        assert applied.applied == len(fleet())
        assert not applied.retry
        assert not applied.missing
    finally:
        await raw.aclose()
    async with httpx.AsyncClient() as http:
        answer = await http.post(
            f"{settings.influx_url}/write",
            params={"db": settings.influx_db, "precision": "ms"},
            content=POINTS,
        )
        assert answer.status_code == 204, answer.text


@pytest.fixture
def settings() -> Iterator[Settings]:
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
async def client(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    await seed(settings)
    redis = aioredis.Redis.from_url(settings.redis_url, decode_responses=True)
    async with httpx.AsyncClient(timeout=30) as http:
        built = build_gateway(settings, redis, http)
        limiter = RateLimiter(redis, rate_limit_prefix(settings.namespace), 10_000)
        gw: Gateway = dataclasses.replace(built, limiter=limiter, clock=lambda: NOW_S)

        async def ready() -> dict[str, bool]:
            return dict(await readiness(gw))

        transport = httpx.ASGITransport(app=create_app(gw, ready))
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
            yield c
    await redis.aclose()


async def report(client: httpx.AsyncClient, **params: str) -> httpx.Response:
    return await client.get("/api/v1/reports/fleet", params=params, headers=VIEWER)


# --- the views keep the histories -----------------------------------------------------------


async def test_views_keep_connectivity_and_finished_commands_newest_first(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(projections.views_plan, "HISTORY_KEPT", 3)
    await seed(settings)
    redis = aioredis.Redis.from_url(settings.redis_url, decode_responses=True)
    keys = ViewKeys.for_namespace(settings.namespace)
    try:
        conn = await redis.zrange(keys.connectivity("d1"), 0, -1, withscores=True)
        done = await redis.zrange(keys.commands_done("d1"), 0, -1, withscores=True)
        again = await ViewsProjector(redis, None, settings.namespace).apply_events(
            keys, list(enumerate(fleet()))
        )
        assert again.applied == 0  # a redelivery adds nothing
        assert await redis.zcard(keys.connectivity("d1")) == 3
    finally:
        await redis.aclose()
    assert conn == [("2:1", ms(-0.5)), ("13:0", ms(2)), ("15:1", ms(4))]
    # four finished, the newest three kept
    assert done == [("acknowledged:c1", ms(1)), ("failed:c2", ms(2)), ("cancelled:c4", ms(11))]


# --- the report -----------------------------------------------------------------------------


async def test_json_report_has_the_known_figures_per_device_and_for_the_fleet(
    client: httpx.AsyncClient,
) -> None:
    answer = await report(client, **PERIOD)
    assert answer.status_code == 200, answer.text
    assert answer.headers["content-type"] == "application/json"
    body = answer.json()
    ten = "2026-01-01T10:00:00.000Z"
    assert (body["from"], body["to"], body["observed_to"]) == ("2026-01-01T00:00:00.000Z", ten, ten)
    assert [d["device_id"] for d in body["devices"]] == ["d1", "d2"]  # d3 came later
    d1, d2 = body["devices"]
    assert (d1["name"], d1["labels"], d1["status"]) == (NAME, {"site": "<north>"}, "active")
    assert (d1["uptime"], d1["online_s"]) == (0.8, 8 * 3600)
    assert d1["readings"] == 3
    assert d1["metrics"] == {
        "h": {"count": 1, "min": 50, "mean": 50, "max": 50},
        "s": {"count": 1, "min": None, "mean": None, "max": None},
        "t": {"count": 3, "min": 1, "mean": 2, "max": 3},
    }
    assert d1["alerts"] == {
        "raised": 2,
        "acknowledged": 1,
        "cleared": 2,
        "raised_by_severity": {"critical": 1, "warning": 0, "info": 1},
        "mean_time_to_acknowledge_s": 600,
        "mean_time_to_clear_s": (1800 + 7200) / 2,
    }
    assert d1["commands"] == {
        "finished": 2,
        "acknowledged": 1,
        "failed": 1,
        "expired": 0,
        "cancelled": 0,
        "success_rate": 0.5,
    }
    assert d1["history_complete"] is True
    assert (d2["uptime"], d2["readings"], d2["metrics"]["t"]["mean"]) == (0, 2, 15)
    assert (d2["commands"]["finished"], d2["commands"]["success_rate"]) == (1, 1)
    assert d2["alerts"]["raised"] == 0
    assert d2["alerts"]["mean_time_to_clear_s"] is None
    totals = body["totals"]
    assert (totals["devices"], totals["uptime"], totals["readings"]) == (2, 0.4, 5)
    assert totals["metrics"]["t"] == {"count": 5, "min": 1, "mean": 7.2, "max": 20}
    assert totals["alerts"]["raised_by_severity"] == {"critical": 1, "warning": 0, "info": 1}
    assert totals["alerts"]["mean_time_to_acknowledge_s"] == 600
    assert totals["commands"]["finished"] == 3
    assert totals["commands"]["success_rate"] == round(2 / 3, 4)
    assert body["notes"]
    assert all(isinstance(n, str) for n in body["notes"])
    again = await client.get(
        "/api/v1/reports/fleet",
        params=PERIOD,
        headers={**VIEWER, "If-None-Match": answer.headers["etag"]},
    )
    assert again.status_code == 304


async def test_uptime_counts_only_the_observed_part_of_a_period_reaching_past_now(
    client: httpx.AsyncClient,
) -> None:
    body = (await report(client, **{"from": PERIOD["from"], "to": "2026-01-02T00:00:00Z"})).json()
    assert body["observed_to"] == "2026-01-01T12:00:00.000Z"
    d1 = body["devices"][0]
    assert (d1["online_s"], d1["uptime"]) == (10 * 3600, round(10 / 12, 4))
    assert d1["commands"]["cancelled"] == 1


class Page(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[str] = []
        self.text: list[str] = []
        self.svg_titles: list[str] = []
        self._in: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)
        self._in.append(tag)

    def handle_endtag(self, tag: str) -> None:
        if self._in and self._in[-1] == tag:
            self._in.pop()

    def handle_data(self, data: str) -> None:
        self.text.append(data)
        if self._in and self._in[-1] == "title" and "svg" in self._in:
            self.svg_titles.append(data)


async def test_html_report_is_one_self_contained_page_with_charts_and_escaped_names(
    client: httpx.AsyncClient,
) -> None:
    answer = await report(client, **PERIOD, format="html")
    assert answer.status_code == 200, answer.text
    assert answer.headers["content-type"] == "text/html; charset=utf-8"
    page = Page()
    page.feed(answer.text)
    page.close()
    assert page.tags.count("svg") == 3
    assert {"Uptime per device", "Readings per device", "Alerts raised by severity"} <= set(
        page.svg_titles
    )
    assert "b" not in page.tags  # the name's markup is text, not a tag
    assert NAME in page.text
    assert "site=<north>" in page.text
    assert "&lt;b&gt;Boiler &amp; &quot;Co&quot;&lt;/b&gt;" in answer.text
    assert not {"script", "link", "img", "iframe"} & set(page.tags)
    assert "@media print" in answer.text
    assert "http://" not in answer.text.replace('xmlns="http://www.w3.org/2000/svg"', "")


async def test_csv_report_has_a_header_and_one_row_per_device(client: httpx.AsyncClient) -> None:
    answer = await report(client, **PERIOD, format="csv")
    assert answer.status_code == 200, answer.text
    assert answer.headers["content-type"] == "text/csv; charset=utf-8"
    rows = list(csv.DictReader(io.StringIO(answer.text)))
    assert [r["device_id"] for r in rows] == ["d1", "d2"]
    d1 = rows[0]
    assert (d1["name"], d1["labels"], d1["uptime"], d1["readings"]) == (
        NAME,
        "site=<north>",
        "0.8",
        "3",
    )
    assert (d1["t_count"], d1["t_min"], d1["t_mean"], d1["t_max"]) == ("3", "1", "2.0", "3")
    assert (d1["commands_finished"], d1["command_success_rate"]) == ("2", "0.5")
    assert (d1["alerts_critical"], d1["mean_time_to_acknowledge_s"]) == ("1", "600.0")


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"format": "xml"}, "format"),
        ({"from": "yesterday"}, "from"),
        ({"from": TO, "to": PERIOD["from"]}, "from"),
        ({"from": "2026-01-01T13:00:00Z", "to": "2026-01-02T00:00:00Z"}, "from"),
        ({"from": "2025-01-01T00:00:00Z", "to": TO}, "to"),
    ],
)
async def test_bad_parameters_are_422_problems(
    client: httpx.AsyncClient, params: dict[str, str], field: str
) -> None:
    answer = await report(client, **params)
    assert answer.status_code == 422, answer.text
    assert answer.headers["content-type"] == "application/problem+json"
    assert answer.json()["errors"][0]["field"] == field


async def test_a_report_needs_a_token(client: httpx.AsyncClient) -> None:
    answer = await client.get("/api/v1/reports/fleet", params=PERIOD)
    assert answer.status_code == 401
    assert answer.headers["content-type"] == "application/problem+json"


def test_iot_report_writes_the_file(
    settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    asyncio.run(seed(settings))
    monkeypatch.setenv("IOT_NAMESPACE", settings.namespace)
    monkeypatch.setenv("IOT_INFLUX_DB", settings.influx_db)
    out = tmp_path / "fleet-2026-01-01.html"
    assert iot_main(["report", "--from", "2026-01-01", "--to", TO, "--out", str(out)]) == 0
    page = out.read_text()
    assert page.startswith("<!doctype html>")
    assert page.count("<svg") == 3
    assert "&lt;b&gt;Boiler" in page
    assert [p.name for p in tmp_path.iterdir()] == [out.name]  # no temporary file left
    json_out = tmp_path / "fleet.json"
    assert iot_main(["report", "--from", "2026-01-01", "--to", TO, "--out", str(json_out)]) == 0
    assert json.loads(json_out.read_text())["totals"]["readings"] == 5
    refused = iot_main(["report", "--from", TO, "--to", "2026-01-01", "--out", str(out)])
    assert refused == 2
