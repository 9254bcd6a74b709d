#!/usr/bin/env bash
# The test command: lint, type-check, then every test tier. The integration tests start their
# own Kafka broker (tests/conftest.py) on 127.0.0.1:19092 and stop it at the end.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
scripts/setup.sh
export TF_CPP_MIN_LOG_LEVEL=2
.venv/bin/ruff check streamer training tests bench
.venv/bin/ruff format --check streamer training tests bench
.venv/bin/mypy
rc=0
.venv/bin/python -m pytest --doctest-modules streamer training tests "$@" || rc=$?
if [[ $rc -eq 5 ]]; then
  echo "pytest collected no tests: that is a failure here" >&2
  exit 1
fi
exit $rc
