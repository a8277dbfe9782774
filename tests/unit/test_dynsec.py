"""The dynamic security file, its password hashes, the broker configuration, `iot up`'s MQTT
credentials and the auth projector's decisions (against a fake plugin)."""

from __future__ import annotations

import json
import stat
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, cast

import pytest
from nats.aio.msg import Msg
from nats.js.client import JetStreamContext

from domain.device import DEVICE_ID
from domain.published import (
    DeviceCommandSent,
    DeviceConnected,
    DeviceDecommissioned,
    DeviceRegistered,
    DeviceResumed,
    DeviceSecretRotated,
    DeviceSuspended,
    PublishedEvent,
    encode_event,
)
from infra import dynsec
from infra.dynsec import DynsecCommandError, DynsecUnavailable
from infra.settings import SettingsError, load
from iot import dynsec_config
from iot.broker import INSECURE, BrokerAuth, render_config, security_lines
from iot.supervisor import (
    MqttCredentials,
    _mqtt_plan,
    components,
    load_or_create_passwords,
)
from projections.auth import AuthProjector, control_client
from tests.unit.support import T0, at

# Written by `mosquitto_ctrl dynsec init` (2.0.11) for the password "secretpw".
CTRL_CLIENT = {
    "password": (
        "VXqHaPEaJDg4SXEzDDv13MhGGlzs9kN/Tm9mTD7lZTuNY24XHKAx9KYrY7QIs4CY2TsfDecxNcIqseu0zQdDtw=="
    ),
    "salt": "U8oPwADsMMkKB2zW",
    "iterations": 101,
}


# --- hashing ----------------------------------------------------------------------------------
def test_hash_matches_what_mosquitto_ctrl_writes() -> None:
    import base64

    salt = base64.b64decode(CTRL_CLIENT["salt"])  # type: ignore[arg-type]
    assert dynsec.hash_password("secretpw", salt=salt) == CTRL_CLIENT


def test_verify_accepts_the_password_and_nothing_else() -> None:
    assert dynsec.verify_password("secretpw", CTRL_CLIENT)
    assert not dynsec.verify_password("secretpw ", CTRL_CLIENT)
    assert not dynsec.verify_password("secretpw", {**CTRL_CLIENT, "salt": "!!"})
    assert not dynsec.verify_password("secretpw", {"password": CTRL_CLIENT["password"]})


def test_each_hash_has_its_own_salt_of_twelve_bytes() -> None:
    import base64

    one, two = dynsec.hash_password("pw"), dynsec.hash_password("pw")
    assert one["salt"] != two["salt"]
    assert len(base64.b64decode(one["salt"])) == 12
    assert len(base64.b64decode(one["password"])) == 64
    assert dynsec.verify_password("pw", one)


def test_hash_refuses_a_salt_the_plugin_cannot_load() -> None:
    with pytest.raises(ValueError, match="salt"):
        dynsec.hash_password("pw", salt=b"x" * 65)
    with pytest.raises(ValueError, match="iterations"):
        dynsec.hash_password("pw", iterations=0)


# --- the configuration file -------------------------------------------------------------------
def users() -> list[dynsec_config.BackendUser]:
    return dynsec_config.backend_users("admin-pw", "bridge-pw")


def test_fresh_file_has_the_backend_users_and_denies_everything_else() -> None:
    config = dynsec_config.initial_config(users())
    assert config["defaultACLAccess"] == {
        "publishClientSend": False,
        "publishClientReceive": False,
        "subscribe": False,
        "unsubscribe": False,
    }
    clients = {c["username"]: c for c in config["clients"]}
    assert set(clients) == {dynsec.ADMIN_USERNAME, dynsec.BRIDGE_USERNAME}
    assert dynsec.verify_password("admin-pw", clients[dynsec.ADMIN_USERNAME])
    assert dynsec.verify_password("bridge-pw", clients[dynsec.BRIDGE_USERNAME])
    assert clients[dynsec.ADMIN_USERNAME]["roles"] == [
        {"rolename": dynsec.ADMIN_ROLE, "priority": 0}
    ]
    roles = {r["rolename"]: r for r in config["roles"]}
    assert {a["topic"] for a in roles[dynsec.ADMIN_ROLE]["acls"]} == {"$CONTROL/dynamic-security/#"}


def test_bridge_may_read_device_messages_and_send_commands_and_desired_only() -> None:
    acls = {(a.acltype, a.topic) for a in dynsec.bridge_acls()}
    for suffix in ("telemetry", "status", "reported", "commands/ack"):
        assert ("subscribePattern", f"$share/iot-bridge/devices/+/{suffix}") in acls
        assert ("subscribePattern", f"devices/+/{suffix}") in acls
        assert ("publishClientReceive", f"devices/+/{suffix}") in acls
    sends = {topic for kind, topic in acls if kind == "publishClientSend"}
    assert sends == {"devices/+/commands", "devices/+/desired"}


def test_device_may_use_only_its_own_topics() -> None:
    acls = dynsec.device_acls("pump-7")
    assert {a.topic for a in acls} == {"devices/pump-7/#"}
    assert {a.acltype for a in acls} == {
        "publishClientSend",
        "publishClientReceive",
        "subscribePattern",
        "unsubscribePattern",
    }
    assert dynsec.device_role("pump-7") == "device-pump-7"


def test_backend_usernames_can_never_be_device_ids() -> None:
    for name in (dynsec.ADMIN_USERNAME, dynsec.BRIDGE_USERNAME):
        assert not DEVICE_ID.fullmatch(name)
    for role in (dynsec.ADMIN_ROLE, dynsec.BRIDGE_ROLE):
        assert not role.startswith("device-")


def test_updating_the_file_keeps_devices_and_replaces_backend_users(tmp_path: Path) -> None:
    path = tmp_path / "dynsec.json"
    dynsec_config.ensure_config_file(path, users())
    config = json.loads(path.read_text())
    config["clients"].append({"username": "pump-7", "roles": [{"rolename": "device-pump-7"}]})
    config["roles"].append({"rolename": "device-pump-7", "acls": []})
    config["defaultACLAccess"]["subscribe"] = True
    path.write_text(json.dumps(config))

    dynsec_config.ensure_config_file(path, dynsec_config.backend_users("new-admin", "new-bridge"))
    updated = json.loads(path.read_text())
    names = [c["username"] for c in updated["clients"]]
    assert sorted(names) == sorted([dynsec.ADMIN_USERNAME, dynsec.BRIDGE_USERNAME, "pump-7"])
    assert [r["rolename"] for r in updated["roles"]].count(dynsec.BRIDGE_ROLE) == 1
    assert "device-pump-7" in [r["rolename"] for r in updated["roles"]]
    admin = next(c for c in updated["clients"] if c["username"] == dynsec.ADMIN_USERNAME)
    assert dynsec.verify_password("new-admin", admin)
    assert not dynsec.verify_password("admin-pw", admin)
    assert updated["defaultACLAccess"]["subscribe"] is False


def test_file_is_private_to_its_owner(tmp_path: Path) -> None:
    path = tmp_path / "dynsec.json"
    dynsec_config.ensure_config_file(path, users())
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_damaged_file_is_reported_not_overwritten(tmp_path: Path) -> None:
    path = tmp_path / "dynsec.json"
    path.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        dynsec_config.ensure_config_file(path, users())
    assert path.read_text() == "{not json"


# --- broker configuration ---------------------------------------------------------------------
def _directives(config: str) -> list[str]:
    return [line for line in config.splitlines() if line and not line.startswith("#")]


def test_secure_config_turns_anonymous_access_off_and_loads_the_plugin() -> None:
    lines = _directives(
        render_config(1884, "/data", security=security_lines("/lib/dynsec.so", "/data/ds.json"))
    )
    assert "allow_anonymous false" in lines
    assert "plugin /lib/dynsec.so" in lines
    assert "plugin_opt_config_file /data/ds.json" in lines
    assert lines[0] == "per_listener_settings false"
    assert not any("allow_anonymous true" in line for line in lines)
    assert sum(line.startswith("plugin ") for line in lines) == 1


def test_insecure_config_is_todays_anonymous_broker() -> None:
    lines = _directives(render_config(1884, "/data"))
    assert INSECURE in lines
    assert not any(line.startswith("plugin") for line in lines)


def test_cluster_config_authenticates_and_keeps_the_shipped_tuning() -> None:
    root = Path(__file__).resolve().parents[2]
    cluster = _directives((root / "deploy" / "mosquitto" / "mosquitto.conf").read_text())
    assert "allow_anonymous false" in cluster
    assert "plugin_opt_config_file /mosquitto/data/dynamic-security.json" in cluster
    assert cluster[cluster.index("listener 9001 0.0.0.0") + 1] == "protocol websockets"
    shipped = _directives(render_config(1883, "/mosquitto/data"))
    local_only = ("listener ", "user ", "allow_anonymous ")
    for line in shipped:
        if not line.startswith(local_only):
            assert line in cluster, line


# --- iot up -----------------------------------------------------------------------------------
def test_passwords_are_generated_once_and_reused(tmp_path: Path) -> None:
    path = tmp_path / ".iot" / "mqtt-credentials.json"
    first = load_or_create_passwords(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert len(first.admin_password) >= 32
    assert first.admin_password != first.bridge_password
    assert load_or_create_passwords(path) == first


def test_damaged_password_file_gets_new_passwords(tmp_path: Path) -> None:
    path = tmp_path / "mqtt-credentials.json"
    path.write_text("[]")
    auth = load_or_create_passwords(path)
    assert json.loads(path.read_text())["bridge_password"] == auth.bridge_password


def test_each_process_gets_only_its_own_mqtt_login() -> None:
    kids = {k.name: k for k in components(MqttCredentials(bridge=("b", "bp"), auth=("a", "ap")))}
    assert kids["bridge"].env == {
        "IOT_MQTT_USERNAME": "b",
        "IOT_MQTT_PASSWORD": "bp",
        "IOT_BRIDGE_SUBSCRIPTION": "exclusive",  # `iot up` runs one bridge
    }
    assert kids["auth"].env == {"IOT_MQTT_USERNAME": "a", "IOT_MQTT_PASSWORD": "ap"}
    assert kids["auth"].argv[-2:] == ("projector", "auth")
    assert kids["auth"].port == 8092
    assert all(not k.env for name, k in kids.items() if name not in ("bridge", "auth"))
    ports = [k.port for k in kids.values()]
    assert len(ports) == len(set(ports))


def test_insecure_up_has_no_auth_projector_and_no_credentials(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    env = {"IOT_MQTT_USERNAME": "x", "IOT_MQTT_PASSWORD": "y"}
    auth, mqtt = _mqtt_plan(load({}), env, own_broker=True, insecure=True)
    assert auth is None
    assert mqtt == MqttCredentials()
    assert env == {}
    assert "auth" not in {k.name for k in components(mqtt)}


def test_secure_up_assigns_generated_logins(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    env = {"IOT_MQTT_USERNAME": "x", "IOT_MQTT_PASSWORD": "y"}
    auth, mqtt = _mqtt_plan(load({}), env, own_broker=True, insecure=False)
    assert isinstance(auth, BrokerAuth)
    assert mqtt.bridge == (dynsec.BRIDGE_USERNAME, auth.bridge_password)
    assert mqtt.auth == (dynsec.ADMIN_USERNAME, auth.admin_password)
    assert env == {}  # nobody else inherits a backend login
    assert (tmp_path / ".iot" / "mqtt-credentials.json").exists()


def test_external_broker_runs_auth_projector_only_with_its_login() -> None:
    env: dict[str, str] = {}
    _, without = _mqtt_plan(load({}), env, own_broker=False, insecure=False)
    assert without.auth is None
    settings = load({"IOT_AUTH_MQTT_USERNAME": "adm", "IOT_AUTH_MQTT_PASSWORD": "pw"})
    _, mqtt = _mqtt_plan(settings, env, own_broker=False, insecure=False)
    assert mqtt.auth == ("adm", "pw")
    assert mqtt.bridge is None  # the environment's IOT_MQTT_USERNAME/PASSWORD


# --- the auth projector -----------------------------------------------------------------------
class FakePlugin:
    """The plugin's answers for the commands the projector sends, with its state."""

    def __init__(self) -> None:
        self.clients: dict[str, dict[str, Any]] = {}
        self.roles: dict[str, list[dict[str, Any]]] = {}
        self.sent: list[str] = []
        self.down = False

    async def command(self, command: str, **f: Any) -> dict[str, Any]:
        if self.down:
            raise DynsecUnavailable("not connected")
        self.sent.append(command)
        user = f.get("username", "")
        client = self.clients.get(user)
        match command:
            case "createRole":
                if f["rolename"] in self.roles:
                    raise DynsecCommandError(command, "Role already exists")
                self.roles[f["rolename"]] = f["acls"]
            case "modifyRole":
                self.roles[f["rolename"]] = f["acls"]
            case "deleteRole":
                if self.roles.pop(f["rolename"], None) is None:
                    raise DynsecCommandError(command, "Role not found")
            case "createClient":
                if client is not None:
                    raise DynsecCommandError(command, "Client already exists")
                self.clients[user] = {**f, "disabled": False}
            case "deleteClient":
                if self.clients.pop(user, None) is None:
                    raise DynsecCommandError(command, "Client not found")
            case _ if client is None:
                raise DynsecCommandError(command, "Client not found")
            case "modifyClient":
                client.update(f)
            case "setClientPassword":
                client["password"] = f["password"]
            case "disableClient" | "enableClient":
                client["disabled"] = command == "disableClient"
            case _:
                raise DynsecCommandError(command, "Unknown command")
        return {}


class FakeSecrets:
    def __init__(self) -> None:
        self.kv: dict[str, str] = {}

    async def take(self, device_id: str, version: int) -> str | None:
        return self.kv.get(f"{device_id}.{version}")

    async def forget(self, device_id: str, version: int) -> None:
        self.kv.pop(f"{device_id}.{version}", None)


class FakeJs:
    def __init__(self) -> None:
        self.published: list[tuple[str, bytes, dict[str, str]]] = []

    async def publish(
        self, subject: str, data: bytes, stream: str, headers: dict[str, str]
    ) -> None:
        self.published.append((subject, data, headers))


@dataclass
class FakeMsg:
    data: bytes
    subject: str = "events.x"


@dataclass
class Setup:
    plugin: FakePlugin
    secrets: FakeSecrets
    js: FakeJs
    projector: AuthProjector
    now: list[float]


@pytest.fixture
def setup() -> Setup:
    plugin, kv, js = FakePlugin(), FakeSecrets(), FakeJs()
    now = [at(1).timestamp()]
    projector = AuthProjector(
        plugin,
        kv,
        cast(JetStreamContext, js),
        "",
        secret_wait=0.0,
        clock=lambda: now[0],
        password_factory=lambda: "random-password",
    )
    return Setup(plugin, kv, js, projector, now)


def common(version: int, device: str = "pump-7", when: datetime = T0) -> dict[str, Any]:
    return {"device_id": device, "version": version, "at": when, "position": version}


def registered(device: str = "pump-7") -> DeviceRegistered:
    return DeviceRegistered(**common(1, device), name="Pump", type="pump", labels={})


async def test_registration_creates_the_role_and_a_client_with_the_secret(setup: Setup) -> None:
    setup.secrets.kv["pump-7.1"] = "s3cret"
    await setup.projector.apply(registered())
    client = setup.plugin.clients["pump-7"]
    assert client["password"] == "s3cret"
    assert client["clientid"] == "pump-7"
    assert client["roles"] == [{"rolename": "device-pump-7"}]
    assert setup.plugin.roles["device-pump-7"] == [
        a.as_json() for a in dynsec.device_acls("pump-7")
    ]
    assert setup.secrets.kv == {}  # forgotten once the broker has it


async def test_redelivered_registration_keeps_the_clients_password(setup: Setup) -> None:
    setup.secrets.kv["pump-7.1"] = "s3cret"
    await setup.projector.apply(registered())
    await setup.projector.apply(registered(), deliveries=2)
    assert setup.plugin.clients["pump-7"]["password"] == "s3cret"
    assert "setClientPassword" not in setup.plugin.sent


async def test_registration_whose_secret_never_arrives_gets_a_random_password(
    setup: Setup,
) -> None:
    await setup.projector.apply(registered())
    assert setup.plugin.clients["pump-7"]["password"] == "random-password"


async def test_rotation_sets_the_new_secret(setup: Setup) -> None:
    setup.secrets.kv["pump-7.1"] = "old"
    await setup.projector.apply(registered())
    setup.secrets.kv["pump-7.2"] = "new"
    await setup.projector.apply(DeviceSecretRotated(**common(2)))
    assert setup.plugin.clients["pump-7"]["password"] == "new"
    assert setup.secrets.kv == {}


async def test_rotation_whose_secret_never_arrives_still_invalidates_the_old_one(
    setup: Setup,
) -> None:
    setup.secrets.kv["pump-7.1"] = "old"
    await setup.projector.apply(registered())
    await setup.projector.apply(DeviceSecretRotated(**common(2)))
    assert setup.plugin.clients["pump-7"]["password"] == "random-password"


async def test_replayed_rotation_long_after_its_secret_expired_changes_no_password(
    setup: Setup,
) -> None:
    setup.secrets.kv["pump-7.1"] = "current"
    await setup.projector.apply(registered())
    setup.now[0] = at(3600).timestamp()
    await setup.projector.apply(DeviceSecretRotated(**common(2)))
    assert setup.plugin.clients["pump-7"]["password"] == "current"


async def test_suspend_resume_and_decommission_follow_the_lifecycle(setup: Setup) -> None:
    setup.secrets.kv["pump-7.1"] = "s3cret"
    await setup.projector.apply(registered())
    await setup.projector.apply(DeviceSuspended(**common(2), reason="maintenance"))
    assert setup.plugin.clients["pump-7"]["disabled"] is True
    await setup.projector.apply(DeviceResumed(**common(3), status="active"))
    assert setup.plugin.clients["pump-7"]["disabled"] is False
    decommissioned = DeviceDecommissioned(**common(4), reason="scrapped")
    await setup.projector.apply(decommissioned)
    assert setup.plugin.clients == {}
    assert setup.plugin.roles == {}
    await setup.projector.apply(decommissioned, deliveries=2)  # redelivered: nothing to do


async def test_other_events_send_nothing_to_the_broker(setup: Setup) -> None:
    await setup.projector.apply(DeviceConnected(**common(2)))
    await setup.projector.apply(DeviceCommandSent(**common(3), command_id="c1"))
    assert setup.plugin.sent == []


def msgs(*events: PublishedEvent | bytes) -> Sequence[Msg]:
    return cast(
        Sequence[Msg], [FakeMsg(e if isinstance(e, bytes) else encode_event(e)) for e in events]
    )


async def test_broker_outage_retries_the_event_and_everything_after_it(setup: Setup) -> None:
    setup.plugin.down = True
    outcome = await setup.projector.handle(
        msgs(registered(), DeviceSuspended(**common(2), reason="x"))
    )
    assert outcome.retry == {0, 1}
    assert outcome.poison == set()


async def test_undecodable_event_is_dead_lettered_and_the_rest_applied(setup: Setup) -> None:
    setup.secrets.kv["pump-7.1"] = "s3cret"
    outcome = await setup.projector.handle(msgs(b"{not json", registered()))
    assert outcome.poison == {0}
    assert outcome.retry == set()
    assert "pump-7" in setup.plugin.clients
    ((subject, _, headers),) = setup.js.published
    assert subject == "deadletter.undecodable_event"
    assert headers["Iot-Source"] == "auth"


async def test_device_id_that_could_widen_an_acl_is_refused(setup: Setup) -> None:
    outcome = await setup.projector.handle(msgs(registered("a/#")))
    assert outcome.poison == {0}
    assert setup.plugin.sent == []
    assert setup.js.published[0][0] == "deadletter.auth_rejected"


def test_auth_projector_without_its_broker_login_stops_naming_the_variables() -> None:
    with pytest.raises(SettingsError, match="IOT_MQTT_USERNAME and IOT_MQTT_PASSWORD"):
        control_client(load({}))
