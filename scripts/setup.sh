#!/usr/bin/env bash
# Install everything the demo and the tests need: a virtualenv with the package and its dev
# tools, and the Kafka jars from Maven Central. Safe to run again: it skips what is current.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

python=${PYTHON:-python3}
if [[ ! -x .venv/bin/python ]]; then
  echo "[setup] creating .venv"
  "$python" -m venv .venv
fi
stamp=.venv/.installed-sha
want=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [[ ! -f $stamp || $(cat "$stamp") != "$want" ]]; then
  echo "[setup] installing Python packages (tensorflow is large: a few minutes the first time)"
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -e '.[dev]'
  echo "$want" >"$stamp"
fi
deploy/local-kafka/kafka.sh fetch
# promtool checks the Prometheus config and alert rules in the tests (Debian's prometheus).
if ! command -v promtool >/dev/null 2>&1; then
  echo "[setup] installing promtool (Debian package prometheus)"
  sudo=$([[ $(id -u) -eq 0 ]] || echo sudo)
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends prometheus \
    >/dev/null
fi
echo "[setup] ready"
