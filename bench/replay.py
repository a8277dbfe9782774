"""`python -m bench replay`: how fast `iot replay` rebuilds the projections, against live ingest.

The target: replaying 1,000,000 readings and 100,000 domain events runs at least 3x
the live end-to-end ingest rate measured in the same run, so a rebuilt projection catches up
quickly. One system for all runs, on a fresh namespace (PostgreSQL schema, JetStream streams,
InfluxDB database and Redis keys of its own, all dropped at the end): a private Mosquitto,
`iot run relay`, `projector views`, `projector timeseries` and `bridge` as processes.

1. Domain events: devices saved straight into the event store (`DeviceStore.save`, many per
   transaction: registration, configurations, a suspension and a resumption each); the relay
   publishes them to EVENTS and the views projector applies them.
2. Readings straight into JetStream (`publish_async`), as the bridge would store them, in
   messages of `--replay-per-message` readings; as many as make INGEST hold `--replay-readings`
   with the live bursts; the live projectors consume them (their catch-up rate is reported).
3. Live ingest, each run: a burst of telemetry messages of the same shape, one
   `mosquitto_pub -q 1 -l` per device reading a prepared file, through the bridge into INGEST
   and both projections; the end-to-end rate is readings / (first publish -> every reading
   counted in InfluxDB and every device's view showing its last value).
4. Each run: `python -m iot.cli replay timeseries --quiet`, then `... views --quiet`, as
   processes, timed from start to exit (interpreter start, building, the switch grace, the
   removal of the old namespace: what an operator waits for); the rebuilt content is checked.
   Rates are against the live burst of the same run, in readings/s for the time series and in
   messages/s for the views (domain events + device messages read per second against device
   messages ingested per second).

`--replay-profile DIR` adds one replay of each under `py-spy record` (raw collapsed stacks in
DIR, not counted in the figures).
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import re
import resource
import secrets
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench.ingest import drop_everything
from bench.ingest_load import Load, run_publishers
from bench.ingest_probe import (
    MEASUREMENT,
    CpuSpan,
    GroupMeter,
    Visibility,
    cpu_span,
    listening_pid,
    pids_named,
    wait_visible,
)
from bench.processes import Component, Components, progress
from bench.registry import register
from bench.report import Report
from bench.system import free_port, machine, unique_namespace
from infra.settings import Settings
from infra.settings import load as load_settings
from infra.streams import Streams
from infra.views import ViewKeys, current_key
from iot.broker import PrivateBroker

TARGET_RATIO = 3.0
CONFIGURATIONS = 7  # a device's events: registration, 7 configurations, suspend, resume
EVENTS_PER_DEVICE = CONFIGURATIONS + 3
DEVICES_PER_SAVE = 500  # devices saved in one event-store transaction
PUBLISH_WINDOW = 2_000  # JetStream publishes awaited together
SETTLE_S = 600.0  # longest wait for the live components to take in a load
# CPU shown per phase: who works in it (the live components idle while a replay runs).
LIVE_GROUPS = (
    "publishers",
    "mosquitto",
    "bridge",
    "nats-server",
    "timeseries",
    "views",
    "influxd",
    "redis",
)
REPLAY_GROUPS = ("replay", "nats-server", "influxd", "redis", "timeseries", "views")
# `iot replay` prints these (iot.replay.replay, projections/*_replay.py Report lines).
TOOK = re.compile(r"replay done in ([\d.]+) s")
CAUGHT_UP = re.compile(r"caught up after ([\d,]+) messages in ([\d.]+) s")
VIEWS_BUILT = re.compile(r"([\d,]+) domain events and ([\d,]+) device messages in ([\d.]+) s")


def configure(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("replay")
    g.add_argument(
        "--replay-readings",
        type=int,
        default=1_000_000,
        help="readings in INGEST when replaying: the live bursts' plus the rest published"
        " straight into JetStream (1000000)",
    )
    g.add_argument(
        "--replay-events", type=int, default=100_000, help="domain events in the store (100000)"
    )
    g.add_argument(
        "--replay-per-message",
        type=int,
        default=10,
        help="readings per telemetry message, live and bulk alike (10)",
    )
    g.add_argument(
        "--replay-devices",
        type=int,
        default=50,
        help="devices sending telemetry = MQTT publishers (50)",
    )
    g.add_argument(
        "--replay-burst", type=int, default=20_000, help="messages of a live burst (20000)"
    )
    g.add_argument(
        "--replay-profile",
        type=Path,
        default=None,
        help="directory for py-spy profiles (raw) of one more replay of each projection",
    )


@dataclass
class Context:
    args: argparse.Namespace
    settings: Settings
    env: dict[str, str]
    broker: PrivateBroker
    nc: Any
    vis: Visibility
    meter: GroupMeter
    devices: list[str]  # those sending telemetry
    tag: str
    loads: list[Load]  # every telemetry load so far (their last values must stay visible)

    @property
    def streams(self) -> Streams:
        return Streams(self.settings.namespace)


@dataclass(frozen=True)
class Replayed:
    wall: float  # process start -> exit
    cpu: CpuSpan
    stdout: str


# --- domain events --------------------------------------------------------------------------


def event_plan(events: int) -> list[int]:
    """Events per device: full devices of EVENTS_PER_DEVICE, then one with the remainder."""
    plan = [EVENTS_PER_DEVICE] * (events // EVENTS_PER_DEVICE)
    if events % EVENTS_PER_DEVICE:
        plan.append(events % EVENTS_PER_DEVICE)
    return plan


def save_devices(settings: Settings, devices: Sequence[str], plan: Sequence[int]) -> int:
    """Save each device with its planned number of events, many devices per transaction;
    return the event store's last position."""
    from domain.device import Device
    from infra.eventstore import open_store

    store = open_store(settings)
    try:
        for start in range(0, len(devices), DEVICES_PER_SAVE):
            batch = []
            for device_id, events in zip(
                devices[start : start + DEVICES_PER_SAVE],
                plan[start : start + DEVICES_PER_SAVE],
                strict=True,
            ):
                at = datetime.now(UTC)
                device = Device.register(
                    device_id, f"bench {device_id}", "sensor", {"site": "bench"}, "bench", at
                )
                lifecycle = events == EVENTS_PER_DEVICE
                for step in range(events - 1 - (2 if lifecycle else 0)):
                    device.configure({"interval_s": 10 + step}, at)
                if lifecycle:
                    device.suspend("bench", at)
                    device.resume(at)
                batch.append(device)
            store.save(*batch)
        return store.max_position()
    finally:
        store.close()


async def stream_messages(nc: Any, stream: str) -> int:
    info = await nc.jsm().stream_info(stream)
    return int(info.state.messages)


async def wait_stream(nc: Any, stream: str, messages: int, within: float = SETTLE_S) -> float:
    """Wait until `stream` holds `messages`; return when (monotonic)."""
    deadline = time.monotonic() + within
    while (held := await stream_messages(nc, stream)) < messages:
        if time.monotonic() > deadline:
            raise RuntimeError(f"{stream} holds {held} of {messages} messages after {within} s")
        await asyncio.sleep(0.1)
    return time.monotonic()


async def wait_consumers_idle(nc: Any, streams: Streams, within: float = SETTLE_S) -> float:
    """Wait until every consumer of EVENTS and INGEST has nothing pending or unacknowledged."""
    deadline = time.monotonic() + within
    while True:
        left = 0
        for stream in (streams.events, streams.ingest):
            for consumer in await nc.jsm().consumers_info(stream):
                left += int(consumer.num_pending or 0) + int(consumer.num_ack_pending or 0)
        if not left:
            return time.monotonic()
        if time.monotonic() > deadline:
            raise RuntimeError(f"consumers still have {left} messages to take after {within} s")
        await asyncio.sleep(0.2)


# --- telemetry ------------------------------------------------------------------------------


def _json_readings(metric: str, ts: int, first: int, per_message: int) -> bytes:
    """One MQTT telemetry payload: `per_message` readings, device time `ts`, `ts + 1`, ..."""
    name = metric.encode()
    items = b",".join(
        b'{"ts":%d,"values":{"%s":%d}}' % (ts + k, name, first + k) for k in range(per_message)
    )
    return b"[" + items + b"]\n"


def split(total: int, parts: int) -> list[int]:
    """`total` spread over `parts` as evenly as integers allow."""
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


async def publish_bulk(
    ctx: Context, metric: str, messages: int, per_message: int, base_ts: int
) -> Load:
    """Telemetry straight into INGEST as the bridge would store it, round robin over the
    devices; each device's readings have increasing device time and values 0, 1, 2, ..."""
    from domain.ingest import Reading, Telemetry, encode_ingest

    devices = ctx.devices
    load = Load(metric, devices, per_message, [0] * len(devices), messages=messages)
    subjects = [ctx.streams.ingest_subject("telemetry", d) for d in devices]
    js = ctx.nc.jetstream()
    pending: list[Any] = []
    load.started = time.monotonic()
    for i in range(messages):
        d = i % len(devices)
        first = load.counts[d]
        ts = base_ts + first
        readings = [Reading(ts + k, {metric: first + k}) for k in range(per_message)]
        message = Telemetry(
            device_id=devices[d], received_at=ts + per_message - 1, readings=readings
        )
        pending.append(await js.publish_async(subjects[d], encode_ingest(message)))
        load.counts[d] = first + per_message
        if len(pending) >= PUBLISH_WINDOW:
            await asyncio.gather(*pending)
            pending = []
    await asyncio.gather(*pending)
    load.ended = time.monotonic()
    return load


def _burst_files(
    directory: Path, metric: str, per_message: int, messages: Sequence[int], base_ts: int
) -> list[Path]:
    files = []
    for d, count in enumerate(messages):
        path = directory / f"burst-{d}.txt"
        path.write_bytes(
            b"".join(
                _json_readings(metric, base_ts + i * per_message, i * per_message, per_message)
                for i in range(count)
            )
        )
        files.append(path)
    return files


async def mqtt_burst(ctx: Context, metric: str, messages: int, per_message: int) -> Load:
    """`messages` telemetry messages over MQTT, each device's from its own `mosquitto_pub -l`
    reading a prepared file, all at once (`ended`: when the last publisher exited)."""
    devices = ctx.devices
    per_device = split(messages, len(devices))
    load = Load(
        metric, devices, per_message, [m * per_message for m in per_device], messages=messages
    )
    base_ts = int(time.time() * 1000)
    with tempfile.TemporaryDirectory(prefix="bench-replay-burst-") as tmp:
        files = await asyncio.to_thread(
            _burst_files, Path(tmp), metric, per_message, per_device, base_ts
        )
        load.started, load.ended, _ = await run_publishers(
            ctx.broker.port, devices, files, f"{ctx.tag}-{metric}"
        )
    return load


async def influx_points(vis: Visibility) -> int:
    """Points of every field in the default retention policy (what readers see)."""
    results = await vis.influx.query(f'SELECT count(*) FROM "{MEASUREMENT}"')
    total = 0
    for result in results:
        for series in result.get("series", []):
            total += sum(int(v) for v in series["values"][0][1:] if v is not None)
    return total


async def views_matching(ctx: Context) -> tuple[int, int]:
    """(devices whose view shows every load's last value, devices) in the generation readers
    use now."""
    raw = await ctx.vis.redis.get(current_key(ctx.settings.namespace))
    current = Visibility(ctx.vis.redis, ctx.vis.influx, ctx.settings.namespace)
    if raw:
        generation = raw.decode() if isinstance(raw, bytes) else str(raw)
        current.keys = ViewKeys.for_namespace(ctx.settings.namespace, generation)
    good = set(ctx.devices)
    for phase in ctx.loads:
        expected = phase.last_values()
        values = await current.redis_last(phase.metric, list(expected))
        good -= {d for d, v in zip(expected, values, strict=True) if v != expected[d]}
    return len(good), len(ctx.devices)


# --- phases ---------------------------------------------------------------------------------


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _with_exited(span: CpuSpan, group: str, seconds: float) -> CpuSpan:
    """`span` with the CPU of children that exited during it (publishers, a replay) as
    `group`."""
    percent = dict(span.percent)
    percent[group] = percent.get(group, 0.0) + 100 * seconds / span.wall
    return CpuSpan(span.wall, percent, span.machine)


def _cpu_rows(report: Report, run: int, phase: str, span: CpuSpan, groups: Sequence[str]) -> None:
    for group in groups:
        report.add(run, f"{phase} cpu {group}", "% core", span.percent.get(group, math.nan), 0)
    report.add(run, f"{phase} cpu machine", "% core", span.machine, 0)
    ours = sum(span.percent.values())
    report.add(run, f"{phase} cpu rest of the machine", "% core", max(0.0, span.machine - ours), 0)


async def setup_phase(ctx: Context, report: Report) -> None:
    """Domain events into the store; wait until the relay published them and the views
    projector applied them."""
    args = ctx.args
    plan = event_plan(args.replay_events)
    if len(plan) < len(ctx.devices):
        raise SystemExit(
            f"bench replay: {args.replay_events} events make {len(plan)} devices, fewer than"
            f" the {len(ctx.devices)} sending telemetry"
        )
    all_devices = ctx.devices + [f"{ctx.tag}e{i:06d}" for i in range(len(plan) - len(ctx.devices))]
    progress(f"saving {args.replay_events:,} domain events of {len(plan):,} devices")
    started = time.monotonic()
    last = await asyncio.to_thread(save_devices, ctx.settings, all_devices, plan)
    saved = time.monotonic()
    in_stream = await wait_stream(ctx.nc, ctx.streams.events, last)
    applied = await wait_consumers_idle(ctx.nc, ctx.streams)
    report.section = "setup (once)"
    report.add(0, "domain events in the store", "count", last, 0)
    report.add(0, "store: events saved", "events/s", last / (saved - started), 0)
    report.add(0, "relay: all in EVENTS after", "s", in_stream - started, 1)
    report.add(0, "views projector: all applied after", "s", applied - started, 1)
    progress(
        f"{last:,} events saved in {saved - started:.1f} s, applied after {applied - started:.1f} s"
    )


async def bulk_phase(ctx: Context, report: Report, bulk_messages: int) -> None:
    args = ctx.args
    per_message = args.replay_per_message
    metric = f"{ctx.tag}bulk"
    progress(
        f"publishing {bulk_messages:,} messages of {per_message} readings straight into INGEST"
    )
    base_ts = int(time.time() * 1000) - 3_600_000
    load = await publish_bulk(ctx, metric, bulk_messages, per_message, base_ts)
    done = await wait_visible(ctx.vis, load, within=SETTLE_S, interval=0.5)
    if done.visible_at is None:
        raise RuntimeError(
            f"bulk: {done.in_influx}/{done.readings} points, {done.views_matching}/{done.devices}"
            f" views after {SETTLE_S} s"
        )
    ctx.loads.append(load)
    await wait_consumers_idle(ctx.nc, ctx.streams)
    report.add(0, "bulk: messages straight into INGEST", "count", load.messages, 0)
    report.add(0, "bulk: readings", "count", load.readings, 0)
    report.add(0, "bulk: published", "msg/s", load.messages / (load.ended - load.started), 0)
    took = done.visible_at - load.started
    report.add(0, "bulk: live projectors, first publish -> all visible", "s", took, 1)
    report.add(0, "bulk: live projectors from JetStream", "readings/s", load.readings / took, 0)


async def live_phase(ctx: Context, report: Report, run: int) -> None:
    args = ctx.args
    per_message = args.replay_per_message
    metric = f"{ctx.tag}live{run}"
    progress(f"run {run + 1}: live burst of {args.replay_burst:,} messages over MQTT")
    exited = _children_cpu()
    before = ctx.meter.snapshot()
    load = await mqtt_burst(ctx, metric, args.replay_burst, per_message)
    done = await wait_visible(ctx.vis, load, within=SETTLE_S)
    span = _with_exited(
        cpu_span(before, ctx.meter.snapshot()), "publishers", _children_cpu() - exited
    )
    ctx.loads.append(load)
    await wait_consumers_idle(ctx.nc, ctx.streams)
    visible = done.visible_at - load.started if done.visible_at is not None else math.nan
    if done.visible_at is None:
        report.note(
            f"!!! run {run + 1}: live burst incomplete after {SETTLE_S:.0f} s:"
            f" {done.in_influx}/{done.readings} points, {done.views_matching}/{done.devices} views"
        )
    report.section = (
        f"live: burst of {args.replay_burst:,} messages x {per_message} readings, MQTT -> bridge"
        " -> JetStream -> InfluxDB + views"
    )
    report.add(run, "live offered", "msg/s", load.offered / per_message, 0)
    report.add(run, "live all visible after", "s", visible, 2)
    report.add(run, "live end-to-end", "readings/s", load.readings / visible, 0)
    report.add(run, "live end-to-end messages", "msg/s", load.messages / visible, 0)
    report.add(run, "live completeness", "ratio", done.completeness, 3)
    _cpu_rows(report, run, "live", span, LIVE_GROUPS)
    progress(
        f"  all visible after {visible:.2f} s: {load.readings / visible:,.0f} readings/s,"
        f" completeness {done.completeness:.3f}"
    )


def _py_spy() -> str | None:
    beside = Path(sys.executable).parent / "py-spy"
    return str(beside) if beside.exists() else shutil.which("py-spy")


async def run_replay(ctx: Context, name: str, profile: Path | None = None) -> Replayed:
    """`python -m iot.cli replay NAME --quiet` as a process (under py-spy with `profile`)."""
    argv = [sys.executable, "-m", "iot.cli", "replay", name, "--quiet"]
    if profile is not None:
        spy = _py_spy()
        if spy is None:
            raise RuntimeError("py-spy not found (pip install py-spy)")
        out = profile / f"{name}.txt"
        argv = [spy, "record", "--rate", "100", "--nonblocking", "-f", "raw", "-o", str(out)]
        argv += ["--", sys.executable, "-m", "iot.cli", "replay", name, "--quiet"]
    exited = _children_cpu()
    before = ctx.meter.snapshot()
    proc = await asyncio.create_subprocess_exec(
        *argv,
        env={**os.environ, **ctx.env},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    stdout, stderr = await proc.communicate()
    after = ctx.meter.snapshot()
    wall = after.at - before.at
    if proc.returncode != 0:
        raise RuntimeError(
            f"iot replay {name} exited {proc.returncode}: {stdout.decode()} {stderr.decode()}"
        )
    span = _with_exited(cpu_span(before, after), "replay", _children_cpu() - exited)
    return Replayed(wall, span, stdout.decode())


def _number(pattern: re.Pattern[str], text: str, group: int) -> float:
    found = pattern.search(text)
    return float(found.group(group).replace(",", "")) if found else math.nan


async def replay_phase(
    ctx: Context, report: Report, run: int, readings: int, messages: int, events: int
) -> None:
    per_message = ctx.args.replay_per_message
    live_readings = report.rows["live end-to-end"].values[run]
    live_messages = live_readings / per_message

    progress(f"run {run + 1}: iot replay timeseries")
    ts = await run_replay(ctx, "timeseries")
    points = await influx_points(ctx.vis)
    report.section = f"replay timeseries: {readings:,} readings in {messages:,} messages"
    report.add(run, "timeseries wall (start -> exit)", "s", ts.wall, 2)
    report.add(run, "timeseries replay", "readings/s", readings / ts.wall, 0)
    report.add(run, "timeseries replay messages", "msg/s", messages / ts.wall, 0)
    report.add(
        run, "timeseries x live (readings/s)", "ratio", readings / ts.wall / live_readings, 2
    )
    caught = _number(CAUGHT_UP, ts.stdout, 2)
    caught_messages = _number(CAUGHT_UP, ts.stdout, 1)
    report.add(run, "timeseries catch-up phase (its report)", "s", caught, 2)
    report.add(
        run,
        "timeseries catch-up phase rate",
        "readings/s",
        caught_messages * per_message / caught,
        0,
    )
    report.add(
        run,
        "timeseries start-up (wall - its own time)",
        "s",
        ts.wall - _number(TOOK, ts.stdout, 1),
        2,
    )
    report.add(run, "timeseries points after (must = readings)", "count", points, 0)
    _cpu_rows(report, run, "timeseries", ts.cpu, REPLAY_GROUPS)
    if points != readings:
        report.note(f"!!! run {run + 1}: InfluxDB holds {points:,} points after the replay")
    progress(
        f"  {ts.wall:.2f} s, {readings / ts.wall:,.0f} readings/s"
        f" ({readings / ts.wall / live_readings:.2f}x live)"
    )

    progress(f"run {run + 1}: iot replay views")
    views = await run_replay(ctx, "views")
    good, devices = await views_matching(ctx)
    inputs = events + messages
    report.section = f"replay views: {events:,} domain events + {messages:,} device messages"
    report.add(run, "views wall (start -> exit)", "s", views.wall, 2)
    report.add(run, "views replay", "(events+msgs)/s", inputs / views.wall, 0)
    report.add(run, "views x live (msg/s)", "ratio", inputs / views.wall / live_messages, 2)
    report.add(
        run, "views readings x live (readings/s)", "ratio", readings / views.wall / live_readings, 2
    )
    report.add(
        run, "views build+switch (its report)", "s", _number(VIEWS_BUILT, views.stdout, 3), 2
    )
    report.add(
        run,
        "views start-up (wall - its own time)",
        "s",
        views.wall - _number(TOOK, views.stdout, 1),
        2,
    )
    report.add(run, "views up to date after (of devices)", "count", good, 0)
    _cpu_rows(report, run, "views", views.cpu, REPLAY_GROUPS)
    if good != devices:
        report.note(f"!!! run {run + 1}: {devices - good} device views lack a last value")
    progress(
        f"  {views.wall:.2f} s, {inputs / views.wall:,.0f} events+messages/s"
        f" ({inputs / views.wall / live_messages:.2f}x live msg/s)"
    )


async def profile_phase(ctx: Context, report: Report) -> None:
    out = ctx.args.replay_profile
    if out is None:
        return
    out.mkdir(parents=True, exist_ok=True)
    for name in ("timeseries", "views"):
        progress(f"profiling iot replay {name} into {out}/{name}.txt (not counted)")
        done = await run_replay(ctx, name, profile=out)
        report.note(
            f"profile: iot replay {name} under py-spy took {done.wall:.1f} s,"
            f" replay process {done.cpu.percent['replay']:.0f} % of a core: {out}/{name}.txt"
        )


def _spread(report: Report, metric: str) -> str:
    values = [v for v in report.rows[metric].values if not math.isnan(v)]
    if not values:
        return "-"
    mid = report.median(metric)
    return f"{min(values):,.0f}..{max(values):,.0f} ({(max(values) - min(values)) / mid:.0%})"


def verdicts(report: Report, per_message: int) -> None:
    def verdict(ok: bool) -> str:
        return "met" if ok else "MISSED"

    report.note("spread over runs (min..max, (max-min)/median):")
    for metric in ("live end-to-end", "timeseries replay", "views replay"):
        unit = report.rows[metric].unit
        report.note(f"  {metric} {unit}: {_spread(report, metric)}")
    ts = report.median("timeseries x live (readings/s)")
    views = report.median("views x live (msg/s)")
    live = report.median("live end-to-end")
    ts_of_medians = report.median("timeseries replay") / live
    views_of_medians = report.median("views replay") / (live / per_message)
    report.note(
        f"target: replay >= {TARGET_RATIO:g}x the live end-to-end rate; the verdict is on the "
        "lower of the median of per-run ratios and the ratio of the medians:"
    )
    ts_low = min(ts, ts_of_medians)
    views_low = min(views, views_of_medians)
    report.note(
        f"  timeseries, readings/s against live readings/s: {ts:.2f}x (ratio of medians "
        f"{ts_of_medians:.2f}x) -> {verdict(ts_low >= TARGET_RATIO)}"
    )
    report.note(
        f"  views, (domain events + device messages)/s against live messages/s: {views:.2f}x"
        f" (ratio of medians {views_of_medians:.2f}x) -> {verdict(views_low >= TARGET_RATIO)}"
    )


# --- the run --------------------------------------------------------------------------------


async def _run(args: argparse.Namespace) -> Report:
    per_message = args.replay_per_message
    live_readings = args.repeats * args.replay_burst * per_message
    bulk_readings = args.replay_readings - live_readings
    if bulk_readings < 0 or bulk_readings % per_message:
        raise SystemExit(
            f"bench replay: {args.replay_readings} readings cannot hold {args.repeats} bursts of"
            f" {args.replay_burst} messages x {per_message} plus whole messages"
        )
    report = Report("replay: `iot replay timeseries|views` against live end-to-end ingest")
    namespace = unique_namespace("brp")
    with tempfile.TemporaryDirectory(prefix="bench-replay-") as tmp:
        broker = PrivateBroker(Path(tmp) / "broker", free_port())
        env = {
            "IOT_NAMESPACE": namespace,
            "IOT_INFLUX_DB": namespace,
            "IOT_MQTT_URL": broker.url,
            "IOT_MQTT_CLIENT_ID": f"bench-bridge-{namespace}",
            "IOT_LOG_LEVEL": "WARNING",
        }
        settings = load_settings({**os.environ, **env})
        progress(f"namespace {namespace} (InfluxDB database {namespace}), broker {broker.url}")
        try:
            broker.start()
            await _with_system(args, report, settings, env, broker, bulk_readings // per_message)
        finally:
            broker.stop()
            progress("dropping the namespace (schema, streams, InfluxDB database, Redis keys)")
            await drop_everything(settings)
    return report


async def _with_system(
    args: argparse.Namespace,
    report: Report,
    settings: Settings,
    env: dict[str, str],
    broker: PrivateBroker,
    bulk_messages: int,
) -> None:
    import nats
    import redis.asyncio as aioredis

    from commands.migrate import migrate
    from projections.influx import InfluxClient

    per_message = args.replay_per_message
    report.note(f"machine: {machine()}")
    report.note(
        f"shape: {per_message} readings per telemetry message, live and bulk alike;"
        f" {args.replay_devices} devices send telemetry (one mosquitto_pub -q 1 -l each);"
        f" INGEST holds {args.replay_readings:,} readings when replaying"
        f" ({args.repeats} live bursts of {args.replay_burst:,} messages, the rest"
        " published straight into JetStream)"
    )
    report.note(
        "live end-to-end = readings / (first publish -> all counted in InfluxDB and every"
        " device's view showing its last value); replay = the inputs in the log / the"
        " `iot replay` process's wall time (interpreter start to exit, including the switch"
        " grace and the old namespace's removal); cpu in % of one core over that time, the"
        " replay process and the burst publishers from their rusage; nats-server, redis and"
        " influxd are shared with whatever else runs on the machine, and the rest of the"
        " machine (PostgreSQL, other tenants) is what the machine spent beyond the groups shown"
    )
    await migrate(settings)
    nc = await nats.connect(settings.nats_url, connect_timeout=5)
    redis = aioredis.Redis.from_url(settings.redis_url)
    influx = InfluxClient(settings.influx_url, settings.influx_db)
    tag = f"b{secrets.token_hex(2)}"
    devices = [f"{tag}t{i:03d}" for i in range(args.replay_devices)]
    early = {
        "relay": Component("relay", env, free_port()),
        "timeseries": Component("timeseries", env, free_port(), ["projector", "timeseries"]),
        "views": Component("views", env, free_port(), ["projector", "views"]),
    }
    # The bridge starts once the events are in EVENTS: its registry catches up before it is
    # ready, and its dispatcher publishes every device's desired state then, not mid-burst.
    bridge = Component("bridge", env, free_port())
    try:
        with Components(*early.values()):
            await asyncio.gather(*(c.wait_ready() for c in early.values()))
            ctx = Context(
                args,
                settings,
                env,
                broker,
                nc,
                Visibility(redis, influx, settings.namespace),
                _meter(settings, broker, early),
                devices,
                tag,
                [],
            )
            await setup_phase(ctx, report)
            with Components(bridge):
                await bridge.wait_ready(120.0)
                ctx.meter.set("bridge", [bridge.pid])
                await _measure(ctx, report, bulk_messages)
    finally:
        await nc.close()
        await redis.aclose()
        await influx.aclose()


def _meter(settings: Settings, broker: PrivateBroker, children: dict[str, Component]) -> GroupMeter:
    """CPU of the bench, our components, the private broker and the shared servers."""
    assert broker.proc is not None
    nats_port = int(settings.nats_url.rsplit(":", 1)[1].split("/")[0])
    nats_pid = listening_pid(nats_port)
    return GroupMeter(
        {
            "bench": [os.getpid()],
            **{name: [c.pid] for name, c in children.items()},
            "mosquitto": [broker.proc.pid],
            "nats-server": [nats_pid] if nats_pid else pids_named("nats-server"),
            "redis": pids_named("redis-server"),
            "influxd": pids_named("influxd"),
        }
    )


async def _measure(ctx: Context, report: Report, bulk_messages: int) -> None:
    args = ctx.args
    await bulk_phase(ctx, report, bulk_messages)
    for run in range(args.repeats):
        await live_phase(ctx, report, run)
    readings = await influx_points(ctx.vis)
    messages = await stream_messages(ctx.nc, ctx.streams.ingest)
    events = int(report.rows["domain events in the store"].values[0])
    if readings != args.replay_readings:
        report.note(f"!!! InfluxDB holds {readings:,} points before the replays")
    for run in range(args.repeats):
        await replay_phase(ctx, report, run, args.replay_readings, messages, events)
    await profile_phase(ctx, report)
    verdicts(report, args.replay_per_message)


@register(
    "replay",
    "iot replay timeseries|views: rebuild rate against the live end-to-end ingest rate",
    configure,
)
def run(args: argparse.Namespace) -> Report:
    return asyncio.run(_run(args))
