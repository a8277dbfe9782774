"""Components of the system run as child processes (`iot run NAME`), as in production."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType

import httpx


def iot_command() -> list[str]:
    """The `iot` console script beside this interpreter (or on PATH), else `python -m iot.cli`."""
    beside = Path(sys.executable).parent / "iot"
    if beside.exists():
        return [str(beside)]
    found = shutil.which("iot")
    return [found] if found else [sys.executable, "-m", "iot.cli"]


class Component:
    """One `iot run ARGS...` child process on its own HTTP port; its output goes to a log file."""

    def __init__(
        self, name: str, env: Mapping[str, str], port: int, argv: Sequence[str] = ()
    ) -> None:
        self.name = name
        self.argv = list(argv) or [name]  # e.g. ["projector", "timeseries"]
        self.port = port
        self.env = {**os.environ, **env, "IOT_HTTP_PORT": str(port)}
        self.log = Path(tempfile.mkstemp(prefix=f"bench-{name}-", suffix=".log")[1])
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(
                [*iot_command(), "run", *self.argv],
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )

    async def wait_ready(self, within: float = 60.0) -> float:
        """Poll GET /readyz until 200; return the seconds it took."""
        assert self.proc is not None
        start = time.monotonic()
        async with httpx.AsyncClient(base_url=self.url, timeout=2.0) as client:
            while time.monotonic() - start < within:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"iot run {self.name} exited: {self.tail()}")
                try:
                    response = await client.get("/readyz")
                    if response.status_code == 200:
                        return time.monotonic() - start
                except httpx.HTTPError:
                    pass
                await asyncio.sleep(0.1)
        raise RuntimeError(f"iot run {self.name} not ready after {within} s: {self.tail()}")

    def tail(self, lines: int = 20) -> str:
        try:
            text = self.log.read_text(errors="replace").splitlines()
        except OSError:
            return "(no log)"
        return "\n".join(text[-lines:])

    def stop(self, grace: float = 10.0) -> int | None:
        """SIGTERM, then SIGKILL after `grace` seconds; return the exit code."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(grace)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


class Components:
    """Start several components; stop them all on exit, whatever happened."""

    def __init__(self, *components: Component) -> None:
        self.components = components

    def __enter__(self) -> Components:
        for component in self.components:
            component.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        for component in self.components:
            component.stop()
        if exc_type is None:
            for component in self.components:
                component.log.unlink(missing_ok=True)
        else:
            for component in self.components:
                print(f"bench: log of iot run {component.name}: {component.log}", file=sys.stderr)


def progress(message: str) -> None:
    """A progress line on stderr (the figures go to stdout)."""
    print(f"bench: {message}", file=sys.stderr, flush=True)
