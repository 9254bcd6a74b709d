"""The daemon: poll -> micro-batch -> pipeline -> deliver (publish + commit), until stopped.

Kafka trouble never ends the process. While the broker is unreachable the daemon keeps its
batch, reports not-ready on /readyz, retries with exponential back-off and resumes where it
was; the only errors that stop it are the ones a retry cannot fix (bad config, bundle or
input topic at start; another instance taking its transactional id).
"""

from __future__ import annotations

import logging
import math
import signal
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from types import FrameType
from typing import Any

import numpy as np
from kafka import ConsumerRebalanceListener, TopicPartition
from kafka.errors import KafkaError
from prometheus_client import CollectorRegistry

from streamer import bundle as bundles
from streamer import kafka_io
from streamer.config import Settings
from streamer.control import ControlError, ControlState
from streamer.delivery import (
    DeliveryError,
    FatalDeliveryError,
    Outbox,
    Rebalanced,
    make_outbox,
)
from streamer.drift import DriftMonitor
from streamer.kafka_io import StartupError
from streamer.metrics import CONTROL_ACTIONS, REJECT_REASONS, Heartbeat, Metrics, StatusServer
from streamer.pipeline import BatchResult, Pipeline
from streamer.ranges import RangeGuard
from streamer.records import ModelRef, RawMessage
from streamer.shadow import Decision, ShadowStats, decide
from streamer.smoothing import SmoothedThreshold
from streamer.state import EntityState
from streamer.threshold import RollingQuantileThreshold

log = logging.getLogger("streamer")
Polled = dict[TopicPartition, list[RawMessage]]  # one poll, by partition

CHECK_SECONDS = 1.0  # lag and broker-contact checks
METADATA_REFRESH_SECONDS = 5.0  # while no partition is assigned
STUCK_SECONDS = 45.0  # unassigned and unheard by the coordinator this long: a new consumer
# /readyz and anomaly_ready turn 0 when the loop has not confirmed Kafka contact for this
# long: a delivery blocked on a broker that went away (flush waits up to
# kafka.delivery_timeout_seconds) stops the checks, not the last answer they gave.
READY_FRESH_SECONDS = 10.0
STATUS_LOG_SECONDS = 10.0
BACKOFF_START_SECONDS = 0.5


def build_pipeline(
    settings: Settings, bundle: bundles.Bundle, scorer: Any, control: ControlState | None = None
) -> Pipeline:
    """The daemon's pipeline for a bundle; the evaluator builds its detectors with it too.

    With `[smoothing]` the global threshold is a SmoothedThreshold, started from the bundle's
    warm start like the plain one; each call builds a fresh one (no shared smoothing state:
    a reload or a shadowed candidate starts its EWMA level, run and cooldown anew). With
    `threshold.per_entity` as well, the smoothing is per entity (the pipeline state's
    EntitySmoothedThresholds, each entity from the warm start) and the global threshold is
    the plain one over raw scores, as with per-entity thresholds alone.
    """
    t = settings.threshold
    threshold: RollingQuantileThreshold
    if settings.smoothing is None or t.per_entity:
        threshold = RollingQuantileThreshold(
            t.window_size, t.quantile, t.min_samples, bundle.warm_start, learn=t.learn
        )
    else:
        threshold = SmoothedThreshold(
            t.window_size, t.quantile, t.min_samples, bundle.warm_start, settings.smoothing
        )
        threshold.learn = t.learn  # false: never learns (its EWMA and shaping still run)
    return Pipeline(
        spec=bundle.spec,
        scaler=bundle.scaler,
        scorer=scorer,
        threshold=threshold,
        model=ModelRef(bundle.version, bundle.kind),
        top_features=settings.alerts.top_features,
        max_message_bytes=settings.alerts.max_message_bytes,
        state=EntityState.build(
            settings,
            bundle.spec,
            scorer.window_length,
            control.labels if control else None,
            bundle.warm_start,
        ),
        publish_alerts=settings.incidents.publish_alerts or not settings.incidents.enabled,
        control=control,
        drift=DriftMonitor(bundle.drift, settings.drift.window_events) if bundle.drift else None,
        error_cap=bundle.error_cap,
        score_weights=bundle.score_weights,
        forecast=bundle.forecast,
        ranges=_range_guard(t.range_tolerance, bundle),
    )


def _range_guard(tolerance: float | None, bundle: bundles.Bundle) -> RangeGuard | None:
    if tolerance is None:
        return None
    if bundle.feature_range is None:
        log.warning(
            "threshold.range_tolerance: bundle %s has no training range (written before it); "
            "the range starts from the first live rows",
            bundle.version,
        )
        return RangeGuard(None, None, tolerance, bundle.spec.standardized())
    return RangeGuard(*bundle.feature_range, tolerance, bundle.spec.standardized())


class Backoff:
    """Exponential back-off, doubled per failure up to a ceiling, reset by a success."""

    def __init__(self, ceiling_seconds: float) -> None:
        self.ceiling = ceiling_seconds
        self.next = BACKOFF_START_SECONDS

    def failed(self) -> float:
        delay, self.next = self.next, min(self.ceiling, self.next * 2)
        return delay

    def reset(self) -> None:
        self.next = BACKOFF_START_SECONDS


class Detector:
    def __init__(self, settings: Settings, registry: CollectorRegistry | None = None) -> None:
        self.settings = settings
        self.registry = registry or CollectorRegistry()
        self.metrics = Metrics(self.registry)
        self.heartbeat = Heartbeat(stale_after_seconds=60.0)
        self.should_exit = False
        self._ready = False
        self._broker_ok = False
        self._checked_at = -math.inf  # when _check last judged Kafka contact (monotonic)
        self.metrics.ready.set_function(lambda: 1.0 if self.is_ready() else 0.0)
        self._buffer: list[RawMessage] = []
        self._consumer: kafka_io.GroupConsumer | None = None
        self._outbox: Outbox | None = None
        self._server: StatusServer | None = None
        self._pipeline: Pipeline | None = None
        self._bundle: bundles.Bundle | None = None
        self._refused_version: str | None = None
        # Per-entity state follows partition ownership: cleared when partitions are revoked,
        # rebuilt for the assigned ones before their first batch (see _rebuild_state).
        self._clear_state = False
        self._restore: set[TopicPartition] = set()
        # kafka-python keeps a partition's position when a rebalance hands it back to the same
        # consumer: the work dropped at the revoke must be re-read from the committed offset.
        self._revoked: set[TopicPartition] = set()
        self._rewind: set[TopicPartition] = set()
        self._next_metadata = 0.0
        self._silent_since: float | None = None  # when the coordinator last stopped answering
        c = settings.control
        self._side_topics = [t for t in (c.topic, c.feedback_topic) if t]
        self._control = (
            ControlState(c, settings.spec.time_format, settings.state.max_entities)
            if self._side_topics
            else None
        )
        self._follower: kafka_io.TopicFollower | None = None
        # The feedback topic and how long its labels matter, until its retention is checked.
        reach = settings.spec.label_reach_seconds
        self._feedback_horizon = (c.feedback_topic, reach) if reach and c.feedback_topic else None
        self._threshold_changes_applied = 0
        # Shadow scoring of the registry's candidate (streamer/shadow.py).
        self._shadow: Pipeline | None = None
        self._shadow_bundle: bundles.Bundle | None = None
        self._shadow_stats = ShadowStats()
        self._shadow_done: set[str] = set()  # versions decided or refused: not shadowed again
        self._backoff = Backoff(settings.kafka.retry_backoff_max_seconds)

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        """Load and verify the bundle, serve /metrics, then connect to Kafka (retrying).

        Raises BundleError or StartupError for what a retry cannot fix.
        """
        s = self.settings
        started = time.monotonic()
        if s.spec.labeled and not s.control.feedback_topic:
            raise StartupError(
                "control.feedback_topic: the feature spec has label_rate columns, which only "
                "label feedback feeds; set the topic the labels arrive on"
            )
        self._serve(*self._load_bundle(Path(s.model.bundle)))
        if s.smoothing is not None and s.threshold.per_entity:
            log.info(
                "threshold smoothing on, one state per entity (at most %d entities, %d scores "
                "each): %s", s.state.max_entities, s.threshold.entity_window_size, s.smoothing,
            )  # fmt: skip
        elif s.smoothing is not None:
            log.info(
                "threshold smoothing on, one state over every event this replica scores "
                "(right for a single-source feed): %s", s.smoothing,
            )  # fmt: skip
        # Health and metrics first, so an orchestrator sees a live, not-ready process while
        # Kafka is away.
        self._server = StatusServer(
            self.registry, s.metrics.host, s.metrics.port, self.heartbeat.alive, self.is_ready
        )
        self._server.start()
        self._connect()
        if self.should_exit:
            return
        log.info(
            "consuming %s as group %s (%s, %s client); alerts -> %s, dead letters -> %s; "
            "metrics on http://%s:%d/metrics; started in %.1fs",
            s.kafka.input_topic, s.kafka.group_id, s.kafka.delivery, s.kafka.client,
            s.kafka.alert_topic,
            s.kafka.dead_letter_topic, s.metrics.host, self._server.port,
            time.monotonic() - started,
        )  # fmt: skip

    def _load_bundle(self, path: Path) -> tuple[bundles.Bundle, Any]:
        """Load, verify (hashes, feature spec, parity) and warm up; raises BundleError."""
        bundle = bundles.load(path, expected_spec=self.settings.spec)
        smoothing = self.settings.smoothing
        if smoothing is not None and smoothing.margin > 0 and not bundle.warm_start.size:
            raise bundles.BundleError(
                f"{bundle.path}: smoothing.margin needs the bundle's warm start (held-out "
                "errors), and it has none"
            )
        scorer = bundle.load_scorer(self.settings.model.runtime)
        # Trace the model's graph now, so the first batch does not pay for it after /readyz.
        steps = (scorer.window_length,) if scorer.window_length else ()
        scorer.reconstruct(np.zeros((1, *steps, scorer.n_features), dtype=np.float32))
        return bundle, scorer

    def _serve(self, bundle: bundles.Bundle, scorer: Any) -> None:
        """Score from now on with this bundle; its threshold starts from its own warm start."""
        if self._bundle is not None:
            self.metrics.model_info.remove(*_info_labels(self._bundle))
        self._pipeline = build_pipeline(self.settings, bundle, scorer, self._control)
        self._threshold_changes_applied = 0  # runtime threshold settings apply anew
        self._apply_threshold_control()
        if self._consumer is not None:  # a reload: the new pipeline starts without state
            self._restore = set(self._consumer.assignment())
        self._bundle = bundle
        self.metrics.model_info.labels(*_info_labels(bundle)).set(1)
        self.metrics.reset_drift(bundle.spec.feature_names() if bundle.drift else [])
        log.info(
            "serving model bundle %s (%s, %d features, %s runtime) from %s",
            bundle.version, bundle.kind, len(bundle.spec.feature_names()),
            self.settings.model.runtime, bundle.path,
        )  # fmt: skip

    def _maybe_reload(self) -> None:
        """Swap in the registry's `current` bundle if it changed and passes verification.

        Runs between batches. A bundle that fails is refused once (logged and counted) and
        the old one keeps serving; the registry must point elsewhere before it is tried again.
        """
        registry = Path(self.settings.model.bundle)
        version = bundles.current_version(registry)
        served = self._bundle.version if self._bundle else None
        if version is None or version in (served, self._refused_version):
            return
        try:
            bundle, scorer = self._load_bundle(registry / version)
        except (bundles.BundleError, OSError) as exc:
            self._refused_version = version
            self.metrics.model_reloads.labels("rejected").inc()
            log.error("model %s refused, still serving %s: %s", version, served, exc)
            return
        self.metrics.model_reloads.labels("loaded").inc()
        log.info("model reload: %s -> %s", served, bundle.version)
        self._serve(bundle, scorer)

    def _maybe_shadow(self) -> None:
        """Start shadow-scoring the registry's `candidate`, or stop when it is withdrawn."""
        registry = Path(self.settings.model.bundle)
        version = bundles.candidate_version(registry)
        shadowed = self._shadow_bundle.version if self._shadow_bundle else None
        if version == shadowed:
            return
        if shadowed is not None:
            log.info("candidate %s withdrawn from the registry: shadowing stops", shadowed)
            self._stop_shadow()
        served = self._bundle.version if self._bundle else None
        if version is None or version == served or version in self._shadow_done:
            return
        try:
            bundle, scorer = self._load_bundle(registry / version)
        except (bundles.BundleError, OSError) as exc:
            self._shadow_done.add(version)
            self.metrics.shadow_decisions.labels("rejected").inc()
            log.error("candidate %s refused, not shadowed: %s", version, exc)
            return
        self._shadow = build_pipeline(self.settings, bundle, scorer)
        self._shadow_bundle = bundle
        self._shadow_stats = ShadowStats()
        self.metrics.shadow_info.labels(bundle.version, bundle.kind).set(1)
        log.info(
            "shadow-scoring candidate %s (%s) beside %s until %d events",
            bundle.version, bundle.kind, served, self.settings.shadow.min_events,
        )  # fmt: skip

    def _shadow_batch(self, messages: list[RawMessage], result: BatchResult) -> None:
        """Score the batch with the candidate too (nothing published); apply the rule."""
        assert self._shadow is not None and self._shadow_bundle is not None
        version = self._shadow_bundle.version
        try:
            shadow = self._shadow.process(messages)
        except Exception as exc:  # a candidate that fails on live data must not stop scoring
            log.error("candidate %s failed on a batch: %s", version, exc)
            self._decide_shadow("roll_back")
            return
        self.metrics.record_shadow(result, shadow)
        events = min(result.scores.size, shadow.scores.size)
        self._shadow_stats.add(len(result.alerts), len(shadow.alerts), events)
        s = self.settings.shadow
        decision = decide(self._shadow_stats, s.min_events, s.max_rate_ratio)
        if decision != "wait":
            self._decide_shadow(decision)

    def _decide_shadow(self, decision: Decision) -> None:
        assert self._shadow_bundle is not None
        version = self._shadow_bundle.version
        current, candidate = self._shadow_stats.rates()
        why = (
            f"alert rate {candidate:.3%} vs {current:.3%} over {self._shadow_stats.events} "
            f"events (max ratio {self.settings.shadow.max_rate_ratio})"
        )
        if not self.settings.shadow.auto_promote:
            log.info(
                "shadow rule says %s for candidate %s: %s (auto_promote off)",
                decision, version, why,
            )  # fmt: skip
            self._shadow_stats = ShadowStats()  # report again after the next min_events
            return
        registry = Path(self.settings.model.bundle)
        if decision == "promote":
            bundles.set_current(registry, version)  # the hot reload swaps it in
            self.metrics.shadow_decisions.labels("promoted").inc()
            log.info("candidate %s promoted: %s", version, why)
        else:
            self.metrics.shadow_decisions.labels("rolled_back").inc()
            log.warning("candidate %s rolled back: %s", version, why)
        if bundles.candidate_version(registry) == version:
            bundles.set_candidate(registry, None)
        self._shadow_done.add(version)
        self._stop_shadow()

    def _stop_shadow(self) -> None:
        if self._shadow_bundle is not None:
            self.metrics.shadow_info.remove(self._shadow_bundle.version, self._shadow_bundle.kind)
        self._shadow = None
        self._shadow_bundle = None

    def _connect(self) -> None:
        k = self.settings.kafka
        while not self.should_exit:
            try:
                kafka_io.prepare_topics(k, self._side_topics, self._feedback_horizon)
                self._feedback_horizon = None  # checked (or created) once per process
                if self._control is not None and self._follower is None:
                    # What was said before this replica started applies before its first batch.
                    follower = kafka_io.TopicFollower(k, self._side_topics)
                    with _closed_on_failure(follower.close):
                        self._apply_control(follower.catch_up(k.delivery_timeout_seconds))
                    self._follower = follower
                if self._consumer is None:
                    consumer = kafka_io.make_consumer(k)
                    with _closed_on_failure(partial(consumer.close, autocommit=False)):
                        self._outbox = make_outbox(k, consumer)
                    self._consumer = consumer
                assert self._outbox is not None
                self._outbox.prepare()
                self._consumer.subscribe([k.input_topic], listener=_Rebalance(self))
                self._backoff.reset()
                return
            except StartupError:
                raise
            except (KafkaError, DeliveryError) as exc:
                self._wait_after_failure(f"cannot reach Kafka at {','.join(k.servers)}: {exc}")

    def _replace_consumer(self, why: str) -> None:
        """A new consumer and outbox for a broken consumer: uncommitted work is dropped and
        replayed from the committed offsets, as after a rebalance."""
        log.error("consumer failed for good (%s): replacing it", why)
        self._buffer = []
        self._clear_state = True
        outbox, consumer = self._outbox, self._consumer
        self._consumer = self._outbox = None
        try:  # a broken client may fail to close: the new one is what matters
            if outbox is not None:
                outbox.drop()
                outbox.close()
            if consumer is not None:
                consumer.close()
        except Exception:
            log.debug("closing a broken consumer", exc_info=True)
        self._set_ready(False)
        self._connect()

    @property
    def metrics_port(self) -> int:
        assert self._server is not None
        return self._server.port

    def is_ready(self) -> bool:
        fresh = time.monotonic() - self._checked_at < READY_FRESH_SECONDS
        return self._ready and self._broker_ok and fresh and not self.should_exit

    def install_signal_handlers(self) -> None:
        signal.signal(signal.SIGTERM, self._handle_signal)
        signal.signal(signal.SIGINT, self._handle_signal)

    def _handle_signal(self, sig: int, frame: FrameType | None) -> None:
        if self.should_exit and sig == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl+C: give up on the batch in hand
        log.info("%s received: finishing the batch in hand", signal.Signals(sig).name)
        self.should_exit = True

    def run(self) -> None:
        """Consume until stopped; on the way out finish, publish and commit the batch in hand."""
        if self._consumer is None or self.should_exit:  # stopped while still connecting
            self.close()
            return
        batch = self.settings.batch
        deadline = 0.0
        next_check = next_status = 0.0
        reload_every = self.settings.model.reload_check_seconds
        next_reload = time.monotonic() + reload_every
        next_control = 0.0
        try:
            while not self.should_exit:
                self.heartbeat.beat()
                # The consumer may have been replaced (_replace_consumer) since the last turn.
                consumer = self._consumer
                if consumer is None:  # stopped while reconnecting
                    break
                now = time.monotonic()
                wait = max(0.0, deadline - now) if self._buffer else batch.idle_poll_seconds
                try:
                    polled = consumer.poll_raw(
                        int(wait * 1000), batch.max_batch_size - len(self._buffer)
                    )
                except kafka_io.ConsumerBroken as exc:
                    self._replace_consumer(str(exc))
                    continue
                except KafkaError as exc:  # the clients retry themselves; some errors escape
                    self._wait_after_failure(f"poll: {exc}")
                    continue
                if self._clear_state or self._restore or self._rewind:
                    try:
                        polled = self._rewind_kept(consumer, polled)
                        self._rebuild_state(consumer, polled)
                    except KafkaError as exc:
                        # Nothing unscored may be skipped: rewind to the first record not yet
                        # scored, and restore again before scoring it.
                        for tp, offset in _first_offsets(self._buffer, polled).items():
                            consumer.seek(tp, offset)
                        self._buffer = []
                        self._wait_after_failure(f"state restore: {exc}")
                        continue
                if polled:
                    if not self._buffer:
                        deadline = time.monotonic() + batch.max_wait_seconds
                    for records in polled.values():
                        self._buffer.extend(records)
                now = time.monotonic()
                if self._buffer and (len(self._buffer) >= batch.max_batch_size or now >= deadline):
                    self.flush_batch()
                elif self._outbox is not None and self._outbox.commit_due():
                    self.commit()  # a quiet stream still commits what it has scored
                if now >= next_check:
                    self._check(consumer, polled_any=bool(polled))
                    next_check = now + CHECK_SECONDS
                if reload_every and now >= next_reload:
                    self._maybe_reload()
                    self._maybe_shadow()
                    next_reload = now + reload_every
                if self._follower is not None and now >= next_control:
                    try:
                        self._apply_control(self._follower.poll())
                    except KafkaError as exc:  # the next poll retries; scoring goes on
                        log.warning("control topics: %s", exc)
                    next_control = now + self.settings.control.poll_seconds
                if now >= next_status:
                    self._log_status()
                    next_status = now + STATUS_LOG_SECONDS
            grace = self.settings.kafka.shutdown_grace_seconds
            self.flush_batch(commit=True, grace_seconds=grace)
        finally:
            self._set_ready(False)
            self.close()

    def close(self) -> None:
        if self._consumer is not None:
            self._consumer.close(autocommit=False)
            self._consumer = None
        if self._follower is not None:
            self._follower.close()
            self._follower = None
        if self._outbox is not None:
            self._outbox.close()
            self._outbox = None
        if self._server is not None:
            self._server.stop()
            self._server = None
        if self._pipeline is not None:
            self._log_status()

    # -- runtime control ---------------------------------------------------------------------

    def _apply_control(self, records: list[Any]) -> None:
        """Apply control and feedback messages, in order, between batches; log each one."""
        control = self._control
        if control is None or not records:
            return
        for r in records:
            if r.topic == self.settings.control.topic:
                try:
                    action = control.apply_control(r.value)
                except ControlError as exc:
                    self.metrics.control_messages.labels(_action_of(r.value), "refused").inc()
                    log.warning("%s[%d]@%d: %s", r.topic, r.partition, r.offset, exc)
                    continue
                self.metrics.control_messages.labels(action, "applied").inc()
                log.info("control applied: %s", r.value.decode("utf-8", "replace"))
            else:
                try:
                    kind, outcome = control.apply_feedback(r.value, r.key)
                except ControlError as exc:
                    self.metrics.feedback.labels("unknown", "refused").inc()
                    log.warning("%s[%d]@%d: %s", r.topic, r.partition, r.offset, exc)
                    continue
                self.metrics.feedback.labels(kind, outcome).inc()
                log.info("feedback %s (%s): %s", kind, outcome, r.value.decode("utf-8", "replace"))
        self._apply_threshold_control()

    def _apply_threshold_control(self) -> None:
        control, pipeline = self._control, self._pipeline
        if pipeline is None:
            return
        if (
            control is not None
            and control.threshold is not None
            and control.threshold_changes != self._threshold_changes_applied
        ):
            t = control.threshold
            pipeline.threshold.reconfigure(t.quantile, t.window_size)
            self._threshold_changes_applied = control.threshold_changes
            log.info(
                "threshold now q=%s over %d scores: %.4g",
                pipeline.threshold.quantile, pipeline.threshold.window_size,
                pipeline.threshold.value,
            )  # fmt: skip
        if control is not None:
            self.metrics.record_control(control, pipeline.threshold.quantile)
        else:
            self.metrics.threshold_quantile.set(pipeline.threshold.quantile)

    # -- per-entity state ------------------------------------------------------------------

    def _rewind_kept(self, consumer: kafka_io.GroupConsumer, polled: Polled) -> Polled:
        """Seek partitions kept across a rebalance back to their committed offsets.

        The revoke dropped their buffered and uncommitted work, but kafka-python kept their
        positions past it; without this the dropped records would never be scored. Records
        just polled from those partitions are left to the re-read.
        """
        rewind, self._rewind = self._rewind & consumer.assignment(), set()
        if not rewind:
            return polled
        try:
            for tp in rewind:
                offset = consumer.committed(tp)
                if offset is None:  # nothing committed yet: where the group starts reading
                    if self.settings.kafka.auto_offset_reset == "earliest":
                        consumer.seek_to_beginning(tp)
                    else:
                        consumer.seek_to_end(tp)
                else:
                    consumer.seek(tp, offset)
        except KafkaError:
            self._rewind |= rewind
            raise
        return {tp: records for tp, records in polled.items() if tp not in rewind}

    def _rebuild_state(self, consumer: kafka_io.GroupConsumer, polled: Polled) -> None:
        """Clear the state of revoked partitions and rebuild that of newly assigned ones.

        Each assigned partition's tail, up to `state.restore_events` messages before the
        first one not yet scored, is re-read with a group-less consumer and replayed through
        the pipeline in replay mode (state only: no alerts, no commits, global threshold
        untouched). A failure leaves the restore pending; it is retried after a back-off.
        """
        assert self._pipeline is not None
        state = self._pipeline.state
        if self._clear_state:
            state.clear()
            if self._shadow is not None:  # a candidate starts over where state moved
                self._shadow.state.clear()
            self._clear_state = False
        # Take the request now: a rebalance during the restore (its callbacks can run inside
        # any consumer call) files a new one, handled after the next poll.
        pending, self._restore = self._restore, set()
        pending &= consumer.assignment()
        if not pending or not state.needs_history or not self.settings.state.restore_events:
            return
        started = time.monotonic()
        first = _first_offsets(self._buffer, polled)
        s = self.settings
        try:
            ends = {tp: first[tp] if tp in first else consumer.position(tp) for tp in pending}
            tails = kafka_io.read_tails(
                s.kafka, ends, s.state.restore_events, s.state.restore_timeout_seconds
            )
        except KafkaError:
            self._restore |= pending  # retried after the back-off
            raise
        events = 0
        for messages in tails.values():
            for i in range(0, len(messages), s.batch.max_batch_size):
                self._pipeline.process(messages[i : i + s.batch.max_batch_size], replay=True)
            events += len(messages)
        seconds = time.monotonic() - started
        self.metrics.record_restore(len(pending), events, seconds)
        self.metrics.record_state(state)
        log.info(
            "state restored for %d partition(s) from %d earlier event(s) in %.2fs",
            len(pending), events, seconds,
        )  # fmt: skip

    # -- one batch -------------------------------------------------------------------------

    def flush_batch(
        self, commit: bool = False, grace_seconds: float | None = None
    ) -> BatchResult | None:
        """Score the buffered messages and send their records; commit when due (or asked).

        A failed send or commit is retried, with everything pending since the last commit,
        until it gets through, the group moves the partitions elsewhere, or (shutting down)
        the grace period ends.
        """
        assert self._outbox is not None and self._pipeline is not None
        result = None
        if self._buffer:
            messages, self._buffer = self._buffer, []
            result = self._pipeline.process(messages)
            self.metrics.record_batch(result)
            if self._shadow is not None:
                self._shadow_batch(messages, result)
            if self._control is not None and self.settings.control.feedback_topic:
                self._control.remember(
                    [a.alert_id for a in result.alerts] + [i.incident_id for i in result.incidents],
                    [a.entity for a in result.alerts] + [i.entity for i in result.incidents],
                )
            self.metrics.record_state(self._pipeline.state)
            try:
                self._outbox.add(result, kafka_io.next_offsets(messages))
            except Rebalanced as exc:
                self._rebalanced(exc)
                return result
            except DeliveryError:
                commit = True  # the retry loop below resends what did not go out
        if commit or self._outbox.commit_due():
            self.commit(grace_seconds)
        return result

    def commit(self, grace_seconds: float | None = None) -> None:
        """Make every batch sent since the last commit durable, retrying with back-off."""
        assert self._outbox is not None
        give_up = None if grace_seconds is None else time.monotonic() + grace_seconds
        while True:
            try:
                stages = self._outbox.commit()
            except Rebalanced as exc:
                self._rebalanced(exc)
                return
            except DeliveryError as exc:
                self.metrics.delivery_failures.labels("retried").inc()
                if give_up is not None and time.monotonic() >= give_up:
                    raise FatalDeliveryError(f"not delivered before shutdown: {exc}") from exc
                self._wait_after_failure(
                    f"{self._outbox.pending_batches} batch(es) not delivered: {exc}"
                )
                continue
            break
        self._backoff.reset()
        self._broker_ok = True
        self.metrics.record_stages(stages)

    def _rebalanced(self, exc: Exception) -> None:
        assert self._outbox is not None
        log.warning("group rebalanced before the commit; the new owner replays: %s", exc)
        self.metrics.delivery_failures.labels("rebalanced").inc()
        self._outbox.drop()

    def _wait_after_failure(self, why: str) -> None:
        self._set_ready(False)
        self._broker_ok = False
        delay = self._backoff.failed()
        log.warning("%s; retrying in %.1fs", why, delay)
        deadline = time.monotonic() + delay
        while time.monotonic() < deadline:
            self.heartbeat.beat()  # waiting on Kafka is not a hung process
            time.sleep(min(0.2, max(0.0, deadline - time.monotonic())))

    # -- observability ---------------------------------------------------------------------

    def _check(self, consumer: kafka_io.GroupConsumer, polled_any: bool) -> None:
        """Once a second: consumer lag, and whether the group coordinator still answers.

        A member without partitions whose coordinator stays silent while the broker answers
        metadata requests is stuck outside its group (seen once in CI with kafka-python:
        "assigned []", then no heartbeat for 90 s): it is replaced, and a new member joins
        afresh.
        """
        now = time.monotonic()
        try:
            for tp, lag in consumer.lag().items():
                self.metrics.lag.labels(tp.topic, str(tp.partition)).set(lag)
            in_touch = polled_any or consumer.coordinator_in_touch()
        except KafkaError:  # position() may need the broker to validate an offset
            in_touch = False
        answered = False
        if not consumer.assignment() and now >= self._next_metadata:
            # Joined before the broker's metadata listed the topic's partitions (a topic
            # created moments before): kafka-python would wait metadata_max_age_ms (5 min)
            # to look again. A refresh now lets the group rebalance; an idle replica
            # (more replicas than partitions) pays one metadata request per interval.
            self._next_metadata = now + METADATA_REFRESH_SECONDS
            try:
                consumer.topics()
                answered = True
            except KafkaError as exc:
                log.warning("metadata refresh: %s", exc)
        self._silent_since = None if in_touch else (self._silent_since or now)
        if answered and self._silent_since and now - self._silent_since >= STUCK_SECONDS:
            self._silent_since = None
            self._replace_consumer(
                f"no partitions, and the group coordinator silent for {STUCK_SECONDS:.0f}s "
                "while the broker answers"
            )
            return
        if self._pipeline is not None and self._pipeline.drift is not None:
            self.metrics.record_drift(self._pipeline.drift)
        if in_touch != self._broker_ok:
            log.info("Kafka %s", "reachable" if in_touch else "unreachable: waiting for it")
        self._broker_ok = in_touch
        self._checked_at = now
        self._set_ready(in_touch)

    def _set_ready(self, ready: bool) -> None:
        self._ready = ready  # the anomaly_ready gauge reads is_ready() when scraped

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


@contextmanager
def _closed_on_failure(close: Callable[[], object]) -> Iterator[None]:
    """Close a client just made if what follows fails: each retry makes a new one, and one
    left open keeps its sockets and threads (and a group consumer its membership)."""
    try:
        yield
    except BaseException:
        try:
            close()
        except Exception:  # the failure in hand is the one to report
            log.debug("closing a client after a failed start", exc_info=True)
        raise


def _first_offsets(buffer: list[RawMessage], polled: Polled) -> dict[TopicPartition, int]:
    """Per partition, the first offset held but not yet scored (buffered or just polled)."""
    first: dict[TopicPartition, int] = {}
    for m in buffer:
        tp = TopicPartition(m.topic, m.partition)
        first[tp] = min(first.get(tp, m.offset), m.offset)
    for tp, records in polled.items():
        if records:
            first[tp] = min(first.get(tp, records[0].offset), records[0].offset)
    return first


def _action_of(value: bytes | None) -> str:
    """The action a refused control message named, if it is one we know (metric label)."""
    import json

    try:
        action = json.loads(value or b"").get("action")
    except (ValueError, AttributeError):
        return "unknown"
    return action if action in CONTROL_ACTIONS else "unknown"


def _info_labels(bundle: bundles.Bundle) -> tuple[str, str, str, str]:
    return bundle.version, bundle.kind, bundle.spec.profile, bundle.spec.entity_field


class _Rebalance(ConsumerRebalanceListener):
    """Leave uncommitted work to be replayed when partitions move (see on_partitions_revoked)."""

    def __init__(self, detector: Detector) -> None:
        self.detector = detector

    def on_partitions_revoked(self, revoked: Any) -> None:
        # kafka-python 3 calls this on its network thread, where a commit cannot block. So
        # nothing is committed here: the uncommitted batches and the buffer are dropped, and
        # after the (eager) rebalance every assigned partition restarts from its committed
        # offset, so the new owner, this replica included, replays them: same alert ids, and
        # in exactly-once mode the open transaction is aborted, so nothing is seen twice.
        d = self.detector
        if d._buffer or (d._outbox is not None and d._outbox.pending_batches):
            log.info("partitions revoked: uncommitted work is replayed after the rebalance")
        d._buffer = []
        if d._outbox is not None:
            d._outbox.drop()
        # The per-entity state has seen the dropped work too: the main loop clears it (this
        # thread must not touch it mid-batch) and restores whatever it is assigned next.
        d._clear_state = True
        d._revoked = set(revoked)
        self.detector.metrics.forget_partitions([(tp.topic, tp.partition) for tp in revoked])

    def on_partitions_assigned(self, assigned: Any) -> None:
        log.info("assigned %s", sorted(f"{tp.topic}[{tp.partition}]" for tp in assigned))
        d = self.detector
        d._restore = set(assigned)
        d._rewind |= d._revoked & set(assigned)
        d._revoked = set()
