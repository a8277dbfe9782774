"""The `iot` command line as a user meets it."""

from __future__ import annotations

import subprocess
import sys

import pytest

pytestmark = pytest.mark.e2e
TOKEN = "a-long-enough-token-1234=admin"


def iot(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "iot.cli", *args],
        env={"PATH": "/usr/bin:/bin", **env},
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


@pytest.mark.parametrize(
    ("env", "variable"),
    [
        ({}, "IOT_API_TOKENS"),
        ({"IOT_API_TOKENS": "x" * 20 + "=root"}, "IOT_API_TOKENS"),
        ({"IOT_DATABASE_URL": "mysql://db"}, "IOT_DATABASE_URL"),
        ({"IOT_API_TOKENS": TOKEN, "IOT_NATS_URL": "nats://host:notaport"}, "IOT_NATS_URL"),
        ({"IOT_API_TOKENS": TOKEN, "IOT_HTTP_PORT": "99999"}, "IOT_HTTP_PORT"),
    ],
)
def test_a_bad_setting_stops_the_process_with_one_line_naming_it(
    env: dict[str, str], variable: str
) -> None:
    result = iot("run", "commands", env=env)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert variable in lines[0]
    assert "Traceback" not in result.stderr


def test_migrate_twice_changes_nothing_the_second_time(migrated: object) -> None:
    from infra.settings import Settings

    assert isinstance(migrated, Settings)
    env = {"IOT_NAMESPACE": migrated.namespace}
    second = iot("migrate", env=env)
    assert second.returncode == 0, second.stderr
    assert "jetstream: updated" in second.stdout
    assert "event store and idempotency tables ready" in second.stdout
