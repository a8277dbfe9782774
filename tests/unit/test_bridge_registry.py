"""The bridge's device registry: per-device state from published events, applied once each."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from bridges.registry import PENDING_LIMIT, REQUESTED, SENT, Desired, DeviceRegistry
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
    encode_event,
)
from tests.unit.support import T0, at


class Log:
    """Published events of one device with increasing versions, as the relay writes them."""

    def __init__(self, device_id: str = "dev-1") -> None:
        self.device_id = device_id
        self.version = 0

    def _common(self) -> dict[str, Any]:
        self.version += 1
        return {
            "device_id": self.device_id,
            "version": self.version,
            "at": at(self.version),
            "position": self.version,
        }

    def registered(self) -> DeviceRegistered:
        return DeviceRegistered(**self._common(), name="n", type="t", labels={})

    def connected(self) -> DeviceConnected:
        return DeviceConnected(**self._common())

    def disconnected(self) -> DeviceDisconnected:
        return DeviceDisconnected(**self._common())

    def configured(self, config_version: int, config: dict[str, Any]) -> DeviceConfigured:
        return DeviceConfigured(**self._common(), config=config, config_version=config_version)

    def requested(self, command_id: str, ttl_s: float = 3600.0) -> DeviceCommandRequested:
        return DeviceCommandRequested(
            **self._common(),
            command_id=command_id,
            name="reboot",
            args={"delay": 1},
            expires_at=T0 + timedelta(seconds=ttl_s),
        )

    def sent(self, command_id: str) -> DeviceCommandSent:
        return DeviceCommandSent(**self._common(), command_id=command_id)

    def acknowledged(self, command_id: str) -> DeviceCommandAcknowledged:
        return DeviceCommandAcknowledged(**self._common(), command_id=command_id, result={})

    def failed(self, command_id: str) -> DeviceCommandFailed:
        return DeviceCommandFailed(**self._common(), command_id=command_id, result={})

    def expired(self, command_id: str) -> DeviceCommandExpired:
        return DeviceCommandExpired(**self._common(), command_id=command_id)

    def cancelled(self, command_id: str) -> DeviceCommandCancelled:
        return DeviceCommandCancelled(**self._common(), command_id=command_id, reason="r")

    def suspended(self) -> DeviceSuspended:
        return DeviceSuspended(**self._common(), reason="r")

    def resumed(self) -> DeviceResumed:
        return DeviceResumed(**self._common(), status="active")

    def decommissioned(self) -> DeviceDecommissioned:
        return DeviceDecommissioned(**self._common(), reason="r")


def apply_all(registry: DeviceRegistry, *events: PublishedEvent) -> None:
    for event in events:
        registry.apply(event)


def test_connectivity_and_lifecycle_follow_the_events() -> None:
    registry, log = DeviceRegistry(), Log()
    apply_all(registry, log.registered())
    assert registry.devices == {"dev-1": "provisioned"}
    assert not registry.states["dev-1"].online
    apply_all(registry, log.connected())
    assert registry.states["dev-1"].online
    assert registry.devices["dev-1"] == "active"
    apply_all(registry, log.disconnected(), log.suspended())
    assert not registry.states["dev-1"].online
    assert registry.devices["dev-1"] == "suspended"
    apply_all(registry, log.resumed())
    assert registry.devices["dev-1"] == "active"


def test_desired_keeps_the_highest_config_version() -> None:
    registry, log = DeviceRegistry(), Log()
    apply_all(registry, log.registered(), log.configured(2, {"a": 2}), log.configured(1, {"a": 1}))
    assert registry.states["dev-1"].desired == Desired(2, {"a": 2})


def test_pending_commands_keep_request_order_until_finished() -> None:
    registry, log = DeviceRegistry(), Log()
    apply_all(registry, log.registered())
    apply_all(registry, *(log.requested(f"c{i}") for i in range(5)), log.sent("c1"))
    state = registry.states["dev-1"]
    assert list(state.pending) == ["c0", "c1", "c2", "c3", "c4"]
    assert [c.state for c in state.pending.values()] == [
        REQUESTED,
        SENT,
        REQUESTED,
        REQUESTED,
        REQUESTED,
    ]
    assert [c.command_id for c in state.requested()] == ["c0", "c2", "c3", "c4"]
    apply_all(
        registry, log.acknowledged("c1"), log.failed("c0"), log.expired("c2"), log.cancelled("c3")
    )
    assert list(state.pending) == ["c4"]
    command = state.pending["c4"]
    assert (command.name, command.args, command.expires_at) == (
        "reboot",
        {"delay": 1},
        T0 + timedelta(hours=1),
    )


def test_decommissioning_drops_pending_commands_and_connectivity() -> None:
    registry, log = DeviceRegistry(), Log()
    apply_all(
        registry, log.registered(), log.connected(), log.requested("c1"), log.decommissioned()
    )
    state = registry.states["dev-1"]
    assert (state.status, state.online, state.pending) == ("decommissioned", False, {})
    apply_all(registry, log.resumed())
    assert registry.devices["dev-1"] == "decommissioned"


def test_a_republished_event_is_applied_once_and_heard_once() -> None:
    heard: list[PublishedEvent] = []
    registry, log = DeviceRegistry(heard.append), Log()
    registered, requested = log.registered(), log.requested("c1")
    apply_all(registry, registered, requested, log.acknowledged("c1"))
    assert not registry.apply(requested)  # the relay republished it after a crash
    assert not registry.apply(registered)
    assert registry.states["dev-1"].pending == {}
    assert len(heard) == 3


def test_events_of_an_unknown_device_are_ignored() -> None:
    registry = DeviceRegistry()
    log = Log("ghost")
    log.version = 1
    assert not registry.apply(log.connected())
    assert registry.devices == {}


def test_pending_commands_are_bounded_even_if_the_log_breaks_the_aggregate_rule() -> None:
    registry, log = DeviceRegistry(), Log()
    apply_all(
        registry, log.registered(), *(log.requested(f"c{i}") for i in range(PENDING_LIMIT + 5))
    )
    assert len(registry.states["dev-1"].pending) == PENDING_LIMIT


def test_an_undecodable_message_is_skipped_and_its_sequence_counted() -> None:
    registry, log = DeviceRegistry(), Log()
    registry.apply_raw(1, encode_event(log.registered()))
    registry.apply_raw(2, b"{not json")
    assert registry.sequence == 2
    assert "dev-1" in registry.devices
