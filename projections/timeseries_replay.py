"""`iot replay timeseries`: rebuild the InfluxDB telemetry from the INGEST stream, then switch.

The namespace is a retention policy of the live database. The live projector writes, and the
gateway reads, naming no policy, so both follow the database's *default* policy; making another
policy the default (`ALTER RETENTION POLICY ... DEFAULT`, one change of InfluxDB's meta store)
switches readers and writers in one step, with no configuration to roll out. A rebuild goes
into a new policy `r<epoch ms>` with the live default's duration and shard group duration:

1. drop what an interrupted replay left (non-default policies named `r<digits>`);
2. carry over the history the stream no longer holds: INGEST keeps 30 days, InfluxDB may keep
   more, so points older than the receipt of the stream's first telemetry message are copied
   from the live policy (`SELECT INTO`, one shard group per statement);
3. read the stream from its first message (an ephemeral consumer), decode and encode as the
   live projector does, and write into the new policy, the next fetch overlapping the write;
   messages the live projector dead-lettered (undecodable, refused) are only counted;
4. once within a batch of the stream's end: make the new policy the default; follow up to the
   last telemetry message as read right after the switch (what the live projector wrote into
   the old policy just before it), then drop the old policy once the grace period
   (`iot.replay.SWITCH_GRACE_S`) since the switch has passed.

The rollups (`projections.rollups`) are part of the generation: the new policy `r<ms>` comes
with `r<ms>_1m` and `r<ms>_1h` (durations from `IOT_RETENTION_*`, as the raw policy's). The
old rollups are carried over whole (they may reach further back than the raw data), then
every window with raw data in the rebuild is recomputed from it in bulk once caught up; the
batches written after that recompute their windows as the live projector does, and those
written after the switch are recomputed once more after the grace period, when no live
projector can still be writing a rollup computed before them. Raw data and rollups therefore
switch together and never disagree.

An interruption before the switch leaves the live policy untouched: the rebuild is dropped on
the way out or, after SIGKILL, by the next run's step 1.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import re
import time
from collections import deque
from collections.abc import AsyncIterator, Collection, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

import msgspec
import nats.js.errors
from nats.aio.msg import Msg

from domain.ingest import Telemetry, decode_ingest
from infra.replay import (
    LogTail,
    Progress,
    ReplayContext,
    ReplayError,
    Report,
    follow,
    stream_reach,
    wait_caught_up,
)
from infra.rollups import LEVELS, Level, duration_ms, rollup_policies
from infra.streams import Streams
from projections.influx import (
    DatabaseNotFound,
    InfluxClient,
    InfluxError,
    RetentionPolicy,
    quote_ident,
    quote_string,
)
from projections.lineproto import DEVICE_TAG, MEASUREMENT, LineProtocolError, TelemetryEncoder
from projections.rollups import Rollups, Touched, rollup_lock
from projections.timeseries import PointWriter

BATCH = 2_000  # messages per fetch (about 120 kB of line protocol for one-reading messages)
WRITES_IN_FLIGHT = 2  # batches written concurrently while the next one is fetched
LEFTOVER = re.compile(r"r\d+")  # the names this replay gives its policies
ROLLUP_SUFFIXES = tuple(level.suffix for level in LEVELS)
COPY_TIMEOUT_S = 3_600.0  # one carry-over statement copies a whole shard group
FIRST_MESSAGE_PROBES = 100  # undecodable messages passed over looking for the first receipt
RECHECKS = 5  # a verification re-compares differing devices this often (live ingest moves on)
RECHECK_PAUSE_S = 1.0
DEVICES_PER_QUERY = 200  # device_id = '...' OR ... terms in one statement


@dataclass(frozen=True)
class FieldStats:
    """A field's number of values and, when numeric, their sum, for one device."""

    count: int = 0
    sum: float | None = None


Stats = dict[str, dict[str, FieldStats]]  # device_id -> field -> stats


def parse_stats(results: list[dict[str, object]]) -> Stats:
    """`SELECT count(*), sum(*) ... GROUP BY device_id` as device -> field -> stats (`sum(*)`
    only covers numeric fields, so strings and booleans have a count and no sum)."""
    stats: Stats = {}
    series_list = results[0].get("series") if results else None
    if not isinstance(series_list, list):
        return stats
    for series in series_list:
        device = str(series["tags"][DEVICE_TAG])
        fields = stats.setdefault(device, {})
        for column, value in zip(series["columns"], series["values"][0], strict=True):
            kind, _, name = column.partition("_")
            if value is None or kind not in ("count", "sum"):
                continue
            current = fields.get(name, FieldStats())
            if kind == "count":
                fields[name] = FieldStats(int(value), current.sum)
            else:
                fields[name] = FieldStats(current.count, float(value))
    return stats


def _same_sum(a: float | None, b: float | None) -> bool:
    if a is None or b is None:
        return a is b
    return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-9)  # summation order may differ


def compare(live: Stats, rebuilt: Stats) -> dict[str, list[str]]:
    """The devices whose fields differ, each with a line per differing field."""
    differences: dict[str, list[str]] = {}
    for device in sorted(live.keys() | rebuilt.keys()):
        old, new = live.get(device, {}), rebuilt.get(device, {})
        lines = []
        for name in sorted(old.keys() | new.keys()):
            a, b = old.get(name, FieldStats()), new.get(name, FieldStats())
            if a.count != b.count:
                lines.append(
                    f"device {device} field {name}: count live={a.count} rebuilt={b.count}"
                )
            elif not _same_sum(a.sum, b.sum):
                lines.append(f"device {device} field {name}: sum live={a.sum} rebuilt={b.sum}")
        if lines:
            differences[device] = lines
    return differences


def _generation_of(name: str) -> str:
    """The raw policy a policy belongs to (itself, or the base of `<P>_1m` / `<P>_1h`)."""
    for suffix in ROLLUP_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def leftovers(policies: Sequence[RetentionPolicy]) -> list[RetentionPolicy]:
    """Policies an interrupted replay left: named like ours (a rebuild's raw or rollup
    policies) and not of the default generation."""
    live = {p.name for p in policies if p.default}
    return [
        p
        for p in policies
        if LEFTOVER.fullmatch(_generation_of(p.name))
        and _generation_of(p.name) not in live
        and not p.default
    ]


def new_policy_name(policies: Sequence[RetentionPolicy], now_ms: int) -> str:
    """`r<epoch ms>`, later than any policy of ours (names then sort by age)."""
    taken = [int(p.name[1:]) for p in policies if LEFTOVER.fullmatch(p.name)]
    return f"r{max([now_ms, *(t + 1 for t in taken)])}"


def _default(policies: Sequence[RetentionPolicy], database: str) -> RetentionPolicy:
    for policy in policies:
        if policy.default:
            return policy
    raise ReplayError(f"InfluxDB database {database!r} has no default retention policy")


def _iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="milliseconds")


class ReplaySink:
    """The follower's handler: decodes and encodes a batch, then writes it in the background
    so that fetching the next batch overlaps the write; at most `depth` writes in flight."""

    def __init__(
        self,
        writer: PointWriter,
        progress: Progress,
        *,
        encoder: TelemetryEncoder | None = None,
        depth: int = WRITES_IN_FLIGHT,
    ) -> None:
        self.writer = writer
        self.progress = progress
        self.encoder = encoder or TelemetryEncoder()
        self.depth = depth
        self.delivered = 0  # messages handed to `handle`
        self.messages = 0  # messages whose points are stored (or that were skipped)
        self.points = 0
        self.skipped = 0  # undecodable, not representable, or refused by InfluxDB
        self._writes: deque[asyncio.Task[None]] = deque()
        self.rollups: Rollups | None = None  # set: each batch recomputes its windows in `policy`
        self.policy = ""
        self.touched_since: Touched | None = None  # set: collects the windows written since

    async def handle(self, msgs: Sequence[Msg]) -> None:
        self.delivered += len(msgs)
        groups: list[bytes] = []
        lines: list[int] = []
        skipped = 0
        encode = self.encoder.encode
        touched = Touched() if self.rollups is not None else None
        for msg in msgs:
            try:
                message = decode_ingest(msg.data)
                if not isinstance(message, Telemetry):
                    skipped += 1
                    continue
                text = encode(message)
            except (msgspec.DecodeError, msgspec.ValidationError, LineProtocolError):
                skipped += 1
                continue
            groups.append(text.encode())
            lines.append(text.count("\n"))
            if touched is not None:
                touched.add(message.device_id, message.readings)
        while len(self._writes) >= self.depth:
            await self._writes.popleft()
        self._writes.append(
            asyncio.create_task(self._write(groups, lines, len(msgs), skipped, touched))
        )

    async def _write(
        self, groups: list[bytes], lines: list[int], n: int, skipped: int, touched: Touched | None
    ) -> None:
        refused = await self.writer.write_groups(groups)
        if touched is not None and self.rollups is not None:
            await self.rollups.update(touched, policy=self.policy)
            if self.touched_since is not None:
                self.touched_since.update(touched)
        self.skipped += skipped + len(refused)
        self.points += sum(lines) - sum(lines[i] for i in refused)
        self.messages += n
        self.progress.advance(n)

    async def drain(self) -> None:
        """Wait for the writes in flight (raising the first failure)."""
        while self._writes:
            await self._writes.popleft()

    async def abandon(self) -> None:
        """Cancel the writes in flight (the rebuild is being discarded)."""
        for task in self._writes:
            task.cancel()
        await asyncio.gather(*self._writes, return_exceptions=True)
        self._writes.clear()


@dataclass
class _Build:
    """A rebuild in progress: the follower keeps writing into `new` until stopped or `until`."""

    old: RetentionPolicy
    new: str
    stream: str
    first_receipt: int | None
    carried: int
    sink: ReplaySink
    rollups: Rollups
    tail: LogTail
    follower: asyncio.Task[None]
    caught_up_after: float  # seconds from the first fetch to caught up
    caught_up_messages: int  # messages and points written by then
    caught_up_points: int
    until: int | None = None  # follow up to this stream sequence
    switched: bool = False  # the new policy is the default: never drop it
    notes: list[str] = field(default_factory=list)

    def rate(self) -> str:
        took = max(self.caught_up_after, 1e-9)
        return (
            f"{self.sink.messages:,} telemetry messages, {self.sink.points:,} points written; "
            f"caught up after {self.caught_up_messages:,} messages in {took:.1f} s "
            f"({self.caught_up_messages / took:,.0f} messages/s, "
            f"{self.caught_up_points / took:,.0f} points/s)"
        )

    def carry_line(self) -> str:
        since = (
            f"older than {_iso(self.first_receipt)} (the stream's first telemetry receipt)"
            if self.first_receipt is not None
            else "(the stream holds no telemetry: all of them)"
        )
        return f"{self.carried:,} points {since} carried over from {self.old.name!r}"


class TimeseriesReplay:
    """The `timeseries` projection's replay (see the module docstring)."""

    def __init__(self, context: ReplayContext) -> None:
        self.context = context
        self.settings = context.settings
        self.streams = Streams(context.settings.namespace)
        self.subject = self.streams.ingest_kind_wildcard("telemetry")

    def _client(self, retention_policy: str | None = None) -> InfluxClient:
        return InfluxClient(
            self.settings.influx_url, self.settings.influx_db, retention_policy=retention_policy
        )

    def _source(self, policy: str) -> str:
        """`"db"."policy".telemetry`: names quoted, so statements built with it are safe."""
        return f"{quote_ident(self.settings.influx_db)}.{quote_ident(policy)}.{MEASUREMENT}"

    async def plan(self) -> list[str]:
        db = self.settings.influx_db
        reach = await stream_reach(self.context.js, self.streams.ingest)
        messages = await self._telemetry_messages(reach.first_seq)
        first = await self._first_receipt(reach.first_seq) if messages else None
        lines = [f"timeseries: InfluxDB {self.settings.influx_url} database {db!r}"]
        async with self._client() as influx:
            try:
                policies = await influx.retention_policies()
            except DatabaseNotFound:
                policies = None
            if policies is None:
                lines.append("database missing: would be created (nothing to carry over)")
            else:
                old = _default(policies, db)
                values = _values(await self._stats(influx, old.name))
                lines.append(
                    f"live: default retention policy {old.name!r} (duration {old.duration}, "
                    f"shard groups {old.shard_group_duration}): {values:,} field values"
                )
                lines += [
                    f"would drop retention policy {p.name!r} (left by an interrupted replay)"
                    for p in leftovers(policies)
                ]
                carried = _values(await self._stats(influx, old.name, before=first))
                since = f"older than {_iso(first)}" if first is not None else "(all of them)"
                lines.append(f"would carry over {carried:,} field values {since} from {old.name!r}")
        name = new_policy_name(policies or [], int(time.time() * 1000))
        lines.append(
            f"would build retention policy {name!r} from {reach.describe()}; "
            f"{messages:,} of them telemetry ({self.subject})"
        )
        lines.append(
            f"with its rollups in {', '.join(repr(p) for p in rollup_policies(name))} "
            f"(raw {self.settings.retention_raw}, 1m {self.settings.retention_1m}, "
            f"1h {self.settings.retention_1h}), the old rollups carried over"
        )
        if first is not None:
            lines.append(f"first telemetry message received {_iso(first)}")
        return lines

    async def run(self, progress: Progress) -> Report:
        db = self.settings.influx_db
        async with self._client() as influx, self._building(influx, progress) as build:
            build.sink.touched_since = Touched()  # the windows written from the switch on
            await influx.set_default_retention_policy(build.new)
            switched = time.monotonic()
            build.switched = True
            progress.note(
                f"timeseries: {build.new!r} is the default retention policy of {db!r} now; "
                "following the stream to its end"
            )
            # InfluxDB resolves the default policy per request, so every write the live
            # projector sends from now on lands in the rebuild; one it sent before carries
            # messages it had fetched already, at or below the end read now.
            build.until = await self._last_telemetry_seq()
            await build.follower  # returns once the tail has passed `until`
            await build.sink.drain()
            # a query already running on the old policy ends before it is dropped
            await asyncio.sleep(max(0.0, self.context.grace - (time.monotonic() - switched)))
            # a live projector's rollup update computed before our last writes is over too:
            # recompute what was written since the switch once more
            await build.rollups.update(build.sink.touched_since, policy=build.new)
            for name in (build.old.name, *rollup_policies(build.old.name)):
                await influx.drop_retention_policy(name)
            progress.note(f"timeseries: dropped the old retention policy {build.old.name!r}")
        return Report(
            lines=[
                *build.notes,
                f"timeseries: rebuilt retention policy {build.new!r} of {db!r} from stream "
                f"{build.stream} with its rollups and made it the default",
                build.rate(),
                build.carry_line(),
                f"{build.sink.skipped:,} messages skipped (undecodable or refused: the live "
                "projector dead-lettered them)",
                f"old retention policy {build.old.name!r} dropped",
            ]
        )

    async def verify(self, progress: Progress) -> Report:
        async with self._client() as influx, self._building(influx, progress) as build:
            progress.note(f"timeseries: comparing {build.old.name!r} with {build.new!r}")
            await self._written_to_end(build)
            live = await self._stats(influx, build.old.name)
            differences = compare(live, await self._stats(influx, build.new))
            for _ in range(RECHECKS):
                if not differences:
                    break
                await asyncio.sleep(RECHECK_PAUSE_S)  # the follower and live ingest move on
                await self._written_to_end(build)
                devices = sorted(differences)
                differences = compare(
                    await self._stats(influx, build.old.name, devices=devices),
                    await self._stats(influx, build.new, devices=devices),
                )
        return Report(
            lines=[
                *build.notes,
                f"timeseries: compared {len(live):,} devices ({_values(live):,} field values) "
                f"of {build.old.name!r} with a rebuild from stream {build.stream}",
                build.rate(),
                build.carry_line(),
                f"{build.sink.skipped:,} messages skipped (undecodable or refused)",
                f"rebuild {build.new!r} discarded; {build.old.name!r} untouched",
            ],
            differences=[line for device in sorted(differences) for line in differences[device]],
        )

    @contextlib.asynccontextmanager
    async def _building(self, influx: InfluxClient, progress: Progress) -> AsyncIterator[_Build]:
        """Build a new policy up to caught up and yield it with its follower still running.
        On the way out the follower is stopped and, unless it became the default, the new
        policy is dropped (a verification's discard; an interrupted replay's cleanup)."""
        db = self.settings.influx_db
        await influx.create_database()
        policies = await influx.retention_policies()
        old = _default(policies, db)
        notes = []
        for leftover in leftovers(policies):
            await influx.drop_retention_policy(leftover.name)
            notes.append(
                f"dropped retention policy {leftover.name!r} left by an interrupted replay"
            )
            progress.note(f"timeseries: {notes[-1]}")
        new = new_policy_name(policies, int(time.time() * 1000))
        duration = self.settings.retention_raw
        same = duration_ms(duration) == duration_ms(old.duration)
        await influx.create_retention_policy(
            new,
            duration=duration,
            shard_duration=old.shard_group_duration if same else None,
            replication=1,
        )
        rollups = Rollups(  # the live projectors' lock: after the switch both write the rebuild
            influx,
            retention_1m=self.settings.retention_1m,
            retention_1h=self.settings.retention_1h,
            shared=rollup_lock(self.context.js, self.streams, db),
        )
        progress.note(f"timeseries: building retention policy {new!r} beside {old.name!r} ({db})")
        writes = self._client(new)
        writer = PointWriter(writes)
        sink = ReplaySink(writer, progress)
        tail: LogTail | None = None
        follower: asyncio.Task[None] | None = None
        stop = asyncio.Event()
        build: _Build | None = None
        ok = False
        try:
            reach = await stream_reach(self.context.js, self.streams.ingest)
            first = await self._first_receipt(reach.first_seq) if reach.messages else None
            await rollups.ensure_policies(new)
            carried = await self._carry_over(influx, old.name, new, first, progress)
            names = {p.name for p in policies}
            for level in LEVELS:
                if level.policy(old.name) in names:
                    await self._carry_rollups(influx, level, old.name, new, progress)
            tail = LogTail(
                self.context.nc, self.streams.ingest, self.subject, reach.first_seq, batch=BATCH
            )
            await tail.open()
            total = await tail.remaining()
            progress.phase("timeseries: telemetry", total=total, unit="messages")
            started = time.monotonic()
            follower = asyncio.create_task(
                follow(tail, sink.handle, stop, until=lambda: build.until if build else None)
            )
            await wait_caught_up(
                [tail],
                [follower],
                self.context.caught_up,
                on_wait=lambda left: progress.advance(0, total=sink.delivered + left),
            )
            caught_up = time.monotonic() - started
            sink.rollups, sink.policy = rollups, new  # from now on each batch recomputes...
            await sink.drain()  # ...and the bulk covers every batch written before
            groups = await influx.shard_groups(new)
            progress.phase("timeseries: rollups", total=len(groups), unit="shard groups")
            for start, end in groups:
                await rollups.rebuild(new, start, end)
                progress.advance(1)
            build = _Build(
                old,
                new,
                self.streams.ingest,
                first,
                carried,
                sink,
                rollups,
                tail,
                follower,
                caught_up,
                sink.messages,
                sink.points,
                notes=notes,
            )
            yield build
            ok = True
        finally:
            stop.set()
            if follower is not None:
                if not ok:
                    follower.cancel()
                await asyncio.gather(follower, return_exceptions=not ok)
            await (sink.drain() if ok else sink.abandon())
            if tail is not None:
                await tail.close()
            await writes.aclose()
            if not (build and build.switched):
                await self._discard(influx, new)

    async def _written_to_end(self, build: _Build) -> None:
        """Wait until the rebuild holds every telemetry message the stream holds now ("caught
        up" leaves up to a batch unread), the follower still running."""
        end = await self._last_telemetry_seq()
        while build.tail.last_seq < end:
            if build.follower.done():
                build.follower.result()
                raise ReplayError("the log reader stopped before the end of the stream")
            await asyncio.sleep(0.05)
        await build.sink.drain()

    async def _discard(self, influx: InfluxClient, name: str) -> None:
        """Drop the rebuild (and its rollups) unless it is the default (an ALTER whose answer
        got lost)."""
        with contextlib.suppress(InfluxError):
            policies = await influx.retention_policies()
            if any(p.name == name and not p.default for p in policies):
                for policy in (name, *rollup_policies(name)):
                    await influx.drop_retention_policy(policy)

    async def _carry_rollups(
        self, influx: InfluxClient, level: Level, old: str, new: str, progress: Progress
    ) -> None:
        """Copy a level's old windows whole (they may reach further back than the raw data;
        the windows with raw data in the rebuild are recomputed from it afterwards)."""
        source, target = level.policy(old), level.policy(new)
        groups = await influx.shard_groups(source)
        progress.phase(f"timeseries: carry-over of the {level.name} rollups", total=len(groups))
        db = quote_ident(self.settings.influx_db)
        measurement = quote_ident(level.measurement)
        for start, end in groups:
            try:
                await influx.query(
                    f"SELECT * INTO {db}.{quote_ident(target)}.{measurement} "  # noqa: S608
                    f"FROM {db}.{quote_ident(source)}.{measurement} "
                    f"WHERE time >= {start}ms AND time < {end}ms GROUP BY *",
                    max_seconds=COPY_TIMEOUT_S,
                )
            except InfluxError as e:  # a shorter retention than before: the older windows go
                if "beyond retention policy" not in str(e):
                    raise
            progress.advance(1)

    async def _carry_over(
        self,
        influx: InfluxClient,
        old: str,
        new: str,
        before: int | None,
        progress: Progress,
    ) -> int:
        """Copy the old policy's points older than `before` (all when None) into `new`; one
        statement per shard group, so each reads one shard and reports progress."""
        groups = [(s, e) for s, e in await influx.shard_groups(old) if before is None or s < before]
        progress.phase("timeseries: carry-over", total=len(groups), unit="shard groups")
        written = 0
        for start, end in groups:
            upto = end if before is None else min(end, before)
            try:
                results = await influx.query(
                    f"SELECT * INTO {self._source(new)} FROM {self._source(old)} "  # noqa: S608
                    f"WHERE time >= {start}ms AND time < {upto}ms GROUP BY *",
                    max_seconds=COPY_TIMEOUT_S,
                )
            except InfluxError as e:  # a shorter IOT_RETENTION_RAW: the older points go
                if "beyond retention policy" not in str(e):
                    raise
                results = []
            series = results[0].get("series") if results else None
            if series:
                written += int(series[0]["values"][0][1])
            progress.advance(1)
        return written

    async def _stats(
        self,
        influx: InfluxClient,
        policy: str,
        *,
        before: int | None = None,
        devices: Collection[str] | None = None,
    ) -> Stats:
        """Per device and field: count and sum, optionally only before a time or for some
        devices (in statements of at most `DEVICES_PER_QUERY` of them)."""
        head = f"SELECT count(*), sum(*) FROM {self._source(policy)}"  # noqa: S608
        time_filter = f"time < {before}ms" if before is not None else None
        if devices is None:
            where = f" WHERE {time_filter}" if time_filter else ""
            return parse_stats(await influx.query(f"{head}{where} GROUP BY {DEVICE_TAG}"))
        stats: Stats = {}
        ordered = sorted(devices)
        for i in range(0, len(ordered), DEVICES_PER_QUERY):
            terms = " OR ".join(
                f"{quote_ident(DEVICE_TAG)} = {quote_string(d)}"
                for d in ordered[i : i + DEVICES_PER_QUERY]
            )
            where = f"({terms})" + (f" AND {time_filter}" if time_filter else "")
            stats.update(
                parse_stats(await influx.query(f"{head} WHERE {where} GROUP BY {DEVICE_TAG}"))
            )
        return stats

    async def _telemetry_messages(self, first_seq: int) -> int:
        """How many telemetry messages the stream holds (a consumer's pending count)."""
        tail = LogTail(self.context.nc, self.streams.ingest, self.subject, first_seq)
        await tail.open()
        try:
            return await tail.remaining()
        finally:
            await tail.close()

    async def _first_receipt(self, first_seq: int) -> int | None:
        """`received_at` of the stream's first decodable telemetry message (None: none found,
        then everything is carried over, which is merely slower)."""
        seq = first_seq
        for _ in range(FIRST_MESSAGE_PROBES):
            try:
                raw = await self.context.js.get_msg(
                    self.streams.ingest, seq=seq, next=True, subject=self.subject
                )
            except nats.js.errors.NotFoundError:
                return None
            with contextlib.suppress(msgspec.DecodeError, msgspec.ValidationError):
                message = decode_ingest(raw.data or b"")
                if isinstance(message, Telemetry):
                    return message.received_at
            seq = int(raw.seq or seq) + 1
        return None

    async def _last_telemetry_seq(self) -> int:
        """The stream sequence of the last telemetry message now (0: there is none)."""
        try:
            raw = await self.context.js.get_msg(self.streams.ingest, subject=self.subject)
        except nats.js.errors.NotFoundError:
            return 0
        return int(raw.seq or 0)


def _values(stats: Stats) -> int:
    return sum(f.count for fields in stats.values() for f in fields.values())
