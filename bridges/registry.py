"""The bridge's in-memory view of every device, built from the EVENTS stream with an ordered
ephemeral consumer from the start that keeps following.

Per device: lifecycle status (what validation reads, through `devices`), whether it is online,
the latest desired configuration and its pending commands in request order (what the command
dispatcher delivers). Events are applied once per device version, so a republished event
changes nothing; a `listener` hears every applied event (the dispatcher's trigger).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import msgspec

from bridges import metrics
from domain.device import MAX_PENDING_COMMANDS
from domain.published import (
    DeviceCommandAcknowledged,
    DeviceCommandCancelled,
    DeviceCommandExpired,
    DeviceCommandFailed,
    DeviceCommandRequested,
    DeviceCommandSent,
    DeviceConfigured,
    DeviceConnected,
    DeviceDecommissioned,
    DeviceDisconnected,
    DeviceRegistered,
    DeviceResumed,
    DeviceSuspended,
    PublishedEvent,
    decode_event,
)

log = logging.getLogger(__name__)

REQUESTED = "requested"
SENT = "sent"
EXPIRED = "expired"  # set by the dispatcher: past its expires_at, never to be published
# The aggregate refuses a command beyond MAX_PENDING_COMMANDS; the bridge holds twice that at
# most, so a log that breaks the rule cannot make it grow without bound.
PENDING_LIMIT = 2 * MAX_PENDING_COMMANDS

Listener = Callable[[PublishedEvent], None]


@dataclass(slots=True)
class PendingCommand:
    command_id: str
    name: str
    args: dict[str, Any]
    expires_at: datetime
    state: str = REQUESTED  # REQUESTED, SENT or EXPIRED


@dataclass(frozen=True, slots=True)
class Desired:
    version: int
    config: dict[str, Any]


@dataclass(slots=True)
class DeviceState:
    status: str
    version: int = 0  # last aggregate version applied
    online: bool = False
    desired: Desired | None = None
    pending: dict[str, PendingCommand] = field(default_factory=dict)  # request order

    def requested(self) -> list[PendingCommand]:
        return [c for c in self.pending.values() if c.state == REQUESTED]


class DeviceRegistry:
    """Device states; `devices` (id -> lifecycle status) is what validation reads."""

    def __init__(self, listener: Listener | None = None) -> None:
        self.devices: dict[str, str] = {}
        self.states: dict[str, DeviceState] = {}
        self.sequence = 0  # last stream sequence applied
        self.listener = listener

    def apply(self, event: PublishedEvent) -> bool:
        """Apply one event; False if it was seen already (an older or equal device version)."""
        device_id = event.device_id
        state = self.states.get(device_id)
        if isinstance(event, DeviceRegistered):
            if state is not None and state.version >= event.version:
                return False
            state = self.states[device_id] = DeviceState(event.status)
        elif state is None or state.version >= event.version:
            return False  # nothing known of the device yet, or seen already
        state.version = event.version
        _apply(state, event)
        self.devices[device_id] = state.status
        if self.listener is not None:
            self.listener(event)
        return True

    def apply_raw(self, sequence: int, data: bytes) -> None:
        """Apply one stream message; an undecodable one is logged and skipped."""
        try:
            self.apply(decode_event(data))
        except msgspec.DecodeError as e:
            log.warning("skipping undecodable event", extra={"seq": sequence, "error": str(e)})
        except Exception:
            log.exception("event not applied", extra={"seq": sequence})
        self.sequence = max(self.sequence, sequence)
        metrics.REGISTRY_DEVICES.set(len(self.devices))
        metrics.REGISTRY_SEQUENCE.set(self.sequence)


def _apply(state: DeviceState, event: PublishedEvent) -> None:
    if isinstance(event, DeviceDecommissioned):
        state.status = "decommissioned"
        state.online = False
        state.pending.clear()
    elif isinstance(event, DeviceSuspended):
        if state.status != "decommissioned":
            state.status = "suspended"
    elif isinstance(event, DeviceResumed):
        if state.status != "decommissioned":
            state.status = event.status
    elif isinstance(event, DeviceConnected):
        state.online = True
        if state.status == "provisioned":
            state.status = "active"
    elif isinstance(event, DeviceDisconnected):
        state.online = False
    elif isinstance(event, DeviceConfigured):
        if state.desired is None or event.config_version > state.desired.version:
            state.desired = Desired(event.config_version, event.config)
    elif isinstance(event, DeviceCommandRequested):
        if event.command_id in state.pending:
            return
        if len(state.pending) >= PENDING_LIMIT:
            log.warning(
                "too many pending commands; ignoring one",
                extra={"device_id": event.device_id, "command_id": event.command_id},
            )
            return
        state.pending[event.command_id] = PendingCommand(
            event.command_id, event.name, event.args, event.expires_at
        )
    elif isinstance(event, DeviceCommandSent):
        command = state.pending.get(event.command_id)
        if command is not None:
            command.state = SENT
    elif isinstance(
        event,
        DeviceCommandAcknowledged
        | DeviceCommandFailed
        | DeviceCommandExpired
        | DeviceCommandCancelled,
    ):
        state.pending.pop(event.command_id, None)
