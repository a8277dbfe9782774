"""The published event schema: what projections consume from the EVENTS stream, device events
on `events.<device_id>` and alert-rule events on `rules.<rule_id>`.

A versioned public contract (msgspec tagged unions of frozen structs), separate from the
library's stored events. A new shape gets a new tag (`...v2`) beside the old one; consumers
decode with `decode_event` (device events) or `decode_stream_event` (either) and match on the
type.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

import msgspec

from domain.device import Device
from domain.rules import Rule

SCHEMA_VERSION = 1


class _Published(msgspec.Struct, frozen=True, tag_field="event", kw_only=True):
    device_id: str
    version: int
    at: datetime
    position: int
    actor: str | None = None  # the name of the API token that caused it; None: not an API call


class DeviceRegistered(_Published, frozen=True, tag="device.registered.v1"):
    name: str
    type: str
    labels: dict[str, str]
    status: str = "provisioned"


class DeviceConfigured(_Published, frozen=True, tag="device.configured.v1"):
    config: dict[str, Any]
    config_version: int


class DeviceSuspended(_Published, frozen=True, tag="device.suspended.v1"):
    reason: str


class DeviceResumed(_Published, frozen=True, tag="device.resumed.v1"):
    status: str


class DeviceDecommissioned(_Published, frozen=True, tag="device.decommissioned.v1"):
    reason: str


class DeviceSecretRotated(_Published, frozen=True, tag="device.secret_rotated.v1"):
    """The secret changed; neither the secret nor its hash is published."""


class DeviceConnected(_Published, frozen=True, tag="device.connected.v1"):
    pass


class DeviceDisconnected(_Published, frozen=True, tag="device.disconnected.v1"):
    pass


class DeviceCommandRequested(_Published, frozen=True, tag="device.command_requested.v1"):
    command_id: str
    name: str
    args: dict[str, Any]
    expires_at: datetime


class DeviceCommandSent(_Published, frozen=True, tag="device.command_sent.v1"):
    """The bridge handed the command to the broker for the device (QoS 1)."""

    command_id: str


class DeviceCommandAcknowledged(_Published, frozen=True, tag="device.command_acknowledged.v1"):
    command_id: str
    result: dict[str, Any]


class DeviceCommandFailed(_Published, frozen=True, tag="device.command_failed.v1"):
    """The device acknowledged the command with status "error"."""

    command_id: str
    result: dict[str, Any]


class DeviceCommandExpired(_Published, frozen=True, tag="device.command_expired.v1"):
    command_id: str


class DeviceCommandCancelled(_Published, frozen=True, tag="device.command_cancelled.v1"):
    command_id: str
    reason: str


class DeviceAlertRaised(_Published, frozen=True, tag="device.alert_raised.v1"):
    """An alert rule fired for the device at device time `at_ms` (`value` None: absent)."""

    alert_id: str
    rule_id: str
    severity: str
    metric: str
    value: float | None
    at_ms: int


class DeviceAlertRetriggered(_Published, frozen=True, tag="device.alert_retriggered.v1"):
    alert_id: str
    value: float | None
    at_ms: int


class DeviceAlertAcknowledged(_Published, frozen=True, tag="device.alert_acknowledged.v1"):
    alert_id: str
    by: str
    note: str | None


class DeviceAlertCleared(_Published, frozen=True, tag="device.alert_cleared.v1"):
    alert_id: str
    value: float | None
    at_ms: int


PublishedEvent = (
    DeviceRegistered
    | DeviceConfigured
    | DeviceSuspended
    | DeviceResumed
    | DeviceDecommissioned
    | DeviceSecretRotated
    | DeviceConnected
    | DeviceDisconnected
    | DeviceCommandRequested
    | DeviceCommandSent
    | DeviceCommandAcknowledged
    | DeviceCommandFailed
    | DeviceCommandExpired
    | DeviceCommandCancelled
    | DeviceAlertRaised
    | DeviceAlertRetriggered
    | DeviceAlertAcknowledged
    | DeviceAlertCleared
)

AlertEvent = (
    DeviceAlertRaised | DeviceAlertRetriggered | DeviceAlertAcknowledged | DeviceAlertCleared
)

CommandEvent = (
    DeviceCommandRequested
    | DeviceCommandSent
    | DeviceCommandAcknowledged
    | DeviceCommandFailed
    | DeviceCommandExpired
    | DeviceCommandCancelled
)


class _PublishedRule(msgspec.Struct, frozen=True, tag_field="event", kw_only=True):
    rule_id: str
    version: int
    at: datetime
    position: int


class RuleCreated(_PublishedRule, frozen=True, tag="rule.created.v1"):
    """A rule, enabled; `spec` is its definition as `POST /rules` takes it (name, metric, scope,
    severity, condition), normalised (`domain.rules.spec_to_dict`)."""

    spec: dict[str, Any]


class RuleUpdated(_PublishedRule, frozen=True, tag="rule.updated.v1"):
    """The rule's definition replaced whole (its enabled state unchanged)."""

    spec: dict[str, Any]


class RuleEnabled(_PublishedRule, frozen=True, tag="rule.enabled.v1"):
    pass


class RuleDisabled(_PublishedRule, frozen=True, tag="rule.disabled.v1"):
    pass


RuleEvent = RuleCreated | RuleUpdated | RuleEnabled | RuleDisabled
StreamEvent = PublishedEvent | RuleEvent  # anything on the EVENTS stream

_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(PublishedEvent)
_stream_decoder = msgspec.json.Decoder(StreamEvent)


class UnpublishableEvent(Exception):
    """A stored event has no published form (a schema gap: fail loudly, never skip)."""


def to_published(stored: object, position: int) -> StreamEvent:
    """Map one stored Device or Rule event to its published form."""
    if isinstance(stored, Rule.Event):
        return _rule_published(stored, position)
    if not isinstance(stored, Device.Event):
        raise UnpublishableEvent(f"not a Device or Rule event: {type(stored).__qualname__}")
    event: Any = stored  # the library builds the event classes at run time
    common: dict[str, Any] = {
        "device_id": event.device_id,
        "version": event.originator_version,
        "at": event.timestamp,
        "position": position,
        "actor": getattr(event, "actor", None),  # stamped on by the command API (not replayed)
    }
    match type(event).__qualname__:
        case "Device.Registered":
            return DeviceRegistered(
                **common, name=event.name, type=event.type, labels=dict(event.labels)
            )
        case "Device.Configured":
            return DeviceConfigured(
                **common, config=dict(event.config), config_version=event.config_version
            )
        case "Device.Suspended":
            return DeviceSuspended(**common, reason=event.reason)
        case "Device.Resumed":
            return DeviceResumed(**common, status=event.status)
        case "Device.Decommissioned":
            return DeviceDecommissioned(**common, reason=event.reason)
        case "Device.SecretRotated":
            return DeviceSecretRotated(**common)
        case "Device.Connected":
            return DeviceConnected(**common)
        case "Device.Disconnected":
            return DeviceDisconnected(**common)
        case "Device.CommandRequested":
            return DeviceCommandRequested(
                **common,
                command_id=event.command_id,
                name=event.name,
                args=dict(event.args),
                expires_at=event.expires_at,
            )
        case "Device.CommandSent":
            return DeviceCommandSent(**common, command_id=event.command_id)
        case "Device.CommandAcknowledged":
            return DeviceCommandAcknowledged(
                **common, command_id=event.command_id, result=dict(event.result)
            )
        case "Device.CommandFailed":
            return DeviceCommandFailed(
                **common, command_id=event.command_id, result=dict(event.result)
            )
        case "Device.CommandExpired":
            return DeviceCommandExpired(**common, command_id=event.command_id)
        case "Device.CommandCancelled":
            return DeviceCommandCancelled(
                **common, command_id=event.command_id, reason=event.reason
            )
        case "Device.AlertRaised":
            return DeviceAlertRaised(
                **common,
                alert_id=event.alert_id,
                rule_id=event.rule_id,
                severity=event.severity,
                metric=event.metric,
                value=event.value,
                at_ms=event.at_ms,
            )
        case "Device.AlertRetriggered":
            return DeviceAlertRetriggered(
                **common, alert_id=event.alert_id, value=event.value, at_ms=event.at_ms
            )
        case "Device.AlertAcknowledged":
            return DeviceAlertAcknowledged(
                **common, alert_id=event.alert_id, by=event.by, note=event.note
            )
        case "Device.AlertCleared":
            return DeviceAlertCleared(
                **common, alert_id=event.alert_id, value=event.value, at_ms=event.at_ms
            )
    raise UnpublishableEvent(f"no published form for {type(event).__qualname__}")


def _rule_published(stored: object, position: int) -> RuleEvent:
    event: Any = stored
    common: dict[str, Any] = {
        "rule_id": event.rule_id,
        "version": event.originator_version,
        "at": event.timestamp,
        "position": position,
    }
    match type(event).__qualname__:
        case "Rule.Created":
            return RuleCreated(**common, spec=dict(event.spec))
        case "Rule.Updated":
            return RuleUpdated(**common, spec=dict(event.spec))
        case "Rule.Enabled":
            return RuleEnabled(**common)
        case "Rule.Disabled":
            return RuleDisabled(**common)
    raise UnpublishableEvent(f"no published form for {type(event).__qualname__}")


def encode_event(event: StreamEvent) -> bytes:
    return _encoder.encode(event)


def decode_event(data: bytes) -> PublishedEvent:
    decoded: PublishedEvent = _decoder.decode(data)
    return decoded


def decode_stream_event(data: bytes) -> StreamEvent:
    """Any event of the EVENTS stream: a device event or a rule event."""
    decoded: StreamEvent = _stream_decoder.decode(data)
    return decoded
