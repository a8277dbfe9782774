"""The command API's OpenAPI document, served by the app on the real event store and NATS."""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import nats
import pytest

from commands.api import CommandService, create_app
from commands.handlers import Credentials
from commands.openapi import openapi_document
from infra import secrets
from infra.eventstore import DeviceStore, GroupCommitter
from infra.httpkit import Authorizer
from infra.settings import Settings
from infra.streams import Streams
from tests.conftest import TOKENS

pytestmark = pytest.mark.integration

OPERATOR = {"Authorization": "Bearer operator-token-012345678"}


@pytest.fixture
async def client(migrated: Settings, store: DeviceStore) -> AsyncIterator[httpx.AsyncClient]:
    """The command API as `iot run commands` builds it, on this test's namespace."""
    nc = await nats.connect(migrated.nats_url)
    js, streams = nc.jetstream(), Streams(migrated.namespace)

    async def hand_over(device_id: str, version: int, secret: str) -> None:
        await secrets.hand_over(js, streams, device_id, version, secret)

    async def ready() -> dict[str, bool]:
        return {"postgres": True, "nats": nc.is_connected}

    counter = itertools.count(1)
    executor = ThreadPoolExecutor(4)
    committer = GroupCommitter(store)
    service = CommandService(
        store=store,
        committer=committer,
        executor=executor,
        credentials=Credentials(
            new_secret=lambda: f"secret-{next(counter)}", new_salt=lambda: b"0123456789abcdef"
        ),
        new_device_id=lambda: f"gen-{next(counter)}",
        hand_over=hand_over,
    )
    transport = httpx.ASGITransport(app=create_app(service, Authorizer(TOKENS), ready))
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
        yield c
    executor.shutdown()
    committer.close()
    await nc.close()


async def test_the_document_is_served_without_a_token_and_describes_a_real_answer(
    client: httpx.AsyncClient,
) -> None:
    response = await client.get("/api/v1/openapi.json")
    assert response.status_code == 200
    document: dict[str, Any] = response.json()
    assert document == openapi_document()
    assert document["openapi"] == "3.1.0"
    assert (await client.get("/openapi.json")).json() == document
    cached = await client.get(
        "/api/v1/openapi.json", headers={"If-None-Match": response.headers["etag"]}
    )
    assert cached.status_code == 304

    # A registration answers as the document says.
    registered = await client.post(
        "/api/v1/devices", json={"name": "Boiler", "type": "thermostat"}, headers=OPERATOR
    )
    operation = document["paths"]["/devices"]["post"]
    assert str(registered.status_code) in operation["responses"]
    described = operation["responses"][str(registered.status_code)]
    assert {"etag", "iot-position", "location"} <= {h.lower() for h in described["headers"]}
    assert {"etag", "iot-position", "location"} <= set(registered.headers)
    schema = document["components"]["schemas"]["Registered"]
    body = registered.json()
    assert set(schema["required"]) <= set(body) <= set(schema["properties"])
    assert body["status"] in schema["properties"]["status"]["enum"]
