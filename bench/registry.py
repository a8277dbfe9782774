"""The registry of named benchmarks that `python -m bench NAME` runs."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass

from bench.report import Report

Runner = Callable[[argparse.Namespace], Report]
Configure = Callable[[argparse.ArgumentParser], None]


@dataclass(frozen=True)
class Benchmark:
    name: str
    summary: str
    run: Runner
    configure: Configure


BENCHMARKS: dict[str, Benchmark] = {}


def register(name: str, summary: str, configure: Configure) -> Callable[[Runner], Runner]:
    """Decorator adding a benchmark's runner to the registry under `name`."""

    def add(run: Runner) -> Runner:
        if name in BENCHMARKS:
            raise ValueError(f"benchmark {name!r} is registered twice")
        BENCHMARKS[name] = Benchmark(name, summary, run, configure)
        return run

    return add
