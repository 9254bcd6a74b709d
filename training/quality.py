"""Detection-quality metrics over labeled rows: point-wise, event-wise, timing and rates.

All functions are pure numpy over one series (`labels` and `flags`, one value per test row);
`pool` adds counts over series so a data set's numbers are computed over all its rows.

>>> labels = np.array([0, 0, 1, 1, 1, 0, 0, 0])
>>> flags = np.array([0, 1, 0, 1, 1, 0, 0, 0], dtype=bool)
>>> c = point_counts(labels, flags)
>>> (c.tp, c.fp, c.fn, c.tn)
(2, 1, 1, 4)
>>> round(c.f1, 3), round(c.far, 3), round(c.mar, 3)
(0.667, 0.2, 0.333)
>>> e = event_counts(labels, flags)
>>> (e.events, e.detected, e.alarm_runs, e.true_alarm_runs, e.delays_rows)
(1, 1, 2, 1, [1])
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np


def _ratio(num: float, den: float) -> float:
    return float(num) / den if den else 0.0


@dataclass
class PointCounts:
    tp: int = 0
    fp: int = 0
    fn: int = 0
    tn: int = 0

    def __add__(self, other: PointCounts) -> PointCounts:
        return PointCounts(
            self.tp + other.tp, self.fp + other.fp, self.fn + other.fn, self.tn + other.tn
        )

    @property
    def precision(self) -> float:
        return _ratio(self.tp, self.tp + self.fp)

    @property
    def recall(self) -> float:
        return _ratio(self.tp, self.tp + self.fn)

    @property
    def f1(self) -> float:
        p, r = self.precision, self.recall
        return _ratio(2 * p * r, p + r)

    @property
    def far(self) -> float:
        """False alarm rate: normal rows flagged / normal rows."""
        return _ratio(self.fp, self.fp + self.tn)

    @property
    def mar(self) -> float:
        """Missed alarm rate: anomalous rows not flagged / anomalous rows."""
        return _ratio(self.fn, self.fn + self.tp)

    def summary(self) -> dict[str, float | int]:
        rows = self.tp + self.fp + self.fn + self.tn
        return {
            "precision": self.precision,
            "recall": self.recall,
            "f1": self.f1,
            "far": self.far,
            "mar": self.mar,
            "rows": rows,
            "anomalous_rows": self.tp + self.fn,
            "alerted_rows": self.tp + self.fp,
            "alerted_share": _ratio(self.tp + self.fp, rows),
            "tp": self.tp,
            "fp": self.fp,
            "fn": self.fn,
            "tn": self.tn,
        }


def point_counts(labels: np.ndarray, flags: np.ndarray) -> PointCounts:
    y = np.asarray(labels).astype(bool)
    f = np.asarray(flags).astype(bool)
    return PointCounts(
        tp=int((y & f).sum()),
        fp=int((~y & f).sum()),
        fn=int((y & ~f).sum()),
        tn=int((~y & ~f).sum()),
    )


def runs(mask: np.ndarray) -> list[tuple[int, int]]:
    """Maximal runs of True as (first, last) row pairs, both ends included.

    >>> runs(np.array([1, 1, 0, 1, 0, 0, 1], dtype=bool))
    [(0, 1), (3, 3), (6, 6)]
    """
    m = np.asarray(mask).astype(np.int8)
    if m.size == 0:
        return []
    edges = np.diff(np.concatenate([[0], m, [0]]))
    starts = np.flatnonzero(edges == 1)
    ends = np.flatnonzero(edges == -1) - 1
    return [(int(a), int(b)) for a, b in zip(starts, ends, strict=True)]


@dataclass
class EventCounts:
    """Labeled events (runs of anomalous rows, or given windows) against alarm runs."""

    events: int = 0
    detected: int = 0
    alarm_runs: int = 0  # maximal runs of consecutive alerted rows
    true_alarm_runs: int = 0  # alarm runs that overlap a labeled event
    delays_rows: list[int] = field(default_factory=list)  # first alert - event start
    delays_seconds: list[float] = field(default_factory=list)

    def __add__(self, other: EventCounts) -> EventCounts:
        return EventCounts(
            self.events + other.events,
            self.detected + other.detected,
            self.alarm_runs + other.alarm_runs,
            self.true_alarm_runs + other.true_alarm_runs,
            self.delays_rows + other.delays_rows,
            self.delays_seconds + other.delays_seconds,
        )

    @property
    def recall(self) -> float:
        return _ratio(self.detected, self.events)

    @property
    def precision(self) -> float:
        return _ratio(self.true_alarm_runs, self.alarm_runs)

    @property
    def f1(self) -> float:
        p, r = self.precision, self.recall
        return _ratio(2 * p * r, p + r)

    def summary(self) -> dict[str, float | int | None]:
        return {
            "events": self.events,
            "detected": self.detected,
            "recall": self.recall,
            "alarm_runs": self.alarm_runs,
            "true_alarm_runs": self.true_alarm_runs,
            "precision": self.precision,
            "f1": self.f1,
            "mean_delay_rows": float(np.mean(self.delays_rows)) if self.delays_rows else None,
            "mean_delay_seconds": (
                float(np.mean(self.delays_seconds)) if self.delays_seconds else None
            ),
        }


def event_counts(
    labels: np.ndarray,
    flags: np.ndarray,
    seconds: np.ndarray | None = None,
    events: Iterable[tuple[int, int]] | None = None,
) -> EventCounts:
    """Event recall/precision and time to detect; events default to runs of labeled rows."""
    f = np.asarray(flags).astype(bool)
    spans = list(events) if events is not None else runs(labels)
    covered = np.zeros(f.size, dtype=bool)
    out = EventCounts(events=len(spans))
    for first, last in spans:
        covered[first : last + 1] = True
        hits = np.flatnonzero(f[first : last + 1])
        if hits.size:
            out.detected += 1
            out.delays_rows.append(int(hits[0]))
            if seconds is not None:
                out.delays_seconds.append(float(seconds[first + hits[0]] - seconds[first]))
    alarms = runs(f)
    out.alarm_runs = len(alarms)
    out.true_alarm_runs = sum(1 for a, b in alarms if covered[a : b + 1].any())
    return out


def average_precision(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the precision-recall curve as average precision (ties broken by order).

    >>> average_precision(np.array([0, 1, 0, 1]), np.array([0.1, 0.9, 0.2, 0.8]))
    1.0
    """
    y = np.asarray(labels).astype(bool)
    if not y.any():
        return 0.0
    order = np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")
    hits = y[order]
    tp = np.cumsum(hits)
    precision = tp / np.arange(1, hits.size + 1)
    return float(precision[hits].sum() / y.sum())


def recall_at_rate(
    labels: np.ndarray, scores: np.ndarray, rate: float, classes: np.ndarray | None = None
) -> dict[str, float]:
    """Recall when the top `rate` share of rows by score is alerted; per class if given.

    >>> recall_at_rate(np.array([1, 0, 0, 1]), np.array([4.0, 3.0, 2.0, 1.0]), 0.25)
    {'recall': 0.5, 'precision': 1.0}
    """
    y = np.asarray(labels).astype(bool)
    k = max(1, round(rate * y.size))
    top = np.zeros(y.size, dtype=bool)
    top[np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")[:k]] = True
    out = {"recall": _ratio(int((top & y).sum()), int(y.sum())),
           "precision": _ratio(int((top & y).sum()), k)}  # fmt: skip
    if classes is not None:
        for c in sorted(set(np.asarray(classes)[y].tolist())):
            member = y & (np.asarray(classes) == c)
            out[f"recall_class_{c}"] = _ratio(int((top & member).sum()), int(member.sum()))
    return out
