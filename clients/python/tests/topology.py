"""Real ghmd replicas with data dirs, and real proxies in front of them (Debian's haproxy and
nginx), for the healing tests, the fault schedule (test_failover.py) and bench_failover.py.

Each replica keeps its port across restarts, so that a proxy's consistent hash sends a job back
to it; its state survives in its data dir up to the last snapshot, as in production. The proxy
configs are rendered from the shipped ones (deploy/haproxy/haproxy.cfg, deploy/nginx/nginx.conf)
by substituting loopback ports for the replicas' names, so that what is shipped is what is
tested; a checkout without them falls back to the minimal configs below, which keep the
settings the issue names (hash routing on x-ghmd-job, h2, /readyz checks, limits above ghmd's).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import List, Optional, Sequence

from conftest import REPO_ROOT, free_port, ghmd_binary

# GHMD_DEPLOY_DIR: another checkout's deploy/ (to try a config before it lands).
DEPLOY = Path(os.environ.get("GHMD_DEPLOY_DIR", REPO_ROOT / "deploy"))
SHIPPED_HAPROXY = DEPLOY / "haproxy" / "haproxy.cfg"
SHIPPED_NGINX = DEPLOY / "nginx" / "nginx.conf"


class Replica:
    """One ghmd process on fixed loopback ports with its own data dir."""

    def __init__(self, workdir: Path, name: str, *extra_args: str, snapshot_interval="200ms"):
        self.name = name
        self.port = free_port()
        self.metrics_port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.data_dir = workdir / name
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = workdir / f"{name}.log"
        self.extra_args = extra_args
        self.snapshot_interval = snapshot_interval
        self.process: Optional[subprocess.Popen] = None

    def start(self, wait: bool = True) -> "Replica":
        # scripts/test.sh runs pytest with GHMD_IN_MEMORY=true for its one shared server; these
        # replicas keep their state in their data dirs, as in production.
        env = {key: value for key, value in os.environ.items() if not key.startswith("GHMD_")}
        env["RUST_LOG"] = os.environ.get("RUST_LOG", "warn")
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [str(ghmd_binary()), "serve", "--listen", self.address,
                 "--metrics-listen", f"127.0.0.1:{self.metrics_port}",
                 "--data-dir", str(self.data_dir),
                 "--snapshot-interval", self.snapshot_interval,
                 "--shutdown-grace", "5s", *self.extra_args],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
            )
        if wait:
            self.wait_ready()
        return self

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(
                f"http://127.0.0.1:{self.metrics_port}/readyz", timeout=1
            ) as reply:
                return reply.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while not self.ready():
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.process.returncode}: "
                                   f"{self.log_path.read_text()[-2000:]}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.name} not ready after {timeout}s")
            time.sleep(0.02)

    def kill(self) -> None:
        """kill -9: no snapshot, no goodbye; whatever came after the last snapshot is lost."""
        self.process.send_signal(signal.SIGKILL)
        self.process.wait()

    def pause(self) -> None:
        self.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        self.process.send_signal(signal.SIGCONT)

    def terminate(self, timeout: float = 30.0) -> int:
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGCONT)
            self.terminate()

    def metrics(self) -> str:
        with urllib.request.urlopen(
            f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5
        ) as reply:
            return reply.read().decode()

    def counter(self, family: str, **labels: str) -> float:
        """The sum of a counter family's samples whose labels include ``labels``."""
        total = 0.0
        for line in self.metrics().splitlines():
            match = re.match(rf"^{re.escape(family)}(?:_total)?(\{{[^}}]*\}})?\s+(\S+)", line)
            if match and all(f'{key}="{value}"' in (match.group(1) or "")
                             for key, value in labels.items()):
                total += float(match.group(2))
        return total


_FALLBACK_HAPROXY = """\
# The harness's own config (no deploy/haproxy/haproxy.cfg in this checkout).
global
    maxconn 4096
defaults
    mode http
    timeout connect 2s
    timeout client 11m
    timeout server 11m
    timeout http-keep-alive 11m
    timeout check 1s
    retries 1
    option redispatch 1
frontend grpc
    bind :50051 proto h2
    default_backend ghmd
backend ghmd
    balance hdr(x-ghmd-job)
    hash-type consistent
    option httpchk GET /readyz
    http-check expect status 200
    default-server proto h2 check port 9464 check-proto h1 inter 500ms fastinter 500ms \
        downinter 500ms fall 2 rise 2 on-marked-down shutdown-sessions
    server ghmd-0 ghmd-0:50051
    server ghmd-1 ghmd-1:50051
    server ghmd-2 ghmd-2:50051
frontend stats
    bind :8404
    stats enable
    stats uri /stats
"""

_FALLBACK_NGINX = """\
# The harness's own config (no deploy/nginx/nginx.conf in this checkout).
worker_processes auto;
error_log stderr warn;
pid /tmp/ghmd-nginx.pid;
events { worker_connections 4096; }
http {
    access_log off;
    upstream ghmd {
        hash $http_x_ghmd_job consistent;
        server ghmd-0:50051 max_fails=1 fail_timeout=10s;
        server ghmd-1:50051 max_fails=1 fail_timeout=10s;
        server ghmd-2:50051 max_fails=1 fail_timeout=10s;
        keepalive 64;
        keepalive_timeout 11m;
    }
    server {
        listen 50051 http2;
        client_max_body_size 80m;
        client_body_timeout 11m;
        grpc_read_timeout 11m;
        grpc_send_timeout 11m;
        grpc_connect_timeout 2s;
        keepalive_timeout 11m;
        grpc_next_upstream error timeout;
        grpc_next_upstream_tries 2;
        location / { grpc_pass grpc://ghmd; }
    }
}
"""


def render_haproxy(shipped: str, port: int, stats_port: int, replicas: Sequence[Replica]) -> str:
    """The shipped config with loopback ports: the frontends bind 127.0.0.1, each `server
    ghmd-N ghmd-N:50051` line points at replica N and checks its metrics port."""
    text = re.sub(r"^(\s*bind\s+):50051\b", rf"\g<1>127.0.0.1:{port}", shipped, flags=re.M)
    text = re.sub(r"^(\s*bind\s+):8404\b", rf"\g<1>127.0.0.1:{stats_port}", text, flags=re.M)
    # The replicas' names are container DNS names; loopback addresses need no resolver.
    text = re.sub(r" resolvers \S+", "", text)

    def server(match: "re.Match[str]") -> str:
        replica = replicas[int(match.group(2))]
        return (f"{match.group(1)}server {replica.name} {replica.address} "
                f"port {replica.metrics_port}{match.group(3)}")

    text, servers = re.subn(r"^(\s*)server ghmd-(\d+) ghmd-\d+:50051(.*)$", server, text,
                            flags=re.M)
    if servers != len(replicas):
        raise ValueError(f"the HAProxy config names {servers} ghmd servers, not {len(replicas)}")
    return text


def render_nginx(shipped: str, port: int, workdir: Path, replicas: Sequence[Replica]) -> str:
    text = re.sub(r"^(\s*listen\s+)50051\b", rf"\g<1>127.0.0.1:{port}", shipped, flags=re.M)
    text = re.sub(r"^pid\s+\S+;", f"pid {workdir / 'nginx.pid'};", text, flags=re.M)
    text = re.sub(r"access_log\s+[^;]+;", "access_log off;", text)

    def server(match: "re.Match[str]") -> str:
        return f"{match.group(1)}server {replicas[int(match.group(2))].address}{match.group(3)}"

    text, servers = re.subn(r"^(\s*)server ghmd-(\d+):50051(.*)$", server, text, flags=re.M)
    if servers != len(replicas):
        raise ValueError(f"the nginx config names {servers} ghmd servers, not {len(replicas)}")
    return text


class Proxy:
    """A proxy process in front of the replicas, listening on 127.0.0.1:port."""

    kind = ""

    def __init__(self, workdir: Path, replicas: Sequence[Replica]) -> None:
        self.workdir = workdir / self.kind
        self.workdir.mkdir(parents=True, exist_ok=True)
        # nginx's workers run as nobody and keep their temporary files here.
        os.chmod(self.workdir, 0o777)
        self.replicas = list(replicas)
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.log_path = self.workdir / "proxy.log"
        self.process: Optional[subprocess.Popen] = None

    def command(self) -> List[str]:
        raise NotImplementedError

    def routes_to(self, replica: Replica) -> bool:
        """Whether the proxy would now send a request to ``replica`` again."""
        return replica.ready()

    def start(self) -> "Proxy":
        binary = self.command()[0]
        if not os.path.exists(binary):
            raise RuntimeError(f"no {binary}: Debian's {self.kind} is needed (scripts/setup.sh)")
        check = subprocess.run(self.check_command(), capture_output=True, text=True)
        if check.returncode != 0:
            raise RuntimeError(f"{self.kind} refuses its config: {check.stdout}{check.stderr}")
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                return self
            except OSError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"{self.kind} did not start: "
                                       f"{self.log_path.read_text()[-2000:]}")
                time.sleep(0.05)

    def replica_failed(self, replica: Replica) -> None:
        """The test stopped ``replica``: what the proxy then does is its own business."""

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


class HAProxy(Proxy):
    kind = "haproxy"

    def __init__(self, workdir: Path, replicas: Sequence[Replica]) -> None:
        super().__init__(workdir, replicas)
        self.stats_port = free_port()
        self.shipped = SHIPPED_HAPROXY.is_file()
        template = SHIPPED_HAPROXY.read_text() if self.shipped else _FALLBACK_HAPROXY
        self.config = self.workdir / "haproxy.cfg"
        self.config.write_text(render_haproxy(template, self.port, self.stats_port, replicas))

    def check_command(self) -> List[str]:
        return [haproxy_binary(), "-c", "-q", "-f", str(self.config)]

    def command(self) -> List[str]:
        return [haproxy_binary(), "-db", "-f", str(self.config)]

    def routes_to(self, replica: Replica) -> bool:
        return self.status().get(replica.name, "").startswith("UP")

    def status(self) -> dict:
        """Each replica's state as HAProxy sees it (UP, DOWN, ...), from the stats CSV."""
        with urllib.request.urlopen(
            f"http://127.0.0.1:{self.stats_port}/stats;csv", timeout=5
        ) as reply:
            lines = reply.read().decode().splitlines()
        header = lines[0].lstrip("# ").split(",")
        states = {}
        for line in lines[1:]:
            row = dict(zip(header, line.split(",")))
            if row.get("pxname") == "ghmd" and row.get("svname") not in ("BACKEND", "FRONTEND"):
                states[row["svname"]] = row["status"]
        return states


class Nginx(Proxy):
    kind = "nginx"

    def __init__(self, workdir: Path, replicas: Sequence[Replica]) -> None:
        super().__init__(workdir, replicas)
        self.shipped = SHIPPED_NGINX.is_file()
        template = SHIPPED_NGINX.read_text() if self.shipped else _FALLBACK_NGINX
        self.config = self.workdir / "nginx.conf"
        text = render_nginx(template, self.port, self.workdir, replicas)
        self.config.write_text(text)
        # nginx takes a server out for fail_timeout after max_fails failed attempts, and lets
        # nothing tell it the server is back (no active checks): it tries again only after that.
        timeouts = re.findall(r"fail_timeout=(\d+)s", text)
        self.fail_timeout = max(map(int, timeouts)) if timeouts else 10
        self.failed_at: dict = {}

    def routes_to(self, replica: Replica) -> bool:
        failed = self.failed_at.get(replica.name)
        return replica.ready() and (failed is None or time.monotonic() - failed > self.fail_timeout)

    def replica_failed(self, replica: Replica) -> None:
        self.failed_at[replica.name] = time.monotonic()

    def check_command(self) -> List[str]:
        return [nginx_binary(), "-t", "-q", "-p", str(self.workdir), "-c", str(self.config),
                "-g", "daemon off;"]

    def command(self) -> List[str]:
        return [nginx_binary(), "-p", str(self.workdir), "-c", str(self.config),
                "-g", "daemon off;"]


def haproxy_binary() -> str:
    return shutil.which("haproxy") or "/usr/sbin/haproxy"


def nginx_binary() -> str:
    return shutil.which("nginx") or "/usr/sbin/nginx"
