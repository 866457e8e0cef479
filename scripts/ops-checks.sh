#!/usr/bin/env bash
# The operations checks, with the real tools: hadolint on deploy/Dockerfile, the compose files
# against the Compose specification, deploy/k8s with kubernetes-validate (as written and as
# kubectl kustomize renders it), the HAProxy configs with haproxy -c, the nginx config with
# nginx -t, the 3-replica files against each other and ghmd's limits, the Grafana
# dashboard's queries with promtool; then a running ghmd: promtool check metrics on its scrape,
# the OpenMetrics scrape through a strict parser, and a real Prometheus server (Debian's
# prometheus package) scraping it and answering the request counts of known traffic.
#
# Needs promtool, prometheus, haproxy, nginx and kubectl on PATH (scripts/setup.sh installs
# Debian's packages) and builds its Python tools with scripts/ops-venv.sh. Called by
# scripts/test.sh.
set -euo pipefail
cd "$(dirname "$0")/.."

for tool in promtool prometheus curl haproxy nginx kubectl; do
  command -v "$tool" >/dev/null || { echo "ops-checks: $tool is not installed (scripts/setup.sh installs it)" >&2; exit 1; }
done
venv=$(scripts/ops-venv.sh)
py="$venv/bin/python"
work=$(mktemp -d)
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
  rm -rf "$work"
}
trap cleanup EXIT

echo "== hadolint: the Dockerfile and the local images' Containerfiles"
"$venv/bin/hadolint" deploy/Dockerfile deploy/podman/builder.Containerfile deploy/haproxy/Containerfile

echo "== compose files"
"$venv/bin/check-jsonschema" --builtin-schema vendor.compose-spec deploy/compose.yaml deploy/compose/compose.yaml
"$py" scripts/ops_checks.py compose

echo "== kubernetes manifests"
# ServiceMonitor and Kustomization have no schema in kubernetes-validate (it warns); the
# references between all of them are checked by ops_checks.py k8s and replicas.
"$venv/bin/kubernetes-validate" --strict --quiet deploy/k8s/*.yaml deploy/k8s/*/*.yaml
# Each kustomization as kubectl would apply it (generated ConfigMap and images included).
for dir in deploy/k8s deploy/k8s/haproxy deploy/k8s/ingress-nginx; do
  kubectl kustomize "$dir" >"$work/kustomized.yaml"
  "$venv/bin/kubernetes-validate" --strict --quiet "$work/kustomized.yaml"
done
"$py" scripts/ops_checks.py k8s

echo "== the 3-replica deployments: HAProxy and nginx configs, and how they agree"
# The replicas' names resolve only beside them (compose's or the cluster's DNS): HAProxy checks
# with the servers unresolved (init-addr none); nginx resolves upstreams when it loads, so its
# copy points them at loopback.
GHMD_NAMESERVER=127.0.0.1 haproxy -c -q -f deploy/haproxy/haproxy.cfg
NAMESPACE=default CLUSTER_DOMAIN=cluster.local haproxy -c -q -f deploy/k8s/haproxy/haproxy.cfg
sed -E 's/server ghmd-[0-9]+:/server 127.0.0.1:/' deploy/nginx/nginx.conf >"$work/nginx.conf"
nginx -q -t -c "$work/nginx.conf"
"$py" scripts/ops_checks.py replicas

echo "== Grafana dashboard queries"
"$py" scripts/ops_checks.py dashboard-rules "$work/dashboard-rules.yml"
promtool check rules "$work/dashboard-rules.yml"

echo "== a running ghmd"
cargo build --locked --quiet --bin ghmd --example ops_traffic
./target/debug/ghmd serve --listen 127.0.0.1:0 --metrics-listen 127.0.0.1:0 --in-memory \
  --job-metrics --log-format json 2>"$work/ghmd.log" &
pids+=($!)
logged_addr() { # the addr field of the JSON log line whose message is $1; empty until logged
  { grep -F "\"message\":\"$1\"" "$work/ghmd.log" || true; } | head -n1 |
    sed -E 's/.*"addr":"([^"]+)".*/\1/'
}
for _ in $(seq 100); do
  grpc=$(logged_addr "ghmd serving gRPC")
  metrics=$(logged_addr "ghmd serving /metrics, /healthz and /readyz")
  [[ -n "$grpc" && -n "$metrics" ]] && break
  sleep 0.1
done
[[ -n "$grpc" && -n "$metrics" ]] || { cat "$work/ghmd.log" >&2; echo "ghmd did not start" >&2; exit 1; }
./target/debug/ghmd health --addr "$grpc"
curl -fsS "http://$metrics/readyz"

harmonize_calls=7
./target/debug/examples/ops_traffic "http://$grpc" "$harmonize_calls"

echo "== promtool check metrics"
curl -fsS "http://$metrics/metrics" >"$work/metrics.txt"
promtool check metrics <"$work/metrics.txt"
"$py" scripts/ops_checks.py dashboard-metrics "$work/metrics.txt"

echo "== OpenMetrics"
curl -fsS -H 'Accept: application/openmetrics-text; version=1.0.0' "http://$metrics/metrics" >"$work/metrics.om"
tail -n1 "$work/metrics.om" | grep -qx '# EOF'
"$py" scripts/ops_checks.py openmetrics "$work/metrics.om"

echo "== Prometheus scraping ghmd"
prom_port=$("$py" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
cat >"$work/prometheus.yml" <<EOF
global:
  scrape_interval: 1s
scrape_configs:
  - job_name: ghmd
    static_configs:
      - targets: ["$metrics"]
EOF
promtool check config "$work/prometheus.yml"
prometheus --config.file="$work/prometheus.yml" --storage.tsdb.path="$work/tsdb" \
  --web.listen-address="127.0.0.1:$prom_port" --log.level=warn 2>"$work/prometheus.log" &
pids+=($!)
base="http://127.0.0.1:$prom_port"
"$py" scripts/ops_checks.py prometheus-query "$base" 'up{job="ghmd"}' 1 60
"$py" scripts/ops_checks.py prometheus-query "$base" \
  'ghmd_requests_total{job="ghmd",method="ghm.v1.Harmonizer/Harmonize",code="OK"}' "$harmonize_calls" 60
"$py" scripts/ops_checks.py prometheus-query "$base" \
  'ghmd_requests_total{job="ghmd",method="ghm.v1.Harmonizer/GetJob",code="NOT_FOUND"}' 1 60
"$py" scripts/ops_checks.py prometheus-query "$base" 'sum(ghmd_jobs{job="ghmd"})' 1 60
"$py" scripts/ops_checks.py prometheus-query "$base" \
  'count(ghmd_job_density{job="ghmd",job_id="ops-check"})' 10 60
echo "ops checks passed"
