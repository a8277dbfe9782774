#!/usr/bin/env bash
# CI check of the cluster deployment (deploy/) and the image (Dockerfile), offline:
# 1. kubectl (Debian package) renders every overlay and the monitoring unit (deploy/observability)
#    with `kubectl kustomize`;
# 2. kubernetes-validate checks every rendered object against the Kubernetes 1.30 schemas, strictly
#    (an unknown field fails);
# 3. checkov scans the rendered objects: no failed check allowed; every skip is a
#    `checkov.io/skipN` annotation with its reason in the manifest, listed below;
# 4. the NATS configuration parses (`nats-server -t`, the binary of the dev extra in .venv), the
#    Alertmanager configuration (`amtool check-config`), the Prometheus configuration and alert
#    rules (`promtool check` and `promtool test rules`).
# Each tool gets its own virtual environment under $DEPLOY_CHECK_VENVS (checkov's pins conflict
# with the test tools). Fails loudly on the first error; about a minute once the venvs exist.
set -euo pipefail

cd "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")/.."
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1
VENVS="${DEPLOY_CHECK_VENVS:-/tmp/iot-deploy-check}"
K8S_VERSION="${K8S_VERSION:-1.30.0}"
OUT="$(mktemp -d)"
trap 'rm -rf "$OUT"' EXIT
start=$SECONDS

fail() { echo "deploy-check: FAILED: $*" >&2; exit 1; }

echo "== deploy-check: tools"
if ! command -v kubectl >/dev/null; then
    if [ "$(id -u)" = 0 ]; then
        apt-get update -qq && apt-get install -y -qq kubectl >/dev/null || fail "apt-get install kubectl"
    else
        fail "kubectl is not installed (Debian package kubectl; run as root or install it)"
    fi
fi
kubectl version --client 2>/dev/null | sed 's/^/   /'

tool_venv() {  # tool_venv NAME PACKAGE: a venv with PACKAGE at $VENVS/NAME
    local dir="$VENVS/$1"
    if [ ! -x "$dir/bin/$1" ]; then
        python3 -m venv "$dir" || fail "python3 -m venv $dir"
        "$dir/bin/pip" install -q "$2" >"$OUT/pip-$1.log" 2>&1 \
            || { cat "$OUT/pip-$1.log" >&2; fail "pip install $2 into $dir"; }
    fi
}
tool_venv kubernetes-validate "kubernetes-validate>=1.30"
tool_venv checkov "checkov>=3.2"
echo "   kubernetes-validate $("$VENVS/kubernetes-validate/bin/kubernetes-validate" --version)"
echo "   checkov $("$VENVS/checkov/bin/checkov" --version)"

overlays=(deploy/overlays/*/)
[ "${#overlays[@]}" -gt 0 ] && [ -d "${overlays[0]}" ] || fail "no overlay under deploy/overlays/"
# every overlay, then the monitoring stack, which is applied on its own (deploy/README.md, Monitoring)
units=("${overlays[@]}" deploy/observability/)
for overlay in "${units[@]}"; do
    name="$(basename "$overlay")"
    rendered="$OUT/$name.yaml"
    echo "== deploy-check: $overlay"
    kubectl kustomize "$overlay" >"$rendered" || fail "kubectl kustomize $overlay"
    objects="$(grep -c '^kind: ' "$rendered")"
    echo "   rendered $objects objects"

    "$VENVS/kubernetes-validate/bin/kubernetes-validate" --strict --quiet \
        -k "$K8S_VERSION" "$rendered" || fail "kubernetes-validate ($K8S_VERSION) of $overlay"
    echo "   kubernetes-validate $K8S_VERSION --strict: $objects objects valid"

    # --skip-download: no network for Prisma Cloud's guidelines; the checks are all local.
    "$VENVS/checkov/bin/checkov" --compact --skip-download --framework kubernetes \
        -f "$rendered" -o json >"$OUT/$name.checkov.json" 2>"$OUT/$name.checkov.err" || true
    [ -s "$OUT/$name.checkov.json" ] || { cat "$OUT/$name.checkov.err" >&2; fail "checkov gave no report"; }
    python3 - "$OUT/$name.checkov.json" <<'PY' || fail "checkov on $overlay"
import json, sys
report = json.load(open(sys.argv[1]))
report = report[0] if isinstance(report, list) else report
summary = report["summary"]
print(f"   checkov: {summary['passed']} passed, {summary['failed']} failed, "
      f"{summary['skipped']} skipped, {summary['parsing_errors']} parsing errors, "
      f"{summary['resource_count']} resources")
for check in report["results"]["failed_checks"]:
    print(f"   FAILED {check['check_id']} {check['check_name']}: {check['resource']}")
reasons = {}
for check in report["results"]["skipped_checks"]:
    reason = (check.get("check_result") or {}).get("suppress_comment") or ""
    if not reason.strip():
        print(f"   SKIPPED WITHOUT A REASON {check['check_id']}: {check['resource']}")
        sys.exit(1)
    reasons.setdefault((check["check_id"], reason), []).append(check["resource"])
for (check_id, reason), resources in sorted(reasons.items()):
    print(f"   skipped {check_id} on {len(resources)} resources: {reason}")
sys.exit(1 if summary["failed"] or summary["parsing_errors"] else 0)
PY
done

echo "== deploy-check: NATS configuration"
# The dev extra's nats-server (2.10+); the machine's own may predate sync_interval (2.9 does).
nats_server=.venv/bin/nats-server
[ -x "$nats_server" ] || fail "$nats_server not found: run make install first"
echo "   $("$nats_server" --version)"
POD_NAME=nats-0 "$nats_server" -c deploy/base/nats/nats.conf -t || fail "nats-server -t"
echo

echo "== deploy-check: Alertmanager configuration"
# amtool comes with Debian's prometheus-alertmanager, which .ci/services.sh installs.
command -v amtool >/dev/null || fail "amtool not found: apt-get install -y prometheus-alertmanager"
amtool check-config deploy/base/alertmanager/alertmanager.yml || fail "amtool check-config"
echo

echo "== deploy-check: Prometheus configuration and alert rules"
# promtool comes with Debian's prometheus, which .ci/services.sh installs. The cluster's
# configuration names a service-account token that exists only in a pod: syntax only.
command -v promtool >/dev/null || fail "promtool not found: apt-get install -y prometheus"
(
    cd deploy/observability
    promtool check config --syntax-only prometheus.yml
    promtool check rules alerts.yml
    promtool test rules alerts_test.yml
) || fail "promtool"
echo

echo "== deploy-check: passed in $((SECONDS - start)) s"
