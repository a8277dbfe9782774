"""The cluster deployment as rendered (`kubectl kustomize deploy/overlays/k3s-rpi`) and the image's
Dockerfile, checked against the reference cluster (deploy/README.md). kubectl is required: the test
fails, never skips, without it (Debian package `kubectl`)."""

from __future__ import annotations

import re
import shutil
import subprocess
import tomllib
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml

from infra.settings import load as load_settings

ROOT = Path(__file__).resolve().parents[2]
OVERLAY = ROOT / "deploy" / "overlays" / "k3s-rpi"

# component -> (port, seed replicas, cpu and memory per replica: requests = limits)
COMPONENTS = {
    "commands": (8080, 2, "500m", "1Gi"),
    "relay": (8084, 2, "250m", "256Mi"),
    "bridge": (8081, 2, "1", "1Gi"),
    "gateway": (8082, 2, "500m", "512Mi"),
    "projector-timeseries": (8083, 2, "1", "1Gi"),
    "projector-views": (8083, 2, "500m", "512Mi"),
    "projector-auth": (8083, 1, "250m", "256Mi"),
    "analytics": (8083, 2, "1", "1Gi"),
}
# the exceptions to requests = limits: cpu and memory requested
REQUESTS = {"analytics": ("500m", "512Mi")}
PVC_SIZES = {
    "postgres": "30Gi",
    "influxdb": "50Gi",
    "redis": "10Gi",
    "nats": "20Gi",
    "mosquitto-data": "5Gi",
    "backups": "100Gi",
    "reports": "1Gi",
}
POD_KINDS = ("Deployment", "StatefulSet", "DaemonSet", "Job", "CronJob")


@cache
def render(unit: Path) -> tuple[dict[str, Any], ...]:
    """`kubectl kustomize UNIT`: an overlay, or deploy/observability."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.fail("kubectl is not installed: `apt-get install kubectl` (it renders deploy/)")
    out = subprocess.run(
        [kubectl, "kustomize", str(unit)], capture_output=True, text=True, check=False
    )
    if out.returncode != 0:
        pytest.fail(f"kubectl kustomize {unit} failed: {out.stderr}")
    return tuple(d for d in yaml.safe_load_all(out.stdout) if d)


def rendered() -> tuple[dict[str, Any], ...]:
    return render(OVERLAY)


def objects(kind: str, unit: Path = OVERLAY) -> list[dict[str, Any]]:
    return [o for o in render(unit) if o["kind"] == kind]


def named(kind: str, name: str, unit: Path = OVERLAY) -> dict[str, Any]:
    (found,) = [o for o in objects(kind, unit) if o["metadata"]["name"] == name]
    return found


def pod_spec(workload: dict[str, Any]) -> dict[str, Any]:
    spec = workload["spec"]
    if workload["kind"] == "CronJob":
        spec = spec["jobTemplate"]["spec"]
    pod: dict[str, Any] = spec["template"]["spec"]
    return pod


def workloads(unit: Path = OVERLAY) -> Iterator[dict[str, Any]]:
    for kind in POD_KINDS:
        yield from objects(kind, unit)


def component_of(workload: dict[str, Any]) -> str:
    spec = workload["spec"]
    if workload["kind"] == "CronJob":
        spec = spec["jobTemplate"]["spec"]
    label: str = spec["template"]["metadata"]["labels"]["app.kubernetes.io/component"]
    return label


def app_workload(component: str) -> dict[str, Any]:
    (found,) = [w for w in workloads() if component_of(w) == component]
    return found


# --- the application components ---------------------------------------------------------------
def test_one_workload_per_component_running_its_iot_command() -> None:
    for component, (port, replicas, _, _) in COMPONENTS.items():
        workload = app_workload(component)
        # The bridge is a StatefulSet so each replica keeps its MQTT session (deploy/README.md).
        assert workload["kind"] == ("StatefulSet" if component == "bridge" else "Deployment")
        assert workload["spec"]["replicas"] == replicas, component
        (container,) = pod_spec(workload)["containers"]
        assert container["image"].endswith("/iot-backend:0.1.0")
        assert container["args"][:2] == ["run", component.split("-")[0]]
        if component.startswith("projector-"):
            assert container["args"][2] == component.removeprefix("projector-")
        assert container["ports"] == [{"name": "http", "containerPort": port, "protocol": "TCP"}]
        env = {e["name"]: e for e in container["env"]}
        assert env["IOT_HTTP_PORT"]["value"] == str(port)
    deployments = sorted(d["metadata"]["name"] for d in objects("Deployment"))
    assert deployments == sorted(
        [*(c for c in COMPONENTS if c != "bridge"), "mosquitto", "alertmanager"]
    )


def test_probes_use_healthz_and_readyz_on_the_component_port() -> None:
    for component in COMPONENTS:
        (container,) = pod_spec(app_workload(component))["containers"]
        for probe, path in (
            ("startupProbe", "/healthz"),
            ("livenessProbe", "/healthz"),
            ("readinessProbe", "/readyz"),
        ):
            assert container[probe]["httpGet"] == {"path": path, "port": "http"}, component


def test_resources_are_the_seed_budget_and_every_container_has_limits() -> None:
    for component, (_, _, cpu, memory) in COMPONENTS.items():
        (container,) = pod_spec(app_workload(component))["containers"]
        expected = {"cpu": cpu, "memory": memory}
        req_cpu, req_memory = REQUESTS.get(component, (cpu, memory))
        requested = {"cpu": req_cpu, "memory": req_memory}
        assert container["resources"] == {"requests": requested, "limits": expected}, component
    for workload in workloads():
        pod = pod_spec(workload)
        for container in pod["containers"] + pod.get("initContainers", []):
            limits = container["resources"]["limits"]
            assert set(limits) == {"cpu", "memory"}, container["name"]


def test_every_pod_is_non_root_read_only_without_capabilities_or_token() -> None:
    for workload in workloads():
        pod = pod_spec(workload)
        name = workload["metadata"]["name"]
        assert pod["automountServiceAccountToken"] is False, name
        assert pod["serviceAccountName"] == component_of(workload), name
        security = pod["securityContext"]
        assert security["runAsNonRoot"] is True, name
        assert security["runAsUser"] >= 10000, name
        assert security["seccompProfile"] == {"type": "RuntimeDefault"}, name
        for container in pod["containers"] + pod.get("initContainers", []):
            c = container["securityContext"]
            assert c["allowPrivilegeEscalation"] is False, name
            assert c["readOnlyRootFilesystem"] is True, name
            assert c["capabilities"] == {"drop": ["ALL"]}, name
            assert c.get("runAsUser", security["runAsUser"]) != 0, name
    for account in objects("ServiceAccount"):
        assert account["automountServiceAccountToken"] is False


def test_replicas_are_spread_over_nodes() -> None:
    for component, (_, replicas, _, _) in COMPONENTS.items():
        if replicas < 2:
            continue
        anti = pod_spec(app_workload(component))["affinity"]["podAntiAffinity"]
        (term,) = anti["preferredDuringSchedulingIgnoredDuringExecution"]
        assert term["podAffinityTerm"]["topologyKey"] == "kubernetes.io/hostname"
        assert term["podAffinityTerm"]["labelSelector"]["matchLabels"] == {
            "app.kubernetes.io/component": component
        }
    nats = pod_spec(named("StatefulSet", "nats"))["affinity"]["podAntiAffinity"]
    (required,) = nats["requiredDuringSchedulingIgnoredDuringExecution"]
    assert required["topologyKey"] == "kubernetes.io/hostname"


def test_autoscaling_and_disruption_budgets() -> None:
    bounds = {
        h["metadata"]["name"]: (
            h["spec"]["scaleTargetRef"]["kind"],
            h["spec"]["minReplicas"],
            h["spec"]["maxReplicas"],
            [
                (m["resource"]["name"], m["resource"]["target"]["averageUtilization"])
                for m in h["spec"]["metrics"]
            ],
        )
        for h in objects("HorizontalPodAutoscaler")
    }
    assert bounds == {
        "bridge": ("StatefulSet", 2, 5, [("cpu", 70)]),
        "gateway": ("Deployment", 2, 4, [("cpu", 70)]),
        "projector-timeseries": ("Deployment", 1, 3, [("memory", 80)]),
        "analytics": ("Deployment", 1, 3, [("memory", 80)]),
    }
    budgets = {p["metadata"]["name"]: p["spec"] for p in objects("PodDisruptionBudget")}
    replicated = {c for c, (_, n, _, _) in COMPONENTS.items() if n > 1} | {"nats"}
    assert set(budgets) == replicated
    for name, spec in budgets.items():
        assert spec == {
            "maxUnavailable": 1,
            "selector": {"matchLabels": {"app.kubernetes.io/component": name}},
        }


# --- data services, jobs -----------------------------------------------------------------------
def test_volumes_are_sized_per_the_seed_on_local_path() -> None:
    sizes: dict[str, str] = {}
    for sts in objects("StatefulSet"):
        for claim in sts["spec"].get("volumeClaimTemplates", []):
            assert claim["spec"]["storageClassName"] == "local-path"
            sizes[sts["metadata"]["name"]] = claim["spec"]["resources"]["requests"]["storage"]
    for pvc in objects("PersistentVolumeClaim"):
        assert pvc["spec"]["storageClassName"] == "local-path"
        sizes[pvc["metadata"]["name"]] = pvc["spec"]["resources"]["requests"]["storage"]
    assert sizes == PVC_SIZES


def test_nats_is_a_three_node_jetstream_cluster_that_syncs_every_write() -> None:
    assert named("StatefulSet", "nats")["spec"]["replicas"] == 3
    (config,) = [c for c in objects("ConfigMap") if c["metadata"]["name"].startswith("nats-config")]
    conf = config["data"]["nats.conf"]
    assert re.search(r"^\s*sync_interval: always$", conf, re.MULTILINE)
    routes = re.findall(r"nats://(nats-\d)\.nats-headless:6222", conf)
    assert routes == ["nats-0", "nats-1", "nats-2"]
    (migrate,) = pod_spec(named("Job", "migrate"))["containers"]
    assert migrate["args"] == ["migrate", "--replicas", "3"]


def test_mosquitto_bootstraps_dynamic_security_and_listens_for_websockets() -> None:
    pod = pod_spec(named("Deployment", "mosquitto"))
    (init,) = pod["initContainers"]
    assert init["args"] == ["dynsec-init", "/mosquitto/data/dynamic-security.json"]
    (broker,) = pod["containers"]
    assert {p["containerPort"] for p in broker["ports"]} == {1883, 9001}
    external = named("Service", "mosquitto-external")
    assert external["spec"]["type"] == "LoadBalancer"
    assert {p["port"] for p in external["spec"]["ports"]} == {1883, 9001}


def test_backups_run_daily_with_seven_day_retention() -> None:
    commands = {}
    for cron in objects("CronJob"):
        assert re.fullmatch(r"\d+ \d+ \* \* \*", cron["spec"]["schedule"])
        (container,) = pod_spec(cron)["containers"]
        commands[cron["metadata"]["name"]] = container["args"][0]
    assert set(commands) == {"backup", "influxdb-backup", "report"}
    assert 'iot backup "/backups/iot/$stamp"' in commands["backup"]
    assert "influxd backup -portable -host influxdb:8088" in commands["influxdb-backup"]
    for name in ("backup", "influxdb-backup"):
        assert "-mtime +6 -exec rm -rf" in commands[name]


def test_daily_report_writes_yesterday_onto_its_volume_and_keeps_a_month() -> None:
    cron = named("CronJob", "report")
    pod = pod_spec(cron)
    (container,) = pod["containers"]
    script = container["args"][0]
    assert 'iot report --from "$yesterday" --to "$today"' in script
    assert '--out "/reports/fleet-$yesterday.html"' in script
    env = {e["name"]: e for e in container["env"]}
    assert env["KEEP"]["value"] == "31"
    assert {"name": "reports", "mountPath": "/reports"} in container["volumeMounts"]
    claims = {v["name"]: v.get("persistentVolumeClaim") for v in pod["volumes"]}
    assert claims["reports"] == {"claimName": "reports"}


def test_secrets_are_referenced_never_rendered() -> None:
    assert objects("Secret") == []
    referenced = set()
    for workload in workloads():
        pod = pod_spec(workload)
        for container in pod["containers"] + pod.get("initContainers", []):
            for env in container.get("env", []):
                ref = env.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    referenced.add((ref["name"], ref["key"]))
    assert referenced == {
        ("iot-api", "tokens"),
        ("iot-postgres", "password"),
        ("iot-redis", "password"),
        ("iot-mqtt", "admin-password"),
        ("iot-mqtt", "bridge-password"),
    }


def test_ingress_serves_gateway_and_command_api_over_tls() -> None:
    (ingress,) = objects("Ingress")
    assert ingress["spec"]["ingressClassName"] == "nginx"
    backends = {
        (r["host"], p["path"], p["pathType"]): p["backend"]["service"]
        for r in ingress["spec"]["rules"]
        for p in r["http"]["paths"]
    }
    assert backends == {
        ("api.neurobuildtech.local", "/", "Prefix"): {"name": "gateway", "port": {"number": 8082}},
        ("commands.neurobuildtech.local", "/", "Prefix"): {
            "name": "commands",
            "port": {"number": 8080},
        },
        ("commands.neurobuildtech.local", "/api/v1/rules/test", "Exact"): {
            "name": "analytics-headless",
            "port": {"number": 8083},
        },
    }
    (tls,) = ingress["spec"]["tls"]
    assert set(tls["hosts"]) == {host for host, _, _ in backends}


def test_the_dashboard_reaches_the_command_api_on_the_ingress_hosts() -> None:
    """The page on the gateway's host is told the command API's address, and the command
    API admits the page's origin (CORS); both as the settings parse them."""
    (ingress,) = objects("Ingress")
    gateway_host, commands_host = (r["host"] for r in ingress["spec"]["rules"])
    settings = load_settings(named("ConfigMap", "iot-config")["data"])
    assert settings.cors_origins == (f"https://{gateway_host}",)
    assert settings.commands_public_url == f"https://{commands_host}/api/v1"


# --- network policies --------------------------------------------------------------------------
External = tuple[str, str]
EXTERNAL_PEERS: dict[External, str] = {
    ("ingress-nginx", "ingress-nginx"): "ingress-nginx",
    ("monitoring", "prometheus"): "prometheus",
    ("monitoring", "grafana"): "grafana",
    ("kube-system", "kube-dns"): "dns",
}


def peer_name(peer: dict[str, Any], *, egress: bool = False) -> str:
    """A policy peer as a node of the graph: a component of this namespace, or an external one."""
    if "ipBlock" in peer:
        assert peer["ipBlock"] == {"cidr": "0.0.0.0/0"}
        return "internet" if egress else "devices"
    pods = peer["podSelector"]["matchLabels"]
    if "namespaceSelector" in peer:
        namespace = peer["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"]
        app = pods.get("app.kubernetes.io/name") or pods["k8s-app"]
        return EXTERNAL_PEERS[(namespace, app)]
    assert set(pods) == {"app.kubernetes.io/component"}
    name: str = pods["app.kubernetes.io/component"]
    return name


def selected(policy: dict[str, Any]) -> str:
    labels = policy["spec"]["podSelector"].get("matchLabels", {})
    return str(labels.get("app.kubernetes.io/component", "*"))


def policy_graph() -> set[tuple[str, str, int]]:
    """(from, to, port) allowed at both ends: the source's egress and the target's ingress."""
    ingress: set[tuple[str, str, int]] = set()
    egress: set[tuple[str, str, int]] = set()
    for policy in objects("NetworkPolicy"):
        node = selected(policy)
        for rule in policy["spec"].get("ingress", []):
            for peer in rule["from"]:
                for port in rule["ports"]:
                    ingress.add((peer_name(peer), node, port["port"]))
        for rule in policy["spec"].get("egress", []):
            for peer in rule["to"]:
                for port in rule["ports"]:
                    egress.add((node, peer_name(peer, egress=True), port["port"]))
    inside = {selected(p) for p in objects("NetworkPolicy")} - {"*"}
    edges = {e for e in ingress if e[0] not in inside or e in egress}
    edges |= {e for e in egress if e[1] not in inside}  # to the outside: DNS
    assert {e for e in egress if e[1] in inside} <= ingress, "egress without matching ingress"
    return edges


def documented_paths() -> set[tuple[str, str, int]]:
    """The "Network paths" table of deploy/README.md: | from | to | port | why |."""
    text = (ROOT / "deploy" / "README.md").read_text()
    section = text.split("<!-- network-paths -->")[1]
    paths = set()
    for line in section.split("<!-- /network-paths -->")[0].splitlines():
        cells = [
            [item.strip(" `") for item in cell.split(",")] for cell in line.strip("| ").split("|")
        ]
        if len(cells) < 3 or not cells[2][0].isdigit():
            continue  # the header and its rule
        sources, targets, ports = cells[:3]
        paths |= {(s, t, int(p)) for s in sources for t in targets for p in ports}
    return paths


def test_network_policies_deny_by_default() -> None:
    deny = named("NetworkPolicy", "default-deny")["spec"]
    assert deny == {"podSelector": {}, "policyTypes": ["Ingress", "Egress"]}
    for policy in objects("NetworkPolicy"):
        for rule in policy["spec"].get("ingress", []) + policy["spec"].get("egress", []):
            assert rule.get("ports"), f"{policy['metadata']['name']}: a rule without ports"


def test_network_policy_graph_is_the_documented_paths() -> None:
    documented = documented_paths()
    assert len(documented) > 20
    assert policy_graph() == documented


def test_every_pod_is_selected_by_a_policy_of_its_own() -> None:
    selected_components = {selected(p) for p in objects("NetworkPolicy")}
    for workload in workloads():
        assert component_of(workload) in selected_components, workload["metadata"]["name"]


# --- the image -------------------------------------------------------------------------------
INSTRUCTIONS = {
    "FROM", "RUN", "CMD", "LABEL", "EXPOSE", "ENV", "ADD", "COPY", "ENTRYPOINT", "VOLUME",
    "USER", "WORKDIR", "ARG", "ONBUILD", "STOPSIGNAL", "HEALTHCHECK", "SHELL",
}  # fmt: skip


def dockerfile() -> list[tuple[str, str]]:
    """(instruction, arguments) of the Dockerfile, continuation lines joined, comments dropped."""
    logical: list[str] = []
    pending = ""
    for raw in (ROOT / "Dockerfile").read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        logical.append(pending + line)
        pending = ""
    assert not pending, "the Dockerfile ends in a continuation"
    parsed = []
    for line in logical:
        instruction, _, args = line.partition(" ")
        assert instruction.upper() in INSTRUCTIONS, f"unknown instruction {instruction}"
        parsed.append((instruction.upper(), args.strip()))
    return parsed


def stages() -> list[list[tuple[str, str]]]:
    result: list[list[tuple[str, str]]] = []
    for instruction, args in dockerfile():
        if instruction == "FROM":
            result.append([])
        elif result:
            result[-1].append((instruction, args))
    return result


def test_dockerfile_is_multi_stage_from_slim_python_311() -> None:
    froms = [args for instruction, args in dockerfile() if instruction == "FROM"]
    assert len(froms) >= 2
    (arg,) = [a for i, a in dockerfile() if i == "ARG" and a.startswith("PYTHON_IMAGE=")]
    assert re.fullmatch(r"PYTHON_IMAGE=python:3\.11-slim(-\w+)?", arg)
    assert all(f.startswith("${PYTHON_IMAGE}") for f in froms)
    assert not any(re.search(r"amd64|arm64|aarch64|x86_64", a) for _, a in dockerfile())


def test_dockerfile_copies_only_paths_that_exist() -> None:
    copies = [a for i, a in dockerfile() if i in ("COPY", "ADD")]
    assert copies
    ignored = {
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    for args in copies:
        if args.startswith("--from="):
            continue
        *sources, _ = args.split()
        for source in sources:
            assert (ROOT / source).exists(), f"COPY {source}: no such path"
            assert source not in ignored, f"COPY {source} is excluded by .dockerignore"


def test_dockerfile_runtime_stage_is_non_root_without_build_tools_running_iot() -> None:
    final = stages()[-1]
    users = [a for i, a in final if i == "USER"]
    assert users, "no USER in the final stage"
    assert users[-1].split(":")[0] not in ("0", "root")
    runs = " ".join(a for i, a in final if i == "RUN")
    for tool in ("build-essential", "gcc", "make", "-dev "):
        assert tool not in runs, f"{tool} in the final stage"
    (entrypoint,) = [a for i, a in final if i == "ENTRYPOINT"]
    command = yaml.safe_load(entrypoint)[0]
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert command in scripts
