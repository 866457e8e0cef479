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


def ghmd_default(flag_env: str, pattern: str) -> str:
    """A default of src/config.rs, found by the flag's environment variable, so that the proxies'
    limits are checked against what ghmd really enforces."""
    source = (ROOT / "src" / "config.rs").read_text()
    match = re.search(re.escape(f'env = "{flag_env}"') + r"[^\n]*?" + pattern, source)
    if not match:
        fail(f"src/config.rs: no default found for {flag_env}")
    return match.group(1)


def max_step_timeout_s() -> float:
    text = ghmd_default("GHMD_MAX_STEP_TIMEOUT", r'default_value = "([^"]+)"')
    return duration_s(text)


def max_recv_message_bytes() -> int:
    expr = ghmd_default("GHMD_MAX_RECV_MESSAGE_BYTES", r"default_value_t = ([^,)\]]+)")
    return int(eval(expr, {"MIB": 1024 * 1024}))  # e.g. "64 * MIB"


UNITS_S = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}
UNITS_BYTES = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3}


def duration_s(text: str) -> float:
    """10m, 660s, 500ms (HAProxy, nginx, humantime), or a bare number of seconds."""
    match = re.fullmatch(r"(\d+)(ms|s|m|h|d)?", text.strip().strip('"'))
    if not match:
        fail(f"cannot read the duration {text!r}")
    return int(match.group(1)) * UNITS_S[match.group(2) or "s"]


def size_bytes(text: str) -> int:
    match = re.fullmatch(r"(\d+)([kmg]?)", text.strip().lower())
    if not match:
        fail(f"cannot read the size {text!r}")
    return int(match.group(1)) * UNITS_BYTES[match.group(2)]


def haproxy_directives(path: Path) -> list:
    """(section header, directive line) pairs, comments dropped."""
    pairs, section = [], None
    for raw in path.read_text().splitlines():
        line = raw.split("#", 1)[0].rstrip()
        if not line.strip():
            continue
        if not line[0].isspace():
            section = line.strip()
        else:
            pairs.append((section, line.strip()))
    return pairs


def check_haproxy(path: Path, replica_names: list, metrics_port: int) -> list:
    """The routing, health checks and timeouts of a shipped HAProxy config; returns its servers'
    addresses."""
    pairs = haproxy_directives(path)
    backend = [line for section, line in pairs if section == "backend ghmd"]
    for required in ("balance hdr(x-ghmd-job)", "hash-type consistent", "option httpchk GET /readyz"):
        if required not in backend:
            fail(f"{path}: backend ghmd lacks `{required}`")
    (default_server,) = [line for line in backend if line.startswith("default-server ")]
    words = default_server.split()
    # Each word mapped to the next: the value of every "keyword value" option.
    options = dict(zip(words, words[1:]))
    if options.get("proto") != "h2" or options.get("check-proto") != "h1":
        fail(f"{path}: the replicas need proto h2 (gRPC) and check-proto h1 (/readyz): {default_server}")
    if int(options.get("port", 0)) != metrics_port:
        fail(f"{path}: health checks on port {options.get('port')}, ghmd's /readyz is on {metrics_port}")
    if duration_s(options.get("inter", "2s")) > 0.5:
        fail(f"{path}: health checks every {options.get('inter', '2s')}, not 500ms")
    servers = [line.split() for line in backend if line.startswith("server ")]
    if [server[1] for server in servers] != replica_names:
        fail(f"{path}: servers {[server[1] for server in servers]}, the replicas are {replica_names}")
    frontend = [line for section, line in pairs if section == "frontend grpc"]
    if not any(line.startswith("bind ") and line.endswith("proto h2") for line in frontend):
        fail(f"{path}: the gRPC frontend does not bind with proto h2")
    defaults = {" ".join(line.split()[:2]): line.split()[2] for section, line in pairs
                if section == "defaults" and line.startswith("timeout ")}
    step = max_step_timeout_s()
    for name in ("timeout client", "timeout server"):
        if duration_s(defaults.get(name, "0")) <= step:
            fail(f"{path}: {name} {defaults.get(name)} is not above --max-step-timeout ({step:.0f} s)")
    if any("http-buffer-request" in line for _, line in pairs):
        fail(f"{path}: http-buffer-request would cap bodies at tune.bufsize")
    return [server[2].strip('"') for server in servers]


def replicas() -> None:
    """The 3-replica deployments (compose, HAProxy, nginx, Kubernetes) agree with each other and
    with ghmd's limits."""
    step, body = max_step_timeout_s(), max_recv_message_bytes()
    # --- compose
    path = DEPLOY / "compose" / "compose.yaml"
    spec = yaml.safe_load(path.read_text())
    services = spec["services"]
    names = sorted(name for name in services if name.startswith("ghmd-"))
    if names != ["ghmd-0", "ghmd-1", "ghmd-2"]:
        fail(f"{path}: replicas {names}")
    volumes = [services[name]["volumes"][0].split(":") for name in names]
    if len({source for source, _ in volumes}) != 3 or {target for _, target in volumes} != {"/var/lib/ghmd"}:
        fail(f"{path}: each replica needs its own volume on /var/lib/ghmd: {volumes}")
    for name in names:
        build = services[name]["build"]
        if not ((path.parent / build["context"]).resolve() / build["dockerfile"]).is_file():
            fail(f"{path}: {name} builds from a Dockerfile that does not exist")
    haproxy = services["haproxy"]
    mounts = [volume.split(":") for volume in haproxy["volumes"]]
    ((config_source, config_target, _),) = mounts
    config = (path.parent / config_source).resolve()
    if config != DEPLOY / "haproxy" / "haproxy.cfg" or config_target != "/usr/local/etc/haproxy/haproxy.cfg":
        fail(f"{path}: HAProxy mounts {config_source} on {config_target}")
    if "/usr/local/etc/haproxy/haproxy.cfg" not in (DEPLOY / "haproxy" / "Containerfile").read_text():
        fail("deploy/haproxy/Containerfile does not read /usr/local/etc/haproxy/haproxy.cfg")
    addresses = check_haproxy(config, names, 9464)
    if addresses != [f"{name}:50051" for name in names]:
        fail(f"{config}: servers at {addresses}")
    print(f"replicas: compose runs {len(names)} replicas behind HAProxy; {config.name} routes them")

    # --- Kubernetes
    k8s = DEPLOY / "k8s"
    docs = {}
    for directory in ("replicas", "haproxy", "ingress-nginx"):
        kustomization = yaml.safe_load((k8s / directory / "kustomization.yaml").read_text())
        local = {p.name for p in (k8s / directory).glob("*.yaml")} - {"kustomization.yaml"}
        listed = {r for r in kustomization["resources"] if not r.startswith("..")}
        if listed != local:
            fail(f"k8s/{directory}/kustomization.yaml lists {sorted(listed)}, the directory holds {sorted(local)}")
        for generator in kustomization.get("configMapGenerator", []):
            for name in generator["files"]:
                if not (k8s / directory / name).is_file():
                    fail(f"k8s/{directory}: the ConfigMap file {name} does not exist")
        docs[directory] = [d for name in sorted(local) for d in yaml.safe_load_all((k8s / directory / name).read_text()) if d]
    (statefulset,) = [d for d in docs["replicas"] if d["kind"] == "StatefulSet"]
    headless = {d["metadata"]["name"]: d for d in docs["replicas"] if d["kind"] == "Service"}
    spec_ = statefulset["spec"]
    if spec_["replicas"] != 3:
        fail(f"k8s/replicas: {spec_['replicas']} replicas, not 3")
    service = headless.get(spec_["serviceName"])
    if service is None or service["spec"].get("clusterIP") != "None":
        fail(f"k8s/replicas: the StatefulSet's serviceName {spec_['serviceName']} is not a headless Service")
    (container,) = spec_["template"]["spec"]["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    pods = [f"{statefulset['metadata']['name']}-{i}" for i in range(3)]
    k8s_config = k8s / "haproxy" / "haproxy.cfg"
    addresses = check_haproxy(k8s_config, pods, ports["metrics"])
    expected = [f"{pod}.{spec_['serviceName']}.${{NAMESPACE}}.svc.${{CLUSTER_DOMAIN}}:{ports['grpc']}" for pod in pods]
    if addresses != expected:
        fail(f"{k8s_config}: servers at {addresses}, the pods are {expected}")
    # The two HAProxy configs differ only in how they find the replicas.
    def routing(path: Path) -> list:
        return [(section, line) for section, line in haproxy_directives(path)
                if section != "resolvers local" and not line.startswith("server ")]
    if routing(config) != routing(k8s_config):
        fail(f"{config} and {k8s_config} differ beyond their resolvers and servers")
    (deployment,) = [d for d in docs["haproxy"] if d["kind"] == "Deployment"]
    pod_spec = deployment["spec"]["template"]["spec"]
    (proxy,) = pod_spec["containers"]
    env = {e["name"] for e in proxy.get("env", [])}
    if not {"NAMESPACE", "CLUSTER_DOMAIN"} <= env:
        fail(f"k8s/haproxy: HAProxy needs NAMESPACE and CLUSTER_DOMAIN for its servers, has {env}")
    (volume,) = pod_spec["volumes"]
    (mount,) = proxy["volumeMounts"]
    if volume["configMap"]["name"] != "ghmd-haproxy" or mount["mountPath"] + "/haproxy.cfg" not in proxy["args"]:
        fail("k8s/haproxy: the ConfigMap ghmd-haproxy is not the config HAProxy reads")
    (entry,) = [d for d in docs["haproxy"] if d["kind"] == "Service"]
    if entry["spec"]["selector"] != deployment["spec"]["template"]["metadata"]["labels"]:
        fail("k8s/haproxy: the Service ghmd does not select the HAProxy pods")
    (ingress,) = [d for d in docs["ingress-nginx"] if d["kind"] == "Ingress"]
    notes = ingress["metadata"]["annotations"]
    prefix = "nginx.ingress.kubernetes.io/"
    if notes.get(prefix + "upstream-hash-by") != "$http_x_ghmd_job" or notes.get(prefix + "backend-protocol") != "GRPC":
        fail("k8s/ingress-nginx: the Ingress must hash by $http_x_ghmd_job and speak GRPC")
    for name in ("proxy-read-timeout", "proxy-send-timeout"):
        if duration_s(notes.get(prefix + name, "60")) <= step:
            fail(f"k8s/ingress-nginx: {name} {notes.get(prefix + name)} is not above --max-step-timeout")
    if size_bytes(notes.get(prefix + "proxy-body-size", "1m")) <= body:
        fail(f"k8s/ingress-nginx: proxy-body-size is not above --max-recv-message-bytes ({body})")
    backends = {p["backend"]["service"]["name"] for r in ingress["spec"]["rules"] for p in r["http"]["paths"]}
    services = {d["metadata"]["name"]: d for d in docs["ingress-nginx"] if d["kind"] == "Service"}
    pod_labels = spec_["template"]["metadata"]["labels"]
    for name in backends:
        selector = services.get(name, {}).get("spec", {}).get("selector")
        if not selector or any(pod_labels.get(k) != v for k, v in selector.items()):
            fail(f"k8s/ingress-nginx: the Ingress sends to {name}, which does not select the replicas")
    print("replicas: k8s StatefulSet of 3, its headless Service, HAProxy and the Ingress agree")

    # --- nginx
    path = DEPLOY / "nginx" / "nginx.conf"
    text = re.sub(r"#[^\n]*", "", path.read_text())
    directives = {}
    # A block's head ("upstream ghmd {") is a statement of its own, like a directive.
    for statement in text.replace("{", ";").replace("}", ";").split(";"):
        words = statement.split()
        if words:
            directives.setdefault(words[0], []).append(words[1:])
    if ["$http_x_ghmd_job", "consistent"] not in directives.get("hash", []):
        fail(f"{path}: no `hash $http_x_ghmd_job consistent`")
    servers = [words[0] for words in directives.get("server", []) if words and ":" in words[0]]
    if servers != [f"{name}:50051" for name in names]:
        fail(f"{path}: upstream servers {servers}")
    for name in ("grpc_read_timeout", "grpc_send_timeout", "client_body_timeout"):
        (value,) = directives.get(name, [["0"]])
        if duration_s(value[0]) <= step:
            fail(f"{path}: {name} {value[0]} is not above --max-step-timeout")
    (value,) = directives.get("client_max_body_size", [["1m"]])
    if size_bytes(value[0]) <= body:
        fail(f"{path}: client_max_body_size {value[0]} is not above --max-recv-message-bytes ({body})")
    if not any(words[0] == "grpc://ghmd" for words in directives.get("grpc_pass", [])):
        fail(f"{path}: no grpc_pass grpc://ghmd")
    print(f"replicas: nginx hashes by x-ghmd-job; timeouts above {step:.0f} s, bodies above {body} bytes")


if __name__ == "__main__":
    command, *args = sys.argv[1:]
    {
        "compose": compose,
        "k8s": k8s,
        "dashboard-rules": dashboard_rules,
        "dashboard-metrics": dashboard_metrics,
        "openmetrics": openmetrics,
        "prometheus-query": prometheus_query,
        "replicas": replicas,
    }[command](*args)
