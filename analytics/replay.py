"""`iot replay analytics`: rebuild the evaluation state from the log.

The replay takes the replay lock, on which every live replica lets its partitions go, then
takes every partition itself, forgets every checkpoint, reads the EVENTS stream (devices,
rules) and evaluates INGEST from its first message, appending the transitions it derives: the
log already holds every one of them (the aggregate refuses what it holds), so a replay of a
healthy system appends nothing, and it says how many it did. It ends by checkpointing every
partition; the live replicas take the partitions back from there. `--verify` evaluates the
same way, appends and checkpoints nothing, and reports each derived transition the log does
not hold as a difference.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from datetime import UTC, datetime

from analytics.coordination import Checkpoint, Coordinator
from analytics.engine import Decision, Partition
from analytics.service import FETCH_WAIT_S, TICK_MARGIN_MS, Analytics
from analytics.writer import AlertWriter, Written
from infra.eventstore import open_store
from infra.replay import LogTail, Progress, ReplayContext, ReplayError, Report, stream_reach

TAKEOVER_S = 60.0  # how long the live replicas have to let their partitions go


class AnalyticsReplay:
    def __init__(self, context: ReplayContext) -> None:
        self.context = context
        self.settings = context.settings
        self.partitions = self.settings.analytics_partitions

    async def plan(self) -> list[str]:
        from infra.streams import Streams

        streams = Streams(self.settings.namespace)
        ingest = await stream_reach(self.context.js, streams.ingest)
        events = await stream_reach(self.context.js, streams.events)
        return [
            "analytics: forget every checkpoint, read the rules and devices from "
            f"{events.describe()}, evaluate {ingest.describe()} across {self.partitions} "
            "partitions, append the transitions the log does not hold (none, normally), "
            "checkpoint; the live replicas pause meanwhile",
        ]

    async def run(self, progress: Progress) -> Report:
        return await self._replay(progress, verify=False)

    async def verify(self, progress: Progress) -> Report:
        return await self._replay(progress, verify=True)

    async def _replay(self, progress: Progress, *, verify: bool) -> Report:
        coordinator = Coordinator(self.settings, self.partitions)
        await coordinator.connect()
        store = await asyncio.to_thread(open_store, self.settings)
        service = Analytics(self.settings, self.context.nc, store)
        service.writer = AlertWriter(store, lambda: datetime.now(UTC), dry_run=verify)
        try:
            if not await coordinator.take_replay_lock():
                raise ReplayError("another analytics replay holds the replay lock")
            await self._take_all(coordinator, progress)
            if not verify:
                await coordinator.wipe()
            return await self._evaluate(service, coordinator, progress, verify=verify)
        finally:
            service.writer.close()
            with contextlib.suppress(Exception):
                await coordinator.close()  # every lock with it
            store.close()

    async def _take_all(self, coordinator: Coordinator, progress: Progress) -> None:
        progress.phase("waiting for the live replicas to let their partitions go", None)
        deadline = time.monotonic() + TAKEOVER_S
        while len(coordinator.owned) < self.partitions:
            await coordinator.acquire(self.partitions)
            if len(coordinator.owned) == self.partitions:
                return
            if time.monotonic() > deadline:
                left = self.partitions - len(coordinator.owned)
                raise ReplayError(
                    f"the live analytics replicas still hold {left} partitions after "
                    f"{TAKEOVER_S:.0f} s"
                )
            await asyncio.sleep(0.2)

    async def _evaluate(
        self, service: Analytics, coordinator: Coordinator, progress: Progress, *, verify: bool
    ) -> Report:
        streams, nc = service.streams, self.context.nc
        service._events = LogTail(nc, streams.events, "", 1)
        await service._events.open()
        progress.phase("reading rules and devices", None)
        await service.catch_up_events()
        service.caught_up = True
        ingest = await stream_reach(self.context.js, streams.ingest)
        start = max(ingest.first_seq, 1)
        for number in range(self.partitions):
            service.engine.hold(Partition(number, start - 1))
        tail = LogTail(nc, streams.ingest, streams.ingest_wildcard, start)
        await tail.open()
        total = Written()
        derived: list[Decision] = []
        progress.phase("evaluating", ingest.messages, "messages")
        try:
            while True:
                started = time.time()
                msgs = await tail.fetch(FETCH_WAIT_S)
                await service.catch_up_events()
                decisions: list[Decision] = []
                service.evaluate(msgs, decisions)
                caught_up = not msgs and await tail.remaining() == 0
                if caught_up:
                    service.engine.tick_all(int(started * 1000) - TICK_MARGIN_MS, decisions)
                if decisions:
                    total.add(await asyncio.to_thread(service.writer.write, decisions))
                    derived.extend(decisions)
                progress.advance(len(msgs))
                if caught_up:
                    break
        finally:
            await tail.close()
            await service._events.close()
        if not verify:
            parts = service.engine.held.values()
            await coordinator.save([Checkpoint(p.number, p.seq, p.dump()) for p in parts])
            await coordinator.save_catalog(service.catalog.events_seq, service.catalog.snapshot())
        counts = service.engine.counts
        report = Report(
            lines=[
                f"analytics: {counts.readings:,} readings evaluated ({counts.evaluations:,} "
                f"rule evaluations, {counts.late:,} late) across {self.partitions} partitions",
                f"analytics: {len(derived):,} transitions derived, {total.known:,} already in "
                f"the log, {total.appended:,} transitions appended"
                + (" (verify: none actually)" if verify else ""),
            ]
        )
        if total.unknown_devices:
            report.lines.append(f"analytics: {total.unknown_devices} unknown devices skipped")
        if verify and total.appended:
            report.differences.append(
                f"{total.appended} derived transitions are not in the event store"
            )
        return report
