"""The training report: `report.html` in a bundle directory, one self-contained file with
tables and embedded PNG plots (loss curves, held-out error distribution, per-feature error).

Written after the manifest and not listed in it: a report documents a bundle, it is not
model content, so it does not change the version and `streamer.bundle.load` ignores it.
Everything it shows comes from the manifest and the warm-start errors, so it can be
rebuilt for any bundle: `python -m training.bundle_report <bundle or registry dir>`.

matplotlib is imported here only (a dev extra, not the daemon's), with the Agg backend.
"""

from __future__ import annotations

import argparse
import html
import sys
from pathlib import Path
from typing import Any

import numpy as np

from streamer import bundle as bundles
from training.report import CSS, _fmt, _png

REPORT_FILE = "report.html"
# Lines on the error histogram: where the daemon's threshold would start at its usual
# quantiles (threshold.quantile; 0.999 is the default).
MARKED_QUANTILES = (0.99, 0.999)


def write_report(root: Path, manifest: bundles.Manifest, errors: np.ndarray) -> Path:
    """Render `<root>/report.html` from a bundle's manifest and its held-out errors (the
    warm start, one per event or window); returns its path."""
    import matplotlib

    matplotlib.use("Agg")
    t, d = manifest.training, manifest.data
    kind = manifest.model_kind
    if manifest.window_length:
        kind += f", windows of {manifest.window_length} rows"
    parts = [
        f"<!doctype html><html><head><meta charset='utf-8'><title>bundle {manifest.version}"
        f"</title><style>{CSS}</style></head><body>",
        f"<h1>Bundle {html.escape(manifest.version)} ({html.escape(kind)})</h1>",
        f"<p class='note'>Created {html.escape(manifest.created_at)}, "
        f"{len(manifest.feature_names)} features. This file is not part of the bundle's "
        "version hash.</p>",
        "<h2>Data</h2>",
        _table(_data_rows(d)),
        "<h2>Training</h2>",
        _table(_training_rows(t)),
        _loss_plot(t.get("history", {}), t.get("best_epoch")),
        "<h2>Held-out error</h2>",
        "<p class='note'>The score of each held-out event (LSTM: window) is its mean squared "
        "reconstruction error over scaled features. The daemon's threshold starts from these "
        "scores (threshold.json) at its configured quantile, then follows the live stream.</p>",
        _error_histogram(errors, t.get("val_error_quantiles", {})),
        _table([(f"quantile {q}", _g(v)) for q, v in t["val_error_quantiles"].items()]),
        "<h2>Error per feature</h2>",
        _feature_plot(t.get("val_feature_error")),
        "<h2>Settings</h2>",
        _table([(k, html.escape(str(v))) for k, v in t["settings"].items()]),
        "</body></html>",
    ]
    path = root / REPORT_FILE
    path.write_text("\n".join(parts))
    return path


def _table(rows: list[tuple[str, str]]) -> str:
    """Two columns, label and already-escaped value."""
    body = "".join(f"<tr><td>{html.escape(k)}</td><td>{v}</td></tr>" for k, v in rows)
    return f"<table>{body}</table>"


def _data_rows(d: dict[str, Any]) -> list[tuple[str, str]]:
    rows = [
        ("source", _fmt(d.get("source"))),
        ("events", _fmt(d.get("events"))),
        ("rejected (undecodable or non-finite)", _fmt(d.get("rejected"))),
        ("training / held-out events", f"{d.get('train_events')} / {d.get('validation_events')}"),
        ("first event time", _fmt(d.get("first_event_time"))),
        ("last event time", _fmt(d.get("last_event_time"))),
    ]
    if "windows" in d:
        w = d["windows"]
        rows.append(("training / held-out windows", f"{w['train']} / {w['validation']}"))
    return rows


def _training_rows(t: dict[str, Any]) -> list[tuple[str, str]]:
    return [
        ("epochs run", _fmt(t.get("epochs_run"))),
        ("best epoch (weights kept)", _fmt(t.get("best_epoch"))),
        ("best val_loss", _g(t.get("best_val_loss"))),
        ("final loss", _g(t.get("final_loss"))),
        ("seconds", _fmt(t.get("seconds"), 1)),
    ]


def _g(v: Any) -> str:
    """Losses and errors span decades: significant digits, not decimals."""
    return f"{v:.5g}" if isinstance(v, int | float) else "-"


def _loss_plot(history: dict[str, list[float]], best_epoch: int | None) -> str:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3))
    for key, label in (("loss", "training loss"), ("val_loss", "held-out loss (val_loss)")):
        values = history.get(key, [])
        ax.plot(range(1, len(values) + 1), values, marker=".", label=label)
    if best_epoch:
        ax.axvline(best_epoch, color="black", lw=0.8, ls="--", label=f"best epoch {best_epoch}")
    ax.set_xlabel("epoch")
    ax.set_ylabel("mean squared error")
    ax.set_yscale("log")
    _plain_log_ticks(ax.yaxis)
    ax.set_title("loss per epoch", fontsize=10)
    ax.legend(fontsize=8)
    return _png(fig)


def _error_histogram(errors: np.ndarray, quantiles: dict[str, float]) -> str:
    import matplotlib.pyplot as plt

    e = np.asarray(errors, dtype=np.float64)
    e = e[np.isfinite(e) & (e > 0)]  # log axis: zero errors cannot be drawn
    fig, ax = plt.subplots(figsize=(7, 3))
    if e.size:
        lo, hi = float(e.min()), float(e.max())
        bins = np.logspace(np.log10(lo), np.log10(hi) + 1e-9, 60).tolist()
        ax.hist(e, bins=bins, color="tab:blue", alpha=0.7, label=f"{e.size} held-out scores")
        for q, color in zip(MARKED_QUANTILES, ("tab:orange", "tab:red"), strict=True):
            v = float(quantiles.get(str(q), np.quantile(errors, q)))
            ax.axvline(v, color=color, lw=1.2, label=f"quantile {q}: {v:.4g}")
        ax.set_xscale("log")
        _plain_log_ticks(ax.xaxis)
        ax.legend(fontsize=8)
    ax.set_xlabel("score (mean squared reconstruction error)")
    ax.set_ylabel("count")
    ax.set_title("held-out score distribution (the threshold's warm start)", fontsize=10)
    return _png(fig)


def _plain_log_ticks(axis: Any) -> None:
    """Ticks at 1, 2 and 5 times powers of ten, as plain numbers: matplotlib's default
    labels every minor tick of a short log range in overlapping 10^x notation."""
    from matplotlib import ticker

    axis.set_major_locator(ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
    axis.set_major_formatter(ticker.FormatStrFormatter("%.3g"))
    axis.set_minor_formatter(ticker.NullFormatter())


def _feature_plot(feature_error: dict[str, float] | None) -> str:
    if not feature_error:
        return "<p class='note'>Not recorded in this bundle's manifest.</p>"
    import matplotlib.pyplot as plt

    names, values = list(feature_error), list(feature_error.values())
    fig, ax = plt.subplots(figsize=(7, 0.6 + 0.22 * len(names)))
    ax.barh(range(len(names)), values, color="tab:blue")
    ax.set_yticks(range(len(names)), names, fontsize=7)
    ax.invert_yaxis()  # the spec's first feature on top
    ax.set_xlabel("mean squared error on held-out data (scaled units)")
    ax.set_title("which features the model rebuilds worst", fontsize=10)
    return _png(fig)


def main(argv: list[str] | None = None) -> int:
    """Rebuild the report of an existing bundle (or a registry's current one)."""
    parser = argparse.ArgumentParser(prog="training.bundle_report", description=main.__doc__)
    parser.add_argument("bundle", type=Path, help="bundle directory or registry")
    args = parser.parse_args(argv)
    try:
        b = bundles.load(args.bundle)
    except bundles.BundleError as exc:
        print(f"training.bundle_report: {exc}", file=sys.stderr)
        return 2
    print(write_report(b.path, b.manifest, b.warm_start))
    return 0


if __name__ == "__main__":
    sys.exit(main())
