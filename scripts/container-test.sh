#!/usr/bin/env bash
# The container image and the 3-replica deployment, built and run for real with Debian's podman:
#   images   a local Debian base image (debootstrap minbase, docs/man/locales trimmed), a builder
#            image with Debian's Rust, HAProxy's image, then deploy/Dockerfile built from them.
#            The base and builder images are kept in podman's storage and made only when missing.
#   single   one ghmd container: gRPC health, a Harmonize from the host, /metrics scraped, SIGTERM,
#            the last snapshot on a mounted volume, a new container from that volume with the
#            job's state back (GetJob equal).
#   compose  deploy/compose/compose.yaml with podman-compose: 3 replicas behind HAProxy, a training
#            client on the host through HAProxy, the replica holding the job killed and restarted,
#            the weights checked against a ghmd that never failed; torn down leaving nothing.
# With no argument it runs all three. Needs root (apt-get, podman), as on CI. Called by
# scripts/test.sh when podman is installed.
#
# podman reads its settings from $CONTAINERS_CONF, a file under ~/.cache/ghmd-ci, so that the
# machine's own /etc/containers stays as it is: runc (crun refuses this VM's hybrid cgroups) and
# ulimits at the VM's limits (a container may not raise them).
set -euo pipefail
cd "$(dirname "$0")/.."

cache=${GHMD_CI_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/ghmd-ci}
mirror=${GHMD_DEBIAN_MIRROR:-http://deb.debian.org/debian}
security_mirror=${GHMD_DEBIAN_SECURITY_MIRROR:-${mirror}-security}
base_image=localhost/debian:bookworm-slim
builder_image=localhost/ghmd-builder:bookworm
ghmd_image=localhost/ghmd:local
haproxy_image=localhost/ghmd-haproxy:local
# Build containers trust what the host trusts (a proxy's CA included), read-only.
ca_dir=${GHMD_CA_DIR:-/etc/ssl/certs}

# Without systemd podman cannot time HEALTHCHECKs and says so on every run and stop; the check
# itself is run by hand (podman healthcheck run).
podman() { command podman "$@" 2> >(grep -v 'unable to get systemd connection' >&2); }

log() { echo "== container-test: $*" >&2; }
die() { echo "container-test: FAIL: $*" >&2; exit 1; }

install_tools() {
  local missing=()
  local tool
  for tool in podman buildah podman-compose debootstrap; do
    command -v "$tool" >/dev/null || missing+=("$tool")
  done
  # Service names resolve between compose containers only with CNI's dnsname plugin.
  [[ -x /usr/lib/cni/dnsname ]] || missing+=(golang-github-containernetworking-plugin-dnsname)
  command -v runc >/dev/null || missing+=(runc)
  if [[ ${#missing[@]} -gt 0 ]]; then
    log "apt-get install ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  fi
  mkdir -p "$cache/containers"
  export CONTAINERS_CONF="$cache/containers/containers.conf"
  cat >"$CONTAINERS_CONF" <<'EOF'
[containers]
default_ulimits = ["nofile=20000:20000", "nproc=32768:32768"]

[engine]
runtime = "runc"
EOF
}

image_exists() { podman image exists "$1"; }

make_base_image() {
  if image_exists "$base_image"; then
    log "$base_image is there"
    return
  fi
  log "debootstrap --variant=minbase bookworm from $mirror into $base_image"
  # A fixed place under the cache, so that an interrupted run's leftovers are removed by the next.
  local rootfs="$cache/base-rootfs" started=$SECONDS
  rm -rf "$rootfs"
  debootstrap --variant=minbase bookworm "$rootfs" "$mirror" >"$cache/debootstrap.log" 2>&1 ||
    { tail -n 30 "$cache/debootstrap.log" >&2; die "debootstrap failed"; }
  cat >"$rootfs/etc/apt/sources.list" <<EOF
deb $mirror bookworm main
deb $mirror bookworm-updates main
deb $security_mirror bookworm-security main
EOF
  # As in Docker Hub's slim images: packages installed later skip their docs, man pages and
  # locales too (copyright files stay).
  cat >"$rootfs/etc/dpkg/dpkg.cfg.d/ghmd-slim" <<'EOF'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/info/*
path-exclude /usr/share/locale/*
path-include /usr/share/locale/locale.alias
path-exclude /usr/share/lintian/*
EOF
  # ...and apt keeps neither the packages it downloaded nor its binary caches in a layer.
  cat >"$rootfs/etc/apt/apt.conf.d/ghmd-slim" <<'EOF'
APT::Install-Recommends "false";
APT::Install-Suggests "false";
APT::Keep-Downloaded-Packages "false";
Acquire::Languages "none";
Dir::Cache::pkgcache "";
Dir::Cache::srcpkgcache "";
DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb || true"; };
EOF
  find "$rootfs/usr/share/doc" -mindepth 1 -not -name copyright -not -type d -delete
  find "$rootfs/usr/share/doc" -mindepth 1 -type d -empty -delete
  rm -rf "$rootfs"/usr/share/{man,info,lintian}/* "$rootfs"/var/cache/apt/*.bin \
    "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
  find "$rootfs/usr/share/locale" -mindepth 1 -maxdepth 1 -not -name locale.alias -exec rm -rf {} +
  tar -C "$rootfs" -c . | podman import --quiet --change 'CMD ["/bin/bash"]' - "$base_image" >/dev/null
  rm -rf "$rootfs"
  log "$base_image imported $((SECONDS - started)) s after debootstrap began, $(image_size "$base_image")"
}

make_builder_image() {
  if image_exists "$builder_image"; then
    log "$builder_image is there"
    return
  fi
  log "building $builder_image (Debian's rustc-web and cargo-web)"
  build_image "$builder_image" --build-arg BASE_IMAGE="$base_image" \
    -f deploy/podman/builder.Containerfile deploy/podman
}

# podman build IMAGE ARGS..., its output in a log under the cache, shown when it fails.
build_image() {
  local image=$1 started=$SECONDS name=${1##*/}
  local build_log="$cache/${name/:/-}-build.log"
  podman build -t "$image" "${@:2}" >"$build_log" 2>&1 ||
    { tail -n 60 "$build_log" >&2; die "podman build of $image failed"; }
  log "$image built in $((SECONDS - started)) s, $(image_size "$image")"
}

make_images() {
  local started=$SECONDS
  make_base_image
  make_builder_image
  log "building $haproxy_image"
  build_image "$haproxy_image" --build-arg BASE_IMAGE="$base_image" \
    -f deploy/haproxy/Containerfile deploy/haproxy
  log "building $ghmd_image from deploy/Dockerfile"
  # --format docker keeps the HEALTHCHECK; the cache mounts keep cargo's registry and target
  # directory between builds, so a changed source rebuilds only ghmd itself.
  build_image "$ghmd_image" --format docker --build-arg BUILD_IMAGE="$builder_image" \
    --build-arg RUNTIME_IMAGE="$base_image" -v "$ca_dir:/etc/ssl/certs:ro" -f deploy/Dockerfile .
  log "images ready in $((SECONDS - started)) s"
}

image_size() { podman image inspect --format '{{.Size}}' "$1" | awk '{printf "%.1f MB", $1 / 1e6}'; }

# Everything a test starts is removed on exit, however it exits.
containers=()
projects=()
dirs=()
cleanup() {
  local name
  for name in "${containers[@]}"; do podman rm --force --volumes --time 0 "$name" >/dev/null 2>&1 || true; done
  for name in "${projects[@]}"; do compose_down "$name" >/dev/null 2>&1 || true; done
  rm -rf "${dirs[@]}"
}
trap cleanup EXIT

since() { awk -v from="$1" -v now="$(date +%s.%N)" 'BEGIN { printf "%.2f", now - from }'; }

free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

client() { "$venv/bin/python" scripts/container_client.py "$@"; }

# The JSON log line of a container whose message is $2, or nothing.
logged() { podman logs "$1" 2>&1 | grep -F "\"message\":\"$2\"" || true; }

single_test() {
  venv=$(scripts/python-venv.sh)
  local name="ghmd-ct-single-$$" data grpc_port metrics_port pid
  data=$(mktemp -d)
  dirs+=("$data")
  chown 10001:10001 "$data"
  grpc_port=$(free_port)
  metrics_port=$(free_port)
  [[ $(podman image inspect --format '{{.Config.User}}' "$ghmd_image") == 10001:10001 ]] ||
    die "$ghmd_image does not run as 10001:10001"
  log "single: podman run --read-only $ghmd_image, state on a mounted directory"
  containers+=("$name" "$name-restarted")
  local started
  started=$(date +%s.%N)
  # --health-interval disable: no systemd here to time the HEALTHCHECK; it is run by hand below.
  podman run --detach --name "$name" --read-only --health-interval disable -v "$data:/var/lib/ghmd" \
    -p "127.0.0.1:$grpc_port:50051" -p "127.0.0.1:$metrics_port:9464" "$ghmd_image" serve --job-metrics >/dev/null
  client health "127.0.0.1:$grpc_port"
  log "single: ready $(since "$started") s after podman run"
  # The image's own HEALTHCHECK (ghmd health inside the container).
  podman healthcheck run "$name" || die "the HEALTHCHECK of $name failed"
  pid=$(podman inspect --format '{{.State.Pid}}' "$name")
  [[ $(stat -c %u "/proc/$pid") == 10001 ]] || die "ghmd runs as uid $(stat -c %u "/proc/$pid"), not 10001"
  if podman exec "$name" /bin/sh -c true >/dev/null 2>&1; then die "the image has a shell"; fi

  local job=container-single steps=5
  client steps "127.0.0.1:$grpc_port" "$job" "$steps" >"$data.before.json"
  dirs+=("$data.before.json")
  log "single: $steps Harmonize calls from the host; state $(cat "$data.before.json")"
  curl -fsS "http://127.0.0.1:$metrics_port/readyz" >/dev/null
  local metrics
  metrics=$(curl -fsS "http://127.0.0.1:$metrics_port/metrics")
  grep -E "^ghmd_requests_total\{.*method=\"ghm.v1.Harmonizer/Harmonize\".*code=\"OK\".*\} $steps$" <<<"$metrics" >/dev/null ||
    die "/metrics does not count $steps Harmonize OK: $(grep '^ghmd_requests_total' <<<"$metrics")"
  grep -E "^ghmd_job_density\{.*job_id=\"$job\"" <<<"$metrics" >/dev/null || die "/metrics has no density of $job"
  log "single: /metrics counts the $steps calls"

  log "single: podman stop (SIGTERM)"
  podman stop --time 40 "$name" >/dev/null
  [[ $(podman inspect --format '{{.State.ExitCode}}' "$name") == 0 ]] || die "ghmd exited $(podman inspect --format '{{.State.ExitCode}}' "$name") on SIGTERM"
  [[ -n $(logged "$name" "final snapshot done") ]] || die "no final snapshot: $(podman logs "$name" 2>&1 | tail -n 5)"
  ls "$data" | grep -q . || die "the mounted directory is empty after the final snapshot"

  log "single: a new container on the same directory"
  podman run --detach --name "$name-restarted" --read-only --health-interval disable -v "$data:/var/lib/ghmd" \
    -p "127.0.0.1:$grpc_port:50051" "$ghmd_image" serve >/dev/null
  client health "127.0.0.1:$grpc_port"
  [[ $(logged "$name-restarted" "state loaded") == *'"jobs":1'* ]] || die "the restarted ghmd did not load 1 job"
  client get-job "127.0.0.1:$grpc_port" "$job" >"$data.after.json"
  dirs+=("$data.after.json")
  cmp -s "$data.before.json" "$data.after.json" ||
    die "GetJob after the restart $(cat "$data.after.json") differs from before $(cat "$data.before.json")"
  podman stop --time 40 "$name-restarted" >/dev/null
  podman rm --volumes "$name" "$name-restarted" >/dev/null
  log "single: passed (the state came back bit for bit)"
}

compose_file=deploy/compose/compose.yaml

compose() { podman-compose --no-ansi -p "$1" -f "$compose_file" "${@:2}"; }

# podman-compose 1.0.3 leaves the project's network behind after `down`; its volumes go with -v.
compose_down() {
  compose "$1" down -v -t 40 >/dev/null 2>&1 || true
  podman network rm --force "$1_default" >/dev/null 2>&1 || true
  local volume
  for volume in $(podman volume ls -q --filter "label=io.podman.compose.project=$1"); do
    podman volume rm --force "$volume" >/dev/null
  done
}

# The replicas HAProxy counts fully UP, from its stats page. "UP 1/2" (one check failed) and
# "DOWN 1/2" (one passed) are on their way and do not count: a test step that starts then could
# see the route change under it.
replicas_up() {
  curl -fsS "http://127.0.0.1:$stats_port/stats;csv" 2>/dev/null |
    awk -F, '$1 == "ghmd" && $2 ~ /^ghmd-/ && $18 == "UP" { print $2 }' | sort | tr '\n' ' ' || true
}

wait_replicas_up() { # $1: the names, sorted, space-separated
  local _
  for _ in $(seq 200); do
    [[ "$(replicas_up)" == "$1 " ]] && return
    sleep 0.1
  done
  die "HAProxy counts $(replicas_up)UP, not $1"
}

compose_test() {
  venv=$(scripts/python-venv.sh)
  local project="ghmd-ct-$$" grpc_port reference_port
  grpc_port=$(free_port)
  stats_port=$(free_port)
  reference_port=$(free_port)
  projects+=("$project")
  log "compose: podman-compose -p $project up (3 replicas + HAProxy)"
  local started=$SECONDS
  GHMD_GRPC_PORT=$grpc_port GHMD_STATS_PORT=$stats_port compose "$project" up -d --no-build \
    >"$cache/compose-up.log" 2>&1 || { tail -n 30 "$cache/compose-up.log" >&2; die "podman-compose up failed"; }
  wait_replicas_up "ghmd-0 ghmd-1 ghmd-2"
  log "compose: HAProxy counts 3 replicas UP $((SECONDS - started)) s after up"
  # The reference: one ghmd that never fails, fed the same inputs.
  containers+=("$project-reference")
  podman run --detach --name "$project-reference" --health-interval disable -p "127.0.0.1:$reference_port:50051" \
    "$ghmd_image" serve --in-memory >/dev/null
  client health "127.0.0.1:$reference_port"

  local ledger job=container-compose
  ledger=$(mktemp)
  dirs+=("$ledger")
  local proxy="127.0.0.1:$grpc_port" reference="127.0.0.1:$reference_port"
  # A pause longer than --snapshot-interval (5 s) in the middle, so that the replica's state file
  # holds the job some steps before it dies: back from the restart, that copy is stale.
  client train "$proxy" "$reference" "$job" 0 30 "$ledger"
  sleep 6
  client train "$proxy" "$reference" "$job" 30 40 "$ledger"
  local holder
  holder=$("$venv/bin/python" -c 'import json, sys; print(json.load(open(sys.argv[1]))["replicas"][-1])' "$ledger")
  [[ $holder == ghmd-[012] ]] || die "the job was served by $holder, not a replica"
  local container="${project}_${holder}_1"
  log "compose: kill -9 of $holder, which holds the job"
  podman kill --signal KILL "$container" >/dev/null
  podman wait "$container" >/dev/null 2>&1 || true
  # Until clients heal themselves, the test's client starts its steps once HAProxy has taken the
  # replica out (and, below, once it has put it back): a step that raced the change of route
  # could reach the stale copy between the client's check and its step.
  wait_replicas_up "$(printf '%s\n' ghmd-0 ghmd-1 ghmd-2 | grep -vx "$holder" | tr '\n' ' ' | sed 's/ $//')"
  client train "$proxy" "$reference" "$job" 40 80 "$ledger"
  log "compose: $holder restarted"
  podman start "$container" >/dev/null
  wait_replicas_up "ghmd-0 ghmd-1 ghmd-2"
  # Counted UP is not yet reached: wait until the job's calls answer from it, promptly (calls
  # hung for a minute on a dead pooled connection before haproxy.cfg said `http-reuse never`).
  client route "$proxy" "$job" "$holder" || {
    curl -s "http://127.0.0.1:$stats_port/stats;csv" | grep "^ghmd,$holder" >&2
    podman logs "${project}_haproxy_1" 2>&1 | grep -v 'GET\|POST' | tail -n 12 >&2
    die "the restarted $holder is not reached through HAProxy"
  }
  client train "$proxy" "$reference" "$job" 80 120 "$ledger"
  "$venv/bin/python" - "$ledger" "$holder" <<'EOF'
import json, sys
ledger, holder = json.load(open(sys.argv[1])), sys.argv[2]
replicas = ledger["replicas"]
if len(set(replicas)) < 2 or replicas[0] != holder:
    sys.exit(f"the job never moved away from {holder}: {replicas}")
reseeds = ledger["reseeds"]
# Once on the replica that took over, once more on the restarted one (stale or empty).
if reseeds["not_found"] < 1 or reseeds["not_found"] + reseeds["stale"] < 2:
    sys.exit(f"the job was not reseeded on the replica that took over and on the restarted one: {reseeds}")
EOF

  log "compose: podman-compose down"
  podman rm --force --volumes --time 0 "$project-reference" >/dev/null
  compose_down "$project"
  local left
  left="$(podman ps -aq --filter "label=io.podman.compose.project=$project")$(podman volume ls -q --filter "label=io.podman.compose.project=$project")$(podman network ls -q --filter "name=^$project")"
  [[ -z $left ]] || die "the project left behind: $left"
  log "compose: passed (120 steps bit-identical to the reference across a kill and a restart; nothing left)"
}

main() {
  local started=$SECONDS
  install_tools
  local commands=("$@")
  [[ ${#commands[@]} -gt 0 ]] || commands=(images single compose)
  local command
  for command in "${commands[@]}"; do
    case "$command" in
      images) make_images ;;
      single) single_test ;;
      compose) compose_test ;;
      *) die "unknown command $command (images, single, compose)" ;;
    esac
  done
  log "done in $((SECONDS - started)) s"
}

main "$@"
