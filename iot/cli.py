"""The `iot` command line: one entry point for every process of the system."""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence

from infra import logs
from infra.settings import Settings, SettingsError, load

COMPONENTS = ("commands", "relay", "bridge", "gateway", "projector", "analytics")
DYNSEC_PASSWORDS = ("IOT_DYNSEC_ADMIN_PASSWORD", "IOT_DYNSEC_BRIDGE_PASSWORD")


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
    up.add_argument("--simulate", type=int, default=0, metavar="N", help="add N simulated devices")
    up.add_argument("--rate", type=float, default=0.0, help="their messages/s in all (N/5)")
    up.add_argument(
        "--faults",
        action="store_true",
        help="three simulated devices overheat, go silent and drift, with rules that catch them",
    )
    up.add_argument(
        "--external-broker",
        action="store_true",
        help="use the Mosquitto at IOT_MQTT_URL instead of starting one with the shipped settings",
    )
    up.add_argument(
        "--insecure",
        action="store_true",
        help="no device authentication: the broker accepts anonymous clients, no auth projector",
    )

    backup = sub.add_parser(
        "backup",
        help="back up the namespace's event store (pg_dump) and JetStream streams (snapshots)",
    )
    backup.add_argument("dir", help="a new or empty directory to write the backup into")
    restore = sub.add_parser(
        "restore", help="restore a backup into an empty namespace, then verify it"
    )
    restore.add_argument("dir", help="a directory written by `iot backup`")
    restore.add_argument(
        "--force",
        action="store_true",
        help="drop the namespace's schema and streams first if they hold data",
    )

    replay = sub.add_parser(
        "replay",
        help="rebuild one projection from the log into a fresh namespace, then switch readers",
    )
    replay.add_argument(
        "name", help="the projection: views, timeseries, auth, or analytics (its evaluation state)"
    )
    mode = replay.add_mutually_exclusive_group()
    mode.add_argument(
        "--dry-run",
        action="store_true",
        help="say what would be rebuilt and how far the log reaches; change nothing",
    )
    mode.add_argument(
        "--verify",
        action="store_true",
        help="rebuild, compare with the live namespace, report differences (exit 1 if any), "
        "discard the rebuild",
    )
    replay.add_argument("--quiet", action="store_true", help="no progress bar")

    from iot.report import add_parser as add_report_parser

    add_report_parser(sub)

    dyn = sub.add_parser(
        "dynsec-init",
        help="create or update the broker's dynamic security file with the backend's MQTT users "
        "(passwords from IOT_DYNSEC_ADMIN_PASSWORD and IOT_DYNSEC_BRIDGE_PASSWORD; devices in "
        "the file are kept); run it while the broker is stopped, e.g. in an init container",
    )
    dyn.add_argument("file", help="the plugin's file (plugin_opt_config_file)")

    from iot.rules import add_parser as add_rules_parser

    add_rules_parser(sub)

    from iot.deadletters import add_parser as add_deadletters_parser

    add_deadletters_parser(sub)

    sim = sub.add_parser("simulate", help="a simulated device fleet speaking the MQTT contract")
    sim.add_argument("--devices", type=int, default=10)
    sim.add_argument("--rate", type=float, default=2.0, help="telemetry messages per second in all")
    sim.add_argument("--prefix", default="sim", help="device ids are PREFIX-0000, PREFIX-0001, ...")
    sim.add_argument(
        "--api", default="http://127.0.0.1:8080", help="command API to register the devices with"
    )
    sim.add_argument("--no-register", action="store_true", help="devices exist already")
    sim.add_argument(
        "--faults",
        action="store_true",
        help="the first three devices overheat, go silent and drift, on a cycle of minutes",
    )
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
    elif component == "analytics":
        from analytics.service import run as run_analytics

        asyncio.run(run_analytics(settings))


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command == "run" and args.component == "projector":
        from projections.main import PROJECTORS

        if args.name not in PROJECTORS:
            parser.error(f"run projector NAME: NAME is one of {', '.join(PROJECTORS)}")
    if args.command == "dynsec-init":
        return _dynsec_init(args.file)
    try:
        needs_tokens = args.command == "run" and args.component in ("commands", "gateway")
        settings = load(require_tokens=needs_tokens)
    except SettingsError as e:
        print(f"iot: {e}", file=sys.stderr)
        return 2
    component = args.component if args.command == "run" else args.command
    logs.configure(component, settings.log_level)
    from infra import tracing

    tracing.configure(component)  # OTLP export only when OTEL_EXPORTER_OTLP_ENDPOINT is set
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
    if args.command == "report":
        from iot.report import run as run_report

        return run_report(args, settings)
    if args.command == "up":
        from iot.supervisor import up

        rate = args.rate or args.simulate / 5
        return asyncio.run(
            up(
                settings,
                migrate_first=not args.no_migrate,
                simulate=args.simulate,
                rate=rate,
                faults=args.faults,
                own_broker=not args.external_broker,
                insecure=args.insecure,
            )
        )
    if args.command == "simulate":
        return asyncio.run(_simulate(args, settings))
    if args.command == "rules":
        from iot.rules import rules_test

        return rules_test(args, settings, sys.stdout)
    if args.command == "deadletters":
        from iot.deadletters import run as run_deadletters

        return run_deadletters(args, settings)
    if args.command in ("backup", "restore"):
        return _backup_or_restore(args, settings)
    if args.command == "replay":
        from infra.replay import Progress
        from iot.replay import replay

        try:
            return asyncio.run(
                replay(
                    args.name,
                    settings,
                    dry_run=args.dry_run,
                    verify=args.verify,
                    progress=Progress(enabled=not args.quiet),
                )
            )
        except KeyboardInterrupt:
            print(
                f"iot replay {args.name}: interrupted; readers still use the live namespace "
                "unless a switch was reported (the next replay removes what this one left)",
                file=sys.stderr,
            )
            return 130
        except Exception as e:
            import traceback

            # unexpected: where it happened helps the operator and the bug report
            traceback.print_exc(file=sys.stderr)
            print(f"iot replay {args.name}: failed: {e!r}", file=sys.stderr)
            return 2
    return 2


def _dynsec_init(file: str) -> int:
    import os

    from infra import dynsec
    from iot import dynsec_config

    passwords = [os.environ.get(v, "") for v in DYNSEC_PASSWORDS]
    for variable, password in zip(DYNSEC_PASSWORDS, passwords, strict=True):
        if len(password) < 16:
            print(
                f"iot dynsec-init: {variable} must be set (16 characters or more)", file=sys.stderr
            )
            return 2
    try:
        dynsec_config.ensure_config_file(file, dynsec_config.backend_users(*passwords))
    except (OSError, ValueError) as e:
        print(f"iot dynsec-init: {e}", file=sys.stderr)
        return 1
    print(f"iot dynsec-init: {file}: users {dynsec.ADMIN_USERNAME}, {dynsec.BRIDGE_USERNAME} ready")
    return 0


def _backup_or_restore(args: argparse.Namespace, settings: Settings) -> int:
    from pathlib import Path

    from iot import backup

    def progress(line: str) -> None:
        print(f"iot {args.command}: {line}", file=sys.stderr, flush=True)

    try:
        if args.command == "backup":
            manifest = asyncio.run(backup.backup(settings, Path(args.dir), progress))
            print(
                f"iot backup: {args.dir}: event store up to position "
                f"{manifest['postgres']['max_position']}, "
                + ", ".join(f"{s['name']} {s['messages']} messages" for s in manifest["streams"])
            )
            return 0
        summary = asyncio.run(backup.restore(settings, Path(args.dir), progress, force=args.force))
    except backup.Refused as e:
        print(f"iot {args.command}: refused: {e}", file=sys.stderr)
        return 2
    except backup.BackupError as e:
        print(f"iot {args.command}: failed: {e}", file=sys.stderr)
        return 1
    except Exception as e:  # a service that went away mid-way: one line, not a traceback
        print(f"iot {args.command}: failed: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    from projections.main import PROJECTORS

    for line in summary:
        print(f"iot restore: {line}")
    print(
        "iot restore: next: start the relay (it resumes after the stream's last Iot-Position), "
        "then rebuild each projection: " + "; ".join(f"iot replay {name}" for name in PROJECTORS)
    )
    return 0


async def _simulate(args: argparse.Namespace, settings: Settings) -> int:
    from infra.runtime import stop_on_signals
    from iot.simulator import simulate

    token = next(
        (t for t, role in settings.api_tokens.items() if role in ("operator", "admin")), None
    )
    if not args.no_register and token is None:
        print(
            "iot simulate: IOT_API_TOKENS needs an operator token to register devices "
            "(or pass --no-register)",
            file=sys.stderr,
        )
        return 2
    host, port, _ = settings.mqtt
    await simulate(
        devices=args.devices,
        rate=args.rate,
        mqtt_host=host,
        mqtt_port=port,
        api_url=None if args.no_register else args.api,
        token=token,
        prefix=args.prefix,
        faults=args.faults,
        stop=stop_on_signals(),
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
