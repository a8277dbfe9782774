"""Message ids, the ordered ack window and the pipeline's publish/ack/retry logic, with fakes."""

from __future__ import annotations

import asyncio
import hashlib
from dataclasses import dataclass, field

import pytest

from bridges import ids
from bridges.mqtt import Inbound, subscriptions
from bridges.pipeline import Pipeline
from bridges.publisher import PubAck, PublishError
from bridges.window import AckWindow, Entry
from domain.ingest import Status, decode_ingest
from infra.streams import Streams

PAYLOAD = b'{"a": 1}'
DIGEST = hashlib.sha256(PAYLOAD).hexdigest()[:32]


# --- ids --------------------------------------------------------------------------------------
def test_device_time_telemetry_id_depends_on_device_and_payload_only() -> None:
    one = ids.message_id("telemetry", "dev-1", PAYLOAD, 7, device_time=True)
    assert one == f"telemetry:dev-1:{DIGEST}"
    assert ids.message_id("telemetry", "dev-1", PAYLOAD, 9, device_time=True) == one


def test_server_time_id_includes_the_packet_id() -> None:
    assert ids.message_id("status", "dev-1", PAYLOAD, 7, False) == f"status:dev-1:7:{DIGEST}"
    assert ids.message_id("status", "dev-1", PAYLOAD, 8, False) != ids.message_id(
        "status", "dev-1", PAYLOAD, 7, False
    )


def test_dead_letter_id_is_prefixed_and_names_a_bad_topic_by_its_hash() -> None:
    assert ids.dead_letter_id("telemetry", "dev-1", "t", PAYLOAD, 3) == (
        f"dlq:telemetry:dev-1:3:{DIGEST}"
    )
    bad = ids.dead_letter_id("", "", "devices/a.b/telemetry", PAYLOAD, 3)
    assert bad.startswith("dlq:topic:")
    assert bad != ids.dead_letter_id("", "", "devices/c.d/telemetry", PAYLOAD, 3)


def test_salted_id_differs_per_receipt() -> None:
    assert ids.salted("x", 1) != ids.salted("x", 2)


def test_subscriptions_are_shared_qos1_on_every_device_topic() -> None:
    assert subscriptions() == [
        ("$share/iot-bridge/devices/+/telemetry", 1),
        ("$share/iot-bridge/devices/+/status", 1),
        ("$share/iot-bridge/devices/+/reported", 1),
        ("$share/iot-bridge/devices/+/commands/ack", 1),
    ]


def test_an_exclusive_bridge_subscribes_plainly_to_the_same_topics() -> None:
    assert subscriptions(shared=False) == [
        ("devices/+/telemetry", 1),
        ("devices/+/status", 1),
        ("devices/+/reported", 1),
        ("devices/+/commands/ack", 1),
    ]


# --- the ack window ---------------------------------------------------------------------------
def entry(packet_id: int, qos: int = 1) -> Entry:
    return Entry(packet_id, qos, False, 0)


def test_window_acks_only_the_completed_prefix_in_receive_order() -> None:
    acked: list[int] = []
    window = AckWindow(lambda pid, qos: acked.append(pid))
    a, b, c = entry(1), entry(2), entry(3)
    for e in (a, b, c):
        window.add(e)
    assert window.complete(c) == []
    assert window.complete(b) == []
    assert acked == []
    assert window.complete(a) == [a, b, c]
    assert acked == [1, 2, 3]
    assert len(window) == 0


def test_window_does_not_ack_qos0_messages() -> None:
    acked: list[int] = []
    window = AckWindow(lambda pid, qos: acked.append(pid))
    zero, one = entry(0, qos=0), entry(5)
    window.add(zero)
    window.add(one)
    window.complete(one)
    window.complete(zero)
    assert acked == [5]


def test_abandoned_entries_are_never_acked() -> None:
    acked: list[int] = []
    window = AckWindow(lambda pid, qos: acked.append(pid))
    a = entry(1)
    window.add(a)
    assert window.abandon() == [a]
    assert window.complete(a) == []
    assert acked == []


# --- the pipeline -----------------------------------------------------------------------------
@dataclass
class FakeSource:
    generation: int = 1
    acked: list[int] = field(default_factory=list)

    def ack(self, packet_id: int, qos: int) -> None:
        self.acked.append(packet_id)


class FakeJetStream:
    """Answers publishes by hand: `answer(i, ...)` resolves the i-th pending one."""

    def __init__(self) -> None:
        self.pending: list[tuple[str, bytes, dict[str, str], asyncio.Future[PubAck]]] = []
        self.seen_ids: set[str] = set()
        self.fail_next = 0

    async def publish_async(
        self, subject: str, payload: bytes, headers: dict[str, str] | None = None
    ) -> asyncio.Future[PubAck]:
        if self.fail_next:
            self.fail_next -= 1
            raise PublishError("down")
        future: asyncio.Future[PubAck] = asyncio.get_running_loop().create_future()
        self.pending.append((subject, payload, dict(headers or {}), future))
        return future

    async def publish(
        self, subject: str, payload: bytes, wait: float, headers: dict[str, str] | None = None
    ) -> PubAck:
        return await asyncio.wait_for(await self.publish_async(subject, payload, headers), wait)

    def answer_all(self) -> None:
        """Store like JetStream: a known Nats-Msg-Id is a duplicate."""
        for _, _, headers, future in self.pending:
            if not future.done():
                msg_id = headers["Nats-Msg-Id"]
                future.set_result(PubAck("S", 1, msg_id in self.seen_ids))
                self.seen_ids.add(msg_id)
        self.pending = [p for p in self.pending if not p[3].done()]


def inbound(
    packet_id: int,
    topic: str = "devices/dev-1/status",
    payload: bytes = b"online",
    dup: bool = False,
    generation: int = 1,
) -> Inbound:
    return Inbound(
        generation, topic, payload, packet_id, 1, dup, 1_764_201_600_000_000_000 + packet_id
    )


def make(js: FakeJetStream, source: FakeSource) -> Pipeline:
    pipeline = Pipeline(js, Streams("ns"), {"dev-1": "active"}, source)
    pipeline.generation = source.generation
    return pipeline


async def settle() -> None:
    for _ in range(10):
        await asyncio.sleep(0)


async def test_message_is_acked_only_after_jetstream_acknowledged_it() -> None:
    js, source = FakeJetStream(), FakeSource()
    pipeline = make(js, source)
    await pipeline.handle(inbound(1))
    subject, body, headers, _ = js.pending[0]
    assert subject == "ns.ingest.status.dev-1"
    assert isinstance(decode_ingest(body), Status)
    assert headers["Nats-Msg-Id"].startswith("status:dev-1:1:")
    assert source.acked == []
    js.answer_all()
    await settle()
    assert source.acked == [1]


async def test_acks_follow_receive_order_whatever_order_jetstream_answers_in() -> None:
    js, source = FakeJetStream(), FakeSource()
    pipeline = make(js, source)
    for pid in (1, 2, 3):
        await pipeline.handle(inbound(pid, payload=b"online" if pid % 2 else b"offline"))
    js.pending[2][3].set_result(PubAck("S", 3))
    js.pending[1][3].set_result(PubAck("S", 2))
    await settle()
    assert source.acked == []
    js.pending[0][3].set_result(PubAck("S", 1))
    await settle()
    assert source.acked == [1, 2, 3]


async def test_a_redelivered_duplicate_is_acked_without_a_second_copy() -> None:
    js, source = FakeJetStream(), FakeSource()
    pipeline = make(js, source)
    await pipeline.handle(inbound(4))
    js.answer_all()
    await settle()
    await pipeline.handle(inbound(4, dup=True))
    js.answer_all()
    await settle()
    assert source.acked == [4, 4]
    assert len(js.seen_ids) == 1


async def test_a_new_message_colliding_with_an_old_id_is_republished_salted() -> None:
    js, source = FakeJetStream(), FakeSource()
    pipeline = make(js, source)
    await pipeline.handle(inbound(4))
    js.answer_all()
    await settle()
    # same payload, recycled packet id, DUP 0: a new "online", not a redelivery
    await pipeline.handle(Inbound(1, "devices/dev-1/status", b"online", 4, 1, False, 99))
    js.answer_all()
    await settle()
    js.answer_all()
    await settle()
    assert len(js.seen_ids) == 2
    assert any(i.endswith(":r99") for i in js.seen_ids)
    assert source.acked == [4, 4]


async def test_device_time_telemetry_duplicates_are_not_salted() -> None:
    js, source = FakeJetStream(), FakeSource()
    pipeline = make(js, source)
    payload = b'{"ts": 1764201600000, "values": {"a": 1}}'
    for pid in (1, 2):
        await pipeline.handle(inbound(pid, "devices/dev-1/telemetry", payload))
        js.answer_all()
        await settle()
    assert len(js.seen_ids) == 1
    assert source.acked == [1, 2]


async def test_failed_publish_is_retried_until_stored_and_only_then_acked() -> None:
    js, source = FakeJetStream(), FakeSource()
    pipeline = make(js, source)
    js.fail_next = 2
    await pipeline.handle(inbound(1))
    assert source.acked == []
    for _ in range(100):
        js.answer_all()
        await asyncio.sleep(0.02)
        if source.acked:
            break
    assert source.acked == [1]
    assert len(js.seen_ids) == 1


async def test_unanswered_publish_is_cancelled_by_the_sweeper_and_retried() -> None:
    js, source = FakeJetStream(), FakeSource()
    pipeline = Pipeline(js, Streams("ns"), {"dev-1": "active"}, source, ack_timeout=0.05)
    pipeline.generation = 1
    stop = asyncio.Event()
    sweeper = asyncio.create_task(pipeline.sweep(stop, every=0.02))
    await pipeline.handle(inbound(1))
    first = js.pending[0][3]
    for _ in range(100):
        await asyncio.sleep(0.02)
        if first.cancelled() and len(js.pending) > 1:
            break
    js.answer_all()
    await settle()
    stop.set()
    await sweeper
    assert first.cancelled()
    assert source.acked == [1]


async def test_messages_of_a_lost_connection_are_abandoned_not_acked() -> None:
    js, source = FakeJetStream(), FakeSource()
    pipeline = make(js, source)
    await pipeline.handle(inbound(1))
    source.generation = 2
    await pipeline.handle(Inbound(2, "", None, 0, 0, False, 0))  # the connection-change marker
    assert len(pipeline.window) == 0
    js.answer_all()
    await settle()
    assert source.acked == []


async def test_messages_still_queued_from_a_dead_connection_are_skipped() -> None:
    js, source = FakeJetStream(), FakeSource(generation=3)
    pipeline = make(js, source)
    await pipeline.handle(inbound(1, generation=2))
    assert js.pending == []
    assert len(pipeline.window) == 0


async def test_rejected_message_goes_to_the_dead_letter_subject_with_headers() -> None:
    js, source = FakeJetStream(), FakeSource()
    pipeline = make(js, source)
    await pipeline.handle(inbound(1, "devices/ghost/telemetry", b'{"a": 1}'))
    subject, body, headers, _ = js.pending[0]
    assert subject == "ns.deadletter.unknown_device"
    assert body == b'{"a": 1}'
    assert headers["Iot-Reason"] == "unknown_device"
    assert headers["Iot-Topic"] == "devices/ghost/telemetry"
    assert "ghost" in headers["Iot-Detail"]
    assert headers["Iot-Received-At"] == "1764201600000"
    assert headers["Nats-Msg-Id"].startswith("dlq:telemetry:ghost:1:")
    js.answer_all()
    await settle()
    assert source.acked == [1]


async def test_dead_letter_headers_carry_no_control_characters() -> None:
    js, source = FakeJetStream(), FakeSource()
    pipeline = make(js, source)
    await pipeline.handle(inbound(1, "devices/a\r\nb/telemetry", b"{}"))
    headers = js.pending[0][2]
    assert "\r" not in headers["Iot-Topic"]
    assert "\n" not in headers["Iot-Topic"]


@pytest.mark.parametrize("size", [300_000])
async def test_oversized_dead_letter_data_is_truncated_and_says_so(size: int) -> None:
    js, source = FakeJetStream(), FakeSource()
    pipeline = Pipeline(
        js, Streams("ns"), {"dev-1": "active"}, source, max_dead_letter_bytes=100_000
    )
    pipeline.generation = 1
    await pipeline.handle(inbound(1, "devices/dev-1/telemetry", b"x" * size))
    _, body, headers, _ = js.pending[0]
    assert len(body) == 100_000
    assert "truncated" in headers["Iot-Detail"]
