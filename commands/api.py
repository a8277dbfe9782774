"""Operator command API (port 8080, prefix /api/v1): routes, validation, roles, idempotency."""

from __future__ import annotations

import asyncio
import contextvars
import hashlib
import logging
import uuid
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Annotated, Any, TypeVar

import msgspec
import psycopg
import psycopg_pool
from eventsourcing.persistence import InterfaceError as StoreInterfaceError
from eventsourcing.persistence import OperationalError as StoreOperationalError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from commands import handlers
from commands.handlers import Answer, Credentials, Outcome, RuleAnswer, RuleOutcome
from commands.openapi import openapi_endpoint
from domain.alerts import MAX_NOTE, parse_alert_id
from domain.device import (
    COMMAND_NAME,
    DEVICE_ID,
    LABEL_KEY,
    MAX_NAME,
    MAX_TTL_S,
    MAX_TYPE,
    MIN_TTL_S,
    Device,
    UnknownAlert,
)
from domain.errors import DomainError, IllegalTransition, InvalidCommand
from domain.rules import RULE_ID, Rule, RuleInvalid, spec_to_dict, validate_rule
from infra import metrics
from infra.eventstore import DeviceStore, GroupCommitter, IdempotencyRecord
from infra.httpkit import (
    Admission,
    Authorizer,
    Problem,
    ReadyCheck,
    build_app,
    decode_body,
    read_body,
)

log = logging.getLogger(__name__)
PREFIX = "/api/v1"
PATCHABLE = frozenset({"rule_id", "name", "metric", "scope", "severity", "condition"})
_encode = msgspec.json.Encoder().encode

DeviceId = Annotated[str, msgspec.Meta(pattern=DEVICE_ID.pattern)]
LabelKey = Annotated[str, msgspec.Meta(pattern=LABEL_KEY.pattern)]
LabelValue = Annotated[str, msgspec.Meta(max_length=256)]
Reason = Annotated[str, msgspec.Meta(max_length=500)]
CommandName = Annotated[str, msgspec.Meta(pattern=COMMAND_NAME.pattern)]
Ttl = Annotated[int, msgspec.Meta(ge=MIN_TTL_S, le=MAX_TTL_S)]
DEFAULT_TTL_S = 3600
HANDOVER_ATTEMPTS = 3
HANDOVER_TIMEOUT_S = 2.0
HANDOVER_BACKOFF_S = 0.2
# Requests admitted at once (in the store's threads or waiting for one); beyond: 503 at once.
DEFAULT_MAX_REQUESTS = 64

# Hands a device's plaintext secret, issued by event `version`, to the broker's side once.
HandOver = Callable[[str, int, str], Awaitable[None]]


class RegisterBody(msgspec.Struct, forbid_unknown_fields=True):
    name: Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_NAME)]
    type: Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_TYPE)]
    device_id: DeviceId | None = None
    labels: dict[LabelKey, LabelValue] = {}


class ConfigBody(msgspec.Struct, forbid_unknown_fields=True):
    config: dict[str, Any]


class ReasonBody(msgspec.Struct, forbid_unknown_fields=True):
    reason: Reason = ""


class NoteBody(msgspec.Struct, forbid_unknown_fields=True):
    note: Annotated[str, msgspec.Meta(max_length=MAX_NOTE)] | None = None


class EmptyBody(msgspec.Struct, forbid_unknown_fields=True):
    pass


class CommandBody(msgspec.Struct, forbid_unknown_fields=True):
    name: CommandName
    args: dict[str, Any] = {}
    ttl_s: Ttl = DEFAULT_TTL_S


@dataclass(frozen=True)
class CommandService:
    """What the API needs: the store, a thread pool for it, a clock, id/secret sources and
    the secret handover to the broker's side."""

    store: DeviceStore
    committer: GroupCommitter
    executor: Executor
    credentials: Credentials
    new_device_id: Callable[[], str]
    hand_over: HandOver
    clock: Callable[[], datetime] = lambda: datetime.now(UTC)
    new_command_id: Callable[[], str] = lambda: uuid.uuid4().hex
    handover_attempts: int = HANDOVER_ATTEMPTS
    handover_backoff: float = HANDOVER_BACKOFF_S

    async def run(self, fn: Callable[[], Any]) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn)


T = TypeVar("T")

# The name of the token whose request is being handled (set in its worker thread): stamped on
# each event it appends, the published events' `actor` (who caused it, in a device's history).
ACTOR: contextvars.ContextVar[str | None] = contextvars.ContextVar("actor", default=None)


def _acting(actor: str, fn: Callable[[], T]) -> Callable[[], T]:
    """`fn` run with ACTOR set (in the worker thread that runs it), then reset."""

    def run() -> T:
        token = ACTOR.set(actor)
        try:
            return fn()
        finally:
            ACTOR.reset(token)

    return run


def _stamp(events: Any) -> None:
    actor = ACTOR.get()
    if actor is not None:
        for event in events:
            object.__setattr__(event, "actor", actor)  # stored with the event's state


class StoreAdapter:
    """Adapts the DeviceStore to the handlers' Store port."""

    def __init__(self, store: DeviceStore, committer: GroupCommitter) -> None:
        self._store = store
        self._committer = committer

    def get(self, device_id: str) -> Device | None:
        return self._store.get(device_id)

    def save_device(self, device: Device, idempotency: IdempotencyRecord | None = None) -> int:
        _stamp(device.pending_events)
        return self._committer.save_device(device, idempotency)

    def find_idempotency(self, principal: str, key: str) -> IdempotencyRecord | None:
        return self._store.idem.get_idempotency(principal, key)

    def get_rule(self, rule_id: str) -> Rule | None:
        return self._store.get_rule(rule_id)

    def save_rule(self, rule: Rule, idempotency: IdempotencyRecord | None = None) -> int:
        _stamp(rule.pending_events)
        return self._store.save_rule(rule, idempotency)


def _if_match(request: Request) -> int | None:
    raw = request.headers.get("if-match")
    if raw is None:
        return None
    value = raw.strip().removeprefix("W/").strip('"')
    if not (value.isascii() and value.isdigit()):  # "³".isdigit() is True, int("³") fails
        raise Problem(400, "Bad Request", 'If-Match must be a device version, like "3"')
    return int(value)


def _device_body(device: Device, **extra: Any) -> dict[str, Any]:
    body = {"device_id": device.device_id, "version": device.version, "status": device.status}
    body.update(extra)
    return body


def rule_body(rule: Rule) -> dict[str, Any]:
    """A rule as the rule endpoints answer it: its id, version, state and definition."""
    return {
        "rule_id": rule.rule_id,
        "version": rule.version,
        "enabled": rule.enabled,
        **spec_to_dict(rule.spec),
    }


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7396 JSON merge patch: objects merge recursively, null removes, the rest replaces."""
    if not isinstance(patch, dict):
        return patch
    merged = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            merged.pop(key, None)
        else:
            merged[key] = merge_patch(merged.get(key), value)
    return merged


def _rule_definition(raw: bytes) -> dict[str, Any]:
    """The JSON object of a rule request (400 if malformed, 422 if not an object)."""
    try:
        data = msgspec.json.decode(raw or b"{}")
    except msgspec.DecodeError as e:
        raise Problem(400, "Bad Request", f"malformed JSON: {e}") from e
    if not isinstance(data, dict):
        raise Problem(422, "Unprocessable Content", "a rule must be a JSON object")
    return data


_PATCH_TYPES: dict[str, tuple[type, str]] = {
    "rule_id": (str, "a string"),
    "name": (str, "a string"),
    "metric": (str, "a string"),
    "severity": (str, "a string"),
    "scope": (dict, "a JSON object"),
    "condition": (dict, "a JSON object"),
}


def _check_patch_types(patch: dict[str, Any]) -> None:
    """Members of the wrong JSON type, refused before the rule is loaded (null removes)."""
    problems = [
        (key, f"must be {what} (or null)")
        for key, (kind, what) in _PATCH_TYPES.items()
        if patch.get(key) is not None and not isinstance(patch[key], kind)
    ]
    if problems:
        raise RuleInvalid(problems)


def alert_body(device: Device, alert_id: str) -> dict[str, Any]:
    """The alert as the acknowledge answer shows it (device times as epoch ms)."""
    state = device.alert_states()[alert_id]
    return {"device_id": device.device_id, "version": device.version, **msgspec.to_builtins(state)}


def rfc3339(at: datetime) -> str:
    """UTC, millisecond precision, `Z` suffix: `2026-01-01T00:00:00.000Z`."""
    return at.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _command_body(device: Device, command_id: str) -> dict[str, Any]:
    command = device.commands[command_id]
    return {
        "command_id": command_id,
        "device_id": device.device_id,
        "name": command["name"],
        "args": command["args"],
        "expires_at": rfc3339(command["expires_at"]),
        "state": command["state"],
        "version": device.version,
    }


def _undelivered_secret(outcome: Outcome, command: str) -> Problem:
    what = "registration" if command == "register" else "secret rotation"
    device = outcome.device
    return Problem(
        503,
        "Service Unavailable",
        f"the {what} of device {device.device_id} is stored (version {device.version}), but "
        "its new secret could not be delivered to the broker, so the device cannot log in "
        "with it; rotate the device's secret (POST .../rotate-secret) to issue a new one",
        device_id=device.device_id,
        version=device.version,
    )


def _headers(outcome: Outcome | RuleOutcome) -> dict[str, str]:
    version = outcome.rule.version if isinstance(outcome, RuleOutcome) else outcome.device.version
    return {"ETag": f'"{version}"', "Iot-Position": str(outcome.position)}


def _replay(record: IdempotencyRecord, store: DeviceStore) -> Response:
    """The first answer again; a success with its position, as the first one had it (the
    record is written before the position is known, so it is looked up)."""
    media = "application/problem+json" if record.status >= 400 else "application/json"
    headers = {"Idempotent-Replayed": "true"}
    body = record.body
    if record.status < 300:
        stored = msgspec.json.decode(body)
        device_id, version = stored.get("device_id"), stored.get("version")
        rule_id = stored.get("rule_id")
        position = None
        if isinstance(device_id, str) and isinstance(version, int):
            position = store.position_of(device_id, version)
        elif isinstance(rule_id, str) and isinstance(version, int):
            position = store.rule_position_of(rule_id, version)
        if position is not None:
            body = _encode({**stored, "position": position})
            headers["Iot-Position"] = str(position)
    return Response(body, record.status, headers, media_type=media)


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
        return _replay(found, self.service.store)

    def answer(
        self, status: int, shape: Callable[[Device, str | None], dict[str, Any]]
    ) -> Answer | None:
        if self.key is None:
            return None
        return lambda device, secret: self.record(status, shape(device, secret))

    def rule_answer(self, status: int) -> RuleAnswer | None:
        if self.key is None:
            return None
        return lambda rule: self.record(status, rule_body(rule))


def _problem_for(error: DomainError) -> Problem:
    match error:
        case RuleInvalid():
            errors = [{"field": path, "message": message} for path, message in error.problems]
            return Problem(422, "Unprocessable Content", error.reason, errors=errors)
        case handlers.NotFound() | UnknownAlert():
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


def create_app(
    service: CommandService,
    authorizer: Authorizer,
    ready: ReadyCheck,
    admission: Admission | None = None,
    cors_origins: Sequence[str] = (),
) -> Starlette:
    """The command API; browsers on `cors_origins` (the dashboard's) may call it. `admission`
    bounds the change requests (POST, PATCH) handled at once (default DEFAULT_MAX_REQUESTS): one
    more is answered 503 with `Retry-After` before it is
    routed or its body read, so overload is shed instead of queueing in the store's executor
    without bound."""
    adapter = StoreAdapter(service.store, service.committer)
    gate = admission or Admission(DEFAULT_MAX_REQUESTS, what="command requests")

    async def execute(
        request: Request,
        command: str,
        role: str,
        work: Callable[[Idempotency], tuple[int, dict[str, Any], Outcome | RuleOutcome]],
    ) -> Response:
        principal = authorizer.authorize(request, role)
        raw = await read_body(request)
        idem = Idempotency(service, request, principal, raw)
        request.state.raw = raw

        actor = authorizer.name_of(principal)

        def in_thread() -> tuple[Response, Outcome | RuleOutcome | None]:
            if idem.key is not None:
                replay = idem.check(adapter.find_idempotency(principal, idem.key))
                if replay is not None:
                    return replay, None
            try:
                status, body, outcome = work(idem)
            except handlers.Replayed as e:
                replay = idem.check(e.record)
                assert replay is not None
                return replay, None
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
                        return replay, None
                return problem.response(request.url.path), None
            metrics.COMMANDS.labels(command, str(status)).inc()
            body = {**body, "position": outcome.position}  # = Iot-Position: pass as `after`
            headers = _headers(outcome)
            if status == 201:
                headers["Location"] = (
                    f"{PREFIX}/rules/{outcome.rule.rule_id}"
                    if isinstance(outcome, RuleOutcome)
                    else f"{PREFIX}/devices/{outcome.device.device_id}"
                )
            return Response(_encode(body), status, headers, media_type="application/json"), outcome

        response, outcome = await service.run(_acting(actor, in_thread))
        # A new secret is answered only once the broker's side has it (replays carry none).
        if isinstance(outcome, Outcome) and outcome.secret is not None:
            device = outcome.device
            if not await deliver_secret(device.device_id, device.version, outcome.secret):
                metrics.COMMANDS.labels(command, "503").inc()
                return _undelivered_secret(outcome, command).response(request.url.path)
        assert isinstance(response, Response)
        return response

    async def deliver_secret(device_id: str, version: int, secret: str) -> bool:
        """Hand the secret over, retrying briefly; False if it could not be delivered."""
        for attempt in range(1, service.handover_attempts + 1):
            try:
                await asyncio.wait_for(
                    service.hand_over(device_id, version, secret), HANDOVER_TIMEOUT_S
                )
                return True
            except Exception as e:
                log.warning(
                    "secret handover failed",
                    extra={
                        "device_id": device_id,
                        "version": version,
                        "attempt": attempt,
                        "error": repr(e),
                    },
                )
                if attempt < service.handover_attempts:
                    await asyncio.sleep(service.handover_backoff * attempt)
        log.error(
            "secret not delivered to the broker; the device must rotate its secret",
            extra={"device_id": device_id, "version": version},
        )
        return False

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

    async def request_command(request: Request) -> Response:
        device_id = request.path_params["device_id"]
        expected = _if_match(request)

        def work(idem: Idempotency) -> tuple[int, dict[str, Any], Outcome]:
            body = decode_body(request.state.raw, CommandBody)
            command_id = service.new_command_id()

            def shape(device: Device, _: str | None) -> dict[str, Any]:
                return _command_body(device, command_id)

            decide = handlers.request_command(
                command_id, body.name, dict(body.args), body.ttl_s, service.clock()
            )
            outcome = handlers.change(
                adapter,
                device_id,
                decide,
                expected_version=expected,
                answer=idem.answer(202, shape),
            )
            return 202, shape(outcome.device, None), outcome

        return await execute(request, "request-command", "operator", work)

    async def cancel_command(request: Request) -> Response:
        device_id = request.path_params["device_id"]
        command_id = request.path_params["command_id"]
        expected = _if_match(request)

        def work(idem: Idempotency) -> tuple[int, dict[str, Any], Outcome]:
            reason = decode_body(request.state.raw, ReasonBody).reason or "cancelled by an operator"

            def shape(device: Device, _: str | None) -> dict[str, Any]:
                return _command_body(device, command_id)

            outcome = handlers.change(
                adapter,
                device_id,
                handlers.cancel(command_id, reason, service.clock()),
                expected_version=expected,
                answer=idem.answer(200, shape),
            )
            return 200, shape(outcome.device, None), outcome

        return await execute(request, "cancel-command", "operator", work)

    async def acknowledge_alert(request: Request) -> Response:
        alert_id = request.path_params["alert_id"]

        def work(idem: Idempotency) -> tuple[int, dict[str, Any], Outcome]:
            note = decode_body(request.state.raw, NoteBody).note
            try:
                device_id, _, _ = parse_alert_id(alert_id)
            except InvalidCommand:
                raise handlers.NotFound(f"no alert {alert_id[:200]}") from None

            def shape(device: Device, _: str | None) -> dict[str, Any]:
                return alert_body(device, alert_id)

            outcome = handlers.change(
                adapter,
                device_id,
                handlers.acknowledge_alert(
                    alert_id, f"token:{idem.principal[:12]}", note, service.clock()
                ),
                answer=idem.answer(200, shape),
            )
            return 200, shape(outcome.device, None), outcome

        return await execute(request, "acknowledge-alert", "operator", work)

    async def create_rule(request: Request) -> Response:
        def work(idem: Idempotency) -> tuple[int, dict[str, Any], RuleOutcome]:
            data = _rule_definition(request.state.raw)
            rule_id = data.pop("rule_id", None)
            if rule_id is None:
                rule_id = f"r-{service.new_command_id()[:12]}"
            if not isinstance(rule_id, str) or not RULE_ID.fullmatch(rule_id):
                raise RuleInvalid([("rule_id", f"must match {RULE_ID.pattern}")])
            outcome = handlers.create_rule(
                adapter,
                rule_id,
                validate_rule(data),
                service.clock(),
                idem.rule_answer(201),
            )
            return 201, rule_body(outcome.rule), outcome

        return await execute(request, "create-rule", "operator", work)

    async def patch_rule(request: Request) -> Response:
        rule_id = request.path_params["rule_id"]
        expected = _if_match(request)

        def work(idem: Idempotency) -> tuple[int, dict[str, Any], RuleOutcome]:
            patch = _rule_definition(request.state.raw)
            unknown = sorted(set(patch) - PATCHABLE)
            if unknown:
                expected_fields = ", ".join(sorted(PATCHABLE))
                raise RuleInvalid(
                    [(k, f"unknown field; expected one of {expected_fields}") for k in unknown]
                )
            _check_patch_types(patch)
            if patch.get("rule_id", rule_id) != rule_id:
                raise InvalidCommand("rule_id cannot change; create a new rule instead")
            patch.pop("rule_id", None)
            at = service.clock()

            def decide(rule: Rule) -> None:
                merged = merge_patch(spec_to_dict(rule.spec), patch)
                handlers.update_rule(validate_rule(merged), at)(rule)

            outcome = handlers.change_rule(
                adapter, rule_id, decide, expected_version=expected, answer=idem.rule_answer(200)
            )
            return 200, rule_body(outcome.rule), outcome

        return await execute(request, "update-rule", "operator", work)

    def rule_switch(command: str, enable: bool) -> Callable[[Request], Any]:
        async def endpoint(request: Request) -> Response:
            rule_id = request.path_params["rule_id"]
            expected = _if_match(request)

            def work(idem: Idempotency) -> tuple[int, dict[str, Any], RuleOutcome]:
                decode_body(request.state.raw, EmptyBody)
                at = service.clock()
                decide = handlers.enable_rule(at) if enable else handlers.disable_rule(at)
                outcome = handlers.change_rule(
                    adapter,
                    rule_id,
                    decide,
                    expected_version=expected,
                    answer=idem.rule_answer(200),
                )
                return 200, rule_body(outcome.rule), outcome

            return await execute(request, command, "operator", work)

        return endpoint

    openapi = openapi_endpoint()
    device = PREFIX + "/devices/{device_id}"
    rule = PREFIX + "/rules/{rule_id}"
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
        Route(device + "/commands", request_command, methods=["POST"]),
        Route(device + "/commands/{command_id}/cancel", cancel_command, methods=["POST"]),
        Route(PREFIX + "/alerts/{alert_id}/acknowledge", acknowledge_alert, methods=["POST"]),
        Route(PREFIX + "/rules", create_rule, methods=["POST"]),
        Route(rule, patch_rule, methods=["PATCH"]),
        Route(rule + "/enable", rule_switch("enable-rule", enable=True), methods=["POST"]),
        Route(rule + "/disable", rule_switch("disable-rule", enable=False), methods=["POST"]),
        Route("/openapi.json", openapi, methods=["GET"]),
        Route(PREFIX + "/openapi.json", openapi, methods=["GET"]),
    ]

    def gated(scope: Any) -> bool:
        return bool(scope["method"] in ("POST", "PATCH") and scope["path"].startswith(PREFIX))

    app = build_app(routes, ready, admission=gate, gated=gated, cors_origins=cors_origins)
    for error in STORE_UNAVAILABLE:
        app.add_exception_handler(error, _store_unavailable)
    return app


# What the event store raises while PostgreSQL is unreachable (restarting, failing over, down):
# the library's wrappers of the driver's errors, the driver's own, and the pool's.
STORE_UNAVAILABLE: tuple[type[Exception], ...] = (
    StoreOperationalError,
    StoreInterfaceError,
    psycopg.OperationalError,
    psycopg_pool.PoolTimeout,
)
STORE_RETRY_AFTER_S = 2


async def _store_unavailable(request: Request, exc: Exception) -> Response:
    """503, not 500: the request can be repeated. A commit whose answer was lost may have
    happened, so the problem says to retry with the same `Idempotency-Key`."""
    log.warning("event store unavailable", extra={"error": str(exc), "path": request.url.path})
    metrics.STORE_UNAVAILABLE.inc()
    problem = Problem(
        503,
        "Service Unavailable",
        "the event store (PostgreSQL) is unavailable; retry after the time Retry-After gives, "
        "with the same Idempotency-Key, which answers the first outcome if it was applied",
    )
    problem.headers["Retry-After"] = str(STORE_RETRY_AFTER_S)
    return problem.response(request.url.path)
