"""Load-generator HTTP clients: a minimal keep-alive HTTP/1.1 pool, and httpx for comparison.

The minimal client exists because the client shares two cores with the server: every CPU
cycle it spends is taken from the system under test, so it should spend as few as it can.
"""

from __future__ import annotations

import asyncio
import time
from typing import Protocol

import httpx


class Client(Protocol):
    async def send(self, method: str, path: str, body: bytes) -> tuple[int, bytes]:
        """Send one request; return (status, body). Raises OSError and the like on failure."""
        ...

    async def close(self) -> None: ...


# uvicorn closes a keep-alive connection idle for 5 s; one idle longer than this is not reused,
# so a request is never sent on a connection the server is closing.
MAX_IDLE = 3.0


class _Connection:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.idle_since = time.monotonic()

    def close(self) -> None:
        self.writer.close()


class RawClient:
    """Keep-alive HTTP/1.1 connections to one server, at most `size` open (LIFO reuse)."""

    def __init__(self, host: str, port: int, token: str, size: int) -> None:
        self.host = host
        self.port = port
        self.size = size
        self._head = (
            f"Host: {host}:{port}\r\nAuthorization: Bearer {token}\r\n"
            "Content-Type: application/json\r\nContent-Length: "
        ).encode()
        self._idle: list[_Connection] = []
        self._open = 0
        self._freed = asyncio.Condition()

    async def _acquire(self) -> _Connection:
        async with self._freed:
            while not self._idle and self._open >= self.size:
                await self._freed.wait()
            now = time.monotonic()
            while self._idle:
                conn = self._idle.pop()
                if now - conn.idle_since < MAX_IDLE:
                    return conn
                conn.close()
                self._open -= 1
            self._open += 1
        try:
            reader, writer = await asyncio.open_connection(self.host, self.port)
        except BaseException:
            await self._discard()
            raise
        return _Connection(reader, writer)

    async def _discard(self) -> None:
        async with self._freed:
            self._open -= 1
            self._freed.notify()

    async def _release(self, conn: _Connection) -> None:
        conn.idle_since = time.monotonic()
        async with self._freed:
            self._idle.append(conn)
            self._freed.notify()

    async def send(self, method: str, path: str, body: bytes) -> tuple[int, bytes]:
        conn = await self._acquire()
        try:
            conn.writer.write(
                b"%s %s HTTP/1.1\r\n%s%d\r\n\r\n%s"
                % (method.encode(), path.encode(), self._head, len(body), body)
            )
            head = await conn.reader.readuntil(b"\r\n\r\n")
            status = int(head[9:12])
            lower = head.lower()
            at = lower.find(b"\r\ncontent-length:")
            if at < 0:
                raise ValueError("response without Content-Length")
            end = lower.index(b"\r\n", at + 2)
            answer = await conn.reader.readexactly(int(lower[at + 17 : end]))
        except BaseException:
            conn.close()
            await self._discard()
            raise
        if b"\r\nconnection: close" in lower:
            conn.close()
            await self._discard()
        else:
            await self._release(conn)
        return status, answer

    async def close(self) -> None:
        async with self._freed:
            for conn in self._idle:
                conn.close()
            self._open -= len(self._idle)
            self._idle.clear()


class HttpxClient:
    """httpx.AsyncClient with a pool of `size` keep-alive connections."""

    def __init__(self, host: str, port: int, token: str, size: int) -> None:
        self._client = httpx.AsyncClient(
            base_url=f"http://{host}:{port}",
            headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
            limits=httpx.Limits(max_connections=size, max_keepalive_connections=size),
            timeout=30.0,
        )

    async def send(self, method: str, path: str, body: bytes) -> tuple[int, bytes]:
        response = await self._client.request(method, path, content=body)
        return response.status_code, response.content

    async def close(self) -> None:
        await self._client.aclose()


def make_client(kind: str, host: str, port: int, token: str, size: int) -> Client:
    if kind == "raw":
        return RawClient(host, port, token, size)
    if kind == "httpx":
        return HttpxClient(host, port, token, size)
    raise ValueError(f"unknown client {kind!r}")
