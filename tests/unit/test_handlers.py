"""Command handlers against an in-memory store that loses races on demand."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Any

import pytest
from eventsourcing.persistence import IntegrityError
from prometheus_client import REGISTRY

from commands import handlers
from commands.handlers import (
    AlreadyExists,
    Credentials,
    NotFound,
    Replayed,
    TooMuchContention,
    VersionMismatch,
    change,
    register,
)
from domain.credentials import verify_secret
from domain.device import Device, Status
from domain.errors import IllegalTransition, InvalidCommand
from infra.eventstore import IdempotencyRecord
from tests.unit.support import DEVICE_ID, T0, at

Rival = Callable[[Device], None]
PRINCIPAL = "principal-0123456789abcdef"


class FakeStore:
    """Per-device event streams with optimistic concurrency, like the real event store.

    `rivals` are other writers that commit just before our next saves, so that save loses
    the race; `always_lose` makes every save lose one.
    """

    def __init__(self) -> None:
        self.streams: dict[str, list[Any]] = {}
        self.idempotency: dict[tuple[str, str], IdempotencyRecord] = {}
        self.rivals: list[Rival] = []
        self.always_lose: Rival | None = None
        self.position = 0
        self.save_attempts = 0
        self.lookups: list[tuple[str, str]] = []

    def get(self, device_id: str) -> Device | None:
        events = self.streams.get(device_id)
        if not events:
            return None
        device: Device | None = None
        for stored in events:
            device = stored.mutate(device)
        return device

    def save_device(self, device: Device, idempotency: IdempotencyRecord | None = None) -> int:
        self.save_attempts += 1
        rival = self.rivals.pop(0) if self.rivals else self.always_lose
        if rival is not None:
            self._commit_rival(device.device_id, rival)
        return self._append(device, idempotency)

    def find_idempotency(self, principal: str, key: str) -> IdempotencyRecord | None:
        self.lookups.append((principal, key))
        return self.idempotency.get((principal, key))

    def seed(self, device: Device) -> None:
        """Store a device written by someone else (no race, not counted as an attempt)."""
        self._append(device, None)

    def events_of(self, device_id: str) -> list[str]:
        return [type(e).__name__ for e in self.streams.get(device_id, [])]

    def _commit_rival(self, device_id: str, rival: Rival) -> None:
        current = self.get(device_id)
        assert current is not None, "a rival can only change a stored device"
        rival(current)
        self._append(current, None)

    def _append(self, device: Device, idempotency: IdempotencyRecord | None) -> int:
        pending = device.collect_events()
        stream = self.streams.setdefault(device.device_id, [])
        if pending and pending[0].originator_version != len(stream) + 1:
            raise IntegrityError(f"version {pending[0].originator_version} exists")
        if idempotency is not None:
            key = (idempotency.principal, idempotency.key)
            if key in self.idempotency:
                raise IntegrityError(f"idempotency key {key} exists")
            self.idempotency[key] = idempotency
        stream.extend(pending)
        self.position += len(pending)
        return self.position


class Sleeps:
    """An injected sleep that only records how long it was asked to wait."""

    def __init__(self) -> None:
        self.calls: list[float] = []

    def __call__(self, seconds: float) -> None:
        self.calls.append(seconds)


def fixed_credentials() -> Credentials:
    secrets = (f"secret-{n:04d}-0123456789abcdef" for n in itertools.count(1))
    salts = (n.to_bytes(16, "big") for n in itertools.count(1))
    return Credentials(new_secret=lambda: next(secrets), new_salt=lambda: next(salts))


def answer_with(key: str, status: int = 200) -> handlers.Answer:
    def answer(device: Device, secret: str | None) -> IdempotencyRecord:
        body = f'{{"device_id":"{device.device_id}","version":{device.version}}}'.encode()
        return IdempotencyRecord(
            principal=PRINCIPAL,
            key=key,
            fingerprint="fingerprint-0",
            status=status,
            body=body,
            created_at=T0,
        )

    return answer


def register_device(store: FakeStore, device_id: str = DEVICE_ID) -> handlers.Outcome:
    return register(
        store,
        device_id=device_id,
        name="Boiler room sensor",
        type="thermometer",
        labels={"site": "lab"},
        credentials=fixed_credentials(),
        at=T0,
    )


def store_with_device() -> FakeStore:
    """A store holding one registered device, its counters reset."""
    store = FakeStore()
    register_device(store)
    store.save_attempts = 0
    store.lookups.clear()
    return store


def rival_configures(value: int) -> Rival:
    return lambda device: device.configure({"rival": value}, at(100 + value))


def conflict_retries() -> float:
    return REGISTRY.get_sample_value("iot_command_conflict_retries_total") or 0.0


# -- register -------------------------------------------------------------------------------


def test_registration_returns_the_secret_once_and_stores_only_its_hash() -> None:
    store = FakeStore()

    outcome = register_device(store)

    assert outcome.secret == "secret-0001-0123456789abcdef"
    assert outcome.device.device_id == DEVICE_ID
    assert outcome.device.version == 1
    assert outcome.position == 1
    stored = store.get(DEVICE_ID)
    assert stored is not None
    assert stored.secret_hash != outcome.secret
    assert outcome.secret not in stored.secret_hash
    assert verify_secret(outcome.secret, stored.secret_hash) is True
    assert verify_secret("another-secret-0123456789", stored.secret_hash) is False


def test_registration_stores_one_registered_event_with_the_given_time() -> None:
    store = FakeStore()

    register_device(store)

    assert store.events_of(DEVICE_ID) == ["Registered"]
    assert store.streams[DEVICE_ID][0].timestamp == T0
    stored = store.get(DEVICE_ID)
    assert stored is not None
    assert stored.status == Status.PROVISIONED
    assert stored.labels == {"site": "lab"}


def test_second_registration_of_same_id_is_rejected() -> None:
    store = FakeStore()
    register_device(store)

    with pytest.raises(AlreadyExists) as caught:
        register_device(store)

    assert DEVICE_ID in caught.value.reason
    assert store.events_of(DEVICE_ID) == ["Registered"]


def test_registrations_of_distinct_ids_both_succeed_at_increasing_positions() -> None:
    store = FakeStore()

    first = register_device(store, "sensor-001")
    second = register_device(store, "sensor-002")

    assert second.position > first.position


def test_registration_with_an_invalid_id_stores_nothing() -> None:
    store = FakeStore()

    with pytest.raises(InvalidCommand):
        register_device(store, "not valid")

    assert store.save_attempts == 0
    assert store.streams == {}


def test_registration_stores_the_idempotency_answer_with_the_events() -> None:
    store = FakeStore()

    register(
        store,
        device_id=DEVICE_ID,
        name="Boiler",
        type="thermometer",
        labels={},
        credentials=fixed_credentials(),
        at=T0,
        answer=answer_with("key-1", 201),
    )

    record = store.idempotency[(PRINCIPAL, "key-1")]
    assert record.status == 201
    assert DEVICE_ID.encode() in record.body


def test_registration_losing_to_a_request_with_the_same_key_is_replayed() -> None:
    store = FakeStore()
    register(
        store,
        device_id=DEVICE_ID,
        name="Boiler",
        type="thermometer",
        labels={},
        credentials=fixed_credentials(),
        at=T0,
        answer=answer_with("key-1", 201),
    )
    first = store.idempotency[(PRINCIPAL, "key-1")]

    with pytest.raises(Replayed) as caught:
        register(
            store,
            device_id=DEVICE_ID,
            name="Boiler",
            type="thermometer",
            labels={},
            credentials=fixed_credentials(),
            at=at(1),
            answer=answer_with("key-1", 201),
        )

    assert caught.value.record == first
    assert store.lookups == [(PRINCIPAL, "key-1")]
    assert store.events_of(DEVICE_ID) == ["Registered"]


def test_registration_of_an_existing_id_with_a_new_key_is_rejected_not_replayed() -> None:
    store = FakeStore()
    register_device(store)

    with pytest.raises(AlreadyExists):
        register(
            store,
            device_id=DEVICE_ID,
            name="Boiler",
            type="thermometer",
            labels={},
            credentials=fixed_credentials(),
            at=at(1),
            answer=answer_with("key-2", 201),
        )

    assert store.lookups == [(PRINCIPAL, "key-2")]
    assert (PRINCIPAL, "key-2") not in store.idempotency


# -- change ---------------------------------------------------------------------------------


def test_change_applies_the_decision_and_appends_its_event() -> None:
    store = store_with_device()

    outcome = change(store, DEVICE_ID, handlers.configure({"interval_s": 10}, at(1)))

    assert outcome.secret is None
    assert outcome.device.config == {"interval_s": 10}
    assert outcome.device.version == 2
    assert outcome.position == 2
    assert store.events_of(DEVICE_ID) == ["Registered", "Configured"]


def test_change_of_an_unknown_device_is_not_found() -> None:
    store = FakeStore()
    decided: list[Device] = []

    with pytest.raises(NotFound) as caught:
        change(store, "sensor-404", decided.append)

    assert "sensor-404" in caught.value.reason
    assert decided == []


def test_change_with_a_stale_expected_version_is_refused_before_deciding() -> None:
    store = store_with_device()
    change(store, DEVICE_ID, handlers.configure({"interval_s": 10}, at(1)))
    decided: list[Device] = []

    with pytest.raises(VersionMismatch) as caught:
        change(store, DEVICE_ID, decided.append, expected_version=1)

    assert caught.value.expected == 1
    assert caught.value.actual == 2
    assert "2" in caught.value.reason
    assert decided == []
    assert store.save_attempts == 1  # the first change only


def test_change_with_the_current_expected_version_is_applied() -> None:
    store = store_with_device()

    outcome = change(
        store, DEVICE_ID, handlers.configure({"interval_s": 10}, at(1)), expected_version=1
    )

    assert outcome.device.version == 2
    assert store.events_of(DEVICE_ID) == ["Registered", "Configured"]


def test_change_with_expected_version_that_loses_a_race_is_a_version_mismatch() -> None:
    store = store_with_device()
    store.rivals = [rival_configures(1)]
    sleeps = Sleeps()

    with pytest.raises(VersionMismatch) as caught:
        change(
            store,
            DEVICE_ID,
            handlers.configure({"interval_s": 10}, at(1)),
            expected_version=1,
            sleep=sleeps,
        )

    assert caught.value.expected == 1
    assert caught.value.actual == 2
    assert sleeps.calls == []
    assert store.save_attempts == 1
    assert store.events_of(DEVICE_ID) == ["Registered", "Configured"]
    current = store.get(DEVICE_ID)
    assert current is not None
    assert current.config == {"rival": 1}


@pytest.mark.parametrize("lost_races", [1, 3, 10])
def test_change_without_expected_version_retries_lost_races_and_applies_once(
    lost_races: int,
) -> None:
    store = store_with_device()
    store.rivals = [rival_configures(n) for n in range(1, lost_races + 1)]
    sleeps = Sleeps()
    retries_before = conflict_retries()

    outcome = change(store, DEVICE_ID, handlers.configure({"interval_s": 10}, at(1)), sleep=sleeps)

    assert store.save_attempts == lost_races + 1
    assert len(sleeps.calls) == lost_races
    assert all(0 <= s <= 0.05 for s in sleeps.calls)
    assert conflict_retries() - retries_before == lost_races
    configs = [vars(e)["config"] for e in store.streams[DEVICE_ID][1:]]
    assert configs.count({"interval_s": 10}) == 1
    assert configs[-1] == {"interval_s": 10}
    assert outcome.device.version == lost_races + 2
    assert outcome.device.config_version == lost_races + 1
    stored = store.get(DEVICE_ID)
    assert stored is not None
    assert stored.config == {"interval_s": 10}


def test_retried_change_is_decided_again_on_the_fresh_state() -> None:
    store = store_with_device()
    store.rivals = [lambda device: device.suspend("by the rival", at(2))]
    sleeps = Sleeps()

    with pytest.raises(IllegalTransition) as caught:
        change(store, DEVICE_ID, handlers.suspend("by us", at(1)), sleep=sleeps)

    assert "already suspended" in caught.value.reason
    assert len(sleeps.calls) == 1
    stored = store.get(DEVICE_ID)
    assert stored is not None
    assert stored.suspended_reason == "by the rival"


def test_change_gives_up_after_max_attempts_of_lost_races() -> None:
    store = store_with_device()
    store.always_lose = rival_configures(1)
    sleeps = Sleeps()
    decided: list[int] = []

    def decide(device: Device) -> None:
        decided.append(device.version)
        device.configure({"interval_s": 10}, at(1))

    with pytest.raises(TooMuchContention) as caught:
        change(store, DEVICE_ID, decide, sleep=sleeps, max_attempts=5)

    assert "5" in caught.value.reason
    assert store.save_attempts == 5
    assert decided == [1, 2, 3, 4, 5]
    assert all(vars(e).get("config") != {"interval_s": 10} for e in store.streams[DEVICE_ID])


def test_change_with_max_attempts_of_one_does_not_retry() -> None:
    store = store_with_device()
    store.rivals = [rival_configures(1)]

    with pytest.raises(TooMuchContention):
        change(
            store,
            DEVICE_ID,
            handlers.configure({"interval_s": 10}, at(1)),
            sleep=Sleeps(),
            max_attempts=1,
        )

    assert store.save_attempts == 1


def test_domain_refusal_propagates_and_stores_nothing() -> None:
    store = store_with_device()

    with pytest.raises(IllegalTransition):
        change(store, DEVICE_ID, handlers.resume(at(1)))

    assert store.events_of(DEVICE_ID) == ["Registered"]


def test_lifecycle_handlers_drive_the_device_through_its_statuses() -> None:
    store = store_with_device()

    assert change(store, DEVICE_ID, handlers.suspend("m", at(1))).device.status == "suspended"
    assert change(store, DEVICE_ID, handlers.resume(at(2))).device.status == "provisioned"
    outcome = change(store, DEVICE_ID, handlers.decommission("eol", at(3)))

    assert outcome.device.status == "decommissioned"
    assert store.events_of(DEVICE_ID) == ["Registered", "Suspended", "Resumed", "Decommissioned"]
    with pytest.raises(IllegalTransition):
        change(store, DEVICE_ID, handlers.configure({}, at(4)))


def test_rotation_hands_back_a_new_secret_and_stores_only_its_hash() -> None:
    store = FakeStore()
    first = register_device(store)
    assert first.secret is not None
    credentials = Credentials(
        new_secret=lambda: "rotated-secret-0123456789", new_salt=lambda: b"\x07" * 16
    )

    outcome = change(store, DEVICE_ID, handlers.rotate_secret(credentials, at(1)))

    assert outcome.secret == "rotated-secret-0123456789"
    stored = store.get(DEVICE_ID)
    assert stored is not None
    assert verify_secret("rotated-secret-0123456789", stored.secret_hash) is True
    assert verify_secret(first.secret, stored.secret_hash) is False
    assert store.events_of(DEVICE_ID) == ["Registered", "SecretRotated"]


def test_change_stores_the_idempotency_answer_with_the_events() -> None:
    store = store_with_device()

    change(store, DEVICE_ID, handlers.suspend("m", at(1)), answer=answer_with("key-1", 200))

    assert store.idempotency[(PRINCIPAL, "key-1")].body == (
        f'{{"device_id":"{DEVICE_ID}","version":2}}'.encode()
    )


def test_change_losing_to_a_request_with_the_same_key_is_replayed() -> None:
    store = store_with_device()
    change(store, DEVICE_ID, handlers.suspend("m", at(1)), answer=answer_with("key-1"))
    first = store.idempotency[(PRINCIPAL, "key-1")]
    sleeps = Sleeps()

    with pytest.raises(Replayed) as caught:
        change(
            store,
            DEVICE_ID,
            handlers.configure({"interval_s": 10}, at(2)),
            answer=answer_with("key-1"),
            sleep=sleeps,
        )

    assert caught.value.record == first
    assert sleeps.calls == []
    assert store.events_of(DEVICE_ID) == ["Registered", "Suspended"]


def test_change_with_a_key_that_loses_a_race_to_another_writer_retries() -> None:
    store = store_with_device()
    store.rivals = [rival_configures(1)]
    sleeps = Sleeps()

    outcome = change(
        store,
        DEVICE_ID,
        handlers.configure({"interval_s": 10}, at(1)),
        answer=answer_with("key-1"),
        sleep=sleeps,
    )

    assert len(sleeps.calls) == 1
    assert store.lookups == [(PRINCIPAL, "key-1")]
    assert outcome.device.version == 3
    assert store.idempotency[(PRINCIPAL, "key-1")].body == (
        f'{{"device_id":"{DEVICE_ID}","version":3}}'.encode()
    )


def test_version_mismatch_message_names_both_versions() -> None:
    mismatch = VersionMismatch(expected=3, actual=5)

    assert mismatch.reason == "the device is at version 5, not 3"
    assert (mismatch.expected, mismatch.actual) == (3, 5)


# -- commands to devices and connectivity ---------------------------------------------------


def store_with_command(command_id: str = "c1", ttl_s: int = 60) -> FakeStore:
    store = store_with_device()
    change(store, DEVICE_ID, handlers.request_command(command_id, "reboot", {}, ttl_s, at(1)))
    store.save_attempts = 0
    return store


def test_request_command_appends_the_request_with_its_expiry() -> None:
    store = store_with_device()

    outcome = change(
        store, DEVICE_ID, handlers.request_command("c1", "reboot", {"a": 1}, 30, at(1))
    )

    assert outcome.changed is True
    assert outcome.device.commands["c1"]["expires_at"] == at(31)
    assert store.events_of(DEVICE_ID) == ["Registered", "CommandRequested"]


def test_request_command_for_a_suspended_device_is_refused_and_stores_nothing() -> None:
    store = store_with_device()
    change(store, DEVICE_ID, handlers.suspend("m", at(1)))

    with pytest.raises(IllegalTransition):
        change(store, DEVICE_ID, handlers.request_command("c1", "reboot", {}, 30, at(2)))

    assert store.events_of(DEVICE_ID) == ["Registered", "Suspended"]


def test_command_reports_move_the_command_through_its_lifecycle() -> None:
    store = store_with_command()

    change(store, DEVICE_ID, handlers.record_sent("c1", at(2)))
    outcome = change(store, DEVICE_ID, handlers.acknowledge("c1", True, {"v": 2}, at(3)))

    assert outcome.device.commands["c1"]["state"] == "acknowledged"
    assert store.events_of(DEVICE_ID)[-2:] == ["CommandSent", "CommandAcknowledged"]


@pytest.mark.parametrize(
    "decide",
    [
        handlers.acknowledge("c1", True, {}, at(5)),
        handlers.acknowledge("nope", True, {}, at(5)),
        handlers.record_sent("c1", at(5)),
        handlers.expire("c1", at(3600)),
        handlers.connect(at(0.5)),
        handlers.disconnect(at(6)),
    ],
    ids=["repeated-ack", "unknown-ack", "late-sent", "expire-finished", "stale-connect", "offline"],
)
def test_reports_that_change_nothing_append_nothing_and_save_nothing(
    decide: Callable[[Device], None],
) -> None:
    store = store_with_command()
    change(store, DEVICE_ID, handlers.acknowledge("c1", True, {}, at(2)))
    change(store, DEVICE_ID, handlers.connect(at(3)))
    change(store, DEVICE_ID, handlers.disconnect(at(4)))
    before = store.events_of(DEVICE_ID)
    store.save_attempts = 0

    outcome = change(store, DEVICE_ID, decide)

    assert outcome.changed is False
    assert outcome.position == 0
    assert store.save_attempts == 0
    assert store.events_of(DEVICE_ID) == before


def test_no_op_with_an_idempotency_key_stores_no_answer() -> None:
    store = store_with_device()

    outcome = change(store, DEVICE_ID, handlers.disconnect(at(1)), answer=answer_with("k"))

    assert outcome.changed is False
    assert store.idempotency == {}


def test_expire_before_the_expiry_changes_nothing_and_after_it_expires() -> None:
    store = store_with_command(ttl_s=60)

    early = change(store, DEVICE_ID, handlers.expire("c1", at(30)))
    due = change(store, DEVICE_ID, handlers.expire("c1", at(61)))

    assert (early.changed, due.changed) == (False, True)
    assert due.device.commands["c1"]["state"] == "expired"


def test_cancel_of_an_unknown_command_is_not_found() -> None:
    store = store_with_device()

    with pytest.raises(NotFound):
        change(store, DEVICE_ID, handlers.cancel("nope", "x", at(1)))


def test_cancel_of_a_finished_command_is_an_illegal_transition() -> None:
    store = store_with_command()
    change(store, DEVICE_ID, handlers.cancel("c1", "x", at(2)))

    with pytest.raises(IllegalTransition):
        change(store, DEVICE_ID, handlers.cancel("c1", "x", at(3)))


def test_connect_activates_and_disconnect_records_offline() -> None:
    store = store_with_device()

    connected = change(store, DEVICE_ID, handlers.connect(at(1)))
    disconnected = change(store, DEVICE_ID, handlers.disconnect(at(2)))

    assert connected.device.status == Status.ACTIVE
    assert disconnected.device.online is False
    assert store.events_of(DEVICE_ID) == ["Registered", "Connected", "Disconnected"]


def test_connect_of_a_decommissioned_device_is_refused() -> None:
    store = store_with_device()
    change(store, DEVICE_ID, handlers.decommission("eol", at(1)))

    with pytest.raises(IllegalTransition):
        change(store, DEVICE_ID, handlers.connect(at(2)))


def test_a_report_that_loses_a_race_is_decided_again_on_the_fresh_state() -> None:
    store = store_with_command()
    store.rivals = [handlers.acknowledge("c1", False, {}, at(2))]
    sleeps = Sleeps()

    outcome = change(store, DEVICE_ID, handlers.acknowledge("c1", True, {}, at(3)), sleep=sleeps)

    assert outcome.changed is False
    assert outcome.device.commands["c1"]["state"] == "failed"
    assert store.events_of(DEVICE_ID)[-1] == "CommandFailed"
