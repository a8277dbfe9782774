"""Read-only gateway API (port 8082, prefix /api/v1): views from Redis, telemetry from InfluxDB."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import anyio
import msgspec
import redis.exceptions
from prometheus_client import Counter, Histogram
from redis.asyncio import Redis
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from domain.device import DEVICE_ID, LABEL_KEY
from domain.rules import RULE_ID
from gateway import dashboard as dashboard_files
from gateway import deadletters, history, metrics
from gateway.aggregates import (
    AggregateQuery,
    AggregateRefused,
    fleet_aggregates,
    parse_group_by,
    telemetry_series,
)
from gateway.influx import InfluxQL, InfluxQueryError, InfluxUnavailable, Series
from gateway.loghead import LogHead
from gateway.openapi import AFTER_WAIT_S, BEYOND_HEAD_GRACE_S, openapi_document
from gateway.ratelimit import RateLimiter, Verdict
from gateway.report_html import MEDIA_TYPES, render
from gateway.reports import FORMATS, ReportBuilder, ReportQuery, ReportRefused
from gateway.telemetry import (
    AGGS,
    MAX_POINTS,
    METRIC,
    TelemetryQuery,
    TooManyPoints,
    build_influxql,
    series_from_rows,
    suggest_every,
)
from gateway.views import (
    ALERT_STATUSES,
    AlertReader,
    ViewReader,
    decode_alert_cursor,
    decode_cursor,
)
from infra.httpkit import Authorizer, Problem, ReadyCheck, build_app, etag_matches, etag_of, invalid
from infra.timefmt import format_duration, parse_duration, parse_time, rfc3339
from infra.views import SEVERITIES, STATUSES

log = logging.getLogger(__name__)
PREFIX = "/api/v1"
DEFAULT_LIMIT = 50
MAX_LIMIT = 500
MAX_PREFIX = 128  # a device id search (`prefix`), as long as any id
DEFAULT_RANGE_MS = 3_600_000
AGGREGATE_RANGE_MS = 86_400_000  # a fleet aggregate's default period: the day before `to`
REPORT_RANGE_MS = 86_400_000  # a report's default period: the day before `to`
KEEPALIVE_S = 15.0
AFTER_POLL_S = 0.02
HEAD_FIRST_POLL_S = 0.01  # re-reads of the log's head during the grace double from this
AFTER_HEADER = "Iot-After"
POSITION_HEADER = "Iot-Position"
MAX_POSITION = 2**63 - 1
_encode = msgspec.json.Encoder().encode

Handler = Callable[[Request], Awaitable[Any]]

AFTER_WAIT = Histogram(
    "iot_gateway_after_wait_seconds",
    "Time reads with `after` waited for the views to reach the position",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0),
)
AFTER_TIMEOUTS = Counter(
    "iot_gateway_after_timeouts_total",
    "Reads with `after` answered 503 because the views did not catch up in time",
)
VIEWS_REBUILDING = Counter(
    "iot_gateway_views_rebuilding_total",
    "View reads answered 503 because the views were being rebuilt after Redis lost them",
)
AFTER_BEYOND_HEAD = Counter(
    "iot_gateway_after_beyond_head_total",
    "Reads with `after` answered 400 because the position is beyond the log's head",
)


@dataclass(frozen=True)
class Gateway:
    """What the API reads from: views, telemetry, tokens, the rate limiter and a clock."""

    views: ViewReader
    influx: InfluxQL
    authorizer: Authorizer
    limiter: RateLimiter
    redis: Redis
    clock: Callable[[], float] = time.time
    max_points: int = MAX_POINTS
    after_wait_s: float = AFTER_WAIT_S
    after_poll_s: float = AFTER_POLL_S
    log_head: LogHead | None = None  # None: the head is never known, every token may wait
    beyond_head_grace_s: float = BEYOND_HEAD_GRACE_S
    commands_url: str = ""  # the command API as the dashboard's browsers reach it


def conditional(request: Request, body: Any, headers: dict[str, str]) -> Response:
    """A JSON answer with an ETag; 304 without a body when If-None-Match matches it."""
    raw = _encode(body)
    etag = etag_of(raw)
    headers = {**headers, "ETag": etag, "Cache-Control": "private, no-cache"}
    if etag_matches(request.headers.get("if-none-match", ""), etag):
        return Response(status_code=304, headers=headers)
    return Response(raw, 200, headers, media_type="application/json")


def rate_headers(verdict: Verdict) -> dict[str, str]:
    return {"RateLimit-Limit": str(verdict.limit), "RateLimit-Remaining": str(verdict.remaining)}


def too_many_points(
    query: TelemetryQuery, metrics_count: int, max_points: int, estimated: int | None = None
) -> Problem:
    metrics.TELEMETRY_REFUSED.inc()
    every = suggest_every(query.start_ms, query.end_ms, metrics_count, max_points)
    extra: dict[str, Any] = {"max_points": max_points, "suggested_every": every}
    if estimated is not None:
        extra["estimated_points"] = estimated
    return Problem(
        400,
        "Bad Request",
        f"the answer would have more than {max_points} points",
        hint=(
            f"downsample with every={every}&agg=mean (the smallest interval that fits), "
            "narrow the time range, or name fewer metrics"
        ),
        **extra,
    )


def parse_after(request: Request) -> int | None:
    """The position a read must reflect: `?after=` or `Iot-After` (the larger if both)."""
    wanted: int | None = None
    for source, raw in (
        ("after", request.query_params.get("after")),
        (AFTER_HEADER, request.headers.get(AFTER_HEADER.lower())),
    ):
        if raw is None:
            continue
        text = raw.strip()
        if not (text.isascii() and text.isdigit()) or int(text) > MAX_POSITION:
            raise Problem(
                400,
                "Bad Request",
                f"{source} must be an event position, a non-negative integer "
                "(the Iot-Position of a command API answer)",
                errors=[{"field": source, "message": "a non-negative integer"}],
            )
        wanted = max(wanted or 0, int(text))
    return wanted


def parse_limit(raw: str | None) -> int:
    if raw is None or raw == "":
        return DEFAULT_LIMIT
    if not raw.isdigit() or not 1 <= int(raw) <= MAX_LIMIT:
        raise invalid("limit", f"an integer from 1 to {MAX_LIMIT}")
    return int(raw)


def parse_labels(raw: list[str]) -> list[tuple[str, str]]:
    labels: list[tuple[str, str]] = []
    for item in raw:
        key, sep, value = item.partition(":")
        if not sep or not LABEL_KEY.fullmatch(key) or len(value) > 256:
            raise invalid("label", f"key:value with a key matching {LABEL_KEY.pattern}")
        labels.append((key, value))
    return labels


def parse_metrics(raw: list[str]) -> tuple[str, ...]:
    names: list[str] = []
    for item in raw:
        for name in item.split(","):
            if not METRIC.fullmatch(name):
                raise invalid("metric", f"metric names match {METRIC.pattern}, got {name[:80]!r}")
            if name not in names:
                names.append(name)
    return tuple(names)


def telemetry_query(device_id: str, request: Request, now_ms: int) -> TelemetryQuery:
    params = request.query_params
    metric_names = parse_metrics(params.getlist("metric"))
    try:
        end = parse_time(params["to"]) if params.get("to") else now_ms
    except ValueError as e:
        raise invalid("to", str(e)) from e
    try:
        start = parse_time(params["from"]) if params.get("from") else end - DEFAULT_RANGE_MS
    except ValueError as e:
        raise invalid("from", str(e)) from e
    if start >= end:
        raise invalid("from", "must be before `to`")
    every_ms: int | None = None
    agg = params.get("agg") or None
    if params.get("every"):
        try:
            every_ms = parse_duration(params["every"])
        except ValueError as e:
            raise invalid("every", str(e)) from e
        agg = agg or "mean"
    elif agg is not None:
        raise invalid("agg", "needs `every`")
    if agg is not None and agg not in AGGS:
        raise invalid("agg", f"one of {', '.join(AGGS)}")
    return TelemetryQuery(device_id, start, end, metric_names, every_ms, agg)


async def issued(gateway: Gateway, after: int) -> None:
    """400 if `after` is beyond the log's head, still after the grace (a token the command API
    has just issued can be a few ms ahead of the relay's publish); nothing if the log has
    reached it, or if the head is unknown (no NATS: then the token may wait, as it always could)."""
    if gateway.log_head is None:
        return
    head = await gateway.log_head.head()
    grace_end = time.monotonic() + gateway.beyond_head_grace_s
    pause = HEAD_FIRST_POLL_S
    while head is not None and head < after and time.monotonic() < grace_end:
        await anyio.sleep(min(pause, max(0.0, grace_end - time.monotonic())))
        pause *= 2
        head = await gateway.log_head.head()
    if head is None or head >= after:
        return
    AFTER_BEYOND_HEAD.inc()
    raise Problem(
        400,
        "Bad Request",
        f"position {after} is beyond the log's head {head}: it was never issued",
        after=after,
        head=head,
    )


async def caught_up(gateway: Gateway, after: int | None) -> int:
    """The views position once it has reached `after`. Ahead of the views, `after` must be a
    position the log has reached (else 400, `issued`); then the read waits for the views, 503
    if they have not reached it within the bound. Reads without `after`, or with one the views
    have reached, never look at the log."""
    position = await gateway.views.position()
    if after is None or position >= after:
        return position
    deadline = time.monotonic() + gateway.after_wait_s
    started = time.perf_counter()
    await issued(gateway, after)
    position = await gateway.views.position()
    while position < after and time.monotonic() < deadline:
        await anyio.sleep(min(gateway.after_poll_s, max(0.0, deadline - time.monotonic())))
        position = await gateway.views.position()
    AFTER_WAIT.observe(time.perf_counter() - started)
    if position >= after:
        return position
    AFTER_TIMEOUTS.inc()
    problem = Problem(
        503,
        "Service Unavailable",
        f"the views have not reached position {after} within {gateway.after_wait_s:g} s "
        f"(they are at {position}); retry shortly",
        position=position,
        after=after,
    )
    problem.headers["Retry-After"] = "1"
    problem.headers[POSITION_HEADER] = str(position)
    raise problem


REBUILDING_RETRY_S = 2


async def views_complete(gateway: Gateway, *, fresh: bool = False) -> None:
    """503 while the views are known incomplete (Redis lost its data and they are being rebuilt
    from the log): a partial view answered 200 would be indistinguishable from a true one.
    Checked before a read (cached) and again after it (`fresh`), so that a loss during the
    read, or within the generation's cache time before it, is not answered either."""
    if await gateway.views.complete(fresh=fresh):
        return
    VIEWS_REBUILDING.inc()
    problem = Problem(
        503,
        "Service Unavailable",
        "the views are being rebuilt from the log (Redis lost its data); until then they "
        "would be incomplete, so none is answered: retry shortly",
        rebuilding=True,
    )
    problem.headers["Retry-After"] = str(REBUILDING_RETRY_S)
    raise problem


def create_app(gateway: Gateway, ready: ReadyCheck) -> Starlette:
    def endpoint(
        handler: Handler, consistent: bool = True
    ) -> Callable[[Request], Awaitable[Response]]:
        async def wrapped(request: Request) -> Response:
            principal = gateway.authorizer.authorize(request, "viewer")
            after = parse_after(request) if consistent else None
            headers: dict[str, str] = {}
            try:
                verdict = await gateway.limiter.hit(principal)
                if not verdict.allowed:
                    metrics.RATE_LIMITED.inc()
                    problem = Problem(
                        429,
                        "Too Many Requests",
                        f"at most {verdict.limit} requests a minute per token",
                    )
                    problem.headers.update(rate_headers(verdict))
                    problem.headers["Retry-After"] = str(verdict.retry_after_s)
                    raise problem
                if consistent:
                    await views_complete(gateway)
                    headers[POSITION_HEADER] = str(await caught_up(gateway, after))
                try:
                    body = await handler(request)
                except Problem:
                    if consistent:  # a 404 or 422 from lost views is no answer either
                        await views_complete(gateway, fresh=True)
                    raise
                if consistent:
                    await views_complete(gateway, fresh=True)
            except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as e:
                log.warning("Redis unavailable", extra={"error": repr(e)})
                problem = Problem(503, "Service Unavailable", "the views store is unreachable")
                problem.headers["Retry-After"] = "1"
                raise problem from e
            headers.update(rate_headers(verdict))
            if isinstance(body, Response):
                body.headers.update(headers)
                return body
            return conditional(request, body, headers)

        return wrapped

    def device_id_of(request: Request) -> str:
        device_id: str = request.path_params["device_id"]
        if not DEVICE_ID.fullmatch(device_id):
            raise Problem(404, "Not Found", "no such device")
        return device_id

    async def list_devices(request: Request) -> Any:
        params = request.query_params
        status = params.get("status") or None
        if status is not None and status not in STATUSES:
            raise invalid("status", f"one of {', '.join(STATUSES)}")
        labels = parse_labels(params.getlist("label"))
        prefix = params.get("prefix", "")
        if len(prefix) > MAX_PREFIX:
            raise invalid("prefix", f"at most {MAX_PREFIX} characters")
        limit = parse_limit(params.get("limit"))
        after = None
        if params.get("cursor"):
            try:
                after = decode_cursor(params["cursor"])
            except ValueError as e:
                raise invalid("cursor", str(e)) from e
        page = await gateway.views.page(
            status=status, labels=labels, after=after, limit=limit, prefix=prefix
        )
        return {"items": page.items, "next_cursor": page.next_cursor}

    async def get_device(request: Request) -> Any:
        device_id = device_id_of(request)
        view = await gateway.views.device(device_id)
        if view is None:
            raise Problem(404, "Not Found", f"no device {device_id}")
        return view

    history_reader = history.HistoryReader(gateway.redis)

    async def device_history(request: Request) -> Any:
        device_id = device_id_of(request)
        if not await gateway.views.exists(device_id):
            raise Problem(404, "Not Found", f"no device {device_id}")
        limit = parse_limit(request.query_params.get("limit"))
        keys = await gateway.views.keys()
        return await history.answer(history_reader, keys, device_id, request.query_params, limit)

    async def telemetry(request: Request) -> Any:
        device_id = device_id_of(request)
        query = telemetry_query(device_id, request, int(gateway.clock() * 1000))
        if not await gateway.views.exists(device_id):
            raise Problem(404, "Not Found", f"no device {device_id}")
        limit = gateway.max_points
        if query.downsampled:
            known = len(query.metrics) or len(await gateway.views.metric_names(device_id))
            estimated = query.estimated_points(known)
            if estimated > limit:
                raise too_many_points(query, max(known, 1), limit, estimated)
        statement = build_influxql(query, limit)
        started = time.perf_counter()
        source = "raw"
        rolled: dict[str, list[list[Any]]] | None = None
        try:
            if query.downsampled:  # from the rollups when they can answer it
                answer = await telemetry_series(
                    gateway.influx, query, int(gateway.clock() * 1000), max_points=limit
                )
                found: list[Series] = []
                partial, source, rolled = False, answer.source, answer.series
            else:
                found, partial = await gateway.influx.query(statement)
        except TooManyPoints:
            raise too_many_points(query, max(len(query.metrics), 1), limit) from None
        except InfluxUnavailable as e:
            log.warning("InfluxDB unavailable", extra={"error": str(e)})
            problem = Problem(503, "Service Unavailable", "the time-series store is unreachable")
            problem.headers["Retry-After"] = "1"
            raise problem from e
        except InfluxQueryError as e:
            if "unsupported" in str(e):
                raise invalid("agg", f"{query.agg} does not apply to a non-numeric metric") from e
            log.warning("InfluxQL error", extra={"error": str(e), "statement": statement})
            raise Problem(502, "Bad Gateway", "the time-series store refused the query") from e
        finally:
            metrics.INFLUX_QUERY.observe(time.perf_counter() - started)
        columns = found[0].columns if found else ["time"]
        rows = found[0].values if found else []
        if partial:
            raise too_many_points(query, len(query.metrics) or len(columns) - 1, limit)
        try:
            series = rolled if rolled is not None else series_from_rows(query, columns, rows, limit)
        except TooManyPoints:
            raise too_many_points(query, len(query.metrics) or len(columns) - 1, limit) from None
        body = {
            "device_id": device_id,
            "from": rfc3339(query.start_ms),
            "to": rfc3339(query.end_ms),
            "every": format_duration(query.every_ms) if query.every_ms else None,
            "agg": query.agg,
            "series": series,
        }
        if query.downsampled:  # raw points, or the rollups that answered
            body["source"] = source
        return body

    alerts_reader = AlertReader(gateway.views, gateway.redis)

    async def list_alerts(request: Request) -> Any:
        params = request.query_params
        status = params.get("status") or None
        if status is not None and status not in ALERT_STATUSES:
            raise invalid("status", f"one of {', '.join(ALERT_STATUSES)}")
        severity = params.get("severity") or None
        if severity is not None and severity not in SEVERITIES:
            raise invalid("severity", f"one of {', '.join(SEVERITIES)}")
        device_id = params.get("device_id") or None
        if device_id is not None and not DEVICE_ID.fullmatch(device_id):
            raise invalid("device_id", f"must match {DEVICE_ID.pattern}")
        rule_id = params.get("rule_id") or None
        if rule_id is not None and not RULE_ID.fullmatch(rule_id):
            raise invalid("rule_id", f"must match {RULE_ID.pattern}")
        limit = parse_limit(params.get("limit"))
        after = None
        if params.get("cursor"):
            try:
                after = decode_alert_cursor(params["cursor"])
            except ValueError as e:
                raise invalid("cursor", str(e)) from e
        page = await alerts_reader.alerts(
            status=status,
            severity=severity,
            device_id=device_id,
            rule_id=rule_id,
            after=after,
            limit=limit,
        )
        return {"items": page.items, "next_cursor": page.next_cursor}

    async def get_alert(request: Request) -> Any:
        alert_id: str = request.path_params["alert_id"]
        alert = await alerts_reader.alert(alert_id) if len(alert_id) <= 200 else None
        if alert is None:
            raise Problem(404, "Not Found", f"no alert {alert_id[:200]}")
        return alert

    async def list_rules(request: Request) -> Any:
        params = request.query_params
        raw_enabled = params.get("enabled") or None
        if raw_enabled is not None and raw_enabled not in ("true", "false"):
            raise invalid("enabled", "true or false")
        severity = params.get("severity") or None
        if severity is not None and severity not in SEVERITIES:
            raise invalid("severity", f"one of {', '.join(SEVERITIES)}")
        enabled = None if raw_enabled is None else raw_enabled == "true"
        return {"items": await alerts_reader.rules(enabled=enabled, severity=severity)}

    async def get_rule(request: Request) -> Any:
        rule_id: str = request.path_params["rule_id"]
        rule = await alerts_reader.rule(rule_id) if RULE_ID.fullmatch(rule_id) else None
        if rule is None:
            raise Problem(404, "Not Found", f"no rule {rule_id[:200]}")
        return rule

    async def dead_letters(request: Request) -> Any:
        gateway.authorizer.authorize(request, "admin")
        return await deadletters.page(gateway.log_head, request.query_params)

    async def fleet(_: Request) -> Any:
        return await gateway.views.fleet(gateway.clock())

    async def aggregates(request: Request) -> Any:
        params = request.query_params
        metric_names = parse_metrics(params.getlist("metric"))
        if len(metric_names) != 1:
            raise invalid("metric", "exactly one metric name is required")
        now_ms = int(gateway.clock() * 1000)
        try:
            end = parse_time(params["to"]) if params.get("to") else now_ms
        except ValueError as e:
            raise invalid("to", str(e)) from e
        try:
            start = parse_time(params["from"]) if params.get("from") else end - AGGREGATE_RANGE_MS
        except ValueError as e:
            raise invalid("from", str(e)) from e
        if start >= end:
            raise invalid("from", "must be before `to`")
        try:
            every_ms = parse_duration(params.get("every") or "1h")
        except ValueError as e:
            raise invalid("every", str(e)) from e
        try:
            kind, key = parse_group_by(params.get("group_by"))
            query = AggregateQuery(metric_names[0], kind, key, start, end, every_ms)
            body = await fleet_aggregates(
                gateway.influx, gateway.views, gateway.redis, query, now_ms
            )
        except AggregateRefused as e:
            raise invalid(e.field, e.message) from e
        except InfluxUnavailable as e:
            log.warning("InfluxDB unavailable", extra={"error": str(e)})
            problem = Problem(503, "Service Unavailable", "the time-series store is unreachable")
            problem.headers["Retry-After"] = "1"
            raise problem from e
        except InfluxQueryError as e:
            log.warning("InfluxQL error", extra={"error": str(e)})
            raise Problem(502, "Bad Gateway", "the time-series store refused the query") from e
        return {
            "metric": query.metric,
            "group_by": params["group_by"],
            "from": rfc3339(start),
            "to": rfc3339(end),
            "every": format_duration(every_ms),
            **body,
        }

    reports = ReportBuilder(gateway.views, gateway.redis, gateway.influx)

    async def fleet_report(request: Request) -> Any:
        params = request.query_params
        fmt = params.get("format") or "json"
        if fmt not in FORMATS:
            raise invalid("format", f"one of {', '.join(FORMATS)}")
        now_ms = int(gateway.clock() * 1000)
        try:
            end = parse_time(params["to"]) if params.get("to") else now_ms
        except ValueError as e:
            raise invalid("to", str(e)) from e
        try:
            start = parse_time(params["from"]) if params.get("from") else end - REPORT_RANGE_MS
        except ValueError as e:
            raise invalid("from", str(e)) from e
        try:
            report = await reports.build(ReportQuery(start, end, now_ms))
        except ReportRefused as e:
            raise invalid(e.field, e.message) from e
        except InfluxUnavailable as e:
            log.warning("InfluxDB unavailable", extra={"error": str(e)})
            problem = Problem(503, "Service Unavailable", "the time-series store is unreachable")
            problem.headers["Retry-After"] = "1"
            raise problem from e
        except InfluxQueryError as e:
            log.warning("InfluxQL error", extra={"error": str(e)})
            raise Problem(502, "Bad Gateway", "the time-series store refused the query") from e
        if fmt == "json":
            return report
        raw = render(report, fmt, rfc3339(now_ms))
        etag = etag_of(raw)
        name = f"fleet-{report['from'][:10]}.{fmt}"
        headers = {
            "ETag": etag,
            "Cache-Control": "private, no-cache",
            "Content-Disposition": f'inline; filename="{name}"',
        }
        if etag_matches(request.headers.get("if-none-match", ""), etag):
            return Response(status_code=304, headers=headers)
        return Response(raw, 200, headers, media_type=MEDIA_TYPES[fmt])

    async def stream(_: Request) -> Response:
        async def events() -> AsyncIterator[bytes]:
            pubsub = gateway.redis.pubsub()
            try:
                await pubsub.subscribe(gateway.views.current.cached.changes)
                yield b": connected\n\n"
                last_sent = time.monotonic()
                while True:
                    message = await pubsub.get_message(
                        ignore_subscribe_messages=True, timeout=KEEPALIVE_S
                    )
                    if message is None:  # a timeout, or a subscription confirmation
                        if time.monotonic() - last_sent >= KEEPALIVE_S:
                            yield b": keepalive\n\n"
                            last_sent = time.monotonic()
                        continue
                    last_sent = time.monotonic()
                    data = message["data"]
                    device_id = data if isinstance(data, str) else bytes(data).decode()
                    yield b"event: change\ndata: " + _encode({"device_id": device_id}) + b"\n\n"
            finally:
                with anyio.CancelScope(shield=True):  # also when the client went away
                    await pubsub.aclose()

        return StreamingResponse(
            events(),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    document = openapi_document()

    async def openapi(request: Request) -> Response:
        return conditional(request, document, {})

    async def me(request: Request) -> Any:
        principal, role = gateway.authorizer.identify(request)
        return {"name": gateway.authorizer.name_of(principal), "role": role}

    device = PREFIX + "/devices/{device_id}"
    routes = [
        Route(PREFIX + "/devices", endpoint(list_devices), methods=["GET"]),
        Route(device, endpoint(get_device), methods=["GET"]),
        Route(device + "/telemetry", endpoint(telemetry), methods=["GET"]),
        Route(device + "/history", endpoint(device_history), methods=["GET"]),
        Route(PREFIX + "/fleet", endpoint(fleet), methods=["GET"]),
        Route(PREFIX + "/fleet/aggregates", endpoint(aggregates), methods=["GET"]),
        Route(PREFIX + "/reports/fleet", endpoint(fleet_report), methods=["GET"]),
        Route(PREFIX + "/alerts", endpoint(list_alerts), methods=["GET"]),
        Route(PREFIX + "/alerts/{alert_id}", endpoint(get_alert), methods=["GET"]),
        Route(PREFIX + "/rules", endpoint(list_rules), methods=["GET"]),
        Route(PREFIX + "/rules/{rule_id}", endpoint(get_rule), methods=["GET"]),
        Route(PREFIX + "/stream", endpoint(stream, consistent=False), methods=["GET"]),
        Route(PREFIX + "/deadletters", endpoint(dead_letters, consistent=False), methods=["GET"]),
        Route("/openapi.json", openapi, methods=["GET"]),
        Route(PREFIX + "/openapi.json", openapi, methods=["GET"]),
        Route(PREFIX + "/me", endpoint(me, consistent=False), methods=["GET"]),
        *dashboard_files.routes(gateway.commands_url),
    ]
    return build_app(routes, ready)
