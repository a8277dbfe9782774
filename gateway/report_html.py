"""The fleet report as a printable HTML page and as CSV, both from the report's JSON shape.

The page is self-contained: inline CSS (with print rules) and charts drawn server-side as
inline SVG, no script, nothing fetched at view time. Everything it prints from the report goes
through `html.escape` (device names, labels and metric names are user input). The CSV has a
header and one row per device; text cells that a spreadsheet would run as a formula get a
leading apostrophe.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Mapping, Sequence
from html import escape
from typing import Any

from infra.views import SEVERITIES

CHART_ROWS = 40  # devices a per-device chart shows (the table lists all)
BAR_W = 360
ROW_H = 16
SEVERITY_COLOURS = {"critical": "#c62828", "warning": "#ef8f00", "info": "#1565c0"}

STYLE = """
body { font: 13px system-ui, sans-serif; margin: 1.5rem; color: #222; }
h1 { font-size: 1.4rem; margin: 0 0 .3rem; } h2 { font-size: 1.1rem; margin: 1.2rem 0 .4rem; }
table { border-collapse: collapse; width: 100%; }
th, td { text-align: left; padding: .2rem .4rem; border-bottom: 1px solid #ddd; }
td.n, th.n { text-align: right; font-variant-numeric: tabular-nums; }
.totals td { font-weight: 600; } .muted { color: #666; } .charts { display: flex;
 flex-wrap: wrap; gap: 1.5rem; } figure { margin: 0; } figcaption { font-weight: 600; }
svg text { font: 11px system-ui, sans-serif; fill: #222; }
@media print {
  body { margin: 0; font-size: 10px; } a { color: inherit; text-decoration: none; }
  section, figure, tr { break-inside: avoid; } h2 { break-after: avoid; }
  @page { size: A4 landscape; margin: 12mm; }
}
"""


def _pct(value: Any) -> str:
    return "-" if value is None else f"{value * 100:.1f} %"


def _num(value: Any, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return escape(str(value))


def _duration(seconds: Any) -> str:
    if seconds is None:
        return "-"
    s = float(seconds)
    if s < 120:
        return f"{s:.0f} s"
    if s < 7200:
        return f"{s / 60:.1f} min"
    return f"{s / 3600:.1f} h"


def bar_chart(title: str, bars: Sequence[tuple[str, float, str]], maximum: float, unit: str) -> str:
    """A horizontal bar chart as inline SVG: (label, value, colour) per bar."""
    label_w = 150
    height = ROW_H * max(len(bars), 1) + 8
    width = label_w + BAR_W + 70
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" role="img" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}"><title>{escape(title)}</title>'
    ]
    for i, (label, value, colour) in enumerate(bars):
        y = 4 + i * ROW_H
        w = 0.0 if maximum <= 0 else max(0.0, min(1.0, value / maximum)) * BAR_W
        shown = label if len(label) <= 24 else label[:23] + "…"
        text = f"{value * 100:.1f} %" if unit == "%" else f"{value:g}"
        parts.append(
            f'<text x="{label_w - 4}" y="{y + 11}" text-anchor="end">{escape(shown)}</text>'
            f'<rect x="{label_w}" y="{y + 2}" width="{w:.1f}" height="{ROW_H - 4}" '
            f'fill="{colour}"><title>{escape(label)}: {escape(text)}</title></rect>'
            f'<text x="{label_w + w + 4:.1f}" y="{y + 11}">{escape(text)}</text>'
        )
    if not bars:
        parts.append(f'<text x="{label_w}" y="16" class="muted">no data</text>')
    parts.append("</svg>")
    return "".join(parts)


def _figure(caption: str, svg: str, note: str = "") -> str:
    extra = f' <span class="muted">{escape(note)}</span>' if note else ""
    return f"<figure><figcaption>{escape(caption)}{extra}</figcaption>{svg}</figure>"


def _label_text(labels: Mapping[str, str]) -> str:
    return ", ".join(f"{k}={v}" for k, v in sorted(labels.items()))


def render_html(report: Mapping[str, Any], generated_at: str) -> str:
    devices: list[dict[str, Any]] = report["devices"]
    totals: dict[str, Any] = report["totals"]
    shown = len(devices) > CHART_ROWS
    by_uptime = sorted(devices, key=lambda d: (d["uptime"] or 0.0, d["device_id"]))[:CHART_ROWS]
    uptime_svg = bar_chart(
        "Uptime per device",
        [(d["name"] or d["device_id"], d["uptime"] or 0.0, "#2e7d32") for d in by_uptime],
        1.0,
        "%",
    )
    by_readings = sorted(devices, key=lambda d: (-d["readings"], d["device_id"]))[:CHART_ROWS]
    readings_svg = bar_chart(
        "Readings per device",
        [(d["name"] or d["device_id"], float(d["readings"]), "#1565c0") for d in by_readings],
        float(max((d["readings"] for d in by_readings), default=0)),
        "",
    )
    severity = totals["alerts"]["raised_by_severity"]
    alerts_svg = bar_chart(
        "Alerts raised by severity",
        [(s, float(severity.get(s, 0)), SEVERITY_COLOURS[s]) for s in SEVERITIES],
        float(max(severity.values(), default=0)),
        "",
    )
    many = f"the {CHART_ROWS} lowest of {len(devices)}" if shown else ""
    top = f"the {CHART_ROWS} highest of {len(devices)}" if shown else ""
    charts = (
        '<section class="charts">'
        + _figure("Uptime per device", uptime_svg, many)
        + _figure("Readings per device", readings_svg, top)
        + _figure("Alerts raised by severity", alerts_svg)
        + "</section>"
    )
    alerts, commands = totals["alerts"], totals["commands"]
    summary = (
        "<table><tbody>"
        f"<tr><th>Devices</th><td class=n>{totals['devices']}</td>"
        f"<th>Uptime</th><td class=n>{_pct(totals['uptime'])}</td>"
        f"<th>Readings</th><td class=n>{totals['readings']}</td></tr>"
        f"<tr><th>Alerts raised / acknowledged / cleared</th><td class=n>{alerts['raised']} / "
        f"{alerts['acknowledged']} / {alerts['cleared']}</td>"
        f"<th>Mean time to acknowledge</th><td class=n>"
        f"{_duration(alerts['mean_time_to_acknowledge_s'])}</td>"
        f"<th>Mean time to clear</th><td class=n>{_duration(alerts['mean_time_to_clear_s'])}"
        "</td></tr>"
        f"<tr><th>Commands finished</th><td class=n>{commands['finished']}</td>"
        f"<th>Command success rate</th><td class=n>{_pct(commands['success_rate'])}</td>"
        f"<th>History complete</th><td>{'yes' if totals['history_complete'] else 'no'}</td>"
        "</tr></tbody></table>"
    )
    head = (
        "<tr><th>Device</th><th>Name</th><th>Type</th><th>Status</th><th>Labels</th>"
        "<th class=n>Uptime</th><th class=n>Readings</th><th class=n>Alerts r/a/c</th>"
        "<th class=n>MTTA</th><th class=n>MTTC</th><th class=n>Commands</th>"
        "<th class=n>Success</th></tr>"
    )
    body = []
    for d in devices:
        a, c = d["alerts"], d["commands"]
        body.append(
            f"<tr><td>{escape(d['device_id'])}</td><td>{escape(d['name'])}</td>"
            f"<td>{escape(d['type'])}</td><td>{escape(d['status'])}</td>"
            f"<td>{escape(_label_text(d['labels']))}</td><td class=n>{_pct(d['uptime'])}</td>"
            f"<td class=n>{d['readings']}</td>"
            f"<td class=n>{a['raised']}/{a['acknowledged']}/{a['cleared']}</td>"
            f"<td class=n>{_duration(a['mean_time_to_acknowledge_s'])}</td>"
            f"<td class=n>{_duration(a['mean_time_to_clear_s'])}</td>"
            f"<td class=n>{c['finished']}</td><td class=n>{_pct(c['success_rate'])}</td></tr>"
        )
    metric_rows = []
    for name, m in totals["metrics"].items():
        metric_rows.append(
            f"<tr><td>{escape(name)}</td><td class=n>{m['count']}</td>"
            f"<td class=n>{_num(m['min'])}</td><td class=n>{_num(m['mean'])}</td>"
            f"<td class=n>{_num(m['max'])}</td></tr>"
        )
    metrics_table = (
        "<table><thead><tr><th>Metric</th><th class=n>Values</th><th class=n>Min</th>"
        "<th class=n>Mean</th><th class=n>Max</th></tr></thead><tbody>"
        + ("".join(metric_rows) or '<tr><td colspan=5 class="muted">no readings</td></tr>')
        + "</tbody></table>"
    )
    notes = "".join(f"<li>{escape(n)}</li>" for n in report["notes"])
    period = f"{report['from']} to {report['to']}"
    return (
        '<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>Fleet report {escape(period)}</title>"
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<style>{STYLE}</style></head><body>"
        f"<h1>Fleet report</h1><p class=muted>{escape(period)} (observed to "
        f"{escape(report['observed_to'])}); generated {escape(generated_at)}</p>"
        f"<section><h2>Fleet</h2>{summary}</section>"
        f"<section><h2>Charts</h2>{charts}</section>"
        f"<section><h2>Metrics</h2>{metrics_table}</section>"
        f"<section><h2>Devices</h2><table><thead>{head}</thead><tbody>{''.join(body)}"
        "</tbody></table></section>"
        f'<section><h2>Notes</h2><ul class="muted">{notes}</ul></section>'
        "</body></html>\n"
    )


# -- CSV -------------------------------------------------------------------------------------

CSV_COLUMNS = (
    "device_id",
    "name",
    "type",
    "status",
    "labels",
    "uptime",
    "online_s",
    "readings",
    "alerts_raised",
    "alerts_acknowledged",
    "alerts_cleared",
    *(f"alerts_{s}" for s in SEVERITIES),
    "mean_time_to_acknowledge_s",
    "mean_time_to_clear_s",
    "commands_finished",
    "commands_acknowledged",
    "commands_failed",
    "commands_expired",
    "commands_cancelled",
    "command_success_rate",
    "history_complete",
)
_FORMULA = ("=", "+", "-", "@", "\t", "\r")


def _cell(value: Any) -> Any:
    if isinstance(value, str) and value.startswith(_FORMULA):
        return "'" + value
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    return value


def render_csv(report: Mapping[str, Any]) -> str:
    """A header, then one row per device; per metric `<metric>_count|min|mean|max` columns
    (the metrics of the whole fleet, in name order)."""
    metrics = list(report["totals"]["metrics"])
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\r\n")
    writer.writerow(
        [*CSV_COLUMNS, *(f"{m}_{agg}" for m in metrics for agg in ("count", "min", "mean", "max"))]
    )
    for d in report["devices"]:
        a, c = d["alerts"], d["commands"]
        row = [
            d["device_id"],
            d["name"],
            d["type"],
            d["status"],
            ";".join(f"{k}={v}" for k, v in sorted(d["labels"].items())),
            d["uptime"],
            d["online_s"],
            d["readings"],
            a["raised"],
            a["acknowledged"],
            a["cleared"],
            *(a["raised_by_severity"].get(s, 0) for s in SEVERITIES),
            a["mean_time_to_acknowledge_s"],
            a["mean_time_to_clear_s"],
            c["finished"],
            c["acknowledged"],
            c["failed"],
            c["expired"],
            c["cancelled"],
            c["success_rate"],
            d["history_complete"],
        ]
        for m in metrics:
            stats = d["metrics"].get(m) or {}
            row += [stats.get(agg) for agg in ("count", "min", "mean", "max")]
        writer.writerow([_cell(v) for v in row])
    return out.getvalue()


MEDIA_TYPES = {
    "json": "application/json",
    "csv": "text/csv; charset=utf-8",
    "html": "text/html; charset=utf-8",
}


def render(report: Mapping[str, Any], fmt: str, generated_at: str) -> bytes:
    """The report in `fmt` (json, csv or html) as bytes; its media type is MEDIA_TYPES[fmt]."""
    if fmt == "csv":
        return render_csv(report).encode()
    if fmt == "html":
        return render_html(report, generated_at).encode()
    import msgspec

    return msgspec.json.encode(report)
