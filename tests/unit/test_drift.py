import math
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import pytest

from streamer import bundle as bundles
from streamer.drift import (
    EPSILON,
    DriftMonitor,
    DriftReference,
    Histogram,
    build_reference,
    psi,
    reference_histogram,
)
from streamer.profiles import ORDERS, SENSORS


def counts_of(reference: Histogram, values: np.ndarray) -> np.ndarray:
    """Live counts per bin, the slow obvious way."""
    idx = np.searchsorted(np.asarray(reference.edges), values, side="left")
    return np.bincount(idx, minlength=len(reference.proportions))


def test_reference_deciles_hold_a_tenth_each() -> None:
    ref = reference_histogram(np.random.default_rng(0).normal(size=100_000))
    assert len(ref.edges) == 9
    assert np.allclose(ref.proportions, 0.1, atol=1e-3)
    assert ref.edges == sorted(ref.edges)


def test_identical_distribution_is_stable_and_a_shift_is_not() -> None:
    rng = np.random.default_rng(1)
    ref = reference_histogram(rng.normal(size=50_000))
    same = psi(ref, counts_of(ref, rng.normal(size=20_000)))
    assert 0.0 <= same < 0.01
    assert psi(ref, np.array(ref.proportions) * 1000) == pytest.approx(0.0, abs=1e-12)
    shifted = psi(ref, counts_of(ref, rng.normal(loc=1.0, size=20_000)))
    assert shifted > 0.25
    wider = psi(ref, counts_of(ref, rng.normal(scale=1.5, size=20_000)))
    assert 0.1 < wider < shifted


def test_empty_bins_give_finite_psi() -> None:
    ref = reference_histogram(np.arange(1000.0))
    everything_in_one_bin = np.zeros(10)
    everything_in_one_bin[3] = 500
    value = psi(ref, everything_in_one_bin)
    assert math.isfinite(value) and value > 0.25
    # The largest it can be: all live values in one bin, the rest at the floor.
    assert value < 10 * math.log(1 / EPSILON)


def test_discrete_feature_collapses_edges() -> None:
    onehot = np.r_[np.zeros(700), np.ones(300)]
    ref = reference_histogram(onehot)
    assert ref.edges == [0.0, 1.0]
    # Bins (-inf, 0], (0, 1], (1, inf): the last is empty in the reference.
    assert ref.proportions == pytest.approx([0.7, 0.3, 0.0])
    assert psi(ref, np.array([70, 30, 0])) == pytest.approx(0.0, abs=1e-12)
    assert math.isfinite(psi(ref, np.array([0, 0, 10])))
    constant = reference_histogram(np.zeros(50))
    assert constant.edges == [0.0] and constant.proportions == [1.0, 0.0]


def test_psi_of_nothing_is_nan_and_wrong_bin_count_is_refused() -> None:
    ref = reference_histogram(np.arange(100.0))
    assert math.isnan(psi(ref, np.zeros(10)))
    with pytest.raises(ValueError, match="3 counts for 10 bins"):
        psi(ref, np.ones(3))


def test_histogram_validates_on_decode() -> None:
    with pytest.raises(msgspec.ValidationError, match="has 3 bins, not 2"):
        msgspec.json.decode(b'{"edges":[0,1],"proportions":[0.5,0.5]}', type=Histogram)
    with pytest.raises(msgspec.ValidationError, match="strictly increasing"):
        msgspec.json.decode(b'{"edges":[1,0],"proportions":[0.2,0.3,0.5]}', type=Histogram)
    with pytest.raises(msgspec.ValidationError, match="sum to 1"):
        msgspec.json.decode(b'{"edges":[0],"proportions":[0.2,0.3]}', type=Histogram)


def test_reference_round_trips_through_json() -> None:
    rng = np.random.default_rng(2)
    rows = np.c_[rng.normal(size=500), rng.integers(0, 2, size=500)]
    ref = build_reference(["a", "b=x"], rows, rng.exponential(size=200))
    data = msgspec.json.encode(ref)
    assert msgspec.json.decode(data, type=DriftReference) == ref
    assert list(ref.features) == ["a", "b=x"]
    with pytest.raises(ValueError, match="do not match 3 features"):
        build_reference(["a", "b", "c"], rows, np.ones(3))


def test_monitor_counts_exactly_the_last_window() -> None:
    rng = np.random.default_rng(3)
    train = rng.normal(size=(5000, 3))
    ref = build_reference(["f0", "f1", "f2"], train, rng.exponential(size=2000))
    window = 250
    monitor = DriftMonitor(ref, window)
    assert math.isnan(monitor.psi_score())
    assert all(math.isnan(v) for v in monitor.psi_by_feature().values())
    seen_rows, seen_scores = [], []
    # Batches smaller than, equal to and larger than the window, drifting as they go.
    for i, size in enumerate([1, 7, 100, 250, 3, 600, 0, 90, 249, 1, 400, 17]):
        rows = rng.normal(loc=0.1 * i, size=(size, 3))
        scores = rng.exponential(scale=1 + 0.2 * i, size=size // 2)
        monitor.observe(rows, scores)
        seen_rows.append(rows)
        seen_scores.append(scores)
        last_rows = np.concatenate(seen_rows)[-window:]
        last_scores = np.concatenate(seen_scores)[-window:]
        assert monitor.rows_seen == last_rows.shape[0]
        got = monitor.psi_by_feature()
        for j, name in enumerate(ref.features):
            want = psi(ref.features[name], counts_of(ref.features[name], last_rows[:, j]))
            assert got[name] == pytest.approx(want, nan_ok=True)
        want_score = psi(ref.score, counts_of(ref.score, last_scores))
        assert monitor.psi_score() == pytest.approx(want_score, nan_ok=True)
    assert monitor.psi_by_feature()["f0"] > 0.25  # the last window drifted by about 1 sd


def test_monitor_skips_non_finite_values_and_checks_width() -> None:
    rng = np.random.default_rng(4)
    ref = build_reference(["a", "b"], rng.normal(size=(1000, 2)), rng.exponential(size=500))
    monitor = DriftMonitor(ref, window=100)
    rows = rng.normal(size=(10, 2))
    rows[3, 1] = np.nan
    monitor.observe(rows, np.array([0.5, np.nan, np.inf]))
    assert monitor.rows_seen == 9
    assert math.isfinite(monitor.psi_score())
    with pytest.raises(ValueError, match=r"expected \(n, 2\)"):
        monitor.observe(np.zeros((4, 3)), np.zeros(4))
    with pytest.raises(ValueError, match="window must be >= 1"):
        DriftMonitor(ref, window=0)


# drift.json in bundles


def rewrite_manifest(path: Path, change: Callable[[dict[str, Any]], None]) -> None:
    """Edit a copied bundle's manifest and re-derive its version, as training would."""
    manifest = msgspec.json.decode((path / bundles.MANIFEST_FILE).read_bytes())
    change(manifest)
    manifest["version"] = bundles.content_version(manifest["files"])
    (path / bundles.MANIFEST_FILE).write_bytes(msgspec.json.encode(manifest))


def test_dense_bundle_has_a_drift_reference(orders_bundle: bundles.Bundle) -> None:
    ref = orders_bundle.drift
    assert ref is not None
    assert bundles.DRIFT_FILE in orders_bundle.manifest.files
    assert list(ref.features) == ORDERS.feature_names()
    # One-hot features collapse to a few bins; amounts get ten.
    assert len(ref.features["log1p(amount)"].proportions) == 10
    assert len(ref.features["payment_method=card"].proportions) <= 3
    # The score reference is the held-out scores': the warm start's deciles.
    assert ref.score.edges[4] == pytest.approx(
        np.quantile(orders_bundle.warm_start, 0.5, method="inverted_cdf")
    )
    # Training rows against their own reference: stable.
    monitor = DriftMonitor(ref, window=5000)
    rng = np.random.default_rng(0)
    warm = orders_bundle.warm_start
    monitor.observe(np.zeros((0, len(ref.features))), rng.choice(warm, 5000))
    assert monitor.psi_score() < 0.1


def test_lstm_bundle_reference_is_per_row_and_per_window(
    sensors_lstm_bundle: bundles.Bundle,
) -> None:
    ref = sensors_lstm_bundle.drift
    assert ref is not None
    assert list(ref.features) == SENSORS.feature_names()
    # Scaled rows: the deciles of a standardized feature straddle 0.
    edges = ref.features["rpm"].edges
    assert edges[0] < 0 < edges[-1]
    assert ref.score.edges[0] == pytest.approx(
        np.quantile(sensors_lstm_bundle.warm_start, 0.1, method="inverted_cdf")
    )


def test_bundle_without_drift_file_still_loads(
    orders_bundle: bundles.Bundle, tmp_path: Path
) -> None:
    path = tmp_path / "b"
    shutil.copytree(orders_bundle.path, path)
    (path / bundles.DRIFT_FILE).unlink()
    rewrite_manifest(path, lambda m: m["files"].pop(bundles.DRIFT_FILE))
    b = bundles.load(path, expected_spec=ORDERS)
    assert b.drift is None
    assert b.version != orders_bundle.version  # drift.json is part of the version


def test_tampered_or_foreign_drift_file_is_refused(
    orders_bundle: bundles.Bundle, tmp_path: Path
) -> None:
    path = tmp_path / "b"
    shutil.copytree(orders_bundle.path, path)
    drift = path / bundles.DRIFT_FILE
    drift.write_bytes(drift.read_bytes().replace(b'"proportions"', b'"proportions" ', 1))
    with pytest.raises(bundles.BundleError, match=r"drift\.json: sha256 does not match"):
        bundles.load(path)
    # Re-hashed but for other features: the load names the file.
    ref = build_reference(["x"], np.zeros((10, 1)), np.ones(10))
    drift.write_bytes(msgspec.json.encode(ref))
    digest = bundles.sha256_file(drift)
    rewrite_manifest(path, lambda m: m["files"].update({bundles.DRIFT_FILE: digest}))
    with pytest.raises(bundles.BundleError, match=r"drift\.json: features differ"):
        bundles.load(path)
    drift.write_bytes(b'{"features": {}, "score": {"edges": [], "proportions": [0.5]}}')
    digest = bundles.sha256_file(drift)
    rewrite_manifest(path, lambda m: m["files"].update({bundles.DRIFT_FILE: digest}))
    with pytest.raises(bundles.BundleError, match=r"drift\.json: .*sum to 1"):
        bundles.load(path)
