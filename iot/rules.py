"""`iot rules test FILE [--since 24h | --from T [--to T]] [--json]`: a draft rule over stored
telemetry, raising nothing (`analytics.ruletest`).

It runs here, against the namespace's JetStream: the devices (type, labels) come from the
EVENTS stream, read from its start, the telemetry from INGEST. Exit 0 with the alerts the rule
would have raised (none is appended anywhere), 2 when the file or the rule is invalid, 1 when
the log cannot be read.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO

import msgspec

from analytics.catalog import Catalog, DeviceInfo
from analytics.http import period
from analytics.position import position
from analytics.ruletest import RuleTestResult, run_rule_test
from domain.published import decode_stream_event
from domain.rules import RuleInvalid, RuleSpec, spec_to_dict, validate_rule
from infra.httpkit import Problem
from infra.replay import LogTail
from infra.settings import Settings
from infra.streams import Streams


def add_parser(sub: Any) -> None:
    rules = sub.add_parser("rules", help="alert rules: test a draft over stored history")
    verbs = rules.add_subparsers(dest="rules_command", required=True)
    test = verbs.add_parser(
        "test",
        help="evaluate a draft rule (a JSON file, as POST /api/v1/rules takes) over the stored "
        "telemetry and print the alerts it would have raised; raises none",
    )
    test.add_argument("file", help="the rule definition (JSON); - reads standard input")
    test.add_argument("--since", default=None, help="how far back, e.g. 30m, 24h, 7d (24h)")
    test.add_argument("--from", dest="from_", default=None, help="start (RFC 3339 or epoch ms)")
    test.add_argument("--to", default=None, help="end (RFC 3339 or epoch ms; default now)")
    test.add_argument("--json", action="store_true", help="print the whole answer as JSON")


async def devices_from_log(nc: Any, namespace: str) -> dict[str, DeviceInfo]:
    """Every device's type and labels, from the EVENTS stream as it is now."""
    streams = Streams(namespace)
    info = await nc.jetstream().stream_info(streams.events)
    end = int(info.state.last_seq or 0)
    catalog = Catalog()
    if end == 0:
        return {}
    tail = LogTail(nc, streams.events, "", 1)
    await tail.open()
    try:
        while tail.last_seq < end:
            msgs = await tail.fetch(0.5)
            if not msgs and await tail.remaining() == 0:
                break
            for msg in msgs:
                seq, stored_ms = position(msg)
                try:
                    event = decode_stream_event(msg.data)
                except (msgspec.DecodeError, msgspec.ValidationError):
                    continue
                catalog.apply(seq, stored_ms, event)
    finally:
        await tail.close()
    return catalog.devices


def rules_test(args: argparse.Namespace, settings: Settings, out: TextIO) -> int:
    try:
        raw = sys.stdin.read() if args.file == "-" else Path(args.file).read_text()
        data = json.loads(raw)
    except (OSError, ValueError) as e:
        print(f"iot rules test: cannot read {args.file}: {e}", file=sys.stderr)
        return 2
    try:
        spec = validate_rule(data)
        body = {"since": args.since, "from": args.from_, "to": args.to}
        from_ms, to_ms = period({k: v for k, v in body.items() if v is not None}, _now_ms())
    except RuleInvalid as e:
        for path, message in e.problems:
            print(f"iot rules test: {path or '(rule)'}: {message}", file=sys.stderr)
        return 2
    except Problem as e:
        print(f"iot rules test: {e.detail}", file=sys.stderr)
        return 2
    return asyncio.run(_test(settings, spec, from_ms, to_ms, json_out=args.json, out=out))


async def _test(
    settings: Settings, spec: RuleSpec, from_ms: int, to_ms: int, *, json_out: bool, out: TextIO
) -> int:
    import nats

    try:
        nc = await nats.connect(settings.nats_url, connect_timeout=5, max_reconnect_attempts=0)
    except Exception as e:
        print(f"iot rules test: cannot reach NATS at {settings.nats_url}: {e}", file=sys.stderr)
        return 1
    try:
        devices = await devices_from_log(nc, settings.namespace)
        result = await run_rule_test(
            nc, settings.namespace, spec, spec_to_dict(spec), devices, from_ms, to_ms
        )
    except Exception as e:
        print(f"iot rules test: cannot read the log: {e!r}", file=sys.stderr)
        return 1
    finally:
        await nc.close()
    if json_out:
        out.write(msgspec.json.encode(result).decode() + "\n")
    else:
        print_result(result, out)
    return 0


def _now_ms() -> int:
    return int(time.time() * 1000)


def _iso(ms: int | None) -> str:
    if ms is None:
        return "-"
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="milliseconds")


def print_result(result: RuleTestResult, out: TextIO) -> None:
    w = out.write
    w(f"period     {_iso(result.from_ms)} .. {_iso(result.to_ms)}\n")
    w(
        f"read       {result.messages:,} messages, {result.readings:,} readings;"
        f" {result.evaluations:,} evaluations of the rule's series on {result.devices:,} devices"
        f" in {result.elapsed_s:.1f} s\n"
    )
    if result.truncated:
        w(f"truncated  stopped at {_iso(result.read_to)} (the message limit)\n")
    w(
        f"alerts     {result.raised} raised, {result.retriggered} re-triggers,"
        f" {result.cleared} cleared, {result.open_at_end} open at the end (none was raised)\n"
    )
    if result.alerts:
        w("\ndevice                          raised at (device time)        value      "
          "re-trig  cleared at\n")  # fmt: skip
        for a in result.alerts:
            value = "-" if a.value is None else f"{a.value:g}"
            w(
                f"{a.device_id[:31]:<31} {_iso(a.raised_at):<30} {value:<10} {a.retriggers:<8}"
                f" {_iso(a.cleared_at)}\n"
            )
        if result.alerts_truncated:
            w(f"... the first {len(result.alerts)} alerts are listed\n")
