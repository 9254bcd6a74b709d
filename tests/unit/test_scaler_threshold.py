import msgspec
import numpy as np
import pytest

from streamer.config import TrainingSettings
from streamer.scaler import Scaler
from streamer.threshold import EntityThresholds, RollingQuantileThreshold


def test_scaler_round_trip_and_pass_through() -> None:
    rng = np.random.default_rng(0)
    x = np.column_stack([rng.normal(10, 3, 1000), rng.integers(0, 2, 1000), np.full(1000, 5.0)])
    s = Scaler.fit(x, np.array([True, False, True]), ["a", "b", "c"])
    z = s.transform(x)
    assert z.dtype == np.float32
    assert abs(z[:, 0].mean()) < 1e-5 and abs(z[:, 0].std() - 1) < 1e-4
    np.testing.assert_array_equal(z[:, 1], x[:, 1])  # one-hot style column untouched
    np.testing.assert_allclose(z[:, 2], 0.0)  # constant column: centred, not divided by 0
    again = Scaler.from_json(s.to_json())
    assert again == s
    np.testing.assert_allclose(again.inverse_transform(z), x, rtol=1e-5, atol=1e-5)


def test_scaler_refuses_bad_files() -> None:
    with pytest.raises(ValueError, match="positive"):
        Scaler(np.zeros(2), np.array([1.0, 0.0]))
    with pytest.raises(ValueError, match="length"):
        Scaler.from_json(b'{"kind":"standard","feature_names":["a"],"mean":[0,0],"scale":[1,1]}')
    with pytest.raises(ValueError, match="kind"):
        Scaler.from_json(b'{"kind":"minmax","feature_names":["a"],"mean":[0],"scale":[1]}')
    with pytest.raises(ValueError, match="unknown field `mean`"):  # robust: "median"
        Scaler.from_json(b'{"kind":"robust","feature_names":["a"],"mean":[0],"scale":[1]}')


def test_standard_scaler_file_layout_is_unchanged() -> None:
    # Bundles written before "robust" existed must load, and new standard ones must load in
    # daemons from before it.
    s = Scaler.fit(np.array([[1.0], [3.0]]), np.array([True]), ["a"])
    assert msgspec.json.decode(s.to_json()) == {
        "kind": "standard", "feature_names": ["a"], "mean": [2.0], "scale": [1.0]
    }  # fmt: skip


def test_robust_scaler_ignores_outliers_in_the_history() -> None:
    rng = np.random.default_rng(1)
    clean = rng.normal(10, 2, 10_000)
    dirty = np.concatenate([clean, np.full(200, 500.0)])  # 2% of rows from an incident
    x = np.column_stack([dirty, np.r_[np.zeros(9_000), np.ones(1_200)]])  # mostly-zero count
    robust = Scaler.fit(x, np.array([True, True]), ["v", "n"], kind="robust")
    standard = Scaler.fit(x, np.array([True, True]), ["v", "n"])
    assert robust.center[0] == pytest.approx(10, abs=0.1)
    assert robust.scale[0] == pytest.approx(2, rel=0.05)  # IQR / 1.349 ~ the clean std
    assert standard.scale[0] > 30  # the incident sets the standard scale
    # No IQR (over half the rows are 0): the standard deviation, not a division by zero.
    assert robust.scale[1] == pytest.approx(x[:, 1].std())
    assert robust.center[1] == 0.0
    again = Scaler.from_json(robust.to_json())
    assert again == robust and again.kind == "robust" and again != standard
    np.testing.assert_allclose(again.inverse_transform(robust.transform(x)), x, rtol=1e-5)


def test_training_settings_name_a_bad_scaler() -> None:
    with pytest.raises(ValueError, match=r"training\.scaler"):
        TrainingSettings(scaler="minmax")  # type: ignore[arg-type]


def test_min_samples_and_warm_start() -> None:
    cold = RollingQuantileThreshold(window_size=100, quantile=0.5, min_samples=10)
    assert cold.value == float("inf")
    assert not cold.judge(np.full(5, 1e9)).any()  # nothing flagged before min_samples
    warm = RollingQuantileThreshold(100, 0.5, 10, warm_start=np.arange(1000.0))
    assert warm.count == 100  # only the latest window_size warm-start errors are kept
    assert warm.value == pytest.approx(949.5)


def test_alerted_scores_do_not_raise_the_threshold() -> None:
    rng = np.random.default_rng(1)
    t = RollingQuantileThreshold(1000, 0.99, 100, warm_start=rng.exponential(1.0, 1000))
    before = t.value
    for _ in range(20):  # a long burst of huge scores
        flagged = t.judge(np.full(50, 1e6))
        assert flagged.all()
    assert t.value <= before


def test_no_downward_ratchet_on_stationary_scores() -> None:
    rng = np.random.default_rng(2)
    t = RollingQuantileThreshold(5000, 0.99, 100, warm_start=rng.exponential(1.0, 5000))
    flagged = 0
    for _ in range(200):
        flagged += int(t.judge(rng.exponential(1.0, 100)).sum())
    # Exponential(1): the true p99 is ln(100) = 4.6. The threshold stays near it and about
    # 1% of 20,000 scores are flagged.
    assert 4.0 < t.value < 5.3
    assert 100 < flagged < 320


def test_window_wraps_around() -> None:
    t = RollingQuantileThreshold(window_size=4, quantile=0.5, min_samples=1)
    for v in [1.0, 2.0, 3.0]:
        t.judge(np.array([v]))
    t.judge(np.array([10.0, 10.0, 10.0]))  # above the median -> clipped to it
    assert t.count == 4
    assert t.value <= 3.0


def test_threshold_that_does_not_learn_keeps_its_warm_start() -> None:
    warm = np.arange(1000.0)
    t = RollingQuantileThreshold(1000, 0.9, 10, warm, learn=False)
    before = t.value
    for _ in range(20):
        t.judge(np.full(500, 0.5))  # a long quiet stretch would pull a learning one down
    assert t.value == before


def test_entity_thresholds_fall_back_then_judge_each_entity_by_its_own_scores() -> None:
    t = EntityThresholds(window_size=100, quantile=0.99, min_samples=20, max_entities=1000)
    rng = np.random.default_rng(3)
    quiet = rng.uniform(0.0, 1.0, 50)  # entity "q": scores below 1
    loud = rng.uniform(5.0, 10.0, 50)  # entity "l": its normal is 5..10
    # Until each has 20 scores, the global value (20) judges both: nothing alerts.
    flags, used = t.judge(["q"] * 50 + ["l"] * 50, np.concatenate([quiet, loud]), 20.0)
    assert not flags.any() and (used == 20.0).all()
    # Then 3.0 is an anomaly for "q" and ordinary for "l"; a new entity still gets 20.
    flags, used = t.judge(["q", "l", "new"], np.array([3.0, 3.0, 3.0]), 20.0)
    assert flags.tolist() == [True, False, False]
    assert used[0] < 1.0 and 5.0 < used[1] <= 10.0 and used[2] == 20.0


def test_entity_thresholds_cap_the_entities_they_keep() -> None:
    t = EntityThresholds(window_size=10, quantile=0.9, min_samples=1, max_entities=5)
    for i in range(12):
        t.judge([f"e{i}"], np.array([1.0]), 2.0)
    assert t.entities == 5 and t.evictions == 7
