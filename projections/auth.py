"""`iot run projector auth`: device events -> Mosquitto's dynamic security plugin.

One durable consumer of the EVENTS stream with one message in flight (`max_ack_pending` 1), so
the broker sees each device's lifecycle strictly in log order (a suspend is never overtaken by
the resume after it). For each device:

- registered: role `device-<id>` (publish, receive, subscribe only under `devices/<id>/#`) and a
  client with username = client id = device id and the secret the command API handed over
  (`infra.secrets`), which is then forgotten;
- secret rotated: the new secret (the plugin disconnects the device's connections with it);
- suspended / resumed: the client disabled (connections dropped) / enabled;
- decommissioned: client and role deleted (connections dropped).

Every step is idempotent (an existing client is modified, a missing one on delete is fine), so
a redelivered event changes nothing. A secret that has not (yet) arrived is waited for a while;
if it never comes the device gets an unguessable random password (for a registration whose
client exists already, that client's password is kept) and needs a rotation: counted in
`iot_auth_missing_secrets_total` and logged. Other events are acknowledged at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

import msgspec
from nats.aio.msg import Msg
from nats.js.client import JetStreamContext
from prometheus_client import Counter
from starlette.routing import BaseRoute

from domain.device import DEVICE_ID
from domain.published import (
    DeviceDecommissioned,
    DeviceRegistered,
    DeviceResumed,
    DeviceSecretRotated,
    DeviceSuspended,
    PublishedEvent,
    decode_event,
)
from infra import dynsec, metrics, secrets
from infra.dynsec import DynsecClient, DynsecCommandError, DynsecUnavailable
from infra.httpkit import build_app, serve
from infra.jetstream import ConsumerSpec, Outcome, consume, dead_letter_message, report_lag
from infra.runtime import close_nats, connect_nats, retry_async, stop_on_signals
from infra.settings import Settings, SettingsError
from infra.streams import SECRET_TTL_S, Streams

log = logging.getLogger(__name__)
AUTH_PORT = 8083
CONSUMER = "auth"
SECRET_WAIT_S = 10.0  # the API hands the secret over right after storing the event
SECRET_POLL_S = 0.1
ACK_WAIT_S = 60.0  # longer than the secret wait plus a few broker round trips

OPERATIONS = Counter(
    "iot_auth_operations_total",
    "Device events applied to the broker's dynamic security plugin, by event",
    ["event"],
)
FAILURES = Counter(
    "iot_auth_failures_total",
    "Events the auth projection could not apply (yet), by reason",
    ["reason"],
)
MISSING_SECRETS = Counter(
    "iot_auth_missing_secrets_total",
    "Devices given a random password because their secret never arrived (need a rotation)",
    ["event"],
)
IGNORED = Counter("iot_auth_ignored_total", "Events with no effect on the broker's access control")
LAG = metrics.PROJECTION_LAG.labels(projection="auth")


class Plugin(Protocol):
    """The dynamic security plugin's control API (`infra.dynsec.DynsecClient`)."""

    async def command(self, command: str, **fields: Any) -> dict[str, Any]: ...


class SecretSource(Protocol):
    async def take(self, device_id: str, version: int) -> str | None: ...

    async def forget(self, device_id: str, version: int) -> None: ...


class KvSecrets:
    """The one-time handover bucket of `infra.secrets`."""

    def __init__(self, js: JetStreamContext, streams: Streams) -> None:
        self.js = js
        self.streams = streams

    async def take(self, device_id: str, version: int) -> str | None:
        return await secrets.take(self.js, self.streams, device_id, version)

    async def forget(self, device_id: str, version: int) -> None:
        await secrets.forget(self.js, self.streams, device_id, version)


class AuthProjector:
    def __init__(
        self,
        plugin: Plugin,
        secret_source: SecretSource,
        js: JetStreamContext | None,
        namespace: str,
        *,
        secret_wait: float = SECRET_WAIT_S,
        secret_ttl: float = SECRET_TTL_S,
        clock: Callable[[], float] = time.time,
        password_factory: Callable[[], str] = dynsec.random_password,
    ) -> None:
        self.plugin = plugin
        self.secrets = secret_source
        self.js = js
        self.streams = Streams(namespace)
        self.secret_wait = secret_wait
        self.secret_ttl = secret_ttl
        self.clock = clock
        self.password_factory = password_factory

    async def handle(self, msgs: Sequence[Msg]) -> Outcome:
        """Apply each event in order; on a broker outage retry it and everything after it."""
        outcome = Outcome()
        for i, msg in enumerate(msgs):
            try:
                event = decode_event(msg.data)
            except (msgspec.DecodeError, msgspec.ValidationError) as e:
                await self._dead_letter(msg, "undecodable_event", str(e))
                outcome.poison.add(i)
                continue
            try:
                await self.apply(event, _deliveries(msg))
            except DynsecUnavailable as e:
                FAILURES.labels("broker_unavailable").inc()
                log.warning(
                    "auth: broker unavailable; event will be retried",
                    extra={"device": event.device_id, "version": event.version, "error": str(e)},
                )
                outcome.retry.update(range(i, len(msgs)))
                break
            except (DynsecCommandError, ValueError) as e:
                FAILURES.labels("rejected").inc()
                await self._dead_letter(msg, "auth_rejected", str(e))
                outcome.poison.add(i)
        return outcome

    async def apply(self, event: PublishedEvent, deliveries: int = 1) -> None:
        """Bring the plugin in step with one event (idempotent)."""
        match event:
            case DeviceRegistered() | DeviceSecretRotated():
                _check_id(event.device_id)
                await self._issue(event, deliveries)
            case DeviceSuspended():
                _check_id(event.device_id)
                await self._tolerant("disableClient", event.device_id, username=event.device_id)
            case DeviceResumed():
                _check_id(event.device_id)
                await self._tolerant("enableClient", event.device_id, username=event.device_id)
            case DeviceDecommissioned():
                _check_id(event.device_id)
                await self._tolerant("deleteClient", event.device_id, username=event.device_id)
                role = dynsec.device_role(event.device_id)
                await self._tolerant("deleteRole", event.device_id, rolename=role)
            case _:
                IGNORED.inc()
                return
        OPERATIONS.labels(_kind(event)).inc()
        LAG.set(max(0.0, self.clock() - event.at.timestamp()))
        log.info(
            "auth: applied",
            extra={"event": _kind(event), "device": event.device_id, "version": event.version},
        )

    async def _issue(self, event: DeviceRegistered | DeviceSecretRotated, deliveries: int) -> None:
        device_id = event.device_id
        secret = await self._await_secret(event, deliveries)
        await ensure_role(self.plugin, device_id)
        rotated = isinstance(event, DeviceSecretRotated)
        if secret is not None:
            await self._set_secret(device_id, secret, rotated)
            await self.secrets.forget(device_id, event.version)
            return
        # The secret is not there: never handed over, expired, or already applied and
        # forgotten (a redelivery after a crash between forgetting and acknowledging).
        fresh = deliveries <= 1 and self._age(event) < self.secret_ttl
        if rotated and fresh:
            # A rotation must invalidate the old secret even when the new one got lost.
            self._missing(event)
            await self._set_secret(device_id, self.password_factory(), rotated)
            return
        client_kept = await ensure_client(self.plugin, device_id)
        if not client_kept:
            self._missing(event)
            await create_client(self.plugin, device_id, self.password_factory())

    async def _await_secret(
        self, event: DeviceRegistered | DeviceSecretRotated, deliveries: int
    ) -> str | None:
        secret = await self.secrets.take(event.device_id, event.version)
        if secret is not None or deliveries > 1 or self._age(event) >= self.secret_ttl:
            return secret
        deadline = time.monotonic() + self.secret_wait
        while secret is None and time.monotonic() < deadline:
            await asyncio.sleep(SECRET_POLL_S)
            secret = await self.secrets.take(event.device_id, event.version)
        return secret

    async def _set_secret(self, device_id: str, password: str, rotated: bool) -> None:
        """The client with this password; existing connections of the device are dropped."""
        if rotated:
            try:
                await self.plugin.command(
                    "setClientPassword", username=device_id, password=password
                )
            except DynsecCommandError as e:
                if not e.not_found:
                    raise
                await create_client(self.plugin, device_id, password)
            return
        try:
            await create_client(self.plugin, device_id, password)
        except DynsecCommandError as e:
            if not e.exists:
                raise
            await ensure_client(self.plugin, device_id)
            await self.plugin.command("setClientPassword", username=device_id, password=password)

    async def _tolerant(self, command: str, device_id: str, **fields: Any) -> None:
        """A command whose target may be gone already (a redelivery, or no client at all)."""
        try:
            await self.plugin.command(command, **fields)
        except DynsecCommandError as e:
            if not e.not_found:
                raise
            log.info("auth: nothing to change", extra={"command": command, "device": device_id})

    def _missing(self, event: DeviceRegistered | DeviceSecretRotated) -> None:
        MISSING_SECRETS.labels(_kind(event)).inc()
        log.warning(
            "auth: the device's secret never reached the broker; it got a random password "
            "and needs a secret rotation",
            extra={"device": event.device_id, "version": event.version, "event": _kind(event)},
        )

    def _age(self, event: PublishedEvent) -> float:
        return self.clock() - event.at.timestamp()

    async def _dead_letter(self, msg: Msg, reason: str, detail: str) -> None:
        log.error("auth: event dead-lettered", extra={"reason": reason, "detail": detail})
        if self.js is None:
            raise RuntimeError(f"cannot dead-letter ({reason}): no JetStream")
        await dead_letter_message(self.js, self.streams, "auth", reason, msg, detail)


async def ensure_role(plugin: Plugin, device_id: str) -> None:
    """The device's role with exactly its ACLs (created, or an existing one's ACLs replaced)."""
    role = dynsec.device_role(device_id)
    acls = [acl.as_json() for acl in dynsec.device_acls(device_id)]
    try:
        await plugin.command("createRole", rolename=role, acls=acls)
    except DynsecCommandError as e:
        if not e.exists:
            raise
        await plugin.command("modifyRole", rolename=role, acls=acls)


async def create_client(plugin: Plugin, device_id: str, password: str) -> None:
    await plugin.command(
        "createClient",
        username=device_id,
        password=password,
        clientid=device_id,
        roles=[{"rolename": dynsec.device_role(device_id)}],
    )


async def ensure_client(plugin: Plugin, device_id: str) -> bool:
    """Client id and role of an existing client set right; False if there is no client."""
    try:
        await plugin.command(
            "modifyClient",
            username=device_id,
            clientid=device_id,
            roles=[{"rolename": dynsec.device_role(device_id)}],
        )
    except DynsecCommandError as e:
        if e.not_found:
            return False
        raise
    return True


def _check_id(device_id: str) -> None:
    """A device id is a topic level in the ACLs: nothing else (no wildcards) may get there."""
    if not DEVICE_ID.fullmatch(device_id):
        raise ValueError(f"device id {device_id!r} does not match {DEVICE_ID.pattern}")


def _kind(event: PublishedEvent) -> str:
    return {
        DeviceRegistered: "registered",
        DeviceSecretRotated: "secret_rotated",
        DeviceSuspended: "suspended",
        DeviceResumed: "resumed",
        DeviceDecommissioned: "decommissioned",
    }.get(type(event), "other")


def _deliveries(msg: Msg) -> int:
    try:
        return int(msg.metadata.num_delivered)
    except Exception:  # not a JetStream message (tests)
        return 1


def consumer_spec(namespace: str) -> ConsumerSpec:
    streams = Streams(namespace)
    return ConsumerSpec(
        stream=streams.events,
        durable=streams.consumer(CONSUMER),
        filter_subject=streams.events_wildcard,
        batch=1,
        ack_wait=ACK_WAIT_S,
        max_ack_pending=1,  # strictly in log order, redeliveries included
        retry_delay=1.0,
        fetch_wait=1.0,  # a message arriving meanwhile is handed over at once
    )


def control_client(settings: Settings) -> DynsecClient:
    if not settings.mqtt_username or not settings.mqtt_password:
        raise SettingsError(
            "IOT_MQTT_USERNAME and IOT_MQTT_PASSWORD must be the broker's dynamic security "
            "admin user for `iot run projector auth`"
        )
    host, port, tls = settings.mqtt
    return DynsecClient(
        host,
        port,
        settings.mqtt_username,
        settings.mqtt_password,
        tls=tls,
        client_id=f"iot-auth-{settings.namespace or 'default'}-{int(time.time() * 1000):x}",
    )


async def enforce_default_access(client: DynsecClient, stop: asyncio.Event) -> None:
    """Deny by default whatever the plugin's file says (e.g. one made by `dynsec init`)."""
    acls = [{"acltype": name, "allow": allow} for name, allow in dynsec.DEFAULT_ACL_ACCESS.items()]
    while not stop.is_set():
        try:
            await client.wait_ready(within=5.0)
            await client.command("setDefaultACLAccess", acls=acls)
            return
        except DynsecUnavailable:
            continue
        except DynsecCommandError as e:
            log.error("auth: cannot set the default ACL access", extra={"error": str(e)})
            return


async def run(settings: Settings) -> None:
    client = control_client(settings)
    stop = stop_on_signals()
    nc = await retry_async("NATS", lambda: connect_nats(settings.nats_url, "iot-auth"))
    js = nc.jetstream()
    streams = Streams(settings.namespace)
    await client.start()
    projector = AuthProjector(client, KvSecrets(js, streams), js, settings.namespace)

    async def ready() -> Mapping[str, bool]:
        return {"nats": nc.is_connected, "broker": client.connected}

    spec = consumer_spec(settings.namespace)
    routes: list[BaseRoute] = []
    port = settings.port_for(AUTH_PORT)
    log.info("auth projector listening", extra={"port": port})
    tasks = [
        asyncio.create_task(enforce_default_access(client, stop)),
        asyncio.create_task(consume(js, spec, projector.handle, stop)),
        asyncio.create_task(report_lag(js, spec, stop)),
    ]
    try:
        await serve(build_app(routes, ready), settings.http_host, port, stop)
    finally:
        stop.set()
        await asyncio.gather(*tasks, return_exceptions=True)
        await client.stop()
        with contextlib.suppress(Exception):
            await close_nats(nc)
