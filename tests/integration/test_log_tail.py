"""`LogTail` on real JetStream: every message from the start sequence is handed out once, in
stream order, in batches of at most `batch`, whether it waits for whole batches (replays) or
lingers (the live analytics loop), while messages keep arriving across expired requests."""

from __future__ import annotations

import asyncio

import nats
import pytest

from infra.replay import LogTail
from infra.settings import Settings
from infra.streams import Streams

pytestmark = pytest.mark.integration

BATCH = 50


async def _publish(js: nats.js.JetStreamContext, streams: Streams, n: int, first: int) -> None:
    for i in range(first, first + n):
        await js.publish(streams.ingest_subject("telemetry", f"d{i % 7}"), str(i).encode())


@pytest.mark.parametrize("linger", [None, 0.01])
async def test_every_message_is_handed_out_once_in_order_while_it_keeps_arriving(
    migrated: Settings, linger: float | None
) -> None:
    streams = Streams(migrated.namespace)
    nc = await nats.connect(migrated.nats_url)
    js = nc.jetstream()
    await _publish(js, streams, 30, 0)  # 1..30 in the stream; the tail starts at 11
    tail = LogTail(nc, streams.ingest, streams.ingest_wildcard, 11, batch=BATCH)
    await tail.open()
    seen: list[int] = []
    sizes: list[int] = []
    try:

        async def trickle() -> None:  # bursts with pauses longer than a request's expiry
            for burst in range(6):
                await _publish(
                    js, streams, 20 + 17 * burst, 30 + sum(20 + 17 * b for b in range(burst))
                )
                await asyncio.sleep(0.3)

        producer = asyncio.create_task(trickle())
        total = 30 + sum(20 + 17 * b for b in range(6))
        for _ in range(400):
            msgs = await tail.fetch(0.1, linger=linger)
            sizes.append(len(msgs))
            seen += [int(m.data) for m in msgs]
            if len(seen) >= total - 10 and producer.done():
                break
        await producer
        assert seen == list(range(10, total))
        assert tail.last_seq == total
        assert max(sizes) <= BATCH
        assert 0 < min(s for s in sizes if s) < BATCH  # partial batches are handed out
        assert await tail.remaining() == 0
    finally:
        await tail.close()
        await nc.close()
