"""The one-time handover of a device secret from the command API to the auth projector.

The event store keeps only the secret's hash; the broker's dynamic security plugin needs the
secret itself. The command API puts it, after the event is stored, into a JetStream KV bucket
held in memory with a TTL (`Streams.secrets_bucket`), keyed by device id and the version of the
event that issued it; the auth projector takes it when it applies that event and deletes it.
Nothing of it reaches a disk or the log; an entry nobody takes is gone after the TTL.
"""

from __future__ import annotations

import contextlib

from nats.js.client import JetStreamContext
from nats.js.errors import KeyNotFoundError

from infra.streams import Streams, open_bucket


def secret_key(device_id: str, version: int) -> str:
    return f"{device_id}.{version}"


async def hand_over(
    js: JetStreamContext, streams: Streams, device_id: str, version: int, secret: str
) -> None:
    kv = await open_bucket(js, streams, streams.secrets_bucket)
    await kv.put(secret_key(device_id, version), secret.encode())


async def take(js: JetStreamContext, streams: Streams, device_id: str, version: int) -> str | None:
    """The secret issued by event `version` of the device, or None if none is (still) there."""
    kv = await open_bucket(js, streams, streams.secrets_bucket)
    try:
        entry = await kv.get(secret_key(device_id, version))
    except KeyNotFoundError:
        return None
    if entry.value is None or entry.operation is not None:
        return None
    return entry.value.decode()


async def forget(js: JetStreamContext, streams: Streams, device_id: str, version: int) -> None:
    """Remove the secret once the broker has it."""
    kv = await open_bucket(js, streams, streams.secrets_bucket)
    with contextlib.suppress(KeyNotFoundError):
        await kv.purge(secret_key(device_id, version))
