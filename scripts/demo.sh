#!/usr/bin/env bash
# The local demo, start to finish: a fresh Kafka broker, simulated training history, a trained
# bundle, the detector daemon, a labeled live stream with injected anomalies, the alerts as
# they arrive, the metrics, and a clean stop of everything it started.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
scripts/setup.sh

export TF_CPP_MIN_LOG_LEVEL=2
export KAFKA_PORT=${DEMO_KAFKA_PORT:-39092}
events=${DEMO_EVENTS:-15000}
rate=${DEMO_RATE:-1500}
out=demo-out
py=.venv/bin/python
bootstrap=127.0.0.1:$KAFKA_PORT
# The shipped config, pointed at the demo's broker and bundle through environment overrides.
export STREAMER_KAFKA__BOOTSTRAP_SERVERS=$bootstrap
export STREAMER_MODEL__BUNDLE=$out/registry
export STREAMER_METRICS__PORT=${DEMO_METRICS_PORT:-9108}
config=config/orders.toml
metrics=http://127.0.0.1:$STREAMER_METRICS__PORT

pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
  deploy/local-kafka/kafka.sh stop
}
trap cleanup EXIT
step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

rm -rf "$out" && mkdir -p "$out"
step "1/6 Kafka: a fresh single-node KRaft broker on $bootstrap"
deploy/local-kafka/kafka.sh reset
deploy/local-kafka/kafka.sh start
$py - "$bootstrap" <<'PY'
import sys
from kafka.admin import KafkaAdminClient, NewTopic
admin = KafkaAdminClient(bootstrap_servers=sys.argv[1])
admin.create_topics([NewTopic("orders", 4, 1)], wait_for_metadata=True)
print("created topic orders (4 partitions)")
PY

step "2/6 Training history: 30,000 simulated orders"
$py -m training simulate --profile orders --count 30000 --anomaly-rate 0 --seed 1 \
  --out "$out/train.jsonl"

step "3/6 Training: dense autoencoder -> versioned bundle in $out/registry"
$py -m training fit --config "$config" --events "$out/train.jsonl" 2>&1 | grep -v '^WARNING\|^I0000\|^E0000'

step "4/6 Detector: python -m streamer run --config $config"
$py -m streamer run --config "$config" >"$out/daemon.log" 2>&1 &
pids+=($!)
for _ in $(seq 1 120); do
  curl -fs "$metrics/readyz" >/dev/null 2>&1 && break
  sleep 0.5
done
curl -fs "$metrics/readyz" || { echo "detector did not get ready:"; tail -30 "$out/daemon.log"; exit 1; }
# Process substitution, so $! is the tail itself and the cleanup can stop it.
$py -m streamer tail --config "$config" --from-beginning > >(tee "$out/alerts.txt") &
pids+=($!)

step "5/6 Live stream: $events orders at $rate/s with 1% injected anomalies (labels in $out/labels.csv)"
$py -m training simulate --profile orders --count "$events" --anomaly-rate 0.01 --seed 2 \
  --topic orders --bootstrap "$bootstrap" --rate "$rate" --labels "$out/labels.csv"
for _ in $(seq 1 120); do
  consumed=$(curl -fs "$metrics/metrics" | awk '/^anomaly_events_consumed_total/ {print int($2)}')
  [[ ${consumed:-0} -ge $events ]] && break
  sleep 0.5
done
sleep 1

step "6/6 Metrics ($metrics/metrics) and how the alerts compare with the labels"
curl -fs "$metrics/metrics" | grep -E '^anomaly_(events_consumed|events_scored|alerts_published|threshold|model_info|consumer_lag)' || true
$py - "$bootstrap" "$out/labels.csv" <<'PY'
import csv, json, sys
from kafka import KafkaConsumer
consumer = KafkaConsumer("orders-alerts", bootstrap_servers=sys.argv[1], auto_offset_reset="earliest",
                         consumer_timeout_ms=3000)
alerted = {json.loads(r.value)["event_id"] for r in consumer}
labels = {r["event_id"]: r["kind"] for r in csv.DictReader(open(sys.argv[2])) if r["is_anomaly"] == "1"}
hits = len(alerted & labels.keys())
print(f"\n{len(alerted)} alerts; {hits} of {len(labels)} injected anomalies caught "
      f"(recall {hits / max(1, len(labels)):.2f}, precision {hits / max(1, len(alerted)):.2f})")
PY
echo
echo "Detector log: $out/daemon.log   Alerts: $out/alerts.txt   Bundle: $(cat "$out/registry/current")"
echo "Stopping the detector (SIGTERM: finish batch, flush, commit) and the broker."
kill -TERM "${pids[0]}"
wait "${pids[0]}" && echo "detector exited 0"
