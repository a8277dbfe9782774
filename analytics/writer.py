"""Alert transitions appended to the event store as events of the Device aggregate.

The aggregate decides: a raise while the rule's alert is open, or at or before the rule's
newest raise, a re-trigger at or before the last one, a clear older than the open alert:
each records nothing. So a decision evaluated twice (a crash between appending and
checkpointing, a second replica, a replay) is appended once. A concurrent write to the same
device (the bridge, an operator) is retried on the newer version.
"""

from __future__ import annotations

import logging
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime

from eventsourcing.persistence import IntegrityError

from analytics.engine import Decision
from domain.device import Device
from domain.errors import DomainError
from infra.eventstore import DeviceStore

log = logging.getLogger(__name__)
ATTEMPTS = 10


@dataclass
class Written:
    appended: int = 0  # transitions recorded now
    known: int = 0  # transitions the log already held (or the aggregate refused)
    unknown_devices: int = 0
    kinds: Counter[str] = field(default_factory=Counter)  # appended, by kind

    def add(self, other: Written) -> None:
        self.appended += other.appended
        self.known += other.known
        self.unknown_devices += other.unknown_devices
        self.kinds.update(other.kinds)


def apply(device: Device, decision: Decision, at: datetime) -> bool:
    """Apply one decision to the aggregate; True if it recorded an event."""
    try:
        if decision.kind == "raised":
            return (
                device.raise_alert(
                    decision.rule_id,
                    decision.severity,
                    decision.metric,
                    decision.value,
                    decision.at_ms,
                    at,
                )
                is not None
            )
        if decision.kind == "retriggered":
            return device.retrigger_alert(decision.rule_id, decision.value, decision.at_ms, at)
        return device.clear_alert(decision.rule_id, decision.value, decision.at_ms, at)
    except DomainError as e:
        log.info("alert transition refused", extra={"device": device.device_id, "error": str(e)})
        return False


class AlertWriter:
    def __init__(
        self,
        store: DeviceStore,
        clock: Callable[[], datetime],
        *,
        threads: int = 8,
        dry_run: bool = False,
    ) -> None:
        self.store = store
        self.clock = clock
        self.dry_run = dry_run  # verify: count what would be appended, append nothing
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="analytics-writer")
        self._dry: dict[str, Device] = {}  # dry run: each device as the decisions left it

    def write(self, decisions: Sequence[Decision]) -> Written:
        """Append the decisions, in order per device; blocking (call it from a thread)."""
        by_device: dict[str, list[Decision]] = defaultdict(list)
        for decision in decisions:
            by_device[decision.device_id].append(decision)
        total = Written()
        for result in self._pool.map(self._device, by_device.items()):
            total.add(result)
        return total

    def _device(self, item: tuple[str, list[Decision]]) -> Written:
        device_id, decisions = item
        for attempt in range(ATTEMPTS):
            device = self._dry.get(device_id) if self.dry_run else None
            device = device or self.store.get(device_id)
            if device is None:
                log.warning("alert for an unknown device", extra={"device": device_id})
                return Written(unknown_devices=1)
            at = self.clock()
            kinds: Counter[str] = Counter(d.kind for d in decisions if apply(device, d, at))
            recorded = sum(kinds.values())
            written = Written(recorded, len(decisions) - recorded, 0, kinds)
            if self.dry_run:
                device.collect_events()
                self._dry[device_id] = device
                return written
            if not recorded:
                return written
            try:
                self.store.save_device(device)
            except IntegrityError:
                log.info("device changed meanwhile; retrying", extra={"attempt": attempt + 1})
                continue
            return written
        raise RuntimeError(f"could not append alert transitions of {device_id}: too many conflicts")

    def close(self) -> None:
        self._pool.shutdown(wait=True)
