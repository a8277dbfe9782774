"""Telemetry rollups in InfluxDB: names shared by their writer, `iot migrate` and the gateway.

The raw series is measurement `telemetry` in the database's default retention policy `<P>` (a
*generation*: `autogen` at first, `r<epoch ms>` after a replay). Beside it, per device and
metric, tumbling windows by device time, each point at its window's start:

- `<P>.telemetry_1s`: 1-second partials, the projector's working level (same retention as the
  raw data), so that a batch recomputes at most a second of raw data per device, not minutes;
- `<P>_1m.telemetry_1m`: 1-minute windows, in retention policy `<P>_1m` (`IOT_RETENTION_1M`);
- `<P>_1h.telemetry_1h`: 1-hour windows, in retention policy `<P>_1h` (`IOT_RETENTION_1H`).

Every metric `m` gives the fields `count_m` (integer), `sum_m`, `min_m`, `max_m`, `mean_m`
(numeric metrics only) and `last_m` (the value of the window's newest reading). Each level is
recomputed from the level below, never incremented, so rewriting a window is idempotent.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

RAW_MEASUREMENT = "telemetry"
DEVICE_TAG = "device_id"


@dataclass(frozen=True)
class Level:
    """One level of windows: its width, measurement and retention-policy suffix."""

    name: str
    ms: int
    measurement: str
    suffix: str  # "" : in the raw policy itself

    def policy(self, raw_policy: str) -> str:
        """The retention policy holding this level in the generation of `raw_policy`."""
        return raw_policy + self.suffix

    @property
    def source(self) -> str:
        """How a gateway answer names data read from this level."""
        return f"rollup_{self.name}"


PARTIAL = Level("1s", 1_000, "telemetry_1s", "")
MINUTE = Level("1m", 60_000, "telemetry_1m", "_1m")
HOUR = Level("1h", 3_600_000, "telemetry_1h", "_1h")
LEVELS = (MINUTE, HOUR)  # the levels readers use, finest first
KINDS = ("count", "sum", "min", "max", "mean", "last")

_UNITS_MS = {"ns": 0, "u": 0, "µ": 0, "ms": 1, "s": 1_000, "m": 60_000, "h": 3_600_000}
_UNITS_MS |= {"d": 86_400_000, "w": 604_800_000}
_PART = re.compile(r"(\d+)(ns|u|µ|ms|s|m|h|d|w)")
_LITERAL = re.compile(r"(?:\d+(?:ns|u|µ|ms|s|m|h|d|w))+")


def duration_ms(text: str) -> int | None:
    """An InfluxDB duration (`30d`, `720h0m0s` as SHOW RETENTION POLICIES prints it, `INF`,
    `0s`) in milliseconds; None for infinite. ValueError for anything else."""
    if text.upper() == "INF":
        return None
    if not _LITERAL.fullmatch(text):
        raise ValueError(f"not an InfluxDB duration: {text!r}")
    total = sum(int(n) * _UNITS_MS[unit] for n, unit in _PART.findall(text))
    return total or None  # InfluxDB prints an infinite duration as 0s


def rollup_policies(raw_policy: str) -> tuple[str, ...]:
    """The rollup retention policies of a generation (`<P>_1m`, `<P>_1h`)."""
    return tuple(level.policy(raw_policy) for level in LEVELS)
