"""`python -m bench roundtrip`: command round trip through the whole system.

100 simulated devices (`iot simulate`, a process of its own), online on a private Mosquitto
with the dynamic security plugin (each device authenticates with its own secret); `iot run
commands`, `relay`, `bridge`, `projector views` and `projector auth` as processes. Open loop:
commands are POSTed on a constant schedule at each offered rate, round-robin over the devices;
a command's latency runs from its scheduled POST until its `acknowledged` outcome is in the
device view (the `commands` field of the device's Redis hash that the gateway serves, checked on
each change notification the views projector publishes for the gateway's SSE stream). The path:
API -> event store -> relay -> EVENTS -> bridge -> MQTT -> device -> ack -> bridge -> INGEST ->
command policy -> event store -> relay -> EVENTS -> views projector -> Redis.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import os
import secrets
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import msgspec

from bench.loadclient import RawClient
from bench.processes import Component, Components, iot_command, progress
from bench.registry import register
from bench.report import Report
from bench.stats import percentile
from bench.system import (
    create_namespace,
    drop_namespace,
    drop_redis_keys,
    free_port,
    machine,
    settings_for,
    sleep_until,
    unique_namespace,
)
from infra import dynsec
from infra.settings import Settings
from infra.views import ViewKeys
from iot.broker import BrokerAuth, PrivateBroker

TOKEN = "bench-roundtrip-admin-token-0123"
COMMANDS = "/api/v1/devices"
PING = b'{"name": "ping", "ttl_s": 60}'
TARGET_RATE = 200.0
TARGET_P99_MS = 200.0


def configure(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("roundtrip")
    group.add_argument(
        "--roundtrip-devices", type=int, default=100, help="online simulated devices (100)"
    )
    group.add_argument(
        "--roundtrip-rates",
        default="100,200,300",
        help="offered commands/s, one step each (100,200,300)",
    )
    group.add_argument(
        "--roundtrip-duration", type=float, default=10.0, help="seconds per step (10)"
    )
    group.add_argument(
        "--roundtrip-commands",
        type=int,
        default=1,
        help="`iot run commands` replicas, POSTs spread over them (1; on 2 cores a second"
        " replica measured slower: its writes conflict with the first's)",
    )
    group.add_argument(
        "--roundtrip-drain", type=float, default=20.0, help="max seconds to wait for stragglers"
    )


@dataclass
class Step:
    offered: float
    sent: int = 0
    post_errors: int = 0
    post_ms: list[float] = field(default_factory=list)
    visible_ms: list[float] = field(default_factory=list)  # POST -> acknowledged in the view
    acked_ms: list[float] = field(default_factory=list)  # POST -> its ack reached the bridge
    first: float = math.inf
    last_visible: float = 0.0
    unfinished: dict[str, int] = field(default_factory=dict)  # state in the view -> commands

    @property
    def completed(self) -> int:
        return len(self.visible_ms)

    @property
    def rate(self) -> float:
        """Commands completed per second, first POST to last outcome visible."""
        span = self.last_visible - self.first
        return self.completed / span if span > 0 else math.nan


class Watcher:
    """Timestamps each command when its acknowledged outcome appears in the device view."""

    def __init__(self, redis: Any, keys: ViewKeys) -> None:
        self.redis = redis
        self.keys = keys
        self.outstanding: dict[str, dict[str, float]] = {}  # device -> command id -> t0
        self.wall: dict[str, float] = {}  # command id -> t0 on the wall clock
        self._checks: set[asyncio.Task[None]] = set()
        self.step: Step | None = None
        self.done = asyncio.Event()

    def expect(self, device_id: str, command_id: str, t0: float) -> None:
        self.outstanding.setdefault(device_id, {})[command_id] = t0
        self.wall[command_id] = time.time() - (time.monotonic() - t0)
        # Its outcome may be in the view already (the 202 can arrive after the last change).
        task = asyncio.get_running_loop().create_task(self._check(device_id))
        self._checks.add(task)
        task.add_done_callback(self._checks.discard)

    async def states_of_outstanding(self) -> dict[str, int]:
        """Where the commands not seen acknowledged are, by their state in the device view."""
        states: dict[str, int] = {}
        for device_id, waiting in self.outstanding.items():
            raw = await self.redis.hget(self.keys.device(device_id), "commands")
            view = msgspec.json.decode(raw) if raw else {}
            known = {c["command_id"]: c["state"] for c in view.get("pending", [])}
            known.update({c["command_id"]: c["state"] for c in view.get("recent", [])})
            for command_id in waiting:
                state = known.get(command_id, "not in the view")
                states[state] = states.get(state, 0) + 1
        return states

    def pending(self) -> int:
        return sum(len(v) for v in self.outstanding.values())

    async def run(self) -> None:
        pubsub = self.redis.pubsub()
        await pubsub.subscribe(self.keys.changes)
        try:
            while True:
                message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
                if message is None:
                    continue
                data = message["data"]
                device_id = data.decode() if isinstance(data, bytes) else str(data)
                if self.outstanding.get(device_id):
                    await self._check(device_id)
        finally:
            await pubsub.aclose()

    async def _check(self, device_id: str) -> None:
        raw = await self.redis.hget(self.keys.device(device_id), "commands")
        now = time.monotonic()
        if raw is None:
            return
        recent = msgspec.json.decode(raw).get("recent", [])
        waiting = self.outstanding[device_id]
        for command in recent:
            t0 = waiting.pop(command["command_id"], None)
            if t0 is None or self.step is None:
                continue
            if command["state"] == "acknowledged":
                self.step.visible_ms.append((now - t0) * 1000)
                self.step.last_visible = max(self.step.last_visible, now)
                acked = datetime.fromisoformat(command["finished_at"]).timestamp()
                started = self.wall.pop(command["command_id"], acked)
                self.step.acked_ms.append((acked - started) * 1000)
        if not self.pending():
            self.done.set()


async def _offer(
    clients: list[RawClient],
    watcher: Watcher,
    device_ids: list[str],
    step: Step,
    duration: float,
) -> None:
    loop = asyncio.get_running_loop()
    interval = 1.0 / step.offered
    start = loop.time() + 0.05
    tasks: set[asyncio.Task[None]] = set()

    async def one(device_id: str, at: float) -> None:
        t0 = time.monotonic() - (loop.time() - at)  # the scheduled time, in monotonic terms
        try:
            client = clients[hash(device_id) % len(clients)]
            status, body = await client.send("POST", f"{COMMANDS}/{device_id}/commands", PING)
        except (OSError, ValueError, asyncio.IncompleteReadError):
            status, body = 0, b""
        if status != 202:
            step.post_errors += 1
            return
        step.post_ms.append((time.monotonic() - t0) * 1000)
        watcher.expect(device_id, msgspec.json.decode(body)["command_id"], t0)

    i = 0
    while (at := start + i * interval) < start + duration:
        await sleep_until(at)
        step.first = min(step.first, time.monotonic())
        task = loop.create_task(one(device_ids[i % len(device_ids)], at))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
        i += 1
    step.sent = i
    while tasks:
        await asyncio.gather(*tasks)


async def _step(
    clients: list[RawClient], watcher: Watcher, devices: list[str], rate: float, args: Any
) -> Step:
    step = Step(rate)
    watcher.step = step
    await _offer(clients, watcher, devices, step, args.roundtrip_duration)
    watcher.done.clear()  # it was set whenever nothing happened to be in flight
    if watcher.pending():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(watcher.done.wait(), args.roundtrip_drain)
    lost = watcher.pending()
    if lost:
        states = await watcher.states_of_outstanding()
        progress(
            f"{lost} commands not acknowledged in the view within {args.roundtrip_drain:g} s"
            f" of the last POST; their states there: {states}"
        )
        step.unfinished = states
    watcher.outstanding.clear()
    return step


async def _run(args: argparse.Namespace) -> Report:
    import redis.asyncio as aioredis

    rates = [float(r) for r in str(args.roundtrip_rates).split(",") if r.strip()]
    report = Report(
        f"command round trip: {args.roundtrip_devices} online devices,"
        f" {args.roundtrip_commands} command service replicas"
    )
    report.note(f"machine: {machine()}")
    report.note(
        "latency: scheduled POST -> `acknowledged` in the device view (open loop, no"
        " coordinated omission); POST: scheduled POST -> its 202; to the ack: scheduled POST"
        " -> the device's ack received by the bridge (its `finished_at`, wall clock); rate:"
        " completed /"
        " (first POST -> last outcome visible); a keep-alive HTTP/1.1 pool of 32 per replica"
    )
    settings: Settings = settings_for(unique_namespace("rt"), {TOKEN: "admin"})
    await create_namespace(settings)
    auth = BrokerAuth(secrets.token_hex(16), secrets.token_hex(16))
    redis = aioredis.Redis.from_url(settings.redis_url)
    with tempfile.TemporaryDirectory(prefix="bench-roundtrip-") as tmp:
        broker = PrivateBroker(Path(tmp), free_port(), auth=auth)
        broker.start()
        env = {
            "IOT_NAMESPACE": settings.namespace,
            "IOT_API_TOKENS": f"{TOKEN}=admin",
            "IOT_MQTT_URL": broker.url,
            "IOT_LOG_LEVEL": "WARNING",
        }
        admin = {
            "IOT_MQTT_USERNAME": dynsec.ADMIN_USERNAME,
            "IOT_MQTT_PASSWORD": auth.admin_password,
        }
        bridge = {
            "IOT_MQTT_USERNAME": dynsec.BRIDGE_USERNAME,
            "IOT_MQTT_PASSWORD": auth.bridge_password,
            "IOT_MQTT_CLIENT_ID": f"bench-bridge-{settings.namespace}",
        }
        replicas = [Component("commands", env, free_port()) for _ in range(args.roundtrip_commands)]
        children = [
            *replicas,
            Component("relay", env, free_port()),
            Component("auth", {**env, **admin}, free_port(), ["projector", "auth"]),
            Component("views", env, free_port(), ["projector", "views"]),
            Component("bridge", {**env, **bridge}, free_port()),
        ]
        prefix = f"rt{secrets.token_hex(2)}"
        fleet = SimulatorProcess(env, children[0].port, args.roundtrip_devices, prefix)
        watch_task: asyncio.Task[None] | None = None
        clients = [RawClient("127.0.0.1", c.port, TOKEN, 32) for c in replicas]
        try:
            with Components(*children):
                await asyncio.gather(*(c.wait_ready() for c in children))
                progress(f"starting {args.roundtrip_devices} simulated devices")
                fleet.start()
                keys = ViewKeys.for_namespace(settings.namespace)
                deadline = time.monotonic() + 180
                while await redis.scard(keys.online) < args.roundtrip_devices:
                    if time.monotonic() > deadline or not fleet.running():
                        raise RuntimeError(
                            f"the devices never all showed online in the views: {fleet.tail()}"
                        )
                    await asyncio.sleep(0.2)
                watcher = Watcher(redis, keys)
                watch_task = asyncio.create_task(watcher.run())
                device_ids = [f"{prefix}-{i:04d}" for i in range(args.roundtrip_devices)]
                progress("warm-up: 5 s at 50 commands/s")
                await _step(clients, watcher, device_ids, 50.0, _Warm(args))
                for run in range(args.repeats):
                    for rate in rates:
                        progress(f"run {run + 1}: {rate:g} commands/s")
                        step = await _step(clients, watcher, device_ids, rate, args)
                        _rows(report, run, step)
                for replica in replicas:
                    report.note(await _commit_note(replica.url))
                report.note(await _bridge_note(children[-1].url))
                _verdict(report)
        finally:
            fleet.stop()
            for client in clients:
                await client.close()
            if watch_task is not None:
                watch_task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await watch_task
            broker.stop()
            await redis.aclose()
            await drop_namespace(settings)
            await drop_redis_keys(settings)
    return report


class SimulatorProcess:
    """`iot simulate` registering its devices through the command API, no telemetry."""

    def __init__(self, env: dict[str, str], api_port: int, devices: int, prefix: str) -> None:
        self.argv = [
            *iot_command(),
            "simulate",
            "--devices",
            str(devices),
            "--rate",
            "0",
            "--prefix",
            prefix,
            "--api",
            f"http://127.0.0.1:{api_port}",
        ]
        self.env = {**os.environ, **env}
        self.log = Path(tempfile.mkstemp(prefix="bench-simulate-", suffix=".log")[1])
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(
                self.argv, env=self.env, stdout=out, stderr=subprocess.STDOUT
            )

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def tail(self) -> str:
        return " | ".join(self.log.read_text(errors="replace").splitlines()[-5:])

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)  # the devices say `offline` and disconnect
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.unlink(missing_ok=True)


class _Warm:
    """The bench's arguments with a short warm-up step."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.roundtrip_duration = 5.0
        self.roundtrip_drain = args.roundtrip_drain


async def _metrics(url: str) -> dict[str, float]:
    import httpx

    async with httpx.AsyncClient(base_url=url, timeout=5) as client:
        text = (await client.get("/metrics")).text
    values: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("iot_"):
            name, _, value = line.rpartition(" ")
            values[name] = float(value)
    return values


async def _bridge_note(url: str) -> str:
    """What the dispatcher did over the whole bench (failures would explain stragglers)."""
    values = await _metrics(url)
    parts = [
        f"{name.split('{', 1)[1].rstrip('}')} {value:.0f}"
        for name, value in sorted(values.items())
        if name.startswith(("iot_bridge_commands_dispatched_total{", "iot_bridge_dispatch_fail"))
    ]
    return "bridge dispatcher: " + (", ".join(parts) or "nothing dispatched")


async def _commit_note(url: str) -> str:
    """What the command service's group committer and policies did over the whole bench."""
    import httpx

    async with httpx.AsyncClient(base_url=url, timeout=5) as client:
        text = (await client.get("/metrics")).text
    values: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("iot_") and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            values[name] = values.get(name, 0.0) + float(value)
    batches = values.get("iot_group_commit_size_count", 0.0)
    changes = values.get("iot_group_commit_size_sum", 0.0)
    seconds = values.get("iot_group_commit_seconds_sum", 0.0)
    return (
        f"command service: {changes:.0f} changes in {batches:.0f} group commits"
        f" ({changes / max(batches, 1):.1f} per commit, {1000 * seconds / max(batches, 1):.1f} ms"
        f" each), {values.get('iot_group_commit_conflicts_total', 0):.0f} split on a conflict,"
        f" {values.get('iot_command_conflict_retries_total', 0):.0f} changes re-run after a"
        " lost race"
    )


def _rows(report: Report, run: int, step: Step) -> None:
    report.section = f"offered {step.offered:g} commands/s"
    tag = f"@{step.offered:g}"
    report.add(run, f"completed rate {tag}", "cmd/s", step.rate)
    report.add(run, f"completed {tag}", "%", 100.0 * step.completed / max(1, step.sent))
    report.add(run, f"POST p50 {tag}", "ms", percentile(step.post_ms, 50))
    report.add(run, f"POST p99 {tag}", "ms", percentile(step.post_ms, 99))
    report.add(run, f"to the ack p50 {tag}", "ms", percentile(step.acked_ms, 50))
    report.add(run, f"to the ack p99 {tag}", "ms", percentile(step.acked_ms, 99))
    report.add(run, f"round trip p50 {tag}", "ms", percentile(step.visible_ms, 50))
    report.add(run, f"round trip p90 {tag}", "ms", percentile(step.visible_ms, 90))
    report.add(run, f"round trip p99 {tag}", "ms", percentile(step.visible_ms, 99))
    report.add(run, f"round trip max {tag}", "ms", max(step.visible_ms, default=math.nan))
    report.add(run, f"POST errors {tag}", "count", float(step.post_errors), digits=0)
    if step.unfinished:
        report.note(f"run {run + 1} @{tag}/s, not acknowledged in time: {step.unfinished}")


def _verdict(report: Report) -> None:
    tag = f"@{TARGET_RATE:g}"
    p99 = report.median(f"round trip p99 {tag}")
    done = report.median(f"completed {tag}")
    if math.isnan(p99):
        report.note(f"target: p99 < {TARGET_P99_MS:g} ms at {TARGET_RATE:g}/s: not measured")
        return
    ok = p99 < TARGET_P99_MS and done >= 100.0
    report.note(
        f"target: round trip p99 < {TARGET_P99_MS:g} ms at {TARGET_RATE:g} commands/s, all"
        f" completed: median p99 {p99:.0f} ms, {done:.1f}% completed -> {'MET' if ok else 'MISSED'}"
    )


@register(
    "roundtrip",
    "device command round trip: HTTP POST -> device -> ack visible in the device view",
    configure,
)
def run(args: argparse.Namespace) -> Report:
    return asyncio.run(_run(args))
