"""Confirmed anomaly labels by key and event-time bucket, for the `label_rate` features. No I/O.

Labels are facts about events ("this terminal's transaction at 12:03 was fraud") that arrive
long after the events, from investigators (the feedback topic, `streamer.control`) or, in
training and evaluation, from the data's label column released `delay` after each event's
time (`deliveries`). A `LabelStore` only counts positive labels: the events themselves, the
denominator of a rate, are counted by `streamer.aggregates.AggregateState`.

Unlike the per-entity aggregates, a store is not a function of the partitions a replica owns:
every replica reads the whole feedback topic, so the store survives partition moves and
model reloads (the app keeps one per process, in `ControlState`).

A label counts once per labeled event, named by its id (the spec's `id_field`): Kafka
delivers at least once, the feedback topic is re-read from the start, and two investigators
may confirm the same event, so the same label can arrive many times. A repeat (same key
field, key and event id, whatever its time) while the first is held is a "duplicate".

Investigators correct mistakes: `withdraw` takes a counted label back (its hour's count goes
down by one), found by the same three names; the event's time is not needed, its hour is
kept with its id. A withdrawal of an id not held (never labeled, withdrawn already, or gone
with its hour) changes nothing. Labeled again after a withdrawal, the event counts again:
whatever the order, the counts are those of the labels standing (labeled and not withdrawn
since), as long as they are held.

>>> store = LabelStore(key_fields={"terminal_id"}, horizon_seconds=86400.0)
>>> store.add("terminal_id", 7, 3600.0 * 5 + 10, event_id="tx-1")
'counted'
>>> store.add("terminal_id", 7, 3600.0 * 5 + 10, event_id="tx-1")  # delivered again
'duplicate'
>>> store.add("customer_id", 1, 0.0, event_id="tx-1")  # no label_rate column is keyed by it
'unused'
>>> store.confirmed("terminal_id", 7, [(0, 5), (5, 6)])
[0, 1]
>>> store.withdraw("terminal_id", 7, event_id="tx-1"), store.withdraw("terminal_id", 7, "tx-1")
('withdrawn', 'unknown')
>>> store.confirmed("terminal_id", 7, [(0, 5), (5, 6)])
[0, 0]

Memory: at most `max_keys` keys (least recently labeled evicted first), each holding the ids
of its labeled events within `horizon_seconds` of its newest one, by hour: about 0.9 KB per
key and 130 bytes per further labeled event (measured with int ids; a string id adds its
size), so bounded by max_keys x (a key's labeled events in a horizon). The ids go with their
hour, so a repeat of a label older than its key's horizon is "stale" and not counted again;
a key evicted for capacity takes its counts with it, so a later repeat counts anew, once.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Hashable, Iterable
from itertools import pairwise
from typing import Literal

import numpy as np

# Labels and events are counted per hour of event time: the windows of a `label_rate` column
# are whole hours (`streamer.features.LabelRate` requires multiples of it).
BUCKET_SECONDS = 3600.0

# What `LabelStore.add` did with a label: counted it; found it counted already; no column
# uses its key field; or it is older than its key's newest label by more than the horizon
# (or its time is not finite).
Outcome = Literal["counted", "duplicate", "unused", "stale"]
# What `LabelStore.withdraw` did: took a counted label back; found no such label held; or no
# column uses its key field.
Withdrawal = Literal["withdrawn", "unknown", "unused"]


def bucket(seconds: float) -> int:
    """The hour (since the epoch) an event time falls in."""
    return math.floor(seconds / BUCKET_SECONDS)


class _Key:
    """One key's labeled events: their ids by hour, and the hour of each id."""

    __slots__ = ("hour_of", "ids")

    def __init__(self) -> None:
        self.ids: dict[int, list[Hashable]] = {}  # hour -> ids labeled in it (distinct)
        self.hour_of: dict[Hashable, int] = {}  # id -> its hour


class LabelStore:
    """Positive labels counted per (key field, key value, hour of the labeled event's time),
    once per labeled event id."""

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
        self.duplicates = 0  # labels of an event already counted
        self.withdrawn = 0  # labels taken back
        self._keys: OrderedDict[tuple[str, Hashable], _Key] = OrderedDict()

    def require(self, key_fields: Iterable[str], horizon_seconds: float) -> None:
        """A feature state's needs: labels of these key fields, kept this long."""
        self.key_fields |= set(key_fields)
        self.horizon_seconds = max(self.horizon_seconds, horizon_seconds)

    @property
    def keys(self) -> int:
        return len(self._keys)

    def add(self, key_field: str, key: Hashable, seconds: float, event_id: Hashable) -> Outcome:
        """Count the confirmed anomaly `event_id` of `key` at event time `seconds`, unless it
        is counted already, no column uses `key_field`, or it is older than the key's newest
        label by more than a horizon."""
        if key_field not in self.key_fields:
            return "unused"
        if not math.isfinite(seconds):
            self.dropped += 1
            return "stale"
        b = bucket(seconds)
        at = (key_field, key)
        held = self._keys.get(at)
        if held is None:
            held = self._keys[at] = _Key()
            if len(self._keys) > self.max_keys:
                self._keys.popitem(last=False)
                self.evictions += 1
        else:
            self._keys.move_to_end(at)
        if event_id in held.hour_of:
            self.duplicates += 1
            return "duplicate"
        h = math.ceil(self.horizon_seconds / BUCKET_SECONDS)
        newest = max(held.ids, default=b)
        if b < newest - h:
            self.dropped += 1
            return "stale"
        held.ids.setdefault(b, []).append(event_id)
        held.hour_of[event_id] = b
        if b > newest:  # a newer hour: those more than a horizon before it go, ids and all
            for old in [k for k in held.ids if k < b - h]:
                for i in held.ids.pop(old):
                    del held.hour_of[i]
        return "counted"

    def withdraw(self, key_field: str, key: Hashable, event_id: Hashable) -> Withdrawal:
        """Take back the label of `event_id` of `key`, if it is counted: its hour counts one
        label less, and a later label of the event counts again."""
        if key_field not in self.key_fields:
            return "unused"
        at = (key_field, key)
        held = self._keys.get(at)
        if held is None or event_id not in held.hour_of:
            return "unknown"
        b = held.hour_of.pop(event_id)
        ids = held.ids[b]
        ids.remove(event_id)
        if not ids:
            del held.ids[b]
            if not held.ids:  # nothing left: the key is as if never labeled
                del self._keys[at]
        self.withdrawn += 1
        return "withdrawn"

    def confirmed(self, key_field: str, key: Hashable, spans: list[tuple[int, int]]) -> list[int]:
        """Labels of `key` in each bucket span [lo, hi)."""
        held = self._keys.get((key_field, key))
        out = [0] * len(spans)
        if held is None:
            return out
        for b, ids in held.ids.items():
            for i, (lo, hi) in enumerate(spans):
                if lo <= b < hi:
                    out[i] += len(ids)
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
