"""The timeseries replay's pure parts: statistics, comparison, policy names, the write sink."""

from __future__ import annotations

from typing import Any

from nats.aio.msg import Msg

from domain.ingest import Reading, Status, Telemetry, encode_ingest
from infra.replay import Progress
from projections.influx import RetentionPolicy
from projections.timeseries import PointWriter
from projections.timeseries_replay import (
    FieldStats,
    ReplaySink,
    compare,
    leftovers,
    new_policy_name,
    parse_stats,
)
from tests.unit.test_timeseries import FakeInflux


def policy(name: str, default: bool = False) -> RetentionPolicy:
    return RetentionPolicy(name, "0s", "168h0m0s", 1, default)


def test_stats_count_every_field_and_sum_only_the_numeric_ones() -> None:
    results: list[dict[str, Any]] = [
        {
            "series": [
                {
                    "name": "telemetry",
                    "tags": {"device_id": "a"},
                    "columns": ["time", "count_mode", "count_t_x", "sum_t_x"],
                    "values": [[0, 3, 2, 4.5]],
                },
                {
                    "name": "telemetry",
                    "tags": {"device_id": "b"},
                    "columns": ["time", "count_mode", "count_t_x", "sum_t_x"],
                    "values": [[0, None, 1, 1.0]],
                },
            ]
        }
    ]
    assert parse_stats(results) == {
        "a": {"mode": FieldStats(3, None), "t_x": FieldStats(2, 4.5)},
        "b": {"t_x": FieldStats(1, 1.0)},
    }
    assert parse_stats([{"statement_id": 0}]) == {}


def test_compare_names_each_differing_field_of_each_device() -> None:
    live = {
        "a": {"x": FieldStats(2, 3.0), "s": FieldStats(1)},
        "b": {"x": FieldStats(1, 1.0)},
        "c": {"x": FieldStats(1, 0.1 + 0.2)},
    }
    rebuilt = {
        "a": {"x": FieldStats(2, 3.5), "s": FieldStats(1)},
        "c": {"x": FieldStats(1, 0.3)},  # the same sum, added in another order
        "d": {"y": FieldStats(4, 2.0)},
    }
    assert compare(live, rebuilt) == {
        "a": ["device a field x: sum live=3.0 rebuilt=3.5"],
        "b": ["device b field x: count live=1 rebuilt=0"],
        "d": ["device d field y: count live=0 rebuilt=4"],
    }
    assert compare(live, live) == {}


def test_leftovers_are_our_non_default_policies_and_new_names_come_later() -> None:
    policies = [policy("r100", default=True), policy("r200"), policy("autogen"), policy("rx1")]
    assert [p.name for p in leftovers(policies)] == ["r200"]
    assert new_policy_name(policies, 150) == "r201"
    assert new_policy_name(policies, 5_000) == "r5000"
    assert new_policy_name([], 7) == "r7"


def msg(data: bytes) -> Msg:
    return Msg(_client=None, subject="t.ingest.telemetry.d", data=data)  # type: ignore[arg-type]


async def test_the_sink_writes_telemetry_and_counts_what_it_skips() -> None:
    influx = FakeInflux()
    influx.refuse = "refused"
    sink = ReplaySink(PointWriter(influx), Progress(enabled=False), depth=2)
    good = Telemetry(
        device_id="d", received_at=1, readings=[Reading(1, {"x": 1.0}), Reading(2, {"x": 2.0})]
    )
    refused = Telemetry(device_id="d", received_at=1, readings=[Reading(3, {"refused": 1.0})])
    other = Status(device_id="d", received_at=1, online=True)
    for _ in range(3):  # more batches than writes in flight
        await sink.handle(
            [msg(encode_ingest(good)), msg(b"{nonsense"), msg(encode_ingest(refused))]
        )
    await sink.handle([msg(encode_ingest(other))])
    await sink.drain()
    assert sorted(influx.points) == ["telemetry,device_id=d 1", "telemetry,device_id=d 2"]
    assert (sink.delivered, sink.messages, sink.points, sink.skipped) == (10, 10, 6, 7)
