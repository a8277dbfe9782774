"""Fixtures shared by integration tests of more than one module."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from infra import dynsec
from iot.broker import BrokerAuth, PrivateBroker
from tests.e2e.processes import free_port


@pytest.fixture
def auth() -> BrokerAuth:
    """The backend's own broker passwords (the plugin's admin, the bridge)."""
    return BrokerAuth(dynsec.random_password(), dynsec.random_password())


@pytest.fixture
def secured_broker(tmp_path: Path, auth: BrokerAuth) -> Iterator[PrivateBroker]:
    """A Mosquitto of the test's own with the dynamic security plugin and `auth`'s users."""
    mosquitto = PrivateBroker(tmp_path / "mosquitto", free_port(), auth=auth)
    mosquitto.start()
    yield mosquitto
    mosquitto.stop()
