"""Standard scaler persisted as plain JSON (never pickle), fitted once at training time.

>>> import numpy as np
>>> s = StandardScaler.fit(np.array([[1.0, 0.0], [3.0, 1.0]]), np.array([True, False]))
>>> s.transform(np.array([[2.0, 1.0]])).tolist()
[[0.0, 1.0]]
>>> StandardScaler.from_json(s.to_json()) == s
True
"""

from __future__ import annotations

import msgspec
import numpy as np


class _ScalerFile(msgspec.Struct, forbid_unknown_fields=True):
    kind: str
    feature_names: list[str]
    mean: list[float]
    scale: list[float]


class StandardScaler:
    """(x - mean) / scale per feature; features outside the fit mask pass through."""

    def __init__(self, mean: np.ndarray, scale: np.ndarray, feature_names: list[str] | None = None):
        self.mean = np.asarray(mean, dtype=np.float64)
        self.scale = np.asarray(scale, dtype=np.float64)
        if self.mean.shape != self.scale.shape or self.mean.ndim != 1:
            raise ValueError("scaler mean and scale must be vectors of one length")
        if not np.all(np.isfinite(self.mean)) or not np.all(self.scale > 0):
            raise ValueError("scaler needs finite means and positive scales")
        self.feature_names = feature_names or [f"f{i}" for i in range(self.mean.size)]
        self._inv = 1.0 / self.scale

    @classmethod
    def fit(
        cls, x: np.ndarray, mask: np.ndarray, feature_names: list[str] | None = None
    ) -> StandardScaler:
        mean = np.where(mask, x.mean(axis=0), 0.0)
        std = x.std(axis=0)
        # A constant feature would divide by zero; leave it unscaled instead.
        scale = np.where(mask & (std > 1e-12), std, 1.0)
        return cls(mean, scale, feature_names)

    def transform(self, x: np.ndarray) -> np.ndarray:
        with np.errstate(over="ignore", invalid="ignore"):  # overflow -> inf, caller rejects
            return ((x - self.mean) * self._inv).astype(np.float32)

    def inverse_transform(self, z: np.ndarray) -> np.ndarray:
        return np.asarray(z, dtype=np.float64) * self.scale + self.mean

    def to_json(self) -> bytes:
        doc = _ScalerFile("standard", self.feature_names, self.mean.tolist(), self.scale.tolist())
        return msgspec.json.format(msgspec.json.encode(doc))

    @classmethod
    def from_json(cls, data: bytes) -> StandardScaler:
        doc = msgspec.json.decode(data, type=_ScalerFile)
        if doc.kind != "standard":
            raise ValueError(f"unknown scaler kind {doc.kind!r}")
        if len(doc.feature_names) != len(doc.mean):
            raise ValueError("scaler feature_names and mean differ in length")
        return cls(np.array(doc.mean), np.array(doc.scale), doc.feature_names)

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, StandardScaler)
            and self.feature_names == other.feature_names
            and np.array_equal(self.mean, other.mean)
            and np.array_equal(self.scale, other.scale)
        )

    __hash__ = None  # type: ignore[assignment]
