"""A feature beyond the range seen so far alerts, whatever its score (optional).

Numenta's NAB detector reports a "spatial anomaly" next to its anomaly likelihood: a value
more than 5% of the range seen so far beyond that range (Numenta: "the human labelling bias
for spatial values larger than what has been seen so far"). `RangeGuard` is that rule over
each scaled feature: a row is beyond range when one of its features lies more than
`tolerance` x (high - low) below `low` or above `high`, where [low, high] is the feature's
range over the training rows (the bundle's warm start) and every live row before it. Then
the range takes the row in, so the next row must go further still: a series that drifts
upwards alerts once per step of `tolerance` x range, not on every row.

A reconstruction error cannot say this: the likelihood judges a score against recent scores,
and a value just past anything seen scores much like one just inside. A row-wise model is
also why the rule is per feature: a breakout of one sensor of many is diluted in the mean
error.

The state is one range per pipeline (per replica), whatever the entities: "never seen on this
feed". It is learned from live rows as they come and starts again from the bundle's range at
a reload. A feature that has held one value only (high == low) is never beyond range, as in
Numenta's rule. Only the features in `checked` are judged (the daemon: the spec's
standardized ones): one-hot and hour-of-day columns are bounded by construction, and an
hour the history did not cover (a file whose training part spans less than a day) is not
a value beyond anything.

>>> import numpy as np
>>> g = RangeGuard(np.array([0.0]), np.array([10.0]), tolerance=0.05)
>>> g.check(np.array([[10.4], [11.0], [11.2], [-1.0]])).tolist()
[False, True, False, True]
>>> g.low.tolist(), g.high.tolist()
([-1.0], [11.2])
"""

from __future__ import annotations

import numpy as np


class RangeGuard:
    def __init__(
        self,
        low: np.ndarray | None,
        high: np.ndarray | None,
        tolerance: float,
        checked: np.ndarray | None = None,
    ) -> None:
        if tolerance < 0.0:
            raise ValueError("threshold.range_tolerance must be >= 0")
        self.tolerance = tolerance
        self.checked = None if checked is None else np.asarray(checked, dtype=bool)  # None: all
        # No training range (a bundle written before it): the first live rows set it.
        self.low = None if low is None else np.asarray(low, dtype=np.float64).copy()
        self.high = None if high is None else np.asarray(high, dtype=np.float64).copy()

    def check(self, x: np.ndarray) -> np.ndarray:
        """Which rows of `x` (n, d) are beyond the range before them; the range learns them."""
        x = np.asarray(x, dtype=np.float64)
        if x.shape[0] == 0:
            return np.zeros(0, dtype=bool)
        if self.low is None or self.high is None:
            self.low, self.high = x[0].copy(), x[0].copy()
        # Row i is judged against the range of the rows before it: a running min and max
        # over (start, x[0], ..., x[i - 1]).
        lows = np.minimum.accumulate(np.vstack([self.low[None, :], x]), axis=0)
        highs = np.maximum.accumulate(np.vstack([self.high[None, :], x]), axis=0)
        low, high = lows[:-1], highs[:-1]
        margin = self.tolerance * (high - low)
        beyond = ((x > high + margin) | (x < low - margin)) & (high > low)
        if self.checked is not None:
            beyond &= self.checked
        self.low, self.high = lows[-1], highs[-1]
        return np.asarray(beyond.any(axis=1))


def training_range(*parts: np.ndarray) -> tuple[list[float], list[float]]:
    """Each feature's min and max over scaled training rows, given as one or more (n, d)
    arrays (a split's parts, without joining them): the guard's start."""
    low = np.min([np.asarray(p, dtype=np.float64).min(axis=0) for p in parts], axis=0)
    high = np.max([np.asarray(p, dtype=np.float64).max(axis=0) for p in parts], axis=0)
    return low.tolist(), high.tolist()
