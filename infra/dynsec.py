"""Mosquitto's dynamic security plugin: roles, ACLs, password hashes and an async control client.

The plugin keeps clients (username, password hash, optional client id), roles (ACLs) and the
default ACL access in one JSON file it reads at start and rewrites on every change; while the
broker runs it is changed only through JSON commands published on `$CONTROL/dynamic-security/v1`,
answered on `.../response`. The file itself is written by `iot.dynsec_config` before the broker
starts; devices are added later, by the auth projector, through this client.

- Passwords are stored the way the plugin stores them (2.0.11): PBKDF2-HMAC-SHA512 over the
  password with a random 12-byte salt, 64-byte digest, base64; salt and iteration count beside
  it. 101 iterations is what the plugin itself writes; a higher count works but costs every
  CONNECT of that user.
- Backend usernames contain `:`, which no device id can (`[A-Za-z0-9_-]`), so registering a
  device can never take over or change a backend user.
- `DynsecClient` sends commands and matches each answer by its `correlationData`.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import json
import logging
import secrets
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as paho

from infra.runtime import paho_client

log = logging.getLogger(__name__)

CONTROL_TOPIC = "$CONTROL/dynamic-security/v1"
RESPONSE_TOPIC = f"{CONTROL_TOPIC}/response"
ITERATIONS = 101
SALT_BYTES = 12
HASH_BYTES = 64

ADMIN_USERNAME = "iot:auth"
BRIDGE_USERNAME = "iot:bridge"
ADMIN_ROLE = "iot:dynsec-admin"
BRIDGE_ROLE = "iot:bridge"
BRIDGE_SHARE_GROUP = "iot-bridge"
BRIDGE_SUBSCRIBES = ("telemetry", "status", "reported", "commands/ack")
BRIDGE_PUBLISHES = ("commands", "desired")

# Deny all: a client may do only what one of its roles allows.
DEFAULT_ACL_ACCESS = {
    "publishClientSend": False,
    "publishClientReceive": False,
    "subscribe": False,
    "unsubscribe": False,
}


# --- ACLs and roles -------------------------------------------------------------------------


@dataclass(frozen=True)
class Acl:
    acltype: str  # publishClientSend, publishClientReceive, subscribeLiteral, subscribePattern, ...
    topic: str
    allow: bool = True
    priority: int = 0

    def as_json(self) -> dict[str, Any]:
        return {
            "acltype": self.acltype,
            "topic": self.topic,
            "allow": self.allow,
            "priority": self.priority,
        }


def _full(topic: str) -> list[Acl]:
    """Publish, receive, subscribe and unsubscribe on a topic filter."""
    return [
        Acl("publishClientSend", topic),
        Acl("publishClientReceive", topic),
        Acl("subscribePattern", topic),
        Acl("unsubscribePattern", topic),
    ]


def device_role(device_id: str) -> str:
    return f"device-{device_id}"


def device_acls(device_id: str) -> list[Acl]:
    """A device may publish and subscribe only under `devices/<its id>/`."""
    return _full(f"devices/{device_id}/#")


def admin_acls() -> list[Acl]:
    """The auth projector: the plugin's control topics and nothing else."""
    return _full("$CONTROL/dynamic-security/#")


def bridge_acls(group: str = BRIDGE_SHARE_GROUP) -> list[Acl]:
    """The bridge: read what devices send (directly or through its shared subscription),
    send commands and the retained desired state."""
    acls: list[Acl] = []
    for suffix in BRIDGE_SUBSCRIBES:
        topic = f"devices/+/{suffix}"
        acls += [
            Acl("subscribePattern", topic),
            Acl("subscribePattern", f"$share/{group}/{topic}"),
            Acl("unsubscribePattern", topic),
            Acl("unsubscribePattern", f"$share/{group}/{topic}"),
            Acl("publishClientReceive", topic),
        ]
    acls += [Acl("publishClientSend", f"devices/+/{suffix}") for suffix in BRIDGE_PUBLISHES]
    return acls


# --- password hashes ------------------------------------------------------------------------


def hash_password(
    password: str, *, salt: bytes | None = None, iterations: int = ITERATIONS
) -> dict[str, Any]:
    """The `password`, `salt` and `iterations` fields of a client in the plugin's file."""
    if iterations < 1:
        raise ValueError("iterations must be at least 1")
    salt = secrets.token_bytes(SALT_BYTES) if salt is None else salt
    if not 1 <= len(salt) <= HASH_BYTES:
        raise ValueError(f"salt must be 1 to {HASH_BYTES} bytes")
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, iterations, HASH_BYTES)
    return {
        "password": base64.b64encode(digest).decode("ascii"),
        "salt": base64.b64encode(salt).decode("ascii"),
        "iterations": iterations,
    }


def verify_password(password: str, client: Mapping[str, Any]) -> bool:
    """Whether a client entry of the plugin's file accepts `password`."""
    try:
        salt = base64.b64decode(client["salt"], validate=True)
        expected = base64.b64decode(client["password"], validate=True)
        iterations = int(client["iterations"])
    except (KeyError, ValueError, TypeError):
        return False
    if iterations < 1:
        return False
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, iterations, HASH_BYTES)
    return hmac.compare_digest(digest, expected)


def random_password() -> str:
    """An unguessable password (256 bits)."""
    return secrets.token_urlsafe(32)


# --- the control client ---------------------------------------------------------------------


class DynsecError(Exception):
    """Base of the control client's errors."""


class DynsecUnavailable(DynsecError):
    """The broker cannot be asked now (not connected, or no answer in time): try again later."""


class DynsecCommandError(DynsecError):
    """The plugin answered a command with an error."""

    def __init__(self, command: str, error: str) -> None:
        super().__init__(f"{command}: {error}")
        self.command = command
        self.error = error

    @property
    def not_found(self) -> bool:
        return "not found" in self.error.lower()

    @property
    def exists(self) -> bool:
        return "already exists" in self.error.lower()


class DynsecClient:
    """Commands to the plugin over MQTT (paho's network thread reconnects by itself); each
    answer is matched to its command by a unique `correlationData`."""

    def __init__(
        self,
        host: str,
        port: int,
        username: str,
        password: str,
        *,
        tls: bool = False,
        client_id: str = "",
        timeout: float = 5.0,
        keepalive: int = 30,
    ) -> None:
        self.timeout = timeout
        self._host = host
        self._port = port
        self._keepalive = keepalive
        self._loop: asyncio.AbstractEventLoop | None = None
        self._pending: dict[str, asyncio.Future[dict[str, Any]]] = {}
        self._ready = threading.Event()  # connected and subscribed to the answers
        self._ready_async = asyncio.Event()
        self._sub_mid: int | None = None
        self._stopping = False
        self.last_error = ""
        client = paho_client(
            client_id or f"iot-auth-{secrets.token_hex(4)}",
            username,
            password,
            tls=tls,
            max_reconnect_delay=10,
        )
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_subscribe = self._on_subscribe
        client.on_message = self._on_message
        self._client = client

    @property
    def connected(self) -> bool:
        return self._ready.is_set()

    async def start(self) -> None:
        """Begin connecting (in the background: `wait_ready` waits for it)."""
        self._loop = asyncio.get_running_loop()
        self._client.connect_async(self._host, self._port, self._keepalive)
        self._client.loop_start()

    async def wait_ready(self, within: float | None = None) -> None:
        try:
            await asyncio.wait_for(self._ready_async.wait(), within)
        except TimeoutError as e:
            detail = f": {self.last_error}" if self.last_error else ""
            raise DynsecUnavailable(
                f"no control connection to {self._host}:{self._port}{detail}"
            ) from e

    async def stop(self) -> None:
        self._stopping = True
        self._client.disconnect()
        await asyncio.to_thread(self._client.loop_stop)
        self._fail_pending(DynsecUnavailable("control client stopped"))

    async def execute(self, commands: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
        """Send commands in one message; return each answer (with `error` if it failed)."""
        if not commands:
            return []
        if self._loop is None or not self.connected:
            raise DynsecUnavailable("not connected to the broker")
        loop = self._loop
        futures: list[asyncio.Future[dict[str, Any]]] = []
        payload: list[dict[str, Any]] = []
        for command in commands:
            correlation = secrets.token_hex(12)
            future: asyncio.Future[dict[str, Any]] = loop.create_future()
            self._pending[correlation] = future
            futures.append(future)
            payload.append({**command, "correlationData": correlation})
        try:
            info = self._client.publish(CONTROL_TOPIC, json.dumps({"commands": payload}), qos=1)
            if info.rc != paho.MQTT_ERR_SUCCESS:
                raise DynsecUnavailable(f"publish failed: {paho.error_string(info.rc)}")
            done, _ = await asyncio.wait(futures, timeout=self.timeout)
            errors = [e for e in (f.exception() for f in done) if e is not None]
            if errors:  # every one retrieved: none is reported as "never retrieved"
                raise errors[0]
            if len(done) < len(futures):
                raise DynsecUnavailable(f"no answer from the broker within {self.timeout:g} s")
            return [f.result() for f in futures]
        finally:
            for item in payload:
                pending = self._pending.pop(item["correlationData"], None)
                if pending is not None and not pending.done():
                    pending.cancel()

    async def command(self, command: str, **fields: Any) -> dict[str, Any]:
        """One command; its answer's `data` ({} if none); DynsecCommandError if it failed."""
        (answer,) = await self.execute([{"command": command, **fields}])
        if answer.get("error"):
            raise DynsecCommandError(command, str(answer["error"]))
        data = answer.get("data")
        return data if isinstance(data, dict) else {}

    # --- paho's network thread --------------------------------------------------------------
    def _on_connect(
        self, client: paho.Client, _: Any, _flags: Any, reason: Any, _properties: Any
    ) -> None:
        if reason.is_failure:
            self.last_error = str(reason)
            log.warning("dynsec control connection refused", extra={"reason": str(reason)})
            return
        result, mid = client.subscribe(RESPONSE_TOPIC, qos=0)
        self._sub_mid = mid if result == paho.MQTT_ERR_SUCCESS else None

    def _on_subscribe(
        self, _client: paho.Client, _: Any, mid: int, reasons: Any, _properties: Any
    ) -> None:
        if mid != self._sub_mid:
            return
        if any(r.is_failure for r in reasons):
            self.last_error = f"subscription to {RESPONSE_TOPIC} refused"
            log.error("dynsec: " + self.last_error + " (is the user an admin of the plugin?)")
            return
        self.last_error = ""
        self._ready.set()
        self._call(self._ready_async.set)
        log.info("dynsec control connection ready")

    def _on_disconnect(
        self, _client: paho.Client, _: Any, _flags: Any, reason: Any, _properties: Any
    ) -> None:
        was_ready = self._ready.is_set()
        self._ready.clear()
        self._call(self._ready_async.clear)
        if was_ready and not self._stopping:
            log.warning("dynsec control connection lost", extra={"reason": str(reason)})
            self._call(lambda: self._fail_pending(DynsecUnavailable("connection lost")))

    def _on_message(self, _client: paho.Client, _: Any, message: paho.MQTTMessage) -> None:
        payload = bytes(message.payload)
        self._call(lambda: self._deliver(payload))

    def _call(self, fn: Any) -> None:
        if self._loop is not None and not self._loop.is_closed():
            with contextlib.suppress(RuntimeError):  # loop closing
                self._loop.call_soon_threadsafe(fn)

    # --- the event loop ---------------------------------------------------------------------
    def _deliver(self, payload: bytes) -> None:
        try:
            answers = json.loads(payload).get("responses", [])
        except (ValueError, AttributeError):
            log.warning("dynsec: undecodable answer ignored")
            return
        for answer in answers if isinstance(answers, list) else []:
            if not isinstance(answer, dict):
                continue
            future = self._pending.get(str(answer.get("correlationData", "")))
            if future is not None and not future.done():  # others' answers are not ours
                future.set_result(answer)

    def _fail_pending(self, error: Exception) -> None:
        for future in self._pending.values():
            if not future.done():
                future.set_exception(error)
