"""Prometheus (Debian's binary) scrapes a running `iot up` with the shipped local scrape
configuration and sees every component up with its metrics; promtool accepts the shipped
configurations and alert rules. Prometheus missing is a failure, never a skip."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from infra.settings import Settings
from tests.conftest import TOKENS
from tests.e2e.pipeline import wait_until
from tests.e2e.processes import free_port
from tests.e2e.processes import iot_up as iot_up_process

pytestmark = pytest.mark.e2e

OBSERVABILITY = Path(__file__).resolve().parents[2] / "deploy" / "observability"
INSTALL = "install Debian's `prometheus` package (apt-get install -y prometheus)"

# component (the scrape config's `component` label) -> a metric of its own
COMPONENTS = {
    "commands": "iot_expiry_pending_commands",
    "bridge": "iot_bridge_mqtt_connected",
    "gateway": "iot_gateway_rate_limited_total",
    "relay": "iot_relay_leader",
    "projector-timeseries": "iot_timeseries_write_retries_total",
    "projector-views": "iot_devices_online",
    "projector-auth": "iot_auth_ignored_total",
    "analytics": "iot_analytics_partitions",
}


def binary(name: str) -> str:
    found = shutil.which(name)
    assert found, f"`{name}` not found: {INSTALL}"
    return found


@dataclass
class Up:
    """A running `iot up`: the shipped ports, its own Mosquitto, authentication on."""

    ports: dict[str, int]


@pytest.fixture
def iot_up(migrated: Settings) -> Iterator[Up]:
    """`iot up` on the shipped ports, which must be free: the shipped scrape configuration
    names them."""
    shipped = shipped_targets()
    with iot_up_process(migrated, shipped, tokens=TOKENS):
        yield Up(shipped)


def shipped_targets() -> dict[str, int]:
    """component -> port, as the shipped `prometheus-local.yml` names them."""
    config = yaml.safe_load((OBSERVABILITY / "prometheus-local.yml").read_text())
    (job,) = config["scrape_configs"]
    targets: dict[str, int] = {}
    for group in job["static_configs"]:
        (target,) = group["targets"]
        targets[group["labels"]["component"]] = int(target.rsplit(":", 1)[1])
    assert set(targets) == set(COMPONENTS)
    return targets


def local_config(directory: Path) -> Path:
    """The shipped `prometheus-local.yml` as it is, scraping every second for the test."""
    config = yaml.safe_load((OBSERVABILITY / "prometheus-local.yml").read_text())
    config["global"]["scrape_interval"] = "1s"
    config["rule_files"] = [str(OBSERVABILITY / "alerts.yml")]
    path = directory / "prometheus.yml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture
def prometheus(iot_up: Up) -> Iterator[str]:
    """Prometheus on a free port with temporary storage, scraping `iot up`."""
    executable = binary("prometheus")
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        log = directory / "prometheus.log"
        with log.open("wb") as stderr:
            proc = subprocess.Popen(
                [
                    executable,
                    f"--config.file={local_config(directory)}",
                    f"--storage.tsdb.path={directory / 'data'}",
                    f"--web.listen-address=127.0.0.1:{port}",
                ],
                stdout=subprocess.DEVNULL,
                stderr=stderr,
            )
        url = f"http://127.0.0.1:{port}"
        try:
            assert wait_until(lambda: _ready(url, proc), timeout=30), log.read_text()[-2000:]
            yield url
        finally:
            proc.terminate()
            proc.wait(20)


def _ready(url: str, proc: subprocess.Popen[bytes]) -> bool:
    assert proc.poll() is None, "prometheus exited"
    try:
        return httpx.get(f"{url}/-/ready", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def query(url: str, promql: str) -> list[dict[str, Any]]:
    answer = httpx.get(f"{url}/api/v1/query", params={"query": promql}, timeout=5).json()
    assert answer["status"] == "success", answer
    result: list[dict[str, Any]] = answer["data"]["result"]
    return result


def targets_up(url: str) -> dict[str, str]:
    answer = httpx.get(f"{url}/api/v1/targets", timeout=5).json()
    return {t["labels"]["component"]: t["health"] for t in answer["data"]["activeTargets"]}


def test_prometheus_scrapes_every_component_with_the_shipped_configuration(
    prometheus: str,
) -> None:
    all_up = dict.fromkeys(COMPONENTS, "up")
    assert wait_until(lambda: targets_up(prometheus) == all_up, timeout=30), targets_up(prometheus)

    up = query(prometheus, 'up{job="iot"}')
    assert {s["metric"]["component"]: s["value"][1] for s in up} == dict.fromkeys(COMPONENTS, "1")
    for component, own_metric in COMPONENTS.items():
        selector = f'{own_metric}{{job="iot", component="{component}"}}'
        assert wait_until(lambda s=selector: bool(query(prometheus, s)), timeout=15), selector
    # every HTTP server counts its requests by route template: here, the scrapes themselves
    scrapes = query(prometheus, 'iot_http_requests_total{route="/metrics", status="200"}')
    assert wait_until(
        lambda: (
            {s["metric"]["component"] for s in query(prometheus, "iot_http_requests_total")}
            == set(COMPONENTS)
        ),
        timeout=15,
    ), scrapes
    lag = query(prometheus, "iot_consumer_pending")
    assert wait_until(lambda: bool(query(prometheus, "iot_consumer_pending")), timeout=15), lag

    rules = httpx.get(f"{prometheus}/api/v1/rules", timeout=5).json()["data"]["groups"]
    assert {g["name"] for g in rules} == {"iot-critical", "iot-warning", "iot-info"}
    firing = query(prometheus, 'ALERTS{alertname="IotServiceDown"}')
    assert firing == []


def test_promtool_accepts_the_shipped_configurations_and_alert_rules() -> None:
    promtool = binary("promtool")

    def check(*args: str) -> None:
        done = subprocess.run(
            [promtool, *args],
            check=False,
            cwd=OBSERVABILITY,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 0, done.stdout + done.stderr

    check("check", "rules", "alerts.yml")
    check("test", "rules", "alerts_test.yml")
    check("check", "config", "prometheus-local.yml")
    # the cluster's names a service-account token that exists only in a pod
    check("check", "config", "--syntax-only", "prometheus.yml")


def test_every_alert_has_a_severity_and_a_seed_category() -> None:
    rules = yaml.safe_load((OBSERVABILITY / "alerts.yml").read_text())
    alerts = [rule for group in rules["groups"] for rule in group["rules"]]
    categories = {a["labels"]["category"] for a in alerts}
    assert {a["labels"]["severity"] for a in alerts} == {"critical", "warning", "info"}
    assert {
        "node-down",
        "service-down",
        "database-down",
        "high-resource-usage",
        "high-latency",
        "dead-letters",
        "disk-filling",
    } <= categories
    assert all(a["annotations"]["summary"] for a in alerts)


def test_the_dashboard_shows_the_pipeline_and_per_device_telemetry() -> None:
    import json

    dashboard = json.loads((OBSERVABILITY / "grafana" / "iot.json").read_text())
    exprs = " ".join(
        str(target.get("expr", "")) + str(target.get("query", ""))
        for panel in dashboard["panels"]
        for target in panel.get("targets", [])
    )
    for metric in (
        "iot_bridge_messages_total",
        "iot_consumer_pending",
        "iot_projection_lag_seconds",
        "iot_bridge_dead_letters_total",
        "iot_devices_online",
        "iot_device_commands_total",
    ):
        assert metric in exprs, metric
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["device"]["datasource"]["type"] == "influxdb"
    assert "device_id =~ /^$device$/" in exprs
