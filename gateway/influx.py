"""A small async InfluxQL client for InfluxDB's v1 HTTP API (GET /query, /ping); read only."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import httpx
import msgspec


class InfluxError(Exception):
    """InfluxDB is unreachable or answered with an error."""


class InfluxUnavailable(InfluxError):
    """InfluxDB could not be reached or failed (5xx)."""


class InfluxQueryError(InfluxError):
    """InfluxDB refused the statement (e.g. an aggregate of a non-numeric field)."""


class Series(msgspec.Struct):
    name: str = ""
    tags: dict[str, str] = {}  # of a GROUP BY tag
    columns: list[str] = []
    values: list[list[Any]] = []


class _Result(msgspec.Struct):
    statement_id: int = 0
    series: list[Series] = []
    error: str | None = None
    partial: bool = False


class _Answer(msgspec.Struct):
    results: list[_Result] = []
    error: str | None = None


_decode = msgspec.json.Decoder(_Answer).decode


class InfluxQL:
    """Runs one read statement at a time against one database; times come back as epoch ms."""

    def __init__(self, client: httpx.AsyncClient, url: str, db: str) -> None:
        self._client = client
        self._url = url.rstrip("/")
        self._db = db

    async def query(self, statement: str) -> tuple[list[Series], bool]:
        """The series of one statement and whether InfluxDB cut the answer short (partial)."""
        try:
            response = await self._client.get(
                self._url + "/query", params={"db": self._db, "q": statement, "epoch": "ms"}
            )
        except httpx.HTTPError as e:
            raise InfluxUnavailable(f"InfluxDB unreachable: {e!r}") from e
        answer = _answer(response)
        if not answer.results:
            return [], False
        result = answer.results[0]
        if result.error:
            raise InfluxQueryError(result.error)
        return result.series, result.partial

    @property
    def database(self) -> str:
        return self._db

    async def query_all(self, statements: Sequence[str]) -> list[list[Series]]:
        """The series of each statement, run in one request (POST: the text may be long);
        InfluxQueryError when any statement fails or InfluxDB cut an answer short."""
        if not statements:
            return []
        try:
            response = await self._client.post(
                self._url + "/query",
                data={"db": self._db, "q": ";\n".join(statements), "epoch": "ms"},
            )
        except httpx.HTTPError as e:
            raise InfluxUnavailable(f"InfluxDB unreachable: {e!r}") from e
        answer = _answer(response)
        out: list[list[Series]] = [[] for _ in statements]
        for result in answer.results:
            if result.error:
                raise InfluxQueryError(result.error)
            if result.partial:
                raise InfluxQueryError("InfluxDB cut the answer short (partial)")
            if 0 <= result.statement_id < len(out):
                out[result.statement_id] = result.series
        return out

    async def ping(self) -> bool:
        try:
            response = await self._client.get(self._url + "/ping")
        except httpx.HTTPError:
            return False
        return response.status_code == 204


def _answer(response: httpx.Response) -> _Answer:
    """The decoded /query answer; InfluxUnavailable on 5xx or an undecodable body,
    InfluxQueryError on an error InfluxDB reported or another 4xx."""
    if response.status_code >= 500:
        raise InfluxUnavailable(f"InfluxDB answered {response.status_code}")
    try:
        answer = _decode(response.content)
    except msgspec.DecodeError as e:
        raise InfluxUnavailable(f"InfluxDB answered {response.status_code}: {e}") from e
    if answer.error:
        raise InfluxQueryError(answer.error)
    if response.status_code >= 400:
        raise InfluxQueryError(f"InfluxDB answered {response.status_code}")
    return answer
