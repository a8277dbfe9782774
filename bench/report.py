"""A benchmark's result: one figure per line, a column per run and the median across runs."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field

from bench.stats import median


@dataclass
class Row:
    metric: str
    unit: str
    section: str = ""
    values: list[float] = field(default_factory=list)
    digits: int = 1


@dataclass
class Report:
    title: str
    rows: dict[str, Row] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    runs: int = 0
    section: str = ""  # the heading of the rows added next

    def add(self, run: int, metric: str, unit: str, value: float, digits: int = 1) -> None:
        """Record the figure of `metric` for run number `run` (0-based)."""
        row = self.rows.setdefault(metric, Row(metric, unit, self.section, digits=digits))
        while len(row.values) < run:
            row.values.append(math.nan)
        row.values.append(value)
        self.runs = max(self.runs, run + 1)

    def median(self, metric: str) -> float:
        row = self.rows.get(metric)
        return median(row.values) if row else math.nan

    def note(self, line: str) -> None:
        self.notes.append(line)

    def render(self) -> str:
        width = max([len(r.metric) for r in self.rows.values()] + [20])
        units = max([len(r.unit) for r in self.rows.values()] + [4])
        head = [f"{'run ' + str(i + 1):>10}" for i in range(self.runs)]
        lines = [
            f"== {self.title} ==",
            f"{'metric':<{width}}  {'unit':<{units}}{''.join(head)}{'median':>10}",
        ]
        section = ""
        for row in self.rows.values():
            if row.section != section:
                section = row.section
                lines.append(f"-- {section}")
            cells = [_fmt(v, row.digits) for v in _padded(row.values, self.runs)]
            cells.append(_fmt(median(row.values), row.digits))
            lines.append(
                f"{row.metric:<{width}}  {row.unit:<{units}}{''.join(f'{c:>10}' for c in cells)}"
            )
        lines.extend(self.notes)
        return "\n".join(lines)


def _padded(values: Iterable[float], runs: int) -> list[float]:
    out = list(values)
    return out + [math.nan] * (runs - len(out))


def _fmt(value: float, digits: int) -> str:
    if math.isnan(value):
        return "-"
    return f"{value:.{digits}f}"
