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
from typing import Annotated, Any, Literal

import msgspec
import numpy as np

TimeFormat = Literal["iso8601", "epoch_ms", "epoch_s"]


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


Column = Numeric | Log1p | Ratio | OneHot | HourOfDay


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

    def feature_names(self) -> list[str]:
        names: list[str] = []
        for col in self.columns:
            if isinstance(col, Numeric):
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
                mask.append(True)
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
        """Map one feature value back to the unit of its source field (log1p -> expm1)."""
        offset = 0
        for col in self.columns:
            width = _width(col)
            if index < offset + width:
                return math.expm1(value) if isinstance(col, Log1p) else value
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
            if isinstance(col, Numeric | Log1p):
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
    return 1


def event_seconds(spec: FeatureSpec, value: Any) -> float:
    """Event time as POSIX seconds, whatever the spec's time format."""
    if spec.time_format == "iso8601":
        return float(value.timestamp())
    if spec.time_format == "epoch_ms":
        return float(value) / 1000.0
    return float(value)


def build_features(spec: FeatureSpec, events: Sequence[Any]) -> np.ndarray:
    """Events (decoded with `spec.event_type()`) -> float64 matrix, one row per event."""
    n = len(events)
    out = np.empty((n, len(spec.feature_names())), dtype=np.float64)
    if n == 0:
        return out

    # Overflow gives inf rather than a warning: callers drop non-finite rows with a reason.
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        _fill(spec, events, out)
    return out


def _fill(spec: FeatureSpec, events: Sequence[Any], out: np.ndarray) -> None:
    n = len(events)

    def column(field: str) -> np.ndarray:
        return np.fromiter((getattr(e, field) for e in events), dtype=np.float64, count=n)

    j = 0
    for col in spec.columns:
        if isinstance(col, Numeric):
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
