"""The daemon: poll -> micro-batch -> pipeline -> publish -> flush -> commit, until told to stop.

Commit order (at-least-once): alerts and dead letters of a batch are produced and flushed
before the batch's offsets are committed. A crash between the two replays the batch, and the
replayed alerts carry the same `alert_id` because it is derived from the source position.
"""

from __future__ import annotations

import logging
import signal
import time
from pathlib import Path
from types import FrameType
from typing import Any

import msgspec
import numpy as np
from kafka import ConsumerRebalanceListener, KafkaConsumer, KafkaProducer
from prometheus_client import CollectorRegistry

from streamer import bundle as bundles
from streamer import kafka_io
from streamer.config import Settings
from streamer.metrics import REJECT_REASONS, Heartbeat, Metrics, StatusServer
from streamer.pipeline import BatchResult, Pipeline
from streamer.records import ModelRef, RawMessage
from streamer.threshold import RollingQuantileThreshold

log = logging.getLogger("streamer")

IDLE_POLL_SECONDS = 0.5
LAG_REFRESH_SECONDS = 1.0
STATUS_LOG_SECONDS = 10.0


class PublishError(Exception):
    """Kafka did not accept a batch's alerts or dead letters; its offsets were not committed."""


def build_pipeline(settings: Settings, bundle: bundles.Bundle, scorer: Any) -> Pipeline:
    t = settings.threshold
    threshold = RollingQuantileThreshold(
        t.window_size, t.quantile, t.min_samples, bundle.warm_start
    )
    return Pipeline(
        spec=bundle.spec,
        scaler=bundle.scaler,
        scorer=scorer,
        threshold=threshold,
        model=ModelRef(bundle.version, bundle.kind),
        top_features=settings.alerts.top_features,
        max_message_bytes=settings.alerts.max_message_bytes,
    )


class Detector:
    def __init__(self, settings: Settings, registry: CollectorRegistry | None = None) -> None:
        self.settings = settings
        self.registry = registry or CollectorRegistry()
        self.metrics = Metrics(self.registry)
        self.heartbeat = Heartbeat(stale_after_seconds=60.0)
        self.should_exit = False
        self.force_exit = False
        self._ready = False
        self._buffer: list[RawMessage] = []
        self._consumer: KafkaConsumer | None = None
        self._producer: KafkaProducer | None = None
        self._server: StatusServer | None = None
        self._pipeline: Pipeline | None = None
        self._encode = msgspec.json.Encoder().encode

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        """Load and verify everything; raise (BundleError, StartupError) before consuming."""
        s = self.settings
        started = time.monotonic()
        bundle = bundles.load(Path(s.model.bundle), expected_spec=s.spec)
        scorer = bundle.load_scorer()
        # Trace the model's graph now, so the first batch does not pay for it after /readyz.
        scorer.reconstruct(np.zeros((1, len(bundle.spec.feature_names())), dtype=np.float32))
        self._pipeline = build_pipeline(s, bundle, scorer)
        self.metrics.model_info.labels(bundle.version, bundle.kind).set(1)
        log.info(
            "model bundle %s (%s, %d features) from %s",
            bundle.version, bundle.kind, len(bundle.spec.feature_names()), bundle.path,
        )  # fmt: skip
        kafka_io.prepare_topics(s.kafka)
        self._producer = kafka_io.make_producer(s.kafka)
        self._consumer = kafka_io.make_consumer(s.kafka)
        self._consumer.subscribe([s.kafka.input_topic], listener=_Rebalance(self))
        self._server = StatusServer(
            self.registry, s.metrics.host, s.metrics.port, self.heartbeat.alive, self.is_ready
        )
        self._server.start()
        log.info(
            "consuming %s as group %s; alerts -> %s, dead letters -> %s; metrics on http://%s:%d/metrics",
            s.kafka.input_topic, s.kafka.group_id, s.kafka.alert_topic,
            s.kafka.dead_letter_topic, s.metrics.host, self._server.port,
        )  # fmt: skip
        log.info("started in %.1fs", time.monotonic() - started)

    @property
    def metrics_port(self) -> int:
        assert self._server is not None
        return self._server.port

    def is_ready(self) -> bool:
        return self._ready and not self.should_exit

    def install_signal_handlers(self) -> None:
        signal.signal(signal.SIGTERM, self._handle_signal)
        signal.signal(signal.SIGINT, self._handle_signal)

    def _handle_signal(self, sig: int, frame: FrameType | None) -> None:
        if self.should_exit and sig == signal.SIGINT:
            self.force_exit = True
            raise KeyboardInterrupt  # a second Ctrl+C: give up on the batch in hand
        log.info("%s received: finishing the batch in hand", signal.Signals(sig).name)
        self.should_exit = True

    def run(self) -> None:
        """Consume until stopped; on the way out finish, publish and commit the batch in hand."""
        assert self._consumer is not None
        consumer = self._consumer
        batch = self.settings.batch
        deadline = 0.0
        next_lag = next_status = 0.0
        try:
            while not self.should_exit:
                self.heartbeat.beat()
                now = time.monotonic()
                wait = max(0.0, deadline - now) if self._buffer else IDLE_POLL_SECONDS
                polled = consumer.poll(
                    timeout_ms=int(wait * 1000),
                    max_records=batch.max_batch_size - len(self._buffer),
                )
                if not self._ready:
                    self._ready = True
                    self.metrics.ready.set(1)
                if polled:
                    if not self._buffer:
                        deadline = time.monotonic() + batch.max_wait_seconds
                    for records in polled.values():
                        self._buffer.extend(kafka_io.to_raw(records))
                now = time.monotonic()
                if self._buffer and (len(self._buffer) >= batch.max_batch_size or now >= deadline):
                    self.flush_batch()
                if now >= next_lag:
                    self._refresh_lag()
                    next_lag = now + LAG_REFRESH_SECONDS
                if now >= next_status:
                    self._log_status()
                    next_status = now + STATUS_LOG_SECONDS
            self.flush_batch()
        finally:
            self._ready = False
            self.metrics.ready.set(0)
            self.close()

    def close(self) -> None:
        if self._consumer is not None:
            self._consumer.close(autocommit=False)
            self._consumer = None
        if self._producer is not None:
            self._producer.close(timeout=10)
            self._producer = None
        if self._server is not None:
            self._server.stop()
            self._server = None
        if self._pipeline is not None:
            self._log_status()

    # -- one batch -------------------------------------------------------------------------

    def flush_batch(self) -> BatchResult | None:
        """Score the buffered messages, publish, flush, then commit their offsets."""
        if not self._buffer:
            return None
        assert self._consumer and self._producer and self._pipeline
        messages, self._buffer = self._buffer, []
        result = self._pipeline.process(messages)
        t0 = time.perf_counter()
        self._publish(result)
        t1 = time.perf_counter()
        self._consumer.commit(kafka_io.next_offsets(messages))
        t2 = time.perf_counter()
        self.metrics.record_batch(result, {"produce": t1 - t0, "commit": t2 - t1})
        if result.alerts:
            log.debug("batch of %d: %d alert(s)", result.consumed, len(result.alerts))
        return result

    def _publish(self, result: BatchResult) -> None:
        assert self._producer is not None
        k = self.settings.kafka
        send = self._producer.send
        futures = [
            send(k.alert_topic, key=str(a.entity).encode(), value=self._encode(a))
            for a in result.alerts
        ]
        futures += [
            send(
                k.dead_letter_topic,
                key=d.message.key,
                value=d.message.value or b"",
                headers=kafka_io.dead_letter_headers(d),
            )
            for d in result.dead_letters
        ]
        self._producer.flush()
        failed = [f.exception for f in futures if f.failed()]
        if failed:
            raise PublishError(f"{len(failed)} of {len(futures)} records not accepted: {failed[0]}")

    # -- observability ---------------------------------------------------------------------

    def _refresh_lag(self) -> None:
        assert self._consumer is not None
        for tp, lag in kafka_io.consumer_lag(self._consumer).items():
            self.metrics.lag.labels(tp.topic, str(tp.partition)).set(lag)

    def _log_status(self) -> None:
        assert self._pipeline is not None

        def total(name: str) -> int:
            return int(self.registry.get_sample_value(name) or 0)

        rejected = sum(
            int(self.registry.get_sample_value("anomaly_events_rejected_total", {"reason": r}) or 0)
            for r in REJECT_REASONS
        )
        log.info(
            "consumed=%d scored=%d alerts=%d rejected=%d threshold=%.4g",
            total("anomaly_events_consumed_total"), total("anomaly_events_scored_total"),
            total("anomaly_alerts_published_total"), rejected, self._pipeline.threshold.value,
        )  # fmt: skip


class _Rebalance(ConsumerRebalanceListener):
    """Finish the batch in hand before partitions move, so the next owner starts after it."""

    def __init__(self, detector: Detector) -> None:
        self.detector = detector

    def on_partitions_revoked(self, revoked: Any) -> None:
        if self.detector._buffer:
            log.info("partitions revoked: finishing a batch of %d", len(self.detector._buffer))
            self.detector.flush_batch()
        self.detector.metrics.forget_partitions([(tp.topic, tp.partition) for tp in revoked])

    def on_partitions_assigned(self, assigned: Any) -> None:
        log.info("assigned %s", sorted(f"{tp.topic}[{tp.partition}]" for tp in assigned))
