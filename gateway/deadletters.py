"""`GET /deadletters` (admin): a page of the DEADLETTER stream, over the gateway's NATS
connection (the one that reads the log's head); read-only, an ephemeral consumer per page."""

from __future__ import annotations

import logging
from typing import Any

from nats.errors import Error as NatsError
from starlette.datastructures import QueryParams

from domain.device import DEVICE_ID
from gateway.loghead import LogHead
from infra.deadletters import MAX_LIMIT, list_dead_letters, reason_subject
from infra.httpkit import Problem, invalid
from infra.streams import Streams
from infra.timefmt import parse_time

log = logging.getLogger(__name__)
DEFAULT_LIMIT = 100
READ_TIMEOUT_S = 5.0


def _unavailable() -> Problem:
    problem = Problem(503, "Service Unavailable", "the dead-letter stream is unreachable")
    problem.headers["Retry-After"] = "1"
    return problem


async def page(log_head: LogHead | None, params: QueryParams) -> dict[str, Any]:
    """`{"items": [dead letter, ...], "next_cursor": str | None}`; 422 naming a bad parameter,
    503 without NATS."""
    streams = log_head.streams if log_head is not None else Streams()
    device_id = params.get("device_id") or None
    if device_id is not None and not DEVICE_ID.fullmatch(device_id):
        raise invalid("device_id", f"must match {DEVICE_ID.pattern}")
    reason = params.get("reason") or None
    try:
        reason_subject(streams, reason)
    except ValueError as e:
        raise invalid("reason", str(e)) from e
    since_ms = None
    if params.get("since"):
        try:
            since_ms = parse_time(params["since"])
        except ValueError as e:
            raise invalid("since", str(e)) from e
    cursor = None
    if params.get("cursor"):
        raw = params["cursor"]
        if not (raw.isascii() and raw.isdigit()) or len(raw) > 19:
            raise invalid("cursor", "the `next_cursor` of an earlier page")
        cursor = int(raw)
    limit = DEFAULT_LIMIT
    if params.get("limit"):
        raw = params["limit"]
        if not (raw.isascii() and raw.isdigit()) or not 1 <= int(raw) <= MAX_LIMIT:
            raise invalid("limit", f"an integer from 1 to {MAX_LIMIT}")
        limit = int(raw)
    nc = log_head.nc if log_head is not None else None
    if nc is None or not nc.is_connected:
        raise _unavailable()
    try:
        letters, next_cursor = await list_dead_letters(
            nc.jetstream(timeout=READ_TIMEOUT_S),
            streams,
            device_id=device_id,
            reason=reason,
            since_ms=since_ms,
            cursor=cursor,
            limit=limit,
        )
    except (NatsError, TimeoutError) as e:
        log.warning("cannot read the dead-letter stream", extra={"error": repr(e)})
        raise _unavailable() from e
    return {
        "items": [letter.to_json() for letter in letters],
        "next_cursor": None if next_cursor is None else str(next_cursor),
    }
