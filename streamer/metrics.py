"""Prometheus metrics on an injected registry, and the HTTP endpoint that serves them.

Updated once per batch, never per event: a batch of 1000 costs a handful of calls.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

from streamer import delivery, pipeline
from streamer.control import ControlState
from streamer.drift import DriftMonitor
from streamer.pipeline import BatchResult
from streamer.state import EntityState

SCORE_QUANTILES = (0.5, 0.9, 0.99, 0.999)
STAGE_NAMES = (*pipeline.STAGES, *delivery.STAGES)
CONTROL_ACTIONS = (
    "set_threshold", "set_entity_threshold", "clear_entity_threshold", "mute", "unmute",
)  # fmt: skip
EVICTIONS = (
    ("windows", "capacity"), ("aggregates", "capacity"), ("aggregates", "idle"),
    ("thresholds", "capacity"), ("incidents", "capacity"), ("labels", "capacity"),
)  # fmt: skip
REJECT_REASONS = (
    "empty", "too_large", "invalid_utf8", "invalid_json", "schema", "out_of_range", "non_finite",
)  # fmt: skip


class Metrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        ProcessCollector(registry=registry)  # process_resident_memory_bytes, cpu seconds, fds
        self.consumed = Counter(
            "anomaly_events_consumed", "Events read from the input topic", registry=registry
        )
        self.rejected = Counter(
            "anomaly_events_rejected",
            "Events sent to the dead-letter topic, by reason",
            ["reason"],
            registry=registry,
        )
        for reason in REJECT_REASONS:
            self.rejected.labels(reason)  # export zeros so rate() works from the start
        self.scored = Counter("anomaly_events_scored", "Events scored", registry=registry)
        self.alerts = Counter(
            "anomaly_alerts_published", "Alerts published to the alert topic", registry=registry
        )
        self.batches = Counter("anomaly_batches", "Batches processed", registry=registry)
        self.batch_size = Histogram(
            "anomaly_batch_size",
            "Events per batch",
            buckets=(1, 10, 50, 100, 250, 500, 1000, 2000, 5000, 10000),
            registry=registry,
        )
        self.batch_seconds = Histogram(
            "anomaly_batch_duration_seconds",
            "Time per batch by stage",
            ["stage"],
            buckets=(0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1, 5),
            registry=registry,
        )
        for stage in STAGE_NAMES:
            self.batch_seconds.labels(stage)  # every stage exported from the start
        self.threshold = Gauge(
            "anomaly_threshold", "Current rolling-percentile threshold", registry=registry
        )
        self.score_quantile = Gauge(
            "anomaly_score_quantile",
            "Quantiles of the scores of the latest batch",
            ["q"],  # not `quantile`: Prometheus reserves that label for summaries
            registry=registry,
        )
        self.lag = Gauge(
            "anomaly_consumer_lag",
            "Messages between the consumer position and the partition end",
            ["topic", "partition"],
            registry=registry,
        )
        self.model_info = Gauge(
            "anomaly_model_info",
            "The model bundle being served; join on it for per-profile (entity type) views",
            ["version", "kind", "profile", "entity_field"],
            registry=registry,
        )  # fmt: skip
        self.ready = Gauge("anomaly_ready", "1 when consuming and scoring", registry=registry)
        self.model_reloads = Counter(
            "anomaly_model_reloads",
            "Model bundles found in the registry: swapped in (loaded) or refused (rejected)",
            ["outcome"],
            registry=registry,
        )
        for outcome in ("loaded", "rejected"):
            self.model_reloads.labels(outcome)
        self.delivery_failures = Counter(
            "anomaly_delivery_failures",
            "Batches whose publish or commit failed: retried, or left to a new owner",
            ["outcome"],
            registry=registry,
        )
        for outcome in ("retried", "rebalanced"):
            self.delivery_failures.labels(outcome)
        self.incidents = Counter(
            "anomaly_incidents",
            "Incident messages published, by status (open, update, resolve)",
            ["status"],
            registry=registry,
        )
        for status in ("open", "update", "resolve"):
            self.incidents.labels(status)
        self.threshold_quantile = Gauge(
            "anomaly_threshold_quantile",
            "Quantile of the global threshold (threshold.quantile, or a control message's)",
            registry=registry,
        )
        self.control_messages = Counter(
            "anomaly_control_messages",
            "Control-topic messages, by action, applied or refused (unknown action: unknown)",
            ["action", "outcome"],
            registry=registry,
        )
        self.feedback = Counter(
            "anomaly_feedback",
            "Feedback-topic messages by type: applied, unmatched (entity or key unknown), "
            "duplicate (a label already counted), withdrawn (a label taken back) or refused",
            ["type", "outcome"],
            registry=registry,
        )
        self.control_entities = Gauge(
            "anomaly_control_entities",
            "Entities under runtime control: muted, override (fixed threshold), raised (feedback)",
            ["how"],
            registry=registry,
        )
        # Zeros from the start, so dashboards and rate() see the series before any message.
        for action in (*CONTROL_ACTIONS, "unknown"):
            for outcome in ("applied", "refused"):
                if action != "unknown" or outcome == "refused":
                    self.control_messages.labels(action, outcome)
        for kind in ("ack", "false_positive"):
            for outcome in ("applied", "unmatched", "refused"):
                self.feedback.labels(kind, outcome)
        for outcome in ("applied", "unmatched", "duplicate", "withdrawn"):  # refused: "unknown"
            self.feedback.labels("label", outcome)
        self.feedback.labels("unknown", "refused")
        for how in ("muted", "override", "raised"):
            self.control_entities.labels(how)
        self.feature_psi = Gauge(
            "anomaly_feature_psi",
            "Population stability index of each scaled feature, live window vs training",
            ["feature"],
            registry=registry,
        )
        self.score_psi = Gauge(
            "anomaly_score_psi",
            "Population stability index of the scores, live window vs held-out training scores",
            registry=registry,
        )
        self.shadow_info = Gauge(
            "anomaly_shadow_info",
            "The candidate bundle being shadow-scored (value 1), if any",
            ["version", "kind"],
            registry=registry,
        )
        self.shadow_scored = Counter(
            "anomaly_shadow_scored",
            "Events scored while a candidate is shadowed, by role (current, candidate)",
            ["role"],
            registry=registry,
        )
        self.shadow_alerts = Counter(
            "anomaly_shadow_alerts",
            "Alerts while a candidate is shadowed, by role (the candidate's are not published)",
            ["role"],
            registry=registry,
        )
        self.shadow_score_quantile = Gauge(
            "anomaly_shadow_score_quantile",
            "Score quantiles of the latest shadowed batch, by role",
            ["role", "q"],
            registry=registry,
        )
        for role in ("current", "candidate"):
            self.shadow_scored.labels(role)
            self.shadow_alerts.labels(role)
        self.shadow_decisions = Counter(
            "anomaly_shadow_decisions",
            "Candidates promoted, rolled back, or rejected at load",
            ["outcome"],
            registry=registry,
        )
        for outcome in ("promoted", "rolled_back", "rejected"):
            self.shadow_decisions.labels(outcome)
        self.beyond_range = Counter(
            "anomaly_events_beyond_range",
            "Scored events with a feature beyond the range seen so far (threshold."
            "range_tolerance); each alerts whatever its score, unless muted or overridden",
            registry=registry,
        )
        self.held_back = Counter(
            "anomaly_events_held_back",
            "Valid events not scored because their entity's window was not full yet",
            registry=registry,
        )
        self.state_entities = Gauge(
            "anomaly_state_entities",
            "Entities held in keyed state, by kind (aggregates, windows, thresholds, incidents, "
            "labels)",
            ["kind"],
            registry=registry,
        )
        for kind in ("aggregates", "windows", "thresholds", "incidents", "labels"):
            self.state_entities.labels(kind)
        self.state_evictions = Counter(
            "anomaly_state_evictions",
            "Entities evicted from keyed state: idle (no effect on scores) or capacity",
            ["kind", "reason"],
            registry=registry,
        )
        for kind, reason in EVICTIONS:
            self.state_evictions.labels(kind, reason)  # zeros: rules can rate() from the start
        self._evictions_seen: dict[tuple[str, str], int] = {}
        self.restores = Counter(
            "anomaly_state_restores",
            "Partitions whose entity state was rebuilt from their tail after an assignment",
            registry=registry,
        )
        self.restored_events = Counter(
            "anomaly_state_restored_events",
            "Events re-read and replayed into keyed state by restores",
            registry=registry,
        )
        self.restore_seconds = Counter(
            "anomaly_state_restore_seconds",
            "Time spent rebuilding keyed state (scoring waits meanwhile)",
            registry=registry,
        )

    def forget_partitions(self, partitions: list[tuple[str, int]]) -> None:
        """Drop lag series of partitions this replica no longer owns (no stale values)."""
        for topic, partition in partitions:
            with contextlib.suppress(KeyError):  # never exported: no lag refresh since assign
                self.lag.remove(topic, str(partition))

    def record_stages(self, stages: dict[str, float]) -> None:
        for stage, seconds in stages.items():
            self.batch_seconds.labels(stage).observe(seconds)

    def record_state(self, state: EntityState) -> None:
        """Entities held and evicted per kind of keyed state (a few dict reads per batch)."""
        for kind, n in state.entities().items():
            self.state_entities.labels(kind).set(n)
        for (kind, reason), total in state.evictions().items():
            seen = self._evictions_seen.get((kind, reason), 0)
            if total > seen:
                self.state_evictions.labels(kind, reason).inc(total - seen)
            # A new pipeline (hot reload) restarts its totals from zero.
            self._evictions_seen[(kind, reason)] = total

    def record_control(self, control: ControlState, quantile: float) -> None:
        self.threshold_quantile.set(quantile)
        self.control_entities.labels("muted").set(len(control.muted))
        self.control_entities.labels("override").set(len(control.overrides))
        self.control_entities.labels("raised").set(len(control.factors))

    def reset_drift(self, features: list[str]) -> None:
        """NaN (not measured yet) for every feature of a newly served bundle."""
        self.feature_psi.clear()
        for feature in features:
            self.feature_psi.labels(feature).set(float("nan"))
        self.score_psi.set(float("nan"))

    def record_drift(self, drift: DriftMonitor) -> None:
        """Once a second, not per batch: PSI over the live window (NaN until it has data)."""
        for feature, value in drift.psi_by_feature().items():
            if np.isfinite(value):
                self.feature_psi.labels(feature).set(value)
        score = drift.psi_score()
        if np.isfinite(score):
            self.score_psi.set(score)

    def record_shadow(self, current: BatchResult, candidate: BatchResult) -> None:
        for role, result in (("current", current), ("candidate", candidate)):
            self.shadow_scored.labels(role).inc(result.scores.size)
            self.shadow_alerts.labels(role).inc(len(result.alerts))
            if result.scores.size:
                values = np.quantile(result.scores, SCORE_QUANTILES)
                for q, v in zip(SCORE_QUANTILES, values, strict=True):
                    self.shadow_score_quantile.labels(role, str(q)).set(float(v))

    def record_restore(self, partitions: int, events: int, seconds: float) -> None:
        self.restores.inc(partitions)
        self.restored_events.inc(events)
        self.restore_seconds.inc(seconds)

    def record_batch(self, result: BatchResult) -> None:
        self.batches.inc()
        self.consumed.inc(result.consumed)
        self.batch_size.observe(result.consumed)
        self.scored.inc(result.scores.size)
        if result.held_back:
            self.held_back.inc(result.held_back)
        if result.beyond_range is not None and result.beyond_range.any():
            self.beyond_range.inc(int(result.beyond_range.sum()))
        if result.publish_alerts:
            self.alerts.inc(len(result.alerts))
        for incident in result.incidents:
            self.incidents.labels(incident.status).inc()
        if result.dead_letters:
            counts: dict[str, int] = {}
            for d in result.dead_letters:
                counts[d.reason] = counts.get(d.reason, 0) + 1
            for reason, n in counts.items():
                self.rejected.labels(reason).inc(n)
        self.record_stages(result.stage_seconds)
        if np.isfinite(result.threshold):
            self.threshold.set(result.threshold)
        if result.scores.size:
            values = np.quantile(result.scores, SCORE_QUANTILES)
            for q, v in zip(SCORE_QUANTILES, values, strict=True):
                self.score_quantile.labels(str(q)).set(float(v))


class StatusServer:
    """/metrics, /healthz (the loop is alive) and /readyz (consuming), on one port."""

    def __init__(
        self,
        registry: CollectorRegistry,
        host: str,
        port: int,
        is_alive: Callable[[], bool],
        is_ready: Callable[[], bool],
    ) -> None:
        handler = _handler(registry, is_alive, is_ready)
        self._server = ThreadingHTTPServer((host, port), handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="metrics-http", daemon=True
        )

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def _handler(
    registry: CollectorRegistry, is_alive: Callable[[], bool], is_ready: Callable[[], bool]
) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            path = self.path.split("?", 1)[0]
            if path == "/metrics":
                self._send(200, generate_latest(registry), CONTENT_TYPE_LATEST)
            elif path == "/healthz":
                ok = is_alive()
                self._send(200 if ok else 503, b"ok\n" if ok else b"stalled\n")
            elif path == "/readyz":
                ok = is_ready()
                self._send(200 if ok else 503, b"ready\n" if ok else b"not ready\n")
            else:
                self._send(404, b"not found\n")

        def _send(self, code: int, body: bytes, ctype: str = "text/plain; charset=utf-8") -> None:
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            pass  # scrapes every few seconds would drown the daemon's own log

    return Handler


class Heartbeat:
    """The loop beats once per iteration; /healthz fails when it has not beaten for a while."""

    def __init__(self, stale_after_seconds: float) -> None:
        self.stale_after_seconds = stale_after_seconds
        self._last = time.monotonic()

    def beat(self) -> None:
        self._last = time.monotonic()

    def alive(self) -> bool:
        return time.monotonic() - self._last < self.stale_after_seconds
