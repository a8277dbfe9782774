"""`iot up`: every component as a child process, restarted if it dies, stopped by Ctrl-C."""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import signal
import sys
from dataclasses import dataclass

from iot.runtime import stop_on_signals
from iot.settings import Settings


@dataclass(frozen=True)
class Child:
    name: str
    argv: tuple[str, ...]
    port: int


def children() -> list[Child]:
    iot = (sys.executable, "-m", "iot.cli")
    return [
        Child("commands", (*iot, "run", "commands"), 8080),
        Child("relay", (*iot, "run", "relay"), 8084),
    ]


async def _supervise(child: Child, env: dict[str, str], stop: asyncio.Event) -> None:
    backoff = 0.5
    while not stop.is_set():
        proc = await asyncio.create_subprocess_exec(
            *child.argv, env={**env, "IOT_HTTP_PORT": str(child.port)}
        )
        waiter = asyncio.create_task(proc.wait())
        stopper = asyncio.create_task(stop.wait())
        await asyncio.wait({waiter, stopper}, return_when=asyncio.FIRST_COMPLETED)
        stopper.cancel()
        if stop.is_set():
            if proc.returncode is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    await asyncio.wait_for(waiter, timeout=10)
                except TimeoutError:
                    proc.kill()
                    await waiter
            return
        print(f"iot up: {child.name} exited with {proc.returncode}; restarting", file=sys.stderr)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=backoff)
        backoff = min(backoff * 2, 10.0)


async def up(settings: Settings, *, migrate_first: bool = True) -> int:
    env = dict(os.environ)
    token = None
    if not settings.api_tokens:
        token = secrets.token_urlsafe(24)
        env["IOT_API_TOKENS"] = f"{token}=admin"
    if migrate_first:
        from commands.migrate import migrate

        for step in await migrate(settings):
            print(f"iot up: {step}")
    stop = stop_on_signals()
    kids = children()
    tasks = [asyncio.create_task(_supervise(child, env, stop)) for child in kids]
    print("iot up: running; Ctrl-C stops everything")
    for child in kids:
        print(f"  {child.name:<10} http://127.0.0.1:{child.port}/healthz")
    print("  command API: http://127.0.0.1:8080/api/v1")
    if token:
        print(f"  admin token (generated; set IOT_API_TOKENS to choose your own): {token}")
    await stop.wait()
    await asyncio.gather(*tasks)
    return 0
