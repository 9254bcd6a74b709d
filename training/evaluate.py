"""Labeled replay evaluation: train on each series' training part, replay its test part
through the daemon's own pipeline, and score the alerts against the labels.

    python -m training.evaluate --config eval/skab.toml [--out runs/eval/skab]

What runs is what the daemon runs: `training.fit.fit_bundle` writes a bundle, which is
loaded and verified with `streamer.bundle.load`, and `streamer.app.build_pipeline` builds the
`Pipeline` that turns batches of `RawMessage` (JSON bytes) into alerts; only Kafka is left
out (`--broker` puts it back as a check: `training.broker_check`). Each detector variant in
the config gets its own pipeline per series (the threshold has state), on the same bundle;
its `threshold` and `smoothing` are the daemon's `[threshold]` and `[smoothing]` sections.
Baselines B1 and B2 (`training.baselines`) run on the same rows in the same run. The output
directory gets `result.json`, `report.html` and the bundles.
"""

from __future__ import annotations

import argparse
import heapq
import logging
import os
import re
import sys
import time
from bisect import bisect_left
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from itertools import pairwise
from pathlib import Path
from statistics import NormalDist
from typing import Any, Literal

import msgspec
import numpy as np

from streamer.config import (
    AlertSettings,
    ConfigError,
    KafkaSettings,
    ModelSettings,
    Settings,
    ThresholdSettings,
    TrainingSettings,
    check_smoothing,
    read_toml,
)
from streamer.features import FeatureSpec
from streamer.labels import deliveries
from streamer.records import Alert, RawMessage
from streamer.smoothing import SmoothedThreshold, SmoothingSettings, latch, shape
from training import nab
from training.adapters import DataSettings, Series, load
from training.baselines import BaselineSettings, b1, b2
from training.datasets import History, from_events, label_delay
from training.quality import (
    EventCounts,
    PointCounts,
    average_precision,
    event_counts,
    point_counts,
    recall_at_rate,
)

log = logging.getLogger(__name__)


class EvalConfigError(Exception):
    """The eval config cannot be used; the message names the field."""


class DetectorSettings(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """One variant of our detector: the daemon's `[threshold]` and optional `[smoothing]`."""

    name: str
    threshold: ThresholdSettings = msgspec.field(default_factory=ThresholdSettings)
    smoothing: SmoothingSettings | None = None

    def __post_init__(self) -> None:
        check_smoothing(self.threshold, self.smoothing)  # what the daemon's config refuses
        if self.smoothing is not None and self.threshold.per_entity:
            # The daemon smooths per entity; a series here is one stream, and the report's
            # smoothed scores and likelihood z are read from the global threshold.
            raise ValueError(
                "smoothing with threshold.per_entity = true is the daemon's (interleaved "
                "entities); the evaluator replays one series per pipeline: set it to false"
            )


class ReplaySettings(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    batch_size: int = 100  # events per Pipeline.process call; the threshold updates per batch
    # With label_rate features: a row's label reaches the pipeline's state this long after
    # the row's event time (training and replay alike); None: the shortest column delay.
    label_delay_seconds: float | None = None
    # Periodic retraining, as an operator runs `training fit` on recent history: before test
    # row k * retrain_every_rows (k >= 1; a series with m test rows gets
    # (m - 1) // retrain_every_rows retrains) a new bundle is fitted on the last
    # retrain_history_rows rows seen (training part + test rows replayed, unlabeled; None:
    # all of them) and a new pipeline continues from its warm start, as the daemon's reload
    # (per-entity state rebuilt from the last state.restore_events rows, as its restore).
    retrain_every_rows: int | None = None
    retrain_history_rows: int | None = None

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError("replay.batch_size must be >= 1")
        if self.label_delay_seconds is not None and not self.label_delay_seconds >= 0.0:
            raise ValueError("replay.label_delay_seconds must be >= 0")
        for name in ("retrain_every_rows", "retrain_history_rows"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"replay.{name} must be >= 1")
        if self.retrain_history_rows is not None and self.retrain_every_rows is None:
            raise ValueError("replay.retrain_history_rows needs replay.retrain_every_rows")


class MetricSettings(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    nab: bool = False  # NAB score (needs windows or label runs; NAB's probation rule)
    # Likelihood levels for NAB's threshold choice, held out: with two folds of files
    # (alternate files in name order), each fold is scored at the level that is best on the
    # other (detectors with smoothing.likelihood; empty: off).
    nab_cv_levels: list[float] = msgspec.field(default_factory=list)
    # With nab_cv_levels: also choose the detector with its level, held out the same way
    # (every likelihood detector of the config at every level is one candidate).
    nab_cv_detectors: bool = False
    alert_rate: float | None = None  # also rank test rows by score: recall at this alert rate
    # Groups that no setting was chosen on: their pooled point metrics are reported apart.
    held_out_groups: list[str] = msgspec.field(default_factory=list)


class ReportSettings(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    max_series_plots: int = 12
    top_alerts: int = 10


class PublishedRow(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A number from the literature, shown next to ours (not measured here)."""

    name: str
    values: dict[str, float]
    source: str = ""


class EvalConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    name: str
    data: DataSettings
    features: FeatureSpec
    detectors: list[DetectorSettings]
    description: str = ""
    protocol: str = ""  # how settings were chosen, printed in the report
    model_scope: Literal["series", "shared"] = "series"  # one model per series, or one for all
    training: TrainingSettings = msgspec.field(default_factory=TrainingSettings)
    baselines: BaselineSettings = msgspec.field(default_factory=BaselineSettings)
    replay: ReplaySettings = msgspec.field(default_factory=ReplaySettings)
    metrics: MetricSettings = msgspec.field(default_factory=MetricSettings)
    report: ReportSettings = msgspec.field(default_factory=ReportSettings)
    published: list[PublishedRow] = msgspec.field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.detectors:
            raise ValueError("at least one [[detectors]] entry is needed")
        names = [d.name for d in self.detectors]
        if len(set(names)) != len(names):
            raise ValueError("detector names must be unique")
        if self.metrics.nab_cv_detectors and not self.metrics.nab_cv_levels:
            raise ValueError("metrics.nab_cv_detectors needs metrics.nab_cv_levels")
        if self.metrics.nab_cv_levels:
            if not all(0.5 < q < 1.0 for q in self.metrics.nab_cv_levels):
                raise ValueError("metrics.nab_cv_levels must be in (0.5, 1)")
            if any(d.smoothing and d.smoothing.margin for d in self.detectors):
                # The margin's floor is not kept per row, so alerts at other levels are unknown.
                raise ValueError("metrics.nab_cv_levels does not work with smoothing.margin")
        if self.replay.retrain_every_rows is not None:
            if self.model_scope != "series":
                # One model for all series would be refitted on rows of every series at once;
                # the replay goes series by series, so there is no "rows seen so far" for it.
                raise ValueError('replay.retrain_every_rows needs model_scope = "series"')
            if self.features.labeled:
                raise ValueError(
                    "replay.retrain_every_rows does not work with label_rate features (their "
                    "per-entity state would have to be rebuilt at each reload)"
                )


def load_config(path: str | Path) -> EvalConfig:
    """Read and validate an eval config; errors name the field (`$.data.split.train_rows`)."""
    path = Path(path)
    try:
        raw = read_toml(path)
    except ConfigError as exc:
        raise EvalConfigError(str(exc)) from exc
    try:
        return msgspec.convert(raw, EvalConfig)
    except msgspec.ValidationError as exc:
        raise EvalConfigError(f"{path}: {exc}") from exc


# -- running -----------------------------------------------------------------------------------


@dataclass
class Run:
    """One detector on one series; arrays hold one value per test row."""

    scores: np.ndarray  # the score the detector judged (smoothed when it smooths); NaN: dropped
    flags: np.ndarray
    thresholds: np.ndarray  # NaN while the detector flags nothing (below min_samples)
    raw_scores: np.ndarray | None = None  # the pipeline's own score when `scores` is smoothed
    z: np.ndarray | None = None  # smoothing.likelihood: each row's z against its window
    beyond: np.ndarray | None = None  # threshold.range_tolerance: rows beyond the range so far
    top_alerts: list[tuple[float, str, Alert]] = field(default_factory=list)
    dead_letters: int = 0


def event_fields(spec: FeatureSpec) -> list[str]:
    """The event fields the spec decodes: all an event needs to carry."""
    return list(spec.event_type().__struct_fields__)


def features(
    spec: FeatureSpec,
    series: Series,
    start: int,
    stop: int,
    label_delay_seconds: float | None = None,
) -> History:
    """Rows [start, stop) through the daemon's decoder and feature code (bad rows skipped);
    label_rate columns get the rows' labels `label_delay_seconds` after their event times."""
    fields = event_fields(spec)
    decoder = msgspec.json.Decoder(spec.event_type())
    encode = msgspec.json.Encoder().encode
    events, rows, rejected = [], [], 0
    for i, row in enumerate(series.event_rows(fields, start, stop), start):
        try:
            events.append(decoder.decode(encode(row)))
            rows.append(i)
        except msgspec.DecodeError as exc:
            if not rejected:
                log.warning("%s row %d does not decode: %s", series.name, i, exc)
            rejected += 1
    labels = series.labels[rows] if spec.labeled else None
    history = from_events(spec, events, labels, label_delay_seconds)
    return replace(history, rejected=rejected + history.rejected)


def _spans(lo: int, hi: int, size: int, cuts: Any) -> list[tuple[int, int]]:
    """[lo, hi) in batches of `size`, also cut before each row in `cuts`."""
    points = sorted({*range(lo, hi, size), *(c for c in cuts if lo < c < hi), hi})
    return list(pairwise(points))


def early_label_seconds(spec: FeatureSpec, delay_seconds: float) -> float | None:
    """How long before its due time a label may reach the state without changing any
    feature (None: not at all).

    A label_rate column at time t counts the labels of events in the whole hours before the
    hour holding t - d (its `delay_seconds`). A label delivered `delay_seconds` = L after its
    event, and early, is one whose event is after t - L: when L <= d, after t - d, so no
    column counts it yet. Up to L early, the newest label a key holds is at most at t, so
    the store's horizon (the columns' reach, an hour more than window + d) still keeps every
    label a column counts. Labels delivered up to that early give the features of labels
    delivered on time, while the store holds every labeled key (`state.max_entities`).

    >>> from streamer.features import LabelRate
    >>> spec = FeatureSpec("p", "e", "t", [LabelRate(windows_seconds=[3600.0],
    ...     delay_seconds=7200.0)], id_field="id")
    >>> early_label_seconds(spec, 7200.0), early_label_seconds(spec, 10800.0)
    (7200.0, None)
    """
    if delay_seconds > label_delay(spec):
        return None
    return delay_seconds


def batch_span(seconds: np.ndarray, clock: np.ndarray, a: int, b: int) -> float:
    """How far apart in time rows [a, b) are, as early labels see it: from their earliest
    event time to the latest time seen by the last (`clock`: the running maximum)."""
    return float(clock[b - 1] - seconds[a:b].min())


def label_spans(
    lo: int, hi: int, size: int, due: Any, seconds: np.ndarray, early: float | None
) -> list[tuple[int, int]]:
    """[lo, hi) in batches of `size`, as the daemon cuts them; the labels that fall due
    inside a batch are delivered before it, as the daemon applies feedback between batches.
    A batch whose rows span more than `early` seconds (from its earliest event time to the
    latest time seen by its end) would get some labels too early to be harmless
    (`early_label_seconds`): it is cut before each row in `due` instead."""
    clock = np.maximum.accumulate(seconds) if seconds.size else seconds
    out: list[tuple[int, int]] = []
    for a, b in _spans(lo, hi, size, ()):
        if early is not None and (not due or batch_span(seconds, clock, a, b) <= early):
            out.append((a, b))
        else:
            out.extend(_spans(a, b, size, due))
    return out


def due_events(
    series: Series,
    fields: list[str],
    due: dict[int, np.ndarray],
    points: list[int],
    a: int,
    b: int,
) -> Iterator[dict[str, Any]]:
    """The events whose labels fall due in rows [a, b) (`due`: `streamer.labels.deliveries`
    by row; `points`: its rows sorted, once per series), in delivery order: what the replay
    confirms, and what the broker check sends."""
    for i in points[bisect_left(points, a) : bisect_left(points, b)]:
        for j in due[i]:
            yield next(series.event_rows(fields, int(j), int(j) + 1))


def row_messages(
    series: Series, fields: list[str], start: int, stop: int
) -> list[tuple[bytes, int]]:
    """Rows [start, stop) as the messages replayed: (JSON value, event time in ms). The broker
    check produces these same bytes and timestamps."""
    encode = msgspec.json.Encoder().encode
    return [
        (encode(row), int(series.seconds[start + k] * 1000))
        for k, row in enumerate(series.event_rows(fields, start, stop))
    ]


def replay(
    pipeline: Any,
    series: Series,
    fields: list[str],
    batch_size: int,
    top: int,
    label_delay_seconds: float | None = None,
    reloads: dict[int, Any] | None = None,
    restore_rows: int = 0,
) -> Run:
    """Feed the test rows to a Pipeline as JSON messages, batch by batch, as the daemon does.

    With label_rate features, each anomalous row's label is due `label_delay_seconds` after
    its event time (`streamer.labels.deliveries`). The labels that fall due inside a batch
    reach the pipeline's state before it, as the daemon applies feedback between batches
    (`label_spans`); that early they change no feature (`early_label_seconds`), so the
    features are those of training, where each label counts from its due time. Where they
    would (a label delay longer than a column's, or a batch spanning more than the delay),
    the batch is cut where labels become due instead.

    `reloads` maps a test row to the pipeline that scores from that row on (a retrained
    bundle's, swapped in between batches as the daemon's hot reload does); batches restart
    at each such row. A new pipeline that keeps per-entity state (windows, aggregates,
    per-entity thresholds) first rebuilds it from the `restore_rows` rows before the swap
    (`state.restore_events`), as the daemon restores its partitions after a reload."""
    n0, m = series.n_train, series.n - series.n_train
    run = Run(np.full(m, np.nan), np.zeros(m, dtype=bool), np.full(m, np.nan))
    smoothed = isinstance(pipeline.threshold, SmoothedThreshold)
    if smoothed:
        run.raw_scores = np.full(m, np.nan)
        if pipeline.threshold.settings.likelihood:
            run.z = np.full(m, -np.inf)
    if pipeline.ranges is not None:
        run.beyond = np.zeros(m, dtype=bool)
    encode = msgspec.json.Encoder().encode
    topic = series.name
    heap: list[tuple[float, int, Alert]] = []

    def batch(a: int, b: int) -> list[RawMessage]:
        return [
            RawMessage(topic, 0, a + k, None, value, ts)
            for k, (value, ts) in enumerate(row_messages(series, fields, a, b))
        ]

    due: dict[int, np.ndarray] = {}
    early: float | None = 0.0  # no labels: nothing is early
    spec = pipeline.spec
    if spec.labeled:
        delay = label_delay(spec, label_delay_seconds)
        due = dict(deliveries(series.seconds, series.labels, delay))
        early = early_label_seconds(spec, delay)
        decode = msgspec.json.Decoder(spec.event_type()).decode
        aggregates = pipeline.state.aggregates
    points = sorted(due)

    def deliver(a: int, b: int) -> None:
        """The labels that fall due in rows [a, b): at a, before the batch."""
        for row in due_events(series, fields, due, points, a, b):
            aggregates.confirm(decode(encode(row)))

    def spans(lo: int, hi: int) -> list[tuple[int, int]]:
        return label_spans(lo, hi, batch_size, due, series.seconds, early)

    if pipeline.state.needs_history:
        # A daemon that ran through the training period holds its per-entity state (aggregates,
        # windows, entity thresholds): rebuild it from the training rows as the daemon's restore
        # does (replay=True: no alerts, global threshold untouched), so the test part does not
        # start from empty state. Training rows' labels arrive as they would have.
        for a, b in spans(0, n0):
            deliver(a, b)
            pipeline.process(batch(a, b), replay=True)
    reloads = reloads or {}
    bounds = [n0, *sorted(r for r in reloads if n0 < r < series.n), series.n]
    for a, b in [ab for lo, hi in pairwise(bounds) for ab in spans(lo, hi)]:
        swapped = reloads.get(a)
        if swapped is not None:
            pipeline = swapped
            if pipeline.state.needs_history:
                for lo, hi in _spans(max(0, a - restore_rows), a, batch_size, ()):
                    pipeline.process(batch(lo, hi), replay=True)
        deliver(a, b)
        messages = batch(a, b)
        result = pipeline.process(messages)
        run.dead_letters += len(result.dead_letters)
        # The rows scored: dead letters and held-back rows (a window not full yet) have none.
        kept = np.array([msg.offset - n0 for msg in result.scored], dtype=int)
        if smoothed:
            assert run.raw_scores is not None
            run.raw_scores[kept] = result.scores
            run.scores[kept] = pipeline.threshold.last_smoothed
            if run.z is not None:
                run.z[kept] = pipeline.threshold.last_z
        else:
            run.scores[kept] = result.scores
        if run.beyond is not None and result.beyond_range is not None:
            run.beyond[kept] = result.beyond_range
        if np.isfinite(result.threshold):
            run.thresholds[a - n0 : b - n0] = result.threshold
        for alert in result.alerts:
            run.flags[alert.source.offset - n0] = True
            ratio = alert.score / alert.threshold if alert.threshold > 0 else float("inf")
            item = (ratio, alert.source.offset, alert)
            if len(heap) < top:
                heapq.heappush(heap, item)
            elif item[:2] > heap[0][:2]:
                heapq.heapreplace(heap, item)
    run.top_alerts = [(r, topic, al) for r, _, al in sorted(heap, key=lambda t: -t[0])]
    return run


def _settings(config: EvalConfig, detector: DetectorSettings, bundle_path: Path) -> Settings:
    return Settings(
        kafka=KafkaSettings(
            input_topic="eval-events", alert_topic="eval-alerts", dead_letter_topic="eval-dlq"
        ),
        model=ModelSettings(bundle=str(bundle_path)),
        features=config.features,
        threshold=detector.threshold,
        smoothing=detector.smoothing,
        alerts=AlertSettings(top_features=3),
        training=config.training,
    )


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or "series"


def evaluate(
    config: EvalConfig, out_dir: Path, broker: str | None = None
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Train, replay, score. Returns (result for JSON, in-memory arrays for the report).
    With `broker` (host:port), also replay the primary detector through Kafka and the real
    daemon (`training.broker_check`) and compare the alerts: `result["broker_check"]`."""
    from streamer import bundle as bundles
    from streamer.app import build_pipeline
    from training.fit import fit_bundle

    started = time.monotonic()
    timings: dict[str, float] = {}
    out_dir.mkdir(parents=True, exist_ok=True)
    t = time.monotonic()
    series_list = load(config.data)
    timings["load_seconds"] = time.monotonic() - t
    spec = config.features
    fields = event_fields(spec)
    log.info("%s: %d series from %s", config.name, len(series_list), config.data.path)

    # Features of every row once: training histories for our model and both baselines' input.
    t = time.monotonic()
    delay = config.replay.label_delay_seconds
    feats = [features(spec, s, 0, s.n, delay) for s in series_list]
    for s, h in zip(series_list, feats, strict=True):
        if h.rejected:
            raise ValueError(f"{s.name}: {h.rejected} row(s) do not decode with the feature spec")
    timings["features_seconds"] = time.monotonic() - t

    # Our model: a bundle per series, or one for all training parts.
    t = time.monotonic()
    bundle_of: dict[str, Any] = {}
    groups = (
        [(s.name, [i]) for i, s in enumerate(series_list)]
        if config.model_scope == "series"
        else [("shared", list(range(len(series_list))))]
    )
    for key, members in groups:
        hist = History(
            np.concatenate([feats[i].features[: series_list[i].n_train] for i in members]),
            np.concatenate([feats[i].event_seconds[: series_list[i].n_train] for i in members]),
            0,
            [k for i in members for k in feats[i].keys[: series_list[i].n_train]],
        )
        registry = out_dir / "bundles" / _safe(key)
        fitted = fit_bundle(spec, hist, config.training, registry, source=f"{config.name}:{key}")
        loaded = bundles.load(registry, expected_spec=spec)  # verified, as the daemon does
        scorer = loaded.load_scorer()
        for i in members:
            bundle_of[series_list[i].name] = (loaded, scorer)
        log.info("bundle %s for %s (%d training rows)", fitted.version, key, len(hist.features))
    timings["train_seconds"] = time.monotonic() - t

    # Periodic retraining (replay.retrain_every_rows): every bundle a series' replay will swap
    # in, fitted up front; each sees only rows before the test row it starts at.
    retrained: dict[str, list[tuple[int, Any, Any]]] = {s.name: [] for s in series_list}
    if config.replay.retrain_every_rows is not None:
        t = time.monotonic()
        for s, h in zip(series_list, feats, strict=True):
            retrained[s.name] = _retrain(config, s, h, out_dir / "bundles" / _safe(s.name))
        timings["retrains"] = sum(len(v) for v in retrained.values())
        timings["retrain_seconds"] = time.monotonic() - t

    runs: dict[str, list[Run]] = {}
    kinds: dict[str, str] = {}
    t = time.monotonic()
    for det in config.detectors:
        runs[det.name], kinds[det.name] = [], "ours"
        for s in series_list:
            b, scorer = bundle_of[s.name]
            settings = _settings(config, det, b.path)
            pipeline = build_pipeline(settings, b, scorer)  # smoothed as the daemon would
            reloads = {
                row: build_pipeline(_settings(config, det, rb.path), rb, rscorer)
                for row, rb, rscorer in retrained[s.name]
            }
            runs[det.name].append(
                replay(
                    pipeline,
                    s,
                    fields,
                    config.replay.batch_size,
                    config.report.top_alerts,
                    delay,
                    reloads,
                    settings.state.restore_events,
                )
            )
        log.info("replayed %s over %d series", det.name, len(series_list))
    timings["replay_seconds"] = time.monotonic() - t
    broker_result = None
    if broker is not None:
        t = time.monotonic()
        broker_result = _broker_check(config, series_list, bundle_of, runs, broker, out_dir)
        timings["broker_check_seconds"] = time.monotonic() - t

    t = time.monotonic()
    bspec = config.baselines.features
    bfeats = feats if bspec is None else [features(bspec, s, 0, s.n) for s in series_list]
    _baselines(config, series_list, bfeats, runs, kinds)
    timings["baseline_seconds"] = time.monotonic() - t

    detectors = {
        name: summarize(config, series_list, rs) | {"kind": kinds[name]}
        for name, rs in runs.items()
    }
    levels = config.metrics.nab_cv_levels
    pooled: list[tuple[str, dict[str, np.ndarray]]] = []
    folds = nab_folds(series_list)
    for name, det in zip([d.name for d in config.detectors], config.detectors, strict=True):
        detectors[name]["settings"] = msgspec.to_builtins(det)
        if levels and det.smoothing and det.smoothing.likelihood:
            raw, windows = nab_level_raw(levels, det.smoothing, series_list, runs[name])
            detectors[name]["nab_cv"] = nab_cv([str(q) for q in levels], raw, windows, folds)
            pooled.append((name, raw))
    selection = None
    if config.metrics.nab_cv_detectors and pooled:
        # The detector and its level chosen together, held out: every (detector, level) pair
        # is a setting, and each fold is scored at the pair that is best on the other.
        pairs = [f"{name} @ {q}" for name, _ in pooled for q in levels]
        raw = {p.name: np.hstack([r[p.name] for _, r in pooled]) for p in nab.PROFILES}
        selection = nab_cv(pairs, raw, windows, folds)
    timings["total_seconds"] = time.monotonic() - started
    top = sorted(
        (a for r in runs[config.detectors[0].name] for a in r.top_alerts), key=lambda x: -x[0]
    )[: config.report.top_alerts]
    result = {
        "name": config.name,
        "description": config.description,
        "protocol": config.protocol,
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "config": msgspec.to_builtins(config),
        "data": _data_summary(series_list),
        "detectors": detectors,
        "top_alerts": [
            {"series": sname, "ratio": ratio} | msgspec.to_builtins(alert)
            for ratio, sname, alert in top
        ],
        "published": msgspec.to_builtins(config.published),
        **({"nab_cv_selection": selection} if selection is not None else {}),
        **({"broker_check": broker_result} if broker_result is not None else {}),
        "timings": {k: round(v, 2) for k, v in timings.items()},
    }
    return result, {"series": series_list, "runs": runs}


def _broker_check(
    config: EvalConfig,
    series_list: list[Series],
    bundle_of: dict[str, Any],
    runs: dict[str, list[Run]],
    bootstrap: str,
    out_dir: Path,
) -> dict[str, Any]:
    """The primary detector's test parts through Kafka and the daemon, compared per row."""
    from streamer.app import build_pipeline
    from training import broker_check

    started = time.monotonic()
    det = config.detectors[0]
    fields = event_fields(config.features)
    checks = []
    for s, run in zip(series_list, runs[det.name], strict=True):
        b, scorer = bundle_of[s.name]
        settings = _settings(config, det, b.path)
        # Per-entity history: the in-process replay rebuilt it from the training rows; the
        # daemon restores it from the same rows, produced ahead of the test part.
        history = (
            row_messages(s, fields, 0, s.n_train)
            if build_pipeline(settings, b, scorer).state.needs_history
            else None
        )
        # Delivered labels: the ones the in-process replay delivered, as feedback messages.
        feedback = None
        if config.features.labeled:
            delay = label_delay(config.features, config.replay.label_delay_seconds)
            feedback = broker_check.feedback_plan(
                s, config.features, fields, delay, config.replay.batch_size
            )
        scores = {int(k): float(run.scores[k]) for k in np.flatnonzero(run.flags)}
        check = broker_check.run_series(
            bootstrap,
            settings,
            s.name,
            row_messages(s, fields, s.n_train, s.n),
            config.replay.batch_size,
            run.flags,
            scores,
            out_dir / "broker",
            timeout_seconds=120.0 + (s.n - (s.n_train if history is None else 0)) / 50.0,
            history=history,
            feedback=feedback,
        )
        log.info(
            "broker check %s: %d rows, alerts in-process %d, through Kafka %d%s",
            s.name, check.rows, len(check.in_process), len(check.broker),
            "" if check.identical else " (DIFFERENT)",
        )  # fmt: skip
        checks.append(check)
    return broker_check.summary(det.name, checks, time.monotonic() - started)


def retrain_seed(seed: int, k: int) -> int:
    """The training seed of a series' k-th retrain (k >= 1), fixed by `training.seed`.

    >>> retrain_seed(0, 1) == retrain_seed(0, 1) != retrain_seed(0, 2)
    True
    """
    return int(np.random.SeedSequence([seed, k]).generate_state(1)[0])


def _retrain(
    config: EvalConfig, s: Series, history: History, registry: Path
) -> list[tuple[int, Any, Any]]:
    """Fit, load and verify the bundles that take over before test rows n_train + k * every
    (k >= 1, while a row is left to score): each on the `retrain_history_rows` rows before
    its start row, as `training fit` on recent history, into the series' registry (its
    `current` moves on, as in production). Returns (start row, bundle, scorer) in order."""
    from streamer import bundle as bundles
    from training.fit import fit_bundle

    every, keep = config.replay.retrain_every_rows, config.replay.retrain_history_rows
    assert every is not None
    out = []
    for k, row in enumerate(range(s.n_train + every, s.n, every), 1):
        lo = 0 if keep is None else max(0, row - keep)
        recent = History(
            history.features[lo:row], history.event_seconds[lo:row], 0, history.keys[lo:row]
        )
        training = msgspec.structs.replace(
            config.training, seed=retrain_seed(config.training.seed, k)
        )
        source = f"{config.name}:{s.name}:retrain {k}"
        fit_bundle(config.features, recent, training, registry, source=source)
        loaded = bundles.load(registry, expected_spec=config.features)  # as the daemon reloads
        out.append((row, loaded, loaded.load_scorer()))
        log.info("%s: bundle %s from row %d (rows %d-%d)", s.name, loaded.version, row, lo, row)
    return out


def _baselines(
    config: EvalConfig,
    series_list: list[Series],
    feats: list[History],
    runs: dict[str, list[Run]],
    kinds: dict[str, str],
) -> None:
    bs = config.baselines
    if bs.b1:
        name = f"B1 p{bs.b1_quantile * 100:g}"
        runs[name], kinds[name] = [], "baseline"
        if config.model_scope == "shared":
            x_train = np.concatenate(
                [h.features[: s.n_train] for s, h in zip(series_list, feats, strict=True)]
            )
            x_test = np.concatenate(
                [h.features[s.n_train :] for s, h in zip(series_list, feats, strict=True)]
            )
            res = b1(x_train, x_test, config.training, bs)
            offsets = np.cumsum([0] + [s.n - s.n_train for s in series_list])
            for k in range(len(series_list)):
                a, z = offsets[k], offsets[k + 1]
                runs[name].append(
                    Run(res.scores[a:z], res.flags[a:z], np.full(z - a, res.threshold))
                )
        else:
            for s, h in zip(series_list, feats, strict=True):
                res = b1(h.features[: s.n_train], h.features[s.n_train :], config.training, bs)
                runs[name].append(
                    Run(res.scores, res.flags, np.full(res.scores.size, res.threshold))
                )
        log.info("baseline %s done", name)
    if bs.b2:
        name = f"B2 z>{bs.b2_z:g}"
        runs[name], kinds[name] = [], "baseline"
        for s, h in zip(series_list, feats, strict=True):
            res = b2(h.features, s.n_train, bs)
            runs[name].append(Run(res.scores, res.flags, np.full(res.scores.size, res.threshold)))
    if bs.all_rows:
        name = "alert on every row"
        runs[name], kinds[name] = [], "reference"
        for s in series_list:
            m = s.n - s.n_train
            runs[name].append(Run(np.ones(m), np.ones(m, dtype=bool), np.zeros(m)))


def _data_summary(series_list: list[Series]) -> dict[str, Any]:
    test_rows = sum(s.n - s.n_train for s in series_list)
    anomalous = sum(int(s.labels[s.n_train :].sum()) for s in series_list)
    return {
        "series": len(series_list),
        "rows": sum(s.n for s in series_list),
        "train_rows": sum(s.n_train for s in series_list),
        "test_rows": test_rows,
        "anomalous_test_rows": anomalous,
        "anomalous_test_share": anomalous / test_rows if test_rows else 0.0,
        "anomalous_train_rows": sum(int(s.labels[: s.n_train].sum()) for s in series_list),
    }


# -- scoring -----------------------------------------------------------------------------------


def windows_in_test(s: Series) -> list[tuple[int, int]] | None:
    """Labeled windows that reach into the test part, as test-row spans (None: label runs)."""
    if s.windows is None:
        return None
    out = []
    for left, right in s.windows:
        if right >= s.n_train:
            out.append((max(left, s.n_train) - s.n_train, right - s.n_train))
    return out


def summarize(config: EvalConfig, series_list: list[Series], rs: list[Run]) -> dict[str, Any]:
    """Point, event, NAB and rate metrics pooled over all series, plus per series and group."""
    point, events = PointCounts(), EventCounts()
    groups: dict[str, PointCounts] = {}
    per_series = []
    nab_raw = dict.fromkeys((p.name for p in nab.PROFILES), 0.0)
    nab_windows = 0
    nab_counts = {"tp": 0, "fp": 0, "fn": 0}
    alerts, test_seconds = 0, 0.0
    for s, r in zip(series_list, rs, strict=True):
        y = s.labels[s.n_train :]
        sec = s.seconds[s.n_train :]
        pc = point_counts(y, r.flags)
        ec = event_counts(y, r.flags, sec, windows_in_test(s))
        point, events = point + pc, events + ec
        groups[s.group] = groups.get(s.group, PointCounts()) + pc
        alerts += int(r.flags.sum())
        if sec.size > 1:
            test_seconds += float(sec[-1] - sec[0])
        row: dict[str, Any] = {
            "series": s.name,
            "group": s.group,
            "test_rows": int(y.size),
            "anomalous": int(y.sum()),
            "alerts": int(r.flags.sum()),
            "precision": pc.precision,
            "recall": pc.recall,
            "f1": pc.f1,
            "far": pc.far,
            "events": ec.events,
            "events_detected": ec.detected,
            "event_precision": ec.precision,
            "event_f1": ec.f1,
        }
        if config.metrics.nab:
            flags_full = np.zeros(s.n, dtype=bool)
            flags_full[s.n_train :] = r.flags
            windows = nab_file_windows(s)
            for p in nab.PROFILES:
                fs = nab.score_file(flags_full, windows, p)
                nab_raw[p.name] += fs.raw
                if p is nab.STANDARD:
                    nab_windows += fs.windows
                    nab_counts["tp"] += fs.true_positives
                    nab_counts["fp"] += fs.false_positives
                    nab_counts["fn"] += fs.false_negatives
                    row["nab_raw_standard"] = fs.raw
        per_series.append(row)
    out: dict[str, Any] = {
        "point": point.summary(),
        "event": events.summary(),
        "alerts": alerts,
        "test_days": test_seconds / 86400.0,
        "alerts_per_day": alerts / (test_seconds / 86400.0) if test_seconds else None,
        "dead_letters": sum(r.dead_letters for r in rs),
        "groups": {g: c.summary() for g, c in sorted(groups.items())},
        "series": per_series,
    }
    if config.metrics.held_out_groups:
        held = PointCounts()
        for g in config.metrics.held_out_groups:
            held = held + groups.get(g, PointCounts())
        out["held_out"] = {"groups": config.metrics.held_out_groups} | held.summary()
    if config.metrics.nab:
        out["nab"] = (
            {p.name: nab.normalised(nab_raw[p.name], nab_windows, p) for p in nab.PROFILES}
            | {"windows": nab_windows, "raw": nab_raw}
            | nab_counts
        )
    if config.metrics.alert_rate is not None:
        y = np.concatenate([s.labels[s.n_train :] for s in series_list])
        sc = np.concatenate([r.scores for r in rs])
        sc = np.where(np.isfinite(sc), sc, -np.inf)
        classes = None
        if all(s.classes is not None for s in series_list):
            classes = np.concatenate([s.classes[s.n_train :] for s in series_list])  # type: ignore[index]
        out["rate"] = {
            "alert_rate": config.metrics.alert_rate,
            "average_precision": average_precision(y, sc),
        } | recall_at_rate(y, sc, config.metrics.alert_rate, classes)
        if classes is not None:
            for c in sorted(set(classes[y.astype(bool)].tolist())):
                member = classes == c
                # Events of one class in the detector's own alerts (not rank-based).
                out["rate"][f"alert_recall_class_{c}"] = float(
                    np.concatenate([r.flags for r in rs])[member & y.astype(bool)].mean()
                )
    return out


def nab_file_windows(s: Series) -> list[nab.Window]:
    """A series' labeled windows, or its runs of anomalous rows where it has none."""
    return [nab.Window(a, b) for a, b in (s.windows or _label_runs(s.labels))]


def nab_folds(series_list: list[Series]) -> np.ndarray:
    """Two folds of files: alternate files in name order."""
    files = sorted(range(len(series_list)), key=lambda i: series_list[i].name)
    folds = np.empty(len(series_list), dtype=int)
    folds[files] = np.arange(len(files)) % 2
    return folds


def nab_level_raw(
    levels: list[float], smoothing: SmoothingSettings, series_list: list[Series], rs: list[Run]
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Raw NAB score of each file at each level, per profile ([file, level]), and each file's
    scored windows. The alerts at a level are recomputed from the rows' z: the likelihood rule
    learns every score, so its window does not depend on what it alerted; rows beyond the
    range so far (threshold.range_tolerance) alert at every level, as in the pipeline."""
    z_levels = [NormalDist().inv_cdf(q) for q in levels]
    raw = {p.name: np.zeros((len(series_list), len(levels))) for p in nab.PROFILES}
    windows = np.zeros(len(series_list), dtype=int)
    for f, (s, r) in enumerate(zip(series_list, rs, strict=True)):
        assert r.z is not None
        file_windows = nab_file_windows(s)
        for k, zl in enumerate(z_levels):
            flags = np.zeros(s.n, dtype=bool)
            above = r.z > zl
            if smoothing.rearm_z is not None:
                above = latch(above, r.z <= smoothing.rearm_z)
            flags[s.n_train :] = shape(above, smoothing)[0]
            if r.beyond is not None:
                flags[s.n_train :] |= r.beyond
            for p in nab.PROFILES:
                fs = nab.score_file(flags, file_windows, p)
                raw[p.name][f, k] = fs.raw
                windows[f] = fs.windows
    return raw, windows


def nab_cv(
    settings: list[str], raw: dict[str, np.ndarray], windows: np.ndarray, folds: np.ndarray
) -> dict[str, Any]:
    """Held out: each fold of files scored at the setting (of `settings`, the columns of
    `raw`) that is best on the other fold; also every setting's score on all files."""
    out: dict[str, Any] = {"folds": 2, "settings": settings}
    for p in nab.PROFILES:
        cv = nab.cross_validated(raw[p.name], windows, folds, p)
        by_setting = [nab.normalised(float(t), int(windows.sum()), p) for t in raw[p.name].sum(0)]
        out[p.name] = {
            "score": cv.score,
            "chosen": [settings[k] for k in cv.chosen],
            "in_sample_score": cv.in_sample_score,
            "in_sample": settings[cv.in_sample_setting],
            "by_setting": by_setting,
        }
    return out


def _label_runs(labels: np.ndarray) -> list[tuple[int, int]]:
    from training.quality import runs

    return runs(labels.astype(bool))


# -- command line ------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="training evaluate",
        description="Train on a labeled data set's training part, replay its test part "
        "through the daemon's pipeline, and write result.json and report.html.",
    )
    parser.add_argument("--config", required=True, type=Path, help="eval config (TOML)")
    parser.add_argument("--out", type=Path, help="output directory (default runs/eval/<name>)")
    parser.add_argument("--data", help="override data.path (where the data set is)")
    parser.add_argument("--max-series", type=int, help="first N series only (a quick look)")
    parser.add_argument("--no-report", action="store_true", help="write result.json only")
    parser.add_argument(
        "--seed", type=int, help="override training.seed (our model and B1): a run per seed "
        "shows how much a result owes to one initialisation",
    )  # fmt: skip
    parser.add_argument(
        "--broker", metavar="HOST:PORT", help="also replay the first detector's test parts "
        "through this Kafka broker and the real daemon, and compare the alerts (exit 1 when "
        "they differ)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    logging.getLogger("kafka").setLevel(logging.WARNING)  # --broker: the client's chatter
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    try:
        config = load_config(args.config)
    except EvalConfigError as exc:
        print(f"training.evaluate: config error: {exc}", file=sys.stderr)
        return 2
    data_changes: dict[str, Any] = {}
    if args.data:
        data_changes["path"] = args.data
    if args.max_series:
        data_changes["max_series"] = args.max_series
    if data_changes:
        config = msgspec.structs.replace(
            config, data=msgspec.structs.replace(config.data, **data_changes)
        )
    if args.seed is not None:
        config = msgspec.structs.replace(
            config, training=msgspec.structs.replace(config.training, seed=args.seed)
        )
    if args.broker:
        from training.broker_check import refusal

        why = refusal(config)
        if why is not None:
            print(f"training.evaluate: --broker refused: {why}", file=sys.stderr)
            return 2
    out_dir = args.out or Path("runs") / "eval" / config.name
    try:
        result, arrays = evaluate(config, out_dir, broker=args.broker)
    except (FileNotFoundError, ValueError) as exc:
        print(f"training.evaluate: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:
        from training.broker_check import BrokerCheckError

        if not isinstance(exc, BrokerCheckError):
            raise
        print(f"training.evaluate: --broker: {exc}", file=sys.stderr)
        return 2
    (out_dir / "result.json").write_bytes(msgspec.json.format(msgspec.json.encode(result)))
    save_arrays(arrays, out_dir / "series.npz")
    if not args.no_report:
        from training.report import write_report

        write_report(result, arrays, config, out_dir / "report.html")
    print(headline(result))
    print(f"wrote {out_dir / 'result.json'}" + ("" if args.no_report else " and report.html"))
    if "broker_check" in result:
        from training.broker_check import headline as broker_headline

        print(broker_headline(result["broker_check"]))
        return 0 if result["broker_check"]["identical"] else 1
    return 0


def save_arrays(arrays: dict[str, Any], path: Path) -> None:
    """Per-row labels, scores, thresholds and alerts of every detector, for later analysis."""
    out: dict[str, np.ndarray] = {}
    for k, s in enumerate(arrays["series"]):
        out[f"{k}/labels"] = s.labels[s.n_train :]
        out[f"{k}/seconds"] = s.seconds[s.n_train :]
        for d, rs in enumerate(arrays["runs"].values()):
            r = rs[k]
            out[f"{k}/{d}/scores"] = r.scores
            out[f"{k}/{d}/flags"] = r.flags
            out[f"{k}/{d}/thresholds"] = r.thresholds
            if r.raw_scores is not None:
                out[f"{k}/{d}/raw_scores"] = r.raw_scores
            if r.z is not None:
                out[f"{k}/{d}/z"] = r.z
            if r.beyond is not None:
                out[f"{k}/{d}/beyond"] = r.beyond
    names = np.array([s.name for s in arrays["series"]])
    detectors = np.array(list(arrays["runs"]))
    out["series"], out["detectors"] = names, detectors
    np.savez_compressed(path, **out)  # type: ignore[arg-type]


def headline(result: dict[str, Any]) -> str:
    """One line per detector: the numbers a reader looks for first."""
    lines = [f"{result['name']}: {result['data']['test_rows']} test rows, "
             f"{result['data']['anomalous_test_share']:.1%} anomalous"]  # fmt: skip
    for name, d in result["detectors"].items():
        p, e = d["point"], d["event"]
        text = (
            f"  {name:28s} P {p['precision']:.3f} R {p['recall']:.3f} F1 {p['f1']:.3f} "
            f"FAR {100 * p['far']:.2f}% MAR {100 * p['mar']:.2f}% | events {e['detected']}/"
            f"{e['events']} event-P {e['precision']:.3f}"
        )
        if "nab" in d:
            n = d["nab"]
            text += (
                f" | NAB {n['standard']:.1f} / {n['reward_low_FP_rate']:.1f} / "
                f"{n['reward_low_FN_rate']:.1f}"
            )
        if "nab_cv" in d:
            cv = [d["nab_cv"][prof.name]["score"] for prof in nab.PROFILES]
            text += " | level held out: NAB " + " / ".join(f"{v:.1f}" for v in cv)
        if "held_out" in d:
            h = d["held_out"]
            text += f" | held-out F1 {h['f1']:.3f} FAR {100 * h['far']:.2f}%"
        if "rate" in d:
            r = d["rate"]
            text += f" | AP {r['average_precision']:.3f} R@{r['alert_rate']:g} {r['recall']:.3f}"
        lines.append(text)
    if "nab_cv_selection" in result:
        sel = result["nab_cv_selection"]
        scores = " / ".join(f"{sel[prof.name]['score']:.1f}" for prof in nab.PROFILES)
        lines.append(f"  detector and level held out: NAB {scores} (standard: "
                     f"{' | '.join(sel['standard']['chosen'])})")  # fmt: skip
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
