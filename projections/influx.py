"""Async InfluxDB v1 HTTP adapter: line-protocol writes, InfluxQL queries, database admin.

Speaks the v1 API (`POST /write`, `/query`, `/ping`) that InfluxDB 1.x serves natively and 2.x/3.x
serve through their compatibility endpoints. One keep-alive `httpx.AsyncClient` per adapter.
Errors are converted at this edge into our own hierarchy:

- `InfluxUnavailable`: the server is unreachable, timed out, answered 5xx, refused our
  credentials, or the database is missing; the same write can succeed later: retry it.
- `InfluxRejected`: the server refused (some of) the points (400 `unable to parse`, `field type
  conflict`, `partial write ... dropped=N`, 413): writing them again will fail again. Points of the
  same request that InfluxDB accepted are stored (writes are idempotent, so rewriting is safe).

Retention policies are the namespaces a replay builds beside the live data: a client made with
`retention_policy` writes into that policy; without one, into the database's default policy
(which is what readers that name no policy read).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime
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


def quote_ident(name: str) -> str:
    """An InfluxQL double-quoted identifier."""
    return '"' + name.replace("\\", "\\\\").replace('"', '\\"') + '"'


def quote_string(value: str) -> str:
    """An InfluxQL single-quoted string literal."""
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


_DURATION = re.compile(r"(?:\d+(?:ns|u|µ|ms|s|m|h|d|w))+|INF")


def _duration(text: str) -> str:
    """A duration literal as `SHOW RETENTION POLICIES` prints it (`0s`, `168h0m0s`), checked
    because it goes into a statement unquoted."""
    if not _DURATION.fullmatch(text):
        raise ValueError(f"not an InfluxQL duration: {text!r}")
    return text


def _epoch_ms(text: str) -> int:
    return int(datetime.fromisoformat(text).timestamp() * 1000)


@dataclass(frozen=True)
class RetentionPolicy:
    """One retention policy of a database (durations as InfluxDB prints them; `0s`: forever)."""

    name: str
    duration: str
    shard_group_duration: str
    replication: int
    default: bool


class InfluxClient:
    """Writes and queries one InfluxDB database over the v1 HTTP API."""

    def __init__(
        self,
        url: str,
        database: str,
        *,
        timeout: float = 10.0,
        client: httpx.AsyncClient | None = None,
        retention_policy: str | None = None,
    ) -> None:
        self.url = url
        self.database = database
        self.retention_policy = retention_policy
        self._client = client or httpx.AsyncClient(
            base_url=url,
            timeout=httpx.Timeout(timeout, connect=min(timeout, 3.0)),
            limits=httpx.Limits(max_connections=16, max_keepalive_connections=16),
        )
        self._write_params = {"db": database, "precision": "ms"}
        if retention_policy is not None:
            self._write_params["rp"] = retention_policy

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

    async def query(
        self, q: str, *, epoch: str = "ms", max_seconds: float | None = None
    ) -> list[dict[str, Any]]:
        """Run InfluxQL against the database; return the `results` (error results raise).
        `max_seconds` overrides the client's timeout for statements that run long (SELECT
        INTO)."""
        extra: dict[str, Any] = {}
        if max_seconds is not None:
            extra["timeout"] = httpx.Timeout(max_seconds, connect=min(max_seconds, 3.0))
        response = await self._post(
            "/query", data={"q": q, "db": self.database, "epoch": epoch}, **extra
        )
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
        await self.query(f"CREATE DATABASE {quote_ident(self.database)}")

    async def drop_database(self) -> None:
        await self.query(f"DROP DATABASE {quote_ident(self.database)}")

    async def retention_policies(self) -> list[RetentionPolicy]:
        """The database's retention policies (`DatabaseNotFound` when it does not exist)."""
        try:
            results = await self.query(f"SHOW RETENTION POLICIES ON {quote_ident(self.database)}")
        except InfluxError as e:
            if "database not found" in str(e):
                raise DatabaseNotFound(f"InfluxDB database {self.database!r} not found") from e
            raise
        series = results[0].get("series") if results else None
        if not series:
            return []
        columns = series[0]["columns"]
        policies = []
        for row in series[0].get("values", []):
            item = dict(zip(columns, row, strict=True))
            policies.append(
                RetentionPolicy(
                    name=str(item["name"]),
                    duration=str(item["duration"]),
                    shard_group_duration=str(item["shardGroupDuration"]),
                    replication=int(item["replicaN"]),
                    default=bool(item["default"]),
                )
            )
        return policies

    async def create_retention_policy(
        self,
        name: str,
        *,
        duration: str,
        shard_duration: str | None,
        replication: int = 1,
    ) -> None:
        """Create a (non-default) retention policy; durations as `SHOW RETENTION POLICIES`
        prints them (no shard duration: InfluxDB's default for the duration)."""
        shards = f" SHARD DURATION {_duration(shard_duration)}" if shard_duration else ""
        await self.query(
            f"CREATE RETENTION POLICY {quote_ident(name)} ON {quote_ident(self.database)} "
            f"DURATION {_duration(duration)} REPLICATION {int(replication)}{shards}"
        )

    async def default_policy(self) -> str:
        """The name of the database's default retention policy (`DatabaseNotFound` when the
        database does not exist): the generation live writers and readers use."""
        for policy in await self.retention_policies():
            if policy.default:
                return policy.name
        raise DatabaseNotFound(f"InfluxDB database {self.database!r} has no default policy")

    async def set_default_retention_policy(self, name: str) -> None:
        """Make `name` the default policy: from the next request on, writes and queries that
        name no policy use it (one change of the meta store, so it is atomic)."""
        await self.query(
            f"ALTER RETENTION POLICY {quote_ident(name)} ON {quote_ident(self.database)} DEFAULT"
        )

    async def drop_retention_policy(self, name: str) -> None:
        """Drop a retention policy and all its data (a no-op when it does not exist)."""
        await self.query(
            f"DROP RETENTION POLICY {quote_ident(name)} ON {quote_ident(self.database)}"
        )

    async def shard_groups(self, retention_policy: str) -> list[tuple[int, int]]:
        """The time ranges [start, end) in epoch ms of a policy's shard groups, oldest first:
        the unit a long copy is cut into (each statement then reads one shard)."""
        results = await self.query("SHOW SHARDS")
        ranges = set()
        for series in results[0].get("series", []) if results else []:
            if series.get("name") != self.database:
                continue
            columns = series["columns"]
            for row in series.get("values", []):
                item = dict(zip(columns, row, strict=True))
                if item["retention_policy"] == retention_policy:
                    ranges.add((_epoch_ms(item["start_time"]), _epoch_ms(item["end_time"])))
        return sorted(ranges)

    async def ping(self) -> bool:
        """True when InfluxDB answers /ping with 204."""
        try:
            response = await self._client.get("/ping", timeout=2.0)
        except httpx.HTTPError:
            return False
        return response.status_code == 204
