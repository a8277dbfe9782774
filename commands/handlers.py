"""Command handlers: load a device, let it decide, append its events with optimistic concurrency.

Synchronous functions (the event store library is synchronous); the API runs them in worker
threads. Time, the secret generator and the retry sleep are arguments, so tests fix them.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol

from eventsourcing.persistence import IntegrityError

from domain.credentials import hash_secret
from domain.device import Device
from domain.errors import DomainError
from domain.rules import Rule, RuleSpec
from infra import metrics
from infra.eventstore import IdempotencyRecord

MAX_ATTEMPTS = 100


class Store(Protocol):
    def get(self, device_id: str) -> Device | None: ...

    def save_device(self, device: Device, idempotency: IdempotencyRecord | None = None) -> int: ...

    def find_idempotency(self, principal: str, key: str) -> IdempotencyRecord | None: ...


class RuleStore(Protocol):
    def get_rule(self, rule_id: str) -> Rule | None: ...

    def save_rule(self, rule: Rule, idempotency: IdempotencyRecord | None = None) -> int: ...

    def find_idempotency(self, principal: str, key: str) -> IdempotencyRecord | None: ...


class NotFound(DomainError):
    """No device has this id."""


class AlreadyExists(DomainError):
    """A device with this id is registered already."""


class VersionMismatch(DomainError):
    """The caller's If-Match version is not the device's current version."""

    def __init__(self, expected: int, actual: int) -> None:
        super().__init__(f"the device is at version {actual}, not {expected}")
        self.expected = expected
        self.actual = actual


class TooMuchContention(DomainError):
    """Every attempt lost the race to another writer."""


class Replayed(Exception):
    """A concurrent request with the same Idempotency-Key stored its answer first."""

    def __init__(self, record: IdempotencyRecord) -> None:
        super().__init__(record.key)
        self.record = record


@dataclass(frozen=True)
class Outcome:
    """The device after the change; `changed` False (position 0) when it appended nothing."""

    device: Device
    position: int
    secret: str | None = None
    changed: bool = True


@dataclass(frozen=True)
class RuleOutcome:
    """The rule after the change; `changed` False (position 0) when it appended nothing."""

    rule: Rule
    position: int
    changed: bool = True


Answer = Callable[[Device, str | None], IdempotencyRecord]
RuleAnswer = Callable[[Rule], IdempotencyRecord]


@dataclass(frozen=True)
class Credentials:
    """Where new secrets come from (random in production, fixed in tests)."""

    new_secret: Callable[[], str]
    new_salt: Callable[[], bytes]

    def issue(self) -> tuple[str, str]:
        secret = self.new_secret()
        return secret, hash_secret(secret, self.new_salt())


def _check_replayed(
    store: Store, answer: Answer | None, device: Device, secret: str | None
) -> None:
    if answer is None:
        return
    probe = answer(device, secret)
    found = store.find_idempotency(probe.principal, probe.key)
    if found is not None:
        raise Replayed(found)


def register(
    store: Store,
    *,
    device_id: str,
    name: str,
    type: str,
    labels: dict[str, str],
    credentials: Credentials,
    at: datetime,
    answer: Answer | None = None,
) -> Outcome:
    secret, secret_hash = credentials.issue()
    device = Device.register(device_id, name, type, labels, secret_hash, at)
    record = answer(device, secret) if answer else None
    try:
        position = store.save_device(device, record)
    except IntegrityError:
        _check_replayed(store, answer, device, secret)
        raise AlreadyExists(f"device {device_id} is already registered") from None
    return Outcome(device, position, secret)


def change(
    store: Store,
    device_id: str,
    decide: Callable[[Device], str | None],
    *,
    expected_version: int | None = None,
    answer: Answer | None = None,
    sleep: Callable[[float], None] = time.sleep,
    max_attempts: int = MAX_ATTEMPTS,
) -> Outcome:
    """Apply `decide` to the current device and append the result.

    With `expected_version` (If-Match) a lost race is a VersionMismatch; without it the
    command is re-run on the fresh state, with jittered backoff, so no update is lost.
    `decide` returns a secret to hand back once (rotation), or None. A decision that
    changes nothing appends nothing (and stores no idempotency answer).
    """
    for attempt in range(1, max_attempts + 1):
        device = store.get(device_id)
        if device is None:
            raise NotFound(f"no device {device_id}")
        if expected_version is not None and device.version != expected_version:
            raise VersionMismatch(expected_version, device.version)
        secret = decide(device)
        if not device.pending_events:
            # An ack, report or expiry the device had already recorded: nothing to append.
            return Outcome(device, 0, secret, changed=False)
        record = answer(device, secret) if answer else None
        try:
            position = store.save_device(device, record)
        except IntegrityError:
            _check_replayed(store, answer, device, secret)
            if expected_version is not None:
                current = store.get(device_id)
                raise VersionMismatch(
                    expected_version, current.version if current else expected_version
                ) from None

            metrics.COMMAND_CONFLICT_RETRIES.inc()
            if attempt < max_attempts:
                sleep(random.uniform(0, min(0.05, 0.001 * attempt)))
            continue
        return Outcome(device, position, secret)
    raise TooMuchContention(f"gave up after {max_attempts} conflicting attempts; retry later")


def configure(config: dict[str, Any], at: datetime) -> Callable[[Device], None]:
    return lambda device: device.configure(config, at)


def suspend(reason: str, at: datetime) -> Callable[[Device], None]:
    return lambda device: device.suspend(reason, at)


def resume(at: datetime) -> Callable[[Device], None]:
    return lambda device: device.resume(at)


def decommission(reason: str, at: datetime) -> Callable[[Device], None]:
    return lambda device: device.decommission(reason, at)


def rotate_secret(credentials: Credentials, at: datetime) -> Callable[[Device], str]:
    def decide(device: Device) -> str:
        secret, secret_hash = credentials.issue()
        device.rotate_secret(secret_hash, at)
        return secret

    return decide


# -- commands to devices -----------------------------------------------------------------------


def request_command(
    command_id: str, name: str, args: dict[str, Any], ttl_s: int, at: datetime
) -> Callable[[Device], None]:
    def decide(device: Device) -> None:
        device.request_command(command_id, name, args, ttl_s, at)

    return decide


def record_sent(command_id: str, at: datetime) -> Callable[[Device], None]:
    """The bridge handed the command to the broker; a repeated or late report changes nothing."""

    def decide(device: Device) -> None:
        device.mark_command_sent(command_id, at)

    return decide


def acknowledge(
    command_id: str, ok: bool, result: dict[str, Any], at: datetime
) -> Callable[[Device], None]:
    """The device's ack; an unknown, finished or repeated one changes nothing."""

    def decide(device: Device) -> None:
        device.acknowledge_command(command_id, ok, result, at)

    return decide


def expire(command_id: str, at: datetime) -> Callable[[Device], None]:
    """Expire the command if it is still pending and due; otherwise change nothing."""

    def decide(device: Device) -> None:
        device.expire_command(command_id, at)

    return decide


def cancel(command_id: str, reason: str, at: datetime) -> Callable[[Device], None]:
    def decide(device: Device) -> None:
        if command_id not in device.commands:
            raise NotFound(f"device {device.device_id} has no command {command_id}")
        device.cancel_command(command_id, reason, at)

    return decide


# -- alerts ---------------------------------------------------------------------------------


def acknowledge_alert(
    alert_id: str, by: str, note: str | None, at: datetime
) -> Callable[[Device], None]:
    """An operator acknowledges one of the device's alerts (open, or cleared unacknowledged)."""

    def decide(device: Device) -> None:
        device.acknowledge_alert(alert_id, by, note, at)

    return decide


# -- connectivity ---------------------------------------------------------------------------


def connect(at: datetime) -> Callable[[Device], None]:
    """A connection; a repeated or stale one changes nothing."""

    def decide(device: Device) -> None:
        device.connect(at)

    return decide


def disconnect(at: datetime) -> Callable[[Device], None]:
    """A disconnection; a repeated or stale one changes nothing."""

    def decide(device: Device) -> None:
        device.disconnect(at)

    return decide


# -- alert rules ----------------------------------------------------------------------------


def create_rule(
    store: RuleStore,
    rule_id: str,
    spec: RuleSpec,
    at: datetime,
    answer: RuleAnswer | None = None,
) -> RuleOutcome:
    rule = Rule.create(rule_id, spec, at)
    record = answer(rule) if answer else None
    try:
        position = store.save_rule(rule, record)
    except IntegrityError:
        if answer is not None:
            probe = answer(rule)
            found = store.find_idempotency(probe.principal, probe.key)
            if found is not None:
                raise Replayed(found) from None
        raise AlreadyExists(f"rule {rule_id} exists already") from None
    return RuleOutcome(rule, position)


def change_rule(
    store: RuleStore,
    rule_id: str,
    decide: Callable[[Rule], None],
    *,
    expected_version: int | None = None,
    answer: RuleAnswer | None = None,
    sleep: Callable[[float], None] = time.sleep,
    max_attempts: int = MAX_ATTEMPTS,
) -> RuleOutcome:
    """`change` for a rule: If-Match, re-run on a lost race, nothing appended for no change."""
    for attempt in range(1, max_attempts + 1):
        rule = store.get_rule(rule_id)
        if rule is None:
            raise NotFound(f"no rule {rule_id}")
        if expected_version is not None and rule.version != expected_version:
            raise RuleVersionMismatch(expected_version, rule.version)
        decide(rule)
        if not rule.pending_events:
            return RuleOutcome(rule, 0, changed=False)
        record = answer(rule) if answer else None
        try:
            position = store.save_rule(rule, record)
        except IntegrityError:
            if answer is not None:
                probe = answer(rule)
                found = store.find_idempotency(probe.principal, probe.key)
                if found is not None:
                    raise Replayed(found) from None
            if expected_version is not None:
                current = store.get_rule(rule_id)
                raise RuleVersionMismatch(
                    expected_version, current.version if current else expected_version
                ) from None
            if attempt < max_attempts:
                sleep(random.uniform(0, min(0.05, 0.001 * attempt)))
            continue
        return RuleOutcome(rule, position)
    raise TooMuchContention(f"gave up after {max_attempts} conflicting attempts; retry later")


class RuleVersionMismatch(VersionMismatch):
    def __init__(self, expected: int, actual: int) -> None:
        DomainError.__init__(self, f"the rule is at version {actual}, not {expected}")
        self.expected = expected
        self.actual = actual


def update_rule(spec: RuleSpec, at: datetime) -> Callable[[Rule], None]:
    """Replace the definition; an identical one appends nothing."""

    def decide(rule: Rule) -> None:
        rule.update(spec, at)

    return decide


def enable_rule(at: datetime) -> Callable[[Rule], None]:
    return lambda rule: rule.enable(at)


def disable_rule(at: datetime) -> Callable[[Rule], None]:
    return lambda rule: rule.disable(at)
