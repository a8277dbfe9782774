"""Mosquitto restarted while devices send: with persistence, the messages it had acknowledged
and queued for the bridge's session survive, and the bridge resubscribes.

The bridge runs with a plain subscription (`IOT_BRIDGE_SUBSCRIPTION=exclusive`, what `iot up`
uses): a share group restored from Mosquitto 2.0.11's persistence drops what devices publish
before its member returns (`tests/integration/test_mosquitto_restore.py` shows the broker
doing it, without any of our code)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.faults.conftest import FaultReport
from tests.faults.harness import FaultRun

pytestmark = pytest.mark.faults

EXCLUSIVE = {"IOT_BRIDGE_SUBSCRIPTION": "exclusive"}


def test_mosquitto_restarted_mid_stream_keeps_what_it_acknowledged(
    tmp_path: Path, fault_report: FaultReport
) -> None:
    with FaultRun(tmp_path, "mosquitto", extra_env=EXCLUSIVE) as run:
        run.start_load()
        run.wait_sent(0.3)
        with run.outage():
            run.server.stop()  # SIGTERM: Mosquitto writes its persistence file on the way out
            time.sleep(3)
            run.server.start()
        figures = run.finish()
    fault_report.row(server="mosquitto", fault="restart, 3 s down", **figures.row())
