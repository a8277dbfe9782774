"""Alertmanager notifications without a server: payloads, coalescing, bounds, retries, re-sends."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Mapping
from typing import Any

import httpx
import pytest
from prometheus_client import REGISTRY

from analytics.notify import (
    Notifier,
    NotifySettings,
    alertmanager_alert,
    is_resolved,
    label_name,
    rfc3339,
)
from domain.alerts import AlertState, acknowledge, clear, raise_alert, retrigger
from tests.unit.support import at

T0_MS = 1_767_225_600_000  # 2026-01-01T00:00:00Z
NOW_MS = T0_MS + 10_000
LABELS = {"site": "north", "severity": "x", "room.no": "12", "empty": ""}


def state(rule_id: str = "hot", device_id: str = "b1", value: float | None = 91.5) -> AlertState:
    return raise_alert(rule_id, device_id, "critical", "temperature", value, T0_MS)


def payload(
    alert: AlertState,
    *,
    labels: Mapping[str, str] = LABELS,
    name: str = "Boiler overheating",
    gateway: str | None = None,
    now_ms: int = NOW_MS,
) -> dict[str, Any]:
    return alertmanager_alert(
        alert,
        device_type="thermostat",
        device_labels=labels,
        rule_name=name,
        gateway_url=gateway,
        now_ms=now_ms,
        resend_s=60,
    )


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def test_an_open_alert_carries_its_labels_annotations_link_and_an_end_ahead() -> None:
    alert = payload(state(), gateway="http://gw:8082/")
    assert alert["labels"] == {
        "alertname": "Boiler overheating",
        "rule": "hot",
        "device": "b1",
        "severity": "critical",
        "metric": "temperature",
        "type": "thermostat",
        "site": "north",
        "label_severity": "x",  # a device label never shadows a fixed one
        "room_no": "12",
    }
    assert alert["annotations"] == {
        "summary": "Boiler overheating: temperature 91.5 on b1 (critical)",
        "alert_id": f"b1.hot.{T0_MS}",
        "status": "active",
        "value": "91.5",
        "last_value": "91.5",
        "retriggers": "0",
        "raised_at": "2026-01-01T00:00:00.000Z",
    }
    assert alert["startsAt"] == "2026-01-01T00:00:00.000Z"
    assert alert["endsAt"] == rfc3339(NOW_MS + 4 * 60_000)
    assert alert["generatorURL"] == "http://gw:8082/api/v1/alerts?device_id=b1&rule_id=hot"
    assert set(alert) == {"labels", "annotations", "startsAt", "endsAt", "generatorURL"}
    assert not is_resolved(alert)


def test_a_cleared_alert_ends_at_its_clearing_time_and_resolves() -> None:
    cleared = clear(retrigger(state(), 95.0, T0_MS + 1), 79.0, T0_MS + 5_000)
    alert = payload(cleared)
    assert alert["endsAt"] == rfc3339(T0_MS + 5_000)
    assert alert["annotations"]["retriggers"] == "1"
    assert alert["annotations"]["last_value"] == "95"
    assert alert["annotations"]["cleared_value"] == "79"
    assert alert["annotations"]["status"] == "cleared"
    assert alert["annotations"]["summary"].endswith("- cleared at 79")
    assert "generatorURL" not in alert
    assert is_resolved(alert)


def test_a_clearing_stamped_ahead_of_the_server_clock_still_resolves_now() -> None:
    cleared = clear(state(), 79.0, NOW_MS + 3_600_000)  # the device's clock is an hour ahead
    assert payload(cleared)["endsAt"] == rfc3339(NOW_MS)
    early = clear(state(), 79.0, T0_MS + 1)
    # never before startsAt, which Alertmanager refuses ("start time must be before end time")
    assert payload(early, now_ms=T0_MS - 5)["endsAt"] == rfc3339(T0_MS)


def test_an_absent_alert_has_no_value_and_an_unnamed_rule_a_default_alertname() -> None:
    silent = raise_alert("quiet", "b1", "warning", "*", None, T0_MS)
    alert = payload(acknowledge(silent, "token:ops", at(1), None), name="", labels={})
    assert alert["labels"]["alertname"] == "iot_alert"
    assert "value" not in alert["annotations"]
    assert "last_value" not in alert["annotations"]
    assert alert["annotations"]["summary"] == "quiet: no readings from b1 (warning)"
    assert alert["annotations"]["status"] == "acknowledged"
    assert alert["annotations"]["acknowledged_by"] == "token:ops"


@pytest.mark.parametrize(
    ("key", "name"),
    [
        ("site", "site"),
        ("room.no", "room_no"),
        ("Zone-2", "Zone_2"),
        ("1st", "label_1st"),
        ("__name__", "label_name__"),
        ("rule", "label_rule"),
        ("alertname", "label_alertname"),
        ("étage", "_tage"),
        ("", "label_"),
    ],
)
def test_label_keys_become_prometheus_label_names(key: str, name: str) -> None:
    assert label_name(key) == name


def test_device_labels_that_collide_once_renamed_all_survive_and_fixed_ones_win() -> None:
    labels = {"rule": "a", "label_rule": "b", "a.b": "c", "a_b": "d", "device": "e"}
    alert = payload(state(), labels=labels)
    assert alert["labels"]["rule"] == "hot"
    assert alert["labels"]["device"] == "b1"
    assert alert["labels"]["label_rule"] == "b"  # valid as it is: keeps its name
    assert alert["labels"]["label_rule_2"] == "a"
    assert alert["labels"]["a_b"] == "d"
    assert alert["labels"]["a_b_2"] == "c"
    assert alert["labels"]["label_device"] == "e"


def test_times_are_rfc3339_to_the_millisecond() -> None:
    assert rfc3339(T0_MS + 1) == "2026-01-01T00:00:00.001Z"
    assert rfc3339(T0_MS + 999) == "2026-01-01T00:00:00.999Z"
    assert rfc3339(-1) == "1970-01-01T00:00:00.000Z"
    assert rfc3339(2**63 - 1) == "9999-12-31T23:59:59.999Z"


class Clock:
    def __init__(self) -> None:
        self.now = NOW_MS / 1000

    def __call__(self) -> float:
        return self.now


def notifier(
    handler: Callable[[httpx.Request], httpx.Response] | None = None,
    clock: Clock | None = None,
    *,
    settings: NotifySettings | None = None,
    **kwargs: Any,
) -> tuple[Notifier, list[list[dict[str, Any]]]]:
    """A notifier posting to a mock Alertmanager; the list collects each POST's alerts."""
    posts: list[list[dict[str, Any]]] = []
    answer = handler or (lambda _: httpx.Response(200))

    def record(request: httpx.Request) -> httpx.Response:
        assert request.method == "POST"
        assert request.url.path == "/am/api/v2/alerts"
        assert request.headers["content-type"] == "application/json"
        posts.append(json.loads(request.content))
        return answer(request)

    client = httpx.AsyncClient(transport=httpx.MockTransport(record), base_url="http://am/am")
    return Notifier(client, settings, clock=clock or Clock(), **kwargs), posts


def test_notify_returns_at_once_and_never_raises() -> None:
    sender, posts = notifier()
    before = sample("iot_analytics_notifications_dropped_total", reason="invalid")
    sender.notify("x", None)  # type: ignore[arg-type]
    assert sample("iot_analytics_notifications_dropped_total", reason="invalid") == before + 1
    sender.notify(state().alert_id, payload(state()))
    assert (sender.pending, sender.held, posts) == (1, 1, [])


async def test_a_newer_state_replaces_an_unsent_one_and_a_delivered_resolution_is_gone() -> None:
    sender, posts = notifier()
    raised = state()
    sender.notify(raised.alert_id, payload(raised))
    sender.notify(raised.alert_id, payload(retrigger(raised, 99.0, T0_MS + 1)))
    cleared = clear(raised, 70.0, T0_MS + 5)
    sender.notify(raised.alert_id, payload(cleared))
    assert sender.pending == 1
    await sender.deliver()
    assert [len(batch) for batch in posts] == [1]
    assert posts[0][0]["endsAt"] == rfc3339(T0_MS + 5)
    assert (sender.pending, sender.held) == (0, 0)
    await sender.deliver()
    assert len(posts) == 1


async def test_a_state_arriving_while_the_older_one_is_posted_is_sent_next() -> None:
    raised = state()
    cleared = clear(raised, 70.0, T0_MS + 5)

    def newer_meanwhile(_: httpx.Request) -> httpx.Response:
        if len(posts) == 1:
            sender.notify(raised.alert_id, payload(cleared))
        return httpx.Response(200)

    sender, posts = notifier(newer_meanwhile)
    sender.notify(raised.alert_id, payload(raised))
    await sender.deliver()
    assert sender.pending == 1
    await sender.deliver()
    assert [batch[0]["annotations"]["status"] for batch in posts] == ["active", "cleared"]
    assert sender.held == 0


async def test_open_alerts_are_sent_again_every_resend_interval_with_the_end_moved_ahead() -> None:
    clock = Clock()
    sender, posts = notifier(clock=clock)
    raised = state()
    sender.notify(raised.alert_id, payload(raised))
    assert await sender.deliver() == 60
    assert posts[0][0]["endsAt"] == rfc3339(round((clock.now + 240) * 1000))
    clock.now += 59
    assert await sender.deliver() == pytest.approx(1)
    assert len(posts) == 1  # not due yet
    clock.now += 1
    await sender.deliver()
    assert len(posts) == 2
    assert posts[1][0]["endsAt"] == rfc3339(round((clock.now + 240) * 1000))
    assert posts[1][0]["startsAt"] == posts[0][0]["startsAt"]
    assert (sender.pending, sender.held) == (0, 1)


async def test_delivery_goes_in_batches_new_states_before_re_sends() -> None:
    clock = Clock()
    sender, posts = notifier(clock=clock, settings=NotifySettings(batch_size=2))
    old = state("old")
    sender.notify(old.alert_id, payload(old))
    await sender.deliver()
    clock.now += 60
    for rule in ("a", "b", "c"):
        sender.notify(state(rule).alert_id, payload(state(rule)))
    await sender.deliver()
    rules = [[a["labels"]["rule"] for a in batch] for batch in posts[1:]]
    assert rules == [["a", "b"], ["c", "old"]]


async def test_the_bound_drops_resolved_alerts_first_then_the_oldest() -> None:
    sender, _ = notifier(settings=NotifySettings(max_pending=2))
    before = sample("iot_analytics_notifications_dropped_total", reason="overflow")
    open_1, open_2, open_3 = state("a"), state("b"), state("d")
    resolved = clear(state("c"), 1.0, T0_MS + 1)
    sender.notify(open_1.alert_id, payload(open_1))
    sender.notify(resolved.alert_id, payload(resolved))
    sender.notify(open_2.alert_id, payload(open_2))  # the resolved one goes, though newer
    assert sender.due() == [open_1.alert_id, open_2.alert_id]
    sender.notify(open_3.alert_id, payload(open_3))  # then the oldest
    assert sender.due() == [open_2.alert_id, open_3.alert_id]
    sender.notify(open_2.alert_id, payload(retrigger(open_2, 2.0, T0_MS + 2)))  # replaces
    assert sender.due() == [open_3.alert_id, open_2.alert_id]
    assert (sender.pending, sender.held) == (2, 2)
    assert sample("iot_analytics_notifications_dropped_total", reason="overflow") == before + 2


async def test_a_rejected_alert_is_dropped_alone_and_its_batch_mates_delivered() -> None:
    def refuse_b(request: httpx.Request) -> httpx.Response:
        rules = [a["labels"]["rule"] for a in json.loads(request.content)]
        return httpx.Response(400 if "b" in rules else 200, json="invalid label set")

    sender, posts = notifier(refuse_b)
    before = sample("iot_analytics_notifications_dropped_total", reason="rejected")
    for rule in ("a", "b", "c"):
        sender.notify(state(rule).alert_id, payload(state(rule)))
    await sender.deliver()
    assert [len(batch) for batch in posts] == [3, 1, 1, 1]  # the batch, then one by one
    assert sender.due() == []
    assert (sender.pending, sender.held) == (0, 2)  # a and c, kept for re-sending
    assert sample("iot_analytics_notifications_dropped_total", reason="rejected") == before + 1


@pytest.mark.parametrize("status", [500, 503, 408, 429])
async def test_a_failed_batch_stays_due(status: int) -> None:
    from analytics.notify import _Unreachable

    sender, _ = notifier(lambda _: httpx.Response(status))
    before = sample("iot_analytics_notifications_total", outcome="failed")
    raised = state()
    sender.notify(raised.alert_id, payload(raised))
    with pytest.raises(_Unreachable):
        await sender.deliver()
    assert sender.due() == [raised.alert_id]
    assert sender.pending == 1
    assert sample("iot_analytics_notifications_total", outcome="failed") == before + 1


async def until(check: Callable[[], bool]) -> None:
    for _ in range(10_000):
        if check():
            return
        await asyncio.sleep(0)
    raise AssertionError("the condition never held")


async def test_an_unreachable_alertmanager_is_retried_with_capped_jittered_backoff() -> None:
    up = False

    def answer(request: httpx.Request) -> httpx.Response:
        if not up:
            raise httpx.ConnectError("refused", request=request)
        return httpx.Response(200)

    clock = Clock()
    delays: list[float] = []

    async def sleep(seconds: float) -> None:
        delays.append(seconds)
        clock.now += seconds
        await asyncio.sleep(0)

    sender, posts = notifier(answer, clock, sleep=sleep, rand=lambda: 1.0)
    raised = state()
    sender.notify(raised.alert_id, payload(raised))
    task = asyncio.create_task(sender.run())
    await until(lambda: len(delays) >= 9)
    assert delays[:9] == [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0, 30.0]
    assert sender.pending == 1
    up = True
    await until(lambda: sender.pending == 0)
    await sender.close()
    await task
    assert len(posts) >= 10
    assert posts[-1][0]["labels"]["rule"] == "hot"


def test_the_jitter_spreads_each_pause_over_half_to_all_of_it() -> None:
    low, _ = notifier(rand=lambda: 0.0)
    high, _ = notifier(rand=lambda: 0.999)
    assert [low.backoff(n) for n in (1, 2, 3, 8, 100)] == [0.25, 0.5, 1.0, 15.0, 15.0]
    assert high.backoff(1) == pytest.approx(0.49975)
    assert high.backoff(1000) == pytest.approx(29.985)


async def test_the_loop_re_sends_open_alerts_and_forgets_resolved_ones() -> None:
    clock = Clock()

    async def sleep(seconds: float) -> None:
        clock.now += seconds
        await asyncio.sleep(0)

    sender, posts = notifier(clock=clock, sleep=sleep)
    raised, other = state("a"), state("b")
    sender.notify(raised.alert_id, payload(raised))
    sender.notify(other.alert_id, payload(clear(other, 1.0, T0_MS + 1)))
    task = asyncio.create_task(sender.run())
    await until(lambda: len(posts) >= 3)
    await sender.close()
    await task
    assert [len(batch) for batch in posts[:3]] == [2, 1, 1]
    assert [a["labels"]["rule"] for a in posts[1] + posts[2]] == ["a", "a"]
    ends = [rfc3339(round((NOW_MS / 1000 + 60 * n + 240) * 1000)) for n in range(3)]
    assert [batch[-1]["endsAt"] for batch in posts[:3]] == ends


async def test_close_stops_the_loop_and_makes_a_last_delivery_of_what_waits() -> None:
    sender, posts = notifier()
    task = asyncio.create_task(sender.run())
    await until(lambda: sender._runner is not None)
    await sender.close()
    await task
    raised = state()
    sender.notify(raised.alert_id, payload(raised))
    await sender.close()  # no loop any more: close delivers it itself
    assert len(posts) == 1
    assert sender.pending == 0


async def test_a_notifier_given_a_url_makes_and_closes_its_own_client() -> None:
    sender = Notifier("http://127.0.0.1:9", NotifySettings(close_timeout_s=0.5))
    raised = state()
    sender.notify(raised.alert_id, payload(raised))
    await sender.close()  # nothing listens there: the last delivery fails, close still returns
    assert sender.pending == 1
    assert sender._client.is_closed
