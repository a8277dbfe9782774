"""A device's history from the views: its domain events, its state at a time, and what changed.

The views projection keeps, per device (`infra.views.ViewKeys`): `history:<id>`, one JSON entry
per domain event scored by version (its type, time, position, who caused it, its fields and the
state fields it changed); `history_at:<id>`, the versions scored by event time; and
`history_state:<id>`, the whole state after every HISTORY_SNAPSHOT_EVERY-th version. So a page
of events is one range read, and the state at a time is one snapshot plus at most 63 entries
folded, however long the history: the work is bounded by the page or the snapshot interval,
never by the device's number of events.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, cast

import msgspec
from redis.asyncio import Redis

from infra.httpkit import Problem, invalid
from infra.timefmt import parse_time, rfc3339
from infra.views import HISTORY_SNAPSHOT_EVERY, ViewKeys

EVENT_TYPES = (
    "registered",
    "configured",
    "suspended",
    "resumed",
    "decommissioned",
    "secret_rotated",
    "connected",
    "disconnected",
    "command_requested",
    "command_sent",
    "command_acknowledged",
    "command_failed",
    "command_expired",
    "command_cancelled",
    "alert_raised",
    "alert_retriggered",
    "alert_acknowledged",
    "alert_cleared",
)
SCAN_PER_PAGE = 2_000  # entries one filtered page reads at most (then it answers a cursor)
_decode_entry = msgspec.json.Decoder(dict[str, Any]).decode


class BadCursor(ValueError):
    pass


def encode_cursor(version: int) -> str:
    return base64.urlsafe_b64encode(f"h{version}".encode()).decode().rstrip("=")


def decode_cursor(raw: str) -> int:
    """The version a page continues below (pages go newest first)."""
    try:
        text = base64.urlsafe_b64decode(raw + "=" * (-len(raw) % 4)).decode()
    except (binascii.Error, UnicodeDecodeError, ValueError) as e:
        raise BadCursor("not a cursor this endpoint gave") from e
    if not text.startswith("h") or not text[1:].isdigit() or len(text) > 20:
        raise BadCursor("not a cursor this endpoint gave")
    return int(text[1:])


@dataclass(frozen=True)
class HistoryQuery:
    start_ms: int | None = None  # events at or after
    end_ms: int | None = None  # events at or before
    types: frozenset[str] = frozenset()  # empty: every type
    before_version: int | None = None  # the cursor
    limit: int = 50


@dataclass(frozen=True)
class State:
    """A device's state after `version` (at `at`), as `as_of` answers it."""

    version: int
    at: str
    state: dict[str, Any]


class HistoryReader:
    def __init__(self, redis: Redis) -> None:
        self._redis = redis

    async def page(
        self, keys: ViewKeys, device_id: str, query: HistoryQuery
    ) -> tuple[list[dict[str, Any]], str | None]:
        """Events newest first; the cursor continues below the last one read (stable while
        events are appended: they only ever get higher versions)."""
        high = await self._version_at(keys, device_id, query.end_ms)
        if high is None:
            return [], None
        if query.before_version is not None:
            high = min(high, query.before_version - 1)
        low = 1
        if query.start_ms is not None:
            first = cast(
                list[str],
                await self._redis.zrangebyscore(
                    keys.history_at(device_id), query.start_ms, "+inf", start=0, num=1
                ),
            )
            if not first:
                return [], None
            low = int(first[0])
        if high < low:
            return [], None
        scan = query.limit + 1 if not query.types else max(query.limit + 1, SCAN_PER_PAGE)
        raw = cast(
            list[str],
            await self._redis.zrevrangebyscore(
                keys.history(device_id), high, low, start=0, num=scan
            ),
        )
        items: list[dict[str, Any]] = []
        last_read = None
        for member in raw:
            entry = _decode_entry(member)
            if len(items) == query.limit:
                return items, encode_cursor(items[-1]["version"])
            last_read = int(entry["version"])
            if query.types and entry.get("type") not in query.types:
                continue
            items.append(entry)
        if len(raw) == scan and last_read is not None and last_read > low:
            return items, encode_cursor(last_read)  # filtered: more may match further down
        return items, None

    async def state_at(self, keys: ViewKeys, device_id: str, at_ms: int) -> State | None:
        """The state after the last event at or before `at_ms`; None before registration."""
        version = await self._version_at(keys, device_id, at_ms)
        if version is None:
            return None
        found = await self.state_of(keys, device_id, version)
        if found is not None:
            found.state["reported"] = await self.reported_at(keys, device_id, at_ms)
        return found

    async def reported_at(self, keys: ViewKeys, device_id: str, at_ms: int) -> Any:
        """The last state the device reported at or before `at_ms` ({config, config_version});
        None if it had reported none (or none the views still keep)."""
        newest = cast(
            list[str],
            await self._redis.zrevrangebyscore(
                keys.history_reported(device_id), at_ms, "-inf", start=0, num=1
            ),
        )
        if not newest:
            return None
        entry = _decode_entry(newest[0])
        return {"config": entry.get("reported"), "config_version": entry.get("config_version")}

    async def state_of(self, keys: ViewKeys, device_id: str, version: int) -> State | None:
        snapshot = version - version % HISTORY_SNAPSHOT_EVERY
        state: dict[str, Any] = {}
        start = 1
        if snapshot:
            raw = await self._redis.hget(keys.history_state(device_id), str(snapshot))
            if raw is not None:  # else (views older than the snapshots) fold from the start
                state = _decode_entry(raw)
                start = snapshot + 1
        at = ""
        if start <= version:
            entries = cast(
                list[str],
                await self._redis.zrangebyscore(keys.history(device_id), start, version),
            )
            for member in entries:
                entry = _decode_entry(member)
                state.update(entry.get("changes") or {})
                at = entry.get("at", at)
        if not state:
            return None
        if not at:
            at = await self._time_of(keys, device_id, version)
        return State(version, at, state)

    async def count_between(self, keys: ViewKeys, device_id: str, low: int, high: int) -> int:
        """Events with versions in (low, high]."""
        return int(await self._redis.zcount(keys.history(device_id), f"({low}", high))

    async def _version_at(self, keys: ViewKeys, device_id: str, at_ms: int | None) -> int | None:
        """The device's last version at or before `at_ms` (None: its last); None: no history."""
        if at_ms is None:
            newest = cast(
                list[tuple[str, float]],
                await self._redis.zrevrange(keys.history(device_id), 0, 0, withscores=True),
            )
            return int(newest[0][1]) if newest else None
        found = cast(
            list[str],
            await self._redis.zrevrangebyscore(
                keys.history_at(device_id), at_ms, "-inf", start=0, num=1
            ),
        )
        return int(found[0]) if found else None

    async def _time_of(self, keys: ViewKeys, device_id: str, version: int) -> str:
        score = await self._redis.zscore(keys.history_at(device_id), str(version))
        return rfc3339(int(score)) if score is not None else ""


def diff(before: dict[str, Any], after: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The state fields that differ: {field: {"from": old, "to": new}}."""
    return {
        name: {"from": before.get(name), "to": after.get(name)}
        for name in sorted(set(before) | set(after))
        if before.get(name) != after.get(name)
    }


def _time(params: Mapping[str, str], name: str) -> int | None:
    raw = params.get(name)
    if not raw:
        return None
    try:
        return parse_time(raw)
    except ValueError as e:
        raise invalid(name, str(e)) from e


def parse_query(params: Mapping[str, str], limit: int) -> HistoryQuery:
    start, end = _time(params, "from"), _time(params, "to")
    if start is not None and end is not None and start > end:
        raise invalid("from", "must not be after `to`")
    types = frozenset(t.strip() for t in (params.get("types") or "").split(",") if t.strip())
    unknown = sorted(types - set(EVENT_TYPES))
    if unknown:
        raise invalid("types", f"unknown {', '.join(unknown)}; one of {', '.join(EVENT_TYPES)}")
    before = None
    if params.get("cursor"):
        try:
            before = decode_cursor(params["cursor"])
        except BadCursor as e:
            raise invalid("cursor", str(e)) from e
    return HistoryQuery(start, end, types, before, limit)


async def answer(
    reader: HistoryReader, keys: ViewKeys, device_id: str, params: Mapping[str, str], limit: int
) -> dict[str, Any]:
    """`GET /devices/{id}/history`: a page of events, or with `as_of` the state at a time, or
    with `diff=T1,T2` what changed between two times."""
    as_of, between = params.get("as_of"), params.get("diff")
    if as_of and between:
        raise invalid("as_of", "give either `as_of` or `diff`, not both")
    if as_of:
        at_ms = _time(params, "as_of")
        assert at_ms is not None
        found = await reader.state_at(keys, device_id, at_ms)
        if found is None:
            raise Problem(
                404, "Not Found", f"device {device_id} has no history at or before {as_of}"
            )
        return {
            "device_id": device_id,
            "as_of": rfc3339(at_ms),
            "version": found.version,
            "at": found.at,
            "state": found.state,
        }
    if between:
        first, sep, second = between.partition(",")
        if not sep:
            raise invalid("diff", "two times, T1,T2")
        try:
            t1, t2 = parse_time(first.strip()), parse_time(second.strip())
        except ValueError as e:
            raise invalid("diff", str(e)) from e
        if t1 > t2:
            raise invalid("diff", "T1 must not be after T2")
        before = await reader.state_at(keys, device_id, t1)
        after = await reader.state_at(keys, device_id, t2)
        low = before.version if before else 0
        high = after.version if after else 0
        return {
            "device_id": device_id,
            "from": rfc3339(t1),
            "to": rfc3339(t2),
            "from_version": low,
            "to_version": high,
            "events": await reader.count_between(keys, device_id, low, high) if high else 0,
            "changes": diff(before.state if before else {}, after.state if after else {}),
        }
    items, cursor = await reader.page(keys, device_id, parse_query(params, limit))
    return {"items": items, "next_cursor": cursor}
