"""The Device aggregate: its lifecycle, its rules and its events."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, cast
from uuid import UUID

import pytest
from eventsourcing.application import Application

from domain.device import Device, Status, device_uuid
from domain.errors import IllegalTransition, InvalidCommand
from tests.unit.support import DEVICE_ID, SECRET_HASH, T0, at, event_names, registered, state

# -- registration ---------------------------------------------------------------------------


def test_registration_provisions_an_offline_device_with_empty_config() -> None:
    device = registered()

    assert device.device_id == DEVICE_ID
    assert device.name == "Boiler room sensor"
    assert device.type == "thermometer"
    assert device.labels == {"site": "lab"}
    assert device.secret_hash == SECRET_HASH
    assert device.status == Status.PROVISIONED
    assert device.config == {}
    assert device.config_version == 0
    assert device.online is False
    assert device.first_connected_at is None
    assert device.version == 1
    assert device.id == device_uuid(DEVICE_ID)
    assert event_names(device) == ["Registered"]


def test_aggregate_id_is_stable_per_device_id_and_differs_between_ids() -> None:
    assert device_uuid(DEVICE_ID) == device_uuid(DEVICE_ID)
    assert device_uuid(DEVICE_ID) != device_uuid("sensor-002")
    assert registered().id == registered().id


def test_registration_copies_the_callers_labels() -> None:
    labels = {"site": "lab"}
    device = registered(labels=labels)
    labels["site"] = "changed"

    assert device.labels == {"site": "lab"}


@pytest.mark.parametrize(
    "device_id",
    [
        "",
        "has space",
        "slash/inside",
        "dot.inside",
        "plus+",
        "wild#",
        "ümlaut",
        "x" * 65,
        "sensor-001\n",
        "\nsensor-001",
    ],
)
def test_registration_with_invalid_device_id_is_rejected(device_id: str) -> None:
    with pytest.raises(InvalidCommand) as caught:
        registered(device_id)

    assert "device_id" in caught.value.reason


@pytest.mark.parametrize("device_id", ["a", "A-z_0-9", "x" * 64])
def test_registration_accepts_device_ids_within_the_pattern(device_id: str) -> None:
    assert registered(device_id).device_id == device_id


@pytest.mark.parametrize("name", ["", "n" * 201])
def test_registration_with_empty_or_overlong_name_is_rejected(name: str) -> None:
    with pytest.raises(InvalidCommand) as caught:
        Device.register(DEVICE_ID, name, "thermometer", {}, SECRET_HASH, T0)

    assert "name" in caught.value.reason


def test_registration_accepts_a_name_of_maximum_length() -> None:
    device = Device.register(DEVICE_ID, "n" * 200, "thermometer", {}, SECRET_HASH, T0)

    assert len(device.name) == 200


@pytest.mark.parametrize("type_", ["", "t" * 65])
def test_registration_with_empty_or_overlong_type_is_rejected(type_: str) -> None:
    with pytest.raises(InvalidCommand) as caught:
        Device.register(DEVICE_ID, "Boiler", type_, {}, SECRET_HASH, T0)

    assert "type" in caught.value.reason


def test_registration_accepts_a_type_of_maximum_length() -> None:
    device = Device.register(DEVICE_ID, "Boiler", "t" * 64, {}, SECRET_HASH, T0)

    assert device.type == "t" * 64


@pytest.mark.parametrize(
    "labels",
    [
        {"": "v"},
        {"bad key": "v"},
        {"k/slash": "v"},
        {"k" * 65: "v"},
        {"key\n": "v"},
        {"k": "v" * 257},
        cast(dict[str, str], {"k": 1}),
        cast(dict[str, str], {"k": None}),
        {f"k{i}": "v" for i in range(65)},
    ],
    ids=[
        "empty-key",
        "space-in-key",
        "slash-in-key",
        "long-key",
        "newline-after-key",
        "long-value",
        "int-value",
        "null-value",
        "too-many",
    ],
)
def test_registration_with_invalid_labels_is_rejected(labels: dict[str, str]) -> None:
    with pytest.raises(InvalidCommand) as caught:
        registered(labels=labels)

    assert "label" in caught.value.reason


def test_registration_accepts_labels_at_their_limits() -> None:
    labels = {f"k.{i}_-": "v" * 256 for i in range(63)} | {"k" * 64: ""}

    assert registered(labels=labels).labels == labels


def test_invalid_command_carries_its_reason_as_message() -> None:
    with pytest.raises(InvalidCommand) as caught:
        registered("")

    assert str(caught.value) == caught.value.reason


# -- configuration --------------------------------------------------------------------------


def test_each_configuration_increments_the_config_version() -> None:
    device = registered()
    device.configure({"interval_s": 10}, at(1))
    device.configure({"interval_s": 20}, at(2))
    device.configure({"interval_s": 30, "mode": "eco"}, at(3))

    assert device.config == {"interval_s": 30, "mode": "eco"}
    assert device.config_version == 3
    assert device.version == 4
    assert event_names(device) == ["Registered", "Configured", "Configured", "Configured"]


def test_configuration_copies_the_callers_config() -> None:
    device = registered()
    config: dict[str, Any] = {"interval_s": 10}
    device.configure(config, at(1))
    config["interval_s"] = 99

    assert device.config == {"interval_s": 10}


def test_suspended_device_can_be_configured() -> None:
    device = registered()
    device.suspend("maintenance", at(1))
    device.configure({"interval_s": 10}, at(2))

    assert device.status == Status.SUSPENDED
    assert device.config_version == 1


# -- lifecycle: legal transitions -----------------------------------------------------------


def test_first_connection_activates_a_provisioned_device() -> None:
    device = registered()

    assert device.connect(at(1)) is True

    assert device.status == Status.ACTIVE
    assert device.online is True
    assert device.first_connected_at == at(1)
    assert device.last_connected_at == at(1)
    assert device.connectivity_at == at(1)
    assert event_names(device) == ["Registered", "Connected"]


def test_later_connections_keep_the_first_connection_time() -> None:
    device = registered()
    device.connect(at(1))
    device.disconnect(at(2))
    device.connect(at(3))

    assert device.first_connected_at == at(1)
    assert device.last_connected_at == at(3)
    assert device.last_disconnected_at == at(2)
    assert device.status == Status.ACTIVE


def test_disconnection_keeps_an_active_device_active_and_marks_it_offline() -> None:
    device = registered()
    device.connect(at(1))

    assert device.disconnect(at(2)) is True

    assert device.status == Status.ACTIVE
    assert device.online is False
    assert device.last_disconnected_at == at(2)
    assert device.connectivity_at == at(2)


def test_active_device_can_be_suspended_with_a_reason() -> None:
    device = registered()
    device.connect(at(1))
    device.suspend("unpaid invoice", at(2))

    assert device.status == Status.SUSPENDED
    assert device.suspended_reason == "unpaid invoice"


def test_provisioned_device_can_be_suspended() -> None:
    device = registered()
    device.suspend("not yet installed", at(1))

    assert device.status == Status.SUSPENDED


def test_resumed_device_that_has_connected_before_is_active_again() -> None:
    device = registered()
    device.connect(at(1))
    device.disconnect(at(2))
    device.suspend("maintenance", at(3))
    device.resume(at(4))

    assert device.status == Status.ACTIVE
    assert device.suspended_reason is None


def test_resumed_device_that_never_connected_is_provisioned_again() -> None:
    device = registered()
    device.suspend("maintenance", at(1))
    device.resume(at(2))

    assert device.status == Status.PROVISIONED
    assert device.suspended_reason is None


def test_suspended_device_that_connects_stays_suspended_but_is_recorded_online() -> None:
    device = registered()
    device.suspend("maintenance", at(1))

    assert device.connect(at(2)) is True

    assert device.status == Status.SUSPENDED
    assert device.online is True
    assert device.first_connected_at == at(2)


def test_device_that_first_connected_while_suspended_resumes_as_active() -> None:
    device = registered()
    device.suspend("maintenance", at(1))
    device.connect(at(2))
    device.resume(at(3))

    assert device.status == Status.ACTIVE
    assert device.online is True


def test_device_can_be_suspended_and_resumed_repeatedly() -> None:
    device = registered()
    device.connect(at(1))
    for i in range(3):
        device.suspend(f"round {i}", at(10 * i + 2))
        device.resume(at(10 * i + 3))

    assert device.status == Status.ACTIVE
    assert device.version == 9  # the first suspension also disconnected it


def test_suspending_rotating_or_decommissioning_an_online_device_records_its_disconnection() -> (
    None
):
    changes: list[Callable[[Device], None]] = [
        lambda d: d.suspend("stolen", at(5)),
        lambda d: d.rotate_secret("new-hash", at(5)),
        lambda d: d.decommission("scrapped", at(5)),
    ]
    for change in changes:
        device = registered()
        device.connect(at(1))
        change(device)
        kinds = [type(e).__qualname__ for e in device.collect_events()]
        assert "Device.Disconnected" in kinds
        assert device.online is False
        assert device.last_disconnected_at == at(5)


def test_a_stale_online_after_a_kick_changes_nothing() -> None:
    device = registered()
    device.connect(at(1))
    device.suspend("stolen", at(5))

    assert device.connect(at(4)) is False
    assert device.online is False


def _provisioned() -> Device:
    return registered()


def _active() -> Device:
    device = registered()
    device.connect(at(1))
    return device


def _suspended() -> Device:
    device = registered()
    device.connect(at(1))
    device.suspend("maintenance", at(2))
    return device


@pytest.mark.parametrize(
    "make", [_provisioned, _active, _suspended], ids=["provisioned", "active", "suspended"]
)
def test_device_can_be_decommissioned_from_any_live_status(make: Callable[[], Device]) -> None:
    device = make()
    device.decommission("end of life", at(10))

    assert device.status == Status.DECOMMISSIONED
    assert device.online is False
    assert type(device.collect_events()[-1]).__name__ == "Decommissioned"


def test_secret_rotation_replaces_the_hash() -> None:
    device = registered()
    device.rotate_secret("pbkdf2_sha256$1000$bmV3c2FsdG5ld3NhbHQ=$new-hash", at(1))

    assert device.secret_hash == "pbkdf2_sha256$1000$bmV3c2FsdG5ld3NhbHQ=$new-hash"
    assert event_names(device) == ["Registered", "SecretRotated"]


def test_suspended_device_secret_can_be_rotated() -> None:
    device = _suspended()
    device.rotate_secret("other-hash", at(10))

    assert device.secret_hash == "other-hash"
    assert device.status == Status.SUSPENDED


# -- lifecycle: illegal transitions ---------------------------------------------------------


def test_suspending_a_suspended_device_is_refused() -> None:
    device = _suspended()
    device.collect_events()

    with pytest.raises(IllegalTransition) as caught:
        device.suspend("again", at(10))

    assert DEVICE_ID in caught.value.reason
    assert "suspended" in caught.value.reason
    assert device.collect_events() == []
    assert device.suspended_reason == "maintenance"


@pytest.mark.parametrize("make", [_provisioned, _active], ids=["provisioned", "active"])
def test_resuming_a_device_that_is_not_suspended_is_refused(make: Callable[[], Device]) -> None:
    device = make()
    status = device.status
    device.collect_events()

    with pytest.raises(IllegalTransition) as caught:
        device.resume(at(10))

    assert DEVICE_ID in caught.value.reason
    assert status in caught.value.reason
    assert device.collect_events() == []


AFTER_DECOMMISSION: dict[str, Callable[[Device], object]] = {
    "configure": lambda d: d.configure({"interval_s": 1}, at(20)),
    "suspend": lambda d: d.suspend("again", at(20)),
    "resume": lambda d: d.resume(at(20)),
    "decommission": lambda d: d.decommission("again", at(20)),
    "rotate_secret": lambda d: d.rotate_secret("other-hash", at(20)),
    "connect": lambda d: d.connect(at(20)),
    "disconnect": lambda d: d.disconnect(at(20)),
}


@pytest.mark.parametrize(
    "make", [_provisioned, _active, _suspended], ids=["provisioned", "active", "suspended"]
)
@pytest.mark.parametrize("command", list(AFTER_DECOMMISSION), ids=list(AFTER_DECOMMISSION))
def test_every_command_after_decommission_is_refused_naming_the_device(
    make: Callable[[], Device], command: str
) -> None:
    device = make()
    device.decommission("end of life", at(10))
    before = state(device)
    device.collect_events()

    with pytest.raises(IllegalTransition) as caught:
        AFTER_DECOMMISSION[command](device)

    assert DEVICE_ID in caught.value.reason
    assert "decommissioned" in caught.value.reason
    assert device.collect_events() == []
    assert state(device) == before


def test_illegal_transition_carries_its_reason_as_message() -> None:
    device = registered()
    with pytest.raises(IllegalTransition) as caught:
        device.resume(at(1))

    assert str(caught.value) == caught.value.reason


# -- connectivity: repeated and stale reports -----------------------------------------------


def test_repeated_connection_changes_nothing() -> None:
    device = registered()
    device.connect(at(1))
    device.collect_events()

    assert device.connect(at(2)) is False

    assert device.collect_events() == []
    assert device.last_connected_at == at(1)
    assert device.connectivity_at == at(1)


def test_disconnection_of_an_offline_device_changes_nothing() -> None:
    device = registered()
    device.collect_events()

    assert device.disconnect(at(1)) is False

    assert device.collect_events() == []
    assert device.last_disconnected_at is None


def test_repeated_disconnection_changes_nothing() -> None:
    device = _active()
    device.disconnect(at(2))
    device.collect_events()

    assert device.disconnect(at(3)) is False

    assert device.collect_events() == []
    assert device.last_disconnected_at == at(2)


def test_disconnection_older_than_the_last_connection_is_ignored() -> None:
    device = registered()
    device.connect(at(10))
    device.collect_events()

    assert device.disconnect(at(5)) is False

    assert device.online is True
    assert device.collect_events() == []


def test_disconnection_at_the_same_instant_as_the_connection_is_ignored() -> None:
    device = registered()
    device.connect(at(10))
    device.collect_events()

    assert device.disconnect(at(10)) is False

    assert device.online is True
    assert device.collect_events() == []


def test_connection_older_than_the_last_disconnection_is_ignored() -> None:
    device = registered()
    device.connect(at(10))
    device.disconnect(at(20))
    device.collect_events()

    assert device.connect(at(15)) is False
    assert device.connect(at(20)) is False

    assert device.online is False
    assert device.last_connected_at == at(10)
    assert device.collect_events() == []


def test_stale_connection_of_a_suspended_device_changes_nothing() -> None:
    device = registered()
    device.suspend("maintenance", at(1))
    device.connect(at(10))
    device.disconnect(at(20))
    device.collect_events()

    assert device.connect(at(19)) is False

    assert device.online is False
    assert device.status == Status.SUSPENDED
    assert device.collect_events() == []


# -- events ---------------------------------------------------------------------------------


def _full_life() -> Device:
    device = registered()
    device.configure({"interval_s": 10}, at(1))
    device.connect(at(2))
    device.disconnect(at(3))
    device.suspend("maintenance", at(4))
    device.connect(at(5))
    device.disconnect(at(6))
    device.rotate_secret("other-hash", at(7))
    device.resume(at(8))
    device.configure({"interval_s": 20}, at(9))
    device.decommission("end of life", at(10))
    return device


def test_every_event_carries_the_device_id_the_given_time_and_the_next_version() -> None:
    events = _full_life().collect_events()

    assert [type(e).__name__ for e in events] == [
        "Registered",
        "Configured",
        "Connected",
        "Disconnected",
        "Suspended",
        "Connected",
        "Disconnected",
        "SecretRotated",
        "Resumed",
        "Configured",
        "Decommissioned",
    ]
    for index, domain_event in enumerate(events):
        assert isinstance(domain_event, Device.Event)
        assert domain_event.device_id == DEVICE_ID
        assert domain_event.originator_id == device_uuid(DEVICE_ID)
        assert domain_event.originator_version == index + 1
        assert domain_event.timestamp == at(index)


def test_events_record_the_decided_values() -> None:
    events = {type(e).__name__: vars(e) for e in _full_life().collect_events()}

    assert events["Registered"]["secret_hash"] == SECRET_HASH
    assert events["Registered"]["labels"] == {"site": "lab"}
    assert events["Configured"]["config"] == {"interval_s": 20}
    assert events["Configured"]["config_version"] == 2
    assert events["Suspended"]["reason"] == "maintenance"
    assert events["Resumed"]["status"] == Status.ACTIVE
    assert events["Decommissioned"]["reason"] == "end of life"
    assert events["SecretRotated"]["secret_hash"] == "other-hash"


def test_device_rebuilt_by_folding_its_events_has_the_same_state() -> None:
    device = _full_life()
    rebuilt: Device | None = None
    for domain_event in device.collect_events():
        rebuilt = cast(Device | None, domain_event.mutate(rebuilt))

    assert rebuilt is not None
    assert state(rebuilt) == state(device)


@pytest.mark.parametrize(
    "make", [_provisioned, _active, _suspended, _full_life], ids=lambda f: f.__name__.strip("_")
)
def test_device_saved_and_reloaded_through_an_application_has_the_same_state(
    make: Callable[[], Device],
) -> None:
    app = Application[UUID](env={"PERSISTENCE_MODULE": "eventsourcing.popo"})
    device = make()
    app.save(device)

    reloaded: object = app.repository.get(device.id)

    assert isinstance(reloaded, Device)
    assert state(reloaded) == state(device)


def test_reloaded_device_keeps_deciding_like_the_original() -> None:
    app = Application[UUID](env={"PERSISTENCE_MODULE": "eventsourcing.popo"})
    device = _suspended()
    app.save(device)
    reloaded: object = app.repository.get(device.id)
    assert isinstance(reloaded, Device)

    with pytest.raises(IllegalTransition):
        reloaded.suspend("again", at(10))
    reloaded.resume(at(10))
    app.save(reloaded)

    final: object = app.repository.get(device.id)
    assert isinstance(final, Device)
    assert final.status == Status.ACTIVE
    assert final.version == 5  # registered, connected, suspended, disconnected, resumed


# -- commands to the device -------------------------------------------------------------------


def _with_command(command_id: str = "c1", ttl_s: int = 60) -> Device:
    device = registered()
    device.request_command(command_id, "reboot", {"delay_s": 1}, ttl_s, at(1))
    device.collect_events()
    return device


def test_requested_command_is_pending_until_its_ttl() -> None:
    device = registered()
    device.collect_events()

    expires_at = device.request_command("c1", "reboot", {"delay_s": 1}, 60, at(1))

    assert expires_at == at(61)
    assert device.pending_commands() == ["c1"]
    assert device.commands["c1"] == {
        "name": "reboot",
        "args": {"delay_s": 1},
        "expires_at": at(61),
        "state": "requested",
        "requested_at": at(1),
    }
    assert event_names(device) == ["CommandRequested"]


@pytest.mark.parametrize("name", ["", "has space", "a/b", "x" * 65])
def test_command_with_a_bad_name_is_invalid(name: str) -> None:
    with pytest.raises(InvalidCommand):
        registered().request_command("c1", name, {}, 60, at(1))


@pytest.mark.parametrize("ttl_s", [0, -1, 7 * 24 * 3600 + 1])
def test_command_with_a_ttl_out_of_range_is_invalid(ttl_s: int) -> None:
    with pytest.raises(InvalidCommand):
        registered().request_command("c1", "reboot", {}, ttl_s, at(1))


def test_command_for_a_suspended_device_is_refused() -> None:
    device = registered()
    device.suspend("maintenance", at(1))

    with pytest.raises(IllegalTransition) as caught:
        device.request_command("c1", "reboot", {}, 60, at(2))

    assert "suspended" in caught.value.reason


def test_a_device_holds_at_most_100_pending_commands() -> None:
    device = registered()
    for n in range(100):
        device.request_command(f"c{n}", "ping", {}, 60, at(1))

    with pytest.raises(IllegalTransition):
        device.request_command("c100", "ping", {}, 60, at(1))
    device.acknowledge_command("c0", True, {}, at(2))
    device.request_command("c100", "ping", {}, 60, at(3))

    assert len(device.pending_commands()) == 100


def test_command_id_cannot_be_reused() -> None:
    device = _with_command()

    with pytest.raises(IllegalTransition):
        device.request_command("c1", "reboot", {}, 60, at(2))


def test_command_goes_sent_then_acknowledged_and_a_repeated_ack_changes_nothing() -> None:
    device = _with_command()

    assert device.mark_command_sent("c1", at(2)) is True
    assert device.mark_command_sent("c1", at(3)) is False
    assert device.acknowledge_command("c1", True, {"ok": 1}, at(4)) is True
    assert device.acknowledge_command("c1", True, {"ok": 1}, at(5)) is False
    assert device.acknowledge_command("c1", False, {}, at(5)) is False

    assert device.commands["c1"]["state"] == "acknowledged"
    assert device.pending_commands() == []
    assert event_names(device) == ["CommandSent", "CommandAcknowledged"]


def test_ack_before_the_sent_report_still_acknowledges_and_the_late_report_is_ignored() -> None:
    device = _with_command()

    assert device.acknowledge_command("c1", True, {}, at(2)) is True
    assert device.mark_command_sent("c1", at(1.5)) is False

    assert device.commands["c1"]["state"] == "acknowledged"


def test_error_ack_fails_the_command() -> None:
    device = _with_command()

    assert device.acknowledge_command("c1", False, {"error": "busy"}, at(2)) is True

    assert device.commands["c1"]["state"] == "failed"
    assert event_names(device) == ["CommandFailed"]


def test_reports_about_unknown_commands_change_nothing() -> None:
    device = _with_command()

    assert device.mark_command_sent("nope", at(2)) is False
    assert device.acknowledge_command("nope", True, {}, at(2)) is False
    assert device.expire_command("nope", at(100)) is False
    assert event_names(device) == []


def test_command_expires_only_once_its_time_is_up_and_then_ignores_its_ack() -> None:
    device = _with_command(ttl_s=60)

    assert device.expire_command("c1", at(60)) is False
    assert device.expire_command("c1", at(61)) is True
    assert device.expire_command("c1", at(62)) is False
    assert device.acknowledge_command("c1", True, {}, at(63)) is False

    assert device.commands["c1"]["state"] == "expired"
    assert event_names(device) == ["CommandExpired"]


def test_cancel_finishes_a_pending_command_and_refuses_a_finished_one() -> None:
    device = _with_command()

    device.cancel_command("c1", "wrong", at(2))

    assert device.commands["c1"]["state"] == "cancelled"
    with pytest.raises(IllegalTransition):
        device.cancel_command("c1", "again", at(3))
    with pytest.raises(InvalidCommand):
        device.cancel_command("nope", "x", at(3))


@pytest.mark.parametrize("end", ["suspend", "decommission"])
def test_suspend_and_decommission_cancel_every_pending_command(end: str) -> None:
    device = _with_command("c1")
    device.request_command("c2", "ping", {}, 60, at(1))
    device.acknowledge_command("c1", True, {}, at(2))
    device.collect_events()

    getattr(device, end)("bye", at(3))

    assert device.pending_commands() == []
    assert device.commands["c2"]["state"] == "cancelled"
    assert device.commands["c1"]["state"] == "acknowledged"
    assert event_names(device)[1:] == ["CommandCancelled"]


def test_only_the_5_most_recent_finished_commands_are_kept() -> None:
    device = registered()
    for n in range(25):
        device.request_command(f"c{n}", "ping", {"n": n}, 60, at(1))
        device.acknowledge_command(f"c{n}", True, {}, at(2))
    device.request_command("live", "ping", {"n": 99}, 60, at(3))

    assert len(device.commands) == 6
    assert "c19" not in device.commands
    assert device.commands["c20"]["state"] == "acknowledged"
    assert device.commands["live"]["args"] == {"n": 99}
    assert device.pending_commands() == ["live"]


def test_command_lifecycle_survives_a_reload() -> None:
    app = Application[UUID](env={"PERSISTENCE_MODULE": "eventsourcing.popo"})
    device = registered()
    device.request_command("c1", "reboot", {"delay_s": 1}, 60, at(1))
    device.mark_command_sent("c1", at(2))
    app.save(device)

    reloaded: object = app.repository.get(device.id)

    assert isinstance(reloaded, Device)
    assert state(reloaded) == state(device)
    assert reloaded.acknowledge_command("c1", True, {}, at(3)) is True
