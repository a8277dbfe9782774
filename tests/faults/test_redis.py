"""Redis (the views) restarted, and separately flushed, while devices send and operators command.

A restart keeps the data (the append-only file, as deploy/ ships it): the views projector and
the gateway say they are not ready while Redis is away, then reconnect; the views are not rebuilt.
A flush loses the views: the projector notices, flags them (its /readyz and the gateway's 503, the
gateway's view reads 503 with `rebuilding`) and rebuilds them from the log by itself. To see the
flag whatever the machine's speed, the test holds the replay lock until both have said so; the
recovery time is then the rebuild's, from releasing the lock to every component ready.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import redis

from infra.replay import replay_lock
from infra.settings import Settings
from infra.views import current_key, marker_key
from tests.faults.conftest import FaultReport
from tests.faults.harness import FaultRun

pytestmark = pytest.mark.faults


@contextmanager
def replay_lock_held(settings: Settings) -> Iterator[None]:
    """Hold `iot replay views`' lock (the automatic rebuild's too) in a thread of its own."""
    acquired, release = threading.Event(), threading.Event()
    failed: list[BaseException] = []

    async def hold() -> None:
        async with replay_lock(settings, "views"):
            acquired.set()
            await asyncio.to_thread(release.wait)

    def run() -> None:
        try:
            asyncio.run(hold())
        except BaseException as e:
            failed.append(e)
            acquired.set()

    holder = threading.Thread(target=run, daemon=True)
    holder.start()
    assert acquired.wait(30)
    assert not failed, failed
    try:
        yield
    finally:
        release.set()
        holder.join(30)


def views_state(run: FaultRun) -> tuple[bytes | None, bytes | None]:
    """The loss marker and the generation in use, read from the private Redis."""
    assert run.settings is not None
    client = redis.Redis.from_url(run.server.url)
    try:
        namespace = run.settings.namespace
        found = client.mget([marker_key(namespace), current_key(namespace)])
        marker, generation = (v if isinstance(v, bytes) else None for v in found)
        return marker, generation
    finally:
        client.close()


def said_not_ready(run: FaultRun, names: tuple[str, ...], since: float) -> bool:
    return all(
        any(t >= since and status == 503 for t, status in run.readiness.seen[name])
        for name in names
    )


def test_redis_restarted_mid_stream_reconnects_without_a_rebuild(
    tmp_path: Path, fault_report: FaultReport
) -> None:
    with FaultRun(tmp_path, "redis") as run:
        run.start_load()
        run.wait_sent(0.3)
        before = views_state(run)
        assert before[0] is not None
        with run.outage():
            run.server.stop()
            time.sleep(3)
            run.server.start()
        figures = run.finish()
        assert views_state(run) == before  # the same marker and generation: not rebuilt
    fault_report.row(
        server="redis", fault="restart, 3 s down", notes="AOF kept: reconnect", **figures.row()
    )


def test_redis_flushed_mid_stream_is_flagged_and_rebuilt_from_the_log(
    tmp_path: Path, fault_report: FaultReport
) -> None:
    with FaultRun(tmp_path, "redis") as run:
        assert run.settings is not None
        run.start_load()
        run.wait_sent(0.3)
        marker, _ = views_state(run)
        with run.outage(), replay_lock_held(run.settings):
            flushed = time.monotonic()
            client = redis.Redis.from_url(run.server.url)
            try:
                client.flushall()
            finally:
                client.close()
            deadline = time.monotonic() + 60
            while not said_not_ready(run, ("views", "gateway"), flushed):
                assert time.monotonic() < deadline, "the loss was never flagged"
                time.sleep(0.05)
        figures = run.finish()
        after, generation = views_state(run)
        assert after is not None
        assert after != marker  # a new marker: rebuilt
        assert generation is not None
        assert generation.startswith(b"r")
    fault_report.row(
        server="redis",
        fault="FLUSHALL",
        notes="rebuilt from the log; recovery = the rebuild",
        **figures.row(),
    )
