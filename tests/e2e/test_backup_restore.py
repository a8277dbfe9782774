"""`iot backup` and `iot restore` as an operator runs them: progress on stderr, one line on
refusal or failure, exit codes 0 (done), 1 (failed), 2 (refused)."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import nats
import pytest

from infra.settings import Settings
from infra.streams import Streams

pytestmark = pytest.mark.e2e


def iot(settings: Settings, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "IOT_NAMESPACE": settings.namespace}
    return subprocess.run(
        [sys.executable, "-m", "iot.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


async def publish_one(settings: Settings) -> None:
    streams = Streams(settings.namespace)
    nc = await nats.connect(settings.nats_url)
    try:
        await nc.jetstream().publish(streams.ingest_subject("telemetry", "d1"), b'{"t": 1}')
    finally:
        await nc.close()


def test_backup_and_restore_from_the_command_line(migrated: Settings, tmp_path: Path) -> None:
    asyncio.run(publish_one(migrated))
    target = tmp_path / "b"

    done = iot(migrated, "backup", str(target))
    assert done.returncode == 0, done.stderr
    assert "receiving snapshot" in done.stderr
    assert f"{Streams(migrated.namespace).ingest} 1 messages" in done.stdout
    assert (target / "manifest.json").is_file()

    again = iot(migrated, "backup", str(target))
    assert again.returncode == 2
    assert again.stderr.strip().splitlines() == [
        f"iot backup: refused: {target} is not an empty directory; give a new or empty one"
    ]

    refused = iot(migrated, "restore", str(target))
    assert refused.returncode == 2
    [line] = refused.stderr.strip().splitlines()[-1:]
    assert line.startswith("iot restore: refused: namespace")
    assert "--force" in line
    assert "Traceback" not in refused.stderr

    forced = iot(migrated, "restore", "--force", str(target))
    assert forced.returncode == 0, forced.stderr
    assert "deleting stream" in forced.stderr
    assert "iot replay views" in forced.stdout

    missing = iot(migrated, "restore", str(tmp_path / "nowhere"))
    assert missing.returncode == 1
    assert missing.stderr.strip().splitlines() == [
        f"iot restore: failed: {tmp_path / 'nowhere' / 'manifest.json'} not found: "
        f"{tmp_path / 'nowhere'} is not a backup"
    ]
