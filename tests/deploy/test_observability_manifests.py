"""The monitoring stack as rendered (`kubectl kustomize deploy/observability`), checked against the
seed (deploy/README.md, "Monitoring"), the shipped Prometheus and Grafana files, and the iot
deployment it watches (`deploy/overlays/k3s-rpi`). kubectl is required: the test fails, never
skips, without it (Debian package `kubectl`)."""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from infra.logs import JsonFormatter
from infra.rollups import DEVICE_TAG, PARTIAL, RAW_MEASUREMENT
from tests.deploy.test_manifests import (
    COMPONENTS,
    ROOT,
    component_of,
    named,
    objects,
    pod_spec,
    render,
    workloads,
)

UNIT = ROOT / "deploy" / "observability"
NAMESPACE = "monitoring"
# the seed's monitoring: workload -> (cpu, memory) requested = limited, and its volume
SEED = {"prometheus": ("1", "2Gi"), "grafana": ("500m", "1Gi"), "loki": ("500m", "1Gi")}
PVC_SIZES = {"prometheus-data": "20Gi", "grafana-data": "5Gi", "loki-data": "10Gi"}
# not in the seed: the exporters and the shipper, small limits out of the room kept for scaling
HELPERS = {"node-exporter", "kube-state-metrics", "alloy"}
HELPER_LIMIT = (0.25, 256 * 2**20)  # cores, bytes
# the pods that talk to the Kubernetes API (KSM) or are authenticated by the kubelets (Prometheus)
TOKEN_MOUNTED = {"prometheus", "kube-state-metrics"}
# the pods with host access, and what they may have
HOST_ACCESS = {
    "node-exporter": {"hostNetwork", "hostPID", "/proc", "/sys", "/"},
    "alloy": {"/var/log/pods"},
}
DATASOURCES = {
    "prometheus": ("prometheus", "http://prometheus.monitoring.svc.cluster.local:9090"),
    "influxdb": ("influxdb", "http://influxdb.iot.svc.cluster.local:8086"),
    "loki": ("loki", "http://loki.monitoring.svc.cluster.local:3100"),
}
CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding"}


def mon(kind: str) -> list[dict[str, Any]]:
    return objects(kind, UNIT)


def mon_named(kind: str, name: str) -> dict[str, Any]:
    return named(kind, name, UNIT)


def config_map(prefix: str) -> dict[str, str]:
    """The data of the generated ConfigMap `prefix-<hash>`."""
    (found,) = [
        c
        for c in mon("ConfigMap")
        if re.fullmatch(rf"{prefix}-[a-z0-9]{{10}}", c["metadata"]["name"])
    ]
    data: dict[str, str] = found["data"]
    return data


def volume_config_map(workload: dict[str, Any], volume: str) -> str:
    (found,) = [v for v in pod_spec(workload)["volumes"] if v["name"] == volume]
    name: str = found["configMap"]["name"]
    return name


def mount_path(container: dict[str, Any], volume: str) -> str:
    (found,) = [m for m in container["volumeMounts"] if m["name"] == volume]
    path: str = found["mountPath"]
    return path


def container_of(name: str) -> dict[str, Any]:
    (container,) = pod_spec(workload(name))["containers"]
    found: dict[str, Any] = container
    return found


def workload(component: str) -> dict[str, Any]:
    (found,) = [w for w in workloads(UNIT) if component_of(w) == component]
    return found


def prometheus_config() -> dict[str, Any]:
    config: dict[str, Any] = yaml.safe_load((UNIT / "prometheus.yml").read_text())
    return config


def scrape_job(name: str) -> dict[str, Any]:
    (job,) = [j for j in prometheus_config()["scrape_configs"] if j["job_name"] == name]
    found: dict[str, Any] = job
    return found


def static_targets(job: dict[str, Any]) -> list[str]:
    return [t for group in job["static_configs"] for t in group["targets"]]


def service_address(service: dict[str, Any], port: int) -> str:
    """`<name>.<namespace>.svc.cluster.local:<port>` of a Service that has that port."""
    assert port in {p["port"] for p in service["spec"]["ports"]}, service["metadata"]["name"]
    namespace = service["metadata"].get("namespace", NAMESPACE)
    return f"{service['metadata']['name']}.{namespace}.svc.cluster.local:{port}"


def quantity(value: str) -> float:
    """A CPU (cores) or memory (bytes) quantity."""
    units = {"m": 1e-3, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30}
    for suffix, factor in units.items():
        if value.endswith(suffix):
            return float(value.removesuffix(suffix)) * factor
    return float(value)


# --- the unit --------------------------------------------------------------------------------
def test_everything_is_in_namespace_monitoring_which_it_creates() -> None:
    (namespace,) = mon("Namespace")
    assert namespace["metadata"]["name"] == NAMESPACE
    rendered = render(UNIT)
    assert len(rendered) > 30
    for obj in rendered:
        if obj["kind"] in CLUSTER_SCOPED:
            assert "namespace" not in obj["metadata"], obj["metadata"]["name"]
        else:
            assert obj["metadata"]["namespace"] == NAMESPACE, obj["metadata"]["name"]
        assert obj["metadata"]["labels"]["app.kubernetes.io/part-of"] == NAMESPACE
    for binding in mon("ClusterRoleBinding"):
        for subject in binding["subjects"]:
            assert subject["namespace"] == NAMESPACE
            assert subject["name"] in {a["metadata"]["name"] for a in mon("ServiceAccount")}


def test_the_workloads_are_the_seeds_monitoring_and_no_second_alertmanager() -> None:
    kinds = {(w["kind"], w["metadata"]["name"]) for w in workloads(UNIT)}
    assert kinds == {
        ("Deployment", "prometheus"),
        ("Deployment", "grafana"),
        ("Deployment", "loki"),
        ("Deployment", "kube-state-metrics"),
        ("DaemonSet", "node-exporter"),
        ("DaemonSet", "alloy"),
    }
    for w in workloads(UNIT):
        if w["kind"] == "Deployment":
            assert w["spec"]["replicas"] == 1, w["metadata"]["name"]
        for container in pod_spec(w)["containers"]:
            assert "alertmanager" not in container["image"]
    # alerts go to the iot namespace's Alertmanager, shared with analytics' notifications
    ((alertmanagers,),) = [
        a["static_configs"] for a in prometheus_config()["alerting"]["alertmanagers"]
    ]
    iot_alertmanager = named("Service", "alertmanager")
    assert iot_alertmanager["metadata"]["namespace"] == "iot"
    assert alertmanagers["targets"] == [service_address(iot_alertmanager, 9093)]
    assert mon("Service")
    assert all(s["metadata"]["name"] != "alertmanager" for s in mon("Service"))
    iot_config = named("ConfigMap", "iot-config")["data"]
    assert iot_config["IOT_ALERTMANAGER_URL"] == "http://alertmanager:9093"


# --- Prometheus --------------------------------------------------------------------------------
def test_prometheus_loads_the_shipped_configuration_and_rules() -> None:
    data = config_map("prometheus-config")
    assert data == {
        "prometheus.yml": (UNIT / "prometheus.yml").read_text(),
        "alerts.yml": (UNIT / "alerts.yml").read_text(),
    }
    prometheus = workload("prometheus")
    container = container_of("prometheus")
    args = dict(a.removeprefix("--").split("=", 1) for a in container["args"])
    config_dir = Path(args["config.file"]).parent
    assert Path(args["config.file"]).name == "prometheus.yml"
    assert Path(mount_path(container, "config")) == config_dir
    assert volume_config_map(prometheus, "config").startswith("prometheus-config-")
    for rule_file in prometheus_config()["rule_files"]:
        assert not Path(rule_file).is_absolute()
        assert rule_file in data
    assert mount_path(container, "data") == args["storage.tsdb.path"]
    assert {"name": "http", "containerPort": 9090, "protocol": "TCP"} in container["ports"]


def test_scrape_jobs_cover_every_iot_component_the_nodes_and_the_cluster_state() -> None:
    (iot,) = scrape_job("iot")["dns_sd_configs"]
    names = set(iot["names"])
    assert names == {f"_http._tcp.{c}-headless.iot.svc.cluster.local" for c in COMPONENTS}
    for component, (port, *_) in COMPONENTS.items():
        headless = named("Service", f"{component}-headless")
        assert headless["spec"]["clusterIP"] == "None"
        assert {"name": "http", "port": port, "targetPort": port, "protocol": "TCP"} in headless[
            "spec"
        ]["ports"]
    (relabel,) = scrape_job("iot")["relabel_configs"]
    assert relabel["target_label"] == "component"
    assert re.fullmatch(
        relabel["regex"], "_http._tcp.projector-views-headless.iot.svc.cluster.local"
    )

    # node-exporter on the nodes' addresses (hostNetwork), the kubelets on the same nodes
    exporter = container_of("node-exporter")
    assert pod_spec(workload("node-exporter"))["hostNetwork"] is True
    assert [p["containerPort"] for p in exporter["ports"]] == [9100]
    nodes = static_targets(scrape_job("node-exporter"))
    assert len(nodes) == 6
    assert all(t.endswith(":9100") for t in nodes)
    hosts = {t.rsplit(":", 1)[0] for t in nodes}
    for job in ("kubelet", "cadvisor"):
        kubelets = static_targets(scrape_job(job))
        assert {t.rsplit(":", 1)[0] for t in kubelets} == hosts
        assert all(t.endswith(":10250") for t in kubelets)
        assert scrape_job(job)["scheme"] == "https"

    ksm = mon_named("Service", "kube-state-metrics")
    assert static_targets(scrape_job("kube-state-metrics")) == [service_address(ksm, 8080)]
    assert "--port=8080" in container_of("kube-state-metrics")["args"]
    assert static_targets(scrape_job("loki")) == [
        service_address(mon_named("Service", "loki"), 3100)
    ]
    grafana = mon_named("Service", "grafana")
    assert static_targets(scrape_job("grafana")) == [service_address(grafana, 3000)]


def test_the_alert_rules_name_only_scraped_jobs_and_kept_cadvisor_series() -> None:
    jobs = {j["job_name"] for j in prometheus_config()["scrape_configs"]}
    rules = yaml.safe_load((UNIT / "alerts.yml").read_text())
    exprs = [r["expr"] for g in rules["groups"] for r in g["rules"]]
    dashboards = [path.read_text() for path in sorted((UNIT / "grafana").glob("*.json"))]
    named_jobs: set[str] = set()
    for expr in exprs:
        for op, value in re.findall(r'job(=~?)"([^"]+)"', expr):
            named_jobs |= set(value.split("|")) if op == "=~" else {value}
    assert named_jobs >= {"iot", "node-exporter"}
    assert named_jobs <= jobs
    # cAdvisor's series are filtered: every container_* series used must be kept
    (keep,) = scrape_job("cadvisor")["metric_relabel_configs"]
    assert keep["action"] == "keep"
    used = set(re.findall(r"\b(container_[a-z_]+)\b", " ".join(exprs + dashboards)))
    assert {"container_memory_working_set_bytes", "container_cpu_usage_seconds_total"} <= used
    for series in used:
        assert re.fullmatch(keep["regex"], series), series


def test_prometheus_may_read_kubelet_metrics_and_kube_state_metrics_only_list_and_watch() -> None:
    roles = {r["metadata"]["name"]: r["rules"] for r in mon("ClusterRole")}
    assert roles["monitoring-prometheus"] == [
        {"apiGroups": [""], "resources": ["nodes/metrics"], "verbs": ["get"]}
    ]
    ksm_rules = roles["monitoring-kube-state-metrics"]
    assert all(rule["verbs"] == ["list", "watch"] for rule in ksm_rules)
    granted = {res for rule in ksm_rules for res in rule["resources"]}
    (resources,) = [
        a.split("=", 1)[1]
        for a in container_of("kube-state-metrics")["args"]
        if a.startswith("--resources=")
    ]
    assert set(resources.split(",")) == granted
    assert {"deployments", "statefulsets", "horizontalpodautoscalers", "nodes", "pods"} <= granted
    bound = {
        b["roleRef"]["name"]: [s["name"] for s in b["subjects"]] for b in mon("ClusterRoleBinding")
    }
    assert bound == {
        "monitoring-prometheus": ["prometheus"],
        "monitoring-kube-state-metrics": ["kube-state-metrics"],
    }


# --- Grafana ---------------------------------------------------------------------------------
def datasources() -> dict[str, dict[str, Any]]:
    (text,) = config_map("grafana-datasources").values()
    return {d["uid"]: d for d in yaml.safe_load(text)["datasources"]}


def test_grafana_datasources_point_at_prometheus_influxdb_and_loki() -> None:
    assert config_map("grafana-datasources") == {
        "datasources.yaml": (UNIT / "grafana" / "datasources.yaml").read_text()
    }
    found = {uid: (d["type"], d["url"]) for uid, d in datasources().items()}
    assert found == DATASOURCES
    # the services behind the URLs exist with those ports
    assert service_address(mon_named("Service", "prometheus"), 9090) in found["prometheus"][1]
    assert service_address(mon_named("Service", "loki"), 3100) in found["loki"][1]
    influx = named("Service", "influxdb")
    assert DATASOURCES["influxdb"][1] == "http://" + service_address(influx, 8086)
    iot_config = named("ConfigMap", "iot-config")["data"]
    assert iot_config["IOT_INFLUX_URL"] == "http://influxdb:8086"
    influxdb = datasources()["influxdb"]
    assert influxdb["jsonData"]["dbName"] == iot_config["IOT_INFLUX_DB"]
    assert influxdb["jsonData"]["version"] == "InfluxQL"
    # credentials: environment references, filled from the optional Secret, never values
    assert influxdb["user"] == "$INFLUXDB_USER"
    assert influxdb["secureJsonData"] == {"password": "$INFLUXDB_PASSWORD"}
    env = {e["name"]: e for e in container_of("grafana")["env"]}
    for var, key in (("INFLUXDB_USER", "user"), ("INFLUXDB_PASSWORD", "password")):
        ref = env[var]["valueFrom"]["secretKeyRef"]
        assert ref == {"name": "grafana-influxdb", "key": key, "optional": True}


def dashboards() -> dict[str, dict[str, Any]]:
    return {p.name: json.loads(p.read_text()) for p in sorted((UNIT / "grafana").glob("*.json"))}


def panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in dashboard["panels"]:
        yield panel
        yield from panel.get("panels", [])  # a collapsed row's own


def datasource_uid(ref: dict[str, Any], dashboard: dict[str, Any]) -> str:
    """A datasource reference's uid: a provisioned uid, or a datasource variable, resolved to the
    provisioned data source it defaults to (its `current`), which must be of the variable's type."""
    uid: str = ref["uid"]
    variable = re.fullmatch(r"\$\{(\w+)\}", uid)
    if variable is None:
        return uid
    (var,) = [v for v in dashboard["templating"]["list"] if v["name"] == variable[1]]
    assert var["type"] == "datasource", var
    assert var["query"] == ref["type"], var
    resolved: str = var["current"]["value"]
    return resolved


def test_every_dashboard_is_provisioned_and_uses_provisioned_datasources() -> None:
    files = {p.name: p.read_text() for p in sorted((UNIT / "grafana").glob("*.json"))}
    assert set(files) >= {"iot.json", "fleet-telemetry.json"}
    assert config_map("grafana-dashboards") == files
    provisioned = {uid: d["type"] for uid, d in datasources().items()}
    uids = [d["uid"] for d in dashboards().values()]
    assert len(set(uids)) == len(uids)
    for name, dashboard in dashboards().items():
        refs = []
        for panel in panels(dashboard):
            if panel["type"] == "row":
                continue
            assert panel["targets"], f"{name}: {panel['title']} has no query"
            refs.append(panel["datasource"])
            refs += [t["datasource"] for t in panel["targets"]]
        refs += [v["datasource"] for v in dashboard["templating"]["list"] if "datasource" in v]
        for ref in refs:
            uid = datasource_uid(ref, dashboard)
            assert provisioned.get(uid) == ref["type"], f"{name}: {ref}"
    # the provider reads the directory the dashboards ConfigMap is mounted on
    (provider_text,) = config_map("grafana-dashboard-provider").values()
    assert provider_text == (UNIT / "grafana" / "dashboards.yaml").read_text()
    (provider,) = yaml.safe_load(provider_text)["providers"]
    grafana = container_of("grafana")
    assert provider["options"]["path"] == mount_path(grafana, "dashboards")
    assert volume_config_map(workload("grafana"), "dashboards").startswith("grafana-dashboards-")
    provisioning = {e["name"]: e.get("value") for e in grafana["env"]}["GF_PATHS_PROVISIONING"]
    assert mount_path(grafana, "datasources") == f"{provisioning}/datasources"
    assert mount_path(grafana, "dashboard-provider") == f"{provisioning}/dashboards"


def queries(dashboard: dict[str, Any]) -> str:
    return " ".join(
        str(t.get("expr", "")) + str(t.get("query", ""))
        for p in panels(dashboard)
        for t in p.get("targets", [])
    )


def test_the_system_health_dashboard_shows_components_requests_pods_nodes_and_restarts() -> None:
    exprs = queries(dashboards()["iot.json"])
    for series in (
        'up{job="iot"}',
        "iot_http_requests_total",
        "iot_http_request_duration_seconds_bucket",
        'status=~"5.."',
        "container_cpu_usage_seconds_total",
        "container_memory_working_set_bytes",
        "node_cpu_seconds_total",
        "node_memory_MemAvailable_bytes",
        "node_filesystem_avail_bytes",
        "kube_pod_container_status_restarts_total",
    ):
        assert series in exprs, series
    logs = [p for p in panels(dashboards()["iot.json"]) if p["type"] == "logs"]
    assert logs
    assert all(p["datasource"]["type"] == "loki" for p in logs)


def test_the_fleet_dashboard_queries_what_the_time_series_projection_writes() -> None:
    fleet = dashboards()["fleet-telemetry.json"]
    influxql = [
        t["query"]
        for p in panels(fleet)
        for t in p["targets"]
        if p["datasource"]["type"] == "influxdb"
    ]
    assert len(influxql) >= 6
    measurements = set()
    for query in influxql:
        measurements |= set(re.findall(r'FROM "(\w+)"', query))
        assert "$timeFilter" in query, query
    assert measurements == {RAW_MEASUREMENT, PARTIAL.measurement}
    assert any(f'GROUP BY time($__interval), "{DEVICE_TAG}"' in q for q in influxql)
    variables = {v["name"]: v for v in fleet["templating"]["list"]}
    assert variables["device"]["query"] == (
        f'SHOW TAG VALUES FROM "{RAW_MEASUREMENT}" WITH KEY = "{DEVICE_TAG}"'
    )
    assert variables["metric"]["query"] == f'SHOW FIELD KEYS FROM "{RAW_MEASUREMENT}"'
    # the rollup fields are count_<metric>, ... (infra/rollups.py)
    assert any('"count_$metric"' in q for q in influxql)


def test_grafana_admin_password_and_tls_are_secrets_referenced_never_rendered() -> None:
    assert mon("Secret") == []
    grafana = pod_spec(workload("grafana"))
    secrets = {v["secret"]["secretName"]: v for v in grafana["volumes"] if "secret" in v}
    assert set(secrets) == {"grafana-admin"}
    (container,) = grafana["containers"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    (item,) = secrets["grafana-admin"]["secret"]["items"]
    assert (
        env["GF_SECURITY_ADMIN_PASSWORD__FILE"]
        == f"{mount_path(container, 'admin')}/{item['path']}"
    )
    assert item["key"] == "password"
    assert not any(
        "PASSWORD" in name and value for name, value in env.items() if not name.endswith("__FILE")
    )
    (ingress,) = mon("Ingress")
    assert ingress["spec"]["ingressClassName"] == "nginx"
    (tls,) = ingress["spec"]["tls"]
    assert tls == {"hosts": ["grafana.neurobuildtech.local"], "secretName": "grafana-tls"}
    (rule,) = ingress["spec"]["rules"]
    assert rule["host"] == "grafana.neurobuildtech.local"
    (path,) = rule["http"]["paths"]
    assert path["backend"]["service"] == {"name": "grafana", "port": {"number": 3000}}
    assert service_address(mon_named("Service", "grafana"), 3000)
    assert env["GF_SERVER_ROOT_URL"] == "https://grafana.neurobuildtech.local/"


# --- Loki and the log shipper -------------------------------------------------------------------
def test_the_shipper_reads_the_nodes_pod_logs_and_sends_them_to_loki() -> None:
    (config,) = config_map("alloy-config").values()
    assert config == (UNIT / "alloy" / "config.alloy").read_text()
    (url,) = re.findall(r'url\s*=\s*"([^"]+)"', config)
    assert (
        url == "http://" + service_address(mon_named("Service", "loki"), 3100) + "/loki/api/v1/push"
    )
    alloy = pod_spec(workload("alloy"))
    (container,) = alloy["containers"]
    assert container["args"][:2] == ["run", f"{mount_path(container, 'config')}/config.alloy"]
    (logs,) = [v for v in alloy["volumes"] if v["name"] == "pod-logs"]
    assert logs["hostPath"]["path"] == "/var/log/pods" == mount_path(container, "pod-logs")
    assert '"/var/log/pods/*/*/*.log"' in config
    assert "stage.cri" in config
    # the labels parsed from the iot components' JSON lines are keys that infra/logs.py writes
    record = logging.makeLogRecord({"name": "bridges.mqtt", "levelname": "WARNING", "msg": "x"})
    line = json.loads(JsonFormatter("bridge").format(record))
    (labels,) = re.findall(r"stage\.labels\s*\{\s*values\s*=\s*\{([^}]*)\}", config)
    label_names = set(re.findall(r"(\w+)\s*=", labels))
    assert label_names == {"level", "component"}
    (expressions,) = re.findall(r"stage\.json\s*\{\s*expressions\s*=\s*\{([^}]*)\}", config)
    for label, key in re.findall(r'(\w+)\s*=\s*"(\w+)"', expressions):
        assert key in line, key
        assert label in label_names
    assert (line["level"], line["component"]) == ("warning", "bridge")


def test_loki_stores_on_its_volume() -> None:
    (text,) = config_map("loki-config").values()
    assert text == (UNIT / "loki" / "loki.yaml").read_text()
    config = yaml.safe_load(text)
    loki = container_of("loki")
    assert config["server"]["http_listen_port"] == 3100
    assert f"-config.file={mount_path(loki, 'config')}/loki.yaml" in loki["args"]
    data = mount_path(loki, "data")
    assert config["common"]["path_prefix"] == data
    for directory in config["common"]["storage"]["filesystem"].values():
        assert directory.startswith(data + "/")
    assert config["compactor"]["working_directory"].startswith(data + "/")
    assert config["compactor"]["retention_enabled"] is True


# --- volumes, budgets, pods --------------------------------------------------------------------
def test_volumes_are_sized_per_the_seed_on_local_path() -> None:
    sizes = {}
    for pvc in mon("PersistentVolumeClaim"):
        assert pvc["spec"]["storageClassName"] == "local-path"
        assert pvc["spec"]["accessModes"] == ["ReadWriteOnce"]
        sizes[pvc["metadata"]["name"]] = pvc["spec"]["resources"]["requests"]["storage"]
    assert sizes == PVC_SIZES
    for claim in PVC_SIZES:
        owner = workload(claim.removesuffix("-data"))
        (volume,) = [v for v in pod_spec(owner)["volumes"] if v["name"] == "data"]
        assert volume["persistentVolumeClaim"] == {"claimName": claim}
        assert owner["spec"]["strategy"] == {"type": "Recreate"}  # one writer of a RWO volume


def test_resources_are_within_the_seed_budgets() -> None:
    for name, (cpu, memory) in SEED.items():
        expected = {"cpu": cpu, "memory": memory}
        assert container_of(name)["resources"] == {"requests": expected, "limits": expected}, name
    for w in workloads(UNIT):
        for container in pod_spec(w)["containers"] + pod_spec(w).get("initContainers", []):
            resources = container["resources"]
            assert set(resources["requests"]) == set(resources["limits"]) == {"cpu", "memory"}
            if component_of(w) in HELPERS:
                limit = (
                    quantity(resources["limits"]["cpu"]),
                    quantity(resources["limits"]["memory"]),
                )
                assert limit[0] <= HELPER_LIMIT[0], w["metadata"]["name"]
                assert limit[1] <= HELPER_LIMIT[1], w["metadata"]["name"]


def test_every_pod_is_non_root_read_only_without_capabilities_with_probes_and_pinned_images() -> (
    None
):
    kustomization = yaml.safe_load((UNIT / "kustomization.yaml").read_text())
    pinned = {i["name"]: i["newTag"] for i in kustomization["images"]}
    for w in workloads(UNIT):
        name = component_of(w)
        pod = pod_spec(w)
        assert pod["serviceAccountName"] == name
        assert pod["automountServiceAccountToken"] is (name in TOKEN_MOUNTED), name
        security = pod["securityContext"]
        assert security["runAsNonRoot"] is True, name
        assert security["runAsUser"] >= 10000, name
        assert security["seccompProfile"] == {"type": "RuntimeDefault"}, name
        for container in pod["containers"] + pod.get("initContainers", []):
            c = container["securityContext"]
            assert c["allowPrivilegeEscalation"] is False, name
            assert c["privileged"] is False, name
            assert c["readOnlyRootFilesystem"] is True, name
            assert c["capabilities"] == {"drop": ["ALL"]}, name
            assert c.get("runAsUser", security["runAsUser"]) != 0, name
            assert container["livenessProbe"], name
            assert container["readinessProbe"], name
            image, _, tag = container["image"].rpartition(":")
            assert pinned[image] == tag, container["image"]
            assert tag != "latest", container["image"]
            for mount in container.get("volumeMounts", []):
                host = [
                    v
                    for v in pod.get("volumes", [])
                    if v["name"] == mount["name"] and "hostPath" in v
                ]
                if host:
                    assert mount.get("readOnly") is True, (name, mount)
        access = {k for k in ("hostNetwork", "hostPID", "hostIPC") if pod.get(k)}
        access |= {v["hostPath"]["path"] for v in pod.get("volumes", []) if "hostPath" in v}
        assert access == HOST_ACCESS.get(name, set()), name
    for account in mon("ServiceAccount"):
        assert account["automountServiceAccountToken"] is False  # pods opt in, above


# --- network policies --------------------------------------------------------------------------
def policy(name: str) -> dict[str, Any]:
    spec: dict[str, Any] = mon_named("NetworkPolicy", name)["spec"]
    return spec


def egress_ports(spec: dict[str, Any], match: dict[str, Any]) -> set[int]:
    """The ports a policy's egress allows to the peer described by `match` (a subset of a peer)."""
    ports: set[int] = set()
    for rule in spec.get("egress", []):
        for peer in rule["to"]:
            if all(peer.get(k) == v for k, v in match.items()):
                ports |= {p["port"] for p in rule["ports"]}
    return ports


def test_network_policies_deny_by_default_and_select_every_pod() -> None:
    assert policy("default-deny") == {"podSelector": {}, "policyTypes": ["Ingress", "Egress"]}
    selected = {
        p["spec"]["podSelector"].get("matchLabels", {}).get("app.kubernetes.io/component")
        for p in mon("NetworkPolicy")
    }
    for w in workloads(UNIT):
        assert component_of(w) in selected
    for p in mon("NetworkPolicy"):
        for rule in p["spec"].get("ingress", []) + p["spec"].get("egress", []):
            assert rule.get("ports"), f"{p['metadata']['name']}: a rule without ports"


def test_network_policies_open_the_monitoring_paths() -> None:
    iot = {"kubernetes.io/metadata.name": "iot"}
    prometheus = policy("prometheus")
    (to_iot,) = [
        r
        for r in prometheus["egress"]
        for peer in r["to"]
        if peer.get("namespaceSelector", {}).get("matchLabels") == iot
    ]
    assert {p["port"] for p in to_iot["ports"]} == {port for port, *_ in COMPONENTS.values()} | {
        9093
    }
    local = {"podSelector": {"matchLabels": {"app.kubernetes.io/component": "kube-state-metrics"}}}
    assert egress_ports(prometheus, local) == {8080}
    nodes = {t.rsplit(":", 1)[0] for t in static_targets(scrape_job("node-exporter"))}
    (to_nodes,) = [r for r in prometheus["egress"] if "ipBlock" in r["to"][0]]
    assert {peer["ipBlock"]["cidr"] for peer in to_nodes["to"]} == {f"{n}/32" for n in nodes}
    assert {p["port"] for p in to_nodes["ports"]} == {9100, 10250}

    grafana = policy("grafana")
    influx = {
        "namespaceSelector": {"matchLabels": iot},
        "podSelector": {"matchLabels": {"app.kubernetes.io/component": "influxdb"}},
    }
    assert egress_ports(grafana, influx) == {8086}
    for target, port in (("prometheus", 9090), ("loki", 3100)):
        peer = {"podSelector": {"matchLabels": {"app.kubernetes.io/component": target}}}
        assert egress_ports(grafana, peer) == {port}
        ingress = [
            r
            for r in policy(target)["ingress"]
            if {"podSelector": {"matchLabels": {"app.kubernetes.io/component": "grafana"}}}
            in r["from"]
        ]
        assert [p["port"] for r in ingress for p in r["ports"]] == [port]
    shipper = {"podSelector": {"matchLabels": {"app.kubernetes.io/component": "loki"}}}
    assert egress_ports(policy("alloy"), shipper) == {3100}
    assert "ingress" not in policy("alloy")

    # the iot end: InfluxDB admits Grafana's pods (deploy/base/network-policies.yaml)
    influxdb = named("NetworkPolicy", "influxdb")["spec"]
    from_grafana = {
        "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": NAMESPACE}},
        "podSelector": {"matchLabels": {"app.kubernetes.io/name": "grafana"}},
    }
    (rule,) = [r for r in influxdb["ingress"] if from_grafana in r["from"]]
    assert [p["port"] for p in rule["ports"]] == [8086]
    # ... and Prometheus' (the iot components' and Alertmanager's policies): by these pod labels
    for name in ("grafana", "prometheus"):
        assert (
            workload(name)["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/name"]
            == name
        )
