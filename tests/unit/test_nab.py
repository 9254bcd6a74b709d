"""NAB scoring, checked against the rules in ../shared/data/README.md with numbers by hand."""

import numpy as np
import pytest

from training import nab
from training.nab import LOW_FN, LOW_FP, PROFILES, STANDARD, Window, normalised, score_file

N = 1000  # rows per file in these tests: probation = floor(0.15 * 1000) = 150
W1, W2 = Window(200, 299), Window(600, 649)


def flags_at(*rows: int, n: int = N) -> np.ndarray:
    f = np.zeros(n, dtype=bool)
    f[list(rows)] = True
    return f


def corpus_score(files: list[tuple[np.ndarray, list[Window]]], profile: nab.Profile) -> float:
    raw = windows = 0.0
    for flags, ws in files:
        s = score_file(flags, ws, profile)
        raw += s.raw
        windows += s.windows
    return normalised(raw, int(windows), profile)


FILES = [(N, [W1, W2]), (2000, [Window(400, 499)]), (1500, [])]


@pytest.mark.parametrize("profile", PROFILES, ids=lambda p: p.name)
def test_null_detector_scores_zero_and_perfect_one_hundred(profile: nab.Profile) -> None:
    null = [(np.zeros(n, dtype=bool), ws) for n, ws in FILES]
    perfect = [(flags_at(*(w.left for w in ws), n=n), ws) for n, ws in FILES]
    assert corpus_score(null, profile) == pytest.approx(0.0)
    assert corpus_score(perfect, profile) == pytest.approx(100.0)


def test_probation_rows() -> None:
    assert nab.probation_rows(1127) == 169
    assert nab.probation_rows(5000) == 750
    assert nab.probation_rows(22_695) == 750


def test_hand_computed_file() -> None:
    # Row 100: probation, ignored. Row 160: FP with no window before it: -A_FP.
    # Row 250 in W1 (width 100): sigma(-(299 - 250 + 1) / 100) / sigma(-1) = 0.859793 (by hand:
    # sigma(-0.5) = 2 / (1 + e^-2.5) - 1 = 0.848283, sigma(-1) = 0.986614). Row 260: W1 already
    # credited, nothing. Row 349: FP after W1, x = 50 / 99: A_FP * sigma(0.50505) = A_FP *
    # -0.851786. Row 900: FP after W2, x = 251 / 49 > 3: -A_FP. W2 is missed: -A_FN.
    flags = flags_at(100, 160, 250, 260, 349, 900)
    s = score_file(flags, [W1, W2], STANDARD)
    assert (s.windows, s.true_positives, s.false_positives, s.false_negatives) == (2, 1, 3, 1)
    assert s.raw == pytest.approx(-0.11 + 0.859793 - 0.11 * 0.851786 - 0.11 - 1.0, abs=1e-5)
    assert score_file(flags, [W1, W2], LOW_FP).raw == pytest.approx(-0.767600, abs=1e-5)
    assert score_file(flags, [W1, W2], LOW_FN).raw == pytest.approx(-1.453904, abs=1e-5)


def test_earliest_detection_earns_most() -> None:
    first = score_file(flags_at(W1.left), [W1], STANDARD).raw
    middle = score_file(flags_at((W1.left + W1.right) // 2), [W1], STANDARD).raw
    last = score_file(flags_at(W1.right), [W1], STANDARD).raw
    assert first == pytest.approx(1.0)
    assert first > middle > last > 0.0


def test_windows_inside_probation_are_neither_credited_nor_charged() -> None:
    inside = Window(10, 50)  # wholly inside the 150-row probationary period
    partly = Window(100, 199)  # partly inside: counted, keeps its width of 100
    s = score_file(np.zeros(N, dtype=bool), [inside, partly], STANDARD)
    assert s.windows == 1 and s.raw == pytest.approx(-1.0)
    s = score_file(flags_at(30, 150), [inside, partly], STANDARD)
    # Row 30 is in probation; row 150 is 50 rows before the end of a 100-row window.
    assert s.true_positives == 1
    assert s.raw == pytest.approx(0.859793, abs=1e-5)


def test_false_positive_right_after_a_window_costs_little() -> None:
    near = score_file(flags_at(W1.left, W1.right + 1), [W1], STANDARD).raw
    far = score_file(flags_at(W1.left, W1.right + 400), [W1], STANDARD).raw
    assert near - 1.0 == pytest.approx(-0.11 * (1 - 2 / (1 + np.exp(5 / 99))), abs=1e-9)
    assert far - 1.0 == pytest.approx(-0.11)


def test_windows_from_times_include_both_ends() -> None:
    seconds = np.arange(100, dtype=np.float64) * 300.0
    ws = nab.windows_from_times(seconds, [(3000.0, 6000.0), (29_000.0, 40_000.0)])
    assert ws == [Window(10, 20), Window(97, 99)]
    assert ws[0].width == 11
