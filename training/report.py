"""The evaluation report: one self-contained HTML file with tables and embedded PNG plots.

matplotlib is imported here only (an eval dependency, not the daemon's), with the Agg backend.
"""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path
from typing import Any

import numpy as np

from training.quality import runs as label_runs

CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1200px; color: #222; }
table { border-collapse: collapse; margin: 1em 0; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; }
th:first-child, td:first-child { text-align: left; }
tr.published td { color: #666; font-style: italic; }
tr.ours td:first-child { font-weight: bold; }
img { max-width: 100%; }
.note { color: #555; }
"""


def _png(fig: Any) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return f'<img src="data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()}">'


def _fmt(v: Any, digits: int = 3) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        if not np.isfinite(v):
            return "-"
        return f"{v:.{digits}f}"
    return html.escape(str(v))


def summary_table(result: dict[str, Any]) -> str:
    """Every detector of this run and the published numbers, one row each."""
    has_nab = any("nab" in d for d in result["detectors"].values())
    has_rate = any("rate" in d for d in result["detectors"].values())
    head = ["detector", "precision", "recall", "F1", "FAR %", "MAR %", "alerted %",
            "event recall", "event precision", "mean delay (rows)", "alerts/day"]  # fmt: skip
    if has_nab:
        head += ["NAB standard", "NAB low FP", "NAB low FN"]
    if has_rate:
        head += ["AUC-PR", "recall @ rate"]
    rows = ["<tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in head) + "</tr>"]
    for name, d in result["detectors"].items():
        p, e = d["point"], d["event"]
        cells = [
            html.escape(name), _fmt(p["precision"]), _fmt(p["recall"]), _fmt(p["f1"]),
            _fmt(100 * p["far"], 2), _fmt(100 * p["mar"], 2), _fmt(100 * p["alerted_share"], 1),
            _fmt(e["recall"]), _fmt(e["precision"]), _fmt(e["mean_delay_rows"], 1),
            _fmt(d["alerts_per_day"], 1),
        ]  # fmt: skip
        if has_nab:
            n = d.get("nab", {})
            cells += [_fmt(n.get(k), 1) for k in
                      ("standard", "reward_low_FP_rate", "reward_low_FN_rate")]  # fmt: skip
        if has_rate:
            r = d.get("rate", {})
            cells += [_fmt(r.get("average_precision")), _fmt(r.get("recall"))]
        cls = "ours" if d["kind"] == "ours" else ""
        rows.append(f'<tr class="{cls}">' + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
        if "nab_cv" in d:  # the same scores, each file at the level chosen on the other fold
            rows.append(_held_out_row(f"{name}, level held out (2 folds)", d["nab_cv"], has_rate))
    if "nab_cv_selection" in result:
        label = "any likelihood detector and level, held out (2 folds)"
        rows.append(_held_out_row(label, result["nab_cv_selection"], has_rate))
    for pub in result.get("published", []):
        v = pub["values"]
        cells = [html.escape(f"{pub['name']} (published)"), _fmt(v.get("precision")),
                 _fmt(v.get("recall")), _fmt(v.get("f1")), _fmt(v.get("far_percent"), 2),
                 _fmt(v.get("mar_percent"), 2), "-", "-", "-", "-", "-"]  # fmt: skip
        if has_nab:
            cells += [_fmt(v.get(k), 1) for k in ("nab_standard", "nab_low_fp", "nab_low_fn")]
        if has_rate:
            cells += [_fmt(v.get("average_precision")), _fmt(v.get("recall_at_rate"))]
        rows.append('<tr class="published">' + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    return "<table>" + "\n".join(rows) + "</table>"


def _held_out_row(label: str, cv: dict[str, Any], has_rate: bool) -> str:
    cells = [html.escape(label)] + ["-"] * 10
    cells += [
        _fmt(cv[k]["score"], 1) for k in ("standard", "reward_low_FP_rate", "reward_low_FN_rate")
    ]
    cells += ["-", "-"] if has_rate else []
    return '<tr class="ours">' + "".join(f"<td>{c}</td>" for c in cells) + "</tr>"


def _series_plot(series: Any, runs: dict[str, Any], primary: str, shown: list[str]) -> str:
    import matplotlib.pyplot as plt

    r = runs[primary]
    n0 = series.n_train
    span = float(series.seconds[-1] - series.seconds[n0]) if series.n > n0 else 0.0
    unit, per = ("minutes", 60.0) if span < 7200 else ("hours", 3600.0)
    if span > 4 * 86400:
        unit, per = "days", 86400.0
    x = (series.seconds[n0:] - series.seconds[n0]) / per
    fig, ax = plt.subplots(figsize=(11, 2.8))
    for a, b in label_runs(series.labels[n0:].astype(bool)):
        ax.axvspan(x[a], x[b] if b > a else x[a] + 1e-3, color="orange", alpha=0.25, lw=0)
    score = np.where(np.isfinite(r.scores) & (r.scores > 0), r.scores, np.nan)
    ax.plot(x, score, lw=0.7, color="tab:blue", label=f"{primary} score")
    if r.raw_scores is not None and not np.array_equal(r.raw_scores, r.scores, equal_nan=True):
        raw = np.where(r.raw_scores > 0, r.raw_scores, np.nan)
        ax.plot(x, raw, lw=0.4, color="tab:blue", alpha=0.3, label="unsmoothed score")
    ax.plot(x, r.thresholds, lw=1.0, color="black", label="threshold")
    hit = r.flags
    ax.scatter(x[hit], score[hit], s=8, color="red", zorder=3, label="alert")
    ax.set_yscale("log")
    ax.set_xlabel(f"{unit} into the test part")
    ax.set_title(f"{series.name}: labeled anomalies shaded", fontsize=10)
    # A rug per other detector, below the curve, to compare where each one alerts.
    ymin = np.nanmin(score) if np.isfinite(score).any() else 1e-3
    for k, (name, other) in enumerate((n, runs[n]) for n in shown if n != primary):
        ax.scatter(x[other.flags], np.full(int(other.flags.sum()), ymin / (2.0 ** (k + 1))),
                   s=2, marker="|", label=f"{name} alerts")  # fmt: skip
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return _png(fig)


def _histogram(series_list: list[Any], rs: list[Any], primary: str) -> str:
    import matplotlib.pyplot as plt

    y = np.concatenate([s.labels[s.n_train :] for s in series_list]).astype(bool)
    sc = np.concatenate([r.scores for r in rs])
    ok = np.isfinite(sc) & (sc > 0)
    fig, ax = plt.subplots(figsize=(7, 3))
    if ok.any():
        bins = np.logspace(np.log10(sc[ok].min()), np.log10(sc[ok].max()) + 1e-9, 60).tolist()
        ax.hist(sc[ok & ~y], bins=bins, alpha=0.6, density=True, label=f"normal ({(~y).sum()})")
        if (ok & y).any():
            ax.hist(sc[ok & y], bins=bins, alpha=0.6, density=True, label=f"anomalous ({y.sum()})")
        thr = np.concatenate([r.thresholds for r in rs])
        if np.isfinite(thr).any():
            ax.axvline(float(np.nanmedian(thr)), color="black", lw=1, label="median threshold")
        ax.set_xscale("log")
    ax.set_title(f"{primary}: score distribution of test rows", fontsize=10)
    ax.legend(fontsize=8)
    return _png(fig)


def _top_alerts(result: dict[str, Any]) -> str:
    rows = ["<tr><th>series</th><th>event time</th><th>score / threshold</th>"
            "<th>top features (actual / reconstructed, share of error)</th></tr>"]  # fmt: skip
    for a in result["top_alerts"]:
        feats = "; ".join(
            f"{html.escape(f['feature'])} {f['actual']:.4g} / {f['reconstructed']:.4g} "
            f"({100 * f['contribution']:.0f}%)"
            for f in a["top_features"]
        )
        rows.append(
            f"<tr><td>{html.escape(a['series'])}</td><td>{html.escape(a['event_time'])}</td>"
            f"<td>{a['ratio']:.2f}</td><td style='text-align:left'>{feats}</td></tr>"
        )
    return "<table>" + "\n".join(rows) + "</table>"


def _group_table(result: dict[str, Any]) -> str:
    names = list(result["detectors"])
    groups = list(result["detectors"][names[0]]["groups"])
    if len(groups) < 2:
        return ""
    head = "<tr><th>group</th>" + "".join(f"<th>{html.escape(n)} F1</th>" for n in names) + "</tr>"
    rows = [head]
    for g in groups:
        cells = [_fmt(result["detectors"][n]["groups"][g]["f1"]) for n in names]
        rows.append(f"<tr><td>{html.escape(g)}</td>" + "".join(f"<td>{c}</td>" for c in cells))
    return "<h2>F1 per group</h2><table>" + "\n".join(rows) + "</table>"


def write_report(result: dict[str, Any], arrays: dict[str, Any], config: Any, path: Path) -> None:
    """Render `report.html` from the result and the in-memory per-row arrays."""
    import matplotlib

    matplotlib.use("Agg")
    series_list = arrays["series"]
    runs = arrays["runs"]
    primary = config.detectors[0].name
    # Rugs for the detectors that alert selectively; "every row" would only paint a bar.
    shown = [n for n, d in result["detectors"].items() if d["kind"] != "reference"]
    cap = config.report.max_series_plots
    # Spread the plotted series over the list rather than taking the first few.
    picks = sorted(
        {round(i) for i in np.linspace(0, len(series_list) - 1, min(cap, len(series_list)))}
    )
    d = result["data"]
    parts = [
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(result['name'])}"
        f" evaluation</title><style>{CSS}</style></head><body>",
        f"<h1>{html.escape(result['name'])}: labeled replay evaluation</h1>",
        f"<p>{html.escape(result['description'])}</p>",
        f"<p class='note'>{d['series']} series, {d['train_rows']} training rows, "
        f"{d['test_rows']} test rows of which {d['anomalous_test_rows']} "
        f"({100 * d['anomalous_test_share']:.1f}%) are labeled anomalous. "
        f"Created {html.escape(result['created_at'])}; timings {result['timings']}.</p>",
        f"<p class='note'><b>Protocol.</b> {html.escape(result['protocol'])}</p>",
        "<h2>Summary</h2>",
        summary_table(result),
        "<p class='note'>Point-wise metrics are pooled over all test rows. Event recall: labeled "
        "windows (runs of anomalous rows) with at least one alert; event precision: runs of "
        "consecutive alerted rows that touch a labeled window. Published rows are copied from "
        "the literature, not measured here.</p>",
        _group_table(result),
        "<h2>Scores</h2>",
        _histogram(series_list, runs[primary], primary),
        f"<h2>Series ({len(picks)} of {len(series_list)})</h2>",
    ]
    for i in picks:
        s = series_list[i]
        parts.append(_series_plot(s, {n: rs[i] for n, rs in runs.items()}, primary, shown))
    parts += [f"<h2>Top alerts of {html.escape(primary)}</h2>", _top_alerts(result)]
    parts.append("</body></html>")
    path.write_text("\n".join(parts))
