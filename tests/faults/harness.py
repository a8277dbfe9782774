"""The whole system under a server fault: devices over MQTT and operators over HTTP while one
server is broken, then proof that nothing was lost or doubled.

    with FaultRun(tmp_path, "nats") as run:          # a private NATS; the rest shared
        run.start_load()                             # readings over MQTT, commands over HTTP
        run.wait_sent(0.3)
        with run.outage():                           # watches /readyz of every component
            run.server.stop()
            time.sleep(3)
            run.server.start()
        figures = run.finish()                       # waits, then checks everything
        fault_report.row(**figures.row(), fault="restart")

The server under test is a private instance (`tests/faults/servers.py`) that the components
reach through their IOT_*_URL settings; the others are the shared ones, isolated by a fresh
namespace. The broker is always private (the bridge's session must be the test's own).

What `finish` checks, after the load has stopped and the fault is over:
- every reading the broker acknowledged is in InfluxDB, none is there twice in the log (INGEST
  holds one message per stored reading) and nothing was dead-lettered;
- every command the API accepted is in the event store once (each request carries an
  `Idempotency-Key` and is retried with it until answered), the relay published the store's
  events exactly once and in commit order, and no answer was a 5xx other than a 503 with
  `Retry-After`;
- every device's view shows its last reading, and the views equal a replay of the log
  (`iot replay views --verify`);
- every component that needs the broken server answered `/readyz` 503 during the outage, and
  all answer 200 after it; the recovery time is from the server being back to all of them
  ready again.
"""

from __future__ import annotations

import asyncio
import collections
import os
import subprocess
import sys
import threading
import time
import uuid
from collections import defaultdict
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import httpx
import msgspec
import nats
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from commands.migrate import migrate
from domain.published import DeviceConfigured, decode_stream_event
from infra.settings import Settings, load
from infra.streams import Streams
from tests.conftest import TOKENS, drop_namespace, unique_namespace
from tests.e2e.pipeline import OPERATOR, VIEWER, System, influx_missing
from tests.faults.servers import SERVERS, MosquittoServer, PrivateServer

# Which components need which server: these must say so on /readyz while it is gone.
NEEDS: dict[str, tuple[str, ...]] = {
    "nats": ("commands", "relay", "bridge", "views", "timeseries"),
    "postgres": ("commands", "relay"),
    "redis": ("views", "gateway"),
    "mosquitto": ("bridge",),
    "influxdb": ("timeseries", "gateway"),
}
COMPONENTS: dict[str, tuple[str, ...]] = {
    "commands": ("commands",),
    "relay": ("relay",),
    "views": ("projector", "views"),
    "timeseries": ("projector", "timeseries"),
    "gateway": ("gateway",),
    "bridge": ("bridge",),
}
SETTLE_S = 240.0  # the longest the system may take to store everything once the load stops


def settings_with(namespace: str, env: dict[str, str]) -> Settings:
    merged = dict(os.environ)
    merged.update(env)
    merged["IOT_NAMESPACE"] = namespace
    merged["IOT_INFLUX_DB"] = namespace
    merged["IOT_API_TOKENS"] = ",".join(f"{t}={r}" for t, r in TOKENS.items())
    return load(merged)


class Devices(threading.Thread):
    """Devices publishing QoS 1 readings (`seq` counts per device) through one MQTT client that
    reconnects by itself; a reading counts as acknowledged once the broker's PUBACK arrived."""

    def __init__(self, port: int, devices: list[str], per_device: int, rate: float) -> None:
        super().__init__(daemon=True)
        self.port = port
        self.devices = devices
        self.per_device = per_device
        self.rate = rate
        self.sent = 0
        self.acked: dict[str, set[int]] = defaultdict(set)
        self.published: dict[str, set[int]] = defaultdict(set)
        self.error: BaseException | None = None
        self._pending: dict[int, tuple[str, int]] = {}
        self._early: set[int] = set()
        self._lock = threading.Lock()

    @property
    def total(self) -> int:
        return len(self.devices) * self.per_device

    def acked_count(self) -> int:
        with self._lock:
            return sum(len(v) for v in self.acked.values())

    def _on_publish(self, _c: Any, _u: Any, mid: int, _rc: Any, _p: Any) -> None:
        # Called by paho's network thread with paho's own lock held: never publish under ours.
        with self._lock:
            found = self._pending.pop(mid, None)
            if found is None:
                self._early.add(mid)  # acknowledged before `publish` returned its mid
            else:
                self.acked[found[0]].add(found[1])

    def run(self) -> None:
        try:
            client = mqtt.Client(
                CallbackAPIVersion.VERSION2, client_id=f"fault-devices-{uuid.uuid4().hex[:8]}"
            )
            client.max_inflight_messages_set(200)
            client.max_queued_messages_set(0)
            client.reconnect_delay_set(1, 2)
            client.on_publish = self._on_publish
            client.connect("127.0.0.1", self.port)
            client.loop_start()
            base = int(time.time() * 1000) - 3_600_000
            start = time.monotonic()
            for i in range(self.total):
                seq, device = divmod(i, len(self.devices))
                device_id = self.devices[device]
                delay = start + i / self.rate - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
                payload = msgspec.json.encode({"ts": base + seq * 10, "values": {"seq": seq}})
                info = client.publish(f"devices/{device_id}/telemetry", payload, qos=1)
                with self._lock:
                    self.published[device_id].add(seq)
                    if info.mid in self._early:
                        self._early.discard(info.mid)
                        self.acked[device_id].add(seq)
                    else:
                        self._pending[info.mid] = (device_id, seq)
                self.sent = i + 1
            deadline = time.monotonic() + SETTLE_S
            while time.monotonic() < deadline and self.acked_count() < self.total:
                time.sleep(0.05)
            client.loop_stop()
            client.disconnect()
        except BaseException as e:
            self.error = e


class Operators(threading.Thread):
    """Operators changing device configuration over HTTP, each request with an
    `Idempotency-Key` and retried with the same key until it is answered."""

    def __init__(self, url: str, devices: list[str], rate: float) -> None:
        super().__init__(daemon=True)
        self.url = url
        self.devices = devices
        self.rate = rate
        self.stop = threading.Event()
        self.accepted = 0
        self.unavailable = 0  # 503 answers (each had Retry-After)
        self.unreachable = 0  # connection refused or timed out
        self.wrong: list[str] = []  # answers that break the contract
        self.error: BaseException | None = None

    def _send(self, client: httpx.Client, device_id: str, n: int) -> None:
        key = uuid.uuid4().hex
        body = {"config": {"n": n}}
        for _ in range(600):  # retried for minutes at most, then given up as unanswered
            try:
                response = client.patch(
                    f"{self.url}/api/v1/devices/{device_id}/config",
                    json=body,
                    headers={**OPERATOR, "Idempotency-Key": key},
                )
            except httpx.HTTPError:
                self.unreachable += 1
                time.sleep(0.25)
                continue
            if response.status_code == 200:
                self.accepted += 1
                return
            if response.status_code == 503:
                self.unavailable += 1
                retry_after = response.headers.get("Retry-After")
                if retry_after is None or not retry_after.isdigit():
                    self.wrong.append(f"503 without Retry-After: {response.text[:200]}")
                time.sleep(min(float(retry_after or 1), 2.0))
                continue
            self.wrong.append(f"{response.status_code}: {response.text[:200]}")
            return
        self.wrong.append(f"never answered: {device_id} n={n}")

    def run(self) -> None:
        try:
            with httpx.Client(timeout=httpx.Timeout(30.0, connect=2.0)) as client:
                n = 0
                while not self.stop.is_set():
                    self._send(client, self.devices[n % len(self.devices)], n)
                    n += 1
                    time.sleep(1 / self.rate)
        except BaseException as e:
            self.error = e


@dataclass
class Readiness:
    """What each component's /readyz answered while the watch ran."""

    seen: dict[str, list[tuple[float, int]]] = field(default_factory=lambda: defaultdict(list))
    back_at: float | None = None  # when the server was up again
    outage_s: float = 0.0
    recovery_s: float | None = None

    def ready_again(self, names: list[str]) -> float | None:
        """Seconds from the server being back to every component answering 200 for good."""
        if self.back_at is None:
            return None
        latest = self.back_at
        for name in names:
            statuses = self.seen[name]
            last_bad = max((t for t, status in statuses if status != 200), default=None)
            if not statuses or statuses[-1][1] != 200:
                return None
            if last_bad is not None:
                latest = max(latest, last_bad)
        return latest - self.back_at


@dataclass
class Figures:
    """What one run measured, for the printed table."""

    outage_s: float
    recovery_s: float | None
    readings: int
    stored: int
    lost: int
    duplicated: int
    commands: int
    unavailable: int

    def row(self) -> dict[str, Any]:
        return {
            "outage_s": self.outage_s,
            "recovery_s": self.recovery_s,
            "readings": self.readings,
            "stored": self.stored,
            "lost": self.lost,
            "duplicated": self.duplicated,
            "commands": f"{self.commands} ({self.unavailable} x 503)",
        }


class FaultRun:
    """One namespace's whole system against a private `kind` server (a key of SERVERS)."""

    def __init__(
        self,
        directory: Path,
        kind: str,
        *,
        devices: int = 20,
        per_device: int = 300,
        rate: float = 600.0,
        command_rate: float = 10.0,
        components: tuple[str, ...] = tuple(COMPONENTS),
        extra_env: dict[str, str] | None = None,
        settle_s: float = SETTLE_S,
    ) -> None:
        self.kind = kind
        self.settle_s = settle_s
        self.directory = directory
        self.devices = [f"f{d:03d}" for d in range(devices)]
        self.per_device = per_device
        self.rate = rate
        self.command_rate = command_rate
        self.component_names = components
        self.extra_env = extra_env or {}
        self._stack = ExitStack()
        self.server: PrivateServer = SERVERS[kind](directory / kind)
        self.broker: PrivateServer = (
            self.server if kind == "mosquitto" else MosquittoServer(directory / "mosquitto")
        )
        self.running: System | None = None
        self.settings: Settings | None = None
        self.load: Devices | None = None
        self.operators: Operators | None = None
        self.readiness = Readiness()

    # --- setting up and tearing down -------------------------------------------------------

    def __enter__(self) -> FaultRun:
        try:
            self._start()
        except BaseException:
            self._stack.close()
            raise
        return self

    def __exit__(
        self, _t: type[BaseException] | None, _e: BaseException | None, _tb: TracebackType | None
    ) -> None:
        self._stack.close()

    def _start(self) -> None:
        self._stack.callback(self.server.cleanup)
        self.server.start()
        self._stack.callback(self.server.stop)
        if self.broker is not self.server:
            self.broker.start()
            self._stack.callback(self.broker.stop)
        env = {**self.server.env(), **self.broker.env(), **self.extra_env}
        self.settings = settings_with(unique_namespace(), env)
        asyncio.run(migrate(self.settings))
        self._stack.callback(self._drop)
        self.running = System(self.settings, self.broker.port)
        self.running.env.update(env)
        self._stack.callback(self.running.stop_all)
        for name in self.component_names:
            if name != "bridge":
                self.running.start(name, *COMPONENTS[name]).wait_ready(60)
        for device_id in self.devices:
            response = httpx.post(
                f"{self.url('commands')}/api/v1/devices",
                json={"device_id": device_id, "name": device_id, "type": "sensor"},
                headers=OPERATOR,
                timeout=10,
            )
            assert response.status_code == 201, response.text
        if "bridge" in self.component_names:
            self._wait(self._registrations_relayed, "every registration relayed", 60)
            self.running.start("bridge", *COMPONENTS["bridge"]).wait_ready(60)

    def _drop(self) -> None:
        """Drop the namespace from every server, the private one too (it is brought back)."""
        assert self.settings is not None
        if self.server.paused:
            self.server.resume()
        if self.server.proc is None or self.server.proc.poll() is not None:
            self.server.start()
        drop_namespace(self.settings)

    def url(self, name: str) -> str:
        assert self.running is not None
        return self.running.url(name)

    # --- load --------------------------------------------------------------------------------

    def start_load(self) -> None:
        self.load = Devices(self.broker.port, self.devices, self.per_device, self.rate)
        self.load.start()
        if "commands" in self.component_names:
            self.operators = Operators(self.url("commands"), self.devices, self.command_rate)
            self.operators.start()

    def wait_sent(self, fraction: float) -> None:
        assert self.load is not None
        target = self.load.total * fraction

        def sent() -> bool:
            assert self.load is not None
            assert self.load.error is None, self.load.error
            return self.load.sent >= target

        self._wait(sent, "readings", 120)
        assert self.load.is_alive(), "the fault must land while readings are still being sent"

    # --- the fault ---------------------------------------------------------------------------

    @contextmanager
    def outage(self, needs: tuple[str, ...] | None = None) -> Iterator[Readiness]:
        """Watch every component's /readyz while the body breaks the server and brings it back
        (it returns once the server is up again); then wait until all are ready and check that
        those needing the server said they were not while it was gone."""
        watched = [n for n in self.component_names if n in COMPONENTS]
        stop = threading.Event()
        started = time.monotonic()

        def watch() -> None:
            with httpx.Client(timeout=3.0) as client:  # /readyz answers within 2 s
                while not stop.is_set():
                    for name in watched:
                        try:
                            status = client.get(f"{self.url(name)}/readyz").status_code
                        except httpx.HTTPError:
                            status = 0  # no answer at all: a hang, or the process gone
                        self.readiness.seen[name].append((time.monotonic(), status))
                    time.sleep(0.1)

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        try:
            yield self.readiness
            self.readiness.back_at = time.monotonic()
            self.readiness.outage_s = self.readiness.back_at - started
            self._wait(
                lambda: (
                    self.readiness.ready_again(watched) is not None
                    and time.monotonic() - (self.readiness.back_at or 0) > 1.0
                ),
                "every component ready again",
                120,
            )
        finally:
            stop.set()
            watcher.join(10)
        self.readiness.recovery_s = self.readiness.ready_again(watched)
        dependants = needs if needs is not None else NEEDS[self.kind]
        for name in dependants:
            if name not in watched:
                continue
            during = [
                status
                for t, status in self.readiness.seen[name]
                if started <= t <= (self.readiness.back_at or 0)
            ]
            assert 503 in during, (
                f"{name} never answered /readyz 503 while {self.kind} was down: "
                f"{dict(collections.Counter(during))} (0: no answer in 3 s)"
            )
        for name in watched:
            assert self.readiness.seen[name][-1][1] == 200, f"{name} not ready after the fault"

    # --- the verdict -------------------------------------------------------------------------

    def finish(self) -> Figures:
        """Stop the load, wait for everything to be stored, and check that it was, once."""
        assert self.settings is not None
        assert self.load is not None
        self.load.join(self.settle_s)
        assert self.load.error is None, self.load.error
        if self.operators is not None:
            self.operators.stop.set()
            self.operators.join(self.settle_s)
            assert self.operators.error is None, self.operators.error
            assert not self.operators.wrong, self.operators.wrong[:5]
        acked = {d: set(s) for d, s in self.load.acked.items()}
        readings = sum(len(s) for s in acked.values())
        missing = self._wait(
            lambda: not influx_missing(self.settings, "seq", acked),
            "every acknowledged reading in InfluxDB",
            self.settle_s,
            quiet=True,
        )
        lost = influx_missing(self.settings, "seq", acked)
        assert not lost, f"acknowledged readings missing: {_summary(lost)}; {self._log_state()}"
        del missing
        stored, in_log, dead = self._stored_counts()
        assert dead == 0, f"{dead} readings dead-lettered"
        assert in_log == stored, f"INGEST holds {in_log} messages for {stored} distinct readings"
        published = {d: set(s) for d, s in self.load.published.items()}
        assert stored <= sum(len(s) for s in published.values())
        self._wait(self._views_show_last_readings, "every view's last reading", self.settle_s)
        commands = self._check_events()
        self._check_replay_equals_views()
        return Figures(
            outage_s=self.readiness.outage_s,
            recovery_s=self.readiness.recovery_s,
            readings=readings,
            stored=stored,
            lost=0,
            duplicated=in_log - stored,
            commands=commands,
            unavailable=self.operators.unavailable if self.operators else 0,
        )

    def _stored_counts(self) -> tuple[int, int, int]:
        """Distinct (device, seq) readings in InfluxDB, messages in INGEST, dead letters."""
        assert self.settings is not None
        response = httpx.get(
            f"{self.settings.influx_url}/query",
            params={"db": self.settings.influx_db, "q": 'SELECT count("seq") FROM telemetry'},
            timeout=30,
        )
        series = response.json()["results"][0].get("series")
        stored = int(series[0]["values"][0][1]) if series else 0

        async def counts() -> tuple[int, int]:
            assert self.settings is not None
            streams = Streams(self.settings.namespace)
            nc = await nats.connect(self.settings.nats_url)
            try:
                jsm = nc.jsm()
                ingest = (await jsm.stream_info(streams.ingest)).state.messages
                dead = (await jsm.stream_info(streams.deadletter)).state.messages
                return int(ingest), int(dead)
            finally:
                await nc.close()

        in_log, dead = asyncio.run(counts())
        return stored, in_log, dead

    def _views_show_last_readings(self) -> bool:
        assert self.load is not None
        with httpx.Client(timeout=5) as client:
            for device_id, seqs in self.load.acked.items():
                response = client.get(
                    f"{self.url('gateway')}/api/v1/devices/{device_id}", headers=VIEWER
                )
                if response.status_code != 200:
                    return False
                metric = (response.json().get("metrics") or {}).get("seq") or {}
                if metric.get("value") is None or metric["value"] < max(seqs):
                    return False
        return True

    def _check_events(self) -> int:
        """The store's events relayed once each, in commit order; every accepted command's
        event in the store once. Answers the number of accepted commands."""
        assert self.settings is not None
        from infra.eventstore import open_store

        store = open_store(self.settings)
        try:
            # Positions are the store's notification ids: increasing, not always contiguous
            # (PostgreSQL's sequences jump by up to 32 after a crash or an immediate stop).
            stored = [n.id for n in store.recorder.select_notifications(start=1, limit=1_000_000)]
        finally:
            store.close()
        total = len(stored)

        async def relayed() -> list[tuple[int, Any]]:
            assert self.settings is not None
            streams = Streams(self.settings.namespace)
            nc = await nats.connect(self.settings.nats_url)
            out = []
            try:
                jsm = nc.jsm()
                info = await jsm.stream_info(streams.events)
                for seq in range(info.state.first_seq, info.state.last_seq + 1):
                    msg = await jsm.get_msg(streams.events, seq)
                    headers = dict(msg.headers or {})
                    out.append((int(headers["Iot-Position"]), decode_stream_event(msg.data or b"")))
            finally:
                await nc.close()
            return out

        def caught_up() -> list[tuple[int, Any]] | None:
            found = asyncio.run(relayed())
            return found if len(found) >= total else None

        messages = self._wait(caught_up, "the relay to publish every stored event", self.settle_s)
        positions = [position for position, _ in messages]
        assert positions == stored, "each stored event once, in commit order"
        configured = sum(isinstance(event, DeviceConfigured) for _, event in messages)
        accepted = self.operators.accepted if self.operators else 0
        assert configured == accepted, f"{configured} configuration events, {accepted} accepted"
        return accepted

    def _check_replay_equals_views(self) -> None:
        assert self.settings is not None
        env = {
            **os.environ,
            **self.running.env,  # type: ignore[union-attr]
            "IOT_NAMESPACE": self.settings.namespace,
            "IOT_INFLUX_DB": self.settings.influx_db,
        }
        done = subprocess.run(
            [sys.executable, "-m", "iot.cli", "replay", "views", "--verify", "--quiet"],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        assert done.returncode == 0, f"views differ from a replay:\n{done.stdout}{done.stderr}"

    # --- helpers -----------------------------------------------------------------------------

    def _registrations_relayed(self) -> bool:
        """The bridge learns devices from the EVENTS stream, up to its head when it starts: it
        must find every registration there, or a first reading is dead-lettered as unknown."""
        assert self.settings is not None
        streams = Streams(self.settings.namespace)

        async def relayed() -> int:
            assert self.settings is not None
            nc = await nats.connect(self.settings.nats_url)
            try:
                return int((await nc.jsm().stream_info(streams.events)).state.messages)
            finally:
                await nc.close()

        return asyncio.run(relayed()) >= len(self.devices)

    def _log_state(self) -> str:
        assert self.settings is not None
        from tests.e2e.pipeline import log_state

        try:
            return str(log_state(self.settings))
        except Exception as e:
            return f"log state unavailable: {e!r}"

    def _wait(self, check: Any, what: str, timeout: float, *, quiet: bool = False) -> Any:
        deadline = time.monotonic() + timeout
        result = None
        while time.monotonic() < deadline:
            try:
                result = check()
            except (httpx.HTTPError, OSError, KeyError, ValueError, nats.errors.Error):
                result = None
            if result:
                return result
            time.sleep(0.2)
        if quiet:
            return result
        raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


def _summary(missing: dict[str, list[int]]) -> str:
    total = sum(len(v) for v in missing.values())
    sample = {d: v[:5] for d, v in list(missing.items())[:3]}
    return f"{total} in {len(missing)} devices, e.g. {sample}"
