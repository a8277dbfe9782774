"""`iot replay NAME`: rebuild one projection from the log into a fresh namespace, then switch.

Each projection's replay is a `infra.replay.Replayer` found by name in `REPLAYERS`; this module
takes the replay lock, runs it and prints its report. `--dry-run` describes what would be
rebuilt and how far the log reaches; `--verify` builds and compares with the live namespace,
reports the differences and switches nothing.
"""

from __future__ import annotations

import contextlib
import importlib
import sys
import time
from collections.abc import Callable
from typing import TextIO

import nats

from infra.replay import SWITCH_GRACE_S, Progress, ReplayContext, Replayer, ReplayError, replay_lock
from infra.settings import Settings

REPLAYERS = {
    "views": "projections.views_replay:ViewsReplay",
    "timeseries": "projections.timeseries_replay:TimeseriesReplay",
    "auth": "projections.auth_replay:AuthReplay",
    "analytics": "analytics.replay:AnalyticsReplay",
}


def load_replayer(name: str, context: ReplayContext) -> Replayer:
    try:
        target = REPLAYERS[name]
    except KeyError:
        raise ReplayError(
            f"no projection named {name!r}; choose one of {', '.join(REPLAYERS)}"
        ) from None
    module, cls = target.split(":")
    factory: Callable[[ReplayContext], Replayer] = getattr(importlib.import_module(module), cls)
    return factory(context)


async def replay(
    name: str,
    settings: Settings,
    *,
    dry_run: bool = False,
    verify: bool = False,
    out: TextIO = sys.stdout,
    progress: Progress | None = None,
    grace: float = SWITCH_GRACE_S,
) -> int:
    """The command: 0 done (or no differences), 1 differences found, 2 refused or failed."""
    progress = progress or Progress()
    nc = await nats.connect(settings.nats_url, connect_timeout=5, max_reconnect_attempts=3)
    try:
        replayer = load_replayer(name, ReplayContext(settings, nc, grace=grace))
        if dry_run:
            for line in await replayer.plan():
                print(line, file=out)
            return 0
        async with replay_lock(settings, name):
            start = time.monotonic()
            report = await (replayer.verify(progress) if verify else replayer.run(progress))
        progress.finish()
        for line in report.lines:
            print(line, file=out)
        for line in report.differences:
            print(f"DIFFERENT {line}", file=out)
        took = time.monotonic() - start
        if verify:
            verdict = (
                f"{len(report.differences)} difference(s)" if report.differences else "identical"
            )
            print(f"{name}: verification done in {took:.1f} s: {verdict}", file=out)
        else:
            print(f"{name}: replay done in {took:.1f} s", file=out)
        return 1 if report.differences else 0
    except ReplayError as e:
        progress.finish()
        print(f"iot replay {name}: {e}", file=sys.stderr)
        return 2
    finally:
        with contextlib.suppress(Exception):
            await nc.close()
