"""The line-protocol encoder: escaping, value types, telemetry lines."""

from __future__ import annotations

import pytest

from domain.ingest import Reading, Telemetry, Value
from projections.lineproto import (
    LineProtocolError,
    TelemetryEncoder,
    encode_line,
    escape_key,
    escape_measurement,
    format_value,
)


@pytest.mark.parametrize(
    ("raw", "escaped"),
    [
        ("temperature", "temperature"),
        ("a,b", "a\\,b"),
        ("a=b", "a\\=b"),
        ("a b", "a\\ b"),
        ("a, b=c", "a\\,\\ b\\=c"),
        ('say "hi"', 'say\\ "hi"'),  # quotes are literal in keys
        ("a\\b", "a\\b"),  # a backslash before an ordinary character stays literal
        ("température", "température"),
    ],
)
def test_keys_and_tag_values_escape_commas_equals_and_spaces(raw: str, escaped: str) -> None:
    assert escape_key(raw) == escaped


@pytest.mark.parametrize(
    ("raw", "escaped"),
    [("telemetry", "telemetry"), ("a,b", "a\\,b"), ("a b", "a\\ b"), ("a=b", "a=b")],
)
def test_measurement_escapes_commas_and_spaces_only(raw: str, escaped: str) -> None:
    assert escape_measurement(raw) == escaped


@pytest.mark.parametrize("bad", ["", "a\nb", "a\rb", "ends\\"])
def test_unrepresentable_names_are_refused(bad: str) -> None:
    with pytest.raises(LineProtocolError):
        escape_key(bad)


@pytest.mark.parametrize(
    ("value", "encoded"),
    [
        (21.5, "21.5"),
        (0.1, "0.1"),
        (-0.0, "-0.0"),
        (1e20, "1e+20"),
        (1e-05, "1e-05"),
        (1.7976931348623157e308, "1.7976931348623157e+308"),
        (21, "21.0"),  # integers are written as floats: one type per metric
        (-3, "-3.0"),
        (0, "0.0"),
        (2**53 + 1, "9007199254740992.0"),  # beyond 2**53 an integer is rounded
        (True, "true"),
        (False, "false"),
        ("on", '"on"'),
        ("", '""'),
        ('say "hi"', '"say \\"hi\\""'),
        ("back\\slash", '"back\\\\slash"'),
        ("ends\\", '"ends\\\\"'),
        ("two\nlines", '"two\nlines"'),
        ("a,b=c d", '"a,b=c d"'),
    ],
)
def test_field_values_are_typed_floats_booleans_and_quoted_strings(
    value: Value, encoded: str
) -> None:
    assert format_value(value) == encoded


def test_floats_round_trip_exactly() -> None:
    for value in (0.1 + 0.2, 1 / 3, 123456.789e-200, 5e-324):
        assert float(format_value(value)) == value


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf"), 10**400])
def test_non_finite_or_unrepresentable_numbers_are_refused(bad: Value) -> None:
    with pytest.raises(LineProtocolError):
        format_value(bad)


def test_an_unsupported_value_type_is_refused() -> None:
    with pytest.raises(LineProtocolError):
        format_value([1, 2])  # type: ignore[arg-type]


def test_encode_line_sorts_tags_and_ends_with_a_newline() -> None:
    line = encode_line("m x", {"z": "1", "a": "b c"}, {"f": 1, "s": "v"}, 1700000000123)
    assert line == 'm\\ x,a=b\\ c,z=1 f=1.0,s="v" 1700000000123\n'


def test_a_point_without_fields_is_refused() -> None:
    with pytest.raises(LineProtocolError):
        encode_line("m", {}, {}, 1)


def test_telemetry_gives_one_line_per_reading_with_its_millisecond_time() -> None:
    telemetry = Telemetry(
        device_id="boiler-1",
        received_at=1_764_201_600_500,
        readings=[
            Reading(1_764_201_600_123, {"temperature": 21.5, "on": True, "mode": "eco"}),
            Reading(1_764_201_600_124, {"temperature": 22}),
        ],
    )
    assert TelemetryEncoder().encode(telemetry) == (
        'telemetry,device_id=boiler-1 temperature=21.5,on=true,mode="eco" 1764201600123\n'
        "telemetry,device_id=boiler-1 temperature=22.0 1764201600124\n"
    )


def test_readings_without_values_give_no_line() -> None:
    telemetry = Telemetry(device_id="d", received_at=1, readings=[Reading(1, {})])
    assert TelemetryEncoder().encode(telemetry) == ""


def test_encoder_escapes_device_ids_and_metric_names_the_same_way_when_cached() -> None:
    encoder = TelemetryEncoder()
    telemetry = Telemetry(
        device_id="a b", received_at=1, readings=[Reading(5, {"x,y": 1.5, "z=": "q"})]
    )
    first = encoder.encode(telemetry)
    assert first == 'telemetry,device_id=a\\ b x\\,y=1.5,z\\=="q" 5\n'
    assert encoder.encode(telemetry) == first


def test_encoder_refuses_a_non_finite_value() -> None:
    telemetry = Telemetry(device_id="d", received_at=1, readings=[Reading(1, {"x": float("nan")})])
    with pytest.raises(LineProtocolError):
        TelemetryEncoder().encode(telemetry)
