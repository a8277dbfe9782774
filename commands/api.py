"""Operator command API (port 8080, prefix /api/v1): routes, validation, roles, idempotency."""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Annotated, Any

import msgspec
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from commands import handlers
from commands.handlers import Answer, Credentials, Outcome
from commands.store import DeviceStore, GroupCommitter, IdempotencyRecord
from domain.device import DEVICE_ID, LABEL_KEY, MAX_NAME, MAX_TYPE, Device
from domain.errors import DomainError, IllegalTransition, InvalidCommand
from iot import metrics
from iot.httpkit import Authorizer, Problem, ReadyCheck, build_app, decode_body, read_body

log = logging.getLogger(__name__)
PREFIX = "/api/v1"
_encode = msgspec.json.Encoder().encode

DeviceId = Annotated[str, msgspec.Meta(pattern=DEVICE_ID.pattern)]
LabelKey = Annotated[str, msgspec.Meta(pattern=LABEL_KEY.pattern)]
LabelValue = Annotated[str, msgspec.Meta(max_length=256)]
Reason = Annotated[str, msgspec.Meta(max_length=500)]


class RegisterBody(msgspec.Struct, forbid_unknown_fields=True):
    name: Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_NAME)]
    type: Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_TYPE)]
    device_id: DeviceId | None = None
    labels: dict[LabelKey, LabelValue] = {}


class ConfigBody(msgspec.Struct, forbid_unknown_fields=True):
    config: dict[str, Any]


class ReasonBody(msgspec.Struct, forbid_unknown_fields=True):
    reason: Reason = ""


class EmptyBody(msgspec.Struct, forbid_unknown_fields=True):
    pass


@dataclass(frozen=True)
class CommandService:
    """What the API needs: the store, a thread pool for it, a clock and id/secret sources."""

    store: DeviceStore
    committer: GroupCommitter
    executor: Executor
    credentials: Credentials
    new_device_id: Callable[[], str]
    clock: Callable[[], datetime] = lambda: datetime.now(UTC)

    async def run(self, fn: Callable[[], Any]) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn)


class _StoreAdapter:
    """Adapts the DeviceStore to the handlers' Store port."""

    def __init__(self, store: DeviceStore, committer: GroupCommitter) -> None:
        self._store = store
        self._committer = committer

    def get(self, device_id: str) -> Device | None:
        return self._store.get(device_id)

    def save_device(self, device: Device, idempotency: IdempotencyRecord | None = None) -> int:
        return self._committer.save_device(device, idempotency)

    def find_idempotency(self, principal: str, key: str) -> IdempotencyRecord | None:
        return self._store.idem.get_idempotency(principal, key)


def _if_match(request: Request) -> int | None:
    raw = request.headers.get("if-match")
    if raw is None:
        return None
    value = raw.strip().removeprefix("W/").strip('"')
    if not value.isdigit():
        raise Problem(400, "Bad Request", 'If-Match must be a device version, like "3"')
    return int(value)


def _device_body(device: Device, **extra: Any) -> dict[str, Any]:
    body = {"device_id": device.device_id, "version": device.version, "status": device.status}
    body.update(extra)
    return body


def _headers(outcome: Outcome) -> dict[str, str]:
    return {"ETag": f'"{outcome.device.version}"', "Iot-Position": str(outcome.position)}


def _replay(record: IdempotencyRecord) -> Response:
    media = "application/problem+json" if record.status >= 400 else "application/json"
    return Response(record.body, record.status, {"Idempotent-Replayed": "true"}, media_type=media)


class Idempotency:
    """One request's Idempotency-Key handling (absent key: all no-ops)."""

    def __init__(self, service: CommandService, request: Request, principal: str, raw: bytes):
        self.service = service
        key = request.headers.get("idempotency-key")
        if key is not None and not 1 <= len(key) <= 255:
            raise Problem(400, "Bad Request", "Idempotency-Key must be 1 to 255 characters")
        self.key = key
        self.principal = principal
        digest = hashlib.sha256(f"{request.method} {request.url.path}\n".encode() + raw)
        self.fingerprint = digest.hexdigest()

    def record(self, status: int, body: dict[str, Any]) -> IdempotencyRecord:
        assert self.key is not None
        stored = {k: v for k, v in body.items() if k != "secret"}  # never persist a secret
        return IdempotencyRecord(
            principal=self.principal,
            key=self.key,
            fingerprint=self.fingerprint,
            status=status,
            body=_encode(stored),
            created_at=self.service.clock(),
        )

    def check(self, found: IdempotencyRecord | None) -> Response | None:
        if found is None:
            return None
        if found.fingerprint != self.fingerprint:
            raise Problem(
                422,
                "Unprocessable Content",
                "this Idempotency-Key was used for a different request",
            )
        return _replay(found)

    def answer(
        self, status: int, shape: Callable[[Device, str | None], dict[str, Any]]
    ) -> Answer | None:
        if self.key is None:
            return None
        return lambda device, secret: self.record(status, shape(device, secret))


def _problem_for(error: DomainError) -> Problem:
    match error:
        case handlers.NotFound():
            return Problem(404, "Not Found", error.reason)
        case handlers.AlreadyExists():
            return Problem(409, "Conflict", error.reason)
        case IllegalTransition():
            return Problem(409, "Conflict", error.reason)
        case handlers.VersionMismatch():
            return Problem(412, "Precondition Failed", error.reason, current_version=error.actual)
        case handlers.TooMuchContention():
            problem = Problem(503, "Service Unavailable", error.reason)
            problem.headers["Retry-After"] = "1"
            return problem
        case InvalidCommand():
            return Problem(422, "Unprocessable Content", error.reason)
    return Problem(422, "Unprocessable Content", error.reason)


def create_app(service: CommandService, authorizer: Authorizer, ready: ReadyCheck) -> Starlette:
    adapter = _StoreAdapter(service.store, service.committer)

    async def execute(
        request: Request,
        command: str,
        role: str,
        work: Callable[[Idempotency], tuple[int, dict[str, Any], Outcome]],
    ) -> Response:
        principal = authorizer.authorize(request, role)
        raw = await read_body(request)
        idem = Idempotency(service, request, principal, raw)
        request.state.raw = raw

        def in_thread() -> Response:
            if idem.key is not None:
                replay = idem.check(adapter.find_idempotency(principal, idem.key))
                if replay is not None:
                    return replay
            try:
                status, body, outcome = work(idem)
            except handlers.Replayed as e:
                replay = idem.check(e.record)
                assert replay is not None
                return replay
            except DomainError as e:
                problem = _problem_for(e)
                metrics.COMMANDS.labels(command, str(problem.status)).inc()
                if idem.key is not None and problem.status != 503:
                    # A concurrent request with this key may have succeeded first: its
                    # answer, not ours, is the one every retry gets.
                    mine = idem.record(problem.status, problem.body(request.url.path))
                    service.store.idem.put_idempotency(mine)
                    first = adapter.find_idempotency(principal, idem.key)
                    if first is not None and (first.status, first.body) != (mine.status, mine.body):
                        replay = idem.check(first)
                        assert replay is not None
                        return replay
                return problem.response(request.url.path)
            metrics.COMMANDS.labels(command, str(status)).inc()
            headers = _headers(outcome)
            if status == 201:
                headers["Location"] = f"{PREFIX}/devices/{outcome.device.device_id}"
            return Response(_encode(body), status, headers, media_type="application/json")

        response: Response = await service.run(in_thread)
        return response

    async def register(request: Request) -> Response:
        def work(idem: Idempotency) -> tuple[int, dict[str, Any], Outcome]:
            body = decode_body(request.state.raw, RegisterBody)
            device_id = body.device_id or service.new_device_id()

            def shape(device: Device, secret: str | None) -> dict[str, Any]:
                return _device_body(
                    device, name=device.name, type=device.type, labels=device.labels, secret=secret
                )

            outcome = handlers.register(
                adapter,
                device_id=device_id,
                name=body.name,
                type=body.type,
                labels=dict(body.labels),
                credentials=service.credentials,
                at=service.clock(),
                answer=idem.answer(201, shape),
            )
            return 201, shape(outcome.device, outcome.secret), outcome

        return await execute(request, "register", "operator", work)

    def lifecycle(
        command: str,
        role: str,
        decide: Callable[[Request, datetime], Callable[[Device], str | None]],
    ) -> Callable[[Request], Any]:
        async def endpoint(request: Request) -> Response:
            device_id = request.path_params["device_id"]
            expected = _if_match(request)

            def shape(device: Device, secret: str | None) -> dict[str, Any]:
                extra: dict[str, Any] = {}
                if command == "configure":
                    extra = {"config": device.config, "config_version": device.config_version}
                if secret is not None:
                    extra["secret"] = secret
                return _device_body(device, **extra)

            def work(idem: Idempotency) -> tuple[int, dict[str, Any], Outcome]:
                outcome = handlers.change(
                    adapter,
                    device_id,
                    decide(request, service.clock()),
                    expected_version=expected,
                    answer=idem.answer(200, shape),
                )
                return 200, shape(outcome.device, outcome.secret), outcome

            return await execute(request, command, role, work)

        return endpoint

    def configure(request: Request, at: datetime) -> Callable[[Device], None]:
        return handlers.configure(decode_body(request.state.raw, ConfigBody).config, at)

    def suspend(request: Request, at: datetime) -> Callable[[Device], None]:
        return handlers.suspend(decode_body(request.state.raw, ReasonBody).reason, at)

    def resume(request: Request, at: datetime) -> Callable[[Device], None]:
        decode_body(request.state.raw, EmptyBody)
        return handlers.resume(at)

    def decommission(request: Request, at: datetime) -> Callable[[Device], None]:
        return handlers.decommission(decode_body(request.state.raw, ReasonBody).reason, at)

    def rotate(request: Request, at: datetime) -> Callable[[Device], str]:
        decode_body(request.state.raw, EmptyBody)
        return handlers.rotate_secret(service.credentials, at)

    device = PREFIX + "/devices/{device_id}"
    routes = [
        Route(PREFIX + "/devices", register, methods=["POST"]),
        Route(device + "/config", lifecycle("configure", "operator", configure), methods=["PATCH"]),
        Route(device + "/suspend", lifecycle("suspend", "operator", suspend), methods=["POST"]),
        Route(device + "/resume", lifecycle("resume", "operator", resume), methods=["POST"]),
        Route(
            device + "/decommission",
            lifecycle("decommission", "admin", decommission),
            methods=["POST"],
        ),
        Route(
            device + "/rotate-secret",
            lifecycle("rotate-secret", "operator", rotate),
            methods=["POST"],
        ),
    ]
    return build_app(routes, ready)
