"""The in-memory KV buckets come back by themselves after a NATS restart lost them."""

from __future__ import annotations

import nats
import pytest

from infra import secrets
from infra.settings import Settings
from infra.streams import LEASE_TTL_S, SECRET_TTL_S, Streams, open_bucket
from projections.rollups import rollup_lock

pytestmark = pytest.mark.integration


async def test_a_lost_bucket_is_created_again_by_whoever_needs_it(migrated: Settings) -> None:
    streams = Streams(migrated.namespace)
    nc = await nats.connect(migrated.nats_url)
    try:
        js = nc.jetstream()
        lock = rollup_lock(js, streams, migrated.influx_db)
        async with lock:
            pass
        await secrets.hand_over(js, streams, "d1", 1, "s3cret")
        for bucket in (streams.leases_bucket, streams.secrets_bucket):
            await js.delete_key_value(bucket)  # what a restart of an in-memory NATS leaves

        async with lock:  # its handle is stale: it opens the bucket again
            pass
        assert await secrets.take(js, streams, "d1", 1) is None  # the secret went with it
        await secrets.hand_over(js, streams, "d2", 1, "again")
        assert await secrets.take(js, streams, "d2", 1) == "again"

        for bucket, ttl in (
            (streams.leases_bucket, LEASE_TTL_S),
            (streams.secrets_bucket, SECRET_TTL_S),
        ):
            status = await (await open_bucket(js, streams, bucket)).status()
            assert status.bucket == bucket
            assert status.ttl == ttl
    finally:
        await nc.close()
