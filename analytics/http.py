"""The analytics service's own API: `POST /api/v1/rules/test` (operator role).

Body: `{"rule": {...a rule definition...}, "since"?: "24h"}` or `{"rule", "from", "to"?}` (RFC
3339 with an offset, or epoch ms; `to` defaults to now, `since` to 24h). The answer is
`analytics.ruletest.RuleTestResult` as JSON. One test runs at a time per replica (it shares
the replica's CPU with the live evaluation): a second one meanwhile gets 429 with
`Retry-After`. Rule problems are 422 with every problem listed, like the command API's.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping
from typing import Any

import msgspec
from nats.aio.client import Client as NATS
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from analytics.catalog import DeviceInfo
from analytics.ruletest import MAX_SPAN_MS, parse_since, run_rule_test
from domain.rules import RuleInvalid, spec_to_dict, validate_rule
from infra import timefmt
from infra.httpkit import Authorizer, Problem, invalid, json_response, read_body

PREFIX = "/api/v1"
DEFAULT_SINCE = "24h"
_FIELDS = ("rule", "since", "from", "to")


def parse_time(value: Any, field: str) -> int:
    """RFC 3339 with an offset, or epoch milliseconds, as epoch ms; 422 otherwise."""
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)  # a negative one is refused as not a time
    if not isinstance(value, str):
        raise invalid(field, "an RFC 3339 timestamp or epoch milliseconds")
    try:
        return timefmt.parse_time(value)
    except ValueError as e:
        raise invalid(field, str(e)) from None


def period(body: Mapping[str, Any], now_ms: int) -> tuple[int, int]:
    """[from, to) of a rule test request, in epoch ms."""
    to_ms = parse_time(body["to"], "to") if body.get("to") is not None else now_ms
    if body.get("from") is not None:
        if body.get("since") is not None:
            raise invalid("since", "give either since or from, not both")
        from_ms = parse_time(body["from"], "from")
    else:
        since = body.get("since", DEFAULT_SINCE)
        if not isinstance(since, str):
            raise invalid("since", "a duration like 30m, 24h or 7d")
        try:
            from_ms = to_ms - parse_since(since)
        except ValueError as e:
            raise invalid("since", str(e)) from None
    if from_ms >= to_ms:
        raise invalid("from", "must be before to")
    if to_ms - from_ms > MAX_SPAN_MS:
        raise invalid("from", "at most 31 days of history")
    return from_ms, to_ms


def rule_test_routes(
    nc: NATS,
    namespace: str,
    authorizer: Authorizer,
    devices: Callable[[], Mapping[str, DeviceInfo]],
    clock: Callable[[], float] = time.time,
) -> list[BaseRoute]:
    busy = asyncio.Lock()

    async def rule_test(request: Request) -> Response:
        authorizer.authorize(request, "operator")
        raw = await read_body(request)
        try:
            body = msgspec.json.decode(raw)
        except msgspec.DecodeError:
            raise Problem(400, "Bad Request", "the body is not JSON") from None
        if not isinstance(body, dict):
            raise invalid("(body)", "a JSON object with rule and since, or from and to")
        unknown = sorted(set(body) - set(_FIELDS))
        if unknown:
            raise invalid(unknown[0], f"unknown field; expected {', '.join(_FIELDS)}")
        if "rule" not in body:
            raise invalid("rule", "required: the draft rule's definition")
        try:
            spec = validate_rule(body["rule"])
        except RuleInvalid as e:
            errors = [{"field": f"rule{'.' + p if p else ''}", "message": m} for p, m in e.problems]
            raise Problem(422, "Unprocessable Content", e.reason, errors=errors) from None
        from_ms, to_ms = period(body, int(clock() * 1000))
        if busy.locked():
            problem = Problem(429, "Too Many Requests", "a rule test is already running here")
            problem.headers["Retry-After"] = "5"
            raise problem
        async with busy:
            result = await run_rule_test(
                nc, namespace, spec, spec_to_dict(spec), dict(devices()), from_ms, to_ms
            )
        return json_response(msgspec.to_builtins(result))

    return [Route(PREFIX + "/rules/test", rule_test, methods=["POST"])]
