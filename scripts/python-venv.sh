#!/usr/bin/env bash
# Prints the path of the Python virtual environment the Python tests run in, building it first
# when needed. It lives outside the clone, under $GHMD_VENV_CACHE (default
# ${XDG_CACHE_HOME:-$HOME/.cache}/ghmd-ci), named by a hash of clients/python/requirements-ci.txt
# and of the interpreter's version, so a fresh machine builds it once (about a minute: torch's
# wheels are large) and every later run, by CI or by hand, reuses it until the pins change.
# Progress goes to stderr; stdout carries only the path.
set -euo pipefail
cd "$(dirname "$0")/.."

requirements=clients/python/requirements-ci.txt
python=${PYTHON:-python3}
cache=${GHMD_VENV_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/ghmd-ci}

key=$({ cat "$requirements"; "$python" -c 'import sys; print(sys.version)'; } |
  sha256sum | cut -c1-16)
venv="$cache/venv-$key"

# The marker is written last, so an interrupted build is never mistaken for a complete one.
if [[ ! -f "$venv/.ghmd-complete" ]]; then
  echo "== building the Python test environment in $venv" >&2
  rm -rf "$venv"
  mkdir -p "$cache"
  "$python" -m venv "$venv"
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check --no-deps \
    -r "$requirements" >&2
  # --no-deps skips the resolver's checks: prove the pieces import together before trusting it.
  "$venv/bin/python" -W ignore -c \
    'import grpc, grpc_tools, grpc_health, numpy, pytest, torch, mmcv, mmdet, mmengine.runner' >&2
  touch "$venv/.ghmd-complete"
fi
echo "$venv"
