"""NAB (Numenta Anomaly Benchmark) scoring for a detector that emits alerts.

Implemented from the rules written down in `../shared/data/README.md` (checked there against
NAB's stored results): a probationary period that is not scored, windows that include both
ends, the scaled sigmoid that rewards early detection, and a per-profile normalisation where
the null detector scores 0 and the perfect one 100. One set of alerts is scored under all
three profiles (NAB would pick a threshold per profile for a detector that emits scores).

>>> flags = np.zeros(1000, dtype=bool)
>>> flags[500] = True                       # the first row of the only window
>>> s = score_file(flags, [Window(500, 599)], STANDARD)
>>> s.raw, s.windows, s.true_positives
(1.0, 1, 1)
>>> normalised(s.raw, s.windows, STANDARD)
100.0
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

PROBATION_FRACTION = 0.15
PROBATION_MAX_ROWS = 750


@dataclass(frozen=True)
class Profile:
    name: str
    a_tp: float
    a_fp: float
    a_fn: float


STANDARD = Profile("standard", a_tp=1.0, a_fp=0.11, a_fn=1.0)
LOW_FP = Profile("reward_low_FP_rate", a_tp=1.0, a_fp=0.22, a_fn=1.0)
LOW_FN = Profile("reward_low_FN_rate", a_tp=1.0, a_fp=0.11, a_fn=2.0)
PROFILES = (STANDARD, LOW_FP, LOW_FN)


class Window(NamedTuple):
    """Row indices of one labeled window, both ends included."""

    left: int
    right: int

    @property
    def width(self) -> int:
        return self.right - self.left + 1


@dataclass(frozen=True)
class FileScore:
    raw: float  # weighted sum for this file under one profile
    windows: int  # windows that count (not wholly inside the probationary period)
    true_positives: int
    false_positives: int
    false_negatives: int


def probation_rows(n_rows: int) -> int:
    """Rows at the start of a file that are not scored: min(floor(0.15 n), 750).

    >>> probation_rows(1000), probation_rows(10_000)
    (150, 750)
    """
    return min(math.floor(PROBATION_FRACTION * n_rows), PROBATION_MAX_ROWS)


def scaled_sigmoid(y: float) -> float:
    """2 / (1 + exp(5 y)) - 1, clamped to -1 beyond y > 3 (NAB's `scaledSigmoid`)."""
    if y > 3.0:
        return -1.0
    return 2.0 / (1.0 + math.exp(5.0 * y)) - 1.0


def windows_from_times(seconds: np.ndarray, windows: Sequence[tuple[float, float]]) -> list[Window]:
    """Time windows (POSIX seconds, both ends included) -> row windows of a sorted series."""
    out: list[Window] = []
    for start, end in windows:
        left = int(np.searchsorted(seconds, start, side="left"))
        right = int(np.searchsorted(seconds, end, side="right")) - 1
        if right >= left:
            out.append(Window(left, right))
    return out


def score_file(
    flags: np.ndarray, windows: Sequence[Window], profile: Profile, probation: int | None = None
) -> FileScore:
    """Score one file's alerts (`flags`, one bool per row) against its windows."""
    n = int(flags.size)
    probation = probation_rows(n) if probation is None else probation
    ordered = sorted(windows)
    # A window wholly inside the probationary period is neither credited nor charged.
    scored = [w for w in ordered if w.right >= probation]
    raw = 0.0
    tp = fp = 0
    detected: set[Window] = set()
    max_tp = scaled_sigmoid(-1.0)
    for i in np.flatnonzero(flags).tolist():
        if i < probation:
            continue
        inside = next((w for w in ordered if w.left <= i <= w.right), None)
        if inside is not None:
            if inside in detected:
                continue  # only the earliest detection in a window counts
            detected.add(inside)
            position = -(inside.right - i + 1) / inside.width
            raw += profile.a_tp * scaled_sigmoid(position) / max_tp
            tp += 1
            continue
        before = [w for w in ordered if w.right < i]
        if not before:
            raw -= profile.a_fp
        else:
            prev = before[-1]
            x = (i - prev.right) / (prev.width - 1) if prev.width > 1 else math.inf
            raw += profile.a_fp * scaled_sigmoid(x)
        fp += 1
    missed = sum(1 for w in scored if w not in detected)
    raw -= profile.a_fn * missed
    return FileScore(raw, len(scored), tp, fp, missed)


def null_raw(windows: int, profile: Profile) -> float:
    """Raw score of a detector that flags nothing."""
    return -profile.a_fn * windows


def perfect_raw(windows: int, profile: Profile) -> float:
    """Raw score of a detector that flags every window on its first row, and nothing else."""
    return profile.a_tp * windows


def normalised(raw: float, windows: int, profile: Profile) -> float:
    """100 * (raw - null) / (perfect - null), over summed raw scores and window counts."""
    low, high = null_raw(windows, profile), perfect_raw(windows, profile)
    if high == low:
        return 0.0
    return 100.0 * (raw - low) / (high - low)


@dataclass(frozen=True)
class CrossValidated:
    chosen: list[int]  # the setting chosen for each fold (on the other folds)
    score: float  # normalised, every file at the setting chosen without it
    in_sample_setting: int
    in_sample_score: float


def cross_validated(
    raw: np.ndarray, windows: np.ndarray, folds: np.ndarray, profile: Profile
) -> CrossValidated:
    """Choose a detector setting per fold on the other folds' files; score each file with the
    setting chosen without it (NAB's threshold optimiser, held out).

    `raw[f, k]`: file f's raw score under setting k; `windows[f]`: its scored windows;
    `folds[f]`: its fold. Ties go to the first setting. Also returns the in-sample optimum
    (NAB's own protocol: chosen on every file it scores), for comparison only.

    >>> raw = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 0.5]])  # 3 files, 2 settings
    >>> out = cross_validated(raw, np.array([1, 1, 1]), np.array([0, 1, 0]), STANDARD)
    >>> out.chosen, round(out.score, 1), out.in_sample_setting
    ([1, 0], 58.3, 0)
    """
    n_windows = int(windows.sum())
    chosen, held = [], 0.0
    for fold in sorted(set(folds.tolist())):
        inside = folds == fold
        k = int(np.argmax(raw[~inside].sum(axis=0)))
        chosen.append(k)
        held += float(raw[inside, k].sum())
    totals = raw.sum(axis=0)
    best = int(np.argmax(totals))
    return CrossValidated(
        chosen,
        normalised(held, n_windows, profile),
        best,
        normalised(float(totals[best]), n_windows, profile),
    )
