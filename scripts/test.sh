#!/usr/bin/env bash
# The test command: lint, type-check, then every test tier. The integration tests start their
# own Kafka broker (tests/conftest.py) on 127.0.0.1:19092, or on $TEST_KAFKA_PORT when set, and
# stop it at the end.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
scripts/setup.sh
export TF_CPP_MIN_LOG_LEVEL=2
.venv/bin/ruff check streamer training tests bench eval
.venv/bin/ruff format --check streamer training tests bench eval
.venv/bin/mypy
check() {
  local rc=0
  "$@" || rc=$?
  if [[ $rc -eq 5 ]]; then
    echo "pytest collected no tests: that is a failure here" >&2
    return 1
  fi
  return $rc
}
rc=0
check .venv/bin/python -m pytest --doctest-modules streamer training tests "$@" || rc=$?
# The integration suite again with the other Kafka client the daemon offers (README: Kafka
# client): every daemon the tests start reads STREAMER_KAFKA__CLIENT.
STREAMER_KAFKA__CLIENT=confluent check .venv/bin/python -m pytest tests/integration "$@" || rc=$?
exit $rc
