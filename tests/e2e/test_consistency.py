"""Read your writes: a gateway read with the position of a command answer reflects that change.

Commands, relay, the views projector and the gateway as `iot run` processes.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from infra.settings import Settings
from tests.e2e.pipeline import OPERATOR, VIEWER
from tests.e2e.processes import Component

pytestmark = pytest.mark.e2e


@pytest.fixture
def components(migrated: Settings) -> Iterator[dict[str, Component]]:
    started: dict[str, Component] = {}
    try:
        for name, args in (
            ("commands", ("commands",)),
            ("relay", ("relay",)),
            ("views", ("projector", "views")),
            ("gateway", ("gateway",)),
        ):
            started[name] = Component(migrated, *args)
        for component in started.values():
            component.wait_ready(timeout=60)
        yield started
    finally:
        for component in started.values():
            component.stop()


def read_after(
    gateway: str, path: str, position: int, *, header: bool = False, **query: str
) -> httpx.Response:
    """A read with the consistency token; a 503 (not caught up in time) is retried as told."""
    params = query if header else {**query, "after": str(position)}
    headers = {**VIEWER, "Iot-After": str(position)} if header else VIEWER
    deadline = time.monotonic() + 60
    while True:
        response = httpx.get(f"{gateway}/api/v1{path}", params=params, headers=headers, timeout=10)
        if response.status_code != 503 or time.monotonic() > deadline:
            return response
        assert response.json()["position"] < position
        time.sleep(int(response.headers["retry-after"]))


def change(response: httpx.Response) -> int:
    """The position of a successful change: the same in its body and its header."""
    assert response.status_code in (200, 201), response.text
    position: int = response.json()["position"]
    assert response.headers["iot-position"] == str(position)
    return position


def test_a_read_with_the_position_of_a_change_shows_that_change(
    components: dict[str, Component],
) -> None:
    commands = components["commands"].url + "/api/v1"
    gateway = components["gateway"].url
    registered = httpx.post(
        f"{commands}/devices",
        json={"device_id": "ryw-1", "name": "Boiler", "type": "thermostat"},
        headers=OPERATOR,
        timeout=10,
    )
    answer = read_after(gateway, "/devices/ryw-1", change(registered))
    assert answer.status_code == 200, answer.text
    assert answer.json()["name"] == "Boiler"

    for round_ in range(1, 6):
        config: dict[str, Any] = {"setpoint": 20 + round_, "round": round_}
        patched = httpx.patch(
            f"{commands}/devices/ryw-1/config",
            json={"config": config},
            headers=OPERATOR,
            timeout=10,
        )
        position = change(patched)
        answer = read_after(gateway, "/devices/ryw-1", position, header=round_ % 2 == 0)
        assert answer.status_code == 200, answer.text
        assert int(answer.headers["iot-position"]) >= position
        assert answer.json()["desired"] == {"version": round_, "config": config}

    suspended = httpx.post(
        f"{commands}/devices/ryw-1/suspend", json={"reason": "test"}, headers=OPERATOR, timeout=10
    )
    position = change(suspended)
    listed = read_after(gateway, "/devices", position, status="suspended")
    assert [d["device_id"] for d in listed.json()["items"]] == ["ryw-1"]
    fleet = read_after(gateway, "/fleet", position)
    assert fleet.json()["by_status"]["suspended"] == 1
