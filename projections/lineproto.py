"""InfluxDB line protocol: a correct, fast encoder for telemetry points.

One reading becomes one line: `telemetry,device_id=<id> <metric>=<value>,... <ts>` with `ts` in
epoch milliseconds (write with `precision=ms`). Escaping follows the line-protocol reference:

- measurement: commas and spaces are backslash-escaped;
- tag keys, tag values and field keys: commas, equals signs and spaces are backslash-escaped;
  a newline cannot be represented, nor can a trailing backslash (it would escape the separator),
  nor an empty key or tag value: those raise `LineProtocolError`;
- string field values are double-quoted, with `"` and `\\` backslash-escaped (newlines are kept:
  InfluxDB reads them inside quotes).

Numbers are always written as floats (`repr`, shortest round-trip form, so no precision is lost
for a float). InfluxDB 1.x fixes a field's type by the first point written to a shard and refuses
a point whose type differs, and JSON devices send `21` and `21.5` for the same metric; writing
integers as integers would make the second value a "field type conflict". The cost: an integer
above 2**53 is rounded to the nearest float. Booleans are `true`/`false`, strings are quoted.
Non-finite numbers raise `LineProtocolError` (the bridge already refuses them).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

from domain.ingest import Reading, Telemetry, Value

MEASUREMENT = "telemetry"
DEVICE_TAG = "device_id"

_MEASUREMENT_ESCAPES = str.maketrans({",": "\\,", " ": "\\ "})
_KEY_ESCAPES = str.maketrans({",": "\\,", "=": "\\=", " ": "\\ "})
_STRING_ESCAPES = str.maketrans({"\\": "\\\\", '"': '\\"'})
_CACHE_LIMIT = 50_000


class LineProtocolError(ValueError):
    """A name or value that line protocol cannot represent."""


def _check_name(name: str, what: str) -> None:
    if not name:
        raise LineProtocolError(f"empty {what}")
    if "\n" in name or "\r" in name:
        raise LineProtocolError(f"{what} {name!r} contains a newline")
    if name.endswith("\\"):
        raise LineProtocolError(f"{what} {name!r} ends with a backslash")


def escape_measurement(name: str) -> str:
    _check_name(name, "measurement")
    return name.translate(_MEASUREMENT_ESCAPES)


def escape_key(name: str, what: str = "key") -> str:
    """Escape a tag key, tag value or field key."""
    _check_name(name, what)
    return name.translate(_KEY_ESCAPES)


def format_value(value: Value) -> str:
    """A field value: numbers as floats, booleans as true/false, strings quoted."""
    kind = type(value)
    if kind is float:
        if not math.isfinite(value):  # type: ignore[arg-type]
            raise LineProtocolError(f"non-finite number {value!r}")
        return repr(value)
    if kind is bool:
        return "true" if value else "false"
    if kind is int:
        try:
            return repr(float(value))
        except OverflowError as e:
            raise LineProtocolError(f"integer {value} is too large for a float") from e
    if kind is str:
        text: str = value  # type: ignore[assignment]
        if "\\" in text or '"' in text:
            text = text.translate(_STRING_ESCAPES)
        return f'"{text}"'
    raise LineProtocolError(f"unsupported field value type {kind.__name__}")


def encode_line(
    measurement: str, tags: Mapping[str, str], fields: Mapping[str, Value], ts: int
) -> str:
    """One point as a line (with its newline); tags sorted by key as InfluxDB prefers."""
    if not fields:
        raise LineProtocolError("a point needs at least one field")
    head = escape_measurement(measurement)
    for key in sorted(tags):
        head += f",{escape_key(key, 'tag key')}={escape_key(tags[key], 'tag value')}"
    body = ",".join(f"{escape_key(k, 'field key')}={format_value(v)}" for k, v in fields.items())
    return f"{head} {body} {int(ts)}\n"


class TelemetryEncoder:
    """Encodes telemetry messages into lines; caches escaped device ids and metric names.

    Reusable and cheap to share: the caches only grow to a bound and are then cleared.
    """

    def __init__(self, measurement: str = MEASUREMENT, tag: str = DEVICE_TAG) -> None:
        self._head = f"{escape_measurement(measurement)},{escape_key(tag, 'tag key')}="
        self._prefixes: dict[str, str] = {}
        self._keys: dict[str, str] = {}

    def _prefix(self, device_id: str) -> str:
        prefix = self._prefixes.get(device_id)
        if prefix is None:
            if len(self._prefixes) >= _CACHE_LIMIT:
                self._prefixes.clear()
            prefix = f"{self._head}{escape_key(device_id, 'tag value')} "
            self._prefixes[device_id] = prefix
        return prefix

    def _fields(self, values: Mapping[str, Value]) -> str:
        keys = self._keys
        parts = []
        for name, value in values.items():
            key = keys.get(name)
            if key is None:
                if len(keys) >= _CACHE_LIMIT:
                    keys.clear()
                key = keys[name] = escape_key(name, "field key") + "="
            kind = type(value)
            if kind is float and math.isfinite(value):  # type: ignore[arg-type]
                parts.append(key + repr(value))
            else:
                parts.append(key + format_value(value))
        return ",".join(parts)

    def encode_readings(self, device_id: str, readings: Iterable[Reading]) -> str:
        """Lines for the readings of one device; readings without values give no line."""
        prefix = self._prefix(device_id)
        return "".join(f"{prefix}{self._fields(r.values)} {r.ts}\n" for r in readings if r.values)

    def encode(self, telemetry: Telemetry) -> str:
        """The lines of one telemetry message ("" when it has no values)."""
        return self.encode_readings(telemetry.device_id, telemetry.readings)
