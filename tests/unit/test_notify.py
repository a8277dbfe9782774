"""Alertmanager notifications without a server: payloads, coalescing, bounds, retries."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
import pytest

from analytics.notify import (
    BACKOFF_MAX_S,
    AlertContext,
    Notifier,
    alertmanager_alert,
    label_name,
    rfc3339,
)
from domain.alerts import AlertState, acknowledge, clear, raise_alert, retrigger
from tests.unit.support import at

T0_MS = 1_767_225_600_000
CONTEXT = AlertContext("Boiler overheating", "thermostat", {"site": "north", "severity": "x"})


def state(rule_id: str = "hot", device_id: str = "b1") -> AlertState:
    return raise_alert(rule_id, device_id, "critical", "temperature", 91.5, T0_MS)


def test_an_open_alert_carries_its_labels_annotations_and_a_link_but_no_end() -> None:
    alert = alertmanager_alert(state(), CONTEXT, "http://gw:8082/")
    assert alert["labels"] == {
        "alertname": "Boiler overheating",
        "rule": "hot",
        "device": "b1",
        "severity": "critical",
        "metric": "temperature",
        "type": "thermostat",
        "site": "north",
        "label_severity": "x",  # a device label never shadows a fixed one
    }
    assert alert["annotations"]["value"] == "91.5"
    assert alert["annotations"]["alert_id"] == f"b1.hot.{T0_MS}"
    assert alert["startsAt"] == "2026-01-01T00:00:00.000Z"
    assert "endsAt" not in alert
    assert alert["generatorURL"] == "http://gw:8082/api/v1/alerts?device_id=b1&rule_id=hot"


def test_a_cleared_alert_ends_at_its_clearing_time() -> None:
    cleared = clear(retrigger(state(), 95.0, T0_MS + 1), 79.0, T0_MS + 60_000)
    alert = alertmanager_alert(cleared, CONTEXT)
    assert alert["endsAt"] == rfc3339(T0_MS + 60_000)
    assert alert["annotations"]["retriggers"] == "1"
    assert alert["annotations"]["cleared_value"] == "79"
    assert "generatorURL" not in alert


@pytest.mark.parametrize(
    ("key", "name"),
    [
        ("site", "site"),
        ("room.no", "room_no"),
        ("1st", "_1st"),
        ("__x", "label_x"),
        ("rule", "label_rule"),
    ],
)
def test_label_keys_become_prometheus_label_names(key: str, name: str) -> None:
    assert label_name(key) == name


class Clock:
    def __init__(self) -> None:
        self.now = 1_000.0

    def __call__(self) -> float:
        return self.now


def notifier(
    handler: Any, clock: Clock | None = None, **kwargs: Any
) -> tuple[Notifier, list[list[dict[str, Any]]]]:
    posts: list[list[dict[str, Any]]] = []

    def record(request: httpx.Request) -> httpx.Response:
        posts.append(json.loads(request.content))
        response: httpx.Response = handler(request)
        return response

    client = httpx.AsyncClient(transport=httpx.MockTransport(record), base_url="http://am")
    return Notifier(client, clock=clock or Clock(), **kwargs), posts


def ok(_: httpx.Request) -> httpx.Response:
    return httpx.Response(200)


async def test_a_newer_state_replaces_an_unsent_one_and_a_sent_resolution_is_forgotten() -> None:
    sender, posts = notifier(ok)
    raised = state()
    sender.notify(raised.alert_id, alertmanager_alert(raised, CONTEXT))
    cleared = clear(raised, 70.0, T0_MS + 5)
    sender.notify(raised.alert_id, alertmanager_alert(cleared, CONTEXT))
    assert await sender.deliver()
    assert len(posts) == 1
    assert len(posts[0]) == 1
    assert posts[0][0]["endsAt"] == rfc3339(T0_MS + 5)
    assert sender.pending == 0


async def test_open_alerts_are_sent_again_every_resend_interval_with_an_end_ahead() -> None:
    clock = Clock()
    sender, posts = notifier(ok, clock, resend_s=60)
    raised = state()
    sender.notify(raised.alert_id, alertmanager_alert(raised, CONTEXT))
    assert await sender.deliver()
    assert posts[0][0]["endsAt"] == rfc3339(int((clock.now + 240) * 1000))
    assert await sender.deliver()
    assert len(posts) == 1  # not due yet
    clock.now += 60
    assert await sender.deliver()
    assert len(posts) == 2
    assert sender.pending == 1


async def test_the_bound_drops_resolved_alerts_first_then_the_oldest() -> None:
    sender, _ = notifier(ok, max_pending=2)
    open_1, open_2 = state("a"), state("b")
    resolved = clear(state("c"), 1.0, T0_MS + 1)
    sender.notify(open_1.alert_id, alertmanager_alert(open_1, CONTEXT))
    sender.notify(resolved.alert_id, alertmanager_alert(resolved, CONTEXT))
    sender.notify(open_2.alert_id, alertmanager_alert(open_2, CONTEXT))
    assert sender.due() == [open_1.alert_id, open_2.alert_id]
    open_3 = state("d")
    sender.notify(open_3.alert_id, alertmanager_alert(open_3, CONTEXT))
    assert sender.due() == [open_2.alert_id, open_3.alert_id]


async def test_a_rejected_batch_is_dropped_and_a_failed_one_stays_due() -> None:
    sender, _ = notifier(lambda _: httpx.Response(400, text="bad"))
    raised = state()
    sender.notify(raised.alert_id, alertmanager_alert(raised, CONTEXT))
    assert await sender.deliver()
    assert sender.pending == 0
    failing, _ = notifier(lambda _: httpx.Response(503))
    failing.notify(raised.alert_id, alertmanager_alert(raised, CONTEXT))
    assert not await failing.deliver()
    assert failing.due() == [raised.alert_id]


async def test_an_unreachable_alertmanager_is_retried_with_capped_backoff() -> None:
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused", request=request)

    delays: list[float] = []

    async def sleep(seconds: float) -> None:
        delays.append(seconds)
        if len(delays) == 10:
            raise asyncio.CancelledError

    sender, posts = notifier(refuse, sleep=sleep, jitter=lambda: 1.0)
    raised = acknowledge(state(), "token:x", at(1), None)
    sender.notify(raised.alert_id, alertmanager_alert(raised, CONTEXT))
    with pytest.raises(asyncio.CancelledError):
        await sender.run()
    assert delays[:4] == [0.5, 1.0, 2.0, 4.0]
    assert max(delays) == BACKOFF_MAX_S
    assert len(posts) == 10
    assert sender.pending == 1
