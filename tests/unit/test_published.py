"""The published event schema: what projections consume, separate from stored events."""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import msgspec
import pytest

from domain.device import Device
from domain.published import (
    DeviceConfigured,
    DeviceConnected,
    DeviceDecommissioned,
    DeviceDisconnected,
    DeviceRegistered,
    DeviceResumed,
    DeviceSecretRotated,
    DeviceSuspended,
    PublishedEvent,
    RuleEvent,
    UnpublishableEvent,
    decode_event,
    encode_event,
    to_published,
)
from tests.unit.support import DEVICE_ID, T0, at

REGISTERED_HASH = "pbkdf2_sha256$1000$cmVnaXN0ZXJlZHNhbHQ=$REGISTERED-HASH-MARKER"
ROTATED_HASH = "pbkdf2_sha256$1000$cm90YXRlZHNhbHRzYWx0$ROTATED-HASH-MARKER"
FIRST_POSITION = 100


def _life() -> Device:
    device = Device.register(
        DEVICE_ID, "Boiler room sensor", "thermometer", {"site": "lab"}, REGISTERED_HASH, T0
    )
    device.configure({"interval_s": 10, "thresholds": [1.5, 2.5], "on": True}, at(1))
    device.connect(at(2))
    device.disconnect(at(3))
    device.suspend("maintenance", at(4))
    device.rotate_secret(ROTATED_HASH, at(5))
    device.resume(at(6))
    device.decommission("end of life", at(7))
    return device


def _published() -> list[PublishedEvent]:
    out = [to_published(e, FIRST_POSITION + i) for i, e in enumerate(_life().collect_events())]
    assert all(not isinstance(e, RuleEvent) for e in out)
    return out  # type: ignore[return-value]


def test_every_device_event_maps_to_its_published_struct() -> None:
    assert [type(p) for p in _published()] == [
        DeviceRegistered,
        DeviceConfigured,
        DeviceConnected,
        DeviceDisconnected,
        DeviceSuspended,
        DeviceSecretRotated,
        DeviceResumed,
        DeviceDecommissioned,
    ]


def test_published_events_carry_device_id_version_time_and_position() -> None:
    for index, published in enumerate(_published()):
        assert published.device_id == DEVICE_ID
        assert published.version == index + 1
        assert published.at == at(index)
        assert published.position == FIRST_POSITION + index


def test_published_events_carry_the_decided_values() -> None:
    registered, configured, _, _, suspended, _, resumed, decommissioned = _published()

    assert registered == DeviceRegistered(
        device_id=DEVICE_ID,
        version=1,
        at=T0,
        position=FIRST_POSITION,
        name="Boiler room sensor",
        type="thermometer",
        labels={"site": "lab"},
        status="provisioned",
    )
    assert isinstance(configured, DeviceConfigured)
    assert configured.config == {"interval_s": 10, "thresholds": [1.5, 2.5], "on": True}
    assert configured.config_version == 1
    assert isinstance(suspended, DeviceSuspended)
    assert suspended.reason == "maintenance"
    assert isinstance(resumed, DeviceResumed)
    assert resumed.status == "active"
    assert isinstance(decommissioned, DeviceDecommissioned)
    assert decommissioned.reason == "end of life"


def test_published_registration_does_not_share_the_events_labels() -> None:
    device = Device.register(DEVICE_ID, "n", "t", {"site": "lab"}, REGISTERED_HASH, T0)
    stored = device.collect_events()[0]
    published = to_published(stored, 1)
    assert isinstance(published, DeviceRegistered)

    published.labels["site"] = "changed"

    assert vars(stored)["labels"] == {"site": "lab"}


@pytest.mark.parametrize("index", range(8))
def test_encoded_event_decodes_to_an_equal_event(index: int) -> None:
    published = _published()[index]

    decoded = decode_event(encode_event(published))

    assert decoded == published
    assert type(decoded) is type(published)


def test_json_is_tagged_with_the_versioned_event_name() -> None:
    tags = [json.loads(encode_event(p))["event"] for p in _published()]

    assert tags == [
        "device.registered.v1",
        "device.configured.v1",
        "device.connected.v1",
        "device.disconnected.v1",
        "device.suspended.v1",
        "device.secret_rotated.v1",
        "device.resumed.v1",
        "device.decommissioned.v1",
    ]


def test_json_of_registration_has_the_contract_fields() -> None:
    document = json.loads(encode_event(_published()[0]))

    assert document == {
        "event": "device.registered.v1",
        "device_id": DEVICE_ID,
        "version": 1,
        "at": "2026-01-01T00:00:00Z",
        "position": FIRST_POSITION,
        "actor": None,  # not through the API (the command API names its token)
        "name": "Boiler room sensor",
        "type": "thermometer",
        "labels": {"site": "lab"},
        "status": "provisioned",
    }


def test_no_published_event_contains_a_secret_hash() -> None:
    for published in _published():
        data = encode_event(published)
        assert b"HASH-MARKER" not in data
        assert b"pbkdf2" not in data
        assert "secret_hash" not in json.loads(data)


def test_json_with_an_unknown_event_tag_is_rejected() -> None:
    data = json.dumps(
        {
            "event": "device.renamed.v1",
            "device_id": DEVICE_ID,
            "version": 2,
            "at": "2026-01-01T00:00:00Z",
            "position": 1,
        }
    ).encode()

    with pytest.raises(msgspec.ValidationError):
        decode_event(data)


def test_json_missing_a_common_field_is_rejected() -> None:
    data = json.dumps({"event": "device.connected.v1", "device_id": DEVICE_ID}).encode()

    with pytest.raises(msgspec.ValidationError):
        decode_event(data)


def test_published_events_are_immutable() -> None:
    published = _published()[2]

    with pytest.raises(AttributeError):
        published.version = 99  # type: ignore[misc]


@dataclass(frozen=True)
class _Renamed:
    device_id: str
    originator_version: int
    timestamp: datetime
    name: str


def test_stored_event_without_a_published_form_is_refused_loudly() -> None:
    unknown: Any = _Renamed(DEVICE_ID, 2, at(1), "new name")

    with pytest.raises(UnpublishableEvent, match="_Renamed"):
        to_published(unknown, 1)


def test_object_that_is_not_a_device_event_is_refused_loudly() -> None:
    with pytest.raises(UnpublishableEvent):
        to_published(object(), 1)
