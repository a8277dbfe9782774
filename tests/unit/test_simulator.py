"""The simulated device's decisions and its registration, without sockets."""

from __future__ import annotations

import itertools
import json
import random
from datetime import UTC, datetime
from typing import Any

import httpx

from iot.simulator import (
    REMEMBERED_COMMANDS,
    Command,
    SimulatedDevice,
    execute,
    make_fleet,
    register_fleet,
)

NOW = datetime(2026, 1, 1, tzinfo=UTC).timestamp()


def test_command_named_fail_is_acknowledged_as_an_error() -> None:
    status, result = execute(Command("c", "fail"), NOW)
    assert status == "error"
    assert result["error"] == "simulated failure"


def test_other_commands_succeed_with_the_time_received_and_echo_returns_its_args() -> None:
    assert execute(Command("c", "reboot", {"x": 1}), NOW) == (
        "ok",
        {"received_at": "2026-01-01T00:00:00.000Z", "command": "reboot"},
    )
    status, result = execute(Command("c", "echo", {"x": 1}), NOW)
    assert (status, result["args"]) == ("ok", {"x": 1})


def test_a_device_remembers_a_bounded_number_of_command_ids() -> None:
    device = SimulatedDevice("d", random.Random(1))
    for i in range(REMEMBERED_COMMANDS + 5):
        device.remember(f"c{i}")
    assert len(device.handled) == REMEMBERED_COMMANDS
    assert "c4" not in device.handled
    assert f"c{REMEMBERED_COMMANDS + 4}" in device.handled


def test_fleet_ids_are_prefixed_and_numbered() -> None:
    assert [d.device_id for d in make_fleet(3, prefix="x")] == ["x-0000", "x-0001", "x-0002"]


async def test_registration_keeps_new_secrets_and_rotates_those_of_existing_devices() -> None:
    calls: list[tuple[str, str]] = []

    def answer(request: httpx.Request) -> httpx.Response:
        calls.append((request.method, request.url.path))
        assert request.headers["authorization"] == "Bearer tok"
        if request.url.path == "/api/v1/devices":
            device_id = json.loads(request.content)["device_id"]
            if device_id == "s-0001":
                return httpx.Response(409, json={"title": "Conflict"})
            return httpx.Response(201, json={"device_id": device_id, "secret": "new-" + device_id})
        if request.url.path == "/api/v1/devices/s-0001/rotate-secret":
            return httpx.Response(200, json={"device_id": "s-0001", "secret": "rotated"})
        return httpx.Response(404)

    fleet = make_fleet(2, prefix="s")
    await register_fleet(
        "http://api", "tok", fleet, {"fleet": "s"}, transport=httpx.MockTransport(answer)
    )
    assert [d.secret for d in fleet] == ["new-s-0000", "rotated"]
    assert ("POST", "/api/v1/devices/s-0001/rotate-secret") in calls
    assert ("POST", "/api/v1/devices/s-0000/rotate-secret") not in calls


def readings(device: SimulatedDevice, start_s: int, seconds: int, every_s: int = 5) -> list[Any]:
    """The device's step values over `seconds` of wall-clock time from `start_s`."""
    return [device.step((start_s + t) * 1000) for t in range(0, seconds, every_s)]


def test_without_faults_no_device_misbehaves() -> None:
    assert all(device.fault is None for device in make_fleet(5))


def test_with_faults_the_first_devices_overheat_go_silent_and_drift() -> None:
    fleet = make_fleet(5, faults=True)
    assert [d.fault for d in fleet] == ["overheat", "silent", "drift", None, None]


def test_an_overheating_device_goes_past_80_degrees_then_cools_within_its_cycle() -> None:
    device = make_fleet(1, faults=True)[0]
    hot = readings(device, 0, 45)  # the first 45 s of a 120 s cycle
    assert max(float(v["temperature"]) for v in hot) > 80
    cooled = readings(device, 45, 75)
    assert float(cooled[-1]["temperature"]) < 30


def test_a_silent_device_keeps_quiet_for_half_of_every_three_minutes() -> None:
    device = make_fleet(2, faults=True)[1]
    quiet = [device.silent(t * 1000) for t in range(0, 360)]
    assert sum(quiet) == 180
    assert not device.silent(0)
    assert device.silent(90_000)
    assert not make_fleet(1)[0].silent(90_000)


def test_a_drifting_device_climbs_to_saturation_and_starts_again() -> None:
    device = make_fleet(3, faults=True)[2]
    values = [float(v["humidity"]) for v in readings(device, 0, 5 * 200)]
    assert max(values) == 100.0
    assert values[50] - values[0] > 15  # 0.5 a reading, plus noise
    drops = [b - a for a, b in itertools.pairwise(values) if b < a - 40]
    assert drops  # saturated, then reset
