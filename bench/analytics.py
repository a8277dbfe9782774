"""`python -m bench analytics`: rules evaluated per second by `iot run analytics`, whether it keeps
up with the ingest's batched rate, and reading-to-alert-visible latency in the gateway.

One system for all runs, on a fresh namespace (PostgreSQL schema, JetStream streams, Redis keys,
an InfluxDB database of its own, all dropped at the end): `iot run relay`, `projector views`,
`gateway` and `analytics` (one replica, the default partitions) as processes. `--analytics-devices`
devices and five rules of every kind, scoped to every device, are saved straight into the event
store (the relay publishes them); telemetry is published straight into INGEST as the bridge
stores it (`encode_ingest`, a `Nats-Msg-Id` per message, pipelined `publish_async`) by a
publisher process of its own (`python -m bench.analytics`), so the load does not share the
event loop that times the gateway. Each reading has 3 to 5 metrics; values are mostly normal,
with breaches on a cycle of device time (each device has its own phase), so alerts are raised,
re-triggered and cleared all along. Each run:

1. capacity: analytics stopped, a backlog of `--analytics-backlog` readings in messages of
   `--analytics-per-message` is published as fast as JetStream takes it; once the views
   projector has taken it too, analytics is started; from its /readyz until its readings
   counter (polled every 20 ms) holds the whole backlog: readings/s and rule evaluations/s
   (its own counters over that window) and its CPU; then every partition's checkpoint must
   reach the stream's last sequence (checkpoints are written once a second, so they would
   quantise the window);
2. keeps up: `--analytics-rate` readings/s (the bridge's documented batched rate) in messages of
   `--analytics-load-per-message` for `--analytics-duration` s, `iot_analytics_lag_messages`
   sampled every 0.5 s; then the time until its counter holds every reading offered;
3. half load: half that rate; every `--analytics-probe-every` s a breaching reading (device
   time = now) for a threshold rule without `for_s` on one of `--analytics-probes` devices kept
   out of the load, the gateway polled every 20 ms until the alert is open in
   `GET /api/v1/devices/{id}`, then a normal reading and the same until it is gone;
4. the analytics process's VmRSS and VmHWM after each phase;
5. rule test: `POST /api/v1/rules/test` of the hot rule over everything stored so far (the
   backlogs and loads of this run and the runs before): messages and readings read per second.

`--analytics-profile DIR` records the analytics process under `py-spy` in run 1's capacity and
keep-up phases (raw collapsed stacks; those figures are perturbed).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import secrets
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

from bench.ingest import drop_everything
from bench.ingest_probe import GroupMeter, cpu_span, listening_pid, memory_kib, pids_named
from bench.processes import Component, Components, progress
from bench.registry import register
from bench.report import Report
from bench.stats import median, percentile
from bench.system import free_port, machine, unique_namespace
from domain.ingest import Value
from infra.settings import Settings
from infra.settings import load as load_settings
from infra.streams import Streams

TOKEN = "bench-analytics-viewer-0123456789"
OPERATOR_TOKEN = "bench-analytics-operator-0123456789"
BATCHED_RATE = 150_000.0  # docs/performance.md, ingestion: 50 readings per message, sustained
TARGET_P99_MS = 1000.0
METRICS = ("temperature", "humidity", "pressure", "battery", "rssi")
PROBE_RULE = "wet"
RULES: dict[str, dict[str, Any]] = {
    "hot": {  # threshold with clear and for_s
        "name": "Hot",
        "metric": "temperature",
        "severity": "critical",
        "condition": {"kind": "threshold", "op": ">", "value": 80, "clear": 75, "for_s": 5},
    },
    PROBE_RULE: {  # threshold without clear or for_s: raises at the first breaching reading
        "name": "Wet",
        "metric": "humidity",
        "severity": "warning",
        "condition": {"kind": "threshold", "op": ">", "value": 95},
    },
    "jump": {
        "name": "Pressure jump",
        "metric": "pressure",
        "severity": "warning",
        "condition": {"kind": "rate", "max_per_s": 50},
    },
    "battery-silent": {
        "name": "No battery reading",
        "metric": "battery",
        "severity": "info",
        "condition": {"kind": "absent", "for_s": 600},
    },
    "silent": {
        "name": "Device silent",
        "metric": "*",
        "severity": "critical",
        "condition": {"kind": "absent", "for_s": 600},
    },
}
DEVICES_PER_SAVE = 500
POLL_S = 0.02  # the gateway, for a probed device
LAG_EVERY_S = 0.5
SETTLE_S = 120.0
ROOT = Path(__file__).resolve().parent.parent  # the publisher runs `-m bench.analytics` here


def configure(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("analytics")
    g.add_argument("--analytics-devices", type=int, default=1000, help="devices (1000)")
    g.add_argument(
        "--analytics-backlog",
        type=int,
        default=300_000,
        help="readings of the capacity backlog (300000)",
    )
    g.add_argument(
        "--analytics-per-message",
        type=int,
        default=5,
        help="readings per message of the capacity backlog (5)",
    )
    g.add_argument(
        "--analytics-rate",
        type=float,
        default=BATCHED_RATE,
        help="readings/s offered while keeping up: the bridge's batched figure in"
        " docs/performance.md (150000)",
    )
    g.add_argument(
        "--analytics-load-per-message",
        type=int,
        default=50,
        help="readings per message of the offered loads, the batched figure's shape (50)",
    )
    g.add_argument(
        "--analytics-duration", type=float, default=20.0, help="seconds of the full load (20)"
    )
    g.add_argument(
        "--analytics-half-duration",
        type=float,
        default=52.0,
        help="seconds of the half load (52: 100 probes at 0.5 s)",
    )
    g.add_argument(
        "--analytics-probe-every", type=float, default=0.5, help="s between probes (0.5)"
    )
    g.add_argument(
        "--analytics-probes",
        type=int,
        default=10,
        help="devices kept out of the load for the latency probes (10)",
    )
    g.add_argument(
        "--analytics-max-drain",
        type=float,
        default=5.0,
        help="keeps up = all evaluated within this many s after the load stops (5)",
    )
    g.add_argument(
        "--analytics-profile",
        type=Path,
        default=None,
        help="directory for py-spy profiles of the analytics process (run 1)",
    )


# --- the publisher process ------------------------------------------------------------------


class Values:
    """Each device's metric values by device second: mostly normal, breaching on a cycle."""

    def __init__(self, widths: Sequence[int]) -> None:
        self.widths = list(widths)
        self._cache: list[tuple[int, dict[str, Value]]] = [(-1, {})] * len(widths)

    def at(self, d: int, ts: int) -> dict[str, Value]:
        sec = ts // 1000
        cached = self._cache[d]
        if cached[0] == sec:
            return cached[1]
        hot = (sec + d * 37) % 180  # 8 s over 80 every 3 min, a dip to 78 in it: re-trigger
        temperature = 78.0 if hot == 6 else 85.0 if hot < 8 else 60.0 + (sec + d) % 10
        wet = (sec + d * 53) % 300 < 2  # 2 s over 95 every 5 min
        jump = (sec + d * 71) % 240 < 3  # a 3 s step of 87 every 4 min: two jumps
        values: dict[str, Value] = {
            "temperature": temperature,
            "humidity": 97.0 if wet else 40.0 + sec % 20,
            "pressure": 1100.0 if jump else 1013.0,
        }
        if self.widths[d] > 3:
            values["battery"] = float(80 + d % 20)
        if self.widths[d] > 4:
            values["rssi"] = float(-60 - d % 30)
        self._cache[d] = (sec, values)
        return values


async def _publish(spec: dict[str, Any]) -> dict[str, Any]:
    """Publish telemetry as the spec says; paced at `rate` msg/s for `duration` s, or
    `messages` as fast as JetStream acknowledges them (rate 0)."""
    import nats

    from domain.ingest import Reading, Telemetry, encode_ingest

    devices: list[str] = spec["devices"]
    per_message: int = spec["per_message"]
    spacing: float = spec["spacing_ms"]
    rate: float = spec["rate"]
    base: int | None = spec["base_ms"]  # backlog: device time base + n * spacing
    streams = Streams(spec["namespace"])
    subjects = [streams.ingest_subject("telemetry", d) for d in devices]
    values = Values(spec["widths"])
    last = [int(spec["floor_ms"]) - 1] * len(devices)
    counts = [0] * len(devices)
    nc = await nats.connect(spec["nats_url"], connect_timeout=5)
    js = nc.jetstream(publish_async_max_pending=8000)
    pending: list[Any] = []
    top_seq = 0
    sent = readings = 0

    async def settle() -> None:
        nonlocal pending, top_seq
        acks = await asyncio.gather(*pending)
        pending = []
        if acks:
            top_seq = max([top_seq, *(int(a.seq) for a in acks)])

    async def one(i: int) -> None:
        d = i % len(devices)
        now_ms = int(time.time() * 1000)
        batch = []
        for k in range(per_message):
            if base is None:
                want = now_ms - int((per_message - 1 - k) * spacing)
            else:
                want = base + int((counts[d] + k) * spacing)
            ts = max(last[d] + 1, want)
            last[d] = ts
            batch.append(Reading(ts, values.at(d, ts)))
        counts[d] += per_message
        message = Telemetry(device_id=devices[d], received_at=max(now_ms, last[d]), readings=batch)
        pending.append(
            await js.publish_async(
                subjects[d],
                encode_ingest(message),
                headers={"Nats-Msg-Id": f"{devices[d]}:{batch[0].ts}"},
            )
        )

    started = time.monotonic()
    behind = 0.0
    try:
        if rate <= 0:
            for sent in range(1, int(spec["messages"]) + 1):
                await one(sent - 1)
                if len(pending) >= 2000:
                    await settle()
        else:
            end = started + float(spec["duration"])
            while (now := time.monotonic()) < end:
                due = int((now - started) * rate) + 1
                while sent < due:
                    await one(sent)
                    sent += 1
                behind = max(behind, time.monotonic() - now)
                if len(pending) >= 1000:
                    await settle()
                await asyncio.sleep(0.005)
        await settle()
    finally:
        ended = time.monotonic()
        await nc.close()
    readings = sent * per_message
    usage = os.times()
    return {
        "messages": sent,
        "readings": readings,
        "started": started,
        "ended": ended,
        "last_seq": top_seq,
        "max_ts": max(last),
        "cpu_s": usage.user + usage.system,
        "behind_s": behind,
    }


def _publisher_main() -> int:
    """`python -m bench.analytics`: one publish spec (JSON) on stdin, its result on stdout."""
    spec = json.loads(sys.stdin.read())
    print(json.dumps(asyncio.run(_publish(spec))), flush=True)
    return 0


@dataclass(frozen=True)
class Published:
    messages: int
    readings: int
    started: float  # monotonic (system-wide)
    ended: float
    last_seq: int
    max_ts: int
    cpu_s: float
    behind_s: float  # the longest a pacing tick took (the publisher's own slack)

    @property
    def rate(self) -> float:
        return self.readings / max(1e-9, self.ended - self.started)


class Publisher:
    """The publisher child process for one phase."""

    def __init__(self, spec: dict[str, Any]) -> None:
        self.spec = spec
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "bench.analytics",
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            cwd=ROOT,
        )
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(self.spec).encode())
        self.proc.stdin.close()

    async def result(self) -> Published:
        assert self.proc is not None
        assert self.proc.stdout is not None
        out = await self.proc.stdout.read()
        if await self.proc.wait() != 0:
            raise RuntimeError(f"the publisher exited {self.proc.returncode}")
        return Published(**json.loads(out))


# --- the system ------------------------------------------------------------------------------


@dataclass
class Context:
    args: argparse.Namespace
    settings: Settings
    env: dict[str, str]
    nc: Any
    db: Any  # psycopg.AsyncConnection
    http: httpx.AsyncClient
    gateway: Component
    meter: GroupMeter
    load_devices: list[str]
    widths: list[int]
    probes: list[str]
    analytics: Component | None = None
    floor_ms: int = 0  # every device time so far is below this
    spies: list[asyncio.subprocess.Process] = field(default_factory=list)

    @property
    def streams(self) -> Streams:
        return Streams(self.settings.namespace)

    def spec(self, per_message: int, rate: float, **extra: Any) -> dict[str, Any]:
        """A publish spec for the load devices; device times spaced as at the offered rate."""
        spacing = 1000 * len(self.load_devices) / self.args.analytics_rate
        return {
            "nats_url": self.settings.nats_url,
            "namespace": self.settings.namespace,
            "devices": self.load_devices,
            "widths": self.widths,
            "per_message": per_message,
            "spacing_ms": spacing,
            "rate": rate,
            "floor_ms": self.floor_ms,
            "base_ms": None,
            "messages": 0,
            "duration": 0.0,
            **extra,
        }

    def published(self, done: Published) -> None:
        self.floor_ms = max(self.floor_ms, done.max_ts + 1)


def save_devices(settings: Settings, devices: Sequence[str]) -> int:
    """Register the devices in the event store; its last position."""
    from domain.device import Device
    from infra.eventstore import open_store

    store = open_store(settings)
    try:
        at = datetime.now(UTC)
        for start in range(0, len(devices), DEVICES_PER_SAVE):
            batch = [
                Device.register(d, f"bench {d}", "sensor", {"site": "bench"}, "bench", at)
                for d in devices[start : start + DEVICES_PER_SAVE]
            ]
            store.save(*batch)
        return store.max_position()
    finally:
        store.close()


async def publish_rules(nc: Any, streams: Streams) -> None:
    """`rule.created.v1` of every rule straight into EVENTS, before the relay starts.

    The relay cannot publish `Rule` aggregates' events yet (it stops with "not a Device event:
    Rule.Created"), so the rules are not saved in the store. `Iot-Position: 0` makes the relay,
    which resumes from the stream's last message, publish the store from its first event on.
    """
    from domain.published import RuleCreated, encode_event
    from domain.rules import spec_to_dict, validate_rule

    js = nc.jetstream()
    at = datetime.now(UTC)
    for rule_id, spec in RULES.items():
        event = RuleCreated(
            rule_id=rule_id,
            version=1,
            at=at,
            position=0,
            spec=spec_to_dict(validate_rule(spec)),
        )
        await js.publish(
            streams.event_subject(f"rules.{rule_id}"),
            encode_event(event),
            stream=streams.events,
            headers={"Iot-Position": "0", "Nats-Msg-Id": f"rule:{rule_id}:1"},
        )


async def last_seq(ctx: Context, stream: str) -> int:
    info = await ctx.nc.jsm().stream_info(stream)
    return int(info.state.last_seq or 0)


async def evaluated_up_to(ctx: Context) -> int:
    """The INGEST sequence every partition's checkpoint has reached (0 before all exist)."""
    table = f'"{ctx.settings.pg_schema}".analytics_checkpoints'
    try:
        cur = await ctx.db.execute(f"SELECT count(*), min(ingest_seq) FROM {table}")
        row = await cur.fetchone()
    except Exception:  # the service has not created its table yet
        return 0
    if row is None or int(row[0]) < ctx.settings.analytics_partitions:
        return 0
    return int(row[1])


async def wait_evaluated(ctx: Context, seq: int, within: float = SETTLE_S) -> float:
    """Poll the checkpoints until every partition reflects `seq`; when (monotonic), or NaN."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if await evaluated_up_to(ctx) >= seq:
            return time.monotonic()
        await asyncio.sleep(0.05)
    return math.nan


async def wait_counted(ctx: Context, readings: float, within: float = SETTLE_S) -> float:
    """Poll analytics' readings counter until it reaches `readings`; when (monotonic), or
    NaN. (The checkpoints say the same durably, but only once a second.)"""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.HTTPError):
            if (await scrape(ctx)).get("iot_analytics_readings_total", 0.0) >= readings:
                return time.monotonic()
        await asyncio.sleep(0.02)
    return math.nan


async def wait_durables_idle(ctx: Context, within: float = SETTLE_S) -> None:
    """Until the projectors' durable consumers of EVENTS and INGEST have nothing left."""
    deadline = time.monotonic() + within
    while True:
        left = 0
        for stream in (ctx.streams.events, ctx.streams.ingest):
            for consumer in await ctx.nc.jsm().consumers_info(stream):
                if consumer.config.durable_name:
                    left += int(consumer.num_pending or 0) + int(consumer.num_ack_pending or 0)
        if not left:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"the projectors still have {left} messages after {within} s")
        await asyncio.sleep(0.1)


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text exposition: `name{labels}` -> value."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            with contextlib.suppress(ValueError):
                out[key] = float(value)
    return out


async def scrape(ctx: Context) -> dict[str, float]:
    assert ctx.analytics is not None
    response = await ctx.http.get(f"{ctx.analytics.url}/metrics")
    return parse_metrics(response.text)


HISTOGRAM = "iot_analytics_decision_seconds"


def buckets(metrics: dict[str, float]) -> list[tuple[float, float]]:
    """(upper bound, cumulative count) of the decision histogram, in bound order."""
    found = []
    prefix = HISTOGRAM + '_bucket{le="'
    for key, value in metrics.items():
        if key.startswith(prefix):
            found.append((float(key[len(prefix) : key.index('"', len(prefix))]), value))
    return sorted(found)


def histogram_quantile(q: float, before: dict[str, float], after: dict[str, float]) -> float:
    """The q-quantile (0..1) of what the histogram observed between two scrapes, interpolated
    within its bucket as Prometheus's histogram_quantile does."""
    old = dict(buckets(before))
    delta = [(le, count - old.get(le, 0.0)) for le, count in buckets(after)]
    if not delta or delta[-1][1] <= 0:
        return math.nan
    rank = q * delta[-1][1]
    lower, below = 0.0, 0.0
    for le, count in delta:
        if count >= rank:
            if math.isinf(le):
                return lower
            return lower + (le - lower) * (rank - below) / max(1e-12, count - below)
        lower, below = le, count
    return math.nan


@dataclass
class LagSamples:
    points: list[tuple[float, float]] = field(default_factory=list)  # (monotonic, lag)

    def between(self, start: float, end: float) -> list[float]:
        return [lag for t, lag in self.points if start <= t <= end]


async def sample_lag(ctx: Context, into: LagSamples, stop: asyncio.Event) -> None:
    """`iot_analytics_lag_messages` every LAG_EVERY_S until `stop`."""
    while not stop.is_set():
        with contextlib.suppress(httpx.HTTPError):
            metrics = await scrape(ctx)
            into.points.append((time.monotonic(), metrics.get("iot_analytics_lag_messages", 0.0)))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), LAG_EVERY_S)


def rss_rows(ctx: Context, report: Report, run: int, phase: str) -> None:
    assert ctx.analytics is not None
    report.add(
        run, f"{phase}: analytics VmRSS", "MB", memory_kib(ctx.analytics.pid, "VmRSS") / 1024
    )
    report.add(
        run, f"{phase}: analytics VmHWM", "MB", memory_kib(ctx.analytics.pid, "VmHWM") / 1024
    )


CPU_GROUPS = ("analytics", "publisher", "nats-server", "views", "relay", "gateway", "postgres")


def cpu_rows(
    report: Report, run: int, phase: str, span: Any, publisher_cpu_s: float | None = None
) -> None:
    percent = dict(span.percent)
    if publisher_cpu_s is not None:
        percent["publisher"] = 100 * publisher_cpu_s / span.wall
    for group in CPU_GROUPS:
        if group in percent:
            report.add(run, f"{phase} cpu {group}", "% core", percent[group], 0)
    report.add(run, f"{phase} cpu machine", "% core", span.machine, 0)


# --- phases ---------------------------------------------------------------------------------


async def start_analytics(ctx: Context) -> float:
    """A new `iot run analytics`; returns when it was ready (monotonic)."""
    if ctx.analytics is not None:
        ctx.analytics.stop()
        ctx.analytics.log.unlink(missing_ok=True)
    ctx.analytics = Component("analytics", ctx.env, free_port())
    ctx.analytics.start()
    await ctx.analytics.wait_ready(60.0)
    ctx.meter.set("analytics", [ctx.analytics.pid])
    return time.monotonic()


async def profile(ctx: Context, run: int, phase: str) -> None:
    out: Path | None = ctx.args.analytics_profile
    if out is None or run != 0 or ctx.analytics is None:
        return
    beside = Path(sys.executable).parent / "py-spy"
    spy = str(beside) if beside.exists() else shutil.which("py-spy")
    if spy is None:
        progress("py-spy not found (pip install py-spy): not profiling")
        return
    await asyncio.to_thread(out.mkdir, parents=True, exist_ok=True)
    progress(f"profiling analytics into {out}/analytics-{phase}.txt (run 1 figures perturbed)")
    ctx.spies.append(
        await asyncio.create_subprocess_exec(
            spy,
            "record",
            "--pid",
            str(ctx.analytics.pid),
            "--rate",
            "100",
            "--nonblocking",
            "--idle",
            "--threads",
            "--format",
            "raw",
            "-o",
            str(out / f"analytics-{phase}.txt"),
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )
    )


async def stop_profiles(ctx: Context) -> None:
    import signal

    for spy in ctx.spies:
        with contextlib.suppress(ProcessLookupError):
            spy.send_signal(signal.SIGINT)  # py-spy writes its profile on SIGINT
        await spy.wait()
    ctx.spies = []


async def capacity_phase(ctx: Context, report: Report, run: int) -> None:
    args = ctx.args
    per_message = args.analytics_per_message
    messages = max(1, args.analytics_backlog // per_message)
    if ctx.analytics is not None:
        ctx.analytics.stop()  # graceful: it checkpoints everything evaluated so far
    span_ms = 1000 * messages * per_message / args.analytics_rate  # as if at the offered rate
    now_ms = int(time.time() * 1000)
    base = max(ctx.floor_ms, now_ms - int(span_ms))
    progress(f"run {run + 1}: capacity backlog, {messages:,} messages x {per_message} readings")
    publisher = Publisher(ctx.spec(per_message, 0.0, messages=messages, base_ms=base))
    await publisher.start()
    done = await publisher.result()
    ctx.published(done)
    await wait_durables_idle(ctx)  # the views projector has taken the backlog too
    end_seq = await last_seq(ctx, ctx.streams.ingest)
    started = time.monotonic()
    ready = await start_analytics(ctx)
    await profile(ctx, run, "capacity")
    before = ctx.meter.snapshot()
    finished = await wait_counted(ctx, done.readings)
    span = cpu_span(before, ctx.meter.snapshot())
    if math.isnan(await wait_evaluated(ctx, end_seq)):
        raise RuntimeError("analytics did not checkpoint the backlog")
    await stop_profiles(ctx)
    metrics = await scrape(ctx)
    window = finished - ready
    readings = metrics.get("iot_analytics_readings_total", math.nan)
    evaluations = metrics.get("iot_analytics_rules_evaluated_total", math.nan)
    report.section = (
        f"capacity: a backlog of {messages:,} messages x {per_message} readings, evaluated from"
        " analytics' /readyz until its counter has every reading (then checkpointed)"
    )
    report.add(run, "backlog published (JetStream acks)", "readings/s", done.rate, 0)
    report.add(run, "analytics start -> ready", "s", ready - started, 2)
    report.add(run, "evaluation window (ready -> all evaluated)", "s", window, 2)
    report.add(run, "readings evaluated (its counter)", "count", readings, 0)
    report.add(run, "capacity: readings", "readings/s", readings / window, 0)
    report.add(run, "capacity: messages", "msg/s", messages / window, 0)
    report.add(run, "capacity: rule evaluations", "evals/s", evaluations / window, 0)
    transitions = sum(
        metrics.get(f'iot_analytics_transitions_total{{kind="{k}"}}', 0.0)
        for k in ("raised", "retriggered", "cleared")
    )
    report.add(run, "capacity: transitions appended", "count", transitions, 0)
    cpu_rows(report, run, "capacity", span)
    analytics_s = span.percent["analytics"] / 100 * span.wall
    report.add(run, "capacity: analytics CPU per reading", "us", 1e6 * analytics_s / readings, 2)
    rss_rows(ctx, report, run, "after capacity")
    progress(
        f"  {readings / window:,.0f} readings/s, {evaluations / window:,.0f} evaluations/s in"
        f" {window:.2f} s; analytics {span.percent['analytics']:.0f} % of a core"
    )


@dataclass(frozen=True)
class Offered:
    done: Published
    lag: LagSamples
    evaluated_at: float  # monotonic, NaN if never
    span: Any  # CpuSpan over the publishing
    before: dict[str, float]  # analytics metrics when the load began
    during: dict[str, float]  # and when it ended


async def offer(ctx: Context, rate: float, duration: float, run: int, phase: str) -> Offered:
    """Publish `rate` readings/s for `duration` s while sampling the lag; wait until all is
    evaluated."""
    per_message = ctx.args.analytics_load_per_message
    lag = LagSamples()
    stop = asyncio.Event()
    sampler = asyncio.create_task(sample_lag(ctx, lag, stop))
    before_metrics = await scrape(ctx)
    publisher = Publisher(ctx.spec(per_message, rate / per_message, duration=duration))
    await profile(ctx, run, phase)
    before = ctx.meter.snapshot()
    try:
        await publisher.start()
        done = await publisher.result()
        span = cpu_span(before, ctx.meter.snapshot())
        during = await scrape(ctx)
        await stop_profiles(ctx)
        ctx.published(done)
        target = before_metrics.get("iot_analytics_readings_total", 0.0) + done.readings
        evaluated = await wait_counted(ctx, target)
        if math.isnan(await wait_evaluated(ctx, done.last_seq)):
            raise RuntimeError("analytics did not checkpoint the load")
        await asyncio.sleep(LAG_EVERY_S * 2)  # a gauge sample or two after the end
    finally:
        stop.set()
        await sampler
    return Offered(done, lag, evaluated, span, before_metrics, during)


def load_rows(report: Report, run: int, phase: str, offered: Offered) -> None:
    done = offered.done
    window = done.ended - done.started
    lags = offered.lag.between(done.started, done.ended)
    after = offered.lag.between(done.ended, math.inf)
    drain = offered.evaluated_at - done.ended
    zero_at = next((t for t, lag in offered.lag.points if t >= done.ended and lag == 0), math.nan)

    def delta(name: str) -> float:
        return offered.during.get(name, math.nan) - offered.before.get(name, math.nan)

    report.add(run, f"{phase}: offered", "readings/s", done.rate, 0)
    report.add(run, f"{phase}: offered messages", "msg/s", done.messages / window, 0)
    report.add(
        run,
        f"{phase}: evaluated while offering",
        "readings/s",
        delta("iot_analytics_readings_total") / window,
        0,
    )
    report.add(
        run,
        f"{phase}: rule evaluations while offering",
        "evals/s",
        delta("iot_analytics_rules_evaluated_total") / window,
        0,
    )
    report.add(run, f"{phase}: lag max while offering", "messages", max(lags, default=math.nan), 0)
    report.add(run, f"{phase}: lag median while offering", "messages", median(lags), 0)
    report.add(
        run, f"{phase}: lag at the end of the load", "messages", lags[-1] if lags else math.nan, 0
    )
    report.add(
        run,
        f"{phase}: lag final (after the drain)",
        "messages",
        after[-1] if after else math.nan,
        0,
    )
    report.add(run, f"{phase}: all evaluated after the load", "s", drain, 2)
    report.add(run, f"{phase}: lag gauge 0 after the load", "s", zero_at - done.ended, 2)
    report.add(run, f"{phase}: publisher tick overrun max", "ms", 1000 * done.behind_s, 0)


async def keep_up_phase(ctx: Context, report: Report, run: int) -> None:
    args = ctx.args
    rate, duration = args.analytics_rate, args.analytics_duration
    progress(f"run {run + 1}: keeps up? {rate:,.0f} readings/s for {duration:.0f} s")
    offered = await offer(ctx, rate, duration, run, "full")
    report.section = (
        f"keeps up: {rate:,.0f} readings/s offered in messages of"
        f" {args.analytics_load_per_message} for {duration:.0f} s, lag sampled every"
        f" {LAG_EVERY_S} s"
    )
    load_rows(report, run, "full", offered)
    cpu_rows(report, run, "full", offered.span, offered.done.cpu_s)
    rss_rows(ctx, report, run, "after full load")
    lags = offered.lag.between(offered.done.started, offered.done.ended)
    progress(
        f"  offered {offered.done.rate:,.0f}/s, lag max {max(lags, default=math.nan):,.0f},"
        f" all evaluated {offered.evaluated_at - offered.done.ended:.2f} s after the load"
    )


@dataclass
class Probes:
    raised: list[float] = field(default_factory=list)  # s, publish -> open in the gateway
    cleared: list[float] = field(default_factory=list)  # s, publish -> gone from it
    decided: list[float] = field(default_factory=list)  # s, publish -> the raise's `at`
    relayed: list[float] = field(default_factory=list)  # s, `at` -> on EVENTS (relay)
    shown: list[float] = field(default_factory=list)  # s, on EVENTS -> open in the gateway
    missing: int = 0
    busy: set[str] = field(default_factory=set)
    # (device, device time) of a raise of the probe rule -> (its `at`, received from EVENTS),
    # both wall clock
    events: dict[tuple[str, int], tuple[float, float]] = field(default_factory=dict)


async def watch_probe_events(ctx: Context, probes: Probes) -> list[Any]:
    """Core subscriptions to the probe devices' EVENTS subjects: when each raise was
    published by the relay, and when analytics decided it (the event's `at`)."""
    from domain.published import DeviceAlertRaised, decode_event

    async def arrived(msg: Any) -> None:
        received = time.time()
        with contextlib.suppress(Exception):
            event = decode_event(msg.data)
            if isinstance(event, DeviceAlertRaised) and event.rule_id == PROBE_RULE:
                key = (event.device_id, event.at_ms)
                probes.events[key] = (event.at.timestamp(), received)

    return [await ctx.nc.subscribe(ctx.streams.event_subject(d), cb=arrived) for d in ctx.probes]


async def _wet_open(ctx: Context, device_id: str) -> bool | None:
    """Whether the gateway shows the probe rule's alert open on the device (None: no answer)."""
    try:
        response = await ctx.http.get(f"{ctx.gateway.url}/api/v1/devices/{device_id}")
    except httpx.HTTPError:
        return None
    if response.status_code != 200:
        return None
    alerts = response.json().get("alerts") or []
    return any(a.get("rule_id") == PROBE_RULE for a in alerts)


@dataclass(frozen=True)
class Sent:
    monotonic: float
    wall: float
    ts: int  # device time


async def _publish_probe(ctx: Context, device_id: str, value: float) -> Sent:
    """One reading of the probe metric at device time now."""
    from domain.ingest import Reading, Telemetry, encode_ingest

    now_ms = int(time.time() * 1000)
    message = Telemetry(
        device_id=device_id, received_at=now_ms, readings=[Reading(now_ms, {"humidity": value})]
    )
    sent = Sent(time.monotonic(), time.time(), now_ms)
    await ctx.nc.jetstream().publish(
        ctx.streams.ingest_subject("telemetry", device_id),
        encode_ingest(message),
        headers={"Nats-Msg-Id": f"{device_id}:{now_ms}"},
    )
    return sent


async def _until(ctx: Context, device_id: str, want: bool, within: float = 10.0) -> float:
    """Poll the gateway every POLL_S until the alert's openness is `want`; when, or NaN."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if await _wet_open(ctx, device_id) is want:
            return time.monotonic()
        await asyncio.sleep(POLL_S)
    return math.nan


async def probe(ctx: Context, device_id: str, probes: Probes) -> None:
    probes.busy.add(device_id)
    try:
        sent = await _publish_probe(ctx, device_id, 97.0)
        seen = await _until(ctx, device_id, True)
        if math.isnan(seen):
            probes.missing += 1
        else:
            probes.raised.append(seen - sent.monotonic)
            found = probes.events.get((device_id, sent.ts))
            if found is not None:
                decided, received = found
                probes.decided.append(decided - sent.wall)
                probes.relayed.append(received - decided)
                probes.shown.append(sent.wall + (seen - sent.monotonic) - received)
        sent = await _publish_probe(ctx, device_id, 40.0)
        gone = await _until(ctx, device_id, False)
        if not math.isnan(gone):
            probes.cleared.append(gone - sent.monotonic)
    finally:
        probes.busy.discard(device_id)


async def run_probes(ctx: Context, probes: Probes, until: float) -> None:
    """A probe every `--analytics-probe-every` s, round robin over the probe devices (one at
    a time per device) until `until` (monotonic); then the ones under way finish."""
    tasks = []
    i = 0
    await asyncio.sleep(1.0)  # the load settles first
    while time.monotonic() < until:
        device_id = ctx.probes[i % len(ctx.probes)]
        i += 1
        if device_id not in probes.busy:
            tasks.append(asyncio.create_task(probe(ctx, device_id, probes)))
        await asyncio.sleep(ctx.args.analytics_probe_every)
    await asyncio.gather(*tasks)


async def half_phase(ctx: Context, report: Report, run: int) -> None:
    args = ctx.args
    rate, duration = args.analytics_rate / 2, args.analytics_half_duration
    progress(
        f"run {run + 1}: half load, {rate:,.0f} readings/s for {duration:.0f} s, a probe every"
        f" {args.analytics_probe_every} s"
    )
    probes = Probes()
    subscriptions = await watch_probe_events(ctx, probes)
    prober = asyncio.create_task(run_probes(ctx, probes, time.monotonic() + duration - 0.5))
    try:
        offered = await offer(ctx, rate, duration, run, "half")
        await prober
    finally:
        for subscription in subscriptions:
            await subscription.unsubscribe()
    after = await scrape(ctx)
    report.section = (
        f"half load: {rate:,.0f} readings/s; a breaching reading on a probe device every"
        f" {args.analytics_probe_every} s, the gateway polled every {POLL_S * 1000:.0f} ms"
    )
    load_rows(report, run, "half", offered)
    raised = probes.raised
    report.add(run, "reading -> alert open in the gateway p50", "ms", 1000 * percentile(raised, 50))
    report.add(run, "reading -> alert open in the gateway p95", "ms", 1000 * percentile(raised, 95))
    report.add(run, "reading -> alert open in the gateway p99", "ms", 1000 * percentile(raised, 99))
    report.add(
        run, "reading -> alert open in the gateway max", "ms", 1000 * percentile(raised, 100)
    )
    report.add(run, "latency samples", "count", len(raised), 0)
    report.add(run, "probes never visible within 10 s", "count", probes.missing, 0)
    report.add(
        run,
        "reading -> alert gone from the gateway p99",
        "ms",
        1000 * percentile(probes.cleared, 99),
    )
    for label, samples in (
        ("publish -> analytics decided (the raise's at)", probes.decided),
        ("decided -> relay published it on EVENTS", probes.relayed),
        ("on EVENTS -> open in the gateway (views)", probes.shown),
    ):
        report.add(run, f"  {label} p50", "ms", 1000 * percentile(samples, 50))
        report.add(run, f"  {label} p99", "ms", 1000 * percentile(samples, 99))
    report.add(
        run,
        "analytics decision_seconds p99 (histogram, interpolated)",
        "ms",
        1000 * histogram_quantile(0.99, offered.before, after),
    )
    cpu_rows(report, run, "half", offered.span, offered.done.cpu_s)
    rss_rows(ctx, report, run, "after half load")
    progress(
        f"  {len(raised)} probes: p50 {1000 * percentile(raised, 50):.0f} ms,"
        f" p99 {1000 * percentile(raised, 99):.0f} ms, {probes.missing} missing"
    )


async def rule_test_phase(ctx: Context, report: Report, run: int) -> None:
    """`POST /api/v1/rules/test` of the hot rule over everything stored so far."""
    assert ctx.analytics is not None
    progress(f"run {run + 1}: rule test of {RULES['hot']['name']!r} over the stored history")
    started = time.monotonic()
    response = await ctx.http.post(
        f"{ctx.analytics.url}/api/v1/rules/test",
        json={"rule": RULES["hot"], "since": "1d"},
        headers={"Authorization": f"Bearer {OPERATOR_TOKEN}"},
        timeout=600.0,
    )
    wall = time.monotonic() - started
    if response.status_code != 200:
        raise RuntimeError(f"the rule test answered {response.status_code}: {response.text}")
    result = response.json()
    report.section = (
        "rule test: the hot rule (threshold, clear, for_s) over the whole INGEST stream"
    )
    report.add(run, "rule test: messages read", "count", result["messages"], 0)
    report.add(run, "rule test: readings", "count", result["readings"], 0)
    report.add(run, "rule test: alerts it would have raised", "count", result["raised"], 0)
    report.add(run, "rule test: wall time (request -> answer)", "s", wall, 2)
    report.add(run, "rule test: messages/s", "msg/s", result["messages"] / wall, 0)
    report.add(run, "rule test: readings/s", "readings/s", result["readings"] / wall, 0)
    progress(
        f"  {result['messages']:,} messages in {wall:.2f} s"
        f" ({result['messages'] / wall:,.0f}/s), {result['raised']} alerts"
    )


def verdicts(report: Report, args: argparse.Namespace) -> None:
    def verdict(ok: bool) -> str:
        return "met" if ok else "NOT met"

    drain = report.median("full: all evaluated after the load")
    p99 = report.median("reading -> alert open in the gateway p99")
    samples = sum(v for v in report.rows["latency samples"].values if not math.isnan(v))
    report.note("targets (medians):")
    report.note(
        f"  keeps up with {args.analytics_rate:,.0f} readings/s: lag max"
        f" {report.median('full: lag max while offering'):,.0f} messages, all evaluated"
        f" {drain:.2f} s after the load (<= {args.analytics_max_drain:g} s)"
        f" -> {verdict(drain <= args.analytics_max_drain)}"
    )
    report.note(
        f"  p99 reading -> alert visible in the gateway at half load < {TARGET_P99_MS:.0f} ms:"
        f" {p99:.0f} ms ({samples:.0f} samples over all runs) -> {verdict(p99 < TARGET_P99_MS)}"
    )


# --- the run --------------------------------------------------------------------------------


async def _run(args: argparse.Namespace) -> Report:
    report = Report("analytics: rules evaluated on INGEST, alerts visible in the gateway")
    namespace = unique_namespace("ban")
    env = {
        "IOT_NAMESPACE": namespace,
        "IOT_INFLUX_DB": namespace,
        "IOT_API_TOKENS": f"{TOKEN}=viewer,{OPERATOR_TOKEN}=operator",
        "IOT_LOG_LEVEL": "WARNING",
        "IOT_RATE_LIMIT_PER_MINUTE": "10000000",  # the probes poll fast
    }
    settings = load_settings({**os.environ, **env})
    progress(f"namespace {namespace}")
    try:
        await _with_system(args, report, settings, env)
    finally:
        progress("dropping the namespace (schema, streams, InfluxDB database, Redis keys)")
        await drop_everything(settings)
    return report


async def _with_system(
    args: argparse.Namespace, report: Report, settings: Settings, env: dict[str, str]
) -> None:
    import nats
    import psycopg

    from commands.migrate import migrate

    tag = secrets.token_hex(2)
    devices = [f"a{tag}d{i:04d}" for i in range(args.analytics_devices)]
    probes = devices[-args.analytics_probes :]
    load_devices = devices[: -args.analytics_probes]
    widths = [3 + i % 3 for i in range(len(load_devices))]
    report.note(f"machine: {machine()}")
    report.note(
        f"{len(devices)} devices x {len(RULES)} rules (threshold with clear and for_s, threshold,"
        " rate, absent on a metric, absent on '*'), every rule scoped to every device;"
        f" {len(load_devices)} devices carry the load, 3-5 metrics a reading, {len(probes)} only"
        f" the probes; analytics: 1 replica, {settings.analytics_partitions} partitions"
    )
    report.note(
        "rates from analytics' own counters (iot_analytics_readings_total,"
        " iot_analytics_rules_evaluated_total) over the window; cpu in % of one core from"
        " /proc (the publisher from its own rusage); every process shares the same cores"
    )
    await migrate(settings)
    nc = await nats.connect(settings.nats_url, connect_timeout=5)
    db = await psycopg.AsyncConnection.connect(
        **settings.postgres.connect_kwargs(), autocommit=True
    )
    http = httpx.AsyncClient(timeout=5.0, headers={"Authorization": f"Bearer {TOKEN}"})
    children = {
        "relay": Component("relay", env, free_port()),
        "views": Component("views", env, free_port(), ["projector", "views"]),
        "gateway": Component("gateway", env, free_port()),
    }
    ctx: Context | None = None
    try:
        await publish_rules(nc, Streams(settings.namespace))
        with Components(*children.values()):
            await asyncio.gather(*(c.wait_ready() for c in children.values()))
            progress(f"saving {len(devices):,} devices into the store")
            position = len(RULES) + await asyncio.to_thread(save_devices, settings, devices)
            nats_port = int(settings.nats_url.rsplit(":", 1)[1].split("/")[0])
            nats_pid = listening_pid(nats_port)
            meter = GroupMeter(
                {
                    "bench": [os.getpid()],
                    **{name: [c.pid] for name, c in children.items()},
                    "nats-server": [nats_pid] if nats_pid else pids_named("nats-server"),
                    "postgres": pids_named("postgres"),
                    "redis": pids_named("redis-server"),
                }
            )
            ctx = Context(
                args,
                settings,
                env,
                nc,
                db,
                http,
                children["gateway"],
                meter,
                load_devices,
                widths,
                probes,
            )
            deadline = time.monotonic() + SETTLE_S
            while await last_seq(ctx, ctx.streams.events) < position:
                if time.monotonic() > deadline:
                    raise RuntimeError("the relay did not publish the fleet")
                await asyncio.sleep(0.1)
            await wait_durables_idle(ctx)
            for device_id in probes:
                if math.isnan(await _until(ctx, device_id, False, within=30.0)):
                    raise RuntimeError(f"the gateway does not show {device_id}")
            ctx.floor_ms = int(time.time() * 1000)
            for run in range(args.repeats):
                await capacity_phase(ctx, report, run)
                await keep_up_phase(ctx, report, run)
                await half_phase(ctx, report, run)
                await rule_test_phase(ctx, report, run)
            verdicts(report, args)
            if ctx.analytics is not None:
                report.note(
                    "analytics log (last lines): " + ctx.analytics.tail(3).replace("\n", " | ")
                )
    finally:
        if ctx is not None:
            await stop_profiles(ctx)
            if ctx.analytics is not None:
                ctx.analytics.stop()
        await http.aclose()
        await db.close()
        await nc.close()


@register(
    "analytics",
    "iot run analytics: rules evaluated/s, keeping up with batched ingest, alert latency",
    configure,
)
def run(args: argparse.Namespace) -> Report:
    return asyncio.run(_run(args))


if __name__ == "__main__":
    sys.exit(_publisher_main())
