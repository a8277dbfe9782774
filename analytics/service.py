"""`iot run analytics`: evaluates the alert rules on the INGEST stream and appends the alert
transitions to the event store; notifies Alertmanager.

One loop per replica, so evaluation state is never shared between tasks:

1. rebalance (every second): release partitions above the fair share (checkpointed first),
   take free ones up to it, loading their checkpoints (`analytics.coordination`);
2. read a batch of INGEST (an ephemeral consumer from the oldest position of the partitions
   held: the position lives in the checkpoints, committed with the state it reflects, not in a
   JetStream consumer's acknowledgements, which could not be committed with it);
3. read the EVENTS stream up to its end as it is after that read, so every rule in effect when
   a message of the batch was stored is known (`analytics.catalog`);
4. evaluate (`analytics.engine`), tick absent series with the log's clock;
5. append the transitions to the event store (`analytics.writer`); checkpoint once a second.

A crash between 5's two steps evaluates the same messages again after restart and appends
nothing twice (the aggregate refuses what it already holds).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime

import msgspec
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from prometheus_client import Counter, Gauge, Histogram

from analytics.catalog import Catalog
from analytics.coordination import Checkpoint, Coordinator, PartitionsChanged
from analytics.engine import Decision, Engine, Partition, partition_of
from analytics.notify import Notifier, alertmanager_alert
from analytics.position import position
from analytics.writer import AlertWriter
from domain.alerts import AlertState
from domain.ingest import decode_ingest
from domain.published import decode_stream_event
from infra.eventstore import DeviceStore
from infra.replay import LogTail
from infra.settings import Settings
from infra.streams import Streams

log = logging.getLogger(__name__)
PORT = 8083
BATCH = 1000
FETCH_WAIT_S = 0.25
LINGER_S = 0.01  # a turn takes what arrived this long after its first message
REBALANCE_S = 1.0
CHECKPOINT_S = 1.0
CATALOG_SNAPSHOT_S = 30.0
TICK_MARGIN_MS = 1000  # the live absent clock trails the moment the stream was last seen empty

READINGS = Counter("iot_analytics_readings_total", "Readings evaluated")
EVALUATIONS = Counter(
    "iot_analytics_rules_evaluated_total", "Rule evaluations (a reading of a rule's series)"
)
LATE = Counter(
    "iot_analytics_late_readings_total", "Readings at or before their series' evaluation point"
)
TRANSITIONS = Counter(
    "iot_analytics_transitions_total", "Alert transitions appended to the event store", ["kind"]
)
ALERTS = Gauge("iot_analytics_alerts", "Open alerts of the replica's partitions", ["status"])
LAG = Gauge("iot_analytics_lag_messages", "INGEST messages not yet evaluated by this replica")
OWNED = Gauge("iot_analytics_partitions_owned", "Partitions this replica owns")
PARTITIONS = Gauge("iot_analytics_partitions", "Partitions the devices are hashed into")
CHECKPOINT = Histogram(
    "iot_analytics_checkpoint_seconds",
    "Time to write the checkpoints of one batch",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
)
DECISION_LAG = Histogram(
    "iot_analytics_decision_seconds",
    "From the log time of what concluded a transition to its append to the event store",
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0),
)


class Analytics:
    """One replica's evaluation loop and what it owns."""

    def __init__(
        self,
        settings: Settings,
        nc: NATS,
        store: DeviceStore,
        *,
        notifier: Notifier | None = None,
        clock: Callable[[], float] = time.time,
        batch: int = BATCH,
    ) -> None:
        self.settings = settings
        self.nc = nc
        self.js = nc.jetstream()
        self.streams = Streams(settings.namespace)
        self.store = store
        self.notifier = notifier
        self.clock = clock
        self.batch = batch
        self.partitions = settings.analytics_partitions
        self.coordinator = Coordinator(settings, self.partitions)
        self.writer = AlertWriter(store, lambda: datetime.now(UTC))
        self.catalog = Catalog()
        self.engine = Engine(self.catalog, self.partitions)
        self.caught_up = False  # the catalog has read the EVENTS stream to its end once
        self._events: LogTail | None = None
        self._ingest: LogTail | None = None
        self._dirty: set[int] = set()
        self._saved: dict[int, int] = {}  # partition -> the sequence of its last checkpoint
        self._checkpointed_at = 0.0
        self._rebalanced_at = 0.0
        self._snapshot_at = 0.0
        PARTITIONS.set(self.partitions)

    # -- the loop --------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        """Evaluate until `stop`; on a lost connection, start over from the checkpoints."""
        while not stop.is_set():
            try:
                await self._start()
                while not stop.is_set():
                    await self.step()
                await self._stop()
            except (asyncio.CancelledError, PartitionsChanged):
                raise
            except Exception as e:
                log.exception("analytics loop failed; starting over from the checkpoints")
                log.warning("analytics restart", extra={"error": repr(e)})
                await self._reset()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), timeout=1.0)
        await self._reset()

    async def _start(self) -> None:
        await self.coordinator.connect()
        await self.coordinator.join()
        blob = await self.coordinator.load_catalog()
        self.catalog = Catalog.restore(blob) if blob else Catalog()
        self.engine = Engine(self.catalog, self.partitions)
        self._events = LogTail(
            self.nc, self.streams.events, "", self.catalog.events_seq + 1, batch=self.batch
        )
        await self._events.open()
        await self.catch_up_events()
        self.caught_up = True
        log.info(
            "analytics catalog caught up",
            extra={
                "events_seq": self.catalog.events_seq,
                "devices": len(self.catalog.devices),
                "rules": len(self.catalog.rules),
                "member": self.coordinator.member,
            },
        )

    async def step(self) -> None:
        """One turn of the loop: rebalance if due, one INGEST batch, checkpoint if due."""
        now = self.clock()
        if now - self._rebalanced_at >= REBALANCE_S:
            self._rebalanced_at = now
            await self.rebalance()
        if not self.engine.held:
            await asyncio.sleep(FETCH_WAIT_S)
            await self.catch_up_events()
            return
        await self._ensure_ingest_tail()
        assert self._ingest is not None
        started = self.clock()
        msgs = await self._ingest.fetch(FETCH_WAIT_S, linger=LINGER_S)
        await self.catch_up_events()
        decisions: list[Decision] = []
        self.evaluate(msgs, decisions)
        if len(msgs) < self.batch and await self._ingest.at_most_remaining() == 0:
            watermark = int(started * 1000) - TICK_MARGIN_MS
            self.engine.tick_all(watermark, decisions)
            LAG.set(0)
        else:
            LAG.set(await self._ingest.at_most_remaining())
        if decisions:
            await self.write(decisions)
        if self.clock() - self._checkpointed_at >= CHECKPOINT_S:
            await self.checkpoint()  # not every turn: a crash re-evaluates at most this much
        if self.clock() - self._snapshot_at >= CATALOG_SNAPSHOT_S:
            self._snapshot_at = self.clock()
            await self.coordinator.save_catalog(self.catalog.events_seq, self.catalog.snapshot())

    def evaluate(self, msgs: Sequence[Msg], decisions: list[Decision]) -> None:
        counts = self.engine.counts
        before = (counts.readings, counts.evaluations, counts.late)
        last = 0
        for msg in msgs:
            seq, stored_ms = position(msg)
            last = seq
            try:
                message = decode_ingest(msg.data)
            except (msgspec.DecodeError, msgspec.ValidationError):
                continue  # the bridge validated it; another shape is not ours to judge
            if self.engine.evaluate(seq, stored_ms, message, decisions):
                self._dirty.add(partition_of(message.device_id, self.partitions))
        if last:
            self.engine.advance(last)
        READINGS.inc(counts.readings - before[0])
        EVALUATIONS.inc(counts.evaluations - before[1])
        LATE.inc(counts.late - before[2])

    async def write(self, decisions: list[Decision]) -> None:
        written = await asyncio.to_thread(self.writer.write, decisions)
        now_ms = self.clock() * 1000
        for decision in decisions:
            DECISION_LAG.observe(max(0.0, (now_ms - decision.stored_ms) / 1000))
        for kind, n in written.kinds.items():
            TRANSITIONS.labels(kind).inc(n)
        for decision in decisions:
            self._dirty.add(partition_of(decision.device_id, self.partitions))

    async def checkpoint(self) -> None:
        """Checkpoint the held partitions that moved since their last checkpoint."""
        started = time.perf_counter()
        parts = [
            p
            for p in self.engine.held.values()
            if p.number in self._dirty or self._saved.get(p.number) != p.seq
        ]
        if parts:
            await self.coordinator.save([Checkpoint(p.number, p.seq, p.dump()) for p in parts])
            CHECKPOINT.observe(time.perf_counter() - started)
            for p in parts:
                self._saved[p.number] = p.seq
        self._dirty.clear()
        self._checkpointed_at = self.clock()

    # -- the EVENTS stream -----------------------------------------------------------------

    async def catch_up_events(self) -> None:
        """Apply the EVENTS stream up to its end as it is now."""
        assert self._events is not None
        info = await self.js.stream_info(self.streams.events)
        end = int(info.state.last_seq or 0)
        while self._events.last_seq < end:
            msgs = await self._events.fetch(FETCH_WAIT_S, linger=LINGER_S)
            if not msgs:
                if await self._events.remaining() == 0:
                    break
                continue
            for msg in msgs:
                seq, stored_ms = position(msg)
                try:
                    event = decode_stream_event(msg.data)
                except (msgspec.DecodeError, msgspec.ValidationError) as e:
                    log.warning("undecodable event skipped", extra={"seq": seq, "error": str(e)})
                    self.catalog.events_seq = max(self.catalog.events_seq, seq)
                    continue
                change = self.catalog.apply(seq, stored_ms, event)
                if change is not None and self.caught_up:
                    self._notify(change.state)
        self._gauge_alerts()

    # -- partitions ------------------------------------------------------------------------

    async def rebalance(self) -> None:
        share = await self.coordinator.fair_share()
        surplus = self.coordinator.surplus(share)
        if surplus:
            await self.checkpoint()
            for number in surplus:
                await self.coordinator.release(number)
                part = self.engine.drop(number)
                if part is not None:
                    self._forget_notifications(number)
            log.info("analytics released partitions", extra={"partitions": surplus})
        taken = await self.coordinator.acquire(share)
        for number in taken:
            checkpoint = await self.coordinator.load(number)
            if checkpoint is None:
                part = Partition(number, await self._fresh_position())
            else:
                part = Partition.load(number, checkpoint.seq, checkpoint.state, self.catalog)
            self.engine.hold(part)
            self._saved[number] = part.seq if checkpoint is not None else -1
            self._notify_partition(number)
        if taken:
            log.info("analytics took partitions", extra={"partitions": taken})
        OWNED.set(len(self.coordinator.owned))

    async def _fresh_position(self) -> int:
        """Where a partition never checkpointed starts: the start of INGEST, or, while no rule
        exists at all, its end (nothing before it can be evaluated by any rule)."""
        info = await self.js.stream_info(self.streams.ingest)
        if self.catalog.rules:
            return max(int(info.state.first_seq or 1) - 1, 0)
        return int(info.state.last_seq or 0)

    async def _ensure_ingest_tail(self) -> None:
        """Keep the INGEST tail unless a held partition needs a message it has handed out
        already (one just taken, from a checkpoint behind the others): then reopen it there."""
        start = min(p.seq for p in self.engine.held.values()) + 1
        if self._ingest is not None and start > self._ingest.last_seq:
            return
        if self._ingest is not None:
            await self._ingest.close()
        self._ingest = LogTail(
            self.nc, self.streams.ingest, self.streams.ingest_wildcard, start, batch=self.batch
        )
        await self._ingest.open()

    # -- notifications and gauges ----------------------------------------------------------

    def _owned_device(self, device_id: str) -> bool:
        return partition_of(device_id, self.partitions) in self.engine.held

    def _notify(self, state: AlertState) -> None:
        if self.notifier is None or not self._owned_device(state.device_id):
            return
        info = self.catalog.devices.get(state.device_id)
        self.notifier.notify(
            state.alert_id,
            alertmanager_alert(
                state,
                device_type=info.type if info else None,
                device_labels=info.labels if info else {},
                rule_name=self.catalog.rule_name(state.rule_id),
                gateway_url=self.settings.gateway_public_url or None,
                now_ms=int(self.clock() * 1000),
                resend_s=self.notifier.resend_s,
            ),
        )

    def _notify_partition(self, number: int) -> None:
        if self.notifier is None:
            return
        for state in self.catalog.alerts.values():
            if partition_of(state.device_id, self.partitions) == number:
                self._notify(state)

    def _forget_notifications(self, number: int) -> None:
        if self.notifier is None:
            return
        for state in self.catalog.alerts.values():
            if partition_of(state.device_id, self.partitions) == number:
                self.notifier.discard(state.alert_id)

    def _gauge_alerts(self) -> None:
        counts = {"active": 0, "acknowledged": 0}
        for state in self.catalog.alerts.values():
            if state.status in counts and self._owned_device(state.device_id):
                counts[state.status] += 1
        for status, n in counts.items():
            ALERTS.labels(status).set(n)

    def ready(self) -> Mapping[str, bool]:
        return {
            "nats": self.nc.is_connected,
            "postgres": self.coordinator.connected,
            "caught_up": self.caught_up,
        }

    # -- stopping --------------------------------------------------------------------------

    async def _stop(self) -> None:
        """Graceful: checkpoint, then let the partitions go at once (no wait for a timeout)."""
        with contextlib.suppress(Exception):
            await self.checkpoint()
        for number in list(self.coordinator.owned):
            with contextlib.suppress(Exception):
                await self.coordinator.release(number)

    async def _reset(self) -> None:
        for tail in (self._ingest, self._events):
            if tail is not None:
                with contextlib.suppress(Exception):
                    await tail.close()
        self._ingest = self._events = None
        self.caught_up = False
        self._dirty.clear()
        if self.notifier is not None:
            for state in self.catalog.alerts.values():
                self.notifier.discard(state.alert_id)
        with contextlib.suppress(Exception):
            await self.coordinator.close()
        OWNED.set(0)


async def run(settings: Settings) -> None:
    """Composition root of `iot run analytics`."""
    from starlette.routing import BaseRoute

    from infra.eventstore import open_store
    from infra.httpkit import build_app, serve
    from infra.runtime import close_nats, connect_nats, retry_async, retry_start, stop_on_signals

    stop = stop_on_signals()
    nc = await retry_async("NATS", lambda: connect_nats(settings.nats_url, "iot-analytics"))
    store = await retry_start("the event store", lambda: open_store(settings))
    notifier = Notifier(settings.alertmanager_url) if settings.alertmanager_url else None
    service = Analytics(settings, nc, store, notifier=notifier)

    async def ready() -> Mapping[str, bool]:
        return service.ready()

    from analytics.http import rule_test_routes
    from infra.httpkit import Authorizer

    authorizer = Authorizer(settings.api_tokens, settings.api_token_names)
    routes: list[BaseRoute] = rule_test_routes(
        nc, settings.namespace, authorizer, lambda: service.catalog.devices
    )
    port = settings.port_for(PORT)
    server = asyncio.create_task(serve(build_app(routes, ready), settings.http_host, port, stop))
    loop = asyncio.create_task(service.run(stop))
    tasks = {server, loop}
    notifying = asyncio.create_task(notifier.run()) if notifier is not None else None
    log.info(
        "analytics running",
        extra={
            "port": port,
            "partitions": settings.analytics_partitions,
            "alertmanager": settings.alertmanager_url or None,
        },
    )
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        for task in done:
            task.result()
    finally:
        stop.set()
        await asyncio.gather(*tasks, return_exceptions=True)
        if notifier is not None:
            await notifier.close()
        if notifying is not None:
            notifying.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await notifying
        service.writer.close()
        with contextlib.suppress(Exception):
            await close_nats(nc)
        store.close()
