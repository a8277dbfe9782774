"""Alert notifications delivered to a real Prometheus Alertmanager, started by the test."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import IO, Any, TypeVar

import httpx
import pytest
from prometheus_client import REGISTRY

from analytics.notify import Notifier, NotifySettings, alertmanager_alert
from domain.alerts import AlertState, clear, raise_alert
from tests.e2e.processes import free_port

pytestmark = pytest.mark.integration

T = TypeVar("T")
BINARY = "prometheus-alertmanager"
INSTALL = "apt-get install -y prometheus-alertmanager"
CONFIG = """\
route:
  receiver: "null"
  group_wait: 0s
receivers:
  - name: "null"
"""


class Alertmanager:
    """An Alertmanager of the test's own on a free loopback port, clustering off."""

    def __init__(self, workdir: Path) -> None:
        binary = shutil.which(BINARY) or shutil.which(f"/usr/bin/{BINARY}")
        if binary is None:
            pytest.fail(f"{BINARY} is not installed: the Debian package ({INSTALL})")
        self.binary = binary
        self.workdir = workdir
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        (workdir / "alertmanager.yml").write_text(CONFIG)
        self.proc: subprocess.Popen[bytes] | None = None
        self.log: IO[bytes] | None = None

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
        while time.monotonic() < deadline and self.proc.poll() is None:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.url}/-/ready", timeout=1).status_code == 200:
                    return
            time.sleep(0.1)
        self.stop()
        tail = (self.workdir / "alertmanager.log").read_text(errors="replace")[-2000:]
        pytest.fail(f"Alertmanager did not become ready on {self.url}:\n{tail}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

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


@contextlib.asynccontextmanager
async def running(am: Alertmanager, resend_s: float) -> AsyncIterator[Notifier]:
    """A notifier posting to `am`, its delivery loop running."""
    async with httpx.AsyncClient(base_url=am.url, timeout=2) as client:
        notifier = Notifier(client, NotifySettings(resend_s=resend_s, close_timeout_s=2))
        task = asyncio.create_task(notifier.run())
        try:
            yield notifier
        finally:
            await notifier.close()
            await task


def payload(state: AlertState, notifier: Notifier) -> dict[str, Any]:
    return alertmanager_alert(
        state,
        device_type="thermostat",
        device_labels={"site": "north", "room.no": "12"},
        rule_name="Boiler overheating",
        gateway_url="http://gw:8082",
        now_ms=int(time.time() * 1000),
        resend_s=notifier.resend_s,
    )


async def alerts_of(am: Alertmanager, device: str, **params: str) -> list[dict[str, Any]]:
    """What GET /api/v2/alerts lists for the device (by default: every state but resolved)."""
    async with httpx.AsyncClient(timeout=2) as client:
        response = await client.get(
            f"{am.url}/api/v2/alerts", params={"filter": f'device="{device}"', **params}
        )
    response.raise_for_status()
    found: list[dict[str, Any]] = response.json()
    return found


async def received(am: Alertmanager, status: str) -> float:
    """Alertmanager's own count of alerts it received over API v2 as firing or resolved."""
    async with httpx.AsyncClient(timeout=2) as client:
        text = (await client.get(f"{am.url}/metrics")).text
    line = f'alertmanager_alerts_received_total{{status="{status}",version="v2"}} '
    for row in text.splitlines():
        if row.startswith(line):
            return float(row.removeprefix(line))
    return 0.0


async def eventually(check: Callable[[], Awaitable[T]], what: str, seconds: float = 20.0) -> T:
    deadline = time.monotonic() + seconds
    while True:
        result = await check()
        if result:
            return result
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {seconds} s waiting for {what}")
        await asyncio.sleep(0.1)


async def test_a_raised_alert_is_active_in_alertmanager_and_its_clearing_resolves_it(
    alertmanager: Alertmanager,
) -> None:
    # a long resend interval: the alert can only go by our clearing, not by its endsAt passing
    async with running(alertmanager, resend_s=600) as notifier:
        raised = raise_alert("hot", "boiler-1", "critical", "temperature", 91.5, _ms() - 1000)
        notifier.notify(raised.alert_id, payload(raised, notifier))

        async def active() -> list[dict[str, Any]]:
            alerts = await alerts_of(alertmanager, "boiler-1")
            return [a for a in alerts if a["status"]["state"] == "active"]

        [alert] = await eventually(active, "the alert active in Alertmanager")
        assert alert["labels"] == {
            "alertname": "Boiler overheating",
            "rule": "hot",
            "device": "boiler-1",
            "severity": "critical",
            "metric": "temperature",
            "type": "thermostat",
            "site": "north",
            "room_no": "12",
        }
        assert alert["annotations"]["value"] == "91.5"
        assert alert["annotations"]["alert_id"] == raised.alert_id
        assert alert["generatorURL"] == (
            "http://gw:8082/api/v1/alerts?device_id=boiler-1&rule_id=hot"
        )
        assert alert["receivers"] == [{"name": "null"}]
        assert notifier.pending == 0
        assert notifier.held == 1  # open: kept for re-sending
        resolved_before = await received(alertmanager, "resolved")

        notifier.notify(raised.alert_id, payload(clear(raised, 70.0, _ms()), notifier))

        async def resolved() -> bool:
            return await received(alertmanager, "resolved") > resolved_before

        await eventually(resolved, "Alertmanager to receive the alert as resolved")
        # a resolved alert (endsAt past) is listed by no filter: not active, not active=false
        assert await alerts_of(alertmanager, "boiler-1") == []
        assert await alerts_of(alertmanager, "boiler-1", active="false") == []
        assert (notifier.pending, notifier.held) == (0, 0)  # delivered, then forgotten


async def test_an_open_alert_is_sent_again_every_resend_interval(
    alertmanager: Alertmanager,
) -> None:
    async with running(alertmanager, resend_s=1) as notifier:
        raised = raise_alert("hot", "boiler-3", "warning", "temperature", 80.0, _ms())
        notifier.notify(raised.alert_id, payload(raised, notifier))
        [first] = await eventually(
            lambda: alerts_of(alertmanager, "boiler-3"), "the alert in Alertmanager"
        )
        firing = await received(alertmanager, "firing")

        async def sent_again() -> bool:
            return await received(alertmanager, "firing") >= firing + 2

        await eventually(sent_again, "two re-sends", 10)
        [again] = await alerts_of(alertmanager, "boiler-3")
        assert again["endsAt"] > first["endsAt"]  # moved ahead at each re-send
        assert again["startsAt"] == first["startsAt"]
        assert again["status"]["state"] == "active"


async def test_alerts_raised_while_alertmanager_is_down_arrive_once_it_is_back(
    alertmanager: Alertmanager,
) -> None:
    async with running(alertmanager, resend_s=600) as notifier:
        alertmanager.stop()
        failed = REGISTRY.get_sample_value(
            "iot_analytics_notifications_total", {"outcome": "failed"}
        )
        raised = raise_alert("silent", "boiler-2", "warning", "*", None, _ms())
        started = time.monotonic()
        notifier.notify(raised.alert_id, payload(raised, notifier))
        assert time.monotonic() - started < 0.05  # notify never waits for a delivery

        def failures() -> float:
            value = REGISTRY.get_sample_value(
                "iot_analytics_notifications_total", {"outcome": "failed"}
            )
            return (value or 0.0) - (failed or 0.0)

        async def retried() -> bool:
            return failures() >= 3

        await eventually(retried, "the notifier to retry a few times", 10)
        assert notifier.pending == 1
        await asyncio.to_thread(alertmanager.start)  # the same port again

        async def arrived() -> list[dict[str, Any]]:
            return await alerts_of(alertmanager, "boiler-2")

        # the backoff may have grown to a few seconds meanwhile
        [alert] = await eventually(arrived, "the alert after Alertmanager came back", 60)
        assert alert["labels"]["rule"] == "silent"
        assert alert["labels"]["metric"] == "*"
        assert "value" not in alert["annotations"]

        async def settled() -> bool:  # Alertmanager shows the alert before its 200 is read
            return notifier.pending == 0

        await eventually(settled, "the notifier to forget the delivered alert", 10)


def _ms() -> int:
    return int(time.time() * 1000)
