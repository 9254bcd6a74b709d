"""ULB scenario 3: score variants checked on June, with the model trained on April-May.

Exploration, not a detector: it asks whether a change to how eval/ulb-feedback.toml's
autoencoder turns a row into a score would rank more scenario-3 frauds (a leaked card, a
third of its amounts x5) into the top 1% *before* any such change is run on July, the test
month. Training and the features are the evaluator's own (`training.evaluate.features`,
`training.fit.fit_bundle`); the variants are computed here, from each June row's squared error
per feature. Results and what they decided are in docs/QUALITY.md.

    python eval/explore/ulb_june.py --seed 0
    python eval/explore/ulb_june.py --seed 0 --scaler robust --only-daemon
    python eval/explore/ulb_june.py --config eval/ulb-feedback-median.toml --error-cap 9 \
        --only-daemon

Prints recall at a 1% alert rate over June, overall and per fraud scenario, for each variant.
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
from collections import defaultdict, deque
from pathlib import Path
from typing import Any

import msgspec.structs
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from streamer import bundle as bundles
from streamer.scoring import event_scores, reconstruction_errors, resolve_weights
from training.adapters import SplitSettings, load
from training.datasets import History
from training.evaluate import features, load_config
from training.fit import fit_bundle
from training.models import build_dense_autoencoder
from training.quality import recall_at_rate

CONFIG = "eval/ulb-feedback.toml"
TRAIN_UNTIL, JUNE_END = "2018-06-01T00:00:00", 1530403200.0  # June = validation, July unseen

# Column subsets (regular expressions over feature names) retrained from scratch.
SUBSETS = {
    "no rolling mean/std": r"^(?!.*\.(mean|std)\().*",
    "amount, customer ratio/count, terminal count/labels": (
        r"^(log1p\(tx_amount\)|customer_id\.(ratio|count)\(.*|terminal_id\.(count\(|label_).*)$"
    ),
}


def _table(name: str, y: np.ndarray, classes: np.ndarray, score: np.ndarray) -> None:
    r = recall_at_rate(y, np.nan_to_num(score, nan=-np.inf), 0.01, classes)
    per = "  ".join(f"s{c} {r.get(f'recall_class_{c}', 0.0):.3f}" for c in (1, 2, 3))
    print(f"  {name:58s} all {r['recall']:.3f}  {per}", flush=True)


def _fit(
    x_train: np.ndarray, x_test: np.ndarray, bottleneck: int, seed: int, training: Any
) -> np.ndarray:
    """A fresh autoencoder of the config's shape on some columns; per-feature test errors."""
    import keras

    keras.utils.set_random_seed(seed)
    order = np.random.default_rng(seed).permutation(len(x_train))
    n_val = int(len(x_train) * training.validation_split)
    a = x_train.astype(np.float32)
    model = build_dense_autoencoder(
        a.shape[1], training.hidden_units, bottleneck, training.learning_rate
    )
    stop = keras.callbacks.EarlyStopping(
        monitor="val_loss", patience=training.patience, restore_best_weights=True
    )
    model.fit(
        a[order[n_val:]], a[order[n_val:]],
        validation_data=(a[order[:n_val]], a[order[:n_val]]),
        epochs=training.epochs, batch_size=training.batch_size, callbacks=[stop], verbose=0,
    )  # fmt: skip
    b = x_test.astype(np.float32)
    return reconstruction_errors(b, model.predict(b, batch_size=8192, verbose=0))


def _per_entity(keys: np.ndarray, scores: np.ndarray, start: int, size: int = 100) -> dict:
    """Each row's score against the same customer's previous `size` scores (None: < 5)."""
    past: dict = defaultdict(lambda: deque(maxlen=size))
    out = {k: np.full(scores.size - start, np.nan) for k in ("mean", "median", "z")}
    for i, (key, v) in enumerate(zip(keys.tolist(), scores.tolist(), strict=True)):
        h = past[key]
        if i >= start and len(h) >= 5:
            a = np.fromiter(h, float)
            out["mean"][i - start] = v / a.mean()
            out["median"][i - start] = v / np.median(a)
            out["z"][i - start] = (v - a.mean()) / (a.std() + 1e-3)
        h.append(v)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--config", default=CONFIG, help=f"evaluator config ({CONFIG})")
    ap.add_argument("--scaler", choices=["standard", "robust"], default=None,
                    help="override training.scaler (the config's: standard)")  # fmt: skip
    ap.add_argument("--error-cap", type=float, default=None,
                    help="override training.error_cap (the config's: none)")  # fmt: skip
    ap.add_argument("--only-daemon", action="store_true",
                    help="the daemon's score only, no variants (1 training, not 6)")  # fmt: skip
    ap.add_argument("--save-errors", type=Path, default=None, metavar="NPZ",
                    help="write June's per-feature squared errors, labels and scenarios "
                         "(uncapped, unweighted) for offline score variants")  # fmt: skip
    args = ap.parse_args()
    seed = args.seed
    cfg = load_config(args.config)
    training = msgspec.structs.replace(
        cfg.training,
        seed=seed,
        scaler=args.scaler or cfg.training.scaler,
        error_cap=args.error_cap or cfg.training.error_cap,
    )
    [s] = load(msgspec.structs.replace(cfg.data, split=SplitSettings(train_until=TRAIN_UNTIL)))
    n0, end = s.n_train, int(np.searchsorted(s.seconds, JUNE_END))
    h = features(cfg.features, s, 0, s.n, cfg.replay.label_delay_seconds)
    with tempfile.TemporaryDirectory() as tmp:
        history = History(h.features[:n0], h.event_seconds[:n0], 0, h.keys[:n0])
        fit_bundle(cfg.features, history, training, Path(tmp), source="ulb-june")
        b = bundles.load(Path(tmp), expected_spec=cfg.features)
        scorer = b.load_scorer()
        xt, x = b.scaler.transform(h.features[:n0]), b.scaler.transform(h.features[n0:end])
        raw_t, raw = h.features[:n0], h.features[n0:end]
        err_t = reconstruction_errors(xt, scorer.reconstruct(xt.astype(np.float32)))
        err = reconstruction_errors(x, scorer.reconstruct(x.astype(np.float32)))
    y, classes, names = s.labels[n0:end], s.classes[n0:end], cfg.features.feature_names()
    frauds = {c: int(((y == 1) & (classes == c)).sum()) for c in (1, 2, 3)}
    print(f"{args.config}, seed {seed}, scaler {training.scaler}, error cap "
          f"{training.error_cap}: June rows {y.size}, "
          f"frauds by scenario {frauds}")  # fmt: skip
    if args.save_errors:
        np.savez_compressed(args.save_errors, errors=err, labels=y, classes=classes,
                            names=np.array(names))  # fmt: skip
    weights = resolve_weights(names, training.score_weights) if training.score_weights else None
    daemon = event_scores(err, training.error_cap, weights)
    _table("mean squared error (the daemon's score)", y, classes, daemon)
    # What fills the top 1% instead: the share of genuine top rows' error in each feature.
    top = np.argsort(-daemon, kind="stable")[: round(0.01 * y.size)]
    genuine = err[top[y[top] == 0]]
    share = genuine.sum(0) / genuine.sum()
    worst = np.argsort(-share)[:4]
    print("  genuine rows in the top 1%, share of their error: "
          + ", ".join(f"{names[j]} {share[j]:.3f}" for j in worst))  # fmt: skip
    for j, name in enumerate(names):
        if name in ("log1p(tx_amount)", "customer_id.ratio(tx_amount,30d)",
                    "customer_id.median_ratio(tx_amount,30d)"):  # fmt: skip
            _table(f"one feature as the score: {name}", y, classes, raw[:, j])
    if args.only_daemon:
        return
    mu, q99 = err_t.mean(0), np.quantile(err_t, 0.99, axis=0)
    z = err / np.maximum(mu, 1e-12)
    _table("errors / training mean per feature, mean", y, classes, z.mean(1))
    _table("errors / training mean per feature, max", y, classes, z.max(1))
    _table("errors / training p99 per feature, mean", y, classes, (err / q99).mean(1))
    _table("errors / training p99 per feature, max", y, classes, (err / q99).max(1))
    _table("sqrt(errors / training mean), mean", y, classes, np.sqrt(z).mean(1))
    scores = np.concatenate([err_t.mean(1), err.mean(1)])
    keys = s.columns["customer_id"][:end]
    for k, v in _per_entity(keys, scores, n0).items():
        _table(f"score against the customer's last 100 scores ({k})", y, classes, v)
    for bottleneck in (1, 4, 8):
        e = _fit(xt, x, bottleneck, seed, training)
        _table(f"bottleneck {bottleneck} (config: {training.bottleneck})", y, classes, e.mean(1))
    for label, pattern in SUBSETS.items():
        cols = [j for j, n in enumerate(names) if re.match(pattern, n)]
        e = _fit(xt[:, cols], x[:, cols], training.bottleneck, seed, training)
        _table(f"{len(cols)} columns: {label}", y, classes, e.mean(1))
    # Amount ratios are multiplicative and heavy-tailed (a tiny 30-day mean gives a ratio of
    # hundreds of standard deviations): the same model over log(ratio), re-standardized.
    ratio = [j for j, n in enumerate(names) if ".ratio(" in n]
    lt, lx = raw_t.copy(), raw.copy()
    lt[:, ratio], lx[:, ratio] = (
        np.log(np.maximum(lt[:, ratio], 1e-6)),
        np.log(np.maximum(lx[:, ratio], 1e-6)),
    )
    m, sd = lt[:, ratio].mean(0), lt[:, ratio].std(0)
    xt2, x2 = xt.copy(), x.copy()
    xt2[:, ratio], x2[:, ratio] = (lt[:, ratio] - m) / sd, (lx[:, ratio] - m) / sd
    e = _fit(xt2, x2, training.bottleneck, seed, training)
    _table("log of the amount ratios", y, classes, e.mean(1))


if __name__ == "__main__":
    main()
