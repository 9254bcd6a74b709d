"""Read training history from JSON-lines files, through the daemon's own decoder and features."""

from __future__ import annotations

import logging
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
import numpy as np

from streamer.aggregates import AggregateState
from streamer.features import FeatureSpec, LabelRate, build_features, event_seconds
from streamer.labels import deliveries

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class History:
    features: np.ndarray  # (n, d) unscaled, in file order
    event_seconds: np.ndarray  # (n,) event time of each row
    rejected: int  # lines that did not decode or gave non-finite features
    # The entity of each row (`spec.entity_field`), aligned with `features`: what windowed
    # models group rows by. Empty where a caller did not collect them (dense models only).
    keys: list[Hashable] = field(default_factory=list)


def read_jsonl(spec: FeatureSpec, path: Path) -> History:
    """Decode every line with the spec's event type; bad lines are counted and skipped."""
    decoder = msgspec.json.Decoder(spec.event_type())
    events = []
    rejected = 0
    with path.open("rb") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                events.append(decoder.decode(line))
            except (msgspec.DecodeError, UnicodeDecodeError) as exc:
                rejected += 1
                if rejected <= 5:
                    log.warning("%s:%d skipped: %s", path.name, number, exc)
    history = from_events(spec, events)
    rejected += history.rejected
    if rejected:
        log.warning("%s: %d line(s) skipped in all", path.name, rejected)
    return History(history.features, history.event_seconds, rejected, history.keys)


def from_events(
    spec: FeatureSpec,
    events: Sequence[Any],
    labels: np.ndarray | None = None,
    label_delay_seconds: float | None = None,
) -> History:
    """Decoded events, in stream order, -> features as the daemon builds them.

    Per-entity aggregates run over the events in the order given (the daemon's order is the
    partition's), with no entity cap: training sees every entity's full history. A spec with
    label_rate columns needs `labels` (0/1 per event): each positive one reaches the state
    `label_delay_seconds` (default: `label_delay(spec)`) after its event's time, as the
    evaluator delivers them and as investigators' confirmations reach the daemon.
    """
    state = AggregateState(spec, max_entities=max(1, len(events))) if spec.stateful else None
    seconds = np.array([event_seconds(spec, getattr(e, spec.time_field)) for e in events])
    if spec.labeled:
        assert state is not None
        if labels is None:
            by = sorted({spec.key_of(c) for c in spec.columns if isinstance(c, LabelRate)})
            raise ValueError(
                f"feature spec {spec.profile!r} has label_rate columns (keyed by "
                f"{', '.join(by)}): training needs each event's 0/1 label "
                "(an eval config's data.label_column)"
            )
        if len(labels) != len(events):
            raise ValueError(f"{len(labels)} labels for {len(events)} events")
        delay = label_delay(spec, label_delay_seconds)
        parts, start = [], 0
        for i, rows in deliveries(seconds, np.asarray(labels), delay):
            parts.append(build_features(spec, events[start:i], state))
            start = i
            for j in rows.tolist():
                state.confirm(events[j])
        parts.append(build_features(spec, events[start:], state))
        x = np.vstack(parts)
    else:
        x = build_features(spec, events, state)
    keys = [getattr(e, spec.entity_field) for e in events]
    finite = np.isfinite(x).all(axis=1)
    kept = [k for k, ok in zip(keys, finite.tolist(), strict=True) if ok]
    return History(x[finite], seconds[finite], int((~finite).sum()), kept)


def label_delay(spec: FeatureSpec, said: float | None = None) -> float:
    """How long after its event a label becomes known: `said` (`replay.label_delay_seconds`)
    unless None, else the shortest delay of the spec's label_rate columns (every column's
    windows then hold only events whose labels are in)."""
    if said is not None:
        return said
    delays = [c.delay_seconds for c in spec.columns if isinstance(c, LabelRate)]
    if not delays:
        raise ValueError(f"feature spec {spec.profile!r} has no label_rate column")
    return min(delays)
