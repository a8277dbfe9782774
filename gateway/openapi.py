"""The OpenAPI 3 description of the read-only gateway, written by hand."""

from __future__ import annotations

from typing import Any

from gateway.history_openapi import HISTORY_SCHEMAS, history_path
from gateway.telemetry import AGGS, MAX_POINTS

AFTER_WAIT_S = 2.0  # how long a read with `after` waits for the views to catch up
# How long a token beyond the log's head may take to be reached before it is a 400: one the
# command API has just issued can be ahead of the relay's publish to the stream by a few ms.
BEYOND_HEAD_GRACE_S = 0.5

_PROBLEM = {"$ref": "#/components/responses/Problem"}


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _ok(schema: str, description: str) -> dict[str, Any]:
    return {
        "description": description,
        "headers": {
            "ETag": {"$ref": "#/components/headers/ETag"},
            "Iot-Position": {"$ref": "#/components/headers/IotPosition"},
        },
        "content": {"application/json": {"schema": _ref(schema)}},
    }


def _common(extra: dict[str, Any] | None = None) -> dict[str, Any]:
    responses: dict[str, Any] = {
        "304": {"description": "Not modified: `If-None-Match` matched the current ETag"},
        "400": {"$ref": "#/components/responses/BadRequest"},
        "401": _PROBLEM,
        "403": _PROBLEM,
        "422": _PROBLEM,
        "429": {"$ref": "#/components/responses/TooManyRequests"},
        "503": {"$ref": "#/components/responses/Unavailable"},
    }
    responses.update(extra or {})
    return responses


def _query(name: str, description: str, schema: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"name": name, "in": "query", "description": description, "schema": schema, **extra}


_IF_NONE_MATCH = {
    "name": "If-None-Match",
    "in": "header",
    "required": False,
    "description": "An ETag from an earlier answer: 304 without a body if it still matches",
    "schema": {"type": "string"},
}
_DEVICE_ID = {
    "name": "device_id",
    "in": "path",
    "required": True,
    "schema": {"type": "string", "pattern": "^[A-Za-z0-9_-]{1,64}$"},
}
_AFTER_TEXT = (
    "Consistency token: an event position, e.g. the `Iot-Position` header or `position` of a "
    "command API answer. The gateway answers once its views reflect every domain event up to "
    f"it, waiting at most {AFTER_WAIT_S:g} s for a position the log has reached (then 503 with "
    "Retry-After); 400 if not a non-negative integer, or if beyond the log's head (a position "
    f"never issued, still after {BEYOND_HEAD_GRACE_S:g} s)"
)
_AFTER = {
    "name": "after",
    "in": "query",
    "required": False,
    "description": _AFTER_TEXT + ". `Iot-After` is the same as a header (the larger wins).",
    "schema": {"type": "integer", "minimum": 0},
}
_IOT_AFTER = {
    "name": "Iot-After",
    "in": "header",
    "required": False,
    "description": _AFTER_TEXT + "; the same as the `after` query parameter.",
    "schema": {"type": "integer", "minimum": 0},
}
_NULLABLE_TIME = {"type": ["string", "null"], "format": "date-time"}


_SEVERITY = {"type": "string", "enum": ["critical", "warning", "info"]}
_ALERT_SCHEMAS: dict[str, Any] = {
    "Alert": {
        "type": "object",
        "description": "One alert of a rule for a device (device times as epoch ms)",
        "required": ["alert_id", "rule_id", "device_id", "severity", "status", "raised_at_ms"],
        "properties": {
            "alert_id": {"type": "string", "description": "`<device_id>.<rule_id>.<raised_at_ms>`"},
            "rule_id": {"type": "string"},
            "device_id": {"type": "string"},
            "severity": _SEVERITY,
            "metric": {"type": "string"},
            "status": {"type": "string", "enum": ["active", "acknowledged", "cleared"]},
            "acknowledged": {"type": "boolean"},
            "raised_value": {"type": ["number", "null"]},
            "raised_at_ms": {"type": "integer"},
            "retriggers": {"type": "integer"},
            "last_value": {"type": ["number", "null"]},
            "cleared_value": {"type": ["number", "null"]},
            "cleared_at_ms": {"type": ["integer", "null"]},
            "acknowledged_by": {"type": ["string", "null"]},
            "acknowledged_at": {"type": ["string", "null"], "format": "date-time"},
            "note": {"type": ["string", "null"]},
        },
    },
    "AlertPage": {
        "type": "object",
        "required": ["items", "next_cursor"],
        "properties": {
            "items": {"type": "array", "items": {"$ref": "#/components/schemas/Alert"}},
            "next_cursor": {"type": ["string", "null"]},
        },
    },
    "Rule": {
        "type": "object",
        "description": "An alert rule: its definition (see the command API), state and count of "
        "open alerts",
        "required": ["rule_id", "version", "enabled", "name", "metric", "severity", "open_alerts"],
        "properties": {
            "rule_id": {"type": "string"},
            "version": {"type": "integer"},
            "enabled": {"type": "boolean"},
            "name": {"type": "string"},
            "metric": {"type": "string"},
            "scope": {"type": "object"},
            "severity": _SEVERITY,
            "condition": {"type": "object"},
            "created_at": {"type": "string", "format": "date-time"},
            "updated_at": {"type": "string", "format": "date-time"},
            "open_alerts": {"type": "integer", "minimum": 0},
        },
    },
    "RuleList": {
        "type": "object",
        "required": ["items"],
        "properties": {"items": {"type": "array", "items": {"$ref": "#/components/schemas/Rule"}}},
    },
}
_CONSISTENT = [_IF_NONE_MATCH, _AFTER, _IOT_AFTER]
_ALERT_PATHS: dict[str, Any] = {
    "/alerts": {
        "get": {
            "summary": "A page of alerts, newest raise first, filtered",
            "operationId": "listAlerts",
            "parameters": [
                _query(
                    "status",
                    "`open` is active or acknowledged",
                    {"type": "string", "enum": ["active", "acknowledged", "cleared", "open"]},
                ),
                _query("severity", "Severity", _SEVERITY),
                _query("device_id", "One device's alerts", {"type": "string"}),
                _query("rule_id", "One rule's alerts", {"type": "string"}),
                _query("cursor", "`next_cursor` of the previous page", {"type": "string"}),
                _query(
                    "limit",
                    "Page size",
                    {"type": "integer", "minimum": 1, "maximum": 500, "default": 50},
                ),
                *_CONSISTENT,
            ],
            "responses": _common({"200": _ok("AlertPage", "A page of alerts")}),
        }
    },
    "/alerts/{alert_id}": {
        "get": {
            "summary": "One alert",
            "operationId": "getAlert",
            "parameters": [
                {"name": "alert_id", "in": "path", "required": True, "schema": {"type": "string"}},
                *_CONSISTENT,
            ],
            "responses": _common({"200": _ok("Alert", "The alert"), "404": _PROBLEM}),
        }
    },
    "/rules": {
        "get": {
            "summary": "Every alert rule in id order, with its open alerts",
            "operationId": "listRules",
            "parameters": [
                _query(
                    "enabled", "Only enabled (true) or disabled (false) rules", {"type": "boolean"}
                ),
                _query("severity", "Severity", _SEVERITY),
                *_CONSISTENT,
            ],
            "responses": _common({"200": _ok("RuleList", "The rules")}),
        }
    },
    "/rules/{rule_id}": {
        "get": {
            "summary": "One alert rule, with its open alerts",
            "operationId": "getRule",
            "parameters": [
                {"name": "rule_id", "in": "path", "required": True, "schema": {"type": "string"}},
                *_CONSISTENT,
            ],
            "responses": _common({"200": _ok("Rule", "The rule"), "404": _PROBLEM}),
        }
    },
}


_NUMBER_OR_NULL = {"type": ["number", "null"]}
_STATS = {
    "type": "object",
    "description": "A metric's values in the period: count (every value), min and max "
    "(numbers, or booleans), mean (numbers); null where none applies",
    "properties": {
        "count": {"type": "integer"},
        "min": {"type": ["number", "boolean", "null"]},
        "mean": _NUMBER_OR_NULL,
        "max": {"type": ["number", "boolean", "null"]},
    },
}
_REPORT_FIGURES = {
    "uptime": {**_NUMBER_OR_NULL, "description": "Share of the observed period online, 0..1"},
    "online_s": {"type": "number"},
    "readings": {"type": "integer"},
    "metrics": {"type": "object", "additionalProperties": _STATS},
    "alerts": {
        "type": "object",
        "properties": {
            "raised": {"type": "integer"},
            "acknowledged": {"type": "integer"},
            "cleared": {"type": "integer"},
            "raised_by_severity": {"type": "object", "additionalProperties": {"type": "integer"}},
            "mean_time_to_acknowledge_s": _NUMBER_OR_NULL,
            "mean_time_to_clear_s": _NUMBER_OR_NULL,
        },
    },
    "commands": {
        "type": "object",
        "properties": {
            name: {"type": "integer"}
            for name in ("finished", "acknowledged", "failed", "expired", "cancelled")
        }
        | {"success_rate": {**_NUMBER_OR_NULL, "description": "acknowledged / finished"}},
    },
    "history_complete": {"type": "boolean"},
}
_REPORT_SCHEMAS: dict[str, Any] = {
    "FleetReport": {
        "type": "object",
        "required": ["from", "to", "observed_to", "totals", "devices", "notes"],
        "properties": {
            "from": {"type": "string", "format": "date-time"},
            "to": {"type": "string", "format": "date-time"},
            "observed_to": {
                "type": "string",
                "format": "date-time",
                "description": "min(to, now): the end of the part of the period uptime covers",
            },
            "totals": {
                "type": "object",
                "properties": {"devices": {"type": "integer"}, **_REPORT_FIGURES},
            },
            "devices": {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {
                        "device_id": {"type": "string"},
                        "name": {"type": "string"},
                        "type": {"type": "string"},
                        "status": {"type": "string"},
                        "labels": {"type": "object", "additionalProperties": {"type": "string"}},
                        **_REPORT_FIGURES,
                    },
                },
            },
            "notes": {
                "type": "array",
                "items": {"type": "string"},
                "description": "How each figure is computed, and what is approximate",
            },
        },
    },
}
_REPORT_PATHS: dict[str, Any] = {
    "/reports/fleet": {
        "get": {
            "summary": "Fleet report over [from, to): uptime, readings, metric statistics, "
            "alerts and commands per device and for the fleet (at most 93 days and 10000 "
            "devices, else 422)",
            "operationId": "getFleetReport",
            "parameters": [
                _query(
                    "from",
                    "Start, RFC 3339 or epoch ms (default: a day before `to`)",
                    {"type": "string"},
                ),
                _query("to", "End, exclusive (default: now)", {"type": "string"}),
                _query(
                    "format",
                    "json (default), csv (a header, a row per device) or html (a printable "
                    "page with inline SVG charts)",
                    {"type": "string", "enum": ["json", "csv", "html"]},
                ),
                *_CONSISTENT,
            ],
            "responses": _common(
                {
                    "200": {
                        "description": "The report",
                        "headers": {"ETag": {"$ref": "#/components/headers/ETag"}},
                        "content": {
                            "application/json": {"schema": _ref("FleetReport")},
                            "text/csv": {"schema": {"type": "string"}},
                            "text/html": {"schema": {"type": "string"}},
                        },
                    },
                    "502": _PROBLEM,
                }
            ),
        }
    }
}

_NUMBER_OR_NULL_AGG = {"type": ["number", "null"]}
_AGGREGATE_SCHEMAS: dict[str, Any] = {
    "FleetAggregates": {
        "type": "object",
        "required": ["metric", "group_by", "from", "to", "every", "source", "groups"],
        "properties": {
            "metric": {"type": "string"},
            "group_by": {"type": "string", "description": "`type` or `label:<key>`"},
            "from": {"type": "string", "format": "date-time"},
            "to": {"type": "string", "format": "date-time"},
            "every": {"type": "string"},
            "source": {
                "type": "string",
                "enum": ["rollup_1m", "rollup_1h"],
                "description": "The rollups that answered (partial windows at the edges of "
                "the range come from finer data)",
            },
            "ungrouped_devices": {
                "type": "integer",
                "description": "Devices with data but no value for the key (or no view)",
            },
            "groups": {
                "type": "array",
                "items": {
                    "type": "object",
                    "required": ["group", "devices", "buckets"],
                    "properties": {
                        "group": {"type": "string", "description": "The type or label value"},
                        "devices": {"type": "integer", "description": "Devices with data"},
                        "buckets": {
                            "type": "array",
                            "items": {
                                "type": "object",
                                "required": ["time", "count", "min", "max", "mean"],
                                "properties": {
                                    "time": {
                                        "type": "integer",
                                        "description": "Start of the interval, epoch ms",
                                    },
                                    "count": {"type": "integer"},
                                    "min": _NUMBER_OR_NULL_AGG,
                                    "max": _NUMBER_OR_NULL_AGG,
                                    "mean": {
                                        **_NUMBER_OR_NULL_AGG,
                                        "description": "Weighted by each device's count",
                                    },
                                },
                            },
                        },
                    },
                },
            },
        },
    }
}
_AGGREGATE_PATHS: dict[str, Any] = {
    "/fleet/aggregates": {
        "get": {
            "summary": "One metric across the fleet per device type or label value and "
            "interval: count, min, max and count-weighted mean, from the rollups",
            "operationId": "getFleetAggregates",
            "description": "Group membership is each device's type or label now (from the "
            "views), applied to its whole history. 422 for a missing metric, an unknown "
            "`group_by`, `from` after `to`, an `every` that is no multiple of 1m, or more "
            "than 1000 intervals.",
            "parameters": [
                _query("metric", "The metric (exactly one)", {"type": "string"}, required=True),
                _query(
                    "group_by",
                    "`type`, or `label:<key>` (group by that label's value)",
                    {"type": "string"},
                    required=True,
                ),
                _query(
                    "from",
                    "RFC 3339 or epoch ms; default a day before `to`",
                    {"type": "string"},
                ),
                _query("to", "RFC 3339 or epoch ms; default now", {"type": "string"}),
                _query(
                    "every",
                    "Interval, a multiple of 1m (default 1h)",
                    {"type": "string", "pattern": "^[1-9][0-9]*(m|h|d|w)$"},
                ),
                *_CONSISTENT,
            ],
            "responses": _common(
                {"200": _ok("FleetAggregates", "Per group and interval"), "502": _PROBLEM}
            ),
        }
    }
}


_DEADLETTER_SCHEMAS: dict[str, Any] = {
    "DeadLetter": {
        "type": "object",
        "description": "Rejected input, quarantined in the dead-letter stream",
        "required": ["seq", "reason", "topic", "detail", "stored_at", "source", "size"],
        "properties": {
            "seq": {"type": "integer", "description": "Its sequence in the dead-letter stream"},
            "reason": {"type": "string", "description": "Why, e.g. unknown_device"},
            "topic": {"type": "string", "description": "The MQTT topic or stream subject"},
            "detail": {"type": "string"},
            "device_id": {"type": ["string", "null"]},
            "received_at_ms": {
                "type": ["integer", "null"],
                "description": "When the input arrived (epoch ms), if known",
            },
            "stored_at": {"type": "string", "format": "date-time"},
            "source": {
                "type": "string",
                "description": "bridge, or the projector that quarantined it",
            },
            "size": {"type": "integer", "description": "Bytes of the original input"},
            "data_base64": {"type": "string", "description": "The original bytes"},
            "preview": {
                "type": ["string", "null"],
                "description": "The first 1024 characters if UTF-8, else null",
            },
        },
    },
    "DeadLetterPage": {
        "type": "object",
        "required": ["items", "next_cursor"],
        "properties": {
            "items": {"type": "array", "items": _ref("DeadLetter")},
            "next_cursor": {
                "type": ["string", "null"],
                "description": "Pass as `cursor` to read on; null when nothing more could "
                "match. A page may hold fewer than `limit` (even none) and still have one: "
                "each page looks at a bounded number of messages",
            },
        },
    },
}
_DEADLETTER_PATHS: dict[str, Any] = {
    "/deadletters": {
        "get": {
            "summary": "A page of dead letters in arrival order (admin token only)",
            "operationId": "listDeadLetters",
            "description": "Rejected messages, quarantined; `iot deadletters replay` sends them "
            "through today's validation again. 403 for a viewer or operator token.",
            "parameters": [
                _query(
                    "device_id",
                    "One device's",
                    {"type": "string", "pattern": "^[A-Za-z0-9_-]{1,64}$"},
                ),
                _query(
                    "reason",
                    "One reason's, e.g. unknown_device",
                    {"type": "string", "pattern": "^[A-Za-z0-9_-]{1,64}$"},
                ),
                _query("since", "Received at or after: RFC 3339 or epoch ms", {"type": "string"}),
                _query(
                    "cursor",
                    "`next_cursor` of the previous page",
                    {"type": "string", "pattern": "^[0-9]{1,19}$"},
                ),
                _query(
                    "limit",
                    "Page size",
                    {"type": "integer", "minimum": 1, "maximum": 1000, "default": 100},
                ),
                _IF_NONE_MATCH,
            ],
            "responses": {
                "200": {
                    "description": "A page of dead letters",
                    "headers": {"ETag": {"$ref": "#/components/headers/ETag"}},
                    "content": {"application/json": {"schema": _ref("DeadLetterPage")}},
                },
                "304": {"description": "Not modified: `If-None-Match` matched the current ETag"},
                "401": _PROBLEM,
                "403": _PROBLEM,
                "422": _PROBLEM,
                "429": {"$ref": "#/components/responses/TooManyRequests"},
                "503": {"$ref": "#/components/responses/Unavailable"},
            },
        }
    }
}


def openapi_document() -> dict[str, Any]:
    statuses = ["provisioned", "active", "suspended", "decommissioned"]
    schemas: dict[str, Any] = {
        "DeviceSummary": {
            "type": "object",
            "required": ["device_id", "name", "type", "labels", "status", "online", "last_seen"],
            "properties": {
                "device_id": {"type": "string"},
                "name": {"type": "string"},
                "type": {"type": "string"},
                "labels": {"type": "object", "additionalProperties": {"type": "string"}},
                "status": {"type": "string", "enum": statuses},
                "online": {"type": "boolean"},
                "last_seen": _NULLABLE_TIME,
            },
        },
        "DevicePage": {
            "type": "object",
            "required": ["items", "next_cursor"],
            "properties": {
                "items": {"type": "array", "items": _ref("DeviceSummary")},
                "next_cursor": {
                    "type": ["string", "null"],
                    "description": "Pass as `cursor` for the next page; null on the last page",
                },
            },
        },
        "Device": {
            "type": "object",
            "properties": {
                "device_id": {"type": "string"},
                "name": {"type": "string"},
                "type": {"type": "string"},
                "labels": {"type": "object", "additionalProperties": {"type": "string"}},
                "status": {"type": "string", "enum": statuses},
                "registered_at": {"type": "string", "format": "date-time"},
                "updated_at": {"type": "string", "format": "date-time"},
                "version": {"type": ["integer", "null"], "description": "Last applied event"},
                "desired": {
                    "type": "object",
                    "properties": {
                        "version": {"type": "integer"},
                        "config": {"type": "object"},
                    },
                },
                "reported": {
                    "type": ["object", "null"],
                    "description": "The newest reported state, without the reserved key "
                    "`config_version`; null before the first report",
                },
                "reported_at": _NULLABLE_TIME,
                "reported_config_version": {
                    "type": ["integer", "null"],
                    "description": "`config_version` of the newest reported state: the desired "
                    "version the device last reported applying",
                },
                "delta": {
                    "type": "object",
                    "description": "Desired values missing from reported or different from it "
                    "(nested objects compared key by key)",
                },
                "in_sync": {
                    "type": "boolean",
                    "description": "The delta is empty and the device reported applying the "
                    "current desired version",
                },
                "online": {"type": "boolean"},
                "last_seen": _NULLABLE_TIME,
                "metrics": {
                    "type": "object",
                    "description": "Latest value of each metric by device time",
                    "additionalProperties": {
                        "type": "object",
                        "properties": {
                            "value": {"type": ["number", "boolean", "string"]},
                            "ts": {"type": "string", "format": "date-time"},
                        },
                    },
                },
                "pending_commands": {
                    "type": "array",
                    "description": "Commands not finished yet, in request order",
                    "items": _ref("PendingCommand"),
                },
                "recent_commands": {
                    "type": "array",
                    "description": "The last 20 finished commands, newest first",
                    "items": _ref("FinishedCommand"),
                },
                "alerts": {
                    "type": "array",
                    "description": "The device's open alerts, oldest raised first",
                    "items": _ref("OpenAlert"),
                },
            },
        },
        "OpenAlert": {
            "type": "object",
            "properties": {
                "alert_id": {
                    "type": "string",
                    "description": "<device_id>.<rule_id>.<raised_at_ms>",
                },
                "rule_id": {"type": "string"},
                "severity": {"type": "string", "enum": ["critical", "warning", "info"]},
                "metric": {"type": "string"},
                "status": {"type": "string", "enum": ["active", "acknowledged"]},
                "raised_value": {"type": ["number", "null"]},
                "raised_at": {
                    "type": "string",
                    "format": "date-time",
                    "description": "Device time of the triggering reading",
                },
                "retriggers": {"type": "integer"},
                "last_value": {"type": ["number", "null"]},
                "acknowledged_by": {"type": ["string", "null"]},
                "acknowledged_at": _NULLABLE_TIME,
                "note": {"type": ["string", "null"]},
            },
        },
        "PendingCommand": {
            "type": "object",
            "required": ["command_id", "name", "args", "state", "requested_at", "expires_at"],
            "properties": {
                "command_id": {"type": "string"},
                "name": {"type": "string"},
                "args": {"type": "object"},
                "state": {
                    "type": "string",
                    "enum": ["requested", "sent"],
                    "description": "`sent`: the broker accepted it for the device (QoS 1)",
                },
                "requested_at": {"type": "string", "format": "date-time"},
                "sent_at": _NULLABLE_TIME,
                "expires_at": {"type": "string", "format": "date-time"},
            },
        },
        "FinishedCommand": {
            "type": "object",
            "required": ["command_id", "name", "state", "finished_at"],
            "properties": {
                "command_id": {"type": "string"},
                "name": {"type": ["string", "null"]},
                "state": {
                    "type": "string",
                    "enum": ["acknowledged", "failed", "expired", "cancelled"],
                },
                "requested_at": _NULLABLE_TIME,
                "finished_at": {"type": "string", "format": "date-time"},
                "result": {
                    "type": "object",
                    "description": "The device's result (acknowledged and failed only)",
                },
                "reason": {"type": "string", "description": "Why (cancelled only)"},
            },
        },
        "Telemetry": {
            "type": "object",
            "required": ["device_id", "from", "to", "every", "agg", "series"],
            "properties": {
                "device_id": {"type": "string"},
                "from": {"type": "string", "format": "date-time"},
                "to": {"type": "string", "format": "date-time"},
                "every": {"type": ["string", "null"]},
                "agg": {"type": ["string", "null"], "enum": [*AGGS, None]},
                "source": {
                    "type": "string",
                    "enum": ["raw", "rollup_1m", "rollup_1h"],
                    "description": "Downsampled answers only: what answered. A long range "
                    "(over 6 h, or older than the raw retention) whose `every` is a multiple "
                    "of 1h (1m) comes from the 1-hour (1-minute) rollups, the same figures as "
                    "from the raw points",
                },
                "series": {
                    "type": "object",
                    "description": "Per metric, [epoch ms, value] pairs in time order; "
                    "downsampled points carry the start of their interval",
                    "additionalProperties": {
                        "type": "array",
                        "items": {
                            "type": "array",
                            "prefixItems": [
                                {"type": "integer"},
                                {"type": ["number", "boolean", "string"]},
                            ],
                        },
                    },
                },
            },
        },
        **_ALERT_SCHEMAS,
        **HISTORY_SCHEMAS,
        **_REPORT_SCHEMAS,
        **_AGGREGATE_SCHEMAS,
        **_DEADLETTER_SCHEMAS,
        "Me": {
            "type": "object",
            "required": ["name", "role"],
            "properties": {
                "name": {"type": "string", "description": "The token's name (`token=role:name`)"},
                "role": {"type": "string", "enum": ["viewer", "operator", "admin"]},
            },
        },
        "Fleet": {
            "type": "object",
            "required": [
                "devices",
                "by_status",
                "online",
                "readings_last_minute",
                "commands_pending",
            ],
            "properties": {
                "devices": {"type": "integer"},
                "by_status": {
                    "type": "object",
                    "properties": {s: {"type": "integer"} for s in statuses},
                },
                "online": {"type": "integer"},
                "readings_last_minute": {
                    "type": "integer",
                    "description": "Estimate: the current minute's distinct readings plus the "
                    "previous minute's weighted by its share of the last 60 s (HyperLogLog, "
                    "~0.81% standard error)",
                },
                "commands_pending": {
                    "type": "integer",
                    "description": "Commands requested or sent, not yet finished",
                },
                "alerts_open": {
                    "type": "object",
                    "description": "Open alerts (active or acknowledged) by severity",
                    "properties": {s: {"type": "integer"} for s in ("critical", "warning", "info")},
                },
            },
        },
        "Problem": {
            "type": "object",
            "description": "RFC 9457 problem details",
            "properties": {
                "type": {"type": "string"},
                "title": {"type": "string"},
                "status": {"type": "integer"},
                "detail": {"type": "string"},
                "instance": {"type": "string"},
                "errors": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "properties": {"field": {"type": "string"}, "message": {"type": "string"}},
                    },
                },
                "hint": {"type": "string"},
                "suggested_every": {"type": "string"},
                "max_points": {"type": "integer"},
                "position": {
                    "type": "integer",
                    "description": "503 to a read with `after`: the views' current position",
                },
                "after": {
                    "type": "integer",
                    "description": "400 or 503 to a read with `after`: the position asked for",
                },
                "head": {
                    "type": "integer",
                    "description": "400 to a read with `after` beyond the log's head: the "
                    "event-store position of the newest event in the log",
                },
                "rebuilding": {
                    "type": "boolean",
                    "description": "503 while the views are being rebuilt from the log after "
                    "Redis lost its data: true (no view is answered until they are whole)",
                },
            },
        },
    }
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "IoT read-only gateway",
            "version": "1.0.0",
            "description": "Views of the device fleet for dashboards. Bearer token with the "
            "viewer role or above; answers carry an ETag and honour If-None-Match; each token "
            "may make a limited number of requests a minute (429 with Retry-After beyond). "
            "Read your writes: pass the `Iot-Position` of a command API answer as `after` (or "
            "the `Iot-After` header) and the answer reflects that change; every view answer "
            "carries `Iot-Position`, how far its views have caught up.",
        },
        "servers": [{"url": "/api/v1"}],
        "security": [{"bearer": []}],
        "paths": {
            "/devices": {
                "get": {
                    "summary": "A page of devices in id order, filtered",
                    "operationId": "listDevices",
                    "parameters": [
                        _query("status", "Lifecycle status", {"type": "string", "enum": statuses}),
                        _query(
                            "label",
                            "`key:value`; repeat for several (all must match)",
                            {"type": "array", "items": {"type": "string"}},
                            style="form",
                            explode=True,
                        ),
                        _query(
                            "prefix",
                            "Only devices whose id starts with this (a search box)",
                            {"type": "string", "maxLength": 128},
                        ),
                        _query("cursor", "`next_cursor` of the previous page", {"type": "string"}),
                        _query(
                            "limit",
                            "Page size",
                            {"type": "integer", "minimum": 1, "maximum": 500, "default": 50},
                        ),
                        _IF_NONE_MATCH,
                        _AFTER,
                        _IOT_AFTER,
                    ],
                    "responses": _common({"200": _ok("DevicePage", "A page of devices")}),
                }
            },
            "/devices/{device_id}": {
                "get": {
                    "summary": "The device view",
                    "operationId": "getDevice",
                    "parameters": [_DEVICE_ID, _IF_NONE_MATCH, _AFTER, _IOT_AFTER],
                    "responses": _common({"200": _ok("Device", "The device"), "404": _PROBLEM}),
                }
            },
            "/devices/{device_id}/telemetry": {
                "get": {
                    "summary": "A device's time series, raw or downsampled",
                    "operationId": "getTelemetry",
                    "description": f"At most {MAX_POINTS} points: a larger answer is refused with "
                    "400 and a `hint` naming the smallest `every` that fits. The range is "
                    "[from, to). Long downsampled ranges are answered from the rollups "
                    "(`source`).",
                    "parameters": [
                        _DEVICE_ID,
                        _query(
                            "metric",
                            "Metric name(s), repeated or comma-separated; all when absent",
                            {"type": "array", "items": {"type": "string"}},
                            style="form",
                            explode=True,
                        ),
                        _query(
                            "from",
                            "RFC 3339 or epoch ms; default `to` minus one hour",
                            {"type": "string"},
                        ),
                        _query("to", "RFC 3339 or epoch ms; default now", {"type": "string"}),
                        _query(
                            "every",
                            "Downsampling interval, e.g. 10s, 1m, 1h",
                            {"type": "string", "pattern": "^[1-9][0-9]*(ms|s|m|h|d|w)$"},
                        ),
                        _query(
                            "agg",
                            "Aggregate per interval (needs `every`; default mean)",
                            {"type": "string", "enum": list(AGGS)},
                        ),
                        _IF_NONE_MATCH,
                        _AFTER,
                        _IOT_AFTER,
                    ],
                    "responses": _common(
                        {
                            "200": _ok("Telemetry", "The series"),
                            "404": _PROBLEM,
                            "502": _PROBLEM,
                        }
                    ),
                }
            },
            "/devices/{device_id}/history": history_path(
                [_DEVICE_ID, _IF_NONE_MATCH, _AFTER, _IOT_AFTER], _common()
            ),
            **_ALERT_PATHS,
            **_REPORT_PATHS,
            **_AGGREGATE_PATHS,
            **_DEADLETTER_PATHS,
            "/fleet": {
                "get": {
                    "summary": "Fleet counts",
                    "operationId": "getFleet",
                    "parameters": [_IF_NONE_MATCH, _AFTER, _IOT_AFTER],
                    "responses": _common({"200": _ok("Fleet", "Counts")}),
                }
            },
            "/me": {
                "get": {
                    "summary": "The token's name and role (what a dashboard may offer)",
                    "operationId": "getMe",
                    "responses": _common({"200": _ok("Me", "The caller")}),
                }
            },
            "/stream": {
                "get": {
                    "summary": "Server-Sent Events: `change` with {device_id} per view change",
                    "operationId": "streamChanges",
                    "responses": {
                        "200": {
                            "description": "An endless event stream (keep-alive comments "
                            "every 15 s)",
                            "content": {"text/event-stream": {"schema": {"type": "string"}}},
                        },
                        "401": _PROBLEM,
                        "403": _PROBLEM,
                        "429": {"$ref": "#/components/responses/TooManyRequests"},
                    },
                }
            },
        },
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "headers": {
                "ETag": {"description": "Entity tag of the body", "schema": {"type": "string"}},
                "IotPosition": {
                    "description": "The views' position when the answer was read: it reflects "
                    "every domain event up to this event-store position (compare with the "
                    "`Iot-Position` of a command API answer)",
                    "schema": {"type": "integer", "minimum": 0},
                },
            },
            "responses": {
                "Problem": {
                    "description": "An error",
                    "content": {"application/problem+json": {"schema": _ref("Problem")}},
                },
                "BadRequest": {
                    "description": "A malformed parameter, a telemetry answer over the point "
                    "bound (with a `hint`), or a consistency token (`after`, `Iot-After`) that "
                    "is no event position or is beyond the log's head: a position never issued "
                    "(the body's `after` and `head` say which)",
                    "content": {"application/problem+json": {"schema": _ref("Problem")}},
                },
                "Unavailable": {
                    "description": "The views store is unreachable; the views are being "
                    "rebuilt from the log after Redis lost its data (the body's `rebuilding` "
                    "is true; every view read answers this until they are whole); or the log "
                    f"has reached `after` but the views did not within {AFTER_WAIT_S:g} s (the "
                    "body's `position` says where they are). Retry after Retry-After",
                    "headers": {
                        "Retry-After": {
                            "description": "Seconds to wait before retrying",
                            "schema": {"type": "integer"},
                        },
                        "Iot-Position": {"$ref": "#/components/headers/IotPosition"},
                    },
                    "content": {"application/problem+json": {"schema": _ref("Problem")}},
                },
                "TooManyRequests": {
                    "description": "The token's requests this minute exceed the limit",
                    "headers": {
                        "Retry-After": {
                            "description": "Seconds until the next window",
                            "schema": {"type": "integer"},
                        }
                    },
                    "content": {"application/problem+json": {"schema": _ref("Problem")}},
                },
            },
            "schemas": schemas,
        },
    }
