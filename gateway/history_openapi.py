"""The OpenAPI description of `GET /devices/{device_id}/history` (merged by gateway.openapi)."""

from __future__ import annotations

from typing import Any

from gateway.history import EVENT_TYPES

_STATE = {
    "type": "object",
    "description": "A device's state: status, desired and reported config, labels, "
    "online, name and type",
    "properties": {
        "name": {"type": ["string", "null"]},
        "type": {"type": ["string", "null"]},
        "labels": {"type": ["object", "null"], "additionalProperties": {"type": "string"}},
        "status": {
            "type": ["string", "null"],
            "enum": ["provisioned", "active", "suspended", "decommissioned", None],
        },
        "desired": {
            "type": ["object", "null"],
            "properties": {"version": {"type": "integer"}, "config": {"type": "object"}},
        },
        "online": {"type": "boolean"},
        "reported": {
            "type": ["object", "null"],
            "description": "In `as_of` and `diff` only: the last state the device reported by "
            "then (null: none kept)",
            "properties": {
                "config": {"type": "object"},
                "config_version": {"type": ["integer", "null"]},
            },
        },
    },
}

HISTORY_SCHEMAS: dict[str, Any] = {
    "HistoryEntry": {
        "type": "object",
        "required": ["version", "type", "at", "position", "caused_by", "data", "changes"],
        "properties": {
            "version": {"type": "integer", "minimum": 1},
            "type": {"type": "string", "enum": list(EVENT_TYPES)},
            "at": {"type": "string", "format": "date-time"},
            "position": {"type": "integer", "description": "The event's position in the log"},
            "caused_by": {
                "type": "string",
                "description": "The name of the API token that caused it (never the token), or "
                "`device`, `bridge`, `analytics` or `system`",
            },
            "data": {"type": "object", "description": "The event's own fields"},
            "changes": {
                **_STATE,
                "description": "The state fields the event changed, with their new values",
            },
        },
    },
    "HistoryPage": {
        "type": "object",
        "required": ["items", "next_cursor"],
        "properties": {
            "items": {"type": "array", "items": {"$ref": "#/components/schemas/HistoryEntry"}},
            "next_cursor": {"type": ["string", "null"]},
        },
    },
    "HistoryState": {
        "type": "object",
        "required": ["device_id", "as_of", "version", "at", "state"],
        "properties": {
            "device_id": {"type": "string"},
            "as_of": {"type": "string", "format": "date-time"},
            "version": {"type": "integer", "description": "The last version at or before as_of"},
            "at": {"type": "string", "description": "That version's time"},
            "state": _STATE,
        },
    },
    "HistoryDiff": {
        "type": "object",
        "required": ["device_id", "from", "to", "from_version", "to_version", "events", "changes"],
        "properties": {
            "device_id": {"type": "string"},
            "from": {"type": "string", "format": "date-time"},
            "to": {"type": "string", "format": "date-time"},
            "from_version": {"type": "integer", "description": "0: not registered at `from`"},
            "to_version": {"type": "integer"},
            "events": {"type": "integer", "description": "Events between the two versions"},
            "changes": {
                "type": "object",
                "description": "Each state field that differs: {from, to}",
                "additionalProperties": {
                    "type": "object",
                    "required": ["from", "to"],
                    "properties": {"from": {}, "to": {}},
                },
            },
        },
    },
}


def history_path(parameters: list[dict[str, Any]], responses: dict[str, Any]) -> dict[str, Any]:
    """The path item; `parameters` are the device id and the consistency parameters, and
    `responses` the common ones (gateway.openapi)."""

    def query(name: str, description: str, schema: dict[str, Any]) -> dict[str, Any]:
        return {"name": name, "in": "query", "description": description, "schema": schema}

    time = {"type": "string"}
    return {
        "get": {
            "summary": "A device's history: its events, its state at a time, or what changed",
            "operationId": "getDeviceHistory",
            "description": "Without `as_of` or `diff`: the device's domain events newest first "
            "(HistoryPage), filtered by time (`from`, `to`, inclusive) and `types`, paged with "
            "`cursor` (stable while events are appended). With `as_of=T`: the device's state "
            "after its last event at or before T (HistoryState; 404 before its registration). "
            "With `diff=T1,T2`: what changed between the two times (HistoryDiff). Times are "
            "RFC 3339 or epoch ms.",
            "parameters": [
                parameters[0],
                query("from", "Events at or after this time", time),
                query("to", "Events at or before this time", time),
                query(
                    "types",
                    f"Comma-separated event types: {', '.join(EVENT_TYPES)}",
                    {"type": "string"},
                ),
                query("cursor", "From a previous page's next_cursor", {"type": "string"}),
                query("limit", "1 to 500, default 50", {"type": "integer"}),
                query("as_of", "The state at this time", time),
                query("diff", "T1,T2: what changed between two times", {"type": "string"}),
                *parameters[1:],
            ],
            "responses": {
                **responses,
                "200": {
                    "description": "A page of events, a state, or a diff",
                    "content": {
                        "application/json": {
                            "schema": {
                                "oneOf": [
                                    {"$ref": "#/components/schemas/HistoryPage"},
                                    {"$ref": "#/components/schemas/HistoryState"},
                                    {"$ref": "#/components/schemas/HistoryDiff"},
                                ]
                            }
                        }
                    },
                },
                "404": {"$ref": "#/components/responses/Problem"},
            },
        }
    }
