"""Reading the device views from Redis (layout in `infra.views`) into the contract's shapes."""

from __future__ import annotations

import base64
import binascii
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, cast

import msgspec
from redis.asyncio import Redis

from domain.device import DEVICE_ID
from infra.timefmt import rfc3339
from infra.views import (
    METRIC_FIELD,
    SEVERITIES,
    STATUSES,
    CurrentKeys,
    ViewKeys,
    marker_key,
    rebuilding_key,
)

_decode = msgspec.json.decode
# Below this many candidates, a filtered page intersects the sets; above, it scans the index.
INTERSECT_MAX = 2_000
SCAN_CHUNK = 500
GENERATION_TTL_S = 0.5  # how long a read may use the generation another read resolved


def encode_cursor(device_id: str) -> str:
    """An opaque cursor: URL-safe base64 of the last device id of a page, unpadded."""
    return base64.urlsafe_b64encode(device_id.encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> str:
    """The device id a cursor continues after; ValueError if it is not one of ours."""
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        device_id = raw.decode()
    except (binascii.Error, UnicodeDecodeError, ValueError) as e:
        raise ValueError("not a cursor returned by this API") from e
    if not DEVICE_ID.fullmatch(device_id):
        raise ValueError("not a cursor returned by this API")
    return device_id


def _same(a: Any, b: Any) -> bool:
    """JSON equality that tells booleans from numbers (true != 1)."""
    if isinstance(a, bool) or isinstance(b, bool):
        return isinstance(a, bool) and isinstance(b, bool) and a == b
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, int | float) and isinstance(b, int | float):
        return a == b
    return type(a) is type(b) and bool(a == b)


def delta(desired: Mapping[str, Any], reported: Mapping[str, Any] | None) -> dict[str, Any]:
    """Desired values the device has not reported (yet): missing keys or different values.

    Nested objects are compared key by key, like AWS IoT's shadow delta.
    """
    reported = reported or {}
    out: dict[str, Any] = {}
    for key, want in desired.items():
        if key not in reported:
            out[key] = want
            continue
        have = reported[key]
        if isinstance(want, dict) and isinstance(have, dict):
            inner = delta(want, have)
            if inner:
                out[key] = inner
        elif not _same(want, have):
            out[key] = want
    return out


def _ms(raw: str | None) -> int | None:
    if raw is None or raw == "":
        return None
    try:
        value = float(raw)
    except ValueError:
        return None
    return int(value) if math.isfinite(value) else None


def _json(raw: str | None) -> Any:
    if raw is None:
        return None
    try:
        return _decode(raw)
    except msgspec.DecodeError:
        return None


def _text(raw: str | bytes | None) -> str | None:
    return raw.decode() if isinstance(raw, bytes) else raw


def _int(raw: str | None) -> int | None:
    if raw is None or raw == "":
        return None
    try:
        return int(raw)
    except ValueError:
        return None


def _commands(raw: str | None) -> tuple[list[Any], list[Any]]:
    """Pending and recent commands from the `commands` field (empty lists when absent)."""
    stored = _json(raw)
    if not isinstance(stored, dict):
        return [], []
    pending, recent = stored.get("pending"), stored.get("recent")
    return (
        pending if isinstance(pending, list) else [],
        recent if isinstance(recent, list) else [],
    )


def in_sync(desired_version: int, reported_version: int | None, delta: Mapping[str, Any]) -> bool:
    """The device reported applying the current desired version and its state matches it.

    A device never given a configuration (version 0) is in sync while it names no version.
    """
    if delta:
        return False
    return reported_version == desired_version or (desired_version == 0 and not reported_version)


def summary(doc: Mapping[str, Any], online: str | None, last_seen: str | None) -> dict[str, Any]:
    """A device list entry."""
    seen = _ms(last_seen)
    return {
        "device_id": doc.get("device_id"),
        "name": doc.get("name"),
        "type": doc.get("type"),
        "labels": doc.get("labels") or {},
        "status": doc.get("status"),
        "online": online == "1",
        "last_seen": rfc3339(seen) if seen is not None else None,
    }


def device_view(fields: Mapping[str, str]) -> dict[str, Any] | None:
    """The device view from the device's hash; None if the device has no view."""
    doc = _json(fields.get("doc"))
    if not isinstance(doc, dict):
        return None
    desired = doc.get("desired") or {"version": 0, "config": {}}
    config = desired.get("config") or {}
    reported = _json(fields.get("reported"))
    if not isinstance(reported, dict):
        reported = None
    metrics: dict[str, Any] = {}
    for field in sorted(fields):
        if not field.startswith(METRIC_FIELD):
            continue
        latest = _json(fields[field])
        if isinstance(latest, dict) and "value" in latest:
            ts = _ms(str(latest.get("ts")))
            metrics[field[len(METRIC_FIELD) :]] = {
                "value": latest["value"],
                "ts": rfc3339(ts) if ts is not None else None,
            }
    seen = _ms(fields.get("last_seen"))
    reported_at = _ms(fields.get("reported_at")) if reported is not None else None
    desired_version = desired.get("version", 0)
    reported_version = _int(fields.get("reported_config_version"))
    difference = delta(config, reported)
    pending, recent = _commands(fields.get("commands"))
    return {
        "device_id": doc.get("device_id"),
        "name": doc.get("name"),
        "type": doc.get("type"),
        "labels": doc.get("labels") or {},
        "status": doc.get("status"),
        "registered_at": doc.get("registered_at"),
        "updated_at": doc.get("updated_at"),
        "version": _ms(fields.get("version")),
        "desired": {"version": desired_version, "config": config},
        "reported": reported,
        "reported_at": rfc3339(reported_at) if reported_at is not None else None,
        "reported_config_version": reported_version,
        "delta": difference,
        "in_sync": in_sync(desired_version, reported_version, difference),
        "online": fields.get("online") == "1",
        "last_seen": rfc3339(seen) if seen is not None else None,
        "metrics": metrics,
        "pending_commands": pending,
        "recent_commands": recent,
        "alerts": open_alerts(doc.get("alerts")),
    }


def open_alerts(stored: Any) -> list[dict[str, Any]]:
    """The device's open alerts from its doc, oldest raised first, times as RFC 3339."""
    if not isinstance(stored, dict):
        return []
    alerts = [a for a in stored.values() if isinstance(a, dict)]
    alerts.sort(key=lambda a: (a.get("raised_at_ms") or 0, str(a.get("alert_id"))))
    return [
        {
            "alert_id": a.get("alert_id"),
            "rule_id": a.get("rule_id"),
            "severity": a.get("severity"),
            "metric": a.get("metric"),
            "status": a.get("status"),
            "raised_value": a.get("raised_value"),
            "raised_at": rfc3339(int(a.get("raised_at_ms") or 0)),
            "retriggers": a.get("retriggers", 0),
            "last_value": a.get("last_value"),
            "acknowledged_by": a.get("acknowledged_by"),
            "acknowledged_at": a.get("acknowledged_at"),
            "note": a.get("note"),
        }
        for a in alerts
    ]


@dataclass(frozen=True)
class Page:
    items: list[dict[str, Any]]
    next_cursor: str | None


def _lex_range(after: str | None, prefix: str) -> tuple[str, str]:
    """ZRANGEBYLEX bounds of the ids after `after` that start with `prefix`."""
    stop = f"({prefix}\U0010ffff" if prefix else "+"
    if after is not None and after >= prefix:
        return f"({after}", stop
    return (f"[{prefix}" if prefix else "-"), stop


class ViewReader:
    """Read-only access to one namespace's device views."""

    def __init__(self, redis: Redis, namespace: str, ttl: float = GENERATION_TTL_S) -> None:
        self._redis = redis
        self.current = CurrentKeys(redis, namespace, ttl=ttl)
        self._state_keys = (marker_key(namespace), rebuilding_key(namespace))
        self._seen_marker = False

    async def complete(self, *, fresh: bool = False) -> bool:
        """False while the views are known incomplete: the projector flagged them (Redis lost
        its data, a rebuild is under way), or the loss marker this reader has seen is gone (a
        loss the projector has not flagged yet). Views without a marker that this reader never
        saw (written before markers existed) count as complete.

        Cached with the generation (the same read), or `fresh`: read now, as a check after a
        read has been answered from the views (a loss within the cache time must not pass)."""
        if fresh:
            raw_marker, raw_rebuilding = await self._redis.mget(self._state_keys)
            marker, rebuilding = _text(raw_marker), _text(raw_rebuilding)
        else:
            await self.current.resolve()
            marker, rebuilding = self.current.marker, self.current.rebuilding
        if marker is not None:
            self._seen_marker = True
        lost = self._seen_marker and marker is None
        return rebuilding is None and not lost

    async def keys(self) -> ViewKeys:
        """The keys of the generation in use; each read resolves them once and uses them for
        all its keys, so it never mixes generations across a replay's switch."""
        return await self.current.resolve()

    async def position(self) -> int:
        """The views position: every domain event up to this event-store position is applied."""
        keys = await self.keys()
        raw = cast(str | None, await self._redis.get(keys.position))
        return _int(raw) or 0

    async def device(self, device_id: str) -> dict[str, Any] | None:
        keys = await self.keys()
        fields = cast(dict[str, str], await self._redis.hgetall(keys.device(device_id)))
        return device_view(fields) if fields else None

    async def metric_names(self, device_id: str) -> list[str]:
        keys = await self.keys()
        fields = cast(list[str], await self._redis.hkeys(keys.device(device_id)))
        return [f[len(METRIC_FIELD) :] for f in fields if f.startswith(METRIC_FIELD)]

    async def exists(self, device_id: str) -> bool:
        keys = await self.keys()
        found: bool = await self._redis.hexists(keys.device(device_id), "doc")
        return found

    async def page(
        self,
        *,
        status: str | None,
        labels: Sequence[tuple[str, str]],
        after: str | None,
        limit: int,
        prefix: str = "",
    ) -> Page:
        """Devices in id order after `after`, matching every filter, whose id starts with
        `prefix` (a range of the lexicographic index, so a search costs what a page does)."""
        keys = await self.keys()
        filters = [keys.status(status)] if status else []
        filters += [keys.label(k, v) for k, v in labels]
        if filters:
            ids = await self._filtered_ids(keys, filters, after, limit + 1, prefix)
        else:
            start, stop = _lex_range(after, prefix)
            ids = cast(
                list[str],
                await self._redis.zrangebylex(keys.devices, start, stop, 0, limit + 1),
            )
        entries = await self._summaries(keys, ids[: limit + 1])
        more = len(ids) > limit
        items = entries[:limit]
        next_cursor = encode_cursor(ids[limit - 1]) if more and limit > 0 else None
        return Page(items, next_cursor)

    async def _filtered_ids(
        self, keys: ViewKeys, filters: list[str], after: str | None, want: int, prefix: str
    ) -> list[str]:
        async with self._redis.pipeline(transaction=False) as pipe:
            for key in filters:
                pipe.scard(key)
            sizes: list[int] = await pipe.execute()
        if min(sizes) == 0:
            return []
        if min(sizes) <= INTERSECT_MAX:
            members = cast(set[str], await self._redis.sinter(filters))
            ordered = sorted(
                m for m in members if (after is None or m > after) and m.startswith(prefix)
            )
            return ordered[:want]
        # Large sets: walk the lexicographic index from the cursor, keeping members of all.
        found: list[str] = []
        start, stop = _lex_range(after, prefix)
        while len(found) < want:
            chunk = cast(
                list[str],
                await self._redis.zrangebylex(keys.devices, start, stop, 0, SCAN_CHUNK),
            )
            if not chunk:
                break
            async with self._redis.pipeline(transaction=False) as pipe:
                for key in filters:
                    pipe.smismember(key, chunk)
                flags: list[list[int]] = await pipe.execute()
            for i, device_id in enumerate(chunk):
                if all(f[i] for f in flags):
                    found.append(device_id)
            start = f"({chunk[-1]}"
        return found[:want]

    async def _summaries(self, keys: ViewKeys, ids: Sequence[str]) -> list[dict[str, Any]]:
        if not ids:
            return []
        async with self._redis.pipeline(transaction=False) as pipe:
            for device_id in ids:
                pipe.hmget(keys.device(device_id), ["doc", "online", "last_seen"])
            rows: list[list[str | None]] = await pipe.execute()
        out: list[dict[str, Any]] = []
        for device_id, (doc_raw, online, last_seen) in zip(ids, rows, strict=True):
            doc = _json(doc_raw)
            if not isinstance(doc, dict):  # indexed but its hash not written yet: skip
                continue
            doc.setdefault("device_id", device_id)
            out.append(summary(doc, online, last_seen))
        return out

    async def fleet(self, now_s: float) -> dict[str, Any]:
        """Counts by status, total, online, readings in the last minute (estimate), commands
        pending, open alerts by severity."""
        minute = int(now_s // 60)
        keys = await self.keys()
        async with self._redis.pipeline(transaction=False) as pipe:
            for status in STATUSES:
                pipe.scard(keys.status(status))
            pipe.zcard(keys.devices)
            pipe.scard(keys.online)
            pipe.pfcount(keys.readings(minute))
            pipe.pfcount(keys.readings(minute - 1))
            pipe.get(keys.commands_pending)
            for severity in SEVERITIES:
                pipe.get(keys.alerts_open(severity))
            answers: list[Any] = await pipe.execute()
        by_status = dict(zip(STATUSES, answers[: len(STATUSES)], strict=True))
        alerts = answers[len(answers) - len(SEVERITIES) :]
        total, online, current, previous, pending = answers[len(STATUSES) : -len(SEVERITIES)]
        return {
            "devices": total,
            "by_status": by_status,
            "online": online,
            "readings_last_minute": readings_last_minute(current, previous, now_s),
            "commands_pending": max(0, _int(pending) or 0),
            "alerts_open": {
                severity: max(0, _int(n) or 0)
                for severity, n in zip(SEVERITIES, alerts, strict=True)
            },
        }


def readings_last_minute(current: int, previous: int, now_s: float) -> int:
    """Sliding-window estimate over the per-minute HyperLogLogs.

    The current minute's count plus the previous minute's, weighted by the part of it that
    still lies within the last 60 s (readings assumed evenly spread within a minute); each
    HyperLogLog count has a standard error of 0.81%.
    """
    elapsed = (now_s % 60) / 60
    return round(current + previous * (1 - elapsed))


# -- alerts and rules --------------------------------------------------------------------------

ALERT_STATUSES = ("active", "acknowledged", "cleared", "open")
ALERT_SCAN = 200  # index entries read per round while filling a filtered page


def encode_alert_cursor(raised_at_ms: int, alert_id: str) -> str:
    """An opaque cursor: the (raise time, id) of the last alert of a page."""
    return base64.urlsafe_b64encode(f"{raised_at_ms} {alert_id}".encode()).decode().rstrip("=")


def decode_alert_cursor(cursor: str) -> tuple[int, str]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        ms, alert_id = raw.split(" ", 1)
        if not ms.isdigit() or not alert_id:
            raise ValueError
        return int(ms), alert_id
    except (binascii.Error, UnicodeDecodeError, ValueError) as e:
        raise ValueError("not a cursor returned by this API") from e


def alert_view(fields: Mapping[str, str]) -> dict[str, Any]:
    """An alert hash (each field JSON) as the API shows it."""
    return {name: msgspec.json.decode(value) for name, value in sorted(fields.items())}


class AlertReader:
    """Alerts and rules from the views (see infra.views for the layout)."""

    def __init__(self, views: ViewReader, redis: Redis) -> None:
        self._views = views
        self._redis = redis

    async def alert(self, alert_id: str) -> dict[str, Any] | None:
        keys = await self._views.keys()
        fields = cast(dict[str, str], await self._redis.hgetall(keys.alert(alert_id)))
        return alert_view(fields) if fields else None

    async def alerts(
        self,
        *,
        status: str | None,
        severity: str | None,
        device_id: str | None,
        rule_id: str | None,
        after: tuple[int, str] | None,
        limit: int,
    ) -> Page:
        """Alerts newest raise first (ties: id descending), after the cursor, matching all."""
        keys = await self._views.keys()
        if device_id is not None:
            index = keys.alerts_of_device(device_id)
        elif rule_id is not None:
            index = keys.alerts_of_rule(rule_id)
        elif status in ("open", "active", "acknowledged"):
            index = keys.alerts_in("open")
        elif status == "cleared":
            index = keys.alerts_in("cleared")
        else:
            index = keys.alerts

        def wanted(alert: Mapping[str, Any]) -> bool:
            if status == "open" and alert.get("status") == "cleared":
                return False
            if status not in (None, "open") and alert.get("status") != status:
                return False
            if severity is not None and alert.get("severity") != severity:
                return False
            if device_id is not None and alert.get("device_id") != device_id:
                return False
            return rule_id is None or alert.get("rule_id") == rule_id

        items: list[dict[str, Any]] = []
        # the last index entry consumed: entries at its score with an id >= its id are done
        last_score, last_id = after if after else (None, None)
        num = ALERT_SCAN
        while len(items) <= limit:
            entries = cast(
                list[tuple[str, float]],
                await self._redis.zrevrangebyscore(
                    index,
                    "+inf" if last_score is None else last_score,
                    "-inf",
                    start=0,
                    num=num,
                    withscores=True,
                ),
            )
            fresh = [
                (aid, int(score))
                for aid, score in entries
                if last_score is None
                or int(score) < last_score
                or (last_id is not None and aid < last_id)
            ]
            if not fresh:
                if len(entries) < num:
                    break
                num *= 2  # more alerts share one raise time than a round holds
                continue
            async with self._redis.pipeline(transaction=False) as pipe:
                for aid, _ in fresh:
                    pipe.hgetall(keys.alert(aid))
                found = cast(list[dict[str, str]], await pipe.execute())
            for (aid, score), fields in zip(fresh, found, strict=True):
                last_score, last_id = score, aid
                if fields:
                    alert = alert_view(fields)
                    if wanted(alert):
                        items.append(alert)
                        if len(items) > limit:
                            break
            if len(entries) < num:
                break
        more = False
        if len(items) > limit:
            more = True
            items = items[:limit]
        last = items[-1] if items else None
        next_cursor = (
            encode_alert_cursor(int(last["raised_at_ms"]), str(last["alert_id"]))
            if more and last
            else None
        )
        return Page(items, next_cursor)

    async def rule(self, rule_id: str) -> dict[str, Any] | None:
        keys = await self._views.keys()
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.hget(keys.rule(rule_id), "doc")
            pipe.hget(keys.rules_open, rule_id)
            doc, open_alerts = await pipe.execute()
        if doc is None:
            return None
        return _rule_view(doc, open_alerts)

    async def rules(self, *, enabled: bool | None, severity: str | None) -> list[dict[str, Any]]:
        """Every rule in id order, filtered (rules are few: no pagination)."""
        keys = await self._views.keys()
        ids = cast(list[str], await self._redis.zrangebylex(keys.rules, "-", "+"))
        async with self._redis.pipeline(transaction=False) as pipe:
            for rule_id in ids:
                pipe.hget(keys.rule(rule_id), "doc")
                pipe.hget(keys.rules_open, rule_id)
            found = await pipe.execute()
        out = []
        for doc, open_alerts in zip(found[::2], found[1::2], strict=True):
            if doc is None:
                continue
            rule = _rule_view(doc, open_alerts)
            if enabled is not None and rule.get("enabled") is not enabled:
                continue
            if severity is not None and rule.get("severity") != severity:
                continue
            out.append(rule)
        return out


def _rule_view(doc: str, open_alerts: str | None) -> dict[str, Any]:
    rule: dict[str, Any] = msgspec.json.decode(doc)
    rule["open_alerts"] = max(0, _int(open_alerts) or 0)
    return rule
