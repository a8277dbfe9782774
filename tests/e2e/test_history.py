"""A device's history through the whole system: commands, relay, the views projector and the
gateway as `iot run` processes. A device taken through its life over the command API; the
gateway's history lists every event with who caused it, `as_of` each version's time answers
that version's state, `diff` says what changed, and pages stay stable while events land."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from infra.settings import Settings
from tests.conftest import TOKENS
from tests.e2e.pipeline import OPERATOR, VIEWER
from tests.e2e.processes import Component

pytestmark = pytest.mark.e2e

ADMIN = {"Authorization": "Bearer admin-token-0123456789ab"}
NAMED = ",".join(
    f"{token}={role}:{'ops-alice' if role == 'operator' else 'root-bob'}"
    if role != "viewer"
    else f"{token}={role}"
    for token, role in TOKENS.items()
)


@pytest.fixture
def system(migrated: Settings) -> Iterator[tuple[str, str]]:
    started: list[Component] = []
    try:
        started.append(Component(migrated, "commands", IOT_API_TOKENS=NAMED))
        started.append(Component(migrated, "relay"))
        started.append(Component(migrated, "projector", "views"))
        started.append(Component(migrated, "gateway"))
        for component in started:
            component.wait_ready(timeout=60)
        yield started[0].url + "/api/v1", started[3].url + "/api/v1"
    finally:
        for component in started:
            component.stop()


def send(method: str, url: str, headers: dict[str, str], **body: Any) -> int:
    """A change through the command API; its position."""
    response = httpx.request(method, url, json=body, headers=headers, timeout=10)
    assert response.status_code in (200, 201, 202), response.text
    position: int = response.json()["position"]
    return position


def history(gateway: str, position: int, **params: str) -> httpx.Response:
    """A history read once the views have reached `position` (503s retried as told)."""
    deadline = time.monotonic() + 60
    while True:
        response = httpx.get(
            f"{gateway}/devices/life-1/history",
            params={**params, "after": str(position)},
            headers=VIEWER,
            timeout=10,
        )
        if response.status_code != 503 or time.monotonic() > deadline:
            return response
        time.sleep(int(response.headers.get("retry-after", "1")))


def all_events(gateway: str, position: int, limit: int = 4) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = []
    cursor = ""
    while True:
        params = {"limit": str(limit), **({"cursor": cursor} if cursor else {})}
        page = history(gateway, position, **params)
        assert page.status_code == 200, page.text
        items += page.json()["items"]
        cursor = page.json()["next_cursor"]
        if cursor is None:
            return items


def test_a_devices_life_is_in_its_history_with_its_state_at_every_version(
    system: tuple[str, str],
) -> None:
    commands, gateway = system
    device = f"{commands}/devices/life-1"
    expected: list[tuple[str, str, dict[str, Any]]] = []  # (type, caused_by, state after)
    state: dict[str, Any] = {
        "name": "Boiler",
        "type": "boiler",
        "labels": {"site": "north"},
        "status": "provisioned",
        "desired": {"version": 0, "config": {}},
        "online": False,
    }
    position = send(
        "POST",
        f"{commands}/devices",
        OPERATOR,
        device_id="life-1",
        name="Boiler",
        type="boiler",
        labels={"site": "north"},
    )
    expected.append(("registered", "ops-alice", dict(state)))
    times = [(1, time.time())]  # (the version, a moment after it)
    steps: list[tuple[str, str, dict[str, str], dict[str, Any], dict[str, Any]]] = [
        ("PATCH", "/config", OPERATOR, {"config": {"setpoint": 21}}, {}),
        ("POST", "/commands", OPERATOR, {"name": "reboot", "args": {"delay": 1}}, {}),
        ("POST", "/suspend", OPERATOR, {"reason": "maintenance"}, {"status": "suspended"}),
        ("POST", "/resume", OPERATOR, {}, {}),
        ("POST", "/rotate-secret", OPERATOR, {}, {}),
        ("PATCH", "/config", OPERATOR, {"config": {"setpoint": 23}}, {}),
        ("POST", "/decommission", ADMIN, {"reason": "replaced"}, {"status": "decommissioned"}),
    ]
    kinds = [
        "configured",
        "command_requested",
        "suspended",
        "resumed",
        "secret_rotated",
        "configured",
        "decommissioned",
    ]
    config_version = 0
    for (method, path, headers, body, changes), kind in zip(steps, kinds, strict=True):
        time.sleep(0.05)  # each version at its own millisecond, so `as_of` can tell them apart
        position = send(method, device + path, headers, **body)
        caused_by = "root-bob" if headers is ADMIN else "ops-alice"
        if kind == "configured":
            config_version += 1
            state["desired"] = {"version": config_version, "config": body["config"]}
        if kind == "resumed":
            state["status"] = "provisioned"  # it never connected
        state.update(changes)
        expected.append((kind, caused_by, dict(state)))
        if kind == "suspended":  # which cancels the pending reboot
            expected.append(("command_cancelled", caused_by, dict(state)))
        times.append((len(expected), time.time()))

    events = all_events(gateway, position)
    assert [e["version"] for e in events] == list(range(len(expected), 0, -1))
    assert [(e["type"], e["caused_by"]) for e in reversed(events)] == [
        (kind, who) for kind, who, _ in expected
    ]
    assert "operator-token" not in str(events)  # the token's name, never the token
    for version, moment in times:  # the state at each version's time
        answer = history(gateway, position, as_of=str(int(moment * 1000)))
        assert answer.status_code == 200, answer.text
        assert answer.json()["version"] == version
        state_then = {**expected[version - 1][2], "reported": None}  # it never reported
        assert answer.json()["state"] == state_then, version
    before = history(gateway, position, as_of=str(int((times[0][1] - 60) * 1000)))
    assert before.status_code == 404  # not registered yet

    first, last = int(times[1][1] * 1000), int(times[-1][1] * 1000)
    changed = history(gateway, position, diff=f"{first},{last}")
    assert changed.status_code == 200, changed.text
    assert changed.json()["from_version"] == 2
    assert changed.json()["to_version"] == len(expected)
    assert changed.json()["events"] == len(expected) - 2
    assert changed.json()["changes"] == {
        "desired": {
            "from": {"version": 1, "config": {"setpoint": 21}},
            "to": {"version": 2, "config": {"setpoint": 23}},
        },
        "status": {"from": "provisioned", "to": "decommissioned"},
    }
    only = history(gateway, position, types="configured,decommissioned")
    assert [e["type"] for e in only.json()["items"]] == [
        "decommissioned",
        "configured",
        "configured",
    ]
    bad = history(gateway, position, types="exploded")
    assert bad.status_code == 422
    assert bad.headers["content-type"].startswith("application/problem+json")


def test_pages_of_history_stay_stable_while_events_are_appended(system: tuple[str, str]) -> None:
    commands, gateway = system
    device = f"{commands}/devices/life-1"
    position = send(
        "POST", f"{commands}/devices", OPERATOR, device_id="life-1", name="B", type="boiler"
    )
    for i in range(20):
        position = send("PATCH", device + "/config", OPERATOR, config={"i": i})
    seen: list[int] = []
    cursor = ""
    newest = 21
    while True:
        params = {"limit": "5", **({"cursor": cursor} if cursor else {})}
        page = history(gateway, position, **params)
        assert page.status_code == 200, page.text
        seen += [e["version"] for e in page.json()["items"]]
        # events land between pages: the pages go on below where they were
        position = send("PATCH", device + "/config", OPERATOR, config={"late": len(seen)})
        cursor = page.json()["next_cursor"]
        if cursor is None:
            break
    assert seen == list(range(newest, 0, -1))
