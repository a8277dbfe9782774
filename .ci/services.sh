#!/usr/bin/env bash
# Ensure the local services the test suite needs are up on loopback.
#
#   bash .ci/services.sh      -> exit 0 when PostgreSQL (+ database "iot"),
#                                Redis, NATS+JetStream, Mosquitto and
#                                InfluxDB 1.x all answer; otherwise prints
#                                "CI: <service> is not reachable on <host:port> ..."
#                                to stderr and exits 1.
#   . .ci/services.sh         -> only defines the functions (ensure_services,
#                                print_service_versions, ...); nothing runs.
#
# Each service is checked first and started only if it does not answer, using
# the machine's own start command (there is no systemd here). Safe to rerun.
# Used by .ci/run and by the Makefile's `up` target.

SERVICES_WAIT_SECS="${SERVICES_WAIT_SECS:-30}"
INFLUXDB_CONF="${INFLUXDB_CONF:-/etc/influxdb/influxdb.conf}"
INFLUXDB_LOG="${INFLUXDB_LOG:-/var/log/influxdb/influxd-ci.log}"
_APT_UPDATED=""

_svc_log() { echo "services: $*" >&2; }

_svc_fail() { # service host:port [extra]
    echo "CI: $1 is not reachable on $2 after starting it${3:+ ($3)}" >&2
    return 1
}

# Run "$@" until it succeeds, at most SERVICES_WAIT_SECS seconds.
_svc_wait() {
    local deadline=$((SECONDS + SERVICES_WAIT_SECS))
    while ! "$@" >/dev/null 2>&1; do
        ((SECONDS >= deadline)) && return 1
        sleep 0.5
    done
}

_apt_install() {
    if [[ -z "$_APT_UPDATED" ]]; then
        _svc_log "apt-get update"
        apt-get -q -o DPkg::Lock::Timeout=120 update >/dev/null || return 1
        _APT_UPDATED=1
    fi
    _svc_log "apt-get install -y $*"
    DEBIAN_FRONTEND=noninteractive apt-get -q -y -o DPkg::Lock::Timeout=120 \
        install "$@" >/dev/null
}

# ---------------------------------------------------------------- PostgreSQL
_pg_up() { pg_isready -q -h 127.0.0.1 -p 5432; }

ensure_postgres() {
    if ! _pg_up; then
        local ver
        ver="$(ls /etc/postgresql 2>/dev/null | sort -V | tail -n 1)"
        _svc_log "starting PostgreSQL ${ver:-?}"
        pg_ctlcluster --skip-systemctl-redirect "$ver" main start >&2 || true
        _svc_wait _pg_up || { _svc_fail postgresql 127.0.0.1:5432; return 1; }
    fi
    local exists
    exists="$(psql -h 127.0.0.1 -p 5432 -U postgres -d postgres -tAc \
        "SELECT 1 FROM pg_database WHERE datname='iot'")" ||
        { _svc_fail postgresql 127.0.0.1:5432 "psql as postgres failed"; return 1; }
    if [[ "$exists" != "1" ]]; then
        _svc_log "creating database iot"
        createdb -h 127.0.0.1 -p 5432 -U postgres iot ||
            { echo "CI: could not create database iot on 127.0.0.1:5432" >&2; return 1; }
    fi
}

# --------------------------------------------------------------------- Redis
_redis_up() { [[ "$(redis-cli -h 127.0.0.1 -p 6379 ping 2>/dev/null)" == "PONG" ]]; }

ensure_redis() {
    _redis_up && return 0
    _svc_log "starting Redis"
    mkdir -p /var/lib/redis /var/log/redis
    redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" \
        --appendonly no --dir /var/lib/redis --logfile /var/log/redis/ci.log >&2 || true
    _svc_wait _redis_up || { _svc_fail redis 127.0.0.1:6379; return 1; }
}

# ---------------------------------------------------------- NATS + JetStream
# Prints the server's INFO line (NATS sends it as soon as a client connects).
_nats_info() {
    timeout 2 bash -c 'exec 3<>/dev/tcp/127.0.0.1/4222 && head -n 1 <&3' 2>/dev/null
}
_nats_up() { [[ "$(_nats_info)" == INFO* ]]; }
_nats_js() { _nats_info | grep -q '"jetstream":true'; }

ensure_nats() {
    if ! _nats_up; then
        _svc_log "starting NATS (JetStream)"
        mkdir -p /var/lib/nats-server
        start-stop-daemon --start --oknodo --background --exec /usr/sbin/nats-server -- \
            -a 127.0.0.1 -p 4222 -js -sd /var/lib/nats-server -l /var/log/nats-server.log >&2 || true
        _svc_wait _nats_up || { _svc_fail nats 127.0.0.1:4222; return 1; }
    fi
    if ! _svc_wait _nats_js; then
        echo "CI: nats is not reachable on 127.0.0.1:4222 with JetStream enabled (a server without -js holds the port)" >&2
        return 1
    fi
}

# ----------------------------------------------------------------- Mosquitto
_mqtt_version() {
    mosquitto_sub -h 127.0.0.1 -p 1883 -t '$SYS/broker/version' -C 1 -W 3 2>/dev/null
}
_mqtt_up() { [[ -n "$(_mqtt_version)" ]]; }

ensure_mosquitto() {
    # The tests and benchmarks need the clients, not just the broker.
    if ! command -v mosquitto_sub >/dev/null || ! command -v mosquitto_pub >/dev/null; then
        _apt_install mosquitto-clients ||
            { echo "CI: could not install mosquitto-clients (mosquitto_sub/mosquitto_pub)" >&2; return 1; }
    fi
    _mqtt_up && return 0
    _svc_log "starting Mosquitto"
    mkdir -p /run/mosquitto /var/log/mosquitto /var/lib/mosquitto
    chown mosquitto: /run/mosquitto /var/log/mosquitto /var/lib/mosquitto 2>/dev/null || true
    mosquitto -d -c /etc/mosquitto/mosquitto.conf >&2 || true
    _svc_wait _mqtt_up || { _svc_fail mosquitto 127.0.0.1:1883; return 1; }
}

# -------------------------------------------------------------- InfluxDB 1.x
_influx_up() {
    [[ "$(curl -s -o /dev/null -m 2 -w '%{http_code}' http://127.0.0.1:8086/ping 2>/dev/null)" == "204" ]]
}

ensure_influxdb() {
    if ! command -v influxd >/dev/null; then
        _apt_install influxdb ||
            { echo "CI: could not install influxdb (apt-get install influxdb failed)" >&2; return 1; }
    fi
    _influx_up && return 0
    _svc_log "starting InfluxDB ($(influxd version 2>/dev/null))"
    # Debian's package: config /etc/influxdb/influxdb.conf, data under
    # /var/lib/influxdb, owned by user influxdb. Run as that user, as the
    # package's own unit does. The environment pins the listeners to loopback
    # (the shipped config leaves HTTP on ":8086", all interfaces) without
    # editing the config file.
    local user=influxdb
    id -u "$user" >/dev/null 2>&1 || user=root
    mkdir -p /var/lib/influxdb "$(dirname "$INFLUXDB_LOG")"
    chown "$user" /var/lib/influxdb "$(dirname "$INFLUXDB_LOG")" 2>/dev/null || true
    local cfg=()
    [[ -f "$INFLUXDB_CONF" ]] && cfg=(-config "$INFLUXDB_CONF")
    INFLUXDB_HTTP_BIND_ADDRESS=127.0.0.1:8086 \
    INFLUXDB_BIND_ADDRESS=127.0.0.1:8088 \
    INFLUXDB_REPORTING_DISABLED=true \
        start-stop-daemon --start --oknodo --background --chuid "$user" \
            --output "$INFLUXDB_LOG" --exec "$(command -v influxd)" -- "${cfg[@]}" >&2 || true
    _svc_wait _influx_up || {
        tail -n 5 "$INFLUXDB_LOG" >&2 2>/dev/null || true
        _svc_fail influxdb 127.0.0.1:8086 "log: $INFLUXDB_LOG"
        return 1
    }
}

# ------------------------------------------------- test tools (Debian packages)
# kubectl renders the cluster manifests (tests/deploy); prometheus and promtool scrape a
# running system and check the alert rules (tests/e2e/test_observability.py); Alertmanager
# receives the analytics notifications (tests/integration/test_alertmanager.py). Debian's
# packages may start their services where systemd runs: the tests start their own.
ensure_test_tools() {
    if ! command -v kubectl >/dev/null; then
        _apt_install kubectl ||
            { echo "CI: could not install kubectl (apt-get install kubectl failed)" >&2; return 1; }
    fi
    if ! command -v promtool >/dev/null || ! command -v prometheus >/dev/null; then
        _apt_install prometheus ||
            { echo "CI: could not install prometheus (apt-get install prometheus failed)" >&2; return 1; }
        if command -v systemctl >/dev/null && [[ -d /run/systemd/system ]]; then
            systemctl disable --now prometheus prometheus-node-exporter >/dev/null 2>&1 || true
        fi
    fi
    if ! command -v prometheus-alertmanager >/dev/null; then
        _apt_install prometheus-alertmanager ||
            { echo "CI: could not install prometheus-alertmanager (apt-get install failed)" >&2; return 1; }
        if command -v systemctl >/dev/null && [[ -d /run/systemd/system ]]; then
            systemctl disable --now prometheus-alertmanager >/dev/null 2>&1 || true
        fi
    fi
    if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then
        _apt_install chromium chromium-driver ||
            { echo "CI: could not install chromium (apt-get install chromium chromium-driver failed)" >&2; return 1; }
    fi
    echo "kubectl: $(kubectl version --client 2>/dev/null | head -n 1)"
    echo "prometheus: $(prometheus --version 2>&1 | head -n 1)"
    echo "alertmanager: $(prometheus-alertmanager --version 2>&1 | head -n 1)"
    echo "chromium: $(chromium --version 2>/dev/null | head -n 1)"
}

# ------------------------------------------------------------------ versions
print_service_versions() {
    local v
    v="$(psql -h 127.0.0.1 -U postgres -d postgres -tAc 'SHOW server_version' 2>/dev/null)" || v=""
    echo "postgresql: ${v:-unknown} (127.0.0.1:5432, database iot)"
    v="$(redis-cli -h 127.0.0.1 -p 6379 INFO server 2>/dev/null | tr -d '\r' | sed -n 's/^redis_version://p')" || v=""
    echo "redis: ${v:-unknown} (127.0.0.1:6379)"
    v="$(_nats_info | sed -n 's/.*"version":"\([^"]*\)".*/\1/p')" || v=""
    echo "nats-server: ${v:-unknown} (127.0.0.1:4222, jetstream on)"
    v="$(_mqtt_version)" || v=""
    echo "mosquitto: ${v:-unknown} (127.0.0.1:1883)"
    v="$(curl -s -D - -o /dev/null -m 2 http://127.0.0.1:8086/ping 2>/dev/null | tr -d '\r' |
        sed -n 's/^[Xx]-[Ii]nfluxdb-[Vv]ersion: *//p')" || v=""
    echo "influxdb: ${v:-unknown} (127.0.0.1:8086)"
}

ensure_services() {
    ensure_postgres && ensure_redis && ensure_nats && ensure_mosquitto && ensure_influxdb
}

if [[ "${BASH_SOURCE[0]}" == "$0" ]]; then
    set -euo pipefail
    ensure_services || exit 1
    print_service_versions
    ensure_test_tools || exit 1
fi
