"""Helpers to run components as real processes in tests."""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

from infra.settings import Settings


def free_port() -> int:
    """A free TCP port below the ephemeral range: a server started on it later cannot find it
    taken by some process's outgoing connection (or a client's connection to itself)."""
    for _ in range(1000):
        port = random.randrange(20_000, 32_000)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free TCP port in 20000-31999")


def component_env(settings: Settings, port: int, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        IOT_NAMESPACE=settings.namespace,
        IOT_INFLUX_DB=settings.influx_db,
        IOT_HTTP_PORT=str(port),
        IOT_LOG_LEVEL=os.environ.get("IOT_TEST_LOG_LEVEL", "WARNING"),
        IOT_API_TOKENS=",".join(f"{t}={r}" for t, r in settings.api_tokens.items()),
    )
    env.update(extra)
    return env


class Component:
    """One `iot run ...` child process with its HTTP port."""

    def __init__(self, settings: Settings, *args: str, **env: str) -> None:
        self.port = free_port()
        self.args = args
        self.extra_env = dict(env)  # what it was started with beyond the namespace's settings
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "iot.cli", "run", *args],
            env=component_env(settings, self.port, **env),
        )

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def wait_ready(self, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.args} exited with {self.proc.returncode}")
            try:
                if httpx.get(f"{self.url}/readyz", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        raise TimeoutError(f"{self.args} not ready after {timeout}s")

    def kill(self) -> None:
        """SIGKILL: no chance to finish anything."""
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


@contextmanager
def running(settings: Settings, *args: str, **env: str) -> Iterator[Component]:
    component = Component(settings, *args, **env)
    try:
        yield component
    finally:
        component.stop()


def port_free(port: int) -> bool:
    with socket.socket() as sock:
        # as the servers bind: connections in TIME_WAIT from a run just ended do not count
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


@contextmanager
def iot_up(
    settings: Settings, ports: dict[str, int], *args: str, tokens: dict[str, str]
) -> Iterator[Path]:
    """`iot up --no-migrate ARGS` as an operator runs it (in a scratch directory for its
    `.iot/` state) in `settings`' namespace, with `tokens` (token -> role), once every one of
    `ports` (component -> port, which must be free) answers ready. Yields its log's path."""
    busy = [f"{c} ({p})" for c, p in ports.items() if not port_free(p)]
    assert not busy, f"`iot up` needs these ports, in use here: {', '.join(busy)}"
    env = {
        **os.environ,
        "IOT_NAMESPACE": settings.namespace,
        "IOT_INFLUX_DB": settings.influx_db,
        "IOT_API_TOKENS": ",".join(f"{t}={r}" for t, r in tokens.items()),
    }
    with tempfile.TemporaryDirectory() as tmp, (Path(tmp) / "up.log").open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "iot.cli", "up", "--no-migrate", *args],
            cwd=tmp,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            deadline = time.monotonic() + 90
            while not _all_ready(ports, proc):
                assert time.monotonic() < deadline, (Path(tmp) / "up.log").read_text()[-3000:]
                time.sleep(0.5)
            yield Path(tmp) / "up.log"
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(40)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)


def _all_ready(ports: dict[str, int], proc: subprocess.Popen[bytes]) -> bool:
    assert proc.poll() is None, f"iot up exited with {proc.returncode}"
    for port in ports.values():
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1).status_code != 200:
                return False
        except httpx.HTTPError:
            return False
    return True
