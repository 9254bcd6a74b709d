"""One contract, every scorer: the same checks run on each model kind and runtime a bundle can
be served by (dense rows, LSTM windows and flattened windows of a dense model; numpy and
TensorFlow)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

import msgspec
import numpy as np
import pytest

from streamer import bundle as bundles
from streamer.features import FeatureSpec, build_features
from streamer.lean import NumpyDenseWindowScorer, NumpyLSTMScorer
from streamer.profiles import ORDERS, SENSORS
from streamer.scoring import Scorer, reconstruction_errors
from streamer.windows import sliding_windows
from training.simulate import simulate

RUNTIMES = ["numpy", "tensorflow"]
MODELS = ["dense", "lstm", "dense_window", "forecast"]
WINDOWED = {
    "lstm": "sensors_lstm_bundle",
    "dense_window": "sensors_dense_window_bundle",
    "forecast": "sensors_forecast_bundle",  # dense_window with training.forecast
}


@dataclass(frozen=True)
class Case:
    """A trained bundle, scaled inputs it was not trained on, and a way to break them."""

    bundle: bundles.Bundle
    x: np.ndarray  # rows (n, d) or windows (n, L, d)
    inject: Callable[[np.ndarray], np.ndarray]


def clean_events(spec: FeatureSpec, profile: str, count: int) -> list:
    decoder = msgspec.json.Decoder(spec.event_type())
    return [
        decoder.decode(msgspec.json.encode(e)) for e, _ in islice(simulate(profile, 41, 0.0), count)
    ]


def amount_spike(rows: np.ndarray) -> np.ndarray:
    out = rows.copy()
    out[:, 0] += 6.0  # log1p(amount) six standard deviations up
    return out


def temperature_flaps(windows: np.ndarray) -> np.ndarray:
    out = windows.copy()
    out[:, 1::2, 1] += 4.0  # every other reading of the window 4 sd hotter: a flapping sensor
    return out


@pytest.fixture(scope="module", params=MODELS)
def case(request: pytest.FixtureRequest) -> Case:
    # getfixturevalue: `-k lstm` never trains the dense bundles, and the reverse.
    if request.param == "dense":
        bundle = request.getfixturevalue("orders_bundle")
        rows = bundle.scaler.transform(build_features(ORDERS, clean_events(ORDERS, "orders", 3000)))
        return Case(bundle, rows, amount_spike)
    bundle = request.getfixturevalue(WINDOWED[request.param])
    events = clean_events(SENSORS, "sensors", 3000)
    rows = bundle.scaler.transform(build_features(SENSORS, events))
    windows, _ = sliding_windows([e.sensor_id for e in events], rows, bundle.window_length)
    return Case(bundle, windows, temperature_flaps)


@pytest.fixture(params=RUNTIMES)
def scorer(request: pytest.FixtureRequest, case: Case) -> Scorer:
    return case.bundle.load_scorer(request.param)


def scores(scorer: Scorer, x: np.ndarray) -> np.ndarray:
    """One score per row or window: the mean squared error over its features (and steps)."""
    return reconstruction_errors(x, scorer.reconstruct(x)).mean(axis=tuple(range(1, x.ndim)))


def test_describes_its_input(scorer: Scorer, case: Case) -> None:
    assert scorer.kind == case.bundle.kind
    assert scorer.n_features == case.x.shape[-1] == len(case.bundle.spec.feature_names())
    assert scorer.window_length == case.bundle.window_length
    assert scorer.window_length == (case.x.shape[1] if case.x.ndim == 3 else None)


def test_shape_and_dtype(scorer: Scorer, case: Case) -> None:
    out = scorer.reconstruct(case.x)
    assert out.shape == case.x.shape and out.dtype == np.float32
    empty = scorer.reconstruct(case.x[:0])
    assert empty.shape == (0, *case.x.shape[1:]) and empty.dtype == np.float32


def test_deterministic(scorer: Scorer, case: Case) -> None:
    np.testing.assert_array_equal(scorer.reconstruct(case.x), scorer.reconstruct(case.x))


def test_injected_anomaly_scores_higher(scorer: Scorer, case: Case) -> None:
    normal = np.median(scores(scorer, case.x))
    assert np.median(scores(scorer, case.inject(case.x))) > 5 * normal


def test_batch_equals_one_by_one(scorer: Scorer, case: Case) -> None:
    x = case.x[:200]
    whole = scorer.reconstruct(x)
    single = np.concatenate([scorer.reconstruct(x[i : i + 1]) for i in range(len(x))])
    np.testing.assert_allclose(whole, single, rtol=0, atol=1e-5)


def test_numpy_runtime_matches_keras(case: Case) -> None:
    lean = case.bundle.load_scorer("numpy").reconstruct(case.x)
    keras = case.bundle.load_scorer("tensorflow").reconstruct(case.x)
    diff = float(np.max(np.abs(lean - keras)))
    print(f"{case.bundle.kind}: max abs difference numpy vs Keras over {case.x.size} values: "
          f"{diff:.2e}")  # fmt: skip
    assert diff <= 1e-5


def test_numpy_runtime_never_imports_tensorflow(case: Case) -> None:
    code = (
        "import sys; from streamer import bundle; "
        f"bundle.load({str(case.bundle.path)!r}).load_scorer('numpy'); "
        "import streamer.app; print('tensorflow' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def rewrite_manifest(root: Path, edit: Callable[[dict], None]) -> None:
    """Edit a copied bundle's manifest and keep its version consistent with its files."""
    manifest = msgspec.json.decode((root / bundles.MANIFEST_FILE).read_bytes())
    edit(manifest)
    manifest["version"] = bundles.content_version(manifest["files"])
    (root / bundles.MANIFEST_FILE).write_bytes(msgspec.json.encode(manifest))


def test_numpy_weights_are_verified_and_required(case: Case, tmp_path: Path) -> None:
    weights = bundles.NUMPY_WEIGHTS[case.bundle.kind]
    assert set(bundles.NUMPY_WEIGHTS.values()) & set(case.bundle.manifest.files) == {weights}
    tampered = tmp_path / "tampered"
    shutil.copytree(case.bundle.path, tampered)
    (tampered / weights).write_bytes(b"not an npz")
    with pytest.raises(bundles.BundleError, match=rf"{weights}: sha256 does not match"):
        bundles.load(tampered)

    # A bundle without its numpy export: served by TensorFlow, refused by numpy.
    older = tmp_path / "older"
    shutil.copytree(case.bundle.path, older)
    (older / weights).unlink()
    rewrite_manifest(older, lambda m: m["files"].pop(weights))
    b = bundles.load(older)
    with pytest.raises(bundles.BundleError, match=rf"runtime = \"numpy\" needs {weights}"):
        b.load_scorer("numpy")
    assert b.load_scorer("tensorflow").n_features == case.x.shape[-1]


def test_a_runtime_that_disagrees_with_training_is_refused(case: Case, tmp_path: Path) -> None:
    # Consistent hashes, wrong weights: only the parity inputs stored at training time notice.
    weights = bundles.NUMPY_WEIGHTS[case.bundle.kind]
    bad = tmp_path / "bad"
    shutil.copytree(case.bundle.path, bad)
    with np.load(bad / weights, allow_pickle=False) as data:
        arrays = {k: data[k] for k in data.files}
    arrays["bias_0"] = arrays["bias_0"] + 0.5
    with (bad / weights).open("wb") as f:
        np.savez(f, **arrays)  # type: ignore[arg-type]
    rewrite_manifest(
        bad, lambda m: m["files"].update({weights: bundles.sha256_file(bad / weights)})
    )
    b = bundles.load(bad)
    with pytest.raises(bundles.BundleError, match=r"parity\.json: the numpy runtime differs"):
        b.load_scorer("numpy")
    b.load_scorer("tensorflow")  # the Keras model itself still matches


def test_window_length_must_match_the_manifest(case: Case, tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(case.bundle.path, copy)
    wrong = 7 if case.bundle.window_length is None else case.bundle.window_length + 1
    rewrite_manifest(copy, lambda m: m.update(window_length=wrong))
    b = bundles.load(copy)
    for runtime in RUNTIMES:
        with pytest.raises(bundles.BundleError, match=rf"window_length = {wrong}"):
            b.load_scorer(runtime)


def test_lstm_export_refuses_what_numpy_cannot_run(
    orders_bundle: bundles.Bundle, tmp_path: Path
) -> None:
    import keras

    dense = keras.models.load_model(orders_bundle.path / bundles.MODEL_FILE, compile=False)
    with pytest.raises(ValueError, match="takes only a final linear Dense"):
        NumpyLSTMScorer.save_from_keras(dense, tmp_path / "w.npz")
    inputs = keras.Input(shape=(5, 3))
    gru = keras.Model(
        inputs, keras.layers.Dense(3)(keras.layers.GRU(4, return_sequences=True)(inputs))
    )
    with pytest.raises(ValueError, match=r"\(GRU\): no numpy LSTM export"):
        NumpyLSTMScorer.save_from_keras(gru, tmp_path / "w.npz")
    hidden = keras.layers.LSTM(4, return_sequences=True, activation="relu")(inputs)
    relu = keras.Model(inputs, keras.layers.Dense(3)(hidden))
    with pytest.raises(ValueError, match=r"activations \('relu', 'sigmoid'\)"):
        NumpyLSTMScorer.save_from_keras(relu, tmp_path / "w.npz")
    assert not (tmp_path / "w.npz").exists()


def test_lstm_scorer_refuses_windows_of_another_shape(sensors_lstm_bundle: bundles.Bundle) -> None:
    scorer = sensors_lstm_bundle.load_scorer("numpy")
    d = scorer.n_features
    for bad in (np.zeros((2, d)), np.zeros((2, 9, d)), np.zeros((2, 10, d + 1))):
        with pytest.raises(ValueError, match=rf"are not \(n, 10, {d}\)"):
            scorer.reconstruct(bad)


def test_dense_window_export_refuses_what_numpy_cannot_run(
    orders_bundle: bundles.Bundle, tmp_path: Path
) -> None:
    import keras

    dense = keras.models.load_model(orders_bundle.path / bundles.MODEL_FILE, compile=False)
    with pytest.raises(ValueError, match=r"not Flatten, Dense\.\.\., Reshape"):
        NumpyDenseWindowScorer.save_from_keras(dense, tmp_path / "w.npz")
    inputs = keras.Input(shape=(5, 3))
    hidden = keras.layers.Dense(4, activation="tanh")(keras.layers.Flatten()(inputs))
    tanh = keras.Model(inputs, keras.layers.Reshape((5, 3))(keras.layers.Dense(15)(hidden)))
    with pytest.raises(ValueError, match=r"activation 'tanh' is not one of"):
        NumpyDenseWindowScorer.save_from_keras(tanh, tmp_path / "w.npz")
    assert not (tmp_path / "w.npz").exists()


def test_dense_window_scorer_refuses_windows_of_another_shape(
    sensors_dense_window_bundle: bundles.Bundle,
) -> None:
    scorer = sensors_dense_window_bundle.load_scorer("numpy")
    d = scorer.n_features
    for bad in (np.zeros((2, 10 * d)), np.zeros((2, 9, d)), np.zeros((2, 10, d + 1))):
        with pytest.raises(ValueError, match=rf"are not \(n, 10, {d}\)"):
            scorer.reconstruct(bad)


def test_a_forecast_model_never_sees_the_row_it_rebuilds(
    sensors_forecast_bundle: bundles.Bundle,
) -> None:
    """training.forecast: the window's last row is cropped off the input (Keras) or meets zero
    weights (numpy), so changing it changes no output, and only its own error rises."""
    b = sensors_forecast_bundle
    events = clean_events(SENSORS, "sensors", 1000)
    rows = b.scaler.transform(build_features(SENSORS, events))
    windows, _ = sliding_windows([e.sensor_id for e in events], rows, b.window_length)
    moved = windows.copy()
    moved[:, -1, :] += 5.0
    for runtime in RUNTIMES:
        scorer = b.load_scorer(runtime)
        before, after = scorer.reconstruct(windows), scorer.reconstruct(moved)
        np.testing.assert_allclose(after, before, rtol=0, atol=1e-6)
        errors = reconstruction_errors(moved, after) - reconstruction_errors(windows, before)
        assert errors[:, -1, :].min() > 0 and np.abs(errors[:, :-1, :]).max() < 1e-5


def test_a_forecast_bundle_warm_starts_from_its_last_rows_errors(
    sensors_forecast_bundle: bundles.Bundle,
) -> None:
    # The parity sample is the first held-out windows, whose scores open the warm start.
    b = sensors_forecast_bundle
    parity = msgspec.json.decode((b.path / bundles.PARITY_FILE).read_bytes(), type=bundles.Parity)
    x, recon = np.array(parity.inputs), np.array(parity.reconstructed)
    last = ((x - recon) ** 2)[:, -1, :].mean(axis=1)
    np.testing.assert_allclose(b.warm_start[: len(last)], last, rtol=1e-5)
    assert b.manifest.training["settings"]["forecast"] is True


def test_the_forecast_setting_is_checked_where_it_is_read(tmp_path: Path) -> None:
    from streamer.config import TrainingSettings

    with pytest.raises(ValueError, match=r'training\.forecast needs training\.model = "dense_wi'):
        TrainingSettings(model="lstm", forecast=True)
    with pytest.raises(ValueError, match=r"needs training\.score_weights that make some feat"):
        TrainingSettings(forecast=True, score_weights={"x": 2.0})
    with pytest.raises(ValueError, match="cropping"):
        import keras

        inputs = keras.Input(shape=(5, 3))
        x = keras.layers.Flatten()(keras.layers.Cropping1D((1, 0))(inputs))
        head = keras.Model(inputs, keras.layers.Reshape((5, 3))(keras.layers.Dense(15)(x)))
        NumpyDenseWindowScorer.save_from_keras(head, tmp_path / "w.npz")


def test_a_dense_forecast_model_predicts_its_scored_features_from_the_context(
    hourly_forecast_bundle: bundles.Bundle,
) -> None:
    """training.forecast on a dense model: it sees the hour (context, weight 0), not the
    value it scores, so a value scores by how far it is from its hour's usual value."""
    from tests.conftest import HOURLY, hourly_events

    b = hourly_forecast_bundle
    assert b.forecast and b.kind == "dense"
    rows = b.scaler.transform(build_features(HOURLY, hourly_events(1000, seed=4)))
    moved = rows.copy()
    moved[:, 0] += 3.0  # the value, in scaled units; the hour's sin and cos untouched
    for runtime in RUNTIMES:
        scorer = b.load_scorer(runtime)
        np.testing.assert_allclose(scorer.reconstruct(moved), scorer.reconstruct(rows), atol=1e-6)
    # The usual value of 06:00 UTC (sin = 1) at 18:00 (sin = -1): 10 off the hour's profile
    # (noise sd 0.3), though well inside the range of the values trained on.
    scorer = b.load_scorer("numpy")
    swapped = rows.copy()
    swapped[:, 1] = -swapped[:, 1]  # sin(hour) negated: the value of the other half-day
    normal = reconstruction_errors(rows, scorer.reconstruct(rows))[:, 0]
    off = reconstruction_errors(swapped, scorer.reconstruct(swapped))[:, 0]
    peaks = np.abs(rows[:, 1]) > 0.9  # near 06:00 and 18:00, where the swap moves most
    assert np.median(off[peaks]) > 20 * np.median(normal[peaks])
