"""Prometheus metrics of the read-only gateway."""

from __future__ import annotations

from prometheus_client import Counter, Histogram

RATE_LIMITED = Counter(
    "iot_gateway_rate_limited_total", "Requests refused with 429 by the per-token rate limit"
)
TELEMETRY_REFUSED = Counter(
    "iot_gateway_telemetry_refused_total",
    "Telemetry queries refused because they would exceed the point bound",
)
INFLUX_QUERY = Histogram(
    "iot_gateway_influx_query_seconds",
    "InfluxQL query latency",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
)
