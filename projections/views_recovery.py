"""The live views projector's answer to Redis losing its data: notice, flag, rebuild, resume.

Redis can lose the views (a FLUSHALL, a restart without persistence, a new empty volume). The
loss marker (`infra.views.marker_key`, a random token) tells: the projector adopts it at start
and names it in every write (`projections.views_scripts`: a guarded script refuses unless Redis
holds the token), and checks it every `CHECK_EVERY_S` while idle. When it is gone:

1. the views are flagged incomplete at once (`infra.views.rebuilding_key`, set only while the
   marker is absent): the gateway answers its view reads 503 and its `/readyz` is 503, and this
   projector's `/readyz` says `"views": false`;
2. the live consumers hold: nothing is written or acknowledged (each batch waits up to
   `HOLD_S`, then is nak'ed and comes back), so what arrives meanwhile stays in JetStream;
3. one projector (the `iot replay views` lock, a PostgreSQL advisory lock) rebuilds the views
   from the log with the replay (`projections.views_replay`: event store, EVENTS, INGEST into a
   new generation) and switches readers to it; once it has also read the log up to where it
   ended at the switch, one script writes a new marker and removes the flag;
4. every projector adopts the new marker and resumes: the held messages are applied to the
   rebuilt generation (idempotently: what the rebuild already has is skipped or changes nothing).

A Redis restart that kept its data keeps the marker: the projector reconnects and goes on. While
Redis is unreachable each batch is held (pinging with backoff, up to `HOLD_S`), then nak'ed:
nothing is acknowledged that was not stored.

At start, an absent marker is a loss if the projector's durable consumers have acknowledged
anything (their ack floor: JetStream remembers what Redis forgot); otherwise the views are new
(nothing consumed yet) or older than the marker (they exist: it is written for them).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import time
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import redis.asyncio as aioredis
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js.errors import NotFoundError
from prometheus_client import Counter, Gauge
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from infra.jetstream import ConsumerSpec, Handler, Outcome
from infra.replay import Progress, ReplayContext, ReplayError, replay_lock
from infra.settings import Settings
from infra.views import CurrentKeys, rebuilding_key
from projections import views_scripts
from projections.views import Marker, ViewsLost
from projections.views_replay import ViewsReplay

log = logging.getLogger(__name__)
CHECK_EVERY_S = 1.0  # how often an idle projector looks at the marker
HOLD_S = 5.0  # how long a batch waits for the views (or Redis) before it is nak'ed
RETRY_MAX_S = 10.0  # the longest pause between two attempts to rebuild

REBUILDS = Counter(
    "iot_views_rebuilds_total",
    "Automatic rebuilds of the views after Redis lost them, by outcome",
    ["outcome"],
)
INCOMPLETE = Gauge(
    "iot_views_incomplete",
    "1 while this projector knows the views lost (flagged, being rebuilt), else 0",
)
REBUILD_SECONDS = Gauge(
    "iot_views_rebuild_seconds", "How long the last automatic rebuild took, loss to switch"
)

REDIS_DOWN = (RedisConnectionError, RedisTimeoutError, OSError)


@dataclass(frozen=True)
class Rebuilt:
    """One automatic rebuild: when the loss was noticed, how long it took, what it read."""

    noticed_at: float  # epoch s
    seconds: float
    lines: tuple[str, ...]


class ViewsRecovery:
    """Holds the live projector's marker; notices a loss and rebuilds (see the module doc)."""

    def __init__(
        self,
        settings: Settings,
        redis: aioredis.Redis,
        nc: NATS,
        specs: Sequence[ConsumerSpec],
        *,
        marker: Marker | None = None,
        check_every: float = CHECK_EVERY_S,
        hold: float = HOLD_S,
        caught_up: int | None = None,
    ) -> None:
        self.settings = settings
        self.redis = redis
        self.nc = nc
        self.specs = list(specs)
        self.marker = marker or Marker.for_namespace(settings.namespace)
        self.rebuilding_key = rebuilding_key(settings.namespace)
        self.check_every = check_every
        self.hold = hold
        self.caught_up = caught_up
        self.intact = asyncio.Event()  # set while the marker is the one we write with
        self.redis_up = True
        self.rebuilt: deque[Rebuilt] = deque(maxlen=16)  # this process's, newest last
        self._noticed = asyncio.Event()  # a loss noticed by a batch: wake the watcher
        self._lost_at: float | None = None

    # --- readiness ----------------------------------------------------------------------

    def checks(self) -> Mapping[str, bool]:
        """`views`: false while the views are known incomplete."""
        return {"views": self.intact.is_set()}

    # --- the marker ----------------------------------------------------------------------

    async def start(self) -> bool:
        """Decide at start whether the views hold the log (adopting or writing the marker) or
        were lost; True when intact."""
        marker, rebuilding = await self.redis.mget(self.marker.key, self.rebuilding_key)
        if marker is not None:
            self._adopt(_text(marker))
            return True
        if rebuilding is None and (await self._views_exist() or not await self._consumed()):
            token = secrets.token_hex(16)
            await self.redis.set(self.marker.key, token, nx=True)
            stored = await self.redis.get(self.marker.key)
            if stored is not None:
                self._adopt(_text(stored))
                log.info("views marker written", extra={"marker": self.marker.key})
                return True
        self._lose(
            "the views marker is absent and the views consumers have acknowledged "
            "messages: Redis lost the views while the projector was away"
        )
        return False

    async def check(self) -> bool:
        """Look at the marker now: adopt a new one (a rebuild elsewhere), notice a loss; True
        when intact. Raises if Redis cannot be reached."""
        raw = await self.redis.get(self.marker.key)
        if raw is not None:
            token = _text(raw)
            if token != self.marker.token:
                self._adopt(token)
            return True
        if self.intact.is_set():
            self._lose("the views marker is gone: Redis lost its data")
        return False

    def _adopt(self, token: str) -> None:
        if self.marker.token and token != self.marker.token:
            log.info("views marker changed: the views were rebuilt", extra={"marker": token})
        self.marker.token = token
        self._lost_at = None
        self.intact.set()
        INCOMPLETE.set(0)

    def _lose(self, why: str) -> None:
        if self._lost_at is None:
            self._lost_at = time.time()
            log.error("views lost; rebuilding them from the log", extra={"reason": why})
        self.marker.token = ""
        self.intact.clear()
        INCOMPLETE.set(1)
        self._noticed.set()

    async def _views_exist(self) -> bool:
        """Views written before the marker existed (an upgrade): any of the generation's
        indexes or its checkpoint."""
        keys = await CurrentKeys(self.redis, self.settings.namespace).resolve()
        found = await self.redis.exists(
            keys.position_seq, keys.devices, keys.rules, keys.online, keys.alerts
        )
        return bool(found)

    async def _consumed(self) -> bool:
        """Has any of the projector's durable consumers acknowledged a message?"""
        js = self.nc.jetstream()
        for spec in self.specs:
            try:
                info = await js.consumer_info(spec.stream, spec.durable)
            except NotFoundError:
                continue
            if info.ack_floor and int(info.ack_floor.stream_seq or 0) > 0:
                return True
        return False

    # --- the consumers' side ---------------------------------------------------------------

    def guarded(self, handler: Handler) -> Handler:
        """`handler` for the live consumers: held while the views are lost or Redis is away,
        never acknowledging a batch whose writes did not happen."""

        async def run(msgs: Sequence[Msg]) -> Outcome | None:
            everything = Outcome(retry=set(range(len(msgs))))
            for attempt in (1, 2):
                if not self.intact.is_set() and not await self._wait(self.intact, self.hold):
                    return everything
                try:
                    outcome = await handler(msgs)
                except ViewsLost:
                    try:
                        intact = await self.check()  # a new marker (adopted) or a loss
                    except REDIS_DOWN:
                        return everything
                    if intact and attempt == 1:
                        continue  # rebuilt elsewhere meanwhile: apply to the new generation
                    return everything
                except REDIS_DOWN as e:
                    await self._redis_away(e)
                    return everything
                self._redis_back()
                return outcome
            return everything

        return run

    async def _redis_away(self, error: BaseException) -> None:
        """Wait (up to `hold`) for Redis to answer again, pinging with backoff; then check the
        marker: a Redis that came back empty is a loss."""
        if self.redis_up:
            self.redis_up = False
            log.warning("views: Redis unreachable; holding batches", extra={"error": repr(error)})
        deadline = time.monotonic() + self.hold
        pause = 0.1
        while time.monotonic() < deadline:
            with contextlib.suppress(*REDIS_DOWN):
                await self.redis.ping()
                self._redis_back()
                await self.check()
                return
            await asyncio.sleep(min(pause, max(0.0, deadline - time.monotonic())))
            pause = min(pause * 2, 1.0)

    def _redis_back(self) -> None:
        if not self.redis_up:
            self.redis_up = True
            log.info("views: Redis reachable again")

    @staticmethod
    async def _wait(event: asyncio.Event, seconds: float) -> bool:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(event.wait(), seconds)
        return event.is_set()

    # --- watching and rebuilding -----------------------------------------------------------

    async def watch(self, stop: asyncio.Event) -> None:
        """Check the marker every `check_every` s (and at once when a batch noticed a loss);
        rebuild when it is gone. Runs until `stop` is set."""
        while not stop.is_set():
            if not self.intact.is_set():
                await self._recover(stop)
                continue
            with contextlib.suppress(*REDIS_DOWN):  # readiness says so; the batches hold
                await self.check()
            if self.intact.is_set():
                self._noticed.clear()
                stopping = asyncio.create_task(stop.wait())
                noticed = asyncio.create_task(self._noticed.wait())
                await asyncio.wait(
                    {stopping, noticed}, timeout=self.check_every, return_when="FIRST_COMPLETED"
                )
                for task in (stopping, noticed):
                    task.cancel()

    async def _flag(self) -> None:
        """Flag the views incomplete, only while the marker is absent (a switch that has just
        written it must not be followed by a stale flag)."""
        reason = json.dumps(
            {
                "since_ms": int((self._lost_at or time.time()) * 1000),
                "reason": "Redis lost the views; rebuilding from the log",
            }
        )
        await self.redis.eval(views_scripts.FLAG, 2, self.marker.key, self.rebuilding_key, reason)

    async def _recover(self, stop: asyncio.Event) -> None:
        """Rebuild the views (or wait for whoever is rebuilding them) until the marker is back."""
        pause = 0.5
        while not stop.is_set() and not self.intact.is_set():
            try:
                await self._flag()
                async with replay_lock(self.settings, "views"):
                    if await self.check():
                        return  # rebuilt by someone else while we waited for the lock
                    await self._flag()
                    await self._rebuild()
                    if await self.check():
                        return
            except ReplayError as e:  # another replay holds the lock, or the build was lost
                log.info("views: waiting for the rebuild", extra={"reason": str(e)})
            except asyncio.CancelledError:
                raise
            except Exception as e:  # Redis, PostgreSQL or NATS away: try again
                REBUILDS.labels("failed").inc()
                log.warning("views: rebuild failed; retrying", extra={"error": repr(e)})
            with contextlib.suppress(*REDIS_DOWN):
                if await self.check():
                    return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), pause)
            pause = min(pause * 2, RETRY_MAX_S)

    async def _rebuild(self) -> None:
        noticed = self._lost_at or time.time()
        started = time.monotonic()
        context = ReplayContext(self.settings, self.nc)
        if self.caught_up is not None:
            context.caught_up = self.caught_up
        report = await ViewsReplay(context).run(Progress(enabled=False))
        took = time.monotonic() - started
        REBUILDS.labels("done").inc()
        REBUILD_SECONDS.set(time.time() - noticed)
        self.rebuilt.append(Rebuilt(noticed, took, tuple(report.lines)))
        log.warning(
            "views rebuilt from the log after Redis lost them",
            extra={"seconds": round(took, 2), "summary": " | ".join(report.lines)},
        )


def _text(raw: bytes | str) -> str:
    return raw.decode() if isinstance(raw, bytes) else raw
