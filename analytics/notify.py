"""Alert notifications: open alerts posted to Prometheus Alertmanager's v2 API, resolved when
cleared; Alertmanager's routing, grouping, silences and receivers do the rest.

`Notifier.notify` never blocks and never raises: it keeps the newest state of each alert in a
bounded table, and `Notifier.run` delivers in the background (`POST /api/v2/alerts`, a JSON array
of alerts). A failed delivery (no connection, a timeout, a 5xx) is retried with capped,
jittered exponential backoff; a 4xx is a payload Alertmanager will never take: logged, counted
and dropped. Open alerts are sent again every `resend_s` with `endsAt` four resend intervals
ahead (as Prometheus does), so Alertmanager resolves one by itself only if the service stops
sending; a cleared alert is sent once with `endsAt` = its clearing time, then forgotten.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import re
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlencode

import httpx
from prometheus_client import Counter, Gauge

from domain.alerts import AlertState

log = logging.getLogger(__name__)

SENT = Counter(
    "iot_analytics_notifications_total",
    "Alert notifications posted to Alertmanager, by outcome (sent, failed, rejected)",
    ["outcome"],
)
PENDING = Gauge("iot_analytics_notifications_pending", "Alerts waiting to be (re)sent")
DROPPED = Counter(
    "iot_analytics_notifications_dropped_total",
    "Alert notifications given up, by reason (overflow, rejected)",
    ["reason"],
)

FIXED_LABELS = ("alertname", "rule", "device", "severity", "metric", "type")
_INVALID = re.compile(r"[^A-Za-z0-9_]")
BACKOFF_START_S = 0.5
BACKOFF_MAX_S = 30.0


def rfc3339(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="milliseconds")[:-6] + "Z"


def label_name(key: str) -> str:
    """A device label key as a Prometheus label name that cannot shadow a fixed label."""
    name = _INVALID.sub("_", key) or "_"
    if name[0].isdigit():
        name = "_" + name
    if name in FIXED_LABELS or name.startswith("__"):
        name = "label_" + name.lstrip("_")
    return name


@dataclass(frozen=True)
class AlertContext:
    """What the alert state does not say: the rule's name, the device's type and labels."""

    rule_name: str
    device_type: str | None = None
    device_labels: Mapping[str, str] | None = None


def alertmanager_alert(
    state: AlertState, context: AlertContext, gateway_url: str | None = None
) -> dict[str, Any]:
    """The PostableAlert of `state`, without `endsAt` for an open alert (set when sent)."""
    labels = {label_name(k): v for k, v in sorted((context.device_labels or {}).items()) if v != ""}
    labels.update(
        alertname=context.rule_name or "iot_alert",
        rule=state.rule_id,
        device=state.device_id,
        severity=state.severity,
        metric=state.metric,
    )
    if context.device_type:
        labels["type"] = context.device_type
    annotations = {
        "summary": f"{context.rule_name or state.rule_id} on {state.device_id}: {state.metric} "
        f"= {_text(state.raised_value)}",
        "alert_id": state.alert_id,
        "value": _text(state.raised_value),
        "last_value": _text(state.last_value),
        "retriggers": str(state.retriggers),
        "raised_at": rfc3339(state.raised_at_ms),
        "status": state.status,
    }
    alert: dict[str, Any] = {
        "labels": labels,
        "annotations": annotations,
        "startsAt": rfc3339(state.raised_at_ms),
    }
    if state.cleared_at_ms is not None:
        annotations["cleared_value"] = _text(state.cleared_value)
        alert["endsAt"] = rfc3339(max(state.cleared_at_ms, state.raised_at_ms))
    if gateway_url:
        query = urlencode({"device_id": state.device_id, "rule_id": state.rule_id})
        alert["generatorURL"] = f"{gateway_url.rstrip('/')}/api/v1/alerts?{query}"
    return alert


def _text(value: float | None) -> str:
    return "" if value is None else f"{value:g}"


@dataclass
class _Entry:
    alert: dict[str, Any]
    resolved: bool
    sent_at: float | None = None  # wall-clock seconds of the last delivery


class Notifier:
    """Delivers alert states to Alertmanager in the background; `notify` never waits."""

    def __init__(
        self,
        client: httpx.AsyncClient,
        *,
        resend_s: float = 60.0,
        max_pending: int = 10_000,
        batch: int = 500,
        clock: Callable[[], float] = time.time,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        jitter: Callable[[], float] = random.random,
    ) -> None:
        self._client = client
        self.resend_s = resend_s
        self.max_pending = max_pending
        self.batch = batch
        self._clock = clock
        self._sleep = sleep
        self._jitter = jitter
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        self._wake = asyncio.Event()

    def notify(self, alert_id: str, alert: dict[str, Any]) -> None:
        """Queue the newest state of an alert (replacing an older one not yet sent)."""
        resolved = "endsAt" in alert
        self._entries.pop(alert_id, None)
        self._entries[alert_id] = _Entry(alert, resolved)
        while len(self._entries) > self.max_pending:
            victim = next((k for k, e in self._entries.items() if e.resolved), None)
            self._entries.pop(victim if victim is not None else next(iter(self._entries)))
            DROPPED.labels("overflow").inc()
        PENDING.set(len(self._entries))
        self._wake.set()

    def due(self) -> list[str]:
        """The alerts to send now: never sent, or open and last sent a resend interval ago."""
        now = self._clock()
        return [
            alert_id
            for alert_id, entry in self._entries.items()
            if entry.sent_at is None
            or (not entry.resolved and now - entry.sent_at >= self.resend_s)
        ]

    async def deliver(self) -> bool:
        """One delivery of every due alert, in batches; False if Alertmanager could not be reached
        (what was not delivered stays due)."""
        due = self.due()
        for start in range(0, len(due), self.batch):
            ids = due[start : start + self.batch]
            now = self._clock()
            sources = [self._entries[i].alert for i in ids]
            body = [self._payload(self._entries[i], now) for i in ids]
            try:
                response = await self._client.post("/api/v2/alerts", json=body)
            except httpx.HTTPError as e:
                SENT.labels("failed").inc(len(ids))
                log.warning("alertmanager unreachable", extra={"error": str(e)})
                return False
            if response.status_code >= 500:
                SENT.labels("failed").inc(len(ids))
                log.warning("alertmanager failed", extra={"status": response.status_code})
                return False
            if response.status_code >= 400:
                SENT.labels("rejected").inc(len(ids))
                DROPPED.labels("rejected").inc(len(ids))
                log.error(
                    "alertmanager rejected alerts",
                    extra={"status": response.status_code, "body": response.text[:500]},
                )
                for i in ids:
                    self._entries.pop(i, None)
                continue
            SENT.labels("sent").inc(len(ids))
            for i, source in zip(ids, sources, strict=True):
                entry = self._entries.get(i)
                if entry is None or entry.alert is not source:
                    continue  # a newer state arrived while this one was on its way
                if entry.resolved:
                    del self._entries[i]
                else:
                    entry.sent_at = now
        PENDING.set(len(self._entries))
        return True

    def _payload(self, entry: _Entry, now: float) -> dict[str, Any]:
        alert = dict(entry.alert)
        if not entry.resolved:
            alert["endsAt"] = rfc3339(int((now + 4 * self.resend_s) * 1000))
        return alert

    async def run(self) -> None:
        """Deliver until cancelled: at once on news, every second for re-sends, backing off
        while Alertmanager fails."""
        backoff = BACKOFF_START_S
        while True:
            self._wake.clear()
            if await self.deliver():
                backoff = BACKOFF_START_S
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), timeout=1.0)
            else:
                await self._sleep(backoff * (0.5 + self._jitter() / 2))
                backoff = min(backoff * 2, BACKOFF_MAX_S)

    @property
    def pending(self) -> int:
        return len(self._entries)
