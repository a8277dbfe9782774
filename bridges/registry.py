"""The bridge's in-memory device registry (device id -> lifecycle status), built from the
EVENTS stream with an ordered ephemeral consumer from the start that keeps following."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

import msgspec
from nats.js.api import DeliverPolicy
from nats.js.client import JetStreamContext

from bridges import metrics
from domain.published import (
    DeviceDecommissioned,
    DeviceRegistered,
    DeviceResumed,
    DeviceSuspended,
    PublishedEvent,
    decode_event,
)
from iot.streams import Streams

log = logging.getLogger(__name__)


class DeviceRegistry:
    """Lifecycle status per device; `devices` is what validation reads."""

    def __init__(self) -> None:
        self.devices: dict[str, str] = {}
        self.sequence = 0  # last stream sequence applied

    def apply(self, event: PublishedEvent) -> None:
        if isinstance(event, DeviceRegistered):
            self.devices[event.device_id] = event.status
        elif isinstance(event, DeviceDecommissioned):
            self.devices[event.device_id] = "decommissioned"
        elif isinstance(event, DeviceSuspended):
            if self.devices.get(event.device_id) != "decommissioned":
                self.devices[event.device_id] = "suspended"
        elif isinstance(event, DeviceResumed) and self.devices.get(event.device_id) not in (
            None,
            "decommissioned",
        ):
            self.devices[event.device_id] = event.status

    def apply_raw(self, sequence: int, data: bytes) -> None:
        """Apply one stream message; an undecodable one is logged and skipped."""
        try:
            self.apply(decode_event(data))
        except msgspec.DecodeError as e:
            log.warning("skipping undecodable event", extra={"seq": sequence, "error": str(e)})
        self.sequence = max(self.sequence, sequence)
        metrics.REGISTRY_DEVICES.set(len(self.devices))
        metrics.REGISTRY_SEQUENCE.set(self.sequence)


async def follow(
    js: JetStreamContext,
    streams: Streams,
    registry: DeviceRegistry,
    caught_up: asyncio.Event,
    stop: asyncio.Event,
) -> None:
    """Follow the EVENTS stream into `registry`; set `caught_up` once the last sequence seen
    at start is applied. Survives NATS outages (the ordered consumer recreates itself)."""
    target = None
    backoff = 0.2
    while target is None and not stop.is_set():
        try:
            info = await js.stream_info(streams.events)
            target = int(info.state.last_seq)
        except Exception as e:
            log.warning("EVENTS stream not reachable; retrying", extra={"error": repr(e)})
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), backoff)
            backoff = min(backoff * 2, 5.0)
    if target is None:
        return

    def check() -> None:
        if registry.sequence >= target:
            caught_up.set()

    async def on_message(msg: Any) -> None:
        registry.apply_raw(msg.metadata.sequence.stream, msg.data)
        if not caught_up.is_set():
            check()

    check()
    sub = None
    while sub is None and not stop.is_set():
        try:
            sub = await js.subscribe(
                streams.events_wildcard,
                stream=streams.events,
                cb=on_message,
                ordered_consumer=True,
                idle_heartbeat=2.0,
                deliver_policy=DeliverPolicy.ALL,
            )
        except Exception as e:
            log.warning("cannot follow EVENTS; retrying", extra={"error": repr(e)})
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), backoff)
            backoff = min(backoff * 2, 5.0)
    await stop.wait()
    if sub is not None:
        with contextlib.suppress(Exception):
            await sub.unsubscribe()
