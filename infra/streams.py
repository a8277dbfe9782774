"""JetStream stream and subject names, prefixed by the namespace so instances stay apart."""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass

from nats.js.api import (
    DiscardPolicy,
    KeyValueConfig,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)
from nats.js.client import JetStreamContext
from nats.js.errors import BucketNotFoundError, NotFoundError
from nats.js.kv import KeyValue

log = logging.getLogger(__name__)

DAY = 24 * 3600
DEADLETTER_MAX_AGE = float(14 * DAY)  # seconds; IOT_DEADLETTER_MAX_AGE
DEADLETTER_MAX_BYTES = 1024**3  # IOT_DEADLETTER_MAX_BYTES


@dataclass(frozen=True)
class Streams:
    namespace: str = ""

    def _stream(self, name: str) -> str:
        return f"{self.namespace.upper()}_{name}" if self.namespace else name

    def _subject(self, name: str) -> str:
        return f"{self.namespace}.{name}" if self.namespace else name

    @property
    def events(self) -> str:
        """Domain events published by the relay, in commit order; kept forever."""
        return self._stream("EVENTS")

    @property
    def ingest(self) -> str:
        """Device messages published by the bridge."""
        return self._stream("INGEST")

    @property
    def deadletter(self) -> str:
        """Rejected input with its reason."""
        return self._stream("DEADLETTER")

    @property
    def secrets_bucket(self) -> str:
        """KV bucket in memory (never on disk, entries expire): device secrets handed from the
        command API to the auth projector once, keyed `<device_id>.<version>`."""
        return self._stream("SECRETS")

    @property
    def leases_bucket(self) -> str:
        """KV bucket in memory with a short TTL: leader leases (one command dispatcher)."""
        return self._stream("LEASES")

    def event_subject(self, device_id: str) -> str:
        return self._subject(f"events.{device_id}")

    def rule_subject(self, rule_id: str) -> str:
        """Alert-rule events, in the EVENTS stream beside the device events."""
        return self._subject(f"rules.{rule_id}")

    def ingest_subject(self, kind: str, device_id: str) -> str:
        """`ingest.<kind>.<device_id>`, kind one of telemetry, status, reported, ack, sent."""
        return self._subject(f"ingest.{kind}.{device_id}")

    def ingest_kind_wildcard(self, kind: str) -> str:
        return self._subject(f"ingest.{kind}.*")

    def deadletter_subject(self, reason: str) -> str:
        """`deadletter.<reason>`; headers carry the reason, topic and detail, data the bytes."""
        return self._subject(f"deadletter.{reason}")

    def consumer(self, name: str) -> str:
        """A durable consumer name, unique per namespace."""
        return f"{self.namespace}_{name}" if self.namespace else name

    @property
    def events_wildcard(self) -> str:
        return self._subject("events.>")

    @property
    def rules_wildcard(self) -> str:
        return self._subject("rules.>")

    @property
    def ingest_wildcard(self) -> str:
        return self._subject("ingest.>")

    @property
    def deadletter_wildcard(self) -> str:
        return self._subject("deadletter.>")

    def configs(
        self,
        replicas: int = 1,
        *,
        deadletter_max_age: float = DEADLETTER_MAX_AGE,
        deadletter_max_bytes: int = DEADLETTER_MAX_BYTES,
    ) -> list[StreamConfig]:
        """The streams; DEADLETTER is bounded in age and size (the oldest go first)."""
        return [
            _config(
                self.events,
                [self.events_wildcard, self.rules_wildcard],
                "Domain events (devices, alert rules), one message per stored event, commit order",
                max_age=0.0,
                duplicate_window=float(DAY),
                replicas=replicas,
            ),
            _config(
                self.ingest,
                [self.ingest_wildcard],
                "Device telemetry, status, reported state and acks from the bridge",
                max_age=float(30 * DAY),
                duplicate_window=120.0,
                replicas=replicas,
            ),
            _config(
                self.deadletter,
                [self.deadletter_wildcard],
                "Rejected input: reason, topic and original bytes",
                max_age=deadletter_max_age,
                duplicate_window=120.0,
                replicas=replicas,
                max_bytes=deadletter_max_bytes,
            ),
        ]


SECRET_TTL_S = 15 * 60.0
LEASE_TTL_S = 10.0


def kv_configs(streams: Streams, replicas: int = 1) -> list[KeyValueConfig]:
    """The KV buckets; both in memory, so nothing in them outlives its TTL or reaches a disk."""
    return [
        KeyValueConfig(
            bucket=streams.secrets_bucket,
            description="Device secrets on their way to the broker's dynamic security plugin",
            history=1,
            ttl=SECRET_TTL_S,
            storage=StorageType.MEMORY,
            replicas=replicas,
        ),
        KeyValueConfig(
            bucket=streams.leases_bucket,
            description="Leader leases",
            history=1,
            ttl=LEASE_TTL_S,
            storage=StorageType.MEMORY,
            replicas=replicas,
        ),
    ]


def _config(
    name: str,
    subjects: list[str],
    description: str,
    *,
    max_age: float,
    duplicate_window: float,
    replicas: int,
    max_bytes: int = -1,
) -> StreamConfig:
    return StreamConfig(
        name=name,
        subjects=subjects,
        description=description,
        retention=RetentionPolicy.LIMITS,
        discard=DiscardPolicy.OLD,
        storage=StorageType.FILE,
        num_replicas=replicas,
        max_age=max_age,
        duplicate_window=duplicate_window,
        max_bytes=max_bytes,
    )


async def open_bucket(js: JetStreamContext, streams: Streams, bucket: str) -> KeyValue:
    """A KV bucket of `kv_configs`, created again if it is gone.

    Both are held in memory, so a NATS restart (every server of the cluster at once, or the one
    server of a development machine) loses them with their contents; whoever needs one next
    recreates it, with the replicas the EVENTS stream has, instead of failing until someone
    runs `iot migrate` again. Creating an existing bucket with the same configuration is a
    no-op, so processes racing to recreate it agree."""
    try:
        return await js.key_value(bucket)
    except BucketNotFoundError:
        pass
    replicas = 1
    with contextlib.suppress(NotFoundError):
        info = await js.stream_info(streams.events)
        replicas = info.config.num_replicas or 1
    [config] = [c for c in kv_configs(streams, replicas) if c.bucket == bucket]
    log.warning("KV bucket missing (NATS restarted?): created again", extra={"bucket": bucket})
    return await js.create_key_value(config)
