"""The Mosquitto configuration of this project (`iot/mosquitto.conf`) and a private broker
for tests and one-machine runs, either open to anonymous clients or authenticating through the
dynamic security plugin (`iot.dynsec_config`)."""

from __future__ import annotations

import getpass
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from string import Template

from iot import dynsec_config

CONFIG_TEMPLATE = Path(__file__).with_name("mosquitto.conf")
MOSQUITTO = "mosquitto"
DYNSEC_FILE = "dynamic-security.json"
INSECURE = "allow_anonymous true"


def security_lines(plugin: str, config_file: str | Path) -> str:
    """Anonymous access off; clients, passwords and ACLs from the dynamic security plugin."""
    return "\n".join(
        (
            "allow_anonymous false",
            f"plugin {plugin}",
            f"plugin_opt_config_file {config_file}",
        )
    )


def render_config(
    port: int,
    data_dir: str | Path,
    bind: str = "127.0.0.1",
    user: str | None = None,
    security: str = INSECURE,
) -> str:
    """The broker configuration with its placeholders filled (user: the current account)."""
    location = str(data_dir).rstrip("/") + "/"
    return Template(CONFIG_TEMPLATE.read_text()).substitute(
        port=port,
        bind=bind,
        data_dir=location,
        user=user or getpass.getuser(),
        security=security,
    )


@dataclass(frozen=True)
class BrokerAuth:
    """The backend's own MQTT passwords for a broker with the dynamic security plugin."""

    admin_password: str
    bridge_password: str
    plugin: str = ""  # the plugin's library; found on this machine when empty

    def users(self) -> list[dynsec_config.BackendUser]:
        return dynsec_config.backend_users(self.admin_password, self.bridge_password)


class PrivateBroker:
    """A Mosquitto process on its own port with this project's configuration; with `auth`,
    anonymous access is off and the dynamic security plugin (its file in `directory`, kept
    across restarts with every device in it) authenticates clients."""

    def __init__(
        self,
        directory: str | Path,
        port: int,
        binary: str = MOSQUITTO,
        *,
        auth: BrokerAuth | None = None,
    ) -> None:
        self.directory = Path(directory)
        self.port = port
        self.binary = binary
        self.auth = auth
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def dynsec_file(self) -> Path:
        return self.directory / DYNSEC_FILE

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def start(self, timeout: float = 10.0) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        conf = self.directory / "mosquitto.conf"
        security = INSECURE
        if self.auth is not None:
            dynsec_config.ensure_config_file(self.dynsec_file, self.auth.users())
            plugin = self.auth.plugin or dynsec_config.find_plugin()
            security = security_lines(plugin, self.dynsec_file.resolve())
        conf.write_text(render_config(self.port, self.directory, security=security))
        self.proc = subprocess.Popen([self.binary, "-c", str(conf)], stdout=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mosquitto exited with {self.proc.returncode}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return
            except OSError:
                time.sleep(0.05)
        raise TimeoutError(f"mosquitto not listening on {self.port} after {timeout}s")

    def stop(self) -> None:
        """SIGTERM: Mosquitto saves its persistence file on the way out."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
