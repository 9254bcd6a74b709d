"""Distribution drift: the training distribution of each feature and of the score, and the
population stability index (PSI) of live data against it. Pure numpy; no Kafka, no Keras.

Training stores a `DriftReference` in the bundle (`drift.json`): per scaled feature and for
the score, a `Histogram` whose bins are the reference's deciles. The daemon feeds each batch
to a `DriftMonitor`, which counts the last `window` values per bin and compares them with
the reference:

    PSI = sum_i (a_i - e_i) * ln(a_i / e_i)

over the bins i, with e_i the reference (expected) share of bin i and a_i the live (actual)
share, both clamped below at `EPSILON` so that an empty bin adds a large but finite term.
The usual reading: PSI < 0.1 stable, 0.1 to 0.25 a moderate shift, > 0.25 a significant
shift (the live data no longer looks like what the model was trained on).

>>> ref = reference_histogram(np.arange(1000.0))
>>> len(ref.edges), len(ref.proportions)
(9, 10)
>>> round(psi(ref, np.full(10, 100)), 6)
0.0
"""

from __future__ import annotations

import math

import msgspec
import numpy as np

# Floor for a bin's share: an empty bin would make ln(a / e) infinite. 1e-4 is the common
# choice; a live share of 5% in a bin the reference never saw then adds about 0.3.
EPSILON = 1e-4
DECILES = tuple(q / 10 for q in range(1, 10))
STABLE, SHIFTED = 0.1, 0.25  # the usual reading of PSI (see the module docstring)


class Histogram(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Bins of one variable and the reference's share of each.

    `edges` are the inner edges, increasing; the first and last bins are open (-inf and
    +inf are implied: JSON has no infinity). Bin i holds the values x with
    edges[i-1] < x <= edges[i], so there are len(edges) + 1 bins.
    """

    edges: list[float]
    proportions: list[float]

    def __post_init__(self) -> None:
        if len(self.proportions) != len(self.edges) + 1:
            raise ValueError(
                f"a histogram with {len(self.edges)} inner edges has {len(self.edges) + 1} "
                f"bins, not {len(self.proportions)}"
            )
        if not all(math.isfinite(e) for e in self.edges) or any(
            b <= a for a, b in zip(self.edges, self.edges[1:], strict=False)
        ):
            raise ValueError("histogram edges must be finite and strictly increasing")
        if any(not p >= 0.0 for p in self.proportions) or not math.isclose(
            sum(self.proportions), 1.0, abs_tol=1e-6
        ):
            raise ValueError("histogram proportions must be >= 0 and sum to 1")


class DriftReference(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """What training saw: a histogram per scaled feature (by feature name, in the spec's
    order) and one of the held-out scores. `drift.json` in a bundle."""

    features: dict[str, Histogram]
    score: Histogram


def reference_histogram(values: np.ndarray) -> Histogram:
    """Decile bins of `values` and their shares. Edges are observed values (no
    interpolation between them) and ties collapse, so a discrete feature (one-hot: 0 or 1)
    gets a few bins that split at its values rather than many empty ones."""
    v = np.asarray(values, dtype=np.float64).ravel()
    v = v[np.isfinite(v)]
    if v.size == 0:
        raise ValueError("a reference histogram needs at least one finite value")
    edges = np.unique(np.quantile(v, DECILES, method="inverted_cdf"))
    counts = np.bincount(np.searchsorted(edges, v, side="left"), minlength=edges.size + 1)
    return Histogram([float(e) for e in edges], (counts / v.size).tolist())


def build_reference(
    feature_names: list[str], rows: np.ndarray, scores: np.ndarray
) -> DriftReference:
    """The reference of a model: `rows` (n, d) are scaled training rows, `scores` the
    held-out scores (one per event for a dense model, one per window for an LSTM)."""
    if rows.ndim != 2 or rows.shape[1] != len(feature_names):
        raise ValueError(f"rows of shape {rows.shape} do not match {len(feature_names)} features")
    return DriftReference(
        {name: reference_histogram(rows[:, j]) for j, name in enumerate(feature_names)},
        reference_histogram(scores),
    )


def psi(reference: Histogram, counts: np.ndarray) -> float:
    """Population stability index of live `counts` per bin against the reference's shares;
    NaN when no value was counted (nothing to compare yet)."""
    c = np.asarray(counts, dtype=np.float64)
    if c.shape != (len(reference.proportions),):
        raise ValueError(f"{c.shape[0]} counts for {len(reference.proportions)} bins")
    total = c.sum()
    if total <= 0:
        return math.nan
    a = np.maximum(c / total, EPSILON)
    e = np.maximum(np.asarray(reference.proportions), EPSILON)
    return float(np.sum((a - e) * np.log(a / e)))


class _BinRing:
    """The bin index of each of the last `window` values of `c` columns, and the counts per
    column and bin over them, kept up to date as values come and go."""

    def __init__(self, histograms: list[Histogram], window: int) -> None:
        self.edges = [np.asarray(h.edges) for h in histograms]
        self.n_bins = max(len(h.proportions) for h in histograms)
        self.window = window
        # Bin indices fit a byte: decile bins are at most 10 per column.
        self.ring = np.zeros((window, len(histograms)), dtype=np.uint8)
        self.counts = np.zeros((len(histograms), self.n_bins), dtype=np.int64)
        self.pos = 0  # the next slot to write
        self.filled = 0

    def push(self, values: np.ndarray) -> None:
        """Count `values` (k, c); older values beyond the window are uncounted."""
        values = values[-self.window :]  # only the newest `window` can stay
        k = values.shape[0]
        if k == 0:
            return
        idx = np.empty(values.shape, dtype=np.uint8)
        for j, edges in enumerate(self.edges):
            idx[:, j] = np.searchsorted(edges, values[:, j], side="left")
        slots = (self.pos + np.arange(k)) % self.window
        evicted = max(0, self.filled + k - self.window)
        if evicted:
            # The last `evicted` slots written to hold values (the oldest ones); the first
            # k - evicted are free while the ring is not yet full.
            old = self.ring[slots[k - evicted :]]
            self.counts -= self._count(old)
        self.ring[slots] = idx
        self.counts += self._count(idx)
        self.pos = (self.pos + k) % self.window
        self.filled = min(self.window, self.filled + k)

    def _count(self, idx: np.ndarray) -> np.ndarray:
        c = idx.shape[1]
        flat = np.arange(c) * self.n_bins + idx.astype(np.int64)
        return np.bincount(flat.ravel(), minlength=c * self.n_bins).reshape(c, self.n_bins)


class DriftMonitor:
    """Live counts per bin over the last `window` feature rows and the last `window` scores,
    and their PSI against a `DriftReference`.

    The window is exact: a ring of each value's bin index (one byte per value and column),
    so a batch adds its rows' counts and subtracts those of the rows it pushes out. That
    reads plainly ("the last 10,000 events") where an exponentially decayed count would
    have no sharp horizon, and costs O(batch x features) per batch: one searchsorted per
    column and one bincount. Rows and scores are windowed apart: an LSTM scores only events
    whose window is complete, so a batch may carry fewer scores than rows.
    """

    def __init__(self, reference: DriftReference, window: int) -> None:
        if window < 1:
            raise ValueError("the drift window must be >= 1 event")
        self.reference = reference
        self.names = list(reference.features)
        self._rows = _BinRing([reference.features[n] for n in self.names], window)
        self._scores = _BinRing([reference.score], window)

    def observe(self, features: np.ndarray, scores: np.ndarray) -> None:
        """Count one batch: `features` (n, d) scaled rows in the reference's feature order,
        `scores` (m,) the events' scores. Rows or scores that are not finite are skipped."""
        x = np.asarray(features, dtype=np.float64)
        if x.ndim != 2 or x.shape[1] != len(self.names):
            raise ValueError(f"features of shape {x.shape}; expected (n, {len(self.names)})")
        self._rows.push(x[np.isfinite(x).all(axis=1)])
        s = np.asarray(scores, dtype=np.float64).ravel()
        self._scores.push(s[np.isfinite(s)][:, None])

    @property
    def rows_seen(self) -> int:
        """Feature rows in the window now (at most `window`)."""
        return self._rows.filled

    def psi_by_feature(self) -> dict[str, float]:
        """PSI per feature name over the window (NaN before the first row)."""
        counts = self._rows.counts
        return {
            name: psi(self.reference.features[name], counts[j, : self._rows.edges[j].size + 1])
            for j, name in enumerate(self.names)
        }

    def psi_score(self) -> float:
        """PSI of the scores over the window (NaN before the first score)."""
        return psi(self.reference.score, self._scores.counts[0, : self._scores.edges[0].size + 1])
