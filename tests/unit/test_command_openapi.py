"""The command API's OpenAPI document: valid, and in step with the app's routes and decoders.

The app is built without services: every request here is answered before a store is touched
(authorization, body size, body decoding), and a stand-in fails the test if one is reached.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, cast

import httpx
import jsonschema
import msgspec
import pytest
from openapi_spec_validator import OpenAPIV31SpecValidator, validate
from openapi_spec_validator.validation.exceptions import OpenAPIValidationError
from referencing.exceptions import Unresolvable
from starlette.applications import Starlette
from starlette.routing import Route

from commands.api import (
    PREFIX,
    CommandBody,
    CommandService,
    ConfigBody,
    EmptyBody,
    NoteBody,
    ReasonBody,
    RegisterBody,
    create_app,
)
from commands.handlers import Credentials
from commands.openapi import openapi_document
from domain.rules import spec_to_dict, validate_rule
from gateway.openapi import openapi_document as gateway_document
from infra.eventstore import DeviceStore, GroupCommitter
from infra.httpkit import MAX_BODY, PROBLEM, Authorizer
from infra.settings import ROLES

TOKENS = {
    "viewer-token-0123456789": "viewer",
    "operator-token-012345678": "operator",
    "admin-token-0123456789ab": "admin",
}
BEARER = {role: {"Authorization": f"Bearer {token}"} for token, role in TOKENS.items()}
METHODS = {"get", "put", "post", "delete", "options", "head", "patch", "trace"}
BODIES: list[type[msgspec.Struct]] = [
    RegisterBody,
    ConfigBody,
    ReasonBody,
    NoteBody,
    EmptyBody,
    CommandBody,
]
# Served outside the document: the HTTP kit's health and metrics, and the document itself.
UNDOCUMENTED = {"/healthz", "/readyz", "/metrics", "/openapi.json", PREFIX + "/openapi.json"}


class NoService:
    """Stands in for the store and the committer: a test that reaches one fails."""

    def __getattr__(self, name: str) -> Any:
        raise AssertionError(f"the request reached the store ({name})")


@pytest.fixture
def app() -> Iterator[Starlette]:
    async def hand_over(device_id: str, version: int, secret: str) -> None:
        raise AssertionError("the request reached the secret handover")

    async def ready() -> dict[str, bool]:
        return {}

    executor = ThreadPoolExecutor(2)
    service = CommandService(
        store=cast(DeviceStore, NoService()),
        committer=cast(GroupCommitter, NoService()),
        executor=executor,
        credentials=Credentials(new_secret=lambda: "secret", new_salt=lambda: b"0" * 16),
        new_device_id=lambda: "dev-1",
        hand_over=hand_over,
    )
    yield create_app(service, Authorizer(TOKENS), ready)
    executor.shutdown()


@pytest.fixture
async def client(app: Starlette) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
        yield c


def operations() -> list[Any]:
    """(method, full path with example parameters, operation) for every documented operation."""
    document = openapi_document()
    prefix = document["servers"][0]["url"]
    found = []
    for path, item in document["paths"].items():
        concrete = path.replace("{device_id}", "dev-1").replace("{command_id}", "cmd-1")
        for method, operation in item.items():
            if method in METHODS:
                found.append(
                    pytest.param(
                        method.upper(), prefix + concrete, operation, id=operation["operationId"]
                    )
                )
    return found


def body_schema(operation: dict[str, Any]) -> str:
    ref: str = operation["requestBody"]["content"]["application/json"]["schema"]["$ref"]
    return ref.removeprefix("#/components/schemas/")


def without_descriptions(node: Any) -> Any:
    if isinstance(node, dict):
        return {k: without_descriptions(v) for k, v in node.items() if k != "description"}
    if isinstance(node, list):
        return [without_descriptions(v) for v in node]
    return node


def test_the_document_is_valid_openapi_of_the_gateway_documents_version() -> None:
    document = openapi_document()
    validate(cast(Any, document), cls=OpenAPIV31SpecValidator)
    assert document["openapi"] == gateway_document()["openapi"]
    assert document["servers"] == [{"url": PREFIX}]


def test_the_validator_refuses_an_undeclared_parameter_or_a_dangling_reference() -> None:
    document = openapi_document()
    suspend = document["paths"]["/devices/{device_id}/suspend"]["post"]
    suspend["parameters"] = [p for p in suspend["parameters"] if p["name"] != "device_id"]
    with pytest.raises(OpenAPIValidationError, match="device_id"):
        validate(cast(Any, document), cls=OpenAPIV31SpecValidator)
    document = openapi_document()
    document["paths"]["/devices"]["post"]["responses"]["409"]["$ref"] += "-missing"
    with pytest.raises(Unresolvable):
        validate(cast(Any, document), cls=OpenAPIV31SpecValidator)


def test_every_routed_operation_is_documented_and_every_documented_one_routed(
    app: Starlette,
) -> None:
    document = openapi_document()
    prefix = document["servers"][0]["url"]
    routed: dict[str, set[str]] = {}
    for route in app.routes:
        assert isinstance(route, Route)
        if route.path in UNDOCUMENTED:
            continue
        assert route.path.startswith(prefix + "/"), route.path
        methods = {m.lower() for m in route.methods or ()} - {"head"}
        routed.setdefault(route.path.removeprefix(prefix), set()).update(methods)
    documented = {path: set(item) & METHODS for path, item in document["paths"].items()}
    assert routed == documented
    assert {r.path for r in app.routes if isinstance(r, Route)} >= UNDOCUMENTED


def test_path_parameters_are_documented_for_each_template() -> None:
    for path, item in openapi_document()["paths"].items():
        names = {part[1:-1] for part in path.split("/") if part.startswith("{")}
        for operation in (v for k, v in item.items() if k in METHODS):
            declared = {p["name"] for p in operation["parameters"] if p["in"] == "path"}
            assert declared == names, path


@pytest.mark.parametrize("struct", BODIES, ids=lambda s: s.__name__)
def test_request_bodies_are_what_the_decoders_accept(struct: type[msgspec.Struct]) -> None:
    expected = msgspec.json.schema_components([struct])[1][struct.__name__]
    documented = without_descriptions(openapi_document()["components"]["schemas"][struct.__name__])
    assert documented["type"] == expected["type"] == "object"
    assert documented["properties"] == expected["properties"]
    assert set(documented.get("required", [])) == set(expected["required"])
    assert documented["additionalProperties"] is expected["additionalProperties"] is False


async def test_the_document_is_served_without_a_token_with_an_etag(
    client: httpx.AsyncClient,
) -> None:
    for path in ("/openapi.json", PREFIX + "/openapi.json"):
        response = await client.get(path)
        assert response.status_code == 200
        assert response.headers["content-type"] == "application/json"
        assert response.json() == openapi_document()
        etag = response.headers["etag"]
        assert re.fullmatch(r'"[0-9a-f]{32}"', etag)
        for match in (etag, f'"other", W/{etag}', "*"):
            cached = await client.get(path, headers={"If-None-Match": match})
            assert cached.status_code == 304
            assert cached.content == b""
            assert cached.headers["etag"] == etag
        changed = await client.get(path, headers={"If-None-Match": '"other"'})
        assert changed.status_code == 200


@pytest.mark.parametrize(("method", "path", "operation"), operations())
async def test_each_operation_needs_its_documented_role(
    client: httpx.AsyncClient, method: str, path: str, operation: dict[str, Any]
) -> None:
    role = operation["x-required-role"]
    assert role in operation["description"]
    assert {"401", "403", "413"} <= set(operation["responses"])
    assert (await client.request(method, path)).status_code == 401
    too_large = b" " * (MAX_BODY + 1)
    for held in ROLES:
        response = await client.request(method, path, content=too_large, headers=BEARER[held])
        # Past the role check, the body's size is checked before anything else.
        assert response.status_code == (413 if ROLES.index(held) >= ROLES.index(role) else 403)
        assert response.headers["content-type"] == PROBLEM


@pytest.mark.parametrize(("method", "path", "operation"), operations())
async def test_each_operation_decodes_its_documented_body(
    client: httpx.AsyncClient, method: str, path: str, operation: dict[str, Any]
) -> None:
    schema = openapi_document()["components"]["schemas"][body_schema(operation)]
    headers = BEARER["admin"]
    assert {"400", "422"} <= set(operation["responses"])

    async def refused(body: bytes, status: int) -> dict[str, Any]:
        response = await client.request(method, path, content=body, headers=headers)
        assert response.status_code == status, response.text
        problem: dict[str, Any] = response.json()
        return problem

    assert "malformed JSON" in (await refused(b"{", 400))["detail"]
    unknown = await refused(b'{"not_a_field": 1}', 422)
    assert unknown["errors"][0]["field"] == "not_a_field"
    for name in schema["properties"]:  # a known field, of the wrong type (each is no array)
        wrong = await refused(msgspec.json.encode({name: []}), 422)
        assert wrong["errors"][0]["field"] == name
        assert "unknown field" not in wrong["detail"]
    for name in schema.get("required", []):
        missing = await refused(b"{}", 422)
        assert "missing required field" in missing["detail"]
        assert missing["errors"][0]["field"] in schema["required"], name
    assert operation["requestBody"]["required"] == bool(schema.get("required"))


@pytest.mark.parametrize(
    "condition",
    [
        {"kind": "threshold", "op": ">", "value": 80},  # no `clear`: answered as null
        {"kind": "threshold", "op": "<=", "value": 1.46e16, "clear": 2e16, "for_s": 30},
        {"kind": "rate", "max_per_s": 5},
        {"kind": "absent", "for_s": 600},
        {"kind": "anomaly"},
    ],
)
def test_a_rule_is_answered_as_its_schema_says(condition: dict[str, Any]) -> None:
    """Found by the fuzzer: a threshold without `clear` was answered with a null it forbade."""
    spec = validate_rule(
        {"name": "hot", "metric": "temperature", "severity": "warning", "condition": condition}
        | ({"metric": "*"} if condition["kind"] == "absent" else {})
    )
    answer = {"rule_id": "r-1", "version": 1, "enabled": True, **spec_to_dict(spec)}
    document = openapi_document()
    schema = {"$ref": "#/components/schemas/Rule", "components": document["components"]}
    jsonschema.validate(answer, schema, cls=jsonschema.Draft202012Validator)
