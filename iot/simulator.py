"""`iot simulate`: a fleet of devices speaking the MQTT contract, with plausible values.

Each simulated device is a real device of the contract: its own MQTT client (client id and
username = device id, password = the secret from registration when it has one), last will
`offline` (retained, QoS 1) on `devices/{id}/status`; it subscribes to its `commands` and
`desired` topics (QoS 1) before it publishes a retained `online`, acknowledges each command once
on `commands/ack` (a QoS 1 redelivery of a command it acknowledged already is ignored, a command
past its `expires_at` is never executed), applies each desired configuration and reports it with
its `config_version`, and publishes `offline` before a graceful disconnect. Telemetry follows
random walks (temperature, humidity), slow drains (battery) and occasional flips (door), sent as
flat server-time payloads, device-time `ts`+`values`, or batches, in a mix.

Faults (`--faults`): the first devices of the fleet make trouble on a fixed wall-clock cycle,
so alert rules have something to raise and clear within minutes: `overheat` (temperature
climbs towards 95 for 45 s of every 120 s, then falls back to 21), `silent` (connected, but
sends no telemetry for 90 s of every 180 s) and `drift` (humidity creeps up 0.5 a reading until
it saturates at 100, then resets: a slow runaway). Every other device behaves normally. With
`--faults` the simulator also creates alert rules that catch them (`fault_rules`), scoped to
the fleet's label, unless they exist.

Commands: the name `fail` is acknowledged with status `error`; every other name with `ok` and
result `{"received_at": <RFC 3339>, "command": <name>}` (plus `"args"` for `echo`).

In-process use (a benchmark or a test; everything runs on the caller's event loop):

    fleet = make_fleet(100, prefix="bench")
    await register_fleet(api_url, token, fleet, {"fleet": "bench"})  # secrets; 409 rotates
    hooks = Hooks(on_ack=lambda device_id, command_id, status: ...)  # after the broker's PUBACK
    stop = asyncio.Event()
    task = asyncio.create_task(run_fleet(fleet, host, port, math.inf, stop, hooks))
    await wait_ready(fleet)  # every device subscribed and `online` published
    ...                      # send commands through the API; `on_ack` tells when each is acked
    stop.set()
    await task               # each device publishes `offline` and disconnects

An `interval` of `math.inf` sends no telemetry (devices only answer commands and desired
state). Hooks run synchronously in the device's task: keep them short (record a time, set an
event or put into a queue).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import random
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import aiomqtt
import httpx
import msgspec

from infra.runtime import tcp_nodelay

log = logging.getLogger(__name__)
_encode = msgspec.json.Encoder().encode
REMEMBERED_COMMANDS = 1024  # command ids a device remembers to drop redeliveries
FAULTS = ("overheat", "silent", "drift")
OVERHEAT_CYCLE_S, OVERHEAT_FOR_S, OVERHEAT_TO = 120, 45, 95.0
SILENT_CYCLE_S, SILENT_FROM_S = 180, 90
REGISTRATION_CONCURRENCY = 8
RECONNECT_MAX_S = 30.0


class Command(msgspec.Struct, frozen=True):
    command_id: str
    name: str
    args: dict[str, Any] = {}
    expires_at: datetime | None = None


class Desired(msgspec.Struct, frozen=True):
    version: int
    config: dict[str, Any]


_decode_command = msgspec.json.Decoder(Command).decode
_decode_desired = msgspec.json.Decoder(Desired).decode


@dataclass(frozen=True)
class Hooks:
    """Callbacks of an in-process fleet: (device id, command id, ack status) after the ack's
    PUBACK; (device id, command id) when a command arrives; (device id, config version) after
    the reported state's PUBACK."""

    on_ack: Callable[[str, str, str], None] | None = None
    on_command: Callable[[str, str], None] | None = None
    on_reported: Callable[[str, int], None] | None = None


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
    config: dict[str, Any] = field(default_factory=dict)
    config_version: int = 0
    acked: int = 0
    duplicates: int = 0
    expired: int = 0
    handled: OrderedDict[str, None] = field(default_factory=OrderedDict)
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    fault: str | None = None  # one of FAULTS

    def silent(self, now_ms: int) -> bool:
        """Whether a `silent` device keeps quiet at `now_ms` (90 s of every 180 s)."""
        return self.fault == "silent" and (now_ms // 1000) % SILENT_CYCLE_S >= SILENT_FROM_S

    @property
    def topic(self) -> str:
        return f"devices/{self.device_id}"

    def step(self, now_ms: int = 0) -> dict[str, float | bool | str]:
        target, pull = 21.0, 0.05
        if self.fault == "overheat" and (now_ms // 1000) % OVERHEAT_CYCLE_S < OVERHEAT_FOR_S:
            target, pull = OVERHEAT_TO, 0.3
        elif self.fault == "overheat":
            pull = 0.3
        self.temperature += self.rng.gauss(0, 0.2) + pull * (target - self.temperature)
        self.humidity = min(100.0, max(0.0, self.humidity + self.rng.gauss(0, 0.5)))
        if self.fault == "drift":
            self.humidity = 45.0 if self.humidity >= 100.0 else min(100.0, self.humidity + 0.5)
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
            return _encode({"ts": now_ms, "values": self.step(now_ms)})
        if shape < 9:
            return _encode(self.step(now_ms))
        return _encode(
            [{"ts": now_ms - 1000 * i, "values": self.step(now_ms - 1000 * i)} for i in range(5)]
        )

    def remember(self, command_id: str) -> None:
        self.handled[command_id] = None
        while len(self.handled) > REMEMBERED_COMMANDS:
            self.handled.popitem(last=False)


def execute(command: Command, now: float) -> tuple[str, dict[str, Any]]:
    """The simulated outcome of a command: (ack status, result)."""
    if command.name == "fail":
        return "error", {"error": "simulated failure", "command": command.name}
    result: dict[str, Any] = {"received_at": _rfc3339(now), "command": command.name}
    if command.name == "echo":
        result["args"] = command.args
    return "ok", result


def _rfc3339(epoch_s: float) -> str:
    return datetime.fromtimestamp(epoch_s, UTC).isoformat(timespec="milliseconds")[:-6] + "Z"


def make_fleet(
    devices: int, prefix: str = "sim", seed: int = 1, faults: bool = False
) -> list[SimulatedDevice]:
    """The fleet; with `faults`, its first devices get the FAULTS, one each, in order."""
    fleet = [
        SimulatedDevice(f"{prefix}-{i:04d}", random.Random(seed * 100_003 + i))
        for i in range(devices)
    ]
    if faults:
        for device, fault in zip(fleet, FAULTS, strict=False):
            device.fault = fault
    return fleet


def fault_rules(prefix: str = "sim") -> dict[str, dict[str, Any]]:
    """Alert rules that catch the faults, scoped to the fleet: rule id -> definition."""
    scope = {"labels": {"fleet": prefix}}
    return {
        f"{prefix}-overheat": {
            "name": "Overheating",
            "metric": "temperature",
            "scope": scope,
            "severity": "critical",
            "condition": {"kind": "threshold", "op": ">", "value": 80, "clear": 60, "for_s": 5},
        },
        f"{prefix}-silent": {
            "name": "No temperature readings",
            "metric": "temperature",
            "scope": scope,
            "severity": "warning",
            "condition": {"kind": "absent", "for_s": 30},
        },
        f"{prefix}-drift": {
            "name": "Humidity running away",
            "metric": "humidity",
            "scope": scope,
            "severity": "info",
            "condition": {"kind": "threshold", "op": ">=", "value": 95, "clear": 80},
        },
    }


async def ensure_rules(
    api_url: str,
    token: str,
    rules: dict[str, dict[str, Any]],
    transport: httpx.AsyncBaseTransport | None = None,
) -> None:
    """Create each rule through the command API unless it exists (409)."""
    headers = {"Authorization": f"Bearer {token}"}
    async with httpx.AsyncClient(
        base_url=api_url, headers=headers, timeout=10, transport=transport
    ) as client:
        for rule_id, rule in rules.items():
            response = await client.post("/api/v1/rules", json={"rule_id": rule_id, **rule})
            if response.status_code != 409:
                response.raise_for_status()
                log.info("alert rule created", extra={"rule": rule_id})


async def register_fleet(
    api_url: str,
    token: str,
    devices: list[SimulatedDevice],
    prefix_labels: dict[str, str],
    transport: httpx.AsyncBaseTransport | None = None,
) -> None:
    """Register each device through the command API and keep its secret; a device that exists
    already (409, its secret unknown here) gets a fresh one through `rotate-secret`."""
    headers = {"Authorization": f"Bearer {token}"}
    limit = asyncio.Semaphore(REGISTRATION_CONCURRENCY)
    async with httpx.AsyncClient(
        base_url=api_url, headers=headers, timeout=10, transport=transport
    ) as client:

        async def one(device: SimulatedDevice) -> None:
            body = {
                "device_id": device.device_id,
                "name": f"Simulated {device.device_id}",
                "type": "sim-thermostat",
                "labels": prefix_labels,
            }
            async with limit:
                response = await client.post("/api/v1/devices", json=body)
                if response.status_code == 409:
                    path = f"/api/v1/devices/{device.device_id}/rotate-secret"
                    response = await client.post(path)
                    if response.status_code == 409:  # decommissioned: it cannot connect
                        log.warning(
                            "simulated device cannot get a secret",
                            extra={"device": device.device_id, "detail": response.text[:200]},
                        )
                        return
                response.raise_for_status()
                device.secret = response.json()["secret"]

        await asyncio.gather(*(one(d) for d in devices))


async def run_device(
    device: SimulatedDevice,
    host: str,
    port: int,
    interval: float,
    stop: asyncio.Event,
    hooks: Hooks | None = None,
) -> None:
    """Connect, serve commands and desired state, send telemetry every `interval` seconds
    (none for `math.inf`), reconnect after a lost connection, until `stop` is set."""
    hooks = hooks or Hooks()
    status = f"{device.topic}/status"
    will = aiomqtt.Will(status, b"offline", qos=1, retain=True)
    backoff = 1.0
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
                clean_session=True,
            ) as client:
                tcp_nodelay(client._client.socket())  # aiomqtt's paho client leaves Nagle on
                await client.subscribe(
                    [(f"{device.topic}/commands", 1), (f"{device.topic}/desired", 1)]
                )
                await client.publish(status, b"online", qos=1, retain=True)
                device.ready.set()
                backoff = 1.0
                listener = asyncio.create_task(_listen(device, client, hooks))
                try:
                    await _send_telemetry(device, client, interval, stop, listener)
                finally:
                    device.ready.clear()
                    listener.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await listener  # re-raises the listener's MqttError (connection lost)
                await client.publish(status, b"offline", qos=1, retain=True)
        except aiomqtt.MqttError as e:
            device.ready.clear()
            log.warning(
                "simulated device lost MQTT", extra={"device": device.device_id, "error": str(e)}
            )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=backoff)
            backoff = min(RECONNECT_MAX_S, backoff * 2)


async def _send_telemetry(
    device: SimulatedDevice,
    client: aiomqtt.Client,
    interval: float,
    stop: asyncio.Event,
    listener: asyncio.Task[None],
) -> None:
    """Publish telemetry until `stop` is set or the listener ended (a lost connection)."""
    stopped = asyncio.ensure_future(stop.wait())
    try:
        if math.isfinite(interval):
            await asyncio.wait(  # spread the fleet's messages over the interval
                [stopped, listener],
                timeout=device.rng.uniform(0, interval),
                return_when=asyncio.FIRST_COMPLETED,
            )
        while not stop.is_set() and not listener.done():
            now_ms = int(time.time() * 1000)
            if math.isfinite(interval) and not device.silent(now_ms):
                await client.publish(f"{device.topic}/telemetry", device.payload(now_ms), qos=1)
            await asyncio.wait(
                [stopped, listener],
                timeout=interval if math.isfinite(interval) else None,
                return_when=asyncio.FIRST_COMPLETED,
            )
    finally:
        stopped.cancel()


async def _listen(device: SimulatedDevice, client: aiomqtt.Client, hooks: Hooks) -> None:
    commands = f"{device.topic}/commands"
    async for message in client.messages:
        raw = message.payload
        payload = raw.encode() if isinstance(raw, str) else bytes(raw or b"")
        if message.topic.value == commands:
            await _on_command(device, client, payload, hooks)
        else:
            await _on_desired(device, client, payload, hooks)


def _bad_input(device: SimulatedDevice, what: str, error: Exception) -> None:
    log.warning(
        f"simulated device: undecodable {what}",
        extra={"device": device.device_id, "error": str(error)[:200]},
    )


async def _on_command(
    device: SimulatedDevice, client: aiomqtt.Client, payload: bytes, hooks: Hooks
) -> None:
    try:
        command = _decode_command(payload)
    except (msgspec.DecodeError, msgspec.ValidationError) as e:
        log.warning(
            "simulated device: bad command", extra={"device": device.device_id, "error": str(e)}
        )
        return
    if hooks.on_command:
        hooks.on_command(device.device_id, command.command_id)
    if command.command_id in device.handled:
        device.duplicates += 1  # a QoS 1 redelivery (or a resend): acknowledged already
        return
    now = time.time()
    if command.expires_at is not None and command.expires_at.timestamp() <= now:
        device.expired += 1  # too late: never executed
        device.remember(command.command_id)
        return
    status, result = execute(command, now)
    ack = {"command_id": command.command_id, "status": status, "result": result}
    await client.publish(f"{device.topic}/commands/ack", _encode(ack), qos=1)
    device.remember(command.command_id)  # only once the broker has the ack: else redo it
    device.acked += 1
    if hooks.on_ack:
        hooks.on_ack(device.device_id, command.command_id, status)


async def _on_desired(
    device: SimulatedDevice, client: aiomqtt.Client, payload: bytes, hooks: Hooks
) -> None:
    if not payload:
        return  # a cleared retained message
    try:
        desired = _decode_desired(payload)
    except (msgspec.DecodeError, msgspec.ValidationError) as e:
        log.warning(
            "simulated device: bad desired", extra={"device": device.device_id, "error": str(e)}
        )
        return
    if desired.version < device.config_version:
        return  # older than what the device applied
    device.config = dict(desired.config)
    device.config_version = desired.version
    reported = {**device.config, "config_version": desired.version}
    await client.publish(f"{device.topic}/reported", _encode(reported), qos=1)
    if hooks.on_reported:
        hooks.on_reported(device.device_id, desired.version)


async def run_fleet(
    fleet: Iterable[SimulatedDevice],
    host: str,
    port: int,
    interval: float,
    stop: asyncio.Event,
    hooks: Hooks | None = None,
) -> None:
    """Run every device until `stop` is set (see the module docstring)."""
    await asyncio.gather(*(run_device(d, host, port, interval, stop, hooks) for d in fleet))


async def wait_ready(fleet: Iterable[SimulatedDevice]) -> None:
    """Until every device is connected, subscribed and has published `online`."""
    await asyncio.gather(*(d.ready.wait() for d in fleet))


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
    faults: bool = False,
    stop: asyncio.Event,
) -> None:
    """Run `devices` devices sending `rate` telemetry messages per second in all."""
    fleet = make_fleet(devices, prefix, seed, faults)
    for device in fleet:
        if device.fault:
            log.info("simulated fault", extra={"device": device.device_id, "fault": device.fault})
    if api_url and token:
        await register_fleet(api_url, token, fleet, {"fleet": prefix})
        if faults:
            await ensure_rules(api_url, token, fault_rules(prefix))
    interval = devices / rate if rate > 0 else math.inf
    log.info("simulating", extra={"devices": devices, "rate": rate, "interval_s": interval})
    await run_fleet(fleet, mqtt_host, mqtt_port, interval, stop)
