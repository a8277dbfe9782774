"""Fixed clock, fixed ids and a registered device for the unit tests."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from domain.device import Device

T0 = datetime(2026, 1, 1, tzinfo=UTC)
DEVICE_ID = "sensor-001"
SECRET_HASH = "pbkdf2_sha256$1000$c2FsdHNhbHRzYWx0c2FsdA==$registered-hash"


def at(seconds: float) -> datetime:
    """The fixed clock, `seconds` after T0."""
    return T0 + timedelta(seconds=seconds)


def registered(device_id: str = DEVICE_ID, labels: dict[str, str] | None = None) -> Device:
    """A freshly registered device whose registration event is still pending."""
    return Device.register(
        device_id,
        "Boiler room sensor",
        "thermometer",
        {"site": "lab"} if labels is None else labels,
        SECRET_HASH,
        T0,
    )


def state(device: Device) -> dict[str, Any]:
    """The aggregate's state, without the library's list of pending events."""
    return {k: v for k, v in vars(device).items() if k != "_pending_events"}


def event_names(device: Device) -> list[str]:
    """Collect the device's pending events and return their class names."""
    return [type(e).__name__ for e in device.collect_events()]
