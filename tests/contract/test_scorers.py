"""One contract, every scorer: the same checks run on each runtime a bundle can be served by."""

from __future__ import annotations

import shutil
import subprocess
import sys
from itertools import islice
from pathlib import Path

import msgspec
import numpy as np
import pytest

from streamer import bundle as bundles
from streamer.features import build_features
from streamer.profiles import ORDERS
from streamer.scoring import Scorer, reconstruction_errors
from training.simulate import simulate

RUNTIMES = ["numpy", "tensorflow"]


@pytest.fixture(scope="module")
def scaled(orders_bundle: bundles.Bundle) -> np.ndarray:
    decoder = msgspec.json.Decoder(ORDERS.event_type())
    events = [
        decoder.decode(msgspec.json.encode(e)) for e, _ in islice(simulate("orders", 41, 0.0), 3000)
    ]
    return orders_bundle.scaler.transform(build_features(ORDERS, events))


@pytest.fixture(params=RUNTIMES)
def scorer(request: pytest.FixtureRequest, orders_bundle: bundles.Bundle) -> Scorer:
    return orders_bundle.load_scorer(request.param)


def scores(scorer: Scorer, x: np.ndarray) -> np.ndarray:
    return reconstruction_errors(x, scorer.reconstruct(x)).mean(axis=1)


def test_shape_and_dtype(scorer: Scorer, scaled: np.ndarray) -> None:
    out = scorer.reconstruct(scaled)
    assert out.shape == scaled.shape and out.dtype == np.float32
    assert scorer.reconstruct(scaled[:0]).shape == (0, scaled.shape[1])


def test_deterministic(scorer: Scorer, scaled: np.ndarray) -> None:
    np.testing.assert_array_equal(scorer.reconstruct(scaled), scorer.reconstruct(scaled))


def test_injected_anomaly_scores_higher(scorer: Scorer, scaled: np.ndarray) -> None:
    anomalous = scaled.copy()
    anomalous[:, 0] += 6.0  # log1p(amount) six standard deviations up
    assert np.median(scores(scorer, anomalous)) > 5 * np.median(scores(scorer, scaled))


def test_batch_equals_one_by_one(scorer: Scorer, scaled: np.ndarray) -> None:
    whole = scorer.reconstruct(scaled[:200])
    single = np.concatenate([scorer.reconstruct(scaled[i : i + 1]) for i in range(200)])
    np.testing.assert_allclose(whole, single, rtol=0, atol=1e-5)


def test_numpy_runtime_matches_keras(orders_bundle: bundles.Bundle, scaled: np.ndarray) -> None:
    lean = orders_bundle.load_scorer("numpy").reconstruct(scaled)
    keras = orders_bundle.load_scorer("tensorflow").reconstruct(scaled)
    diff = float(np.max(np.abs(lean - keras)))
    print(f"max abs difference numpy vs Keras over {scaled.size} values: {diff:.2e}")
    assert diff <= 1e-5


def test_numpy_runtime_never_imports_tensorflow(orders_bundle: bundles.Bundle) -> None:
    code = (
        "import sys; from streamer import bundle; "
        f"bundle.load({str(orders_bundle.path)!r}).load_scorer('numpy'); "
        "import streamer.app; print('tensorflow' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_numpy_weights_are_verified_and_required(
    orders_bundle: bundles.Bundle, tmp_path: Path
) -> None:
    tampered = tmp_path / "tampered"
    shutil.copytree(orders_bundle.path, tampered)
    (tampered / bundles.DENSE_WEIGHTS_FILE).write_bytes(b"not an npz")
    with pytest.raises(bundles.BundleError, match=r"dense_weights\.npz: sha256 does not match"):
        bundles.load(tampered)

    # A bundle written before the numpy export: served by TensorFlow, refused by numpy.
    older = tmp_path / "older"
    shutil.copytree(orders_bundle.path, older)
    (older / bundles.DENSE_WEIGHTS_FILE).unlink()
    manifest = msgspec.json.decode((older / bundles.MANIFEST_FILE).read_bytes())
    del manifest["files"][bundles.DENSE_WEIGHTS_FILE]
    manifest["version"] = bundles.content_version(manifest["files"])
    (older / bundles.MANIFEST_FILE).write_bytes(msgspec.json.encode(manifest))
    b = bundles.load(older)
    with pytest.raises(bundles.BundleError, match=r"runtime = \"numpy\" needs dense_weights"):
        b.load_scorer("numpy")
    assert b.load_scorer("tensorflow").n_features == len(ORDERS.feature_names())


def test_a_runtime_that_disagrees_with_training_is_refused(
    orders_bundle: bundles.Bundle, tmp_path: Path
) -> None:
    # Consistent hashes, wrong weights: only the parity rows stored at training time notice.
    bad = tmp_path / "bad"
    shutil.copytree(orders_bundle.path, bad)
    with np.load(bad / bundles.DENSE_WEIGHTS_FILE, allow_pickle=False) as data:
        arrays = {k: data[k] for k in data.files}
    arrays["bias_0"] = arrays["bias_0"] + 0.5
    with (bad / bundles.DENSE_WEIGHTS_FILE).open("wb") as f:
        np.savez(f, **arrays)  # type: ignore[arg-type]
    manifest = msgspec.json.decode((bad / bundles.MANIFEST_FILE).read_bytes())
    manifest["files"][bundles.DENSE_WEIGHTS_FILE] = bundles.sha256_file(
        bad / bundles.DENSE_WEIGHTS_FILE
    )
    manifest["version"] = bundles.content_version(manifest["files"])
    (bad / bundles.MANIFEST_FILE).write_bytes(msgspec.json.encode(manifest))
    b = bundles.load(bad)
    with pytest.raises(bundles.BundleError, match=r"parity\.json: the numpy runtime differs"):
        b.load_scorer("numpy")
    b.load_scorer("tensorflow")  # the Keras model itself still matches
