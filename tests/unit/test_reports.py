"""The pure parts of fleet reports: uptime from connectivity changes, statistics, CSV cells."""

from __future__ import annotations

import csv
import io
from typing import Any

import pytest

from gateway.report_html import bar_chart, render_csv, render_html
from gateway.reports import (
    MAX_PERIOD_MS,
    DeviceRow,
    ReportQuery,
    ReportRefused,
    alert_stats,
    alerts_complete,
    influxql,
    metric_stats,
    online_time,
    report_doc,
)
from infra.views import CLEARED_ALERTS_KEPT


def test_online_time_starts_from_the_last_change_before_the_window() -> None:
    before = [("3:1", 50.0), ("2:0", 40.0)]
    assert online_time(before, [], 100, 200) == 100
    assert online_time([("4:0", 90.0)], [("5:1", 150.0)], 100, 200) == 50
    assert online_time([], [("2:1", 120.0), ("3:0", 130.0)], 100, 200) == 10  # offline before


def test_changes_at_one_instant_apply_in_version_order() -> None:
    # same millisecond: version 11 (offline) comes after version 9 (online), whatever the text
    assert online_time([], [("11:0", 150.0), ("9:1", 150.0)], 100, 200) == 0
    assert online_time([("10:1", 50.0), ("9:0", 50.0)], [], 100, 200) == 100


def test_metric_stats_from_an_aggregate_row() -> None:
    columns = ["time", "count_t", "count_on", "count_s", "min_t", "min_on", "mean_t", "max_t"]
    stats = metric_stats(columns, [0, 4, 2, 1, -1.5, False, 2.5, 9, None])
    assert stats["t"].doc() == {"count": 4, "min": -1.5, "mean": 2.5, "max": 9}
    assert stats["on"].doc() == {"count": 2, "min": False, "mean": None, "max": None}
    assert stats["s"].doc() == {"count": 1, "min": None, "mean": None, "max": None}
    row = DeviceRow("d1", "n", "t", "active", {}, metrics=stats)
    other = DeviceRow("d2", "n", "t", "active", {}, metrics=metric_stats(columns[:2], [0, 1]))
    other.metrics["t"].total, other.metrics["t"].numeric = 10.0, 1  # mean 10 of one value
    doc = report_doc([row, other], ReportQuery(0, 10, 10))
    assert doc["totals"]["metrics"]["t"]["mean"] == (2.5 * 4 + 10) / 5


def test_alert_stats_count_each_transition_by_its_own_time() -> None:
    alerts = [
        {"raised_at_ms": 50, "cleared_at_ms": 150, "severity": "warning"},  # cleared only
        {
            "raised_at_ms": 110,
            "acknowledged_at": "1970-01-01T00:00:00.130Z",
            "cleared_at_ms": 250,  # after the window
            "severity": "critical",
        },
    ]
    stats = alert_stats(alerts, 100, 200).doc()
    assert (stats["raised"], stats["acknowledged"], stats["cleared"]) == (1, 1, 1)
    assert stats["raised_by_severity"] == {"critical": 1, "warning": 0, "info": 0}
    assert stats["mean_time_to_acknowledge_s"] == 0.02
    assert stats["mean_time_to_clear_s"] == 0.1


def test_alerts_are_complete_unless_the_views_dropped_clears_after_the_start() -> None:
    assert alerts_complete([], CLEARED_ALERTS_KEPT - 1, 100)
    assert alerts_complete(
        [{"cleared_at_ms": 90}, {"cleared_at_ms": 300}], CLEARED_ALERTS_KEPT, 100
    )
    assert not alerts_complete([{"cleared_at_ms": 120}], CLEARED_ALERTS_KEPT, 100)


@pytest.mark.parametrize(
    ("start", "end", "now", "field"),
    [(10, 10, 20, "from"), (30, 40, 20, "from"), (0, MAX_PERIOD_MS + 1, 10, "to")],
)
def test_refused_periods(start: int, end: int, now: int, field: str) -> None:
    with pytest.raises(ReportRefused) as refused:
        ReportQuery(start, end, now).check()
    assert refused.value.field == field


def test_influxql_quotes_every_device_id() -> None:
    statement = influxql(["a'b", "c"], 0, 10)
    assert "\"device_id\"::tag = 'a\\'b' OR \"device_id\"::tag = 'c'" in statement
    assert statement.endswith('GROUP BY "device_id"')


def report_with(name: str, labels: dict[str, str]) -> dict[str, Any]:
    row = DeviceRow("d1", name, "<t>", "active", labels, online_ms=5)
    return report_doc([row], ReportQuery(0, 10, 10))


def test_csv_cells_a_spreadsheet_would_run_get_an_apostrophe() -> None:
    text = render_csv(report_with("=HYPERLINK(1)", {"a": "b"}))
    header, row = list(csv.reader(io.StringIO(text)))
    cells = dict(zip(header, row, strict=True))
    assert cells["name"] == "'=HYPERLINK(1)"
    assert (cells["labels"], cells["uptime"], cells["history_complete"]) == ("a=b", "0.5", "true")


def test_html_escapes_names_labels_and_chart_labels() -> None:
    page = render_html(report_with("<script>x</script>", {"k": '"><img>'}), "now")
    assert "<script>" not in page
    assert "<img>" not in page
    assert "&lt;script&gt;x&lt;/script&gt;" in page
    svg = bar_chart("<t>", [("<a>", 1.0, "#000")], 1.0, "")
    assert "<a>" not in svg
    assert "&lt;a&gt;" in svg
