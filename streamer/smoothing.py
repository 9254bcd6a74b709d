"""Score smoothing and alert shaping around the rolling-quantile threshold (optional).

`SmoothedThreshold` is a drop-in `RollingQuantileThreshold` for one stream of scores:
- EWMA: each score is replaced by `alpha * score + (1 - alpha) * previous`, so one noisy
  row does not alert and a lasting rise does. The warm start (held-out errors of single
  rows) is kept unsmoothed: the threshold starts at what one normal row rarely exceeds,
  which a smoothed normal score exceeds even more rarely. (Smoothing the held-out errors
  would not help: they are a random subset of rows, not consecutive ones);
- `frozen`: the threshold keeps its warm-start value and never learns from live scores (a
  long anomaly cannot teach it anything, and normal drift cannot lower it either). A warm
  start of fewer than `min_samples` scores (a short training period) is first topped up
  with live scores, then frozen: otherwise the threshold would stay inf and never alert;
- `margin`: a row alerts only when its score is also above `margin` times the warm-start
  threshold (the quantile of the held-out errors). With ~100 held-out errors the high
  quantiles are all about their maximum, a noisy estimate of a rare tail; a margin asks
  for a clear excess over anything seen in training rather than a higher quantile that the
  warm start cannot resolve. 0 (the default) is no gate. A learning threshold never rises
  above its warm-start value, so with it any margin >= 1 acts as frozen at margin x start;
- `min_consecutive`: a row alerts only when it is the n-th row in a row above threshold;
- `once_per_run`: a run of rows above threshold alerts once, on its `min_consecutive`-th row,
  however long it lasts (NuPIC reports only the first of consecutive red rows). Without it
  every row of a run alerts, unless in a cooldown;
- `rearm_z` (with `likelihood` and `once_per_run`): a run ends only when a row's z falls to
  `rearm_z` or below, not as soon as it dips under the threshold's z. A smoothed score
  that hovers about the threshold after an incident would otherwise start a new run, and an
  alert, at every crossing (flapping); 0 asks for the score to be back at the window's mean
  before the next incident can alert. None (the default): the threshold's z itself;
- `cooldown_rows`: after an alert, the next `cooldown_rows` rows do not alert (one alert per
  incident where a consumer pays per alert, as NAB's scoring does);
- `mean_rows`: each score is replaced by the mean of the last `mean_rows` scores (a moving
  average, as Numenta's anomaly likelihood takes over 10 rows); exclusive with EWMA;
- `likelihood`: the Gaussian tail rule of Numenta's anomaly likelihood (Ahmad et al. 2017)
  instead of the quantile. The window's (smoothed) scores are fitted with a normal
  distribution and a row alerts when its likelihood Phi((s - mean) / std) is at least
  `likelihood` (NuPIC recommends 0.99999), so the threshold is mean + z * std. A tail
  quantile of a few thousand scores is decided by its few largest ones; a mean and a std
  use every score, so the threshold is steady and a long window (NuPIC: 8640 rows) adapts
  it to a series' own noise. Every score is learned as it is, as NuPIC does: one incident
  barely moves a long window's mean, and a level that lasts becomes the new normal. Only
  the upper tail alerts (NuPIC's is two-sided): a reconstruction error below its usual
  level means a row more typical than usual, not less (`two_sided` alerts on both tails, as
  NuPIC does: a series that suddenly goes flat can reconstruct better than usual).
  `threshold.quantile` is unused. The warm start (held-out errors of single rows) enters the
  window as it is, although the rule judges smoothed scores with a smaller spread: it keeps
  the threshold high while few live scores are in. Shrinking it to the spread of smoothed
  independent rows was tried on NAB and raised false positives (docs/QUALITY.md);
- `median_cap`: each raw score counts at most `median_cap` times the median of the last
  `window_size` raw scores (the warm start's included; every raw score is learned as it is)
  before it is smoothed. One spike of a spiky feed, hundreds of times the usual error, then
  moves the smoothed score no more than a few clearly bad rows, while a lasting rise still
  alerts, and its size is left to `threshold.range_tolerance`. Unlike a fixed cap
  (`training.error_cap`), it follows the feed's own error level: a model that fits the live
  feed worse than its training part does not sit at the cap. The warm start is capped by
  its own median; a batch is capped by the median before it. `median_cap_floor`: the cap
  is never below this (a model that rebuilds its feed almost exactly has a median error
  near 0, and a cap of a multiple of it would hold every row that matters);
- `learn_in_cooldown`: the cooldown rows enter the (learning) threshold's window as they
  are, not clipped. The incident has been reported; if what follows it lasts a whole
  cooldown it is taken as the new normal, so the threshold can rise to a new level of the
  scores (a shifted or drifted series) instead of alerting once per cooldown for ever. The
  price: after a large incident the threshold stays higher for a while (its window).

The state (EWMA level, run length, cooldown) is one per instance: in a stream that
interleaves entities it has to be one instance per entity, which the daemon keeps with
`threshold.per_entity = true` (streamer/entity_smoothing.py; otherwise its `[smoothing]` is
one state per replica: for single-source feeds); the evaluator runs one pipeline per series.

>>> import numpy as np
>>> warm = np.linspace(0.0, 4.0, 100)        # held-out errors; smoothing starts at their median
>>> t = SmoothedThreshold(100, 0.99, 10, warm, SmoothingSettings(ewma_alpha=0.5))
>>> round(t.value, 2)
3.96
>>> t.judge(np.array([2.0, 8.0, 2.0, 2.0])).tolist()   # one spike alerts once, smoothed
[False, True, False, False]
>>> t.last_smoothed.tolist()
[2.0, 5.0, 3.5, 2.75]
"""

from __future__ import annotations

import math
from bisect import bisect_left
from statistics import NormalDist

import msgspec
import numpy as np

from streamer.threshold import RollingQuantileThreshold, ring_push, ring_resize


class SmoothingSettings(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    ewma_alpha: float = 1.0  # weight of the newest score; 1.0 = no smoothing
    frozen: bool = False  # True: the threshold never learns from live scores
    margin: float = 0.0  # > 0: also require score > margin * warm-start threshold
    min_consecutive: int = 1
    once_per_run: bool = False  # a run above threshold alerts once
    cooldown_rows: int = 0
    learn_in_cooldown: bool = False  # cooldown rows are learned unclipped (a new level)
    mean_rows: int = 1  # moving average over this many scores; 1 = none
    likelihood: float = 0.0  # > 0: Gaussian tail rule, alert when Phi(z) >= this
    two_sided: bool = False  # likelihood: also alert on scores far below the mean
    rearm_z: float | None = None  # likelihood + once_per_run: a run ends at z <= this
    median_cap: float | None = None  # a raw score counts at most this x the window's median
    median_cap_floor: float = 0.0  # ... and never less than this

    def __post_init__(self) -> None:
        if not 0.0 < self.ewma_alpha <= 1.0:
            raise ValueError("smoothing.ewma_alpha must be in (0, 1]")
        if not self.margin >= 0.0:
            raise ValueError("smoothing.margin must be >= 0")
        if self.min_consecutive < 1:
            raise ValueError("smoothing.min_consecutive must be >= 1")
        if self.cooldown_rows < 0:
            raise ValueError("smoothing.cooldown_rows must be >= 0")
        if self.learn_in_cooldown and (self.frozen or self.cooldown_rows == 0):
            raise ValueError("smoothing.learn_in_cooldown needs cooldown_rows > 0, not frozen")
        if self.mean_rows < 1:
            raise ValueError("smoothing.mean_rows must be >= 1")
        if self.mean_rows > 1 and self.ewma_alpha < 1.0:
            raise ValueError("smoothing.mean_rows and smoothing.ewma_alpha: choose one smoother")
        if not (self.likelihood == 0.0 or 0.5 < self.likelihood < 1.0):
            raise ValueError("smoothing.likelihood must be 0 (off) or in (0.5, 1)")
        if self.two_sided and (not self.likelihood or self.margin):
            raise ValueError("smoothing.two_sided needs smoothing.likelihood, and no margin")
        if self.median_cap is not None and not self.median_cap >= 1.0:
            raise ValueError("smoothing.median_cap must be >= 1")
        if self.median_cap_floor and not (self.median_cap and self.median_cap_floor > 0):
            raise ValueError("smoothing.median_cap_floor needs median_cap, and must be > 0")
        if self.rearm_z is not None and not (self.likelihood and self.once_per_run):
            raise ValueError("smoothing.rearm_z needs smoothing.likelihood and once_per_run")
        if self.likelihood and self.learn_in_cooldown:
            raise ValueError(
                "smoothing.learn_in_cooldown: with smoothing.likelihood every score is learned"
            )


# A flat window (a constant series) would make any rise infinitely unlikely: the std used is
# at least this share of the mean.
MIN_RELATIVE_STD = 1e-3


def ewma(scores: np.ndarray, alpha: float, level: float | None = None) -> np.ndarray:
    """Exponentially weighted moving average; starts from `level` (or the first score).

    The same numbers as the per-row recurrence (`ewma_loop`) to rounding, without a Python
    loop per row: `decay_scan` of `alpha * scores`.

    >>> ewma(np.array([2.0, 4.0, 4.0]), 0.5).tolist()
    [2.0, 3.0, 3.5]
    """
    x = np.array(scores, dtype=np.float64)
    if alpha == 1.0 or x.size == 0:  # no smoothing
        return x
    if level is None:  # the first score is its own average, as in the loop
        level = float(x[0])
        return np.concatenate([x[:1], decay_scan(alpha * x[1:], 1.0 - alpha, level)])
    return decay_scan(alpha * x, 1.0 - alpha, level)


def ewma_loop(scores: np.ndarray, alpha: float, level: float | None = None) -> np.ndarray:
    """`ewma` one row at a time: the reference its tests and bench/smoothing.py compare with.

    >>> ewma_loop(np.array([2.0, 4.0, 4.0]), 0.5).tolist()
    [2.0, 3.0, 3.5]
    """
    if alpha == 1.0:
        return np.array(scores, dtype=np.float64)
    out = np.empty(scores.size, dtype=np.float64)
    current = level
    for i, s in enumerate(np.asarray(scores, dtype=np.float64)):
        current = s if current is None else alpha * s + (1.0 - alpha) * current
        out[i] = current
    return out


# decay_scan's blocks: decay ** -t grows to at most 2 ** GROWTH_BITS within a block.
GROWTH_BITS = 200


def decay_scan(values: np.ndarray, decay: float, start: float) -> np.ndarray:
    """y[t] = decay * y[t - 1] + values[t], from y[-1] = `start`, for 0 < decay < 1.

    In closed form, block by block: within a block of B rows, y[t] = decay ** t *
    (decay * start + cumsum(values[j] * decay ** -j)[t]), one cumsum for all blocks (one row
    of a 2-D array each); then a loop over the blocks, not the rows, carries each block's
    last value into the next. The rounding error is that of the recurrence (about eps /
    (1 - decay) relative to the average of |values|): the scaled terms grow by at most
    2 ** GROWTH_BITS within a block, which moves the exponent, not the relative error, and
    keeps them far from overflow.

    >>> decay_scan(np.array([1.0, 1.0, 1.0]), 0.5, 4.0).tolist()
    [3.0, 2.5, 2.25]
    """
    n = values.size
    if n == 0:
        return np.empty(0)
    finite = values[np.isfinite(values)]
    if finite.size and float(np.abs(finite).max()) > 2.0 ** (900 - GROWTH_BITS):
        return _decay_loop(values, decay, start)  # scaled terms could overflow
    block = min(n, max(1, int(GROWTH_BITS * math.log(2.0) / -math.log(decay))))
    blocks = -(-n // block)
    t = np.arange(block)
    grown = np.zeros(blocks * block)
    grown[:n] = values
    grown = grown.reshape(blocks, block) * decay**-t
    # Each block from 0: local[b, t] = sum over j <= t of decay ** (t - j) * values[b, j].
    local = np.cumsum(grown, axis=1) * decay**t
    carry, after = [start], decay**block
    for end in local[:-1, -1].tolist():
        carry.append(after * carry[-1] + end)
    local += np.multiply.outer(np.array(carry), decay ** (t + 1))
    return local.reshape(-1)[:n]


def _decay_loop(values: np.ndarray, decay: float, start: float) -> np.ndarray:
    out = np.empty(values.size)
    current = start
    for i, v in enumerate(values.tolist()):
        current = v + decay * current
        out[i] = current
    return out


def moving_mean(scores: np.ndarray, rows: int, previous: np.ndarray) -> np.ndarray:
    """Mean of each score and the `rows - 1` before it (`previous`: the scores before these).

    >>> moving_mean(np.array([3.0, 6.0, 9.0]), 2, np.array([1.0])).tolist()
    [2.0, 4.5, 7.5]
    """
    joined = np.concatenate([previous[-(rows - 1) :], scores])  # rows > 1
    sums = np.cumsum(np.concatenate([[0.0], joined]))
    ends = np.arange(joined.size - scores.size, joined.size) + 1
    starts = np.maximum(ends - rows, 0)
    return (sums[ends] - sums[starts]) / (ends - starts)


class SmoothedThreshold(RollingQuantileThreshold):
    def __init__(
        self,
        window_size: int,
        quantile: float,
        min_samples: int,
        warm_start: np.ndarray | None,
        settings: SmoothingSettings,
    ) -> None:
        self.settings = settings
        # median_cap: the last window_size raw scores, a ring as the threshold's own window.
        self._raw = np.empty(window_size if settings.median_cap else 0)
        self._raw_count = self._raw_next = 0
        if settings.median_cap and warm_start is not None and warm_start.size:
            held = np.asarray(warm_start, dtype=np.float64)[-window_size:]
            self._learn_raw(held)
            warm_start = np.minimum(held, self._cap(held))
        self._z = NormalDist().inv_cdf(settings.likelihood) if settings.likelihood else 0.0
        self._recent = np.empty(0)  # the last mean_rows - 1 raw scores
        self._mean, self._std = 0.0, 1.0  # the likelihood's normal fit (set by _refresh)
        self._level: float | None = None
        if warm_start is not None and warm_start.size:
            # Start live smoothing from a typical normal level, not from one held-out row.
            self._level = float(np.median(warm_start))
        super().__init__(window_size, quantile, min_samples, warm_start)
        # The gate of `margin`, fixed at start: relative to what training saw, never to live
        # scores (which a long anomaly or drift would move).
        # Taken from the warm start itself, also when it holds fewer than min_samples scores
        # (then the threshold is inf until live scores fill it, and the floor still applies).
        self.floor = 0.0
        if settings.margin > 0:
            if warm_start is None or not warm_start.size:
                raise ValueError("smoothing.margin needs a warm start")
            self.floor = settings.margin * float(np.quantile(warm_start, quantile))
        self._run = 0  # consecutive rows above threshold so far
        self._quiet = 0  # cooldown rows left
        self.last_smoothed = np.empty(0)
        # With `likelihood`: each judged row's z = (score - mean) / std against the window it
        # was judged by (-inf while the window is short). Without a margin, alerts at another
        # level are `shape(last_z > z_level)`, since learning does not depend on alerts.
        self.last_z = np.empty(0)

    def judge(self, scores: np.ndarray) -> np.ndarray:
        """Smooth, compare with the threshold (learning unless frozen), then shape alerts."""
        s = self.settings
        scores = np.asarray(scores, dtype=np.float64)
        # Frozen: compare only, so nothing live moves the threshold once it has min_samples.
        learning = self.learn and (not s.frozen or self.count < self.min_samples)
        if s.median_cap:  # capped by the median of the raw scores before this batch
            raw = scores
            if self._raw_count:
                scores = np.minimum(raw, self._cap(self._raw[: self._raw_count]))
            if learning:
                self._learn_raw(raw[np.isfinite(raw)])
        if s.mean_rows > 1:
            smoothed = moving_mean(scores, s.mean_rows, self._recent)
            self._recent = np.concatenate([self._recent, scores])[-(s.mean_rows - 1) :]
        else:
            smoothed = ewma(scores, s.ewma_alpha, self._level)
        if smoothed.size:
            self._level = float(smoothed[-1])
        self.last_smoothed = smoothed
        value = self.value
        above = smoothed > value
        if s.likelihood and np.isfinite(value):
            self.last_z = (smoothed - self._mean) / self._std
            if s.two_sided:
                self.last_z = np.abs(self.last_z)
                above = self.last_z > self._z
        elif s.likelihood:  # fewer than min_samples scores: nothing alerts at any level
            self.last_z = np.full(smoothed.size, -np.inf)
        if s.rearm_z is not None:  # a run goes on until z is back to rearm_z
            above = latch(above, self.last_z <= s.rearm_z, self._run > 0)
        flags, cooling = self._shape(above & (smoothed > self.floor) if s.margin else above)
        if learning and s.likelihood:
            self.observe(smoothed)
        elif learning:
            # As RollingQuantileThreshold.judge: a score above the threshold is learned clipped
            # to it, except in a cooldown with learn_in_cooldown (learned as it is).
            clip = above & ~cooling if s.learn_in_cooldown else above
            self.observe(np.where(clip, value, smoothed))
        return flags

    def reconfigure(self, quantile: float | None = None, window_size: int | None = None) -> None:
        """As the rolling threshold's; median_cap's window of raw scores follows the size."""
        super().reconfigure(quantile, window_size)
        if self.settings.median_cap and self._raw.size != self.window_size:
            self._raw, self._raw_next, self._raw_count = ring_resize(
                self._raw, self._raw_next, self._raw_count, self.window_size
            )

    def _cap(self, held: np.ndarray) -> float:
        s = self.settings
        assert s.median_cap is not None
        return max(s.median_cap * float(np.median(held)), s.median_cap_floor)

    def _learn_raw(self, raw: np.ndarray) -> None:
        """Push raw scores into median_cap's window (a ring, as the threshold's own)."""
        self._raw_next, self._raw_count = ring_push(self._raw, self._raw_next, self._raw_count, raw)

    def _refresh(self) -> None:
        if not self.settings.likelihood:
            super()._refresh()
            return
        if self.count < self.min_samples:
            self.value = math.inf
            return
        held = self._ring[: self.count]
        self._mean = float(held.mean())
        self._std = max(float(held.std()), MIN_RELATIVE_STD * abs(self._mean), 1e-12)
        self.value = self._mean + self._z * self._std

    def _shape(self, above: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Alerts after min_consecutive and cooldown; also which rows were in a cooldown."""
        flags, cooling, self._run, self._quiet = shape(above, self.settings, self._run, self._quiet)
        return flags, cooling


def latch(up: np.ndarray, down: np.ndarray, on: bool = False) -> np.ndarray:
    """A latch per row: on where `up`, off where `down` (and not `up`), else as the row before
    (`on`: the state before the first row). `rearm_z`'s runs: up = above the threshold, down =
    z back to rearm_z.

    >>> latch(np.array([0, 1, 0, 0, 0, 1], bool), np.array([0, 0, 0, 1, 0, 0], bool)).tolist()
    [False, True, True, False, False, True]
    >>> latch(np.zeros(2, bool), np.array([0, 1], bool), on=True).tolist()
    [True, False]
    """
    rows = np.arange(up.size)
    last_up = np.maximum.accumulate(np.where(up, rows, -1))
    last_down = np.maximum.accumulate(np.where(down & ~up, rows, -1))
    out = last_up > last_down
    if on:  # rows before any up or down keep the carried state
        out |= (last_up < 0) & (last_down < 0)
    return out


def shape(
    above: np.ndarray, settings: SmoothingSettings, run: int = 0, quiet: int = 0
) -> tuple[np.ndarray, np.ndarray, int, int]:
    """Rows above threshold -> alerts, by `min_consecutive`, `once_per_run` and
    `cooldown_rows`. `run` (rows above so far) and `quiet` (cooldown rows left) carry the
    state between batches; returns (alerts, rows in a cooldown, run, quiet).

    The same as the per-row loop (`shape_loop`), with a Python loop over alerts only: each
    row's run length comes from the last row not above; a row may alert at the
    `min_consecutive`-th row of its run (or any later one, without `once_per_run`); the
    first such row at or after the end of the cooldown alerts and starts the next one.

    >>> above = np.array([1, 1, 1, 1, 0, 1], dtype=bool)
    >>> shape(above, SmoothingSettings(min_consecutive=2, cooldown_rows=1))[0].tolist()
    [False, True, False, True, False, False]
    >>> shape(above, SmoothingSettings(once_per_run=True))[0].tolist()
    [True, False, False, False, False, True]
    """
    need, rest, once = settings.min_consecutive, settings.cooldown_rows, settings.once_per_run
    n = above.size
    cooling = np.zeros(n, dtype=bool)
    if need == 1 and rest == 0 and not once:
        return above, cooling, run, quiet
    if n == 0:
        return np.zeros(0, dtype=bool), cooling, run, quiet
    up = np.asarray(above, dtype=bool)
    rows = np.arange(n)
    last_below = np.maximum.accumulate(np.where(up, -1, rows))
    runs = np.where(up, rows - last_below + np.where(last_below < 0, run, 0), 0)
    may = runs == need if once else runs >= need
    out = np.zeros(n, dtype=bool)
    if rest == 0:  # only a carried cooldown to sit out
        out[quiet:] = may[quiet:]
        cooling[:quiet] = True
        return out, cooling, int(runs[-1]), max(0, quiet - n)
    candidates = np.flatnonzero(may).tolist()
    alerts: list[int] = []
    free = quiet  # the first row after the cooldown
    k = bisect_left(candidates, free)
    while k < len(candidates):
        alerts.append(candidates[k])
        free = candidates[k] + 1 + rest
        k = bisect_left(candidates, free, k + 1)
    starts = np.array(alerts, dtype=np.intp) + 1  # each alert's cooldown: [start, start + rest)
    out[starts - 1] = True
    edges = np.zeros(n + 1, dtype=np.intp)  # +1 where a cooldown starts, -1 where it ends
    if quiet:
        edges[0], edges[min(quiet, n)] = 1, -1
    edges[starts] += 1  # no two cooldowns start or end on the same row
    edges[np.minimum(starts + rest, n)] -= 1
    cooling = np.cumsum(edges[:n]) > 0
    return out, cooling, int(runs[-1]), max(0, free - n)


def shape_loop(
    above: np.ndarray, settings: SmoothingSettings, run: int = 0, quiet: int = 0
) -> tuple[np.ndarray, np.ndarray, int, int]:
    """`shape` one row at a time: the reference its tests and bench/smoothing.py compare with.

    >>> above = np.array([1, 1, 1, 1, 0, 1], dtype=bool)
    >>> shape_loop(above, SmoothingSettings(min_consecutive=2, cooldown_rows=1))[0].tolist()
    [False, True, False, True, False, False]
    """
    need, rest, once = settings.min_consecutive, settings.cooldown_rows, settings.once_per_run
    cooling = np.zeros(above.size, dtype=bool)
    if need == 1 and rest == 0 and not once:
        return above, cooling, run, quiet
    out = np.zeros(above.size, dtype=bool)
    for i, up in enumerate(above.tolist()):
        run = run + 1 if up else 0
        if quiet > 0:
            quiet -= 1
            cooling[i] = True
            continue
        if run == need or (run > need and not once):
            out[i] = True
            quiet = rest
    return out, cooling, run, quiet
