"""`iot deadletters list|replay`: the quarantined input of the DEADLETTER stream.

`list` prints dead letters (`infra.deadletters`), filtered by device, reason and arrival time.

`replay` sends each matching dead letter the bridge rejected through today's validation
(`bridges.validation.validate`) with the device registry as the EVENTS stream has it now (the
bridge's own `DeviceRegistry`) and the time the bridge first received it:

- accepted: published to INGEST as the bridge would have published it, with the same
  `Nats-Msg-Id` (its MQTT packet id is in the dead letter's id), so a replay racing another one
  within the duplicate window is stored once; once JetStream has acknowledged it, the dead letter
  is deleted, so a later replay finds nothing and stores nothing more;
- rejected again for another reason or detail: re-published to DEADLETTER with the new reason
  and detail (the other headers kept, `Iot-Original-Msg-Id` the first id), then the old entry
  deleted: it stays quarantined. Rejected for the same reason and detail: left where it is;
- a projector's dead letter (not device input) is skipped.

Only dead letters already in the stream when the replay starts are looked at. `--dry-run`
says what would happen and changes nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any, TextIO

from nats.aio.client import Client as NATS
from nats.js.client import JetStreamContext
from nats.js.errors import NotFoundError

from bridges import ids
from bridges.registry import DeviceRegistry
from bridges.validation import Accepted, validate
from domain.ingest import encode_ingest
from infra.deadletters import MAX_LIMIT, DeadLetter, list_dead_letters
from infra.jetstream import follow_events
from infra.settings import Settings
from infra.streams import Streams
from infra.timefmt import parse_duration, parse_time, rfc3339

ORIGINAL_ID = "Iot-Original-Msg-Id"
MAX_HEADER = 1024

# what replay does with one dead letter
REPLAY = "replayed"
REJECT = "still_rejected"  # moved: under a new reason or detail; else left in place
SKIP = "skipped"


def add_parser(sub: Any) -> None:
    dead = sub.add_parser(
        "deadletters", help="rejected input quarantined on the DEADLETTER stream: list, replay"
    )
    verbs = dead.add_subparsers(dest="deadletters_command", required=True)
    listing = verbs.add_parser("list", help="print dead letters, oldest first")
    replay = verbs.add_parser(
        "replay",
        help="send the bridge's dead letters through today's validation: what passes is stored "
        "once and leaves the quarantine, what fails stays with its new reason",
    )
    for verb in (listing, replay):
        verb.add_argument("--device", default=None, help="only this device's")
        verb.add_argument("--reason", default=None, help="only this reason's (unknown_device...)")
        verb.add_argument(
            "--since", default=None, help="received since: a duration back (24h, 7d) or a time"
        )
        verb.add_argument("--json", action="store_true", help="print JSON")
    listing.add_argument(
        "--limit", type=int, default=100, help=f"at most this many (1 to {MAX_LIMIT}; 100)"
    )
    replay.add_argument(
        "--dry-run", action="store_true", help="say what would happen, change nothing"
    )


def parse_since(text: str, now_ms: int) -> int:
    """`24h`-style durations back from now, or an RFC 3339 time or epoch ms."""
    try:
        return max(0, now_ms - parse_duration(text))
    except ValueError:
        pass
    try:
        return parse_time(text)
    except ValueError:
        raise ValueError(
            f"--since takes a duration back (30m, 24h, 7d) or an RFC 3339 time, got {text!r}"
        ) from None


# --- what to do with one dead letter (pure) --------------------------------------------------
@dataclass(frozen=True)
class Plan:
    seq: int
    device_id: str | None
    was: str  # the reason it is quarantined for
    outcome: str  # REPLAY, REJECT or SKIP
    reason: str = ""  # the new reason (REJECT), why it is skipped (SKIP)
    detail: str = ""
    subject: str = ""  # where to publish: INGEST (REPLAY) or DEADLETTER (REJECT)
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    moved: bool = False  # REJECT: re-published under a new reason/detail (else left in place)

    def to_json(self) -> dict[str, Any]:
        answer: dict[str, Any] = {
            "seq": self.seq,
            "device_id": self.device_id,
            "was": self.was,
            "outcome": self.outcome,
        }
        if self.outcome != REPLAY:
            answer["reason"] = self.reason
        if self.outcome == REJECT:
            answer["detail"] = self.detail
            answer["requarantined"] = self.moved
        if self.outcome == REPLAY:
            answer["subject"] = self.subject
            answer["msg_id"] = self.headers.get("Nats-Msg-Id")
        return answer


def original_id(letter: DeadLetter) -> str:
    return letter.headers.get(ORIGINAL_ID) or letter.msg_id or ""


def packet_and_salt(dlq_id: str) -> tuple[int, int | None]:
    """The MQTT packet id (and the salt, a receive time in ns) in a bridge dead letter's id
    `dlq:<kind>:<device>:<packet id>:<digest>[:r<ns>]` (bridges/ids.py); 0 when it has none."""
    parts = dlq_id.split(":")
    if len(parts) < 5 or parts[0] != "dlq" or not parts[3].isdigit():
        return 0, None
    salt = None
    if len(parts) == 6 and parts[5][:1] == "r" and parts[5][1:].isdigit():
        salt = int(parts[5][1:])
    return int(parts[3]), salt


def ingest_id(letter: DeadLetter, accepted: Accepted) -> str:
    """The `Nats-Msg-Id` the bridge gives the message when it accepts it."""
    packet_id, salt = packet_and_salt(original_id(letter))
    msg_id = ids.message_id(
        accepted.kind, accepted.device_id, letter.data, packet_id, accepted.device_time
    )
    if salt is not None and not accepted.device_time:
        msg_id = ids.salted(msg_id, salt)
    return msg_id


def _header_safe(text: str) -> str:
    cleaned = "".join(c if c >= " " and c != "\x7f" else f"\\x{ord(c):02x}" for c in text)
    return cleaned[:MAX_HEADER]


def plan(letter: DeadLetter, devices: Mapping[str, str], streams: Streams) -> Plan:
    """What replaying `letter` does, given the device registry (id -> lifecycle status)."""
    base = Plan(letter.seq, letter.device_id, letter.reason, SKIP)
    if not letter.from_bridge:
        why = f"from {letter.source}" if letter.source != "bridge" else "not a device topic"
        return replace(base, outcome=SKIP, reason=why)
    received = letter.received_at_ms
    if received is None:
        received = int(letter.stored_at.timestamp() * 1000)
    result = validate(letter.topic, letter.data, received, devices)
    if isinstance(result, Accepted):
        return replace(
            base,
            device_id=result.device_id,
            outcome=REPLAY,
            subject=streams.ingest_subject(result.kind, result.device_id),
            body=encode_ingest(result.message),
            headers={"Nats-Msg-Id": ingest_id(letter, result)},
        )
    detail = _header_safe(result.detail)
    if result.reason == letter.reason and detail == letter.detail:
        return replace(base, outcome=REJECT, reason=result.reason, detail=detail)
    first = original_id(letter)
    headers = {k: v for k, v in letter.headers.items() if k != "Nats-Msg-Id"}
    headers.update(
        {
            "Iot-Reason": result.reason,
            "Iot-Detail": detail,
            # the same for two replays of this entry: a racing one is a duplicate
            "Nats-Msg-Id": f"replay:{letter.seq}:{first}"[:MAX_HEADER],
        }
    )
    if first:
        headers[ORIGINAL_ID] = first
    return replace(
        base,
        outcome=REJECT,
        reason=result.reason,
        detail=detail,
        subject=streams.deadletter_subject(result.reason),
        body=letter.data,
        headers=headers,
        moved=True,
    )


@dataclass
class Summary:
    dry_run: bool
    replayed: int = 0
    duplicates: int = 0  # replayed, but INGEST had it already (another replay, the bridge)
    still_rejected: Counter[str] = field(default_factory=Counter)
    skipped: Counter[str] = field(default_factory=Counter)
    items: list[Plan] = field(default_factory=list)

    def add(self, item: Plan) -> None:
        self.items.append(item)
        if item.outcome == REPLAY:
            self.replayed += 1
        elif item.outcome == SKIP:
            self.skipped[item.reason] += 1
        else:
            self.still_rejected[item.reason] += 1

    def to_json(self) -> dict[str, Any]:
        return {
            "dry_run": self.dry_run,
            "replayed": self.replayed,
            "duplicates": self.duplicates,
            "still_rejected": dict(self.still_rejected),
            "skipped": dict(self.skipped),
            "items": [item.to_json() for item in self.items],
        }

    def lines(self) -> list[str]:
        verb = "would replay" if self.dry_run else "replayed"
        head = f"{verb} {self.replayed}"
        if self.duplicates:
            head += f" ({self.duplicates} stored already)"
        rejected = sum(self.still_rejected.values())
        head += f", still rejected {rejected}, skipped {sum(self.skipped.values())}"
        out = [head]
        out += [f"  still rejected: {r} {n}" for r, n in sorted(self.still_rejected.items())]
        out += [f"  skipped: {r} {n}" for r, n in sorted(self.skipped.items())]
        return out


# --- against JetStream -----------------------------------------------------------------------
async def device_registry(js: JetStreamContext, streams: Streams) -> DeviceRegistry:
    """The bridge's device registry, read from the EVENTS stream up to its end as it is now."""
    registry = DeviceRegistry()
    caught_up, stop = asyncio.Event(), asyncio.Event()
    task = asyncio.create_task(follow_events(js, streams, registry, caught_up, stop))
    try:
        await asyncio.wait_for(caught_up.wait(), timeout=120)
    finally:
        stop.set()
        await task
    return registry


async def delete(js: JetStreamContext, streams: Streams, seq: int) -> None:
    """Delete a dead letter; gone already (another replay, its age) is fine."""
    with contextlib.suppress(NotFoundError):
        await js.delete_msg(streams.deadletter, seq)


async def replay(
    js: JetStreamContext,
    streams: Streams,
    *,
    device_id: str | None = None,
    reason: str | None = None,
    since_ms: int | None = None,
    dry_run: bool = False,
) -> Summary:
    summary = Summary(dry_run)
    info = await js.stream_info(streams.deadletter)
    until = int(info.state.last_seq or 0)
    if not int(info.state.messages or 0):
        return summary
    registry = await device_registry(js, streams)
    cursor: int | None = None
    while True:
        letters, cursor = await list_dead_letters(
            js,
            streams,
            device_id=device_id,
            reason=reason,
            since_ms=since_ms,
            cursor=cursor,
            limit=MAX_LIMIT,
            until_seq=until,
        )
        for letter in letters:
            item = plan(letter, registry.devices, streams)
            summary.add(item)
            if dry_run or item.outcome == SKIP or (item.outcome == REJECT and not item.moved):
                continue
            if item.outcome == REPLAY:
                ack = await js.publish(
                    item.subject, item.body, timeout=10, stream=streams.ingest, headers=item.headers
                )
                if ack.duplicate:
                    summary.duplicates += 1
            else:
                await js.publish(
                    item.subject,
                    item.body,
                    timeout=10,
                    stream=streams.deadletter,
                    headers=item.headers,
                )
            await delete(js, streams, letter.seq)  # only once the publish is acknowledged
        if cursor is None:
            return summary


async def _connect(settings: Settings) -> NATS:
    import nats

    async def quiet(error: Exception) -> None:
        """Failing to connect is reported once, by `run`; no log line per attempt."""

    return await nats.connect(
        settings.nats_url,
        name="iot-deadletters",
        connect_timeout=5,
        max_reconnect_attempts=3,
        error_cb=quiet,
    )


async def _list(settings: Settings, args: argparse.Namespace, since_ms: int | None) -> list[Any]:
    nc = await _connect(settings)
    try:
        js = nc.jetstream()
        streams = Streams(settings.namespace)
        found: list[DeadLetter] = []
        cursor: int | None = None
        while len(found) < args.limit:
            page, cursor = await list_dead_letters(
                js,
                streams,
                device_id=args.device,
                reason=args.reason,
                since_ms=since_ms,
                cursor=cursor,
                limit=args.limit - len(found),
            )
            found += page
            if cursor is None:
                break
        return [found, cursor]
    finally:
        await nc.close()


async def _replay(settings: Settings, args: argparse.Namespace, since_ms: int | None) -> Summary:
    nc = await _connect(settings)
    try:
        return await replay(
            nc.jetstream(),
            Streams(settings.namespace),
            device_id=args.device,
            reason=args.reason,
            since_ms=since_ms,
            dry_run=args.dry_run,
        )
    finally:
        await nc.close()


def _line(letter: DeadLetter) -> str:
    preview = letter.to_json()["preview"]
    shown = repr(preview[:80]) if preview is not None else f"<{letter.size} bytes, not UTF-8>"
    arrived = letter.received_at_ms
    when = rfc3339(arrived) if arrived is not None else letter.to_json()["stored_at"]
    return (
        f"{letter.seq}  {when}  {letter.reason}  {letter.device_id or '-'}  {letter.topic}  "
        f"{letter.source}  {letter.detail}  {shown}"
    )


def run(
    args: argparse.Namespace, settings: Settings, out: TextIO = sys.stdout, err: TextIO = sys.stderr
) -> int:
    verb = args.deadletters_command
    name = f"iot deadletters {verb}"
    since_ms = None
    try:
        if args.since is not None:
            since_ms = parse_since(args.since, int(time.time() * 1000))
        if args.reason is not None:
            from infra.deadletters import reason_subject

            reason_subject(Streams(settings.namespace), args.reason)
        if verb == "list" and not 1 <= args.limit <= MAX_LIMIT:
            raise ValueError(f"--limit must be between 1 and {MAX_LIMIT}")
    except ValueError as e:
        print(f"{name}: {e}", file=err)
        return 2
    try:
        if verb == "list":
            found, cursor = asyncio.run(_list(settings, args, since_ms))
        else:
            summary = asyncio.run(_replay(settings, args, since_ms))
    except NotFoundError:
        stream = Streams(settings.namespace).deadletter
        print(f"{name}: failed: no stream {stream} (`iot migrate` creates it)", file=err)
        return 1
    except Exception as e:  # NATS unreachable: one line, not a traceback
        print(f"{name}: failed: {type(e).__name__}: {e}", file=err)
        return 1
    if verb == "list":
        if args.json:
            body = {"dead_letters": [f.to_json() for f in found], "next_cursor": cursor}
            print(json.dumps(body, indent=2), file=out)
        else:
            for letter in found:
                print(_line(letter), file=out)
            more = " (more: narrow the filters or raise --limit)" if cursor is not None else ""
            print(f"{name}: {len(found)} dead letters{more}", file=err)
        return 0
    if args.json:
        print(json.dumps(summary.to_json(), indent=2), file=out)
    else:
        for item in summary.items:
            what = item.outcome + (f" ({item.reason})" if item.outcome != REPLAY else "")
            print(f"{item.seq}  {item.device_id or '-'}  {item.was} -> {what}", file=out)
        for line in summary.lines():
            print(f"{name}: {line}", file=out)
    return 0
