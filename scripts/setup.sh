#!/usr/bin/env bash
# Installs what scripts/test.sh needs on a fresh machine, and does nothing that is already done:
# rustfmt and clippy; openssl (the Python client's TLS test certificates); Debian's prometheus
# (promtool and a real Prometheus server) and curl; haproxy, nginx and kubectl for the deployment
# checks; podman, buildah, podman-compose, debootstrap, runc and CNI's dnsname plugin for the
# container tests; the Python test environment and the
# operations tools, each in a virtual environment outside the clone, keyed by its pinned
# requirements; cargo-fuzz, built once under ~/.cache/ghmd-ci. Needs root for apt-get, as on CI.
set -euo pipefail
cd "$(dirname "$0")/.."

rustup component add rustfmt clippy >/dev/null 2>&1 || true
missing=()
command -v openssl >/dev/null || missing+=(openssl)
command -v curl >/dev/null || missing+=(curl)
{ command -v promtool >/dev/null && command -v prometheus >/dev/null; } || missing+=(prometheus)
# The proxies and kubectl (kustomize) of the deployment checks; podman and what
# scripts/container-test.sh builds and runs images with.
for tool in haproxy nginx podman buildah podman-compose debootstrap runc; do
  command -v "$tool" >/dev/null || missing+=("$tool")
done
command -v kubectl >/dev/null || missing+=(kubernetes-client)
[[ -x /usr/lib/cni/dnsname ]] || missing+=(golang-github-containernetworking-plugin-dnsname)
if [ ${#missing[@]} -gt 0 ]; then
  echo "== apt-get install ${missing[*]}" >&2
  apt-get update -qq
  # The tests start their own haproxy and nginx on loopback: the packages' services (nginx on
  # 0.0.0.0:80) are not started (policy-rc.d 101, only while installing, if none is there).
  policy=/usr/sbin/policy-rc.d
  own_policy=false
  if [ ! -e "$policy" ]; then printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod +x "$policy" && own_policy=true; fi
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  if $own_policy; then rm -f "$policy"; fi
fi
scripts/python-venv.sh >/dev/null
scripts/ops-venv.sh >/dev/null
fuzz_root="$HOME/.cache/ghmd-ci/cargo-fuzz"
if [ ! -x "$fuzz_root/bin/cargo-fuzz" ]; then
  echo "== cargo install cargo-fuzz (once)" >&2
  cargo install cargo-fuzz --locked --quiet --root "$fuzz_root"
fi
