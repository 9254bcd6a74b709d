"""Per-entity threshold stage: EntityThresholds (baseline) against EntitySmoothedThresholds
(per-entity smoothing, the candidate), measured in the same run. No model, no Kafka.

    .venv/bin/python bench/entity_thresholds.py [--entities 1000,10000] [--batch 10000]
        [--repeats 5] [--min-seconds 1.0]

For each number of entities: batches of `--batch` synthetic scores spread over that many
entities (uneven shares, shuffled). Each threshold is warmed up until every entity is held
with `threshold.entity_min_samples` scores of its own (so that both compute a quantile per
entity: the baseline's empty rings skip it until then), then `judge` is timed on the batches
until `--min-seconds` have gone by; repeats interleaved (baseline, candidates, again),
median. Prints a markdown table: ms per batch, us per distinct entity in the batch.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np

from bench.timing import timed
from streamer.entity_smoothing import EntitySmoothedThresholds
from streamer.smoothing import SmoothingSettings
from streamer.threshold import EntityThresholds

WINDOW, QUANTILE, MIN_SAMPLES = 200, 0.999, 50  # the daemon's per-entity defaults
CANDIDATES = {
    "smoothed: ewma 0.1 + cooldown 10": SmoothingSettings(ewma_alpha=0.1, cooldown_rows=10),
    "smoothed: likelihood + mean_rows 10": SmoothingSettings(likelihood=0.9999, mean_rows=10),
}


def batches(entities: int, batch: int, count: int, seed: int) -> list[tuple[list[str], Any]]:
    rng = np.random.default_rng(seed)
    weights = rng.pareto(1.5, entities) + 1.0
    names = [f"e-{i:06d}" for i in range(entities)]
    out = []
    for _ in range(count):
        ids = rng.choice(entities, size=batch, p=weights / weights.sum())
        out.append(([names[i] for i in ids], rng.gamma(2.0, 0.5, batch)))
    return out


def judge(
    data: list[tuple[list[str], Any]], warm: Any, smoothing: SmoothingSettings | None
) -> Callable[[int], object]:
    """A fresh threshold's judge over batch i of data: the baseline without smoothing."""
    if smoothing is None:
        base = EntityThresholds(WINDOW, QUANTILE, MIN_SAMPLES, 1_000_000)
        return lambda i: base.judge(data[i][0], data[i][1], 1.0)
    t = EntitySmoothedThresholds(WINDOW, QUANTILE, MIN_SAMPLES, 1_000_000, warm, smoothing)
    return lambda i: t.judge(data[i][0], data[i][1])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--entities", default="1000,10000")
    ap.add_argument("--batch", type=int, default=10_000)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--min-seconds", type=float, default=1.0)
    args = ap.parse_args(argv)
    warm = np.random.default_rng(0).gamma(2.0, 0.5, 2000)
    rows = []
    for entities in (int(x) for x in args.entities.split(",")):
        data = batches(entities, args.batch, 4, seed=entities)
        names = sorted(set().union(*(k for k, _ in data)))
        every = [n for n in names for _ in range(MIN_SAMPLES)]
        data.append((every, np.random.default_rng(1).gamma(2.0, 0.5, len(every))))
        n = len(data) - 1  # the timed batches: data[:n]
        distinct = statistics.mean(len(set(k)) for k, _ in data[:n])

        makers: dict[str, SmoothingSettings | None] = {"baseline: EntityThresholds": None}
        makers.update(CANDIDATES)
        seconds: dict[str, list[float]] = {k: [] for k in makers}
        for _ in range(args.repeats):
            for name, smoothing in makers.items():
                call = judge(data, warm, smoothing)
                call(-1)  # warm-up: every entity held, with min_samples scores of its own
                for i in range(n):
                    call(i)
                seconds[name].append(timed(call, n, args.min_seconds))
        base = statistics.median(seconds["baseline: EntityThresholds"])
        for name, s in seconds.items():
            m = statistics.median(s)
            rows.append(
                f"| {entities:,} | {distinct:,.0f} | {name} | {1e3 * m:,.1f} | "
                f"{1e6 * m / distinct:.1f} | {m / base:.2f}x |"
            )
    print(f"batch {args.batch:,} scores; window {WINDOW}; median of {args.repeats} repeats")
    print("| entities | in a batch | threshold | ms/batch | us/entity | vs baseline |")
    print("|---:|---:|---|---:|---:|---:|")
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
