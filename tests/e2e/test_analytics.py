"""The analytics service as real processes (with the relay) on real PostgreSQL and JetStream:
each condition raises and clears at the right device time; kill -9 mid-duration and mid-burst,
with one or two replicas, ends with exactly the transitions of an undisturbed evaluation, each
once; `iot replay analytics` after wiping its state appends nothing."""

from __future__ import annotations

import asyncio
import json
import random
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import nats
import psycopg
import pytest

from analytics.catalog import Catalog
from analytics.engine import Decision, Engine, Partition
from domain.device import Device, device_uuid
from domain.ingest import Reading, Telemetry, encode_ingest
from domain.published import DeviceRegistered, RuleCreated
from domain.rules import Rule, spec_to_dict, validate_rule
from infra.eventstore import DeviceStore
from infra.settings import Settings
from infra.streams import Streams
from tests.e2e.pipeline import OPERATOR, wait_until
from tests.e2e.processes import Component, component_env, free_port
from tests.integration.test_alertmanager import Alertmanager

pytestmark = pytest.mark.e2e

PARTITIONS = "8"
T0 = 1_767_225_600_000  # device time of the first reading
S = 1000
RULES: dict[str, dict[str, Any]] = {
    "hot": {
        "name": "Hot",
        "metric": "temperature",
        "severity": "critical",
        "condition": {"kind": "threshold", "op": ">", "value": 80, "clear": 75, "for_s": 5},
    },
    "jump": {
        "name": "Jump",
        "metric": "pressure",
        "severity": "warning",
        "condition": {"kind": "rate", "max_per_s": 3},
    },
}


def register(store: DeviceStore, device_ids: list[str]) -> None:
    for device_id in device_ids:
        device = Device.register(device_id, device_id, "boiler", {"site": "north"}, "h", _now())
        store.save_device(device)


def create_rules(store: DeviceStore, rules: dict[str, dict[str, Any]]) -> None:
    for rule_id, spec in rules.items():
        store.save(Rule.create(rule_id, validate_rule(spec), _now()))


def _now() -> datetime:
    return datetime.now(UTC)


def workload(devices: int, readings: int, seed: int = 7) -> list[Telemetry]:
    """Readings for `devices` boilers, one second apart in device time, 1-3 readings per
    message: temperatures that wander across the hot rule's levels (oscillating between clear
    and value, breaches held and interrupted) and pressures that now and then jump. The
    devices' messages interleave at random; each device's stay in order."""
    rnd = random.Random(seed)
    per_device: list[list[Telemetry]] = []
    for d in range(devices):
        temp, pressure, ts, left = 70.0, 10.0, T0, readings
        mine = []
        while left:
            batch = []
            for _ in range(min(left, rnd.randint(1, 3))):
                temp = min(95.0, max(60.0, temp + rnd.choice([-6, -3, 0, 3, 6])))
                pressure += rnd.choice([0.5, -0.5, 0.0, 5.0, -5.0])
                batch.append(Reading(ts, {"temperature": temp, "pressure": pressure}))
                ts += S
            mine.append(Telemetry(device_id=f"b-{d:02d}", received_at=ts, readings=batch))
            left -= len(batch)
        per_device.append(mine[::-1])
    merged: list[Telemetry] = []
    while per_device:
        queue = rnd.choice(per_device)
        merged.append(queue.pop())
        if not queue:
            per_device.remove(queue)
    return merged


def expected(messages: list[Telemetry], rules: dict[str, dict[str, Any]]) -> list[tuple[Any, ...]]:
    """The transitions of one undisturbed evaluation (the engine in this process)."""
    catalog = Catalog()
    seq = 0
    for rule_id, spec in rules.items():
        seq += 1
        catalog.apply(
            seq,
            0,
            RuleCreated(
                rule_id=rule_id,
                version=1,
                at=_now(),
                position=seq,
                spec=spec_to_dict(validate_rule(spec)),
            ),
        )
    for device_id in sorted({m.device_id for m in messages}):
        seq += 1
        catalog.apply(
            seq,
            0,
            DeviceRegistered(
                device_id=device_id,
                version=1,
                at=_now(),
                position=seq,
                name=device_id,
                type="boiler",
                labels={"site": "north"},
            ),
        )
    engine = Engine(catalog, 1)
    engine.hold(Partition(0))
    out: list[Decision] = []
    for i, message in enumerate(messages, start=1):
        engine.evaluate(i, T0 + i, message, out)
    return sorted(_key(d.kind, d.device_id, d.rule_id, d.at_ms, d.value) for d in out)


def _key(kind: str, device_id: str, rule_id: str, at_ms: int, value: Any) -> tuple[Any, ...]:
    return (device_id, at_ms, rule_id, kind, value)


KINDS = {
    "AlertRaised": "raised",
    "AlertRetriggered": "retriggered",
    "AlertCleared": "cleared",
}


def stored_transitions(store: DeviceStore, device_ids: list[str]) -> list[tuple[Any, ...]]:
    """Every alert transition in the event store (acknowledgements aside)."""
    out = []
    for device_id in device_ids:
        rules_of: dict[str, str] = {}
        for event in store.events.get(device_uuid(device_id)):
            kind = KINDS.get(type(event).__name__)
            if kind is None:
                continue
            e: Any = event
            if kind == "raised":
                rules_of[e.alert_id] = e.rule_id
            out.append(_key(kind, device_id, rules_of[e.alert_id], e.at_ms, e.value))
    return sorted(out)


async def _publish(settings: Settings, messages: list[Telemetry]) -> int:
    """Publish as the bridge does; returns the INGEST stream's last sequence."""
    streams = Streams(settings.namespace)
    nc = await nats.connect(settings.nats_url)
    try:
        js = nc.jetstream()
        futures = []
        for message in messages:
            first = message.readings[0].ts
            futures.append(
                await js.publish_async(
                    streams.ingest_subject("telemetry", message.device_id),
                    encode_ingest(message),
                    headers={"Nats-Msg-Id": f"{message.device_id}:{first}"},
                )
            )
        acks = await asyncio.gather(*futures)
        return int(max(a.seq for a in acks))
    finally:
        await nc.close()


def publish(settings: Settings, messages: list[Telemetry]) -> int:
    return asyncio.run(_publish(settings, messages))


def evaluated_up_to(settings: Settings) -> int:
    """The INGEST sequence every partition's checkpoint has reached (0 before all exist)."""
    pg = settings.postgres
    with psycopg.connect(**pg.connect_kwargs(), autocommit=True) as conn:
        rows = conn.execute(
            f'SELECT count(*), min(ingest_seq) FROM "{settings.pg_schema}".analytics_checkpoints'
        ).fetchone()
    assert rows is not None
    return int(rows[1]) if rows[0] == int(PARTITIONS) else 0


def wait_evaluated(settings: Settings, seq: int, timeout: float = 90.0) -> None:
    assert wait_until(lambda: evaluated_up_to(settings) >= seq, timeout=timeout), (
        f"analytics did not reach INGEST sequence {seq} (at {evaluated_up_to(settings)})"
    )


def analytics(settings: Settings) -> Component:
    return Component(settings, "analytics", IOT_ANALYTICS_PARTITIONS=PARTITIONS)


@pytest.fixture
def relay(migrated: Settings) -> Iterator[Component]:
    component = Component(migrated, "relay")
    component.wait_ready()
    yield component
    component.stop()


@pytest.fixture
def boilers(migrated: Settings, store: DeviceStore, relay: Component) -> list[str]:
    del relay
    device_ids = [f"b-{d:02d}" for d in range(12)]
    register(store, device_ids)
    create_rules(store, RULES)
    return device_ids


def test_an_undisturbed_run_appends_exactly_the_transitions_of_the_evaluation(
    migrated: Settings, store: DeviceStore, boilers: list[str]
) -> None:
    messages = workload(len(boilers), 120)
    want = expected(messages, RULES)
    assert {k[3] for k in want} == {"raised", "retriggered", "cleared"}  # the workload is rich
    service = analytics(migrated)
    try:
        service.wait_ready(30)
        wait_evaluated(migrated, publish(migrated, messages))
        assert stored_transitions(store, boilers) == want
    finally:
        service.stop()


def _tested(rule_id: str, result: dict[str, Any]) -> list[tuple[Any, ...]]:
    """A rule test's answer as transition keys (re-triggers as a count on the raise)."""
    out: list[tuple[Any, ...]] = []
    for a in result["alerts"]:
        out.append((a["device_id"], a["raised_at"], rule_id, "raised", a["value"], a["retriggers"]))
        if a["cleared_at"] is not None:
            out.append((a["device_id"], a["cleared_at"], rule_id, "cleared", a["cleared_value"]))
    return sorted(out)


def _as_tested(rule_id: str, transitions: list[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
    """Stored transitions of one rule in the same shape."""
    out: list[list[Any]] = []
    open_at: dict[str, int] = {}
    for device_id, at_ms, rid, kind, value in sorted(transitions):
        if rid != rule_id:
            continue
        if kind == "raised":
            open_at[device_id] = len(out)
            out.append([device_id, at_ms, rid, kind, value, 0])
        elif kind == "retriggered":
            out[open_at[device_id]][5] += 1
        else:
            out.append([device_id, at_ms, rid, kind, value])
    return sorted(tuple(t) for t in out)


def test_a_rule_test_of_a_saved_rule_answers_with_the_alerts_it_raised_and_raises_none(
    migrated: Settings, store: DeviceStore, boilers: list[str], tmp_path: Path
) -> None:
    messages = workload(len(boilers), 120, seed=3)
    service = analytics(migrated)
    try:
        service.wait_ready(30)
        wait_evaluated(migrated, publish(migrated, messages))
        stored = stored_transitions(store, boilers)
        before = store.max_position()
        since = {"since": "1h"}  # of log time: everything published above
        for rule_id, spec in RULES.items():
            want = _as_tested(rule_id, stored)
            assert want, rule_id  # the workload raises every rule
            answer = httpx.post(
                f"{service.url}/api/v1/rules/test",
                json={"rule": spec, **since},
                headers=OPERATOR,
                timeout=60,
            )
            assert answer.status_code == 200, answer.text
            result = answer.json()
            assert result["messages"] == len(messages)
            assert _tested(rule_id, result) == want
            draft = tmp_path / f"{rule_id}.json"
            draft.write_text(json.dumps(spec))
            cli = subprocess.run(
                [sys.executable, "-m", "iot.cli", "rules", "test", str(draft), "--since", "1h",
                 "--json"],
                env=component_env(migrated, free_port()),
                check=False,
                capture_output=True,
                text=True,
                timeout=120,
            )  # fmt: skip
            assert cli.returncode == 0, cli.stderr
            assert _tested(rule_id, json.loads(cli.stdout)) == want
        assert store.max_position() == before  # nothing appended
        bad = httpx.post(
            f"{service.url}/api/v1/rules/test",
            json={"rule": {**RULES["hot"], "condition": {"kind": "nope"}}, "since": "1h"},
            headers=OPERATOR,
        )
        assert bad.status_code == 422
        assert bad.headers["content-type"].startswith("application/problem+json")
        assert bad.json()["errors"][0]["field"].startswith("rule.condition")
        viewer = httpx.post(
            f"{service.url}/api/v1/rules/test",
            json={"rule": RULES["hot"]},
            headers={"Authorization": "Bearer viewer-token-0123456789"},
        )
        assert viewer.status_code == 403
    finally:
        service.stop()


def test_kill_9_mid_burst_and_mid_duration_ends_with_each_transition_exactly_once(
    migrated: Settings, store: DeviceStore, boilers: list[str]
) -> None:
    messages = workload(len(boilers), 1000, seed=11)
    want = expected(messages, RULES)
    half = len(messages) // 2
    last = publish(migrated, messages[:half])  # a backlog of some 3,000 messages
    service = analytics(migrated)
    # mid-burst: killed as soon as it has appended transitions, then again while it goes on
    assert wait_until(lambda: stored_transitions(store, boilers), timeout=60, interval=0.01)
    service.kill()
    for pause in (0.3, 0.6):
        service = analytics(migrated)
        service.wait_ready(30)
        time.sleep(pause)
        service.kill()
    service = analytics(migrated)
    service.wait_ready(30)
    wait_evaluated(migrated, last)  # now mid-duration: held breaches wait for more readings
    service.kill()
    service = analytics(migrated)
    try:
        service.wait_ready(30)
        wait_evaluated(migrated, publish(migrated, messages[half:]))
        assert stored_transitions(store, boilers) == want
    finally:
        service.stop()


ODD: dict[str, dict[str, Any]] = {
    "odd": {
        "name": "Odd pressure",
        "metric": "pressure",
        "severity": "warning",
        "condition": {"kind": "anomaly", "sensitivity": 0.6},
    },
}


def relayed(relay: Component) -> int:
    """The event-store position the relay has published (its `iot_relay_position` gauge)."""
    for line in httpx.get(f"{relay.url}/metrics", timeout=5).text.splitlines():
        if line.startswith("iot_relay_position "):
            return int(float(line.split()[1]))
    return 0


def test_kill_9_mid_stream_gives_the_anomaly_alerts_of_an_undisturbed_run(
    migrated: Settings, store: DeviceStore, boilers: list[str], relay: Component
) -> None:
    """The detector's state is checkpointed with the partition: killed and restarted mid-stream,
    the anomaly rule raises and clears exactly what one undisturbed evaluation does."""
    create_rules(store, ODD)
    head = store.max_position()
    assert wait_until(lambda: relayed(relay) >= head, timeout=30)  # the rule is on the log
    rules = {**RULES, **ODD}
    messages = workload(len(boilers), 1000, seed=11)
    want = expected(messages, rules)
    odd = [k for k in want if k[2] == "odd"]
    assert {k[3] for k in odd} >= {"raised", "cleared"}, odd  # the detector has work to do
    third = len(messages) // 3
    service = analytics(migrated)
    service.wait_ready(30)
    last = publish(migrated, messages[:third])
    assert wait_until(lambda: evaluated_up_to(migrated) > 0, timeout=60, interval=0.01)
    service.kill()  # mid-stream: some partitions checkpointed, the rest not yet
    service = analytics(migrated)
    service.wait_ready(30)
    last = publish(migrated, messages[third : 2 * third])
    time.sleep(0.3)
    service.kill()
    service = analytics(migrated)
    try:
        service.wait_ready(30)
        wait_evaluated(migrated, last)
        wait_evaluated(migrated, publish(migrated, messages[2 * third :]))
        assert stored_transitions(store, boilers) == want
    finally:
        service.stop()


def test_two_replicas_share_the_partitions_and_one_killed_hands_its_devices_over(
    migrated: Settings, store: DeviceStore, boilers: list[str]
) -> None:
    messages = workload(len(boilers), 300, seed=23)
    want = expected(messages, RULES)
    first, second = analytics(migrated), analytics(migrated)
    try:
        first.wait_ready(30)
        second.wait_ready(30)
        assert wait_until(lambda: _owned(first) > 0 and _owned(second) > 0, timeout=30)
        assert _owned(first) + _owned(second) == int(PARTITIONS)
        last = publish(migrated, messages[: len(messages) // 2])
        assert wait_until(lambda: stored_transitions(store, boilers), timeout=60)
        first.kill()  # its partitions go to the survivor
        assert wait_until(lambda: _owned(second) == int(PARTITIONS), timeout=30)
        wait_evaluated(migrated, last)
        wait_evaluated(migrated, publish(migrated, messages[len(messages) // 2 :]))
        assert stored_transitions(store, boilers) == want
    finally:
        first.stop()
        second.stop()


def test_replay_after_wiping_the_state_gives_the_same_alerts_and_appends_nothing(
    migrated: Settings, store: DeviceStore, boilers: list[str]
) -> None:
    messages = workload(len(boilers), 120, seed=5)
    want = expected(messages, RULES)
    service = analytics(migrated)
    try:
        service.wait_ready(30)
        last = publish(migrated, messages)
        wait_evaluated(migrated, last)
        assert stored_transitions(store, boilers) == want
        before = store.max_position()
        done = subprocess.run(
            [sys.executable, "-m", "iot.cli", "replay", "analytics"],
            check=False,
            env=component_env(migrated, free_port(), IOT_ANALYTICS_PARTITIONS=PARTITIONS),
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 0, done.stdout + done.stderr
        assert "0 transitions appended" in done.stdout, done.stdout
        assert store.max_position() == before  # nothing new in the event store
        wait_evaluated(migrated, last)  # the live service took its partitions back
        assert stored_transitions(store, boilers) == want
    finally:
        service.stop()


def _owned(component: Component) -> int:
    try:
        text = httpx.get(f"{component.url}/metrics", timeout=2).text
    except httpx.HTTPError:
        return -1
    for line in text.splitlines():
        if line.startswith("iot_analytics_partitions_owned "):
            return int(float(line.split()[1]))
    return -1


def _now_ms() -> int:
    return int(time.time() * 1000)


def _alert_events(store: DeviceStore, device_id: str) -> list[str]:
    return [
        type(e).__name__
        for e in store.events.get(device_uuid(device_id))
        if type(e).__name__.startswith("Alert")
    ]


def _am_alerts(url: str, device_id: str, **params: str) -> list[dict[str, Any]]:
    response = httpx.get(
        f"{url}/api/v2/alerts", params={"filter": f'device="{device_id}"', **params}, timeout=2
    )
    response.raise_for_status()
    found: list[dict[str, Any]] = response.json()
    return found


def test_raise_acknowledge_clear_in_order_in_the_history_and_in_alertmanager(
    migrated: Settings, store: DeviceStore, relay: Component, tmp_path: Path
) -> None:
    del relay
    register(store, ["b-00"])
    create_rules(store, {"hot": {**RULES["hot"], "condition": {**HOT_NOW}}})
    am = Alertmanager(tmp_path)
    am.start()
    commands = Component(migrated, "commands")
    service = Component(
        migrated,
        "analytics",
        IOT_ANALYTICS_PARTITIONS=PARTITIONS,
        IOT_ALERTMANAGER_URL=am.url,
        IOT_GATEWAY_URL="http://gateway.example:8082",
    )
    try:
        commands.wait_ready()
        service.wait_ready(30)
        now = _now_ms()
        publish(migrated, [_one("b-00", now, temperature=91.0)])
        assert wait_until(lambda: _alert_events(store, "b-00") == ["AlertRaised"], timeout=30)
        firing = wait_until(lambda: _am_alerts(am.url, "b-00"), timeout=30)
        labels = firing[0]["labels"]
        assert (labels["rule"], labels["severity"], labels["type"]) == ("hot", "critical", "boiler")
        assert labels["site"] == "north"
        assert firing[0]["annotations"]["value"] == "91"
        alert_id = f"b-00.hot.{now}"
        answer = httpx.post(
            f"{commands.url}/api/v1/alerts/{alert_id}/acknowledge",
            json={"note": "on my way"},
            headers=OPERATOR,
            timeout=10,
        )
        assert answer.status_code == 200, answer.text
        publish(migrated, [_one("b-00", now + 1000, temperature=70.0)])
        assert wait_until(
            lambda: (
                _alert_events(store, "b-00") == ["AlertRaised", "AlertAcknowledged", "AlertCleared"]
            ),
            timeout=30,
        ), _alert_events(store, "b-00")
        assert wait_until(lambda: not _am_alerts(am.url, "b-00", active="true"), timeout=30)
    finally:
        service.stop()
        commands.stop()
        am.close()


def test_a_silent_device_raises_absent_on_the_wall_clock_and_clears_when_it_speaks(
    migrated: Settings, store: DeviceStore, relay: Component
) -> None:
    del relay
    register(store, ["b-00"])
    silent = {
        "name": "Silent",
        "metric": "*",
        "severity": "warning",
        "condition": {"kind": "absent", "for_s": 2},
    }
    create_rules(store, {"silent": silent})
    service = analytics(migrated)
    try:
        service.wait_ready(30)
        first = _now_ms()
        publish(migrated, [_one("b-00", first, temperature=20.0)])
        assert wait_until(lambda: _alert_events(store, "b-00") == ["AlertRaised"], timeout=30)
        device = store.get("b-00")
        assert device is not None
        (alert,) = device.alert_states().values()
        assert alert.raised_at_ms == first + 2000  # due time, in device time
        assert alert.raised_value is None
        publish(migrated, [_one("b-00", _now_ms(), temperature=20.0)])
        assert wait_until(
            lambda: _alert_events(store, "b-00") == ["AlertRaised", "AlertCleared"], timeout=30
        )
    finally:
        service.stop()


HOT_NOW = {"kind": "threshold", "op": ">", "value": 80, "clear": 75}


def _one(device_id: str, ts: int, **values: float) -> Telemetry:
    return Telemetry(device_id=device_id, received_at=ts, readings=[Reading(ts, dict(values))])
