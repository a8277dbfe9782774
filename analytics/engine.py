"""Evaluation of the INGEST stream, partition by partition: the rules in effect for each message
applied to its readings, and absent conditions ticked against the log's clock.

Devices are hashed into a fixed number of partitions (`partition_of`); a partition's state is
every (rule, device) series of its devices (`SeriesState`) and the last INGEST sequence it
reflects, so it checkpoints whole and a replica that takes it over goes on exactly where the
last owner checkpointed.

The clock of `absent` is the log's: before a message is evaluated, every absent series of its
partition due at or before the time JetStream stored it raises; when the reader has caught up
with the stream, series due before the moment it last found the stream empty (less a margin)
raise too. A series raises at its due time (last reading + `for_s`, device time) if nothing
was stored before that moment, so a replay of the same log raises the same alerts at the same
device times as the live run did.
"""

from __future__ import annotations

import hashlib
import heapq
from dataclasses import dataclass, field
from typing import Literal

import msgspec

from analytics.catalog import Catalog, RuleVersion
from analytics.evaluator import (
    Clear,
    Retrigger,
    SeriesState,
    Transition,
    evaluate,
    for_ms,
    tick,
)
from domain.ingest import CommandAck, IngestMessage, Reported, Status, Telemetry, Value
from domain.rules import ANY_METRIC, Absent

SCOPE_CACHE = 200_000  # (device, catalog generation) -> the rules whose scope holds it
SeriesKey = tuple[str, str]  # (rule_id, device_id)
Kind = Literal["raised", "retriggered", "cleared"]


def partition_of(device_id: str, partitions: int) -> int:
    """The partition of a device: stable across processes, versions and machines."""
    digest = hashlib.blake2b(device_id.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") % partitions


@dataclass(frozen=True)
class Decision:
    """An alert transition the evaluation concluded, to be appended to the event store."""

    kind: Kind
    rule_id: str
    device_id: str
    severity: str
    metric: str
    value: float | None
    at_ms: int  # device time
    stored_ms: int  # log time of what concluded it (the message, or the clock of a tick)


class PartitionCheckpoint(msgspec.Struct, frozen=True, array_like=True):
    series: list[tuple[str, str, SeriesState]]


@dataclass
class Partition:
    number: int
    seq: int = 0  # every message of this partition up to this INGEST sequence is evaluated
    series: dict[SeriesKey, SeriesState] = field(default_factory=dict)
    _due: list[tuple[int, str, str]] = field(default_factory=list)  # heap of absent due times
    _scheduled: dict[SeriesKey, int] = field(default_factory=dict)

    def schedule(self, key: SeriesKey, due_ms: int) -> None:
        """Keep at most one heap entry per series: the earliest due time asked for."""
        current = self._scheduled.get(key)
        if current is not None and current <= due_ms:
            return
        self._scheduled[key] = due_ms
        heapq.heappush(self._due, (due_ms, key[0], key[1]))

    def pop_due(self, now_ms: int) -> list[SeriesKey]:
        out = []
        while self._due and self._due[0][0] <= now_ms:
            due_ms, rule_id, device_id = heapq.heappop(self._due)
            key = (rule_id, device_id)
            if self._scheduled.get(key) == due_ms:
                del self._scheduled[key]
                out.append(key)
        return out

    def dump(self) -> bytes:
        return _encode(PartitionCheckpoint([(r, d, s) for (r, d), s in self.series.items()]))

    @classmethod
    def load(cls, number: int, seq: int, blob: bytes, catalog: Catalog) -> Partition:
        part = cls(number, seq)
        for rule_id, device_id, state in _decode(blob).series:
            part.series[(rule_id, device_id)] = state
            part.reschedule((rule_id, device_id), state, catalog)
        return part

    def reschedule(self, key: SeriesKey, state: SeriesState, catalog: Catalog) -> None:
        """Schedule the series' absent tick from its state, under the rule's newest version."""
        versions = catalog.rules.get(key[0])
        if not versions or not isinstance(versions[-1].spec.condition, Absent):
            return
        if state.open or state.last_seen_ms is None:
            return
        self.schedule(key, state.last_seen_ms + for_ms(versions[-1].spec.condition.for_s))


@dataclass
class Counts:
    readings: int = 0
    evaluations: int = 0
    late: int = 0


class Engine:
    """Evaluates messages of the partitions it holds; pure (no I/O, no clock)."""

    def __init__(self, catalog: Catalog, partitions: int) -> None:
        self.catalog = catalog
        self.partitions = partitions
        self.held: dict[int, Partition] = {}
        self.counts = Counts()
        self._scope_cache: dict[tuple[str, int], list[RuleVersion]] = {}

    def hold(self, part: Partition) -> None:
        self.held[part.number] = part

    def drop(self, number: int) -> Partition | None:
        return self.held.pop(number, None)

    def evaluate(
        self, seq: int, stored_ms: int, message: IngestMessage, out: list[Decision]
    ) -> bool:
        """Evaluate one INGEST message (sequence `seq`); False if not ours or already done."""
        part = self.held.get(partition_of(message.device_id, self.partitions))
        if part is None or seq <= part.seq:
            return False
        self.tick(part, stored_ms, out)
        for rule in self._rules_for(message.device_id, stored_ms):
            readings = _readings(message, rule.spec.metric)
            if not readings:
                continue
            key = (rule.rule_id, message.device_id)
            before = part.series.get(key, _EMPTY)
            result = evaluate(rule.spec.condition, before, readings)
            self.counts.evaluations += len(readings)
            self.counts.late += result.late
            if result.state != before:
                part.series[key] = result.state
            if isinstance(rule.spec.condition, Absent):
                part.reschedule(key, result.state, self.catalog)
            _decide(rule, message.device_id, result.transitions, stored_ms, out)
        if isinstance(message, Telemetry):
            self.counts.readings += len(message.readings)
        part.seq = seq
        return True

    def advance(self, seq: int) -> None:
        """Every held partition has seen the stream up to `seq` (messages of others skipped)."""
        for part in self.held.values():
            part.seq = max(part.seq, seq)

    def tick(self, part: Partition, now_ms: int, out: list[Decision]) -> None:
        """Raise the partition's absent series due at or before `now_ms` (log time)."""
        for key in part.pop_due(now_ms):
            rule = self.catalog.rule_at(key[0], now_ms)
            state = part.series.get(key)
            if rule is None or state is None:
                continue
            new, transitions = tick(rule.spec.condition, state, now_ms)
            if new != state:
                part.series[key] = new
            if not new.open:
                part.reschedule(key, new, self.catalog)  # seen since it was scheduled
            _decide(rule, key[1], transitions, now_ms, out)

    def tick_all(self, now_ms: int, out: list[Decision]) -> None:
        for part in self.held.values():
            self.tick(part, now_ms, out)

    def _rules_for(self, device_id: str, stored_ms: int) -> list[RuleVersion]:
        """The enabled rules in effect at `stored_ms` whose scope holds the device."""
        catalog = self.catalog
        info = catalog.devices.get(device_id)
        dtype, labels = (info.type, info.labels) if info is not None else ("", {})
        if not catalog.is_current(stored_ms):
            rules = catalog.rules_at(stored_ms)
            return [r for r in rules if r.spec.scope.matches(device_id, dtype, labels)]
        key = (device_id, catalog.generation)
        cached = self._scope_cache.get(key)
        if cached is None:
            if len(self._scope_cache) > SCOPE_CACHE:
                self._scope_cache.clear()
            rules = catalog.rules_at(stored_ms)
            cached = [r for r in rules if r.spec.scope.matches(device_id, dtype, labels)]
            self._scope_cache[key] = cached
        return cached


_EMPTY = SeriesState()


def _readings(message: IngestMessage, metric: str) -> list[tuple[int, Value]]:
    """The series' readings in a message: the metric's values, or for "*" one sighting."""
    if isinstance(message, Telemetry):
        if metric == ANY_METRIC:
            return [(max(r.ts for r in message.readings), 0)] if message.readings else []
        return [(r.ts, r.values[metric]) for r in message.readings if metric in r.values]
    if metric == ANY_METRIC and isinstance(message, Status | Reported | CommandAck):
        return [(message.received_at, 0)]  # a message of the device, stamped by the bridge
    return []


def _decide(
    rule: RuleVersion,
    device_id: str,
    transitions: list[Transition],
    stored_ms: int,
    out: list[Decision],
) -> None:
    spec = rule.spec
    for t in transitions:
        kind: Kind = "raised"
        if isinstance(t, Retrigger):
            kind = "retriggered"
        elif isinstance(t, Clear):
            kind = "cleared"
        out.append(
            Decision(
                kind,
                rule.rule_id,
                device_id,
                spec.severity,
                spec.metric,
                t.value,
                t.at_ms,
                stored_ms,
            )
        )


_encode = msgspec.msgpack.Encoder().encode
_decode = msgspec.msgpack.Decoder(PartitionCheckpoint).decode
