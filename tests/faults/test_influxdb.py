"""InfluxDB restarted while devices send: the time-series projector holds back (it acknowledges
only what InfluxDB stored) and catches up."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.faults.conftest import FaultReport
from tests.faults.harness import FaultRun

pytestmark = pytest.mark.faults


def test_influxdb_restarted_mid_stream_the_series_catch_up(
    tmp_path: Path, fault_report: FaultReport
) -> None:
    with FaultRun(tmp_path, "influxdb") as run:
        run.start_load()
        run.wait_sent(0.3)
        with run.outage():
            run.server.stop()
            time.sleep(3)
            run.server.start()
        figures = run.finish()
    fault_report.row(server="influxdb", fault="restart, 3 s down", **figures.row())


@pytest.mark.chaos
def test_influxdb_killed_mid_stream_the_series_catch_up(
    tmp_path: Path, fault_report: FaultReport
) -> None:
    with FaultRun(tmp_path, "influxdb", per_device=600) as run:
        run.start_load()
        run.wait_sent(0.3)
        with run.outage():
            run.server.kill()
            time.sleep(10)
            run.server.start()
        figures = run.finish()
    fault_report.row(server="influxdb", fault="SIGKILL, 10 s down", **figures.row())
