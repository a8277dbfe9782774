"""HTTP plumbing shared by every component: problem+json, bodies, bearer roles, health, metrics."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import logging
import re
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from typing import Any, TypeVar

import msgspec
import uvicorn
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from infra import metrics
from infra.settings import ROLES

log = logging.getLogger(__name__)
T = TypeVar("T")

MAX_BODY = 64 * 1024
PROBLEM = "application/problem+json"
_encode = msgspec.json.Encoder().encode
_AT_PATH = re.compile(r"(?:at|in) `\$\.?([^`]*)`")
_MISSING = re.compile(r"missing required field `([^`]+)`")
_UNKNOWN = re.compile(r"unknown field `([^`]+)`")

ReadyCheck = Callable[[], Awaitable[Mapping[str, bool]]]


class Problem(Exception):
    """An error answer in RFC 9457 form."""

    def __init__(self, status: int, title: str, detail: str = "", **extra: Any) -> None:
        super().__init__(f"{status} {title}: {detail}")
        self.status = status
        self.title = title
        self.detail = detail
        self.extra = extra
        self.headers: dict[str, str] = {}

    def body(self, instance: str = "") -> dict[str, Any]:
        doc: dict[str, Any] = {"type": "about:blank", "title": self.title, "status": self.status}
        if self.detail:
            doc["detail"] = self.detail
        if instance:
            doc["instance"] = instance
        doc.update(self.extra)
        return doc

    def response(self, instance: str = "") -> Response:
        return Response(_encode(self.body(instance)), self.status, self.headers, media_type=PROBLEM)


class Admission:
    """At most `limit` requests inside at once; one more is refused at once with 503
    problem+json and `Retry-After`, instead of queueing without bound (load shedding).

    The bound is on requests admitted, running or waiting for a worker thread, so the wait of
    an admitted request is bounded by `limit` requests' work, whatever the offered load. Used
    from one event loop only (no lock): `admit` is entered and left on the loop's thread.
    """

    def __init__(self, limit: int, retry_after: int = 1, what: str = "requests") -> None:
        if limit < 1:
            raise ValueError("the admission limit must be at least 1")
        self.limit = limit
        self.retry_after = retry_after
        self.what = what
        self.active = 0
        self.shed = 0

    @property
    def full(self) -> bool:
        return self.active >= self.limit

    def refuse(self) -> Problem:
        """The 503 answer to a request beyond the limit (counted as shed)."""
        self.shed += 1
        metrics.REQUESTS_SHED.inc()
        problem = Problem(
            503,
            "Service Unavailable",
            f"overloaded: {self.limit} {self.what} are being handled already; "
            f"retry after {self.retry_after} s",
        )
        problem.headers["Retry-After"] = str(self.retry_after)
        return problem

    @contextlib.contextmanager
    def admit(self) -> Iterator[None]:
        """Inside the limit for the `with` block; raises `refuse()` when it is full."""
        if self.full:
            raise self.refuse()
        self.active += 1
        metrics.REQUESTS_ADMITTED.inc()
        try:
            yield
        finally:
            self.active -= 1
            metrics.REQUESTS_ADMITTED.dec()


def json_response(
    body: Any, status: int = 200, headers: Mapping[str, str] | None = None
) -> Response:
    return Response(_encode(body), status, dict(headers or {}), media_type="application/json")


async def read_body(request: Request, limit: int = MAX_BODY) -> bytes:
    """The request body, refused with 413 past the limit without reading it all."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise Problem(413, "Payload Too Large", f"the body must be at most {limit} bytes")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise Problem(413, "Payload Too Large", f"the body must be at most {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def field_of(message: str) -> str:
    """The field a msgspec validation message is about, as a dotted path."""
    for pattern in (_MISSING, _UNKNOWN):
        found = pattern.search(message)
        if found:
            at = _AT_PATH.search(message)
            prefix = at.group(1) + "." if at and at.group(1) else ""
            return prefix + found.group(1)
    at = _AT_PATH.search(message)
    return at.group(1).replace("[...]", "") if at else ""


def decode_body(raw: bytes, type_: type[T]) -> T:
    """Decode JSON into a typed struct: malformed JSON is 400, a wrong shape is 422."""
    if not raw.strip():
        raw = b"{}"
    try:
        return msgspec.json.decode(raw, type=type_)
    except msgspec.ValidationError as e:
        field = field_of(str(e))
        raise Problem(
            422,
            "Unprocessable Content",
            str(e),
            errors=[{"field": field, "message": str(e)}],
        ) from e
    except msgspec.DecodeError as e:
        raise Problem(400, "Bad Request", f"malformed JSON: {e}") from e


def invalid(field: str, message: str) -> Problem:
    """422 for a bad value of one field (a query parameter or body member), naming it."""
    return Problem(
        422,
        "Unprocessable Content",
        f"{field}: {message}",
        errors=[{"field": field, "message": message}],
    )


class Authorizer:
    """Bearer tokens with roles viewer < operator < admin; compares in constant time."""

    def __init__(self, tokens: Mapping[str, str], names: Mapping[str, str] | None = None) -> None:
        self._tokens = [(t.encode(), r) for t, r in tokens.items()]
        self._names = {_principal(t.encode()): n for t, n in (names or {}).items()}

    def name_of(self, principal: str) -> str:
        """The token's name (`token=role:name`), else `token-` and its principal's first 8."""
        return self._names.get(principal) or f"token-{principal[:8]}"

    def authorize(self, request: Request, needed: str) -> str:
        """Return the caller's principal id, or raise 401/403."""
        return self.identify(request, needed)[0]

    def identify(self, request: Request, needed: str = "viewer") -> tuple[str, str]:
        """The caller's (principal id, role), or raise 401/403."""
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        role = None
        if scheme.lower() == "bearer" and token:
            presented = token.strip().encode()
            for known, known_role in self._tokens:
                if hmac.compare_digest(presented, known):
                    role = known_role
        if role is None:
            problem = Problem(401, "Unauthorized", "a valid bearer token is required")
            problem.headers["WWW-Authenticate"] = 'Bearer realm="iot"'
            raise problem
        if ROLES.index(role) < ROLES.index(needed):
            raise Problem(403, "Forbidden", f"this needs the {needed} role; the token is {role}")
        return _principal(presented), role


def _principal(token: bytes) -> str:
    return hashlib.sha256(token).hexdigest()[:32]


class AdmissionMiddleware:
    """Pure ASGI: a request that `gated(scope)` selects enters `admission` first, before
    routing, so one beyond the limit costs the least there is: a 503 problem+json with
    `Retry-After` sent at once, its body never read."""

    def __init__(self, app: ASGIApp, admission: Admission, gated: Callable[[Scope], bool]) -> None:
        self.app = app
        self.admission = admission
        self.gated = gated

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self.gated(scope):
            await self.app(scope, receive, send)
            return
        if self.admission.full:
            response = self.admission.refuse().response(scope["path"])
            await response(scope, receive, send)
            return
        with self.admission.admit():
            await self.app(scope, receive, send)


class MetricsMiddleware:
    """Counts requests and their latency by route template (pure ASGI, cheap)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            route = scope.get("route")
            template = getattr(route, "path", "unmatched")
            method = scope["method"]
            metrics.HTTP_REQUESTS.labels(method, template, str(status)).inc()
            metrics.HTTP_LATENCY.labels(method, template).observe(time.perf_counter() - start)


def health_routes(ready: ReadyCheck) -> list[BaseRoute]:
    async def healthz(_: Request) -> Response:
        return json_response({"status": "ok"})

    async def readyz(_: Request) -> Response:
        try:
            # within 2 s: a probe times out at 3 (deploy/), so a hung check answers 503 rather
            # than nothing; a busy machine still gets its 2 s before it is called not ready
            checks = dict(await asyncio.wait_for(ready(), timeout=2.0))
        except Exception as e:  # a hung or failing check means not ready
            checks = {"check": False}
            log.warning("readiness check failed", extra={"error": repr(e)})
        ok = all(checks.values())
        return json_response({"ready": ok, "checks": checks}, 200 if ok else 503)

    async def metrics_endpoint(_: Request) -> Response:
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    return [
        Route("/healthz", healthz),
        Route("/readyz", readyz),
        Route("/metrics", metrics_endpoint),
    ]


async def _problem_handler(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, Problem)
    return exc.response(request.url.path)


async def _http_exception_handler(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    problem = Problem(exc.status_code, _title(exc.status_code), exc.detail or "")
    if exc.headers:
        problem.headers.update(exc.headers)
    return problem.response(request.url.path)


async def _error_handler(request: Request, exc: Exception) -> Response:
    log.exception("unhandled error", extra={"path": request.url.path})
    return Problem(500, "Internal Server Error", "see the server log").response(request.url.path)


def _title(status: int) -> str:
    from http import HTTPStatus

    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Error"


# What a browser on an admitted origin may send and read (CORS): the API's own headers.
CORS_REQUEST_HEADERS = ["Authorization", "Content-Type", "Idempotency-Key", "If-Match"]
CORS_EXPOSED_HEADERS = ["ETag", "Location", "Retry-After", "Iot-Position", "Idempotent-Replayed"]


def build_app(
    routes: Sequence[BaseRoute],
    ready: ReadyCheck,
    *,
    admission: Admission | None = None,
    gated: Callable[[Scope], bool] = lambda _: True,
    cors_origins: Sequence[str] = (),
    **kwargs: Any,
) -> Starlette:
    """The component's app: health and metrics routes beside `routes`; with `admission`, the
    requests `gated` selects are shed beyond its limit (AdmissionMiddleware); with
    `cors_origins`, browsers on those origins may call it (a preflight is answered before
    authentication or admission, and never counts against either)."""
    middleware: list[Middleware] = []
    if cors_origins:
        middleware.append(
            Middleware(
                CORSMiddleware,
                allow_origins=list(cors_origins),
                allow_methods=["GET", "POST", "PATCH", "DELETE", "OPTIONS"],
                allow_headers=CORS_REQUEST_HEADERS,
                expose_headers=CORS_EXPOSED_HEADERS,
                max_age=600,
            )
        )
    middleware.append(Middleware(MetricsMiddleware))
    if admission is not None:
        middleware.append(Middleware(AdmissionMiddleware, admission=admission, gated=gated))
    return Starlette(
        routes=[*health_routes(ready), *routes],
        middleware=middleware,
        exception_handlers={
            Problem: _problem_handler,
            HTTPException: _http_exception_handler,
            Exception: _error_handler,
        },
        **kwargs,
    )


class _Server(uvicorn.Server):
    """A uvicorn server that leaves signals to the process's composition root."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


async def serve(app: ASGIApp, host: str, port: int, stop: asyncio.Event) -> None:
    """Serve until `stop` is set."""
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        access_log=False,
        log_config=None,
        lifespan="off",
        loop="none",
        http="httptools",
        timeout_graceful_shutdown=5,
    )
    server = _Server(config)
    task = asyncio.create_task(server.serve())
    stopper = asyncio.create_task(stop.wait())
    await asyncio.wait({task, stopper}, return_when=asyncio.FIRST_COMPLETED)
    server.should_exit = True
    stopper.cancel()
    await task


def etag_of(body: bytes) -> str:
    return '"' + hashlib.sha256(body).hexdigest()[:32] + '"'


def etag_matches(header: str, etag: str) -> bool:
    """If-None-Match semantics (weak comparison, `*` matches anything)."""
    for raw in header.split(","):
        candidate = raw.strip()
        if candidate == "*" or candidate.removeprefix("W/") == etag:
            return True
    return False
