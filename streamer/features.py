"""Feature spec and the pure function that turns decoded events into a feature matrix.

The same code runs at training time (over a history file) and in the daemon (over a batch),
so a model never sees features built two different ways.

>>> spec = FeatureSpec(
...     profile="demo", entity_field="user", time_field="ts", time_format="epoch_s",
...     columns=[Log1p(field="amount"), OneHot(field="method", vocabulary=["card"])],
... )
>>> spec.feature_names()
['log1p(amount)', 'method=card', 'method=<other>']
>>> Event = spec.event_type()
>>> events = [Event(user="u1", ts=0, amount=0.0, method="card"),
...           Event(user="u2", ts=0, amount=9.0, method="cash")]
>>> build_features(spec, events).round(3).tolist()
[[0.0, 1.0, 0.0], [2.303, 0.0, 1.0]]
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Annotated, Any, Literal

import msgspec
import numpy as np

if TYPE_CHECKING:  # aggregates imports this module; the state is only named in a signature
    from streamer.aggregates import AggregateState

TimeFormat = Literal["iso8601", "epoch_ms", "epoch_s"]
Stat = Literal["count", "mean", "std", "ratio", "median", "median_ratio"]
STATS: tuple[Stat, ...] = ("count", "mean", "std", "ratio", "median", "median_ratio")
# A Rolling column without `stats` gets these (not the medians: specs written before the
# medians existed must keep their feature names).
DEFAULT_STATS: tuple[Stat, ...] = ("count", "mean", "std", "ratio")
LabelStat = Literal["count", "confirmed", "rate"]
LABEL_STATS: tuple[LabelStat, ...] = ("count", "confirmed", "rate")
_HOUR = 3600.0  # streamer.labels.BUCKET_SECONDS (not imported: labels must not need this module)


class _Column(msgspec.Struct, frozen=True, forbid_unknown_fields=True, tag_field="kind"):
    pass


class Numeric(_Column, tag="numeric", frozen=True):
    """A number used as it is."""

    field: str


class Log1p(_Column, tag="log1p", frozen=True):
    """log(1 + x): tames heavy-tailed amounts; values below 0 are clipped to 0."""

    field: str


class Ratio(_Column, tag="ratio", frozen=True):
    """numerator / denominator; a zero denominator gives 0 rather than infinity."""

    numerator: str
    denominator: str


class OneHot(_Column, tag="onehot", frozen=True):
    """One column per vocabulary value plus an `<other>` bucket for anything else."""

    field: str
    vocabulary: list[str]

    def __post_init__(self) -> None:
        if not self.vocabulary:
            raise ValueError("onehot vocabulary must not be empty")
        if len(set(self.vocabulary)) != len(self.vocabulary):
            raise ValueError(f"onehot vocabulary of {self.field!r} has duplicates")


class HourOfDay(_Column, tag="hour_of_day", frozen=True):
    """Hour of the event time (UTC) as a point on a circle, so 23:59 sits next to 00:00."""


class Rolling(_Column, tag="rolling", frozen=True):
    """Per-entity rolling statistics of `field` over the entity's earlier events in each
    event-time window (stateful: built by `streamer.aggregates.AggregateState`).

    For an event of key value k at event time t, its "earlier events in window w" are the
    events of k already processed (arrival order) whose event time t' is in (t - w, t]:
    - count: how many there are;
    - mean: their mean of `field`; with none, the event's own value (so nothing looks odd);
    - std: their population standard deviation, 0 when count < 2;
    - ratio: value / mean when |mean| > 1e-12, else 1.0;
    - median: their median; with none, the event's own value. A burst of unusual values
      (a leaked card's large amounts) pulls it far less than the mean, so the ratio below
      keeps showing the burst against the entity's usual values;
    - median_ratio: value / median when |median| > 1e-12, else 1.0.
    The medians cost a sort of the window's values per event (O(n log n), n its count);
    the other stats are O(1). Not in the default `stats`.
    Then the event itself joins the state. This is exact when each key's events arrive in
    event-time order (Kafka partitions keyed by entity); see `streamer.aggregates` for late
    events. `key` names the entity field; None means the spec's `entity_field`.
    """

    field: str
    windows_seconds: list[float]
    stats: list[Stat] = msgspec.field(default_factory=lambda: list(DEFAULT_STATS))
    key: str | None = None

    def __post_init__(self) -> None:
        what = f"rolling column of {self.field!r}"
        if not self.windows_seconds:
            raise ValueError(f"{what} needs at least one window")
        if not all(0.0 < w < math.inf for w in self.windows_seconds):
            raise ValueError(f"{what}: windows must be finite and > 0 seconds")
        if len(set(self.windows_seconds)) != len(self.windows_seconds):
            raise ValueError(f"{what} has duplicate windows")
        if not self.stats:
            raise ValueError(f"{what} needs at least one stat")
        if not set(self.stats) <= set(STATS) or len(set(self.stats)) != len(self.stats):
            raise ValueError(f"{what}: stats must be distinct values of {list(STATS)}")


class SincePrevious(_Column, tag="since_previous", frozen=True):
    """log1p(seconds since the key's previous event), capped at `cap_seconds`; a key's first
    event gets the cap too (stateful). `key` None means the spec's `entity_field`."""

    key: str | None = None
    cap_seconds: float = 604800.0

    def __post_init__(self) -> None:
        if not 0.0 < self.cap_seconds < math.inf:
            raise ValueError(f"since_previous column of {self.key!r}: cap_seconds must be > 0")


class LabelRate(_Column, tag="label_rate", frozen=True):
    """The share of a key's earlier events later confirmed anomalous (stateful, and fed by
    labels: `streamer.labels`), as in the Fraud Detection Handbook's terminal risk features.

    Events and labels are counted per hour of event time. For an event of key value k at
    event time t, let e be the hour that holds t - delay; window w covers the w / 1h whole
    hours before e, i.e. event times in [(e - w/1h) h, e h), about [t - delay - w, t - delay):
    - count: k's events in it that this state has processed;
    - confirmed: k's events in it confirmed anomalous by the labels received so far, each
      counted once however often its label arrives (labels name their event by the spec's
      `id_field`, which a spec with label_rate columns must have; see `streamer.labels`);
    - rate: confirmed / count, at most 1, 0 with no events.
    The delay is why the feature can be trusted: in production confirmations come late,
    and a window that ends `delay` ago holds only events whose labels are in (when they
    arrive within `delay`). Windows and delay are whole hours. `key` None: `entity_field`.
    """

    windows_seconds: list[float]
    delay_seconds: float = 604800.0
    stats: list[LabelStat] = msgspec.field(default_factory=lambda: ["count", "rate"])
    key: str | None = None

    def __post_init__(self) -> None:
        what = f"label_rate column of {self.key!r}"
        if not self.windows_seconds:
            raise ValueError(f"{what} needs at least one window")
        hours = [*self.windows_seconds, self.delay_seconds]
        if not all(0.0 <= w < math.inf and w % _HOUR == 0.0 for w in hours):
            raise ValueError(f"{what}: windows and delay_seconds must be whole hours (3600 s)")
        if min(self.windows_seconds) <= 0.0:
            raise ValueError(f"{what}: windows must be > 0 seconds")
        if len(set(self.windows_seconds)) != len(self.windows_seconds):
            raise ValueError(f"{what} has duplicate windows")
        if not self.stats or not set(self.stats) <= set(LABEL_STATS):
            raise ValueError(f"{what}: stats must be values of {list(LABEL_STATS)}")
        if len(set(self.stats)) != len(self.stats):
            raise ValueError(f"{what}: stats must be distinct")

    @property
    def reach_seconds(self) -> float:
        """How far back of an event's time a label can still change its features: the delay
        plus the longest window, plus the hour a window rounded to whole hours may reach."""
        return self.delay_seconds + max(self.windows_seconds) + _HOUR


Stateful = Rolling | SincePrevious | LabelRate
Column = Numeric | Log1p | Ratio | OneHot | HourOfDay | Rolling | SincePrevious | LabelRate


class FeatureSpec(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Which event fields become features and how; travels inside every model bundle."""

    profile: str
    entity_field: str
    time_field: str
    columns: list[Column]
    time_format: TimeFormat = "iso8601"
    id_field: str | None = None

    def __post_init__(self) -> None:
        if not self.columns:
            raise ValueError("a feature spec needs at least one column")
        names = self.feature_names()
        if len(set(names)) != len(names):
            raise ValueError("feature spec builds the same feature twice")
        if self.labeled and not self.id_field:
            raise ValueError(
                "id_field: label_rate columns count each labeled event once, by its id, "
                "however often its label arrives; set the event field that identifies an event"
            )

    @property
    def stateful(self) -> bool:
        """Whether some column depends on earlier events (build_features then needs a state)."""
        return any(isinstance(col, Stateful) for col in self.columns)

    @property
    def labeled(self) -> bool:
        """Whether some column is fed by labels (training then needs each event's label)."""
        return any(isinstance(col, LabelRate) for col in self.columns)

    @property
    def label_reach_seconds(self) -> float:
        """How old a label can be and still change a feature (0 without label_rate columns):
        what the feedback topic must keep for a restarted replica to rebuild its labels.

        >>> FeatureSpec("p", "e", "t", [LabelRate(windows_seconds=[86400.0, 30 * 86400.0],
        ...     delay_seconds=7 * 86400.0)], id_field="id").label_reach_seconds / 86400
        37.041666666666664
        """
        return max(
            (col.reach_seconds for col in self.columns if isinstance(col, LabelRate)), default=0.0
        )

    def key_of(self, col: Rolling | SincePrevious | LabelRate) -> str:
        """The entity field a stateful column is keyed by."""
        return col.key or self.entity_field

    def feature_names(self) -> list[str]:
        names: list[str] = []
        for col in self.columns:
            if isinstance(col, Rolling):
                key = self.key_of(col)
                names.extend(
                    f"{key}.{stat}({col.field},{_duration(w)})"
                    for w in col.windows_seconds
                    for stat in col.stats
                )
            elif isinstance(col, SincePrevious):
                names.append(f"{self.key_of(col)}.since_previous")
            elif isinstance(col, LabelRate):
                key, delay = self.key_of(col), _duration(col.delay_seconds)
                names.extend(
                    f"{key}.label_{stat}({_duration(w)},-{delay})"
                    for w in col.windows_seconds
                    for stat in col.stats
                )
            elif isinstance(col, Numeric):
                names.append(col.field)
            elif isinstance(col, Log1p):
                names.append(f"log1p({col.field})")
            elif isinstance(col, Ratio):
                names.append(f"{col.numerator}/{col.denominator}")
            elif isinstance(col, OneHot):
                names.extend(f"{col.field}={v}" for v in col.vocabulary)
                names.append(f"{col.field}=<other>")
            else:
                names.extend(["hour_sin", "hour_cos"])
        return names

    def standardized(self) -> np.ndarray:
        """Mask of the features a scaler should standardize (one-hot and cyclical are not)."""
        mask: list[bool] = []
        for col in self.columns:
            if isinstance(col, OneHot):
                mask.extend([False] * (len(col.vocabulary) + 1))
            elif isinstance(col, HourOfDay):
                mask.extend([False, False])
            else:
                mask.extend([True] * _width(col))
        return np.array(mask, dtype=bool)

    def unit_names(self) -> list[str]:
        """Feature names as reported in alerts, whose values are in original units."""
        names = self.feature_names()
        offset = 0
        for col in self.columns:
            if isinstance(col, Log1p):
                names[offset] = col.field
            offset += _width(col)
        return names

    def to_original_units(self, index: int, value: float) -> float:
        """Map one feature value back to the unit of its source field (log1p -> expm1;
        since_previous -> seconds)."""
        offset = 0
        for col in self.columns:
            width = _width(col)
            if index < offset + width:
                return math.expm1(value) if isinstance(col, Log1p | SincePrevious) else value
            offset += width
        raise IndexError(index)

    def event_type(self) -> type[msgspec.Struct]:
        """A msgspec Struct type that decodes and validates one event of this spec."""
        fields: dict[str, Any] = {}
        key_type = str | int
        fields[self.entity_field] = key_type
        if self.id_field:
            fields[self.id_field] = key_type
        if self.time_format == "iso8601":
            fields[self.time_field] = Annotated[datetime, msgspec.Meta(tz=True)]
        else:
            fields[self.time_field] = int | float
        for col in self.columns:
            if isinstance(col, Stateful):
                fields.setdefault(self.key_of(col), key_type)
            if isinstance(col, Numeric | Log1p | Rolling):
                fields.setdefault(col.field, float)
            elif isinstance(col, Ratio):
                fields.setdefault(col.numerator, float)
                fields.setdefault(col.denominator, float)
            elif isinstance(col, OneHot):
                fields.setdefault(col.field, str)
        return msgspec.defstruct(
            f"{self.profile.title()}Event", list(fields.items()), frozen=True, gc=False
        )


def _width(col: Column) -> int:
    if isinstance(col, OneHot):
        return len(col.vocabulary) + 1
    if isinstance(col, HourOfDay):
        return 2
    if isinstance(col, Rolling | LabelRate):
        return len(col.windows_seconds) * len(col.stats)
    return 1


def _duration(seconds: float) -> str:
    """Compact window label for feature names: 90s, 5m, 1h, 7d; other values in seconds."""
    if seconds == int(seconds):
        whole = int(seconds)
        for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
            if whole % size == 0:
                return f"{whole // size}{unit}"
        return f"{whole}s"
    return f"{seconds!r}s"


def event_seconds(spec: FeatureSpec, value: Any) -> float:
    """Event time as POSIX seconds, whatever the spec's time format."""
    if spec.time_format == "iso8601":
        return float(value.timestamp())
    if spec.time_format == "epoch_ms":
        return float(value) / 1000.0
    return float(value)


def build_features(
    spec: FeatureSpec, events: Sequence[Any], state: AggregateState | None = None
) -> np.ndarray:
    """Events (decoded with `spec.event_type()`) -> float64 matrix, one row per event.

    A stateful spec (Rolling / SincePrevious / LabelRate columns) needs `state`, which these
    events then update in order: training and the daemon feed it the same stream, so they agree.
    """
    if spec.stateful:
        if state is None:
            raise ValueError(
                f"feature spec {spec.profile!r} has stateful columns (rolling / since_previous /"
                " label_rate):"
                " build_features needs an AggregateState"
            )
        if state.spec is not spec and state.spec != spec:
            raise ValueError("the AggregateState was built for a different feature spec")
    n = len(events)
    out = np.empty((n, len(spec.feature_names())), dtype=np.float64)
    if n == 0:
        return out

    # Overflow gives inf rather than a warning: callers drop non-finite rows with a reason.
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        _fill(spec, events, out, state)
    return out


def _fill(
    spec: FeatureSpec, events: Sequence[Any], out: np.ndarray, state: AggregateState | None
) -> None:
    n = len(events)
    # Stateful columns come from one in-order pass over the events, in spec column order.
    aggregates = state.update(events) if state is not None and spec.stateful else None
    a = 0

    def column(field: str) -> np.ndarray:
        return np.fromiter((getattr(e, field) for e in events), dtype=np.float64, count=n)

    j = 0
    for col in spec.columns:
        if isinstance(col, Stateful):
            assert aggregates is not None
            width = _width(col)
            out[:, j : j + width] = aggregates[:, a : a + width]
            a += width
            j += width
        elif isinstance(col, Numeric):
            out[:, j] = column(col.field)
            j += 1
        elif isinstance(col, Log1p):
            out[:, j] = np.log1p(np.maximum(column(col.field), 0.0))
            j += 1
        elif isinstance(col, Ratio):
            num, den = column(col.numerator), column(col.denominator)
            safe = np.where(den == 0.0, 1.0, den)
            out[:, j] = np.where(den == 0.0, 0.0, num / safe)
            j += 1
        elif isinstance(col, OneHot):
            width = len(col.vocabulary) + 1
            lookup = {v: i for i, v in enumerate(col.vocabulary)}
            other = width - 1
            idx = np.fromiter(
                (lookup.get(getattr(e, col.field), other) for e in events), dtype=np.intp, count=n
            )
            block = np.zeros((n, width), dtype=np.float64)
            block[np.arange(n), idx] = 1.0
            out[:, j : j + width] = block
            j += width
        else:
            seconds = np.fromiter(
                (event_seconds(spec, getattr(e, spec.time_field)) for e in events),
                dtype=np.float64,
                count=n,
            )
            angle = (seconds % 86400.0) / 86400.0 * 2.0 * np.pi
            out[:, j] = np.sin(angle)
            out[:, j + 1] = np.cos(angle)
            j += 2
