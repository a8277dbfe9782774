"""Relay lag: from an event's `at` (set just before its save) to JetStream, per event."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Set
from dataclasses import dataclass, field
from typing import Any

from domain.published import decode_event
from infra.streams import Streams


@dataclass
class LagProbe:
    """An ordered JetStream consumer of the namespace's events; keeps those of one phase."""

    prefix: str
    stored: dict[str, float] = field(default_factory=dict)  # key -> JetStream time - at (s)
    received: dict[str, float] = field(default_factory=dict)  # key -> our receipt - at (s)
    duplicates: int = 0
    subscription: Any = None
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    async def start(self, nc: Any, streams: Streams) -> None:
        from nats.js.api import DeliverPolicy

        self.subscription = await nc.jetstream().subscribe(
            streams.events_wildcard,
            cb=self._on_message,
            ordered_consumer=True,
            deliver_policy=DeliverPolicy.NEW,
        )

    async def stop(self) -> None:
        if self.subscription is not None:
            await self.subscription.unsubscribe()
            self.subscription = None

    async def wait_for(self, keys: Set[str], within: float) -> bool:
        """Wait until every key has arrived, at most `within` seconds; return whether it did."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within
        while not keys <= self.received.keys():
            self.changed.clear()
            try:
                await asyncio.wait_for(self.changed.wait(), deadline - loop.time())
            except TimeoutError:
                return False
        return True

    async def _on_message(self, msg: Any) -> None:
        now = time.time()
        event = decode_event(msg.data)
        if not event.device_id.startswith(self.prefix):
            return
        key = f"{event.device_id}:{event.version}"
        if key in self.received:
            self.duplicates += 1
            return
        at = event.at.timestamp()
        self.received[key] = now - at
        self.stored[key] = msg.metadata.timestamp.timestamp() - at
        self.changed.set()
