"""Times and durations as the APIs and the `iot` command spell them: RFC 3339 with an offset or
epoch milliseconds; durations like `90s`, `15m`, `24h`, `7d`. One parser for every service."""

from __future__ import annotations

import math
import re
from datetime import UTC, datetime

MAX_MS = 9_223_372_036_854  # InfluxDB's last representable instant (int64 ns), in ms
UNIT_MS = {"ms": 1, "s": 1_000, "m": 60_000, "h": 3_600_000, "d": 86_400_000, "w": 604_800_000}
_DURATION = re.compile(r"^([1-9][0-9]{0,9})(ms|s|m|h|d|w)$")


def parse_duration(text: str, max_ms: int = MAX_MS) -> int:
    """`10s`, `1m`, `1h`... as milliseconds, at most `max_ms`; ValueError otherwise."""
    found = _DURATION.fullmatch(text)
    if not found:
        raise ValueError(f"a duration like 10s, 1m or 1h (units ms, s, m, h, d, w), got {text!r}")
    ms = int(found.group(1)) * UNIT_MS[found.group(2)]
    if ms > max_ms:
        raise ValueError(f"a duration of at most {format_duration(max_ms)}, got {text!r}")
    return ms


def format_duration(ms: int) -> str:
    """The shortest exact spelling of a duration in milliseconds (`90000` -> `90s`)."""
    for unit in ("w", "d", "h", "m", "s"):
        if ms % UNIT_MS[unit] == 0:
            return f"{ms // UNIT_MS[unit]}{unit}"
    return f"{ms}ms"


def parse_time(text: str) -> int:
    """An RFC 3339 timestamp (with offset) or epoch milliseconds, as epoch milliseconds."""
    if text.isdigit():
        ms = int(text)
    else:
        try:
            parsed = datetime.fromisoformat(text.replace("z", "Z"))
        except ValueError as e:
            raise ValueError(f"an RFC 3339 timestamp or epoch milliseconds, got {text!r}") from e
        if parsed.tzinfo is None:
            raise ValueError(f"an RFC 3339 timestamp needs an offset (Z or +hh:mm), got {text!r}")
        ms = math.floor(parsed.timestamp() * 1000)
    if not 0 <= ms <= MAX_MS:
        raise ValueError(f"a time between 1970 and 2262, got {text!r}")
    return ms


def rfc3339(ms: int) -> str:
    """Epoch milliseconds as RFC 3339 in UTC with millisecond precision."""
    moment = datetime.fromtimestamp(ms / 1000, UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")
