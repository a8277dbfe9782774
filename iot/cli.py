"""The `iot` command line: one entry point for every process of the system."""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence

from iot import logs
from iot.settings import Settings, SettingsError, load

COMPONENTS = ("commands", "relay", "bridge", "gateway", "projector")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="iot", description="IoT backend")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run one component")
    run.add_argument("component", choices=COMPONENTS)
    run.add_argument("name", nargs="?", help="the projection, for `run projector NAME`")

    migrate = sub.add_parser(
        "migrate", help="create or upgrade the schema, the JetStream streams, the InfluxDB database"
    )
    migrate.add_argument("--replicas", type=int, default=1, help="JetStream stream replicas")

    up = sub.add_parser("up", help="the whole system on one machine, supervised")
    up.add_argument("--no-migrate", action="store_true", help="skip `iot migrate` at start")
    return parser


def _run_component(component: str, name: str | None, settings: Settings) -> None:
    if component == "projector":
        from projections.main import run_projector

        asyncio.run(run_projector(name or "", settings))
    elif component == "bridge":
        from bridges.main import run as run_bridge

        asyncio.run(run_bridge(settings))
    elif component == "gateway":
        from gateway.main import run as run_gateway

        asyncio.run(run_gateway(settings))
    elif component == "commands":
        from commands.main import run_commands

        asyncio.run(run_commands(settings))
    elif component == "relay":
        from commands.main import run_relay

        asyncio.run(run_relay(settings))


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command == "run" and args.component == "projector":
        from projections.main import PROJECTORS

        if args.name not in PROJECTORS:
            parser.error(f"run projector NAME: NAME is one of {', '.join(PROJECTORS)}")
    try:
        needs_tokens = args.command == "run" and args.component in ("commands", "gateway")
        settings = load(require_tokens=needs_tokens)
    except SettingsError as e:
        print(f"iot: {e}", file=sys.stderr)
        return 2
    component = args.component if args.command == "run" else args.command
    logs.configure(component, settings.log_level)
    if args.command == "run":
        try:
            _run_component(args.component, args.name, settings)
        except Exception as e:  # a dependency that never came up: one line, not a traceback
            print(f"iot run {args.component}: cannot start: {e}", file=sys.stderr)
            return 1
        return 0
    if args.command == "migrate":
        from commands.migrate import migrate

        try:
            steps = asyncio.run(migrate(settings, args.replicas))
        except Exception as e:
            print(f"iot migrate: failed: {e}", file=sys.stderr)
            return 1
        for step in steps:
            print(f"iot migrate: {step}")
        return 0
    if args.command == "up":
        from iot.supervisor import up

        return asyncio.run(up(settings, migrate_first=not args.no_migrate))
    return 2


if __name__ == "__main__":
    sys.exit(main())
