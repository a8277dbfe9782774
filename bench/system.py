"""The machine under test: its description, CPU accounting from /proc, free ports, namespaces."""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from infra.settings import Settings, load

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def machine() -> str:
    """One line: cores, CPU model, Python."""
    model = "unknown CPU"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    import platform

    return f"{os.cpu_count()} cores, {model}, Python {platform.python_version()}"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _proc_cpu(pid: int) -> tuple[str, float]:
    """(command name, user+system CPU seconds of all its threads) of one process."""
    raw = Path(f"/proc/{pid}/stat").read_text()
    name = raw[raw.index("(") + 1 : raw.rindex(")")]
    rest = raw[raw.rindex(")") + 2 :].split()
    return name, (int(rest[11]) + int(rest[12])) / CLOCK_TICKS


def _busy_seconds() -> float:
    """CPU seconds the whole machine spent busy (all cores) since boot."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return (sum(fields[:8]) - idle) / CLOCK_TICKS


@dataclass(frozen=True)
class CpuSample:
    """CPU seconds consumed so far, by group (named processes, by command name) and in total."""

    wall: float
    groups: Mapping[str, float]
    busy: float


class CpuMeter:
    """Samples the CPU time of our own processes (by pid) and of services (by command name)."""

    def __init__(self, pids: Mapping[str, int], services: Mapping[str, str]) -> None:
        self.pids = dict(pids)
        self.services = dict(services)  # group -> command-name prefix, e.g. postgres

    def sample(self) -> CpuSample:
        groups = dict.fromkeys([*self.pids, *self.services], 0.0)
        for group, pid in self.pids.items():
            with contextlib.suppress(OSError):
                groups[group] = _proc_cpu(pid)[1]
        if self.services:
            for entry in os.scandir("/proc"):
                if not entry.name.isdigit():
                    continue
                try:
                    name, seconds = _proc_cpu(int(entry.name))
                except (OSError, ValueError, IndexError):
                    continue  # gone meanwhile
                for group, prefix in self.services.items():
                    if name.startswith(prefix):
                        groups[group] += seconds
        import time

        return CpuSample(time.monotonic(), groups, _busy_seconds())


@dataclass(frozen=True)
class CpuUse:
    """CPU use between two samples, in percent of one core."""

    wall: float
    groups: Mapping[str, float]
    total: float

    @property
    def other(self) -> float:
        return max(0.0, self.total - sum(self.groups.values()))


def cpu_between(start: CpuSample, end: CpuSample) -> CpuUse:
    wall = max(1e-9, end.wall - start.wall)
    groups = {g: 100 * (end.groups[g] - start.groups.get(g, 0.0)) / wall for g in end.groups}
    return CpuUse(wall, groups, 100 * (end.busy - start.busy) / wall)


def unique_namespace(prefix: str = "b") -> str:
    return prefix + secrets.token_hex(5)


def settings_for(namespace: str, tokens: Mapping[str, str]) -> Settings:
    env = dict(os.environ)
    env["IOT_NAMESPACE"] = namespace
    env["IOT_API_TOKENS"] = ",".join(f"{t}={r}" for t, r in tokens.items())
    return load(env)


async def create_namespace(settings: Settings) -> None:
    """A fresh, migrated namespace: PostgreSQL schema and JetStream streams."""
    from commands.migrate import migrate

    await migrate(settings)


async def drop_namespace(settings: Settings) -> None:
    """Remove what a namespace created: its schema and its streams (as tests/conftest.py does)."""
    if not settings.namespace:  # the default namespace's schema is `public`, its database `iot`
        raise ValueError("refusing to drop the default namespace")
    import nats
    import psycopg
    from psycopg import sql

    from infra.streams import Streams

    pg = settings.postgres
    async with await psycopg.AsyncConnection.connect(
        **pg.connect_kwargs(),
        autocommit=True,
    ) as conn:
        await conn.execute(
            sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(settings.pg_schema))
        )
    nc = await nats.connect(settings.nats_url, connect_timeout=5)
    try:
        streams = Streams(settings.namespace)
        for name in (streams.events, streams.ingest, streams.deadletter):
            with contextlib.suppress(Exception):  # absent already
                await nc.jsm().delete_stream(name)
        for bucket in (streams.secrets_bucket, streams.leases_bucket):
            with contextlib.suppress(Exception):
                await nc.jetstream().delete_key_value(bucket)
    finally:
        await nc.close()


async def drop_redis_keys(settings: Settings) -> None:
    """Remove the namespace's Redis keys (its views)."""
    if not settings.namespace:  # the default namespace's schema is `public`, its database `iot`
        raise ValueError("refusing to drop the default namespace")
    import redis.asyncio as aioredis

    client = aioredis.Redis.from_url(settings.redis_url)
    try:
        keys = [k async for k in client.scan_iter(match=f"{settings.namespace}:*", count=1000)]
        for start in range(0, len(keys), 500):
            await client.delete(*keys[start : start + 500])
    finally:
        await client.aclose()


async def sleep_until(deadline: float) -> None:
    loop = asyncio.get_running_loop()
    delay = deadline - loop.time()
    if delay > 0:
        await asyncio.sleep(delay)
