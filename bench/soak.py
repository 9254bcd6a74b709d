"""Soak test: the daemon under a steady paced load for a long time (not part of CI).

    .venv/bin/python bench/soak.py --minutes 60 [--rate 20000] [--bootstrap HOST:PORT]
        [--delivery at-least-once|exactly-once] [--out runs/soak]

Without --bootstrap it starts the repo's local broker (deploy/local-kafka/kafka.sh) on port
29192 and stops it at the end; a broker already serving there is used and left running.
It trains a small bundle into a temporary directory (as bench/e2e.py does), creates a fresh
4-partition input topic, starts `python -m streamer run` as a subprocess and streams
simulated orders (1% anomalies, keyed by customer_id) at --rate events/s from a paced
producer thread for --minutes. The orders come from a pool of --pool events simulated up
front and sent round and round: simulating live costs about as much CPU as the daemon.

Every 10 s it appends a row to <out>/soak.csv: elapsed seconds, daemon RSS, events consumed,
scored and alerted, total consumer lag, rejected events, events produced, and CPU use. After
the load it waits up to 60 s for the daemon to drain the topic, sends SIGTERM, and prints a
summary (also <out>/summary.json); the daemon's log is <out>/daemon.log. The exit status is
0 only when the daemon drained everything and exited 0.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np

# Run as `python bench/soak.py`: bench/ itself is on sys.path, so e2e imports as a module.
from e2e import (
    PARTITIONS,
    ROOT,
    Samples,
    _shown,
    broker,
    cpu_seconds,
    cpu_shares,
    daemon_config,
    delete_topics,
    free_port,
    http_get,
    log,
    machine_info,
    machine_jiffies,
    make_orders,
    metric,
    proc_memory,
    scrape,
    spawn_daemon,
    train_bundle,
)

SOAK_PORT = "29192"  # clear of the demo (9092), the tests (19092) and bench/e2e.py (29092)
DEFAULT_RATE = 20_000  # about half the daemon's measured end-to-end maximum on a 2-core box
SAMPLE_SECONDS = 10.0
DRAIN_SECONDS = 60.0
ANOMALY_RATE = 0.01
# The input topic keeps 15 minutes: an hour at 20,000 events/s is about 18 GB otherwise.
INPUT_TOPIC_CONFIG = {"retention.ms": str(15 * 60 * 1000), "segment.bytes": str(64 << 20)}
# The daemon's own log lines (Python logging's format) at WARNING or above, and tracebacks.
# "model bundle <version> (<kind>, <n> features[, <runtime> runtime]) from <path>"
MODEL_LINE = re.compile(r"model bundle (\S+) \(([^)]*)\)")
LOG_PROBLEM = re.compile(r"^\d{4}-\d\d-\d\d [\d:,]+ (WARNING|ERROR|CRITICAL) |^Traceback")


# -- the load ---------------------------------------------------------------------------------


class PacedProducer(threading.Thread):
    """Sends `rate` events/s for `seconds`, cycling through a pool of encoded orders.

    Paced against the clock from the start: if it falls behind it sends what is due at once,
    so `sent / seconds` is the rate it achieved.
    """

    TICK = 0.005

    def __init__(
        self,
        bootstrap: str,
        topic: str,
        values: list[bytes],
        keys: list[bytes],
        rate: float,
        seconds: float,
    ) -> None:
        super().__init__(name="soak-producer", daemon=True)
        self.bootstrap, self.topic = bootstrap, topic
        self.values, self.keys = values, keys
        self.rate, self.seconds = rate, seconds
        self.sent = 0  # handed to the client
        self.failed = 0  # reported failed by the client
        self.first_error: str | None = None
        self.error: BaseException | None = None  # what stopped the thread, if anything
        self.elapsed = 0.0
        self.stop_event = threading.Event()

    @property
    def produced(self) -> int:
        return self.sent - self.failed

    def _on_error(self, exc: BaseException) -> None:
        self.failed += 1
        if self.first_error is None:
            self.first_error = repr(exc)

    def run(self) -> None:
        try:
            self._run()
        except BaseException as exc:
            self.error = exc

    def _run(self) -> None:
        from kafka import KafkaProducer

        # The settings `training simulate --topic` and bench/e2e.py use.
        producer = KafkaProducer(bootstrap_servers=self.bootstrap, linger_ms=5, batch_size=262_144)
        try:
            send, topic, on_error = producer.send, self.topic, self._on_error
            values, keys, n = self.values, self.keys, len(self.values)
            i = 0
            started = time.monotonic()
            # Look at the clock at least every 0.1 s of load.
            for due in pace(self.rate, self.seconds, 0.1, self.TICK, self.stop_event.is_set):
                for _ in range(due):
                    send(topic, key=keys[i], value=values[i]).add_errback(on_error)
                    i = i + 1 if i + 1 < n else 0
                self.sent += due
            self.elapsed = time.monotonic() - started
            producer.flush()
        finally:
            producer.close()


def pace(
    rate: float, seconds: float, chunk_seconds: float, tick: float, stopped: Callable[[], bool]
) -> Iterator[int]:
    """How many sends are due, again and again, to hold `rate` events/s for `seconds`.

    Never more than `chunk_seconds` of load at once, so the caller looks at the clock that
    often; sleeps `tick` while nothing is due; ends early when `stopped()` says so.
    """
    chunk = max(1, int(rate * chunk_seconds))
    started = time.monotonic()
    end = started + seconds
    sent = 0
    while not stopped():
        now = time.monotonic()
        if now >= end:
            return
        due = min(chunk, int(rate * (now - started)) - sent)
        if due <= 0:
            time.sleep(tick)
            continue
        yield due
        sent += due


def create_input_topic(bootstrap: str, topic: str) -> None:
    from kafka.admin import KafkaAdminClient, NewTopic

    admin = KafkaAdminClient(bootstrap_servers=bootstrap)
    try:
        new = NewTopic(topic, PARTITIONS, 1, topic_configs=INPUT_TOPIC_CONFIG)
        admin.create_topics([new], wait_for_metadata=True)
    finally:
        admin.close()


# -- the daemon -------------------------------------------------------------------------------


def wait_ready(proc: subprocess.Popen[bytes], port: int, timeout: float = 120.0) -> float:
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"daemon exited {proc.returncode} before it was ready")
        try:
            if http_get(port, "/readyz")[0] == 200:
                return time.monotonic() - started
        except OSError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"daemon not ready after {timeout:.0f}s")


# -- sampling ---------------------------------------------------------------------------------


@dataclass
class Row:
    elapsed_s: float
    phase: str  # load | drain
    rss_mib: float
    consumed: int
    scored: int
    alerts: int
    lag: int  # sum of anomaly_consumer_lag over the partitions
    rejected: int
    produced: int
    delivery_failures: int
    daemon_cpu_pct: float  # of one core, since the previous row
    machine_busy_pct: float  # all CPUs, since the previous row (steal counts as not busy)


def total(samples: Samples, name: str) -> float:
    return sum(v for (n, _), v in samples.items() if n == name)


class Sampler:
    def __init__(self, proc: subprocess.Popen[bytes], port: int, csv_path: Path) -> None:
        self.proc, self.port = proc, port
        self.rows: list[Row] = []
        self.last: Samples = {}
        self._cpu, self._jiffies = cpu_seconds(proc.pid), machine_jiffies()
        self._at = time.monotonic()
        self._file = csv_path.open("w", newline="")
        self._csv = csv.writer(self._file)
        self._csv.writerow(f.name for f in fields(Row))

    def scrape(self) -> Samples:
        for attempt in range(3):
            try:
                self.last = scrape(self.port)
                return self.last
            except OSError as exc:
                if attempt == 2:
                    log(f"scrape failed, keeping the previous values: {exc}")
                time.sleep(0.2)
        return self.last

    def record(self, elapsed: float, phase: str, produced: Callable[[], int]) -> Row:
        s = self.scrape()  # then the produced count: it is read after, so never behind
        now, cpu, jiffies = time.monotonic(), cpu_seconds(self.proc.pid), machine_jiffies()
        shares = cpu_shares(self._jiffies, jiffies)
        row = Row(
            elapsed_s=round(elapsed, 1),
            phase=phase,
            rss_mib=round(proc_memory(self.proc.pid).get("VmRSS", float("nan")), 1),
            consumed=int(metric(s, "anomaly_events_consumed_total")),
            scored=int(metric(s, "anomaly_events_scored_total")),
            alerts=int(metric(s, "anomaly_alerts_published_total")),
            lag=int(total(s, "anomaly_consumer_lag")),
            rejected=int(total(s, "anomaly_events_rejected_total")),
            produced=produced(),
            delivery_failures=int(total(s, "anomaly_delivery_failures_total")),
            daemon_cpu_pct=round(100 * (cpu - self._cpu) / max(1e-9, now - self._at), 1),
            machine_busy_pct=round(100 - shares["idle"] - shares["iowait"] - shares["steal"], 1),
        )
        self._cpu, self._jiffies, self._at = cpu, jiffies, now
        self.rows.append(row)
        self._csv.writerow(astuple_row(row))
        self._file.flush()
        log(
            f"t={row.elapsed_s:>7.0f}s {phase:5} produced={row.produced:,} "
            f"consumed={row.consumed:,} lag={row.lag:,} rss={row.rss_mib:.0f}MiB "
            f"daemon_cpu={row.daemon_cpu_pct:.0f}% machine={row.machine_busy_pct:.0f}%"
        )
        return row

    def close(self) -> None:
        self._file.close()


def astuple_row(row: Row) -> list[Any]:
    return list(asdict(row).values())


def slope_per_hour(rows: list[Row]) -> float | None:
    """Least-squares slope of RSS against time, MiB per hour."""
    if len(rows) < 3:
        return None
    t = np.array([r.elapsed_s for r in rows]) / 3600
    rss = np.array([r.rss_mib for r in rows])
    return float(np.polyfit(t, rss, 1)[0])


# -- main -------------------------------------------------------------------------------------


def soak(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    out: Path = args.out
    bundle_path = train_bundle(workdir, args.epochs)
    log(f"simulating a pool of {args.pool:,} orders ({ANOMALY_RATE:.0%} anomalies)")
    values, keys = make_orders(args.pool, ANOMALY_RATE, args.seed)
    topic = f"soak-orders-{uuid.uuid4().hex[:8]}"
    seconds = 60 * args.minutes

    if not args.bootstrap:
        os.environ["KAFKA_PORT"] = SOAK_PORT  # read by bench/e2e.py's broker()
    with broker(args.bootstrap) as kafka:
        bootstrap = kafka.bootstrap
        info = machine_info(kafka.about)
        port = free_port()
        config = daemon_config(bootstrap, topic, bundle_path, port, args.batch_size)
        config["kafka"]["delivery"] = args.delivery
        k = config["kafka"]
        proc: subprocess.Popen[bytes] | None = None
        producer: PacedProducer | None = None
        sampler: Sampler | None = None
        try:
            create_input_topic(bootstrap, topic)
            proc, log_path = spawn_daemon(config, out)
            ready_after = wait_ready(proc, port)
            log(f"daemon ready after {ready_after:.1f}s; streaming {args.rate:,} events/s")
            sampler = Sampler(proc, port, out / "soak.csv")
            producer = PacedProducer(bootstrap, topic, values, keys, args.rate, seconds)
            started = time.monotonic()
            sampler.record(0.0, "load", lambda: 0)
            producer.start()
            next_at = started + SAMPLE_SECONDS
            while producer.is_alive():
                producer.join(max(0.0, next_at - time.monotonic()))
                if proc.poll() is not None:
                    raise RuntimeError(f"daemon exited {proc.returncode} during the load")
                if time.monotonic() >= next_at:
                    sampler.record(time.monotonic() - started, "load", lambda: producer.sent)
                    next_at += SAMPLE_SECONDS
            if producer.error is not None:
                raise RuntimeError(f"producer stopped: {producer.error!r}")
            produced = producer.produced
            load_seconds = producer.elapsed
            log(f"load done: {produced:,} produced in {load_seconds:.0f}s; draining")

            # Drain: until the daemon has consumed all and reports no lag, at most 60 s.
            drain_started = time.monotonic()
            drained = False
            while time.monotonic() - drain_started < DRAIN_SECONDS:
                if proc.poll() is not None:
                    raise RuntimeError(f"daemon exited {proc.returncode} while draining")
                s = sampler.scrape()
                consumed = metric(s, "anomaly_events_consumed_total")
                if consumed >= produced and total(s, "anomaly_consumer_lag") == 0:
                    drained = True
                    break
                if time.monotonic() >= next_at:
                    sampler.record(time.monotonic() - started, "drain", lambda: produced)
                    next_at += SAMPLE_SECONDS
                time.sleep(1.0)
            drain_seconds = time.monotonic() - drain_started
            final = sampler.record(time.monotonic() - started, "drain", lambda: produced)
            hwm = proc_memory(proc.pid).get("VmHWM")

            stop_started = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            try:
                code: int | None = proc.wait(90)
            except subprocess.TimeoutExpired:
                code = None
            stop_seconds = time.monotonic() - stop_started
        except BaseException:
            if proc is not None:
                print(log_path.read_text(errors="replace")[-6000:], file=sys.stderr)
            raise
        finally:
            if producer is not None and producer.is_alive():
                producer.stop_event.set()
                producer.join(30)
            if sampler is not None:
                sampler.close()
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait(10)
            delete_topics(bootstrap, [topic, k["alert_topic"], k["dead_letter_topic"]])

    rows = sampler.rows
    load_rows = [r for r in rows if r.phase == "load"]
    warm = [r for r in load_rows if r.elapsed_s >= args.warmup]
    daemon_log = log_path.read_text(errors="replace")
    problems = [line for line in daemon_log.splitlines() if LOG_PROBLEM.search(line)]
    model = MODEL_LINE.search(daemon_log)
    return {
        "command": " ".join(["bench/soak.py", *sys.argv[1:]]),
        "machine": {**info, "load_average_at_end": list(os.getloadavg())},
        "settings": {
            "minutes": args.minutes,
            "rate": args.rate,
            "delivery": args.delivery,
            "partitions": PARTITIONS,
            "batch": config["batch"],
            "pool": args.pool,
            "anomaly_rate": ANOMALY_RATE,
            "warmup_seconds": args.warmup,
        },
        "model": f"{model.group(1)} ({model.group(2)})" if model else None,
        "daemon_ready_seconds_after_spawn": ready_after,
        "load_seconds": load_seconds,
        "produced": produced,
        "produce_failures": producer.failed,
        "first_produce_error": producer.first_error,
        "achieved_rate": produced / load_seconds if load_seconds else None,
        "consumed": final.consumed,
        "scored": final.scored,
        "alerts": final.alerts,
        "rejected": final.rejected,
        "delivery_failures": final.delivery_failures,
        "rss_mib": {
            "start": rows[0].rss_mib,
            "max": max(r.rss_mib for r in rows),
            "end": final.rss_mib,
            "peak_vmhwm": hwm,
            "growth_per_hour_after_warmup": slope_per_hour(warm),
            "growth_per_hour_all_load": slope_per_hour(load_rows),
        },
        "lag": {
            "max": max(r.lag for r in rows),
            "max_after_warmup": max((r.lag for r in warm), default=None),
            "final": final.lag,
            "drained": drained,
            "drain_seconds": drain_seconds,
        },
        "daemon_cpu_pct_mean": float(np.mean([r.daemon_cpu_pct for r in load_rows[1:]]))
        if len(load_rows) > 1
        else None,
        "machine_busy_pct_mean": float(np.mean([r.machine_busy_pct for r in load_rows[1:]]))
        if len(load_rows) > 1
        else None,
        "exit_code": code,
        "sigterm_to_exit_seconds": stop_seconds,
        "log_problem_lines": len(problems),
        "log_problem_examples": problems[:10],
    }


def summary_text(r: dict[str, Any]) -> str:
    def fmt(v: float | None, spec: str = ",.1f") -> str:
        return "n/a" if v is None else format(v, spec)

    rss, lag, s, m = r["rss_mib"], r["lag"], r["settings"], r["machine"]
    lines = [
        f"soak: {s['minutes']:g} min at {s['rate']:,} events/s target, {s['delivery']}, "
        f"{s['partitions']} partitions, batch {s['batch']['max_batch_size']}; "
        f"nproc {m['nproc']}, {m['date_utc']}",
        f"produced   {r['produced']:,} in {r['load_seconds']:.0f}s "
        f"({fmt(r['achieved_rate'], ',.0f')}/s achieved), {r['produce_failures']} send failures",
        f"consumed   {r['consumed']:,} (produced - consumed = {r['produced'] - r['consumed']:,}); "
        f"scored {r['scored']:,}, alerts {r['alerts']:,}, rejected {r['rejected']:,}, "
        f"delivery failures {r['delivery_failures']:,}",
        f"RSS MiB    start {rss['start']:.0f}, max {rss['max']:.0f}, end {rss['end']:.0f} "
        f"(VmHWM {fmt(rss['peak_vmhwm'], '.0f')}); growth "
        f"{fmt(rss['growth_per_hour_after_warmup'], '+.1f')} MiB/h after the first "
        f"{s['warmup_seconds']:g}s ({fmt(rss['growth_per_hour_all_load'], '+.1f')} MiB/h "
        "over the whole load)",
        f"lag        max {lag['max']:,} (after warm-up {fmt(lag['max_after_warmup'], ',.0f')}); "
        f"final {lag['final']:,} after {lag['drain_seconds']:.0f}s of drain "
        f"({'drained' if lag['drained'] else 'NOT drained'})",
        f"CPU        daemon {fmt(r['daemon_cpu_pct_mean'], '.0f')}% of a core, machine "
        f"{fmt(r['machine_busy_pct_mean'], '.0f')}% busy (means over the load)",
        f"daemon     model {r['model'] or '?'}; ready {r['daemon_ready_seconds_after_spawn']:.1f}s "
        "after spawn; "
        f"SIGTERM exit {r['exit_code']} after {r['sigterm_to_exit_seconds']:.1f}s; "
        f"{r['log_problem_lines']} WARNING/ERROR/Traceback log lines",
    ]
    lines += [f"  log: {line}" for line in r["log_problem_examples"]]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--minutes", type=float, default=60.0, help="how long to stream")
    parser.add_argument("--rate", type=int, default=DEFAULT_RATE, help="events/s to produce")
    parser.add_argument("--bootstrap", help="use this broker instead of starting the local one")
    parser.add_argument(
        "--delivery", choices=("at-least-once", "exactly-once"), default="at-least-once"
    )
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "soak")
    parser.add_argument("--batch-size", type=int, default=1000, help="daemon max_batch_size")
    parser.add_argument("--pool", type=int, default=200_000, help="orders simulated up front")
    parser.add_argument("--seed", type=int, default=21, help="simulator seed of the stream")
    parser.add_argument("--epochs", type=int, default=5, help="epochs when training the bundle")
    parser.add_argument(
        "--warmup", type=float, default=60.0, help="seconds left out of the RSS slope"
    )
    args = parser.parse_args(argv)
    if args.minutes <= 0 or args.rate < 1 or args.pool < 1:
        parser.error("--minutes, --rate and --pool must be positive")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # before TensorFlow's first import
    args.out.mkdir(parents=True, exist_ok=True)

    with tempfile.TemporaryDirectory(prefix="bench-soak-") as tmp:
        result = soak(args, Path(tmp))
    (args.out / "summary.json").write_text(json.dumps(result, indent=2) + "\n")
    print()
    print(summary_text(result))
    rows, daemon_log = _shown(args.out / "soak.csv"), _shown(args.out / "daemon.log")
    print(f"\nrows in {rows}, daemon log in {daemon_log}")
    ok = result["exit_code"] == 0 and result["lag"]["drained"]
    if not ok:
        print("FAIL: the daemon must drain the topic and exit 0 after SIGTERM", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
