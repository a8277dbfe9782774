"""Deterministic JetStream `Nats-Msg-Id`s, so a redelivered MQTT message is a JetStream duplicate.

- Telemetry whose readings all carry device time: `telemetry:<device>:<sha256(payload)[:32]>`
  (the same readings from the same device are the same facts, whenever they arrive).
- Everything else: `<kind>:<device>:<mqtt packet id>:<sha256(payload)[:32]>`; a persistent-session
  redelivery keeps its packet id. A genuinely new message that collides with an earlier one
  (same device, payload and recycled packet id inside the duplicate window) is republished with
  `salted(...)`, which is unique.
- Dead letters: the same scheme prefixed with `dlq:`.
"""

from __future__ import annotations

import hashlib


def digest(payload: bytes) -> str:
    return hashlib.sha256(payload).hexdigest()[:32]


def message_id(kind: str, device_id: str, payload: bytes, packet_id: int, device_time: bool) -> str:
    if device_time:
        return f"{kind}:{device_id}:{digest(payload)}"
    return f"{kind}:{device_id}:{packet_id}:{digest(payload)}"


def dead_letter_id(kind: str, device_id: str, topic: str, payload: bytes, packet_id: int) -> str:
    """The dead letter's id; a message with an invalid topic is named by its topic's hash."""
    if not kind or not device_id:
        kind, device_id = "topic", digest(topic.encode("utf-8", "replace"))[:16]
    return "dlq:" + message_id(kind, device_id, payload, packet_id, device_time=False)


def salted(msg_id: str, received_at_ns: int) -> str:
    return f"{msg_id}:r{received_at_ns}"
