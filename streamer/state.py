"""Everything the daemon keeps per entity, in one place that can be cleared and rebuilt.

Three kinds of keyed state, each present only when the bundle or config needs it:
- `aggregates`: rolling per-entity statistics behind Rolling / SincePrevious features;
- `windows`: the last `window_length` scaled rows of each entity, for a windowed model;
- `thresholds`: a rolling quantile per entity (`threshold.per_entity`), or with `[smoothing]`
  a SmoothedThreshold per entity (streamer/entity_smoothing.py);
- `incidents`: each entity's current run of alerts (`incidents.enabled`).

Each is bounded by `state.max_entities` (least recently seen evicted first, counted by
reason). The state is a function of the events of the partitions this replica owns: when
partitions move it is cleared and rebuilt by re-reading each assigned partition's tail (see
`Detector._restore`), so scoring after a move gives the decisions scoring without it gives.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from streamer.aggregates import AggregateState
from streamer.config import Settings
from streamer.entity_smoothing import EntitySmoothedThresholds
from streamer.features import FeatureSpec
from streamer.incidents import IncidentTracker
from streamer.labels import LabelStore
from streamer.threshold import EntityThresholds
from streamer.windows import WindowBuilder


@dataclass
class EntityState:
    aggregates: AggregateState | None = None
    windows: WindowBuilder | None = None
    thresholds: EntityThresholds | EntitySmoothedThresholds | None = None
    incidents: IncidentTracker | None = None

    @classmethod
    def build(
        cls,
        settings: Settings,
        spec: FeatureSpec,
        window_length: int | None,
        labels: LabelStore | None = None,
        warm_start: np.ndarray | None = None,
    ) -> EntityState:
        """`labels`: the store label feedback goes to (the app's, which outlives pipelines).
        `warm_start`: the bundle's held-out errors, where each entity's smoothed threshold
        starts from (per-entity thresholds with `[smoothing]`)."""
        cap = settings.state.max_entities
        t = settings.threshold
        thresholds: EntityThresholds | EntitySmoothedThresholds | None = None
        if t.per_entity and settings.smoothing is not None:
            thresholds = EntitySmoothedThresholds(
                t.entity_window_size,
                t.quantile,
                t.entity_min_samples,
                cap,
                warm_start,
                settings.smoothing,
            )
            thresholds.learn = t.learn
        elif t.per_entity:
            thresholds = EntityThresholds(
                t.entity_window_size, t.quantile, t.entity_min_samples, cap
            )
            thresholds.learn = t.learn
        return cls(
            aggregates=AggregateState(spec, cap, labels) if spec.stateful else None,
            windows=(
                WindowBuilder(window_length, len(spec.feature_names()), max_entities=cap)
                if window_length
                else None
            ),
            thresholds=thresholds,
            incidents=(
                IncidentTracker(settings.incidents, cap) if settings.incidents.enabled else None
            ),
        )

    @property
    def needs_history(self) -> bool:
        """Whether scores depend on earlier events (and so need a restore after a move)."""
        return (
            self.aggregates is not None
            or self.windows is not None
            or (self.thresholds is not None and self.thresholds.needs_history)
        )

    def clear(self) -> None:
        for part in (self.aggregates, self.windows, self.thresholds, self.incidents):
            if part is not None:
                part.clear()

    def entities(self) -> dict[str, int]:
        """Entities held, by kind of state."""
        out: dict[str, int] = {}
        if self.aggregates is not None:
            out["aggregates"] = self.aggregates.entities
        if self.windows is not None:
            out["windows"] = self.windows.entities
        if self.thresholds is not None:
            out["thresholds"] = self.thresholds.entities
        if self.incidents is not None:
            out["incidents"] = self.incidents.entities
        if self._labels is not None:
            out["labels"] = self._labels.keys
        return out

    def evictions(self) -> dict[tuple[str, str], int]:
        """Entities evicted since start, by (kind of state, reason): running totals."""
        out: dict[tuple[str, str], int] = {}
        if self.aggregates is not None:
            for reason, n in self.aggregates.evictions.items():
                out[("aggregates", reason)] = n
        if self.windows is not None:
            for reason, n in self.windows.evictions.items():
                out[("windows", reason)] = n
        if self.thresholds is not None:
            out[("thresholds", "capacity")] = self.thresholds.evictions
        if self.incidents is not None:
            out[("incidents", "capacity")] = self.incidents.evictions
        if self._labels is not None:
            # The app's store outlives pipelines: its total runs on across reloads.
            out[("labels", "capacity")] = self._labels.evictions
        return out

    @property
    def _labels(self) -> LabelStore | None:
        """The label store, where label_rate columns read it (keys of labeled entities)."""
        if self.aggregates is None or not self.aggregates.labels.key_fields:
            return None
        return self.aggregates.labels
