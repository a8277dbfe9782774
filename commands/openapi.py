"""The OpenAPI 3 description of the operator command API, written by hand, and its endpoint."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import msgspec
from starlette.requests import Request
from starlette.responses import Response

from domain.alerts import MAX_NOTE
from domain.device import (
    COMMAND_NAME,
    DEVICE_ID,
    LABEL_KEY,
    MAX_LABEL_VALUE,
    MAX_LABELS,
    MAX_NAME,
    MAX_PENDING_COMMANDS,
    MAX_TTL_S,
    MAX_TYPE,
    MIN_TTL_S,
    RECENT_ALERTS,
    RECENT_COMMANDS,
    CommandState,
    Status,
)
from domain.rules import (
    MAX_FOR_S,
    MAX_SCOPE_DEVICES,
    METRIC_NAME,
    OPS,
    RULE_ID,
    SEVERITIES,
)
from infra.httpkit import MAX_BODY, PROBLEM, etag_matches, etag_of
from infra.settings import ROLES

MAX_REASON = 500  # commands.api's `Reason`
_encode = msgspec.json.Encoder().encode


POSITION_ANSWERED = {
    "type": "integer",
    "minimum": 0,
    "description": "The event-store position of the change's last event (0 when the request "
    "changed nothing and appended no event), also the `Iot-Position` header: pass it to the "
    "gateway as `after`",
}


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _problem(description: str) -> dict[str, str]:
    return {"$ref": "#/components/responses/Problem", "description": description}


def _ok(schema: str, description: str, *, created: bool = False) -> dict[str, Any]:
    headers: dict[str, Any] = {
        "ETag": {"$ref": "#/components/headers/ETag"},
        "Iot-Position": {"$ref": "#/components/headers/IotPosition"},
        "Idempotent-Replayed": {"$ref": "#/components/headers/IdempotentReplayed"},
    }
    if created:
        headers["Location"] = {
            "description": "The new resource's path, `/api/v1/devices/{device_id}` or "
            "`/api/v1/rules/{rule_id}` (not on a replay)",
            "schema": {"type": "string"},
        }
    return {
        "description": description,
        "headers": headers,
        "content": {"application/json": {"schema": _ref(schema)}},
    }


def _body(schema: str, required: bool, description: str) -> dict[str, Any]:
    return {
        "required": required,
        "description": description,
        "content": {"application/json": {"schema": _ref(schema)}},
    }


def _common(role: str, if_match: bool, extra: dict[str, Any]) -> dict[str, Any]:
    headers = "`Idempotency-Key` or `If-Match`" if if_match else "`Idempotency-Key`"
    responses: dict[str, Any] = {
        "400": _problem(f"Malformed JSON, or a malformed {headers}"),
        "401": {"$ref": "#/components/responses/Unauthorized"},
        "403": _problem(f"The token's role is below {role}"),
        "413": _problem(f"The body is over {MAX_BODY} bytes"),
        "422": _problem(
            "A field fails validation (`errors` names it when the body's shape is at fault), "
            "or the `Idempotency-Key` was used for a different request"
        ),
    }
    responses.update(extra)
    responses["503"] = _unavailable(responses.get("503"))
    return dict(sorted(responses.items()))


_OVERLOADED = (
    "Overloaded: the API handles at most `IOT_COMMANDS_MAX_REQUESTS` requests at once (default "
    "64) and refuses one more at once, before reading its body, with `Retry-After`; nothing "
    "was changed, retry after that many seconds"
)


def _unavailable(other: dict[str, Any] | None) -> dict[str, Any]:
    """503: overload shed at the admission limit, and the operation's own 503 if it has one."""
    description = _OVERLOADED
    if other is not None:
        description += "; or: " + other["description"]
    return {
        "description": description,
        "headers": {"Retry-After": {"$ref": "#/components/headers/RetryAfter"}},
        "content": {PROBLEM: {"schema": _ref("Problem")}},
    }


def _operation(
    operation_id: str,
    summary: str,
    description: str,
    role: str,
    parameters: list[dict[str, Any]],
    body: dict[str, Any],
    responses: dict[str, Any],
) -> dict[str, Any]:
    above = ROLES[ROLES.index(role) :]
    return {
        "summary": summary,
        "operationId": operation_id,
        "description": f"{description}\n\nRole: {role} or above ({', '.join(above)}).",
        "x-required-role": role,
        "parameters": parameters,
        "requestBody": body,
        "responses": _common(role, _IF_MATCH in parameters, responses),
    }


_DEVICE_ID = {
    "name": "device_id",
    "in": "path",
    "required": True,
    "description": "The device's id; an id no device has (also one not matching the pattern) "
    "is 404",
    "schema": {"type": "string", "pattern": DEVICE_ID.pattern},
}
_COMMAND_ID = {
    "name": "command_id",
    "in": "path",
    "required": True,
    "description": "`command_id` of the answer that requested the command",
    "schema": {"type": "string"},
}
_ALERT_ID = {
    "name": "alert_id",
    "in": "path",
    "required": True,
    "description": "`<device_id>.<rule_id>.<raised_at_ms>`, as the gateway shows it",
    "schema": {"type": "string"},
}
_IDEMPOTENCY_KEY = {
    "name": "Idempotency-Key",
    "in": "header",
    "required": False,
    "description": "Scoped to the token, kept at least 24 hours. A retry with the same key and "
    "the same request (method, path, body) gets the first answer again, with `Idempotent-Replayed: "
    "true`, and changes nothing; error answers are kept too, except 503. The same key with a "
    "different request is 422. Not 1 to 255 characters: 400.",
    "schema": {"type": "string", "minLength": 1, "maxLength": 255},
}
_IF_MATCH = {
    "name": "If-Match",
    "in": "header",
    "required": False,
    "description": 'The device version the change expects, as in the `ETag` of an answer: `"3"` '
    "(quotes and a `W/` prefix are optional). Another current version is 412 with "
    "`current_version`; a value that is not a version (also `*`) is 400. Without it, a change "
    "that loses a race with another writer is re-run on the fresh state.",
    "schema": {"type": "string"},
}
_CHANGE_PARAMETERS = [_DEVICE_ID, _IF_MATCH, _IDEMPOTENCY_KEY]
_CONTENTION = {
    "$ref": "#/components/responses/Contention",
    "description": "Without `If-Match`, every attempt lost a race with another writer; retry",
}


def _device(extra: dict[str, Any], required: list[str], description: str) -> dict[str, Any]:
    return {
        "type": "object",
        "description": description,
        "required": ["device_id", "version", "status", *required],
        "properties": {
            "device_id": {"type": "string"},
            "version": {
                "type": "integer",
                "minimum": 1,
                "description": "The device's event version after the change (registration is "
                "1); the `ETag`, to pass as `If-Match`",
            },
            "status": {"type": "string", "enum": [s.value for s in Status]},
            **extra,
            "position": {
                **POSITION_ANSWERED,
                "description": f"{POSITION_ANSWERED['description']}. Absent only on a replay "
                "whose position cannot be found",
            },
        },
    }


_RULE_ID = {
    "name": "rule_id",
    "in": "path",
    "required": True,
    "description": "The rule's id; an id no rule has is 404",
    "schema": {"type": "string", "pattern": RULE_ID.pattern},
}
_RULE_IF_MATCH = {
    **_IF_MATCH,
    "description": str(_IF_MATCH["description"]).replace("device", "rule"),
}
_RULE_INVALID = (
    "The definition is not valid: `errors` lists every problem, each with `field` (a JSON "
    "path such as `condition.clear`) and `message`; or the `Idempotency-Key` was used for a "
    "different request"
)


def _rule_schemas(labels: dict[str, Any]) -> dict[str, Any]:
    condition: dict[str, Any] = {
        "oneOf": [
            {
                "type": "object",
                "required": ["kind", "op", "value"],
                "additionalProperties": False,
                "properties": {
                    "kind": {"const": "threshold"},
                    "op": {"type": "string", "enum": list(OPS)},
                    "value": {"type": "number"},
                    "clear": {
                        "type": "number",
                        "description": "Hysteresis: the level past which an open alert clears "
                        "(default `value`); for `>`/`>=` at most `value`, for `<`/`<=` at least",
                    },
                    "for_s": {"type": "number", "minimum": 0, "maximum": MAX_FOR_S, "default": 0},
                },
            },
            {
                "type": "object",
                "required": ["kind", "max_per_s"],
                "additionalProperties": False,
                "properties": {
                    "kind": {"const": "rate"},
                    "max_per_s": {"type": "number", "exclusiveMinimum": 0},
                    "for_s": {"type": "number", "minimum": 0, "maximum": MAX_FOR_S, "default": 0},
                },
            },
            {
                "type": "object",
                "required": ["kind", "for_s"],
                "additionalProperties": False,
                "properties": {
                    "kind": {"const": "absent"},
                    "for_s": {"type": "number", "exclusiveMinimum": 0, "maximum": MAX_FOR_S},
                },
            },
            {
                "type": "object",
                "required": ["kind"],
                "additionalProperties": False,
                "description": "A streaming detector that learns the series' own normal and "
                "raises on a departure from it (spikes, dips, level shifts, changed variance, a "
                "broken daily or weekly rhythm, a slow drift); no threshold to give",
                "properties": {
                    "kind": {"const": "anomaly"},
                    "sensitivity": {
                        "type": "number",
                        "minimum": 0,
                        "maximum": 1,
                        "default": 0.5,
                        "description": "Higher raises on smaller departures",
                    },
                },
            },
        ]
    }
    definition = {
        "name": {"type": "string", "minLength": 1, "maxLength": MAX_NAME},
        "metric": {
            "type": "string",
            "description": f"A metric name (`{METRIC_NAME.pattern}`), or `*` (any message of "
            "the device) for `absent`",
        },
        "scope": {
            "type": "object",
            "additionalProperties": False,
            "description": "Every part given must match; empty or absent: every device",
            "properties": {
                "device_ids": {
                    "type": "array",
                    "minItems": 1,
                    "maxItems": MAX_SCOPE_DEVICES,
                    "items": {"type": "string", "pattern": DEVICE_ID.pattern},
                },
                "type": {"type": "string", "minLength": 1, "maxLength": MAX_TYPE},
                "labels": labels,
            },
        },
        "severity": {"type": "string", "enum": list(SEVERITIES)},
        "condition": condition,
    }
    # An answer spells every scope member, null where the rule does not restrict it.
    scope: dict[str, Any] = definition["scope"]  # type: ignore[assignment]
    answered_scope = {
        **scope,
        "properties": {
            name: {**member, "type": [member["type"], "null"]}
            for name, member in scope["properties"].items()
        },
    }
    # ... and a threshold's `clear` as null where none was given (the level is then `value`).
    threshold, *other_kinds = condition["oneOf"]
    clear = threshold["properties"]["clear"]
    answered_condition = {
        "oneOf": [
            {
                **threshold,
                "properties": {
                    **threshold["properties"],
                    "clear": {**clear, "type": [clear["type"], "null"]},
                },
            },
            *other_kinds,
        ]
    }
    return {
        "RuleBody": {
            "type": "object",
            "description": "A rule definition, and optionally its id",
            "required": ["name", "metric", "severity", "condition"],
            "additionalProperties": False,
            "properties": {
                "rule_id": {
                    "type": "string",
                    "pattern": RULE_ID.pattern,
                    "description": "Absent: the server picks `r-<12 hex digits>`",
                },
                **definition,
            },
        },
        "RulePatch": {
            "type": "object",
            "description": "A JSON merge patch (RFC 7396) of the definition: members given "
            "replace (objects merge), `null` removes; the result is validated whole",
            "additionalProperties": False,
            "properties": definition,
        },
        "Rule": {
            "type": "object",
            "required": ["rule_id", "version", "enabled", "name", "metric", "severity"],
            "properties": {
                "rule_id": {"type": "string"},
                "version": {
                    "type": "integer",
                    "minimum": 1,
                    "description": "The rule's event version (the `ETag`)",
                },
                "enabled": {"type": "boolean"},
                **definition,
                "scope": answered_scope,
                "condition": answered_condition,
                "position": POSITION_ANSWERED,
            },
        },
    }


def _rule_paths() -> dict[str, Any]:
    change = [_RULE_ID, _RULE_IF_MATCH, _IDEMPOTENCY_KEY]
    not_found = _problem("No rule with this id")
    mismatch = _problem("`If-Match` names another version")

    def switch(enable: bool) -> dict[str, Any]:
        verb = "enable" if enable else "disable"
        return {
            "post": _operation(
                f"{verb}Rule",
                f"{verb.capitalize()} a rule",
                f"{verb.capitalize()}s the rule from the time its event is stored on.",
                "operator",
                change,
                _body("EmptyBody", False, "Empty"),
                {
                    "200": _ok("Rule", f"{verb.capitalize()}d"),
                    "404": not_found,
                    "409": _problem(f"The rule is already {verb}d"),
                    "412": mismatch,
                    "503": _CONTENTION,
                },
            )
        }

    return {
        "/rules": {
            "post": _operation(
                "createRule",
                "Create an alert rule",
                "Creates the rule, enabled: it judges readings stored from then on.",
                "operator",
                [_IDEMPOTENCY_KEY],
                _body("RuleBody", True, "The rule"),
                {
                    "201": _ok("Rule", "Created", created=True),
                    "409": _problem("A rule with this id exists"),
                    "422": _problem(_RULE_INVALID),
                },
            )
        },
        "/rules/{rule_id}": {
            "patch": _operation(
                "updateRule",
                "Change an alert rule",
                "Merges the patch into the definition; a result identical to the current "
                "definition records nothing and answers the unchanged rule.",
                "operator",
                change,
                _body("RulePatch", False, "The merge patch (empty: no change)"),
                {
                    "200": _ok("Rule", "Updated (or unchanged)"),
                    "404": not_found,
                    "412": mismatch,
                    "422": _problem(_RULE_INVALID),
                    "503": _CONTENTION,
                },
            )
        },
        "/rules/{rule_id}/enable": switch(True),
        "/rules/{rule_id}/disable": switch(False),
    }


def openapi_document() -> dict[str, Any]:
    from commands.api import DEFAULT_TTL_S, PREFIX  # commands.api imports this module

    secret = {
        "type": "string",
        "description": "The device's new MQTT secret, shown this once (never stored in "
        "plaintext); absent on a replay",
    }
    labels = {
        "type": "object",
        "propertyNames": {"pattern": LABEL_KEY.pattern},
        "additionalProperties": {"type": "string", "maxLength": MAX_LABEL_VALUE},
    }
    reason = {"type": "string", "maxLength": MAX_REASON, "default": ""}
    schemas: dict[str, Any] = {
        "RegisterBody": {
            "type": "object",
            "required": ["name", "type"],
            "additionalProperties": False,
            "properties": {
                "name": {"type": "string", "minLength": 1, "maxLength": MAX_NAME},
                "type": {"type": "string", "minLength": 1, "maxLength": MAX_TYPE},
                "device_id": {
                    "anyOf": [{"type": "string", "pattern": DEVICE_ID.pattern}, {"type": "null"}],
                    "default": None,
                    "description": "Absent or null: the server picks `dev-<16 hex digits>`",
                },
                "labels": {
                    **labels,
                    "default": {},
                    "description": f"At most {MAX_LABELS} (more is 422)",
                },
            },
        },
        "ConfigBody": {
            "type": "object",
            "required": ["config"],
            "additionalProperties": False,
            "properties": {
                "config": {
                    "type": "object",
                    "description": "The whole new desired configuration (it replaces the "
                    "previous one and increments `config_version`)",
                },
            },
        },
        "ReasonBody": {
            "type": "object",
            "additionalProperties": False,
            "properties": {"reason": reason},
        },
        "NoteBody": {
            "type": "object",
            "description": "An empty body, `{}`, or a note for the audit trail",
            "additionalProperties": False,
            "properties": {
                "note": {
                    "anyOf": [{"type": "string", "maxLength": MAX_NOTE}, {"type": "null"}],
                    "default": None,
                }
            },
        },
        "Alert": {
            "type": "object",
            "description": "One alert of a device (device times as epoch ms)",
            "required": ["device_id", "version", "alert_id", "rule_id", "status"],
            "properties": {
                "device_id": {"type": "string"},
                "version": {
                    "type": "integer",
                    "description": "The device's event version after the change (the `ETag`)",
                },
                "alert_id": {
                    "type": "string",
                    "description": "`<device_id>.<rule_id>.<raised_at_ms>`",
                },
                "rule_id": {"type": "string"},
                "severity": {"type": "string", "enum": ["critical", "warning", "info"]},
                "metric": {"type": "string"},
                "status": {"type": "string", "enum": ["active", "acknowledged", "cleared"]},
                "acknowledged": {"type": "boolean"},
                "raised_value": {"type": ["number", "null"]},
                "raised_at_ms": {"type": "integer"},
                "retriggers": {"type": "integer"},
                "last_value": {"type": ["number", "null"]},
                "cleared_value": {"type": ["number", "null"]},
                "cleared_at_ms": {"type": ["integer", "null"]},
                "acknowledged_by": {
                    "type": ["string", "null"],
                    "description": "`token:<id>`: the first 12 hex digits of the SHA-256 of "
                    "the acknowledging token",
                },
                "acknowledged_at": {"type": ["string", "null"], "format": "date-time"},
                "note": {"type": ["string", "null"]},
                "position": {"type": "integer", "minimum": 1},
            },
        },
        **_rule_schemas(labels),
        "EmptyBody": {
            "type": "object",
            "description": "An empty body or `{}`; any member is 422",
            "additionalProperties": False,
            "properties": {},
        },
        "CommandBody": {
            "type": "object",
            "required": ["name"],
            "additionalProperties": False,
            "properties": {
                "name": {"type": "string", "pattern": COMMAND_NAME.pattern},
                "args": {"type": "object", "default": {}},
                "ttl_s": {
                    "type": "integer",
                    "minimum": MIN_TTL_S,
                    "maximum": MAX_TTL_S,
                    "default": DEFAULT_TTL_S,
                    "description": "Seconds until the command expires if not acknowledged",
                },
            },
        },
        "Registered": _device(
            {
                "name": {"type": "string"},
                "type": {"type": "string"},
                "labels": {"type": "object", "additionalProperties": {"type": "string"}},
                "secret": secret,
            },
            ["name", "type", "labels"],
            "The registered device",
        ),
        "DeviceChanged": _device({}, [], "The device after the change"),
        "Configured": _device(
            {
                "config": {"type": "object", "description": "The desired configuration"},
                "config_version": {
                    "type": "integer",
                    "minimum": 1,
                    "description": "Counts desired-configuration changes: the `version` "
                    "devices see on `desired`",
                },
            },
            ["config", "config_version"],
            "The device with its new desired configuration",
        ),
        "SecretRotated": _device(
            {"secret": secret}, [], "The device after the rotation, with its new secret"
        ),
        "Command": {
            "type": "object",
            "required": [
                "command_id",
                "device_id",
                "name",
                "args",
                "expires_at",
                "state",
                "version",
            ],
            "properties": {
                "command_id": {"type": "string"},
                "device_id": {"type": "string"},
                "name": {"type": "string"},
                "args": {"type": "object"},
                "expires_at": {
                    "type": "string",
                    "format": "date-time",
                    "description": "UTC, millisecond precision",
                },
                "state": {
                    "type": "string",
                    "enum": [s.value for s in CommandState],
                    "description": "`requested` once requested, `cancelled` once cancelled",
                },
                "version": {
                    "type": "integer",
                    "minimum": 1,
                    "description": "The device's event version after the change",
                },
                "position": {
                    "type": "integer",
                    "minimum": 1,
                    "description": "The event-store position of the change, also the "
                    "`Iot-Position` header (absent only on a replay whose position cannot be "
                    "found)",
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
                    "description": "422 from body validation: the fields at fault",
                    "items": {
                        "type": "object",
                        "properties": {"field": {"type": "string"}, "message": {"type": "string"}},
                    },
                },
                "current_version": {
                    "type": "integer",
                    "description": "412: the device's current version",
                },
                "device_id": {
                    "type": "string",
                    "description": "503, secret not delivered: the device whose change is stored",
                },
                "version": {
                    "type": "integer",
                    "description": "503, secret not delivered: the stored version",
                },
            },
        },
    }
    undelivered = (
        "The change is stored (`device_id` and `version` in the body) but the new secret "
        "could not be handed to the broker's side, so the device cannot log in with it: rotate "
        "its secret"
    )
    device_path = "/devices/{device_id}"
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "IoT operator command API",
            "version": "1.0.0",
            "description": "Changes to the device fleet: registration, desired configuration, "
            "lifecycle, secrets, commands to devices. Bearer token with the role each "
            f"operation names; roles are {' < '.join(ROLES)}, each including the ones before "
            "it (a viewer token can change nothing here: 403). Every successful change answers "
            'with `ETag: "<version>"` (pass it as `If-Match` to make a change conditional) '
            "and `Iot-Position`, the event-store position of its last event: pass it to the "
            "gateway as `after` to read your write. Every POST and PATCH accepts an "
            f"`Idempotency-Key`. Bodies are JSON of at most {MAX_BODY} bytes (the "
            "`Content-Type` is not checked; an empty body is `{}`); errors are "
            f"`{PROBLEM}`.",
        },
        "servers": [{"url": PREFIX}],
        "security": [{"bearer": []}],
        "paths": {
            "/devices": {
                "post": _operation(
                    "registerDevice",
                    "Register a device",
                    "Issues the device's MQTT secret, answered this once.",
                    "operator",
                    [_IDEMPOTENCY_KEY],
                    _body("RegisterBody", True, "The new device"),
                    {
                        "201": _ok("Registered", "Registered", created=True),
                        "409": _problem("A device with this id is registered already"),
                        "503": _problem(undelivered),
                    },
                )
            },
            device_path + "/config": {
                "patch": _operation(
                    "configureDevice",
                    "Set the device's desired configuration",
                    "Devices see it on their `desired` topic.",
                    "operator",
                    _CHANGE_PARAMETERS,
                    _body("ConfigBody", True, "The desired configuration"),
                    {
                        "200": _ok("Configured", "Configured"),
                        "404": _problem("No device with this id"),
                        "409": _problem("The device is decommissioned"),
                        "412": _problem("`If-Match` names another version"),
                        "503": _CONTENTION,
                    },
                )
            },
            device_path + "/suspend": {
                "post": _operation(
                    "suspendDevice",
                    "Suspend a device",
                    "Cancels its pending commands; the broker drops its connection.",
                    "operator",
                    _CHANGE_PARAMETERS,
                    _body("ReasonBody", False, "Why"),
                    {
                        "200": _ok("DeviceChanged", "Suspended"),
                        "404": _problem("No device with this id"),
                        "409": _problem("The device is suspended already, or decommissioned"),
                        "412": _problem("`If-Match` names another version"),
                        "503": _CONTENTION,
                    },
                )
            },
            device_path + "/resume": {
                "post": _operation(
                    "resumeDevice",
                    "Resume a suspended device",
                    "Back to `active` if it ever connected, else `provisioned`.",
                    "operator",
                    _CHANGE_PARAMETERS,
                    _body("EmptyBody", False, "Nothing"),
                    {
                        "200": _ok("DeviceChanged", "Resumed"),
                        "404": _problem("No device with this id"),
                        "409": _problem("The device is not suspended"),
                        "412": _problem("`If-Match` names another version"),
                        "503": _CONTENTION,
                    },
                )
            },
            device_path + "/decommission": {
                "post": _operation(
                    "decommissionDevice",
                    "Decommission a device, for good",
                    "Cancels its pending commands; the broker drops its connection. Final: "
                    "every later change of the device is 409.",
                    "admin",
                    _CHANGE_PARAMETERS,
                    _body("ReasonBody", False, "Why"),
                    {
                        "200": _ok("DeviceChanged", "Decommissioned"),
                        "404": _problem("No device with this id"),
                        "409": _problem("The device is decommissioned already"),
                        "412": _problem("`If-Match` names another version"),
                        "503": _CONTENTION,
                    },
                )
            },
            device_path + "/rotate-secret": {
                "post": _operation(
                    "rotateDeviceSecret",
                    "Issue a new secret for the device",
                    "The old secret stops working; the broker drops the device's connection.",
                    "operator",
                    _CHANGE_PARAMETERS,
                    _body("EmptyBody", False, "Nothing"),
                    {
                        "200": _ok("SecretRotated", "Rotated"),
                        "404": _problem("No device with this id"),
                        "409": _problem("The device is decommissioned"),
                        "412": _problem("`If-Match` names another version"),
                        "503": {
                            "description": f"{undelivered}; or, without `If-Match`, every "
                            "attempt lost a race with another writer (then with `Retry-After`)",
                            "headers": {"Retry-After": {"$ref": "#/components/headers/RetryAfter"}},
                            "content": {PROBLEM: {"schema": _ref("Problem")}},
                        },
                    },
                )
            },
            device_path + "/commands": {
                "post": _operation(
                    "requestCommand",
                    "Send a command to the device",
                    "Recorded as `requested`, then sent when the device is connected (at "
                    "least once), until acknowledged, failed or expired.",
                    "operator",
                    _CHANGE_PARAMETERS,
                    _body("CommandBody", True, "The command"),
                    {
                        "202": _ok("Command", "Requested"),
                        "404": _problem("No device with this id"),
                        "409": _problem(
                            "The device is suspended or decommissioned, or has "
                            f"{MAX_PENDING_COMMANDS} pending commands"
                        ),
                        "412": _problem("`If-Match` names another version"),
                        "503": _CONTENTION,
                    },
                )
            },
            device_path + "/commands/{command_id}/cancel": {
                "post": _operation(
                    "cancelCommand",
                    "Cancel a pending command",
                    "An empty `reason` is recorded as `cancelled by an operator`.",
                    "operator",
                    [_DEVICE_ID, _COMMAND_ID, _IF_MATCH, _IDEMPOTENCY_KEY],
                    _body("ReasonBody", False, "Why"),
                    {
                        "200": _ok("Command", "Cancelled"),
                        "404": _problem(
                            "No device with this id, or it has no such command (the device "
                            f"remembers only its last {RECENT_COMMANDS} finished commands)"
                        ),
                        "409": _problem("The command has finished already"),
                        "412": _problem("`If-Match` names another version"),
                        "503": _CONTENTION,
                    },
                )
            },
            **_rule_paths(),
            "/alerts/{alert_id}/acknowledge": {
                "post": _operation(
                    "acknowledgeAlert",
                    "Acknowledge an alert",
                    "Records who (the token) acknowledged the alert, when, and the note, as an "
                    "event of the device. Allowed once, while the alert is open or after it "
                    "cleared unacknowledged.",
                    "operator",
                    [_ALERT_ID, _IDEMPOTENCY_KEY],
                    _body("NoteBody", False, "A note"),
                    {
                        "200": _ok("Alert", "Acknowledged"),
                        "404": _problem(
                            "No such alert (a malformed id, no such device, or an alert the "
                            "device no longer remembers: it keeps the open ones and its last "
                            f"{RECENT_ALERTS} cleared)"
                        ),
                        "409": _problem("The alert is already acknowledged"),
                        "503": _CONTENTION,
                    },
                )
            },
        },
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "headers": {
                "ETag": {
                    "description": 'The device\'s version after the change, `"<version>"` '
                    "(not on a replay)",
                    "schema": {"type": "string"},
                },
                "IotPosition": {
                    "description": "The event-store position of the change's last event: the "
                    "consistency token to pass to the gateway as `after` or `Iot-After`",
                    "schema": {"type": "integer", "minimum": 1},
                },
                "IdempotentReplayed": {
                    "description": "`true` on the stored answer to an earlier request with the "
                    "same `Idempotency-Key`",
                    "schema": {"type": "string", "enum": ["true"]},
                },
                "RetryAfter": {
                    "description": "Seconds to wait before retrying",
                    "schema": {"type": "integer"},
                },
            },
            "responses": {
                "Problem": {
                    "description": "An error",
                    "content": {PROBLEM: {"schema": _ref("Problem")}},
                },
                "Unauthorized": {
                    "description": "No valid bearer token",
                    "headers": {
                        "WWW-Authenticate": {
                            "description": '`Bearer realm="iot"`',
                            "schema": {"type": "string"},
                        }
                    },
                    "content": {PROBLEM: {"schema": _ref("Problem")}},
                },
                "Contention": {
                    "description": "Every attempt lost a race with another writer; retry",
                    "headers": {"Retry-After": {"$ref": "#/components/headers/RetryAfter"}},
                    "content": {PROBLEM: {"schema": _ref("Problem")}},
                },
            },
            "schemas": schemas,
        },
    }


def openapi_endpoint() -> Callable[[Request], Awaitable[Response]]:
    """The document's GET endpoint (no token): an ETag, 304 when If-None-Match matches."""
    raw = _encode(openapi_document())
    headers = {
        "ETag": etag_of(raw),
        "Cache-Control": "private, no-cache",
    }

    async def openapi(request: Request) -> Response:
        if etag_matches(request.headers.get("if-none-match", ""), headers["ETag"]):
            return Response(status_code=304, headers=headers)
        return Response(raw, 200, headers, media_type="application/json")

    return openapi
