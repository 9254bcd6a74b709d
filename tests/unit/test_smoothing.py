"""streamer/smoothing.py's vectorized `ewma` and `shape` against the per-row loops they
replaced (`ewma_loop`, `shape_loop`): the same numbers, also with state carried across batches.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest

from streamer import smoothing
from streamer.smoothing import (
    SmoothedThreshold,
    SmoothingSettings,
    decay_scan,
    ewma,
    ewma_loop,
    shape,
    shape_loop,
)

ALPHAS = [0.001, 0.01, 0.1, 0.3, 0.5, 0.9, 0.99, 0.999999]


def cuts(rng: np.random.Generator, n: int) -> Iterator[slice]:
    """Random batch boundaries over n rows, empty and one-row batches included."""
    start = 0
    while start < n:
        end = start + int(rng.choice([0, 1, 2, 7, 50, 300, 4000]))
        yield slice(start, min(end, n))
        start = min(end, n)


def scores(rng: np.random.Generator, n: int) -> np.ndarray:
    """Reconstruction-error-like: gamma scores with bursts at 5x."""
    return rng.gamma(2.0, 0.5, n) * rng.choice([1.0, 5.0], n, p=[0.98, 0.02])


@pytest.mark.parametrize("alpha", ALPHAS)
def test_ewma_is_the_loops_to_1e_12_across_batches(alpha: float) -> None:
    rng = np.random.default_rng(int(alpha * 1e6))
    for level in (None, 1.3):
        x = scores(rng, 12_000)
        whole = ewma_loop(x, alpha, level)
        parts, carried = [], level
        for part in cuts(rng, x.size):
            got = ewma(x[part], alpha, carried)
            np.testing.assert_allclose(got, ewma_loop(x[part], alpha, carried), rtol=1e-12)
            parts.append(got)
            carried = float(got[-1]) if got.size else carried
        np.testing.assert_allclose(np.concatenate(parts), whole, rtol=1e-12)


def test_ewma_of_random_alphas_and_lengths() -> None:
    rng = np.random.default_rng(7)
    for _ in range(200):
        alpha = float(rng.uniform(0.001, 1.0))
        x = scores(rng, int(rng.integers(0, 3000)))
        level = None if rng.random() < 0.3 else float(rng.gamma(2.0, 0.5))
        np.testing.assert_allclose(ewma(x, alpha, level), ewma_loop(x, alpha, level), rtol=1e-12)


def test_ewma_of_signed_values_within_1e_12_of_their_scale() -> None:
    # Values of either sign can average to about 0: the error is relative to their size.
    rng = np.random.default_rng(3)
    for alpha in ALPHAS:
        x = rng.normal(0.0, 10.0, 5000)
        got, want = ewma(x, alpha, -2.0), ewma_loop(x, alpha, -2.0)
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-12 * np.abs(x).max())


def test_ewma_edge_cases_are_the_loops() -> None:
    empty = np.empty(0)
    assert ewma(empty, 0.1).size == 0 and ewma(empty, 0.1, 2.0).size == 0
    assert ewma(np.array([3.0]), 0.1).tolist() == [3.0]  # the first score is its own average
    x = np.array([1.0, 2.0])
    assert ewma(x, 1.0, 5.0).tolist() == [1.0, 2.0]  # alpha 1: no smoothing
    assert ewma(x, 1.0) is not x
    # Non-finite scores spread as in the loop: inf stays inf, nan stays nan.
    bad = np.array([1.0, 2.0, np.inf, 1.0, np.nan, 1.0] * 300)
    np.testing.assert_array_equal(ewma(bad, 0.1, 1.0), ewma_loop(bad, 0.1, 1.0))
    # Scores so large that the blocks' scaled terms could overflow: the loop's numbers.
    huge = np.array([1e250, 1.0, 3e249, 2.0])
    np.testing.assert_allclose(ewma(huge, 0.1, 1.0), ewma_loop(huge, 0.1, 1.0), rtol=1e-12)


def test_decay_scan_over_many_blocks() -> None:
    # Decay 0.5 gives blocks of 200 rows: 50 of them, each carried into the next.
    rng = np.random.default_rng(5)
    v = rng.random(10_000)
    want, current = np.empty(v.size), 3.0
    for i, value in enumerate(v.tolist()):
        current = value + 0.5 * current
        want[i] = current
    np.testing.assert_allclose(decay_scan(v, 0.5, 3.0), want, rtol=1e-12)


SHAPES = [
    SmoothingSettings(min_consecutive=need, cooldown_rows=rest, once_per_run=once)
    for need in (1, 2, 5)
    for rest in (0, 1, 3, 288)
    for once in (False, True)
]


@pytest.mark.parametrize("settings", SHAPES, ids=str)
def test_shape_is_the_loops_exactly_across_batches(settings: SmoothingSettings) -> None:
    rng = np.random.default_rng(11)
    for p_above in (0.02, 0.5, 0.97):
        above = rng.random(20_000) < p_above
        # One state carried through random batches by each, compared batch by batch.
        fast, slow = (0, 0), (0, 0)
        for part in cuts(rng, above.size):
            flags, cooling, *state = shape(above[part], settings, *fast)
            want_flags, want_cooling, *want_state = shape_loop(above[part], settings, *slow)
            np.testing.assert_array_equal(flags, want_flags)
            np.testing.assert_array_equal(cooling, want_cooling)
            assert state == want_state
            fast = slow = (state[0], state[1])


def test_shape_from_any_carried_state() -> None:
    rng = np.random.default_rng(13)
    for _ in range(5000):
        settings = SHAPES[int(rng.integers(len(SHAPES)))]
        above = rng.random(int(rng.integers(0, 40))) < rng.random()
        run = int(rng.integers(0, 8))
        quiet = int(rng.integers(0, 60)) if settings.cooldown_rows else 0
        got, want = shape(above, settings, run, quiet), shape_loop(above, settings, run, quiet)
        np.testing.assert_array_equal(got[0], want[0])
        np.testing.assert_array_equal(got[1], want[1])
        assert got[2:] == want[2:]
        assert type(got[2]) is int and type(got[3]) is int


@pytest.mark.parametrize(
    "settings",
    [
        SmoothingSettings(ewma_alpha=0.1),
        SmoothingSettings(ewma_alpha=0.1, cooldown_rows=288),
        SmoothingSettings(likelihood=0.99999, ewma_alpha=0.1, once_per_run=True),
        SmoothingSettings(mean_rows=10, likelihood=0.99999),
        SmoothingSettings(likelihood=0.99999, ewma_alpha=0.1, once_per_run=True, median_cap=20.0),
        SmoothingSettings(ewma_alpha=0.3, min_consecutive=3, cooldown_rows=20),
        SmoothingSettings(ewma_alpha=0.2, cooldown_rows=50, learn_in_cooldown=True, margin=1.0),
    ],
    ids=str,
)
def test_a_smoothed_threshold_alerts_as_with_the_loops(
    settings: SmoothingSettings, monkeypatch: pytest.MonkeyPatch
) -> None:
    rng = np.random.default_rng(17)
    warm, x = scores(rng, 2000), scores(rng, 30_000)
    for start in rng.choice(x.size, 15, replace=False):  # incidents: runs of 5-100 rows at 3-8x
        x[start : start + rng.integers(5, 101)] *= rng.uniform(3.0, 8.0)
    batches = [x[part] for part in cuts(rng, x.size)]

    def run() -> tuple[np.ndarray, np.ndarray, list[float]]:
        t = SmoothedThreshold(8640, 0.999, 50, warm, settings)
        flags, smoothed, values = [], [], []
        for batch in batches:
            flags.append(t.judge(batch))
            smoothed.append(t.last_smoothed)
            values.append(t.value)
        return np.concatenate(flags), np.concatenate(smoothed), values

    flags, smoothed, values = run()
    monkeypatch.setattr(smoothing, "ewma", ewma_loop)
    monkeypatch.setattr(smoothing, "shape", shape_loop)
    want_flags, want_smoothed, want_values = run()
    assert want_flags.sum() > 0
    np.testing.assert_array_equal(flags, want_flags)
    np.testing.assert_allclose(smoothed, want_smoothed, rtol=1e-12)
    np.testing.assert_allclose(values, want_values, rtol=1e-9)
