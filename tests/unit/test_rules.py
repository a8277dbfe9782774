"""Alert rules: parsing and validation of definitions, scopes, and the Rule aggregate."""

from __future__ import annotations

import json
from typing import Any
from uuid import UUID

import pytest
from eventsourcing.application import Application

from domain.device import device_uuid
from domain.errors import IllegalTransition, InvalidCommand
from domain.rules import (
    Absent,
    Anomaly,
    Rate,
    Rule,
    RuleInvalid,
    RuleSpec,
    Scope,
    Threshold,
    parse_rule,
    rule_uuid,
    spec_to_dict,
)
from tests.unit.support import T0, at


def rule_json(**overrides: Any) -> dict[str, Any]:
    rule: dict[str, Any] = {
        "name": "Boiler too hot",
        "metric": "temperature",
        "severity": "critical",
        "scope": {"type": "thermometer", "labels": {"site": "lab"}},
        "condition": {"kind": "threshold", "op": ">", "value": 80, "clear": 75, "for_s": 30},
    }
    rule.update(overrides)
    return rule


def parse(rule: Any) -> RuleSpec:
    return parse_rule(json.dumps(rule).encode())


def problems(rule: Any) -> list[tuple[str, str]]:
    with pytest.raises(RuleInvalid) as caught:
        parse(rule)
    return caught.value.problems


def condition(**fields: Any) -> dict[str, Any]:
    return rule_json(condition=fields)


SPEC = RuleSpec(
    name="Boiler too hot",
    metric="temperature",
    severity="critical",
    condition=Threshold(op=">", value=80.0, clear=75.0, for_s=30.0),
)

# -- parsing valid definitions ----------------------------------------------------------------


def test_a_threshold_rule_parses_into_its_structs() -> None:
    spec = parse(rule_json())

    assert spec == RuleSpec(
        name="Boiler too hot",
        metric="temperature",
        severity="critical",
        scope=Scope(type="thermometer", labels={"site": "lab"}),
        condition=Threshold(op=">", value=80.0, clear=75.0, for_s=30.0),
    )


def test_threshold_clear_and_for_s_default_to_none_and_zero() -> None:
    spec = parse(condition(kind="threshold", op="<=", value=-5))

    assert spec.condition == Threshold(op="<=", value=-5.0)
    assert isinstance(spec.condition, Threshold)
    assert spec.condition.clear is None
    assert spec.condition.clear_level == -5.0
    assert spec.condition.for_s == 0


def test_a_rate_rule_parses() -> None:
    spec = parse(condition(kind="rate", max_per_s=0.5, for_s=10))

    assert spec.condition == Rate(max_per_s=0.5, for_s=10.0)


def test_an_absent_rule_parses_and_may_watch_any_message_with_the_star_metric() -> None:
    spec = parse(rule_json(metric="*", condition={"kind": "absent", "for_s": 300}))

    assert spec.metric == "*"
    assert spec.condition == Absent(for_s=300.0)


def test_an_anomaly_rule_parses_with_a_default_sensitivity() -> None:
    assert parse(condition(kind="anomaly")).condition == Anomaly(sensitivity=0.5)
    assert parse(condition(kind="anomaly", sensitivity=0)).condition == Anomaly(sensitivity=0.0)
    assert parse(condition(kind="anomaly", sensitivity=1)).condition == Anomaly(sensitivity=1.0)


def test_scope_is_optional_and_null_scope_is_the_empty_scope() -> None:
    without = rule_json()
    del without["scope"]

    assert parse(without).scope == Scope()
    assert parse(rule_json(scope=None)).scope == Scope()


@pytest.mark.parametrize(("op", "clear"), [(">", 80), (">=", 79.5), ("<", 80), ("<=", 120)])
def test_clear_on_the_release_side_of_value_or_equal_to_it_is_accepted(
    op: str, clear: float
) -> None:
    spec = parse(condition(kind="threshold", op=op, value=80, clear=clear))

    assert isinstance(spec.condition, Threshold)
    assert spec.condition.clear == clear


def test_metric_names_follow_the_ingest_rule() -> None:
    assert parse(rule_json(metric="a.B-c_9" + "x" * 57)).metric == "a.B-c_9" + "x" * 57


# -- validation problems ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("rule", "path", "message"),
    [
        (condition(kind="anomaly", sensitivity=1.5), "condition.sensitivity", "at most 1"),
        (condition(kind="anomaly", sensitivity=-0.1), "condition.sensitivity", "not be negative"),
        (condition(kind="anomaly", sensitivity="high"), "condition.sensitivity", "be a number"),
        (condition(kind="anomaly", sensitivity=True), "condition.sensitivity", "be a number"),
        (condition(kind="anomaly", window=10), "condition.window", "unknown field"),
        (rule_json(metric="*", condition={"kind": "anomaly"}), "metric", "only valid with absent"),
        (condition(kind="spike"), "condition.kind", "unknown condition kind 'spike'"),
        (condition(op=">", value=1), "condition.kind", "missing"),
        (rule_json(condition=None), "condition", "missing required field"),
        (rule_json(condition=[1]), "condition", "must be a JSON object"),
        (condition(kind="threshold", op="==", value=1), "condition.op", "must be one of"),
        (condition(kind="threshold", op=">"), "condition.value", "missing required field"),
        (condition(kind="threshold", op=">", value="80"), "condition.value", "must be a number"),
        (condition(kind="threshold", op=">", value=True), "condition.value", "must be a number"),
        (
            condition(kind="threshold", op=">", value=80, clear=81),
            "condition.clear",
            "must be at most value (80) for >",
        ),
        (
            condition(kind="threshold", op=">=", value=80, clear=80.5),
            "condition.clear",
            "must be at most value",
        ),
        (
            condition(kind="threshold", op="<", value=10, clear=9),
            "condition.clear",
            "must be at least value (10) for <",
        ),
        (
            condition(kind="threshold", op="<=", value=10, clear=0),
            "condition.clear",
            "must be at least value",
        ),
        (
            condition(kind="threshold", op=">", value=1, for_s=-1),
            "condition.for_s",
            "must not be negative",
        ),
        (
            condition(kind="threshold", op=">", value=1, for_s=10**9),
            "condition.for_s",
            "must be at most",
        ),
        (condition(kind="threshold", op=">", value=1, x=1), "condition.x", "unknown field"),
        (condition(kind="rate"), "condition.max_per_s", "missing required field"),
        (condition(kind="rate", max_per_s=0), "condition.max_per_s", "must be greater than 0"),
        (condition(kind="rate", max_per_s=-2), "condition.max_per_s", "must be greater than 0"),
        (
            condition(kind="rate", max_per_s=1, for_s=-0.1),
            "condition.for_s",
            "must not be negative",
        ),
        (condition(kind="rate", max_per_s=1, op=">"), "condition.op", "unknown field"),
        (condition(kind="absent"), "condition.for_s", "missing required field"),
        (condition(kind="absent", for_s=0), "condition.for_s", "must be greater than 0"),
        (condition(kind="absent", for_s=-5), "condition.for_s", "must be greater than 0"),
        (condition(kind="absent", for_s=5, value=1), "condition.value", "unknown field"),
        (rule_json(name=""), "name", "must be a string of 1 to 200 characters"),
        (rule_json(name="n" * 201), "name", "must be a string of 1 to 200 characters"),
        (rule_json(name=7), "name", "must be a string"),
        (rule_json(name=None), "name", "missing required field"),
        (rule_json(metric="has space"), "metric", "must match"),
        (rule_json(metric="slash/inside"), "metric", "must match"),
        (rule_json(metric="m" * 65), "metric", "must match"),
        (rule_json(metric=""), "metric", "must match"),
        (rule_json(metric=3), "metric", "must be a string"),
        (rule_json(metric="*"), "metric", "'*' (any message) is only valid with absent"),
        (rule_json(severity="fatal"), "severity", "must be one of critical, warning, info"),
        (rule_json(severity=None), "severity", "missing required field"),
        (rule_json(owner="me"), "owner", "unknown field"),
        (rule_json(scope=[]), "scope", "must be a JSON object"),
        (rule_json(scope={"site": "lab"}), "scope.site", "unknown field"),
        (rule_json(scope={"device_ids": "sensor-001"}), "scope.device_ids", "must be a list"),
        (rule_json(scope={"device_ids": []}), "scope.device_ids", "must list 1 to 1000"),
        (
            rule_json(scope={"device_ids": ["ok", "dot.inside"]}),
            "scope.device_ids[1]",
            "device id must match",
        ),
        (rule_json(scope={"device_ids": [1]}), "scope.device_ids[0]", "device id must match"),
        (rule_json(scope={"type": ""}), "scope.type", "must be a string of 1 to 64"),
        (rule_json(scope={"type": "t" * 65}), "scope.type", "must be a string of 1 to 64"),
        (rule_json(scope={"labels": ["a"]}), "scope.labels", "must be a JSON object"),
        (
            rule_json(scope={"labels": {"bad key": "v"}}),
            'scope.labels["bad key"]',
            "label key must match",
        ),
        (
            rule_json(scope={"labels": {"k": 1}}),
            'scope.labels["k"]',
            "label value must be a string",
        ),
        (
            rule_json(scope={"labels": {"k": "v" * 257}}),
            'scope.labels["k"]',
            "label value must be a string of at most 256",
        ),
        (
            rule_json(scope={"labels": {f"k{i}": "v" for i in range(65)}}),
            "scope.labels",
            "at most 64 labels",
        ),
    ],
)
def test_each_validation_problem_names_its_path_and_says_what_is_wrong(
    rule: Any, path: str, message: str
) -> None:
    found = problems(rule)

    assert len(found) == 1, found
    assert found[0][0] == path
    assert message in found[0][1]


def test_every_problem_of_a_definition_is_reported_together() -> None:
    found = problems(
        {
            "name": "",
            "metric": "bad metric",
            "severity": "loud",
            "colour": "red",
            "scope": {"device_ids": ["a.b"], "labels": {"ok": "v", "bad key": "v"}},
            "condition": {"kind": "threshold", "op": ">", "value": 80, "clear": 90, "for_s": -1},
        }
    )

    assert sorted(path for path, _ in found) == [
        "colour",
        "condition.clear",
        "condition.for_s",
        "metric",
        "name",
        "scope.device_ids[0]",
        'scope.labels["bad key"]',
        "severity",
    ]


def test_the_reason_of_an_invalid_rule_lists_every_problem() -> None:
    with pytest.raises(RuleInvalid) as caught:
        parse(rule_json(name="", severity="loud"))

    assert isinstance(caught.value, InvalidCommand)
    assert caught.value.reason == (
        "name: must be a string of 1 to 200 characters; "
        "severity: must be one of critical, warning, info"
    )


def test_a_missing_definition_reports_each_required_field() -> None:
    assert sorted(problems({})) == [
        ("condition", "missing required field"),
        ("metric", "missing required field"),
        ("name", "missing required field"),
        ("severity", "missing required field"),
    ]


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b"{not json", "malformed JSON"),
        (b"\xff", "malformed JSON or not UTF-8"),
        (b"[1, 2]", "a rule must be a JSON object"),
        (b"null", "a rule must be a JSON object"),
        (b'{"condition": {"kind": "threshold", "op": ">", "value": 1e400}}', "invalid number"),
    ],
)
def test_a_definition_that_is_not_a_json_object_is_rejected_as_a_whole(
    raw: bytes, message: str
) -> None:
    with pytest.raises(RuleInvalid) as caught:
        parse_rule(raw)

    [(path, text)] = caught.value.problems
    assert path == ""
    assert message in text


# -- scopes -----------------------------------------------------------------------------------


def test_an_empty_scope_matches_every_device() -> None:
    assert Scope().matches("sensor-001", "thermometer", {}) is True
    assert Scope(labels={}).matches("any", "anything", {"site": "x"}) is True


def test_a_scope_matches_only_when_every_given_part_matches() -> None:
    scope = Scope(
        device_ids=["sensor-001", "sensor-002"], type="thermometer", labels={"site": "lab"}
    )

    assert scope.matches("sensor-001", "thermometer", {"site": "lab", "floor": "2"}) is True
    assert scope.matches("sensor-003", "thermometer", {"site": "lab"}) is False
    assert scope.matches("sensor-001", "hygrometer", {"site": "lab"}) is False
    assert scope.matches("sensor-001", "thermometer", {"site": "office"}) is False
    assert scope.matches("sensor-001", "thermometer", {}) is False


def test_a_scope_by_type_alone_ignores_ids_and_labels() -> None:
    assert Scope(type="valve").matches("v-9", "valve", {"any": "thing"}) is True


# -- the Rule aggregate -----------------------------------------------------------------------


def event_names(rule: Rule) -> list[str]:
    return [type(e).__name__ for e in rule.collect_events()]


def test_a_created_rule_is_enabled_and_keeps_its_spec() -> None:
    rule = Rule.create("boiler-hot", SPEC, T0)

    assert rule.rule_id == "boiler-hot"
    assert rule.spec == SPEC
    assert rule.enabled is True
    assert rule.id == rule_uuid("boiler-hot")
    assert rule.version == 1
    assert event_names(rule) == ["Created"]


def test_rule_events_carry_the_rule_id_and_the_spec_as_plain_json() -> None:
    rule = Rule.create("boiler-hot", SPEC, T0)
    rule.update(parse(rule_json(severity="info")), at(1))
    rule.disable(at(2))

    events: list[Any] = list(rule.collect_events())  # the library builds the event classes
    created, updated, disabled = events
    assert created.spec == spec_to_dict(SPEC)
    assert json.loads(json.dumps(created.spec))["condition"] == {
        "kind": "threshold",
        "op": ">",
        "value": 80.0,
        "clear": 75.0,
        "for_s": 30.0,
    }
    assert updated.spec["severity"] == "info"
    assert [e.rule_id for e in events] == ["boiler-hot"] * 3
    assert created.timestamp == T0
    assert disabled.timestamp == at(2)


def test_rule_uuid_is_stable_per_rule_id_and_differs_from_device_ids() -> None:
    assert rule_uuid("r1") == rule_uuid("r1")
    assert rule_uuid("r1") != rule_uuid("r2")
    assert rule_uuid("sensor-001") != device_uuid("sensor-001")


@pytest.mark.parametrize("rule_id", ["", "dot.inside", "has space", "x" * 65, "r\n"])
def test_creating_a_rule_with_an_invalid_id_is_rejected(rule_id: str) -> None:
    with pytest.raises(InvalidCommand) as caught:
        Rule.create(rule_id, SPEC, T0)

    assert "rule_id" in caught.value.reason


def test_a_spec_built_in_code_is_validated_like_a_parsed_one() -> None:
    bad = RuleSpec(
        name="",
        metric="temperature",
        severity="warning",
        condition=Threshold(op=">", value=80.0, clear=90.0),
    )

    with pytest.raises(RuleInvalid) as caught:
        Rule.create("r1", bad, T0)

    assert [path for path, _ in caught.value.problems] == ["name", "condition.clear"]


def test_update_replaces_the_whole_spec() -> None:
    rule = Rule.create("r1", SPEC, T0)
    new = parse(rule_json(metric="*", condition={"kind": "absent", "for_s": 60}))

    assert rule.update(new, at(1)) is True

    assert rule.spec == new
    assert event_names(rule) == ["Created", "Updated"]


def test_update_with_an_identical_spec_changes_nothing() -> None:
    rule = Rule.create("r1", SPEC, T0)

    assert rule.update(SPEC, at(1)) is False
    assert event_names(rule) == ["Created"]


def test_update_with_an_invalid_spec_is_rejected_and_keeps_the_old_one() -> None:
    rule = Rule.create("r1", SPEC, T0)
    bad = RuleSpec(name="x", metric="bad metric", severity="info", condition=Rate(max_per_s=-1))

    with pytest.raises(RuleInvalid):
        rule.update(bad, at(1))

    assert rule.spec == SPEC
    assert rule.version == 1


def test_a_disabled_rule_can_be_enabled_again() -> None:
    rule = Rule.create("r1", SPEC, T0)
    rule.disable(at(1))
    assert rule.enabled is False
    rule.enable(at(2))

    assert rule.enabled is True
    assert event_names(rule) == ["Created", "Disabled", "Enabled"]


def test_enabling_an_enabled_rule_is_an_illegal_transition() -> None:
    rule = Rule.create("r1", SPEC, T0)

    with pytest.raises(IllegalTransition) as caught:
        rule.enable(at(1))

    assert caught.value.reason == "rule r1 is already enabled"
    assert rule.version == 1


def test_disabling_a_disabled_rule_is_an_illegal_transition() -> None:
    rule = Rule.create("r1", SPEC, T0)
    rule.disable(at(1))

    with pytest.raises(IllegalTransition) as caught:
        rule.disable(at(2))

    assert caught.value.reason == "rule r1 is already disabled"


def test_a_disabled_rule_can_be_updated() -> None:
    rule = Rule.create("r1", SPEC, T0)
    rule.disable(at(1))

    assert rule.update(parse(rule_json(name="renamed")), at(2)) is True
    assert rule.spec.name == "renamed"
    assert rule.enabled is False


def test_a_rule_survives_storage_and_reloading_with_the_json_transcoder() -> None:
    app = Application[UUID](env={"PERSISTENCE_MODULE": "eventsourcing.popo"})
    rule = Rule.create("r1", parse(rule_json()), T0)
    rule.update(parse(condition(kind="rate", max_per_s=2.5, for_s=1)), at(1))
    rule.disable(at(2))
    app.save(rule)

    reloaded: object = app.repository.get(rule_uuid("r1"))

    assert isinstance(reloaded, Rule)
    assert reloaded.spec == rule.spec
    assert reloaded.spec.condition == Rate(max_per_s=2.5, for_s=1.0)
    assert reloaded.enabled is False
    assert reloaded.version == 3
    reloaded.enable(at(3))
    assert reloaded.enabled is True
