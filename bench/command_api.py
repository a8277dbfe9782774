"""`python -m bench commands`: the command API against the library's raw save, and relay lag.

One run: (1) saturation, closed loop at concurrency C through HTTP; (2) the library's `save`
of the same events from C threads in this process, on a second namespace that no relay tails,
then load+save (what the command handler does for a change); (3) half load, open loop at 50 %
of the rate (1) reached, with an ordered JetStream consumer timing every event from its `at`
to the stream. The runs share one `iot run commands` and one `iot run relay`; CPU use of every
party is read from /proc, since client and servers share the machine's cores.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import secrets
import shutil
import sys
import time
from collections.abc import Awaitable
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

from bench.loadclient import make_client
from bench.phases import PhaseResult, open_loop, raw_saves, saturate
from bench.processes import Component, Components, progress
from bench.registry import register
from bench.relaylag import LagProbe
from bench.report import Report
from bench.stats import percentile
from bench.system import (
    CpuMeter,
    CpuUse,
    cpu_between,
    create_namespace,
    drop_namespace,
    free_port,
    machine,
    settings_for,
    unique_namespace,
)
from infra.eventstore import EVENTS_TABLE
from infra.settings import Settings
from infra.streams import Streams

TARGET_RATIO = 0.80
TARGET_HALF_P99_MS = 50.0
TARGET_LAG_P99_MS = 100.0


def configure(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("commands")
    group.add_argument("--concurrency", type=int, default=32, help="workers and threads (32)")
    group.add_argument("--configures", type=int, default=4, help="changes per registration (4)")
    group.add_argument("--warmup", type=float, default=2.0, help="seconds not measured (2)")
    group.add_argument("--duration", type=float, default=10.0, help="saturation seconds (10)")
    group.add_argument("--raw-duration", type=float, default=8.0, help="raw save seconds (8)")
    group.add_argument(
        "--raw-load-duration",
        type=float,
        default=5.0,
        help="seconds of raw load+save, as the handler does (5; 0 skips it)",
    )
    group.add_argument("--half-duration", type=float, default=10.0, help="half-load seconds (10)")
    group.add_argument(
        "--client", choices=("raw", "httpx"), default="raw", help="load generator HTTP client"
    )
    group.add_argument(
        "--profile",
        type=Path,
        default=None,
        help="directory for py-spy profiles of the servers during the first saturation",
    )


@dataclass
class Context:
    args: argparse.Namespace
    token: str
    api: Settings
    raw: Settings
    commands: Component
    relay: Component
    store: Any  # infra.eventstore.DeviceStore of the raw namespace
    nc: Any  # nats.aio.client.Client
    db: psycopg.AsyncConnection[Any]
    meter: CpuMeter
    secret_hash: str


async def _measure_cpu(meter: CpuMeter, warmup: float, duration: float) -> CpuUse:
    """CPU use over [now + warmup, now + warmup + duration]."""
    await asyncio.sleep(warmup)
    start = meter.sample()
    await asyncio.sleep(duration)
    return cpu_between(start, meter.sample())


async def _with_cpu(
    ctx: Context, work: Awaitable[Any], warmup: float, duration: float
) -> tuple[Any, CpuUse]:
    cpu = asyncio.create_task(_measure_cpu(ctx.meter, warmup, duration))
    result = await work
    return result, await cpu


def _cpu_rows(
    report: Report, run: int, phase: str, use: CpuUse, groups: dict[str, str] | None = None
) -> None:
    """CPU use by group (all, or those in `groups` under their labels), other, whole machine."""
    labels = groups or {g: g for g in use.groups}
    for group, label in labels.items():
        report.add(run, f"{phase} cpu {label}", "% core", use.groups[group], 0)
    if groups is None:
        report.add(run, f"{phase} cpu other processes", "% core", use.other, 0)
    report.add(run, f"{phase} cpu machine", "% core", use.total, 0)


def _per_op(use: CpuUse, group: str, count: int) -> float:
    """CPU milliseconds of `group` per operation."""
    return 1000 * use.groups[group] / 100 * use.wall / count if count else math.nan


def _phase_rows(report: Report, run: int, phase: str, unit: str, result: PhaseResult) -> None:
    report.add(run, f"{phase} rate", unit, result.rate)
    report.add(run, f"{phase} p50", "ms", result.ms(50), 2)
    report.add(run, f"{phase} p99", "ms", result.ms(99), 2)
    report.add(run, f"{phase} errors", "count", result.error_count, 0)
    for error, count in result.errors.most_common(3):
        report.note(f"  run {run + 1} {phase}: {count} x {error}")


async def _relay_position(ctx: Context) -> tuple[int, int]:
    """(events in the API namespace's store, messages in its events stream)."""
    table = sql.Identifier(ctx.api.pg_schema, EVENTS_TABLE)
    cur = await ctx.db.execute(sql.SQL("SELECT count(*) FROM {}").format(table))
    row = await cur.fetchone()
    info = await ctx.nc.jsm().stream_info(Streams(ctx.api.namespace).events)
    return (int(row[0]) if row else 0), int(info.state.messages)


async def _wait_relay(ctx: Context, within: float = 60.0) -> float:
    """Seconds until the relay has published every stored event."""
    start = time.monotonic()
    while time.monotonic() - start < within:
        stored, published = await _relay_position(ctx)
        if published >= stored:
            return time.monotonic() - start
        await asyncio.sleep(0.02)
    return math.nan


async def _profile(ctx: Context, run: int, seconds: float) -> list[asyncio.subprocess.Process]:
    if ctx.args.profile is None or run != 0:
        return []
    beside = Path(sys.executable).parent / "py-spy"
    spy = str(beside) if beside.exists() else shutil.which("py-spy")
    if spy is None:
        progress("py-spy not found (pip install py-spy): not profiling")
        return []
    ctx.args.profile.mkdir(parents=True, exist_ok=True)
    progress(f"profiling the servers into {ctx.args.profile}/ (run 1 figures are perturbed)")
    spies = []
    for component in (ctx.commands, ctx.relay):
        out = ctx.args.profile / f"{component.name}.txt"
        spies.append(
            await asyncio.create_subprocess_exec(
                spy,
                "record",
                "--pid",
                str(component.pid),
                "--duration",
                str(int(seconds)),
                "--rate",
                "100",
                "--nonblocking",
                "--format",
                "raw",
                "-o",
                str(out),
                stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.DEVNULL,
            )
        )
    return spies


async def _raw_phases(
    ctx: Context, tag: str, run: int
) -> tuple[PhaseResult, CpuUse, PhaseResult | None]:
    """The library's save alone; then load+save (as the command handler does), if asked."""
    args = ctx.args
    progress(f"run {run + 1}: raw save, {args.concurrency} threads, {args.raw_duration:.0f} s")
    raw, raw_cpu = await _with_cpu(
        ctx,
        asyncio.to_thread(
            raw_saves,
            ctx.store.save_device,
            None,
            threads=args.concurrency,
            configures=args.configures,
            warmup=1.0,
            duration=args.raw_duration,
            tag=f"{tag}r",
            secret_hash=ctx.secret_hash,
        ),
        1.0,
        args.raw_duration,
    )
    if args.raw_load_duration <= 0:
        return raw, raw_cpu, None
    progress(f"run {run + 1}: raw load+save, {args.raw_load_duration:.0f} s")
    loaded: PhaseResult = await asyncio.to_thread(
        raw_saves,
        ctx.store.save_device,
        ctx.store.get,
        threads=args.concurrency,
        configures=args.configures,
        warmup=1.0,
        duration=args.raw_load_duration,
        tag=f"{tag}l",
        secret_hash=ctx.secret_hash,
    )
    return raw, raw_cpu, loaded


async def _one_run(ctx: Context, report: Report, run: int) -> None:
    args = ctx.args
    tag = f"r{run}{secrets.token_hex(2)}"

    progress(f"run {run + 1}: saturation, {args.concurrency} workers, {args.duration:.0f} s")
    client = make_client(args.client, "127.0.0.1", ctx.commands.port, ctx.token, args.concurrency)
    spies = await _profile(ctx, run, args.warmup + args.duration)
    try:
        sat, sat_cpu = await _with_cpu(
            ctx,
            saturate(
                client,
                workers=args.concurrency,
                configures=args.configures,
                warmup=args.warmup,
                duration=args.duration,
                tag=f"{tag}s",
            ),
            args.warmup,
            args.duration,
        )
    finally:
        await client.close()
    for spy in spies:
        await spy.wait()
    catch_up = await _wait_relay(ctx)
    report.section = f"saturation: closed loop, {args.concurrency} HTTP clients"
    _phase_rows(report, run, "api saturation", "cmd/s", sat)
    _cpu_rows(report, run, "api saturation", sat_cpu)
    count = len(sat.latencies)
    for group in ("client", "commands", "relay", "postgres"):
        report.add(run, f"api saturation cpu/cmd {group}", "ms", _per_op(sat_cpu, group, count), 2)
    report.add(run, "relay catch-up after saturation", "s", catch_up, 2)

    raw, raw_cpu, loaded = await _raw_phases(ctx, tag, run)
    report.section = f"library save alone, {args.concurrency} threads in this process"
    _phase_rows(report, run, "raw save", "save/s", raw)
    _cpu_rows(report, run, "raw save", raw_cpu, {"client": "library", "postgres": "postgres"})
    per_save = _per_op(raw_cpu, "client", len(raw.latencies))
    report.add(run, "raw save cpu/save library", "ms", per_save, 2)
    report.add(run, "ratio api / raw save", "x", sat.rate / raw.rate if raw.rate else math.nan, 2)
    if loaded is not None:
        _phase_rows(report, run, "raw load+save", "cmd/s", loaded)
        ratio = sat.rate / loaded.rate if loaded.rate else math.nan
        report.add(run, "ratio api / raw load+save", "x", ratio, 2)

    rate = sat.rate / 2
    progress(f"run {run + 1}: half load, open loop at {rate:.0f} cmd/s, {args.half_duration:.0f} s")
    await _wait_relay(ctx)
    probe = LagProbe(prefix=f"{tag}h-")
    await probe.start(ctx.nc, Streams(ctx.api.namespace))
    client = make_client(
        args.client, "127.0.0.1", ctx.commands.port, ctx.token, 2 * args.concurrency
    )
    try:
        half, half_cpu = await _with_cpu(
            ctx,
            open_loop(
                client,
                rate=rate,
                configures=args.configures,
                duration=args.half_duration,
                tag=f"{tag}h",
            ),
            0.05,
            args.half_duration,
        )
    finally:
        await client.close()
    await probe.wait_for(half.expected, within=15.0)
    await probe.stop()
    report.section = "half load: open loop at 50 % of the saturation rate"
    report.add(run, "half load offered", "cmd/s", half.offered)
    _phase_rows(report, run, "half load", "cmd/s", half.result)
    _cpu_rows(report, run, "half load", half_cpu, {"commands": "commands", "relay": "relay"})
    report.section = "relay lag during half load: event `at` -> JetStream"
    stored = [probe.stored[k] for k in half.expected if k in probe.stored]
    received = [probe.received[k] for k in half.expected if k in probe.received]
    for q, label in ((50, "p50"), (99, "p99"), (100, "max")):
        report.add(run, f"relay lag to stream {label}", "ms", 1000 * percentile(stored, q), 1)
    report.add(run, "relay lag to subscriber p99", "ms", 1000 * percentile(received, 99), 1)
    report.add(run, "relay events expected", "count", len(half.expected), 0)
    report.add(run, "relay events missing", "count", len(half.expected - probe.received.keys()), 0)
    report.add(run, "relay events duplicated", "count", probe.duplicates, 0)


def _verdicts(report: Report) -> None:
    ratio = report.median("ratio api / raw save")
    half_p99 = report.median("half load p99")
    lag_p99 = report.median("relay lag to stream p99")

    def verdict(ok: bool) -> str:
        return "met" if ok else "NOT met"

    report.note("targets (medians):")
    report.note(
        f"  api rate >= {TARGET_RATIO:.0%} of raw save: {ratio:.2f} x"
        f" -> {verdict(ratio >= TARGET_RATIO)}"
    )
    report.note(
        f"  p99 at half load < {TARGET_HALF_P99_MS:.0f} ms: {half_p99:.1f} ms"
        f" -> {verdict(half_p99 < TARGET_HALF_P99_MS)}"
    )
    report.note(
        f"  relay lag p99 < {TARGET_LAG_P99_MS:.0f} ms: {lag_p99:.1f} ms"
        f" -> {verdict(lag_p99 < TARGET_LAG_P99_MS)}"
    )


async def _run(args: argparse.Namespace) -> Report:
    import nats

    from domain.credentials import hash_secret
    from infra.eventstore import open_store

    report = Report("commands: HTTP registrations + config changes vs the library's save")
    report.note(f"machine: {machine()}")
    report.note(
        f"load: {args.concurrency} workers, 1 register + {args.configures} configure per device,"
        f" client {args.client}; cpu in % of one core"
    )
    token = "bench-operator-" + secrets.token_hex(12)
    tokens = {token: "operator"}
    api = settings_for(unique_namespace("bench"), tokens)
    raw = settings_for(unique_namespace("benchraw"), tokens)
    progress(f"namespaces {api.namespace} (API) and {raw.namespace} (raw save)")
    try:
        await create_namespace(api)
        await create_namespace(raw)
        env = {
            "IOT_NAMESPACE": api.namespace,
            "IOT_API_TOKENS": f"{token}=operator",
            "IOT_LOG_LEVEL": "WARNING",
        }
        commands = Component("commands", env, free_port())
        relay = Component("relay", env, free_port())
        with Components(commands, relay):
            await asyncio.gather(commands.wait_ready(), relay.wait_ready())
            report.note(
                f"servers: IOT_DB_POOL_SIZE={api.db_pool_size}, IOT_STORE_THREADS="
                f"{api.store_threads}; the relay runs throughout (it only wakes for its own"
                " namespace's commits)"
            )
            store = await asyncio.to_thread(open_store, raw)
            nc = await nats.connect(api.nats_url, connect_timeout=5)
            pg = api.postgres
            db = await psycopg.AsyncConnection.connect(
                **pg.connect_kwargs(),
                autocommit=True,
            )
            meter = CpuMeter(
                {"client": os.getpid(), "commands": commands.pid, "relay": relay.pid},
                {"postgres": "postgres", "nats-server": "nats-server"},
            )
            ctx = Context(
                args,
                token,
                api,
                raw,
                commands,
                relay,
                store,
                nc,
                db,
                meter,
                hash_secret("bench-secret", b"0123456789abcdef"),
            )
            try:
                for run in range(args.repeats):
                    await _one_run(ctx, report, run)
            finally:
                await db.close()
                await nc.close()
                store.close()
    finally:
        progress("dropping the namespaces")
        for settings in (api, raw):
            with suppress(Exception):
                await drop_namespace(settings)
    _verdicts(report)
    return report


@register(
    "commands",
    "command API throughput and latency vs the library's save; relay lag",
    configure,
)
def run(args: argparse.Namespace) -> Report:
    return asyncio.run(_run(args))
