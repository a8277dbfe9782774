"""Process-wide Prometheus metrics, shared by every component's HTTP port."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

HTTP_REQUESTS = Counter(
    "iot_http_requests_total", "HTTP requests answered", ["method", "route", "status"]
)
HTTP_LATENCY = Histogram(
    "iot_http_request_duration_seconds",
    "HTTP request latency",
    ["method", "route"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
)
COMMANDS = Counter(
    "iot_commands_total", "Operator commands by name and outcome", ["command", "outcome"]
)
REQUESTS_ADMITTED = Gauge(
    "iot_http_requests_admitted",
    "Requests being handled inside an admission limit (IOT_COMMANDS_MAX_REQUESTS)",
)
REQUESTS_SHED = Counter(
    "iot_http_requests_shed_total",
    "Requests refused with 503 and Retry-After because the admission limit was reached",
)
STORE_UNAVAILABLE = Counter(
    "iot_commands_store_unavailable_total",
    "Command API requests answered 503 because PostgreSQL could not be reached",
)
COMMAND_CONFLICT_RETRIES = Counter(
    "iot_command_conflict_retries_total",
    "Commands re-run after losing an optimistic-concurrency race",
)
RELAY_PUBLISHED = Counter("iot_relay_published_total", "Domain events published to JetStream")
RELAY_POSITION = Gauge("iot_relay_position", "Last event-store position published to JetStream")
RELAY_LEADER = Gauge("iot_relay_leader", "1 while this relay holds the publishing lock")
RELAY_LAG = Histogram(
    "iot_relay_lag_seconds",
    "Time from an event's commit to JetStream's acknowledgement of it",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 60.0),
)
RELAY_RESYNCS = Counter(
    "iot_relay_resyncs_total", "Times the relay re-read its position from the stream"
)
PROJECTION_LAG = Gauge(
    "iot_projection_lag_seconds",
    "Now minus the event time (or bridge receipt) of the newest message a projection applied",
    ["projection"],
)
GROUP_COMMIT_SIZE = Histogram(
    "iot_group_commit_size",
    "Changes saved per group-commit transaction (the first attempt of a batch)",
    buckets=(1, 2, 4, 8, 16, 32, 64),
)
GROUP_COMMIT_SECONDS = Histogram(
    "iot_group_commit_seconds",
    "Time to save one group-commit batch, conflicts and their retries included",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0),
)
GROUP_COMMIT_CONFLICTS = Counter(
    "iot_group_commit_conflicts_total",
    "Group-commit transactions that failed on a stale change and were split",
)
DEVICE_COMMANDS = Counter(
    "iot_device_commands_total",
    "Commands to devices by step, counted once as the relay publishes each event (requested,"
    " sent; outcomes: acknowledged, failed, expired, cancelled)",
    ["outcome"],
)
DEVICES_ONLINE = Gauge(
    "iot_devices_online", "Devices whose latest status message says online (the views' online set)"
)
