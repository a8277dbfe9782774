"""The Mosquitto configuration of this project (`iot/mosquitto.conf`) and a private broker
for tests and one-machine runs."""

from __future__ import annotations

import getpass
import socket
import subprocess
import time
from pathlib import Path
from string import Template

CONFIG_TEMPLATE = Path(__file__).with_name("mosquitto.conf")
MOSQUITTO = "mosquitto"


def render_config(
    port: int, data_dir: str | Path, bind: str = "127.0.0.1", user: str | None = None
) -> str:
    """The broker configuration with its placeholders filled (user: the current account)."""
    location = str(data_dir).rstrip("/") + "/"
    return Template(CONFIG_TEMPLATE.read_text()).substitute(
        port=port, bind=bind, data_dir=location, user=user or getpass.getuser()
    )


class PrivateBroker:
    """A Mosquitto process on its own port with this project's configuration."""

    def __init__(self, directory: str | Path, port: int, binary: str = MOSQUITTO) -> None:
        self.directory = Path(directory)
        self.port = port
        self.binary = binary
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def start(self, timeout: float = 10.0) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        conf = self.directory / "mosquitto.conf"
        conf.write_text(render_config(self.port, self.directory))
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
