"""`python -m bench [NAME ...]`: run the named benchmarks (all by default), print their figures."""

from __future__ import annotations

import argparse
import importlib
import sys
import time
from collections.abc import Sequence

from bench.registry import BENCHMARKS

# Each module registers its benchmarks on import; a new part of the benchmark goes here.
MODULES = (
    "bench.command_api",
    "bench.ingest",
    "bench.device_commands",
    "bench.replay",
    "bench.analytics",
    "bench.anomaly",
    "bench.rollups",
    "bench.history",
    "bench.durability",
)


def parser() -> argparse.ArgumentParser:
    for module in MODULES:
        importlib.import_module(module)
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    p.add_argument(
        "names",
        nargs="*",
        metavar="NAME",
        help=f"benchmarks to run: {', '.join(BENCHMARKS)} (default: all)",
    )
    p.add_argument("--repeats", type=int, default=3, help="measurements per benchmark (3)")
    p.add_argument("--list", action="store_true", help="list the benchmarks and exit")
    for benchmark in BENCHMARKS.values():
        benchmark.configure(p)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.list:
        for benchmark in BENCHMARKS.values():
            print(f"{benchmark.name}: {benchmark.summary}")
        return 0
    unknown = [n for n in args.names if n not in BENCHMARKS]
    if unknown:
        print(f"bench: unknown benchmark {unknown[0]!r}; known: {', '.join(BENCHMARKS)}")
        return 2
    for name in args.names or list(BENCHMARKS):
        started = time.monotonic()
        report = BENCHMARKS[name].run(args)
        print(report.render())
        print(f"({name}: {time.monotonic() - started:.0f} s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
