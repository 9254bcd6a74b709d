"""Rolling-percentile threshold over recent reconstruction errors.

The model, in full:
- a ring buffer holds the last `window_size` scores; an alerted score enters it clipped to
  the threshold it exceeded. Its size never teaches the threshold to accept the next anomaly,
  yet its place in the tail is kept: dropping alerted scores outright would truncate the
  window's tail at every batch and walk the threshold down without end;
- the buffer starts filled from the training bundle's held-out errors (warm start), so the
  detector judges from the first event instead of learning from scratch;
- the threshold is the `quantile` of the buffer, computed once per batch (every score in a
  batch is judged against the same value, and the cost is one partition per batch);
- while the buffer holds fewer than `min_samples` scores nothing is flagged.

A consequence to know: the threshold cannot rise above its current value from live scores.
A lasting upward shift of all scores (new normal behaviour) shows as an alert storm and
calls for retraining, not for the threshold to learn the shift on its own.

With `learn=False` the buffer keeps the warm start and the threshold never moves: decisions
then depend on the model and the event's own history only, not on how the stream was cut
into batches or which replica saw what (reproducible replays; the equality tests use it).

`EntityThresholds` keeps one such buffer per entity and falls back to the global threshold
until an entity has `min_samples` scores of its own.

>>> import numpy as np
>>> t = RollingQuantileThreshold(window_size=100, quantile=0.9, min_samples=10,
...                              warm_start=np.arange(100.0))
>>> round(t.value, 1)
89.1
>>> t.judge(np.array([1.0, 500.0])).tolist()
[False, True]
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable, Sequence

import numpy as np


def ring_push(ring: np.ndarray, next_slot: int, count: int, scores: np.ndarray) -> tuple[int, int]:
    """Write `scores` into the ring buffer `ring` from `next_slot`, the oldest overwritten
    first; returns the new (next slot, count held).

    >>> ring = np.zeros(3)
    >>> ring_push(ring, 2, 2, np.array([7.0, 8.0])), ring.tolist()
    ((1, 3), [8.0, 0.0, 7.0])
    """
    size, n = ring.size, scores.size
    if n == 0:
        return next_slot, count
    if n >= size:
        ring[:] = scores[-size:]
        return 0, size
    end = next_slot + n
    if end <= size:
        ring[next_slot:end] = scores
    else:
        split = size - next_slot
        ring[next_slot:] = scores[:split]
        ring[: n - split] = scores[split:]
    return end % size, min(size, count + n)


def ring_resize(
    ring: np.ndarray, next_slot: int, count: int, size: int
) -> tuple[np.ndarray, int, int]:
    """A ring of `size` holding the most recent of `ring`'s scores; returns (the new ring,
    its next slot, count held).

    >>> ring = np.array([8.0, 6.0, 7.0])  # 6 oldest, 8 newest: the next slot is 1
    >>> new, next_slot, count = ring_resize(ring, 1, 3, 2)
    >>> new.tolist(), next_slot, count
    ([7.0, 8.0], 0, 2)
    """
    held = np.roll(ring[:count], -next_slot if count == ring.size else 0)  # oldest first
    new = np.empty(size, dtype=ring.dtype)
    next_slot, count = ring_push(new, 0, 0, held[-size:])
    return new, next_slot, count


class RollingQuantileThreshold:
    def __init__(
        self,
        window_size: int,
        quantile: float,
        min_samples: int,
        warm_start: np.ndarray | None = None,
        learn: bool = True,
    ) -> None:
        if window_size < 1:
            raise ValueError("window_size must be >= 1")
        if not 0.0 < quantile < 1.0:
            raise ValueError("quantile must be in (0, 1)")
        self.window_size = window_size
        self.quantile = quantile
        self.min_samples = min_samples
        self.learn = learn
        self._ring = np.empty(window_size, dtype=np.float64)
        self._count = 0  # scores held, at most window_size
        self._next = 0  # ring slot the next score goes to
        self.value = float("inf")
        if warm_start is not None and warm_start.size:
            self._push(np.asarray(warm_start, dtype=np.float64)[-window_size:])
        self._refresh()

    @property
    def count(self) -> int:
        return self._count

    def reconfigure(self, quantile: float | None = None, window_size: int | None = None) -> None:
        """Change the quantile and/or window at runtime, keeping the most recent scores."""
        if quantile is not None:
            if not 0.0 < quantile < 1.0:
                raise ValueError("quantile must be in (0, 1)")
            self.quantile = quantile
        if window_size is not None and window_size != self.window_size:
            if window_size < 1:
                raise ValueError("window_size must be >= 1")
            self._ring, self._next, self._count = ring_resize(
                self._ring, self._next, self._count, window_size
            )
            self.window_size = window_size
        self._refresh()

    def judge(self, scores: np.ndarray) -> np.ndarray:
        """Flag scores above the current threshold, then learn from the unflagged ones."""
        flagged = scores > self.value
        if self.learn:
            self.observe(np.where(flagged, self.value, scores))
        return flagged

    def observe(self, scores: np.ndarray) -> None:
        """Add scores to the window (already clipped by the caller where they alerted)."""
        self._push(scores[np.isfinite(scores)])
        self._refresh()

    def _push(self, scores: np.ndarray) -> None:
        self._next, self._count = ring_push(self._ring, self._next, self._count, scores)

    def _refresh(self) -> None:
        if self._count < self.min_samples:
            self.value = float("inf")
            return
        self.value = float(np.quantile(self._ring[: self._count], self.quantile))


class EntityThresholds:
    """A rolling quantile per entity, over that entity's own recent scores.

    An entity is judged against its own threshold once it has `min_samples` scores, and
    against the global value until then. Like the global threshold, an alerted score is
    learned clipped to the threshold it exceeded. At most `max_entities` rings are kept
    (least recently scored evicted first; each costs `window_size` * 8 bytes).

    >>> t = EntityThresholds(window_size=50, quantile=0.9, min_samples=5, max_entities=10)
    >>> for _ in range(3):
    ...     _ = t.judge(["a"] * 5, np.arange(5.0), global_value=100.0)
    >>> flagged, used = t.judge(["a", "b"], np.array([10.0, 10.0]), global_value=100.0)
    >>> flagged.tolist(), used.round(1).tolist()
    ([True, False], [3.6, 100.0])
    """

    def __init__(
        self, window_size: int, quantile: float, min_samples: int, max_entities: int
    ) -> None:
        if window_size < 1 or min_samples < 1 or max_entities < 1:
            raise ValueError("entity threshold window, min_samples and max_entities must be >= 1")
        self.window_size = window_size
        self.quantile = quantile
        self.min_samples = min_samples
        self.max_entities = max_entities
        self.learn = True
        self.evictions = 0
        self._rings: OrderedDict[Hashable, RollingQuantileThreshold] = OrderedDict()

    @property
    def entities(self) -> int:
        return len(self._rings)

    @property
    def needs_history(self) -> bool:
        """Whether decisions depend on earlier scores (restored by replay after a move)."""
        return self.learn

    def clear(self) -> None:
        self._rings.clear()

    def judge(
        self, keys: Sequence[Hashable], scores: np.ndarray, global_value: float
    ) -> tuple[np.ndarray, np.ndarray]:
        """Flag each score against its entity's threshold (or the global one), then learn.

        Returns the flags and the threshold each score was judged against.
        """
        groups: dict[Hashable, list[int]] = {}
        for i, key in enumerate(keys):
            groups.setdefault(key, []).append(i)
        flagged = np.zeros(len(keys), dtype=bool)
        used = np.empty(len(keys), dtype=np.float64)
        for key, rows in groups.items():
            ring = self._ring(key)
            own = ring.value  # inf until the entity has min_samples scores
            value = own if np.isfinite(own) else global_value
            s = scores[rows]
            hit = s > value
            flagged[rows] = hit
            used[rows] = value
            if self.learn:
                ring.observe(np.where(hit, value, s))
        return flagged, used

    def _ring(self, key: Hashable) -> RollingQuantileThreshold:
        ring = self._rings.get(key)
        if ring is None:
            ring = RollingQuantileThreshold(self.window_size, self.quantile, self.min_samples)
            self._rings[key] = ring
            if len(self._rings) > self.max_entities:
                self._rings.popitem(last=False)
                self.evictions += 1
        else:
            self._rings.move_to_end(key)
        return ring
