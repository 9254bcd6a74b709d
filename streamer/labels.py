"""Confirmed anomaly labels by key and event-time bucket, for the `label_rate` features. No I/O.

Labels are facts about events ("this terminal's transaction at 12:03 was fraud") that arrive
long after the events, from investigators (the feedback topic, `streamer.control`) or, in
training and evaluation, from the data's label column released `delay` after each event's
time (`deliveries`). A `LabelStore` only counts positive labels: the events themselves, the
denominator of a rate, are counted by `streamer.aggregates.AggregateState`.

Unlike the per-entity aggregates, a store is not a function of the partitions a replica owns:
every replica reads the whole feedback topic, so the store survives partition moves and
model reloads (the app keeps one per process, in `ControlState`).

>>> store = LabelStore(key_fields={"terminal_id"}, horizon_seconds=86400.0)
>>> store.add("terminal_id", 7, 3600.0 * 5 + 10)
True
>>> store.add("customer_id", 1, 0.0)  # no label_rate column is keyed by it
False
>>> store.confirmed("terminal_id", 7, [(0, 5), (5, 6)])
[0, 1]

Memory: at most `max_keys` keys (least recently labeled evicted first), each holding the
buckets of its labels within `horizon_seconds` of its newest one: a dict entry per labeled
hour, so bounded by max_keys x (horizon / BUCKET_SECONDS + 1) entries.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Hashable, Iterable
from itertools import pairwise

import numpy as np

# Labels and events are counted per hour of event time: the windows of a `label_rate` column
# are whole hours (`streamer.features.LabelRate` requires multiples of it).
BUCKET_SECONDS = 3600.0


def bucket(seconds: float) -> int:
    """The hour (since the epoch) an event time falls in."""
    return math.floor(seconds / BUCKET_SECONDS)


class LabelStore:
    """Positive labels counted per (key field, key value, hour of the labeled event's time)."""

    def __init__(
        self,
        key_fields: Iterable[str] = (),
        horizon_seconds: float = 0.0,
        max_keys: int = 100_000,
    ) -> None:
        if max_keys < 1:
            raise ValueError("max_keys must be >= 1")
        self.key_fields = set(key_fields)
        self.horizon_seconds = horizon_seconds
        self.max_keys = max_keys
        self.evictions = 0  # keys dropped for capacity
        self.dropped = 0  # labels older than the horizon (or with a non-finite time)
        self._counts: OrderedDict[tuple[str, Hashable], dict[int, int]] = OrderedDict()

    def require(self, key_fields: Iterable[str], horizon_seconds: float) -> None:
        """A feature state's needs: labels of these key fields, kept this long."""
        self.key_fields |= set(key_fields)
        self.horizon_seconds = max(self.horizon_seconds, horizon_seconds)

    @property
    def keys(self) -> int:
        return len(self._counts)

    def add(self, key_field: str, key: Hashable, seconds: float) -> bool:
        """Count one confirmed anomaly of `key` at event time `seconds`; False when no column
        uses `key_field` or the label is older than the key's newest by more than a horizon."""
        if key_field not in self.key_fields:
            return False
        if not math.isfinite(seconds):
            self.dropped += 1
            return False
        b = bucket(seconds)
        at = (key_field, key)
        counts = self._counts.get(at)
        if counts is None:
            counts = self._counts[at] = {}
            if len(self._counts) > self.max_keys:
                self._counts.popitem(last=False)
                self.evictions += 1
        else:
            self._counts.move_to_end(at)
        h = math.ceil(self.horizon_seconds / BUCKET_SECONDS)
        newest = max(counts, default=b)
        if b < newest - h:
            self.dropped += 1
            return False
        counts[b] = counts.get(b, 0) + 1
        if b > newest:  # a newer hour: those more than a horizon before it can go
            for old in [k for k in counts if k < b - h]:
                del counts[old]
        return True

    def confirmed(self, key_field: str, key: Hashable, spans: list[tuple[int, int]]) -> list[int]:
        """Labels of `key` in each bucket span [lo, hi)."""
        counts = self._counts.get((key_field, key))
        out = [0] * len(spans)
        if not counts:
            return out
        for b, n in counts.items():
            for i, (lo, hi) in enumerate(spans):
                if lo <= b < hi:
                    out[i] += n
        return out


def deliveries(
    seconds: np.ndarray, positive: np.ndarray, delay_seconds: float
) -> list[tuple[int, np.ndarray]]:
    """When the labels of a stream become known, if each arrives `delay_seconds` after its
    event's time: [(i, rows)], sorted by i, meaning "the labels of `rows` are delivered just
    before event i is processed". Only positive labels are delivered (the store counts only
    those). The clock is the latest event time seen so far, so a label is never delivered
    before its due time nor before its own event; labels due after the last event are not.

    >>> deliveries(np.array([0.0, 5.0, 10.0, 10.0, 30.0]), np.array([1, 1, 0, 1, 0]), 10.0)
    [(2, array([0])), (4, array([1, 3]))]
    """
    n = seconds.size
    clock = np.maximum.accumulate(seconds) if n else seconds
    rows = np.flatnonzero(np.asarray(positive) > 0)
    at = np.searchsorted(clock, seconds[rows] + delay_seconds, side="left")
    at = np.maximum(at, rows + 1)
    keep = at < n
    rows, at = rows[keep], at[keep]
    order = np.argsort(at, kind="stable")
    rows, at = rows[order], at[order]
    starts = np.flatnonzero(np.r_[True, at[1:] != at[:-1]]) if at.size else at
    bounds = [*starts.tolist(), at.size]
    return [(int(at[a]), rows[a:b]) for a, b in pairwise(bounds)]
