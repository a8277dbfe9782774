"""The Redis layout of the device views: the contract between the `views` projector (the only
writer) and the gateway (a reader). Every key starts with the namespace's view prefix.

Per device, hash `{p}:device:{id}`:
  `version`      last applied domain-event version (int as text)
  `doc`          JSON of the domain part, in the contract's shape:
                 {"device_id", "name", "type", "labels", "status", "registered_at",
                  "updated_at", "desired": {"version": config_version, "config": {...}}}
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
  `{p}:readings:{minute}`    HyperLogLog of reading ids (`<stream seq>:<index>`) received in
                             that epoch minute (idempotent under redelivery), expiring after 3 min
  `{p}:changes`              pub/sub channel: a device id per change (for the SSE stream)
The checkpoint of domain events (the consistency token's other half, written by the projector
after each batch, never backwards):
  `{p}:position`             the views position P: every domain event with an event-store
                             position <= P is applied (int as text; absent = 0)
  `{p}:position:seq`         the EVENTS stream sequence S behind it: every message up to S is
                             applied, skipped as applied, or dead-lettered
  `{p}:position:ahead`       hash stream sequence -> position of messages done after a gap
                             (beyond S + 1), folded into S and P once the gap closes
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ViewKeys:
    prefix: str

    @classmethod
    def for_namespace(cls, namespace: str, generation: str = "live") -> ViewKeys:
        return cls(f"{namespace or 'iot'}:views:{generation}")

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

    @property
    def changes(self) -> str:
        return f"{self.prefix}:changes"

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
METRIC_FIELD = "m:"
CONFIG_VERSION_KEY = "config_version"  # reserved in a device's reported state
