"""A server paused (SIGSTOP for 20 s, then SIGCONT) while devices send and operators command:
its connections stay open and nothing answers on them. Nothing may hang for good: clients
notice, time out and retry, /readyz says so, and all resumes with nothing lost or doubled."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.faults.conftest import FaultReport
from tests.faults.harness import FaultRun

pytestmark = pytest.mark.faults

PAUSE_S = 20


def paused_mid_stream(tmp_path: Path, kind: str, report: FaultReport) -> None:
    with FaultRun(tmp_path, kind, per_device=600) as run:
        run.start_load()
        run.wait_sent(0.2)
        with run.outage():
            run.server.pause()
            time.sleep(PAUSE_S)
            run.server.resume()
        figures = run.finish()
    report.row(server=kind, fault=f"SIGSTOP {PAUSE_S} s", **figures.row())


def test_nats_paused_mid_stream_resumes_losing_and_doubling_nothing(
    tmp_path: Path, fault_report: FaultReport
) -> None:
    paused_mid_stream(tmp_path, "nats", fault_report)


@pytest.mark.chaos
@pytest.mark.parametrize("kind", ["postgres", "redis", "influxdb", "mosquitto"])
def test_a_paused_server_resumes_losing_and_doubling_nothing(
    tmp_path: Path, fault_report: FaultReport, kind: str
) -> None:
    paused_mid_stream(tmp_path, kind, fault_report)
