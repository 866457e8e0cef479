#!/usr/bin/env bash
# Prints the path of the virtual environment the operations checks run in (hadolint,
# kubernetes-validate, check-jsonschema, PyYAML, prometheus_client), building it first when
# needed. It lives outside the clone, under $GHMD_VENV_CACHE (default
# ${XDG_CACHE_HOME:-$HOME/.cache}/ghmd-ci), named by a hash of deploy/ci-requirements.txt and of
# the interpreter's version, so it is built once and reused until the pins change.
# Progress goes to stderr; stdout carries only the path.
set -euo pipefail
cd "$(dirname "$0")/.."

requirements=deploy/ci-requirements.txt
python=${PYTHON:-python3}
cache=${GHMD_VENV_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/ghmd-ci}

key=$({ cat "$requirements"; "$python" -c 'import sys; print(sys.version)'; } |
  sha256sum | cut -c1-16)
venv="$cache/ops-venv-$key"

# The marker is written last, so an interrupted build is never mistaken for a complete one.
if [[ ! -f "$venv/.ghmd-complete" ]]; then
  echo "== building the operations-checks environment in $venv" >&2
  rm -rf "$venv"
  mkdir -p "$cache"
  "$python" -m venv "$venv"
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check -r "$requirements" >&2
  "$venv/bin/hadolint" --version >&2
  "$venv/bin/python" -c 'import yaml, prometheus_client.openmetrics.parser' >&2
  touch "$venv/.ghmd-complete"
fi
echo "$venv"
