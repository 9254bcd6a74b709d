import shutil
from pathlib import Path

import msgspec
import numpy as np
import pytest

from streamer import bundle as bundles
from streamer.config import TrainingSettings
from streamer.profiles import ORDERS, SENSORS
from training.datasets import History
from training.fit import fit_bundle


def copy_bundle(src: bundles.Bundle, tmp_path: Path) -> Path:
    dst = tmp_path / "b"
    shutil.copytree(src.path, dst)
    return dst


def test_registry_current_and_contents(orders_registry: Path) -> None:
    b = bundles.load(orders_registry, expected_spec=ORDERS)
    assert b.path.parent == orders_registry
    assert (orders_registry / "current").read_text().strip() == b.version
    assert b.kind == "dense"
    assert b.manifest.feature_names == ORDERS.feature_names()
    assert b.manifest.data["events"] == 20_000
    assert b.manifest.training["epochs_run"] >= 1
    assert b.warm_start.size == 3000  # the 15% held out, in event order
    assert np.all(b.warm_start >= 0)
    assert set(b.manifest.files) == {
        *bundles.CONTENT_FILES,
        bundles.DENSE_WEIGHTS_FILE,
        bundles.PARITY_FILE,
        bundles.DRIFT_FILE,
    }
    assert b.window_length is None


def test_lstm_bundle_contents(sensors_lstm_registry: Path) -> None:
    b = bundles.load(sensors_lstm_registry, expected_spec=SENSORS)
    assert b.kind == "lstm" and b.window_length == 10
    assert set(b.manifest.files) == {
        *bundles.CONTENT_FILES,
        bundles.LSTM_WEIGHTS_FILE,
        bundles.PARITY_FILE,
        bundles.DRIFT_FILE,
    }
    windows = b.manifest.data["windows"]
    # 4000 readings of 20 sensors: each sensor's first 9 complete no window.
    assert windows["train"] + windows["validation"] == 4000 - 20 * 9
    assert windows["validation"] == int(0.15 * (4000 - 20 * 9))
    assert b.warm_start.size == windows["validation"]  # one score per held-out window
    assert b.manifest.training["settings"]["model"] == "lstm"
    parity = msgspec.json.decode((b.path / bundles.PARITY_FILE).read_bytes(), type=bundles.Parity)
    assert np.array(parity.inputs).shape == (8, 10, len(SENSORS.feature_names()))


def test_dense_window_bundle_contents(sensors_dense_window_registry: Path) -> None:
    b = bundles.load(sensors_dense_window_registry, expected_spec=SENSORS)
    assert b.kind == "dense_window" and b.window_length == 10
    assert set(b.manifest.files) == {
        *bundles.CONTENT_FILES,
        bundles.DENSE_WINDOW_WEIGHTS_FILE,
        bundles.PARITY_FILE,
        bundles.DRIFT_FILE,
    }
    windows = b.manifest.data["windows"]  # the LSTM's split: the same windows, held out alike
    assert windows["train"] + windows["validation"] == 4000 - 20 * 9
    assert b.warm_start.size == windows["validation"]
    d = len(SENSORS.feature_names())
    parity = msgspec.json.decode((b.path / bundles.PARITY_FILE).read_bytes(), type=bundles.Parity)
    assert np.array(parity.inputs).shape == np.array(parity.reconstructed).shape == (8, 10, d)
    for runtime in ("numpy", "tensorflow"):
        scorer = b.load_scorer(runtime)
        assert (scorer.kind, scorer.window_length, scorer.n_features) == ("dense_window", 10, d)


def test_dense_window_autoencoder_shapes() -> None:
    from training.models import build_dense_window_autoencoder

    model = build_dense_window_autoencoder(3, 8, [16], 2, 1e-3)
    assert tuple(model.inputs[0].shape) == (None, 8, 3)
    assert tuple(model.outputs[0].shape) == (None, 8, 3)
    widths = [layer.units for layer in model.layers if layer.__class__.__name__ == "Dense"]
    assert widths == [16, 2, 16, 24]  # mirror image around the bottleneck, then 8 x 3 values
    assert model.predict(np.zeros((4, 8, 3), np.float32), verbose=0).shape == (4, 8, 3)


def test_dense_window_training_refuses_a_bottleneck_as_wide_as_the_window(
    tmp_path: Path,
) -> None:
    x = np.random.default_rng(0).normal(size=(400, len(SENSORS.feature_names())))
    history = History(x, np.arange(400.0), 0, [f"s-{i % 4}" for i in range(400)])
    settings = TrainingSettings(model="dense_window", window_length=2, bottleneck=10, epochs=1)
    with pytest.raises(ValueError, match=r"training\.bottleneck = 10 must be below .* 10 values"):
        fit_bundle(SENSORS, history, settings, tmp_path / "registry", source="wide")
    with pytest.raises(ValueError, match="needs the entity key of every row"):
        fit_bundle(
            SENSORS, History(x, np.arange(400.0), 0), TrainingSettings(model="dense_window"),
            tmp_path / "registry", source="x",
        )  # fmt: skip
    assert not (tmp_path / "registry").exists()


def test_manifest_leaves_out_unused_fields_and_older_layouts_still_load(
    orders_bundle: bundles.Bundle, tmp_path: Path
) -> None:
    """A dense bundle without an error cap writes neither field, so daemons that predate
    them load it; manifests that wrote `window_length: null` (before the cap) load too."""
    path = copy_bundle(orders_bundle, tmp_path)
    manifest = msgspec.json.decode((path / bundles.MANIFEST_FILE).read_bytes())
    assert not {"window_length", "error_cap", "forecast"} & set(manifest)
    b = bundles.load(path)
    assert b.window_length is None and b.error_cap is None
    assert b.load_scorer().window_length is None
    manifest["window_length"] = None
    (path / bundles.MANIFEST_FILE).write_bytes(msgspec.json.encode(manifest))
    assert bundles.load(path).window_length is None


def test_a_forecast_manifest_the_model_cannot_be_is_refused(
    orders_bundle: bundles.Bundle, tmp_path: Path
) -> None:
    path = copy_bundle(orders_bundle, tmp_path)
    manifest = msgspec.json.decode((path / bundles.MANIFEST_FILE).read_bytes())
    manifest["forecast"] = True  # a dense model with every feature scored: nothing to see
    (path / bundles.MANIFEST_FILE).write_bytes(msgspec.json.encode(manifest))
    with pytest.raises(bundles.BundleError, match="needs score_weights with a 0"):
        bundles.load(path)
    manifest["model_kind"] = "lstm"
    (path / bundles.MANIFEST_FILE).write_bytes(msgspec.json.encode(manifest))
    with pytest.raises(bundles.BundleError, match="forecast needs model_kind 'dense_window' or"):
        bundles.load(path)


def test_unknown_model_kind_has_no_numpy_runtime(
    orders_bundle: bundles.Bundle, tmp_path: Path
) -> None:
    path = copy_bundle(orders_bundle, tmp_path)
    manifest = msgspec.json.decode((path / bundles.MANIFEST_FILE).read_bytes())
    manifest["model_kind"] = "transformer"
    (path / bundles.MANIFEST_FILE).write_bytes(msgspec.json.encode(manifest))
    with pytest.raises(bundles.BundleError, match="model_kind 'transformer' has no numpy runtime"):
        bundles.load(path).load_scorer("numpy")


def test_lstm_training_refuses_too_few_windows_or_missing_keys(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, len(SENSORS.feature_names())))
    seconds = np.arange(300.0)
    settings = TrainingSettings(model="lstm", window_length=10, epochs=1)
    few = History(x, seconds, 0, [f"s-{i % 30}" for i in range(300)])  # 10 rows per sensor
    with pytest.raises(ValueError, match="30 windows of 10 rows; at least 100"):
        fit_bundle(SENSORS, few, settings, tmp_path / "registry", source="few")
    with pytest.raises(ValueError, match="needs the entity key of every row"):
        fit_bundle(SENSORS, History(x, seconds, 0), settings, tmp_path / "registry", source="x")
    assert not (tmp_path / "registry").exists()


def test_tampered_file_is_refused(orders_bundle: bundles.Bundle, tmp_path: Path) -> None:
    path = copy_bundle(orders_bundle, tmp_path)
    scaler = path / bundles.SCALER_FILE
    scaler.write_bytes(scaler.read_bytes().replace(b'"mean"', b'"mean" ', 1))
    with pytest.raises(bundles.BundleError, match=r"scaler\.json: sha256 does not match"):
        bundles.load(path)


def test_spec_mismatch_is_refused(orders_bundle: bundles.Bundle) -> None:
    expected = r"differs from the configured one \(profile: bundle 'orders', config 'sensors'\)"
    with pytest.raises(bundles.BundleError, match=expected):
        bundles.load(orders_bundle.path, expected_spec=SENSORS)


def test_missing_and_malformed_manifest(orders_bundle: bundles.Bundle, tmp_path: Path) -> None:
    with pytest.raises(bundles.BundleError, match="not a model bundle"):
        bundles.load(tmp_path)
    path = copy_bundle(orders_bundle, tmp_path)
    (path / bundles.MODEL_FILE).unlink()
    with pytest.raises(bundles.BundleError, match=r"model\.keras: missing"):
        bundles.load(path)
    manifest = msgspec.json.decode((path / bundles.MANIFEST_FILE).read_bytes())
    manifest["version"] = "0" * 16
    (path / bundles.MANIFEST_FILE).write_bytes(msgspec.json.encode(manifest))
    shutil.copy(orders_bundle.path / bundles.MODEL_FILE, path / bundles.MODEL_FILE)
    with pytest.raises(bundles.BundleError, match="version does not match"):
        bundles.load(path)


def test_model_is_loaded_in_safe_mode(orders_bundle: bundles.Bundle) -> None:
    scorer = orders_bundle.load_scorer()
    x = np.zeros((3, len(ORDERS.feature_names())), dtype=np.float32)
    assert scorer.reconstruct(x).shape == x.shape


def test_training_range_is_in_the_warm_start_and_checked_at_load(
    orders_bundle: bundles.Bundle, tmp_path: Path
) -> None:
    assert orders_bundle.feature_range is not None
    low, high = orders_bundle.feature_range
    assert low.size == high.size == len(ORDERS.feature_names())
    assert (low <= high).all() and (low < high).sum() > 20  # a category never seen: low == high
    path = copy_bundle(orders_bundle, tmp_path)

    def rewrite(**changes: object) -> None:
        warm = msgspec.json.decode((path / bundles.THRESHOLD_FILE).read_bytes())
        (path / bundles.THRESHOLD_FILE).write_bytes(msgspec.json.encode({**warm, **changes}))
        m = msgspec.json.decode((path / bundles.MANIFEST_FILE).read_bytes())
        keep = {k: v for k, v in m.items() if k not in ("format_version", "version", "files")}
        bundles.write_manifest(path, **keep)

    rewrite(feature_low=low.tolist()[:-1])
    with pytest.raises(bundles.BundleError, match="feature_low has"):
        bundles.load(path)
    rewrite(feature_low=high.tolist(), feature_high=low.tolist())
    with pytest.raises(bundles.BundleError, match="feature_low is above feature_high"):
        bundles.load(path)
    rewrite(feature_low=None, feature_high=None)  # a bundle written before the range
    assert bundles.load(path).feature_range is None


def test_robust_scaler_bundle_scales_as_it_was_trained(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    x = rng.normal(0, 1, (2000, len(SENSORS.feature_names())))
    x[:40] *= 200.0  # an incident left in the history
    history = History(x, np.arange(2000.0), 0, keys=[f"s{i % 4}" for i in range(2000)])
    settings = TrainingSettings(scaler="robust", epochs=2, window_length=4, model="lstm")
    b = fit_bundle(SENSORS, history, settings, tmp_path / "registry", source="robust")
    assert b.scaler.kind == "robust"
    assert b.manifest.training["settings"]["scaler"] == "robust"
    scaled = b.scaler.transform(x[40:])
    standardized = SENSORS.standardized()
    # The incident sets neither the centre nor the spread of the other rows.
    assert np.abs(np.median(scaled[:, standardized], axis=0)).max() < 0.1
    assert np.abs(scaled[:, standardized].std(axis=0) - 1).max() < 0.1
    again = bundles.load(tmp_path / "registry", expected_spec=SENSORS)
    assert again.scaler == b.scaler


def test_parity_is_checked_relative_to_the_values(
    orders_bundle: bundles.Bundle, tmp_path: Path
) -> None:
    path = copy_bundle(orders_bundle, tmp_path)
    parity = msgspec.json.decode((path / bundles.PARITY_FILE).read_bytes())
    want = np.array(parity["reconstructed"])
    assert np.abs(want).max() < 50  # so 0.01 is above 1e-4 of any value in the check

    def rewrite(reconstructed: np.ndarray) -> None:
        parity["reconstructed"] = reconstructed.tolist()
        (path / bundles.PARITY_FILE).write_bytes(msgspec.json.encode(parity))
        m = msgspec.json.decode((path / bundles.MANIFEST_FILE).read_bytes())
        keep = {k: v for k, v in m.items() if k not in ("format_version", "version", "files")}
        bundles.write_manifest(path, **keep)

    rewrite(want + 0.01)  # a runtime that computes something else
    for runtime in ("numpy", "keras"):
        with pytest.raises(bundles.BundleError, match=r"parity\.json: the \w+ runtime differs"):
            bundles.load(path).load_scorer(runtime)
    rewrite(want)
    bundles.load(path).load_scorer("numpy")


def test_error_cap_scores_the_warm_start_and_the_stream_alike(tmp_path: Path) -> None:
    """`training.error_cap` goes into the bundle; held-out and live scores are both capped,
    and a bundle with a bad cap is refused naming it."""
    from itertools import islice

    from streamer.app import build_pipeline
    from streamer.config import from_mapping
    from streamer.records import RawMessage
    from tests.conftest import write_events
    from training.datasets import read_jsonl
    from training.simulate import simulate

    events = tmp_path / "train.jsonl"
    write_events(events, "sensors", count=3000, seed=11, anomaly_rate=0.0)
    settings = TrainingSettings(error_cap=4.0, epochs=3, seed=1)
    b = fit_bundle(SENSORS, read_jsonl(SENSORS, events), settings, tmp_path / "r", source="c")
    assert b.error_cap == 4.0 and b.manifest.error_cap == 4.0
    assert b.warm_start.min() >= 0.0 and b.warm_start.max() <= 4.0
    loaded = bundles.load(tmp_path / "r", expected_spec=SENSORS)
    assert loaded.error_cap == 4.0
    kafka = {"input_topic": "in", "alert_topic": "a", "dead_letter_topic": "d"}
    config = {"profile": "sensors", "kafka": kafka, "model": {"bundle": "unused"}}
    capped = build_pipeline(from_mapping(config), loaded, loaded.load_scorer())
    plain = build_pipeline(from_mapping(config), loaded, loaded.load_scorer())
    plain.error_cap = None
    stream = [
        RawMessage("s", 0, i, None, msgspec.json.encode(msgspec.to_builtins(e)), 0)
        for i, (e, _) in enumerate(islice(simulate("sensors", 12, 0.05), 400))
    ]
    got, want = capped.process(stream).scores, plain.process(stream).scores
    assert got.max() <= 4.0 and (got < want).any()  # the anomalies' scores are capped
    low = want < 4.0 / len(SENSORS.feature_names())  # no feature can be beyond the cap
    assert low.any()
    np.testing.assert_allclose(got[low], want[low])

    manifest = msgspec.json.decode((loaded.path / bundles.MANIFEST_FILE).read_bytes())
    manifest["error_cap"] = -1.0
    (loaded.path / bundles.MANIFEST_FILE).write_bytes(msgspec.json.encode(manifest))
    with pytest.raises(bundles.BundleError, match="error_cap must be > 0"):
        bundles.load(tmp_path / "r")
    with pytest.raises(ValueError, match=r"training\.error_cap must be > 0"):
        TrainingSettings(error_cap=0.0)


def test_score_weights_make_a_feature_context(tmp_path: Path) -> None:
    """Weight 0: the model still reads the feature, the score and the explanations ignore
    its error; the resolved weights travel in the bundle, and bad ones are refused."""
    from itertools import islice

    from streamer.app import build_pipeline
    from streamer.config import from_mapping
    from streamer.records import RawMessage
    from tests.conftest import write_events
    from training.datasets import read_jsonl
    from training.simulate import simulate

    events = tmp_path / "train.jsonl"
    write_events(events, "sensors", count=3000, seed=11, anomaly_rate=0.0)
    history = read_jsonl(SENSORS, events)
    bad = TrainingSettings(score_weights={"temp*": 0.0, "humidity": 2.0}, epochs=1)
    with pytest.raises(ValueError, match="'humidity' matches no feature"):
        fit_bundle(SENSORS, history, bad, tmp_path / "bad", source="c")
    assert not (tmp_path / "bad").exists()  # refused before training
    with pytest.raises(ValueError, match=r"score_weights\['x'\] must be >= 0"):
        TrainingSettings(score_weights={"x": -1.0})

    settings = TrainingSettings(score_weights={"temp*": 0.0}, epochs=3, seed=1)
    b = fit_bundle(SENSORS, history, settings, tmp_path / "r", source="c")
    assert b.manifest.score_weights == [1.0, 0.0, 1.0, 1.0, 1.0]
    loaded = bundles.load(tmp_path / "r", expected_spec=SENSORS)
    kafka = {"input_topic": "in", "alert_topic": "a", "dead_letter_topic": "d"}
    config = {"profile": "sensors", "kafka": kafka, "model": {"bundle": "unused"},
              "threshold": {"quantile": 0.9, "min_samples": 10}}  # fmt: skip
    weighted = build_pipeline(from_mapping(config), loaded, loaded.load_scorer())
    plain = build_pipeline(from_mapping(config), loaded, loaded.load_scorer())
    plain.score_weights = None
    docs = [msgspec.to_builtins(e) for e, _ in islice(simulate("sensors", 12, 0.0), 300)]
    for doc in docs[200:]:
        doc["temperature"] = doc["temperature"] + 500.0  # only the context feature is off
    stream = [RawMessage("s", 0, i, None, msgspec.json.encode(d), 0) for i, d in enumerate(docs)]
    got, want = weighted.process(stream), plain.process(stream)
    assert want.scores[200:].mean() > 10 * got.scores[200:].mean()
    assert got.alerts and all(
        f.feature != "temperature" for a in got.alerts for f in a.top_features
    )
    assert any(f.feature == "temperature" for a in want.alerts for f in a.top_features)

    manifest = msgspec.json.decode((loaded.path / bundles.MANIFEST_FILE).read_bytes())
    manifest["score_weights"] = [1.0, 0.0]
    (loaded.path / bundles.MANIFEST_FILE).write_bytes(msgspec.json.encode(manifest))
    with pytest.raises(bundles.BundleError, match="score_weights must be one weight >= 0"):
        bundles.load(tmp_path / "r")


def test_fold_members_learn_only_outside_their_fold() -> None:
    """The masked loss of `build_fold_autoencoders`: a member whose fold holds every row has
    nothing to learn from and keeps its initial weights; the other one trains."""
    import keras

    from training.models import build_fold_autoencoders, fold_target

    keras.utils.set_random_seed(0)
    x = np.random.default_rng(0).normal(0, 1, (64, 3)).astype(np.float32)
    model = build_fold_autoencoders(3, [4], 2, 1e-2, None, 2)
    before = {w.path: w.numpy().copy() for w in model.trainable_weights}
    fold = np.zeros(64, dtype=np.int64)
    model.fit(x, fold_target(x, fold, 2, held_out=False), epochs=2, batch_size=16, verbose=0)
    moved = {w.path: not np.array_equal(before[w.path], w.numpy()) for w in model.trainable_weights}
    assert not any(m for p, m in moved.items() if p.startswith("f0_"))
    # Its linear output layer always has a gradient (a dead ReLU unit before it may not).
    assert moved["f1_reconstruction/kernel"] and moved["f1_reconstruction/bias"]


def test_warm_start_folds_score_every_history_row(tmp_path: Path) -> None:
    from tests.conftest import write_events
    from training.datasets import read_jsonl

    events = tmp_path / "train.jsonl"
    write_events(events, "sensors", count=600, seed=3, anomaly_rate=0.0)
    history = read_jsonl(SENSORS, events)
    n = history.features.shape[0]
    common = {"score_weights": {"temp*": 0.0}, "forecast": True, "epochs": 3, "seed": 1}
    held = fit_bundle(SENSORS, history, TrainingSettings(**common), tmp_path / "a", source="h")
    settings = TrainingSettings(warm_start_folds=3, **common)
    b = fit_bundle(SENSORS, history, settings, tmp_path / "b", source="f")
    assert held.warm_start.size == int(n * 0.15)
    assert b.warm_start.size == n  # every row, in event order
    assert np.isfinite(b.warm_start).all() and (b.warm_start > 0).all()
    warm = msgspec.json.decode((b.path / bundles.THRESHOLD_FILE).read_bytes())
    assert warm["quantiles"]["0.5"] == pytest.approx(float(np.quantile(b.warm_start, 0.5)))
    # The bundle's own model is trained as without folds.
    assert b.manifest.training["best_val_loss"] == held.manifest.training["best_val_loss"]
    with pytest.raises(ValueError, match=r"warm_start_folds must be 0 or >= 2"):
        TrainingSettings(warm_start_folds=1)
    with pytest.raises(ValueError, match=r'warm_start_folds needs training.model = "dense"'):
        TrainingSettings(warm_start_folds=3, model="lstm", window_length=4)
