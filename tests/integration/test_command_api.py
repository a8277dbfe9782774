"""The operator command API on a real PostgreSQL event store (in-process ASGI app)."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import nats
import pytest
from nats.js.client import JetStreamContext

from commands.api import CommandService, create_app
from commands.handlers import Credentials
from domain.credentials import verify_secret
from infra import secrets
from infra.eventstore import DeviceStore, GroupCommitter
from infra.httpkit import Authorizer
from infra.settings import Settings
from infra.streams import Streams
from tests.conftest import TOKENS

pytestmark = pytest.mark.integration

VIEWER, OPERATOR, ADMIN = (
    {"Authorization": f"Bearer {t}"}
    for t in ("viewer-token-0123456789", "operator-token-012345678", "admin-token-0123456789ab")
)


class FixedClock:
    def __init__(self) -> None:
        self.now = datetime(2026, 1, 1, tzinfo=UTC)

    def __call__(self) -> datetime:
        self.now += timedelta(milliseconds=1)
        return self.now


class Handovers:
    """The real secret handover (JetStream KV), recording calls; the next `failures` raise."""

    def __init__(self, js: JetStreamContext, streams: Streams) -> None:
        self.js = js
        self.streams = streams
        self.calls: list[tuple[str, int]] = []
        self.failures = 0

    async def __call__(self, device_id: str, version: int, secret: str) -> None:
        self.calls.append((device_id, version))
        if self.failures > 0:
            self.failures -= 1
            raise ConnectionError("broker side unreachable")
        await secrets.hand_over(self.js, self.streams, device_id, version, secret)

    async def take(self, device_id: str, version: int) -> str | None:
        return await secrets.take(self.js, self.streams, device_id, version)


@pytest.fixture
async def handovers(migrated: Settings) -> AsyncIterator[Handovers]:
    nc = await nats.connect(migrated.nats_url)
    yield Handovers(nc.jetstream(), Streams(migrated.namespace))
    await nc.close()


@pytest.fixture
def service(store: DeviceStore, handovers: Handovers) -> Iterator[CommandService]:
    counter = itertools.count(1)
    commands = itertools.count(1)
    executor = ThreadPoolExecutor(16)
    committer = GroupCommitter(store)
    yield CommandService(
        store=store,
        committer=committer,
        executor=executor,
        credentials=Credentials(
            new_secret=lambda: f"secret-{next(counter)}", new_salt=lambda: b"0123456789abcdef"
        ),
        new_device_id=lambda: f"gen-{next(counter)}",
        hand_over=handovers,
        clock=FixedClock(),
        new_command_id=lambda: f"cmd-{next(commands)}",
        handover_backoff=0.01,
    )
    executor.shutdown()
    committer.close()


@pytest.fixture
async def client(service: CommandService) -> AsyncIterator[httpx.AsyncClient]:
    async def ready() -> Mapping[str, bool]:
        return {"postgres": True}

    app = create_app(service, Authorizer(TOKENS), ready)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test/api/v1") as c:
        yield c


async def register(
    client: httpx.AsyncClient, device_id: str = "dev-1", **extra: Any
) -> httpx.Response:
    body = {"device_id": device_id, "name": "Boiler", "type": "thermostat", **extra}
    response = await client.post("/devices", json=body, headers=OPERATOR)
    return response


def assert_problem(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"
    body: dict[str, Any] = response.json()
    assert body["status"] == status
    assert body["title"]
    return body


async def test_registration_returns_secret_once_and_stores_only_its_hash(
    client: httpx.AsyncClient, store: DeviceStore
) -> None:
    response = await register(client, labels={"site": "north"})
    assert response.status_code == 201
    body = response.json()
    assert body["device_id"] == "dev-1"
    assert body["version"] == 1
    assert body["status"] == "provisioned"
    assert body["labels"] == {"site": "north"}
    assert response.headers["location"] == "/api/v1/devices/dev-1"
    assert response.headers["etag"] == '"1"'
    device = store.get("dev-1")
    assert device is not None
    assert body["secret"] not in device.secret_hash
    assert verify_secret(body["secret"], device.secret_hash)
    stored = store.recorder.select_notifications(1, 10)
    assert all(body["secret"].encode() not in n.state for n in stored)


async def test_registration_without_id_generates_one(client: httpx.AsyncClient) -> None:
    response = await client.post("/devices", json={"name": "n", "type": "t"}, headers=OPERATOR)
    assert response.status_code == 201
    assert response.json()["device_id"].startswith("gen-")


async def test_second_registration_of_same_id_is_rejected(client: httpx.AsyncClient) -> None:
    assert (await register(client)).status_code == 201
    assert_problem(await register(client), 409)


@pytest.mark.parametrize(
    ("method", "path", "needed"),
    [
        ("POST", "/devices", "operator"),
        ("PATCH", "/devices/dev-1/config", "operator"),
        ("POST", "/devices/dev-1/suspend", "operator"),
        ("POST", "/devices/dev-1/resume", "operator"),
        ("POST", "/devices/dev-1/rotate-secret", "operator"),
        ("POST", "/devices/dev-1/decommission", "admin"),
        ("POST", "/devices/dev-1/commands", "operator"),
        ("POST", "/devices/dev-1/commands/cmd-1/cancel", "operator"),
    ],
)
async def test_each_route_refuses_missing_bad_and_insufficient_tokens(
    client: httpx.AsyncClient, method: str, path: str, needed: str
) -> None:
    missing = await client.request(method, path, json={})
    body = assert_problem(missing, 401)
    assert missing.headers["www-authenticate"].startswith("Bearer")
    assert body["status"] == 401
    wrong = await client.request(method, path, json={}, headers={"Authorization": "Bearer nope"})
    assert_problem(wrong, 401)
    below = [VIEWER] if needed == "operator" else [VIEWER, OPERATOR]
    for headers in below:
        forbidden = assert_problem(
            await client.request(method, path, json={}, headers=headers), 403
        )
        assert needed in forbidden["detail"]


async def test_admin_may_do_what_an_operator_may(client: httpx.AsyncClient) -> None:
    response = await client.post(
        "/devices", json={"device_id": "a1", "name": "n", "type": "t"}, headers=ADMIN
    )
    assert response.status_code == 201


async def test_decommission_needs_admin_and_is_final(client: httpx.AsyncClient) -> None:
    await register(client)
    assert_problem(await client.post("/devices/dev-1/decommission", headers=OPERATOR), 403)
    done = await client.post("/devices/dev-1/decommission", json={"reason": "scrap"}, headers=ADMIN)
    assert done.status_code == 200
    assert done.json()["status"] == "decommissioned"
    again = assert_problem(await client.post("/devices/dev-1/resume", headers=OPERATOR), 409)
    assert "decommissioned" in again["detail"]
    assert_problem(
        await client.patch("/devices/dev-1/config", json={"config": {}}, headers=OPERATOR), 409
    )


async def test_lifecycle_suspend_resume_and_illegal_transitions_are_409(
    client: httpx.AsyncClient,
) -> None:
    await register(client)
    assert_problem(await client.post("/devices/dev-1/resume", headers=OPERATOR), 409)
    suspended = await client.post("/devices/dev-1/suspend", json={"reason": "x"}, headers=OPERATOR)
    assert suspended.json() == {
        "device_id": "dev-1",
        "version": 2,
        "status": "suspended",
        "position": int(suspended.headers["iot-position"]),
    }
    twice = assert_problem(await client.post("/devices/dev-1/suspend", headers=OPERATOR), 409)
    assert "already suspended" in twice["detail"]
    resumed = await client.post("/devices/dev-1/resume", headers=OPERATOR)
    assert resumed.json()["status"] == "provisioned"


async def test_unknown_device_is_404(client: httpx.AsyncClient) -> None:
    for path in ("/suspend", "/resume", "/rotate-secret"):
        assert_problem(await client.post(f"/devices/ghost{path}", headers=OPERATOR), 404)
    assert_problem(
        await client.patch("/devices/ghost/config", json={"config": {}}, headers=OPERATOR), 404
    )


async def test_rotation_issues_a_new_secret_and_invalidates_the_old(
    client: httpx.AsyncClient, store: DeviceStore
) -> None:
    first = (await register(client)).json()["secret"]
    rotated = await client.post("/devices/dev-1/rotate-secret", headers=OPERATOR)
    assert rotated.status_code == 200
    second = rotated.json()["secret"]
    assert second != first
    device = store.get("dev-1")
    assert device is not None
    assert verify_secret(second, device.secret_hash)
    assert not verify_secret(first, device.secret_hash)


async def test_configure_with_current_version_applies_and_stale_version_is_412(
    client: httpx.AsyncClient,
) -> None:
    await register(client)
    ok = await client.patch(
        "/devices/dev-1/config",
        json={"config": {"rate": 5}},
        headers={**OPERATOR, "If-Match": '"1"'},
    )
    assert ok.status_code == 200
    assert ok.json()["config"] == {"rate": 5}
    assert ok.json()["config_version"] == 1
    assert ok.headers["etag"] == '"2"'
    stale = assert_problem(
        await client.patch(
            "/devices/dev-1/config",
            json={"config": {"rate": 6}},
            headers={**OPERATOR, "If-Match": '"1"'},
        ),
        412,
    )
    assert stale["current_version"] == 2
    bad = await client.patch(
        "/devices/dev-1/config", json={"config": {}}, headers={**OPERATOR, "If-Match": "abc"}
    )
    assert_problem(bad, 400)


async def test_32_concurrent_configures_without_if_match_all_apply_once(
    client: httpx.AsyncClient, store: DeviceStore
) -> None:
    await register(client)
    responses = await asyncio.gather(
        *(
            client.patch("/devices/dev-1/config", json={"config": {"n": i}}, headers=OPERATOR)
            for i in range(32)
        )
    )
    assert [r.status_code for r in responses] == [200] * 32
    device = store.get("dev-1")
    assert device is not None
    assert device.version == 1 + 32
    assert device.config_version == 32
    assert sorted(r.json()["config_version"] for r in responses) == list(range(1, 33))
    events = store.recorder.select_notifications(1, 100)
    assert len(events) == 33


async def test_32_concurrent_configures_with_same_if_match_exactly_one_wins(
    client: httpx.AsyncClient, store: DeviceStore
) -> None:
    await register(client)
    responses = await asyncio.gather(
        *(
            client.patch(
                "/devices/dev-1/config",
                json={"config": {"n": i}},
                headers={**OPERATOR, "If-Match": '"1"'},
            )
            for i in range(32)
        )
    )
    codes = sorted(r.status_code for r in responses)
    assert codes == [200] + [412] * 31
    device = store.get("dev-1")
    assert device is not None
    assert device.version == 2


async def test_idempotent_retry_returns_first_response_and_changes_nothing(
    client: httpx.AsyncClient, store: DeviceStore
) -> None:
    await register(client)
    headers = {**OPERATOR, "Idempotency-Key": "cfg-1"}
    first = await client.patch("/devices/dev-1/config", json={"config": {"a": 1}}, headers=headers)
    second = await client.patch("/devices/dev-1/config", json={"config": {"a": 1}}, headers=headers)
    assert first.status_code == second.status_code == 200
    assert second.json() == first.json()
    assert second.headers["idempotent-replayed"] == "true"
    device = store.get("dev-1")
    assert device is not None
    assert device.version == 2


async def test_concurrent_retries_with_one_key_apply_once(
    client: httpx.AsyncClient, store: DeviceStore
) -> None:
    await register(client)
    headers = {**OPERATOR, "Idempotency-Key": "burst"}
    responses = await asyncio.gather(
        *(
            client.post("/devices/dev-1/suspend", json={"reason": "r"}, headers=headers)
            for _ in range(8)
        )
    )
    assert {r.status_code for r in responses} == {200}
    assert len({r.text for r in responses}) == 1
    device = store.get("dev-1")
    assert device is not None
    assert device.version == 2


async def test_idempotent_registration_retry_never_repeats_the_secret(
    client: httpx.AsyncClient,
) -> None:
    headers = {**OPERATOR, "Idempotency-Key": "reg-1"}
    body = {"device_id": "dev-9", "name": "n", "type": "t"}
    first = await client.post("/devices", json=body, headers=headers)
    second = await client.post("/devices", json=body, headers=headers)
    assert first.status_code == second.status_code == 201
    assert "secret" in first.json()
    assert "secret" not in second.json()
    assert {k: v for k, v in first.json().items() if k != "secret"} == second.json()


async def test_key_reused_for_a_different_request_is_refused(client: httpx.AsyncClient) -> None:
    await register(client)
    headers = {**OPERATOR, "Idempotency-Key": "k"}
    await client.patch("/devices/dev-1/config", json={"config": {"a": 1}}, headers=headers)
    other = await client.patch("/devices/dev-1/config", json={"config": {"a": 2}}, headers=headers)
    assert_problem(other, 422)


async def test_an_error_answer_is_replayed_too(client: httpx.AsyncClient) -> None:
    headers = {**OPERATOR, "Idempotency-Key": "err"}
    first = await client.post("/devices/dev-1/suspend", headers=headers)
    assert_problem(first, 404)
    await register(client)
    second = await client.post("/devices/dev-1/suspend", headers=headers)
    assert_problem(second, 404)
    assert second.headers["idempotent-replayed"] == "true"


async def test_keys_are_scoped_to_the_token(client: httpx.AsyncClient) -> None:
    await register(client)
    key = {"Idempotency-Key": "shared"}
    await client.post("/devices/dev-1/suspend", headers={**OPERATOR, **key})
    other = await client.post("/devices/dev-1/suspend", headers={**ADMIN, **key})
    assert_problem(other, 409)


async def test_malformed_json_is_400(client: httpx.AsyncClient) -> None:
    response = await client.post(
        "/devices",
        content=b'{"name": "x"',
        headers={**OPERATOR, "Content-Type": "application/json"},
    )
    assert_problem(response, 400)


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"name": 1, "type": "t"}, "name"),
        ({"type": "t"}, "name"),
        ({"name": "n", "type": "t", "device_id": "has/slash"}, "device_id"),
        ({"name": "n", "type": "t", "labels": {"k": 5}}, "labels"),
        ({"name": "n", "type": "t", "labels": {"bad key": "v"}}, "labels"),
        ({"name": "", "type": "t"}, "name"),
        ({"name": "n", "type": "t", "colour": "red"}, "colour"),
        (["not", "an", "object"], ""),
    ],
)
async def test_wrong_types_are_422_naming_the_field(
    client: httpx.AsyncClient, body: Any, field: str
) -> None:
    problem = assert_problem(await client.post("/devices", json=body, headers=OPERATOR), 422)
    assert problem["errors"][0]["field"] == field


async def test_config_must_be_an_object(client: httpx.AsyncClient) -> None:
    await register(client)
    problem = assert_problem(
        await client.patch("/devices/dev-1/config", json={"config": [1]}, headers=OPERATOR), 422
    )
    assert problem["errors"][0]["field"] == "config"


async def test_body_over_64_kib_is_413(client: httpx.AsyncClient) -> None:
    big = {"name": "n", "type": "t", "labels": {f"k{i}": "v" * 250 for i in range(300)}}
    assert_problem(await client.post("/devices", json=big, headers=OPERATOR), 413)
    await register(client)

    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(70):
            yield b" " * 1024

    streamed = await client.patch("/devices/dev-1/config", content=chunks(), headers=OPERATOR)
    assert_problem(streamed, 413)


async def test_health_ready_and_metrics(client: httpx.AsyncClient) -> None:
    base = str(client.base_url).removesuffix("/api/v1/")
    assert (await client.get(f"{base}/healthz")).json() == {"status": "ok"}
    assert (await client.get(f"{base}/readyz")).status_code == 200
    await register(client)
    metrics = (await client.get(f"{base}/metrics")).text
    assert 'iot_commands_total{command="register",outcome="201"}' in metrics
    assert "iot_http_request_duration_seconds_bucket" in metrics


# -- secret handover --------------------------------------------------------------------------


async def test_registration_hands_the_secret_to_the_broker_side_under_version_1(
    client: httpx.AsyncClient, handovers: Handovers
) -> None:
    body = (await register(client)).json()

    assert await handovers.take("dev-1", 1) == body["secret"]
    assert handovers.calls == [("dev-1", 1)]


async def test_rotation_hands_the_new_secret_over_under_the_rotation_version(
    client: httpx.AsyncClient, handovers: Handovers
) -> None:
    await register(client)
    await client.post("/devices/dev-1/suspend", headers=OPERATOR)

    rotated = (await client.post("/devices/dev-1/rotate-secret", headers=OPERATOR)).json()

    assert rotated["version"] == 3
    assert await handovers.take("dev-1", 3) == rotated["secret"]
    assert handovers.calls == [("dev-1", 1), ("dev-1", 3)]


async def test_idempotent_replays_never_hand_the_secret_over_again(
    client: httpx.AsyncClient, handovers: Handovers
) -> None:
    headers = {**OPERATOR, "Idempotency-Key": "reg-once"}
    body = {"device_id": "dev-1", "name": "n", "type": "t"}
    await client.post("/devices", json=body, headers=headers)
    replayed = await client.post("/devices", json=body, headers=headers)
    rotate = {**OPERATOR, "Idempotency-Key": "rot-once"}
    await client.post("/devices/dev-1/rotate-secret", headers=rotate)
    rotated_again = await client.post("/devices/dev-1/rotate-secret", headers=rotate)

    assert replayed.headers["idempotent-replayed"] == "true"
    assert rotated_again.headers["idempotent-replayed"] == "true"
    assert handovers.calls == [("dev-1", 1), ("dev-1", 2)]


async def test_undeliverable_secret_is_503_saying_the_registration_is_stored_and_to_rotate(
    client: httpx.AsyncClient, handovers: Handovers, store: DeviceStore
) -> None:
    handovers.failures = 1_000

    response = await register(client)

    problem = assert_problem(response, 503)
    assert "secret" not in problem
    assert "stored" in problem["detail"]
    assert "rotate" in problem["detail"]
    assert (problem["device_id"], problem["version"]) == ("dev-1", 1)
    assert len(handovers.calls) == 3  # retried briefly
    assert store.get("dev-1") is not None
    assert await handovers.take("dev-1", 1) is None


async def test_undeliverable_rotated_secret_is_503_and_a_new_rotation_recovers(
    client: httpx.AsyncClient, handovers: Handovers
) -> None:
    await register(client)
    handovers.failures = 1_000
    failed = assert_problem(
        await client.post("/devices/dev-1/rotate-secret", headers=OPERATOR), 503
    )
    assert "rotation" in failed["detail"]
    handovers.failures = 0

    rotated = await client.post("/devices/dev-1/rotate-secret", headers=OPERATOR)

    assert rotated.status_code == 200
    assert await handovers.take("dev-1", rotated.json()["version"]) == rotated.json()["secret"]


async def test_handover_that_recovers_within_the_retries_answers_normally(
    client: httpx.AsyncClient, handovers: Handovers
) -> None:
    handovers.failures = 1

    response = await register(client)

    assert response.status_code == 201
    assert handovers.calls == [("dev-1", 1), ("dev-1", 1)]
    assert await handovers.take("dev-1", 1) == response.json()["secret"]


# -- commands to devices ----------------------------------------------------------------------


async def request(
    client: httpx.AsyncClient, body: Any, device_id: str = "dev-1", **headers: str
) -> httpx.Response:
    return await client.post(
        f"/devices/{device_id}/commands", json=body, headers={**OPERATOR, **headers}
    )


async def test_command_request_is_accepted_with_its_id_expiry_and_position(
    client: httpx.AsyncClient, store: DeviceStore
) -> None:
    await register(client)

    response = await request(client, {"name": "reboot", "args": {"delay_s": 5}, "ttl_s": 60})

    assert response.status_code == 202
    body = response.json()
    device = store.get("dev-1")
    assert device is not None
    command = device.commands["cmd-1"]
    assert body == {
        "command_id": "cmd-1",
        "device_id": "dev-1",
        "name": "reboot",
        "args": {"delay_s": 5},
        "expires_at": body["expires_at"],
        "state": "requested",
        "version": 2,
        "position": store.max_position(),
    }
    assert command["state"] == "requested"
    assert command["expires_at"] - command["requested_at"] == timedelta(seconds=60)
    expires = datetime.fromisoformat(body["expires_at"])
    assert body["expires_at"].endswith("Z")
    assert expires == command["expires_at"]
    assert response.headers["etag"] == '"2"'
    assert int(response.headers["iot-position"]) == store.max_position()


async def test_command_without_args_and_ttl_gets_empty_args_and_an_hour(
    client: httpx.AsyncClient, store: DeviceStore
) -> None:
    await register(client)

    body = (await request(client, {"name": "ping"})).json()

    device = store.get("dev-1")
    assert device is not None
    command = device.commands[body["command_id"]]
    assert body["args"] == {}
    assert command["expires_at"] - command["requested_at"] == timedelta(hours=1)


async def test_command_for_an_unknown_device_is_404(client: httpx.AsyncClient) -> None:
    assert_problem(await request(client, {"name": "ping"}, device_id="ghost"), 404)


async def test_command_for_a_suspended_or_decommissioned_device_is_409(
    client: httpx.AsyncClient, store: DeviceStore
) -> None:
    await register(client)
    await client.post("/devices/dev-1/suspend", headers=OPERATOR)
    suspended = assert_problem(await request(client, {"name": "ping"}), 409)
    assert "suspended" in suspended["detail"]
    await client.post("/devices/dev-1/decommission", headers=ADMIN)
    decommissioned = assert_problem(await request(client, {"name": "ping"}), 409)
    assert "decommissioned" in decommissioned["detail"]
    device = store.get("dev-1")
    assert device is not None
    assert device.commands == {}


async def test_101st_pending_command_is_409(client: httpx.AsyncClient) -> None:
    await register(client)
    for _ in range(100):
        assert (await request(client, {"name": "ping"})).status_code == 202

    refused = assert_problem(await request(client, {"name": "ping"}), 409)

    assert "100 pending commands" in refused["detail"]


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({}, "name"),
        ({"name": ""}, "name"),
        ({"name": "has space"}, "name"),
        ({"name": "x" * 65}, "name"),
        ({"name": 5}, "name"),
        ({"name": "ping", "ttl_s": 0}, "ttl_s"),
        ({"name": "ping", "ttl_s": 7 * 24 * 3600 + 1}, "ttl_s"),
        ({"name": "ping", "ttl_s": "60"}, "ttl_s"),
        ({"name": "ping", "ttl_s": 1.5}, "ttl_s"),
        ({"name": "ping", "ttl_s": True}, "ttl_s"),
        ({"name": "ping", "args": [1]}, "args"),
        ({"name": "ping", "priority": 1}, "priority"),
    ],
)
async def test_bad_command_name_ttl_or_args_is_422_naming_the_field(
    client: httpx.AsyncClient, store: DeviceStore, body: Any, field: str
) -> None:
    await register(client)

    problem = assert_problem(await request(client, body), 422)

    assert problem["errors"][0]["field"] == field
    device = store.get("dev-1")
    assert device is not None
    assert device.version == 1


async def test_command_retried_with_its_idempotency_key_is_recorded_once(
    client: httpx.AsyncClient, store: DeviceStore
) -> None:
    await register(client)
    body = {"name": "reboot", "ttl_s": 30}

    first = await request(client, body, **{"Idempotency-Key": "cmd-key"})
    second = await request(client, body, **{"Idempotency-Key": "cmd-key"})
    other = await request(client, {"name": "other"}, **{"Idempotency-Key": "cmd-key"})

    assert first.status_code == second.status_code == 202
    assert second.json() == first.json()
    assert second.headers["idempotent-replayed"] == "true"
    assert_problem(other, 422)
    device = store.get("dev-1")
    assert device is not None
    assert list(device.commands) == ["cmd-1"]
    assert device.version == 2


async def test_cancel_finishes_a_pending_command(
    client: httpx.AsyncClient, store: DeviceStore
) -> None:
    await register(client)
    await request(client, {"name": "reboot"})

    response = await client.post(
        "/devices/dev-1/commands/cmd-1/cancel", json={"reason": "wrong one"}, headers=OPERATOR
    )

    assert response.status_code == 200
    body = response.json()
    assert (body["command_id"], body["state"], body["version"]) == ("cmd-1", "cancelled", 3)
    assert response.headers["iot-position"] == str(store.max_position())
    device = store.get("dev-1")
    assert device is not None
    assert device.commands["cmd-1"]["state"] == "cancelled"
    assert device.pending_commands() == []


async def test_cancel_of_a_finished_command_is_409(client: httpx.AsyncClient) -> None:
    await register(client)
    await request(client, {"name": "reboot"})
    await client.post("/devices/dev-1/commands/cmd-1/cancel", headers=OPERATOR)

    again = assert_problem(
        await client.post("/devices/dev-1/commands/cmd-1/cancel", headers=OPERATOR), 409
    )

    assert "cancelled" in again["detail"]


async def test_suspending_cancels_pending_commands_so_a_later_cancel_is_409(
    client: httpx.AsyncClient,
) -> None:
    await register(client)
    await request(client, {"name": "reboot"})
    await client.post("/devices/dev-1/suspend", headers=OPERATOR)

    assert_problem(await client.post("/devices/dev-1/commands/cmd-1/cancel", headers=OPERATOR), 409)


async def test_cancel_of_an_unknown_command_or_device_is_404(client: httpx.AsyncClient) -> None:
    await register(client)
    assert_problem(await client.post("/devices/dev-1/commands/nope/cancel", headers=OPERATOR), 404)
    assert_problem(await client.post("/devices/ghost/commands/cmd-1/cancel", headers=OPERATOR), 404)


async def test_cancel_body_is_validated(client: httpx.AsyncClient) -> None:
    await register(client)
    await request(client, {"name": "reboot"})
    problem = assert_problem(
        await client.post(
            "/devices/dev-1/commands/cmd-1/cancel", json={"reason": 5}, headers=OPERATOR
        ),
        422,
    )
    assert problem["errors"][0]["field"] == "reason"


async def test_command_requests_are_counted_in_metrics(client: httpx.AsyncClient) -> None:
    await register(client)
    await request(client, {"name": "reboot"})
    base = str(client.base_url).removesuffix("/api/v1/")
    metrics = (await client.get(f"{base}/metrics")).text
    assert 'iot_commands_total{command="request-command",outcome="202"}' in metrics


# --- the consistency token in bodies --------------------------------------------------------------


async def test_every_successful_change_carries_its_position_in_body_and_header(
    client: httpx.AsyncClient, store: DeviceStore
) -> None:
    answers = [
        await client.post(
            "/devices", json={"device_id": "dev-1", "name": "n", "type": "t"}, headers=OPERATOR
        ),
        await client.patch("/devices/dev-1/config", json={"config": {"a": 1}}, headers=OPERATOR),
        await request(client, {"name": "reboot"}),
        await client.post("/devices/dev-1/suspend", json={"reason": "x"}, headers=OPERATOR),
        await client.post("/devices/dev-1/resume", headers=OPERATOR),
        await client.post("/devices/dev-1/rotate-secret", headers=OPERATOR),
    ]
    positions = []
    for answer in answers:
        assert answer.status_code in (200, 201, 202), answer.text
        assert answer.json()["position"] == int(answer.headers["iot-position"])
        positions.append(answer.json()["position"])
    assert positions == sorted(positions)
    assert len(set(positions)) == len(positions)
    assert positions[-1] == store.max_position()


async def test_an_idempotent_replay_carries_the_position_of_the_first_answer(
    client: httpx.AsyncClient,
) -> None:
    await register(client)
    headers = {**OPERATOR, "Idempotency-Key": "pos-1"}
    first = await client.patch("/devices/dev-1/config", json={"config": {"a": 1}}, headers=headers)
    await client.patch("/devices/dev-1/config", json={"config": {"a": 2}}, headers=OPERATOR)
    again = await client.patch("/devices/dev-1/config", json={"config": {"a": 1}}, headers=headers)
    assert again.headers["idempotent-replayed"] == "true"
    assert again.json() == first.json()
    assert again.headers["iot-position"] == first.headers["iot-position"]


# --- alerts: acknowledged through the API, recorded as device events -------------------------


def raise_alert(
    store: DeviceStore, device_id: str = "dev-1", at_ms: int = 1_767_225_600_000
) -> str:
    """What the analytics service records: an alert raised for the device, saved directly."""
    device = store.get(device_id)
    assert device is not None
    alert_id = device.raise_alert("hot", "critical", "temperature", 91.5, at_ms, datetime.now(UTC))
    assert alert_id is not None
    store.save_device(device)
    return alert_id


async def test_acknowledging_an_alert_records_who_when_and_the_note_once(
    client: httpx.AsyncClient, store: DeviceStore
) -> None:
    await register(client)
    alert_id = raise_alert(store)
    response = await client.post(
        f"/alerts/{alert_id}/acknowledge", json={"note": "checking the pump"}, headers=OPERATOR
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert (body["alert_id"], body["status"], body["acknowledged"]) == (
        alert_id,
        "acknowledged",
        True,
    )
    assert body["note"] == "checking the pump"
    assert body["acknowledged_by"].startswith("token:")
    assert body["raised_value"] == 91.5
    assert response.headers["etag"] == f'"{body["version"]}"'
    again = await client.post(f"/alerts/{alert_id}/acknowledge", headers=OPERATOR)
    assert "already acknowledged" in assert_problem(again, 409)["detail"]
    device = store.get("dev-1")
    assert device is not None
    events = store.events.get(device.id)
    assert [type(e).__qualname__ for e in events][-2:] == [
        "Device.AlertRaised",
        "Device.AlertAcknowledged",
    ]


async def test_an_acknowledge_retried_with_its_idempotency_key_gets_the_first_answer(
    client: httpx.AsyncClient, store: DeviceStore
) -> None:
    await register(client)
    alert_id = raise_alert(store)
    headers = {**OPERATOR, "Idempotency-Key": "ack-1"}
    first = await client.post(f"/alerts/{alert_id}/acknowledge", json={}, headers=headers)
    retry = await client.post(f"/alerts/{alert_id}/acknowledge", json={}, headers=headers)
    assert first.status_code == retry.status_code == 200
    assert retry.headers["idempotent-replayed"] == "true"
    assert {k: v for k, v in retry.json().items() if k != "position"} == {
        k: v for k, v in first.json().items() if k != "position"
    }
    device = store.get("dev-1")
    assert device is not None
    assert device.version == 3  # registered, raised, acknowledged: once


async def test_acknowledging_an_unknown_or_malformed_alert_is_404_and_below_operator_403(
    client: httpx.AsyncClient, store: DeviceStore
) -> None:
    await register(client)
    assert_problem(await client.post("/alerts/dev-1.hot.1/acknowledge", headers=OPERATOR), 404)
    assert_problem(await client.post("/alerts/nobody.hot.1/acknowledge", headers=OPERATOR), 404)
    assert_problem(await client.post("/alerts/not-an-id/acknowledge", headers=OPERATOR), 404)
    alert_id = raise_alert(store)
    assert_problem(await client.post(f"/alerts/{alert_id}/acknowledge", headers=VIEWER), 403)
    long_note = {"note": "x" * 2001}
    assert_problem(
        await client.post(f"/alerts/{alert_id}/acknowledge", json=long_note, headers=OPERATOR), 422
    )


# -- alert rules ----------------------------------------------------------------------------

HOT_RULE: dict[str, Any] = {
    "rule_id": "boiler-hot",
    "name": "Boiler overheating",
    "metric": "temperature",
    "scope": {"type": "thermostat"},
    "severity": "critical",
    "condition": {"kind": "threshold", "op": ">", "value": 90, "clear": 80, "for_s": 30},
}


async def test_a_rule_is_created_enabled_with_location_etag_and_position(
    client: httpx.AsyncClient, store: DeviceStore
) -> None:
    response = await client.post("/rules", json=HOT_RULE, headers=OPERATOR)
    assert response.status_code == 201, response.text
    body = response.json()
    assert (body["rule_id"], body["version"], body["enabled"]) == ("boiler-hot", 1, True)
    assert body["condition"] == {**HOT_RULE["condition"], "kind": "threshold"}
    assert response.headers["location"] == "/api/v1/rules/boiler-hot"
    assert response.headers["etag"] == '"1"'
    assert int(response.headers["iot-position"]) == body["position"] > 0
    rule = store.get_rule("boiler-hot")
    assert rule is not None
    assert rule.spec.name == "Boiler overheating"
    again = await client.post("/rules", json=HOT_RULE, headers=OPERATOR)
    assert "exists already" in assert_problem(again, 409)["detail"]
    unnamed = await client.post(
        "/rules", json={k: v for k, v in HOT_RULE.items() if k != "rule_id"}, headers=OPERATOR
    )
    assert unnamed.status_code == 201
    assert unnamed.json()["rule_id"].startswith("r-")


async def test_an_invalid_rule_is_422_with_every_problem(client: httpx.AsyncClient) -> None:
    bad = {
        **HOT_RULE,
        "metric": "no spaces allowed",
        "condition": {"kind": "threshold", "op": ">", "value": 90, "clear": 95, "for_s": -1},
    }
    problem = assert_problem(await client.post("/rules", json=bad, headers=OPERATOR), 422)
    fields = {e["field"]: e["message"] for e in problem["errors"]}
    assert set(fields) == {"metric", "condition.clear", "condition.for_s"}
    assert "at most value" in fields["condition.clear"]
    assert "negative" in fields["condition.for_s"]
    spike = {**HOT_RULE, "condition": {"kind": "spike"}}
    problem = assert_problem(await client.post("/rules", json=spike, headers=OPERATOR), 422)
    assert "unknown condition kind 'spike'" in problem["errors"][0]["message"]
    viewer = await client.post("/rules", json=HOT_RULE, headers=VIEWER)
    assert_problem(viewer, 403)


async def test_a_patch_merges_into_the_definition_honouring_if_match(
    client: httpx.AsyncClient,
) -> None:
    await client.post("/rules", json=HOT_RULE, headers=OPERATOR)
    patch = {"condition": {"value": 95}, "severity": "warning"}
    stale = await client.patch(
        "/rules/boiler-hot", json=patch, headers={**OPERATOR, "If-Match": '"7"'}
    )
    assert assert_problem(stale, 412)["current_version"] == 1
    response = await client.patch(
        "/rules/boiler-hot", json=patch, headers={**OPERATOR, "If-Match": '"1"'}
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["version"] == 2
    assert body["severity"] == "warning"
    assert body["condition"]["value"] == 95
    assert body["condition"]["clear"] == 80  # merged, not replaced
    same = await client.patch("/rules/boiler-hot", json=patch, headers=OPERATOR)
    assert same.status_code == 200
    assert same.json()["version"] == 2  # identical: nothing recorded
    broken = {"condition": {"clear": 99}}  # clear above value for ">"
    problem = assert_problem(
        await client.patch("/rules/boiler-hot", json=broken, headers=OPERATOR), 422
    )
    assert problem["errors"][0]["field"] == "condition.clear"
    missing = await client.patch("/rules/nope", json=patch, headers=OPERATOR)
    assert_problem(missing, 404)
    renamed = await client.patch("/rules/boiler-hot", json={"rule_id": "x"}, headers=OPERATOR)
    assert_problem(renamed, 422)


async def test_enable_and_disable_are_transitions_and_honour_idempotency_keys(
    client: httpx.AsyncClient,
) -> None:
    await client.post("/rules", json=HOT_RULE, headers=OPERATOR)
    enabled = await client.post("/rules/boiler-hot/enable", headers=OPERATOR)
    assert "already enabled" in assert_problem(enabled, 409)["detail"]
    keyed = {**OPERATOR, "Idempotency-Key": "disable-1"}
    first = await client.post("/rules/boiler-hot/disable", headers=keyed)
    retry = await client.post("/rules/boiler-hot/disable", headers=keyed)
    assert first.status_code == retry.status_code == 200
    assert retry.headers["idempotent-replayed"] == "true"
    assert first.json()["enabled"] is False
    assert retry.json()["version"] == first.json()["version"] == 2
    assert retry.json()["position"] == first.json()["position"]
    again = await client.post("/rules/boiler-hot/disable", headers=OPERATOR)
    assert_problem(again, 409)
    back = await client.post("/rules/boiler-hot/enable", headers={**OPERATOR, "If-Match": '"2"'})
    assert back.status_code == 200
    assert back.json()["enabled"] is True


# --- CORS: the dashboard, served by the gateway on another origin -----------------------------

DASHBOARD = "http://dashboard.example:8082"


@pytest.fixture
async def cors_client(service: CommandService) -> AsyncIterator[httpx.AsyncClient]:
    async def ready() -> Mapping[str, bool]:
        return {}

    app = create_app(service, Authorizer(TOKENS), ready, cors_origins=[DASHBOARD])
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test/api/v1") as client:
        yield client


async def test_a_preflight_from_the_dashboards_origin_is_admitted_without_a_token(
    cors_client: httpx.AsyncClient,
) -> None:
    response = await cors_client.options(
        "/alerts/a-1/acknowledge",
        headers={
            "Origin": DASHBOARD,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization, content-type, idempotency-key",
        },
    )
    assert response.status_code == 200, response.text
    assert response.headers["access-control-allow-origin"] == DASHBOARD
    assert "POST" in response.headers["access-control-allow-methods"]
    allowed = response.headers["access-control-allow-headers"].lower()
    assert {"authorization", "content-type", "idempotency-key"} <= set(allowed.split(", "))


async def test_a_request_from_the_dashboard_is_answered_with_its_origin_and_exposed_headers(
    cors_client: httpx.AsyncClient,
) -> None:
    response = await cors_client.post(
        "/devices",
        json={"name": "Boiler", "type": "thermostat"},
        headers={**OPERATOR, "Origin": DASHBOARD},
    )
    assert response.status_code == 201, response.text
    assert response.headers["access-control-allow-origin"] == DASHBOARD
    assert "Location" in response.headers["access-control-expose-headers"]
    # the token still decides: CORS admits the browser, not the request
    refused = await cors_client.post(
        "/devices", json={"name": "B", "type": "t"}, headers={**VIEWER, "Origin": DASHBOARD}
    )
    assert refused.status_code == 403
    assert refused.headers["access-control-allow-origin"] == DASHBOARD


async def test_another_origin_is_not_admitted(cors_client: httpx.AsyncClient) -> None:
    preflight = await cors_client.options(
        "/devices",
        headers={"Origin": "http://evil.example", "Access-Control-Request-Method": "POST"},
    )
    assert preflight.status_code == 400
    assert "access-control-allow-origin" not in preflight.headers
    response = await cors_client.get("/openapi.json", headers={"Origin": "http://evil.example"})
    assert "access-control-allow-origin" not in response.headers


async def test_without_origins_configured_no_cors_headers_are_sent(
    client: httpx.AsyncClient,
) -> None:
    response = await client.get("/openapi.json", headers={"Origin": DASHBOARD})
    assert response.status_code == 200
    assert "access-control-allow-origin" not in response.headers
