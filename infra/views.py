"""The Redis layout of the device views: the contract between the `views` projector (the only
writer) and the gateway (a reader). Every key starts with the namespace's view prefix.

Per device, hash `{p}:device:{id}`:
  `version`      last applied domain-event version (int as text)
  `doc`          JSON of the domain part, in the contract's shape:
                 {"device_id", "name", "type", "labels", "status", "registered_at",
                  "updated_at", "desired": {"version": config_version, "config": {...}},
                  "alerts": {alert_id: alert} (the open alerts, absent when none ever was):
                  each {"alert_id", "rule_id", "severity", "metric", "status" ("active"|
                  "acknowledged"), "raised_value", "raised_at_ms", "retriggers", "last_value",
                  "acknowledged_by", "acknowledged_at", "note"}}
  `online`       "1" or "0"; `online_at` epoch ms of the status message that set it
  `last_seen`    epoch ms: the latest device time (or server time) of any device message
  `m:{metric}`   JSON {"ts": epoch ms, "value": v}: the metric's latest value by device time
  `reported`     JSON of the newest reported state (by `reported_at`, epoch ms of receipt; a tie
                 goes to the larger JSON) without the reserved key `config_version`
  `reported_config_version`  that message's `config_version` (int as text); absent when it
                 named none
  `commands`     JSON {"pending": [...], "recent": [...]} (written with `doc`, per version):
                 pending in request order, each {"command_id", "name", "args", "state"
                 ("requested"|"sent"), "requested_at", "sent_at" (null until sent),
                 "expires_at"}; recent = the last 20 finished, newest first, each
                 {"command_id", "name", "state" ("acknowledged"|"failed"|"expired"|
                 "cancelled"), "requested_at", "finished_at", "result" (acknowledged,
                 failed) or "reason" (cancelled)}; times RFC 3339
Indexes (maintained with the hash in the same script):
  `{p}:devices`              sorted set of every device id, all scores 0 (lexicographic
                             order: cursor pagination with ZRANGEBYLEX)
  `{p}:status:{status}`      set of device ids in that lifecycle status
  `{p}:label:{key}={value}`  set of device ids carrying that label
  `{p}:online`               set of online device ids
  `{p}:commands_pending`     integer: pending commands of the whole fleet
  `{p}:alerts_open:{severity}` integer: open alerts of the whole fleet of that severity
  `{p}:readings:{minute}`    HyperLogLog of reading ids (`<stream seq>:<index>`) received in
                             that epoch minute (idempotent under redelivery), expiring after 3 min
Alerts (from the devices' alert events, in the same script as the device's doc):
  `{p}:alert:{alert_id}`     hash, each field JSON: alert_id, rule_id, device_id, severity,
                             metric, status ("active"|"acknowledged"|"cleared"), acknowledged,
                             raised_value, raised_at_ms, retriggers, last_value, cleared_value,
                             cleared_at_ms, acknowledged_by, acknowledged_at, note
  `{p}:alerts`               sorted set of every alert id, score raised_at_ms (device time)
  `{p}:alerts:open`, `{p}:alerts:cleared`, `{p}:alerts:device:{id}`, `{p}:alerts:rule:{id}`
                             the same, for open / cleared alerts, one device, one rule
  `{p}:alerts:cleared_of:{device_id}`  sorted set of the device's cleared alerts, score the
                             device version of the clear: the views keep the newest 100
                             (`CLEARED_ALERTS_KEPT`) cleared alerts of each device; an older one
                             goes from every index with its hash (the aggregate lets operators
                             acknowledge only its last 20 cleared ones, so none of those is gone)
  `{p}:rules:open_alerts`    hash rule id -> open alerts of the rule (int)
History for reports (from the device's events, in the same script as its doc; each keeps the
device's newest `HISTORY_KEPT` entries, older ones are dropped):
  `{p}:connectivity:{id}`    sorted set of connectivity changes, score the event's time (epoch
                             ms), member `<device version>:<1|0>` (connected, or disconnected
                             or decommissioned)
  `{p}:commands_done:{id}`   sorted set of finished commands, score the finishing event's time
                             (epoch ms), member `<state>:<command_id>` (state acknowledged,
                             failed, expired or cancelled)
An alert raised before the views kept alerts has no hash: its later events change only the
device's doc and the severity counters (`iot replay views` builds its hash and indexes).
Alert rules (from `rules.<rule_id>`; compare-and-set on the rule's version like a device's):
  `{p}:rule:{rule_id}`       hash `version`, `doc` JSON {"rule_id", "version", "enabled",
                             "name", "metric", "scope", "severity", "condition",
                             "created_at", "updated_at"}
  `{p}:rules`                sorted set of every rule id, all scores 0 (lexicographic)
The checkpoint of domain events (the consistency token's other half, written by the projector
after each batch, never backwards):
  `{p}:position`             the views position P: every domain event with an event-store
                             position <= P is applied (int as text; absent = 0)
  `{p}:position:seq`         the EVENTS stream sequence S behind it: every message up to S is
                             applied, skipped as applied, or dead-lettered
  `{p}:position:ahead`       hash stream sequence -> position of messages done after a gap
                             (beyond S + 1), folded into S and P once the gap closes

Generations: `{p}` is `{ns}:views:{generation}`. The first generation is `live`; every
`iot replay views` builds a new one (`r<epoch ms>`) beside it and switches to it:
  `{ns}:views:current`       the generation readers and the live projector use (absent = `live`);
                             one SET switches both, atomically
  `{ns}:views:replay`        hash `building` / `retiring` -> generation: what a replay is building
                             or about to remove, so an interrupted one is cleaned up by the next
  `{ns}:views:changes`       pub/sub channel: a device id per change (for the SSE stream); one
                             per namespace, so a switch does not cut the stream (a replay
                             building a generation publishes nothing)
Loss of Redis's data (a FLUSHALL, a restart without persistence):
  `{ns}:views:marker`        a random token, present while the views are known to hold the log
                             (written by the projector on a fresh start, and at the end of a
                             replay when absent). Every live write of the projector (its scripts)
                             names the token it knows and is refused unless the key holds it, so
                             nothing is written into a Redis that lost the views; an absent
                             marker is the projector's signal to rebuild them
  `{ns}:views:rebuilding`    JSON {"since_ms", "reason"}: the views are known incomplete and a
                             rebuild from the log is under way (set by the projector that noticed
                             the loss, removed with the marker's return); the gateway answers 503
                             while it exists (or while a marker it has seen is gone)
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

DEFAULT_GENERATION = "live"


def views_root(namespace: str) -> str:
    return f"{namespace or 'iot'}:views"


def current_key(namespace: str) -> str:
    """The key naming the generation in use."""
    return f"{views_root(namespace)}:current"


def replay_key(namespace: str) -> str:
    return f"{views_root(namespace)}:replay"


def marker_key(namespace: str) -> str:
    """The token present while the views are known to hold the log (see the layout above)."""
    return f"{views_root(namespace)}:marker"


def rebuilding_key(namespace: str) -> str:
    """Present while the views are known incomplete and being rebuilt."""
    return f"{views_root(namespace)}:rebuilding"


@dataclass(frozen=True)
class ViewKeys:
    prefix: str
    changes: str  # the namespace's change channel ("" = publish nothing)
    generation: str = DEFAULT_GENERATION

    @classmethod
    def for_namespace(cls, namespace: str, generation: str = DEFAULT_GENERATION) -> ViewKeys:
        root = views_root(namespace)
        return cls(f"{root}:{generation}", f"{root}:changes", generation)

    def silent(self) -> ViewKeys:
        """The same keys, publishing no changes (a generation being built)."""
        return ViewKeys(self.prefix, "", self.generation)

    def device(self, device_id: str) -> str:
        return f"{self.prefix}:device:{device_id}"

    @property
    def devices(self) -> str:
        return f"{self.prefix}:devices"

    def status(self, status: str) -> str:
        return f"{self.prefix}:status:{status}"

    def label(self, key: str, value: str) -> str:
        return f"{self.prefix}:label:{key}={value}"

    @property
    def online(self) -> str:
        return f"{self.prefix}:online"

    def readings(self, minute: int) -> str:
        return f"{self.prefix}:readings:{minute}"

    @property
    def commands_pending(self) -> str:
        return f"{self.prefix}:commands_pending"

    def alerts_open(self, severity: str) -> str:
        return f"{self.prefix}:alerts_open:{severity}"

    def alert(self, alert_id: str) -> str:
        return f"{self.prefix}:alert:{alert_id}"

    @property
    def alerts(self) -> str:
        return f"{self.prefix}:alerts"

    def alerts_in(self, group: str) -> str:
        """`open` or `cleared`."""
        return f"{self.prefix}:alerts:{group}"

    def alerts_of_device(self, device_id: str) -> str:
        return f"{self.prefix}:alerts:device:{device_id}"

    def alerts_of_rule(self, rule_id: str) -> str:
        return f"{self.prefix}:alerts:rule:{rule_id}"

    def alerts_cleared_of(self, device_id: str) -> str:
        return f"{self.prefix}:alerts:cleared_of:{device_id}"

    def connectivity(self, device_id: str) -> str:
        return f"{self.prefix}:connectivity:{device_id}"

    def commands_done(self, device_id: str) -> str:
        return f"{self.prefix}:commands_done:{device_id}"

    def history(self, device_id: str) -> str:
        """The device's domain events, one JSON entry each, scored by version."""
        return f"{self.prefix}:history:{device_id}"

    def history_at(self, device_id: str) -> str:
        """The device's versions (members) scored by the event time (epoch ms)."""
        return f"{self.prefix}:history_at:{device_id}"

    def history_reported(self, device_id: str) -> str:
        """The device's reported states ({reported, config_version}) scored by when received;
        its newest HISTORY_KEPT."""
        return f"{self.prefix}:history_reported:{device_id}"

    def history_state(self, device_id: str) -> str:
        """The device's state after every HISTORY_SNAPSHOT_EVERY-th version (field: version)."""
        return f"{self.prefix}:history_state:{device_id}"

    def rule(self, rule_id: str) -> str:
        return f"{self.prefix}:rule:{rule_id}"

    @property
    def rules(self) -> str:
        return f"{self.prefix}:rules"

    @property
    def rules_open(self) -> str:
        return f"{self.prefix}:rules:open_alerts"

    @property
    def position(self) -> str:
        return f"{self.prefix}:position"

    @property
    def position_seq(self) -> str:
        return f"{self.prefix}:position:seq"

    @property
    def position_ahead(self) -> str:
        return f"{self.prefix}:position:ahead"


STATUSES = ("provisioned", "active", "suspended", "decommissioned")
SEVERITIES = ("critical", "warning", "info")
CLEARED_ALERTS_KEPT = 100  # cleared alerts the views keep per device, newest cleared first
HISTORY_KEPT = 2_000  # connectivity changes and finished commands kept per device, newest first
HISTORY_SNAPSHOT_EVERY = 64  # a device's state is kept after every 64th version (for as_of)
HISTORY_STATE_FIELDS = ("name", "type", "labels", "status", "desired")  # with `online`
METRIC_FIELD = "m:"
CONFIG_VERSION_KEY = "config_version"  # reserved in a device's reported state


def _text(raw: Any) -> str | None:
    return raw.decode() if isinstance(raw, bytes) else raw


class CurrentKeys:
    """Resolves the generation in use (`current_key`), caching it for `ttl` seconds.

    The live projector resolves once per batch with `ttl` 0, so a batch's effects and checkpoint
    land in one generation; the gateway caches briefly. A replay waits longer than any cache
    before it relies on everybody having switched (iot.replay.SWITCH_GRACE_S).

    The same read (one MGET) fetches the loss marker and the rebuilding flag: `marker` and
    `rebuilding` are their values at the last resolution (None when absent).
    """

    def __init__(
        self,
        redis: Any,
        namespace: str,
        ttl: float = 0.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.redis = redis
        self.namespace = namespace
        self.key = current_key(namespace)
        self.state_keys = (self.key, marker_key(namespace), rebuilding_key(namespace))
        self.marker: str | None = None
        self.rebuilding: str | None = None
        self.ttl = ttl
        self.clock = clock
        self._keys = ViewKeys.for_namespace(namespace)
        self._at = float("-inf")

    @property
    def cached(self) -> ViewKeys:
        """The keys last resolved (the default generation before the first resolution)."""
        return self._keys

    async def resolve(self) -> ViewKeys:
        now = self.clock()
        if now - self._at >= self.ttl:  # always with ttl 0
            raw, marker, rebuilding = await self.redis.mget(self.state_keys)
            self.marker, self.rebuilding = _text(marker), _text(rebuilding)
            generation = _text(raw) or DEFAULT_GENERATION
            if generation != self._keys.generation:
                self._keys = ViewKeys.for_namespace(self.namespace, generation)
            self._at = now
        return self._keys
