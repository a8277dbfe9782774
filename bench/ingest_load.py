"""Device load for `python -m bench ingest`: `mosquitto_pub` processes, paced or flat out.

A paced phase writes lines into long-lived `mosquitto_pub -q 1 -l` processes, one per device
(each line is one QoS 1 message on `devices/<id>/telemetry`), from a pacing loop in this process
that ticks every few milliseconds; the publish time of a reading is when its line was written.
A burst starts one fresh `mosquitto_pub -l` per device reading a prepared file, so nothing in
Python stands between the data and the broker. Every reading carries device time `ts` (epoch ms,
strictly increasing per device, so no two readings of a device share an InfluxDB point) and a
value that counts the device's readings of the phase (0, 1, 2...) under a metric named after the
phase, so each phase is counted apart: `count("<metric>")` in InfluxDB, `m:<metric>` in Redis.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

MOSQUITTO_PUB = "mosquitto_pub"


def topic(device_id: str) -> str:
    return f"devices/{device_id}/telemetry"


def publisher_argv(port: int, device_id: str, client_id: str) -> list[str]:
    """`mosquitto_pub` reading one QoS 1 message per stdin line for one device."""
    return [
        MOSQUITTO_PUB,
        "-h",
        "127.0.0.1",
        "-p",
        str(port),
        "-q",
        "1",
        "-l",
        "-t",
        topic(device_id),
        "-i",
        client_id,
    ]


@dataclass
class Load:
    """What a phase published: per device, readings sent and the values; sample publish times."""

    metric: str
    devices: Sequence[str]
    per_message: int
    counts: list[int]  # readings per device; the device's last value is counts[d] - 1
    messages: int = 0
    started: float = 0.0  # monotonic
    ended: float = 0.0  # monotonic: last line written (paced) or last publisher exited (burst)
    times: dict[int, list[float]] = field(default_factory=dict)  # device index -> time per value
    backlog: int = 0  # most bytes waiting in this process for a publisher's pipe

    @property
    def readings(self) -> int:
        return sum(self.counts)

    @property
    def offered(self) -> float:
        """Readings per second actually handed to the publishers."""
        span = self.ended - self.started
        return self.readings / span if span > 0 else 0.0

    def last_values(self) -> dict[str, int]:
        return {d: n - 1 for d, n in zip(self.devices, self.counts, strict=True) if n}


class _Lines:
    """Builds a device's lines: strictly increasing device time, values counting from 0."""

    def __init__(self, metric: str, per_message: int) -> None:
        self.metric = metric.encode()
        self.per_message = per_message

    def line(self, ts: int, first: int) -> bytes:
        metric = self.metric
        if self.per_message == 1:
            return b'{"ts":%d,"values":{"%s":%d}}\n' % (ts, metric, first)
        items = b",".join(
            b'{"ts":%d,"values":{"%s":%d}}' % (ts + k, metric, first + k)
            for k in range(self.per_message)
        )
        return b"[" + items + b"]\n"


class Feeders:
    """One long-lived `mosquitto_pub -q 1 -l` per device, fed through its stdin."""

    def __init__(self, port: int, devices: Sequence[str], tag: str) -> None:
        self.port = port
        self.devices = list(devices)
        self.tag = tag
        self.procs: list[asyncio.subprocess.Process] = []
        self.log = Path(tempfile.mkstemp(prefix="bench-ingest-pub-", suffix=".log")[1])
        self._last_ts = [0] * len(self.devices)

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    async def start(self) -> None:
        fd = os.open(self.log, os.O_WRONLY | os.O_APPEND)
        try:
            for d, device in enumerate(self.devices):
                self.procs.append(
                    await asyncio.create_subprocess_exec(
                        *publisher_argv(self.port, device, f"{self.tag}-pub-{d}"),
                        stdin=asyncio.subprocess.PIPE,
                        stdout=asyncio.subprocess.DEVNULL,
                        stderr=fd,
                    )
                )
        finally:
            os.close(fd)
        await asyncio.sleep(0.5)  # let them connect
        dead = [p for p in self.procs if p.returncode is not None]
        if dead:
            raise RuntimeError(f"mosquitto_pub exited: {self.log.read_text()[-500:]}")

    async def stop(self) -> None:
        for proc in self.procs:
            if proc.stdin is not None:
                proc.stdin.close()
        for proc in self.procs:
            try:
                await asyncio.wait_for(proc.wait(), 10)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()
        self.procs.clear()
        self.log.unlink(missing_ok=True)

    def _backlog(self) -> int:
        total = 0
        for proc in self.procs:
            if proc.stdin is not None:
                total += proc.stdin.transport.get_write_buffer_size()
        return total

    async def paced(
        self,
        metric: str,
        rate: float,
        duration: float,
        *,
        per_message: int = 1,
        sample: Sequence[int] = (),
        tick: float = 0.005,
    ) -> Load:
        """Offer `rate` messages/s (of `per_message` readings) for `duration` s, round robin."""
        n = len(self.devices)
        load = Load(metric, self.devices, per_message, [0] * n)
        lines = _Lines(metric, per_message)
        sampled = set(sample)
        for d in sampled:
            load.times[d] = []
        loop = asyncio.get_running_loop()
        total = round(rate * duration)
        start = loop.time()
        load.started = time.monotonic()
        turn = 0
        while load.messages < total:
            now = loop.time()
            due = min(total, int(rate * (now - start)) + 1)
            if due > load.messages:
                wall_ms = int(time.time() * 1000)
                stamp = time.monotonic()
                chunks: dict[int, list[bytes]] = {}
                for _ in range(due - load.messages):
                    d = turn
                    turn = (turn + 1) % n
                    ts = max(wall_ms, self._last_ts[d] + 1)
                    self._last_ts[d] = ts + per_message - 1
                    first = load.counts[d]
                    chunks.setdefault(d, []).append(lines.line(ts, first))
                    load.counts[d] = first + per_message
                    if d in sampled:
                        load.times[d].extend([stamp] * per_message)
                load.messages = due
                for d, parts in chunks.items():
                    stdin = self.procs[d].stdin
                    assert stdin is not None
                    stdin.write(b"".join(parts))
                load.backlog = max(load.backlog, self._backlog())
            await asyncio.sleep(tick)
        load.ended = time.monotonic()
        for proc in self.procs:
            if proc.stdin is not None:
                await proc.stdin.drain()
        return load


def _write_burst_files(
    directory: Path, devices: Sequence[str], metric: str, counts: Sequence[int], base_ts: int
) -> list[Path]:
    lines = _Lines(metric, 1)
    files = []
    for d, count in enumerate(counts):
        path = directory / f"burst-{d}.txt"
        path.write_bytes(b"".join(lines.line(base_ts + i, i) for i in range(count)))
        files.append(path)
    return files


async def burst(
    port: int, devices: Sequence[str], metric: str, messages: int, tag: str, base_ts: int
) -> tuple[Load, list[int]]:
    """`messages` one-reading messages spread over the devices, each device's from its own
    `mosquitto_pub -l` reading a file, all at once. Returns the load and the publishers' pids
    (already exited; `ended` is when the last one exited, so `offered` is the burst's rate)."""
    n = len(devices)
    counts = [messages // n + (1 if d < messages % n else 0) for d in range(n)]
    load = Load(metric, devices, 1, counts, messages=messages)
    with tempfile.TemporaryDirectory(prefix="bench-ingest-burst-") as tmp:
        files = await asyncio.to_thread(
            _write_burst_files, Path(tmp), devices, metric, counts, base_ts
        )
        load.started, load.ended, pids = await run_publishers(port, devices, files, f"{tag}-burst")
    return load, pids


async def run_publishers(
    port: int, devices: Sequence[str], files: Sequence[Path], tag: str
) -> tuple[float, float, list[int]]:
    """One `mosquitto_pub -l` per device, each fed its own file, all at once; wait for all.
    Returns when they started and when the last exited (monotonic) and their pids."""
    handles = [path.open("rb") for path in files]
    try:
        started = time.monotonic()
        procs = [
            await asyncio.create_subprocess_exec(
                *publisher_argv(port, device, f"{tag}-{d}"),
                stdin=handles[d],
                stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.DEVNULL,
            )
            for d, device in enumerate(devices)
        ]
        codes = await asyncio.gather(*(p.wait() for p in procs))
        ended = time.monotonic()
    finally:
        for handle in handles:
            handle.close()
    failed = [c for c in codes if c != 0]
    if failed:
        raise RuntimeError(f"{len(failed)} burst publishers failed (exit {failed[0]})")
    return started, ended, [p.pid for p in procs]


@dataclass(frozen=True)
class RawResult:
    received: int
    rate: float  # messages/s at the subscriber, first to last message
    offered: float  # messages/s the publishers managed (start to last exit)


def _write_raw_files(directory: Path, publishers: int, per: int) -> list[Path]:
    lines = _Lines("seq", 1)
    files = []
    base = int(time.time() * 1000)
    for p in range(publishers):
        path = directory / f"raw-{p}.txt"
        path.write_bytes(b"".join(lines.line(base + i, i) for i in range(per)))
        files.append(path)
    return files


async def raw_ceiling(
    port: int, messages: int, publishers: int, within: float = 120.0
) -> RawResult:
    """A bare aiomqtt QoS 1 subscriber counting what `publishers` `mosquitto_pub -l` send."""
    import aiomqtt

    per = messages // publishers
    total = per * publishers
    received = 0
    first = last = 0.0
    with tempfile.TemporaryDirectory(prefix="bench-ingest-raw-") as tmp:
        files = await asyncio.to_thread(_write_raw_files, Path(tmp), publishers, per)
        async with aiomqtt.Client("127.0.0.1", port, identifier="bench-raw-sub") as client:
            await client.subscribe("devices/+/telemetry", qos=1)

            async def count() -> None:
                nonlocal received, first, last
                async for _ in client.messages:
                    received += 1
                    if received == 1:
                        first = time.monotonic()
                    if received >= total:
                        last = time.monotonic()
                        return

            counter = asyncio.create_task(count())
            handles = [path.open("rb") for path in files]
            try:
                started = time.monotonic()
                procs = [
                    await asyncio.create_subprocess_exec(
                        *publisher_argv(port, f"raw{p}", f"bench-raw-pub-{p}"),
                        stdin=handles[p],
                        stdout=asyncio.subprocess.DEVNULL,
                        stderr=asyncio.subprocess.DEVNULL,
                    )
                    for p in range(publishers)
                ]
                await asyncio.gather(*(p.wait() for p in procs))
                published = time.monotonic()
            finally:
                for handle in handles:
                    handle.close()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(counter, within)
            if not counter.done():
                counter.cancel()
    span = last - first if last else time.monotonic() - first
    return RawResult(received, received / span if span > 0 else 0.0, total / (published - started))
