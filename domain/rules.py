"""Alert rules: the rule definition (a condition on one metric of the devices in a scope) and the
Rule aggregate.

A condition is one of:

- `threshold`: the metric's value compared with `value` by `op`; once raised, the alert clears at
  the first reading past `clear` (default `value`), so a `clear` level below `value` (for `>`)
  gives hysteresis.
- `rate`: the absolute change per second between consecutive readings (device time) exceeds
  `max_per_s`; it clears at the first pair of readings back within it.
- `absent`: no reading of the metric for `for_s` seconds; the metric `"*"` means no message of
  the device at all (any metric, any message kind). `"*"` is only valid with `absent`.
- `anomaly`: no level given; a streaming detector learns the series' own normal and raises on a
  departure from it (`analytics/anomaly.py`); `sensitivity` (0 to 1, default 0.5) lowers the
  score that raises as it grows.

`for_s` of threshold and rate is how long (device time) the breach must hold before it raises.
Booleans count as 1 and 0; string values are ignored by threshold and rate.
"""

from __future__ import annotations

import math
import re
import uuid
from datetime import datetime
from typing import Any, Literal

import msgspec
from eventsourcing.domain import Aggregate, event

from domain.device import (
    DEVICE_ID,
    LABEL_KEY,
    MAX_LABEL_VALUE,
    MAX_LABELS,
    MAX_NAME,
    MAX_TYPE,
)
from domain.errors import IllegalTransition, InvalidCommand

RULE_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
RULE_NAMESPACE = uuid.UUID("d36f40f0-0eaf-49b4-9767-9a48e2be6f07")
METRIC_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")  # the ingest's rule (bridges.validation)
ANY_METRIC = "*"
MAX_SCOPE_DEVICES = 1000
MAX_FOR_S = 366 * 24 * 3600
OPS = (">", ">=", "<", "<=")
SEVERITIES = ("critical", "warning", "info")
RESERVED_KINDS: tuple[str, ...] = ()  # kinds recognised but refused as not available yet
DEFAULT_SENSITIVITY = 0.5

Op = Literal[">", ">=", "<", "<="]
Severity = Literal["critical", "warning", "info"]


class _Condition(msgspec.Struct, frozen=True, tag_field="kind", kw_only=True):
    pass


class Threshold(_Condition, frozen=True, tag="threshold"):
    op: Op
    value: float
    clear: float | None = None
    for_s: float = 0.0

    @property
    def clear_level(self) -> float:
        return self.value if self.clear is None else self.clear


class Rate(_Condition, frozen=True, tag="rate"):
    max_per_s: float
    for_s: float = 0.0


class Absent(_Condition, frozen=True, tag="absent"):
    for_s: float


class Anomaly(_Condition, frozen=True, tag="anomaly"):
    sensitivity: float = DEFAULT_SENSITIVITY


Condition = Threshold | Rate | Absent | Anomaly
KINDS = ("threshold", "rate", "absent", "anomaly")


class Scope(msgspec.Struct, frozen=True, kw_only=True):
    """Which devices a rule applies to: every given part must match; an empty scope matches all."""

    device_ids: list[str] | None = None
    type: str | None = None
    labels: dict[str, str] | None = None

    def matches(self, device_id: str, type: str, labels: dict[str, str]) -> bool:
        if self.device_ids is not None and device_id not in self.device_ids:
            return False
        if self.type is not None and type != self.type:
            return False
        return self.labels is None or all(labels.get(k) == v for k, v in self.labels.items())


class RuleSpec(msgspec.Struct, frozen=True, kw_only=True):
    name: str
    metric: str  # a metric name, or "*" (any message of the device) for absent
    scope: Scope = msgspec.field(default_factory=Scope)
    severity: Severity
    condition: Condition


class RuleInvalid(InvalidCommand):
    """A rule definition with problems, each as (JSON path, message); all of them, not the first."""

    def __init__(self, problems: list[tuple[str, str]]) -> None:
        super().__init__("; ".join(f"{path or '(rule)'}: {message}" for path, message in problems))
        self.problems = problems


def rule_uuid(rule_id: str) -> uuid.UUID:
    """The aggregate id of a rule id (stable, so a second creation of an id conflicts)."""
    return uuid.uuid5(RULE_NAMESPACE, rule_id)


def check_rule_id(rule_id: str) -> None:
    if not isinstance(rule_id, str) or not RULE_ID.fullmatch(rule_id):
        raise InvalidCommand(f"rule_id must match {RULE_ID.pattern}")


_decoder = msgspec.json.Decoder()


def parse_rule(raw: bytes) -> RuleSpec:
    """Decode and validate a JSON rule definition; raises RuleInvalid listing every problem."""
    try:
        data = _decoder.decode(raw)
    except msgspec.ValidationError as e:  # numbers beyond the float range
        raise RuleInvalid([("", f"invalid number: {e}")]) from e
    except (msgspec.DecodeError, UnicodeDecodeError) as e:
        raise RuleInvalid([("", f"malformed JSON or not UTF-8: {e}")]) from e
    return validate_rule(data)


def validate_rule(data: Any) -> RuleSpec:
    """Validate a decoded rule definition (plain JSON types); raises RuleInvalid."""
    problems = _Problems()
    spec = problems.rule(data)
    if problems.found or spec is None:
        # what is wrong with the members given first, then what is missing
        found = sorted(problems.found, key=lambda p: p[1] == "missing required field")
        raise RuleInvalid(found or [("", "invalid rule")])
    return spec


def spec_to_dict(spec: RuleSpec) -> dict[str, Any]:
    """The plain JSON form of a spec, as stored in the Rule's events."""
    builtins: dict[str, Any] = msgspec.to_builtins(spec)
    return builtins


def spec_from_dict(data: dict[str, Any]) -> RuleSpec:
    return msgspec.convert(data, RuleSpec)


class _Problems:
    """Collects every problem of a definition while building the structs of its valid parts."""

    def __init__(self) -> None:
        self.found: list[tuple[str, str]] = []

    def add(self, path: str, message: str) -> None:
        self.found.append((path, message))

    def _object(self, data: Any, path: str, fields: tuple[str, ...], what: str) -> bool:
        if not isinstance(data, dict):
            self.add(path, f"{what} must be a JSON object")
            return False
        for key in data:
            if key not in fields:
                self.add(
                    _join(path, str(key)), f"unknown field; expected one of {', '.join(fields)}"
                )
        return True

    def _required(self, data: dict[str, Any], key: str, path: str) -> bool:
        if data.get(key) is None:
            self.add(_join(path, key), "missing required field")
            return False
        return True

    def _number(
        self,
        data: dict[str, Any],
        key: str,
        path: str,
        *,
        non_negative: bool = False,
        positive: bool = False,
        maximum: float | None = None,
    ) -> float | None:
        value: Any = data.get(key)
        where = _join(path, key)
        if type(value) not in (int, float):
            self.add(where, "must be a number")
            return None
        try:
            number = float(value)
        except OverflowError:
            number = math.inf
        if not math.isfinite(number):
            self.add(where, "must be finite")
            return None
        if positive and number <= 0:
            self.add(where, "must be greater than 0")
            return None
        if non_negative and number < 0:
            self.add(where, "must not be negative")
            return None
        if maximum is not None and number > maximum:
            self.add(where, f"must be at most {maximum:g}")
            return None
        return number

    def rule(self, data: Any) -> RuleSpec | None:
        fields = ("name", "metric", "severity", "scope", "condition")
        if not self._object(data, "", fields, "a rule"):
            return None
        raw_condition = data.get("condition")
        kind = raw_condition.get("kind") if isinstance(raw_condition, dict) else None
        name = self._name(data)
        metric = self._metric(data, kind)
        severity = self._severity(data)
        scope = self.scope(data.get("scope"), "scope")
        condition = self.condition(raw_condition, "condition")
        if name is None or metric is None or severity is None or condition is None:
            return None
        if scope is None:
            return None
        return RuleSpec(
            name=name, metric=metric, severity=severity, condition=condition, scope=scope
        )

    def _name(self, data: dict[str, Any]) -> str | None:
        if not self._required(data, "name", ""):
            return None
        name = data["name"]
        if not isinstance(name, str) or not 1 <= len(name) <= MAX_NAME:
            self.add("name", f"must be a string of 1 to {MAX_NAME} characters")
            return None
        return name

    def _metric(self, data: dict[str, Any], kind: Any) -> str | None:
        if not self._required(data, "metric", ""):
            return None
        metric = data["metric"]
        if not isinstance(metric, str):
            self.add("metric", "must be a string")
            return None
        if metric == ANY_METRIC:
            if kind in KINDS and kind != "absent":
                self.add("metric", f"{ANY_METRIC!r} (any message) is only valid with absent")
                return None
            return metric
        if not METRIC_NAME.fullmatch(metric):
            self.add("metric", f"must match {METRIC_NAME.pattern} (or be {ANY_METRIC!r})")
            return None
        return metric

    def _severity(self, data: dict[str, Any]) -> Severity | None:
        if not self._required(data, "severity", ""):
            return None
        severity = data["severity"]
        if severity not in SEVERITIES:
            self.add("severity", f"must be one of {', '.join(SEVERITIES)}")
            return None
        result: Severity = severity
        return result

    def scope(self, data: Any, path: str) -> Scope | None:
        if data is None:
            return Scope()
        if not self._object(data, path, ("device_ids", "type", "labels"), "scope"):
            return None
        before = len(self.found)
        device_ids = self._device_ids(data.get("device_ids"), _join(path, "device_ids"))
        type_ = data.get("type")
        if type_ is not None and (not isinstance(type_, str) or not 1 <= len(type_) <= MAX_TYPE):
            self.add(_join(path, "type"), f"must be a string of 1 to {MAX_TYPE} characters")
        labels = self._labels(data.get("labels"), _join(path, "labels"))
        if len(self.found) > before:
            return None
        return Scope(device_ids=device_ids, type=type_, labels=labels)

    def _device_ids(self, value: Any, path: str) -> list[str] | None:
        if value is None:
            return None
        if not isinstance(value, list):
            self.add(path, "must be a list of device ids")
            return None
        if not 1 <= len(value) <= MAX_SCOPE_DEVICES:
            self.add(path, f"must list 1 to {MAX_SCOPE_DEVICES} device ids (omit it for all)")
        for i, device_id in enumerate(value):
            if not isinstance(device_id, str) or not DEVICE_ID.fullmatch(device_id):
                self.add(f"{path}[{i}]", f"device id must match {DEVICE_ID.pattern}")
        return list(value)

    def _labels(self, value: Any, path: str) -> dict[str, str] | None:
        if value is None:
            return None
        if not isinstance(value, dict):
            self.add(path, "must be a JSON object of label keys to values")
            return None
        if len(value) > MAX_LABELS:
            self.add(path, f"at most {MAX_LABELS} labels")
        for key, label in value.items():
            where = f"{path}[{msgspec.json.encode(key).decode()}]"
            if not LABEL_KEY.fullmatch(key):
                self.add(where, f"label key must match {LABEL_KEY.pattern}")
            if not isinstance(label, str) or len(label) > MAX_LABEL_VALUE:
                self.add(where, f"label value must be a string of at most {MAX_LABEL_VALUE}")
        return dict(value)

    def condition(self, data: Any, path: str) -> Condition | None:
        if data is None:
            self.add(path, "missing required field")
            return None
        if not isinstance(data, dict):
            self.add(path, "condition must be a JSON object")
            return None
        kind = data.get("kind")
        where = _join(path, "kind")
        if kind in RESERVED_KINDS:
            self.add(where, f"condition kind {kind!r} is not available yet")
            return None
        if kind not in KINDS:
            shown = "missing" if kind is None else f"unknown condition kind {kind!r}"
            self.add(where, f"{shown}; expected one of {', '.join(KINDS)}")
            return None
        if kind == "threshold":
            return self._threshold(data, path)
        if kind == "rate":
            return self._rate(data, path)
        if kind == "anomaly":
            return self._anomaly(data, path)
        return self._absent(data, path)

    def _for_s(self, data: dict[str, Any], path: str, *, positive: bool) -> float | None:
        if not positive and data.get("for_s") is None:
            return 0.0
        if positive and not self._required(data, "for_s", path):
            return None
        return self._number(
            data, "for_s", path, non_negative=True, positive=positive, maximum=MAX_FOR_S
        )

    def _threshold(self, data: dict[str, Any], path: str) -> Threshold | None:
        self._object(data, path, ("kind", "op", "value", "clear", "for_s"), "condition")
        before = len(self.found)
        op: Any = data.get("op")
        if op not in OPS:
            self.add(_join(path, "op"), f"must be one of {', '.join(OPS)}")
        value = self._number(data, "value", path) if self._required(data, "value", path) else None
        clear = None if data.get("clear") is None else self._number(data, "clear", path)
        for_s = self._for_s(data, path, positive=False)
        if value is not None and clear is not None and op in OPS:
            if op in (">", ">=") and clear > value:
                self.add(_join(path, "clear"), f"must be at most value ({value:g}) for {op}")
            elif op in ("<", "<=") and clear < value:
                self.add(_join(path, "clear"), f"must be at least value ({value:g}) for {op}")
        if len(self.found) > before or value is None or for_s is None:
            return None
        return Threshold(op=op, value=value, clear=clear, for_s=for_s)

    def _rate(self, data: dict[str, Any], path: str) -> Rate | None:
        self._object(data, path, ("kind", "max_per_s", "for_s"), "condition")
        before = len(self.found)
        max_per_s = None
        if self._required(data, "max_per_s", path):
            max_per_s = self._number(data, "max_per_s", path, positive=True)
        for_s = self._for_s(data, path, positive=False)
        if len(self.found) > before or max_per_s is None or for_s is None:
            return None
        return Rate(max_per_s=max_per_s, for_s=for_s)

    def _absent(self, data: dict[str, Any], path: str) -> Absent | None:
        self._object(data, path, ("kind", "for_s"), "condition")
        before = len(self.found)
        for_s = self._for_s(data, path, positive=True)
        if len(self.found) > before or for_s is None:
            return None
        return Absent(for_s=for_s)

    def _anomaly(self, data: dict[str, Any], path: str) -> Anomaly | None:
        self._object(data, path, ("kind", "sensitivity"), "condition")
        before = len(self.found)
        sensitivity: float | None = DEFAULT_SENSITIVITY
        if data.get("sensitivity") is not None:
            sensitivity = self._number(data, "sensitivity", path, non_negative=True, maximum=1.0)
        if len(self.found) > before or sensitivity is None:
            return None
        return Anomaly(sensitivity=sensitivity)


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


class Rule(Aggregate):
    """An alert rule; created enabled. Its spec is stored in events as plain JSON."""

    class Event(Aggregate.Event):
        rule_id: str

    @staticmethod
    def create_id(rule_id: str, **_: Any) -> uuid.UUID:
        return rule_uuid(rule_id)

    @classmethod
    def create(cls, rule_id: str, spec: RuleSpec, at: datetime) -> Rule:
        check_rule_id(rule_id)
        return cls(rule_id=rule_id, spec=_checked(spec), timestamp=at)

    @event("Created")
    def __init__(self, rule_id: str, spec: dict[str, Any], timestamp: datetime) -> None:
        self.rule_id = rule_id
        self._spec = spec_from_dict(spec)
        self.enabled = True

    def trigger_event(self, event_class: Any, **kwargs: Any) -> None:
        kwargs.setdefault("rule_id", self.rule_id)
        super().trigger_event(event_class, **kwargs)

    @property
    def spec(self) -> RuleSpec:
        return self._spec

    # -- decisions -------------------------------------------------------------------------

    def update(self, spec: RuleSpec, at: datetime) -> bool:
        """Replace the spec whole; an identical one changes nothing and returns False."""
        checked = _checked(spec)
        if checked == spec_to_dict(self._spec):
            return False
        self._updated(spec=checked, timestamp=at)
        return True

    def enable(self, at: datetime) -> None:
        if self.enabled:
            raise IllegalTransition(f"rule {self.rule_id} is already enabled")
        self._enabled(timestamp=at)

    def disable(self, at: datetime) -> None:
        if not self.enabled:
            raise IllegalTransition(f"rule {self.rule_id} is already disabled")
        self._disabled(timestamp=at)

    # -- events ----------------------------------------------------------------------------

    @event("Updated")
    def _updated(self, spec: dict[str, Any], timestamp: datetime) -> None:
        self._spec = spec_from_dict(spec)

    @event("Enabled")
    def _enabled(self, timestamp: datetime) -> None:
        self.enabled = True

    @event("Disabled")
    def _disabled(self, timestamp: datetime) -> None:
        self.enabled = False


def _checked(spec: RuleSpec) -> dict[str, Any]:
    """The plain form of a spec built in code, validated like a parsed one."""
    return spec_to_dict(validate_rule(spec_to_dict(spec)))
