"""Alert notifications delivered to a real Prometheus Alertmanager, started by the test."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from analytics.notify import AlertContext, Notifier, alertmanager_alert
from domain.alerts import clear, raise_alert
from tests.e2e.processes import free_port

pytestmark = pytest.mark.integration

BINARY = "prometheus-alertmanager"
CONFIG = """\
route:
  receiver: "null"
  group_wait: 0s
receivers:
  - name: "null"
"""


class Alertmanager:
    def __init__(self, workdir: Path) -> None:
        binary = shutil.which(BINARY)
        if binary is None:
            pytest.fail(f"{BINARY} is not installed (Debian package prometheus-alertmanager)")
        self.binary = binary
        self.workdir = workdir
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        (workdir / "alertmanager.yml").write_text(CONFIG)
        self.proc: subprocess.Popen[bytes] | None = None
        self.log: Any = None

    def start(self) -> None:
        if self.log is None:
            self.log = (self.workdir / "alertmanager.log").open("ab")
        self.proc = subprocess.Popen(
            [
                self.binary,
                f"--config.file={self.workdir / 'alertmanager.yml'}",
                f"--storage.path={self.workdir / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
                "--cluster.listen-address=",
            ],
            stdout=subprocess.DEVNULL,
            stderr=self.log,
        )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.url}/-/ready", timeout=1).status_code == 200:
                    return
            if self.proc.poll() is not None:
                break
            time.sleep(0.1)
        log = (self.workdir / "alertmanager.log").read_text()[-2000:]
        pytest.fail(f"Alertmanager did not become ready on {self.url}: {log}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=10)

    def close(self) -> None:
        self.stop()
        if self.log is not None:
            self.log.close()


@pytest.fixture
def alertmanager(tmp_path: Path) -> Iterator[Alertmanager]:
    am = Alertmanager(tmp_path)
    try:
        am.start()
        yield am
    finally:
        am.close()


@pytest.fixture
async def sender(alertmanager: Alertmanager) -> AsyncIterator[Notifier]:
    async with httpx.AsyncClient(base_url=alertmanager.url, timeout=2) as client:
        notifier = Notifier(client, resend_s=5)
        task = asyncio.create_task(notifier.run())
        yield notifier
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def alerts_of(am: Alertmanager, device: str) -> list[dict[str, Any]]:
    async with httpx.AsyncClient(timeout=2) as client:
        response = await client.get(
            f"{am.url}/api/v2/alerts", params={"filter": f'device="{device}"'}
        )
    response.raise_for_status()
    found: list[dict[str, Any]] = response.json()
    return found


async def eventually(check: Any, what: str, seconds: float = 20.0) -> Any:
    deadline = time.monotonic() + seconds
    while True:
        result = await check()
        if result:
            return result
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        await asyncio.sleep(0.2)


CONTEXT = AlertContext("Boiler overheating", "thermostat", {"site": "north"})


async def test_a_raised_alert_reaches_alertmanager_and_its_clearing_resolves_it(
    alertmanager: Alertmanager, sender: Notifier
) -> None:
    now_ms = int(time.time() * 1000)
    raised = raise_alert("hot", "boiler-1", "critical", "temperature", 91.5, now_ms - 1000)
    sender.notify(raised.alert_id, alertmanager_alert(raised, CONTEXT, "http://gw:8082"))

    async def active() -> list[dict[str, Any]]:
        return [
            a for a in await alerts_of(alertmanager, "boiler-1") if a["status"]["state"] == "active"
        ]

    [alert] = await eventually(active, "the alert in Alertmanager")
    assert alert["labels"]["alertname"] == "Boiler overheating"
    assert (alert["labels"]["rule"], alert["labels"]["severity"]) == ("hot", "critical")
    assert alert["labels"]["site"] == "north"
    assert alert["annotations"]["value"] == "91.5"
    assert alert["generatorURL"].startswith("http://gw:8082/api/v1/alerts?")

    cleared = clear(raised, 70.0, int(time.time() * 1000))
    sender.notify(raised.alert_id, alertmanager_alert(cleared, CONTEXT))

    async def gone() -> bool:
        return not await active()

    await eventually(gone, "the alert resolved")
    assert sender.pending == 0


async def test_alerts_raised_while_alertmanager_is_down_arrive_once_it_is_back(
    alertmanager: Alertmanager, sender: Notifier
) -> None:
    alertmanager.stop()
    now_ms = int(time.time() * 1000)
    raised = raise_alert("silent", "boiler-2", "warning", "*", None, now_ms)
    started = time.monotonic()
    sender.notify(raised.alert_id, alertmanager_alert(raised, CONTEXT))
    assert time.monotonic() - started < 0.1  # notify never waits for delivery
    await asyncio.sleep(1.5)  # a few failed attempts
    assert sender.pending == 1
    alertmanager.start()

    async def arrived() -> list[dict[str, Any]]:
        return await alerts_of(alertmanager, "boiler-2")

    [alert] = await eventually(arrived, "the alert after Alertmanager came back", 60)
    assert alert["labels"]["rule"] == "silent"
