"""`iot report`: the fleet report (`gateway.reports`) over a period, written to a file.

It builds the report directly from the same stores the gateway reads (the Redis views and
InfluxDB, with the namespace's settings), with the same code as
`GET /api/v1/reports/fleet`: no gateway and no API token needed, so a CronJob can run it beside
the stores. The file is written to a temporary name and renamed into place, so a reader never
sees half a report.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from pathlib import Path
from typing import TextIO

import httpx
from redis.asyncio import Redis

from gateway.influx import InfluxError, InfluxQL
from gateway.report_html import render
from gateway.reports import FORMATS, ReportBuilder, ReportQuery, ReportRefused
from gateway.views import ViewReader
from infra.settings import Settings
from infra.timefmt import parse_time, rfc3339


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    report = sub.add_parser(
        "report",
        help="write the fleet report over [--from, --to) to a file (html, csv or json)",
    )
    report.add_argument(
        "--from", dest="start", required=True, help="RFC 3339 time or date, or epoch ms"
    )
    report.add_argument(
        "--to", dest="end", required=True, help="RFC 3339 time or date, or epoch ms"
    )
    report.add_argument("--out", required=True, help="the file to write ('-': standard output)")
    report.add_argument(
        "--format", choices=FORMATS, help="default: from the file's extension, else html"
    )


def parse_moment(text: str) -> int:
    """parse_time, also accepting a bare date (`2026-01-31`: its midnight UTC)."""
    if len(text) == 10 and text[4] == "-" and text[7] == "-":
        text += "T00:00:00Z"
    return parse_time(text)


def report_format(args: argparse.Namespace) -> str:
    if args.format:
        return str(args.format)
    suffix = Path(args.out).suffix.lstrip(".").lower()
    return suffix if suffix in FORMATS else "html"


async def build(settings: Settings, query: ReportQuery, fmt: str) -> bytes:
    redis = Redis.from_url(settings.redis_url, decode_responses=True, socket_timeout=30)
    try:
        async with httpx.AsyncClient(timeout=httpx.Timeout(120.0, connect=5.0)) as http:
            influx = InfluxQL(http, settings.influx_url, settings.influx_db)
            builder = ReportBuilder(ViewReader(redis, settings.namespace), redis, influx)
            report = await builder.build(query)
    finally:
        await redis.aclose()
    return render(report, fmt, rfc3339(query.now_ms))


def run(args: argparse.Namespace, settings: Settings, err: TextIO = sys.stderr) -> int:
    try:
        start, end = parse_moment(args.start), parse_moment(args.end)
    except ValueError as e:
        print(f"iot report: --from/--to: {e}", file=err)
        return 2
    fmt = report_format(args)
    query = ReportQuery(start, end, int(time.time() * 1000))
    try:
        raw = asyncio.run(build(settings, query, fmt))
    except ReportRefused as e:
        print(f"iot report: refused: {e}", file=err)
        return 2
    except (InfluxError, OSError) as e:
        print(f"iot report: failed: {e}", file=err)
        return 1
    except Exception as e:  # e.g. Redis unreachable: one line, not a traceback
        print(f"iot report: failed: {type(e).__name__}: {e}", file=err)
        return 1
    if args.out == "-":
        sys.stdout.buffer.write(raw)
        return 0
    out = Path(args.out)
    partial = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        partial.write_bytes(raw)
        partial.replace(out)
    except OSError as e:
        partial.unlink(missing_ok=True)
        print(f"iot report: cannot write {out}: {e}", file=err)
        return 1
    print(f"iot report: {out}: {fmt}, {len(raw)} bytes, {rfc3339(start)} to {rfc3339(end)}")
    return 0
