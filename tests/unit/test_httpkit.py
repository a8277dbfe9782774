"""HTTP plumbing: validation messages, typed bodies, problem+json and bearer roles."""

from __future__ import annotations

import json

import msgspec
import pytest
from starlette.requests import Request

from infra.httpkit import PROBLEM, Authorizer, Problem, decode_body, field_of

VIEWER = "viewer-token-0123456789"
OPERATOR = "operator-token-012345678"
ADMIN = "admin-token-0123456789ab"
TOKENS = {VIEWER: "viewer", OPERATOR: "operator", ADMIN: "admin"}


class Setting(msgspec.Struct, forbid_unknown_fields=True):
    key: str
    value: int


class NewDevice(msgspec.Struct, forbid_unknown_fields=True):
    name: str
    type: str = "generic"
    labels: dict[str, str] = {}
    settings: list[Setting] = []
    primary: Setting | None = None


class Optional(msgspec.Struct, forbid_unknown_fields=True):
    ttl_s: int = 3600
    args: dict[str, str] = {}


def validation_message(raw: bytes) -> str:
    with pytest.raises(msgspec.ValidationError) as caught:
        msgspec.json.decode(raw, type=NewDevice)
    return str(caught.value)


# -- field_of -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("message", "field"),
    [
        ("Expected `str`, got `int` - at `$.name`", "name"),
        ("Object missing required field `name`", "name"),
        ("Object contains unknown field `colour`", "colour"),
        ("Expected `object`, got `int` - at `$.labels`", "labels"),
        ("Expected `str`, got `int` - at `$.labels[...]`", "labels"),
        ("Object missing required field `key` - at `$.primary`", "primary.key"),
        ("Object contains unknown field `extra` - at `$.primary`", "primary.extra"),
        ("Object missing required field `value` - at `$.settings[1]`", "settings[1].value"),
        ("Expected `int`, got `str` - at `$.settings[0].value`", "settings[0].value"),
        ("Expected `object`, got `array`", ""),
    ],
)
def test_field_of_names_the_field_a_message_is_about(message: str, field: str) -> None:
    assert field_of(message) == field


@pytest.mark.parametrize(
    ("raw", "field"),
    [
        (b'{"name": 1}', "name"),
        (b"{}", "name"),
        (b'{"name": "n", "colour": "red"}', "colour"),
        (b'{"name": "n", "labels": 1}', "labels"),
        (b'{"name": "n", "labels": {"site": 1}}', "labels"),
        (b'{"name": "n", "primary": {"value": 1}}', "primary.key"),
        (
            b'{"name": "n", "settings": [{"key": "k", "value": 1}, {"key": "k"}]}',
            "settings[1].value",
        ),
        (b'{"name": "n", "settings": [{"key": "k", "value": "x"}]}', "settings[0].value"),
    ],
)
def test_field_of_understands_msgspecs_own_messages(raw: bytes, field: str) -> None:
    assert field_of(validation_message(raw)) == field


# -- decode_body ----------------------------------------------------------------------------


def test_valid_body_decodes_into_the_struct() -> None:
    body = decode_body(b'{"name": "Boiler", "labels": {"site": "lab"}}', NewDevice)

    assert body == NewDevice(name="Boiler", labels={"site": "lab"})


@pytest.mark.parametrize(
    "raw", [b"{", b'{"name": }', b"not json", b'{"name": "n"} trailing', b"\xff\xfe"]
)
def test_malformed_json_is_a_400_problem(raw: bytes) -> None:
    with pytest.raises(Problem) as caught:
        decode_body(raw, NewDevice)

    assert caught.value.status == 400
    assert "malformed JSON" in caught.value.detail


def test_wrong_shape_is_a_422_problem_naming_the_field() -> None:
    with pytest.raises(Problem) as caught:
        decode_body(b'{"name": 42}', NewDevice)

    problem = caught.value
    assert problem.status == 422
    assert problem.extra["errors"][0]["field"] == "name"
    assert "Expected `str`, got `int`" in problem.extra["errors"][0]["message"]


def test_missing_required_field_is_a_422_problem_naming_it() -> None:
    with pytest.raises(Problem) as caught:
        decode_body(b'{"type": "thermometer"}', NewDevice)

    assert caught.value.status == 422
    assert caught.value.extra["errors"][0]["field"] == "name"


def test_unknown_field_is_a_422_problem_naming_it() -> None:
    with pytest.raises(Problem) as caught:
        decode_body(b'{"name": "n", "colour": "red"}', NewDevice)

    assert caught.value.status == 422
    assert caught.value.extra["errors"][0]["field"] == "colour"


def test_nested_error_is_a_422_problem_with_a_dotted_field() -> None:
    with pytest.raises(Problem) as caught:
        decode_body(b'{"name": "n", "primary": {"key": "k", "value": "high"}}', NewDevice)

    assert caught.value.extra["errors"][0]["field"] == "primary.value"


@pytest.mark.parametrize("raw", [b"", b"   ", b"\n\t "])
def test_empty_body_is_treated_as_an_empty_object(raw: bytes) -> None:
    assert decode_body(raw, Optional) == Optional()


def test_empty_body_for_a_struct_with_required_fields_is_a_422_problem() -> None:
    with pytest.raises(Problem) as caught:
        decode_body(b"", NewDevice)

    assert caught.value.status == 422
    assert caught.value.extra["errors"][0]["field"] == "name"


# -- Problem --------------------------------------------------------------------------------


def test_problem_body_follows_rfc_9457() -> None:
    problem = Problem(409, "Conflict", "device sensor-001 is decommissioned", code="illegal")

    assert problem.body("/api/v1/devices/sensor-001/suspend") == {
        "type": "about:blank",
        "title": "Conflict",
        "status": 409,
        "detail": "device sensor-001 is decommissioned",
        "instance": "/api/v1/devices/sensor-001/suspend",
        "code": "illegal",
    }


def test_problem_without_detail_or_instance_leaves_them_out() -> None:
    assert Problem(404, "Not Found").body() == {
        "type": "about:blank",
        "title": "Not Found",
        "status": 404,
    }


def test_problem_response_is_problem_json_with_its_status_and_headers() -> None:
    problem = Problem(429, "Too Many Requests", "slow down")
    problem.headers["Retry-After"] = "1"

    response = problem.response("/x")

    assert response.status_code == 429
    assert response.media_type == PROBLEM
    assert response.headers["content-type"].startswith(PROBLEM)
    assert response.headers["retry-after"] == "1"
    assert json.loads(bytes(response.body))["instance"] == "/x"


# -- Authorizer -----------------------------------------------------------------------------


def request_with(authorization: str | None) -> Request:
    headers = [] if authorization is None else [(b"authorization", authorization.encode())]
    return Request({"type": "http", "headers": headers, "method": "GET", "path": "/"})


@pytest.mark.parametrize(
    "authorization",
    [
        None,
        "",
        "Bearer",
        "Bearer ",
        "Bearer wrong-token-0123456789",
        f"Bearer {ADMIN[:-1]}",
        f"Bearer {ADMIN}x",
        f"Basic {ADMIN}",
        ADMIN,
    ],
)
def test_missing_or_wrong_token_is_401_with_a_bearer_challenge(authorization: str | None) -> None:
    authorizer = Authorizer(TOKENS)

    with pytest.raises(Problem) as caught:
        authorizer.authorize(request_with(authorization), "viewer")

    assert caught.value.status == 401
    assert caught.value.headers["WWW-Authenticate"] == 'Bearer realm="iot"'
    assert caught.value.response().headers["www-authenticate"] == 'Bearer realm="iot"'


def test_no_configured_tokens_means_every_request_is_401() -> None:
    with pytest.raises(Problem) as caught:
        Authorizer({}).authorize(request_with(f"Bearer {ADMIN}"), "viewer")

    assert caught.value.status == 401


@pytest.mark.parametrize(
    ("token", "role", "needed"),
    [(VIEWER, "viewer", "operator"), (VIEWER, "viewer", "admin"), (OPERATOR, "operator", "admin")],
)
def test_token_below_the_needed_role_is_403_naming_the_roles(
    token: str, role: str, needed: str
) -> None:
    with pytest.raises(Problem) as caught:
        Authorizer(TOKENS).authorize(request_with(f"Bearer {token}"), needed)

    assert caught.value.status == 403
    assert needed in caught.value.detail
    assert role in caught.value.detail
    assert token not in caught.value.detail


@pytest.mark.parametrize(
    ("token", "needed"),
    [
        (VIEWER, "viewer"),
        (OPERATOR, "viewer"),
        (OPERATOR, "operator"),
        (ADMIN, "viewer"),
        (ADMIN, "operator"),
        (ADMIN, "admin"),
    ],
)
def test_token_at_or_above_the_needed_role_is_authorized(token: str, needed: str) -> None:
    principal = Authorizer(TOKENS).authorize(request_with(f"Bearer {token}"), needed)

    assert principal


def test_scheme_is_case_insensitive() -> None:
    authorizer = Authorizer(TOKENS)

    assert authorizer.authorize(request_with(f"bearer {ADMIN}"), "admin") == (
        authorizer.authorize(request_with(f"Bearer {ADMIN}"), "admin")
    )


def test_principal_is_stable_per_token_and_differs_between_tokens() -> None:
    authorizer = Authorizer(TOKENS)
    other = Authorizer(TOKENS)

    viewer = authorizer.authorize(request_with(f"Bearer {VIEWER}"), "viewer")
    operator = authorizer.authorize(request_with(f"Bearer {OPERATOR}"), "viewer")
    admin = authorizer.authorize(request_with(f"Bearer {ADMIN}"), "viewer")

    assert authorizer.authorize(request_with(f"Bearer {VIEWER}"), "viewer") == viewer
    assert other.authorize(request_with(f"Bearer {VIEWER}"), "viewer") == viewer
    assert len({viewer, operator, admin}) == 3


def test_principal_does_not_reveal_the_token() -> None:
    principal = Authorizer(TOKENS).authorize(request_with(f"Bearer {ADMIN}"), "admin")

    assert ADMIN not in principal
    assert ADMIN[:8] not in principal
