"""`iot replay` against the running system: rebuilt views and time series equal what the live
projections built, readers never see a partial view during the switch, a killed replay leaves
the live view untouched, and backup -> drop -> restore -> replay gives the same views."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import nats
import pytest
import redis

from commands.migrate import migrate
from domain.ingest import Reading, Reported, Status, Telemetry, encode_ingest
from infra.settings import Settings
from infra.streams import Streams
from infra.views import ViewKeys, current_key, replay_key
from tests.conftest import drop_namespace, settings_for, unique_namespace
from tests.e2e.pipeline import (
    OPERATOR,
    VIEWER,
    Publisher,
    System,
    private_mosquitto,
    register,
    wait_until,
)

pytestmark = pytest.mark.e2e

DEVICES = [f"rp-{i:03d}" for i in range(40)]
ADMIN = {"Authorization": "Bearer admin-token-0123456789ab"}
BULK = 60_000  # device messages published straight into the INGEST stream
T0 = int(time.time() * 1000) - 3_600_000  # readings over the last hour


def iot(settings: Settings, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "iot.cli", *args],
        env=_env(settings),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def _env(settings: Settings) -> dict[str, str]:
    return {
        **os.environ,
        "IOT_NAMESPACE": settings.namespace,
        "IOT_INFLUX_DB": settings.influx_db,
    }


class Replayed:
    """The running system of one namespace, loaded with devices, events and readings."""

    def __init__(self, settings: Settings, running: System, mqtt_port: int) -> None:
        self.settings = settings
        self.running = running
        self.mqtt_port = mqtt_port
        self.redis: Any = redis.Redis.from_url(settings.redis_url)  # answers bytes
        self.published = 0  # telemetry readings stored in the INGEST stream

    # --- reading the views and the time series ------------------------------------------

    def keys(self) -> ViewKeys:
        raw = self.redis.get(current_key(self.settings.namespace))
        generation = raw.decode() if raw else "live"
        return ViewKeys.for_namespace(self.settings.namespace, generation)

    def device_hashes(self) -> dict[str, dict[bytes, bytes]]:
        """Every device's hash in the generation in use, byte for byte."""
        keys = self.keys()
        return {d: self.redis.hgetall(keys.device(d)) for d in DEVICES}

    def gateway(self, path: str) -> Any:
        response = httpx.get(f"{self.running.url('gateway')}{path}", headers=VIEWER, timeout=10)
        assert response.status_code == 200, response.text
        return response.json()

    def series(self) -> dict[str, tuple[int, float]]:
        """Per device: the count and sum of the `t` field in InfluxDB (default policy)."""
        response = httpx.post(
            f"{self.settings.influx_url}/query",
            data={
                "db": self.settings.influx_db,
                "q": 'SELECT count("t"), sum("t") FROM telemetry GROUP BY device_id',
            },
            timeout=30,
        )
        response.raise_for_status()
        found = response.json()["results"][0].get("series", [])
        return {s["tags"]["device_id"]: (s["values"][0][1], s["values"][0][2]) for s in found}

    def points(self) -> int:
        return sum(count for count, _ in self.series().values())

    def settled(self, timeout: float = 120) -> None:
        """Wait until the live projections hold every reading and every domain event."""
        assert wait_until(lambda: self.points() == self.published, timeout=timeout), (
            f"InfluxDB holds {self.points()} of {self.published} readings"
        )
        assert wait_until(self._views_settled, timeout=timeout)

    def _views_settled(self) -> bool:
        info = asyncio.run(self._pending())
        return info == 0

    async def _pending(self) -> int:
        nc = await nats.connect(self.settings.nats_url)
        try:
            streams = Streams(self.settings.namespace)
            left = 0
            for stream in (streams.events, streams.ingest):
                for consumer in await nc.jsm().consumers_info(stream):
                    left += (consumer.num_pending or 0) + (consumer.num_ack_pending or 0)
            return left
        finally:
            await nc.close()

    # --- loading -------------------------------------------------------------------------

    def load(self) -> None:
        commands = self.running.url("commands")
        for device_id in DEVICES:
            register(commands, device_id)
        for i, device_id in enumerate(DEVICES[:20]):
            self._post("PATCH", f"/devices/{device_id}/config", {"config": {"every_s": i}})
        for device_id in DEVICES[20:24]:
            self._post("POST", f"/devices/{device_id}/suspend", {"reason": "maintenance"})
        self._post("POST", f"/devices/{DEVICES[24]}/decommission", {"reason": "gone"}, ADMIN)
        for device_id in DEVICES[25:30]:
            self._post("POST", f"/devices/{device_id}/commands", {"name": "reboot"})
        asyncio.run(self._bulk(BULK))

    def _post(
        self, method: str, path: str, body: dict[str, Any], headers: dict[str, str] = OPERATOR
    ) -> None:
        response = httpx.request(
            method,
            f"{self.running.url('commands')}/api/v1{path}",
            json=body,
            headers=headers,
            timeout=10,
        )
        assert response.status_code < 300, response.text

    async def _bulk(self, n: int) -> None:
        """`n` device messages straight into INGEST: mostly telemetry, some status and
        reported state, as the bridge would have stored them."""
        rng = random.Random(7)
        streams = Streams(self.settings.namespace)
        nc = await nats.connect(self.settings.nats_url)
        try:
            js = nc.jetstream()
            pending = []
            for i in range(n):
                device_id = DEVICES[i % len(DEVICES)]
                received = T0 + i * 50
                kind = "telemetry"
                message: Telemetry | Status | Reported
                if i % 50 == 7:
                    kind, message = (
                        "status",
                        Status(
                            device_id=device_id, received_at=received, online=rng.random() < 0.7
                        ),
                    )
                elif i % 50 == 13:
                    kind, message = (
                        "reported",
                        Reported(
                            device_id=device_id,
                            received_at=received,
                            state={"fw": f"1.{i}", "config_version": i % 3},
                        ),
                    )
                else:
                    readings = [
                        Reading(received - j, {"t": round(rng.uniform(-10, 40), 2), "ok": j == 0})
                        for j in range(1 + i % 3)
                    ]
                    message = Telemetry(
                        device_id=device_id, received_at=received, readings=readings
                    )
                    self.published += len(readings)
                subject = streams.ingest_subject(kind, device_id)
                pending.append(await js.publish_async(subject, encode_ingest(message)))
                if len(pending) >= 2_000:
                    await asyncio.gather(*pending)
                    pending = []
            await asyncio.gather(*pending)
        finally:
            await nc.close()

    def wipe(self) -> None:
        """Lose the read side: every views key in Redis and the InfluxDB database."""
        keys = list(self.redis.scan_iter(match=f"{self.settings.namespace}:views:*", count=1000))
        for start in range(0, len(keys), 1000):
            self.redis.delete(*keys[start : start + 1000])
        httpx.post(
            f"{self.settings.influx_url}/query",
            data={"q": f'DROP DATABASE "{self.settings.influx_db}"'},
            timeout=30,
        ).raise_for_status()


@pytest.fixture(scope="module")
def loaded() -> Iterator[Replayed]:
    settings = settings_for(unique_namespace())
    asyncio.run(migrate(settings))
    with private_mosquitto() as port:
        running = System(settings, port)
        try:
            for name, args in (
                ("commands", ("commands",)),
                ("relay", ("relay",)),
                ("views", ("projector", "views")),
                ("timeseries", ("projector", "timeseries")),
                ("gateway", ("gateway",)),
                ("bridge", ("bridge",)),
            ):
                running.start(name, *args, IOT_RATE_LIMIT_PER_MINUTE="1000000")
            for component in running.components.values():
                component.wait_ready()
            system = Replayed(settings, running, port)
            system.load()
            system.settled()
            yield system
        finally:
            running.stop_all()
            drop_namespace(settings)


def replay(system: Replayed, name: str, *flags: str) -> subprocess.CompletedProcess[str]:
    done = iot(system.settings, "replay", name, *flags)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Traceback" not in done.stderr
    return done


def test_dry_run_says_what_would_be_rebuilt_and_changes_nothing(loaded: Replayed) -> None:
    before = loaded.device_hashes()
    done = replay(loaded, "views", "--dry-run")
    streams = Streams(loaded.settings.namespace)
    assert "would rebuild into a new generation" in done.stdout
    assert f"stream {streams.ingest}:" in done.stdout
    assert loaded.device_hashes() == before

    done = replay(loaded, "timeseries", "--dry-run")
    assert streams.ingest in done.stdout


def test_verify_finds_no_difference_then_finds_a_tampered_view(loaded: Replayed) -> None:
    done = replay(loaded, "views", "--verify")
    assert "identical" in done.stdout
    generation = loaded.keys().generation

    device = loaded.keys().device(DEVICES[3])
    original = loaded.redis.hget(device, "last_seen")
    loaded.redis.hset(device, "last_seen", "1")
    try:
        done = iot(loaded.settings, "replay", "views", "--verify", "--quiet")
        assert done.returncode == 1, done.stdout + done.stderr
        [line] = [x for x in done.stdout.splitlines() if x.startswith("DIFFERENT")]
        assert f"device {DEVICES[3]}: last_seen live=1 rebuilt={original.decode()}" in line
    finally:
        loaded.redis.hset(device, "last_seen", original)
    assert loaded.keys().generation == generation  # verification switches nothing
    assert replay(loaded, "timeseries", "--verify").returncode == 0


def test_replay_after_losing_redis_and_influxdb_rebuilds_identical_views_and_series(
    loaded: Replayed,
) -> None:
    hashes = loaded.device_hashes()
    pages = loaded.gateway("/api/v1/devices?limit=100")
    fleet = loaded.gateway("/api/v1/fleet")
    series = loaded.series()
    assert sum(1 for h in hashes.values() if b"doc" in h) == len(DEVICES)
    assert sum(count for count, _ in series.values()) == loaded.published

    loaded.wipe()
    # The views projector notices that its views are gone and rebuilds them from the log by
    # itself; meanwhile the gateway answers 503 (rebuilding), never an empty or partial list.
    wrong: list[str] = []

    def rebuilt() -> bool:
        answer = httpx.get(
            f"{loaded.running.url('gateway')}/api/v1/devices?limit=100", headers=VIEWER, timeout=10
        )
        if answer.status_code == 200:
            if answer.json() != pages:
                wrong.append(f"200 with {len(answer.json()['items'])} devices")
            return True
        if answer.status_code != 503 or answer.json().get("rebuilding") is not True:
            wrong.append(f"{answer.status_code} {answer.text}")
        return False

    assert wait_until(rebuilt, timeout=120)
    assert wrong == []
    assert loaded.device_hashes() == hashes
    loaded.running.components["views"].wait_ready()

    views = replay(loaded, "views")  # an operator's replay beside it works as before
    assert "readers switched" in views.stderr
    timeseries = replay(loaded, "timeseries")
    assert "timeseries" in timeseries.stdout

    assert loaded.device_hashes() == hashes
    assert loaded.gateway("/api/v1/devices?limit=100") == pages
    rebuilt_fleet = loaded.gateway("/api/v1/fleet")
    for key in ("devices", "by_status", "online", "commands_pending"):
        assert rebuilt_fleet[key] == fleet[key]
    assert loaded.series() == series


class Watcher(threading.Thread):
    """Reads the fleet list and one device through the gateway as fast as it can, keeping
    every answer that is not the whole fleet with its metrics."""

    def __init__(self, system: Replayed) -> None:
        super().__init__(daemon=True)
        self.system = system
        self.stop = threading.Event()
        self.reads = 0
        self.bad: list[str] = []

    def run(self) -> None:
        base = f"{self.system.running.url('gateway')}/api/v1"
        with httpx.Client(headers=VIEWER, timeout=10) as client:
            while not self.stop.is_set():
                listed = client.get(f"{base}/devices?limit=100")
                one = client.get(f"{base}/devices/{DEVICES[5]}")
                self.reads += 1
                if listed.status_code != 200 or one.status_code != 200:
                    self.bad.append(f"answers {listed.status_code} and {one.status_code}")
                    continue
                if len(listed.json()["items"]) != len(DEVICES):
                    self.bad.append(f"{len(listed.json()['items'])} devices listed")
                if "t" not in one.json().get("metrics", {}):
                    self.bad.append(f"device view without its metrics: {one.text}")


def test_replay_while_devices_keep_sending_loses_nothing_and_never_shows_a_partial_view(
    loaded: Replayed,
) -> None:
    start = int(time.time() * 1000)
    senders = [d for d in DEVICES if d != DEVICES[24]]  # the bridge refuses a decommissioned one
    messages = []
    for i in range(3_000):  # 15 s at 200 msg/s, over MQTT through the bridge
        device_id = senders[i % len(senders)]
        payload = b'{"ts": %d, "values": {"t": %d, "seq": %d}}' % (start + i, i, i)
        messages.append((f"devices/{device_id}/telemetry", payload))
    publisher = Publisher(loaded.mqtt_port, messages, rate=200)
    watcher = Watcher(loaded)
    watcher.start()
    publisher.start()
    try:
        time.sleep(2)
        replay(loaded, "views")
        replay(loaded, "timeseries")
        publisher.join(120)
        assert publisher.error is None
        assert publisher.sent == len(messages)
    finally:
        watcher.stop.set()
        watcher.join(30)
    loaded.published += len(messages)
    loaded.settled()

    assert watcher.reads > 20
    assert watcher.bad == []
    for i, device_id in enumerate(senders):  # each device's last reading is its latest value
        last = max(j for j in range(len(messages)) if j % len(senders) == i)
        view = loaded.gateway(f"/api/v1/devices/{device_id}")
        assert view["metrics"]["seq"]["value"] == last, device_id
    assert loaded.points() == loaded.published


def test_a_replay_killed_midway_leaves_the_live_view_and_the_next_run_starts_clean(
    loaded: Replayed,
) -> None:
    hashes = loaded.device_hashes()
    series = loaded.series()
    generation = loaded.keys().generation
    for name in ("views", "timeseries"):
        with subprocess.Popen(
            [sys.executable, "-m", "iot.cli", "replay", name],
            env=_env(loaded.settings),
            stderr=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            text=True,
        ) as process:
            assert process.stderr is not None
            for line in process.stderr:  # kill it once it is building
                if "building" in line:
                    break
            time.sleep(0.5)
            process.send_signal(signal.SIGKILL)
            assert process.wait(10) == -signal.SIGKILL

        assert loaded.keys().generation == generation
        assert loaded.device_hashes() == hashes
        assert loaded.series() == series

    left = loaded.redis.hgetall(replay_key(loaded.settings.namespace))
    assert b"building" in left  # the killed replay was half way
    unfinished = left[b"building"].decode()

    replay(loaded, "views")
    replay(loaded, "timeseries")
    assert loaded.keys().generation != generation
    assert loaded.device_hashes() == hashes
    assert loaded.series() == series
    stale = f"{loaded.settings.namespace}:views:{unfinished}:*"
    assert list(loaded.redis.scan_iter(match=stale)) == []
    old = f"{loaded.settings.namespace}:views:{generation}:*"
    assert list(loaded.redis.scan_iter(match=old)) == []


def test_backup_drop_restore_and_replay_give_identical_views(
    loaded: Replayed, tmp_path: Path
) -> None:
    hashes = loaded.device_hashes()
    series = loaded.series()
    done = iot(loaded.settings, "backup", str(tmp_path / "b"))
    assert done.returncode == 0, done.stderr

    for name in ("bridge", "timeseries", "views", "relay", "commands"):
        loaded.running.components[name].stop()
    drop_namespace(loaded.settings)  # PostgreSQL schema, streams, InfluxDB, Redis: all gone
    done = iot(loaded.settings, "restore", str(tmp_path / "b"))
    assert done.returncode == 0, done.stderr
    for name in ("commands", "relay", "views", "timeseries", "bridge"):
        loaded.running.restart(name).wait_ready()

    replay(loaded, "views")
    replay(loaded, "timeseries")
    assert loaded.device_hashes() == hashes
    assert loaded.series() == series
