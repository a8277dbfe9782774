"""Load shedding: the command API admits a bounded number of requests at once and answers the
next one 503 problem+json with Retry-After at once, before it reaches the store."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, cast

import httpx
import pytest

from commands.api import CommandService, create_app
from commands.handlers import Credentials
from infra.eventstore import DeviceStore, GroupCommitter
from infra.httpkit import PROBLEM, Admission, Authorizer, Problem
from infra.settings import SettingsError, load

OPERATOR = {"Authorization": "Bearer operator-token-012345678"}
TOKENS = {"operator-token-012345678": "operator"}


def test_admission_refuses_beyond_its_limit_and_admits_again_once_one_leaves() -> None:
    gate = Admission(2, retry_after=3, what="things")
    with gate.admit(), gate.admit():
        assert gate.full
        with pytest.raises(Problem) as refused, gate.admit():
            pass
        assert refused.value.status == 503
        assert refused.value.headers == {"Retry-After": "3"}
        assert "2 things" in refused.value.detail
        assert gate.active == 2
    assert gate.active == 0
    assert gate.shed == 1
    with gate.admit():
        assert gate.active == 1


def test_admission_leaves_when_the_block_raises() -> None:
    gate = Admission(1)
    with pytest.raises(RuntimeError), gate.admit():
        raise RuntimeError("boom")
    assert gate.active == 0
    assert not gate.full


def test_an_admission_limit_below_one_is_refused() -> None:
    with pytest.raises(ValueError):
        Admission(0)


def test_the_setting_defaults_to_64_and_is_bounded() -> None:
    assert load({}).commands_max_requests == 64
    assert load({"IOT_COMMANDS_MAX_REQUESTS": "8"}).commands_max_requests == 8
    with pytest.raises(SettingsError, match="IOT_COMMANDS_MAX_REQUESTS"):
        load({"IOT_COMMANDS_MAX_REQUESTS": "0"})


class BlockingStore:
    """A committer whose saves wait until released: requests pile up inside the limit."""

    def __init__(self) -> None:
        self.entered = threading.Semaphore(0)
        self.release = threading.Event()

    def save_device(self, device: object, idempotency: object = None) -> int:
        self.entered.release()
        self.release.wait(10)
        raise AssertionError("released: this test ends here")

    def __getattr__(self, name: str) -> Any:
        raise AssertionError(f"unexpected store call {name}")


@pytest.fixture
async def blocked() -> AsyncIterator[tuple[httpx.AsyncClient, BlockingStore, Admission]]:
    async def hand_over(device_id: str, version: int, secret: str) -> None:
        raise AssertionError("no secret is handed over here")

    async def ready() -> dict[str, bool]:
        return {}

    store = BlockingStore()
    executor = ThreadPoolExecutor(4)
    service = CommandService(
        store=cast(DeviceStore, store),
        committer=cast(GroupCommitter, store),
        executor=executor,
        credentials=Credentials(new_secret=lambda: "s", new_salt=lambda: b"0" * 16),
        new_device_id=lambda: "dev-1",
        hand_over=hand_over,
    )
    gate = Admission(2, what="command requests")
    app = create_app(service, Authorizer(TOKENS), ready, gate)
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        yield client, store, gate
    store.release.set()
    executor.shutdown()


async def test_the_api_sheds_the_request_beyond_its_limit_with_503_and_retry_after(
    blocked: tuple[httpx.AsyncClient, BlockingStore, Admission],
) -> None:
    client, store, gate = blocked
    body = {"name": "n", "type": "t"}

    async def post(device: str) -> httpx.Response:
        return await client.post(
            "/api/v1/devices", json={**body, "device_id": device}, headers=OPERATOR
        )

    inside = [asyncio.create_task(post(f"d{i}")) for i in range(2)]
    for _ in range(2):  # both are in the store's threads
        assert await asyncio.to_thread(store.entered.acquire, True, 10)
    assert gate.active == 2

    shed = await post("d2")
    assert shed.status_code == 503
    assert shed.headers["content-type"] == PROBLEM
    assert shed.headers["retry-after"] == "1"
    assert shed.json()["status"] == 503
    assert "overloaded" in shed.json()["detail"]
    # a request of another operation shares the limit
    other = await client.post("/api/v1/devices/d0/suspend", json={}, headers=OPERATOR)
    assert other.status_code == 503
    assert gate.shed == 2

    store.release.set()
    answers = await asyncio.gather(*inside)
    assert [a.status_code for a in answers] == [500, 500]  # the stand-in store fails them
    assert gate.active == 0
    store.release.clear()
    again = asyncio.create_task(post("d3"))
    assert await asyncio.to_thread(store.entered.acquire, True, 10)  # admitted once more
    assert gate.active == 1
    store.release.set()
    await again
