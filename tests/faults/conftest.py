"""The fault suite: each test breaks a private server of its own and checks that nothing is lost.

Every test here is marked `faults` (it starts whole processes and a private server). The long
cases are marked `chaos` as well and run only with `--chaos` (`make chaos`); without it they are
deselected, not skipped, so CI's short run says how many it ran. Each test records a row of the
table printed at the end of the run through the `fault_report` fixture.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

COLUMNS = (
    ("case", "case"),
    ("server", "server"),
    ("fault", "fault"),
    ("outage_s", "outage s"),
    ("recovery_s", "recovery s"),
    ("readings", "readings"),
    ("stored", "stored once"),
    ("lost", "lost"),
    ("duplicated", "dup"),
    ("commands", "commands"),
    ("notes", "notes"),
)
_ROWS: list[dict[str, Any]] = []


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--chaos",
        action="store_true",
        default=False,
        help="also run the fault suite's long cases (marked chaos): make chaos",
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/faults/" in item.nodeid:
            item.add_marker(pytest.mark.faults)
    if config.getoption("--chaos"):
        return
    long = [item for item in items if item.get_closest_marker("chaos")]
    if long:
        config.hook.pytest_deselected(items=long)
        items[:] = [item for item in items if not item.get_closest_marker("chaos")]


@dataclass
class FaultReport:
    """One row of the printed table: what was broken, how long recovery took, what arrived."""

    case: str
    values: dict[str, Any] = field(default_factory=dict)
    started: float = field(default_factory=time.monotonic)

    def row(self, **values: Any) -> None:
        unknown = set(values) - {key for key, _ in COLUMNS}
        if unknown:
            raise KeyError(f"no such column: {sorted(unknown)}")
        self.values.update(values)


@pytest.fixture
def fault_report(request: pytest.FixtureRequest) -> Iterator[FaultReport]:
    report = FaultReport(request.node.name)
    yield report
    if report.values:
        _ROWS.append({"case": report.case, **report.values})


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.1f}"
    return str(value)


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not _ROWS:
        return
    header = [title for _, title in COLUMNS]
    rows = [[_cell(row.get(key)) for key, _ in COLUMNS] for row in _ROWS]
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    terminalreporter.section("fault suite")
    terminalreporter.write_line("  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)))
    terminalreporter.write_line("  ".join("-" * w for w in widths))
    for row in rows:
        terminalreporter.write_line("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)))
