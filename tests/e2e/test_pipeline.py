"""The whole system as processes: devices over MQTT in, dashboards over HTTP out."""

from __future__ import annotations

import time
from collections.abc import Iterator

import httpx
import pytest

from infra.settings import Settings
from tests.e2e.pipeline import (
    VIEWER,
    Publisher,
    System,
    influx_count,
    influx_missing,
    log_state,
    private_mosquitto,
    reading,
    register,
    system,
    wait_until,
)

pytestmark = pytest.mark.e2e

DEVICES = 50
PER_DEVICE = 400


@pytest.fixture
def mqtt_port() -> Iterator[int]:
    with private_mosquitto() as port:
        yield port


def start_core(running: System) -> None:
    running.start("commands", "commands").wait_ready()
    running.start("relay", "relay").wait_ready()
    running.start("views", "projector", "views").wait_ready()
    running.start("gateway", "gateway").wait_ready()


def device_view(running: System, device_id: str) -> dict[str, object] | None:
    response = httpx.get(
        f"{running.url('gateway')}/api/v1/devices/{device_id}", headers=VIEWER, timeout=5
    )
    return response.json() if response.status_code == 200 else None


def test_a_device_registered_over_http_is_seen_through_mqtt_on_the_dashboards(
    migrated: Settings, mqtt_port: int
) -> None:
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    with system(migrated, mqtt_port) as running:
        start_core(running)
        running.start("timeseries", "projector", "timeseries").wait_ready()
        register(running.url("commands"), "boiler-1")
        assert wait_until(lambda: device_view(running, "boiler-1"))
        running.start("bridge", "bridge").wait_ready()

        now = int(time.time() * 1000) - 10_000
        client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="boiler-1")
        client.connect("127.0.0.1", mqtt_port)
        client.loop_start()
        for payload in (
            b'{"temperature": 21.5}',
            reading(now, {"humidity": 40}),
            b'[{"ts": %d, "values": {"humidity": 41}}, {"ts": %d, "values": {"pressure": 1013.2}}]'
            % (now + 1, now + 2),
        ):
            client.publish("devices/boiler-1/telemetry", payload, qos=1).wait_for_publish(10)
        client.loop_stop()
        client.disconnect()

        def metrics() -> dict[str, dict[str, object]] | None:
            view = device_view(running, "boiler-1")
            found = view and view.get("metrics")
            if isinstance(found, dict) and {"temperature", "humidity", "pressure"} <= set(found):
                return found
            return None

        seen = wait_until(metrics)
        assert seen, device_view(running, "boiler-1")
        assert seen["temperature"]["value"] == 21.5
        assert seen["humidity"]["value"] == 41
        assert seen["pressure"]["value"] == 1013.2

        def series() -> list[list[object]] | None:
            response = httpx.get(
                f"{running.url('gateway')}/api/v1/devices/boiler-1/telemetry",
                params={"metric": "humidity", "from": str(now - 1000), "to": str(now + 1000)},
                headers=VIEWER,
                timeout=5,
            )
            points = response.json().get("series", {}).get("humidity") or []
            return points if len(points) == 2 else None

        points = wait_until(series)
        assert points is not None
        assert [p[1] for p in points] == [40, 41]


def publish_fleet(mqtt_port: int, base: int) -> Publisher:
    messages = [
        (f"devices/d{d:02d}/telemetry", reading(base + i, {"seq": i}))
        for i in range(PER_DEVICE)
        for d in range(DEVICES)
    ]
    publisher = Publisher(mqtt_port, messages, rate=1500)
    publisher.start()
    return publisher


def wait_sent(publisher: Publisher, fraction: float) -> None:
    total = DEVICES * PER_DEVICE
    assert wait_until(lambda: publisher.sent >= total * fraction, timeout=60, interval=0.05)


def assert_complete(running: System, migrated: Settings) -> None:
    total = DEVICES * PER_DEVICE
    count = wait_until(lambda: influx_count(migrated, "seq") == total, timeout=120)
    if not count:
        sent = {f"d{d:02d}": set(range(PER_DEVICE)) for d in range(DEVICES)}
        missing = influx_missing(migrated, "seq", sent)
        raise AssertionError(
            f"InfluxDB holds {influx_count(migrated, 'seq')} of {total} points; "
            f"missing {missing}; log {log_state(migrated)}"
        )

    def every_view_has_its_last_reading() -> bool:
        for d in range(DEVICES):
            view = device_view(running, f"d{d:02d}")
            metrics = view.get("metrics") if view else None
            if (
                not isinstance(metrics, dict)
                or metrics.get("seq", {}).get("value") != PER_DEVICE - 1
            ):
                return False
        return True

    assert wait_until(every_view_has_its_last_reading, timeout=60)


def register_fleet(running: System) -> None:
    for d in range(DEVICES):
        register(running.url("commands"), f"d{d:02d}")
    assert wait_until(lambda: device_view(running, f"d{DEVICES - 1:02d}"))


def test_no_reading_is_lost_or_doubled_when_each_component_is_killed(
    migrated: Settings, mqtt_port: int
) -> None:
    with system(migrated, mqtt_port) as running:
        start_core(running)
        running.start("timeseries", "projector", "timeseries").wait_ready()
        register_fleet(running)
        running.start("bridge", "bridge").wait_ready()
        publisher = publish_fleet(mqtt_port, int(time.time() * 1000) - 3_600_000)
        for fraction, name in ((0.2, "bridge"), (0.45, "timeseries"), (0.7, "views")):
            wait_sent(publisher, fraction)
            running.restart(name).wait_ready()
        publisher.join(120)
        assert publisher.error is None
        assert_complete(running, migrated)


def test_two_of_each_killed_one_by_one_lose_and_double_nothing(
    migrated: Settings, mqtt_port: int
) -> None:
    with system(migrated, mqtt_port) as running:
        start_core(running)
        running.start("views2", "projector", "views").wait_ready()
        running.start("timeseries", "projector", "timeseries").wait_ready()
        running.start("timeseries2", "projector", "timeseries").wait_ready()
        register_fleet(running)
        running.start("bridge", "bridge").wait_ready()
        running.start("bridge2", "bridge").wait_ready()
        publisher = publish_fleet(mqtt_port, int(time.time() * 1000) - 7_200_000)
        for fraction, name in ((0.2, "bridge"), (0.45, "timeseries2"), (0.7, "views")):
            wait_sent(publisher, fraction)
            running.restart(name).wait_ready()
        publisher.join(120)
        assert publisher.error is None
        assert_complete(running, migrated)
