"""Scale-out: end-to-end throughput of 1 daemon against 2 daemons in one consumer group.

    .venv/bin/python bench/scaleout.py [--events 300000] [--repeats 5] [--bootstrap HOST:PORT]
        [--out runs/bench/scaleout.json]

Without --bootstrap it starts the repo's local broker on port 29392 and stops it at the end;
a broker already serving there is used and left running. It trains a small bundle (as
bench/e2e.py does) and simulates --events orders (1% anomalies, keyed by customer_id) once.
Then, --repeats times, in turn: 1 daemon, then 2 daemons in one group.

Each run gets a fresh 4-partition topic holding the same events and a fresh group. The
events are written inside a Kafka transaction that stays open while the daemons (batch 1000,
max wait 0.2 s, each its own metrics port) start; they read with read_committed, so they see
nothing yet. When every daemon answers /readyz and the group has settled (each partition
assigned to exactly one daemon, from their "assigned" log lines), the transaction is
committed and the clock starts. It stops when the sum of their
anomaly_events_consumed_total reaches --events: /metrics is scraped 10 times a second and the
crossing time is interpolated between the last two scrapes. Medians over the repeats are
compared.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

# Run as `python bench/scaleout.py`: bench/ itself is on sys.path, so e2e imports as a module.
from e2e import (
    CLIENTS,
    PARTITIONS,
    ROOT,
    Broker,
    _shown,
    broker,
    cpu_seconds,
    cpu_shares,
    create_topic,
    daemon_config,
    delete_topics,
    free_port,
    http_get,
    log,
    machine_info,
    machine_jiffies,
    make_orders,
    metric,
    rate_between,
    scrape,
    spawn_daemon,
    train_bundle,
)

SCALEOUT_PORT = "29392"  # clear of the demo, the tests, e2e (29092), soak (29192), latency (29292)
BATCH = 1000
ANOMALY_RATE = 0.01


def consumed(port: int) -> float:
    return metric(scrape(port), "anomaly_events_consumed_total")


def assigned(log_path: Path) -> list[int] | None:
    """The partitions of the daemon's latest "assigned [...]" log line, if any yet."""
    lines = [ln for ln in log_path.read_text(errors="replace").splitlines() if " assigned [" in ln]
    return [int(p) for p in re.findall(r"\[(\d+)\]", lines[-1])] if lines else None


class HeldBack:
    """The N events of one run, written inside a Kafka transaction left open.

    The daemons read with isolation_level=read_committed, so they see none of it until
    commit(): every daemon can join the group, and the group settle, first. Without this the
    first daemon reads, and holds uncommitted batches, when the second one's join makes it
    give its partitions up; finishing those batches in the revoke callback is what
    kafka-python 3.0.12 refuses ("Cannot block on net.run() from the IO thread"), and the
    group then never settles.
    """

    def __init__(self, bootstrap: str, topic: str, values: list[bytes], keys: list[bytes]) -> None:
        from kafka import KafkaProducer

        self.producer = KafkaProducer(
            bootstrap_servers=bootstrap,
            linger_ms=5,
            batch_size=262_144,
            acks="all",
            enable_idempotence=True,
            transactional_id=f"bench-scaleout-{uuid.uuid4().hex[:8]}",
            transaction_timeout_ms=300_000,  # the broker's default ceiling is 15 minutes
        )
        self.committed = False
        self.producer.init_transactions()
        self.producer.begin_transaction()
        send = self.producer.send
        for k, v in zip(keys, values, strict=True):
            send(topic, key=k, value=v)
        self.producer.flush()

    def commit(self) -> None:
        self.producer.commit_transaction()
        self.committed = True

    def close(self) -> None:
        if not self.committed:
            self.producer.abort_transaction()
        self.producer.close()


def run_group(
    kafka: Broker,
    bundle_path: Path,
    processes: int,
    values: list[bytes],
    keys: list[bytes],
    workdir: Path,
    timeout: float,
    client: str = "kafka-python",
) -> dict[str, Any]:
    """`processes` daemons in one fresh group on a fresh topic; time them to n consumed."""
    n = len(values)
    token = uuid.uuid4().hex[:8]
    topic, group = f"scaleout-orders-{token}", f"bench-scaleout-{token}"
    daemons: list[tuple[subprocess.Popen[bytes], int, Path]] = []
    held: HeldBack | None = None
    config = daemon_config(kafka.bootstrap, topic, bundle_path, 0, BATCH, client=client)
    k = config["kafka"]
    try:
        create_topic(kafka.bootstrap, topic)
        started = time.monotonic()
        held = HeldBack(kafka.bootstrap, topic, values, keys)
        log(f"{n:,} events written (not yet committed) in {time.monotonic() - started:.1f}s")
        for i in range(processes):
            port = free_port()
            config = daemon_config(kafka.bootstrap, topic, bundle_path, port, BATCH, client=client)
            config["kafka"]["group_id"] = group
            rundir = workdir / f"{group}-{i}"
            rundir.mkdir()
            proc, log_path = spawn_daemon(config, rundir)
            daemons.append((proc, port, log_path))
        spawned = time.monotonic()
        deadline = spawned + timeout

        def check() -> None:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{processes} daemon(s) did not consume {n} in {timeout:.0f}s")
            for proc, _, _ in daemons:
                if proc.poll() is not None:
                    raise RuntimeError(f"a daemon exited {proc.returncode} before the end")

        # Ready: every daemon answers /readyz and the group has settled, each partition
        # assigned to exactly one of them.
        pending = {port for _, port, _ in daemons}
        everything = list(range(PARTITIONS))
        while True:
            check()
            for port in list(pending):
                try:
                    if http_get(port, "/readyz")[0] == 200:
                        pending.discard(port)
                except OSError:
                    pass  # not serving yet
            parts = [assigned(log_path) or [] for _, _, log_path in daemons]
            if not pending and all(parts) and sorted(p for ps in parts for p in ps) == everything:
                break
            time.sleep(0.05)
        ready_after = time.monotonic() - spawned
        cpu0 = [cpu_seconds(p.pid) for p, _, _ in daemons]
        broker0 = cpu_seconds(kafka.pid) if kafka.pid else 0.0
        jiffies0 = machine_jiffies()
        held.commit()  # the clock starts when the events become readable
        ready_at = time.monotonic()
        points: list[tuple[float, float]] = [(0.0, 0.0)]
        per_daemon = [0.0] * processes
        while points[-1][1] < n:
            check()
            time.sleep(0.1)
            per_daemon = [consumed(port) for _, port, _ in daemons]
            points.append((time.monotonic() - ready_at, sum(per_daemon)))
        # The scrapes are 0.1 s apart: take the time n was crossed from the last two.
        (t0, c0), (t1, c1) = points[-2], points[-1]
        window = t0 + (t1 - t0) * (n - c0) / (c1 - c0) if c1 > c0 else t1
        cpu1 = [cpu_seconds(p.pid) for p, _, _ in daemons]
        broker1 = cpu_seconds(kafka.pid) if kafka.pid else 0.0
        shares = cpu_shares(jiffies0, machine_jiffies())

        codes = []
        for proc, _, _ in daemons:
            proc.send_signal(signal.SIGTERM)
        for proc, _, _ in daemons:
            codes.append(proc.wait(60))
    except BaseException:
        for _, _, log_path in daemons:
            print(log_path.read_text(errors="replace")[-4000:], file=sys.stderr)
        raise
    finally:
        for proc, _, _ in daemons:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
        if held is not None:
            held.close()
        delete_topics(kafka.bootstrap, [topic, k["alert_topic"], k["dead_letter_topic"]])

    steady = rate_between(points, 0.1 * n, 0.9 * n)
    first = next(t for t, c in points if c > 0)
    return {
        "processes": processes,
        "topic": topic,
        "group_id": group,
        "ready_and_settled_seconds_after_spawn": ready_after,
        "first_consumed_seconds_after_commit": first,
        "window_seconds": window,
        "events_per_second": n / window,
        "steady_rate_10_to_90_percent": steady,
        "points": [[round(t, 3), c] for t, c in points],  # (seconds after commit, consumed)
        # More than n in total means a replay after the rebalance: at-least-once at work.
        "consumed_per_daemon": per_daemon,
        "daemon_cpu_percent_of_one_core": [
            100 * (b - a) / window for a, b in zip(cpu0, cpu1, strict=True)
        ],
        "broker_cpu_percent_of_one_core": 100 * (broker1 - broker0) / window if kafka.pid else None,
        "machine_busy_percent": 100 - shares["idle"] - shares["iowait"] - shares["steal"],
        "exit_codes": codes,
    }


def summary(runs: list[dict[str, Any]], processes: int) -> dict[str, Any]:
    mine = [r for r in runs if r["processes"] == processes]
    steady = [r["steady_rate_10_to_90_percent"] for r in mine if r["steady_rate_10_to_90_percent"]]
    return {
        "processes": processes,
        "runs": len(mine),
        "median_events_per_second": statistics.median(r["events_per_second"] for r in mine),
        "all_events_per_second": [r["events_per_second"] for r in mine],
        "median_steady_rate": statistics.median(steady) if steady else None,
    }


def table(runs: list[dict[str, Any]], one: dict[str, Any], two: dict[str, Any]) -> str:
    lines = [
        "| processes | events/s (median) | each run, events/s | 10-90% steady (median) "
        "| ratio to 1 process |",
        "|---:|---:|---|---:|---:|",
    ]
    for s in (one, two):
        ratio = s["median_events_per_second"] / one["median_events_per_second"]
        each = ", ".join(f"{v:,.0f}" for v in s["all_events_per_second"])
        steady = s["median_steady_rate"]
        lines.append(
            f"| {s['processes']} | {s['median_events_per_second']:,.0f} | {each} "
            f"| {'n/a' if steady is None else f'{steady:,.0f}'} | {ratio:.2f}x |"
        )
    lines += [
        "",
        "| run | processes | settled after spawn s | first read after commit s | window s "
        "| per daemon consumed | daemon CPU (% of a core) | broker CPU | machine busy | exit |",
        "|---:|---:|---:|---:|---:|---|---|---:|---:|---|",
    ]
    for i, r in enumerate(runs, 1):
        broker_cpu = r["broker_cpu_percent_of_one_core"]
        lines.append(
            f"| {i} | {r['processes']} | {r['ready_and_settled_seconds_after_spawn']:.1f} "
            f"| {r['first_consumed_seconds_after_commit']:.1f} | {r['window_seconds']:.2f} "
            f"| {', '.join(f'{v:,.0f}' for v in r['consumed_per_daemon'])} "
            f"| {', '.join(f'{v:.0f}%' for v in r['daemon_cpu_percent_of_one_core'])} "
            f"| {'n/a' if broker_cpu is None else f'{broker_cpu:.0f}%'} "
            f"| {r['machine_busy_percent']:.0f}% | {', '.join(map(str, r['exit_codes']))} |"
        )
    return "\n".join(lines)


def scenarios(
    args: argparse.Namespace,
    kafka: Broker,
    bundle_path: Path,
    values: list[bytes],
    keys: list[bytes],
    workdir: Path,
) -> list[dict[str, Any]]:
    runs = []
    # Interleaved, so that a drift in the machine's load hits both scenarios.
    for rep in range(args.repeats):
        for processes in (1, 2):
            r = run_group(
                kafka, bundle_path, processes, values, keys, workdir, args.timeout, args.client
            )
            rate, window = r["events_per_second"], r["window_seconds"]
            log(f"run {rep + 1}, {processes} process(es): {rate:,.0f} events/s in {window:.2f}s")
            runs.append(r)
    return runs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--events", type=int, default=300_000, help="events to pre-produce")
    parser.add_argument("--repeats", type=int, default=5, help="runs of each scenario")
    parser.add_argument("--bootstrap", help="use this broker instead of starting the local one")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "bench" / "scaleout.json")
    parser.add_argument("--seed", type=int, default=21, help="simulator seed of the stream")
    parser.add_argument("--epochs", type=int, default=5, help="epochs when training the bundle")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per scenario run")
    parser.add_argument(
        "--client", choices=CLIENTS, default="kafka-python", help="the daemons' kafka.client"
    )
    args = parser.parse_args(argv)
    if args.events < BATCH or args.repeats < 1:
        parser.error(f"--events must be at least {BATCH} and --repeats at least 1")
    command = " ".join(["bench/scaleout.py", *(sys.argv[1:] if argv is None else argv)])
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

    with tempfile.TemporaryDirectory(prefix="bench-scaleout-") as tmp:
        workdir = Path(tmp)
        bundle_path = train_bundle(workdir, args.epochs)
        log(f"simulating {args.events:,} orders ({ANOMALY_RATE:.0%} anomalies)")
        values, keys = make_orders(args.events, ANOMALY_RATE, args.seed)
        if not args.bootstrap:
            os.environ["KAFKA_PORT"] = SCALEOUT_PORT  # read by bench/e2e.py's broker()
        with broker(args.bootstrap) as kafka:
            info = machine_info(kafka.about)
            runs = scenarios(args, kafka, bundle_path, values, keys, workdir)

    one, two = summary(runs, 1), summary(runs, 2)
    ratio = two["median_events_per_second"] / one["median_events_per_second"]
    info["load_average_at_end"] = list(os.getloadavg())
    results = {
        "command": command,
        "machine": info,
        "settings": {
            "events": args.events,
            "repeats": args.repeats,
            "partitions": PARTITIONS,
            "batch": {"max_batch_size": BATCH, "max_wait_seconds": 0.2},
            "anomaly_rate": ANOMALY_RATE,
            "client": args.client,
            "openblas_num_threads": os.environ.get("OPENBLAS_NUM_THREADS"),
        },
        "summary": {"one": one, "two": two, "ratio_two_to_one": ratio},
        "runs": runs,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(
        f"\nscale-out ({args.client}): {args.events:,} orders, {PARTITIONS} partitions, "
        f"batch {BATCH}, "
        f"{args.repeats} run(s) each; OPENBLAS_NUM_THREADS="
        f"{os.environ.get('OPENBLAS_NUM_THREADS', 'unset')}; nproc {info['nproc']}, "
        f"{info['date_utc']}\n"
    )
    print(table(runs, one, two))
    print(f"\n2 processes / 1 process: {ratio:.2f}x (medians)")
    print(f"results written to {_shown(args.out)}")
    return 0 if all(c == 0 for r in runs for c in r["exit_codes"]) else 1


if __name__ == "__main__":
    sys.exit(main())
