#!/usr/bin/env bash
# A real single-node Apache Kafka (KRaft) on 127.0.0.1, from Maven Central jars.
#
#   deploy/local-kafka/kafka.sh fetch    download the jars once (cached in $KAFKA_HOME/libs)
#   deploy/local-kafka/kafka.sh start    format storage if new, start, wait until it serves
#   deploy/local-kafka/kafka.sh stop     stop the broker started by `start`
#   deploy/local-kafka/kafka.sh status   exit 0 when it serves
#
# Environment: KAFKA_HOME (default .local-kafka at the repo root), KAFKA_PORT (9092),
# KAFKA_CONTROLLER_PORT (KAFKA_PORT+1), KAFKA_START_TIMEOUT seconds (90), KAFKA_HEAP (512m).
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(cd "$here/../.." && pwd)
home=${KAFKA_HOME:-$root/.local-kafka}
port=${KAFKA_PORT:-9092}
cport=${KAFKA_CONTROLLER_PORT:-$((port + 1))}
timeout=${KAFKA_START_TIMEOUT:-90}
heap=${KAFKA_HEAP:-512m}
libs=$home/libs
data=$home/data-$port
pidfile=$home/broker-$port.pid
logfile=$home/broker-$port.log

log() { echo "[local-kafka] $*" >&2; }

fetch() {
  mkdir -p "$home"
  local stamp=$libs/.pom-sha
  local want
  want=$(sha256sum "$here/pom.xml" | cut -d' ' -f1)
  if [[ -f $stamp && $(cat "$stamp") == "$want" ]]; then
    return 0
  fi
  log "fetching Kafka jars from Maven Central into $libs"
  rm -rf "$libs"
  mvn -q -B -f "$here/pom.xml" dependency:copy-dependencies \
    -DincludeScope=runtime -DoutputDirectory="$libs"
  echo "$want" >"$stamp"
}

serving() {
  # The port opens before KRaft has elected itself and unfenced the broker, so wait
  # for the server's own "started" line as well as an accepting socket.
  grep -q 'Kafka Server started' "$logfile" 2>/dev/null &&
    (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null
}

running_pid() {
  [[ -f $pidfile ]] || return 1
  local pid
  pid=$(cat "$pidfile")
  kill -0 "$pid" 2>/dev/null && echo "$pid"
}

start() {
  fetch
  if pid=$(running_pid); then
    log "already running (pid $pid) on 127.0.0.1:$port"
    return 0
  fi
  mkdir -p "$data"
  local props=$home/server-$port.properties
  sed -e "s|@PORT@|$port|g" -e "s|@CONTROLLER_PORT@|$cport|g" -e "s|@LOG_DIR@|$data|g" \
    "$here/server.properties.in" >"$props"
  local jvm=(java "-Xms$heap" "-Xmx$heap" -XX:+UseG1GC -Djava.awt.headless=true
    "-Dlog4j2.configurationFile=$here/log4j2.properties" -cp "$libs/*")
  # A fresh log: `serving` looks for this run's "started" line.
  [[ -f $logfile ]] && mv "$logfile" "$logfile.prev"
  : >"$logfile"
  if [[ ! -f $data/meta.properties ]]; then
    log "formatting KRaft storage in $data"
    # --cluster-id=ID, not `-t ID`: an id may start with "-", which argparse takes for a flag.
    "${jvm[@]}" kafka.tools.StorageTool format --standalone \
      --cluster-id="$(uuid_b64)" -c "$props" >>"$logfile" 2>&1 || { tail -n 40 "$logfile" >&2; exit 1; }
  fi
  log "starting broker on 127.0.0.1:$port (log: $logfile)"
  nohup "${jvm[@]}" kafka.Kafka "$props" >>"$logfile" 2>&1 &
  echo $! >"$pidfile"
  local deadline=$((SECONDS + timeout))
  until serving; do
    if ! running_pid >/dev/null; then
      log "broker exited during start; last log lines:"
      tail -n 60 "$logfile" >&2
      exit 1
    fi
    if ((SECONDS >= deadline)); then
      log "broker did not serve within ${timeout}s; last log lines:"
      tail -n 60 "$logfile" >&2
      stop
      exit 1
    fi
    sleep 1
  done
  log "broker serves on 127.0.0.1:$port"
}

stop() {
  local pid
  if ! pid=$(running_pid); then
    rm -f "$pidfile"
    return 0
  fi
  log "stopping broker (pid $pid)"
  kill "$pid" 2>/dev/null || true
  for _ in $(seq 1 60); do
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.5
  done
  kill -9 "$pid" 2>/dev/null || true
  rm -f "$pidfile"
}

uuid_b64() {
  # KRaft cluster ids are 16 random bytes in URL-safe base64 without padding.
  python3 -c 'import base64,os;print(base64.urlsafe_b64encode(os.urandom(16)).decode().rstrip("="))'
}

case ${1:-} in
  fetch) fetch ;;
  start) start ;;
  stop) stop ;;
  status) serving ;;
  reset) stop; rm -rf "$data" ;;
  *) echo "usage: $0 fetch|start|stop|status|reset" >&2; exit 2 ;;
esac
