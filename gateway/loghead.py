"""How far the log has got: the event-store position of the EVENTS stream's last message.

The gateway reads it only for a consistency token ahead of its views (the rare path), to tell a
token the log has reached (wait for the views) from one it never issued (400). It connects to
NATS in the background and never waits for it: reads need no NATS, and while NATS is away the
head is unknown (None) and a token ahead of the views waits as it always did."""

from __future__ import annotations

import asyncio
import contextlib
import logging

from nats.aio.client import Client as NATS
from nats.errors import Error as NatsError

from infra.runtime import close_nats, connect_nats
from infra.streams import Streams

log = logging.getLogger(__name__)
POSITION_HEADER = "Iot-Position"
HEAD_TIMEOUT_S = 0.5  # one read of the head (stream info, then the last message)
CONNECT_RETRY_S = 1.0


class LogHead:
    """The EVENTS stream's last `Iot-Position` (0 when the stream is empty), over a NATS
    connection opened in the background by `start`; None while it is unknown."""

    def __init__(self, streams: Streams, nc: NATS | None = None) -> None:
        self.streams = streams
        self.nc = nc
        self._task: asyncio.Task[None] | None = None

    async def head(self) -> int | None:
        nc = self.nc
        if nc is None or not nc.is_connected:
            return None
        try:
            jsm = nc.jsm(timeout=HEAD_TIMEOUT_S)
            info = await jsm.stream_info(self.streams.events)
            last_seq = info.state.last_seq
            if not last_seq:
                return 0
            msg = await jsm.get_msg(self.streams.events, seq=last_seq)
            return int((msg.headers or {})[POSITION_HEADER])
        except (NatsError, TimeoutError, KeyError, ValueError) as e:
            log.warning("cannot read the log's head", extra={"error": repr(e)})
            return None

    def start(self, url: str, name: str = "iot-gateway") -> None:
        """Connect in the background, retrying until NATS answers (then nats-py reconnects)."""

        async def connect() -> None:
            while self.nc is None:
                try:
                    self.nc = await connect_nats(url, name)
                except Exception as e:
                    log.warning("NATS not reachable; retrying", extra={"error": repr(e)})
                    await asyncio.sleep(CONNECT_RETRY_S)

        self._task = asyncio.create_task(connect())

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self.nc is not None:
            with contextlib.suppress(Exception):
                await close_nats(self.nc)
