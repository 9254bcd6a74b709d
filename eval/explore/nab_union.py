"""NAB: would alerting on either of two models (dense: a value's range, LSTM: its shape) help?

Exploration, not a detector, and not held out: it reads the per-row likelihood z that two
evaluator runs saved and scores the union of their alerts, to decide whether a two-model
detector is worth building. Each model's alerts are recomputed from its z at a level, with
eval/nab-likelihood-runs.toml's rule (EWMA 0.1, once per run); a row alerts if either does.
Results and what they decided are in docs/QUALITY.md. Needs both runs' saved arrays:

    python -m training.evaluate --config eval/nab-likelihood-runs.toml --no-report
    python -m training.evaluate --config eval/nab-lstm-likelihood.toml --no-report
    python eval/explore/nab_union.py
"""

from __future__ import annotations

import sys
from pathlib import Path
from statistics import NormalDist

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from streamer.config import SmoothingSettings
from streamer.smoothing import shape
from training import nab
from training.adapters import load
from training.evaluate import load_config, nab_file_windows

RUNS = Path("runs/eval")
DENSE = ("nab-likelihood-runs", 0)  # (run, detector index whose z is read)
LSTM = ("nab-lstm-likelihood", 1)  # EWMA 0.1 + cooldown; z is taken before the cooldown
RULE = SmoothingSettings(likelihood=0.99999, ewma_alpha=0.1, once_per_run=True)
LEVELS = [
    (0.99999, None), (0.999995, None), (None, 0.99999), (None, 0.999995),
    (0.99999, 0.99999), (0.999995, 0.999995), (0.999995, 0.999999), (0.999999, 0.999999),
]  # fmt: skip


def main() -> None:
    series = load(load_config("eval/nab-likelihood-runs.toml").data)
    arrays = [np.load(RUNS / run / "series.npz") for run, _ in (DENSE, LSTM)]
    for a in arrays:
        assert list(a["series"]) == [s.name for s in series], "runs of other files"
    print("dense level, LSTM level: NAB standard / low FP / low FN, windows hit, FPs")
    for levels in LEVELS:
        total = {p.name: 0.0 for p in nab.PROFILES}
        windows = hit = fps = 0
        for k, s in enumerate(series):
            alerts = np.zeros(s.n, dtype=bool)
            for a, (_, d), level in zip(arrays, (DENSE, LSTM), levels, strict=True):
                if level is not None:
                    z = a[f"{k}/{d}/z"]
                    alerts[s.n_train :] |= shape(z > NormalDist().inv_cdf(level), RULE)[0]
            for p in nab.PROFILES:
                fs = nab.score_file(alerts, nab_file_windows(s), p)
                total[p.name] += fs.raw
            windows, hit, fps = (
                windows + fs.windows,
                hit + fs.true_positives,
                fps + fs.false_positives,
            )
        scores = " / ".join(
            f"{nab.normalised(total[p.name], windows, p):.1f}" for p in nab.PROFILES
        )
        print(f"{levels[0]}, {levels[1]}: {scores}, {hit}/{windows}, {fps}")


if __name__ == "__main__":
    main()
