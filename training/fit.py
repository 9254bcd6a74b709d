"""Fit scaler and autoencoder on history and write one versioned bundle into a registry."""

from __future__ import annotations

import logging
import shutil
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import msgspec
import numpy as np

from streamer import bundle as bundles
from streamer.config import TrainingSettings
from streamer.features import FeatureSpec
from streamer.lean import NumpyDenseScorer
from streamer.scaler import StandardScaler
from streamer.scoring import reconstruction_errors
from training.datasets import History
from training.models import build_dense_autoencoder

log = logging.getLogger(__name__)
WARM_START_QUANTILES = (0.5, 0.9, 0.99, 0.995, 0.999)


def fit_bundle(
    spec: FeatureSpec,
    history: History,
    training: TrainingSettings,
    registry: Path,
    source: str,
    verbose: int = 0,
) -> bundles.Bundle:
    """Train on `history`, write `<registry>/<version>/`, point `<registry>/current` at it."""
    import keras

    n = history.features.shape[0]
    if n < 100:
        raise ValueError(f"{source}: {n} usable events; at least 100 are needed to train")
    started = time.monotonic()
    keras.utils.set_random_seed(training.seed)
    rng = np.random.default_rng(training.seed)
    order = rng.permutation(n)
    n_val = max(1, int(n * training.validation_split))
    val_idx, train_idx = np.sort(order[:n_val]), order[n_val:]

    names = spec.feature_names()
    scaler = StandardScaler.fit(history.features[train_idx], spec.standardized(), names)
    x_train = scaler.transform(history.features[train_idx])
    x_val = scaler.transform(history.features[val_idx])

    model = build_dense_autoencoder(
        len(names), training.hidden_units, training.bottleneck, training.learning_rate
    )
    stop = keras.callbacks.EarlyStopping(
        monitor="val_loss", patience=training.patience, restore_best_weights=True
    )
    fitted = model.fit(
        x_train, x_train,
        validation_data=(x_val, x_val),
        epochs=training.epochs,
        batch_size=training.batch_size,
        shuffle=True,
        callbacks=[stop],
        verbose=verbose,
    )  # fmt: skip
    history_dict: dict[str, list[float]] = {
        k: [float(v) for v in vs] for k, vs in fitted.history.items()
    }
    # Held-out errors, in event order: what the live stream should look like to the threshold.
    val_scores = reconstruction_errors(x_val, model.predict(x_val, verbose=0)).mean(axis=1)
    quantiles = {str(q): float(np.quantile(val_scores, q)) for q in WARM_START_QUANTILES}

    registry.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=registry))
    try:
        model.save(staging / bundles.MODEL_FILE)
        NumpyDenseScorer.save_from_keras(model, staging / bundles.DENSE_WEIGHTS_FILE)
        sample = x_val[:16]
        parity = bundles.Parity(sample.tolist(), model.predict(sample, verbose=0).tolist())
        (staging / bundles.PARITY_FILE).write_bytes(msgspec.json.encode(parity))
        (staging / bundles.SCALER_FILE).write_bytes(scaler.to_json())
        (staging / bundles.SPEC_FILE).write_bytes(msgspec.json.format(msgspec.json.encode(spec)))
        warm = bundles.WarmStart(errors=val_scores.tolist(), quantiles=quantiles)
        (staging / bundles.THRESHOLD_FILE).write_bytes(msgspec.json.encode(warm))
        best = int(np.argmin(history_dict["val_loss"]))
        manifest = bundles.write_manifest(
            staging,
            model_kind="dense",
            created_at=datetime.now(UTC).isoformat(timespec="seconds"),
            feature_names=names,
            data=_data_summary(history, source, n_train=train_idx.size, n_val=n_val),
            training={
                "settings": msgspec.to_builtins(training),
                "epochs_run": len(history_dict["loss"]),
                "best_epoch": best + 1,
                "best_val_loss": history_dict["val_loss"][best],
                "final_loss": history_dict["loss"][-1],
                "history": history_dict,
                "val_error_quantiles": quantiles,
                "seconds": round(time.monotonic() - started, 2),
            },
        )
        target = registry / manifest.version
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    bundles.set_current(registry, manifest.version)
    log.info(
        "bundle %s: %d events, %d epochs, val loss %.4g, p99.9 held-out error %.4g",
        manifest.version, n, len(history_dict["loss"]), history_dict["val_loss"][best],
        quantiles["0.999"],
    )  # fmt: skip
    return bundles.load(target, expected_spec=spec)


def _data_summary(history: History, source: str, n_train: int, n_val: int) -> dict[str, Any]:
    x = history.features
    return {
        "source": source,
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
