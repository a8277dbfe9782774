"""`iot replay auth` against a real Mosquitto with the dynamic security plugin, the real event
store and NATS: the broker is reconciled with the log, devices whose clients survived keep
their passwords, recreated ones are reported as needing a secret rotation.

Devices are stored in the event store as the command API stores them, their secrets handed
over as it hands them over, and the stored events applied by the auth projector in log order
as the relay and the projector would (in-process, no relay)."""

from __future__ import annotations

import asyncio
import dataclasses
import io
import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime

import nats
import pytest
from nats.aio.client import Client as NATS
from nats.js.client import JetStreamContext

from domain.device import Device
from domain.published import RuleEvent, to_published
from infra import dynsec
from infra import secrets as handover
from infra.dynsec import DynsecClient, DynsecCommandError
from infra.eventstore import DeviceStore, open_store
from infra.replay import Progress, ReplayContext, ReplayError, Report, replay_lock
from infra.settings import Settings
from infra.streams import Streams
from iot.broker import BrokerAuth, PrivateBroker
from iot.replay import replay
from projections.auth import AuthProjector, KvSecrets
from projections.auth_replay import AuthReplay
from tests.integration.test_auth import accepts, login

pytestmark = pytest.mark.integration

WAIT_S = 20.0
QUIET = Progress(enabled=False)


@dataclass
class Fleet:
    """The event store, the auth projector applying its events, and the plugin's admin."""

    settings: Settings
    broker: PrivateBroker
    store: DeviceStore
    nc: NATS
    js: JetStreamContext
    plugin: DynsecClient
    projector: AuthProjector
    position: int = 0  # stored events up to here are applied to the broker

    @property
    def streams(self) -> Streams:
        return Streams(self.settings.namespace)

    @property
    def port(self) -> int:
        return self.broker.port

    def replayer(self) -> AuthReplay:
        return AuthReplay(ReplayContext(self.settings, self.nc))

    async def save(self, device: Device) -> None:
        await asyncio.to_thread(self.store.save_device, device)

    async def load(self, device_id: str) -> Device:
        device = await asyncio.to_thread(self.store.get, device_id)
        assert device is not None
        return device

    async def register(self, device_id: str, *, apply: bool = True) -> str:
        """Store a registration, hand its secret over; the secret."""
        secret = secrets.token_urlsafe(32)
        device = Device.register(device_id, device_id, "sensor", {}, "hash", datetime.now(UTC))
        await self.save(device)
        await handover.hand_over(self.js, self.streams, device_id, device.version, secret)
        if apply:
            await self.apply()
        return secret

    async def connect(self, device_id: str) -> None:
        device = await self.load(device_id)
        device.connect(datetime.now(UTC))
        await self.save(device)
        await self.apply()

    async def suspend(self, device_id: str) -> None:
        device = await self.load(device_id)
        device.suspend("test", datetime.now(UTC))
        await self.save(device)
        await self.apply()

    async def decommission(self, device_id: str) -> None:
        device = await self.load(device_id)
        device.decommission("test", datetime.now(UTC))
        await self.save(device)
        await self.apply()

    async def rotate(self, device_id: str) -> str:
        secret = secrets.token_urlsafe(32)
        device = await self.load(device_id)
        assert not device.online  # else a disconnection follows the rotation's version
        device.rotate_secret("hash", datetime.now(UTC))
        await self.save(device)
        await handover.hand_over(self.js, self.streams, device_id, device.version, secret)
        await self.apply()
        return secret

    async def apply(self) -> None:
        """What the relay and the auth projector do: every new stored event, in log order."""
        page = await asyncio.to_thread(
            self.store.recorder.select_notifications, self.position + 1, 1_000
        )
        for notification in page:
            event = to_published(self.store.mapper.to_domain_event(notification), notification.id)
            assert not isinstance(event, RuleEvent)
            await self.projector.apply(event)
            self.position = notification.id

    async def has_client(self, device_id: str) -> bool:
        try:
            await self.plugin.command("getClient", username=device_id)
        except DynsecCommandError as e:
            if not e.not_found:
                raise
            return False
        return True

    async def role_acls(self, device_id: str) -> list[dict[str, object]] | None:
        try:
            data = await self.plugin.command("getRole", rolename=dynsec.device_role(device_id))
        except DynsecCommandError as e:
            if not e.not_found:
                raise
            return None
        acls: list[dict[str, object]] = data["role"]["acls"]
        return sorted(acls, key=lambda a: str(a["acltype"]))


@pytest.fixture
async def fleet(
    migrated: Settings, secured_broker: PrivateBroker, auth: BrokerAuth
) -> AsyncIterator[Fleet]:
    settings = dataclasses.replace(
        migrated,
        mqtt_url=secured_broker.url,
        mqtt_username=dynsec.ADMIN_USERNAME,
        mqtt_password=auth.admin_password,
    )
    store = open_store(settings)
    nc = await nats.connect(settings.nats_url)
    js = nc.jetstream()
    plugin = DynsecClient(
        "127.0.0.1", secured_broker.port, dynsec.ADMIN_USERNAME, auth.admin_password
    )
    await plugin.start()
    await plugin.wait_ready(within=WAIT_S)
    projector = AuthProjector(
        plugin, KvSecrets(js, Streams(settings.namespace)), js, settings.namespace
    )
    try:
        yield Fleet(settings, secured_broker, store, nc, js, plugin, projector)
    finally:
        await plugin.stop()
        await nc.close()
        store.close()


async def replay_lock_released(settings: Settings) -> None:
    """Wait until the previous command's lock is gone: `replay_lock` releases it by closing its
    connection, and the server ends that session (and frees the lock) asynchronously."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + WAIT_S
    while True:
        try:
            async with replay_lock(settings, "auth"):
                return
        except ReplayError:
            if loop.time() > deadline:
                raise
            await asyncio.sleep(0.05)


def device_id() -> str:
    return f"dev-{secrets.token_hex(4)}"


def only(report: Report, device: str) -> list[str]:
    return [d for d in report.differences if f"device {device}:" in d]


async def run_command(settings: Settings, *, verify: bool) -> tuple[int, str]:
    """`iot replay auth [--verify]`: its exit code and output."""
    await replay_lock_released(settings)
    out = io.StringIO()
    code = await replay("auth", settings, verify=verify, out=out, progress=QUIET)
    return code, out.getvalue()


async def test_broker_in_step_with_the_log_has_no_differences(fleet: Fleet) -> None:
    provisioned, active, suspended, gone = (device_id() for _ in range(4))
    secret = await fleet.register(provisioned)
    await fleet.register(active)
    await fleet.connect(active)
    await fleet.register(suspended)
    await fleet.suspend(suspended)
    await fleet.register(gone)
    await fleet.decommission(gone)

    report = await fleet.replayer().verify(QUIET)
    assert report.differences == []
    assert any(
        "4 devices (1 provisioned, 1 active, 1 suspended, 1 decommissioned)" in line
        for line in report.lines
    ), report.lines
    assert any("3 device clients (1 disabled), 3 device roles" in line for line in report.lines)

    plan = await fleet.replayer().plan()
    assert plan[-1] == "auth: the broker agrees with the event store; nothing to change"
    assert not any(line.startswith("would ") for line in plan)

    ran = await fleet.replayer().run(QUIET)
    assert ran.lines[-1] == "auth: the broker agrees with the event store; nothing to change"
    assert await login(fleet.port, provisioned, secret)


async def test_tampered_broker_is_reported_then_reconciled(fleet: Fleet) -> None:
    kept, lost, suspended, gone, intruder = (device_id() for _ in range(5))
    kept_secret = await fleet.register(kept)
    await fleet.connect(kept)
    lost_secret = await fleet.register(lost)
    suspended_secret = await fleet.register(suspended)
    await fleet.suspend(suspended)
    await fleet.register(gone)
    await fleet.decommission(gone)
    await accepts(fleet.port, lost, lost_secret, "the device may log in before the tampering")
    expected_acls = await fleet.role_acls(kept)

    # the tampering: a client lost, a suspended device let in, a stranger added, a
    # decommissioned device's role back, a device's ACLs widened to every topic
    plugin = fleet.plugin
    await plugin.command("deleteClient", username=lost)
    await plugin.command("enableClient", username=suspended)
    await plugin.command("createClient", username=intruder, password="known", clientid=intruder)
    # not tampering: a user of the broker's operators, made for no device, is left alone
    await plugin.command("createClient", username="operator", password="theirs")
    await plugin.command("createRole", rolename=dynsec.device_role(gone))
    wide = [{"acltype": "subscribePattern", "topic": "#", "allow": True}]
    await plugin.command("modifyRole", rolename=dynsec.device_role(kept), acls=wide)
    assert await login(fleet.port, suspended, suspended_secret)
    assert await login(fleet.port, intruder, "known")

    plan = await fleet.replayer().plan()
    assert sum(line.startswith("would ") for line in plan) == 5, plan

    report = await fleet.replayer().verify(QUIET)
    assert len(report.differences) == 5, report.differences
    (created,) = only(report, lost)
    assert "create client" in created
    assert f"POST /api/v1/devices/{lost}/rotate-secret" in created
    (enabled,) = only(report, suspended)
    assert "disable client (device suspended, client enabled)" in enabled
    (stranger,) = only(report, intruder)
    assert "delete client (no such device in the event store)" in stranger
    (leftover,) = only(report, gone)
    assert "delete role (device decommissioned)" in leftover
    (widened,) = only(report, kept)
    assert "set role (role's ACLs differ)" in widened
    # verifying changed nothing
    assert await login(fleet.port, intruder, "known")
    assert not await fleet.has_client(lost)

    code, output = await run_command(fleet.settings, verify=True)
    assert code == 1
    assert output.count("DIFFERENT ") == 5

    code, output = await run_command(fleet.settings, verify=False)
    assert code == 0, output
    assert "auth: 5 change(s) applied: " in output
    assert "auth: 1 device(s) need a secret rotation " in output
    assert f"rotate-secret): {lost}\n" in output

    again = await fleet.replayer().verify(QUIET)
    assert again.differences == []
    second = await fleet.replayer().run(QUIET)
    assert second.lines[-1] == "auth: the broker agrees with the event store; nothing to change"

    # the kept client kept its password, under the device's own ACLs again
    assert await login(fleet.port, kept, kept_secret)
    assert await fleet.role_acls(kept) == expected_acls
    # the recreated one has a password nobody knows until its secret is rotated
    assert await fleet.has_client(lost)
    assert not await login(fleet.port, lost, lost_secret)
    rotated = await fleet.rotate(lost)
    await accepts(fleet.port, lost, rotated, "the rotated secret lets the recreated device in")
    # the suspended device is refused again, the stranger and the leftover role are gone
    assert not await login(fleet.port, suspended, suspended_secret)
    assert not await login(fleet.port, intruder, "known")
    assert not await fleet.has_client(intruder)
    assert await fleet.role_acls(gone) is None
    assert await login(fleet.port, "operator", "theirs")


async def test_client_created_before_the_projector_applies_the_registration(
    fleet: Fleet,
) -> None:
    """The projector lags: the replay creates the client, the projector later sets its secret."""
    device = device_id()
    secret = await fleet.register(device, apply=False)

    report = await fleet.replayer().verify(QUIET)
    role, client = report.differences
    assert "set role (role missing)" in role
    assert "create client" in client
    assert "the auth projector has its secret still to set" in client
    assert "rotate-secret" not in client

    ran = await fleet.replayer().run(QUIET)
    assert not any("need a secret rotation" in line for line in ran.lines), ran.lines
    assert await fleet.has_client(device)
    assert not await login(fleet.port, device, secret)

    await fleet.apply()  # the projector catches up
    await accepts(fleet.port, device, secret, "the handed-over secret reaches the broker")
    assert (await fleet.replayer().verify(QUIET)).differences == []
