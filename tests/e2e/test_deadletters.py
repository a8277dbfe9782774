"""Dead letters as an operator meets them: readings of a device nobody registered are quarantined,
listed with `iot deadletters list`, and after the registration `iot deadletters replay` stores
each once (a second replay stores nothing more); what still fails stays with its new reason."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import httpx
import nats
import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from infra.jetstream import publish_dead_letter
from infra.settings import Settings
from infra.streams import Streams
from tests.e2e.pipeline import (
    VIEWER,
    influx_count,
    private_mosquitto,
    reading,
    register,
    system,
    wait_until,
)
from tests.e2e.processes import component_env

pytestmark = pytest.mark.e2e

DEVICE = "ghost-1"
TOPIC = f"devices/{DEVICE}/telemetry"


@pytest.fixture
def mqtt_port() -> Iterator[int]:
    with private_mosquitto() as port:
        yield port


def iot(settings: Settings, mqtt_port: int, *args: str) -> subprocess.CompletedProcess[str]:
    env = component_env(settings, 0, IOT_MQTT_URL=f"mqtt://127.0.0.1:{mqtt_port}")
    env.pop("IOT_HTTP_PORT")
    return subprocess.run(
        [sys.executable, "-m", "iot.cli", "deadletters", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def iot_json(settings: Settings, mqtt_port: int, *args: str) -> Any:
    result = iot(settings, mqtt_port, *args, "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


async def _counts(settings: Settings) -> dict[str, int]:
    streams = Streams(settings.namespace)
    nc = await nats.connect(settings.nats_url)
    try:
        js = nc.jetstream()
        ingest = await js.stream_info(streams.ingest, subjects_filter=">")
        dead = await js.stream_info(streams.deadletter)
        subjects = ingest.state.subjects or {}
        return {
            "ingest": int(subjects.get(streams.ingest_subject("telemetry", DEVICE), 0)),
            "deadletter": int(dead.state.messages),
        }
    finally:
        await nc.close()


def counts(settings: Settings) -> dict[str, int]:
    return asyncio.run(_counts(settings))


async def _projector_dead_letter(settings: Settings) -> None:
    """A dead letter the time series projector left: not device input, never replayed."""
    streams = Streams(settings.namespace)
    nc = await nats.connect(settings.nats_url)
    try:
        await publish_dead_letter(
            nc.jetstream(),
            streams,
            source="timeseries",
            reason="influx_rejected",
            topic=streams.ingest_subject("telemetry", DEVICE),
            detail="400 partial write",
            data=b"\x00\x01",
            msg_id="timeseries:test:1",
        )
    finally:
        await nc.close()


def known(gateway: str) -> bool:
    response = httpx.get(f"{gateway}/api/v1/devices/{DEVICE}", headers=VIEWER, timeout=5)
    return response.status_code == 200


def metric(gateway: str, name: str) -> Any:
    response = httpx.get(f"{gateway}/api/v1/devices/{DEVICE}", headers=VIEWER, timeout=5)
    if response.status_code != 200:
        return None
    return (response.json().get("metrics") or {}).get(name)


def test_unknown_device_readings_are_replayed_once_after_registration(
    migrated: Settings, mqtt_port: int
) -> None:
    now = int(time.time() * 1000) - 60_000
    payloads = [reading(now + i, {"level": i}) for i in range(4)]  # device time
    # server time (named by packet id); two may arrive in one millisecond: other fields
    payloads += [b'{"level": 100}', b'{"spare": 101}']
    payloads.append(b"{not json")  # fails again once the device is known: another reason
    with system(migrated, mqtt_port) as running:
        running.start("commands", "commands").wait_ready()
        running.start("relay", "relay").wait_ready()
        running.start("views", "projector", "views").wait_ready()
        running.start("timeseries", "projector", "timeseries").wait_ready()
        running.start("gateway", "gateway").wait_ready()
        running.start("bridge", "bridge").wait_ready()

        client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=DEVICE)
        client.connect("127.0.0.1", mqtt_port)
        client.loop_start()
        for payload in payloads:
            client.publish(TOPIC, payload, qos=1).wait_for_publish(10)
        client.loop_stop()
        client.disconnect()
        asyncio.run(_projector_dead_letter(migrated))
        quarantined = len(payloads) + 1
        assert wait_until(lambda: counts(migrated)["deadletter"] == quarantined)

        listed = iot_json(migrated, mqtt_port, "list", "--device", DEVICE)
        letters = listed["dead_letters"]
        assert listed["next_cursor"] is None
        assert len(letters) == quarantined
        from_bridge = [d for d in letters if d["source"] == "bridge"]
        assert {d["reason"] for d in from_bridge} == {"unknown_device"}
        assert sorted(d["preview"] for d in from_bridge) == sorted(p.decode() for p in payloads)
        assert all(d["topic"] == TOPIC and d["device_id"] == DEVICE for d in from_bridge)
        text = iot(migrated, mqtt_port, "list", "--reason", "unknown_device", "--since", "1h")
        assert text.returncode == 0, text.stderr
        assert len(text.stdout.splitlines()) == len(payloads)
        assert "unknown_device" in text.stdout
        assert DEVICE in text.stdout

        dry = iot_json(migrated, mqtt_port, "replay", "--device", DEVICE, "--dry-run")
        assert dry["replayed"] == 0  # the device is not registered yet: nothing would pass
        assert dry["still_rejected"] == {"unknown_device": len(payloads)}
        assert dry["skipped"] == {"from timeseries": 1}

        register(running.url("commands"), DEVICE)
        gateway = running.url("gateway")
        assert wait_until(lambda: metric(gateway, "level") is None and known(gateway))

        dry = iot_json(migrated, mqtt_port, "replay", "--device", DEVICE, "--dry-run")
        assert dry["replayed"] == 6
        assert counts(migrated) == {"ingest": 0, "deadletter": quarantined}  # changed nothing

        first = iot_json(migrated, mqtt_port, "replay", "--device", DEVICE)
        assert first["replayed"] == 6
        assert first["duplicates"] == 0
        assert first["still_rejected"] == {"malformed_json": 1}
        assert first["skipped"] == {"from timeseries": 1}
        assert counts(migrated) == {"ingest": 6, "deadletter": 2}

        assert wait_until(lambda: influx_count(migrated, "level") == 5)
        assert wait_until(lambda: influx_count(migrated, "spare") == 1)
        latest = wait_until(lambda: (metric(gateway, "level") or {}).get("value") == 100)
        assert latest, metric(gateway, "level")  # server time: after the device-time ones

        left = iot_json(migrated, mqtt_port, "list", "--device", DEVICE)["dead_letters"]
        assert sorted(d["reason"] for d in left) == ["influx_rejected", "malformed_json"]
        requarantined = next(d for d in left if d["reason"] == "malformed_json")
        assert requarantined["preview"] == "{not json"
        assert requarantined["received_at_ms"] is not None
        none_left = iot_json(migrated, mqtt_port, "list", "--reason", "unknown_device")
        assert none_left == {"dead_letters": [], "next_cursor": None}

        second = iot_json(migrated, mqtt_port, "replay", "--device", DEVICE)
        assert second["replayed"] == 0
        assert second["still_rejected"] == {"malformed_json": 1}  # left where it is
        assert counts(migrated) == {"ingest": 6, "deadletter": 2}
        summary = iot(migrated, mqtt_port, "replay")
        assert summary.returncode == 0, summary.stderr
        assert "replayed 0, still rejected 1, skipped 1" in summary.stdout
        assert counts(migrated) == {"ingest": 6, "deadletter": 2}
        assert influx_count(migrated, "level") == 5
        assert influx_count(migrated, "spare") == 1
