"""Policies: what devices report through the bridge becomes events of their aggregates.

Three durable pull consumers on the INGEST stream, run inside `iot run commands`:

- `status` (online/offline) -> connect/disconnect at the bridge's receipt time; a repeated or
  stale status changes nothing, so redelivery and reordering are harmless;
- `ack` (the device's command ack) -> acknowledged ("ok") or failed;
- `sent` (the bridge's report that the broker took the command) -> sent.

A fetched batch is grouped by device: each device's messages are applied in stream order in
one load-decide-append (on the service's thread pool), devices concurrently. A message is
acknowledged only after its event is stored. Input that can never apply (undecodable, unknown
or decommissioned device, a refused transition) is acknowledged and logged; a store failure
is retried later (nak with delay), never dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

import msgspec
from nats.aio.msg import Msg
from nats.js.client import JetStreamContext
from prometheus_client import Counter

from commands import handlers
from domain.device import Device
from domain.errors import DomainError
from domain.ingest import KINDS as INGEST_KINDS
from domain.ingest import CommandAck, CommandSent, IngestMessage, Status, decode_ingest
from infra.jetstream import ConsumerSpec, Outcome, consume, ensure_consumer, report_lag
from infra.streams import Streams

log = logging.getLogger(__name__)

# Subjects: `ingest.status.*`, and `ingest.ack.*` carrying both the devices' acks and the
# bridge's CommandSent reports (in order, so one device's sent and ack share a write).
KINDS = ("status", "ack")
FETCH_BATCH = 200
FETCH_WAIT_S = 1.0  # an idle loop sends one pull request per second
LINGER_S = 0.002  # on the command round trip: a fetch returns 2 ms after its first message
# Pull loops per consumer. One each: a second loop would handle one device's reports in two
# concurrent writes that conflict (measured: fewer commands/s with two ack loops), and status
# reports are order-dependent (an offline applied before its online is lost).
FETCHERS = {"status": 1, "ack": 1}
RETRY_DELAY_S = 1.0

APPLIED = Counter(
    "iot_policy_messages_total",
    "Ingest messages applied to device aggregates, by kind and outcome",
    ["kind", "outcome"],
)

Run = Callable[[Callable[[], handlers.Outcome]], Awaitable[handlers.Outcome]]


def received(ms: int) -> datetime:
    """The bridge's receipt time (epoch ms) as a UTC datetime."""
    return datetime.fromtimestamp(ms / 1000, UTC)


def decision(message: IngestMessage) -> Callable[[Device], None] | None:
    """The aggregate change a report asks for; None for kinds no policy handles."""
    at = received(message.received_at)
    match message:
        case Status(online=True):
            return handlers.connect(at)
        case Status(online=False):
            return handlers.disconnect(at)
        case CommandAck():
            return handlers.acknowledge(
                message.command_id, message.status == "ok", dict(message.result), at
            )
        case CommandSent():
            return handlers.record_sent(message.command_id, at)
    return None


def consumer_spec(streams: Streams, kind: str) -> ConsumerSpec:
    return ConsumerSpec(
        stream=streams.ingest,
        durable=streams.consumer(f"commands-{kind}"),
        filter_subject=streams.ingest_kind_wildcard(kind),
        batch=FETCH_BATCH,
        retry_delay=RETRY_DELAY_S,
        fetch_wait=FETCH_WAIT_S,
        linger=LINGER_S,
    )


@dataclass(frozen=True)
class _Item:
    index: int
    message: IngestMessage
    decide: Callable[[Device], None]


class Policies:
    """The consumers' batch handler: applies reports to aggregates through the handlers."""

    def __init__(self, store: handlers.Store, run: Run) -> None:
        self._store = store
        self._run = run

    async def handle(self, msgs: Sequence[Msg]) -> Outcome:
        outcome = Outcome()
        by_device: dict[str, list[_Item]] = {}
        for index, msg in enumerate(msgs):
            try:
                message = decode_ingest(msg.data)
            except msgspec.DecodeError as e:
                APPLIED.labels("unknown", "undecodable").inc()
                log.warning("skipping undecodable ingest message", extra={"error": str(e)})
                continue
            decide = decision(message)
            if decide is None:
                APPLIED.labels(_kind(message), "ignored").inc()
                continue
            by_device.setdefault(message.device_id, []).append(_Item(index, message, decide))
        results = await asyncio.gather(
            *(self._apply(device_id, items) for device_id, items in by_device.items())
        )
        for retry in results:
            outcome.retry.update(retry)
        return outcome

    async def _apply(self, device_id: str, items: list[_Item]) -> set[int]:
        """Apply one device's reports in one append; return the indexes to retry."""

        def decide(device: Device) -> None:
            for item in items:
                try:
                    item.decide(device)
                except DomainError as e:  # e.g. a decommissioned device: never applies
                    APPLIED.labels(_kind(item.message), "refused").inc()
                    log.info(
                        "report refused by the device",
                        extra={"device_id": device_id, "reason": e.reason},
                    )

        try:
            result = await self._run(lambda: handlers.change(self._store, device_id, decide))
        except handlers.NotFound:
            _count(items, "unknown_device")
            log.info("report for an unknown device", extra={"device_id": device_id})
            return set()
        except handlers.TooMuchContention as e:
            _count(items, "retry")
            log.warning("report lost every race; retrying", extra={"error": e.reason})
            return {item.index for item in items}
        except DomainError as e:
            _count(items, "refused")
            log.info("report refused", extra={"device_id": device_id, "reason": e.reason})
            return set()
        except Exception as e:
            _count(items, "retry")
            log.warning(
                "could not store a report; retrying",
                extra={"device_id": device_id, "error": repr(e)},
            )
            return {item.index for item in items}
        _count(items, "applied" if result.changed else "unchanged")
        return set()


def _kind(message: IngestMessage) -> str:
    return INGEST_KINDS[type(message)]


def _count(items: list[_Item], outcome: str) -> None:
    for item in items:
        APPLIED.labels(_kind(item.message), outcome).inc()


async def run_policies(
    js: JetStreamContext,
    streams: Streams,
    policies: Policies,
    stop: asyncio.Event,
) -> None:
    """Consume the status, ack and sent reports until `stop` is set."""
    specs = {kind: consumer_spec(streams, kind) for kind in KINDS}
    for spec in specs.values():
        with contextlib.suppress(Exception):  # NATS down: each loop retries on its own
            await ensure_consumer(js, spec)
    loops = [
        consume(js, spec, policies.handle, stop)
        for kind, spec in specs.items()
        for _ in range(FETCHERS[kind])
    ]
    await asyncio.gather(*loops, *(report_lag(js, spec, stop) for spec in specs.values()))
