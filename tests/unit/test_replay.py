"""The replay framework's pure parts: the progress line, digests, the projection registry."""

from __future__ import annotations

import io
from typing import Any

import pytest

from infra.replay import Progress, ReplayContext, ReplayError, digest
from infra.settings import load
from iot.replay import REPLAYERS, load_replayer


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_shows_count_rate_and_eta_of_a_phase() -> None:
    clock = Clock()
    progress = Progress(io.StringIO(), clock=clock)
    progress.phase("views", 1_000, unit="events")
    clock.now += 2.0
    progress.advance(250)
    assert progress.render(clock.now) == (
        "views                  [######                  ]  25% 250/1,000 events 125/s ETA 0:00:06"
    )


def test_progress_without_a_total_shows_count_rate_and_elapsed_time() -> None:
    clock = Clock()
    progress = Progress(io.StringIO(), clock=clock)
    progress.phase("auth", None)
    clock.now += 4.0
    progress.advance(100)
    assert progress.render(clock.now) == "auth                   100 events 25/s 0:00:04"


def test_progress_redraws_in_place_on_a_terminal_and_writes_lines_elsewhere() -> None:
    clock = Clock()
    tty = Terminal()
    progress = Progress(tty, clock=clock)
    progress.phase("views", 10)
    for _ in range(3):
        clock.now += 1.0
        progress.advance(1)
    progress.note("switched")
    assert tty.getvalue().count("\r\x1b[2K") == 3
    assert tty.getvalue().endswith("\nswitched\n")

    log = io.StringIO()
    progress = Progress(log, clock=clock)  # every 5 s
    progress.phase("views", 12)
    for _ in range(12):
        clock.now += 1.0
        progress.advance(1)
    lines = log.getvalue().splitlines()
    assert [line.split("] ")[1].split(" events")[0].strip() for line in lines] == [
        "8% 1/12",
        "50% 6/12",
        "92% 11/12",
    ]
    assert "\r" not in log.getvalue()


def test_a_disabled_progress_prints_nothing() -> None:
    out = io.StringIO()
    progress = Progress(out, enabled=False)
    progress.phase("views", 10)
    progress.advance(10)
    progress.note("x")
    progress.finish()
    assert out.getvalue() == ""


def test_digest_is_independent_of_field_order_and_sees_every_byte() -> None:
    a = {b"doc": b"{}", b"version": b"3"}
    assert digest(a) == digest(dict(reversed(list(a.items()))))
    assert digest(a) != digest({b"doc": b"{}", b"version": b"4"})
    assert digest({b"ab": b"c"}) != digest({b"a": b"bc"})  # lengths are part of it
    assert digest({"doc": "{}", "version": "3"}) == digest(a)


def test_an_unknown_projection_is_refused_with_the_known_ones() -> None:
    context: Any = ReplayContext(load({}), nc=None)  # type: ignore[arg-type]
    with pytest.raises(ReplayError, match="no projection named 'nope'; choose one of views"):
        load_replayer("nope", context)
    assert set(REPLAYERS) == {"views", "timeseries", "auth", "analytics"}
