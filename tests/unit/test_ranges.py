"""threshold.range_tolerance: Numenta's "spatial anomaly" rule over each scaled feature."""

import msgspec
import numpy as np
import pytest

from streamer import bundle as bundles
from streamer.app import build_pipeline
from streamer.config import ThresholdSettings, from_mapping
from streamer.ranges import RangeGuard, training_range


def numenta_rule(x: np.ndarray, low: list[float] | None, high: list[float] | None, tol: float):
    """NAB's detector row by row and feature by feature: the reference for RangeGuard."""
    lo = None if low is None else list(low)
    hi = None if high is None else list(high)
    out = []
    for row in x.tolist():
        if lo is None or hi is None:
            lo, hi = list(row), list(row)
        hit = False
        for j, v in enumerate(row):
            if lo[j] != hi[j]:
                margin = (hi[j] - lo[j]) * tol
                hit |= v > hi[j] + margin or v < lo[j] - margin
            lo[j], hi[j] = min(lo[j], v), max(hi[j], v)
        out.append(hit)
    return out, lo, hi


@pytest.mark.parametrize("start", [True, False])
def test_matches_the_row_by_row_rule_across_batches(start: bool) -> None:
    rng = np.random.default_rng(3)
    # A drifting walk with spikes, in three features of different scales; one is constant.
    x = np.cumsum(rng.normal(0, 1, (3000, 3)), axis=0) * [1.0, 0.01, 0.0]
    x[rng.integers(0, 3000, 30), 0] += rng.normal(0, 50, 30)
    low, high = ([-5.0, -0.1, 0.0], [5.0, 0.1, 0.0]) if start else (None, None)
    want, want_low, want_high = numenta_rule(x, low, high, 0.05)
    guard = RangeGuard(
        None if low is None else np.array(low), None if high is None else np.array(high), 0.05
    )
    got: list[bool] = []
    cuts = np.sort(rng.choice(np.arange(1, 3000), 40, replace=False))
    for part in np.split(x, cuts):
        got += guard.check(part).tolist()
    guard.check(np.empty((0, 3)))  # an empty batch changes nothing
    assert got == want and 5 < sum(got) < 300
    assert guard.low is not None and guard.high is not None
    assert guard.low.tolist() == want_low and guard.high.tolist() == want_high


def test_a_constant_feature_never_breaks_out_and_the_first_row_only_starts_the_range() -> None:
    guard = RangeGuard(None, None, 0.0)
    assert guard.check(np.array([[1.0, 5.0], [1.0, 5.0], [1.0, 6.0], [1.0, 7.0]])).tolist() == [
        False, False, False, True,
    ]  # fmt: skip


def test_only_the_checked_features_are_judged(hourly_forecast_bundle: bundles.Bundle) -> None:
    # An hour's sin and cos are bounded by construction: an hour a short history did not
    # cover is not beyond range; the value is judged as before.
    guard = RangeGuard(np.array([0.0, 0.0]), np.array([1.0, 1.0]), 0.05, np.array([True, False]))
    assert guard.check(np.array([[0.5, -1.0], [2.0, 0.5]])).tolist() == [False, True]
    s = from_mapping(
        {
            "features": msgspec.to_builtins(hourly_forecast_bundle.spec),
            "kafka": {"input_topic": "in", "alert_topic": "a", "dead_letter_topic": "d"},
            "model": {"bundle": "unused"},
            "threshold": {"range_tolerance": 0.05},
        }
    )
    b = hourly_forecast_bundle
    p = build_pipeline(s, b, b.load_scorer("numpy"))
    assert p.ranges is not None and p.ranges.checked is not None
    assert p.ranges.checked.tolist() == [True, False, False]  # value, hour_sin, hour_cos


def test_training_range_and_validation() -> None:
    assert training_range(np.array([[1.0, -2.0], [3.0, 0.5]])) == ([1.0, -2.0], [3.0, 0.5])
    with pytest.raises(ValueError, match=r"threshold\.range_tolerance"):
        ThresholdSettings(range_tolerance=-0.1)
    with pytest.raises(ValueError, match=r"threshold\.range_tolerance"):
        RangeGuard(None, None, -1.0)


def test_training_range_over_parts_equals_the_joined_rows() -> None:
    rng = np.random.default_rng(2)
    a, b = rng.normal(size=(50, 3)), rng.normal(size=(7, 3)) * 5
    assert training_range(a, b) == training_range(np.vstack([a, b]))
