"""Rollup statements, retention settings and InfluxDB durations, without a server."""

from __future__ import annotations

import pytest

from domain.ingest import Reading
from gateway.aggregates import (
    Acc,
    AggregateRefused,
    Generation,
    choose_level,
    parse_group_by,
    segments,
)
from infra.rollups import HOUR, MINUTE, duration_ms, rollup_policies
from infra.settings import SettingsError, load
from projections.rollups import DEVICES_PER_STATEMENT, Statements, Touched

T0 = 1_767_225_600_000  # 2026-01-01T00:00:00Z
DAY = 86_400_000


def test_retention_defaults_and_validation() -> None:
    settings = load({})
    assert (settings.retention_raw, settings.retention_1m, settings.retention_1h) == (
        "INF",
        "90d",
        "1095d",
    )
    assert load({"IOT_RETENTION_RAW": "30d", "IOT_RETENTION_1H": "inf"}).retention_1h == "INF"
    assert load({"IOT_RETENTION_1M": "1d12h"}).retention_1m == "1d12h"
    for bad in ("30", "30 days", "-1d", "1y", "30m"):
        with pytest.raises(SettingsError, match="IOT_RETENTION_RAW"):
            load({"IOT_RETENTION_RAW": bad})


def test_durations_as_influxdb_prints_them() -> None:
    assert duration_ms("30d") == 30 * 86_400_000
    assert duration_ms("720h0m0s") == 30 * 86_400_000
    assert duration_ms("0s") is None
    assert duration_ms("INF") is None
    with pytest.raises(ValueError):
        duration_ms("soon")
    assert rollup_policies("autogen") == ("autogen_1m", "autogen_1h")


def test_touched_windows_and_metric_kinds() -> None:
    touched = Touched()
    touched.add("d1", [Reading(T0 + 1, {"t": 1.0}), Reading(T0 + 999, {"s": "x"})])
    touched.add("d2", [Reading(T0 + 1_000, {"t": 2, "on": True}), Reading(T0 + 5, {})])
    assert touched.partials == {T0: {"d1"}, T0 + 1_000: {"d2"}}
    assert touched.numeric == {"t": True, "s": False, "on": False}


def test_statements_recompute_each_level_over_adjacent_windows() -> None:
    touched = Touched()
    touched.add("d1", [Reading(T0 + 1, {"t": 1.0}), Reading(T0 + 5_500, {"t": 2.0})])
    touched.add("d'2", [Reading(T0 + 2 * HOUR.ms, {"t": 3.0})])  # a late reading elsewhere
    partials, partials2, minute, minute2, hour = Statements("db", "autogen").for_touched(touched)
    assert f"time >= {T0}ms AND time < {T0 + 6_000}ms" in partials  # 5 s apart: one run
    assert "\"device_id\" = 'd1'" in partials
    assert "d\\'2" not in partials
    assert 'INTO "db"."autogen"."telemetry_1s" FROM "db"."autogen".telemetry' in partials
    assert "d\\'2" in partials2
    assert f"time >= {T0}ms AND time < {T0 + MINUTE.ms}ms" in minute
    assert 'INTO "db"."autogen_1m"."telemetry_1m" FROM "db"."autogen"."telemetry_1s"' in minute
    assert 'sum("sum_t") / sum("count_t") AS "mean_t"' in minute
    assert "GROUP BY time(60000ms), *" in minute
    assert 'INTO "db"."autogen_1h"."telemetry_1h" FROM "db"."autogen_1m"."telemetry_1m"' in hour
    assert f"time >= {T0 + 2 * HOUR.ms}ms AND time < {T0 + 2 * HOUR.ms + MINUTE.ms}ms" in minute2
    # two hours apart: one statement for the hours between too
    assert f"time >= {T0}ms AND time < {T0 + 3 * HOUR.ms}ms" in hour


def test_statements_always_name_their_devices_a_thousand_at_most() -> None:
    touched = Touched()
    for d in range(DEVICES_PER_STATEMENT + 1):
        touched.add(f"d{d}", [Reading(T0 + d, {"mode": "x"})])
    statements = Statements("db", "r1").for_touched(touched)
    assert len(statements) == 6  # two of each level
    assert all("device_id" in statement for statement in statements)
    for d in (0, 500, DEVICES_PER_STATEMENT):  # each device in one statement of a level
        assert sum(f"'d{d}'" in statement for statement in statements[:2]) == 1
    assert '"min_mode"' not in statements[2]
    assert 'last("last_mode")' in statements[2]


def test_the_gateway_answers_long_ranges_from_the_coarsest_rollups_that_cover_them() -> None:
    gen = Generation("autogen", {"autogen": None, "autogen_1m": 90 * DAY, "autogen_1h": None})
    now = T0 + 400 * DAY
    week = (now - 7 * DAY, now)
    assert choose_level(*week, HOUR.ms, now, gen) is HOUR
    assert choose_level(*week, 2 * HOUR.ms, now, gen) is HOUR
    assert choose_level(*week, 30 * MINUTE.ms, now, gen) is MINUTE
    assert choose_level(*week, 90_000, now, gen) is None  # 90 s: no rollup fits
    assert choose_level(now - 6 * HOUR.ms, now, HOUR.ms, now, gen) is None  # short: raw
    year = (now - 365 * DAY, now)
    assert choose_level(*year, 30 * MINUTE.ms, now, gen) is None  # older than the 1m rollups
    assert choose_level(*year, HOUR.ms, now, gen) is HOUR
    short_raw = Generation("r1", {"r1": DAY, "r1_1m": 90 * DAY, "r1_1h": None})
    assert choose_level(now - 2 * DAY, now - 2 * DAY + HOUR.ms, HOUR.ms, now, short_raw) is HOUR
    assert choose_level(*week, HOUR.ms, now, Generation("autogen", {"autogen": None})) is None


def test_segments_cut_a_range_into_whole_windows_and_finer_edges() -> None:
    start, end = T0 + 90 * MINUTE.ms + 1_500, T0 + 5 * HOUR.ms + 2 * MINUTE.ms + 7
    assert segments(start, end, [HOUR, MINUTE]) == [
        (None, start, T0 + 91 * MINUTE.ms),
        (MINUTE, T0 + 91 * MINUTE.ms, T0 + 2 * HOUR.ms),
        (HOUR, T0 + 2 * HOUR.ms, T0 + 5 * HOUR.ms),
        (MINUTE, T0 + 5 * HOUR.ms, T0 + 5 * HOUR.ms + 2 * MINUTE.ms),
        (None, T0 + 5 * HOUR.ms + 2 * MINUTE.ms, end),
    ]
    assert segments(T0, T0 + 2 * HOUR.ms, [HOUR, MINUTE]) == [(HOUR, T0, T0 + 2 * HOUR.ms)]
    assert segments(T0 + 5, T0 + 50, [HOUR, MINUTE]) == [(None, T0 + 5, T0 + 50)]


def test_partial_aggregates_combine_as_the_raw_aggregation_would() -> None:
    first, second = Acc(), Acc()
    for kind, value in (("count", 2), ("sum", 3.0), ("min", 1.0), ("max", 2.0), ("last", 2.0)):
        first.add(kind, value)
    for kind, value in (("count", 1), ("sum", 10.0), ("min", 10.0), ("max", 10.0), ("last", 10)):
        second.add(kind, value)
    first.merge(second)
    assert (first.count, first.min, first.max, first.mean) == (3, 1.0, 10.0, 13.0 / 3)
    flag = Acc()
    flag.add("min", True)  # booleans have no min/max/mean in the rollups
    flag.add("count", 4)
    assert (flag.min, flag.value("count"), flag.value("mean")) == (None, 4, None)


def test_group_by_forms() -> None:
    assert parse_group_by("type") == ("type", None)
    assert parse_group_by("label:site") == ("label", "site")
    for bad in (None, "", "site", "label:", "labels:site", "label:a b"):
        with pytest.raises(AggregateRefused):
            parse_group_by(bad)
