"""Command line: parse args -> load config -> build the detector -> run -> exit code."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
import uuid
from pathlib import Path

# Before numpy loads: a multi-threaded BLAS spins its idle workers between the small matrix
# products of each batch, costing a whole core at 20k events/s for nothing. Scoring runs on
# the loop's one thread anyway.
for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

from streamer import config as config_mod  # noqa: E402  (after the BLAS settings)

EXIT_CONFIG = 2  # bad config, bundle or Kafka state at start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="streamer",
        description="Score a Kafka topic with a trained autoencoder bundle and publish alerts.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run the detector daemon until SIGTERM/SIGINT")
    run.add_argument("--config", required=True, type=Path, help="TOML settings file")

    check = sub.add_parser("check", help="validate the config and the model bundle, then exit")
    check.add_argument("--config", required=True, type=Path, help="TOML settings file")

    tail = sub.add_parser("tail", help="print alerts (or dead letters) as they arrive")
    tail.add_argument("--config", required=True, type=Path, help="TOML settings file")
    tail.add_argument(
        "--dead-letters", action="store_true", help="read the dead-letter topic instead"
    )
    tail.add_argument(
        "--from-beginning", action="store_true", help="start at the oldest retained record"
    )
    tail.add_argument("--max-messages", type=int, default=0, help="stop after N (0: no limit)")
    tail.add_argument(
        "--timeout", type=float, default=0.0, help="stop after S idle seconds (0: never)"
    )
    tail.add_argument("--json", action="store_true", help="print the raw JSON, one per line")

    sub.add_parser("schema", help="print the JSON Schema of the alert topic's messages")

    args = parser.parse_args(argv)
    if args.command == "schema":
        from streamer.records import alert_topic_schema

        print(json.dumps(alert_topic_schema(), indent=2))
        return 0
    try:
        settings = config_mod.load(args.config)
    except config_mod.ConfigError as exc:
        print(f"streamer: config error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    logging.basicConfig(
        level=settings.log_level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    logging.getLogger("kafka").setLevel(logging.WARNING)

    if args.command == "run":
        return _run(settings)
    if args.command == "check":
        return _check(settings)
    return _tail(settings, args)


def _run(settings: config_mod.Settings) -> int:
    from streamer.app import Detector
    from streamer.bundle import BundleError
    from streamer.delivery import FatalDeliveryError
    from streamer.kafka_io import StartupError

    detector = Detector(settings)
    detector.install_signal_handlers()
    try:
        detector.start()
    except (BundleError, StartupError) as exc:
        logging.getLogger("streamer").error("cannot start: %s", exc)
        detector.close()
        return EXIT_CONFIG
    try:
        detector.run()
    except KeyboardInterrupt:
        return 130
    except FatalDeliveryError as exc:
        logging.getLogger("streamer").error("stopping: %s", exc)
        return 1
    return 0


def _check(settings: config_mod.Settings) -> int:
    from streamer import bundle

    try:
        b = bundle.load(Path(settings.model.bundle), expected_spec=settings.spec)
        b.load_scorer(settings.model.runtime)
    except bundle.BundleError as exc:
        print(f"streamer: bundle error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    print(
        f"config ok: profile {settings.spec.profile}, {len(settings.spec.feature_names())} "
        f"features; bundle {b.version} ({b.kind}, {settings.model.runtime} runtime) at {b.path}"
    )
    return 0


def _tail(settings: config_mod.Settings, args: argparse.Namespace) -> int:
    from kafka import KafkaConsumer

    from streamer.kafka_io import common_options

    k = settings.kafka
    topic = k.dead_letter_topic if args.dead_letters else k.alert_topic
    consumer = KafkaConsumer(
        topic,
        **common_options(k),
        group_id=None if args.from_beginning else f"streamer-tail-{uuid.uuid4().hex[:8]}",
        enable_auto_commit=False,
        auto_offset_reset="earliest" if args.from_beginning else "latest",
    )
    seen = 0
    idle_since = time.monotonic()
    try:
        while True:
            polled = consumer.poll(timeout_ms=500)
            for records in polled.values():
                for r in records:
                    print(_describe(r, args), flush=True)
                    seen += 1
                    if args.max_messages and seen >= args.max_messages:
                        return 0
            if polled:
                idle_since = time.monotonic()
            elif args.timeout and time.monotonic() - idle_since > args.timeout:
                return 0
    except KeyboardInterrupt:
        return 0
    finally:
        consumer.close()


def _describe(record: object, args: argparse.Namespace) -> str:
    value: bytes = record.value or b""  # type: ignore[attr-defined]
    if args.dead_letters:
        headers = {k: v.decode("utf-8", "replace") for k, v in record.headers or []}  # type: ignore[attr-defined]
        return (
            f"{headers.get('dlq.reason')}: {headers.get('dlq.topic')}"
            f"[{headers.get('dlq.partition')}]@{headers.get('dlq.offset')} "
            f"{headers.get('dlq.detail')} | {value[:80]!r}"
        )
    if args.json:
        return value.decode("utf-8", "replace")
    a = json.loads(value)
    if a.get("type") == "incident":
        return (
            f"INCIDENT {a['status'].upper()} {a['incident_id'][:12]} #{a['sequence']} "
            f"{a['entity_field']}={a['entity']} since {a['opened_at']}: {a['alerts']} alert(s), "
            f"max score {a['max_score']:.3g}"
            + (f", resolved at {a['resolved_at']}" if a["resolved_at"] else "")
        )
    top = ", ".join(
        f"{f['feature']}={f['actual']:.4g} (expected {f['reconstructed']:.4g})"
        for f in a["top_features"]
    )
    return (
        f"ALERT {a['entity_field']}={a['entity']} event={a['event_id']} at {a['event_time']} "
        # A range alert's score may be under the threshold: it alerted for its range.
        f"score={a['score']:.3g} "
        + ("beyond range, threshold " if a.get("beyond_range") else "> ")
        + f"{a['threshold']:.3g}"
        + (f" (raw {a['raw_score']:.3g})" if a.get("raw_score") is not None else "")
        + f" | {top}"
    )


if __name__ == "__main__":
    sys.exit(main())
