"""A leader lease in a JetStream KV bucket with a TTL: at most one holder at a time.

Acquire with `create` (only if the key is absent: expired, deleted or never written), renew with
`update(last=revision)` every `renew_every` seconds; the bucket's TTL drops a lease its holder
stopped renewing. The holder counts itself leader only until `ttl - margin` seconds after it
*sent* its last successful write: the server's TTL runs from when it stored that write, which is
later, so the holder steps down before anyone else can acquire. A renewal answered with a wrong
revision (someone else holds the key) steps down at once; a renewal that fails otherwise is
retried until that deadline. On a graceful stop the lease is deleted, so another replica takes
over at its next poll instead of after the TTL.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError

log = logging.getLogger(__name__)


class Bucket(Protocol):
    """What the lease needs of `nats.js.kv.KeyValue`."""

    async def create(self, key: str, value: bytes) -> int: ...

    async def update(self, key: str, value: bytes, last: int | None = None) -> int: ...

    async def get(self, key: str) -> Any: ...

    async def delete(self, key: str, last: int | None = None) -> bool: ...


class Lease:
    def __init__(
        self,
        bucket: Callable[[], Awaitable[Bucket]],
        key: str,
        owner: str,
        *,
        ttl: float = 10.0,
        renew_every: float = 3.0,
        poll_every: float = 0.5,
        margin: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
        on_change: Callable[[bool], None] = lambda _: None,
    ) -> None:
        self._open = bucket
        self.key = key
        self.owner = owner.encode()
        self.ttl = ttl
        self.renew_every = renew_every
        self.poll_every = poll_every
        self.margin = margin
        self.clock = clock
        self.on_change = on_change
        self.revision: int | None = None
        self._deadline = 0.0
        self._reported = False
        self._failing = False
        self._bucket: Bucket | None = None

    def is_leader(self) -> bool:
        return self.revision is not None and self.clock() < self._deadline

    async def step(self) -> None:
        """One attempt: acquire if not held, renew if held; report a change of leadership."""
        try:
            if self._bucket is None:
                self._bucket = await self._open()
            sent = self.clock()
            if self.revision is None or not self.is_leader():
                self.revision = None
                self.revision = await self._acquire(self._bucket)
            else:
                self.revision = await self._bucket.update(self.key, self.owner, last=self.revision)
            if self.revision is not None:
                self._deadline = sent + self.ttl - self.margin
            self._failing = False
        except KeyWrongLastSequenceError:
            if self.revision is not None:
                log.warning("dispatcher lease taken by another replica", extra={"key": self.key})
            self.revision = None
            self._failing = False
        except Exception as e:
            log.log(
                logging.DEBUG if self._failing else logging.WARNING,
                "dispatcher lease: NATS KV not answering",
                extra={"error": repr(e)},
            )
            self._failing = True
            self._bucket = None  # opened again next time: a NATS restart may have lost it
            if not self.is_leader():
                self.revision = None
        self._report()

    async def run(self, stop: asyncio.Event) -> None:
        try:
            while not stop.is_set():
                await self.step()
                wait = self.renew_every if self.is_leader() else self.poll_every
                if self.revision is not None:  # renewing: never wait past the deadline
                    wait = max(0.05, min(wait, self._deadline - self.clock()))
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), wait)
        finally:
            await self.release()

    async def release(self) -> None:
        """Give the lease up (graceful stop)."""
        revision, self.revision = self.revision, None
        self._report()
        if revision is not None and self._bucket is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._bucket.delete(self.key, last=revision), 2.0)

    async def _acquire(self, bucket: Bucket) -> int | None:
        try:
            return await bucket.create(self.key, self.owner)
        except KeyWrongLastSequenceError:
            pass
        # Held: by another replica, or by us if an earlier create was stored but its answer
        # lost (then adopt it rather than wait for it to expire).
        try:
            entry = await bucket.get(self.key)
        except KeyNotFoundError:
            return None
        if entry is None or entry.value != self.owner:
            return None
        return await bucket.update(self.key, self.owner, last=int(entry.revision))

    def _report(self) -> None:
        leader = self.is_leader()
        if leader != self._reported:
            self._reported = leader
            log.info("dispatcher leadership " + ("acquired" if leader else "lost"))
            self.on_change(leader)
