"""End-to-end benchmark of the dense path through a real Kafka broker.

    .venv/bin/python bench/e2e.py [--events N] [--bootstrap HOST:PORT] [--out bench/results.json]

Scenarios, all over the same simulated orders and the same model bundle:

- daemon end to end: `python -m streamer run` as a subprocess on a pre-filled 4-partition
  topic (batch 1000, max wait 0.2 s); events/s from /readyz until
  anomaly_events_consumed_total reaches N;
- the seeds' way (the baseline): one `model.predict(x[i:i+1])` per event;
- model only, batched: KerasScorer.reconstruct on batches of 1000 (the model's ceiling);
- pipeline only: Pipeline.process on batches of 1000 in this process, no Kafka;
- bare consume: a kafka-python consumer that only polls 1000 and commits (Kafka's ceiling).

--batch-size changes every "1000" above at once.

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
from streamer.features import build_features
from streamer.metrics import STAGE_NAMES
from streamer.pipeline import STAGES
from streamer.profiles import ORDERS
from streamer.records import RawMessage
from streamer.scoring import KerasScorer
from training.simulate import simulate

ROOT = Path(__file__).resolve().parent.parent
KAFKA_SH = ROOT / "deploy" / "local-kafka" / "kafka.sh"
DEFAULT_PORT = "29092"  # away from 9092 (demo) and 19092 (integration tests)
DEFAULT_BATCH = 1000
PARTITIONS = 4
TRAIN_EVENTS = 20_000

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


def train_bundle(workdir: Path, epochs: int) -> Path:
    """A small dense bundle on clean simulated orders, like the integration tests' one."""
    from training.datasets import read_jsonl
    from training.fit import fit_bundle

    events = workdir / "train.jsonl"
    with events.open("wb") as f:
        for event, _ in islice(simulate("orders", seed=101, anomaly_rate=0.0), TRAIN_EVENTS):
            f.write(msgspec.json.encode(event) + b"\n")
    history = read_jsonl(ORDERS, events)
    settings = TrainingSettings(epochs=epochs, patience=2, seed=7)
    started = time.perf_counter()
    b = fit_bundle(ORDERS, history, settings, workdir / "registry", source=events.name)
    log(f"trained bundle {b.version} in {time.perf_counter() - started:.1f}s")
    return workdir / "registry"


def make_orders(count: int, anomaly_rate: float, seed: int) -> tuple[list[bytes], list[bytes]]:
    values: list[bytes] = []
    keys: list[bytes] = []
    for event, _ in islice(simulate("orders", seed, anomaly_rate), count):
        values.append(msgspec.json.encode(event))
        keys.append(str(event["customer_id"]).encode())
    return values, keys


def scaled_features(b: bundles.Bundle, values: list[bytes]) -> np.ndarray:
    decode = msgspec.json.Decoder(b.spec.event_type()).decode
    return b.scaler.transform(build_features(b.spec, [decode(v) for v in values]))


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
    bootstrap: str, topic: str, bundle_path: Path, port: int, batch: int
) -> dict[str, Any]:
    token = uuid.uuid4().hex[:8]
    return {
        "profile": "orders",
        "log_level": "INFO",
        "kafka": {
            "bootstrap_servers": bootstrap,
            "input_topic": topic,
            "alert_topic": f"{topic}-alerts",
            "dead_letter_topic": f"{topic}-dlq",
            "group_id": f"bench-daemon-{token}",
        },
        "model": {"bundle": str(bundle_path)},
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


def spawn_daemon(config: dict[str, Any], workdir: Path) -> tuple[subprocess.Popen[bytes], Path]:
    """`python -m streamer run` on `config` (validated first), logging to workdir/daemon.log."""
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
        )
    return proc, log_path


def run_daemon(
    config: dict[str, Any], workdir: Path, n: int, timeout: float, broker_pid: int | None
) -> tuple[Scenario, dict[str, Any]]:
    """Start the daemon on a full topic, wait until it has consumed `n`, then SIGTERM it."""
    port = int(config["metrics"]["port"])
    spawned = time.monotonic()
    proc, log_path = spawn_daemon(config, workdir)
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
        + (f"; 10-90% steady {steady:,.0f}/s" if steady else "")
        + f"; CPU: daemon {100 * cpu_used / window:.0f}% of a core, "
        + (f"broker {100 * broker_used / window:.0f}%, " if broker_pid else "")
        + f"all {os.cpu_count()} CPUs {busy:.0f}% busy + {shares['steal']:.0f}% steal"
        + f"; SIGTERM exit {code}"
    )
    return Scenario("daemon end to end", int(n - consumed_at_ready), window, notes), details


# -- baselines --------------------------------------------------------------------------------


def seeds_way(model: Any, x: np.ndarray, sample: int) -> Scenario:
    """The seeds' way, the baseline: one Keras `predict` call per event."""
    model.predict(x[:1], verbose=0)  # warm-up: builds the predict function
    rows = x[1 : sample + 1]
    started = time.perf_counter()
    for i in range(rows.shape[0]):
        model.predict(rows[i : i + 1], verbose=0)
    seconds = time.perf_counter() - started
    n = rows.shape[0]
    return Scenario(
        "seeds' way: per-event model.predict",
        n,
        seconds,
        f"{n} events after 1 warm-up call; {1000 * seconds / n:.1f} ms/call",
    )


def batched(scorer: KerasScorer, x: np.ndarray, batch: int) -> Scenario:
    scorer.reconstruct(x[:batch])  # warm-up: traces the tf.function
    started = time.perf_counter()
    for i in range(0, x.shape[0], batch):
        scorer.reconstruct(x[i : i + batch])
    seconds = time.perf_counter() - started
    calls = -(-x.shape[0] // batch)
    return Scenario(
        f"model only, batched: KerasScorer.reconstruct x{batch}",
        x.shape[0],
        seconds,
        f"{calls} calls, {1000 * seconds / calls:.2f} ms/call, after 1 warm-up call",
    )


def pipeline_only(
    b: bundles.Bundle, scorer: KerasScorer, config: dict[str, Any], values: list[bytes]
) -> Scenario:
    """decode -> features -> scale -> score -> threshold -> explain, without any Kafka."""
    settings = config_mod.from_mapping(config)
    pipe = build_pipeline(settings, b, scorer)
    batch = settings.batch.max_batch_size
    messages = [RawMessage("bench", 0, i, None, v, 0) for i, v in enumerate(values)]
    stage_seconds = dict.fromkeys(STAGES, 0.0)
    alerts = 0
    started = time.perf_counter()
    for i in range(0, len(messages), batch):
        result = pipe.process(messages[i : i + batch])
        alerts += len(result.alerts)
        for k, v in result.stage_seconds.items():
            stage_seconds[k] += v
    seconds = time.perf_counter() - started
    return Scenario(
        f"pipeline only: Pipeline.process x{batch}, no Kafka",
        len(messages),
        seconds,
        f"{alerts} alerts; model warmed by the row above",
        {"stage_seconds": stage_seconds, "alerts": alerts},
    )


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


def _count(polled: dict[Any, list[Any]]) -> int:
    return sum(len(records) for records in polled.values())


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
        "numpy": version("numpy"),
        "broker": broker_about,
    }


def table(rows: list[Scenario], baseline: Scenario) -> str:
    lines = [
        "| scenario | events/s | ratio to baseline | notes |",
        "|---|---:|---:|---|",
    ]
    for r in rows:
        ratio = r.rate / baseline.rate
        lines.append(f"| {r.name} | {r.rate:,.0f} | {ratio:,.1f}x | {r.notes} |")
    return "\n".join(lines)


def stage_table(details: dict[str, Any]) -> str:
    window = details["window_seconds"]
    lines = [
        "| daemon stage (ready -> N consumed) | batches | total s | ms/batch | share of window |",
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
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results.json")
    parser.add_argument("--bundle", type=Path, help="a bundle or registry dir (default: train)")
    parser.add_argument(
        "--batch-size", type=int, default=DEFAULT_BATCH, help="daemon batch and every batched row"
    )
    parser.add_argument("--epochs", type=int, default=5, help="epochs when training the bundle")
    parser.add_argument("--sample", type=int, default=300, help="events for the per-event run")
    parser.add_argument("--anomaly-rate", type=float, default=0.01)
    parser.add_argument("--seed", type=int, default=21, help="simulator seed of the stream")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per Kafka run")
    args = parser.parse_args(argv)
    if args.batch_size < 1 or args.events < args.batch_size:
        parser.error("--events must be at least --batch-size, and that at least 1")
    command = " ".join(["bench/e2e.py", *(sys.argv[1:] if argv is None else argv)])
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # before TensorFlow's first import

    with tempfile.TemporaryDirectory(prefix="bench-e2e-") as tmp:
        workdir = Path(tmp)
        # Train before the broker starts, so the two never share the CPUs.
        bundle_path = args.bundle.resolve() if args.bundle else train_bundle(workdir, args.epochs)
        b = bundles.load(bundle_path, expected_spec=ORDERS)
        log(f"simulating {args.events:,} orders ({args.anomaly_rate:.0%} anomalies)")
        values, keys = make_orders(args.events, args.anomaly_rate, args.seed)
        x = scaled_features(b, values)
        topic = f"bench-orders-{uuid.uuid4().hex[:8]}"  # fresh: no offsets, no old records

        with broker(args.bootstrap) as kafka:
            bootstrap = kafka.bootstrap
            info = machine_info(kafka.about)
            config = daemon_config(bootstrap, topic, bundle_path, free_port(), args.batch_size)
            k = config["kafka"]
            try:
                create_topic(bootstrap, topic)
                produce_seconds = produce(bootstrap, topic, values, keys)
                log(f"produced {args.events:,} to {topic} in {produce_seconds:.1f}s")
                log("daemon end to end")
                daemon, details = run_daemon(config, workdir, args.events, args.timeout, kafka.pid)
                log(f"daemon: {daemon.rate:,.0f} events/s; bare consume")
                bare = bare_consume(bootstrap, topic, args.events, args.timeout, args.batch_size)
            finally:
                delete_topics(bootstrap, [topic, k["alert_topic"], k["dead_letter_topic"]])

        # In-process rows after the broker has stopped: nothing else wants the CPUs then.
        import keras

        log("model and pipeline rows")
        model_file = b.path / bundles.MODEL_FILE
        model = keras.models.load_model(model_file, compile=False, safe_mode=True)
        seeds = seeds_way(model, x, args.sample)
        scorer = KerasScorer.load(model_file, b.kind)
        model_only = batched(scorer, x, args.batch_size)
        pipe = pipeline_only(b, scorer, config, values)

    rows = [daemon, seeds, model_only, pipe, bare]
    info["load_average_at_end"] = list(os.getloadavg())
    results = {
        "command": command,
        "machine": info,
        "settings": {
            "events": args.events,
            "anomaly_rate": args.anomaly_rate,
            "seed": args.seed,
            "partitions": PARTITIONS,
            "batch": config["batch"],
            "bundle": {"version": b.version, "kind": b.kind, "trained_here": args.bundle is None},
            "produce_seconds": produce_seconds,
        },
        "baseline": seeds.name,
        "scenarios": [
            {**asdict(r), "events_per_second": r.rate, "ratio_to_baseline": r.rate / seeds.rate}
            for r in rows
        ],
        "daemon": details,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")

    print(
        f"\n{args.events:,} orders, {PARTITIONS} partitions, batch {args.batch_size}; "
        f"nproc {info['nproc']}, Python {info['python']}, TensorFlow {info['tensorflow']}, "
        f"kafka-python {info['kafka-python']}; {info['date_utc']}\n"
    )
    print(table(rows, seeds))
    print()
    print(stage_table(details))
    print(f"\nresults written to {_shown(args.out)}")
    return 0


def _shown(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(ROOT))
    except ValueError:
        return str(path)


if __name__ == "__main__":
    sys.exit(main())
