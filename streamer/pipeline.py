"""One micro-batch in, alerts and dead letters out. No I/O: the app does Kafka around it.

With a windowed model (lstm, dense_window) an event is scored by the window of its entity's last
`window_length` rows that it completes; an event whose entity has fewer rows so far is held
back (counted, not scored, its offset committed like any other) until the window fills.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import msgspec
import numpy as np

from streamer.control import ControlState
from streamer.drift import DriftMonitor
from streamer.entity_smoothing import EntitySmoothedThresholds
from streamer.features import FeatureSpec, build_features, event_seconds
from streamer.ranges import RangeGuard
from streamer.records import (
    ALERT_SCHEMA_VERSION,
    Alert,
    DeadLetter,
    FeatureContribution,
    Incident,
    ModelRef,
    RawMessage,
    SourcePosition,
    alert_id,
)
from streamer.scaler import Scaler
from streamer.scoring import Scorer, event_scores, feature_errors, reconstruction_errors
from streamer.smoothing import SmoothedThreshold
from streamer.state import EntityState
from streamer.threshold import RollingQuantileThreshold

STAGES = ("decode", "features", "scale", "score", "threshold", "explain")


@dataclass
class BatchResult:
    consumed: int
    alerts: list[Alert]
    dead_letters: list[DeadLetter]
    scores: np.ndarray  # one per scored event, in input order
    threshold: float  # the global value the batch was judged against
    stage_seconds: dict[str, float] = field(default_factory=dict)
    scored: list[RawMessage] = field(default_factory=list)  # the message of each score
    held_back: int = 0  # valid events whose entity window is not full yet
    incidents: list[Incident] = field(default_factory=list)
    publish_alerts: bool = True  # false: the alerts feed incidents only
    # threshold.range_tolerance: which scored events had a feature beyond the range so far.
    beyond_range: np.ndarray | None = None


class Pipeline:
    """decode -> features -> scale -> score -> threshold -> explain, for a whole batch."""

    def __init__(
        self,
        spec: FeatureSpec,
        scaler: Scaler,
        scorer: Scorer,
        threshold: RollingQuantileThreshold,
        model: ModelRef,
        top_features: int = 3,
        max_message_bytes: int = 1_000_000,
        state: EntityState | None = None,
        publish_alerts: bool = True,
        control: ControlState | None = None,
        drift: DriftMonitor | None = None,
        ranges: RangeGuard | None = None,
        error_cap: float | None = None,
        score_weights: np.ndarray | None = None,
        forecast: bool = False,
    ) -> None:
        self.spec = spec
        self.scaler = scaler
        self.scorer = scorer
        self.threshold = threshold
        self.model = model
        self.top_features = top_features
        self.max_message_bytes = max_message_bytes
        self.state = state or EntityState()
        self.publish_alerts = publish_alerts
        self.control = control  # shared with the app, which feeds it between batches
        self.drift = drift  # live feature and score distributions (read by the app)
        self.ranges = ranges  # threshold.range_tolerance: one range per pipeline
        # The bundle's: its warm start was scored the same way.
        self.error_cap = error_cap
        self.score_weights = score_weights
        # A forecast bundle: a window scores by its last row only (a dense forecast model
        # needs nothing here: its score weights already leave the context out).
        self.forecast = forecast
        self._decoder = msgspec.json.Decoder(spec.event_type())
        self._names = spec.feature_names()
        self._unit_names = spec.unit_names()
        width = len(self._names)
        self._expm1 = np.array([spec.to_original_units(j, 1.0) != 1.0 for j in range(width)])

    def process(self, messages: Sequence[RawMessage], replay: bool = False) -> BatchResult:
        """Score a batch. `replay`: only rebuild per-entity state (no alerts, global
        threshold untouched), for messages this replica re-reads after a partition move."""
        clock = time.perf_counter
        t0 = clock()
        events, kept, dead = self._decode(messages)
        t1 = clock()
        raw = build_features(self.spec, events, self.state.aggregates)
        st = self.state
        scores_needed = not replay or st.thresholds is not None or st.incidents is not None
        if not scores_needed and st.windows is None:  # a replay for aggregates: done
            return BatchResult(len(messages), [], dead, np.empty(0), self.threshold.value)
        t2 = clock()
        x = self.scaler.transform(raw)
        # Checked after scaling: a huge but finite value can still overflow float32.
        finite = np.isfinite(x).all(axis=1)
        if not finite.all():
            for i in np.flatnonzero(~finite):
                bad = [self._names[j] for j in np.flatnonzero(~np.isfinite(x[i]))]
                dead.append(DeadLetter(kept[i], "non_finite", f"feature(s) {', '.join(bad)}"))
            raw, x = raw[finite], x[finite]
            events = [e for e, ok in zip(events, finite, strict=True) if ok]
            kept = [m for m, ok in zip(kept, finite, strict=True) if ok]
        keyed = (
            st.windows is not None
            or st.thresholds is not None
            or (self.control is not None and self.control.active)
        )
        # Entity keys only where something is per entity: a dense, stateless batch skips them.
        keys = [getattr(e, self.spec.entity_field) for e in events] if keyed else []
        rows = np.arange(len(events))
        model_input: np.ndarray = x
        if self.state.windows is not None:
            model_input, rows = self.state.windows.add(keys, np.asarray(x, dtype=np.float32))
        if not scores_needed:  # a replay for windows (and aggregates): done
            return BatchResult(len(messages), [], dead, np.empty(0), self.threshold.value)
        t3 = clock()
        recon = self.scorer.reconstruct(model_input)
        errors = feature_errors(reconstruction_errors(model_input, recon), self.forecast)
        if recon.ndim == 3:
            recon = recon[:, -1, :]  # explained against the event's own (last) step
        scores = (
            event_scores(errors, self.error_cap, self.score_weights) if rows.size else np.empty(0)
        )
        # Alerts explain with the uncapped errors (which feature is off, and by how much),
        # weighted: a context feature (weight 0) never explains a score it is not part of.
        if self.score_weights is not None:
            errors = errors * self.score_weights
        t4 = clock()
        # Every valid row widens the range (held-back ones too: they were seen); a replay
        # re-reads rows the range has seen already.
        beyond = None
        if self.ranges is not None and not replay:
            beyond = self.ranges.check(x)[rows]
        judged_against = self.threshold.value
        scored_keys = [keys[i] for i in rows] if self.state.thresholds is not None else []
        if replay:
            # Only per-entity state learns from a replay; the global threshold has seen
            # these scores already (or must not count them twice).
            flagged = scores > judged_against
            used = np.full(scores.size, judged_against)
        else:
            flagged = self.threshold.judge(scores)
            used = np.full(scores.size, judged_against)
        # The score the threshold compared: smoothed with [smoothing], except in a replay
        # (which leaves the smoothing state alone). Control re-judges on the same scale.
        judged = scores
        if not replay and isinstance(self.threshold, SmoothedThreshold):
            judged = self.threshold.last_smoothed
        if self.state.thresholds is not None:
            # The entity's own threshold replaces the global one once it has enough scores.
            # With [smoothing] it is the entity's own SmoothedThreshold, which a replay feeds
            # too (the entity's EWMA, run, cooldown and window are per-partition state).
            flagged, used = self.state.thresholds.judge(scored_keys, scores, judged_against)
            if isinstance(self.state.thresholds, EntitySmoothedThresholds):
                judged = self.state.thresholds.last_smoothed
        if beyond is not None:
            # Beyond range alerts whatever the score, unshaped (no run, no cooldown): each
            # breakout moves the range, so a drift alerts once per tolerance step.
            flagged = flagged | beyond
        if self.control is not None and self.control.active:
            # Mutes, fixed overrides and feedback-raised thresholds have the last word.
            flagged, used = self.control.adjust([keys[i] for i in rows], judged, flagged, used)
        t5 = clock()
        if replay and self.state.incidents is None:
            return BatchResult(len(messages), [], dead, scores, judged_against)
        # An alert carries the score its threshold compared (`used` is on that scale), and
        # the raw one beside it where they differ.
        alerts, times = self._alerts(
            np.flatnonzero(flagged), rows, kept, events, raw, recon, errors, judged, used,
            raw_scores=None if judged is scores else scores, beyond=beyond,
        )  # fmt: skip
        incidents: list[Incident] = []
        if self.state.incidents is not None:
            now: dict[int, float] = {}
            for m, e in zip(kept, events, strict=True):
                t = event_seconds(self.spec, getattr(e, self.spec.time_field))
                if t > now.get(m.partition, float("-inf")):
                    now[m.partition] = t
            incidents = self.state.incidents.observe(alerts, times, now)
        if replay:  # the tracker now knows the replayed runs; nothing goes out
            return BatchResult(len(messages), [], dead, scores, judged_against)
        if self.drift is not None:
            self.drift.observe(x, scores)
        t6 = clock()
        stage = dict(zip(STAGES, np.diff([t0, t1, t2, t3, t4, t5, t6]).tolist(), strict=True))
        return BatchResult(
            len(messages), alerts, dead, scores, judged_against, stage,
            scored=[kept[i] for i in rows], held_back=len(events) - rows.size,
            incidents=incidents, publish_alerts=self.publish_alerts, beyond_range=beyond,
        )  # fmt: skip

    def _decode(
        self, messages: Sequence[RawMessage]
    ) -> tuple[list[Any], list[RawMessage], list[DeadLetter]]:
        events: list[Any] = []
        kept: list[RawMessage] = []
        dead: list[DeadLetter] = []
        decode = self._decoder.decode
        for m in messages:
            value = m.value
            if not value:
                dead.append(DeadLetter(m, "empty", "message has no value"))
                continue
            if len(value) > self.max_message_bytes:
                dead.append(
                    DeadLetter(m, "too_large", f"{len(value)} bytes > {self.max_message_bytes}")
                )
                continue
            try:
                events.append(decode(value))
            except msgspec.ValidationError as exc:
                text = str(exc)
                reason = "out_of_range" if "out of range" in text else "schema"
                dead.append(DeadLetter(m, reason, text))
                continue
            except (msgspec.DecodeError, UnicodeDecodeError) as exc:
                dead.append(DeadLetter(m, _undecodable_reason(value), str(exc)))
                continue
            kept.append(m)
        return events, kept, dead

    def _alerts(
        self,
        hits: np.ndarray,  # indices into the scored rows
        rows: np.ndarray,  # scored row -> index into events / kept / raw
        kept: list[RawMessage],
        events: list[Any],
        raw: np.ndarray,
        recon: np.ndarray,
        errors: np.ndarray,
        scores: np.ndarray,  # the scores judged (smoothed with [smoothing])
        used: np.ndarray,
        raw_scores: np.ndarray | None = None,  # the model's own, where `scores` are smoothed
        beyond: np.ndarray | None = None,  # scored rows beyond the range so far
    ) -> tuple[list[Alert], list[float]]:
        """The alerts of a batch, explained in one pass of array operations (a quarter of
        a sensor stream can alert: per-alert numpy calls were a tenth of the daemon's time)."""
        if hits.size == 0:
            return [], []
        spec = self.spec
        idx = rows[hits]
        err = errors[hits]
        k = min(self.top_features, err.shape[1])
        top = np.argsort(-err, axis=1, kind="stable")[:, :k]
        totals = err.sum(axis=1)
        totals[totals == 0.0] = 1.0
        pick = np.take_along_axis
        actual = pick(self._to_units(raw[idx]), top, 1).tolist()
        rebuilt = pick(self._to_units(self.scaler.inverse_transform(recon[hits])), top, 1).tolist()
        shares = (pick(err, top, 1) / totals[:, None]).tolist()
        names = self._unit_names
        detected = _iso(time.time())
        # raw_score only where it differs: absent, `score` is the raw score (no smoother,
        # e.g. [smoothing] with only a cooldown, or a replay of one-stream smoothing).
        raw_of: list[float | None] = [None] * hits.size
        if raw_scores is not None:
            pairs = zip(raw_scores[hits].tolist(), scores[hits].tolist(), strict=True)
            raw_of = [r if r != s else None for r, s in pairs]
        outside = [False] * hits.size if beyond is None else beyond[hits].tolist()
        alerts, times = [], []
        for n, (j, features) in enumerate(zip(idx.tolist(), top.tolist(), strict=True)):
            message, event = kept[j], events[j]
            seconds = event_seconds(spec, getattr(event, spec.time_field))
            times.append(seconds)
            alerts.append(
                Alert(
                    alert_id=alert_id(message.topic, message.partition, message.offset),
                    schema_version=ALERT_SCHEMA_VERSION,
                    profile=spec.profile,
                    entity_field=spec.entity_field,
                    entity=getattr(event, spec.entity_field),
                    event_id=getattr(event, spec.id_field) if spec.id_field else None,
                    event_time=_iso(seconds),
                    detected_at=detected,
                    score=float(scores[hits[n]]),
                    threshold=float(used[hits[n]]),
                    quantile=self.threshold.quantile,
                    model=self.model,
                    top_features=[
                        FeatureContribution(names[f], actual[n][c], rebuilt[n][c], shares[n][c])
                        for c, f in enumerate(features)
                    ],
                    source=SourcePosition(message.topic, message.partition, message.offset),
                    raw_score=raw_of[n],
                    beyond_range=outside[n],
                )
            )
        return alerts, times

    def _to_units(self, x: np.ndarray) -> np.ndarray:
        """Feature values back in their fields' units (log1p and since_previous: expm1)."""
        out = np.array(x, dtype=np.float64)
        if self._expm1.any():
            with np.errstate(over="ignore"):
                out[:, self._expm1] = np.expm1(out[:, self._expm1])
        return out


def _undecodable_reason(value: bytes) -> str:
    try:
        value.decode("utf-8")
    except UnicodeDecodeError:
        return "invalid_utf8"
    return "invalid_json"


def _iso(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).isoformat(timespec="milliseconds")
