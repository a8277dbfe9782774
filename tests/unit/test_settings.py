"""Settings come from the environment only, with one-machine defaults, and fail fast."""

from __future__ import annotations

import pytest

from infra.settings import PostgresParams, SettingsError, load, parse_postgres_url, parse_tokens

VIEWER = "viewer-token-0123456789"
OPERATOR = "operator-token-012345678"
ADMIN = "admin-token-0123456789ab"


def test_defaults_are_the_contracts_one_machine_services() -> None:
    settings = load({})

    assert settings.database_url == "postgresql://postgres@127.0.0.1:5432/iot"
    assert settings.nats_url == "nats://127.0.0.1:4222"
    assert settings.mqtt_url == "mqtt://127.0.0.1:1883"
    assert settings.redis_url == "redis://127.0.0.1:6379/0"
    assert settings.influx_url == "http://127.0.0.1:8086"
    assert settings.influx_db == "iot"
    assert dict(settings.api_tokens) == {}
    assert settings.namespace == ""
    assert settings.pg_schema == "public"
    assert settings.http_port is None
    assert settings.log_level == "INFO"


def test_default_database_url_parses_to_local_postgres() -> None:
    assert load({}).postgres == PostgresParams(
        host="127.0.0.1", port=5432, user="postgres", password="", dbname="iot"
    )


def test_empty_variables_fall_back_to_the_defaults() -> None:
    env = {
        "IOT_DATABASE_URL": "",
        "IOT_NATS_URL": "",
        "IOT_MQTT_URL": "",
        "IOT_REDIS_URL": "",
        "IOT_INFLUX_URL": "",
        "IOT_INFLUX_DB": "",
        "IOT_HTTP_PORT": "",
        "IOT_API_TOKENS": "",
    }

    assert load(env) == load({})


def test_each_variable_overrides_its_default() -> None:
    settings = load(
        {
            "IOT_DATABASE_URL": "postgresql://iot:p%40ss@db.example:6543/fleet",
            "IOT_NATS_URL": "tls://nats.example:4443",
            "IOT_MQTT_URL": "mqtts://broker.example:8883",
            "IOT_REDIS_URL": "rediss://cache.example:6380/2",
            "IOT_INFLUX_URL": "https://influx.example",
            "IOT_INFLUX_DB": "fleet_2026",
            "IOT_NAMESPACE": "t0a1b2c3d4e",
            "IOT_HTTP_PORT": "9000",
            "IOT_LOG_LEVEL": "debug",
        }
    )

    assert settings.postgres == PostgresParams(
        host="db.example", port=6543, user="iot", password="p@ss", dbname="fleet"
    )
    assert settings.nats_url == "tls://nats.example:4443"
    assert settings.mqtt_url == "mqtts://broker.example:8883"
    assert settings.redis_url == "rediss://cache.example:6380/2"
    assert settings.influx_url == "https://influx.example"
    assert settings.influx_db == "fleet_2026"
    assert settings.namespace == "t0a1b2c3d4e"
    assert settings.pg_schema == "t0a1b2c3d4e"
    assert settings.port_for(8080) == 9000
    assert settings.log_level == "DEBUG"


def test_component_port_is_its_default_unless_overridden() -> None:
    assert load({}).port_for(8082) == 8082
    assert load({"IOT_HTTP_PORT": "8090"}).port_for(8082) == 8090


def test_api_tokens_are_token_role_pairs() -> None:
    settings = load({"IOT_API_TOKENS": f" {VIEWER}=viewer , {OPERATOR}=operator,{ADMIN}=admin,"})

    assert dict(settings.api_tokens) == {VIEWER: "viewer", OPERATOR: "operator", ADMIN: "admin"}


def test_tokens_are_not_required_unless_asked() -> None:
    assert dict(load({}).api_tokens) == {}


def test_required_tokens_missing_is_an_error_naming_the_variable() -> None:
    with pytest.raises(SettingsError, match="IOT_API_TOKENS"):
        load({}, require_tokens=True)


def test_required_tokens_present_load() -> None:
    settings = load({"IOT_API_TOKENS": f"{ADMIN}=admin"}, require_tokens=True)

    assert dict(settings.api_tokens) == {ADMIN: "admin"}


BAD_SETTINGS = [
    ("IOT_DATABASE_URL", "mysql://127.0.0.1:3306/iot"),
    ("IOT_DATABASE_URL", "postgresql:///iot"),
    ("IOT_DATABASE_URL", "postgresql://127.0.0.1:5432"),
    ("IOT_DATABASE_URL", "postgresql://127.0.0.1:port/iot"),
    ("IOT_DATABASE_URL", "postgresql://127.0.0.1:70000/iot"),
    ("IOT_NATS_URL", "http://127.0.0.1:4222"),
    ("IOT_NATS_URL", "nats://127.0.0.1:99999"),
    ("IOT_NATS_URL", "127.0.0.1:4222"),
    ("IOT_MQTT_URL", "tcp://127.0.0.1:1883"),
    ("IOT_MQTT_URL", "mqtt://127.0.0.1:mqtt"),
    ("IOT_REDIS_URL", "redis://"),
    ("IOT_REDIS_URL", "memcached://127.0.0.1:11211"),
    ("IOT_INFLUX_URL", "influx://127.0.0.1:8086"),
    ("IOT_INFLUX_URL", "http://127.0.0.1:-1"),
    ("IOT_INFLUX_DB", "iot-db"),
    ("IOT_INFLUX_DB", "x" * 65),
    ("IOT_INFLUX_DB", "iot\n"),
    ("IOT_HTTP_PORT", "eighty"),
    ("IOT_HTTP_PORT", "0"),
    ("IOT_HTTP_PORT", "65536"),
    ("IOT_DB_POOL_SIZE", "0"),
    ("IOT_DB_POOL_SIZE", "many"),
    ("IOT_LOG_LEVEL", "verbose"),
    ("IOT_BRIDGE_SUBSCRIPTION", "both"),
    ("IOT_NAMESPACE", "Upper"),
    ("IOT_NAMESPACE", "1starts_with_digit"),
    ("IOT_NAMESPACE", "has-dash"),
    ("IOT_NAMESPACE", "n" * 32),
    ("IOT_NAMESPACE", "ns\n"),
    ("IOT_API_TOKENS", f"{ADMIN}=root"),
    ("IOT_API_TOKENS", f"{ADMIN}=Admin"),
    ("IOT_API_TOKENS", ADMIN),
    ("IOT_API_TOKENS", "=admin"),
    ("IOT_API_TOKENS", f"{VIEWER}=viewer,short=admin"),
    ("IOT_API_TOKENS", "fifteen-chars15=admin"),
]


@pytest.mark.parametrize(("variable", "value"), BAD_SETTINGS)
def test_bad_setting_is_an_error_whose_one_line_message_names_the_variable(
    variable: str, value: str
) -> None:
    with pytest.raises(SettingsError) as caught:
        load({variable: value})

    message = str(caught.value)
    assert variable in message
    assert "\n" not in message


@pytest.mark.parametrize(
    "raw", [f"{ADMIN}=root", f"{ADMIN}=Admin", ADMIN, f"{VIEWER}=viewer,short=admin"]
)
def test_token_errors_do_not_echo_the_token(raw: str) -> None:
    with pytest.raises(SettingsError) as caught:
        load({"IOT_API_TOKENS": raw})

    assert ADMIN not in str(caught.value)
    assert VIEWER not in str(caught.value)


def test_sixteen_character_token_is_long_enough() -> None:
    assert parse_tokens("sixteen-chars-16=viewer") == {"sixteen-chars-16": "viewer"}


def test_postgres_url_keeps_a_custom_variable_name_in_errors() -> None:
    with pytest.raises(SettingsError, match="MY_URL"):
        parse_postgres_url("nope", variable="MY_URL")


def test_postgres_url_without_user_or_port_uses_postgres_defaults() -> None:
    assert parse_postgres_url("postgres://db/iot") == PostgresParams(
        host="db", port=5432, user="postgres", password="", dbname="iot"
    )


def test_load_without_argument_reads_the_process_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("IOT_INFLUX_DB", "from_process_env")
    monkeypatch.setenv("IOT_NAMESPACE", "")

    assert load().influx_db == "from_process_env"


def test_the_bridge_subscription_is_shared_unless_told_exclusive() -> None:
    assert load({}).bridge_subscription == "shared"
    assert load({"IOT_BRIDGE_SUBSCRIPTION": "Exclusive"}).bridge_subscription == "exclusive"


def test_cors_origins_are_comma_separated_browser_origins() -> None:
    settings = load({"IOT_CORS_ORIGINS": " http://127.0.0.1:8082, https://api.example/ ,"})
    assert settings.cors_origins == ("http://127.0.0.1:8082", "https://api.example")
    assert load({}).cors_origins == ()


@pytest.mark.parametrize("origin", ["*", "http://a.example/path", "ftp://a.example", "a.example"])
def test_a_cors_origin_that_is_not_scheme_host_port_is_refused(origin: str) -> None:
    with pytest.raises(SettingsError, match="IOT_CORS_ORIGINS"):
        load({"IOT_CORS_ORIGINS": origin})
