"""In-flight MQTT messages in receive order, acknowledged as a completed prefix.

MQTT 5 wants PUBACKs in the order the PUBLISHes arrived, so a message that JetStream has
stored is acknowledged only once every message received before it is done too.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


@dataclass(slots=True, eq=False)
class Entry:
    """One received MQTT message on its way to JetStream."""

    packet_id: int
    qos: int
    dup: bool
    received_at_ns: int
    subject: str = ""
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    kind: str = ""
    outcome: str = ""  # "stored", "duplicate" or "dead_letter" once done
    reason: str = ""  # dead-letter reason
    salt_allowed: bool = False  # a JetStream "duplicate" on the first attempt may be a collision
    attempts: int = 0
    started: float = 0.0  # monotonic time of the current attempt
    future: Any = None  # the pending publish_async future, if any
    done: bool = False
    abandoned: bool = False  # its connection is gone; the broker will redeliver it
    spans: Any = None  # (bridge.receive, bridge.publish) while tracing


class AckWindow:
    """Entries in receive order; `complete` acks the done prefix through `ack(packet_id, qos)`."""

    def __init__(self, ack: Callable[[int, int], None]) -> None:
        self._ack = ack
        self._entries: deque[Entry] = deque()

    def __len__(self) -> int:
        return len(self._entries)

    def __iter__(self) -> Any:
        return iter(self._entries)

    def add(self, entry: Entry) -> None:
        self._entries.append(entry)

    def complete(self, entry: Entry) -> list[Entry]:
        """Mark `entry` done; ack and return the entries that left the window."""
        if entry.abandoned:
            return []
        entry.done = True
        released: list[Entry] = []
        entries = self._entries
        while entries and entries[0].done:
            head = entries.popleft()
            if head.qos > 0:
                self._ack(head.packet_id, head.qos)
            released.append(head)
        return released

    def abandon(self) -> list[Entry]:
        """Forget every entry without acking (the connection is gone); return them."""
        dropped = list(self._entries)
        for entry in dropped:
            entry.abandoned = True
        self._entries.clear()
        return dropped
