"""Rule test: a draft rule evaluated over stored telemetry, raising nothing.

`POST /api/v1/rules/test` (the analytics service, operator role) and `iot rules test FILE
--since 24h` read the INGEST stream from a start time (the time JetStream stored each message)
to an end time, and evaluate the draft with the same engine the service runs (`analytics.
engine`): the same conditions, device-time order per series, the log's clock for `absent`.
The draft judges every message of the period (as if it had been in effect before it), for the
devices its scope holds by their type and labels as the service knows them now. Nothing is
appended and nothing is notified: the answer is the alerts it would have raised, with when they
would have re-triggered and cleared.

So a saved rule tested over a period it was in effect for answers with the alerts it raised
then. Differences come only from what the live service could not know in advance: a live
`absent` alert raises on the wall clock once the stream is quiet, a tested one at the next
message stored after its due time or at the period's end.

The work is bounded: at most `MAX_SPAN_MS` of history, `MAX_MESSAGES` messages read (beyond
it the answer says `truncated` and where it stopped), `MAX_ALERTS` alerts listed (the counts
stay exact).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import msgspec
from nats.aio.client import Client as NATS

from analytics.catalog import Catalog, DeviceInfo, RuleVersion
from analytics.engine import Decision, Engine, Partition
from analytics.position import position
from domain.ingest import decode_ingest
from domain.rules import RuleSpec
from infra.replay import LogTail
from infra.streams import Streams
from infra.timefmt import parse_duration

DRAFT = "draft"
MAX_SPAN_MS = 31 * 24 * 3600 * 1000
MAX_MESSAGES = 2_000_000
MAX_ALERTS = 1000
FETCH_WAIT_S = 0.5


def parse_since(text: str) -> int:
    """`90m`, `24h`, `7d` as milliseconds; ValueError otherwise (at most 31 days)."""
    return parse_duration(text.strip(), MAX_SPAN_MS)


class TestedAlert(msgspec.Struct, kw_only=True):
    device_id: str
    raised_at: int  # device time, epoch ms
    value: float | None
    retriggers: int = 0
    last_value: float | None = None
    cleared_at: int | None = None
    cleared_value: float | None = None


class RuleTestResult(msgspec.Struct, kw_only=True):
    rule: dict[str, Any]
    from_ms: int = msgspec.field(name="from")
    to_ms: int = msgspec.field(name="to")
    messages: int  # INGEST messages read in the period
    readings: int  # telemetry readings among them
    evaluations: int  # readings of the rule's series evaluated
    devices: int  # devices with at least one evaluation or transition
    raised: int
    retriggered: int
    cleared: int
    open_at_end: int
    alerts: list[TestedAlert]  # raise order; at most MAX_ALERTS
    alerts_truncated: bool
    truncated: bool  # MAX_MESSAGES reached before `to`
    read_to: int | None  # the log time of the last message read (epoch ms)
    elapsed_s: float


@dataclass
class Simulation:
    """The draft evaluated message by message; pure (no I/O), so unit tests drive it."""

    spec: RuleSpec
    devices: Mapping[str, DeviceInfo]
    catalog: Catalog = field(init=False)
    engine: Engine = field(init=False)
    part: Partition = field(init=False)
    messages: int = 0
    alerts: list[TestedAlert] = field(default_factory=list)
    counts: dict[str, int] = field(
        default_factory=lambda: {"raised": 0, "retriggered": 0, "cleared": 0}
    )
    _open: dict[str, TestedAlert] = field(default_factory=dict)
    _seen: set[str] = field(default_factory=set)

    def __post_init__(self) -> None:
        self.catalog = Catalog(devices=dict(self.devices))
        self.catalog._add_rule(RuleVersion(DRAFT, 1, 0, self.spec, True))
        self.engine = Engine(self.catalog, 1)
        self.part = Partition(0, 0)
        self.engine.hold(self.part)

    def feed(self, seq: int, stored_ms: int, data: bytes) -> None:
        self.messages += 1
        try:
            message = decode_ingest(data)
        except (msgspec.DecodeError, msgspec.ValidationError):
            return  # the bridge validated it; the live service skips it too
        decisions: list[Decision] = []
        before = self.engine.counts.evaluations
        self.engine.evaluate(seq, stored_ms, message, decisions)
        if self.engine.counts.evaluations > before:
            self._seen.add(message.device_id)
        self._fold(decisions)

    def finish(self, until_ms: int) -> None:
        """The period is over: absent series due by its end raise."""
        decisions: list[Decision] = []
        self.engine.tick_all(until_ms, decisions)
        self._fold(decisions)

    def _fold(self, decisions: list[Decision]) -> None:
        for d in decisions:
            self.counts[d.kind] += 1
            self._seen.add(d.device_id)
            if d.kind == "raised":
                alert = TestedAlert(device_id=d.device_id, raised_at=d.at_ms, value=d.value)
                self._open[d.device_id] = alert
                if len(self.alerts) < MAX_ALERTS:
                    self.alerts.append(alert)
                continue
            alert_or_none = self._open.get(d.device_id)
            if alert_or_none is None:
                continue
            if d.kind == "retriggered":
                alert_or_none.retriggers += 1
                alert_or_none.last_value = d.value
            else:
                alert_or_none.cleared_at, alert_or_none.cleared_value = d.at_ms, d.value
                del self._open[d.device_id]

    def result(
        self,
        spec: dict[str, Any],
        from_ms: int,
        to_ms: int,
        *,
        truncated: bool,
        read_to: int | None,
        elapsed_s: float,
    ) -> RuleTestResult:
        counts = self.engine.counts
        return RuleTestResult(
            rule=spec,
            from_ms=from_ms,
            to_ms=to_ms,
            messages=self.messages,
            readings=counts.readings,
            evaluations=counts.evaluations,
            devices=len(self._seen),
            raised=self.counts["raised"],
            retriggered=self.counts["retriggered"],
            cleared=self.counts["cleared"],
            open_at_end=len(self._open),
            alerts=self.alerts,
            alerts_truncated=self.counts["raised"] > len(self.alerts),
            truncated=truncated,
            read_to=read_to,
            elapsed_s=round(elapsed_s, 3),
        )


async def run_rule_test(
    nc: NATS,
    namespace: str,
    spec: RuleSpec,
    spec_dict: dict[str, Any],
    devices: Mapping[str, DeviceInfo],
    from_ms: int,
    to_ms: int,
    *,
    max_messages: int = MAX_MESSAGES,
) -> RuleTestResult:
    """Evaluate `spec` over the INGEST messages stored in [from_ms, to_ms)."""
    started = time.perf_counter()
    streams = Streams(namespace)
    info = await nc.jetstream().stream_info(streams.ingest)
    end_seq = int(info.state.last_seq or 0)  # what was there when the test began
    sim = Simulation(spec, devices)
    truncated, read_to = False, None
    tail = LogTail(
        nc,
        streams.ingest,
        streams.ingest_wildcard,
        1,
        start_time=datetime.fromtimestamp(from_ms / 1000, UTC),
    )
    await tail.open()
    try:
        done = end_seq == 0
        while not done:
            msgs = await tail.fetch(FETCH_WAIT_S)
            if not msgs and await tail.remaining() == 0:
                break
            for msg in msgs:
                seq, stored_ms = position(msg)
                if stored_ms >= to_ms or seq > end_seq:
                    done = True
                    break
                if sim.messages >= max_messages:
                    truncated = done = True
                    break
                sim.feed(seq, stored_ms, msg.data)
                read_to = stored_ms
    finally:
        await tail.close()
    sim.finish(to_ms if not truncated else (read_to or from_ms))
    return sim.result(
        spec_dict,
        from_ms,
        to_ms,
        truncated=truncated,
        read_to=read_to,
        elapsed_s=time.perf_counter() - started,
    )
