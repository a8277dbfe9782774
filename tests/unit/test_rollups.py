"""Rollup statements, retention settings and InfluxDB durations, without a server."""

from __future__ import annotations

import pytest

from domain.ingest import Reading
from infra.rollups import HOUR, MINUTE, duration_ms, rollup_policies
from infra.settings import SettingsError, load
from projections.rollups import DEVICES_PER_STATEMENT, Statements, Touched

T0 = 1_767_225_600_000  # 2026-01-01T00:00:00Z


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
    touched.add("d1", [Reading(T0 + 1, {"t": 1.0}), Reading(T0 + 9_999, {"s": "x"})])
    touched.add("d2", [Reading(T0 + 10_000, {"t": 2, "on": True}), Reading(T0 + 5, {})])
    assert touched.partials == {T0: {"d1"}, T0 + 10_000: {"d2"}}
    assert touched.numeric == {"t": True, "s": False, "on": False}


def test_statements_recompute_each_level_over_adjacent_windows() -> None:
    touched = Touched()
    touched.add("d1", [Reading(T0 + 1, {"t": 1.0}), Reading(T0 + 15_000, {"t": 2.0})])
    touched.add("d'2", [Reading(T0 + 2 * HOUR.ms, {"t": 3.0})])  # a late reading elsewhere
    partials, partials2, minute, minute2, hour, hour2 = Statements("db", "autogen").for_touched(
        touched
    )
    assert f"time >= {T0}ms AND time < {T0 + 20_000}ms" in partials
    assert "\"device_id\" = 'd1'" in partials
    assert "d\\'2" not in partials
    assert 'INTO "db"."autogen"."telemetry_10s" FROM "db"."autogen".telemetry' in partials
    assert "d\\'2" in partials2
    assert f"time >= {T0}ms AND time < {T0 + MINUTE.ms}ms" in minute
    assert 'INTO "db"."autogen_1m"."telemetry_1m" FROM "db"."autogen"."telemetry_10s"' in minute
    assert 'sum("sum_t") / sum("count_t") AS "mean_t"' in minute
    assert "GROUP BY time(60000ms), *" in minute
    assert 'INTO "db"."autogen_1h"."telemetry_1h" FROM "db"."autogen_1m"."telemetry_1m"' in hour
    assert f"time >= {T0 + 2 * HOUR.ms}ms AND time < {T0 + 3 * HOUR.ms}ms" in hour2
    assert minute2
    assert hour2


def test_many_devices_make_one_statement_for_the_whole_range() -> None:
    touched = Touched()
    for d in range(DEVICES_PER_STATEMENT + 1):
        touched.add(f"d{d}", [Reading(T0 + d, {"mode": "x"})])
    partials = Statements("db", "r1").for_touched(touched)[0]
    assert "device_id" not in partials
    minute = Statements("db", "r1").for_touched(touched)[1]
    assert '"min_mode"' not in minute
    assert 'last("last_mode")' in minute
