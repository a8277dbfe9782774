"""Dead letters' pure parts: reading a stored message, device ids, filters, the JSON form."""

from __future__ import annotations

import base64
from datetime import UTC, datetime

import pytest

from bridges import ids
from infra.deadletters import DeadLetter, device_of, from_headers, matches, reason_subject
from infra.settings import SettingsError, load
from infra.streams import Streams
from iot.deadletters import (
    REJECT,
    REPLAY,
    SKIP,
    Summary,
    packet_and_salt,
    parse_since,
    plan,
)

STORED = datetime(2026, 1, 2, 3, 4, 5, 678_000, tzinfo=UTC)


def bridge_letter(data: bytes = b'{"temp": 1}', **headers: str) -> DeadLetter:
    return from_headers(
        7,
        {
            "Nats-Msg-Id": "dlq:telemetry:dev-1:12:abcd",
            "Iot-Reason": "unknown_device",
            "Iot-Topic": "devices/dev-1/telemetry",
            "Iot-Detail": "device 'dev-1' is not registered",
            "Iot-Received-At": "1767323045000",
            **headers,
        },
        data,
        STORED,
        subject="deadletter.unknown_device",
    )


@pytest.mark.parametrize(
    ("topic", "namespace", "device"),
    [
        ("devices/dev-1/telemetry", "", "dev-1"),
        ("devices/dev-1/commands/ack", "", "dev-1"),
        ("devices//telemetry", "", None),
        ("devices/", "", None),
        ("ingest.telemetry.dev-2", "", "dev-2"),
        ("t1.ingest.status.dev-3", "t1", "dev-3"),
        ("t1.events.dev-4", "t1", "dev-4"),
        ("events.dev-5", "", "dev-5"),
        ("rules.r1", "", None),
        ("other/topic", "", None),
        ("", "", None),
    ],
)
def test_the_device_comes_from_the_topic_or_the_stream_subject(
    topic: str, namespace: str, device: str | None
) -> None:
    assert device_of(topic, namespace) == device


def test_a_bridge_dead_letter_is_read_from_its_headers() -> None:
    letter = bridge_letter()
    assert letter.seq == 7
    assert letter.reason == "unknown_device"
    assert letter.device_id == "dev-1"
    assert letter.received_at_ms == 1767323045000
    assert letter.source == "bridge"
    assert letter.size == len(b'{"temp": 1}')
    assert letter.msg_id == "dlq:telemetry:dev-1:12:abcd"
    assert letter.from_bridge


def test_a_projector_dead_letter_is_not_from_the_bridge() -> None:
    letter = from_headers(
        3,
        {
            "Iot-Reason": "influx_rejected",
            "Iot-Topic": "ingest.telemetry.dev-9",
            "Iot-Detail": "400",
            "Iot-Source": "timeseries",
        },
        b"x",
        STORED,
    )
    assert letter.source == "timeseries"
    assert letter.device_id == "dev-9"
    assert letter.received_at_ms is None
    assert not letter.from_bridge


def test_missing_headers_fall_back_to_the_subject() -> None:
    letter = from_headers(1, None, b"", STORED, subject="ns.deadletter.too_large", namespace="ns")
    assert letter.reason == "too_large"
    assert letter.topic == ""
    assert letter.device_id is None
    assert letter.received_at_ms is None


def test_json_has_the_bytes_as_base64_and_a_text_preview() -> None:
    body = bridge_letter().to_json()
    assert base64.b64decode(body["data_base64"]) == b'{"temp": 1}'
    assert body["preview"] == '{"temp": 1}'
    assert body["stored_at"] == "2026-01-02T03:04:05.678Z"
    assert body["device_id"] == "dev-1"
    assert "headers" not in body


def test_json_of_bytes_that_are_not_utf8_has_no_preview() -> None:
    body = bridge_letter(b"\xff\xfe").to_json()
    assert body["preview"] is None
    assert base64.b64decode(body["data_base64"]) == b"\xff\xfe"


def test_filters_by_device_and_arrival_time() -> None:
    letter = bridge_letter()
    received = 1767323045000
    assert matches(letter, device_id=None, since_ms=None)
    assert matches(letter, device_id="dev-1", since_ms=received)
    assert not matches(letter, device_id="dev-2", since_ms=None)
    assert not matches(letter, device_id=None, since_ms=received + 1)


def test_without_an_arrival_time_the_storage_time_counts() -> None:
    letter = from_headers(1, {"Iot-Source": "views"}, b"", STORED)
    stored_ms = int(STORED.timestamp() * 1000)
    assert matches(letter, device_id=None, since_ms=stored_ms)
    assert not matches(letter, device_id=None, since_ms=stored_ms + 1)


def test_a_reason_filters_by_subject_and_must_be_one_token() -> None:
    streams = Streams("ns")
    assert reason_subject(streams, None) == "ns.deadletter.>"
    assert reason_subject(streams, "unknown_device") == "ns.deadletter.unknown_device"
    for bad in ("a.b", "*", ">", "", "with space"):
        with pytest.raises(ValueError, match="reason"):
            reason_subject(streams, bad)


def test_retention_defaults_to_14_days_and_1_gib() -> None:
    settings = load({})
    assert settings.deadletter_max_age_ms == 14 * 86_400_000
    assert settings.deadletter_max_bytes == 1024**3
    config = next(c for c in Streams().configs() if c.name == "DEADLETTER")
    assert config.max_age == 14 * 86_400.0
    assert config.max_bytes == 1024**3


def test_retention_is_configurable_and_applied_to_the_stream() -> None:
    settings = load({"IOT_DEADLETTER_MAX_AGE": "36h", "IOT_DEADLETTER_MAX_BYTES": "512MiB"})
    assert settings.deadletter_max_age_ms == 36 * 3_600_000
    assert settings.deadletter_max_bytes == 512 * 1024**2
    assert load({"IOT_DEADLETTER_MAX_BYTES": "16777216"}).deadletter_max_bytes == 16 * 1024**2
    configs = Streams("ns").configs(
        deadletter_max_age=settings.deadletter_max_age_ms / 1000,
        deadletter_max_bytes=settings.deadletter_max_bytes,
    )
    by_name = {c.name: c for c in configs}
    assert by_name["NS_DEADLETTER"].max_age == 36 * 3600.0
    assert by_name["NS_DEADLETTER"].max_bytes == 512 * 1024**2
    assert by_name["NS_INGEST"].max_bytes == -1  # the other streams are bounded by age only


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("IOT_DEADLETTER_MAX_AGE", "14"),
        ("IOT_DEADLETTER_MAX_AGE", "10m"),
        ("IOT_DEADLETTER_MAX_AGE", "-1d"),
        ("IOT_DEADLETTER_MAX_BYTES", "1GB"),
        ("IOT_DEADLETTER_MAX_BYTES", "1KiB"),
        ("IOT_DEADLETTER_MAX_BYTES", "-1"),
    ],
)
def test_bad_retention_names_its_variable(variable: str, value: str) -> None:
    with pytest.raises(SettingsError, match=variable):
        load({variable: value})


# --- iot deadletters: what a replay does with one dead letter -------------------------------
def test_since_is_a_duration_back_or_a_time() -> None:
    now = 1_000_000_000_000
    assert parse_since("24h", now) == now - 86_400_000
    assert parse_since("2026-01-02T03:04:05Z", now) == 1767323045000
    assert parse_since("1767323045000", now) == 1767323045000
    with pytest.raises(ValueError, match="--since"):
        parse_since("yesterday", now)


def test_the_packet_id_and_salt_come_from_the_dead_letters_id() -> None:
    assert packet_and_salt("dlq:telemetry:dev-1:12:abcd") == (12, None)
    assert packet_and_salt("dlq:telemetry:dev-1:12:abcd:r99") == (12, 99)
    assert packet_and_salt("timeseries:S:3") == (0, None)
    assert packet_and_salt("") == (0, None)


def unknown_letter(topic: str, data: bytes, packet_id: int = 12) -> DeadLetter:
    msg_id = ids.dead_letter_id("telemetry", "dev-1", topic, data, packet_id)
    return bridge_letter(data, **{"Nats-Msg-Id": msg_id, "Iot-Topic": topic})


def test_an_accepted_letter_gets_the_id_the_bridge_would_have_given_it() -> None:
    streams = Streams("ns")
    data = b'{"temp": 1}'  # server time: the id names the packet
    item = plan(unknown_letter("devices/dev-1/telemetry", data), {"dev-1": "active"}, streams)
    assert item.outcome == REPLAY
    assert item.subject == "ns.ingest.telemetry.dev-1"
    assert item.headers == {"Nats-Msg-Id": ids.message_id("telemetry", "dev-1", data, 12, False)}
    stamped = b'{"ts": 1767323040000, "values": {"temp": 1}}'  # device time: no packet id
    item = plan(unknown_letter("devices/dev-1/telemetry", stamped), {"dev-1": "active"}, streams)
    assert item.headers == {"Nats-Msg-Id": ids.message_id("telemetry", "dev-1", stamped, 0, True)}


def test_the_reading_keeps_the_time_the_bridge_first_received_it() -> None:
    item = plan(bridge_letter(b'{"temp": 1}'), {"dev-1": "active"}, Streams())
    assert b"1767323045000" in item.body


def test_still_rejected_for_the_same_reason_it_stays_where_it_is() -> None:
    letter = bridge_letter()
    item = plan(letter, {}, Streams())
    assert (item.outcome, item.reason, item.moved) == (REJECT, "unknown_device", False)


def test_rejected_for_another_reason_it_is_requarantined_with_its_first_headers() -> None:
    letter = unknown_letter("devices/dev-1/telemetry", b"{nope")
    item = plan(letter, {"dev-1": "active"}, Streams("ns"))
    assert (item.outcome, item.reason, item.moved) == (REJECT, "malformed_json", True)
    assert item.subject == "ns.deadletter.malformed_json"
    assert item.body == b"{nope"
    assert item.headers["Iot-Reason"] == "malformed_json"
    assert item.headers["Iot-Received-At"] == "1767323045000"
    assert item.headers["Iot-Topic"] == "devices/dev-1/telemetry"
    assert item.headers["Iot-Original-Msg-Id"] == letter.msg_id
    assert item.headers["Nats-Msg-Id"] == f"replay:7:{letter.msg_id}"
    # replayed again later, once the device is fixed: still the bridge's packet id
    moved = from_headers(9, item.headers, b'{"temp": 2}', STORED)
    accepted = plan(moved, {"dev-1": "active"}, Streams())
    expected = ids.message_id("telemetry", "dev-1", b'{"temp": 2}', 12, False)
    assert accepted.headers["Nats-Msg-Id"] == expected


def test_a_projectors_dead_letter_is_skipped() -> None:
    letter = from_headers(
        3, {"Iot-Source": "timeseries", "Iot-Topic": "ingest.telemetry.d"}, b"", STORED
    )
    item = plan(letter, {"d": "active"}, Streams())
    assert (item.outcome, item.reason) == (SKIP, "from timeseries")


def test_the_summary_counts_by_outcome_and_reason() -> None:
    summary = Summary(dry_run=False)
    base = plan(bridge_letter(), {"dev-1": "active"}, Streams())
    summary.add(base)
    summary.add(plan(bridge_letter(), {}, Streams()))
    summary.add(plan(from_headers(3, {"Iot-Source": "views"}, b"", STORED), {}, Streams()))
    assert summary.lines()[0] == "replayed 1, still rejected 1, skipped 1"
    body = summary.to_json()
    assert body["still_rejected"] == {"unknown_device": 1}
    assert body["skipped"] == {"from views": 1}
    assert [i["outcome"] for i in body["items"]] == [REPLAY, REJECT, SKIP]
