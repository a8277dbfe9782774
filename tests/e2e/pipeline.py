"""Whole-system helpers for end-to-end tests: a private broker, the components, a publisher."""

from __future__ import annotations

import asyncio
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

import httpx
import msgspec
import nats
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from infra.settings import Settings
from infra.streams import Streams
from iot.broker import PrivateBroker
from tests.conftest import TOKENS
from tests.e2e.processes import Component, free_port

OPERATOR = {"Authorization": "Bearer operator-token-012345678"}
VIEWER = {"Authorization": "Bearer viewer-token-0123456789"}
assert TOKENS


@contextmanager
def private_mosquitto() -> Iterator[int]:
    """A Mosquitto of our own on a free port, with the project's broker configuration."""
    with tempfile.TemporaryDirectory() as tmp:
        broker = PrivateBroker(tmp, free_port())
        broker.start()
        try:
            yield broker.port
        finally:
            broker.stop()


class System:
    """The components of one namespace as processes, against a private broker."""

    def __init__(self, settings: Settings, mqtt_port: int) -> None:
        self.settings = settings
        self.mqtt_port = mqtt_port
        self.env = {"IOT_MQTT_URL": f"mqtt://127.0.0.1:{mqtt_port}"}
        self.components: dict[str, Component] = {}
        self._bridges = 0

    def start(self, name: str, *args: str, **env: str) -> Component:
        if args[0] == "bridge" and "IOT_MQTT_CLIENT_ID" not in env:
            self._bridges += 1
            env["IOT_MQTT_CLIENT_ID"] = f"bridge-{self.settings.namespace}-{self._bridges}"
        component = Component(self.settings, *args, **{**self.env, **env})
        self.components[name] = component
        return component

    def restart(self, name: str) -> Component:
        old = self.components[name]
        old.kill()
        return self.start(name, *old.args, **old.extra_env)

    def stop_all(self) -> None:
        for component in self.components.values():
            component.stop()

    def url(self, name: str) -> str:
        return self.components[name].url


@contextmanager
def system(settings: Settings, mqtt_port: int) -> Iterator[System]:
    running = System(settings, mqtt_port)
    with ExitStack() as stack:
        stack.callback(running.stop_all)
        yield running


def register(commands_url: str, device_id: str) -> None:
    response = httpx.post(
        f"{commands_url}/api/v1/devices",
        json={"device_id": device_id, "name": device_id, "type": "sensor"},
        headers=OPERATOR,
        timeout=10,
    )
    assert response.status_code == 201, response.text


def wait_until(check: Any, timeout: float = 60.0, interval: float = 0.2) -> Any:
    """Poll `check` until it returns a truthy value; return it (or the last falsy one)."""
    deadline = time.monotonic() + timeout
    result = None
    while time.monotonic() < deadline:
        try:
            result = check()
        except (httpx.HTTPError, KeyError, ValueError):
            result = None
        if result:
            return result
        time.sleep(interval)
    return result


class Publisher(threading.Thread):
    """Publishes QoS 1 messages at a steady rate from one MQTT client."""

    def __init__(self, port: int, messages: list[tuple[str, bytes]], rate: float) -> None:
        super().__init__(daemon=True)
        self.port = port
        self.messages = messages
        self.rate = rate
        self.sent = 0
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="e2e-publisher")
            client.max_inflight_messages_set(1000)
            client.max_queued_messages_set(0)
            client.connect("127.0.0.1", self.port)
            client.loop_start()
            start = time.monotonic()
            infos = []
            for i, (topic, payload) in enumerate(self.messages):
                due = start + i / self.rate
                delay = due - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
                infos.append(client.publish(topic, payload, qos=1))
                self.sent = i + 1
            for info in infos:
                info.wait_for_publish(60)
            client.loop_stop()
            client.disconnect()
        except BaseException as e:
            self.error = e


def reading(ts: int, values: dict[str, Any]) -> bytes:
    return msgspec.json.encode({"ts": ts, "values": values})


def influx_count(settings: Settings, field: str) -> int:
    response = httpx.get(
        f"{settings.influx_url}/query",
        params={"db": settings.influx_db, "q": f'SELECT count("{field}") FROM telemetry'},
        timeout=10,
    )
    series = response.json()["results"][0].get("series")
    return int(series[0]["values"][0][1]) if series else 0


def influx_missing(
    settings: Settings, field: str, expected: dict[str, set[int]]
) -> dict[str, list[int]]:
    """Per device, the values of `field` (one per reading) that InfluxDB does not hold."""
    response = httpx.get(
        f"{settings.influx_url}/query",
        params={
            "db": settings.influx_db,
            "q": f'SELECT "{field}" FROM telemetry GROUP BY device_id',
        },
        timeout=30,
    )
    held: dict[str, set[int]] = {}
    for series in response.json()["results"][0].get("series") or []:
        held[series["tags"]["device_id"]] = {int(v[1]) for v in series["values"]}
    out = {}
    for device_id, values in expected.items():
        gone = sorted(values - held.get(device_id, set()))
        if gone:
            out[device_id] = gone
    return out


async def _ingest_counts(settings: Settings) -> dict[str, int]:
    streams = Streams(settings.namespace)
    nc = await nats.connect(settings.nats_url)
    try:
        js = nc.jetstream()
        out = {}
        for name in (streams.ingest, streams.deadletter):
            info = await js.stream_info(name)
            out[name] = int(info.state.messages)
        for consumer in await js.consumers_info(streams.ingest):
            out[f"{consumer.name} pending"] = int(consumer.num_pending or 0)
            out[f"{consumer.name} ack pending"] = int(consumer.num_ack_pending or 0)
            out[f"{consumer.name} redelivered"] = int(consumer.num_redelivered or 0)
        return out
    finally:
        await nc.close()


def log_state(settings: Settings) -> dict[str, int]:
    """Messages in INGEST and the dead-letter stream, and each INGEST consumer's backlog: where
    a reading missing from a projection got to."""
    return asyncio.run(_ingest_counts(settings))
