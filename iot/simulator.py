"""`iot simulate`: a fleet of devices speaking the MQTT contract, with plausible values.

Each device is its own MQTT client (client id = device id, last will `offline` on its retained
status topic), registered first through the command API when a token is given. Values follow
random walks (temperature, humidity), slow drains (battery) and occasional flips (door), sent
as flat server-time payloads, device-time `ts`+`values`, or batches, in a mix.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import random
import time
from dataclasses import dataclass, field
from typing import Any

import aiomqtt
import httpx
import msgspec

log = logging.getLogger(__name__)
_encode = msgspec.json.Encoder().encode


@dataclass
class SimulatedDevice:
    device_id: str
    rng: random.Random
    temperature: float = 21.0
    humidity: float = 45.0
    battery: float = 100.0
    door: bool = False
    sent: int = 0
    secret: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def step(self) -> dict[str, float | bool | str]:
        self.temperature += self.rng.gauss(0, 0.2) + 0.05 * (21.0 - self.temperature)
        self.humidity = min(100.0, max(0.0, self.humidity + self.rng.gauss(0, 0.5)))
        self.battery = max(0.0, self.battery - self.rng.uniform(0, 0.01))
        if self.rng.random() < 0.02:
            self.door = not self.door
        return {
            "temperature": round(self.temperature, 2),
            "humidity": round(self.humidity, 1),
            "battery": round(self.battery, 2),
            "door_open": self.door,
            "mode": "eco" if self.temperature < 21.5 else "comfort",
        }

    def payload(self, now_ms: int) -> bytes:
        """One telemetry message, in one of the contract's three shapes."""
        self.sent += 1
        shape = self.sent % 10
        if shape < 6:
            return _encode({"ts": now_ms, "values": self.step()})
        if shape < 9:
            return _encode(self.step())
        return _encode([{"ts": now_ms - 1000 * i, "values": self.step()} for i in range(5)])


async def register_fleet(
    api_url: str, token: str, devices: list[SimulatedDevice], prefix_labels: dict[str, str]
) -> None:
    """Register each device through the command API; an existing one is kept as it is."""
    headers = {"Authorization": f"Bearer {token}"}
    async with httpx.AsyncClient(base_url=api_url, headers=headers, timeout=10) as client:
        for device in devices:
            body = {
                "device_id": device.device_id,
                "name": f"Simulated {device.device_id}",
                "type": "sim-thermostat",
                "labels": prefix_labels,
            }
            response = await client.post("/api/v1/devices", json=body)
            if response.status_code == 201:
                device.secret = response.json()["secret"]
            elif response.status_code != 409:
                response.raise_for_status()


async def run_device(
    device: SimulatedDevice, host: str, port: int, interval: float, stop: asyncio.Event
) -> None:
    status = f"devices/{device.device_id}/status"
    will = aiomqtt.Will(status, b"offline", qos=1, retain=True)
    while not stop.is_set():
        try:
            async with aiomqtt.Client(
                host,
                port,
                identifier=device.device_id,
                username=device.device_id if device.secret else None,
                password=device.secret or None,
                will=will,
                keepalive=30,
            ) as client:
                await client.publish(status, b"online", qos=1, retain=True)
                await asyncio.sleep(device.rng.uniform(0, interval))
                while not stop.is_set():
                    now_ms = int(time.time() * 1000)
                    await client.publish(
                        f"devices/{device.device_id}/telemetry", device.payload(now_ms), qos=1
                    )
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(stop.wait(), timeout=interval)
                await client.publish(status, b"offline", qos=1, retain=True)
        except aiomqtt.MqttError as e:
            log.warning(
                "simulated device lost MQTT", extra={"device": device.device_id, "error": str(e)}
            )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=2.0)


async def simulate(
    *,
    devices: int,
    rate: float,
    mqtt_host: str,
    mqtt_port: int,
    api_url: str | None,
    token: str | None,
    prefix: str = "sim",
    seed: int = 1,
    stop: asyncio.Event,
) -> None:
    """Run `devices` devices sending `rate` telemetry messages per second in all."""
    fleet = [
        SimulatedDevice(f"{prefix}-{i:04d}", random.Random(seed * 100_003 + i))
        for i in range(devices)
    ]
    if api_url and token:
        await register_fleet(api_url, token, fleet, {"fleet": prefix})
    interval = devices / rate if rate > 0 else math.inf
    log.info("simulating", extra={"devices": devices, "rate": rate, "interval_s": interval})
    await asyncio.gather(*(run_device(d, mqtt_host, mqtt_port, interval, stop) for d in fleet))
