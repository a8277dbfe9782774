"""`iot replay auth`: reconcile the broker's dynamic security plugin with the event store.

The other projections are rebuilt from the log into a fresh namespace and switched to. The auth
projection cannot be: the plugin has one configuration per broker (there is no namespace to
build beside the live one), and the log lacks what the broker needs most, the devices'
secrets. The command API hands a secret over once (`infra.secrets`); the auth projector gives it
to the broker and forgets it; the event store keeps only a hash the broker cannot use. So a
replay of `auth` reconciles: it reads the device clients and roles the broker has, then every
device's final lifecycle state from the event store in log order, and changes only what
differs:

- a device in the log (not decommissioned) without a client gets one, with an unguessable
  random password nobody knows: the device needs a secret rotation (`ROTATE`), and that is
  reported; a secret is never invented silently. A client that exists keeps its password;
- a client enabled for a suspended device is disabled, a disabled one of an active or
  provisioned device is enabled; one with another client id, other roles or any group is set
  right;
- a role that is missing or has other ACLs gets the device's ACLs (`projections.auth`);
- a client or role of a decommissioned or unknown device is deleted.

Only device clients and roles count: a username that is a device id (`domain.device.DEVICE_ID`,
which excludes the `:` of the backend's own users) and a role `device-<device id>`. A client
whose username is no device in the log is deleted only if it looks made for a device (its
client id or role is that device's): a broker shared with other users keeps theirs.

The live auth projector may apply events meanwhile. The broker is read before the log, so the
log is at least as new as what the projector had applied, and whatever it applies later leads
to the same final state. Each device's changes are decided again right before they are applied
(or reported), on the broker's current entries and the log read up to that moment, so a device
registered, suspended or decommissioned while the replay runs is not undone by a stale
decision. Every change is idempotent and moves the broker towards the log's state: an
interrupted run leaves a broker that the next run finishes, and a run after a complete one
finds nothing to do.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections import Counter
from collections.abc import AsyncIterator, Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from nats.js.errors import BucketNotFoundError

from domain.device import DEVICE_ID, Status
from domain.published import (
    DeviceConnected,
    DeviceDecommissioned,
    DeviceRegistered,
    DeviceResumed,
    DeviceSecretRotated,
    DeviceSuspended,
    RuleEvent,
    StreamEvent,
)
from infra import dynsec, secrets
from infra.dynsec import DynsecClient, DynsecCommandError, DynsecError, DynsecUnavailable
from infra.eventstore import DeviceStore, open_store
from infra.replay import Progress, ReplayContext, ReplayError, Report, store_pages
from infra.settings import Settings, SettingsError
from infra.streams import Streams
from projections.auth import Plugin, control_client, create_client, ensure_client, ensure_role

PAGE = 1_000  # events per read of the event store, clients or roles per listing of the plugin
CONNECT_S = 10.0
ROTATE = "POST /api/v1/devices/{device_id}/rotate-secret"
ROLE_PREFIX = "device-"

Acls = frozenset[tuple[str, str, bool, int]]


# --- the log ------------------------------------------------------------------------------------


@dataclass
class LogDevice:
    status: str
    issued: int  # version of the event that issued the device's current secret


@dataclass
class DeviceLog:
    """Every device's lifecycle state, folded from the event store in log order."""

    devices: dict[str, LogDevice] = field(default_factory=dict)
    position: int = 0  # every event up to here is folded in
    events: int = 0

    def apply(self, event: StreamEvent) -> None:
        self.position = max(self.position, event.position)
        self.events += 1
        if isinstance(event, RuleEvent):
            return  # alert rules are nothing to the broker
        device = self.devices.get(event.device_id)
        match event:
            case DeviceRegistered():
                self.devices[event.device_id] = LogDevice(event.status, event.version)
            case DeviceSecretRotated() if device is not None:
                device.issued = event.version
            case DeviceSuspended() if device is not None:
                device.status = Status.SUSPENDED.value
            case DeviceResumed() if device is not None:
                device.status = event.status
            case DeviceDecommissioned() if device is not None:
                device.status = Status.DECOMMISSIONED.value
            case DeviceConnected() if device is not None:
                if device.status == Status.PROVISIONED:
                    device.status = Status.ACTIVE.value

    def status_of(self, device_id: str) -> str | None:
        device = self.devices.get(device_id)
        return None if device is None else device.status

    async def read(self, store: DeviceStore, progress: Progress | None = None) -> None:
        """Fold in every event after `position`, a page at a time (blocking reads in a thread)."""
        async for page in store_pages(store, start=self.position + 1):
            for event in page:
                self.apply(event)
            if progress is not None:
                progress.advance(len(page))

    def describe(self) -> str:
        counts = Counter(d.status for d in self.devices.values())
        by_status = ", ".join(f"{counts.get(s.value, 0):,} {s.value}" for s in Status)
        return (
            f"event store: {self.events:,} events up to position {self.position:,}; "
            f"{len(self.devices):,} devices ({by_status})"
        )


# --- the broker ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class DeviceClient:
    """What matters of a device's client in the plugin (its password cannot be read)."""

    clientid: str
    disabled: bool
    roles: tuple[str, ...]
    groups: tuple[str, ...]

    def made_for(self, device_id: str) -> bool:
        """Whether the client looks made for a device (as the auth projector makes them): its
        client id or role is the device's. A user someone else made on the broker (say
        `admin` by `mosquitto_ctrl dynsec init`) has neither."""
        return self.clientid == device_id or dynsec.device_role(device_id) in self.roles

    @classmethod
    def parse(cls, entry: Mapping[str, Any]) -> DeviceClient:
        return cls(
            clientid=str(entry.get("clientid") or ""),
            disabled=bool(entry.get("disabled", False)),
            roles=tuple(str(r.get("rolename")) for r in entry.get("roles") or ()),
            groups=tuple(str(g.get("groupname")) for g in entry.get("groups") or ()),
        )


def parse_acls(entries: Iterable[Mapping[str, Any]]) -> Acls:
    return frozenset(
        (
            str(a.get("acltype")),
            str(a.get("topic")),
            bool(a.get("allow", False)),
            int(a.get("priority", 0)),
        )
        for a in entries
    )


def device_role_acls(device_id: str) -> Acls:
    return parse_acls(acl.as_json() for acl in dynsec.device_acls(device_id))


def is_device_client(username: str) -> bool:
    """A device's client, not one of the backend's users (theirs contain `:`)."""
    return DEVICE_ID.fullmatch(username) is not None


def device_of_role(rolename: str) -> str | None:
    """The device a role `device-<id>` belongs to; None for any other role."""
    if not rolename.startswith(ROLE_PREFIX):
        return None
    device_id = rolename.removeprefix(ROLE_PREFIX)
    return device_id if DEVICE_ID.fullmatch(device_id) else None


@dataclass
class BrokerState:
    """The plugin's device clients (by username) and device roles (by device id)."""

    clients: dict[str, DeviceClient] = field(default_factory=dict)
    roles: dict[str, Acls] = field(default_factory=dict)
    other_clients: int = 0
    other_roles: int = 0

    async def read(self, plugin: Plugin, progress: Progress) -> None:
        progress.phase("auth: broker clients", total=None, unit="clients")
        async for entry in _listing(plugin, "listClients", "clients", progress):
            username = str(entry.get("username", ""))
            if is_device_client(username):
                self.clients[username] = DeviceClient.parse(entry)
            else:
                self.other_clients += 1
        progress.phase("auth: broker roles", total=None, unit="roles")
        async for entry in _listing(plugin, "listRoles", "roles", progress):
            device_id = device_of_role(str(entry.get("rolename", "")))
            if device_id is not None:
                self.roles[device_id] = parse_acls(entry.get("acls") or ())
            else:
                self.other_roles += 1

    def describe(self) -> str:
        disabled = sum(c.disabled for c in self.clients.values())
        return (
            f"broker: {len(self.clients):,} device clients ({disabled:,} disabled), "
            f"{len(self.roles):,} device roles; {self.other_clients:,} other clients and "
            f"{self.other_roles:,} other roles left alone"
        )


async def _listing(
    plugin: Plugin, command: str, key: str, progress: Progress
) -> AsyncIterator[Mapping[str, Any]]:
    """Every entry of a listing, a page at a time (a huge plugin answers in one piece else)."""
    offset = 0
    while True:
        data = await plugin.command(command, verbose=True, count=PAGE, offset=offset)
        page = data.get(key) or []
        for entry in page:
            if isinstance(entry, Mapping):
                yield entry
        offset += len(page)
        progress.advance(len(page), total=int(data.get("totalCount") or 0) or None)
        if len(page) < PAGE:
            return


async def get_client(plugin: Plugin, device_id: str) -> DeviceClient | None:
    try:
        data = await plugin.command("getClient", username=device_id)
    except DynsecCommandError as e:
        if e.not_found:
            return None
        raise
    return DeviceClient.parse(data.get("client") or {})


async def get_role(plugin: Plugin, device_id: str) -> Acls | None:
    try:
        data = await plugin.command("getRole", rolename=dynsec.device_role(device_id))
    except DynsecCommandError as e:
        if e.not_found:
            return None
        raise
    return parse_acls((data.get("role") or {}).get("acls") or ())


# --- the differences ----------------------------------------------------------------------------


class Action(StrEnum):
    SET_ROLE = "set role"
    CREATE_CLIENT = "create client"
    SET_CLIENT = "set client"
    DISABLE_CLIENT = "disable client"
    ENABLE_CLIENT = "enable client"
    DELETE_CLIENT = "delete client"
    DELETE_ROLE = "delete role"


@dataclass(frozen=True)
class Change:
    device_id: str
    action: Action
    why: str
    needs_rotation: bool = False  # a client created with a password nobody knows

    def describe(self) -> str:
        text = f"device {self.device_id}: {self.action.value} ({self.why})"
        if self.needs_rotation:
            rotate = ROTATE.format(device_id=self.device_id)
            text += f"; random password, the device needs a secret rotation: {rotate}"
        return text


def device_changes(
    device_id: str, status: str | None, client: DeviceClient | None, role: Acls | None
) -> list[Change]:
    """What brings the broker's entries of one device in step with its state in the log
    (`status` None: no such device), in the order to apply them."""
    if status is None or status == Status.DECOMMISSIONED:
        why = "device decommissioned" if status else "no such device in the event store"
        gone = []
        if client is not None and (status is not None or client.made_for(device_id)):
            gone.append(Change(device_id, Action.DELETE_CLIENT, why))
        if role is not None:
            gone.append(Change(device_id, Action.DELETE_ROLE, why))
        return gone
    changes = []
    if role is None:
        changes.append(Change(device_id, Action.SET_ROLE, "role missing"))
    elif role != device_role_acls(device_id):
        changes.append(Change(device_id, Action.SET_ROLE, "role's ACLs differ"))
    suspended = status == Status.SUSPENDED
    if client is None:
        changes.append(Change(device_id, Action.CREATE_CLIENT, f"device {status}, no client", True))
        if suspended:
            changes.append(Change(device_id, Action.DISABLE_CLIENT, "device suspended"))
        return changes
    wrong = []
    if client.clientid != device_id:
        wrong.append(f"client id {client.clientid!r}")
    if client.roles != (dynsec.device_role(device_id),):
        wrong.append(f"roles {list(client.roles)}")
    if client.groups:
        wrong.append(f"groups {list(client.groups)}")
    if wrong:
        changes.append(Change(device_id, Action.SET_CLIENT, ", ".join(wrong)))
    if suspended and not client.disabled:
        changes.append(Change(device_id, Action.DISABLE_CLIENT, "device suspended, client enabled"))
    if not suspended and client.disabled:
        changes.append(Change(device_id, Action.ENABLE_CLIENT, f"device {status}, client disabled"))
    return changes


def differing_devices(log: DeviceLog, broker: BrokerState) -> list[str]:
    """Devices whose broker entries differ from the log: the log's in log order, then the
    broker's unknown ones by name."""
    known = list(log.devices)
    unknown = sorted((set(broker.clients) | set(broker.roles)) - set(log.devices))
    return [
        device_id
        for device_id in known + unknown
        if device_changes(
            device_id,
            log.status_of(device_id),
            broker.clients.get(device_id),
            broker.roles.get(device_id),
        )
    ]


async def apply_change(plugin: Plugin, change: Change) -> str:
    """Make one change (idempotent); the line reporting it."""
    device_id = change.device_id
    line = change.describe()
    match change.action:
        case Action.SET_ROLE:
            await ensure_role(plugin, device_id)
        case Action.CREATE_CLIENT:
            try:
                await create_client(plugin, device_id, dynsec.random_password())
            except DynsecCommandError as e:
                if not e.exists:
                    raise
                await ensure_client(plugin, device_id)  # created meanwhile: its password stays
                line = f"device {device_id}: client appeared meanwhile, kept with its password"
        case Action.SET_CLIENT:
            await plugin.command(
                "modifyClient",
                username=device_id,
                clientid=device_id,
                roles=[{"rolename": dynsec.device_role(device_id)}],
                groups=[],
            )
        case Action.DISABLE_CLIENT:
            await plugin.command("disableClient", username=device_id)
        case Action.ENABLE_CLIENT:
            await plugin.command("enableClient", username=device_id)
        case Action.DELETE_CLIENT:
            await _tolerant(plugin, "deleteClient", username=device_id)
        case Action.DELETE_ROLE:
            await _tolerant(plugin, "deleteRole", rolename=dynsec.device_role(device_id))
    return line


async def _tolerant(plugin: Plugin, command: str, **fields: Any) -> None:
    """A deletion whose target may be gone already (the auth projector, an earlier run)."""
    try:
        await plugin.command(command, **fields)
    except DynsecCommandError as e:
        if not e.not_found:
            raise


# --- the replay ---------------------------------------------------------------------------------


@dataclass
class Outcome:
    log: DeviceLog
    broker: BrokerState
    changes: list[Change] = field(default_factory=list)
    lines: list[str] = field(default_factory=list)  # what was applied

    def survey(self) -> list[str]:
        return [self.log.describe(), self.broker.describe()]

    def totals(self, verb: str) -> list[str]:
        if not self.changes:
            return ["auth: the broker agrees with the event store; nothing to change"]
        counts = Counter(c.action for c in self.changes)
        by_action = ", ".join(f"{counts[a]:,} {a.value}" for a in Action if counts[a])
        lines = [f"auth: {len(self.changes):,} change(s) {verb}: {by_action}"]
        rotate = [c.device_id for c in self.changes if c.needs_rotation]
        if rotate:
            lines.append(
                f"auth: {len(rotate):,} device(s) need a secret rotation "
                f"({ROTATE}): {', '.join(rotate)}"
            )
        return lines


class AuthReplay:
    """The `auth` projection's replay: a reconciliation of the broker with the log."""

    def __init__(self, context: ReplayContext) -> None:
        self.context = context
        self.settings = context.settings
        self.streams = Streams(context.settings.namespace)

    async def plan(self) -> list[str]:
        outcome = await self._reconcile(Progress(enabled=False), apply=False)
        lines = [
            "auth: the broker's dynamic security plugin is reconciled with the event store in "
            "place (device secrets are not in the log: existing clients keep their passwords)",
            *outcome.survey(),
        ]
        lines += [f"would {c.describe()}" for c in outcome.changes]
        return lines + outcome.totals("would be made")

    async def run(self, progress: Progress) -> Report:
        outcome = await self._reconcile(progress, apply=True)
        return Report(lines=[*outcome.survey(), *outcome.lines, *outcome.totals("applied")])

    async def verify(self, progress: Progress) -> Report:
        outcome = await self._reconcile(progress, apply=False)
        return Report(lines=outcome.survey(), differences=[c.describe() for c in outcome.changes])

    async def _reconcile(self, progress: Progress, *, apply: bool) -> Outcome:
        async with self._connections() as (store, plugin):
            broker = BrokerState()
            await broker.read(plugin, progress)  # before the log: see the module's docstring
            log = DeviceLog()
            total = await asyncio.to_thread(store.max_position)
            progress.phase("auth: domain events", total=total, unit="events")
            await log.read(store, progress)
            outcome = Outcome(log, broker)
            candidates = differing_devices(log, broker)
            progress.phase("auth: devices", total=len(candidates), unit="devices")
            for device_id in candidates:
                changes = await self._decide(store, plugin, log, device_id)
                for change in changes:
                    if apply:
                        outcome.lines.append(await self._apply(plugin, change, outcome))
                    outcome.changes.append(change)
                progress.advance(1)
            return outcome

    async def _decide(
        self, store: DeviceStore, plugin: Plugin, log: DeviceLog, device_id: str
    ) -> list[Change]:
        """The device's changes on its current broker entries and the log as it is now."""
        client = await get_client(plugin, device_id)
        role = await get_role(plugin, device_id)
        await log.read(store)
        changes = device_changes(device_id, log.status_of(device_id), client, role)
        device = log.devices.get(device_id)
        if device is None or not await self._secret_waiting(device_id, device.issued):
            return changes
        # The auth projector has yet to apply the device's registration or rotation: it will
        # set the handed-over secret on whatever client this creates.
        return [
            dataclasses.replace(
                c,
                why=c.why + "; the auth projector has its secret still to set",
                needs_rotation=False,
            )
            if c.needs_rotation
            else c
            for c in changes
        ]

    async def _secret_waiting(self, device_id: str, version: int) -> bool:
        with contextlib.suppress(BucketNotFoundError):
            js = self.context.js
            return await secrets.take(js, self.streams, device_id, version) is not None
        return False

    async def _apply(self, plugin: Plugin, change: Change, outcome: Outcome) -> str:
        try:
            return await apply_change(plugin, change)
        except DynsecError as e:
            done = len(outcome.lines)
            raise ReplayError(
                f"{change.describe()}: {e}; {done} change(s) were applied before it; "
                "run again to continue"
            ) from e

    @contextlib.asynccontextmanager
    async def _connections(self) -> AsyncIterator[tuple[DeviceStore, DynsecClient]]:
        try:
            client = control_client(_admin_settings(self.settings))
        except SettingsError as e:
            raise ReplayError(
                "the broker's dynamic security admin is needed: set IOT_AUTH_MQTT_USERNAME and "
                "IOT_AUTH_MQTT_PASSWORD (or IOT_MQTT_USERNAME and IOT_MQTT_PASSWORD)"
            ) from e
        store = await asyncio.to_thread(open_store, self.settings)
        try:
            await client.start()
            try:
                await client.wait_ready(within=CONNECT_S)
            except DynsecUnavailable as e:
                raise ReplayError(str(e)) from e
            try:
                yield store, client
            except DynsecError as e:  # reading the broker failed (applying reports its own)
                raise ReplayError(f"broker: {e}; run again") from e
        finally:
            await client.stop()
            await asyncio.to_thread(store.close)


def _admin_settings(settings: Settings) -> Settings:
    """The plugin admin's login: the auth projector's own (`iot up --external-broker`) when
    set, else the MQTT login of these settings."""
    if settings.auth_mqtt_username and settings.auth_mqtt_password:
        return dataclasses.replace(
            settings,
            mqtt_username=settings.auth_mqtt_username,
            mqtt_password=settings.auth_mqtt_password,
        )
    return settings
