"""The bridge as a process: a SIGKILL or JetStream outage mid-stream loses or doubles nothing."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import secrets
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from commands.migrate import migrate_streams
from domain.ingest import Telemetry, decode_ingest
from infra.settings import Settings
from infra.streams import Streams
from iot.broker import PrivateBroker
from tests.e2e.processes import Component, free_port
from tests.integration.test_bridge import Device, register_devices, stream_messages

pytestmark = pytest.mark.e2e

NATS_SERVER = str(Path(__file__).resolve().parents[2] / ".venv" / "bin" / "nats-server")
DEVICES = 10


@pytest.fixture
def mosquitto(tmp_path: Path) -> Iterator[PrivateBroker]:
    broker = PrivateBroker(tmp_path / "mosquitto", free_port())
    broker.start()
    yield broker
    broker.stop()


def messages(count: int) -> list[tuple[str, bytes]]:
    """Unique telemetry: every other message with device time, the rest with server time."""
    now = int(time.time() * 1000)
    out = []
    for i in range(count):
        topic = f"devices/dev-{i % DEVICES}/telemetry"
        if i % 2:
            out.append((topic, json.dumps({"ts": now - i, "values": {"seq": i}}).encode()))
        else:
            out.append((topic, json.dumps({"seq": i, "load": 0.5}).encode()))
    return out


class Publisher(threading.Thread):
    """Publishes the messages at QoS 1 from one device connection, at a steady pace."""

    def __init__(self, port: int, batch: list[tuple[str, bytes]], pause_every: int = 250) -> None:
        super().__init__(daemon=True)
        self.port = port
        self.batch = batch
        self.pause_every = pause_every
        self.sent = 0
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            device = Device(self.port)
            try:
                for start in range(0, len(self.batch), self.pause_every):
                    device.publish_all(self.batch[start : start + self.pause_every])
                    self.sent = start + self.pause_every
                    time.sleep(0.05)
            finally:
                device.close()
        except BaseException as e:
            self.error = e


def seqs(stored: list[tuple[str, bytes, dict[str, str]]]) -> list[int]:
    out: list[int] = []
    for _, data, _ in stored:
        message = decode_ingest(data)
        assert isinstance(message, Telemetry)
        out.extend(int(r.values["seq"]) for r in message.readings)
    return out


def ingest_count(settings: Settings) -> int:
    async def count() -> int:
        import nats

        nc = await nats.connect(settings.nats_url)
        try:
            info = await nc.jsm().stream_info(Streams(settings.namespace).ingest)
            return int(info.state.messages)
        finally:
            await nc.close()

    try:
        return asyncio.run(count())
    except Exception:
        return -1


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def test_bridge_sigkilled_and_restarted_mid_stream_stores_each_message_exactly_once(
    migrated: Settings, mosquitto: PrivateBroker
) -> None:
    total = 5000
    asyncio.run(register_devices(migrated, [f"dev-{i}" for i in range(DEVICES)]))
    env = {"IOT_MQTT_URL": mosquitto.url, "IOT_MQTT_CLIENT_ID": f"bridge-{secrets.token_hex(4)}"}
    bridge = Component(migrated, "bridge", **env)
    try:
        bridge.wait_ready()
        publisher = Publisher(mosquitto.port, messages(total))
        publisher.start()
        for _ in range(2):  # kill it twice, while messages are flowing
            while publisher.is_alive() and ingest_count(migrated) < total // 4 * (_ + 1):
                time.sleep(0.02)
            bridge.kill()
            time.sleep(0.5)
            bridge = Component(migrated, "bridge", **env)
            bridge.wait_ready()
        publisher.join(120)
        assert publisher.error is None
        stored = asyncio.run(
            stream_messages(migrated, Streams(migrated.namespace).ingest, total, wait=120)
        )
    finally:
        bridge.stop()
    found = seqs(stored)
    assert len(found) == total
    assert sorted(found) == list(range(total))


def test_jetstream_outage_holds_the_bridge_back_and_loses_nothing(
    migrated: Settings, mosquitto: PrivateBroker, tmp_path: Path
) -> None:
    total = 4000
    nats_port = free_port()
    store = tmp_path / "jetstream"
    command = [NATS_SERVER, "-js", "-sd", str(store), "-a", "127.0.0.1", "-p", str(nats_port)]
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    settings = dataclasses.replace(migrated, nats_url=f"nats://127.0.0.1:{nats_port}")
    bridge: Component | None = None
    try:
        asyncio.run(_wait_nats_and_migrate(settings))
        asyncio.run(register_devices(settings, [f"dev-{i}" for i in range(DEVICES)]))
        bridge = Component(
            settings,
            "bridge",
            IOT_NATS_URL=settings.nats_url,
            IOT_MQTT_URL=mosquitto.url,
            IOT_MQTT_CLIENT_ID=f"bridge-{secrets.token_hex(4)}",
            IOT_BRIDGE_INFLIGHT="500",
        )
        bridge.wait_ready()
        publisher = Publisher(mosquitto.port, messages(total))
        publisher.start()
        while publisher.is_alive() and ingest_count(settings) < total // 4:
            time.sleep(0.02)

        server.terminate()  # JetStream goes away for about 10 s, mid-stream
        server.wait(10)
        ready_codes: set[int] = set()
        peak_rss = 0.0
        down_until = time.monotonic() + 10
        while time.monotonic() < down_until:
            ready_codes.add(httpx.get(f"{bridge.url}/readyz", timeout=2).status_code)
            peak_rss = max(peak_rss, rss_mb(bridge.proc.pid))
            time.sleep(0.2)
        assert bridge.proc.poll() is None
        server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

        publisher.join(180)
        assert publisher.error is None
        stored = asyncio.run(
            stream_messages(settings, Streams(settings.namespace).ingest, total, wait=180)
        )
        bridge.wait_ready(60)
        peak_rss = max(peak_rss, rss_mb(bridge.proc.pid))
    finally:
        if bridge is not None:
            bridge.stop()
        server.terminate()
        server.wait(10)
    assert 503 in ready_codes
    assert 200 not in ready_codes
    assert peak_rss < 150
    found = seqs(stored)
    assert len(found) == total
    assert sorted(found) == list(range(total))


async def _wait_nats_and_migrate(settings: Settings) -> None:
    deadline = time.monotonic() + 20
    while True:
        try:
            await migrate_streams(settings)
            return
        except Exception:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.1)
