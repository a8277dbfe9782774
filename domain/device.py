"""The Device aggregate: registration, desired configuration, lifecycle, credentials, connectivity.

Public methods check the rules and raise a DomainError with a reason; the `@event` methods only
apply a decided change, so replaying stored events never re-checks a rule. Time is an argument.
"""

from __future__ import annotations

import re
import uuid
from datetime import datetime
from enum import StrEnum
from typing import Any

from eventsourcing.domain import Aggregate, event

from domain.errors import IllegalTransition, InvalidCommand

DEVICE_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
LABEL_KEY = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
DEVICE_NAMESPACE = uuid.UUID("6f1c1b8e-3f0c-5b7a-9d57-1b0f3e0c9a41")
MAX_LABELS = 64
MAX_LABEL_VALUE = 256
MAX_NAME = 200
MAX_TYPE = 64


class Status(StrEnum):
    PROVISIONED = "provisioned"
    ACTIVE = "active"
    SUSPENDED = "suspended"
    DECOMMISSIONED = "decommissioned"


def device_uuid(device_id: str) -> uuid.UUID:
    """The aggregate id of a device id (stable, so a second registration of an id conflicts)."""
    return uuid.uuid5(DEVICE_NAMESPACE, device_id)


def check_device_id(device_id: str) -> None:
    if not DEVICE_ID.fullmatch(device_id):
        raise InvalidCommand(f"device_id must match {DEVICE_ID.pattern}")


def check_labels(labels: dict[str, str]) -> None:
    if len(labels) > MAX_LABELS:
        raise InvalidCommand(f"at most {MAX_LABELS} labels")
    for key, value in labels.items():
        if not LABEL_KEY.fullmatch(key):
            raise InvalidCommand(f"label key {key!r} must match {LABEL_KEY.pattern}")
        if not isinstance(value, str) or len(value) > MAX_LABEL_VALUE:
            raise InvalidCommand(f"label {key!r} must be a string of at most {MAX_LABEL_VALUE}")


class Device(Aggregate):
    """A device known to the system; every change of it is a domain event."""

    class Event(Aggregate.Event):
        device_id: str

    @staticmethod
    def create_id(device_id: str, **_: Any) -> uuid.UUID:
        return device_uuid(device_id)

    @classmethod
    def register(
        cls,
        device_id: str,
        name: str,
        type: str,
        labels: dict[str, str],
        secret_hash: str,
        at: datetime,
    ) -> Device:
        check_device_id(device_id)
        if not 1 <= len(name) <= MAX_NAME:
            raise InvalidCommand(f"name must be 1 to {MAX_NAME} characters")
        if not 1 <= len(type) <= MAX_TYPE:
            raise InvalidCommand(f"type must be 1 to {MAX_TYPE} characters")
        check_labels(labels)
        return cls(
            device_id=device_id,
            name=name,
            type=type,
            labels=dict(labels),
            secret_hash=secret_hash,
            timestamp=at,
        )

    @event("Registered")
    def __init__(
        self,
        device_id: str,
        name: str,
        type: str,
        labels: dict[str, str],
        secret_hash: str,
        timestamp: datetime,
    ) -> None:
        self.device_id = device_id
        self.name = name
        self.type = type
        self.labels = labels
        self.secret_hash = secret_hash
        self.status = Status.PROVISIONED.value
        self.config: dict[str, Any] = {}
        self.config_version = 0
        self.online = False
        self.connectivity_at: datetime | None = None
        self.first_connected_at: datetime | None = None
        self.last_connected_at: datetime | None = None
        self.last_disconnected_at: datetime | None = None
        self.suspended_reason: str | None = None

    def trigger_event(self, event_class: Any, **kwargs: Any) -> None:
        kwargs.setdefault("device_id", self.device_id)
        super().trigger_event(event_class, **kwargs)

    # -- decisions -------------------------------------------------------------------------

    def _refuse_if_decommissioned(self, what: str) -> None:
        if self.status == Status.DECOMMISSIONED:
            raise IllegalTransition(f"cannot {what}: device {self.device_id} is decommissioned")

    def configure(self, config: dict[str, Any], at: datetime) -> None:
        self._refuse_if_decommissioned("change the configuration")
        self._configured(config=dict(config), config_version=self.config_version + 1, timestamp=at)

    def suspend(self, reason: str, at: datetime) -> None:
        self._refuse_if_decommissioned("suspend")
        if self.status == Status.SUSPENDED:
            raise IllegalTransition(f"device {self.device_id} is already suspended")
        self._suspended(reason=reason, timestamp=at)

    def resume(self, at: datetime) -> None:
        self._refuse_if_decommissioned("resume")
        if self.status != Status.SUSPENDED:
            raise IllegalTransition(f"cannot resume: device {self.device_id} is {self.status}")
        restored = Status.ACTIVE if self.first_connected_at is not None else Status.PROVISIONED
        self._resumed(status=restored.value, timestamp=at)

    def decommission(self, reason: str, at: datetime) -> None:
        self._refuse_if_decommissioned("decommission")
        self._decommissioned(reason=reason, timestamp=at)

    def rotate_secret(self, secret_hash: str, at: datetime) -> None:
        self._refuse_if_decommissioned("rotate the secret")
        self._secret_rotated(secret_hash=secret_hash, timestamp=at)

    def connect(self, at: datetime) -> bool:
        """Record a connection; a repeated or stale one changes nothing and returns False."""
        self._refuse_if_decommissioned("connect")
        if self._is_stale(at) or self.online:
            return False
        self._connected(timestamp=at)
        return True

    def disconnect(self, at: datetime) -> bool:
        """Record a disconnection; a repeated or stale one changes nothing and returns False."""
        self._refuse_if_decommissioned("disconnect")
        if self._is_stale(at) or not self.online:
            return False
        self._disconnected(timestamp=at)
        return True

    def _is_stale(self, at: datetime) -> bool:
        return self.connectivity_at is not None and at <= self.connectivity_at

    # -- events ----------------------------------------------------------------------------

    @event("Configured")
    def _configured(self, config: dict[str, Any], config_version: int, timestamp: datetime) -> None:
        self.config = config
        self.config_version = config_version

    @event("Suspended")
    def _suspended(self, reason: str, timestamp: datetime) -> None:
        self.status = Status.SUSPENDED.value
        self.suspended_reason = reason

    @event("Resumed")
    def _resumed(self, status: str, timestamp: datetime) -> None:
        self.status = status
        self.suspended_reason = None

    @event("Decommissioned")
    def _decommissioned(self, reason: str, timestamp: datetime) -> None:
        self.status = Status.DECOMMISSIONED.value
        self.online = False

    @event("SecretRotated")
    def _secret_rotated(self, secret_hash: str, timestamp: datetime) -> None:
        self.secret_hash = secret_hash

    @event("Connected")
    def _connected(self, timestamp: datetime) -> None:
        self.online = True
        self.connectivity_at = timestamp
        self.last_connected_at = timestamp
        if self.first_connected_at is None:
            self.first_connected_at = timestamp
        if self.status == Status.PROVISIONED:
            self.status = Status.ACTIVE.value

    @event("Disconnected")
    def _disconnected(self, timestamp: datetime) -> None:
        self.online = False
        self.connectivity_at = timestamp
        self.last_disconnected_at = timestamp
