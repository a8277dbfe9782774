"""Settings: one frozen struct loaded from the environment, failing fast with a clear message."""

from __future__ import annotations

import os
import re
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote, urlsplit

from infra.timefmt import parse_duration

ROLES = ("viewer", "operator", "admin")
_NAMESPACE = re.compile(r"^[a-z][a-z0-9_]{0,30}$")
GIB = 1024**3
DEADLETTER_MAX_AGE_MS = 14 * 86_400_000


class SettingsError(Exception):
    """A setting is missing or malformed; the message names the variable."""


@dataclass(frozen=True)
class PostgresParams:
    host: str
    port: int
    user: str
    password: str
    dbname: str

    def connect_kwargs(self, dbname: str | None = None) -> dict[str, Any]:
        """psycopg's connection arguments (another database of the server with `dbname`)."""
        return {
            "host": self.host,
            "port": self.port,
            "user": self.user,
            "password": self.password,
            "dbname": dbname or self.dbname,
        }


@dataclass(frozen=True)
class Settings:
    database_url: str
    nats_url: str
    mqtt_url: str
    redis_url: str
    influx_url: str
    influx_db: str
    api_tokens: Mapping[str, str] = field(default_factory=dict)
    api_token_names: Mapping[str, str] = field(default_factory=dict)
    namespace: str = ""
    http_port: int | None = None
    http_host: str = "127.0.0.1"
    log_level: str = "INFO"
    db_pool_size: int = 16
    store_threads: int = 32
    commands_max_requests: int = 64  # IOT_COMMANDS_MAX_REQUESTS: the API's admission limit
    aggregate_cache: int = 4096
    mqtt_client_id: str = ""
    mqtt_username: str = ""
    mqtt_password: str = ""
    auth_mqtt_username: str = ""  # `iot up --external-broker`: the auth projector's login
    auth_mqtt_password: str = ""
    bridge_inflight: int = 1000
    bridge_subscription: str = "shared"  # IOT_BRIDGE_SUBSCRIPTION: shared | exclusive
    rate_limit_per_minute: int = 600
    alertmanager_url: str = ""  # empty: analytics sends no notifications
    gateway_public_url: str = ""  # the gateway as operators reach it, for links in alerts
    commands_public_url: str = ""  # IOT_COMMANDS_URL: the command API as browsers reach it
    cors_origins: tuple[str, ...] = ()  # IOT_CORS_ORIGINS: origins the command API admits
    analytics_partitions: int = 16
    retention_raw: str = "INF"  # InfluxDB retention of the raw telemetry (IOT_RETENTION_RAW)
    retention_1m: str = "90d"  # of the 1-minute rollups (IOT_RETENTION_1M)
    retention_1h: str = "1095d"  # of the 1-hour rollups (IOT_RETENTION_1H)
    deadletter_max_age_ms: int = DEADLETTER_MAX_AGE_MS  # IOT_DEADLETTER_MAX_AGE
    deadletter_max_bytes: int = GIB  # IOT_DEADLETTER_MAX_BYTES

    @property
    def mqtt(self) -> tuple[str, int, bool]:
        """Host, port and TLS of IOT_MQTT_URL."""
        parts = urlsplit(self.mqtt_url)
        tls = parts.scheme == "mqtts"
        return parts.hostname or "127.0.0.1", parts.port or (8883 if tls else 1883), tls

    @property
    def postgres(self) -> PostgresParams:
        return parse_postgres_url(self.database_url)

    @property
    def pg_schema(self) -> str:
        return self.namespace or "public"

    def port_for(self, default: int) -> int:
        return self.http_port if self.http_port is not None else default


def parse_postgres_url(url: str, variable: str = "IOT_DATABASE_URL") -> PostgresParams:
    parts = urlsplit(url)
    if parts.scheme not in ("postgresql", "postgres") or not parts.hostname:
        raise SettingsError(
            f"{variable} must look like postgresql://user@host:5432/db, got {url!r}"
        )
    dbname = parts.path.lstrip("/")
    if not dbname:
        raise SettingsError(f"{variable} must name a database, got {url!r}")
    try:
        port = 5432 if parts.port is None else parts.port
    except ValueError as e:
        raise SettingsError(f"{variable} has an invalid port: {url!r}") from e
    if port == 0:
        raise SettingsError(f"{variable} has an invalid port: {url!r}")
    return PostgresParams(
        host=parts.hostname,
        port=port,
        user=unquote(parts.username or "postgres"),
        password=unquote(parts.password or ""),
        dbname=dbname,
    )


def parse_tokens(raw: str, variable: str = "IOT_API_TOKENS") -> dict[str, str]:
    """`token=role` or `token=role:name` pairs -> {token: role} (names: `parse_token_names`)."""
    tokens: dict[str, str] = {}
    for pair in filter(None, (p.strip() for p in raw.split(","))):
        token, sep, role = pair.partition("=")
        role = role.partition(":")[0]
        if not sep or not token or role not in ROLES:
            raise SettingsError(
                f"{variable} must be comma-separated token=role pairs with role in "
                f"{', '.join(ROLES)}; bad entry {pair.split('=')[0][:4]}...={role!r}"
            )
        if len(token) < 16:
            raise SettingsError(f"{variable}: every token must be at least 16 characters")
        tokens[token] = role
    return tokens


def parse_token_names(raw: str) -> dict[str, str]:
    """{token: name} of the `token=role:name` pairs that name their token (parse_tokens checks
    the pairs). The name is who caused an event in a device's history, never the token."""
    names: dict[str, str] = {}
    for pair in filter(None, (p.strip() for p in raw.split(","))):
        token, _, role = pair.partition("=")
        name = role.partition(":")[2].strip()
        if name:
            names[token] = name
    return names


def _url(env: Mapping[str, str], name: str, default: str, schemes: tuple[str, ...]) -> str:
    value = env.get(name) or default
    parts = urlsplit(value)
    if parts.scheme not in schemes or not parts.hostname:
        raise SettingsError(f"{name} must be a {'/'.join(schemes)}:// URL, got {value!r}")
    try:
        port = parts.port
    except ValueError as e:
        raise SettingsError(f"{name} has an invalid port: {value!r}") from e
    if port == 0:
        raise SettingsError(f"{name} has an invalid port: {value!r}")
    return value


def _int(env: Mapping[str, str], name: str, default: int | None, lo: int, hi: int) -> int | None:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError as e:
        raise SettingsError(f"{name} must be an integer, got {raw!r}") from e
    if not lo <= value <= hi:
        raise SettingsError(f"{name} must be between {lo} and {hi}, got {value}")
    return value


def load(env: Mapping[str, str] | None = None, *, require_tokens: bool = False) -> Settings:
    """Read settings from the environment; raise SettingsError naming the bad variable."""
    env = os.environ if env is None else env
    namespace = env.get("IOT_NAMESPACE", "")
    if namespace and not _NAMESPACE.fullmatch(namespace):
        raise SettingsError(
            f"IOT_NAMESPACE must match {_NAMESPACE.pattern} (it names a schema and stream prefix), "
            f"got {namespace!r}"
        )
    database_url = env.get("IOT_DATABASE_URL") or "postgresql://postgres@127.0.0.1:5432/iot"
    parse_postgres_url(database_url)
    tokens = parse_tokens(env.get("IOT_API_TOKENS", ""))
    if require_tokens and not tokens:
        raise SettingsError(
            "IOT_API_TOKENS is not set: give comma-separated token=role pairs "
            "(roles: viewer, operator, admin)"
        )
    influx_db = env.get("IOT_INFLUX_DB") or "iot"
    if not re.fullmatch(r"[A-Za-z0-9_]{1,64}", influx_db):
        raise SettingsError(f"IOT_INFLUX_DB must match [A-Za-z0-9_]{{1,64}}, got {influx_db!r}")
    log_level = (env.get("IOT_LOG_LEVEL") or "INFO").upper()
    if log_level not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        raise SettingsError(
            f"IOT_LOG_LEVEL must be DEBUG, INFO, WARNING or ERROR, got {log_level!r}"
        )
    subscription = (env.get("IOT_BRIDGE_SUBSCRIPTION") or "shared").lower()
    if subscription not in ("shared", "exclusive"):
        raise SettingsError(
            f"IOT_BRIDGE_SUBSCRIPTION must be shared or exclusive, got {subscription!r}"
        )
    return Settings(
        database_url=database_url,
        nats_url=_url(env, "IOT_NATS_URL", "nats://127.0.0.1:4222", ("nats", "tls")),
        mqtt_url=_url(env, "IOT_MQTT_URL", "mqtt://127.0.0.1:1883", ("mqtt", "mqtts")),
        redis_url=_url(env, "IOT_REDIS_URL", "redis://127.0.0.1:6379/0", ("redis", "rediss")),
        influx_url=_url(env, "IOT_INFLUX_URL", "http://127.0.0.1:8086", ("http", "https")),
        influx_db=influx_db,
        api_tokens=tokens,
        api_token_names=parse_token_names(env.get("IOT_API_TOKENS", "")),
        namespace=namespace,
        http_port=_int(env, "IOT_HTTP_PORT", None, 1, 65535),
        http_host=env.get("IOT_HTTP_HOST") or "127.0.0.1",
        log_level=log_level,
        db_pool_size=_int(env, "IOT_DB_POOL_SIZE", 16, 1, 200) or 16,
        store_threads=_int(env, "IOT_STORE_THREADS", 32, 1, 256) or 32,
        commands_max_requests=_int(env, "IOT_COMMANDS_MAX_REQUESTS", 64, 1, 100_000) or 64,
        aggregate_cache=_int(env, "IOT_AGGREGATE_CACHE", 4096, 0, 1_000_000) or 0,
        mqtt_client_id=env.get("IOT_MQTT_CLIENT_ID") or f"iot-bridge-{socket.gethostname()}",
        mqtt_username=env.get("IOT_MQTT_USERNAME", ""),
        mqtt_password=env.get("IOT_MQTT_PASSWORD", ""),
        auth_mqtt_username=env.get("IOT_AUTH_MQTT_USERNAME", ""),
        auth_mqtt_password=env.get("IOT_AUTH_MQTT_PASSWORD", ""),
        bridge_inflight=_int(env, "IOT_BRIDGE_INFLIGHT", 1000, 1, 65535) or 1000,
        bridge_subscription=subscription,
        rate_limit_per_minute=_int(env, "IOT_RATE_LIMIT_PER_MINUTE", 600, 1, 10_000_000) or 600,
        alertmanager_url=_optional_url(env, "IOT_ALERTMANAGER_URL"),
        gateway_public_url=_optional_url(env, "IOT_GATEWAY_URL"),
        commands_public_url=_optional_url(env, "IOT_COMMANDS_URL"),
        cors_origins=_origins(env, "IOT_CORS_ORIGINS"),
        analytics_partitions=_int(env, "IOT_ANALYTICS_PARTITIONS", 16, 1, 1024) or 16,
        retention_raw=_retention(env, "IOT_RETENTION_RAW", "INF"),
        retention_1m=_retention(env, "IOT_RETENTION_1M", "90d"),
        retention_1h=_retention(env, "IOT_RETENTION_1H", "1095d"),
        deadletter_max_age_ms=_duration(env, "IOT_DEADLETTER_MAX_AGE", DEADLETTER_MAX_AGE_MS),
        deadletter_max_bytes=_bytes(env, "IOT_DEADLETTER_MAX_BYTES", GIB),
    )


_ORIGIN = re.compile(
    r"^https?://[A-Za-z0-9.-]+(:[0-9]{1,5})?$|^https?://\[[0-9A-Fa-f:.]+\](:[0-9]{1,5})?$"
)


def _origins(env: Mapping[str, str], name: str) -> tuple[str, ...]:
    """Comma-separated browser origins (`scheme://host[:port]`, no path, no wildcard)."""
    origins = tuple(o.strip().rstrip("/") for o in env.get(name, "").split(",") if o.strip())
    for origin in origins:
        if not _ORIGIN.match(origin):
            raise SettingsError(
                f"{name}: each origin is scheme://host[:port] (http or https, no path), "
                f"got {origin!r}"
            )
    return origins


def _duration(env: Mapping[str, str], name: str, default_ms: int) -> int:
    """A duration such as `14d` or `36h` (units s, m, h, d, w), at least 1h, as milliseconds."""
    raw = (env.get(name) or "").strip()
    if not raw:
        return default_ms
    try:
        ms = parse_duration(raw)
    except ValueError as e:
        raise SettingsError(f"{name} must be {e}") from e
    if ms < 3_600_000:
        raise SettingsError(f"{name} must be at least 1h, got {raw!r}")
    return ms


_BYTES = re.compile(r"^([1-9][0-9]{0,15})\s*(B|KiB|MiB|GiB|TiB)?$")
_BYTE_UNITS = {"B": 1, "KiB": 1024, "MiB": 1024**2, "GiB": GIB, "TiB": 1024**4}
MIN_DEADLETTER_BYTES = 8 * 1024**2  # room for a few dead letters of the largest kind (~1 MiB)


def _bytes(env: Mapping[str, str], name: str, default: int) -> int:
    """A size in bytes, plain or with a unit (`512MiB`, `2GiB`), at least 8 MiB."""
    raw = (env.get(name) or "").strip()
    if not raw:
        return default
    found = _BYTES.fullmatch(raw)
    if not found:
        raise SettingsError(
            f"{name} must be a size in bytes such as 1073741824, 512MiB or 2GiB "
            f"(units B, KiB, MiB, GiB, TiB), got {raw!r}"
        )
    size = int(found.group(1)) * _BYTE_UNITS[found.group(2) or "B"]
    if not MIN_DEADLETTER_BYTES <= size <= 2**62:
        raise SettingsError(f"{name} must be between 8MiB and 4EiB, got {raw!r}")
    return size


_RETENTION = re.compile(r"(?:[0-9]{1,9}(?:m|h|d|w))+")
_RETENTION_UNITS = {"m": 1, "h": 60, "d": 1_440, "w": 10_080}


def _retention(env: Mapping[str, str], name: str, default: str) -> str:
    """An InfluxDB retention duration: `INF` (keep forever) or a literal such as `30d`, `12w`,
    `1d12h`, of at least 1h (InfluxDB's smallest retention)."""
    raw = (env.get(name) or default).strip()
    if raw.upper() == "INF":
        return "INF"
    if not _RETENTION.fullmatch(raw):
        raise SettingsError(
            f"{name} must be INF or an InfluxDB duration such as 30d, 12w or 1d12h "
            f"(units m, h, d, w), got {raw!r}"
        )
    minutes = sum(int(n) * _RETENTION_UNITS[u] for n, u in re.findall(r"([0-9]+)([mhdw])", raw))
    if minutes < 60:
        raise SettingsError(f"{name} must be at least 1h (InfluxDB's shortest), got {raw!r}")
    return raw


def _optional_url(env: Mapping[str, str], name: str) -> str:
    """An http(s) URL, or empty when the variable is unset or empty."""
    if not env.get(name):
        return ""
    return _url(env, name, "", ("http", "https"))
