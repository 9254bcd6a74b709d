"""Per-entity state behind the stateful feature columns (Rolling, SincePrevious, LabelRate).
No I/O.

>>> from streamer.features import FeatureSpec, Rolling, SincePrevious
>>> spec = FeatureSpec(profile="demo", entity_field="user", time_field="ts",
...     time_format="epoch_s", columns=[Rolling(field="amount", windows_seconds=[3600],
...     stats=["count", "mean"]), SincePrevious(cap_seconds=86400)])
>>> Event = spec.event_type()
>>> state = AggregateState(spec)
>>> state.update([Event(user="u", ts=0, amount=10.0), Event(user="u", ts=60, amount=20.0),
...               Event(user="u", ts=4000, amount=5.0)]).round(3).tolist()
[[0.0, 10.0, 11.367], [1.0, 10.0, 4.111], [0.0, 5.0, 8.279]]

What is kept: one state per (key field, key value), in an LRU `OrderedDict`: the key's latest
event time and, per Rolling column, its recent (time, value) pairs in two `array("d")`s that
all of the column's windows share (window i is the suffix from heads[i]), plus per window a
shift and the running sums of (value - shift) and (value - shift)². The shift is a value
still in the window (|shift - mean|² <= count * variance, so the variance is stable) and the
sums are recomputed exactly when it leaves or when evictions have taken most of the squared
mass out (subtraction would otherwise leave rounding error the size of what left); an emptied
window has its sums reset to exactly 0. Each event costs O(1) amortized.

Memory: about 1.1 KB per entity for one Rolling column of three windows plus a SincePrevious
(key, dict entry and bookkeeping; measured), and 16 bytes per event held in a column's
longest window. `max_entities` caps the entities; going past it evicts the least recently
updated one (counted as "capacity"), which does change that entity's later features.

Idle eviction: when a new key arrives at event time t, up to two keys at the LRU front whose
latest event is older than t - horizon are dropped (counted as "idle"); horizon is the longest
window or cap in the spec. If a dropped key's next event is no earlier than t (always so in a
time-ordered stream; across partitions, when none lags so far behind), it comes more than a
horizon after the key's last: its windows would be empty and its since_previous capped, the
values of no state at all, so idle eviction changes no feature. The clock is the arriving
event, not the largest time seen, so one event with a wild future time cannot idle every key.

LabelRate: per key, its events counted per hour of event time (`streamer.labels`), in two
`array("q")`s (hours, counts) that the column's windows share, with per window a head index
and the running count of the hours [head, end) before the window's end hour; about 16 bytes
per hour with events in the longest window plus delay. The confirmed counts are not here but
in a `LabelStore` (labels arrive apart from events, from every partition): it outlives
`clear()`, and each event sums its key's labeled hours in the windows (few: labels are rare).
`confirm(event)` is the label of one processed event becoming known, counted once per event
id however often it is confirmed (`streamer.labels`); in a time-ordered
stream whose labels arrive `delay` after their events (`streamer.labels.deliveries`), the
rate is the share of the window's events that are anomalous.

Order: the features are exact when each key's events arrive in event-time order (Kafka
partitions keyed by the entity). A late event (before its key's latest) is taken as happening
at that latest time, so the windows stay in time order; one more than a horizon late (say the
key's previous event had a bogus future time) starts the key afresh rather than leave it stuck.
Values that are not finite or have |x| > 1e150 (their squares could overflow the sums) are
left out of the state, so they cannot poison an entity; their own row is still computed, and
the event still counts for since_previous. An event with a non-finite time leaves the state
untouched and gets NaN stateful features.
"""

from __future__ import annotations

import math
from array import array
from collections import OrderedDict
from collections.abc import Callable, Hashable, Sequence
from typing import Any

import numpy as np

from streamer.features import LABEL_STATS, STATS, FeatureSpec, LabelRate, Rolling, SincePrevious
from streamer.labels import BUCKET_SECONDS, LabelStore

_MAX_ABS = 1e150  # larger values stay out of the state: sums of their squares could overflow
_IDLE_SWEEP = 2  # idle keys dropped per new key at most: bounded work per event
_COMPACT = 16  # drop expired pairs from the arrays once at least this many lead them
# Recentre once s2 has lost this many times what it still holds: subtracting a large square
# leaves an error of its size times 1e-16, which must stay far below what is left.
_DRIFT = 65536.0


class _Series:
    """One key's recent (time, value) pairs of one Rolling field, shared by all its windows."""

    __slots__ = ("anchor", "gone", "heads", "s1", "s2", "shift", "times", "values")

    def __init__(self, windows: int) -> None:
        self.times = array("d")
        self.values = array("d")
        self.heads = [0] * windows  # window i covers pairs [heads[i], len)
        self.anchor = [-1] * windows  # index of the pair whose value is shift[i]
        self.shift = [0.0] * windows
        self.s1 = [0.0] * windows  # sum of (value - shift) over the window
        self.s2 = [0.0] * windows  # sum of (value - shift)²
        self.gone = [0.0] * windows  # (value - shift)² taken out of s2 since the last recentre


class _Counts:
    """One key's events per hour, for one LabelRate column: window i sums hours [heads[i], end)."""

    __slots__ = ("end", "events", "heads", "hours", "sums")

    def __init__(self, windows: int) -> None:
        self.hours = array("q")  # increasing
        self.events = array("q")  # events in each hour
        self.heads = [0] * windows
        self.end = 0  # first hour not before the windows' end
        self.sums = [0] * windows


class _Entity:
    __slots__ = ("counts", "last", "series")

    def __init__(self, last: float, series: list[_Series], counts: list[_Counts]) -> None:
        self.last = last  # latest event time, also the floor for late events
        self.series = series
        self.counts = counts


# The plan for one key field: (key field, [(offset, cap)] per SincePrevious column,
# [(series index, field, windows, slots, medians wanted)] per Rolling column, [(counts index,
# delay hours, window hours, slots)] per LabelRate column), where slots[i] lists the (stat
# index, output offset) pairs of window i.
_Slots = tuple[tuple[int, int], ...]
_Roll = tuple[int, str, tuple[float, ...], list[_Slots], bool]
_Rate = tuple[int, int, tuple[int, ...], list[_Slots]]
_Group = tuple[str, list[tuple[int, float]], list[_Roll], list[_Rate]]


class AggregateState:
    """Rolling per-entity statistics in event time; `update` gives the stateful features."""

    def __init__(
        self, spec: FeatureSpec, max_entities: int = 100_000, labels: LabelStore | None = None
    ) -> None:
        if max_entities < 1:
            raise ValueError("max_entities must be >= 1")
        self.spec = spec
        # Shared with whoever delivers labels (the app's ControlState), when given.
        self.labels = labels if labels is not None else LabelStore(max_keys=max_entities)
        self.max_entities = max_entities
        self.evictions: dict[str, int] = {"idle": 0, "capacity": 0}
        self._states: OrderedDict[Hashable, _Entity] = OrderedDict()
        self._seconds = _seconds_reader(spec)
        self._groups: list[_Group] = []
        self._width = 0
        self.horizon = 0.0  # longest window or cap: older state can no longer change a value
        groups: dict[str, _Group] = {}
        for col in spec.columns:
            if not isinstance(col, Rolling | SincePrevious | LabelRate):
                continue
            group = groups.setdefault(spec.key_of(col), (spec.key_of(col), [], [], []))
            if isinstance(col, LabelRate):
                spots: list[_Slots] = []
                for _ in col.windows_seconds:
                    spots.append(
                        tuple(
                            (LABEL_STATS.index(s), self._width + k) for k, s in enumerate(col.stats)
                        )
                    )
                    self._width += len(col.stats)
                hours = tuple(round(w / BUCKET_SECONDS) for w in col.windows_seconds)
                delay = round(col.delay_seconds / BUCKET_SECONDS)
                group[3].append((len(group[3]), delay, hours, spots))
                reach = col.reach_seconds
                self.horizon = max(self.horizon, reach)
                self.labels.require([spec.key_of(col)], reach)
                continue
            if isinstance(col, SincePrevious):
                group[1].append((self._width, col.cap_seconds))
                self._width += 1
                self.horizon = max(self.horizon, col.cap_seconds)
                continue
            slots: list[_Slots] = []
            for _ in col.windows_seconds:
                slots.append(
                    tuple((STATS.index(s), self._width + k) for k, s in enumerate(col.stats))
                )
                self._width += len(col.stats)
            medians = "median" in col.stats or "median_ratio" in col.stats
            group[2].append((len(group[2]), col.field, tuple(col.windows_seconds), slots, medians))
            self.horizon = max(self.horizon, *col.windows_seconds)
        self._groups = list(groups.values())

    @property
    def entities(self) -> int:
        """(key field, key value) states held."""
        return len(self._states)

    def clear(self) -> None:
        """Forget every entity (the eviction counts are running totals and stay). The label
        store is kept: labels come from every partition, not from the events replayed."""
        self._states.clear()

    def confirm(self, event: Any) -> int:
        """The label "anomalous" of one event becomes known: count it for every key field of
        the spec's LabelRate columns, once per event (its `id_field` value names it, so a
        repeat counts nothing). Returns how many keys counted it."""
        if not self.spec.id_field:  # no LabelRate column (FeatureSpec requires it with one)
            return 0
        t = self._seconds(getattr(event, self.spec.time_field))
        event_id = getattr(event, self.spec.id_field)
        return sum(
            self.labels.add(key_field, getattr(event, key_field), t, event_id) == "counted"
            for key_field, _, _, rates in self._groups
            if rates
        )

    def withdraw(self, event: Any) -> int:
        """One event's label "anomalous" is taken back: uncount it for every key field that
        counted it. Returns how many keys did."""
        if not self.spec.id_field:
            return 0
        event_id = getattr(event, self.spec.id_field)
        return sum(
            self.labels.withdraw(key_field, getattr(event, key_field), event_id) == "withdrawn"
            for key_field, _, _, rates in self._groups
            if rates
        )

    def update(self, events: Sequence[Any]) -> np.ndarray:
        """The stateful features of `events`, shape (n, k) in spec column order; each event
        is then added to the state, in order."""
        k = self._width
        out = [math.nan] * (len(events) * k)
        read_time, time_field = self._seconds, self.spec.time_field
        states, horizon = self._states, self.horizon
        isfinite, log1p, sqrt, inf = math.isfinite, math.log1p, math.sqrt, math.inf
        base = -k
        for event in events:
            base += k
            t = read_time(getattr(event, time_field))
            if not isfinite(t):
                continue  # NaN row; the state does not move
            for key_field, since, rolls, rates in self._groups:
                key = (key_field, getattr(event, key_field))
                entity = states.get(key)
                tk = t
                if entity is None:
                    entity = self._insert(key, t, rolls, rates)
                    gap = inf
                else:
                    states.move_to_end(key)
                    gap = t - entity.last
                    if gap < 0.0:
                        if gap < -horizon:  # its state is from the "future": start afresh
                            entity.series, entity.counts = _fresh(rolls), _counted(rates)
                            gap = inf
                        else:  # late: taken as happening at the key's latest time
                            tk = entity.last
                            gap = 0.0
                entity.last = tk
                for offset, cap in since:
                    out[base + offset] = log1p(gap if gap < cap else cap)
                for index, field, windows, slots, medians in rolls:
                    x = getattr(event, field)
                    s = entity.series[index]
                    times, values = s.times, s.values
                    heads, anchor, shift, s1, s2, gone = (
                        s.heads, s.anchor, s.shift, s.s1, s.s2, s.gone
                    )  # fmt: skip
                    end = len(times)
                    for i, w in enumerate(windows):
                        h = heads[i]
                        cut = tk - w
                        if h < end and times[h] <= cut:
                            a, b, c, g = s1[i], s2[i], shift[i], gone[i]
                            while h < end and times[h] <= cut:
                                d = values[h] - c
                                a -= d
                                b -= d * d
                                g += d * d
                                h += 1
                            heads[i] = h
                            if h == end:  # empty: exact zeros, no drift carried over
                                a = b = g = 0.0
                                anchor[i] = -1
                            elif h > anchor[i] or g > _DRIFT * b:  # recentre, exactly
                                anchor[i], c, a, b = _recentre(values, h, end)
                                g = 0.0
                            s1[i], s2[i], shift[i], gone[i] = a, b, c, g
                        count = end - h
                        if count:
                            m1 = s1[i] / count
                            mean = shift[i] + m1
                            var = s2[i] / count - m1 * m1 if count > 1 else 0.0
                            std = sqrt(var) if var > 0.0 else 0.0
                            ratio = x / mean if abs(mean) > 1e-12 else 1.0
                        else:
                            mean, std, ratio = x, 0.0, 1.0
                        if medians:
                            median = _median(values, h, end) if count else x
                            m_ratio = x / median if abs(median) > 1e-12 else 1.0
                        else:
                            median = m_ratio = math.nan
                        stat = (float(count), mean, std, ratio, median, m_ratio)
                        for j, offset in slots[i]:
                            out[base + offset] = stat[j]
                    if abs(x) <= _MAX_ABS:  # False for NaN and inf too
                        for i in range(len(windows)):
                            if heads[i] == end:  # empty window: this value is the shift
                                anchor[i], shift[i] = end, x
                            d = x - shift[i]
                            s1[i] += d
                            s2[i] += d * d
                        times.append(tk)
                        values.append(x)
                    first = min(heads)
                    if first >= _COMPACT and 2 * first >= end:
                        del times[:first], values[:first]
                        s.heads = [h - first for h in heads]
                        s.anchor = [p - first if p >= 0 else -1 for p in anchor]
                for index, delay, hours, slots in rates:
                    self._rate(key, entity.counts[index], tk, delay, hours, slots, out, base)
        return np.array(out, dtype=np.float64).reshape(len(events), k)

    def _rate(
        self,
        key: tuple[str, Hashable],
        c: _Counts,
        t: float,
        delay: int,
        hours: tuple[int, ...],
        slots: list[_Slots],
        out: list[float],
        base: int,
    ) -> None:
        """One LabelRate column of one event at (effective) time t, then the event joins."""
        hour = math.floor(t / BUCKET_SECONDS)
        e = hour - delay  # the windows end where the hour holding t - delay starts
        stamps, events, heads, sums = c.hours, c.events, c.heads, c.sums
        n, end = len(stamps), c.end
        # Hours only enter the windows after their last event: an event's hour is >= e.
        while end < n and stamps[end] < e:
            x = events[end]
            for i in range(len(hours)):
                sums[i] += x
            end += 1
        c.end = end
        spans = []
        for i, width in enumerate(hours):
            lo, h = e - width, heads[i]
            while h < end and stamps[h] < lo:
                sums[i] -= events[h]
                h += 1
            heads[i] = h
            spans.append((lo, e))
        confirmed = self.labels.confirmed(key[0], key[1], spans)
        for i, count in enumerate(sums):
            hit = confirmed[i]
            rate = (hit / count if hit < count else 1.0) if count else 0.0
            stat = (float(count), float(hit), rate)
            for j, offset in slots[i]:
                out[base + offset] = stat[j]
        if n and stamps[-1] == hour:
            events[-1] += 1
        else:
            stamps.append(hour)
            events.append(1)
        first = min(heads)
        if first >= _COMPACT and 2 * first >= n:
            del stamps[:first], events[:first]
            c.heads = [h - first for h in heads]
            c.end = end - first

    def _insert(self, key: Hashable, t: float, rolls: list[_Roll], rates: list[_Rate]) -> _Entity:
        """A new key's state; first drop a few idle keys, then the LRU one if over capacity."""
        states = self._states
        cutoff = t - self.horizon
        for _ in range(_IDLE_SWEEP):
            if not states:
                break
            oldest = next(iter(states))
            if states[oldest].last >= cutoff:
                break
            del states[oldest]
            self.evictions["idle"] += 1
        entity = states[key] = _Entity(t, _fresh(rolls), _counted(rates))
        if len(states) > self.max_entities:
            states.popitem(last=False)
            self.evictions["capacity"] += 1
        return entity


def _fresh(rolls: list[_Roll]) -> list[_Series]:
    return [_Series(len(roll[2])) for roll in rolls]


def _counted(rates: list[_Rate]) -> list[_Counts]:
    return [_Counts(len(hours)) for _, _, hours, _ in rates]


def _median(values: array[float], head: int, end: int) -> float:
    """The median of values[head:end] (not empty)."""
    v = sorted(values[head:end])
    n = len(v)
    return v[n // 2] if n % 2 else 0.5 * (v[n // 2 - 1] + v[n // 2])


def _recentre(values: array[float], head: int, end: int) -> tuple[int, float, float, float]:
    """(anchor, shift, s1, s2) recomputed from scratch, shifted by the window's newest value."""
    c = values[end - 1]
    window = values[head:end]
    return (
        end - 1,
        c,
        math.fsum(v - c for v in window),
        math.fsum((v - c) * (v - c) for v in window),
    )


def _seconds_reader(spec: FeatureSpec) -> Callable[[Any], float]:
    """`features.event_seconds` for this spec's time format, without the per-event branching."""
    if spec.time_format == "iso8601":
        return lambda value: float(value.timestamp())
    if spec.time_format == "epoch_ms":
        return lambda value: float(value) / 1000.0
    return float
