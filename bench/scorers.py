"""The numpy runtime's forward pass per model kind: the dense model on one row per event (the
baseline), and the two windowed kinds, dense_window and lstm, on each event's window,
measured in the same run. No pipeline, no Kafka.

    .venv/bin/python bench/scorers.py [--features 5] [--window 30] [--batches 1,100,1000,10000]
        [--repeats 5] [--min-seconds 0.5]

The models are training/models.py's, at the daemon's default sizes (dense and dense_window:
hidden [32, 16], bottleneck 4; lstm: units [64, 32]), with Keras's random initial weights
(a forward pass costs the same whatever the weights); each is converted the way `training
fit` writes a bundle (`save_from_keras`) and loaded as the daemon's numpy scorer, which must
rebuild Keras's output within a bundle's parity allowance (exit 1 otherwise). Each batch
size is timed with `reconstruct` on batches cut from 20,000 random scaled rows (or windows),
cycling, until `--min-seconds` have gone by; repeats interleaved (baseline, candidates,
again), median. One BLAS thread, as the daemon's numpy runtime usually gets one core.

Prints a markdown table: ms per batch, us per event, and the ratio to the dense model on rows.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

if __name__ == "__main__":  # a test that imports it leaves its process's environment alone
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np

from bench.timing import timed
from streamer.bundle import parity_gap
from streamer.lean import NumpyDenseScorer, NumpyDenseWindowScorer, NumpyLSTMScorer

EVENTS = 20_000
BASELINE = "dense (the event's row)"


def scorers(features: int, window: int, workdir: Path) -> dict[str, tuple[Any, Any]]:
    """(numpy scorer, Keras model) per kind, at the default sizes of TrainingSettings."""
    import keras

    from streamer.config import TrainingSettings
    from training.models import (
        build_dense_autoencoder,
        build_dense_window_autoencoder,
        build_lstm_autoencoder,
    )

    keras.utils.set_random_seed(7)
    t = TrainingSettings()
    models = {
        BASELINE: (
            build_dense_autoencoder(features, t.hidden_units, t.bottleneck, t.learning_rate),
            NumpyDenseScorer,
        ),
        "dense_window (the event's window)": (
            build_dense_window_autoencoder(
                features, window, t.hidden_units, t.bottleneck, t.learning_rate
            ),
            NumpyDenseWindowScorer,
        ),
        "lstm (the event's window)": (
            build_lstm_autoencoder(features, window, t.lstm_units, t.learning_rate),
            NumpyLSTMScorer,
        ),
    }
    out = {}
    for k, (name, (model, kind)) in enumerate(models.items()):
        path = workdir / f"weights-{k}.npz"
        kind.save_from_keras(model, path)
        out[name] = (kind.load(path), model)
    return out


def parity(scorer: Any, model: Any, x: np.ndarray) -> tuple[float, float]:
    """(largest difference between the numpy scorer and Keras on x, the bundle's allowance)."""
    return parity_gap(x, scorer.reconstruct(x), model.predict(x, verbose=0))


def batches(x: np.ndarray, size: int) -> list[np.ndarray]:
    """Contiguous batches of `size` cut from x (at least one)."""
    return [x[i : i + size] for i in range(0, max(1, x.shape[0] - size + 1), size)]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--features", type=int, default=5)
    ap.add_argument("--window", type=int, default=30, help="rows per window")
    ap.add_argument("--batches", default="1,100,1000,10000", help="events per call")
    ap.add_argument("--events", type=int, default=EVENTS, help="rows (windows) to cut from")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--min-seconds", type=float, default=0.5)
    args = ap.parse_args(argv)
    sizes = [int(x) for x in args.batches.split(",")]
    if args.events < max(sizes):
        ap.error(f"{args.events:,} events is fewer than batch {max(sizes):,}")
    rng = np.random.default_rng(0)
    windows = rng.normal(size=(args.events, args.window, args.features)).astype(np.float32)
    rows = np.ascontiguousarray(windows[:, -1, :])  # the dense model sees the event's row
    with tempfile.TemporaryDirectory() as tmp:
        kinds = scorers(args.features, args.window, Path(tmp))
    failed = False
    for name, (scorer, model) in kinds.items():
        x = rows[:64] if name == BASELINE else windows[:64]
        diff, allowed = parity(scorer, model, x)
        print(f"parity {name}: max |numpy - keras| = {diff:.2e} (allowed {allowed:.1e})")
        failed |= not diff <= allowed
    if failed:
        print("a numpy scorer differs from Keras by more than a bundle allows")
        return 1

    def calling(scorer: Any, data: list[np.ndarray]) -> Callable[[int], object]:
        return lambda i: scorer.reconstruct(data[i])

    load = os.getloadavg()
    print(
        f"\n{datetime.now(UTC):%Y-%m-%d %H:%M} UTC, {platform.python_version()}, numpy "
        f"{np.__version__}, {os.cpu_count()} CPUs, load {load[0]:.2f}; {args.features} features,"
        f" windows of {args.window} rows\n"
    )
    print("| events per call | model | ms per call | us per event | ratio to dense |")
    print("|---:|---|---:|---:|---:|")
    for size in sizes:
        cut = {name: batches(rows if name == BASELINE else windows, size) for name in kinds}
        times: dict[str, list[float]] = {name: [] for name in kinds}
        for _ in range(args.repeats):
            for name, (scorer, _model) in kinds.items():
                data = cut[name]
                times[name].append(timed(calling(scorer, data), len(data), args.min_seconds))
        base = statistics.median(times[BASELINE])
        for name in kinds:
            sec = statistics.median(times[name])
            print(
                f"| {size:,} | {name} | {sec * 1e3:.3f} | {sec / size * 1e6:.2f} | "
                f"{sec / base:.1f}x |"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
