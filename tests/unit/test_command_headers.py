"""The command API's If-Match parsing, without services."""

from __future__ import annotations

import pytest
from starlette.requests import Request

from commands.api import _if_match
from infra.httpkit import Problem


def _request(if_match: bytes | None) -> Request:
    headers = [] if if_match is None else [(b"if-match", if_match)]
    return Request({"type": "http", "method": "PATCH", "path": "/", "headers": headers})


@pytest.mark.parametrize(
    ("header", "version"), [(b'"3"', 3), (b"3", 3), (b'W/"12"', 12), (b' "7" ', 7)]
)
def test_if_match_reads_the_device_version(header: bytes, version: int) -> None:
    assert _if_match(_request(header)) == version


def test_no_if_match_means_no_expected_version() -> None:
    assert _if_match(_request(None)) is None


@pytest.mark.parametrize("header", [b'"abc"', b'""', b'"-1"', b'"1.5"', '"³"'.encode("latin-1")])
def test_an_if_match_that_is_not_a_version_is_a_400_problem(header: bytes) -> None:
    with pytest.raises(Problem) as caught:
        _if_match(_request(header))
    assert caught.value.status == 400
