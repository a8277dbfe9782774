"""Simulated devices against the machine's Mosquitto (anonymous, 1883): the device contract."""

from __future__ import annotations

import asyncio
import contextlib
import math
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import aiomqtt
import msgspec
import pytest

from iot.simulator import Hooks, SimulatedDevice, make_fleet, run_fleet, wait_ready
from tests.conftest import settings_for

pytestmark = pytest.mark.integration

WAIT_S = 20.0  # a failure bound only: every wait below ends as soon as its condition holds


@dataclass
class Observer:
    """An MQTT client watching every topic of the fleet's devices."""

    client: aiomqtt.Client
    messages: asyncio.Queue[tuple[str, bytes, bool]] = field(default_factory=asyncio.Queue)

    async def next_on(self, topic: str) -> bytes:
        """The next message on `topic` (others are dropped)."""
        async with asyncio.timeout(WAIT_S):
            while True:
                got, payload, _ = await self.messages.get()
                if got == topic:
                    return payload

    async def publish(self, topic: str, payload: Any, retain: bool = False) -> None:
        data = payload if isinstance(payload, bytes) else msgspec.json.encode(payload)
        await self.client.publish(topic, data, qos=1, retain=retain)


@dataclass
class Fleet:
    devices: list[SimulatedDevice]
    observer: Observer
    acks: list[tuple[str, str, str]]
    stop: asyncio.Event
    mqtt: tuple[str, int]

    @property
    def device(self) -> SimulatedDevice:
        return self.devices[0]


@pytest.fixture
def mqtt() -> tuple[str, int]:
    """The machine's broker (IOT_MQTT_URL, default 127.0.0.1:1883), anonymous."""
    host, port, _ = settings_for("simtest").mqtt
    return host, port


@pytest.fixture
async def fleet(mqtt: tuple[str, int]) -> AsyncIterator[Fleet]:
    host, port = mqtt
    prefix = "simtest-" + uuid.uuid4().hex[:8]
    devices = make_fleet(2, prefix=prefix)
    acks: list[tuple[str, str, str]] = []
    stop = asyncio.Event()
    async with aiomqtt.Client(host, port, identifier=prefix + "-observer") as client:
        observer = Observer(client)
        for device in devices:
            await client.subscribe(f"devices/{device.device_id}/#", qos=1)

        async def collect() -> None:
            async for message in client.messages:
                payload = message.payload
                assert isinstance(payload, bytes)
                await observer.messages.put((message.topic.value, payload, message.retain))

        collector = asyncio.create_task(collect())
        hooks = Hooks(on_ack=lambda d, c, s: acks.append((d, c, s)))
        task = asyncio.create_task(run_fleet(devices, host, port, math.inf, stop, hooks))
        try:
            await asyncio.wait_for(wait_ready(devices), WAIT_S)
            yield Fleet(devices, observer, acks, stop, (host, port))
        finally:
            stop.set()
            await asyncio.wait_for(task, WAIT_S)
            collector.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await collector
            for device in devices:  # leave no retained messages on the shared broker
                for topic in ("status", "desired"):
                    await client.publish(f"devices/{device.device_id}/{topic}", b"", retain=True)


def command(command_id: str, name: str = "reboot", ttl_s: float = 60) -> dict[str, Any]:
    expires = datetime.now(UTC) + timedelta(seconds=ttl_s)
    return {
        "command_id": command_id,
        "name": name,
        "args": {"n": 1},
        "expires_at": expires.isoformat().replace("+00:00", "Z"),
    }


async def retained(host: str, port: int, topic: str) -> bytes:
    """The retained message of `topic`, as a new subscriber gets it."""
    async with aiomqtt.Client(host, port) as client:
        await client.subscribe(topic, qos=1)
        async with asyncio.timeout(WAIT_S):
            async for message in client.messages:
                assert message.retain
                assert isinstance(message.payload, bytes)
                return message.payload
    raise AssertionError("no retained message")


async def test_device_is_online_retained_once_ready_and_offline_after_stopping(
    fleet: Fleet,
) -> None:
    topic = f"devices/{fleet.device.device_id}/status"
    assert await retained(*fleet.mqtt, topic) == b"online"
    fleet.stop.set()
    while await fleet.observer.next_on(topic) != b"offline":  # skips the earlier `online`
        pass
    assert await retained(*fleet.mqtt, topic) == b"offline"


async def test_command_is_acknowledged_with_its_result(fleet: Fleet) -> None:
    topic = f"devices/{fleet.device.device_id}"
    await fleet.observer.publish(f"{topic}/commands", command("c-1", "echo"))
    ack = msgspec.json.decode(await fleet.observer.next_on(f"{topic}/commands/ack"))
    assert ack["command_id"] == "c-1"
    assert ack["status"] == "ok"
    assert ack["result"]["command"] == "echo"
    assert ack["result"]["args"] == {"n": 1}
    received = datetime.fromisoformat(ack["result"]["received_at"])
    assert abs(received - datetime.now(UTC)) < timedelta(minutes=5)
    assert fleet.acks == [(fleet.device.device_id, "c-1", "ok")]

    await fleet.observer.publish(f"{topic}/commands", command("c-2", "fail"))
    ack = msgspec.json.decode(await fleet.observer.next_on(f"{topic}/commands/ack"))
    assert (ack["command_id"], ack["status"]) == ("c-2", "error")


async def test_duplicate_command_is_acknowledged_once(fleet: Fleet) -> None:
    topic = f"devices/{fleet.device.device_id}"
    await fleet.observer.publish(f"{topic}/commands", command("dup"))
    await fleet.observer.publish(f"{topic}/commands", command("dup"))
    await fleet.observer.publish(f"{topic}/commands", command("after"))
    seen: list[str] = []
    while not seen or seen[-1] != "after":  # commands are handled in order: `after` is last
        ack = msgspec.json.decode(await fleet.observer.next_on(f"{topic}/commands/ack"))
        seen.append(ack["command_id"])
    assert seen == ["dup", "after"]
    assert fleet.device.duplicates == 1
    assert [c for _, c, _ in fleet.acks] == ["dup", "after"]


async def test_expired_or_malformed_command_is_never_executed(fleet: Fleet) -> None:
    topic = f"devices/{fleet.device.device_id}"
    await fleet.observer.publish(f"{topic}/commands", command("late", ttl_s=-1))
    await fleet.observer.publish(f"{topic}/commands", b"{not json")
    await fleet.observer.publish(f"{topic}/commands", command("fresh"))
    ack = msgspec.json.decode(await fleet.observer.next_on(f"{topic}/commands/ack"))
    assert ack["command_id"] == "fresh"
    assert fleet.device.expired == 1


async def test_desired_state_is_applied_and_reported_with_its_version(fleet: Fleet) -> None:
    topic = f"devices/{fleet.device.device_id}"
    await fleet.observer.publish(
        f"{topic}/desired", {"version": 3, "config": {"rate": 5, "mode": "eco"}}, retain=True
    )
    reported = msgspec.json.decode(await fleet.observer.next_on(f"{topic}/reported"))
    assert reported == {"rate": 5, "mode": "eco", "config_version": 3}
    assert fleet.device.config == {"rate": 5, "mode": "eco"}
    # An older version (a stale retained message) is not applied.
    await fleet.observer.publish(f"{topic}/desired", {"version": 2, "config": {"rate": 1}})
    await fleet.observer.publish(f"{topic}/desired", {"version": 4, "config": {"rate": 6}})
    reported = msgspec.json.decode(await fleet.observer.next_on(f"{topic}/reported"))
    assert reported == {"rate": 6, "config_version": 4}


async def test_retained_desired_state_reaches_a_device_when_it_connects(
    mqtt: tuple[str, int],
) -> None:
    host, port = mqtt
    (device,) = make_fleet(1, prefix="simtest-" + uuid.uuid4().hex[:8])
    topic = f"devices/{device.device_id}"
    reported: list[int] = []
    got = asyncio.Event()

    def on_reported(_: str, version: int) -> None:
        reported.append(version)
        got.set()

    stop = asyncio.Event()
    async with aiomqtt.Client(host, port) as client:
        desired = msgspec.json.encode({"version": 7, "config": {"sp": 20}})
        await client.publish(f"{topic}/desired", desired, qos=1, retain=True)
        task = asyncio.create_task(
            run_fleet([device], host, port, math.inf, stop, Hooks(on_reported=on_reported))
        )
        try:
            await asyncio.wait_for(got.wait(), WAIT_S)
        finally:
            stop.set()
            await asyncio.wait_for(task, WAIT_S)
            for name in ("status", "desired"):
                await client.publish(f"{topic}/{name}", b"", retain=True)
    assert reported == [7]
    assert (device.config, device.config_version) == ({"sp": 20}, 7)
