"""End-to-end benchmark of the dense or the LSTM path through a real Kafka broker.

    .venv/bin/python bench/e2e.py [--events N] [--bootstrap HOST:PORT] [--out bench/results.json]
    .venv/bin/python bench/e2e.py --model lstm [--runtimes numpy,tensorflow] [--events N]

Scenarios of the dense path (the default), all over the same simulated orders and bundle:

- daemon end to end: `python -m streamer run` as a subprocess on a pre-filled 4-partition
  topic (batch 1000, max wait 0.2 s); events/s from /readyz until
  anomaly_events_consumed_total reaches N;
- the seeds' way (the baseline): one `model.predict(x[i:i+1])` per event;
- model only, batched: KerasScorer.reconstruct on batches of 1000 (the model's ceiling);
- pipeline only: Pipeline.process on batches of 1000 in this process, no Kafka;
- bare consume: a kafka-python consumer that only polls 1000 and commits (Kafka's ceiling),
  and the same with confluent-kafka's consumer when it is installed.

--clients picks the daemon's Kafka client(s) (`kafka.client`): one daemon row each, default
both when confluent-kafka is installed. --daemon-cpus pins each daemon to that many CPUs (the
last ones; default 1, "on one core"; 0 leaves it unpinned).

--batch-size changes every "1000" above at once.

`--model lstm` does the same over simulated sensor readings (20 sensors, keyed by sensor_id)
and an LSTM bundle (windows of 30 rows, LSTM 64-32-32-64): one daemon row per runtime in
--runtimes, the baseline is one `model.predict` per window, and the model-only ceiling is
measured for both runtimes (NumpyLSTMScorer and KerasScorer on batches of windows). Its
model and pipeline rows run in a child process pinned to one thread (ROW_THREADS), and the
table gives each row's share of the model-only rate of its runtime.

Without --bootstrap it starts the repo's local broker (deploy/local-kafka/kafka.sh) on
$KAFKA_PORT (default 29092) and stops it at the end. Without --bundle it trains a small
bundle into a temporary directory first.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from importlib import metadata
from itertools import islice
from pathlib import Path
from typing import Any

import msgspec
import numpy as np

from streamer import bundle as bundles
from streamer import config as config_mod
from streamer.app import build_pipeline
from streamer.config import KafkaSettings, TrainingSettings
from streamer.features import FeatureSpec, build_features
from streamer.metrics import STAGE_NAMES
from streamer.pipeline import STAGES
from streamer.profiles import ORDERS, SENSORS
from streamer.records import RawMessage
from streamer.scoring import KerasScorer
from streamer.windows import sliding_windows
from training.simulate import simulate

ROOT = Path(__file__).resolve().parent.parent
KAFKA_SH = ROOT / "deploy" / "local-kafka" / "kafka.sh"
DEFAULT_PORT = "29092"  # away from 9092 (demo) and 19092 (integration tests)
DEFAULT_BATCH = 1000
PARTITIONS = 4
TRAIN_EVENTS = 20_000
# The LSTM issue's ceiling: windows of 30 rows, LSTM 64-32-32-64 (the decoder mirrors these).
LSTM_WINDOW = 30
LSTM_UNITS = [64, 32]
RUNTIMES = ("numpy", "tensorflow")
CLIENTS = ("kafka-python", "confluent")
# What the daemon pins (streamer/__main__.py), plus TensorFlow's own pools: the LSTM path's
# in-process rows run in a child with these, so "per core" means one thread.
ROW_THREADS = {
    "OPENBLAS_NUM_THREADS": "1",
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "TF_NUM_INTRAOP_THREADS": "1",
    "TF_NUM_INTEROP_THREADS": "1",
}

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# -- results ----------------------------------------------------------------------------------


@dataclass
class Scenario:
    name: str
    events: int
    seconds: float
    notes: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    runtime: str | None = None  # the scorer's runtime, for the LSTM table's model-only share

    @property
    def rate(self) -> float:
        return self.events / self.seconds if self.seconds > 0 else float("nan")


# -- the broker -------------------------------------------------------------------------------


@dataclass
class Broker:
    bootstrap: str
    about: str
    pid: int | None = None  # known for the local broker: its CPU time is reported too


@contextmanager
def broker(bootstrap: str | None) -> Iterator[Broker]:
    """Start and stop the local broker when none is given."""
    if bootstrap:
        yield Broker(bootstrap, "given with --bootstrap")
        return
    port = os.environ.get("KAFKA_PORT", DEFAULT_PORT)
    env = {**os.environ, "KAFKA_PORT": port}
    pom = (KAFKA_SH.parent / "pom.xml").read_text()
    found = re.search(r"<kafka\.version>([^<]+)</kafka\.version>", pom)
    about = f"local KRaft broker {found.group(1) if found else '?'} (deploy/local-kafka)"
    # A broker already serving on this port belongs to someone else: use it, leave it running.
    if subprocess.run([str(KAFKA_SH), "status"], env=env, check=False).returncode == 0:
        log(f"a broker already serves on 127.0.0.1:{port}; using it and leaving it running")
        yield Broker(f"127.0.0.1:{port}", about + ", already running", _broker_pid(port))
        return
    log(f"starting the local broker on 127.0.0.1:{port}")
    subprocess.run([str(KAFKA_SH), "start"], env=env, check=True)
    try:
        yield Broker(f"127.0.0.1:{port}", about + ", started by the benchmark", _broker_pid(port))
    finally:
        log("stopping the local broker")
        subprocess.run([str(KAFKA_SH), "stop"], env=env, check=False)


def _broker_pid(port: str) -> int | None:
    home = Path(os.environ.get("KAFKA_HOME", ROOT / ".local-kafka"))
    try:
        return int((home / f"broker-{port}.pid").read_text().strip())
    except (OSError, ValueError):
        return None


# -- data and model ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Workload:
    """What `--model` benchmarks: the simulated stream and the bundle trained for it."""

    model: str  # training.model: "dense" or "lstm"
    profile: str  # simulator profile and the daemon config's `profile`
    spec: FeatureSpec
    noun: str  # what the events are, for the printed header


WORKLOADS = {
    "dense": Workload("dense", "orders", ORDERS, "orders"),
    "lstm": Workload("lstm", "sensors", SENSORS, "sensor readings"),
}


def train_bundle(workdir: Path, epochs: int, model: str = "dense", seed: int = 101) -> Path:
    """A small bundle on clean simulated events: dense on orders, like the integration tests'
    one, or LSTM on sensors (the simulator's seed picks the sensors: pass the stream's)."""
    from training.datasets import read_jsonl
    from training.fit import fit_bundle

    w = WORKLOADS[model]
    events = workdir / "train.jsonl"
    with events.open("wb") as f:
        for event, _ in islice(simulate(w.profile, seed=seed, anomaly_rate=0.0), TRAIN_EVENTS):
            f.write(msgspec.json.encode(event) + b"\n")
    history = read_jsonl(w.spec, events)
    settings = TrainingSettings(epochs=epochs, patience=2, seed=7)
    if model == "lstm":
        settings = TrainingSettings(
            model="lstm",
            window_length=LSTM_WINDOW,
            lstm_units=LSTM_UNITS,
            epochs=epochs,
            patience=2,
            seed=7,
        )
    started = time.perf_counter()
    b = fit_bundle(w.spec, history, settings, workdir / "registry", source=events.name)
    log(f"trained bundle {b.version} in {time.perf_counter() - started:.1f}s")
    return workdir / "registry"


def make_orders(count: int, anomaly_rate: float, seed: int) -> tuple[list[bytes], list[bytes]]:
    return make_events(WORKLOADS["dense"], count, anomaly_rate, seed)


def make_events(
    w: Workload, count: int, anomaly_rate: float, seed: int
) -> tuple[list[bytes], list[bytes]]:
    """Encoded events and their Kafka keys (the entity: one entity, one partition)."""
    values: list[bytes] = []
    keys: list[bytes] = []
    for event, _ in islice(simulate(w.profile, seed, anomaly_rate), count):
        values.append(msgspec.json.encode(event))
        keys.append(str(event[w.spec.entity_field]).encode())
    return values, keys


def scaled_features(b: bundles.Bundle, values: list[bytes]) -> np.ndarray:
    decode = msgspec.json.Decoder(b.spec.event_type()).decode
    return b.scaler.transform(build_features(b.spec, [decode(v) for v in values]))


def scaled_windows(b: bundles.Bundle, values: list[bytes]) -> np.ndarray:
    """Every window the daemon scores for these events, in order: (events - held back, L, d)."""
    from training.datasets import from_events

    assert b.window_length is not None
    decode = msgspec.json.Decoder(b.spec.event_type()).decode
    # The daemon's features (aggregates too, were the spec stateful) and entity keys.
    history = from_events(b.spec, [decode(v) for v in values])
    x = b.scaler.transform(history.features).astype(np.float32)
    return sliding_windows(history.keys, x, b.window_length)[0]


def create_topic(bootstrap: str, topic: str) -> None:
    from kafka.admin import KafkaAdminClient, NewTopic

    admin = KafkaAdminClient(bootstrap_servers=bootstrap)
    try:
        admin.create_topics([NewTopic(topic, PARTITIONS, 1)], wait_for_metadata=True)
    finally:
        admin.close()


def delete_topics(bootstrap: str, topics: list[str]) -> None:
    from kafka.admin import KafkaAdminClient

    try:
        admin = KafkaAdminClient(bootstrap_servers=bootstrap)
        try:
            admin.delete_topics(topics, raise_errors=False)
        finally:
            admin.close()
    except Exception as exc:  # tidying up must not hide the benchmark's own outcome
        log(f"could not delete topics {topics}: {exc}")


def produce(bootstrap: str, topic: str, values: list[bytes], keys: list[bytes]) -> float:
    from kafka import KafkaProducer

    # The settings `training simulate --topic` uses.
    producer = KafkaProducer(bootstrap_servers=bootstrap, linger_ms=5, batch_size=262_144)
    started = time.perf_counter()
    try:
        send = producer.send
        for k, v in zip(keys, values, strict=True):
            send(topic, key=k, value=v)
        producer.flush()
    finally:
        producer.close()
    return time.perf_counter() - started


# -- the daemon -------------------------------------------------------------------------------


def daemon_config(
    bootstrap: str,
    topic: str,
    bundle_path: Path,
    port: int,
    batch: int,
    profile: str = "orders",
    runtime: str | None = None,
    client: str = "kafka-python",
) -> dict[str, Any]:
    """The daemon's config; `runtime` None leaves model.runtime at its default (numpy)."""
    token = uuid.uuid4().hex[:8]
    model: dict[str, Any] = {"bundle": str(bundle_path)}
    if runtime is not None:
        model["runtime"] = runtime
    return {
        "profile": profile,
        "log_level": "INFO",
        "kafka": {
            "bootstrap_servers": bootstrap,
            "input_topic": topic,
            "alert_topic": f"{topic}-alerts",
            "dead_letter_topic": f"{topic}-dlq",
            "group_id": f"bench-daemon-{token}",
            "client": client,
        },
        "model": model,
        "batch": {"max_batch_size": batch, "max_wait_seconds": 0.2},
        "metrics": {"host": "127.0.0.1", "port": port},
    }


def to_toml(doc: dict[str, Any]) -> str:
    """Enough TOML for the config above: scalars at the top, then one level of tables."""

    def value(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, int | float):
            return repr(v)
        return json.dumps(str(v))  # a JSON string is a valid TOML basic string

    lines = [f"{k} = {value(v)}" for k, v in doc.items() if not isinstance(v, dict)]
    for name, table in doc.items():
        if isinstance(table, dict):
            lines += ["", f"[{name}]", *(f"{k} = {value(v)}" for k, v in table.items())]
    return "\n".join(lines) + "\n"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def http_get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def scrape(port: int) -> Samples:
    from prometheus_client.parser import text_string_to_metric_families

    _, text = http_get(port, "/metrics")
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def metric(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def proc_memory(pid: int) -> dict[str, float]:
    """VmRSS and VmHWM (peak RSS) in MiB, from /proc."""
    out: dict[str, float] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(rest.split()[0]) / 1024
    return out


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process, all its threads, from /proc/<pid>/stat."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


CPU_STATES = ("user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal")


def machine_jiffies() -> np.ndarray:
    """The whole machine's CPU jiffies by state: is anything left for the daemon?"""
    line = Path("/proc/stat").read_text().split("\n", 1)[0]
    return np.array([int(v) for v in line.split()[1 : 1 + len(CPU_STATES)]], dtype=np.int64)


def cpu_shares(before: np.ndarray, after: np.ndarray) -> dict[str, float]:
    """Percent of all CPUs' time in each state between two readings."""
    delta = after - before
    total = max(1, int(delta.sum()))
    return {state: 100 * int(d) / total for state, d in zip(CPU_STATES, delta, strict=True)}


def rate_between(points: list[tuple[float, float]], lo: float, hi: float) -> float | None:
    """events/s between the first samples at or above `lo` and `hi` consumed."""
    a = next((p for p in points if p[1] >= lo), None)
    b = next((p for p in points if p[1] >= hi), None)
    if a is None or b is None or b[0] <= a[0]:
        return None
    return (b[1] - a[1]) / (b[0] - a[0])


def stage_totals(samples: Samples) -> dict[str, tuple[float, float]]:
    return {
        s: (
            metric(samples, "anomaly_batch_duration_seconds_count", stage=s),
            metric(samples, "anomaly_batch_duration_seconds_sum", stage=s),
        )
        for s in STAGE_NAMES
    }


def spawn_daemon(
    config: dict[str, Any], workdir: Path, cpus: set[int] | None = None
) -> tuple[subprocess.Popen[bytes], Path]:
    """`python -m streamer run` on `config` (validated first), logging to workdir/daemon.log;
    pinned to `cpus` when given (librdkafka's threads included)."""
    config_path = workdir / "daemon.toml"
    config_path.write_text(to_toml(config))
    config_mod.load(config_path, environ={})  # fail here, not in the subprocess
    log_path = workdir / "daemon.log"
    # STREAMER_* overrides would silently change what is measured: the file alone decides.
    env = {k: v for k, v in os.environ.items() if not k.startswith(config_mod.ENV_PREFIX)}
    env["TF_CPP_MIN_LOG_LEVEL"] = "2"
    with log_path.open("wb") as log_file:  # the child keeps its own descriptor
        proc = subprocess.Popen(
            [sys.executable, "-m", "streamer", "run", "--config", str(config_path)],
            stdout=log_file,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
            env=env,
            preexec_fn=(lambda: os.sched_setaffinity(0, cpus)) if cpus else None,
        )
    return proc, log_path


def run_daemon(
    config: dict[str, Any],
    workdir: Path,
    n: int,
    timeout: float,
    broker_pid: int | None,
    cpus: set[int] | None = None,
) -> tuple[Scenario, dict[str, Any]]:
    """Start the daemon on a full topic, wait until it has consumed `n`, then SIGTERM it."""
    port = int(config["metrics"]["port"])
    spawned = time.monotonic()
    proc, log_path = spawn_daemon(config, workdir, cpus)
    with proc:
        try:
            return _measure(proc, port, n, spawned, timeout, broker_pid)
        except BaseException:
            print(log_path.read_text(errors="replace")[-6000:], file=sys.stderr)
            raise
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)


def _measure(
    proc: subprocess.Popen[bytes],
    port: int,
    n: int,
    spawned: float,
    timeout: float,
    broker_pid: int | None,
) -> tuple[Scenario, dict[str, Any]]:
    def broker_cpu() -> float:
        return cpu_seconds(broker_pid) if broker_pid else float("nan")

    ready_at: float | None = None
    cpu_at_ready = cpu_used = broker_at_ready = broker_used = 0.0
    jiffies_at_ready = jiffies = np.zeros(len(CPU_STATES), dtype=np.int64)
    first_at: float | None = None
    done_at: float | None = None
    at_ready: Samples = {}
    points: list[tuple[float, float]] = []  # (seconds since ready, consumed)
    deadline = spawned + timeout
    # Scrapes are cheap (a few histograms) and 10 a second keep the end-time error near 0.1s.
    while done_at is None:
        if time.monotonic() > deadline:
            raise RuntimeError(f"daemon did not consume {n} events in {timeout:.0f}s")
        if proc.poll() is not None:
            raise RuntimeError(f"daemon exited {proc.returncode} before consuming {n} events")
        try:
            if ready_at is None:
                if http_get(port, "/readyz")[0] == 200:
                    ready_at = time.monotonic()
                    cpu_at_ready, jiffies_at_ready = cpu_seconds(proc.pid), machine_jiffies()
                    broker_at_ready = broker_cpu()
                    at_ready = scrape(port)
                    points.append((0.0, metric(at_ready, "anomaly_events_consumed_total")))
                    if metric(at_ready, "anomaly_events_scored_total") > 0:
                        first_at = ready_at
                else:
                    time.sleep(0.05)
                continue
            samples = scrape(port)
        except OSError:  # the HTTP server is not up yet
            time.sleep(0.05)
            continue
        now = time.monotonic()
        consumed = metric(samples, "anomaly_events_consumed_total")
        points.append((now - ready_at, consumed))
        if first_at is None and metric(samples, "anomaly_events_scored_total") > 0:
            first_at = now
        if consumed >= n:
            done_at = now
            cpu_used, jiffies = cpu_seconds(proc.pid) - cpu_at_ready, machine_jiffies()
            broker_used = broker_cpu() - broker_at_ready
        else:
            time.sleep(0.1)
    assert ready_at is not None and first_at is not None
    final = scrape(port)
    memory = proc_memory(proc.pid)
    stop_started = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    code = proc.wait(60)
    stop_seconds = time.monotonic() - stop_started
    if code != 0:
        raise RuntimeError(f"daemon exited {code} after SIGTERM (expected 0)")

    window = done_at - ready_at
    consumed_at_ready = metric(at_ready, "anomaly_events_consumed_total")
    before, after = stage_totals(at_ready), stage_totals(final)
    stages = {
        s: {"batches": after[s][0] - before[s][0], "seconds": after[s][1] - before[s][1]}
        for s in STAGE_NAMES
    }
    in_batches = sum(v["seconds"] for v in stages.values())
    # The whole run's score times, the first batch (tf.function trace) included.
    score_histogram = {
        dict(labels)["le"]: value
        for (name, labels), value in final.items()
        if name == "anomaly_batch_duration_seconds_bucket" and ("stage", "score") in labels
    }
    shares = cpu_shares(jiffies_at_ready, jiffies)
    # Steal is time the hypervisor gave to other guests: not this machine's work, yet lost to it.
    busy = 100 - shares["idle"] - shares["iowait"] - shares["steal"]
    steady = rate_between(points, 0.1 * n, 0.9 * n)
    held_back = metric(final, "anomaly_events_held_back_total")  # LSTM: window not full yet
    details = {
        "ready_seconds_after_spawn": ready_at - spawned,
        "first_scored_seconds_after_spawn": first_at - spawned,
        "consumed_at_ready": consumed_at_ready,
        "window_seconds": window,
        "steady_rate_10_to_90_percent": steady,
        "rss_mib": memory.get("VmRSS"),
        "peak_rss_mib": memory.get("VmHWM"),
        "exit_code": code,
        "sigterm_to_exit_seconds": stop_seconds,
        "batches": metric(final, "anomaly_batches_total"),
        "mean_batch_size": metric(final, "anomaly_batch_size_sum")
        / max(1.0, metric(final, "anomaly_batch_size_count")),
        "scored": metric(final, "anomaly_events_scored_total"),
        "held_back": held_back,
        "alerts": metric(final, "anomaly_alerts_published_total"),
        "daemon_cpu_seconds_in_window": cpu_used,
        "daemon_cpu_percent_of_one_core": 100 * cpu_used / window,
        "broker_cpu_percent_of_one_core": 100 * broker_used / window if broker_pid else None,
        "machine_busy_percent_in_window": busy,
        "machine_cpu_percent_by_state_in_window": shares,
        "score_seconds_histogram_whole_run": score_histogram,
        "stages_in_window": stages,
        "in_batch_seconds": in_batches,
        "outside_batch_seconds": window - in_batches,
    }
    notes = (
        f"RSS {memory.get('VmRSS', 0):.0f} MiB (peak {memory.get('VmHWM', 0):.0f}); "
        f"first scored event {first_at - spawned:.1f}s after spawn (ready at "
        f"{ready_at - spawned:.1f}s)"
        + (f"; {held_back:,.0f} held back (window not full), not scored" if held_back else "")
        + (f"; 10-90% steady {steady:,.0f}/s" if steady else "")
        + f"; CPU: daemon {100 * cpu_used / window:.0f}% of a core, "
        + (f"broker {100 * broker_used / window:.0f}%, " if broker_pid else "")
        + f"all {os.cpu_count()} CPUs {busy:.0f}% busy + {shares['steal']:.0f}% steal"
        + f"; SIGTERM exit {code}"
    )
    return Scenario("daemon end to end", int(n - consumed_at_ready), window, notes), details


# -- baselines --------------------------------------------------------------------------------


def seeds_way(model: Any, x: np.ndarray, sample: int, unit: str = "event") -> Scenario:
    """The seeds' way, the baseline: one Keras `predict` call per event (LSTM: per window)."""
    model.predict(x[:1], verbose=0)  # warm-up: builds the predict function
    rows = x[1 : sample + 1]
    started, cpu = time.perf_counter(), time.process_time()
    for i in range(rows.shape[0]):
        model.predict(rows[i : i + 1], verbose=0)
    seconds = time.perf_counter() - started
    n = rows.shape[0]
    return Scenario(
        f"seeds' way: per-{unit} model.predict",
        n,
        seconds,
        f"{n} {unit}s after 1 warm-up call; {1000 * seconds / n:.1f} ms/call",
        {"cpu_percent_of_one_core": _cpu_percent(cpu, seconds)},
    )


def batched(
    scorer: Any, x: np.ndarray, batch: int, label: str = "KerasScorer", runtime: str | None = None
) -> Scenario:
    """`scorer.reconstruct` on batches of `batch` rows (LSTM: windows): the model's ceiling."""
    scorer.reconstruct(x[:batch])  # warm-up: traces the tf.function
    started, cpu = time.perf_counter(), time.process_time()
    for i in range(0, x.shape[0], batch):
        scorer.reconstruct(x[i : i + batch])
    seconds = time.perf_counter() - started
    calls = -(-x.shape[0] // batch)
    return Scenario(
        f"model only, batched: {label}.reconstruct x{batch}",
        x.shape[0],
        seconds,
        f"{calls} calls, {1000 * seconds / calls:.2f} ms/call, after 1 warm-up call",
        {"cpu_percent_of_one_core": _cpu_percent(cpu, seconds)},
        runtime,
    )


def pipeline_only(
    b: bundles.Bundle,
    scorer: Any,
    config: dict[str, Any],
    values: list[bytes],
    runtime: str | None = None,
) -> Scenario:
    """decode -> features -> scale -> score -> threshold -> explain, without any Kafka.

    A fresh pipeline: with an LSTM bundle it builds each entity's windows itself and holds
    back the events whose window is not full yet, as the daemon does."""
    settings = config_mod.from_mapping(config)
    pipe = build_pipeline(settings, b, scorer)
    batch = settings.batch.max_batch_size
    messages = [RawMessage("bench", 0, i, None, v, 0) for i, v in enumerate(values)]
    stage_seconds = dict.fromkeys(STAGES, 0.0)
    alerts = held_back = 0
    started, cpu = time.perf_counter(), time.process_time()
    for i in range(0, len(messages), batch):
        result = pipe.process(messages[i : i + batch])
        alerts += len(result.alerts)
        held_back += result.held_back
        for k, v in result.stage_seconds.items():
            stage_seconds[k] += v
    seconds = time.perf_counter() - started
    name = f"pipeline only: Pipeline.process x{batch}, no Kafka"
    return Scenario(
        f"{name}, {runtime} runtime" if runtime else name,
        len(messages),
        seconds,
        f"{alerts} alerts"
        + (f"; {held_back} held back (window not full)" if held_back else "")
        + "; model warmed by the row above",
        {
            "stage_seconds": stage_seconds,
            "alerts": alerts,
            "held_back": held_back,
            "cpu_percent_of_one_core": _cpu_percent(cpu, seconds),
        },
        runtime,
    )


def _cpu_percent(cpu_at_start: float, seconds: float) -> float:
    """This process's CPU time (all its threads) since `cpu_at_start`, as % of one core."""
    return 100 * (time.process_time() - cpu_at_start) / seconds if seconds > 0 else float("nan")


def bare_consume(bootstrap: str, topic: str, n: int, timeout: float, batch: int) -> Scenario:
    """kafka-python alone, with the daemon's fetch settings: poll a batch, commit, repeat."""
    from kafka import KafkaConsumer

    k = KafkaSettings(input_topic=topic, alert_topic="unused-a", dead_letter_topic="unused-b")
    consumer = KafkaConsumer(
        bootstrap_servers=bootstrap,
        group_id=f"bench-bare-{uuid.uuid4().hex[:8]}",
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        max_poll_records=k.max_poll_records,
        fetch_max_bytes=k.fetch_max_bytes,
        max_partition_fetch_bytes=k.max_partition_fetch_bytes,
        isolation_level="read_committed",
    )
    try:
        consumer.subscribe([topic])
        # Timed like the daemon: from the return of the first poll (when /readyz turns 200).
        total = _count(consumer.poll(timeout_ms=500, max_records=batch))
        if total:
            consumer.commit()
        at_start, started = total, time.perf_counter()
        deadline = started + timeout
        while total < n:
            if time.perf_counter() > deadline:
                raise RuntimeError(f"bare consumer read {total} of {n} in {timeout:.0f}s")
            got = _count(consumer.poll(timeout_ms=500, max_records=batch))
            if got:
                consumer.commit()
                total += got
        seconds = time.perf_counter() - started
    finally:
        consumer.close(autocommit=False)
    return Scenario(
        f"bare consume: kafka-python poll({batch}) + commit",
        total - at_start,
        seconds,
        "daemon's fetch settings, fresh group, read to the end",
    )


def bare_consume_confluent(
    bootstrap: str, topic: str, n: int, timeout: float, batch: int
) -> Scenario:
    """confluent-kafka alone, as `bare_consume`: consume a batch, commit it, repeat."""
    import confluent_kafka as ck

    k = KafkaSettings(input_topic=topic, alert_topic="unused-a", dead_letter_topic="unused-b")
    consumer = ck.Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"bench-bare-{uuid.uuid4().hex[:8]}",
            "enable.auto.commit": False,
            "auto.offset.reset": "earliest",
            "fetch.max.bytes": k.fetch_max_bytes,
            "max.partition.fetch.bytes": k.max_partition_fetch_bytes,
            "isolation.level": "read_committed",
        }
    )
    try:
        consumer.subscribe([topic])
        total = 0
        while not total:  # timed from the return of the first non-empty consume
            total = len(consumer.consume(batch, 0.5))
        consumer.commit(asynchronous=False)
        at_start, started = total, time.perf_counter()
        deadline = started + timeout
        while total < n:
            if time.perf_counter() > deadline:
                raise RuntimeError(f"bare consumer read {total} of {n} in {timeout:.0f}s")
            got = [m for m in consumer.consume(batch, 0.5) if m.error() is None]
            if got:
                consumer.commit(asynchronous=False)
                total += len(got)
        seconds = time.perf_counter() - started
    finally:
        consumer.close()
    return Scenario(
        f"bare consume: confluent-kafka consume({batch}) + commit",
        total - at_start,
        seconds,
        "daemon's fetch settings, fresh group, read to the end",
    )


def _count(polled: dict[Any, list[Any]]) -> int:
    return sum(len(records) for records in polled.values())


# -- the LSTM path's in-process rows ----------------------------------------------------------


def lstm_rows_in_child(workdir: Path, job: dict[str, Any]) -> dict[str, Any]:
    """Run `lstm_rows` in a child process with ROW_THREADS set before numpy and TensorFlow
    load: one thread, as "per core" means, whatever this process was started with."""
    job_path, out_path = workdir / "rows-job.json", workdir / "rows-out.json"
    job_path.write_text(json.dumps({**job, "out": str(out_path)}))
    subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--rows-job", str(job_path)],
        cwd=ROOT,
        env={**os.environ, **ROW_THREADS},
        check=True,
    )
    result: dict[str, Any] = json.loads(out_path.read_text())
    return result


def lstm_rows(job: dict[str, Any]) -> dict[str, Any]:
    """Baseline, model-only (both runtimes) and pipeline-only rows of the LSTM path."""
    import tensorflow as tf

    # Before the first op creates TensorFlow's pools (the env vars ask for the same).
    tf.config.threading.set_intra_op_parallelism_threads(1)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    import keras

    b = bundles.load(Path(job["bundle"]), expected_spec=SENSORS)
    values = Path(job["events"]).read_bytes().splitlines()
    batch: int = job["batch"]
    windows = scaled_windows(b, values)
    log(f"{windows.shape[0]:,} windows of {windows.shape[1]}x{windows.shape[2]}; seeds' way")
    model = keras.models.load_model(b.path / bundles.MODEL_FILE, compile=False, safe_mode=True)
    rows = [seeds_way(model, windows, job["sample"], unit="window")]
    for runtime, label in (("numpy", "NumpyLSTMScorer"), ("tensorflow", "KerasScorer")):
        scorer = b.load_scorer(runtime)  # as the daemon loads it, parity check included
        log(f"model only and pipeline only, {runtime} runtime")
        rows.append(batched(scorer, windows, batch, label, runtime))
        if runtime in job["runtimes"]:
            rows.append(pipeline_only(b, scorer, job["config"], values, runtime))
    for r in rows:
        r.notes += f"; CPU {r.extra['cpu_percent_of_one_core']:.0f}% of a core"
    threads = {k: os.environ.get(k, "unset") for k in ROW_THREADS}
    threads["tf.config intra_op"] = str(tf.config.threading.get_intra_op_parallelism_threads())
    threads["tf.config inter_op"] = str(tf.config.threading.get_inter_op_parallelism_threads())
    return {"rows": [asdict(r) for r in rows], "threads": threads, "windows": windows.shape[0]}


def model_only_rows(rows: list[Scenario]) -> dict[str, Scenario]:
    """runtime -> its model-only row: the ceiling the LSTM table compares each row with."""
    return {r.runtime: r for r in rows if r.runtime and r.name.startswith("model only")}


def held_back_count(keys: list[bytes], length: int) -> int:
    """Events not scored because their entity had fewer than `length` rows: the first
    `length - 1` of each entity."""
    return sum(min(c, length - 1) for c in Counter(keys).values())


def default_clients() -> str:
    import importlib.util

    return ",".join(
        c for c in CLIENTS if c != "confluent" or importlib.util.find_spec("confluent_kafka")
    )


def parse_clients(text: str) -> list[str]:
    names = [c.strip() for c in text.split(",") if c.strip()]
    unknown = sorted(set(names) - set(CLIENTS))
    if unknown or not names:
        raise ValueError(f"clients {text!r}: choose one or more of {', '.join(CLIENTS)}")
    return list(dict.fromkeys(names))


def parse_runtimes(text: str) -> list[str]:
    """--runtimes "numpy,tensorflow" -> ["numpy", "tensorflow"]: known names, no repeats."""
    names = [t.strip() for t in text.split(",") if t.strip()]
    unknown = sorted(set(names) - set(RUNTIMES))
    if unknown or not names:
        raise ValueError(f"runtimes {text!r}: choose one or more of {', '.join(RUNTIMES)}")
    return list(dict.fromkeys(names))


# -- report -----------------------------------------------------------------------------------


def machine_info(broker_about: str) -> dict[str, Any]:
    def version(dist: str) -> str:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return "?"

    cpu = "?"
    meminfo = ""
    try:
        cpu = next(
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        )
        meminfo = Path("/proc/meminfo").read_text().splitlines()[0]
    except (OSError, StopIteration):
        pass
    return {
        "date_utc": datetime.now(UTC).isoformat(timespec="seconds"),
        "nproc": len(os.sched_getaffinity(0)),
        "cpu_count": os.cpu_count(),
        "cpu_model": cpu,
        "memory": " ".join(meminfo.split()[1:]),
        "load_average_at_start": list(os.getloadavg()),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "tensorflow": version("tensorflow"),
        "keras": version("keras"),
        "kafka-python": version("kafka-python"),
        "confluent-kafka": version("confluent-kafka"),
        "numpy": version("numpy"),
        "broker": broker_about,
    }


def table(
    rows: list[Scenario], baseline: Scenario, ceilings: dict[str, Scenario] | None = None
) -> str:
    """The markdown table; with `ceilings` (runtime -> model-only row) each row with a
    runtime also gets its share of that runtime's model-only rate."""
    if ceilings is None:
        lines = [
            "| scenario | events/s | ratio to baseline | notes |",
            "|---|---:|---:|---|",
        ]
    else:
        lines = [
            "| scenario | events/s | ratio to baseline | share of model-only rate, same runtime "
            "| notes |",
            "|---|---:|---:|---:|---|",
        ]
    for r in rows:
        ratio = r.rate / baseline.rate
        if ceilings is None:
            lines.append(f"| {r.name} | {r.rate:,.0f} | {ratio:,.1f}x | {r.notes} |")
            continue
        ceiling = ceilings.get(r.runtime or "")
        share = f"{100 * r.rate / ceiling.rate:.0f}%" if ceiling else ""
        lines.append(f"| {r.name} | {r.rate:,.0f} | {ratio:,.1f}x | {share} | {r.notes} |")
    return "\n".join(lines)


def stage_table(details: dict[str, Any], title: str = "daemon stage") -> str:
    window = details["window_seconds"]
    lines = [
        f"| {title} (ready -> N consumed) | batches | total s | ms/batch | share of window |",
        "|---|---:|---:|---:|---:|",
    ]
    for stage, v in details["stages_in_window"].items():
        per = 1000 * v["seconds"] / v["batches"] if v["batches"] else 0.0
        lines.append(
            f"| {stage} | {v['batches']:.0f} | {v['seconds']:.2f} | {per:.2f} | "
            f"{100 * v['seconds'] / window:.1f}% |"
        )
    outside = details["outside_batch_seconds"]
    lines.append(
        f"| outside batches (poll: fetch + record parsing, to_raw, loop) | | {outside:.2f} | | "
        f"{100 * outside / window:.1f}% |"
    )
    return "\n".join(lines)


# -- main -------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--events", type=int, default=200_000, help="events to pre-produce")
    parser.add_argument("--bootstrap", help="use this broker instead of starting the local one")
    parser.add_argument(
        "--model",
        choices=sorted(WORKLOADS),
        default="dense",
        help="dense: orders and a dense bundle; lstm: sensor readings and an LSTM bundle",
    )
    parser.add_argument(
        "--runtimes",
        help="--model lstm: a daemon and a pipeline row per runtime (default numpy,tensorflow)",
    )
    parser.add_argument(
        "--clients",
        help="kafka.client of the daemon rows: kafka-python, confluent (default: both when "
        "confluent-kafka is installed)",
    )
    parser.add_argument(
        "--daemon-cpus",
        type=int,
        default=1,
        help="pin each daemon to this many CPUs, the last ones (default 1; 0: unpinned)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        help="JSON results (default bench/results.json; with --model lstm results-lstm.json)",
    )
    parser.add_argument("--bundle", type=Path, help="a bundle or registry dir (default: train)")
    parser.add_argument(
        "--batch-size", type=int, default=DEFAULT_BATCH, help="daemon batch and every batched row"
    )
    parser.add_argument("--epochs", type=int, default=5, help="epochs when training the bundle")
    parser.add_argument(
        "--sample", type=int, help="events (lstm: windows) for the per-event run (300; lstm 100)"
    )
    parser.add_argument("--anomaly-rate", type=float, default=0.01)
    parser.add_argument("--seed", type=int, default=21, help="simulator seed of the stream")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per Kafka run")
    parser.add_argument("--rows-job", type=Path, help=argparse.SUPPRESS)  # the pinned child
    args = parser.parse_args(argv)
    if args.rows_job:
        job = json.loads(args.rows_job.read_text())
        Path(job["out"]).write_text(json.dumps(lstm_rows(job)))
        return 0
    if args.batch_size < 1 or args.events < args.batch_size:
        parser.error("--events must be at least --batch-size, and that at least 1")
    lstm = args.model == "lstm"
    if args.runtimes and not lstm:
        parser.error("--runtimes needs --model lstm (the dense path's daemon runs numpy)")
    try:
        runtimes = parse_runtimes(args.runtimes or ",".join(RUNTIMES))
        clients = parse_clients(args.clients or default_clients())
    except ValueError as exc:
        parser.error(str(exc))
    if args.daemon_cpus < 0 or args.daemon_cpus > (os.cpu_count() or 1):
        parser.error("--daemon-cpus must be between 0 and the number of CPUs")
    cpus = set(range((os.cpu_count() or 1) - args.daemon_cpus, os.cpu_count() or 1)) or None
    sample = args.sample or (100 if lstm else 300)  # a per-window predict takes ~0.1 s
    out = args.out or ROOT / "bench" / ("results-lstm.json" if lstm else "results.json")
    w = WORKLOADS[args.model]
    command = " ".join(["bench/e2e.py", *(sys.argv[1:] if argv is None else argv)])
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # before TensorFlow's first import
    run_started = time.monotonic()

    with tempfile.TemporaryDirectory(prefix="bench-e2e-") as tmp:
        workdir = Path(tmp)
        # Train before the broker starts, so the two never share the CPUs. The LSTM bundle
        # learns the stream's own 20 sensors: the simulator's seed draws their speeds.
        if args.bundle:
            bundle_path = args.bundle.resolve()
        elif lstm:
            bundle_path = train_bundle(workdir, args.epochs, "lstm", seed=args.seed)
        else:
            bundle_path = train_bundle(workdir, args.epochs)
        b = bundles.load(bundle_path, expected_spec=w.spec)
        if b.kind != args.model:
            parser.error(f"--bundle holds a {b.kind} model, not {args.model}")
        log(f"simulating {args.events:,} {w.noun} ({args.anomaly_rate:.0%} anomalies)")
        values, keys = make_events(w, args.events, args.anomaly_rate, args.seed)
        held_back = held_back_count(keys, b.window_length) if b.window_length else 0
        # Dense rows score these rows; the LSTM child builds its windows from the events.
        x = np.empty(0) if lstm else scaled_features(b, values)
        topic = f"bench-{w.profile}-{uuid.uuid4().hex[:8]}"  # fresh: no offsets, no old records

        daemons: list[Scenario] = []
        daemon_details: dict[str, dict[str, Any]] = {}
        with broker(args.bootstrap) as kafka:
            bootstrap = kafka.bootstrap
            info = machine_info(kafka.about)
            # Dense: daemons at the config's default runtime (numpy), one per client.
            configs = {
                label(runtime, client, lstm, len(clients)): daemon_config(
                    bootstrap,
                    topic,
                    bundle_path,
                    free_port(),
                    args.batch_size,
                    w.profile,
                    runtime if lstm else None,
                    client,
                )
                for runtime in (runtimes if lstm else ["numpy"])
                for client in clients
            }
            k = next(iter(configs.values()))["kafka"]  # every daemon's topics are the same
            try:
                create_topic(bootstrap, topic)
                produce_seconds = produce(bootstrap, topic, values, keys)
                log(f"produced {args.events:,} to {topic} in {produce_seconds:.1f}s")
                for name, config in configs.items():
                    log(f"daemon end to end ({name})")
                    daemon, details = run_daemon(
                        config, workdir, args.events, args.timeout, kafka.pid, cpus
                    )
                    daemon.name = f"{daemon.name}, {name}"
                    daemon.runtime = config["model"].get("runtime", "numpy")
                    daemons.append(daemon)
                    daemon_details[name] = details
                    log(f"daemon: {daemon.rate:,.0f} events/s")
                log("bare consume")
                bares = [bare_consume(bootstrap, topic, args.events, args.timeout, args.batch_size)]
                if "confluent" in clients:
                    bares.append(
                        bare_consume_confluent(
                            bootstrap, topic, args.events, args.timeout, args.batch_size
                        )
                    )
            finally:
                delete_topics(bootstrap, [topic, k["alert_topic"], k["dead_letter_topic"]])

        # In-process rows after the broker has stopped: nothing else wants the CPUs then.
        config = next(iter(configs.values()))
        threads: dict[str, str] | None = None
        if lstm:
            events_file = workdir / "events.jsonl"
            events_file.write_bytes(b"\n".join(values) + b"\n")
            log("model and pipeline rows, in a child process on one thread")
            job = {
                "bundle": str(bundle_path),
                "events": str(events_file),
                "batch": args.batch_size,
                "sample": sample,
                "runtimes": runtimes,
                "config": config,
            }
            child = lstm_rows_in_child(workdir, job)
            in_process = [Scenario(**r) for r in child["rows"]]
            threads = child["threads"]
            seeds = in_process[0]
            ceilings = model_only_rows(in_process).values()
            pipes = [r for r in in_process if r.name.startswith("pipeline only")]
            rows = [*daemons, seeds, *ceilings, *pipes, *bares]
        else:
            import keras

            log("model and pipeline rows")
            model_file = b.path / bundles.MODEL_FILE
            model = keras.models.load_model(model_file, compile=False, safe_mode=True)
            seeds = seeds_way(model, x, sample)
            scorer = KerasScorer.load(model_file, b.kind)
            model_only = batched(scorer, x, args.batch_size)
            pipe = pipeline_only(b, scorer, config, values)
            rows = [*daemons, seeds, model_only, pipe, *bares]

    info["load_average_at_end"] = list(os.getloadavg())
    shares = model_only_rows(rows) if lstm else None
    scenarios = []
    for r in rows:
        entry = {**asdict(r), "events_per_second": r.rate, "ratio_to_baseline": r.rate / seeds.rate}
        ceiling = shares.get(r.runtime) if shares and r.runtime else None
        if ceiling is not None:
            entry["ratio_to_model_only_same_runtime"] = r.rate / ceiling.rate
        scenarios.append(entry)
    settings: dict[str, Any] = {
        "model": args.model,
        "events": args.events,
        "anomaly_rate": args.anomaly_rate,
        "seed": args.seed,
        "partitions": PARTITIONS,
        "batch": config["batch"],
        "bundle": {"version": b.version, "kind": b.kind, "trained_here": args.bundle is None},
        "produce_seconds": produce_seconds,
        "clients": clients,
        "daemon_cpus": sorted(cpus) if cpus else "unpinned",
    }
    if lstm:
        settings["bundle"]["window_length"] = b.window_length
        settings["runtimes"] = runtimes
        settings["entities"] = len(set(keys))
        settings["held_back_expected"] = held_back
        settings["in_process_rows_threads"] = threads
    results = {
        "command": command,
        "machine": info,
        "settings": settings,
        "baseline": seeds.name,
        "scenarios": scenarios,
        "daemon": daemon_details[next(iter(configs))],
        "daemons": daemon_details,
        "seconds_total": time.monotonic() - run_started,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")

    versions = (
        f"nproc {info['nproc']}, Python {info['python']}, TensorFlow {info['tensorflow']}, "
        f"kafka-python {info['kafka-python']}, confluent-kafka {info['confluent-kafka']}; "
        f"{info['date_utc']}"
    )
    if lstm:
        assert threads is not None and b.window_length is not None
        print(
            f"\n{args.events:,} {w.noun} ({len(set(keys))} sensors), LSTM windows of "
            f"{b.window_length} rows ({held_back:,} events held back, not scored), "
            f"{PARTITIONS} partitions, batch {args.batch_size}; {versions}"
        )
        print("model and pipeline rows: " + ", ".join(f"{k}={v}" for k, v in threads.items()))
        print()
    else:
        print(
            f"\n{args.events:,} orders, {PARTITIONS} partitions, batch {args.batch_size}; "
            f"{versions}\n"
        )
    print(table(rows, seeds, shares))
    for name, details in daemon_details.items():
        print()
        print(stage_table(details, f"daemon, {name}: stage"))
    print(f"\nresults written to {_shown(out)}")
    log(f"done in {time.monotonic() - run_started:.0f}s")
    return 0


def label(runtime: str, client: str, lstm: bool, clients: int) -> str:
    """A daemon row's name: its runtime (LSTM) and its client (when more than one is run)."""
    parts = [f"{runtime} runtime"] if lstm else []
    return ", ".join([*parts, client] if clients > 1 or not lstm else parts)


def _shown(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(ROOT))
    except ValueError:
        return str(path)


if __name__ == "__main__":
    sys.exit(main())
