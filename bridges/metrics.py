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
COMMANDS_DISPATCHED = Counter(
    "iot_bridge_commands_dispatched_total",
    "Commands published to devices and acknowledged by the broker (redelivered: after a"
    " reconnect or a change of leader; skipped_expired: due but past expires_at, never sent)",
    ["outcome"],
)
DISPATCH_LATENCY = Histogram(
    "iot_bridge_command_dispatch_seconds",
    "Time from the bridge's receipt of a CommandRequested event to the broker's PUBACK"
    " (commands published as soon as they arrive, to an online device)",
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0),
)
DISPATCH_FAILURES = Counter(
    "iot_bridge_dispatch_failures_total",
    "Publishes to devices (commands, desired state) that failed and are retried, by reason",
    ["reason"],
)
DESIRED_PUBLISHED = Counter(
    "iot_bridge_desired_published_total",
    "Retained desired-state messages published (cleared: emptied for a decommissioned device)",
    ["outcome"],
)
LEADER = Gauge("iot_bridge_dispatcher_leader", "1 while this bridge holds the dispatcher lease")
MQTT_OUT_CONNECTED = Gauge(
    "iot_bridge_mqtt_out_connected", "1 while the dispatcher's MQTT client is connected"
)
