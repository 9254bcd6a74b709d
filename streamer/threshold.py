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

>>> import numpy as np
>>> t = RollingQuantileThreshold(window_size=100, quantile=0.9, min_samples=10,
...                              warm_start=np.arange(100.0))
>>> round(t.value, 1)
89.1
>>> t.judge(np.array([1.0, 500.0])).tolist()
[False, True]
"""

from __future__ import annotations

import numpy as np


class RollingQuantileThreshold:
    def __init__(
        self,
        window_size: int,
        quantile: float,
        min_samples: int,
        warm_start: np.ndarray | None = None,
    ) -> None:
        if window_size < 1:
            raise ValueError("window_size must be >= 1")
        if not 0.0 < quantile < 1.0:
            raise ValueError("quantile must be in (0, 1)")
        self.window_size = window_size
        self.quantile = quantile
        self.min_samples = min_samples
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

    def judge(self, scores: np.ndarray) -> np.ndarray:
        """Flag scores above the current threshold, then learn from the unflagged ones."""
        flagged = scores > self.value
        learned = np.where(flagged, self.value, scores)
        self._push(learned[np.isfinite(learned)])
        self._refresh()
        return flagged

    def _push(self, scores: np.ndarray) -> None:
        n = scores.size
        if n == 0:
            return
        if n >= self.window_size:
            self._ring[:] = scores[-self.window_size :]
            self._next, self._count = 0, self.window_size
            return
        end = self._next + n
        if end <= self.window_size:
            self._ring[self._next : end] = scores
        else:
            split = self.window_size - self._next
            self._ring[self._next :] = scores[:split]
            self._ring[: n - split] = scores[split:]
        self._next = end % self.window_size
        self._count = min(self.window_size, self._count + n)

    def _refresh(self) -> None:
        if self._count < self.min_samples:
            self.value = float("inf")
            return
        self.value = float(np.quantile(self._ring[: self._count], self.quantile))
