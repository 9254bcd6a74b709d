"""Reference detectors measured in the same run as ours (see `../shared/data/README.md`).

B1, the seeds' approach: min-max scaling fitted on the training rows, a dense autoencoder
(in-32-16-b-16-32-in, MSE, Adam, early stopping), per-row mean squared error, and a static
threshold at a quantile (0.99) of the training rows' errors; nothing rolls or learns later.
B2, a rolling z-score: each row against the mean and standard deviation of the previous
`window_rows` rows of its series, score = max |z| over features, alert when above `z`.

>>> x = np.concatenate([np.zeros(50), [10.0], np.zeros(5)]).reshape(-1, 1)
>>> x[:50, 0] = np.tile([0.0, 1.0], 25)
>>> z = rolling_z(x, start=45, window_rows=20)
>>> [round(float(v), 2) for v in z[4:7]]   # rows 49, 50 (the spike), 51
[1.0, 19.0, 0.47]
"""

from __future__ import annotations

from dataclasses import dataclass

import msgspec
import numpy as np

from streamer.config import TrainingSettings
from streamer.features import FeatureSpec
from training.models import build_dense_autoencoder, early_stopping


class BaselineSettings(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    b1: bool = True
    b1_quantile: float = 0.99
    b1_hidden_units: list[int] = msgspec.field(default_factory=lambda: [32, 16])
    b2: bool = True
    b2_window_rows: int = 100
    b2_z: float = 3.0
    all_rows: bool = True  # the trivial "alert on every row" reference
    # The baselines' own features when they should differ from ours (e.g. every sensor, as the
    # published baseline used, while our detector leaves some out); None: the same as ours.
    features: FeatureSpec | None = None

    def __post_init__(self) -> None:
        if not 0.0 < self.b1_quantile < 1.0:
            raise ValueError("baselines.b1_quantile must be in (0, 1)")
        if self.b2_window_rows < 2:
            raise ValueError("baselines.b2_window_rows must be >= 2")


@dataclass(frozen=True)
class BaselineResult:
    scores: np.ndarray  # one per test row
    flags: np.ndarray
    threshold: float


def b1(
    x_train: np.ndarray, x_test: np.ndarray, training: TrainingSettings, settings: BaselineSettings
) -> BaselineResult:
    """Min-max scaled dense autoencoder with a static training-error quantile threshold."""
    import keras

    keras.utils.set_random_seed(training.seed)
    low, high = x_train.min(axis=0), x_train.max(axis=0)
    span = np.where(high - low > 1e-12, high - low, 1.0)
    z_train = ((x_train - low) / span).astype(np.float32)
    z_test = ((x_test - low) / span).astype(np.float32)
    model = build_dense_autoencoder(
        x_train.shape[1], settings.b1_hidden_units, training.bottleneck, training.learning_rate
    )
    stop = early_stopping(training.patience)
    model.fit(
        z_train, z_train,
        validation_split=training.validation_split,
        epochs=training.epochs,
        batch_size=training.batch_size,
        shuffle=True,
        callbacks=[stop],
        verbose=0,
    )  # fmt: skip
    # A direct call, not predict(): predict retraces a graph per new model and warns about it.
    train_err = _mse(z_train, np.asarray(model(z_train, training=False)))
    test_err = _mse(z_test, np.asarray(model(z_test, training=False)))
    threshold = float(np.quantile(train_err, settings.b1_quantile))
    return BaselineResult(test_err, test_err > threshold, threshold)


def _mse(x: np.ndarray, recon: np.ndarray) -> np.ndarray:
    d = np.asarray(x, dtype=np.float64) - np.asarray(recon, dtype=np.float64)
    return (d * d).mean(axis=1)


def rolling_z(x: np.ndarray, start: int, window_rows: int, chunk_rows: int = 2048) -> np.ndarray:
    """max |z| of rows [start, n) against the previous `window_rows` rows (fewer at the start).

    A feature constant over the window gives z = 0 when the row equals it and inf otherwise.
    """
    n = x.shape[0]
    out = np.zeros(n - start, dtype=np.float64)
    # Rows with less than a full window behind them use what there is (two rows at least).
    for i in range(max(start, 2), min(n, window_rows)):
        out[i - start] = _max_abs_z(x[i], x[:i])
    for a in range(max(start, window_rows), n, chunk_rows):
        b = min(n, a + chunk_rows)
        # Window k of this view holds the `window_rows` rows just before row a + k.
        view = np.lib.stride_tricks.sliding_window_view(
            x[a - window_rows : b - 1], window_rows, axis=0
        )
        out[a - start : b - start] = _z(x[a:b], view.mean(axis=2), view.std(axis=2))
    return out


def _max_abs_z(row: np.ndarray, past: np.ndarray) -> float:
    return float(_z(row[None, :], past.mean(axis=0)[None, :], past.std(axis=0)[None, :])[0])


def _z(rows: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    dev = np.abs(rows - mean)
    flat = std <= 1e-12
    with np.errstate(divide="ignore", invalid="ignore"):
        z = np.where(flat, np.where(dev <= 1e-12, 0.0, np.inf), dev / np.where(flat, 1.0, std))
    return np.asarray(z.max(axis=1), dtype=np.float64)


def b2(x: np.ndarray, start: int, settings: BaselineSettings) -> BaselineResult:
    """Rolling z-score over the whole series, judged on rows [start, n)."""
    scores = rolling_z(x, start, settings.b2_window_rows)
    return BaselineResult(scores, scores > settings.b2_z, settings.b2_z)
