"""Reading the DEADLETTER stream: dead letters listed page by page, newest filters first.

A page is read with an ephemeral pull consumer (no acks, deleted afterwards) filtered by reason
through the subject (`deadletter.<reason>`), starting after a cursor (a stream sequence) or at a
time; the device filter is applied to the headers as the messages go by. The work of one call is
bounded: at most `limit` matches are kept and at most `SCAN_LIMIT` messages are looked at, so a
page can hold fewer than `limit` dead letters (even none) and still have a `next_cursor`: read
on until `next_cursor` is None.

The device of a dead letter comes from its `Iot-Topic`: `devices/<id>/...` (the bridge: an MQTT
topic, docs/interface.md) or a stream subject `[<ns>.]ingest.<kind>.<id>` / `[<ns>.]events.<id>`
(a projector).
"""

from __future__ import annotations

import base64
import contextlib
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.client import JetStreamContext

from infra.streams import Streams

SCAN_LIMIT = 10_000  # messages looked at per call, matching or not
FETCH_BATCH = 64  # messages per pull request (a dead letter is at most ~1 MiB)
MAX_LIMIT = 1000
PREVIEW_CHARS = 1024
BRIDGE = "bridge"  # `source` of a dead letter without `Iot-Source` (the bridge sets none)
_TOKEN = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


@dataclass(frozen=True)
class DeadLetter:
    seq: int
    reason: str
    topic: str
    detail: str
    device_id: str | None
    received_at_ms: int | None
    stored_at: datetime
    source: str  # "bridge", or the projector that dead-lettered it (timeseries, views, auth)
    size: int
    data: bytes
    msg_id: str | None = None  # its Nats-Msg-Id
    headers: dict[str, str] = field(default_factory=dict, repr=False)

    @property
    def from_bridge(self) -> bool:
        """Device input the bridge rejected (an MQTT topic under `devices/`), replayable."""
        return self.source == BRIDGE and self.topic.startswith("devices/")

    def to_json(self) -> dict[str, Any]:
        preview: str | None
        try:
            preview = self.data.decode("utf-8")[:PREVIEW_CHARS]
        except UnicodeDecodeError:
            preview = None
        return {
            "seq": self.seq,
            "reason": self.reason,
            "topic": self.topic,
            "detail": self.detail,
            "device_id": self.device_id,
            "received_at_ms": self.received_at_ms,
            "stored_at": _rfc3339(self.stored_at),
            "source": self.source,
            "size": self.size,
            "data_base64": base64.b64encode(self.data).decode("ascii"),
            "preview": preview,
        }


def _rfc3339(moment: datetime) -> str:
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    text = moment.astimezone(UTC).isoformat(timespec="milliseconds")
    return text.replace("+00:00", "Z")


def device_of(topic: str, namespace: str = "") -> str | None:
    """The device id named by a dead letter's topic (MQTT topic or stream subject), or None."""
    if topic.startswith("devices/"):
        device = topic.split("/", 2)[1] if topic.count("/") >= 1 else ""
        return device or None
    tokens = topic.split(".")
    if namespace and tokens and tokens[0] == namespace:
        tokens = tokens[1:]
    if len(tokens) == 3 and tokens[0] == "ingest" and tokens[2]:
        return tokens[2]
    if len(tokens) == 2 and tokens[0] == "events" and tokens[1]:
        return tokens[1]
    return None


def from_headers(
    seq: int,
    headers: dict[str, str] | None,
    data: bytes,
    stored_at: datetime,
    *,
    subject: str = "",
    namespace: str = "",
) -> DeadLetter:
    """A DeadLetter from a stored message's parts (pure; used for every message read)."""
    h = dict(headers or {})
    reason = h.get("Iot-Reason") or subject.rsplit(".", 1)[-1]
    topic = h.get("Iot-Topic", "")
    received: int | None = None
    with contextlib.suppress(ValueError):
        received = int(h.get("Iot-Received-At", ""))
    return DeadLetter(
        seq=seq,
        reason=reason,
        topic=topic,
        detail=h.get("Iot-Detail", ""),
        device_id=device_of(topic, namespace),
        received_at_ms=received,
        stored_at=stored_at,
        source=h.get("Iot-Source") or BRIDGE,
        size=len(data),
        data=data,
        msg_id=h.get("Nats-Msg-Id"),
        headers=h,
    )


def reason_subject(streams: Streams, reason: str | None) -> str:
    """The subject filter of a reason (every reason for None); ValueError for a bad reason."""
    if reason is None:
        return streams.deadletter_wildcard
    if not _TOKEN.fullmatch(reason):
        raise ValueError(f"a reason is a word like unknown_device, got {reason!r}")
    return streams.deadletter_subject(reason)


def matches(letter: DeadLetter, *, device_id: str | None, since_ms: int | None) -> bool:
    if device_id is not None and letter.device_id != device_id:
        return False
    return since_ms is None or received_ms(letter) >= since_ms


def received_ms(letter: DeadLetter) -> int:
    """When the input arrived: the bridge's `Iot-Received-At`, else the time it was stored (a
    dead letter is stored after its input arrived, so seeking to `since` by storage time misses
    nothing; one re-quarantined by a replay keeps its first arrival)."""
    if letter.received_at_ms is not None:
        return letter.received_at_ms
    return int(letter.stored_at.timestamp() * 1000)


async def list_dead_letters(
    js: JetStreamContext,
    streams: Streams,
    *,
    device_id: str | None = None,
    reason: str | None = None,
    since_ms: int | None = None,
    cursor: int | None = None,
    limit: int = 100,
    until_seq: int | None = None,
    scan_limit: int = SCAN_LIMIT,
) -> tuple[list[DeadLetter], int | None]:
    """Dead letters in stream order after `cursor` (a stream sequence; None: from the start or
    from `since_ms`), received at `since_ms` (epoch ms) or later, up to `limit`, and the cursor
    to read on from (None when the stream has nothing more that could match); stopping at
    `until_seq` (a replay ignores what it re-publishes). ValueError for a bad reason or limit."""
    if not 1 <= limit <= MAX_LIMIT:
        raise ValueError(f"limit must be between 1 and {MAX_LIMIT}, got {limit}")
    if cursor is not None and cursor < 0:
        raise ValueError(f"cursor must be a stream sequence, got {cursor}")
    subject = reason_subject(streams, reason)
    config = ConsumerConfig(
        ack_policy=AckPolicy.NONE,
        filter_subject=subject,
        inactive_threshold=60.0,
        mem_storage=True,
        num_replicas=1,
    )
    if cursor is not None:
        config.deliver_policy = DeliverPolicy.BY_START_SEQUENCE
        config.opt_start_seq = cursor + 1
    elif since_ms is not None:
        config.deliver_policy = DeliverPolicy.BY_START_TIME
        config.opt_start_time = datetime.fromtimestamp(since_ms / 1000, UTC)
    else:
        config.deliver_policy = DeliverPolicy.ALL
    info = await js.add_consumer(streams.deadletter, config)
    name = info.name
    found: list[DeadLetter] = []
    pending = int(info.num_pending or 0)
    last = cursor
    try:
        if pending == 0:
            return [], None
        sub = await js.pull_subscribe_bind(name, stream=streams.deadletter)
        try:
            scanned = 0
            while pending > 0 and len(found) < limit and scanned < scan_limit:
                batch = min(FETCH_BATCH, pending, scan_limit - scanned)
                try:
                    msgs = await sub.fetch(batch, timeout=5.0)
                except TimeoutError:  # what was pending is gone (deleted, aged out)
                    pending = 0
                    break
                for msg in msgs:
                    meta = msg.metadata
                    seq = int(meta.sequence.stream)
                    pending = int(meta.num_pending)
                    if until_seq is not None and seq > until_seq:
                        return found, None
                    scanned += 1
                    last = seq
                    letter = from_headers(
                        seq,
                        msg.headers,
                        msg.data,
                        meta.timestamp,
                        subject=msg.subject,
                        namespace=streams.namespace,
                    )
                    if matches(letter, device_id=device_id, since_ms=since_ms):
                        found.append(letter)
                        if len(found) >= limit:
                            break
        finally:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
    finally:
        with contextlib.suppress(Exception):
            await js.delete_consumer(streams.deadletter, name)
    if pending == 0 or (until_seq is not None and last is not None and last >= until_seq):
        return found, None
    return found, last
