"""Unit tests of the gateway's pure parts: query building, bounds, cursors, delta, view shapes."""

from __future__ import annotations

import json

import pytest
from starlette.requests import Request

from gateway.api import parse_after, parse_labels, parse_limit, parse_metrics
from gateway.telemetry import (
    MAX_POINTS,
    TelemetryQuery,
    TooManyPoints,
    buckets,
    build_influxql,
    quote_ident,
    quote_string,
    series_from_rows,
    suggest_every,
)
from gateway.views import (
    decode_cursor,
    delta,
    device_view,
    encode_cursor,
    in_sync,
    readings_last_minute,
)
from infra.httpkit import Problem, etag_matches
from infra.timefmt import format_duration, parse_duration, parse_time, rfc3339

T0 = 1_767_225_600_000  # 2026-01-01T00:00:00Z in epoch ms
HOUR = 3_600_000
DAY = 24 * HOUR


# --- durations and times ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "ms"),
    [("250ms", 250), ("10s", 10_000), ("1m", 60_000), ("2h", 7_200_000), ("1d", DAY)],
)
def test_durations_parse_to_milliseconds(text: str, ms: int) -> None:
    assert parse_duration(text) == ms


@pytest.mark.parametrize(
    "text", ["", "0s", "10", "1y", "-1m", "1.5m", "1m;DROP", " 1m", "9999999999w"]
)
def test_malformed_durations_are_refused(text: str) -> None:
    with pytest.raises(ValueError):
        parse_duration(text)


def test_durations_format_in_the_largest_exact_unit() -> None:
    assert format_duration(90_000) == "90s"
    assert format_duration(60_000) == "1m"
    assert format_duration(DAY) == "1d"
    assert format_duration(1_500) == "1500ms"


def test_times_parse_from_rfc3339_with_offset_or_epoch_ms() -> None:
    assert parse_time("2026-01-01T00:00:00Z") == T0
    assert parse_time("2026-01-01T01:00:00.250+01:00") == T0 + 250
    assert parse_time(str(T0)) == T0


@pytest.mark.parametrize(
    "text",
    ["2026-01-01T00:00:00", "yesterday", "1e9", "", "0001-01-01T00:00:00Z", "9" * 20],
)
def test_times_without_offset_or_malformed_are_refused(text: str) -> None:
    with pytest.raises(ValueError):
        parse_time(text)


def test_rfc3339_renders_utc_with_milliseconds() -> None:
    assert rfc3339(T0 + 5) == "2026-01-01T00:00:00.005Z"


# --- InfluxQL building -----------------------------------------------------------------------


def test_identifiers_and_strings_are_quoted_and_escaped() -> None:
    assert quote_ident('a"b\\c') == '"a\\"b\\\\c"'
    assert quote_string("x' OR '1'='1") == "'x\\' OR \\'1\\'=\\'1'"


def test_raw_query_selects_named_fields_of_one_device_in_range_with_limit() -> None:
    q = TelemetryQuery("dev-1", T0, T0 + HOUR, ("temp", "hum.rel"))
    assert build_influxql(q) == (
        'SELECT "temp"::field AS "temp", "hum.rel"::field AS "hum.rel" FROM "telemetry" '
        f"WHERE \"device_id\"::tag = 'dev-1' AND time >= {T0}ms AND time < {T0 + HOUR}ms "
        f"ORDER BY time ASC LIMIT {MAX_POINTS + 1}"
    )


def test_raw_query_without_metrics_selects_every_field_not_tags() -> None:
    statement = build_influxql(TelemetryQuery("dev-1", T0, T0 + HOUR))
    assert statement.startswith('SELECT *::field FROM "telemetry"')


def test_downsampled_query_groups_by_interval_with_the_aggregate() -> None:
    q = TelemetryQuery("dev-1", T0, T0 + HOUR, ("temp",), every_ms=60_000, agg="max")
    statement = build_influxql(q)
    assert statement.startswith('SELECT max("temp"::field) AS "temp" FROM "telemetry"')
    assert statement.endswith("GROUP BY time(60000ms) fill(none)")


def test_downsampled_query_without_metrics_uses_the_wildcard() -> None:
    q = TelemetryQuery("dev-1", T0, T0 + HOUR, every_ms=60_000, agg="count")
    assert build_influxql(q).startswith('SELECT count(*) FROM "telemetry"')


def test_a_hostile_device_id_stays_inside_the_string_literal() -> None:
    statement = build_influxql(TelemetryQuery("x' OR 1=1 --", T0, T0 + 1))
    assert "'x\\' OR 1=1 --'" in statement


def test_an_unknown_aggregate_is_refused() -> None:
    with pytest.raises(ValueError):
        build_influxql(TelemetryQuery("d", T0, T0 + 1, every_ms=1000, agg="sum; DROP"))


# --- the point bound ---------------------------------------------------------------------------


def test_buckets_count_epoch_aligned_intervals_meeting_the_range() -> None:
    assert buckets(T0, T0 + HOUR, 60_000) == 60
    assert buckets(T0 + 30_000, T0 + 90_000, 60_000) == 2
    assert buckets(T0, T0 + 1, 60_000) == 1
    assert buckets(T0, T0, 60_000) == 0


def test_estimated_points_multiply_intervals_by_metrics() -> None:
    q = TelemetryQuery("d", T0, T0 + DAY, ("a", "b"), every_ms=1000, agg="mean")
    assert q.estimated_points(known_metrics=7) == 2 * 86_400
    unnamed = TelemetryQuery("d", T0, T0 + DAY, every_ms=60_000, agg="mean")
    assert unnamed.estimated_points(known_metrics=3) == 3 * 1_440
    assert unnamed.estimated_points(known_metrics=0) == 1_440


def test_suggested_every_is_the_smallest_round_interval_that_fits() -> None:
    assert suggest_every(T0, T0 + DAY, 1) == "10s"  # 8640 intervals
    assert suggest_every(T0, T0 + DAY, 2) == "30s"  # 15s would be 5760 x 2
    assert suggest_every(T0, T0 + HOUR, 1) == "1s"
    every = suggest_every(T0, T0 + 1000 * 365 * DAY, 5)
    assert buckets(T0, T0 + 1000 * 365 * DAY, parse_duration(every)) * 5 <= MAX_POINTS


def test_rows_become_per_metric_series_without_nulls() -> None:
    q = TelemetryQuery("d", T0, T0 + HOUR)
    series = series_from_rows(
        q, ["time", "hum", "temp"], [[T0, None, 1.5], [T0 + 1, 40.0, None], [T0 + 2, None, 2.0]]
    )
    assert series == {"temp": [[T0, 1.5], [T0 + 2, 2.0]], "hum": [[T0 + 1, 40.0]]}


def test_named_metrics_without_data_are_empty_series() -> None:
    q = TelemetryQuery("d", T0, T0 + HOUR, ("temp", "ghost"))
    assert series_from_rows(q, ["time", "temp"], [[T0, 1.0]]) == {
        "temp": [[T0, 1.0]],
        "ghost": [],
    }


def test_wildcard_aggregate_columns_lose_their_prefix() -> None:
    q = TelemetryQuery("d", T0, T0 + HOUR, every_ms=60_000, agg="mean")
    series = series_from_rows(q, ["time", "mean_temp", "mean_mean_x"], [[T0, 1.0, 2.0]])
    assert series == {"temp": [[T0, 1.0]], "mean_x": [[T0, 2.0]]}


def test_more_points_than_the_bound_are_refused() -> None:
    q = TelemetryQuery("d", T0, T0 + HOUR)
    rows = [[T0 + i, 1.0, 2.0] for i in range(6)]
    with pytest.raises(TooManyPoints):
        series_from_rows(q, ["time", "a", "b"], rows, max_points=10)
    with pytest.raises(TooManyPoints):
        series_from_rows(q, ["time", "a"], [[T0 + i, 1.0] for i in range(11)], max_points=10)
    assert len(series_from_rows(q, ["time", "a", "b"], rows[:5], max_points=10)["a"]) == 5


# --- cursors, parameters, ETags -----------------------------------------------------------------


def test_cursor_round_trips_a_device_id_opaquely() -> None:
    cursor = encode_cursor("dev-42_x")
    assert "dev" not in cursor
    assert "=" not in cursor
    assert decode_cursor(cursor) == "dev-42_x"


@pytest.mark.parametrize("cursor", ["!!!", encode_cursor("a b"), "//8", ""])
def test_foreign_cursors_are_refused(cursor: str) -> None:
    with pytest.raises(ValueError):
        decode_cursor(cursor)


def test_limit_defaults_to_50_and_is_refused_beyond_500() -> None:
    assert parse_limit(None) == 50
    assert parse_limit("500") == 500
    for bad in ("0", "501", "-1", "ten"):
        with pytest.raises(Problem) as caught:
            parse_limit(bad)
        assert caught.value.status == 422


def test_labels_split_at_the_first_colon() -> None:
    assert parse_labels(["site:north", "url:http://x"]) == [("site", "north"), ("url", "http://x")]
    for bad in ("nocolon", "bad key:v", ":v"):
        with pytest.raises(Problem):
            parse_labels([bad])


def test_metrics_may_repeat_or_be_comma_separated_and_are_validated() -> None:
    assert parse_metrics(["temp,hum", "temp", "a.b-c_d"]) == ("temp", "hum", "a.b-c_d")
    for bad in ('te"mp', "a b", "x" * 65, ""):
        with pytest.raises(Problem):
            parse_metrics([bad])


def test_if_none_match_compares_weakly_and_accepts_lists_and_star() -> None:
    assert etag_matches('"abc"', '"abc"')
    assert etag_matches('W/"abc"', '"abc"')
    assert etag_matches('"x", "abc"', '"abc"')
    assert etag_matches("*", '"abc"')
    assert not etag_matches('"abd"', '"abc"')
    assert not etag_matches("", '"abc"')


# --- delta and view shapes -----------------------------------------------------------------------


def test_delta_holds_desired_values_missing_or_different_in_reported() -> None:
    desired = {"setpoint": 21.5, "mode": "eco", "fan": True, "same": 3}
    reported = {"setpoint": 20.0, "fan": True, "same": 3.0, "extra": 1}
    assert delta(desired, reported) == {"setpoint": 21.5, "mode": "eco"}


def test_delta_without_reported_state_is_all_of_desired() -> None:
    assert delta({"a": 1}, None) == {"a": 1}
    assert delta({}, None) == {}


def test_delta_tells_booleans_from_numbers_and_compares_nested_objects() -> None:
    assert delta({"on": True}, {"on": 1}) == {"on": True}
    desired = {"net": {"ssid": "x", "channel": 6}, "list": [1, 2]}
    reported = {"net": {"ssid": "x", "channel": 11}, "list": [1, 2]}
    assert delta(desired, reported) == {"net": {"channel": 6}}


def test_device_view_is_built_from_the_hash_layout() -> None:
    doc = {
        "device_id": "dev-1",
        "name": "Boiler",
        "type": "thermostat",
        "labels": {"site": "north"},
        "status": "active",
        "registered_at": "2026-01-01T00:00:00Z",
        "updated_at": "2026-01-01T00:01:00Z",
        "desired": {"version": 2, "config": {"setpoint": 21}},
    }
    view = device_view(
        {
            "version": "3",
            "doc": json.dumps(doc),
            "online": "1",
            "last_seen": str(T0),
            "m:temp": json.dumps({"ts": T0, "value": 20.5}),
            "reported": json.dumps({"setpoint": 19}),
            "reported_at": str(T0),
            "reported_config_version": "1",
        }
    )
    assert view is not None
    assert view["desired"] == {"version": 2, "config": {"setpoint": 21}}
    assert view["delta"] == {"setpoint": 21}
    assert view["reported_config_version"] == 1
    assert view["reported_at"] == "2026-01-01T00:00:00.000Z"
    assert view["in_sync"] is False
    assert view["online"] is True
    assert view["last_seen"] == "2026-01-01T00:00:00.000Z"
    assert view["metrics"] == {"temp": {"value": 20.5, "ts": "2026-01-01T00:00:00.000Z"}}
    assert view["pending_commands"] == []
    assert view["recent_commands"] == []
    assert view["reported"] == {"setpoint": 19}


def test_device_view_shows_the_stored_pending_and_recent_commands() -> None:
    pending = [{"command_id": "c2", "name": "reboot", "args": {}, "state": "sent"}]
    recent = [{"command_id": "c1", "name": "ping", "state": "acknowledged", "result": {}}]
    view = device_view(
        {
            "doc": json.dumps({"device_id": "d", "desired": {"version": 0, "config": {}}}),
            "commands": json.dumps({"pending": pending, "recent": recent}),
        }
    )
    assert view is not None
    assert view["pending_commands"] == pending
    assert view["recent_commands"] == recent
    assert view["in_sync"] is True  # nothing desired, nothing reported


def test_in_sync_needs_an_empty_delta_and_the_desired_version_reported() -> None:
    assert in_sync(3, 3, {})
    assert not in_sync(3, 2, {})  # state matches, but the device has not confirmed version 3
    assert not in_sync(3, 3, {"a": 1})
    assert not in_sync(3, None, {})
    assert in_sync(0, None, {})
    assert not in_sync(0, None, {"a": 1})


def test_device_view_without_doc_is_none_and_without_reported_has_null() -> None:
    assert device_view({"online": "1"}) is None
    view = device_view({"doc": json.dumps({"device_id": "d", "desired": {"version": 0}})})
    assert view is not None
    assert view["reported"] is None
    assert view["reported_config_version"] is None
    assert view["reported_at"] is None
    assert view["online"] is False
    assert view["last_seen"] is None


def test_readings_last_minute_weights_the_previous_minute_by_its_overlap() -> None:
    assert readings_last_minute(current=10, previous=60, now_s=60 * 1000 + 15) == 10 + 45
    assert readings_last_minute(current=10, previous=60, now_s=60 * 1000) == 70


# --- consistency token -----------------------------------------------------------------------


def request_with(query: str = "", after_header: str | None = None) -> Request:
    headers = [] if after_header is None else [(b"iot-after", after_header.encode())]
    return Request({"type": "http", "query_string": query.encode(), "headers": headers})


def test_after_comes_from_the_query_or_the_header_and_the_larger_wins() -> None:
    assert parse_after(request_with()) is None
    assert parse_after(request_with("after=12")) == 12
    assert parse_after(request_with(after_header=" 7 ")) == 7
    assert parse_after(request_with("after=3", after_header="9")) == 9
    assert parse_after(request_with("after=0")) == 0


@pytest.mark.parametrize("raw", ["x", "-1", "1.0", "", "3a", "0x10", "9" * 20])
def test_malformed_after_is_a_400_problem(raw: str) -> None:
    for request in (request_with(f"after={raw}"), request_with(after_header=raw)):
        with pytest.raises(Problem) as caught:
            parse_after(request)
        assert caught.value.status == 400


def test_device_view_lists_open_alerts_oldest_first_with_device_times_as_rfc3339() -> None:
    def alert(alert_id: str, raised_at_ms: int, status: str) -> dict[str, object]:
        return {
            "alert_id": alert_id,
            "rule_id": alert_id.split(".")[1],
            "severity": "critical",
            "metric": "t",
            "status": status,
            "raised_value": 91.0,
            "raised_at_ms": raised_at_ms,
            "retriggers": 2,
            "last_value": 95.0,
            "acknowledged_by": None,
            "acknowledged_at": None,
            "note": None,
        }

    doc = {
        "device_id": "d",
        "desired": {"version": 0, "config": {}},
        "alerts": {
            "d.b.2000": alert("d.b.2000", 2000, "acknowledged"),
            "d.a.1000": alert("d.a.1000", 1000, "active"),
        },
    }
    view = device_view({"doc": json.dumps(doc)})
    assert view is not None
    assert [a["alert_id"] for a in view["alerts"]] == ["d.a.1000", "d.b.2000"]
    assert view["alerts"][0]["raised_at"] == "1970-01-01T00:00:01.000Z"
    assert view["alerts"][0]["retriggers"] == 2
    assert device_view({"doc": json.dumps({"device_id": "d"})})["alerts"] == []  # type: ignore[index]
