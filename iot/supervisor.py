"""`iot up`: every component as a child process, restarted if it dies, stopped by Ctrl-C."""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import signal
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from iot.broker import PrivateBroker
from iot.runtime import stop_on_signals
from iot.settings import Settings

IOT = (sys.executable, "-m", "iot.cli")


@dataclass(frozen=True)
class Child:
    name: str
    argv: tuple[str, ...]
    port: int | None


def components() -> list[Child]:
    return [
        Child("commands", (*IOT, "run", "commands"), 8080),
        Child("bridge", (*IOT, "run", "bridge"), 8081),
        Child("gateway", (*IOT, "run", "gateway"), 8082),
        Child("relay", (*IOT, "run", "relay"), 8084),
        Child("timeseries", (*IOT, "run", "projector", "timeseries"), 8090),
        Child("views", (*IOT, "run", "projector", "views"), 8091),
    ]


async def _supervise(child: Child, env: dict[str, str], stop: asyncio.Event) -> None:
    backoff = 0.5
    while not stop.is_set():
        child_env = dict(env)
        if child.port is not None:
            child_env["IOT_HTTP_PORT"] = str(child.port)
        started = time.monotonic()
        proc = await asyncio.create_subprocess_exec(*child.argv, env=child_env)
        waiter = asyncio.create_task(proc.wait())
        stopper = asyncio.create_task(stop.wait())
        await asyncio.wait({waiter, stopper}, return_when=asyncio.FIRST_COMPLETED)
        stopper.cancel()
        if stop.is_set():
            if proc.returncode is None:
                proc.send_signal(signal.SIGTERM)
                done, _ = await asyncio.wait({waiter}, timeout=10)
                if not done:
                    print(
                        f"iot up: {child.name} ignored SIGTERM for 10 s; killing it",
                        file=sys.stderr,
                    )
                    proc.kill()
                    await waiter
            return
        if time.monotonic() - started > 30:
            backoff = 0.5  # it ran a while: a fresh failure, not a crash loop
        print(f"iot up: {child.name} exited with {proc.returncode}; restarting", file=sys.stderr)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=backoff)
        backoff = min(backoff * 2, 10.0)


async def _wait_ready(url: str, stop: asyncio.Event, within: float = 60.0) -> bool:
    deadline = time.monotonic() + within
    async with httpx.AsyncClient(timeout=1.0) as client:
        while not stop.is_set() and time.monotonic() < deadline:
            with contextlib.suppress(httpx.HTTPError):
                if (await client.get(url)).status_code == 200:
                    return True
            await asyncio.sleep(0.2)
    return False


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def _start_broker(settings: Settings) -> tuple[PrivateBroker, str]:
    """Our own Mosquitto with the shipped settings (deep queues, persistence) under `.iot/`."""
    _, wanted, _ = settings.mqtt
    port = wanted if _port_free(wanted) else next(p for p in range(1884, 1984) if _port_free(p))
    broker = PrivateBroker(Path(".iot") / "mosquitto", port)
    broker.start()
    return broker, broker.url


async def up(
    settings: Settings,
    *,
    migrate_first: bool = True,
    simulate: int = 0,
    rate: float = 1.0,
    own_broker: bool = True,
) -> int:
    env = dict(os.environ)
    broker = None
    mqtt_url = settings.mqtt_url
    if own_broker:
        broker, mqtt_url = _start_broker(settings)
        env["IOT_MQTT_URL"] = mqtt_url
    token = None
    if not settings.api_tokens:
        token = secrets.token_urlsafe(24)
        env["IOT_API_TOKENS"] = f"{token}=admin"
    if migrate_first:
        from commands.migrate import migrate

        for step in await migrate(settings):
            print(f"iot up: {step}")
    stop = stop_on_signals()
    kids = components()
    tasks = [asyncio.create_task(_supervise(child, env, stop)) for child in kids]
    if simulate:
        if await _wait_ready("http://127.0.0.1:8080/readyz", stop):
            sim = Child(
                "simulator",
                (*IOT, "simulate", "--devices", str(simulate), "--rate", str(rate)),
                None,
            )
            tasks.append(asyncio.create_task(_supervise(sim, env, stop)))
        else:
            print("iot up: the command API never became ready; no simulated fleet", file=sys.stderr)
    print("iot up: running; Ctrl-C stops everything")
    for child in kids:
        print(f"  {child.name:<11} http://127.0.0.1:{child.port}/readyz")
    print("  command API   http://127.0.0.1:8080/api/v1")
    print("  dashboards    http://127.0.0.1:8082/  (API: http://127.0.0.1:8082/api/v1)")
    print(f"  MQTT          {mqtt_url}" + ("  (iot up's own Mosquitto)" if broker else ""))
    if simulate:
        print(f"  simulated     {simulate} devices, {rate:g} messages/s")
    if token:
        print(f"  admin token (generated; set IOT_API_TOKENS to choose your own): {token}")
    await stop.wait()
    await asyncio.gather(*tasks)
    if broker is not None:
        broker.stop()
    return 0
