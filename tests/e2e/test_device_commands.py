"""Commands, twin, connectivity and device security through the whole system as processes.

A private Mosquitto with the dynamic security plugin; commands, relay, bridge, views, gateway
and the auth projector as `iot run` processes; devices are real MQTT clients with the secrets
the command API issued.
"""

from __future__ import annotations

import asyncio
import itertools
import queue
import secrets
import tempfile
import time
from collections.abc import Iterator
from typing import Any

import httpx
import msgspec
import nats
import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from commands.migrate import migrate
from infra import dynsec
from infra.settings import Settings
from infra.streams import Streams
from iot.broker import BrokerAuth, PrivateBroker
from tests.conftest import drop_namespace, settings_for, unique_namespace
from tests.e2e.pipeline import OPERATOR, VIEWER, System, wait_until
from tests.e2e.processes import free_port

pytestmark = pytest.mark.e2e


class Secured:
    """The running system and the broker it authenticates against."""

    def __init__(self, running: System, broker: PrivateBroker) -> None:
        self.running = running
        self.broker = broker

    @property
    def commands(self) -> str:
        return self.running.url("commands")

    def register(self, device_id: str) -> str:
        response = httpx.post(
            f"{self.commands}/api/v1/devices",
            json={"device_id": device_id, "name": device_id, "type": "sensor"},
            headers=OPERATOR,
            timeout=10,
        )
        assert response.status_code == 201, response.text
        secret: str = response.json()["secret"]
        return secret

    def post(self, path: str, body: dict[str, Any] | None = None) -> httpx.Response:
        return httpx.post(f"{self.commands}/api/v1{path}", json=body or {}, headers=OPERATOR)

    def view(self, device_id: str) -> dict[str, Any] | None:
        response = httpx.get(
            f"{self.running.url('gateway')}/api/v1/devices/{device_id}", headers=VIEWER, timeout=5
        )
        return response.json() if response.status_code == 200 else None

    def events(self, device_id: str) -> list[dict[str, Any]]:
        """The device's domain events as published on the EVENTS stream (the audit trail)."""
        return asyncio.run(_events(self.running.settings, device_id))

    def device(self, device_id: str, secret: str) -> Device:
        return Device(self.broker.port, device_id, secret)


async def _events(settings: Settings, device_id: str) -> list[dict[str, Any]]:
    nc = await nats.connect(settings.nats_url)
    try:
        streams = Streams(settings.namespace)
        js = nc.jetstream()
        sub = await js.subscribe(
            streams.event_subject(device_id), stream=streams.events, ordered_consumer=True
        )
        info = await nc.jsm().stream_info(
            streams.events, subjects_filter=streams.event_subject(device_id)
        )
        count = sum((info.state.subjects or {}).values())
        out = []
        for _ in range(count):
            msg = await sub.next_msg(timeout=5)
            out.append(msgspec.json.decode(msg.data))
        await sub.unsubscribe()
        return out
    finally:
        await nc.close()


class Device:
    """A device as an MQTT client: connects with its secret, records what it receives."""

    def __init__(self, port: int, device_id: str, secret: str) -> None:
        self.port = port
        self.device_id = device_id
        self.secret = secret
        self.received: queue.Queue[tuple[str, bytes, bool]] = queue.Queue()
        self.connack: queue.Queue[Any] = queue.Queue()
        self.disconnects: queue.Queue[Any] = queue.Queue()
        self.client = self._new_client()

    def _new_client(self) -> mqtt.Client:
        client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=self.device_id)
        client.username_pw_set(self.device_id, self.secret)
        client.will_set(f"devices/{self.device_id}/status", b"offline", qos=1, retain=True)
        client.on_connect = lambda c, u, f, rc, p: self.connack.put(rc)
        client.on_disconnect = lambda c, u, f, rc, p: self.disconnects.put(rc)
        client.on_message = lambda c, u, m: self.received.put(
            (m.topic, bytes(m.payload), bool(m.retain))
        )
        return client

    def connect(self) -> bool:
        """Connect with a fresh client; True if the broker accepted the credentials."""
        self.client = self._new_client()
        self.client.connect("127.0.0.1", self.port, keepalive=5)
        self.client.loop_start()
        rc = self.connack.get(timeout=10)
        if rc.is_failure:
            shut(self.client)
            return False
        return True

    def connect_when_allowed(self) -> bool:
        """Connect once the auth projection has created the device's client (eventually)."""
        try:
            return self.connect()
        except queue.Empty:
            return False

    def go_online(self) -> None:
        """Subscribe to what the server sends, then announce `online` (the contract's order)."""
        base = f"devices/{self.device_id}"
        info = self.client.subscribe([(f"{base}/commands", 1), (f"{base}/desired", 1)])
        assert info[0] == mqtt.MQTT_ERR_SUCCESS
        self.publish("status", b"online", retain=True)

    def publish(self, leaf: str, payload: bytes, retain: bool = False) -> None:
        self.client.publish(
            f"devices/{self.device_id}/{leaf}", payload, qos=1, retain=retain
        ).wait_for_publish(10)

    def next(self, timeout: float = 30.0) -> tuple[str, dict[str, Any], bool]:
        topic, payload, retained = self.received.get(timeout=timeout)
        return topic, msgspec.json.decode(payload), retained

    def commands(self, timeout: float) -> dict[str, Any]:
        """The next command received within `timeout`."""
        deadline = time.monotonic() + timeout
        while True:
            topic, body, _ = self.next(max(0.01, deadline - time.monotonic()))
            if topic.endswith("/commands"):
                return body

    def ack(self, command_id: str, status: str = "ok", result: Any = None) -> None:
        body = {"command_id": command_id, "status": status, "result": result or {}}
        self.publish("commands/ack", msgspec.json.encode(body))

    def close(self, graceful: bool = True) -> None:
        if graceful:
            self.publish("status", b"offline", retain=True)
        shut(self.client)


def shut(client: mqtt.Client) -> None:
    """Stop a client for good: no reconnects, its thread ended, its sockets closed."""
    client.disconnect()
    client.loop_stop()
    client._reset_sockets()  # paho leaves them to the garbage collector otherwise


@pytest.fixture(scope="module")
def secured() -> Iterator[Secured]:
    settings: Settings = settings_for(unique_namespace())
    asyncio.run(migrate(settings))
    auth = BrokerAuth(admin_password=secrets.token_hex(16), bridge_password=secrets.token_hex(16))
    with tempfile.TemporaryDirectory() as tmp:
        broker = PrivateBroker(tmp, free_port(), auth=auth)
        broker.start()
        running = System(settings, broker.port)
        try:
            bridge = {
                "IOT_MQTT_USERNAME": dynsec.BRIDGE_USERNAME,
                "IOT_MQTT_PASSWORD": auth.bridge_password,
            }
            admin = {
                "IOT_MQTT_USERNAME": dynsec.ADMIN_USERNAME,
                "IOT_MQTT_PASSWORD": auth.admin_password,
            }
            for name, args, env in (
                ("commands", ("commands",), {}),
                ("relay", ("relay",), {}),
                ("auth", ("projector", "auth"), admin),
                ("views", ("projector", "views"), {}),
                ("gateway", ("gateway",), {}),
                ("bridge", ("bridge",), bridge),
            ):
                running.start(name, *args, **env).wait_ready(60)
            yield Secured(running, broker)
        finally:
            running.stop_all()
            broker.stop()
            drop_namespace(settings)


def online_device(system: Secured, device_id: str) -> Device:
    """A registered device, connected with its secret and seen online in its view."""
    secret = system.register(device_id)
    device = system.device(device_id, secret)
    assert wait_until(device.connect_when_allowed, timeout=30)
    device.go_online()
    assert wait_until(lambda: (system.view(device_id) or {}).get("online") is True)
    return device


def recent(system: Secured, device_id: str, command_id: str) -> dict[str, Any] | None:
    view = system.view(device_id) or {}
    for command in view.get("recent_commands", []):
        if command["command_id"] == command_id:
            found: dict[str, Any] = command
            return found
    return None


# -- device security ------------------------------------------------------------------------


def test_a_device_connects_with_its_secret_and_not_with_a_wrong_one(secured: Secured) -> None:
    device_id = "sec-" + secrets.token_hex(3)
    secret = secured.register(device_id)
    right = secured.device(device_id, secret)
    assert wait_until(right.connect_when_allowed, timeout=30)
    right.close()
    wrong = secured.device(device_id, secret + "x")
    assert not wrong.connect()
    anonymous = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="anon-" + device_id)
    codes: queue.Queue[Any] = queue.Queue()
    anonymous.on_connect = lambda c, u, f, rc, p: codes.put(rc)
    anonymous.connect("127.0.0.1", secured.broker.port)
    anonymous.loop_start()
    assert codes.get(timeout=10).is_failure
    shut(anonymous)


def test_a_device_publishing_on_another_devices_topic_never_reaches_the_pipeline(
    secured: Secured,
) -> None:
    intruder = online_device(secured, "ina-" + secrets.token_hex(3))
    victim_id = "inb-" + secrets.token_hex(3)
    victim = online_device(secured, victim_id)
    # The broker drops the denied publish (an MQTT 3.1.1 client still gets its PUBACK).
    intruder.client.publish(
        f"devices/{victim_id}/telemetry", b'{"forged": 1}', qos=1
    ).wait_for_publish(10)
    victim.publish("telemetry", b'{"genuine": 1}')  # after the forged one, on the same broker
    view = wait_until(
        lambda: "genuine" in ((v := secured.view(victim_id)) or {}).get("metrics", {}) and v
    )
    assert "forged" not in view["metrics"]
    intruder.close()
    victim.close()


def test_suspend_disconnects_the_device_and_keeps_it_out_until_resumed(secured: Secured) -> None:
    device_id = "sus-" + secrets.token_hex(3)
    device = online_device(secured, device_id)
    assert secured.post(f"/devices/{device_id}/suspend", {"reason": "stolen"}).status_code == 200
    device.disconnects.get(timeout=30)  # the broker kicked it
    shut(device.client)
    assert wait_until(lambda: (secured.view(device_id) or {}).get("online") is False)
    again = secured.device(device_id, device.secret)
    assert not again.connect()
    response = secured.post(f"/devices/{device_id}/commands", {"name": "reboot"})
    assert response.status_code == 409
    assert secured.post(f"/devices/{device_id}/resume").status_code == 200
    back = secured.device(device_id, device.secret)
    assert wait_until(back.connect_when_allowed, timeout=30)
    back.close()


def test_rotation_invalidates_the_old_secret(secured: Secured) -> None:
    device_id = "rot-" + secrets.token_hex(3)
    device = online_device(secured, device_id)
    device.close()
    response = secured.post(f"/devices/{device_id}/rotate-secret")
    assert response.status_code == 200, response.text
    new_secret = response.json()["secret"]
    new = secured.device(device_id, new_secret)
    assert wait_until(new.connect_when_allowed, timeout=30)
    new.close()
    assert not secured.device(device_id, device.secret).connect()


# -- commands ---------------------------------------------------------------------------------


def test_a_command_to_an_online_device_round_trips_to_the_view(secured: Secured) -> None:
    device_id = "cmd-" + secrets.token_hex(3)
    device = online_device(secured, device_id)
    response = secured.post(
        f"/devices/{device_id}/commands", {"name": "reboot", "args": {"delay": 5}}
    )
    assert response.status_code == 202, response.text
    command_id = response.json()["command_id"]
    command = device.commands(timeout=30)
    assert command["command_id"] == command_id
    assert command["name"] == "reboot"
    assert command["args"] == {"delay": 5}
    assert command["expires_at"].endswith(("Z", "+00:00"))
    device.ack(command_id, result={"rebooted": True})
    done = wait_until(lambda: recent(secured, device_id, command_id))
    assert done["state"] == "acknowledged"
    assert done["result"] == {"rebooted": True}
    events = len(secured.events(device_id))
    device.ack(command_id, status="error")  # a duplicate (late) ack changes nothing
    probe = secured.post(f"/devices/{device_id}/commands", {"name": "probe"}).json()["command_id"]
    assert device.commands(timeout=30)["command_id"] == probe
    device.ack(probe)
    assert wait_until(lambda: recent(secured, device_id, probe))
    assert recent(secured, device_id, command_id) == done
    assert len(secured.events(device_id)) == events + 3  # probe: requested, sent, acknowledged
    device.close()


def test_a_command_for_an_offline_device_is_held_and_delivered_once_on_reconnect(
    secured: Secured,
) -> None:
    device_id = "off-" + secrets.token_hex(3)
    secret = secured.register(device_id)
    first = secured.post(f"/devices/{device_id}/commands", {"name": "first"}).json()
    second = secured.post(f"/devices/{device_id}/commands", {"name": "second"}).json()
    view = wait_until(lambda: len((secured.view(device_id) or {}).get("pending_commands", [])) == 2)
    assert view
    device = secured.device(device_id, secret)
    assert wait_until(device.connect_when_allowed, timeout=30)
    device.go_online()
    got = [device.commands(timeout=30), device.commands(timeout=30)]
    assert [c["command_id"] for c in got] == [first["command_id"], second["command_id"]]
    for command in got:
        device.ack(command["command_id"])
    assert wait_until(lambda: recent(secured, device_id, second["command_id"]))
    view = secured.view(device_id) or {}
    assert view["status"] == "active"
    assert view["pending_commands"] == []
    assert device.received.empty()  # delivered once each
    device.close()


def test_a_command_expires_after_its_ttl_and_is_never_delivered(secured: Secured) -> None:
    device_id = "exp-" + secrets.token_hex(3)
    secret = secured.register(device_id)
    stale = secured.post(f"/devices/{device_id}/commands", {"name": "late", "ttl_s": 1}).json()
    expired = wait_until(lambda: recent(secured, device_id, stale["command_id"]))
    assert expired["state"] == "expired"
    device = secured.device(device_id, secret)
    assert wait_until(device.connect_when_allowed, timeout=30)
    device.go_online()
    fresh = secured.post(f"/devices/{device_id}/commands", {"name": "fresh"}).json()
    # Commands go out in request order: the expired one would have arrived first.
    assert device.commands(timeout=30)["command_id"] == fresh["command_id"]
    device.close()


# -- twin and connectivity ----------------------------------------------------------------------


def test_desired_config_reaches_a_later_subscriber_retained_and_the_view_shows_the_delta(
    secured: Secured,
) -> None:
    device_id = "twn-" + secrets.token_hex(3)
    secret = secured.register(device_id)
    response = httpx.patch(
        f"{secured.commands}/api/v1/devices/{device_id}/config",
        json={"config": {"setpoint": 21.5, "mode": "eco"}},
        headers=OPERATOR,
    )
    assert response.status_code == 200, response.text
    assert wait_until(lambda: (secured.view(device_id) or {}).get("desired", {}).get("version"))
    device = secured.device(device_id, secret)
    assert wait_until(device.connect_when_allowed, timeout=30)
    device.go_online()
    topic, desired, retained = device.next()
    assert topic == f"devices/{device_id}/desired"
    assert retained
    assert desired == {"version": 1, "config": {"setpoint": 21.5, "mode": "eco"}}
    device.publish("reported", msgspec.json.encode({"setpoint": 21.5, "config_version": 1}))
    view = wait_until(
        lambda: (v := secured.view(device_id)) and v.get("reported_config_version") == 1 and v
    )
    assert view["reported"] == {"setpoint": 21.5}
    assert set(view["delta"]) == {"mode"}
    device.close()


def test_connectivity_timeline_ends_in_the_last_status(secured: Secured) -> None:
    device_id = "con-" + secrets.token_hex(3)
    device = online_device(secured, device_id)
    assert (secured.view(device_id) or {})["status"] == "active"
    for status in (b"offline", b"online", b"offline", b"online", b"online"):
        device.publish("status", status, retain=True)
    shut(device.client)  # no `offline` of its own
    again = secured.device(device_id, device.secret)
    assert again.connect()
    again.publish("status", b"offline", retain=True)

    def settled() -> bool:
        return (secured.view(device_id) or {}).get("online") is False

    assert wait_until(settled)
    kinds = [e["event"] for e in secured.events(device_id) if "connected" in e["event"]]
    assert kinds[0] == "device.connected.v1"
    assert kinds[-1] == "device.disconnected.v1"
    # Alternating, never two of a kind in a row: repeats changed nothing.
    assert all(a != b for a, b in itertools.pairwise(kinds))
    shut(again.client)


# -- last: it kills the bridge, whose lease the restarted one takes over only after its TTL


def test_the_bridge_killed_between_send_and_ack_loses_nothing(secured: Secured) -> None:
    device_id = "kil-" + secrets.token_hex(3)
    device = online_device(secured, device_id)
    command_id = secured.post(f"/devices/{device_id}/commands", {"name": "x"}).json()["command_id"]
    assert device.commands(timeout=30)["command_id"] == command_id
    bridge = secured.running.components["bridge"]
    bridge.kill()
    device.ack(command_id, result={"n": 1})  # the broker keeps it for the bridge's session
    secured.running.restart("bridge").wait_ready(60)
    done = wait_until(lambda: recent(secured, device_id, command_id))
    assert done["state"] == "acknowledged"
    assert done["result"] == {"n": 1}
    device.close()
