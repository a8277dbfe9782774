"""Group commit on the real event store: shared transactions, and only losers see conflicts."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime

import pytest
from eventsourcing.persistence import IntegrityError

from domain.device import Device
from infra.eventstore import DeviceStore, GroupCommitter, IdempotencyRecord, _Pending

pytestmark = pytest.mark.integration
AT = datetime(2026, 1, 1, tzinfo=UTC)


def new_device(device_id: str) -> Device:
    return Device.register(device_id, "n", "t", {}, "hash", AT)


def record(key: str) -> IdempotencyRecord:
    return IdempotencyRecord("p", key, "f", 200, b"{}", AT)


def test_concurrent_saves_all_land_with_their_own_positions(store: DeviceStore) -> None:
    committer = GroupCommitter(store)
    try:
        with ThreadPoolExecutor(32) as pool:
            positions = list(
                pool.map(lambda i: committer.save_device(new_device(f"d{i}")), range(200))
            )
    finally:
        committer.close()
    assert sorted(positions) == list(range(1, 201))
    for notification in store.recorder.select_notifications(1, 500):
        event = store.mapper.to_domain_event(notification)
        assert positions[int(event.device_id[1:])] == notification.id  # type: ignore[attr-defined]


def test_a_conflict_in_a_shared_transaction_fails_only_the_loser(store: DeviceStore) -> None:
    store.save_device(new_device("shared"))
    first, second = store.get("shared"), store.get("shared")
    assert first is not None
    assert second is not None
    first.configure({"a": 1}, AT)
    second.configure({"a": 2}, AT)
    others = [new_device(f"o{i}") for i in range(5)]
    batch = [_Pending(d, None) for d in (others[0], first, others[1], second, *others[2:])]
    committer = GroupCommitter(store)
    try:
        committer._commit(batch)
    finally:
        committer.close()
    assert batch[1].future.result() > 0
    with pytest.raises(IntegrityError):
        batch[3].future.result()
    for pending in (batch[0], batch[2], *batch[4:]):
        assert pending.future.result() > 0
    saved = store.get("shared")
    assert saved is not None
    assert saved.version == 2
    assert saved.config == {"a": 1}
    assert all(store.get(f"o{i}") is not None for i in range(5))


def test_a_taken_idempotency_key_fails_only_its_request(store: DeviceStore) -> None:
    store.save_device(new_device("x"), record("taken"))
    batch = [
        _Pending(new_device("y"), record("fresh")),
        _Pending(new_device("z"), record("taken")),
    ]
    committer = GroupCommitter(store)
    try:
        committer._commit(batch)
    finally:
        committer.close()
    assert batch[0].future.result() > 0
    with pytest.raises(IntegrityError):
        batch[1].future.result()
    assert store.get("z") is None
    assert store.idem.get_idempotency("p", "fresh") is not None
