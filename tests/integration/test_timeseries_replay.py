"""`iot replay timeseries` on real NATS JetStream and InfluxDB 1.6: rebuild into a new
retention policy, switch the default, keep history older than the stream, verify, recover from
an interrupted replay. The live projector runs in-process (as in test_timeseries)."""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import AsyncIterator

import nats
import pytest

from domain.ingest import Reading, Telemetry
from infra.replay import CAUGHT_UP_MESSAGES, Progress, ReplayContext, Report
from infra.settings import Settings
from projections import timeseries_replay
from projections.influx import InfluxClient, RetentionPolicy
from projections.timeseries_replay import FieldStats, Stats, TimeseriesReplay, parse_stats
from tests.integration.test_timeseries import T0, Pipeline, eventually, sample

pytestmark = pytest.mark.integration

DAY_MS = 86_400_000


@pytest.fixture
async def pipeline(migrated: Settings) -> AsyncIterator[Pipeline]:
    """A namespace of its own, with an InfluxDB database named after it (dropped with it)."""
    nc = await nats.connect(migrated.nats_url)
    p = Pipeline(migrated, nc)
    yield p
    await p.close()


@pytest.fixture(autouse=True)
def quick_rechecks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(timeseries_replay, "RECHECK_PAUSE_S", 0.1)


def replayer(pipeline: Pipeline, caught_up: int = CAUGHT_UP_MESSAGES) -> TimeseriesReplay:
    return TimeseriesReplay(
        ReplayContext(pipeline.settings, pipeline.nc, grace=0.3, caught_up=caught_up)
    )


async def stats(influx: InfluxClient, policy: str | None = None) -> Stats:
    """Count and sum per device and field, of one policy or of the default."""
    source = f'"{influx.database}"."{policy}".telemetry' if policy else "telemetry"
    return parse_stats(await influx.query(f"SELECT count(*), sum(*) FROM {source} GROUP BY *"))


async def policies(influx: InfluxClient) -> list[RetentionPolicy]:
    return await influx.retention_policies()


async def default_policy(influx: InfluxClient) -> str:
    return next(p.name for p in await policies(influx) if p.default)


async def publish_mixed(pipeline: Pipeline) -> None:
    """Three devices, one and several readings a message, floats, booleans and strings, and
    one undecodable message (the live projector dead-letters it, the replay skips it)."""
    for device, n, per in (("boiler-1", 30, 1), ("boiler-2", 20, 4), ("meter-7", 15, 2)):
        for message in sample(device, n, per_message=per):
            await pipeline.publish(message)
    await pipeline.publish(
        Telemetry(
            device_id="plain",
            received_at=T0 + 20_000,
            readings=[Reading(T0 + 5, {"level": 3.25}), Reading(T0 + 6, {"level": -1.0})],
        )
    )
    await pipeline.publish_raw("broken", b'{"kind": "telemetry.v1", "nonsense')


async def project_all(pipeline: Pipeline) -> None:
    async with pipeline.projector():
        await eventually(pipeline.all_acked, what="the live projector done")


async def test_a_replay_rebuilds_the_same_points_and_makes_them_the_default(
    pipeline: Pipeline,
) -> None:
    await publish_mixed(pipeline)
    await project_all(pipeline)
    before = await stats(pipeline.influx)
    assert set(before) == {"boiler-1", "boiler-2", "meter-7", "plain"}
    assert before["boiler-2"]["temperature"].count == 80
    assert before["boiler-2"]["mode"].count == 80
    assert before["boiler-2"]["mode"].sum is None  # a string: counted only
    plan = await replayer(pipeline).plan()
    assert any("would build retention policy" in line and "67 of them" in line for line in plan)

    await pipeline.influx.drop_database()
    report = await replayer(pipeline).run(Progress(enabled=False))

    assert await stats(pipeline.influx) == before
    names = [p.name for p in await policies(pipeline.influx)]
    live = await default_policy(pipeline.influx)
    assert re.fullmatch(r"r\d+", live)
    assert sorted(names) == [live, f"{live}_1h", f"{live}_1m"]  # with its rollups
    text = "\n".join(report.lines)
    assert "67 telemetry messages, 142 points written" in text
    assert "1 messages skipped" in text
    assert "old retention policy 'autogen' dropped" in text
    assert report.differences == []


async def test_an_interrupted_replay_leaves_the_live_policy_and_the_next_run_cleans_up(
    pipeline: Pipeline,
) -> None:
    await publish_mixed(pipeline)
    await project_all(pipeline)
    live = await stats(pipeline.influx)

    # Never caught up (threshold below zero): the replay follows until cancelled.
    task = asyncio.create_task(replayer(pipeline, caught_up=-1).run(Progress(enabled=False)))

    async def rebuilding() -> bool:
        others = [
            p.name
            for p in await policies(pipeline.influx)
            if not p.default and not p.name.endswith(("_1m", "_1h"))
        ]
        return bool(others) and await stats(pipeline.influx, others[0]) == live

    await eventually(rebuilding, what="the rebuild written")
    assert await default_policy(pipeline.influx) == "autogen"
    assert await stats(pipeline.influx) == live
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    live_generation = ["autogen", "autogen_1h", "autogen_1m"]  # as `iot migrate` made it
    assert sorted(p.name for p in await policies(pipeline.influx)) == live_generation
    assert await stats(pipeline.influx) == live

    # What a SIGKILLed replay leaves: a policy of ours that is not the default.
    await pipeline.influx.create_retention_policy("r123", duration="0s", shard_duration="168h0m0s")
    async with InfluxClient(
        pipeline.settings.influx_url, pipeline.settings.influx_db, retention_policy="r123"
    ) as leftover:
        await leftover.write(b"telemetry,device_id=ghost x=1.0 1000\n")
    assert await stats(pipeline.influx, "r123") == {"ghost": {"x": FieldStats(1, 1.0)}}
    async with pipeline.projector():  # the live projector keeps running across the switch
        report = await replayer(pipeline).run(Progress(enabled=False))
        await pipeline.publish(
            Telemetry(device_id="late", received_at=T0 + 30_000, readings=[Reading(T0, {"x": 2.0})])
        )
        await eventually(pipeline.all_acked, what="the late message projected")
    assert "dropped retention policy 'r123' left by an interrupted replay" in report.lines
    names = [p.name for p in await policies(pipeline.influx)]
    live_policy = await default_policy(pipeline.influx)
    assert sorted(names) == [live_policy, f"{live_policy}_1h", f"{live_policy}_1m"]
    assert live_policy not in ("autogen", "r123")
    after = await stats(pipeline.influx)
    assert after.pop("late")["x"].count == 1  # written by the live projector into the new one
    assert after == live


async def test_verify_finds_nothing_after_a_replay_and_the_device_whose_points_were_deleted(
    pipeline: Pipeline,
) -> None:
    await publish_mixed(pipeline)
    await project_all(pipeline)
    await replayer(pipeline).run(Progress(enabled=False))
    live_policy = await default_policy(pipeline.influx)
    live = await stats(pipeline.influx)

    clean = await replayer(pipeline).verify(Progress(enabled=False))
    assert clean.differences == []
    assert any("compared 4 devices" in line for line in clean.lines)

    await pipeline.influx.query("DELETE FROM telemetry WHERE device_id = 'meter-7'")
    report: Report = await replayer(pipeline).verify(Progress(enabled=False))
    assert report.differences
    assert all(line.startswith("device meter-7 field ") for line in report.differences)
    assert "device meter-7 field temperature: count live=0 rebuilt=30" in report.differences
    # Nothing switched, nothing left behind.
    assert sorted(p.name for p in await policies(pipeline.influx)) == [
        live_policy,
        f"{live_policy}_1h",
        f"{live_policy}_1m",
    ]
    live.pop("meter-7")
    assert await stats(pipeline.influx) == live


async def test_points_older_than_the_stream_are_carried_over(pipeline: Pipeline) -> None:
    for i in range(40):  # received when measured: the stream reaches back to T0
        await pipeline.publish(
            Telemetry(
                device_id=f"boiler-{i % 2}",
                received_at=T0 + i,
                readings=[Reading(T0 + i, {"level": i / 4, "on": i % 3 == 0})],
            )
        )
    await project_all(pipeline)
    old = [
        f"telemetry,device_id=archived level={i}.5 {T0 - 40 * DAY_MS + i * 1000}\n".encode()
        for i in range(12)
    ]
    old.append(f"telemetry,device_id=boiler-1 legacy=true {T0 - 400 * DAY_MS}\n".encode())
    old.append(f"telemetry,device_id=boiler-1 level=7.0 {T0 - 1}\n".encode())
    await pipeline.influx.write(b"".join(old))
    before = await stats(pipeline.influx)
    plan = await replayer(pipeline).plan()
    assert any(line.startswith("would carry over 14 field values") for line in plan)

    report = await replayer(pipeline).run(Progress(enabled=False))

    assert await stats(pipeline.influx) == before
    assert before["archived"]["level"].count == 12
    assert before["boiler-1"]["legacy"].count == 1
    assert before["boiler-1"]["level"].count == 21
    assert any(line.startswith("14 points older than") for line in report.lines)
