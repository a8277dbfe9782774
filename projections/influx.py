"""Async InfluxDB v1 HTTP adapter: line-protocol writes, InfluxQL queries, database admin.

Speaks the v1 API (`POST /write`, `/query`, `/ping`) that InfluxDB 1.x serves natively and 2.x/3.x
serve through their compatibility endpoints. One keep-alive `httpx.AsyncClient` per adapter.
Errors are converted at this edge into our own hierarchy:

- `InfluxUnavailable`: the server is unreachable, timed out, answered 5xx, refused our
  credentials, or the database is missing; the same write can succeed later: retry it.
- `InfluxRejected`: the server refused (some of) the points (400 `unable to parse`, `field type
  conflict`, `partial write ... dropped=N`, 413): writing them again will fail again. Points of the
  same request that InfluxDB accepted are stored (writes are idempotent, so rewriting is safe).
"""

from __future__ import annotations

import re
from typing import Any

import httpx
import msgspec

_DROPPED = re.compile(r"dropped=(\d+)")
_decode_query = msgspec.json.Decoder(dict[str, Any])


class InfluxError(Exception):
    """Any failure of the InfluxDB adapter."""


class InfluxUnavailable(InfluxError):
    """InfluxDB cannot take the request now; the same request may succeed later."""


class DatabaseNotFound(InfluxUnavailable):
    """The database does not exist (create it, then retry)."""


class InfluxRejected(InfluxError):
    """InfluxDB refused points of a write; retrying the same points will not help."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(f"InfluxDB rejected the write ({status}): {detail}")
        self.status = status
        self.detail = detail

    @property
    def partial(self) -> bool:
        """InfluxDB stored the other points of the request."""
        return self.detail.startswith("partial write")

    @property
    def dropped(self) -> int | None:
        found = _DROPPED.search(self.detail)
        return int(found.group(1)) if found else None


def _error_detail(response: httpx.Response) -> str:
    detail = response.headers.get("x-influxdb-error")
    if detail:
        return str(detail)
    try:
        body = _decode_query.decode(response.content)
        return str(body.get("error") or response.text)
    except msgspec.DecodeError:
        return response.text or response.reason_phrase


def _quote_ident(name: str) -> str:
    return '"' + name.replace("\\", "\\\\").replace('"', '\\"') + '"'


class InfluxClient:
    """Writes and queries one InfluxDB database over the v1 HTTP API."""

    def __init__(
        self,
        url: str,
        database: str,
        *,
        timeout: float = 10.0,
        client: httpx.AsyncClient | None = None,
    ) -> None:
        self.url = url
        self.database = database
        self._client = client or httpx.AsyncClient(
            base_url=url,
            timeout=httpx.Timeout(timeout, connect=min(timeout, 3.0)),
            limits=httpx.Limits(max_connections=16, max_keepalive_connections=16),
        )
        self._write_params = {"db": database, "precision": "ms"}

    async def __aenter__(self) -> InfluxClient:
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._client.aclose()

    async def _post(self, path: str, **kwargs: Any) -> httpx.Response:
        try:
            return await self._client.post(path, **kwargs)
        except httpx.HTTPError as e:  # connect, read, timeout, protocol
            raise InfluxUnavailable(f"InfluxDB at {self.url} unreachable: {e!r}") from e

    async def write(self, lines: bytes) -> None:
        """Store line-protocol points (ms precision); returns only on 204."""
        if not lines:
            return
        response = await self._post("/write", params=self._write_params, content=lines)
        status = response.status_code
        if status == 204:
            return
        detail = _error_detail(response)
        if status == 404 and "database not found" in detail:
            raise DatabaseNotFound(f"InfluxDB database {self.database!r} not found: {detail}")
        if status in (400, 413, 422):
            raise InfluxRejected(status, detail)
        raise InfluxUnavailable(f"InfluxDB answered {status}: {detail}")

    async def query(self, q: str, *, epoch: str = "ms") -> list[dict[str, Any]]:
        """Run InfluxQL against the database; return the `results` (error results raise)."""
        response = await self._post("/query", data={"q": q, "db": self.database, "epoch": epoch})
        if response.status_code >= 500:
            raise InfluxUnavailable(f"InfluxDB answered {response.status_code}")
        if response.status_code != 200:
            raise InfluxError(f"InfluxDB refused the query: {_error_detail(response)}")
        results: list[dict[str, Any]] = _decode_query.decode(response.content).get("results", [])
        for result in results:
            if "error" in result:
                raise InfluxError(f"InfluxDB refused the query: {result['error']}")
        return results

    async def create_database(self) -> None:
        """Create the database (a no-op when it exists)."""
        await self.query(f"CREATE DATABASE {_quote_ident(self.database)}")

    async def drop_database(self) -> None:
        await self.query(f"DROP DATABASE {_quote_ident(self.database)}")

    async def ping(self) -> bool:
        """True when InfluxDB answers /ping with 204."""
        try:
            response = await self._client.get("/ping", timeout=2.0)
        except httpx.HTTPError:
            return False
        return response.status_code == 204
