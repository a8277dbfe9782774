"""Per-token rate limit: a fixed one-minute window counter in Redis, keyed by the principal."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

from redis.asyncio import Redis

WINDOW_S = 60


@dataclass(frozen=True)
class Verdict:
    allowed: bool
    limit: int
    remaining: int
    retry_after_s: int


def rate_limit_prefix(namespace: str) -> str:
    return f"{namespace or 'iot'}:gateway:ratelimit"


class RateLimiter:
    """At most `limit` requests per principal per clock minute (shared by every replica).

    A fixed window lets a client spend up to twice the limit across a window boundary; that
    is the price of one INCR per request.
    """

    def __init__(
        self,
        redis: Redis,
        prefix: str,
        limit: int,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._redis = redis
        self._prefix = prefix
        self.limit = limit
        self._clock = clock

    async def hit(self, principal: str) -> Verdict:
        now = self._clock()
        window = int(now // WINDOW_S)
        key = f"{self._prefix}:{principal}:{window}"
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.incr(key)
            pipe.expire(key, 2 * WINDOW_S)
            count, _ = await pipe.execute()
        allowed = int(count) <= self.limit
        retry_after = max(1, math.ceil((window + 1) * WINDOW_S - now))
        return Verdict(allowed, self.limit, max(self.limit - int(count), 0), retry_after)
