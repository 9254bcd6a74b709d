"""Command line for the training side: simulate events, fit a bundle."""

from __future__ import annotations

import argparse
import csv
import logging
import sys
import time
from datetime import datetime
from itertools import islice
from pathlib import Path
from typing import TYPE_CHECKING

import msgspec

from streamer import config as config_mod

if TYPE_CHECKING:
    from training.datasets import History


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="training", description="Simulate labeled events and train model bundles."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    sim = sub.add_parser(
        "simulate", help="write labeled synthetic orders or sensor readings to a file or topic"
    )
    sim.add_argument("--profile", choices=["orders", "sensors"], default="orders")
    sim.add_argument("--count", type=int, default=10_000, help="events to write")
    sim.add_argument("--anomaly-rate", type=float, default=0.01, help="share of anomalies")
    sim.add_argument("--seed", type=int, default=0)
    sim.add_argument("--out", type=Path, help="JSON-lines file to write the events to")
    sim.add_argument("--labels", type=Path, help="CSV for event_id,is_anomaly,kind")
    sim.add_argument("--topic", help="Kafka topic to produce the events to (instead of --out)")
    sim.add_argument("--bootstrap", default="127.0.0.1:9092", help="Kafka bootstrap servers")
    sim.add_argument("--rate", type=float, default=0.0, help="events/s to topic (0: as fast)")

    fit = sub.add_parser(
        "fit", help="train a dense or LSTM autoencoder (training.model) and write a model bundle"
    )
    fit.add_argument("--config", required=True, type=Path, help="the daemon's TOML settings")
    source = fit.add_mutually_exclusive_group(required=True)
    source.add_argument("--events", type=Path, help="JSON-lines training history")
    source.add_argument("--topic", help="Kafka topic to read the training history from")
    fit.add_argument(
        "--bootstrap", help="Kafka bootstrap servers (default: the config's kafka section)"
    )
    start = fit.add_mutually_exclusive_group()
    start.add_argument(
        "--from-offset", type=int, metavar="N", help="first offset, in every partition"
    )
    start.add_argument(
        "--since", type=_time, metavar="ISO8601", help="first record at or after this time"
    )
    end = fit.add_mutually_exclusive_group()
    end.add_argument(
        "--to-offset", type=int, metavar="M", help="end offset (exclusive), in every partition"
    )
    end.add_argument(
        "--until", type=_time, metavar="ISO8601", help="end at the first record at/after this"
    )
    fit.add_argument("--out", type=Path, help="registry dir (default: the config's model.bundle)")
    fit.add_argument("--verbose", action="store_true", help="also print Keras's own progress")
    fit.add_argument(
        "--candidate",
        action="store_true",
        help="point the registry's `candidate` (shadow-scored first) instead of `current`",
    )

    sub.add_parser(
        "evaluate",
        help="labeled replay evaluation on a data set (see: training evaluate --help)",
        add_help=False,
    )

    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["evaluate"]:  # its own parser: the evaluator has many options
        from training.evaluate import main as evaluate_main

        return evaluate_main(argv[1:])
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    logging.getLogger("kafka").setLevel(logging.WARNING)
    if args.command == "simulate":
        return _simulate(args)
    return _fit(args)


def _simulate(args: argparse.Namespace) -> int:
    from training.simulate import simulate

    if (args.out is None) == (args.topic is None):
        print("training simulate: give exactly one of --out and --topic", file=sys.stderr)
        return 2
    stream = islice(
        simulate(args.profile, args.seed, args.anomaly_rate, live_clock=args.topic is not None),
        args.count,
    )
    encode = msgspec.json.encode
    labels_file = args.labels.open("w", newline="") if args.labels else None
    writer = csv.writer(labels_file) if labels_file else None
    if writer:
        writer.writerow(["event_id", "is_anomaly", "kind"])
    anomalies = 0
    try:
        if args.out is not None:
            with args.out.open("wb") as out:
                for event, label in stream:
                    out.write(encode(event) + b"\n")
                    anomalies += label.is_anomaly
                    if writer:
                        writer.writerow([label.event_id, int(label.is_anomaly), label.kind])
        else:
            anomalies = _produce(stream, args, writer)
    finally:
        if labels_file:
            labels_file.close()
    where = args.out or f"topic {args.topic}"
    print(f"wrote {args.count} {args.profile} events ({anomalies} anomalies) to {where}")
    return 0


def _produce(stream, args: argparse.Namespace, writer) -> int:  # type: ignore[no-untyped-def]
    from kafka import KafkaProducer

    producer = KafkaProducer(
        bootstrap_servers=args.bootstrap.split(","), linger_ms=5, batch_size=262_144
    )
    key_field = "customer_id" if args.profile == "orders" else "sensor_id"
    encode = msgspec.json.encode
    started = time.monotonic()
    anomalies = 0
    try:
        for i, (event, label) in enumerate(stream):
            if args.rate > 0:
                # Pace against the start time so the average rate holds whatever the jitter.
                ahead = started + i / args.rate - time.monotonic()
                if ahead > 0:
                    time.sleep(ahead)
            producer.send(args.topic, key=str(event[key_field]).encode(), value=encode(event))
            anomalies += label.is_anomaly
            if writer:
                writer.writerow([label.event_id, int(label.is_anomaly), label.kind])
        producer.flush()
    finally:
        producer.close()
    return anomalies


def _time(text: str) -> datetime:
    from training.sources import parse_time

    try:
        return parse_time(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"not an ISO 8601 time: {text!r} (like 2024-05-01T12:00:00Z)"
        ) from None


def _fit(args: argparse.Namespace) -> int:
    from streamer.bundle import BundleError
    from training.bundle_report import REPORT_FILE
    from training.datasets import read_jsonl
    from training.fit import fit_bundle

    ranged = (args.from_offset, args.to_offset, args.since, args.until, args.bootstrap)
    if args.events is not None and any(v is not None for v in ranged):
        print("training fit: range and --bootstrap options go with --topic", file=sys.stderr)
        return 2
    try:
        settings = config_mod.load(args.config)
    except config_mod.ConfigError as exc:
        print(f"training: config error: {exc}", file=sys.stderr)
        return 2
    registry = args.out or Path(settings.model.bundle)
    history: History
    if args.events is not None:
        history, source = read_jsonl(settings.spec, args.events), args.events.name
    else:
        from kafka.errors import KafkaError

        from training.sources import SourceError

        try:
            history, source = _read_topic(args, settings)
        except (ValueError, SourceError, KafkaError) as exc:
            print(f"training: topic {args.topic}: {exc}", file=sys.stderr)
            return 2
    try:
        b = fit_bundle(
            settings.spec, history, settings.training, registry, source=source,
            verbose=2 if args.verbose else 0, report=True, candidate=args.candidate,
        )  # fmt: skip
    except (ValueError, BundleError) as exc:
        print(f"training: {exc}", file=sys.stderr)
        return 2
    t = b.manifest.training
    print(
        f"bundle {b.version} written to {b.path} ({b.manifest.data['events']} events, "
        f"{t['epochs_run']} epochs, best val loss {t['best_val_loss']:.4g})"
    )
    if (b.path / REPORT_FILE).is_file():
        print(f"report: {b.path / REPORT_FILE}")
    return 0


def _read_topic(args: argparse.Namespace, settings: config_mod.Settings) -> tuple[History, str]:
    """The topic range the arguments name, read with the config's Kafka security settings."""
    from streamer.kafka_io import common_options
    from training.sources import TopicRange, read_topic

    kafka = settings.kafka
    if args.bootstrap:
        kafka = msgspec.structs.replace(kafka, bootstrap_servers=args.bootstrap)
    selection = TopicRange(args.topic, args.from_offset, args.to_offset, args.since, args.until)
    return read_topic(settings.spec, common_options(kafka), selection)


if __name__ == "__main__":
    sys.exit(main())
