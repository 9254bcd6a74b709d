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
echo "[setup] ready"
