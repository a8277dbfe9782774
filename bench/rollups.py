"""`python -m bench rollups`: the timeseries projection with rollups, and queries answered by them.

Each run, on fresh namespaces (JetStream streams and an InfluxDB database of their own, dropped
at the end):

1. Throughput: `--rollups-readings` readings in messages of `--rollups-per-message` (the
   batched ingest's shape: each device's readings 1 ms apart, `--rollups-devices` devices) are
   published into INGEST first; then the projection runs in this process as `iot run projector
   timeseries` runs it (its fetch loops on the raw consumer, batches of 500 messages; with
   rollups, the rollup consumer following it) until every message is acknowledged by each
   consumer: readings/s, once without rollups and once with them. The rollups are checked
   afterwards: the 1-minute and 1-hour counts add up to the readings.
2. Query latency: one device with a reading every `--rollups-every-s` seconds for the last 30
   days (written straight into InfluxDB, its rollups rebuilt); then the gateway's telemetry
   query (30 days at `every=1h`, `agg=mean`) answered from the 1-hour rollups and from the raw
   points, `--rollups-queries` times each: p50 and p99.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import time
from typing import Any

import httpx
import nats

from bench.ingest import drop_everything
from bench.registry import register
from bench.report import Report
from bench.stats import percentile
from bench.system import create_namespace, machine, settings_for, unique_namespace
from domain.ingest import Reading, Telemetry, encode_ingest
from gateway.aggregates import telemetry_series
from gateway.influx import InfluxQL
from gateway.telemetry import TelemetryQuery
from infra.rollups import HOUR, MINUTE
from infra.settings import Settings
from infra.streams import Streams
from projections import timeseries
from projections.influx import InfluxClient
from projections.rollups import Rollups
from projections.timeseries import JetStreamDeadLetters, PointWriter, TimeseriesProjection

TARGET = 60_000.0
DAY_MS = 86_400_000


def configure(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("rollups")
    g.add_argument("--rollups-readings", type=int, default=600_000, help="readings (600000)")
    g.add_argument("--rollups-per-message", type=int, default=50, help="per message (50)")
    g.add_argument("--rollups-devices", type=int, default=50, help="devices (50)")
    g.add_argument(
        "--rollups-every-s", type=int, default=10, help="query data: s between readings (10)"
    )
    g.add_argument("--rollups-queries", type=int, default=50, help="queries per source (50)")


def _settings() -> Settings:
    namespace = unique_namespace("br")
    return dataclasses.replace(settings_for(namespace, {}), influx_db=namespace)


async def _publish(settings: Settings, args: argparse.Namespace) -> int:
    """The backlog: per device, messages of consecutive readings 1 ms apart."""
    streams = Streams(settings.namespace)
    nc = await nats.connect(settings.nats_url)
    js = nc.jetstream()
    per = args.rollups_per_message
    devices = [f"dev-{d:04d}" for d in range(args.rollups_devices)]
    messages = args.rollups_readings // per
    start = int(time.time() * 1000) - 20 * 60_000
    next_ts = dict.fromkeys(devices, start)
    pending: list[Any] = []
    for m in range(messages):
        device = devices[m % len(devices)]
        ts = next_ts[device]
        next_ts[device] = ts + per
        readings = [Reading(ts + k, {"temperature": 20.0 + (m + k) % 50 / 4}) for k in range(per)]
        body = encode_ingest(Telemetry(device_id=device, received_at=ts + per, readings=readings))
        pending.append(
            js.publish(streams.ingest_subject("telemetry", device), body, stream=streams.ingest)
        )
        if len(pending) >= 500:
            await asyncio.gather(*pending)
            pending.clear()
    await asyncio.gather(*pending)
    await nc.close()
    return int(messages * per)


async def _drain(settings: Settings, rollups: bool) -> float:
    """Run the projection until the backlog is acknowledged; seconds taken."""
    streams = Streams(settings.namespace)
    nc = await nats.connect(settings.nats_url)
    js = nc.jetstream()
    influx = InfluxClient(settings.influx_url, settings.influx_db)
    await influx.create_database()
    projection = TimeseriesProjection(PointWriter(influx), JetStreamDeadLetters(js, streams))
    stop = asyncio.Event()
    follower = None
    names = [timeseries.PROJECTION]
    if rollups:  # as `iot run projector timeseries` runs them: on their own consumer
        follower = timeseries.RollupFollower(
            js,
            timeseries.consumer_spec(streams),
            Rollups(influx, retention_1m="90d", retention_1h="1095d"),
            stop=stop,
        )
        names.append(timeseries.ROLLUP_PROJECTION)
    started = time.perf_counter()
    task = asyncio.create_task(
        timeseries.run_projection(js, streams, projection, stop, follower=follower)
    )
    try:
        for name in names:  # the raw points, then the rollups that follow them
            while True:
                await asyncio.sleep(0.05)
                try:
                    info = await js.consumer_info(streams.ingest, streams.consumer(name))
                except Exception:
                    continue
                if not info.num_pending and not info.num_ack_pending:
                    break
        return time.perf_counter() - started
    finally:
        stop.set()
        await task
        await influx.aclose()
        await nc.close()


async def _counts(settings: Settings) -> tuple[int, int]:
    async with InfluxClient(settings.influx_url, settings.influx_db) as influx:
        policy = await influx.default_policy()
        out = []
        for level in (MINUTE, HOUR):
            results = await influx.query(
                f'SELECT sum("count_temperature") FROM "{level.policy(policy)}".'
                f'"{level.measurement}"'
            )
            series = results[0].get("series") or [{"values": [[0, 0]]}]
            out.append(int(series[0]["values"][0][1] or 0))
        return out[0], out[1]


async def _throughput(args: argparse.Namespace, run: int, report: Report) -> None:
    for rollups in (False, True):
        settings = _settings()
        try:
            await create_namespace(settings)
            readings = await _publish(settings, args)
            took = await _drain(settings, rollups)
            name = "with rollups" if rollups else "without rollups (raw only)"
            report.add(run, f"projection {name}", "readings/s", readings / took, 0)
            if rollups:
                minute, hour = await _counts(settings)
                if (minute, hour) != (readings, readings):
                    report.note(
                        f"run {run + 1}: rollup counts {minute:,} (1m) / {hour:,} (1h) != "
                        f"{readings:,} readings"
                    )
        finally:
            await drop_everything(settings)


async def _latency(args: argparse.Namespace, run: int, report: Report) -> None:
    settings = _settings()
    try:
        async with InfluxClient(settings.influx_url, settings.influx_db) as influx:
            await influx.create_database()
            now = int(time.time() * 1000)
            end = now - now % HOUR.ms
            start = end - 30 * DAY_MS
            step = args.rollups_every_s * 1000
            lines = [
                f"telemetry,device_id=probe temperature={20 + (t // step) % 40 / 4} {t}\n"
                for t in range(start, end, step)
            ]
            for i in range(0, len(lines), 50_000):
                await influx.write("".join(lines[i : i + 50_000]).encode())
            rollups = Rollups(influx, retention_1m="90d", retention_1h="1095d")
            policy = await influx.default_policy()
            for day in range(start, end, DAY_MS):
                await rollups.rebuild(policy, day, day + DAY_MS)
        report.note(f"query data: {len(lines):,} readings of one device over 30 days")
        async with httpx.AsyncClient(timeout=60) as http:
            reader = InfluxQL(http, settings.influx_url, settings.influx_db)
            query = TelemetryQuery("probe", start, end, ("temperature",), HOUR.ms, "mean")
            answers = {}
            for source, allow in (("rollup_1h", True), ("raw", False)):
                samples = []
                for _ in range(args.rollups_queries):
                    began = time.perf_counter()
                    answer = await telemetry_series(reader, query, now, rollups=allow)
                    samples.append((time.perf_counter() - began) * 1000)
                    if answer.source != source:
                        raise RuntimeError(f"answered from {answer.source}, not {source}")
                answers[source] = answer.series
                report.add(run, f"30 days at 1h from {source}: p50", "ms", percentile(samples, 50))
                report.add(run, f"30 days at 1h from {source}: p99", "ms", percentile(samples, 99))
            rolled, raw = answers["rollup_1h"]["temperature"], answers["raw"]["temperature"]
            same = len(rolled) == len(raw) and all(
                a[0] == b[0] and abs(a[1] - b[1]) < 1e-9 for a, b in zip(rolled, raw, strict=True)
            )
            if not same:
                report.note(f"run {run + 1}: the rollup answer differs from the raw answer")
    finally:
        await drop_everything(settings)


async def _run(args: argparse.Namespace) -> Report:
    report = Report("rollups: the timeseries projection with rollups; queries from rollups")
    report.note(machine())
    for run in range(args.repeats):
        report.section = "projection, batched ingest backlog"
        await _throughput(args, run, report)
        report.section = "telemetry query"
        await _latency(args, run, report)
    rate = report.median("projection with rollups")
    verdict = "met" if rate >= TARGET else "NOT met"
    report.note(f"target: >= {TARGET:,.0f} readings/s with rollups: {verdict}")
    return report


@register(
    "rollups",
    "timeseries projection readings/s with rollups; 30-day telemetry query from rollups vs raw",
    configure,
)
def run(args: argparse.Namespace) -> Report:
    return asyncio.run(_run(args))
