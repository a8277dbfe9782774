"""`python -m bench durability`: what the shipped durability settings cost (deploy/README.md,
"Durability").

JetStream: `sync_interval: always` (the cluster's nats.conf) against the default (fsync every
2 minutes), each on a private nats-server this benchmark starts (a free port, a temporary store
directory, a config file with or without the setting), R1 file storage. Readings of about 150
bytes are published with acknowledgement one at a time (each ack awaited) and in async windows
(`--durability-window` in flight); msgs/s and ack latency. The two configurations alternate
within each run (the order flips every run) so the machine's drift hits both alike.

PostgreSQL: `synchronous_commit` on (as shipped) against off, small autocommit inserts one at a
time on the shared server, each session with its own `SET synchronous_commit` in a temporary
schema that is dropped at the end; the server's configuration is never changed.

Also the disk's own floor: a 150-byte append followed by fsync, in the same temporary directory.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import nats
import psycopg
from nats.js.api import PubAck, StorageType, StreamConfig

from bench.registry import register
from bench.report import Report
from bench.stats import percentile
from bench.system import free_port, machine
from infra.settings import load

CONFIGS = ("default", "always")  # JetStream's sync_interval: unset (2 min) / always
SUBJECT = "ingest.telemetry.bench-0001"


def configure(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("durability")
    g.add_argument(
        "--durability-messages",
        type=int,
        default=2_000,
        help="durability: messages published one at a time, per configuration and run",
    )
    g.add_argument(
        "--durability-window-messages",
        type=int,
        default=20_000,
        help="durability: messages published in async windows, per configuration and run",
    )
    g.add_argument(
        "--durability-window", type=int, default=256, help="durability: acks in flight (256)"
    )
    g.add_argument(
        "--durability-inserts",
        type=int,
        default=2_000,
        help="durability: PostgreSQL inserts per setting and run (0: skip PostgreSQL)",
    )


def reading(i: int) -> bytes:
    """A telemetry message as the bridge stores it, about 150 bytes."""
    body = {
        "device_id": "bench-0001",
        "ts": 1_767_225_600_000 + i * 1000,
        "seq": i,
        "metrics": {"temperature": 21.53, "humidity": 48.2, "battery": 3.71, "rssi": -67},
    }
    raw = json.dumps(body, separators=(",", ":")).encode()
    return raw + b" " * max(0, 150 - len(raw))


def nats_server_binary() -> tuple[str, str]:
    """The nats-server beside this interpreter (the dev extra's, 2.10+), else the PATH's one;
    with its version line. sync_interval needs 2.10 or newer."""
    beside = Path(sys.executable).parent / "nats-server"
    binary = str(beside) if beside.exists() else shutil.which("nats-server")
    if binary is None:
        raise RuntimeError("nats-server not found: `make install` puts one into .venv/bin")
    version = subprocess.run(
        [binary, "--version"], capture_output=True, text=True, check=True
    ).stdout.strip()
    return binary, version


@contextlib.contextmanager
def nats_server(binary: str, sync: str) -> Iterator[str]:
    """A private nats-server with JetStream on a free port and a temporary store; its URL."""
    with tempfile.TemporaryDirectory(prefix=f"bench-durability-{sync}-") as tmp:
        store = Path(tmp) / "jetstream"
        port = free_port()
        line = "  sync_interval: always\n" if sync == "always" else ""
        conf = Path(tmp) / "nats.conf"
        conf.write_text(
            f"listen: 127.0.0.1:{port}\n"
            f'jetstream {{\n  store_dir: "{store}"\n{line}}}\n'
        )  # fmt: skip
        log = (Path(tmp) / "nats.log").open("wb")
        proc = subprocess.Popen(
            [binary, "-js", "-c", str(conf)],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        try:
            deadline = time.monotonic() + 20
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(
                        f"nats-server exited: {(Path(tmp) / 'nats.log').read_text()}"
                    )
                with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
                    break
                if time.monotonic() > deadline:
                    raise RuntimeError("nats-server did not listen within 20 s")
                time.sleep(0.05)
            yield f"nats://127.0.0.1:{port}"
        finally:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            log.close()


async def measure_jetstream(
    url: str, sequential: int, windowed: int, window: int
) -> dict[str, float]:
    nc = await nats.connect(url, connect_timeout=5)
    try:
        js = nc.jetstream(publish_async_max_pending=window)
        await js.add_stream(
            StreamConfig(name="BENCH", subjects=["ingest.>"], storage=StorageType.FILE)
        )
        for i in range(200):  # warm up: files created, connection settled
            await js.publish(SUBJECT, reading(i))
        out: dict[str, float] = {}

        samples = []
        started = time.perf_counter()
        for i in range(sequential):
            t = time.perf_counter()
            await js.publish(SUBJECT, reading(i))
            samples.append((time.perf_counter() - t) * 1000)
        elapsed = time.perf_counter() - started
        out["seq rate"] = sequential / elapsed
        out["seq p50"] = percentile(samples, 50)
        out["seq p99"] = percentile(samples, 99)

        lat: list[float] = []
        acked = 0
        failed = 0

        def done(since: float) -> Callable[[asyncio.Future[PubAck]], None]:
            def callback(fut: asyncio.Future[PubAck]) -> None:
                nonlocal acked, failed
                if fut.cancelled() or fut.exception() is not None:
                    failed += 1
                    return
                acked += 1
                lat.append((time.perf_counter() - since) * 1000)

            return callback

        started = time.perf_counter()
        for i in range(windowed):
            fut = await js.publish_async(SUBJECT, reading(i))
            fut.add_done_callback(done(time.perf_counter()))
        await asyncio.wait_for(js.publish_async_completed(), 60)
        elapsed = time.perf_counter() - started
        if failed or acked != windowed:
            raise RuntimeError(f"{failed} publishes failed, {acked} of {windowed} acked")
        out["win rate"] = windowed / elapsed
        out["win p50"] = percentile(lat, 50)
        out["win p99"] = percentile(lat, 99)
        stored = (await js.stream_info("BENCH")).state.messages
        if stored != 200 + sequential + windowed:
            raise RuntimeError(
                f"stream holds {stored} messages, {200 + sequential + windowed} sent"
            )
        return out
    finally:
        await nc.close()


def measure_fsync(directory: Path, n: int = 500) -> tuple[float, float]:
    """p50 and p99 (ms) of appending 150 bytes to a file and fsyncing it."""
    path = directory / "fsync.probe"
    samples = []
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        for i in range(n):
            t = time.perf_counter()
            os.write(fd, reading(i))
            os.fsync(fd)
            samples.append((time.perf_counter() - t) * 1000)
    finally:
        os.close(fd)
        path.unlink()
    return percentile(samples, 50), percentile(samples, 99)


def measure_postgres(schema: str, setting: str, n: int) -> dict[str, float]:
    settings = load()
    with psycopg.connect(**settings.postgres.connect_kwargs(), autocommit=True) as conn:
        conn.execute(f"SET synchronous_commit = {setting}")
        conn.execute(f"SET search_path = {schema}")
        samples = []
        statement = "INSERT INTO readings (device_id, body) VALUES (%s, %s)"
        started = time.perf_counter()
        for i in range(n):
            t = time.perf_counter()
            conn.execute(statement, ("bench-0001", reading(i).decode().strip()))
            samples.append((time.perf_counter() - t) * 1000)
        elapsed = time.perf_counter() - started
    return {"rate": n / elapsed, "p50": percentile(samples, 50), "p99": percentile(samples, 99)}


@contextlib.contextmanager
def postgres_schema() -> Iterator[str]:
    settings = load()
    schema = f"bench_durability_{secrets.token_hex(4)}"
    with psycopg.connect(**settings.postgres.connect_kwargs(), autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {schema}")
        conn.execute(
            f"CREATE TABLE {schema}.readings (id bigserial PRIMARY KEY, device_id text NOT NULL,"
            " at timestamptz NOT NULL DEFAULT now(), body jsonb NOT NULL)"
        )
        try:
            yield schema
        finally:
            conn.execute(f"DROP SCHEMA {schema} CASCADE")


def jetstream_rows(report: Report, run: int, sync: str, figures: dict[str, float]) -> None:
    report.section = f"JetStream, sync_interval {sync}"
    report.add(run, f"{sync}: one at a time", "msg/s", figures["seq rate"], 0)
    report.add(run, f"{sync}: one at a time, ack p50", "ms", figures["seq p50"], 2)
    report.add(run, f"{sync}: one at a time, ack p99", "ms", figures["seq p99"], 2)
    report.add(run, f"{sync}: windowed", "msg/s", figures["win rate"], 0)
    report.add(run, f"{sync}: windowed, ack p50", "ms", figures["win p50"], 2)
    report.add(run, f"{sync}: windowed, ack p99", "ms", figures["win p99"], 2)


@register("durability", "the cost of sync_interval: always and synchronous_commit=on", configure)
def run(args: argparse.Namespace) -> Report:
    binary, version = nats_server_binary()
    sequential, windowed = args.durability_messages, args.durability_window_messages
    window, inserts = args.durability_window, args.durability_inserts
    report = Report(
        f"durability settings: {version}, R1 file storage, {sequential:,} messages one at a "
        f"time + {windowed:,} in windows of {window}, ~150 B each"
        + (f"; PostgreSQL {inserts:,} inserts" if inserts else "")
    )
    for i in range(args.repeats):
        order = CONFIGS if i % 2 == 0 else CONFIGS[::-1]
        figures: dict[str, dict[str, float]] = {}
        for sync in order:
            with nats_server(binary, sync) as url:
                figures[sync] = asyncio.run(measure_jetstream(url, sequential, windowed, window))
        for sync in CONFIGS:
            jetstream_rows(report, i, sync, figures[sync])
        report.section = "always / default, this run"
        for key, label in (("seq rate", "one at a time"), ("win rate", "windowed")):
            ratio = figures["always"][key] / figures["default"][key]
            report.add(run=i, metric=f"throughput ratio, {label}", unit="x", value=ratio, digits=2)
        report.section = "the disk: 150 B append + fsync (500)"
        with tempfile.TemporaryDirectory(prefix="bench-durability-fsync-") as tmp:
            p50, p99 = measure_fsync(Path(tmp))
        report.add(i, "fsync p50", "ms", p50, 2)
        report.add(i, "fsync p99", "ms", p99, 2)
        if inserts:
            pg: dict[str, dict[str, float]] = {}
            with postgres_schema() as schema:
                for setting in ("on", "off") if i % 2 == 0 else ("off", "on"):
                    pg[setting] = measure_postgres(schema, setting, inserts)
            for setting in ("on", "off"):
                report.section = f"PostgreSQL, synchronous_commit {setting} (one insert a commit)"
                report.add(i, f"{setting}: inserts", "ins/s", pg[setting]["rate"], 0)
                report.add(i, f"{setting}: commit p50", "ms", pg[setting]["p50"], 2)
                report.add(i, f"{setting}: commit p99", "ms", pg[setting]["p99"], 2)
            report.section = "on / off, this run"
            report.add(i, "insert rate ratio", "x", pg["on"]["rate"] / pg["off"]["rate"], 2)
    report.note(
        f"{machine()}; client and server on the same cores; the store in {tempfile.gettempdir()}"
    )
    report.note(
        "the cluster's streams are R3: an ack there also waits for a second server's write "
        "(and with sync_interval: always its fsync) over the network, which this does not measure"
    )
    return report
