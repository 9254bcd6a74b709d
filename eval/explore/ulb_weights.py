"""ULB scenario 3: which feature groups the score should count, chosen on June.

Exploration, not a detector. It reads the per-feature June errors that
`eval/explore/ulb_june.py --save-errors` writes (one file per seed, model on April-May) and
ranks June by the daemon's score (each squared error capped, then a weighted mean) for every
choice of scored groups: each group of the customer's columns and the per-event columns is
scored (weight 1) or context (weight 0); the terminal's columns stay context, as in
eval/ulb-feedback-median-cap9-context.toml. Results and what they decided: docs/QUALITY.md.

    for s in 0 1 2; do python eval/explore/ulb_june.py \\
        --config eval/ulb-feedback-median-cap9-context.toml --seed $s --only-daemon \\
        --save-errors june-s$s.npz; done
    python eval/explore/ulb_weights.py june-s0.npz june-s1.npz june-s2.npz

Prints the 127 choices by their mean June recall of scenario 3 at a 1% alert rate.
"""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from streamer.scoring import event_scores, resolve_weights
from training.quality import recall_at_rate

# The groups of eval/ulb-feedback-median.toml's columns, as score_weights patterns.
GROUPS = {
    "amount": "log1p(tx_amount)",
    "hour": "hour_*",
    "since_previous": "customer_id.since_previous",
    "count": "customer_id.count(*",
    "median": "customer_id.median(*",
    "std": "customer_id.std(*",
    "median_ratio": "customer_id.median_ratio(*",
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("errors", nargs="+", type=Path, help="ulb_june.py --save-errors files")
    ap.add_argument("--cap", type=float, default=9.0, help="training.error_cap (9)")
    ap.add_argument("--top", type=int, default=20, help="how many choices to print (20)")
    args = ap.parse_args()
    runs = [np.load(p) for p in args.errors]
    names = [str(n) for n in runs[0]["names"]]
    rows = []
    for bits in itertools.product((0.0, 1.0), repeat=len(GROUPS)):
        if not any(bits):
            continue
        weights = {"terminal_id.*": 0.0, **dict(zip(GROUPS.values(), bits, strict=True))}
        w = resolve_weights(names, weights)
        recalls = []
        for r in runs:
            score = event_scores(r["errors"], args.cap, w)
            got = recall_at_rate(r["labels"], score, 0.01, r["classes"])
            recalls.append([got.get(f"recall_class_{c}", 0.0) for c in (2, 3)])
        s2, s3 = np.mean(recalls, axis=0)
        scored = "+".join(g for g, b in zip(GROUPS, bits, strict=True) if b)
        per_seed = " / ".join(f"{x[1]:.3f}" for x in recalls)
        rows.append((s3, s2, scored, per_seed))
    rows.sort(key=lambda row: -row[0])
    print(f"{len(rows)} choices, cap {args.cap}, {len(runs)} seeds; scored groups (rest context):")
    for s3, s2, scored, per_seed in rows[: args.top]:
        print(f"  scen. 3 {s3:.3f} ({per_seed})  scen. 2 {s2:.3f}  {scored}")


if __name__ == "__main__":
    main()
