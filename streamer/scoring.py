"""Scorers: scaled feature rows in, reconstruction out. Higher error = more anomalous."""

from __future__ import annotations

import fnmatch
from pathlib import Path
from typing import Any, Protocol

import numpy as np


class Scorer(Protocol):
    kind: str
    n_features: int
    # None: one row per event, x is (n, d). Else x is (n, window_length, d): each event's
    # entity's last window_length rows (streamer/windows.py).
    window_length: int | None

    def reconstruct(self, x: np.ndarray) -> np.ndarray:
        """Scaled float32 rows (n, d) or windows (n, L, d) -> the same shape, in one call."""
        ...


def reconstruction_errors(x: np.ndarray, reconstructed: np.ndarray) -> np.ndarray:
    """Squared errors shaped like x, (n, d) or (n, L, d); `event_scores` makes them scores."""
    diff = np.asarray(x, dtype=np.float64) - np.asarray(reconstructed, dtype=np.float64)
    return diff * diff


def feature_errors(errors: np.ndarray, last_step: bool = False) -> np.ndarray:
    """(n, d) per-feature errors: a window's (n, L, d) are averaged over its time steps, or
    with `last_step` (a forecast bundle) taken from its last step, the event's own row.

    >>> e = np.array([[[1.0], [3.0]]])
    >>> feature_errors(e).tolist(), feature_errors(e, last_step=True).tolist()
    ([[2.0]], [[3.0]])
    """
    if errors.ndim != 3:
        return errors
    return errors[:, -1, :] if last_step else errors.mean(axis=1)


def event_scores(
    features: np.ndarray, cap: float | None = None, weights: np.ndarray | None = None
) -> np.ndarray:
    """Each event's score: the mean of its (n, d) feature errors, each counted at most `cap`
    (`training.error_cap`), so one wild feature weighs no more than a few that agree;
    with `weights` (`training.score_weights`, one per feature) the weighted mean.

    >>> event_scores(np.array([[100.0, 0.0], [9.0, 9.0]]), cap=16.0).tolist()
    [8.0, 9.0]
    >>> event_scores(np.array([[100.0, 0.0]])).tolist()
    [50.0]
    >>> event_scores(np.array([[100.0, 2.0]]), weights=np.array([0.0, 1.0])).tolist()
    [2.0]
    """
    if cap is not None:
        features = np.minimum(features, cap)
    if weights is not None:
        return features @ (weights / weights.sum())
    return features.mean(axis=1)


def resolve_weights(names: list[str], patterns: dict[str, float]) -> np.ndarray:
    """One weight per feature name: the last pattern (fnmatch) that matches it, else 1.

    >>> resolve_weights(["a.x", "a.y", "b.x"], {"a.*": 0.0, "a.y": 2.0}).tolist()
    [0.0, 2.0, 1.0]
    """
    weights = np.ones(len(names))
    for pattern, weight in patterns.items():
        hits = [j for j, name in enumerate(names) if fnmatch.fnmatchcase(name, pattern)]
        if not hits:
            raise ValueError(
                f"training.score_weights: {pattern!r} matches no feature (features: "
                f"{', '.join(names)})"
            )
        weights[hits] = weight
    if not weights.sum() > 0:
        raise ValueError("training.score_weights: at least one feature must weigh more than 0")
    return weights


class KerasScorer:
    """A Keras autoencoder called as one compiled graph per batch.

    `model.predict` costs milliseconds of Python per call whatever the batch; a `tf.function`
    with a fixed input signature traces once and then runs each batch in one graph call.
    """

    def __init__(self, model: Any, kind: str = "dense") -> None:
        import tensorflow as tf  # imported here so `--help` and config checks stay fast

        self.kind = kind
        self._model = model
        shape = tuple(model.inputs[0].shape)  # (None, d) or, for windows, (None, L, d)
        width = int(shape[-1])
        self.n_features = width
        self.window_length: int | None = int(shape[1]) if len(shape) == 3 else None
        self._call = tf.function(
            lambda x: model(x, training=False),
            input_signature=[tf.TensorSpec([None, *shape[1:]], tf.float32)],
            reduce_retracing=True,
        )

    @classmethod
    def load(cls, path: Path, kind: str = "dense") -> KerasScorer:
        import keras

        # safe_mode refuses lambda layers and other code smuggled into a saved model.
        model = keras.models.load_model(path, compile=False, safe_mode=True)
        return cls(model, kind)

    def reconstruct(self, x: np.ndarray) -> np.ndarray:
        if x.shape[0] == 0:
            return np.empty_like(x, dtype=np.float32)
        return np.asarray(self._call(np.ascontiguousarray(x, dtype=np.float32)))
