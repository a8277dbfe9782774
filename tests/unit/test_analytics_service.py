"""The analytics loop's INGEST tail: a partition taken over from a checkpoint behind the tail's
position reopens the tail there, so none of its messages is skipped; otherwise the tail stays."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, ClassVar

import pytest

import analytics.service as service
from analytics.engine import Partition
from infra.settings import load


class FakeTail:
    opened: ClassVar[list[int]] = []

    def __init__(self, nc: Any, stream: str, subject: str, start_seq: int, **_: Any) -> None:
        self.start_seq = start_seq
        self.last_seq = start_seq - 1
        self.closed = False

    async def open(self) -> None:
        FakeTail.opened.append(self.start_seq)

    async def close(self) -> None:
        self.closed = True


class FakeNats:
    def jetstream(self) -> None:
        return None


@pytest.fixture
def loop(monkeypatch: pytest.MonkeyPatch) -> Iterator[service.Analytics]:
    monkeypatch.setattr(service, "LogTail", FakeTail)
    FakeTail.opened = []
    settings = load({"IOT_ANALYTICS_PARTITIONS": "4"})
    analytics = service.Analytics(settings, FakeNats(), store=None)  # type: ignore[arg-type]
    yield analytics
    analytics.writer.close()


async def test_the_tail_stays_while_every_partition_is_at_or_past_it(
    loop: service.Analytics,
) -> None:
    loop.engine.hold(Partition(0, 10))
    await loop._ensure_ingest_tail()
    assert FakeTail.opened == [11]
    assert loop._ingest is not None
    loop._ingest.last_seq = 500  # handed out up to 500; the partition evaluated them
    loop.engine.advance(500)
    loop.engine.hold(Partition(1, 700))  # taken at a checkpoint ahead: skips to it
    await loop._ensure_ingest_tail()
    assert FakeTail.opened == [11]


async def test_a_partition_taken_behind_the_tail_reopens_it_at_its_checkpoint(
    loop: service.Analytics,
) -> None:
    loop.engine.hold(Partition(0, 0))
    await loop._ensure_ingest_tail()
    first = loop._ingest
    assert first is not None
    first.last_seq = 916
    loop.engine.advance(916)
    loop.engine.hold(Partition(1, 0))  # a killed replica's partition, checkpointed at 0
    await loop._ensure_ingest_tail()
    assert FakeTail.opened == [1, 1]
    assert isinstance(first, FakeTail)
    assert first.closed
    assert loop._ingest is not first
