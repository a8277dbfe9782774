"""`iot replay views`: rebuild the device views in a new Redis generation, then switch to it.

Sources, as the contract says: domain events from the event store (PostgreSQL, the log of
record, read in commit order), then the EVENTS stream from the sequence the store read began
at (an event found in both is applied once: the event script skips an applied version); device
messages from the INGEST stream's first message on. Both are applied by the live projector's
own code (`ViewsProjector.apply_events` / `apply_ingest`) into the new generation's keys with
change notifications off. The checkpoint of the new generation starts at (stream sequence
before the store read, largest position read), so consistency tokens hold across the switch.

The switch is one script setting `{ns}:views:current` (see infra.views), refused if Redis lost
the generation being built meanwhile. Once the drain below is done, a second script writes the
loss marker when absent and removes the rebuilding flag: after a loss
(`projections.views_recovery`) readers are answered from the rebuild only once it holds
everything the log held at the switch, and live projectors resume then. The live projector picks the
new generation up at its next batch, the gateway within its cache time. The rebuild keeps
following both streams up to their end as read right after the switch, so whatever the live
projector put into the old generation before it noticed is in the new one too. The old
generation's keys are removed once `iot.replay.SWITCH_GRACE_S` has passed since the switch.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import redis.asyncio as aioredis
from nats.aio.msg import Msg
from redis.exceptions import ResponseError

from infra.eventstore import DeviceStore, open_store
from infra.jetstream import Outcome
from infra.replay import (
    LogTail,
    Progress,
    ReplayContext,
    ReplayError,
    Report,
    digest,
    follow,
    store_pages,
    stream_reach,
    wait_caught_up,
)
from infra.streams import Streams
from infra.views import (
    DEFAULT_GENERATION,
    SEVERITIES,
    STATUSES,
    ViewKeys,
    current_key,
    marker_key,
    rebuilding_key,
    replay_key,
    views_root,
)
from projections import views_scripts
from projections.views import ViewsProjector, decode_events, plan_ingest

VERIFY_ROUNDS = 5  # a difference must persist this many comparisons (1 s apart) to count
DELETE_CHUNK = 1_000


@dataclass
class Counts:
    events: int = 0  # domain events read (store and stream)
    messages: int = 0  # device messages read
    skipped: dict[str, int] = field(default_factory=dict)  # reason -> inputs not applied

    def skip(self, reason: str, n: int = 1) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + n


@dataclass
class Build:
    """A generation being built, with its followers still running."""

    generation: str
    keys: ViewKeys
    stop: asyncio.Event
    tasks: list[asyncio.Task[None]]
    tails: list[LogTail]
    bounds: dict[str, int | None]
    counts: Counts
    started: float


class ViewsReplay:
    def __init__(self, context: ReplayContext) -> None:
        self.context = context
        self.settings = context.settings
        self.namespace = context.settings.namespace
        self.streams = Streams(self.namespace)
        self._redis: aioredis.Redis | None = None

    @property
    def redis(self) -> aioredis.Redis:
        if self._redis is None:
            self._redis = aioredis.Redis.from_url(self.settings.redis_url)
        return self._redis

    async def current(self) -> str:
        raw = await self.redis.get(current_key(self.namespace))
        return _text(raw) if raw else DEFAULT_GENERATION

    # --- dry run -----------------------------------------------------------------------

    async def plan(self) -> list[str]:
        try:
            generation = await self.current()
            keys = ViewKeys.for_namespace(self.namespace, generation)
            devices = await self.redis.zcard(keys.devices)
            position = int(await self.redis.get(keys.position) or 0)
            leftovers = await self.redis.hgetall(replay_key(self.namespace))
            store = await asyncio.to_thread(open_store, self.settings)
            try:
                max_position = await asyncio.to_thread(store.max_position)
            finally:
                await asyncio.to_thread(store.close)
            events = await stream_reach(self.context.js, self.streams.events)
            ingest = await stream_reach(self.context.js, self.streams.ingest)
        finally:
            await self._close()
        lines = [
            f"views: readers use generation {generation!r} ({devices:,} devices, "
            f"domain events applied up to position {position:,})",
            f"would rebuild into a new generation from: the event store (positions up to "
            f"{max_position:,}), then {events.describe()}; device messages from "
            f"{ingest.describe()}",
            f"the rebuild reaches back as far as {self.streams.ingest} does: device messages "
            "older than its first message (30 days kept) leave no trace in the rebuilt views "
            "(last seen, latest metric values, online and reported state come from it)",
        ]
        for role, gen in sorted(leftovers.items()):
            lines.append(
                f"an interrupted replay left generation {_text(gen)!r} ({_text(role)}): "
                "it will be removed first"
            )
        return lines

    # --- replay --------------------------------------------------------------------------

    async def run(self, progress: Progress) -> Report:
        try:
            build = await self._build(progress)
            old = await self.current()
            try:
                await self._switch(build, old, progress)
                await self._drain(build, progress)
                await self._finish(build)
            finally:
                await self._stop(build)
            removed = await self._remove_generation(old)
            await self.redis.hdel(replay_key(self.namespace), "retiring")
            return self._report(build, old, removed, switched=True)
        finally:
            await self._close()

    async def verify(self, progress: Progress) -> Report:
        try:
            build = await self._build(progress)
            live = ViewKeys.for_namespace(self.namespace, await self.current())
            try:
                progress.note(f"views: comparing generation {live.generation!r} with the rebuild")
                differences = await self._compare(live, build.keys)
            finally:
                await self._stop(build)
                await self._remove_generation(build.generation)
                await self.redis.hdel(replay_key(self.namespace), "building")
            report = self._report(build, live.generation, 0, switched=False)
            report.differences = differences
            return report
        finally:
            await self._close()

    async def _build(self, progress: Progress) -> Build:
        await self._clean_leftovers(progress)
        generation = f"r{int(time.time() * 1000)}"
        await self.redis.hset(replay_key(self.namespace), "building", generation)
        keys = ViewKeys.for_namespace(self.namespace, generation).silent()
        projector = ViewsProjector(self.redis, None, self.namespace, keys=keys)
        await projector.scripts.load()
        js = self.context.js
        events_reach = await stream_reach(js, self.streams.events)
        ingest_reach = await stream_reach(js, self.streams.ingest)
        counts = Counts()
        stop = asyncio.Event()
        bounds: dict[str, int | None] = {"events": None, "ingest": None}
        progress.note(f"views: building generation {generation!r}")

        ingest_tail = LogTail(
            self.context.nc,
            self.streams.ingest,
            self.streams.ingest_wildcard,
            ingest_reach.first_seq,
        )
        await ingest_tail.open()
        tails = [ingest_tail]
        tasks: list[asyncio.Task[None]] = []
        build = Build(generation, keys, stop, tasks, tails, bounds, counts, time.monotonic())

        async def on_ingest(msgs: Sequence[Msg]) -> None:
            await self._apply_ingest(projector, keys, msgs, counts)
            progress.advance(len(msgs))

        try:
            tasks.append(
                asyncio.create_task(follow(ingest_tail, on_ingest, stop, lambda: bounds["ingest"]))
            )
            store = await asyncio.to_thread(open_store, self.settings)
            try:
                max_position = await asyncio.to_thread(store.max_position)
                progress.phase(
                    "views",
                    max_position + ingest_reach.messages,
                    unit="events and messages",
                )
                await self._replay_store(store, projector, keys, max_position, counts, progress)
            finally:
                await asyncio.to_thread(store.close)
            await self.redis.eval(
                views_scripts.SEED,
                2,
                keys.position,
                keys.position_seq,
                events_reach.last_seq,
                max_position,
            )
            events_tail = LogTail(
                self.context.nc,
                self.streams.events,
                "",  # the whole stream: the devices' events and the rules'
                events_reach.last_seq + 1,
            )
            await events_tail.open()
            tails.append(events_tail)

            async def on_events(msgs: Sequence[Msg]) -> None:
                await self._apply_stream_events(projector, keys, msgs, counts)
                progress.advance(len(msgs))

            tasks.append(
                asyncio.create_task(follow(events_tail, on_events, stop, lambda: bounds["events"]))
            )
            await wait_caught_up(tails, tasks, self.context.caught_up)
        except BaseException:
            await self._stop(build)
            raise
        progress.finish()
        progress.note(f"views: generation {generation!r} caught up with the log")
        return build

    async def _replay_store(
        self,
        store: DeviceStore,
        projector: ViewsProjector,
        keys: ViewKeys,
        max_position: int,
        counts: Counts,
        progress: Progress,
    ) -> None:
        """Every domain event up to `max_position`, in commit order, a page at a time; the
        next page is read (in a thread) while this one is applied."""
        start = 1
        async for page in store_pages(store, start=start, upto=max_position):
            last = page[-1].position
            applied = await projector.apply_events(keys, list(enumerate(page)))
            if applied.retry:
                raise ReplayError(
                    f"event store positions {page[0].position}..{last}: "
                    f"{len(applied.retry)} event(s) out of version order"
                )
            counts.events += len(page)
            counts.skip("missing_registration", len(applied.missing))
            progress.advance(last - start + 1)
            start = last + 1

    async def _apply_stream_events(
        self, projector: ViewsProjector, keys: ViewKeys, msgs: Sequence[Msg], counts: Counts
    ) -> None:
        batch = decode_events(msgs)
        counts.skip("undecodable_event", len(batch.undecodable))
        positions = {i: event.position for i, event in batch.events}
        events = batch.events
        for _ in range(50):
            applied = await projector.apply_events(keys, events)
            counts.skip("missing_registration", len(applied.missing))
            if not applied.retry:
                break
            # a gap: only while the live projector writes the same generation (after the
            # switch) may an event's predecessor still be in flight elsewhere
            events = [(i, e) for i, e in events if i in applied.retry]
            await asyncio.sleep(0.1)
        else:
            raise ReplayError(f"{len(applied.retry)} domain event(s) stayed out of version order")
        counts.events += len(msgs)
        await projector.checkpoint(keys, msgs, positions, Outcome())

    async def _apply_ingest(
        self, projector: ViewsProjector, keys: ViewKeys, msgs: Sequence[Msg], counts: Counts
    ) -> None:
        batch = plan_ingest(msgs)
        counts.skip("undecodable_ingest", len(batch.undecodable))
        await projector.apply_ingest(keys, batch.plan)
        counts.messages += len(msgs)

    # --- switch, drain, retire ------------------------------------------------------------

    async def _switch(self, build: Build, old: str, progress: Progress) -> None:
        """One script: readers move and the old generation is recorded for removal, unless
        Redis lost the generation being built meanwhile."""
        await self._script(
            views_scripts.SWITCH,
            [current_key(self.namespace), replay_key(self.namespace)],
            [build.generation, old],
            f"generation {build.generation!r} was lost before the switch",
        )
        progress.note(f"views: readers switched from {old!r} to {build.generation!r}")

    async def _finish(self, build: Build) -> None:
        """After the drain: the views hold the log; write the loss marker if absent and
        remove the rebuilding flag (infra.views), unless Redis lost the generation meanwhile."""
        await self._script(
            views_scripts.FINISH,
            [
                current_key(self.namespace),
                marker_key(self.namespace),
                rebuilding_key(self.namespace),
            ],
            [build.generation, secrets.token_hex(16)],
            f"generation {build.generation!r} was lost after the switch",
        )

    async def _script(self, source: str, keys: list[str], args: list[str], lost: str) -> None:
        try:
            await self.redis.eval(source, len(keys), *keys, *args)
        except ResponseError as e:
            if str(e).startswith(views_scripts.LOST):
                raise ReplayError(
                    f"{lost} (Redis lost its data during the replay): run it again"
                ) from e
            raise

    async def _drain(self, build: Build, progress: Progress) -> None:
        """Follow up to the streams' ends as read right after the switch, then wait out the
        rest of the grace period.

        A live projector resolves the generation after it fetched a batch, so a batch it puts
        into the old generation holds messages fetched before the switch: at or below these
        ends. The gateway may read the old generation for up to its cache time after the switch:
        the old generation is removed only after the grace period."""
        switched = time.monotonic()
        js = self.context.js
        build.bounds["events"] = (await stream_reach(js, self.streams.events)).last_seq
        build.bounds["ingest"] = (await stream_reach(js, self.streams.ingest)).last_seq
        for task in build.tasks:
            await task
        progress.note("views: the new generation holds everything the old one received")
        await asyncio.sleep(max(0.0, self.context.grace - (time.monotonic() - switched)))

    async def _stop(self, build: Build) -> None:
        build.stop.set()
        for task in build.tasks:
            if not task.done():
                task.cancel()
        for task in build.tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        for tail in build.tails:
            await tail.close()

    async def _clean_leftovers(self, progress: Progress) -> None:
        """Remove generations an interrupted replay left (never the one in use)."""
        current = await self.current()
        left = await self.redis.hgetall(replay_key(self.namespace))
        for role, raw in left.items():
            generation = _text(raw)
            if generation != current:
                removed = await self._remove_generation(generation)
                progress.note(
                    f"views: removed generation {generation!r} left by an interrupted replay "
                    f"({_text(role)}, {removed:,} keys)"
                )
            await self.redis.hdel(replay_key(self.namespace), role)

    async def _remove_generation(self, generation: str) -> int:
        """Delete every key of a generation; returns how many."""
        pattern = f"{views_root(self.namespace)}:{generation}:*"
        removed = 0
        batch: list[bytes] = []
        async for key in self.redis.scan_iter(match=pattern, count=DELETE_CHUNK):
            batch.append(key)
            if len(batch) >= DELETE_CHUNK:
                removed += await self.redis.unlink(*batch)
                batch = []
        if batch:
            removed += await self.redis.unlink(*batch)
        return removed

    # --- verification ---------------------------------------------------------------------

    async def _compare(self, live: ViewKeys, rebuilt: ViewKeys) -> list[str]:
        """Per device, a digest of its hash; per index, its members; differences that persist
        over `VERIFY_ROUNDS` comparisons (live input may be moving both)."""
        differing = await self._differing(live, rebuilt, None)
        for _ in range(VERIFY_ROUNDS - 1):
            if not differing:
                break
            await asyncio.sleep(1.0)
            differing = await self._differing(live, rebuilt, differing)
        return [differing[name] for name in sorted(differing)]

    async def _differing(
        self, live: ViewKeys, rebuilt: ViewKeys, only: dict[str, str] | None
    ) -> dict[str, str]:
        found: dict[str, str] = {}
        index_keys = {
            "devices index": (live.devices, rebuilt.devices),
            "online set": (live.online, rebuilt.online),
            **{
                f"status {status} set": (live.status(status), rebuilt.status(status))
                for status in STATUSES
            },
        }
        for name, (a, b) in index_keys.items():
            if only is not None and name not in only:
                continue
            left, right = await self._members(a), await self._members(b)
            if left != right:
                found[name] = (
                    f"{name}: {len(left - right):,} only live {sorted(left - right)[:5]}, "
                    f"{len(right - left):,} only rebuilt {sorted(right - left)[:5]}"
                )
        for severity in SEVERITIES:
            counts = [await self.redis.get(k.alerts_open(severity)) for k in (live, rebuilt)]
            name = f"open {severity} alerts"
            if int(counts[0] or 0) != int(counts[1] or 0) and (only is None or name in only):
                found[name] = f"{name}: live {int(counts[0] or 0)}, rebuilt {int(counts[1] or 0)}"
        pending = [await self.redis.get(k.commands_pending) for k in (live, rebuilt)]
        if int(pending[0] or 0) != int(pending[1] or 0) and (
            only is None or "commands pending" in only
        ):
            found["commands pending"] = (
                f"commands pending: live {int(pending[0] or 0)}, rebuilt {int(pending[1] or 0)}"
            )
        if only is None:
            ids = sorted(
                (await self._members(live.devices)) | (await self._members(rebuilt.devices))
            )
        else:
            ids = [name[len("device ") :] for name in only if name.startswith("device ")]
        for start in range(0, len(ids), 500):
            chunk = ids[start : start + 500]
            async with self.redis.pipeline(transaction=False) as pipe:
                for device_id in chunk:
                    pipe.hgetall(live.device(device_id))
                    pipe.hgetall(rebuilt.device(device_id))
                hashes: list[dict[bytes, bytes]] = await pipe.execute()
            for i, device_id in enumerate(chunk):
                mine, theirs = hashes[2 * i], hashes[2 * i + 1]
                if digest(mine) != digest(theirs):
                    found[f"device {device_id}"] = (
                        f"device {device_id}: {_field_diff(mine, theirs)}"
                    )
        return found

    async def _members(self, key: str) -> set[str]:
        kind = _text(await self.redis.type(key))
        if kind == "zset":
            raw: Any = await self.redis.zrange(key, 0, -1)
        elif kind == "set":
            raw = await self.redis.smembers(key)
        else:
            raw = []
        return {_text(m) for m in raw}

    # --- end ------------------------------------------------------------------------------

    def _report(self, build: Build, old: str, removed: int, switched: bool) -> Report:
        took = max(time.monotonic() - build.started, 1e-9)
        done = build.counts.events + build.counts.messages
        lines = [
            f"views: generation {build.generation!r}: {build.counts.events:,} domain events and "
            f"{build.counts.messages:,} device messages in {took:.1f} s ({done / took:,.0f}/s)"
        ]
        for reason, n in sorted(build.counts.skipped.items()):
            if n:
                lines.append(f"views: {n:,} input(s) not applied ({reason}; as live)")
        if switched:
            lines.append(
                f"views: readers use {build.generation!r}; generation {old!r} removed "
                f"({removed:,} keys)"
            )
        else:
            lines.append(f"views: rebuild discarded; readers still use {old!r}")
        return Report(lines=lines)

    async def _close(self) -> None:
        if self._redis is not None:
            await self._redis.aclose()
            self._redis = None


def _field_diff(live: dict[bytes, bytes], rebuilt: dict[bytes, bytes]) -> str:
    if not live:
        return "only in the rebuild"
    if not rebuilt:
        return "only in the live view"
    names = sorted({*live, *rebuilt})
    parts = []
    for name in names:
        if live.get(name) != rebuilt.get(name):
            parts.append(
                f"{name.decode()} live={_short(live.get(name))} rebuilt={_short(rebuilt.get(name))}"
            )
    return "; ".join(parts)


def _text(raw: bytes | str) -> str:
    return raw.decode() if isinstance(raw, bytes) else raw


def _short(raw: bytes | None) -> str:
    if raw is None:
        return "absent"
    text = raw.decode(errors="replace")
    return text if len(text) <= 60 else text[:57] + "..."
