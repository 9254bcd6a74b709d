"""One micro-batch in, alerts and dead letters out. No I/O: the app does Kafka around it."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import msgspec
import numpy as np

from streamer.features import FeatureSpec, build_features, event_seconds
from streamer.records import (
    ALERT_SCHEMA_VERSION,
    Alert,
    DeadLetter,
    FeatureContribution,
    ModelRef,
    RawMessage,
    SourcePosition,
    alert_id,
)
from streamer.scaler import StandardScaler
from streamer.scoring import Scorer, reconstruction_errors
from streamer.threshold import RollingQuantileThreshold

STAGES = ("decode", "features", "scale", "score", "threshold", "explain")


@dataclass
class BatchResult:
    consumed: int
    alerts: list[Alert]
    dead_letters: list[DeadLetter]
    scores: np.ndarray  # one per scored (valid) event, in input order
    threshold: float  # the value the batch was judged against
    stage_seconds: dict[str, float] = field(default_factory=dict)


class Pipeline:
    """decode -> features -> scale -> score -> threshold -> explain, for a whole batch."""

    def __init__(
        self,
        spec: FeatureSpec,
        scaler: StandardScaler,
        scorer: Scorer,
        threshold: RollingQuantileThreshold,
        model: ModelRef,
        top_features: int = 3,
        max_message_bytes: int = 1_000_000,
    ) -> None:
        self.spec = spec
        self.scaler = scaler
        self.scorer = scorer
        self.threshold = threshold
        self.model = model
        self.top_features = top_features
        self.max_message_bytes = max_message_bytes
        self._decoder = msgspec.json.Decoder(spec.event_type())
        self._names = spec.feature_names()
        self._unit_names = spec.unit_names()

    def process(self, messages: Sequence[RawMessage]) -> BatchResult:
        clock = time.perf_counter
        t0 = clock()
        events, kept, dead = self._decode(messages)
        t1 = clock()
        raw = build_features(self.spec, events)
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
        t3 = clock()
        recon = self.scorer.reconstruct(x)
        errors = reconstruction_errors(x, recon)
        scores = errors.mean(axis=1) if len(kept) else np.empty(0)
        t4 = clock()
        judged_against = self.threshold.value
        flagged = self.threshold.judge(scores)
        t5 = clock()
        alerts = [
            self._alert(kept[i], events[i], raw[i], recon[i], errors[i], scores[i], judged_against)
            for i in np.flatnonzero(flagged)
        ]
        t6 = clock()
        stage = dict(zip(STAGES, np.diff([t0, t1, t2, t3, t4, t5, t6]).tolist(), strict=True))
        return BatchResult(len(messages), alerts, dead, scores, judged_against, stage)

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

    def _alert(
        self,
        message: RawMessage,
        event: Any,
        raw: np.ndarray,
        recon_scaled: np.ndarray,
        errors: np.ndarray,
        score: float,
        threshold: float,
    ) -> Alert:
        spec = self.spec
        recon = self.scaler.inverse_transform(recon_scaled)
        total = float(errors.sum()) or 1.0
        top = np.argsort(errors)[::-1][: self.top_features]
        explained = [
            FeatureContribution(
                feature=self._unit_names[j],
                actual=spec.to_original_units(j, float(raw[j])),
                reconstructed=spec.to_original_units(j, float(recon[j])),
                contribution=float(errors[j]) / total,
            )
            for j in top
        ]
        seconds = event_seconds(spec, getattr(event, spec.time_field))
        return Alert(
            alert_id=alert_id(message.topic, message.partition, message.offset),
            schema_version=ALERT_SCHEMA_VERSION,
            profile=spec.profile,
            entity_field=spec.entity_field,
            entity=getattr(event, spec.entity_field),
            event_id=getattr(event, spec.id_field) if spec.id_field else None,
            event_time=_iso(seconds),
            detected_at=_iso(time.time()),
            score=float(score),
            threshold=threshold,
            quantile=self.threshold.quantile,
            model=self.model,
            top_features=explained,
            source=SourcePosition(message.topic, message.partition, message.offset),
        )


def _undecodable_reason(value: bytes) -> str:
    try:
        value.decode("utf-8")
    except UnicodeDecodeError:
        return "invalid_utf8"
    return "invalid_json"


def _iso(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).isoformat(timespec="milliseconds")
