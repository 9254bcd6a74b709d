"""Latency: from an event's produce time to its alert being readable on the alert topic.

    .venv/bin/python bench/latency.py [--max-rate 80000] [--rate R] [--seconds 30]
        [--configs 1000:0.2,1000:0.05,250:0.02,100:0.005] [--commit-interval S]
        (an item may add the idle poll: 250:0.02:0.5)
        [--bootstrap HOST:PORT] [--out runs/bench/latency.json]

Without --bootstrap it starts the repo's local broker on port 29292 and stops it at the end;
a broker already serving there is used and left running. It trains a small bundle (as
bench/e2e.py does) and simulates a pool of orders (1% anomalies) up front. Then, for each
(batch.max_batch_size, batch.max_wait_seconds[, batch.idle_poll_seconds]) in --configs, one
daemon run on a fresh 4-partition topic: a paced producer thread sends R events/s (default
half of --max-rate) for --seconds, and a separate process reads the alert topic.

Each send's wall-clock time is taken just before `producer.send`, per partition in send
order, so the k-th send to partition p is input offset k of the fresh topic. Each alert
names its input position (`source.partition`, `source.offset`): latency = the wall-clock
time the alert reader's poll returned it - that send time. The alert's `event_id` is checked
against the event sent at that position, so a shifted offset cannot go unnoticed. The
alert's `detected_at` (the daemon's clock, whole milliseconds) splits each latency in two:
sent -> detected (input hop, batching, pipeline) and detected -> read (the alert's own hop).
Sends in the first --warmup seconds are left out. The benchmark producer uses the repo's
producer settings (linger 5 ms, --linger-ms); the daemon runs with its defaults apart from
the batch settings (and kafka.commit_interval_seconds with --commit-interval).
"""

from __future__ import annotations

import argparse
import itertools
import json
import multiprocessing as mp
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from multiprocessing.connection import Connection
from multiprocessing.sharedctypes import Synchronized
from multiprocessing.synchronize import Event
from pathlib import Path
from typing import Any

import msgspec
import numpy as np

# Run as `python bench/latency.py`: bench/ itself is on sys.path, so e2e imports as a module.
from e2e import (
    CLIENTS,
    PARTITIONS,
    ROOT,
    Broker,
    Samples,
    _shown,
    broker,
    cpu_seconds,
    cpu_shares,
    create_topic,
    daemon_config,
    default_clients,
    delete_topics,
    free_port,
    log,
    machine_info,
    machine_jiffies,
    make_orders,
    metric,
    parse_clients,
    scrape,
    spawn_daemon,
    stage_totals,
    train_bundle,
)
from soak import pace, total, wait_ready

LATENCY_PORT = "29292"  # clear of the demo, the tests, bench/e2e.py (29092) and soak (29192)
DEFAULT_MAX_RATE = 80_000  # bench/e2e.py's daemon end-to-end rate on a 2-core machine, rounded
DEFAULT_CONFIGS = "1000:0.2,1000:0.05,250:0.02,100:0.005"
ANOMALY_RATE = 0.01
DRAIN_SECONDS = 60.0


def partition_of(key: bytes) -> int:
    """kafka-python's DefaultPartitioner for a keyed record on a PARTITIONS-partition topic."""
    from kafka.partitioner.default import murmur2

    return (murmur2(key) & 0x7FFFFFFF) % PARTITIONS


# -- the load ---------------------------------------------------------------------------------


class StampedProducer(threading.Thread):
    """Sends `rate` events/s for `seconds` from a pool, noting each send's wall-clock time.

    Paced like bench/soak.py's producer. Records go to their key's partition (what the default
    partitioner would pick), named explicitly so that send order per partition is known.
    """

    TICK = 0.002

    def __init__(
        self,
        bootstrap: str,
        topic: str,
        values: list[bytes],
        keys: list[bytes],
        parts: list[int],
        rate: float,
        seconds: float,
        linger_ms: int,
        client: str = "kafka-python",
    ) -> None:
        super().__init__(name="latency-producer", daemon=True)
        self.bootstrap, self.topic, self.linger_ms = bootstrap, topic, linger_ms
        self.client = client
        self.values, self.keys, self.parts = values, keys, parts
        self.rate, self.seconds = rate, seconds
        self.sent_at: list[list[float]] = [[] for _ in range(PARTITIONS)]  # index = offset
        self.sent = 0
        self.failed = 0
        self.error: BaseException | None = None
        self.started_at = 0.0  # wall clock
        self.elapsed = 0.0

    def _on_error(self, exc: BaseException) -> None:
        self.failed += 1

    def run(self) -> None:
        try:
            self._run()
        except BaseException as exc:
            self.error = exc

    def _run(self) -> None:
        if self.client == "confluent":
            self._run_confluent()
            return
        from kafka import KafkaProducer

        # The repo's producer settings (training simulate, bench/e2e.py), linger adjustable.
        producer = KafkaProducer(
            bootstrap_servers=self.bootstrap, linger_ms=self.linger_ms, batch_size=262_144
        )
        try:
            producer.partitions_for(self.topic)  # metadata before the clock starts
            send, topic, on_error = producer.send, self.topic, self._on_error
            values, keys = self.values, self.keys
            self._paced(
                lambda i, p: send(topic, key=keys[i], value=values[i], partition=p).add_errback(
                    on_error
                ),
                lambda: None,
            )
            producer.flush()
        finally:
            producer.close()

    def _run_confluent(self) -> None:
        """The same sends through librdkafka: a fraction of kafka-python's CPU, which the
        daemon, the broker and the reader share on a small machine."""
        import confluent_kafka as ck

        def delivered(err: Any, _: Any) -> None:
            if err is not None:
                self.failed += 1

        producer = ck.Producer(
            {
                "bootstrap.servers": self.bootstrap,
                "linger.ms": self.linger_ms,
                "batch.size": 262_144,
                "acks": 1,  # KafkaProducer's default
                "on_delivery": delivered,
            }
        )
        producer.list_topics(self.topic, timeout=30)  # metadata before the clock starts
        produce, topic, values, keys = producer.produce, self.topic, self.values, self.keys
        self._paced(
            lambda i, p: produce(topic, values[i], keys[i], partition=p),
            lambda: producer.poll(0),  # delivery callbacks
        )
        if producer.flush(60):
            raise RuntimeError("the benchmark producer did not deliver everything in 60 s")

    def _paced(self, send: Callable[[int, int], Any], after_tick: Callable[[], Any]) -> None:
        """Send the pool round and round at `rate`, stamping each send: `send(i, partition)`."""
        parts, sent_at, clock = self.parts, self.sent_at, time.time
        n, i = len(parts), 0
        self.started_at = clock()
        started = time.monotonic()
        # Never a burst longer than 10 ms of load.
        for due in pace(self.rate, self.seconds, 0.01, self.TICK, lambda: False):
            for _ in range(due):
                p = parts[i]
                sent_at[p].append(clock())
                send(i, p)
                i = i + 1 if i + 1 < n else 0
            after_tick()
            self.sent += due
        self.elapsed = time.monotonic() - started


# -- the alert reader (its own process: in this one it would queue behind the producer for
# -- the GIL, and its receive times would carry that wait) -------------------------------------


# source partition, source offset, event_id, the alert's detected_at, wall time when read
Received = tuple[int, int, str, float, float]


def read_alerts(
    bootstrap: str,
    topic: str,
    ready: Event,
    stop: Event,
    count: Synchronized[int],
    out: Connection,
) -> None:
    from kafka import KafkaConsumer, TopicPartition

    decode = msgspec.json.decode
    stamp = datetime.fromisoformat
    received: list[Received] = []
    consumer = KafkaConsumer(
        bootstrap_servers=bootstrap,
        group_id=None,  # assigned, not subscribed: no group join between us and the first alert
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        fetch_max_wait_ms=5,  # an empty fetch waits at the broker at most this long
        fetch_min_bytes=1,
    )
    try:
        parts = None
        deadline = time.monotonic() + 60
        while parts is None:
            if time.monotonic() > deadline:
                raise RuntimeError(f"no metadata for {topic}")
            parts = consumer.partitions_for_topic(topic)
            if parts is None:
                time.sleep(0.1)
        consumer.assign([TopicPartition(topic, p) for p in sorted(parts)])
        consumer.seek_to_beginning()
        consumer.poll(timeout_ms=200)  # look up the positions now, before the load starts
        ready.set()
        while not stop.is_set():
            polled = consumer.poll(timeout_ms=100)
            now = time.time()
            for records in polled.values():
                for r in records:
                    a = decode(r.value)
                    src = a["source"]
                    detected = stamp(a["detected_at"]).timestamp()
                    received.append(
                        (src["partition"], src["offset"], str(a["event_id"]), detected, now)
                    )
            with count.get_lock():
                count.value = len(received)
    finally:
        consumer.close()
        out.send(received)
        out.close()


# -- one run ----------------------------------------------------------------------------------


@dataclass
class Pool:
    values: list[bytes]
    keys: list[bytes]
    parts: list[int]
    ids: list[str]
    by_partition: list[list[int]]  # pool indices in the order they go to each partition


def make_pool(size: int, seed: int) -> Pool:
    values, keys = make_orders(size, ANOMALY_RATE, seed)
    parts = [partition_of(k) for k in keys]
    ids = [str(msgspec.json.decode(v)["order_id"]) for v in values]
    by_partition: list[list[int]] = [[] for _ in range(PARTITIONS)]
    for i, p in enumerate(parts):
        by_partition[p].append(i)
    return Pool(values, keys, parts, ids, by_partition)


def percentiles(ms: np.ndarray) -> dict[str, float | None]:
    if ms.size == 0:
        return dict.fromkeys(("p50", "p90", "p99", "max", "mean"), None)
    p50, p90, p99 = np.percentile(ms, [50, 90, 99])
    return {
        "p50": float(p50),
        "p90": float(p90),
        "p99": float(p99),
        "max": float(ms.max()),
        "mean": float(ms.mean()),
    }


def one_run(
    args: argparse.Namespace,
    kafka: Broker,
    bundle_path: Path,
    pool: Pool,
    batch: int,
    wait: float,
    workdir: Path,
    idle: float | None = None,
    client: str = "kafka-python",
) -> dict[str, Any]:
    bootstrap, broker_pid = kafka.bootstrap, kafka.pid
    topic = f"latency-orders-{uuid.uuid4().hex[:8]}"  # fresh: offsets start at 0
    port = free_port()
    config = daemon_config(bootstrap, topic, bundle_path, port, batch, client=client)
    config["batch"]["max_wait_seconds"] = wait
    if idle is not None:
        config["batch"]["idle_poll_seconds"] = idle
    if args.commit_interval is not None:
        config["kafka"]["commit_interval_seconds"] = args.commit_interval
    k = config["kafka"]
    rundir = workdir / f"daemon-{batch}-{wait:g}-{idle}-{client}"
    rundir.mkdir()
    log_path = rundir / "daemon.log"  # where spawn_daemon writes it
    ctx = mp.get_context("spawn")  # a fork would copy the parent's Kafka client threads' state
    ready, stop, count = ctx.Event(), ctx.Event(), ctx.Value("i", 0)
    receive_end, send_end = ctx.Pipe(duplex=False)
    reader: Any = None
    proc: subprocess.Popen[bytes] | None = None
    producer: StampedProducer | None = None
    try:
        create_topic(bootstrap, topic)
        proc, _ = spawn_daemon(config, rundir)
        ready_after = wait_ready(proc, port)  # the daemon creates the alert topic before this
        reader = ctx.Process(
            target=read_alerts,
            args=(bootstrap, k["alert_topic"], ready, stop, count, send_end),
            name="alert-reader",
        )
        reader.start()
        send_end.close()
        if not ready.wait(60):
            raise RuntimeError("the alert reader did not get ready in 60s")
        producer = StampedProducer(
            bootstrap,
            topic,
            pool.values,
            pool.keys,
            pool.parts,
            args.rate,
            args.seconds,
            args.linger_ms,
            args.producer,
        )
        cpu0, jiffies0 = cpu_seconds(proc.pid), machine_jiffies()
        broker0 = cpu_seconds(broker_pid) if broker_pid else 0.0
        t0 = time.monotonic()
        producer.start()
        max_lag = 0.0
        while producer.is_alive():
            producer.join(2.0)
            if proc.poll() is not None:
                raise RuntimeError(f"daemon exited {proc.returncode} during the load")
            max_lag = max(max_lag, total(scrape(port), "anomaly_consumer_lag"))
        load_wall = time.monotonic() - t0
        cpu1, jiffies1 = cpu_seconds(proc.pid), machine_jiffies()
        broker1 = cpu_seconds(broker_pid) if broker_pid else 0.0
        if producer.error is not None:
            raise RuntimeError(f"producer stopped: {producer.error!r}")
        produced = producer.sent - producer.failed

        # Drain: every event consumed, and every published alert read back.
        drain_started = time.monotonic()
        while True:
            s = scrape(port)
            consumed = metric(s, "anomaly_events_consumed_total")
            published = metric(s, "anomaly_alerts_published_total")
            if consumed >= produced and count.value >= published:
                break
            if time.monotonic() - drain_started > DRAIN_SECONDS:
                raise RuntimeError(
                    f"not drained in {DRAIN_SECONDS:.0f}s: consumed {consumed:.0f} of "
                    f"{produced}, alerts read {count.value} of {published:.0f}"
                )
            time.sleep(0.2)
        stop.set()
        received: list[Received] = receive_end.recv()
        reader.join(30)
        final = scrape(port)
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(60)
    except BaseException:
        if proc is not None:
            print(log_path.read_text(errors="replace")[-6000:], file=sys.stderr)
        raise
    finally:
        stop.set()
        if reader is not None and reader.is_alive():
            reader.join(10)
            if reader.is_alive():
                reader.terminate()
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait(10)
        delete_topics(bootstrap, [topic, k["alert_topic"], k["dead_letter_topic"]])

    # Latency of each alert, by its input position; warm-up sends left out.
    counted_from = producer.started_at + args.warmup
    latencies: list[float] = []
    to_detected: list[float] = []  # sent -> the daemon's detected_at (ms resolution)
    mismatched = unknown = warmup_alerts = 0
    for part, offset, event_id, t_detected, t_recv in received:
        stamps = producer.sent_at[part]
        if offset >= len(stamps):
            unknown += 1
            continue
        sent_idx = pool.by_partition[part][offset % len(pool.by_partition[part])]
        if pool.ids[sent_idx] != event_id:
            mismatched += 1
            continue
        if stamps[offset] < counted_from:
            warmup_alerts += 1
            continue
        latencies.append(t_recv - stamps[offset])
        to_detected.append(t_detected - stamps[offset])
    ms = 1000 * np.asarray(latencies)
    ms_detected = 1000 * np.asarray(to_detected)
    shares = cpu_shares(jiffies0, jiffies1)
    result = {
        "client": client,
        "max_batch_size": batch,
        "max_wait_seconds": wait,
        "idle_poll_seconds": idle,
        "target_rate": args.rate,
        "produced": produced,
        "produce_failures": producer.failed,
        "load_seconds": producer.elapsed,
        "achieved_rate": produced / producer.elapsed if producer.elapsed else None,
        "consumed": metric(final, "anomaly_events_consumed_total"),
        "alerts_published": metric(final, "anomaly_alerts_published_total"),
        "alerts_read": len(received),
        "alerts_timed": len(latencies),
        "alerts_in_warmup": warmup_alerts,
        "alerts_unknown_offset": unknown,
        "alerts_event_id_mismatch": mismatched,
        "alert_rate_per_second": len(received) / producer.elapsed if producer.elapsed else None,
        "alert_fraction_of_events": len(received) / produced if produced else None,
        "latency_ms": percentiles(ms),
        # The split at the alert's detected_at (set in the daemon, whole milliseconds): input
        # hop + batching + pipeline, then the alert's own hop to the reader.
        "sent_to_detected_ms": percentiles(ms_detected),
        "detected_to_read_ms": percentiles(ms - ms_detected),
        "max_consumer_lag": max_lag,
        "daemon_cpu_percent_of_one_core": 100 * (cpu1 - cpu0) / load_wall,
        "broker_cpu_percent_of_one_core": 100 * (broker1 - broker0) / load_wall
        if broker_pid
        else None,
        "machine_busy_percent": 100 - shares["idle"] - shares["iowait"] - shares["steal"],
        "daemon_ready_seconds_after_spawn": ready_after,
        "batches": metric(final, "anomaly_batches_total"),
        "mean_batch_size": metric(final, "anomaly_batch_size_sum")
        / max(1.0, metric(final, "anomaly_batch_size_count")),
        # Per-stage mean ms over the whole run: commit and produce (the flush before it) block
        # the daemon's loop, so events arriving meanwhile wait.
        "stage_mean_ms": {
            stage: 1000 * seconds / count if count else None
            for stage, (count, seconds) in stage_totals(final).items()
        },
        "commit_max_bucket_ms": slowest_bucket(final, "commit"),
        "exit_code": code,
    }
    lat = result["latency_ms"]
    log(
        f"batch {batch}, wait {wait:g}s: {result['achieved_rate']:,.0f}/s, "
        f"{len(latencies)} alerts timed, p50 {lat['p50'] or float('nan'):.1f} ms, "
        f"p99 {lat['p99'] or float('nan'):.1f} ms, exit {code}"
    )
    if mismatched or unknown:
        log(f"WARNING: {mismatched} alerts with another event_id, {unknown} beyond the sends")
    return result


def slowest_bucket(samples: Samples, stage: str) -> float | None:
    """Upper bound (ms) of the histogram bucket that holds the stage's slowest call."""
    buckets = sorted(
        (float(dict(labels)["le"]), value)
        for (name, labels), value in samples.items()
        if name == "anomaly_batch_duration_seconds_bucket" and ("stage", stage) in labels
    )
    total_calls = buckets[-1][1] if buckets else 0.0
    for le, value in buckets:
        if value >= total_calls:
            return 1000 * le
    return None


# -- report -----------------------------------------------------------------------------------


def table(runs: list[dict[str, Any]]) -> str:
    def ms(v: float | None) -> str:
        return "n/a" if v is None else f"{v:.1f}"

    lines = [
        "| client | batch size | max wait s | idle poll s | produced/s achieved | alerts (timed) "
        "| alerts/s | p50 ms | p90 ms | p99 ms | max ms | max lag | daemon CPU | machine busy |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in runs:
        lat = r["latency_ms"]
        lines.append(
            f"| {_client(r)} | {r['max_batch_size']} | {r['max_wait_seconds']:g} | {_idle(r)} "
            f"| {r['achieved_rate']:,.0f} "
            f"| {r['alerts_read']:,} ({r['alerts_timed']:,}) "
            f"| {r['alert_rate_per_second']:,.0f} | {ms(lat['p50'])} | {ms(lat['p90'])} "
            f"| {ms(lat['p99'])} | {ms(lat['max'])} | {r['max_consumer_lag']:,.0f} "
            f"| {r['daemon_cpu_percent_of_one_core']:.0f}% "
            f"| {r['machine_busy_percent']:.0f}% |"
        )
    lines += [
        "",
        "| client | batch size | max wait s | sent -> detected p50 / p99 ms "
        "| detected -> read p50 / p99 ms | flush ms (mean) | commit ms (mean, max bucket) "
        "| mean batch |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in runs:
        d, a, st = r["sent_to_detected_ms"], r["detected_to_read_ms"], r["stage_mean_ms"]
        lines.append(
            f"| {_client(r)} | {r['max_batch_size']} | {r['max_wait_seconds']:g} "
            f"| {ms(d['p50'])} / {ms(d['p99'])} | {ms(a['p50'])} / {ms(a['p99'])} "
            f"| {ms(st['produce'])} | {ms(st['commit'])}, <= {ms(r['commit_max_bucket_ms'])} "
            f"| {r['mean_batch_size']:.0f} |"
        )
    return "\n".join(lines)


def _client(run: dict[str, Any]) -> str:
    return str(run.get("client", "kafka-python"))  # runs saved before clients were a choice


def _idle(run: dict[str, Any]) -> str:
    idle = run.get("idle_poll_seconds")
    return "default" if idle is None else f"{idle:g}"


def parse_configs(text: str) -> list[tuple[int, float, float | None]]:
    """`size:wait[:idle]` items: batch size, max wait, and optionally the idle poll."""
    out = []
    for item in text.split(","):
        size, wait, *idle = item.split(":")
        out.append((int(size), float(wait), float(idle[0]) if idle else None))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument(
        "--max-rate", type=int, default=DEFAULT_MAX_RATE, help="the daemon's maximum, events/s"
    )
    parser.add_argument("--rate", type=int, help="events/s to produce (default: --max-rate / 2)")
    parser.add_argument("--seconds", type=float, default=30.0, help="load per daemon run")
    parser.add_argument(
        "--configs",
        default=DEFAULT_CONFIGS,
        help="daemon runs as max_batch_size:max_wait_seconds[:idle_poll_seconds], comma-separated",
    )
    parser.add_argument(
        "--warmup", type=float, default=2.0, help="seconds of sends left out of the latencies"
    )
    parser.add_argument("--linger-ms", type=int, default=5, help="the benchmark producer's linger")
    parser.add_argument(
        "--producer",
        choices=CLIENTS,
        default=default_clients().split(",")[-1],
        help="the benchmark's own producer (default confluent when installed: less CPU taken "
        "from the daemon on a small machine)",
    )
    parser.add_argument(
        "--clients",
        default="kafka-python",
        help="kafka.client: each config runs once per client (kafka-python, confluent)",
    )
    parser.add_argument(
        "--commit-interval",
        type=float,
        help="kafka.commit_interval_seconds (default: the daemon's)",
    )
    parser.add_argument("--bootstrap", help="use this broker instead of starting the local one")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "bench" / "latency.json")
    parser.add_argument("--pool", type=int, default=200_000, help="orders simulated up front")
    parser.add_argument("--seed", type=int, default=21, help="simulator seed of the stream")
    parser.add_argument("--epochs", type=int, default=5, help="epochs when training the bundle")
    args = parser.parse_args(argv)
    if args.rate is None:
        args.rate = args.max_rate // 2
    configs = parse_configs(args.configs)
    try:
        clients = parse_clients(args.clients)
    except ValueError as exc:
        parser.error(str(exc))
    if args.seconds <= args.warmup or args.rate < 1 or args.pool < 1:
        parser.error("--seconds must exceed --warmup; --rate and --pool must be positive")
    command = " ".join(["bench/latency.py", *(sys.argv[1:] if argv is None else argv)])
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

    with tempfile.TemporaryDirectory(prefix="bench-latency-") as tmp:
        workdir = Path(tmp)
        bundle_path = train_bundle(workdir, args.epochs)
        log(f"simulating a pool of {args.pool:,} orders ({ANOMALY_RATE:.0%} anomalies)")
        pool = make_pool(args.pool, args.seed)
        if not args.bootstrap:
            os.environ["KAFKA_PORT"] = LATENCY_PORT  # read by bench/e2e.py's broker()
        with broker(args.bootstrap) as kafka:
            info = machine_info(kafka.about)
            runs = []
            for (batch, wait, idle), client in itertools.product(configs, clients):
                log(f"daemon run: {client}, batch {batch}, max wait {wait:g}s, idle poll {idle}, "
                    f"{args.rate:,} events/s")  # fmt: skip
                runs.append(
                    one_run(args, kafka, bundle_path, pool, batch, wait, workdir, idle, client)
                )

    info["load_average_at_end"] = list(os.getloadavg())
    results = {
        "command": command,
        "machine": info,
        "settings": {
            "max_rate": args.max_rate,
            "rate": args.rate,
            "seconds": args.seconds,
            "warmup_seconds": args.warmup,
            "producer_linger_ms": args.linger_ms,
            "producer_client": args.producer,
            "commit_interval_seconds": args.commit_interval,
            "pool": args.pool,
            "anomaly_rate": ANOMALY_RATE,
            "partitions": PARTITIONS,
            "openblas_num_threads": os.environ.get("OPENBLAS_NUM_THREADS"),
        },
        "runs": runs,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(
        f"\nlatency: produce -> alert readable, {args.rate:,} events/s target "
        f"(--max-rate {args.max_rate:,} / 2 unless --rate), {args.seconds:g}s per run, first "
        f"{args.warmup:g}s left out; {PARTITIONS} partitions; producer {args.producer}; "
        f"nproc {info['nproc']}, "
        f"{info['date_utc']}\n"
    )
    print(table(runs))
    print(f"\nresults written to {_shown(args.out)}")
    bad = [r for r in runs if r["exit_code"] != 0 or r["alerts_event_id_mismatch"]]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
