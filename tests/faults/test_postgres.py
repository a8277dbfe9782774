"""PostgreSQL restarted while operators send commands and devices send readings."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.faults.conftest import FaultReport
from tests.faults.harness import FaultRun

pytestmark = pytest.mark.faults


def test_postgres_restarted_while_commands_are_sent(
    tmp_path: Path, fault_report: FaultReport
) -> None:
    """Commands get 503 with Retry-After while it is down, never a lost or doubled event;
    the relay resumes in commit order."""
    with FaultRun(tmp_path, "postgres", command_rate=20.0) as run:
        run.start_load()
        run.wait_sent(0.3)
        with run.outage():
            run.server.stop()
            time.sleep(3)
            run.server.start()
        figures = run.finish()
    # Whether a request lands in the outage is timing (the store retries a lost connection,
    # so one may just wait and succeed); what every answer may be is checked by the harness.
    fault_report.row(server="postgres", fault="restart, 3 s down", **figures.row())


@pytest.mark.chaos
def test_postgres_killed_while_commands_are_sent(tmp_path: Path, fault_report: FaultReport) -> None:
    with FaultRun(tmp_path, "postgres", command_rate=20.0, per_device=600) as run:
        run.start_load()
        run.wait_sent(0.3)
        with run.outage():
            run.server.kill()
            time.sleep(5)
            run.server.start()
        figures = run.finish()
    fault_report.row(server="postgres", fault="SIGKILL, 5 s down", **figures.row())
