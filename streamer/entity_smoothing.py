"""Per-entity smoothing: one `SmoothedThreshold` per entity (`[smoothing]` together with
`threshold.per_entity = true`).

A topic that interleaves many entities (sensors, servers, customers keyed by id) cannot share
one smoothing state: one entity's spike would start a cooldown that silences all the others,
and the EWMA would average different entities' scores together. Here each entity has its own
`SmoothedThreshold`, so its EWMA level (or moving mean), run length, cooldown and window are
those of its own scores only, and it alerts exactly as a separate `SmoothedThreshold` fed
only that entity's scores would, batch by batch (every option of `SmoothingSettings`).

- Window: `threshold.entity_window_size` scores per entity (8 bytes each) and
  `threshold.entity_min_samples`, not the global window: with the default 200 scores an
  entity holds about 2.6 KB (`bytes_per_entity`; an EntityThresholds ring, about 2.0 KB).
- A new entity starts from the bundle's warm start, as the global threshold does: from its
  first event it is judged by the quantile (or normal fit) of the last `entity_window_size`
  held-out errors, its EWMA starts at their median (all of them) and its `margin` gate is
  `margin` x their quantile; then its own scores replace the warm start in its window, one
  by one. (EntityThresholds, with no smoothing, starts an entity with an empty ring and lends
  it the global value until it has `entity_min_samples` scores. A smoothed threshold is
  defined against its warm start: `frozen` keeps it, `margin` is relative to it, the EWMA
  starts from it; and the global threshold judges raw scores, on another scale than a
  smoothed score or the likelihood rule. Starting each entity from the warm start keeps
  every option's meaning, per entity.) A bundle with fewer held-out errors than
  `entity_min_samples` leaves a new entity silent until it has that many scores of its own,
  as a SmoothedThreshold is.
- At most `max_entities` entities (least recently scored evicted first), as EntityThresholds.
- `judge` groups a batch's rows by entity once, then makes one SmoothedThreshold call per
  entity of the batch (a threshold refresh each, as EntityThresholds makes).

>>> warm = np.linspace(0.0, 4.0, 100)
>>> t = EntitySmoothedThresholds(100, 0.99, 10, 1000, warm, SmoothingSettings(cooldown_rows=2))
>>> flags, used = t.judge(["a", "b", "a", "b", "a"], np.array([9.0, 9.0, 9.0, 1.0, 9.0]))
>>> flags.tolist()   # "a" cools down for 2 of its own rows, "b" alerts regardless
[True, True, False, False, False]
>>> used.round(2).tolist()
[3.96, 3.96, 3.96, 3.96, 3.96]
>>> t.entities
2
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from collections.abc import Hashable, Sequence

import numpy as np

from streamer.smoothing import SmoothedThreshold, SmoothingSettings


class EntitySmoothedThresholds:
    """A SmoothedThreshold per entity, bounded LRU; the interface of EntityThresholds."""

    def __init__(
        self,
        window_size: int,
        quantile: float,
        min_samples: int,
        max_entities: int,
        warm_start: np.ndarray | None,
        settings: SmoothingSettings,
    ) -> None:
        if window_size < 1 or min_samples < 1 or max_entities < 1:
            raise ValueError("entity threshold window, min_samples and max_entities must be >= 1")
        self.window_size = window_size
        self.quantile = quantile
        self.min_samples = min_samples
        self.max_entities = max_entities
        self.settings = settings
        self.evictions = 0
        # What a new entity starts as (warm start pushed, EWMA level and margin gate set):
        # copied (its arrays too), so the warm start's median and quantiles are computed once,
        # not per entity.
        self._template = SmoothedThreshold(window_size, quantile, min_samples, warm_start, settings)
        self._entities: OrderedDict[Hashable, SmoothedThreshold] = OrderedDict()
        # Each row of the last judge() call: its smoothed score (the one compared) and, with
        # `likelihood`, its z against its entity's window; in the rows' order.
        self.last_smoothed = np.empty(0)
        self.last_z = np.empty(0)

    @property
    def learn(self) -> bool:
        return self._template.learn

    @learn.setter
    def learn(self, value: bool) -> None:
        self._template.learn = value
        for t in self._entities.values():
            t.learn = value

    @property
    def entities(self) -> int:
        return len(self._entities)

    @property
    def needs_history(self) -> bool:
        """Whether decisions depend on an entity's earlier scores (restored by replay)."""
        s = self.settings
        return (
            self.learn
            or s.ewma_alpha < 1.0
            or s.mean_rows > 1
            or s.min_consecutive > 1
            or s.once_per_run
            or s.cooldown_rows > 0
        )

    @property
    def bytes_per_entity(self) -> int:
        """About what one entity holds: its window plus the SmoothedThreshold around it."""
        rings = 2 if self.settings.median_cap else 1  # median_cap keeps the raw scores too
        window = self.window_size * 8 * rings
        return window + ENTITY_OVERHEAD_BYTES + 8 * max(0, self.settings.mean_rows - 1)

    def clear(self) -> None:
        self._entities.clear()

    def get(self, key: Hashable) -> SmoothedThreshold | None:
        """The entity's threshold, if held (not counted as a use)."""
        return self._entities.get(key)

    def judge(
        self, keys: Sequence[Hashable], scores: np.ndarray, global_value: float | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Judge each entity's rows with its own SmoothedThreshold (learning as it does).

        Returns the flags and, per row, the bar its smoothed score had to clear: the entity's
        threshold value, or its `margin` gate where that is higher. `global_value` is unused
        (an entity starts from the warm start instead); it keeps EntityThresholds' signature.
        """
        n = len(keys)
        scores = np.asarray(scores, dtype=np.float64)
        flagged = np.zeros(n, dtype=bool)
        used = np.empty(n, dtype=np.float64)
        smoothed = np.empty(n, dtype=np.float64)
        z = np.full(n, -np.inf) if self.settings.likelihood else np.empty(0)
        if n == 0:
            self.last_smoothed, self.last_z = smoothed, z
            return flagged, used
        # Group once: a code per row (first appearance order), then rows sorted by code.
        index: dict[Hashable, int] = {}
        codes = np.fromiter((index.setdefault(k, len(index)) for k in keys), dtype=np.intp, count=n)
        order = np.argsort(codes, kind="stable")
        ends = np.cumsum(np.bincount(codes, minlength=len(index))).tolist()
        start = 0
        for key, end in zip(index, ends, strict=True):
            rows = order[start:end]
            start = end
            t = self._threshold(key)
            bar = max(t.value, t.floor)
            flagged[rows] = t.judge(scores[rows])
            smoothed[rows] = t.last_smoothed
            used[rows] = bar
            if self.settings.likelihood:
                z[rows] = t.last_z
        self.last_smoothed, self.last_z = smoothed, z
        return flagged, used

    def _threshold(self, key: Hashable) -> SmoothedThreshold:
        t = self._entities.get(key)
        if t is None:
            t = copy.copy(self._template)
            for name, value in vars(t).items():  # its arrays (the window) of its own
                if isinstance(value, np.ndarray):
                    setattr(t, name, value.copy())
            self._entities[key] = t
            if len(self._entities) > self.max_entities:
                self._entities.popitem(last=False)
                self.evictions += 1
        else:
            self._entities.move_to_end(key)
        return t


# A SmoothedThreshold's own size besides its window: its attributes, the small arrays it keeps
# (last batch's smoothed scores, mean_rows' recent scores), the LRU's entry and a short key.
# Measured with tracemalloc: about 950 bytes (an EntityThresholds ring's is about 400);
# tests/unit/test_entity_smoothing.py checks that the estimate holds.
ENTITY_OVERHEAD_BYTES = 1000
