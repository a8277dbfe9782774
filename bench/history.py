"""`python -m bench history`: a device with 100,000 domain events in the views (real Redis):
the cost of projecting its history, its memory in Redis, and the latency of a page of events,
a filtered page, `as_of` at random times and `diff` through the gateway's reader."""

from __future__ import annotations

import argparse
import asyncio
import random
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

from redis.asyncio import Redis

from bench.registry import register
from bench.report import Report
from bench.stats import percentile
from domain.published import (
    DeviceCommandAcknowledged,
    DeviceCommandRequested,
    DeviceCommandSent,
    DeviceConfigured,
    DeviceConnected,
    DeviceDisconnected,
    DeviceRegistered,
    PublishedEvent,
)
from gateway.history import HistoryQuery, HistoryReader
from infra.settings import load
from infra.views import ViewKeys
from projections.views import ViewsProjector

DEVICE = "bench-history"
T0 = datetime(2026, 1, 1, tzinfo=UTC)
QUERIES = 200


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--history-events", type=int, default=100_000, help="history: events of the device"
    )


def events(n: int) -> list[PublishedEvent]:
    out: list[PublishedEvent] = []
    for v in range(1, n + 1):
        common: dict[str, Any] = {
            "device_id": DEVICE,
            "version": v,
            "at": T0 + timedelta(seconds=v),
            "position": v,
        }
        match v % 6:
            case _ if v == 1:
                out.append(DeviceRegistered(**common, name="b", type="meter", labels={"a": "1"}))
            case 0:
                out.append(DeviceConfigured(**common, config={"sp": v % 40}, config_version=v))
            case 1:
                out.append(DeviceConnected(**common))
            case 2:
                out.append(
                    DeviceCommandRequested(
                        **common,
                        actor="ops",
                        command_id=f"c{v}",
                        name="reboot",
                        args={"delay": 1},
                        expires_at=T0 + timedelta(days=400),
                    )
                )
            case 3:
                out.append(DeviceCommandSent(**common, command_id=f"c{v - 1}"))
            case 4:
                out.append(DeviceCommandAcknowledged(**common, command_id=f"c{v - 2}", result={}))
            case _:
                out.append(DeviceDisconnected(**common))
    return out


async def measure(report: Report, run: int, n: int) -> None:
    settings = load()
    namespace = f"benchhist{run}"
    redis = Redis.from_url(settings.redis_url, decode_responses=True)
    keys = ViewKeys.for_namespace(namespace).silent()
    try:
        projector = ViewsProjector(redis, None, namespace, keys=keys)
        await projector.scripts.load()
        life = events(n)
        started = time.perf_counter()
        for i in range(0, n, 500):
            await projector.apply_events(keys, list(enumerate(life[i : i + 500])))
        elapsed = time.perf_counter() - started
        report.section = "projecting"
        report.add(run, "events projected", "ev/s", n / elapsed, 0)
        memory = 0
        for key in (keys.history(DEVICE), keys.history_at(DEVICE), keys.history_state(DEVICE)):
            memory += int(await redis.memory_usage(key) or 0)
        report.add(run, "Redis memory per event", "B", memory / n, 0)
        reader = HistoryReader(redis)
        rng = random.Random(run)

        async def timed(label: str, call: Callable[[], Awaitable[object]]) -> None:
            samples = []
            for _ in range(QUERIES):
                t = time.perf_counter()
                await call()
                samples.append((time.perf_counter() - t) * 1000)
            report.add(run, f"{label} p50", "ms", percentile(samples, 50), 2)
            report.add(run, f"{label} p99", "ms", percentile(samples, 99), 2)

        def ms_of(v: int) -> int:
            return int((T0 + timedelta(seconds=v)).timestamp() * 1000)

        report.section = f"reads ({QUERIES} each)"
        await timed("newest page of 50", lambda: reader.page(keys, DEVICE, HistoryQuery()))
        await timed(
            "page at a random cursor",
            lambda: reader.page(keys, DEVICE, HistoryQuery(before_version=rng.randint(2, n))),
        )
        await timed(
            "filtered page (configured)",
            lambda: reader.page(keys, DEVICE, HistoryQuery(types=frozenset({"configured"}))),
        )
        await timed(
            "as_of a random time",
            lambda: reader.state_at(keys, DEVICE, ms_of(rng.randint(1, n))),
        )

        async def one_diff() -> None:
            a, b = sorted(rng.randint(1, n) for _ in range(2))
            await reader.state_at(keys, DEVICE, ms_of(a))
            await reader.state_at(keys, DEVICE, ms_of(b))
            await reader.count_between(keys, DEVICE, a, b)

        await timed("diff of two random times", one_diff)
    finally:
        async for key in redis.scan_iter(match=f"{namespace}:*", count=1000):
            await redis.delete(key)
        await redis.aclose()


@register("history", "a device with 100,000 events: project, page, as_of, diff", configure)
def run(args: argparse.Namespace) -> Report:
    n = args.history_events
    report = Report(f"device history, {n:,} events of one device (real Redis)")
    for i in range(args.repeats):
        asyncio.run(measure(report, i, n))
    report.note("reads call the gateway's HistoryReader directly (no HTTP); Redis on loopback")
    return report
