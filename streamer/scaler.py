"""The feature scaler persisted as plain JSON (never pickle), fitted once at training time.

Two kinds, both (x - center) / scale per feature: "standard" centres on the mean and divides
by the standard deviation; "robust" centres on the median and divides by the interquartile
range / 1.349 (the standard deviation of a normal distribution with that IQR), so a few
extreme training rows (an incident left in the history, a heavy tail) neither shift the
centre nor shrink every other row towards it.

>>> import numpy as np
>>> s = Scaler.fit(np.array([[1.0, 0.0], [3.0, 1.0]]), np.array([True, False]))
>>> s.transform(np.array([[2.0, 1.0]])).tolist()
[[0.0, 1.0]]
>>> Scaler.from_json(s.to_json()) == s
True
>>> x = np.array([[1.0], [2.0], [3.0], [4.0], [1000.0]])
>>> r = Scaler.fit(x, np.array([True]), kind="robust")
>>> float(r.center[0]), round(float(r.scale[0]), 3)
(3.0, 1.483)
"""

from __future__ import annotations

from typing import Literal

import msgspec
import numpy as np

ScalerKind = Literal["standard", "robust"]
SCALER_KINDS: tuple[ScalerKind, ...] = ("standard", "robust")
_IQR_PER_STD = 1.3489795003921634  # IQR of the standard normal distribution


class _StandardFile(msgspec.Struct, tag_field="kind", tag="standard", forbid_unknown_fields=True):
    # The layout of every scaler.json before "robust" existed; kept as it was.
    feature_names: list[str]
    mean: list[float]
    scale: list[float]


class _RobustFile(msgspec.Struct, tag_field="kind", tag="robust", forbid_unknown_fields=True):
    feature_names: list[str]
    median: list[float]
    scale: list[float]


class Scaler:
    """(x - center) / scale per feature; features outside the fit mask pass through."""

    def __init__(
        self,
        center: np.ndarray,
        scale: np.ndarray,
        feature_names: list[str] | None = None,
        kind: ScalerKind = "standard",
    ):
        self.center = np.asarray(center, dtype=np.float64)
        self.scale = np.asarray(scale, dtype=np.float64)
        if self.center.shape != self.scale.shape or self.center.ndim != 1:
            raise ValueError("scaler centers and scales must be vectors of one length")
        if not np.all(np.isfinite(self.center)) or not np.all(self.scale > 0):
            raise ValueError("scaler needs finite centers and positive scales")
        if kind not in SCALER_KINDS:
            raise ValueError(f"unknown scaler kind {kind!r}")
        self.kind: ScalerKind = kind
        self.feature_names = feature_names or [f"f{i}" for i in range(self.center.size)]
        self._inv = 1.0 / self.scale

    @classmethod
    def fit(
        cls,
        x: np.ndarray,
        mask: np.ndarray,
        feature_names: list[str] | None = None,
        kind: ScalerKind = "standard",
    ) -> Scaler:
        std = x.std(axis=0)
        if kind == "robust":
            q1, median, q3 = np.percentile(x, [25.0, 50.0, 75.0], axis=0)
            center = median
            # A feature that is constant on half its rows (a count that is mostly 0) has
            # no IQR; its standard deviation is the next best spread.
            spread = np.where(q3 - q1 > 1e-12, (q3 - q1) / _IQR_PER_STD, std)
        elif kind == "standard":
            center, spread = x.mean(axis=0), std
        else:
            raise ValueError(f"unknown scaler kind {kind!r}")
        # A constant feature would divide by zero; leave it unscaled instead.
        scale = np.where(mask & (spread > 1e-12), spread, 1.0)
        return cls(np.where(mask, center, 0.0), scale, feature_names, kind)

    def transform(self, x: np.ndarray) -> np.ndarray:
        with np.errstate(over="ignore", invalid="ignore"):  # overflow -> inf, caller rejects
            return ((x - self.center) * self._inv).astype(np.float32)

    def inverse_transform(self, z: np.ndarray) -> np.ndarray:
        return np.asarray(z, dtype=np.float64) * self.scale + self.center

    def to_json(self) -> bytes:
        names, center, scale = self.feature_names, self.center.tolist(), self.scale.tolist()
        doc: _StandardFile | _RobustFile = (
            _RobustFile(names, center, scale)
            if self.kind == "robust"
            else _StandardFile(names, center, scale)
        )
        return msgspec.json.format(msgspec.json.encode(doc))

    @classmethod
    def from_json(cls, data: bytes) -> Scaler:
        try:
            doc = msgspec.json.decode(data, type=_StandardFile | _RobustFile)
        except msgspec.ValidationError as e:
            raise ValueError(f"scaler file: {e}") from None
        center = doc.median if isinstance(doc, _RobustFile) else doc.mean
        if len(doc.feature_names) != len(center):
            raise ValueError("scaler feature_names and centers differ in length")
        kind: ScalerKind = "robust" if isinstance(doc, _RobustFile) else "standard"
        return cls(np.array(center), np.array(doc.scale), doc.feature_names, kind)

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, Scaler)
            and self.kind == other.kind
            and self.feature_names == other.feature_names
            and np.array_equal(self.center, other.center)
            and np.array_equal(self.scale, other.scale)
        )

    __hash__ = None  # type: ignore[assignment]
