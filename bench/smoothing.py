"""One-stream smoothing: SmoothedThreshold.judge (the daemon's `[smoothing]`) against
RollingQuantileThreshold.judge (the daemon without it), measured in the same run. No model,
no Kafka.

    .venv/bin/python bench/smoothing.py [--batches 500,1000,5000] [--rows 40000]
        [--repeats 5] [--min-seconds 0.5] [--row-budget-us 2.15]

A stream of `--rows` synthetic scores (gamma-distributed, with bursts of 5-100 rows at 3-8x
now and then, so that some rows are above the threshold) is cut into batches of each size.
Every threshold starts from the same warm start (2,000 scores of the same distribution),
judges the whole stream once untimed (its alerts per batch are counted then), then `judge`
is timed over the batches, cycling, until `--min-seconds` have gone by; repeats interleaved
(baseline, candidates, again), median. Thresholds: the daemon's defaults (window 10,000,
quantile 0.999, min_samples 500) unless the candidate says otherwise.

Each candidate that smooths with the EWMA or shapes alerts also runs as a reference, with the
per-row loops that `ewma` and `shape` were before they were vectorized (`smoothing.ewma_loop`,
`shape_loop`; `--no-reference` leaves them out); both must alert on exactly the same rows.

Prints a markdown table: us per batch, ns per row, the ratio to the baseline, and the extra
ns per row over the baseline as a share of `--row-budget-us`, the cost of one row through
the whole dense pipeline (bench/README.md, stages: `Pipeline.process` at batch 1,000,
2.15 us/event).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import NamedTuple

if __name__ == "__main__":  # a test that imports it leaves its process's environment alone
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np

from bench.timing import timed
from streamer import smoothing
from streamer.config import ThresholdSettings
from streamer.smoothing import SmoothedThreshold, SmoothingSettings
from streamer.threshold import RollingQuantileThreshold

DEFAULTS = ThresholdSettings()  # window 10,000, quantile 0.999, min_samples 500
BASELINE = "baseline: RollingQuantileThreshold"


class Candidate(NamedTuple):
    settings: SmoothingSettings
    window_size: int = DEFAULTS.window_size
    min_samples: int = DEFAULTS.min_samples
    loops: bool = False  # the per-row loops SmoothedThreshold had before (the reference)


class LoopSmoothedThreshold(SmoothedThreshold):
    """SmoothedThreshold with smoothing.ewma_loop and shape_loop, the per-row loops it used
    before ewma and shape were vectorized: the module's functions are swapped during judge."""

    def judge(self, scores: np.ndarray) -> np.ndarray:
        saved = smoothing.ewma, smoothing.shape
        smoothing.ewma, smoothing.shape = smoothing.ewma_loop, smoothing.shape_loop
        try:
            return super().judge(scores)
        finally:
            smoothing.ewma, smoothing.shape = saved


CANDIDATES = {
    "(a) ewma 0.1": Candidate(SmoothingSettings(ewma_alpha=0.1)),
    "(b) ewma 0.1 + cooldown 288": Candidate(SmoothingSettings(ewma_alpha=0.1, cooldown_rows=288)),
    # README's NAB best (eval/nab-likelihood-runs.toml): window 8640, min_samples 50.
    "(c) likelihood + ewma 0.1 + once_per_run, window 8640": Candidate(
        SmoothingSettings(likelihood=0.99999, ewma_alpha=0.1, once_per_run=True), 8640, 50
    ),
    "(d) mean_rows 10 + likelihood": Candidate(SmoothingSettings(mean_rows=10, likelihood=0.99999)),
}
LOOPS = " - reference: per-row loops"


def stream(rows: int, seed: int) -> np.ndarray:
    """Gamma(2, 0.5) scores with a burst (5-100 rows, 3-8x) starting at about 1 row in 2,000."""
    rng = np.random.default_rng(seed)
    scores = rng.gamma(2.0, 0.5, rows)
    for start in np.flatnonzero(rng.random(rows) < 1 / 2000):
        scores[start : start + rng.integers(5, 101)] *= rng.uniform(3.0, 8.0)
    return scores


def has_loops(s: SmoothingSettings) -> bool:
    """Whether SmoothedThreshold ran a per-row loop with these settings before."""
    return s.ewma_alpha < 1.0 or s.min_consecutive > 1 or s.once_per_run or s.cooldown_rows > 0


def make(candidate: Candidate | None, warm: np.ndarray) -> RollingQuantileThreshold:
    """A fresh threshold from the warm start: the baseline without smoothing."""
    if candidate is None:
        return RollingQuantileThreshold(
            DEFAULTS.window_size, DEFAULTS.quantile, DEFAULTS.min_samples, warm
        )
    kind = LoopSmoothedThreshold if candidate.loops else SmoothedThreshold
    return kind(
        candidate.window_size, DEFAULTS.quantile, candidate.min_samples, warm, candidate.settings
    )


def judging(t: RollingQuantileThreshold, data: list[np.ndarray]) -> Callable[[int], object]:
    """t.judge over batch i of data."""
    return lambda i: t.judge(data[i])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--batches", default="500,1000,5000", help="batch sizes")
    ap.add_argument("--rows", type=int, default=40_000, help="the stream's length")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--min-seconds", type=float, default=0.5)
    ap.add_argument(
        "--row-budget-us",
        type=float,
        default=2.15,
        help="us per row of the whole pipeline, to put the extra cost in perspective",
    )
    ap.add_argument(
        "--no-reference", action="store_true", help="leave out the per-row loop candidates"
    )
    args = ap.parse_args(argv)
    sizes = [int(x) for x in args.batches.split(",")]
    if args.rows < max(sizes):
        ap.error(f"a stream of {args.rows:,} rows is shorter than batch {max(sizes):,}")
    warm = np.random.default_rng(0).gamma(2.0, 0.5, 2000)
    scores = stream(args.rows, seed=1)
    makers: dict[str, Candidate | None] = {BASELINE: None}
    for name, cand in CANDIDATES.items():
        makers[name] = cand
        if not args.no_reference and has_loops(cand.settings):
            makers[name + LOOPS] = cand._replace(loops=True)
    load_before = os.getloadavg()
    started = time.monotonic()
    rows = []
    for size in sizes:
        data = [scores[i : i + size] for i in range(0, args.rows - size + 1, size)]
        seconds: dict[str, list[float]] = {k: [] for k in makers}
        flags: dict[str, np.ndarray] = {}
        for _ in range(args.repeats):
            for name, candidate in makers.items():
                t = make(candidate, warm)
                flags[name] = np.concatenate([t.judge(batch) for batch in data])  # untimed
                seconds[name].append(timed(judging(t, data), len(data), args.min_seconds))
        for name in makers:  # the vectorized functions alert exactly as the loops did
            if name.endswith(LOOPS) and not np.array_equal(flags[name], flags[name[: -len(LOOPS)]]):
                print(f"batch {size}: {name} alerts differently", file=sys.stderr)
                return 1
        base = statistics.median(seconds[BASELINE])
        for name, s in seconds.items():
            m = statistics.median(s)
            alerts = flags[name].sum() / len(data)
            extra_ns = 1e9 * (m - base) / size
            rows.append(
                f"| {size:,} | {name} | {1e6 * m:,.1f} | {1e9 * m / size:,.1f} | "
                f"{m / base:.2f}x | {extra_ns:+,.0f} | "
                f"{extra_ns / (10 * args.row_budget_us):+.1f}% | {alerts:.2f} |"
            )
    load_after = os.getloadavg()
    print(
        f"bench/smoothing.py; {datetime.now(UTC):%Y-%m-%dT%H:%M:%S+00:00}; nproc {os.cpu_count()}, "
        f"Python {platform.python_version()}, numpy {np.__version__}; "
        f"load average {load_before[0]:.2f} before, {load_after[0]:.2f} after "
        f"({time.monotonic() - started:.0f}s)"
    )
    print(
        f"{args.rows:,}-row stream; threshold window {DEFAULTS.window_size:,} (unless named), "
        f"quantile {DEFAULTS.quantile}; median of {args.repeats} repeats"
    )
    print()
    print(
        "| batch | threshold | us/batch | ns/row | vs baseline | extra ns/row | "
        f"extra, share of {args.row_budget_us} us/row | alerts/batch |"
    )
    print("|---:|---|---:|---:|---:|---:|---:|---:|")
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
