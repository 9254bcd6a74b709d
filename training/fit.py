"""Fit scaler and autoencoder on history and write one versioned bundle into a registry."""

from __future__ import annotations

import logging
import shutil
import tempfile
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import msgspec
import numpy as np

from streamer import bundle as bundles
from streamer.config import TrainingSettings
from streamer.drift import build_reference
from streamer.features import FeatureSpec
from streamer.lean import NumpyDenseScorer, NumpyDenseWindowScorer, NumpyLSTMScorer
from streamer.ranges import training_range
from streamer.scaler import Scaler
from streamer.scoring import (
    event_scores,
    feature_errors,
    reconstruction_errors,
    resolve_weights,
)
from streamer.windows import sliding_windows
from training.datasets import History
from training.models import (
    build_dense_autoencoder,
    build_dense_window_autoencoder,
    build_fold_autoencoders,
    build_lstm_autoencoder,
    early_stopping,
    fold_target,
)

log = logging.getLogger(__name__)
WARM_START_QUANTILES = (0.5, 0.9, 0.99, 0.995, 0.999)


@dataclass(frozen=True)
class _Split:
    """Scaled model inputs, split by `_dense_split` or `_window_split`."""

    scaler: Scaler
    x_train: np.ndarray
    x_val: np.ndarray  # held out, in event order
    data: dict[str, Any]  # for the manifest's data summary
    rows_train: np.ndarray  # the scaled training rows (n, d): the drift reference's features
    # Each scaled feature's (min, max) over every history row: the range rule's start.
    feature_range: tuple[list[float], list[float]]


def fit_bundle(
    spec: FeatureSpec,
    history: History,
    training: TrainingSettings,
    registry: Path,
    source: str,
    verbose: int = 0,
    report: bool = False,
    candidate: bool = False,
) -> bundles.Bundle:
    """Train on `history`, write `<registry>/<version>/`, point `<registry>/current` at it
    (or, with `candidate`, `<registry>/candidate`: the daemon shadow-scores it first).

    `training.model` picks the model: "dense" scores one event's row, "lstm" the window of
    its entity's last `training.window_length` rows (needs `history.keys`), "dense_window"
    the same window flattened into a dense autoencoder. Each epoch is
    logged at INFO whatever `verbose` (Keras's own progress). `report` also writes
    `report.html` (training/bundle_report.py) into the bundle, outside its hashed files.
    """
    import keras

    n = history.features.shape[0]
    if n < 100:
        raise ValueError(f"{source}: {n} usable events; at least 100 are needed to train")
    started = time.monotonic()
    keras.utils.set_random_seed(training.seed)
    names = spec.feature_names()
    score_weights = (
        resolve_weights(names, training.score_weights) if training.score_weights else None
    )
    window_length: int | None = None
    visible: list[int] | None = None  # forecast: the context features the model sees
    if training.model == "lstm":
        window_length = training.window_length
        split = _window_split(spec, history, training, source)
        model = build_lstm_autoencoder(
            len(names), window_length, training.lstm_units, training.learning_rate
        )
        parity_size = 8
    elif training.model == "dense_window":
        window_length = training.window_length
        width = window_length * len(names)
        if training.bottleneck >= width:
            # A bottleneck as wide as the window lets the model learn to copy its input.
            raise ValueError(
                f"training.bottleneck = {training.bottleneck} must be below the window's "
                f"{width} values (window_length {window_length} x {len(names)} features)"
            )
        split = _window_split(spec, history, training, source)
        model = build_dense_window_autoencoder(
            len(names), window_length, training.hidden_units, training.bottleneck,
            training.learning_rate, training.forecast,
        )  # fmt: skip
        parity_size = 8
    else:
        split = _dense_split(spec, history, training)
        if training.forecast:  # the model sees the context features (weight 0) only
            assert score_weights is not None  # TrainingSettings: forecast needs the weights
            visible = np.flatnonzero(score_weights == 0).tolist()
            if not visible:  # a later pattern can outweigh the 0
                raise ValueError(
                    "training.forecast: no feature has score weight 0 (context) in "
                    f"training.score_weights {training.score_weights}"
                )
        model = build_dense_autoencoder(
            len(names), training.hidden_units, training.bottleneck, training.learning_rate,
            visible,
        )  # fmt: skip
        parity_size = 16
    x_train, x_val = split.x_train, split.x_val
    stop = early_stopping(training.patience)
    fitted = model.fit(
        x_train, x_train,
        validation_data=(x_val, x_val),
        epochs=training.epochs,
        batch_size=training.batch_size,
        shuffle=True,
        callbacks=[stop, _epoch_logger(keras, training.epochs)],
        verbose=verbose,
    )  # fmt: skip
    history_dict: dict[str, list[float]] = {
        k: [float(v) for v in vs] for k, vs in fitted.history.items()
    }
    if len(history_dict["loss"]) < training.epochs:
        log.info(
            "early stop after epoch %d/%d: val_loss has not improved for %d epochs",
            len(history_dict["loss"]), training.epochs, training.patience,
        )  # fmt: skip
    # Held-out errors, in event order: what the live stream should look like to the threshold.
    # Scored as the daemon scores (event_scores: the cap and the weights of the bundle).
    val_errors = feature_errors(
        reconstruction_errors(x_val, model.predict(x_val, verbose=0)), training.forecast
    )
    val_scores = event_scores(val_errors, training.error_cap, score_weights)
    warm_scores = val_scores
    if training.warm_start_folds:
        warm_scores = _out_of_fold_scores(
            split.scaler.transform(history.features), training, visible, score_weights
        )
    quantiles = {str(q): float(np.quantile(warm_scores, q)) for q in WARM_START_QUANTILES}
    # Which features the model rebuilds worst on held-out data (the report's bar chart).
    feature_error = val_errors.mean(axis=0)

    registry.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=registry))
    try:
        model.save(staging / bundles.MODEL_FILE)
        weights = staging / bundles.NUMPY_WEIGHTS[training.model]
        if training.model == "lstm":
            NumpyLSTMScorer.save_from_keras(model, weights)
        elif training.model == "dense_window":
            NumpyDenseWindowScorer.save_from_keras(model, weights)
        else:
            NumpyDenseScorer.save_from_keras(model, weights)
        sample = x_val[:parity_size]
        parity = bundles.Parity(sample.tolist(), model.predict(sample, verbose=0).tolist())
        (staging / bundles.PARITY_FILE).write_bytes(msgspec.json.encode(parity))
        (staging / bundles.SCALER_FILE).write_bytes(split.scaler.to_json())
        (staging / bundles.SPEC_FILE).write_bytes(msgspec.json.format(msgspec.json.encode(spec)))
        low, high = split.feature_range
        warm = bundles.WarmStart(
            errors=warm_scores.tolist(), quantiles=quantiles, feature_low=low, feature_high=high
        )
        (staging / bundles.THRESHOLD_FILE).write_bytes(msgspec.json.encode(warm))
        drift = build_reference(names, split.rows_train, val_scores)
        (staging / bundles.DRIFT_FILE).write_bytes(msgspec.json.encode(drift))
        best = int(np.argmin(history_dict["val_loss"]))
        manifest = bundles.write_manifest(
            staging,
            model_kind=training.model,
            window_length=window_length,
            error_cap=training.error_cap,
            score_weights=None if score_weights is None else score_weights.tolist(),
            forecast=training.forecast,
            created_at=datetime.now(UTC).isoformat(timespec="seconds"),
            feature_names=names,
            data={"source": source, **split.data},
            training={
                "settings": msgspec.to_builtins(training),
                "epochs_run": len(history_dict["loss"]),
                "best_epoch": best + 1,
                "best_val_loss": history_dict["val_loss"][best],
                "final_loss": history_dict["loss"][-1],
                "history": history_dict,
                "val_error_quantiles": quantiles,
                "val_feature_error": dict(zip(names, feature_error.tolist(), strict=True)),
                "seconds": round(time.monotonic() - started, 2),
            },
        )
        if report:
            # After the manifest: a report documents the bundle and is not part of its
            # version (bundles.load ignores files the manifest does not list).
            from training.bundle_report import REPORT_FILE, write_report

            try:
                write_report(staging, manifest, val_scores)
            except ImportError as exc:  # matplotlib: a dev extra, not a training need
                log.warning("no report.html: %s", exc)
            except Exception:  # a broken plot must not cost the trained model
                log.exception("no report.html: writing it failed")
                (staging / REPORT_FILE).unlink(missing_ok=True)
        target = registry / manifest.version
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if candidate:
        bundles.set_candidate(registry, manifest.version)
    else:
        bundles.set_current(registry, manifest.version)
    log.info(
        "bundle %s (%s): %d events, %d epochs, val loss %.4g, p99.9 held-out error %.4g",
        manifest.version, training.model, n, len(history_dict["loss"]),
        history_dict["val_loss"][best], quantiles["0.999"],
    )  # fmt: skip
    return bundles.load(target, expected_spec=spec)


def _dense_split(spec: FeatureSpec, history: History, training: TrainingSettings) -> _Split:
    """Rows, a random share held out (rows are independent of each other)."""
    n = history.features.shape[0]
    rng = np.random.default_rng(training.seed)
    order = rng.permutation(n)
    n_val = max(1, int(n * training.validation_split))
    val_idx, train_idx = np.sort(order[:n_val]), order[n_val:]
    scaler = Scaler.fit(
        history.features[train_idx], spec.standardized(), spec.feature_names(), training.scaler
    )
    x_train = scaler.transform(history.features[train_idx])
    x_val = scaler.transform(history.features[val_idx])
    return _Split(
        scaler,
        x_train,
        x_val,
        _data_summary(history, n_train=train_idx.size, n_val=n_val),
        rows_train=x_train,
        feature_range=training_range(x_train, x_val),  # together, every history row
    )


def _out_of_fold_scores(
    x: np.ndarray,
    training: TrainingSettings,
    visible: list[int] | None,
    score_weights: np.ndarray | None,
) -> np.ndarray:
    """`training.warm_start_folds`: every history row's score (in event order) from a model
    of the bundle's shape that did not train on it. The rows are dealt into k folds at
    random (rows are independent to a dense model); k models train side by side, each on
    the other folds, early stopping on the mean error of their own folds."""
    k, n = training.warm_start_folds, x.shape[0]
    fold = np.empty(n, dtype=np.int64)
    fold[np.random.default_rng([training.seed, k]).permutation(n)] = np.arange(n) % k
    model = build_fold_autoencoders(
        x.shape[1], training.hidden_units, training.bottleneck, training.learning_rate,
        visible, k,
    )  # fmt: skip
    stop = early_stopping(training.patience)
    fitted = model.fit(
        x, fold_target(x, fold, k, held_out=False),
        validation_data=(x, fold_target(x, fold, k, held_out=True)),
        epochs=training.epochs, batch_size=training.batch_size, shuffle=True,
        callbacks=[stop], verbose=0,
    )  # fmt: skip
    out = model.predict(x, verbose=0).reshape(n, k, x.shape[1])
    own = out[np.arange(n), fold]  # each row as rebuilt by the member that never saw it
    log.info(
        "warm start: out-of-fold errors of %d rows from %d models (%d epochs)",
        n, k, len(fitted.history["loss"]),
    )  # fmt: skip
    errors = feature_errors(reconstruction_errors(x, own), training.forecast)
    return event_scores(errors, training.error_cap, score_weights)


def _window_split(
    spec: FeatureSpec, history: History, training: TrainingSettings, source: str
) -> _Split:
    """Windows of each entity's scaled rows (streamer/windows.py, as the daemon builds them),
    the last `validation_split` share of them held out."""
    n, length = history.features.shape[0], training.window_length
    if len(history.keys) != n:
        raise ValueError(
            f"{source}: a windowed ({training.model}) model needs the entity key of every row "
            f"({len(history.keys)} keys for {n} rows)"
        )
    # Which rows complete a window depends on the keys alone (zero features: no copies), so
    # the split is known before the scaler is fitted.
    _, ends = sliding_windows(history.keys, np.empty((n, 0), np.float32), length)
    m = ends.size
    if m < 100:
        raise ValueError(
            f"{source}: {m} windows of {length} rows; at least 100 are needed to train"
        )
    # Hold out the last windows in event order, not a random share: windows of one entity
    # overlap in length - 1 rows, so random validation windows would be near-copies of
    # training ones, and early stopping would not see overfitting. Later-in-time validation
    # is also what serving looks like. The scaler sees only the rows before the first
    # held-out window's last row: every training window, no held-out one.
    n_val = max(1, int(m * training.validation_split))
    boundary = int(ends[m - n_val])
    scaler = Scaler.fit(
        history.features[:boundary], spec.standardized(), spec.feature_names(), training.scaler
    )
    scaled = scaler.transform(history.features)
    windows, _ = sliding_windows(history.keys, scaled, length)
    data = _data_summary(history, n_train=boundary, n_val=n - boundary)
    data["windows"] = {"length": length, "train": m - n_val, "validation": n_val}
    # The daemon sees rows one by one, so the drift reference is per row, not per window.
    return _Split(
        scaler, windows[: m - n_val], windows[m - n_val :], data, scaled[:boundary],
        feature_range=training_range(scaled),
    )  # fmt: skip


def _epoch_logger(keras: Any, epochs: int) -> Any:
    """A callback that logs each epoch's losses and time: progress a person can follow
    without Keras's per-batch output (`--verbose`)."""
    started = [time.monotonic()]

    def begin(epoch: int, logs: dict[str, float] | None = None) -> None:
        started[0] = time.monotonic()

    def end(epoch: int, logs: dict[str, float] | None = None) -> None:
        logs = logs or {}
        log.info(
            "epoch %d/%d: loss %.4g, val_loss %.4g (%.1f s)",
            epoch + 1, epochs, logs.get("loss", float("nan")),
            logs.get("val_loss", float("nan")), time.monotonic() - started[0],
        )  # fmt: skip

    return keras.callbacks.LambdaCallback(on_epoch_begin=begin, on_epoch_end=end)


def _data_summary(history: History, n_train: int, n_val: int) -> dict[str, Any]:
    x = history.features
    return {
        "events": int(x.shape[0]),
        "rejected": history.rejected,
        "train_events": n_train,
        "validation_events": n_val,
        "first_event_time": _iso(float(history.event_seconds.min())),
        "last_event_time": _iso(float(history.event_seconds.max())),
        "feature_mean": x.mean(axis=0).tolist(),
        "feature_std": x.std(axis=0).tolist(),
    }


def _iso(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).isoformat(timespec="seconds")
