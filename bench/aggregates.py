"""Per-entity rolling features (streamer/aggregates.py): the default stats (count, mean, std,
ratio: O(1) per event, the baseline) against the medians (count, median, std, median_ratio:
a sort of each window's values per event), measured in the same run. No model, no Kafka.

    .venv/bin/python bench/aggregates.py [--customers 2000] [--days 60] [--per-day 2]
        [--repeats 3]

The stream is payments-like: each customer pays `--per-day` times a day on average (Poisson
arrivals, amounts log-normal around a per-customer level), all customers interleaved in
event-time order, one rolling column of the amount per customer over 1, 7 and 30 days (the
eval/ulb-feedback.toml layout). Each repeat builds a fresh state, feeds it the first half of
the days untimed (so the 30-day windows are full, as in a long-running daemon), then times
the second half in batches of 1,000 events. Repeats interleaved (baseline, candidates,
again), median. The two sets' shared columns (count, std) must agree exactly (exit 1 if not).

Prints a markdown table: us per event and the ratio to the baseline.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np

from streamer.aggregates import AggregateState
from streamer.features import FeatureSpec, Rolling, Stat

DAY = 86_400.0
WINDOWS = [DAY, 7 * DAY, 30 * DAY]
BATCH = 1000
BASELINE = "count, mean, std, ratio (default)"
SETS: dict[str, list[Stat]] = {
    BASELINE: ["count", "mean", "std", "ratio"],
    "count, median, std, median_ratio": ["count", "median", "std", "median_ratio"],
    "all six": ["count", "mean", "std", "ratio", "median", "median_ratio"],
}


def spec(stats: list[Stat]) -> FeatureSpec:
    column = Rolling(field="amount", windows_seconds=WINDOWS, stats=stats, key="customer")
    return FeatureSpec("bench", "customer", "ts", [column], time_format="epoch_s")


def stream(customers: int, days: int, per_day: float, seed: int = 0) -> tuple[list[Any], int]:
    """(events in event-time order, index of the first event of the timed half)."""
    rng = np.random.default_rng(seed)
    n = rng.poisson(customers * days * per_day)
    ts = np.sort(rng.uniform(0.0, days * DAY, n))
    who = rng.integers(0, customers, n)
    level = rng.lognormal(3.5, 0.7, customers)
    amount = level[who] * rng.lognormal(0.0, 0.5, n)
    event = spec(SETS[BASELINE]).event_type()
    events = [
        event(customer=int(c), ts=float(t), amount=float(a))
        for c, t, a in zip(who, ts, amount, strict=True)
    ]
    return events, int(np.searchsorted(ts, days * DAY / 2))


def run(stats: list[Stat], events: list[Any], half: int) -> tuple[float, np.ndarray]:
    """(seconds for the timed half, its features)."""
    state = AggregateState(spec(stats))
    for i in range(0, half, BATCH * 10):
        state.update(events[i : min(i + BATCH * 10, half)])
    out, started = [], time.perf_counter()
    for i in range(half, len(events), BATCH):
        out.append(state.update(events[i : i + BATCH]))
    return time.perf_counter() - started, np.vstack(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--customers", type=int, default=2000)
    ap.add_argument("--days", type=int, default=60)
    ap.add_argument("--per-day", type=float, default=2.0)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)
    events, half = stream(args.customers, args.days, args.per_day)
    timed = len(events) - half
    times: dict[str, list[float]] = {name: [] for name in SETS}
    features: dict[str, np.ndarray] = {}
    for _ in range(args.repeats):
        for name, stats in SETS.items():
            seconds, features[name] = run(stats, events, half)
            times[name].append(seconds)
    # count and std are computed the same way in every set: they must not differ.
    base, medians = features[BASELINE], features["count, median, std, median_ratio"]
    if not (np.array_equal(base[:, 0::4], medians[:, 0::4]) and
            np.array_equal(base[:, 2::4], medians[:, 2::4])):  # fmt: skip
        print("the median set's count or std columns differ from the default set's")
        return 1
    per_window = medians[:, 0::4].mean(axis=0)
    load = os.getloadavg()
    print(
        f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC, {platform.python_version()}, numpy "
        f"{np.__version__}, {os.cpu_count()} CPUs, load {load[0]:.2f}; {len(events):,} events "
        f"of {args.customers:,} customers over {args.days} days, {timed:,} timed; earlier "
        f"events per window (1d, 7d, 30d): " + ", ".join(f"{c:.1f}" for c in per_window) + "\n"
    )
    print("| stats per window (1d, 7d, 30d) | us per event | ratio to default |")
    print("|---|---:|---:|")
    base_s = statistics.median(times[BASELINE])
    for name in SETS:
        sec = statistics.median(times[name])
        print(f"| {name} | {sec / timed * 1e6:.2f} | {sec / base_s:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
