"""Alert notifications: open alerts posted to Prometheus Alertmanager's v2 API, resolved when
cleared; Alertmanager's routing, grouping, silences and receivers do the rest.

`alertmanager_alert` turns an alert state into one PostableAlert (`POST /api/v2/alerts` takes a
JSON array of `{labels, annotations, startsAt, endsAt, generatorURL}`). `Notifier.notify` never
blocks and never raises: it keeps the newest payload of each alert in a bounded table, and
`Notifier.run` delivers in the background, in batches. A failed delivery (no connection, a
timeout, a 5xx, a 408 or 429) is retried with capped, jittered exponential backoff; any other 4xx
is a payload Alertmanager will never take: logged, counted and dropped (a rejected batch is
retried alert by alert first, so one bad alert does not take the others with it). Open alerts
are sent again every `resend_s` with `endsAt` four resend intervals ahead (as Prometheus does),
so Alertmanager resolves one by itself only if the service stops sending; a cleared alert is
sent with `endsAt` = its clearing time, which resolves it, then forgotten.
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
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import urlencode

import httpx
import msgspec
from prometheus_client import Counter, Gauge

from domain.alerts import AlertState

log = logging.getLogger(__name__)

SENT = Counter(
    "iot_analytics_notifications_total",
    "Alert notifications posted to Alertmanager, by outcome (sent, failed, rejected)",
    ["outcome"],
)
PENDING = Gauge(
    "iot_analytics_notifications_pending",
    "Alert states waiting for their first delivery to Alertmanager",
)
DROPPED = Counter(
    "iot_analytics_notifications_dropped_total",
    "Alert notifications given up, by reason (overflow, rejected, invalid)",
    ["reason"],
)

ALERTS_PATH = "api/v2/alerts"
FIXED_LABELS = frozenset({"alertname", "rule", "device", "severity", "metric", "type"})
DEFAULT_ALERTNAME = "iot_alert"
RESOLVED_STATUS = "cleared"  # the `status` annotation of a resolved alert
_INVALID = re.compile(r"[^A-Za-z0-9_]")
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MAX_MS = 253_402_300_799_999  # 9999-12-31T23:59:59.999Z
_RETRIED_4XX = frozenset({408, 429})
_encode = msgspec.json.Encoder().encode


def rfc3339(ms: int) -> str:
    """Epoch milliseconds as RFC 3339 UTC with milliseconds (clamped to years 1970 to 9999)."""
    ms = min(max(ms, 0), _MAX_MS)
    at = _EPOCH + timedelta(milliseconds=ms)
    return f"{at:%Y-%m-%dT%H:%M:%S}.{ms % 1000:03d}Z"


def _epoch_ms(text: Any) -> int | None:
    """The epoch ms of an RFC 3339 time, None if it is not one."""
    if not isinstance(text, str):
        return None
    try:
        at = datetime.fromisoformat(text)
    except ValueError:
        return None
    if at.tzinfo is None:
        return None
    return (at - _EPOCH) // timedelta(milliseconds=1)


def label_name(key: str) -> str:
    """A device label key as a Prometheus label name (`[a-zA-Z_][a-zA-Z0-9_]*`), prefixed
    `label_` where it would start with a digit or `__` or be one of the fixed labels."""
    name = _INVALID.sub("_", key)
    if not name or name[0].isdigit() or name.startswith("__") or name in FIXED_LABELS:
        name = "label_" + name.lstrip("_")
    return name


def _device_labels(labels: Mapping[str, str]) -> dict[str, str]:
    """The device's labels under their label names; keys already valid keep theirs, the others
    that collide after renaming get `_2`, `_3`, ... Empty values are left out (as Prometheus
    does: an empty label is no label)."""
    out: dict[str, str] = {}
    items = sorted((k, v) for k, v in labels.items() if isinstance(v, str) and v != "")
    renamed: list[tuple[str, str]] = []
    for key, value in items:
        if label_name(key) == key:
            out[key] = value
        else:
            renamed.append((label_name(key), value))
    for name, value in renamed:
        unique, n = name, 1
        while unique in out or unique in FIXED_LABELS:
            n += 1
            unique = f"{name}_{n}"
        out[unique] = value
    return out


def _number(value: float | None) -> str | None:
    if value is None:
        return None
    if value.is_integer() and abs(value) < 1e15:
        return str(int(value))
    return repr(value)


def _summary(state: AlertState, title: str) -> str:
    value = _number(state.raised_value)
    if value is None:
        metric = "" if state.metric == "*" else f" of {state.metric}"
        what = f"no readings{metric} from {state.device_id}"
    else:
        what = f"{state.metric} {value} on {state.device_id}"
    line = f"{title}: {what} ({state.severity})"
    if state.cleared:
        cleared = _number(state.cleared_value)
        line += " - cleared" + ("" if cleared is None else f" at {cleared}")
    return line


def alertmanager_alert(
    state: AlertState,
    *,
    device_type: str | None,
    device_labels: Mapping[str, str],
    rule_name: str,
    gateway_url: str | None,
    now_ms: int,
    resend_s: float,
) -> dict[str, Any]:
    """The Alertmanager v2 PostableAlert of an alert state, as of `now_ms` (server time).

    An open alert ends `4 * resend_s` after `now_ms` (the notifier moves that ahead at each
    re-send); a cleared one at its clearing time, at most `now_ms` (so that a device clock ahead
    of the server's still resolves it), never before `startsAt`, which Alertmanager refuses.
    """
    labels = _device_labels(device_labels)
    labels.update(
        alertname=rule_name or DEFAULT_ALERTNAME,
        rule=state.rule_id,
        device=state.device_id,
        severity=state.severity,
        metric=state.metric,
    )
    if device_type:
        labels["type"] = device_type
    annotations: dict[str, str | None] = {
        "summary": _summary(state, rule_name or state.rule_id),
        "alert_id": state.alert_id,
        "status": state.status,
        "value": _number(state.raised_value),
        "last_value": _number(state.last_value),
        "retriggers": str(state.retriggers),
        "raised_at": rfc3339(state.raised_at_ms),
    }
    if state.cleared_at_ms is not None:
        annotations["cleared_value"] = _number(state.cleared_value)
        annotations["cleared_at"] = rfc3339(state.cleared_at_ms)
        ends_ms = max(min(state.cleared_at_ms, now_ms), state.raised_at_ms)
    else:
        ends_ms = max(now_ms + round(4 * resend_s * 1000), state.raised_at_ms)
    if state.acknowledged_by is not None:
        annotations["acknowledged_by"] = state.acknowledged_by
    alert: dict[str, Any] = {
        "labels": labels,
        "annotations": {k: v for k, v in annotations.items() if v is not None},
        "startsAt": rfc3339(state.raised_at_ms),
        "endsAt": rfc3339(ends_ms),
    }
    if gateway_url:
        query = urlencode({"device_id": state.device_id, "rule_id": state.rule_id})
        alert["generatorURL"] = f"{gateway_url.rstrip('/')}/api/v1/alerts?{query}"
    return alert


def is_resolved(alert: Mapping[str, Any]) -> bool:
    """Whether a payload of `alertmanager_alert` resolves its alert (its status is cleared)."""
    annotations = alert.get("annotations")
    return isinstance(annotations, Mapping) and annotations.get("status") == RESOLVED_STATUS


@dataclass(frozen=True)
class NotifySettings:
    resend_s: float = 60.0  # how often an open alert is sent again
    max_pending: int = 10_000  # alerts held at most (waiting, or open and re-sent)
    batch_size: int = 500  # alerts per POST
    timeout_s: float = 10.0  # per request, for a client the notifier makes itself
    backoff_start_s: float = 0.5
    backoff_max_s: float = 30.0
    close_timeout_s: float = 5.0  # `close`: how long to wait for the last deliveries


@dataclass(eq=False)
class _Entry:
    alert: dict[str, Any]
    resolved: bool
    ends_floor_ms: int  # the payload's own endsAt: a re-send never moves it earlier
    sent_at: float | None = None  # clock seconds of the last delivery of this payload


class _Unreachable(Exception):
    """Alertmanager did not take a batch for a reason that may pass: retry later."""


class Notifier:
    """Delivers alert payloads to Alertmanager in the background; `notify` never waits."""

    def __init__(
        self,
        alertmanager: httpx.AsyncClient | str,
        settings: NotifySettings | None = None,
        *,
        clock: Callable[[], float] = time.time,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        rand: Callable[[], float] = random.random,
    ) -> None:
        """`alertmanager`: a client with Alertmanager's base URL, or the base URL (the notifier
        then owns its client); `clock`: wall-clock seconds; `rand`: in [0, 1), for the jitter."""
        self.settings = settings or NotifySettings()
        if isinstance(alertmanager, str):
            self._client = httpx.AsyncClient(base_url=alertmanager, timeout=self.settings.timeout_s)
            self._owns_client = True
        else:
            self._client = alertmanager
            self._owns_client = False
        self._clock = clock
        self._sleep = sleep
        self._rand = rand
        # insertion order = notify order, so the first entry of each is the oldest
        self._open: OrderedDict[str, _Entry] = OrderedDict()
        self._resolved: OrderedDict[str, _Entry] = OrderedDict()
        self._fresh = 0  # entries never delivered (all resolved ones, some open ones)
        self._news = asyncio.Event()
        self._stopping = asyncio.Event()
        self._runner: asyncio.Task[None] | None = None
        self._failing = False

    @property
    def resend_s(self) -> float:
        return self.settings.resend_s

    @property
    def pending(self) -> int:
        """Alert states not delivered yet."""
        return self._fresh

    @property
    def held(self) -> int:
        """Alerts in the table: waiting for delivery, or open and re-sent periodically."""
        return len(self._open) + len(self._resolved)

    def notify(self, payload_key: str, alert: dict[str, Any]) -> None:
        """Queue the newest payload of an alert (keyed by alert id), replacing an older one."""
        try:
            self._put(payload_key, alert)
        except Exception:
            DROPPED.labels("invalid").inc()
            log.exception("alert notification not queued", extra={"alert": payload_key})

    def discard(self, payload_key: str) -> None:
        """Stop delivering and re-sending an alert (another replica now notifies for it)."""
        self._forget(payload_key)
        PENDING.set(self._fresh)

    def _put(self, key: str, alert: dict[str, Any]) -> None:
        resolved = is_resolved(alert)
        floor = _epoch_ms(alert.get("endsAt"))
        entry = _Entry(alert, resolved, 0 if floor is None else floor)
        self._forget(key)
        (self._resolved if resolved else self._open)[key] = entry
        self._fresh += 1
        while self.held > self.settings.max_pending:
            table = self._resolved or self._open
            _, victim = table.popitem(last=False)
            if victim.sent_at is None:
                self._fresh -= 1
            DROPPED.labels("overflow").inc()
        PENDING.set(self._fresh)
        self._news.set()

    def _forget(self, key: str) -> None:
        old = self._open.pop(key, None) or self._resolved.pop(key, None)
        if old is not None and old.sent_at is None:
            self._fresh -= 1

    def _current(self, key: str) -> _Entry | None:
        return self._open.get(key) or self._resolved.get(key)

    def _schedule(self, now: float, *, fresh_only: bool = False) -> tuple[list[str], float]:
        """The keys to send now (new states first, then re-sends due) and the seconds until
        the next re-send falls due."""
        new = list(self._resolved)
        again: list[str] = []
        wait = self.resend_s
        for key, entry in self._open.items():
            if entry.sent_at is None:
                new.append(key)
            elif not fresh_only:
                left = entry.sent_at + self.resend_s - now
                if left <= 0:
                    again.append(key)
                else:
                    wait = min(wait, left)
        return new + again, wait

    def due(self) -> list[str]:
        """The alerts a delivery would send now."""
        return self._schedule(self._clock())[0]

    async def deliver(self, *, fresh_only: bool = False) -> float:
        """Send every due alert, in batches; returns the seconds until the next re-send is due.
        Raises `_Unreachable` if Alertmanager could not take a batch (the rest stays due)."""
        keys, _ = self._schedule(self._clock(), fresh_only=fresh_only)
        size = max(1, self.settings.batch_size)
        batches = [keys[i : i + size] for i in range(0, len(keys), size)]
        while batches:
            batch = batches.pop(0)
            rejected = await self._post(batch)
            if rejected and len(batch) > 1:
                batches[:0] = [[key] for key in batch]  # find the bad one(s)
            elif rejected:
                self._drop(batch, "rejected")
        PENDING.set(self._fresh)
        return self._schedule(self._clock())[1]

    async def _post(self, keys: list[str]) -> bool:
        """POST one batch; True if Alertmanager rejected it for good (a 4xx)."""
        now = self._clock()
        entries: list[tuple[str, _Entry]] = []
        parts: list[bytes] = []
        for key in keys:
            entry = self._current(key)
            if entry is None:
                continue  # dropped meanwhile
            try:
                parts.append(_encode(self._payload(entry, now)))
            except (TypeError, ValueError):
                log.exception("alert notification not encodable", extra={"alert": key})
                self._drop([key], "invalid")
                continue
            entries.append((key, entry))
        if not entries:
            return False
        body = b"[" + b",".join(parts) + b"]"
        try:
            response = await self._client.post(
                ALERTS_PATH, content=body, headers={"content-type": "application/json"}
            )
        except Exception as e:  # httpx.HTTPError mostly; never let the loop die
            self._failed(len(entries), "alertmanager unreachable", error=repr(e))
            raise _Unreachable from e
        status = response.status_code
        if status >= 500 or status in _RETRIED_4XX:
            self._failed(len(entries), "alertmanager failed", status=status)
            raise _Unreachable
        if status >= 400:
            SENT.labels("rejected").inc(len(entries))
            log.error(
                "alertmanager rejected alerts",
                extra={"status": status, "body": response.text[:500], "alerts": len(entries)},
            )
            return True
        if self._failing:
            log.info("alertmanager reachable again")
            self._failing = False
        SENT.labels("sent").inc(len(entries))
        for key, sent in entries:
            if self._current(key) is not sent:
                continue  # a newer state arrived while this one was on its way
            if sent.resolved:
                del self._resolved[key]
                self._fresh -= 1
            else:
                if sent.sent_at is None:
                    self._fresh -= 1
                sent.sent_at = now
        return False

    def _failed(self, count: int, message: str, **extra: Any) -> None:
        SENT.labels("failed").inc(count)
        # the first failure of a spell is a warning, the retries only debug
        log.log(logging.DEBUG if self._failing else logging.WARNING, message, extra=extra)
        self._failing = True

    def _drop(self, keys: list[str], reason: str) -> None:
        for key in keys:
            if self._current(key) is not None:
                self._forget(key)
                DROPPED.labels(reason).inc()

    def _payload(self, entry: _Entry, now: float) -> dict[str, Any]:
        if entry.resolved:
            return entry.alert
        ends_ms = max(int((now + 4 * self.resend_s) * 1000), entry.ends_floor_ms)
        return {**entry.alert, "endsAt": rfc3339(ends_ms)}

    def backoff(self, attempt: int) -> float:
        """The pause after the `attempt`-th failure in a row (from 1): doubling from the start,
        capped, scaled into [1/2, 1] of that by the jitter."""
        s = self.settings
        base = min(s.backoff_start_s * 2.0 ** min(attempt - 1, 64), s.backoff_max_s)
        return base * (0.5 + self._rand() / 2)

    async def run(self) -> None:
        """Deliver until `close`: at once on news, when re-sends fall due, backing off while
        Alertmanager fails."""
        self._runner = asyncio.current_task()
        failures = 0
        while not self._stopping.is_set():
            self._news.clear()
            try:
                wait = await self.deliver()
            except _Unreachable:
                failures += 1
                await self._pause(self.backoff(failures), on_news=False)
                continue
            except Exception:
                failures += 1
                log.exception("alert delivery failed")
                await self._pause(self.backoff(failures), on_news=False)
                continue
            failures = 0
            if not self._news.is_set():
                await self._pause(wait, on_news=True)

    async def _pause(self, seconds: float, *, on_news: bool) -> None:
        """Sleep for `seconds`, or until `close` (or news, with `on_news`)."""
        sleeper = asyncio.ensure_future(self._sleep(seconds))
        waits = {sleeper, asyncio.ensure_future(self._stopping.wait())}
        if on_news:
            waits.add(asyncio.ensure_future(self._news.wait()))
        try:
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiting in waits:
                waiting.cancel()
        if sleeper.done() and not sleeper.cancelled():
            error = sleeper.exception()
            if error is not None:
                raise error

    async def close(self) -> None:
        """Stop `run`, try once more (for `close_timeout_s`) to deliver the states that never
        were, and close the client if the notifier made it."""
        self._stopping.set()
        timeout = self.settings.close_timeout_s
        runner, self._runner = self._runner, None
        if runner is not None and runner is not asyncio.current_task() and not runner.done():
            await asyncio.wait({runner}, timeout=timeout)
            if not runner.done():
                runner.cancel()
                await asyncio.wait({runner})
        if self._fresh:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(timeout):
                    await self.deliver(fresh_only=True)
        if self._fresh:
            log.warning("alert states not delivered at close", extra={"alerts": self._fresh})
        if self._owns_client:
            await self._client.aclose()
