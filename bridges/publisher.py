"""Pipelined JetStream publishing: a publish returns a future resolved by the stream's answer.

Like nats-py's `publish_async`, but its futures are ours: nats-py's leaks a pending future and
a semaphore slot whenever the underlying publish raises (as it does while NATS is down and its
reconnect buffer is full), which would in time block every publish. Here a failed publish
raises and leaves nothing behind; unanswered futures are cancelled by the caller's timeout.
"""

from __future__ import annotations

import asyncio
from typing import Any

import msgspec
from nats.aio.client import Client as NATS


class PublishError(Exception):
    """JetStream refused the message (or nothing listens on the subject)."""


class PubAck(msgspec.Struct, frozen=True):
    stream: str = ""
    seq: int = 0
    duplicate: bool = False


class _Answer(msgspec.Struct, frozen=True):
    stream: str = ""
    seq: int = 0
    duplicate: bool = False
    error: dict[str, Any] | None = None


_decode_answer = msgspec.json.Decoder(_Answer).decode


class Publisher:
    def __init__(self, nc: NATS) -> None:
        self.nc = nc
        self._prefix = ""
        self._futures: dict[str, asyncio.Future[PubAck]] = {}
        self._next = 0

    async def start(self) -> None:
        self._prefix = self.nc.new_inbox() + "."
        await self.nc.subscribe(self._prefix + "*", cb=self._answer)

    def pending(self) -> int:
        return len(self._futures)

    async def publish_async(
        self, subject: str, payload: bytes, headers: dict[str, str] | None = None
    ) -> asyncio.Future[PubAck]:
        self._next += 1
        token = str(self._next)
        future: asyncio.Future[PubAck] = asyncio.get_running_loop().create_future()
        self._futures[token] = future
        future.add_done_callback(lambda _: self._futures.pop(token, None))
        try:
            await self.nc.publish(subject, payload, reply=self._prefix + token, headers=headers)
        except BaseException:
            future.cancel()
            raise
        return future

    async def publish(
        self, subject: str, payload: bytes, wait: float, headers: dict[str, str] | None = None
    ) -> PubAck:
        """Publish and wait at most `wait` seconds for the answer."""
        future = await self.publish_async(subject, payload, headers)
        return await asyncio.wait_for(future, wait)

    async def _answer(self, msg: Any) -> None:
        future = self._futures.get(msg.subject[len(self._prefix) :])
        if future is None or future.done():
            return
        if msg.headers and msg.headers.get("Status") == "503":
            future.set_exception(PublishError(f"no stream answers on {msg.subject}"))
            return
        try:
            answer = _decode_answer(msg.data)
        except msgspec.DecodeError as e:
            future.set_exception(PublishError(f"unreadable JetStream answer: {e}"))
            return
        if answer.error is not None:
            future.set_exception(PublishError(f"JetStream refused the message: {answer.error}"))
            return
        future.set_result(PubAck(answer.stream, answer.seq, answer.duplicate))
