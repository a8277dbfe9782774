"""Load phases: closed-loop saturation, open-loop constant arrival rate, raw library saves."""

from __future__ import annotations

import asyncio
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime

import msgspec

from bench.loadclient import Client
from bench.stats import percentile
from bench.system import sleep_until

DEVICES = "/api/v1/devices"
_encode = msgspec.json.Encoder().encode


@dataclass
class PhaseResult:
    """Completions inside the measured window: their latencies (s) and the errors."""

    window: float
    latencies: list[float] = field(default_factory=list)
    errors: Counter[str] = field(default_factory=Counter)

    @property
    def rate(self) -> float:
        return len(self.latencies) / self.window if self.window > 0 else 0.0

    def ms(self, q: float) -> float:
        return 1000 * percentile(self.latencies, q)

    @property
    def error_count(self) -> int:
        return sum(self.errors.values())


def register_body(device_id: str) -> bytes:
    return _encode(
        {
            "device_id": device_id,
            "name": f"bench device {device_id}",
            "type": "thermostat",
            "labels": {"site": "bench", "floor": "3"},
        }
    )


def config(step: int) -> dict[str, object]:
    return {"interval_s": 10 + step, "setpoint": 21.5, "mode": "eco", "step": step}


def config_body(step: int) -> bytes:
    return _encode({"config": config(step)})


class _Recorder:
    """Times one request and files it under the phase's window."""

    def __init__(self, client: Client, result: PhaseResult, start: float, end: float) -> None:
        self.client = client
        self.result = result
        self.start = start
        self.end = end
        self.loop = asyncio.get_running_loop()

    async def send(self, method: str, path: str, body: bytes, since: float | None = None) -> bool:
        """Send; record latency from `since` (default: now) if it completes in the window."""
        began = self.loop.time() if since is None else since
        try:
            status, _ = await self.client.send(method, path, body)
        except Exception as e:
            self.result.errors[type(e).__name__] += 1
            return False
        done = self.loop.time()
        if status >= 300:
            self.result.errors[f"HTTP {status}"] += 1
            return False
        if self.start <= done <= self.end:
            self.result.latencies.append(done - began)
        return True


async def saturate(
    client: Client, *, workers: int, configures: int, warmup: float, duration: float, tag: str
) -> PhaseResult:
    """Closed loop: each worker registers a device, then configures it `configures` times."""
    loop = asyncio.get_running_loop()
    start = loop.time() + warmup
    end = start + duration
    result = PhaseResult(duration)
    recorder = _Recorder(client, result, start, end)

    async def worker(w: int) -> None:
        n = 0
        while loop.time() < end:
            device_id = f"{tag}-w{w}-{n}"
            n += 1
            if not await recorder.send("POST", DEVICES, register_body(device_id)):
                continue
            for step in range(configures):
                if loop.time() >= end:
                    break
                await recorder.send("PATCH", f"{DEVICES}/{device_id}/config", config_body(step))

    await asyncio.gather(*(worker(w) for w in range(workers)))
    return result


@dataclass
class OpenLoopResult:
    result: PhaseResult
    offered: float
    expected: set[str]  # "<device_id>:<version>" of every event the phase committed


async def open_loop(
    client: Client, *, rate: float, configures: int, duration: float, tag: str
) -> OpenLoopResult:
    """Open loop: requests start on a constant schedule, whatever the answers' latency.

    Latency runs from the scheduled start, so a late answer delays no later request and
    client-side queueing is counted (no coordinated omission). The mix is one registration
    then `configures` changes per device; a device has at most one request in flight.
    """
    loop = asyncio.get_running_loop()
    interval = 1.0 / rate
    start = loop.time() + 0.05
    end = start + duration
    result = PhaseResult(duration)
    recorder = _Recorder(client, result, start, float("inf"))
    ready: deque[tuple[str, int, int]] = deque()  # (device_id, version, configures done)
    expected: set[str] = set()
    tasks: set[asyncio.Task[None]] = set()
    registered = 0

    async def register(device_id: str, at: float) -> None:
        if await recorder.send("POST", DEVICES, register_body(device_id), since=at):
            expected.add(f"{device_id}:1")
            ready.append((device_id, 1, 0))

    async def configure(device_id: str, version: int, done: int, at: float) -> None:
        path = f"{DEVICES}/{device_id}/config"
        if await recorder.send("PATCH", path, config_body(done), since=at):
            version += 1
            expected.add(f"{device_id}:{version}")
        if done + 1 < configures:
            ready.append((device_id, version, done + 1))

    i = 0
    while (at := start + i * interval) < end:
        await sleep_until(at)
        if i % (configures + 1) == 0 or not ready:
            task = loop.create_task(register(f"{tag}-{registered}", at))
            registered += 1
        else:
            task = loop.create_task(configure(*ready.popleft(), at))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
        i += 1
    offered = i / duration
    while tasks:
        await asyncio.gather(*tasks)
    return OpenLoopResult(result, offered, expected)


def raw_saves(
    save: Callable[[object], int],
    get: Callable[[str], object] | None,
    *,
    threads: int,
    configures: int,
    warmup: float,
    duration: float,
    tag: str,
    secret_hash: str,
) -> PhaseResult:
    """The library's save in `threads` threads: the API's events, one event per save.

    With `get`, each change first loads the device from the store, as the command handler does.
    """
    from domain.device import Device

    start = time.monotonic() + warmup
    end = start + duration
    result = PhaseResult(duration)
    lock = threading.Lock()

    def timed(began: float) -> None:
        done = time.monotonic()
        if start <= done <= end:
            result.latencies.append(done - began)

    def worker(w: int) -> None:
        n = 0
        labels = {"site": "bench", "floor": "3"}
        while time.monotonic() < end:
            device_id = f"{tag}-w{w}-{n}"
            n += 1
            try:
                began = time.monotonic()
                device = Device.register(
                    device_id,
                    f"bench device {device_id}",
                    "thermostat",
                    labels,
                    secret_hash,
                    datetime.now(UTC),
                )
                save(device)
                timed(began)
                for step in range(configures):
                    if time.monotonic() >= end:
                        break
                    began = time.monotonic()
                    if get is not None:
                        loaded = get(device_id)
                        assert isinstance(loaded, Device)
                        device = loaded
                    device.configure(config(step), datetime.now(UTC))
                    save(device)
                    timed(began)
            except Exception as e:
                with lock:
                    result.errors[type(e).__name__] += 1

    pool = [threading.Thread(target=worker, args=(w,), daemon=True) for w in range(threads)]
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join()
    return result
