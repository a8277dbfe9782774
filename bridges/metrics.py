"""Prometheus metrics of the MQTT -> JetStream bridge."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

MESSAGES = Counter(
    "iot_bridge_messages_total",
    "MQTT messages handled, by kind and outcome (stored, duplicate, dead_letter)",
    ["kind", "outcome"],
)
DEAD_LETTERS = Counter(
    "iot_bridge_dead_letters_total", "Messages rejected to the dead-letter stream", ["reason"]
)
INFLIGHT = Gauge("iot_bridge_inflight", "MQTT messages received and not yet acknowledged")
PUBLISH_LATENCY = Histogram(
    "iot_bridge_publish_latency_seconds",
    "Time from MQTT receipt to JetStream's acknowledgement",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 60.0),
)
PUBLISH_RETRIES = Counter(
    "iot_bridge_publish_retries_total", "JetStream publishes retried after a failure or timeout"
)
SALTED = Counter(
    "iot_bridge_salted_republish_total",
    "New messages whose deterministic id collided with an earlier one, republished salted",
)
MQTT_CONNECTED = Gauge("iot_bridge_mqtt_connected", "1 while connected to the MQTT broker")
NATS_CONNECTED = Gauge("iot_bridge_nats_connected", "1 while connected to NATS")
REGISTRY_DEVICES = Gauge("iot_bridge_registry_devices", "Devices known to the bridge")
REGISTRY_SEQUENCE = Gauge(
    "iot_bridge_registry_sequence", "Last EVENTS stream sequence applied to the device registry"
)
