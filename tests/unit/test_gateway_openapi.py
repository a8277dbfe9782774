"""The gateway's OpenAPI document: valid, in step with the app's routes, and saying what a
consistency token may be answered (400 beyond the log's head, 503 with Retry-After)."""

from __future__ import annotations

from typing import Any, cast

from openapi_spec_validator import OpenAPIV31SpecValidator, validate
from starlette.routing import Mount, Route

from gateway.api import PREFIX, Gateway, create_app
from gateway.openapi import AFTER_WAIT_S, BEYOND_HEAD_GRACE_S, openapi_document
from infra.httpkit import Authorizer

METHODS = {"get", "put", "post", "delete", "options", "head", "patch", "trace"}
# the documents themselves, health, and the dashboard (its page, files and configuration)
UNDOCUMENTED = {
    "/healthz",
    "/readyz",
    "/metrics",
    "/openapi.json",
    PREFIX + "/openapi.json",
    "/",
    "/favicon.ico",
    "/ui/config.json",
    "/ui",
}
# Every view read honours `after` (`endpoint(..., consistent=True)` in gateway/api.py).
CONSISTENT = {
    "/devices",
    "/devices/{device_id}",
    "/devices/{device_id}/telemetry",
    "/fleet",
    "/fleet/aggregates",
    "/reports/fleet",
    "/alerts",
    "/alerts/{alert_id}",
    "/rules",
    "/rules/{rule_id}",
}


def routed_operations() -> dict[str, set[str]]:
    """The app's routes; built on stand-ins, as no request is made."""
    none = cast(Any, None)
    gateway = Gateway(views=none, influx=none, authorizer=Authorizer({}), limiter=none, redis=none)
    routed: dict[str, set[str]] = {}
    for route in create_app(gateway, cast(Any, None)).routes:
        if isinstance(route, Mount) and route.path in UNDOCUMENTED:
            continue  # the dashboard's static files
        assert isinstance(route, Route)
        if route.path in UNDOCUMENTED:
            continue
        methods = {m.lower() for m in route.methods or ()} - {"head"}
        routed.setdefault(route.path.removeprefix(PREFIX), set()).update(methods)
    return routed


def operations(document: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    return [
        (path, operation)
        for path, item in document["paths"].items()
        for method, operation in item.items()
        if method in METHODS
    ]


def test_the_document_is_valid_openapi_31() -> None:
    validate(cast(Any, openapi_document()), cls=OpenAPIV31SpecValidator)


def test_every_routed_operation_is_documented_and_every_documented_one_routed() -> None:
    document = openapi_document()
    assert document["servers"] == [{"url": PREFIX}]
    documented = {path: set(item) & METHODS for path, item in document["paths"].items()}
    assert routed_operations() == documented


def test_every_operation_taking_a_token_documents_its_400_and_its_503_with_retry_after() -> None:
    document = openapi_document()
    responses = document["components"]["responses"]
    taking = set()
    for path, operation in operations(document):
        names = {(p["name"], p["in"]) for p in operation.get("parameters", [])}
        if ("after", "query") not in names:
            continue
        taking.add(path)
        assert ("Iot-After", "header") in names, path
        assert operation["responses"]["400"] == {"$ref": "#/components/responses/BadRequest"}
        assert operation["responses"]["503"] == {"$ref": "#/components/responses/Unavailable"}
    assert taking >= CONSISTENT
    assert "beyond the log's head" in responses["BadRequest"]["description"]
    assert {"Retry-After", "Iot-Position"} <= set(responses["Unavailable"]["headers"])
    problem = document["components"]["schemas"]["Problem"]["properties"]
    assert {"after", "head", "position"} <= set(problem)
    after = next(
        p
        for _, op in operations(document)
        for p in op.get("parameters", [])
        if p["name"] == "after"
    )
    assert f"{AFTER_WAIT_S:g} s" in after["description"]
    assert f"{BEYOND_HEAD_GRACE_S:g} s" in after["description"]
