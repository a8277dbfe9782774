"""`iot up`: every component as a child process, restarted if it dies, stopped by Ctrl-C.

MQTT credentials: with its own broker and authentication on (the default), `iot up` keeps two
random passwords in `.iot/mqtt-credentials.json` (mode 0600, reused by the next run), writes
them hashed into the broker's dynamic security file (`.iot/mosquitto/dynamic-security.json`)
before starting it, and hands each to one child only, as IOT_MQTT_USERNAME/IOT_MQTT_PASSWORD:
the plugin's admin user to `iot run projector auth`, the bridge user to `iot run bridge`. Other
children get no MQTT credentials (devices, the simulator's included, use their own secrets).
`--insecure` starts the broker open to anonymous clients and no auth projector. With
`--external-broker` the children get the environment's IOT_MQTT_USERNAME/PASSWORD, and the auth
projector runs only if IOT_AUTH_MQTT_USERNAME/IOT_AUTH_MQTT_PASSWORD name the plugin's admin.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import signal
import socket
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from infra import dynsec
from infra.runtime import stop_on_signals
from infra.settings import Settings
from iot import dynsec_config
from iot.broker import BrokerAuth, PrivateBroker

IOT = (sys.executable, "-m", "iot.cli")
STATE_DIR = Path(".iot")
CREDENTIALS_FILE = "mqtt-credentials.json"
MQTT_CREDENTIALS = ("IOT_MQTT_USERNAME", "IOT_MQTT_PASSWORD")


@dataclass(frozen=True)
class Child:
    name: str
    argv: tuple[str, ...]
    port: int | None
    env: Mapping[str, str] = field(default_factory=dict)  # on top of the shared environment


@dataclass(frozen=True)
class MqttCredentials:
    """What each backend process logs in to the broker with (None: its environment's)."""

    bridge: tuple[str, str] | None = None
    auth: tuple[str, str] | None = None  # None: no auth projector


# `iot up` runs one bridge: a plain subscription, which a broker restart cannot lose (a share
# group restored from Mosquitto 2.0.11's persistence drops what arrives before its member
# returns: docs/reliability.md). Replicas behind one broker need `shared`.
DASHBOARD_ORIGINS = ("http://127.0.0.1:8082", "http://localhost:8082")


def _one_bridge() -> dict[str, str]:
    return {"IOT_BRIDGE_SUBSCRIPTION": os.environ.get("IOT_BRIDGE_SUBSCRIPTION", "exclusive")}


def _login(credentials: tuple[str, str] | None) -> dict[str, str]:
    if credentials is None:
        return {}
    return dict(zip(MQTT_CREDENTIALS, credentials, strict=True))


def components(mqtt: MqttCredentials | None = None) -> list[Child]:
    mqtt = mqtt or MqttCredentials()
    kids = [
        Child("commands", (*IOT, "run", "commands"), 8080),
        Child("bridge", (*IOT, "run", "bridge"), 8081, {**_one_bridge(), **_login(mqtt.bridge)}),
        Child("gateway", (*IOT, "run", "gateway"), 8082),
        Child("relay", (*IOT, "run", "relay"), 8084),
        Child("analytics", (*IOT, "run", "analytics"), 8083),
        Child("timeseries", (*IOT, "run", "projector", "timeseries"), 8090),
        Child("views", (*IOT, "run", "projector", "views"), 8091),
    ]
    if mqtt.auth is not None:
        kids.append(Child("auth", (*IOT, "run", "projector", "auth"), 8092, _login(mqtt.auth)))
    return kids


def load_or_create_passwords(path: Path) -> BrokerAuth:
    """The backend's broker passwords, generated on the first run and kept (mode 0600)."""
    try:
        saved = json.loads(path.read_text())
        auth = BrokerAuth(str(saved["admin_password"]), str(saved["bridge_password"]))
        if auth.admin_password and auth.bridge_password:
            path.chmod(0o600)
            return auth
    except (OSError, ValueError, KeyError, TypeError):
        pass  # absent or damaged: new passwords (the broker's file is updated to match)
    auth = BrokerAuth(dynsec.random_password(), dynsec.random_password())
    body = {"admin_password": auth.admin_password, "bridge_password": auth.bridge_password}
    dynsec_config.write_private(path, json.dumps(body, indent=2) + "\n")
    return auth


async def _supervise(child: Child, env: dict[str, str], stop: asyncio.Event) -> None:
    backoff = 0.5
    while not stop.is_set():
        child_env = {**env, **child.env}
        if child.port is not None:
            child_env["IOT_HTTP_PORT"] = str(child.port)
        started = time.monotonic()
        proc = await asyncio.create_subprocess_exec(*child.argv, env=child_env)
        waiter = asyncio.create_task(proc.wait())
        stopper = asyncio.create_task(stop.wait())
        await asyncio.wait({waiter, stopper}, return_when=asyncio.FIRST_COMPLETED)
        stopper.cancel()
        if stop.is_set():
            if proc.returncode is None:
                proc.send_signal(signal.SIGTERM)
                done, _ = await asyncio.wait({waiter}, timeout=10)
                if not done:
                    print(
                        f"iot up: {child.name} ignored SIGTERM for 10 s; killing it",
                        file=sys.stderr,
                    )
                    proc.kill()
                    await waiter
            return
        if time.monotonic() - started > 30:
            backoff = 0.5  # it ran a while: a fresh failure, not a crash loop
        print(f"iot up: {child.name} exited with {proc.returncode}; restarting", file=sys.stderr)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=backoff)
        backoff = min(backoff * 2, 10.0)


async def _wait_ready(url: str, stop: asyncio.Event, within: float = 60.0) -> bool:
    deadline = time.monotonic() + within
    async with httpx.AsyncClient(timeout=1.0) as client:
        while not stop.is_set() and time.monotonic() < deadline:
            with contextlib.suppress(httpx.HTTPError):
                if (await client.get(url)).status_code == 200:
                    return True
            await asyncio.sleep(0.2)
    return False


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as Mosquitto binds: a port
        try:  # left in TIME_WAIT by the last run is free for the next one
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def _start_broker(settings: Settings, auth: BrokerAuth | None) -> tuple[PrivateBroker, str]:
    """Our own Mosquitto with the shipped settings (deep queues, persistence) under `.iot/`,
    with the dynamic security plugin when `auth` is given."""
    _, wanted, _ = settings.mqtt
    port = wanted if _port_free(wanted) else next(p for p in range(1884, 1984) if _port_free(p))
    directory = STATE_DIR / "mosquitto"
    directory.mkdir(parents=True, exist_ok=True)
    directory.chmod(0o700)  # the plugin's file holds password hashes
    broker = PrivateBroker(directory, port, auth=auth)
    broker.start()
    return broker, broker.url


def _mqtt_plan(
    settings: Settings, env: dict[str, str], own_broker: bool, insecure: bool
) -> tuple[BrokerAuth | None, MqttCredentials]:
    """Who gets which MQTT credentials; strips the shared ones where `iot up` assigns them."""
    if not own_broker:
        admin = (settings.auth_mqtt_username, settings.auth_mqtt_password)
        return None, MqttCredentials(auth=admin if all(admin) and not insecure else None)
    for name in MQTT_CREDENTIALS:
        env.pop(name, None)
    if insecure:
        return None, MqttCredentials()
    auth = load_or_create_passwords(STATE_DIR / CREDENTIALS_FILE)
    return auth, MqttCredentials(
        bridge=(dynsec.BRIDGE_USERNAME, auth.bridge_password),
        auth=(dynsec.ADMIN_USERNAME, auth.admin_password),
    )


async def up(
    settings: Settings,
    *,
    migrate_first: bool = True,
    simulate: int = 0,
    rate: float = 1.0,
    faults: bool = False,
    own_broker: bool = True,
    insecure: bool = False,
) -> int:
    env = dict(os.environ)
    broker = None
    mqtt_url = settings.mqtt_url
    broker_auth, mqtt = _mqtt_plan(settings, env, own_broker, insecure)
    if own_broker:
        broker, mqtt_url = _start_broker(settings, broker_auth)
        env["IOT_MQTT_URL"] = mqtt_url
    # The dashboard (the gateway's page) calls the command API from the gateway's origin.
    env.setdefault("IOT_CORS_ORIGINS", ",".join(DASHBOARD_ORIGINS))
    token = None
    if not settings.api_tokens:
        token = secrets.token_urlsafe(24)
        env["IOT_API_TOKENS"] = f"{token}=admin"
    if migrate_first:
        from commands.migrate import migrate

        for step in await migrate(settings):
            print(f"iot up: {step}")
    stop = stop_on_signals()
    kids = components(mqtt)
    tasks = [asyncio.create_task(_supervise(child, env, stop)) for child in kids]
    if simulate:
        if await _wait_ready("http://127.0.0.1:8080/readyz", stop):
            sim = Child(
                "simulator",
                (
                    *IOT,
                    "simulate",
                    "--devices",
                    str(simulate),
                    "--rate",
                    str(rate),
                    *(("--faults",) if faults else ()),
                ),
                None,
            )
            tasks.append(asyncio.create_task(_supervise(sim, env, stop)))
        else:
            print("iot up: the command API never became ready; no simulated fleet", file=sys.stderr)
    print("iot up: running; Ctrl-C stops everything")
    for child in kids:
        print(f"  {child.name:<11} http://127.0.0.1:{child.port}/readyz")
    print("  command API   http://127.0.0.1:8080/api/v1")
    print("  dashboards    http://127.0.0.1:8082/  (API: http://127.0.0.1:8082/api/v1)")
    print(f"  MQTT          {mqtt_url}" + ("  (iot up's own Mosquitto)" if broker else ""))
    if broker_auth is not None:
        print(
            "                devices log in with their id and secret; backend passwords in "
            f"{STATE_DIR / CREDENTIALS_FILE}"
        )
    elif own_broker:
        print("                anonymous access (--insecure): no device authentication")
    if simulate:
        print(f"  simulated     {simulate} devices, {rate:g} messages/s")
        if faults:
            print(
                "                with faults: sim-0000 overheats, sim-0001 goes silent, "
                "sim-0002 drifts"
            )
    if token:
        print(f"  admin token (generated; set IOT_API_TOKENS to choose your own): {token}")
    await stop.wait()
    await asyncio.gather(*tasks)
    if broker is not None:
        broker.stop()
    return 0
