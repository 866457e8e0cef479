"""The checks of scripts/ops-checks.sh that need a parser: the deployment files against each
other, the Grafana dashboard against ghmd's metrics, and an OpenMetrics scrape.

Each subcommand prints what it checked and exits non-zero with the reason on the first fault.
"""

import json
import re
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"


def fail(message: str) -> None:
    print(f"FAIL: {message}", file=sys.stderr)
    sys.exit(1)


def compose() -> None:
    """Every file the compose file mounts or builds from exists, and its ports are ghmd's."""
    path = DEPLOY / "compose.yaml"
    spec = yaml.safe_load(path.read_text())
    services = spec.get("services", {})
    for name in ("ghmd", "prometheus", "grafana"):
        if name not in services:
            fail(f"{path}: no service {name!r}")
    build = services["ghmd"]["build"]
    context = (DEPLOY / build["context"]).resolve()
    if not (context / build["dockerfile"]).is_file():
        fail(f"{path}: ghmd's Dockerfile {context / build['dockerfile']} does not exist")
    for name, service in services.items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                if not (DEPLOY / source).exists():
                    fail(f"{path}: {name} mounts {source}, which does not exist")
            elif source not in (spec.get("volumes") or {}):
                fail(f"{path}: {name} mounts the undeclared volume {source!r}")
    ports = services["ghmd"]["ports"]
    if "50051:50051" not in ports or "9464:9464" not in ports:
        fail(f"{path}: ghmd does not publish 50051 and 9464: {ports}")
    scrape = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    targets = [t for job in scrape["scrape_configs"] for c in job["static_configs"] for t in c["targets"]]
    if "ghmd:9464" not in targets:
        fail(f"prometheus.yml does not scrape ghmd:9464: {targets}")
    print(f"compose: {len(services)} services, every mount and the build context exist")


def k8s() -> None:
    """The kustomization lists every manifest, and the pieces refer to each other correctly."""
    k8s_dir = DEPLOY / "k8s"
    kustomization = yaml.safe_load((k8s_dir / "kustomization.yaml").read_text())
    listed = set(kustomization["resources"])
    present = {p.name for p in k8s_dir.glob("*.yaml")} - {"kustomization.yaml"}
    if listed != present:
        fail(f"kustomization.yaml lists {sorted(listed)}, the directory holds {sorted(present)}")
    docs = [d for name in sorted(listed) for d in yaml.safe_load_all((k8s_dir / name).read_text()) if d]
    by_kind = {}
    for doc in docs:
        by_kind.setdefault(doc["kind"], []).append(doc)
    (statefulset,) = by_kind["StatefulSet"]
    (monitor,) = by_kind["ServiceMonitor"]
    services = {s["metadata"]["name"]: s for s in by_kind["Service"]}
    spec = statefulset["spec"]
    if spec["replicas"] != 1:
        fail("the StatefulSet must have exactly one replica: ghmd keeps its jobs in one process")
    if spec["serviceName"] not in services:
        fail(f"the StatefulSet's serviceName {spec['serviceName']!r} is not a Service here")
    pod = spec["template"]
    (container,) = pod["spec"]["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    if ports != {"grpc": 50051, "metrics": 9464}:
        fail(f"container ports {ports}")
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        if container[probe].get("grpc", {}).get("port") != 50051:
            fail(f"{probe} is not a native gRPC probe on 50051")
    if "limits" not in container["resources"] or "requests" not in container["resources"]:
        fail("the container needs resource requests and limits")
    claims = {c["metadata"]["name"] for c in spec["volumeClaimTemplates"]}
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    env = {e["name"]: e.get("value") for e in container["env"]}
    data_dir = env.get("GHMD_DATA_DIR")
    if not any(name in claims and path == data_dir for name, path in mounts.items()):
        fail(f"GHMD_DATA_DIR {data_dir} is not on a volumeClaimTemplate")
    labels = pod["metadata"]["labels"]
    for name, service in services.items():
        selector = service["spec"]["selector"]
        if any(labels.get(k) != v for k, v in selector.items()):
            fail(f"Service {name} selects {selector}, the pod has {labels}")
    (served,) = [
        s for s in services.values()
        if all(s["metadata"].get("labels", {}).get(k) == v
               for k, v in monitor["spec"]["selector"]["matchLabels"].items())
        and s["spec"].get("clusterIP") != "None"
    ]
    port_names = {p["name"] for p in served["spec"]["ports"]}
    for endpoint in monitor["spec"]["endpoints"]:
        if endpoint["port"] not in port_names:
            fail(f"the ServiceMonitor scrapes port {endpoint['port']!r}, Service has {port_names}")
    images = {i["name"] for i in kustomization.get("images", [])}
    image = container["image"].split(":")[0]
    if image not in images:
        fail(f"kustomization.yaml sets images {images}, the container runs {image}")
    print(f"k8s: {len(docs)} objects, references between them hold")


def dashboard_exprs() -> list:
    dashboard = json.loads((DEPLOY / "grafana" / "dashboards" / "ghmd.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    for variable in dashboard.get("templating", {}).get("list", []):
        query = variable.get("query")
        if isinstance(query, dict):
            query = query.get("query", "")
        match = re.fullmatch(r"label_values\((\w+),\s*\w+\)", query or "")
        if match:
            exprs.append(match.group(1))
    return exprs


def dashboard_rules(out: str) -> None:
    """The dashboard's queries as recording rules, for `promtool check rules` to parse."""
    rules = []
    for index, expr in enumerate(dashboard_exprs()):
        concrete = expr.replace("$__rate_interval", "1m").replace("$job_id", "some-job")
        rules.append({"record": f"dashboard:query_{index}", "expr": concrete})
    Path(out).write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    print(f"dashboard: {len(rules)} queries written as rules to {out}")


def dashboard_metrics(scrape: str) -> None:
    """Every metric the dashboard queries is one ghmd exports."""
    families = set()
    for line in Path(scrape).read_text().splitlines():
        if line.startswith("# TYPE "):
            families.add(line.split()[2])
    names = set()
    for expr in dashboard_exprs():
        names.update(n for n in re.findall(r"\bghmd_[a-z_]+", expr))
    exported = set()
    for name in names:
        base = re.sub(r"_(bucket|sum|count)$", "", name)
        if name in families or base in families:
            exported.add(name)
    missing = names - exported
    if missing:
        fail(f"the dashboard queries metrics ghmd does not export: {sorted(missing)}")
    print(f"dashboard: all {len(names)} metrics it queries are exported")


def openmetrics(path: str) -> None:
    """A scrape parses as OpenMetrics 1.0 with the strict parser of the Python client."""
    from prometheus_client.openmetrics.parser import text_string_to_metric_families

    text = Path(path).read_text()
    families = list(text_string_to_metric_families(text))
    names = {f.name for f in families}
    for required in ("ghmd_build", "ghmd_requests", "ghmd_request_duration_seconds", "ghmd_jobs",
                     "ghmd_job_density"):
        if required not in names:
            fail(f"the OpenMetrics scrape has no {required}: {sorted(names)}")
    print(f"openmetrics: {len(families)} families parse")


def prometheus_query(base: str, query: str, expected: str, timeout: str) -> None:
    """Asks a Prometheus server until `query` answers exactly `expected`."""
    deadline = time.monotonic() + float(timeout)
    url = f"{base}/api/v1/query?{urllib.parse.urlencode({'query': query})}"
    last = None
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                answer = json.load(response)
            result = answer["data"]["result"]
            last = result
            if len(result) == 1 and result[0]["value"][1] == expected:
                print(f"prometheus: {query} = {expected}")
                return
        except OSError as error:
            last = error
        time.sleep(0.5)
    fail(f"prometheus never answered {query} = {expected}; last answer: {last}")


if __name__ == "__main__":
    command, *args = sys.argv[1:]
    {
        "compose": compose,
        "k8s": k8s,
        "dashboard-rules": dashboard_rules,
        "dashboard-metrics": dashboard_metrics,
        "openmetrics": openmetrics,
        "prometheus-query": prometheus_query,
    }[command](*args)
