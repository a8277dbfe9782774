"""The durability settings the cluster ships (deploy/README.md, "Durability"), read from the
rendered overlay: JetStream file storage fsynced on every write with three replicas, PostgreSQL's
commit fsynced, Redis' append-only file, Mosquitto's persistence on its volume. A change that
weakens one fails here. The one-machine broker configuration (iot/mosquitto.conf) is checked too."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from nats.js.api import StorageType

from infra.streams import Streams, kv_configs
from iot.broker import render_config
from tests.deploy.test_manifests import named, objects, pod_spec

GIB = 1024**3
UNITS = {"KB": 1000, "MB": 1000**2, "GB": 1000**3, "K": 1024, "M": 1024**2, "G": 1024**3}
UNITS |= {"Ki": 1024, "Mi": 1024**2, "Gi": GIB}


def config_map(prefix: str, key: str) -> str:
    (found,) = [c for c in objects("ConfigMap") if c["metadata"]["name"].startswith(prefix)]
    text: str = found["data"][key]
    return text


def size(text: str) -> int:
    match = re.fullmatch(r"(\d+)\s*([A-Za-z]*)", text.strip())
    assert match, f"not a size: {text!r}"
    return int(match[1]) * UNITS[match[2]] if match[2] else int(match[1])


def claim_size(claim: dict[str, Any]) -> int:
    return size(claim["spec"]["resources"]["requests"]["storage"])


def only_container(workload: dict[str, Any]) -> dict[str, Any]:
    (container,) = pod_spec(workload)["containers"]
    found: dict[str, Any] = container
    return found


def mounted_claim(workload: dict[str, Any], path: str) -> str:
    """The PersistentVolumeClaim (a claim template's or a named claim's name) whose mount holds
    `path` in the workload's container; fails if `path` is on no persistent volume."""
    container = only_container(workload)
    pod = pod_spec(workload)
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    templates = {t["metadata"]["name"] for t in workload["spec"].get("volumeClaimTemplates", [])}
    best = ""
    claim = ""
    for mount in container["volumeMounts"]:
        root = mount["mountPath"].rstrip("/") + "/"
        if not (path.rstrip("/") + "/").startswith(root) or len(root) <= len(best):
            continue
        best = root
        if mount["name"] in templates:
            claim = mount["name"]
        else:
            pvc = volumes[mount["name"]].get("persistentVolumeClaim")
            claim = pvc["claimName"] if pvc else ""
    assert claim, f"{path} is not on a persistent volume of {workload['metadata']['name']}"
    return claim


# --- NATS JetStream ---------------------------------------------------------------------------
def nats_block(conf: str, name: str) -> dict[str, str]:
    """`key: value` lines of a top-level block `name { ... }` of nats.conf (no nesting inside)."""
    match = re.search(rf"^{name}\s*\{{(.*?)^\}}", conf, re.MULTILINE | re.DOTALL)
    assert match, f"no {name} block in nats.conf"
    pairs: dict[str, str] = {}
    for raw in match.group(1).splitlines():
        line = raw.split("#", 1)[0].strip()
        if line and ":" in line and not line.startswith("nats://"):
            key, value = line.split(":", 1)
            pairs[key.strip()] = value.strip()
    return pairs


def test_jetstream_fsyncs_every_write_to_file_storage_on_the_volume() -> None:
    conf = config_map("nats-config", "nats.conf")
    jetstream = nats_block(conf, "jetstream")
    # The default (2 min) loses acknowledged writes on a crash (Jepsen, NATS 2.12.1).
    assert jetstream["sync_interval"] == "always"
    nats = named("StatefulSet", "nats")
    assert mounted_claim(nats, jetstream["store_dir"]) == "data"
    (claim,) = nats["spec"]["volumeClaimTemplates"]
    assert size(jetstream["max_file_store"]) <= 0.95 * claim_size(claim), "no headroom on the PVC"
    # no second sync_interval elsewhere in the file
    assert len(re.findall(r"^\s*sync_interval\s*[:=]", conf, re.MULTILINE)) == 1


def test_streams_are_file_storage_with_the_replicas_migrate_is_given() -> None:
    (migrate,) = pod_spec(named("Job", "migrate"))["containers"]
    replicas = int(migrate["args"][migrate["args"].index("--replicas") + 1])
    assert replicas == 3 == named("StatefulSet", "nats")["spec"]["replicas"]
    configs = Streams("iot").configs(replicas)
    assert {c.name for c in configs} == {"IOT_EVENTS", "IOT_INGEST", "IOT_DEADLETTER"}
    for config in configs:
        assert config.storage == StorageType.FILE, config.name
        assert config.num_replicas == replicas, config.name
    # The KV buckets are in memory on purpose (secrets never reach a disk, leases expire), and
    # replicated all the same.
    for kv in kv_configs(Streams("iot"), replicas):
        assert kv.storage == StorageType.MEMORY
        assert kv.replicas == replicas


# --- PostgreSQL -------------------------------------------------------------------------------
def postgres_settings(container: dict[str, Any]) -> dict[str, str]:
    args = container["args"]
    assert all(flag == "-c" for flag in args[0::2]), args
    return dict(setting.split("=", 1) for setting in args[1::2])


def test_postgres_commits_are_fsynced_and_stated_explicitly() -> None:
    postgres = named("StatefulSet", "postgres")
    settings = postgres_settings(only_container(postgres))
    assert settings["synchronous_commit"] == "on"
    assert settings["fsync"] == "on"
    assert settings["full_page_writes"] == "on"
    assert settings["wal_level"] in ("replica", "logical")
    env = {e["name"]: e.get("value") for e in only_container(postgres)["env"]}
    assert mounted_claim(postgres, env["PGDATA"]) == "data"


# --- Redis ------------------------------------------------------------------------------------
def test_redis_keeps_an_append_only_file_on_its_volume() -> None:
    redis = named("StatefulSet", "redis")
    args = only_container(redis)["args"]
    options = {args[i]: args[i + 1] for i, a in enumerate(args) if a.startswith("--")}
    assert options["--appendonly"] == "yes"
    # everysec: the views are rebuilt from the log (`iot replay views`); always would do too.
    assert options["--appendfsync"] in ("everysec", "always")
    assert mounted_claim(redis, options["--dir"]) == "data"
    # a view must never be evicted silently
    assert options["--maxmemory-policy"] == "noeviction"


# --- Mosquitto --------------------------------------------------------------------------------
def mosquitto_directives(text: str) -> dict[str, str]:
    pairs: dict[str, str] = {}
    for raw in text.splitlines():
        line = raw.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition(" ")
            pairs.setdefault(key, value.strip())
    return pairs


def assert_broker_persists(conf: dict[str, str]) -> None:
    assert conf["persistence"] == "true"
    assert conf["persistence_file"]
    # saved by time, at most 10 s apart (what a broker crash can lose of queued QoS 1 messages)
    assert conf["autosave_on_changes"] == "false"
    assert 0 < int(conf["autosave_interval"]) <= 10
    # queued QoS 1 messages are kept deep enough that a bridge falling behind loses nothing
    assert int(conf["max_queued_messages"]) >= 1_000_000
    assert conf["queue_qos0_messages"] == "false"


def test_mosquitto_persists_its_queues_on_its_volume() -> None:
    conf = mosquitto_directives(config_map("mosquitto-config", "mosquitto.conf"))
    assert_broker_persists(conf)
    broker = named("Deployment", "mosquitto")
    assert mounted_claim(broker, conf["persistence_location"]) == "mosquitto-data"
    assert broker["spec"]["strategy"]["type"] == "Recreate"  # one writer of the volume
    assert claim_size(named("PersistentVolumeClaim", "mosquitto-data")) >= 5 * GIB


def test_the_one_machine_broker_persists_as_the_cluster_does(tmp_path: Path) -> None:
    conf = mosquitto_directives(render_config(1883, tmp_path))
    assert_broker_persists(conf)
    assert conf["persistence_location"] == f"{tmp_path}/"
