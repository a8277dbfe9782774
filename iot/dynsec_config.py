"""The dynamic security plugin's configuration file, written before the broker starts.

`ensure_config_file` writes (or brings up to date) the backend's own users: the auth
projector's admin user (may use only the control topics) and the bridge user (device topics
the bridge serves); everything else is denied by default. Devices are added later, by the auth
projector, through the plugin's control API (`infra.dynsec.DynsecClient`).
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from infra.dynsec import (
    ADMIN_ROLE,
    ADMIN_USERNAME,
    BRIDGE_ROLE,
    BRIDGE_USERNAME,
    DEFAULT_ACL_ACCESS,
    Acl,
    admin_acls,
    bridge_acls,
    hash_password,
)

PLUGIN_PATHS = (
    "/usr/lib/x86_64-linux-gnu/mosquitto_dynamic_security.so",
    "/usr/lib/aarch64-linux-gnu/mosquitto_dynamic_security.so",
    "/usr/lib/mosquitto_dynamic_security.so",
    "/usr/local/lib/mosquitto_dynamic_security.so",
)


def find_plugin(candidates: Iterable[str] = PLUGIN_PATHS) -> str:
    """The plugin's shared library on this machine (Debian, Alpine and source installs)."""
    for path in candidates:
        if Path(path).is_file():
            return path
    raise FileNotFoundError(
        "mosquitto_dynamic_security.so not found (install mosquitto 2.x); looked in "
        + ", ".join(candidates)
    )


# --- the configuration file -----------------------------------------------------------------


@dataclass(frozen=True)
class BackendUser:
    username: str
    password: str
    role: str
    acls: tuple[Acl, ...]
    text: str


def backend_users(admin_password: str, bridge_password: str) -> list[BackendUser]:
    return [
        BackendUser(
            ADMIN_USERNAME,
            admin_password,
            ADMIN_ROLE,
            tuple(admin_acls()),
            "auth projector: keeps device clients in step with device events",
        ),
        BackendUser(
            BRIDGE_USERNAME,
            bridge_password,
            BRIDGE_ROLE,
            tuple(bridge_acls()),
            "MQTT <-> JetStream bridge",
        ),
    ]


def _role_json(user: BackendUser) -> dict[str, Any]:
    return {
        "rolename": user.role,
        "textdescription": user.text,
        "acls": [acl.as_json() for acl in user.acls],
    }


def _client_json(user: BackendUser) -> dict[str, Any]:
    return {
        "username": user.username,
        "textdescription": user.text,
        **hash_password(user.password),
        "roles": [{"rolename": user.role, "priority": 0}],
    }


def initial_config(users: Sequence[BackendUser]) -> dict[str, Any]:
    """A fresh plugin file: the backend's users and roles, everything else denied."""
    return merge_config({}, users)


def merge_config(existing: Mapping[str, Any], users: Sequence[BackendUser]) -> dict[str, Any]:
    """`existing` (devices and all) with the backend's users, roles and the default access set
    to these values (passwords rehashed, ACLs replaced); nothing else is touched."""
    names = {u.username for u in users}
    roles = {u.role for u in users}
    clients = [c for c in existing.get("clients", []) if c.get("username") not in names]
    kept_roles = [r for r in existing.get("roles", []) if r.get("rolename") not in roles]
    config = dict(existing)
    config["clients"] = [_client_json(u) for u in users] + clients
    config["roles"] = [_role_json(u) for u in users] + kept_roles
    config.setdefault("groups", [])
    config["defaultACLAccess"] = dict(DEFAULT_ACL_ACCESS)
    return config


def write_private(path: Path, text: str) -> None:
    """Replace `path` atomically with `text`, readable by its owner only (0600)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "w") as out:
            out.write(text)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def ensure_config_file(path: str | Path, users: Sequence[BackendUser]) -> None:
    """Create the plugin's file, or update the backend's users in it (keeping every device).
    Call it while the broker is stopped: the plugin reads the file only at start."""
    path = Path(path)
    existing: dict[str, Any] = {}
    if path.exists():
        try:
            existing = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON ({e}); fix or remove it") from e
        if not isinstance(existing, dict):
            raise ValueError(f"{path} is not a dynamic security configuration")
    write_private(path, json.dumps(merge_config(existing, users), indent=2) + "\n")
