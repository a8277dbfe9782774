"""Process plumbing for composition roots: signals, start-up retries, NATS connections."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import nats
from nats.aio.client import Client as NATS

log = logging.getLogger(__name__)
T = TypeVar("T")


def stop_on_signals() -> asyncio.Event:
    """An event set by SIGINT or SIGTERM (graceful stop)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    return stop


async def retry_start(what: str, fn: Callable[[], T], attempts: int = 30, wait: float = 1.0) -> T:
    """Run a blocking start-up step in a thread, retrying while its dependency is down."""
    for attempt in range(1, attempts + 1):
        try:
            return await asyncio.to_thread(fn)
        except Exception as e:
            if attempt == attempts:
                raise
            log.warning(f"{what} not ready; retrying", extra={"error": str(e), "attempt": attempt})
            await asyncio.sleep(wait)
    raise AssertionError("unreachable")


async def retry_async(
    what: str, factory: Callable[[], Awaitable[T]], attempts: int = 30, wait: float = 1.0
) -> T:
    """Await a start-up step, retrying while its dependency is down."""
    for attempt in range(1, attempts + 1):
        try:
            return await factory()
        except Exception as e:
            if attempt == attempts:
                raise
            log.warning(f"{what} not ready; retrying", extra={"error": str(e), "attempt": attempt})
            await asyncio.sleep(wait)
    raise AssertionError("unreachable")


async def connect_nats(url: str, name: str) -> NATS:
    async def disconnected() -> None:
        log.warning("NATS disconnected")

    async def reconnected() -> None:
        log.info("NATS reconnected")

    async def error(e: Exception) -> None:
        log.warning("NATS error", extra={"error": repr(e)})

    return await nats.connect(
        url,
        name=name,
        connect_timeout=5,
        reconnect_time_wait=1,
        # A server that stops answering (paused, partitioned) with the TCP connection still up
        # is noticed after 3 unanswered pings, 9 s (the client's default: 2 pings, 2 minutes).
        ping_interval=3,
        max_outstanding_pings=3,
        max_reconnect_attempts=-1,
        allow_reconnect=True,
        disconnected_cb=disconnected,
        reconnected_cb=reconnected,
        error_cb=error,
    )


async def close_nats(nc: NATS) -> None:
    """Flush what was published (acks included), then close; `drain` can hang on a pull
    subscription until its 30 s timeout."""
    try:
        await nc.flush(timeout=2)
    except Exception as e:
        log.warning("NATS flush at shutdown failed", extra={"error": repr(e)})
    await nc.close()


def tcp_nodelay(sock: Any) -> None:
    """Turn off Nagle's algorithm on an MQTT client's socket (paho leaves it on).

    With it on, a small write that follows another still unacknowledged (a PUBACK then a
    publish, as a device answering a command does) waits for the peer's delayed ACK: ~40 ms."""
    with contextlib.suppress(OSError, AttributeError):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def paho_nodelay(client: Any, _userdata: Any, sock: Any) -> None:
    """paho's `on_socket_open` callback: `tcp_nodelay` on every (re)connection's socket."""
    tcp_nodelay(sock)


def paho_client(
    client_id: str,
    username: str = "",
    password: str = "",
    *,
    tls: bool = False,
    max_reconnect_delay: int = 30,
) -> Any:
    """A backend MQTT 5 client (paho): reconnects by itself, Nagle off, optional login/TLS."""
    import paho.mqtt.client as paho
    from paho.mqtt.enums import CallbackAPIVersion

    client = paho.Client(
        CallbackAPIVersion.VERSION2,
        client_id=client_id,
        protocol=paho.MQTTv5,
        reconnect_on_failure=True,
    )
    client.on_socket_open = paho_nodelay
    client.reconnect_delay_set(min_delay=1, max_delay=max_reconnect_delay)
    if username:
        client.username_pw_set(username, password or None)
    if tls:
        client.tls_set()
    return client
