"""Analytics replicas coordinating through a real PostgreSQL: fair shares of the partitions,
takeover when a session dies, the replay lock, checkpoints that never move back."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator

import pytest

from analytics.coordination import Checkpoint, Coordinator, PartitionsChanged
from infra.settings import Settings

pytestmark = pytest.mark.integration

PARTITIONS = 8


@pytest.fixture
async def coordinators(migrated: Settings) -> AsyncIterator[list[Coordinator]]:
    made: list[Coordinator] = []
    yield made
    for coordinator in made:
        await coordinator.close()


async def replica(settings: Settings, made: list[Coordinator]) -> Coordinator:
    coordinator = Coordinator(settings, PARTITIONS)
    await coordinator.connect()
    await coordinator.join()
    made.append(coordinator)
    return coordinator


async def rebalance(coordinator: Coordinator) -> None:
    share = await coordinator.fair_share()
    for number in coordinator.surplus(share):
        await coordinator.release(number)
    await coordinator.acquire(share)


async def test_two_replicas_split_the_partitions_and_a_dead_ones_are_taken_over(
    migrated: Settings, coordinators: list[Coordinator]
) -> None:
    first = await replica(migrated, coordinators)
    await rebalance(first)
    assert first.owned == set(range(PARTITIONS))  # alone: everything
    second = await replica(migrated, coordinators)
    assert await second.members() == 2
    await rebalance(second)
    assert second.owned == set()  # all still held
    await rebalance(first)  # hands over what is above its share
    await rebalance(second)
    assert len(first.owned) == len(second.owned) == PARTITIONS // 2
    assert first.owned.isdisjoint(second.owned)
    await first.close()  # its session ends: PostgreSQL frees every lock at once
    await rebalance(second)
    assert second.owned == set(range(PARTITIONS))


async def test_while_a_replay_holds_its_lock_the_live_replicas_let_everything_go(
    migrated: Settings, coordinators: list[Coordinator]
) -> None:
    live = await replica(migrated, coordinators)
    await rebalance(live)
    replay = Coordinator(migrated, PARTITIONS)
    await replay.connect()
    coordinators.append(replay)
    assert await replay.take_replay_lock()
    assert await live.fair_share() == 0
    await rebalance(live)
    assert live.owned == set()
    assert len(await replay.acquire(PARTITIONS)) == PARTITIONS
    await replay.close()
    await rebalance(live)
    assert live.owned == set(range(PARTITIONS))


async def test_a_checkpoint_is_written_only_by_the_owner_and_never_moves_back(
    migrated: Settings, coordinators: list[Coordinator]
) -> None:
    owner = await replica(migrated, coordinators)
    await rebalance(owner)
    await owner.save([Checkpoint(0, 10, b"ten")])
    await owner.save([Checkpoint(0, 5, b"five")])  # older: refused
    assert await owner.load(0) == Checkpoint(0, 10, b"ten")
    await owner.release(0)
    await owner.save([Checkpoint(0, 20, b"twenty")])  # no longer owned: not written
    assert await owner.load(0) == Checkpoint(0, 10, b"ten")


async def test_a_different_partition_count_is_refused_until_a_replay(
    migrated: Settings, coordinators: list[Coordinator]
) -> None:
    owner = await replica(migrated, coordinators)
    await rebalance(owner)
    await owner.save([Checkpoint(1, 3, b"x")])
    other = Coordinator(dataclasses.replace(migrated), PARTITIONS * 2)
    with pytest.raises(PartitionsChanged, match="IOT_ANALYTICS_PARTITIONS"):
        await other.connect()
    await other.close()
    await owner.wipe()
    await other.connect()  # after the replay's wipe, any count
    coordinators.append(other)


async def test_the_catalog_snapshot_only_moves_forward(
    migrated: Settings, coordinators: list[Coordinator]
) -> None:
    owner = await replica(migrated, coordinators)
    assert await owner.load_catalog() is None
    await owner.save_catalog(7, b"seven")
    await owner.save_catalog(3, b"three")
    assert await owner.load_catalog() == b"seven"
