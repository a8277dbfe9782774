"""NATS (JetStream) restarted and killed while devices send and operators command."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.faults.conftest import FaultReport
from tests.faults.harness import FaultRun

pytestmark = pytest.mark.faults


def test_nats_restarted_mid_stream_loses_and_doubles_nothing(
    tmp_path: Path, fault_report: FaultReport
) -> None:
    with FaultRun(tmp_path, "nats") as run:
        run.start_load()
        run.wait_sent(0.3)
        with run.outage():
            run.server.stop()
            time.sleep(3)
            run.server.start()
        figures = run.finish()
    fault_report.row(server="nats", fault="restart, 3 s down", **figures.row())


@pytest.mark.chaos
def test_nats_killed_mid_stream_loses_no_acknowledged_write(
    tmp_path: Path, fault_report: FaultReport
) -> None:
    with FaultRun(tmp_path, "nats", per_device=600) as run:
        run.start_load()
        run.wait_sent(0.3)
        with run.outage():
            run.server.kill()
            time.sleep(5)
            run.server.start()
        figures = run.finish()
    fault_report.row(server="nats", fault="SIGKILL, 5 s down", **figures.row())
