"""The relay as a real process: commit order, exactly once, across SIGKILL and a rival relay."""

from __future__ import annotations

import asyncio
import threading
import time
from collections import defaultdict
from datetime import UTC, datetime

import nats
import pytest

from domain.device import Device
from domain.published import decode_event
from infra.eventstore import DeviceStore
from infra.settings import Settings
from infra.streams import Streams
from tests.e2e.processes import Component

pytestmark = pytest.mark.e2e

DEVICES = 100
ROUNDS = 12  # events per device: one registration, then configuration changes


class Writer(threading.Thread):
    """Appends events for 100 devices, round by round, while the relay runs."""

    def __init__(self, store: DeviceStore, pause: float) -> None:
        super().__init__(daemon=True)
        self.store = store
        self.pause = pause
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            for r in range(ROUNDS):
                for d in range(DEVICES):
                    device_id = f"dev-{d:03d}"
                    at = datetime.now(UTC)
                    if r == 0:
                        device = Device.register(device_id, "n", "t", {}, "hash", at)
                    else:
                        found = self.store.get(device_id)
                        assert found is not None
                        device = found
                        device.configure({"round": r}, at)
                    self.store.save_device(device)
                time.sleep(self.pause)
        except BaseException as e:
            self.error = e


async def stream_count(settings: Settings) -> int:
    nc = await nats.connect(settings.nats_url)
    try:
        info = await nc.jsm().stream_info(Streams(settings.namespace).events)
        return int(info.state.messages)
    finally:
        await nc.close()


async def read_stream(settings: Settings) -> list[tuple[int, str, int, dict[str, str]]]:
    """Every message in the events stream: (stream seq, device id, version, headers)."""
    streams = Streams(settings.namespace)
    nc = await nats.connect(settings.nats_url)
    out = []
    try:
        jsm = nc.jsm()
        info = await jsm.stream_info(streams.events)
        for seq in range(info.state.first_seq, info.state.last_seq + 1):
            msg = await jsm.get_msg(streams.events, seq)
            event = decode_event(msg.data or b"")
            assert msg.subject == streams.event_subject(event.device_id)
            out.append((seq, event.device_id, event.version, dict(msg.headers or {})))
    finally:
        await nc.close()
    return out


def wait_for_count(settings: Settings, target: int, timeout: float = 60.0) -> int:
    deadline = time.monotonic() + timeout
    count = 0
    while time.monotonic() < deadline:
        count = asyncio.run(stream_count(settings))
        if count >= target:
            return count
        time.sleep(0.05)
    return count


def assert_exactly_once_in_commit_order(settings: Settings, store: DeviceStore) -> None:
    total = store.max_position()
    assert total == DEVICES * ROUNDS
    messages = asyncio.run(read_stream(settings))
    positions = [int(h["Iot-Position"]) for _, _, _, h in messages]
    assert positions == list(range(1, total + 1)), "each stored event once, in commit order"
    versions: dict[str, list[int]] = defaultdict(list)
    for _, device_id, version, headers in messages:
        assert headers["Nats-Msg-Id"] == f"{device_id}:{version}"
        versions[device_id].append(version)
    assert len(versions) == DEVICES
    assert all(v == list(range(1, ROUNDS + 1)) for v in versions.values())


def test_relay_killed_mid_way_and_restarted_publishes_each_event_once_in_order(
    migrated: Settings, store: DeviceStore
) -> None:
    writer = Writer(store, pause=0.15)
    relay = Component(migrated, "relay")
    try:
        relay.wait_ready()
        writer.start()
        published = wait_for_count(migrated, DEVICES * 3)
        assert published >= DEVICES * 3
        relay.kill()
        assert writer.is_alive(), "the kill must land while events are still being written"
        relay = Component(migrated, "relay")
        relay.wait_ready()
        writer.join(60)
        assert writer.error is None
        assert wait_for_count(migrated, DEVICES * ROUNDS) == DEVICES * ROUNDS
        time.sleep(0.5)  # a duplicate, if any, would land now
    finally:
        relay.stop()
    assert_exactly_once_in_commit_order(migrated, store)


def test_two_relays_at_once_never_duplicate_or_reorder(
    migrated: Settings, store: DeviceStore
) -> None:
    writer = Writer(store, pause=0.1)
    first = Component(migrated, "relay")
    second = Component(migrated, "relay")
    try:
        first.wait_ready()
        second.wait_ready()
        writer.start()
        wait_for_count(migrated, DEVICES * 4)
        first.kill()  # whichever led, the other must take over without loss or repeat
        writer.join(60)
        assert writer.error is None
        assert wait_for_count(migrated, DEVICES * ROUNDS) == DEVICES * ROUNDS
        time.sleep(0.5)
    finally:
        first.stop()
        second.stop()
    assert_exactly_once_in_commit_order(migrated, store)
