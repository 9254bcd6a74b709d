"""The labeled-replay evaluator on small synthetic data sets (no broker, no ../shared/data)."""

from __future__ import annotations

import json
from pathlib import Path
from statistics import NormalDist
from typing import Any

import msgspec
import numpy as np
import pytest

from streamer.config import ThresholdSettings
from streamer.smoothing import SmoothedThreshold, SmoothingSettings, ewma, latch, shape
from training.adapters import DataSettings, SplitSettings, load, snake
from training.baselines import BaselineSettings, rolling_z
from training.evaluate import (
    DetectorSettings,
    EvalConfigError,
    MetricSettings,
    ReplaySettings,
    ReportSettings,
    evaluate,
    load_config,
    main,
    retrain_seed,
)
from training.quality import average_precision, event_counts, point_counts, recall_at_rate
from training.report import write_report


def write_csv(path: Path, header: list[str], rows: list[list[object]], sep: str = ",") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [sep.join(header)] + [sep.join(str(v) for v in r) for r in rows]
    path.write_text("\n".join(lines) + "\n")


# -- config ------------------------------------------------------------------------------------

MINIMAL = """
name = "t"
[data]
adapter = "csv"
path = "{path}"
label_column = "anomaly"
split = {{ train_rows = {train_rows} }}
[features]
profile = "t"
entity_field = "series"
time_field = "ts"
time_format = "epoch_s"
columns = [{{ kind = "numeric", field = "x" }}]
[[detectors]]
name = "d"
"""


def test_config_errors_name_the_field(tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text(MINIMAL.format(path="x", train_rows=0))
    with pytest.raises(EvalConfigError, match="train_rows must be >= 1"):
        load_config(cfg)
    cfg.write_text(MINIMAL.format(path="x", train_rows=5) + "\n[replay]\nbatchsize = 3\n")
    with pytest.raises(EvalConfigError, match=r"\$\.replay"):
        load_config(cfg)
    cfg.write_text(MINIMAL.format(path="x", train_rows=5).replace('[[detectors]]\nname = "d"', ""))
    with pytest.raises(EvalConfigError, match="detectors"):
        load_config(cfg)


def test_help_exits_zero(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    assert "--config" in capsys.readouterr().out


def test_committed_eval_configs_load() -> None:
    configs = sorted((Path(__file__).resolve().parents[2] / "eval").glob("*.toml"))
    assert configs, "eval/*.toml missing"
    for path in configs:
        config = load_config(path)
        assert config.data.path.startswith("../shared/data/"), path  # never an absolute path


# -- adapters ----------------------------------------------------------------------------------


def test_csv_adapter_series_labels_and_split(tmp_path: Path) -> None:
    header = ["datetime", "Flow Rate", "anomaly", "changepoint"]
    for name in ("1", "2", "10"):
        rows = [[f"2020-03-01 00:00:{i:02d}", i * 1.5, int(i >= 8), 0] for i in range(10)]
        write_csv(tmp_path / "valve" / f"{name}.csv", header, rows, sep=";")
    data = DataSettings(
        adapter="csv", path=str(tmp_path), files=["*/*.csv"], delimiter=";",
        time_column="datetime", label_column="anomaly", drop_columns=["changepoint"],
        split=SplitSettings(train_rows=6),
    )  # fmt: skip
    series = load(data)
    assert [s.name for s in series] == ["valve/1.csv", "valve/2.csv", "valve/10.csv"]
    s = series[0]
    assert set(s.columns) == {"flow_rate"}  # labels never become event fields
    assert s.labels.tolist() == [0] * 8 + [1, 1]
    assert s.n_train == 6 and s.group == "valve"
    assert s.seconds[1] - s.seconds[0] == 1.0
    rows = list(s.event_rows(["series", "ts", "row", "flow_rate"], 8, 10))
    assert rows[0] == {"series": "valve/1.csv", "ts": s.seconds[8], "row": 8, "flow_rate": 12.0}


def test_label_windows_file_marks_rows(tmp_path: Path) -> None:
    rows = [[f"2014-04-01 00:{i:02d}:00", float(i)] for i in range(40)]
    write_csv(tmp_path / "data" / "k" / "f.csv", ["timestamp", "value"], rows)
    windows = {"k/f.csv": [["2014-04-01 00:10:00.000000", "2014-04-01 00:14:00.000000"]]}
    (tmp_path / "windows.json").write_text(json.dumps(windows))
    data = DataSettings(
        adapter="csv", path=str(tmp_path / "data"), files=["*/*.csv"],
        time_column="timestamp", label_windows=str(tmp_path / "windows.json"),
        split=SplitSettings(nab_probation=True),
    )  # fmt: skip
    (s,) = load(data)
    assert s.windows == [(10, 14)]
    assert np.flatnonzero(s.labels).tolist() == [10, 11, 12, 13, 14]
    assert s.n_train == 6  # floor(0.15 * 40)


def test_jsonl_adapter_split_by_time_and_series_column(tmp_path: Path) -> None:
    path = tmp_path / "tx.jsonl"
    with path.open("w") as f:
        for day, date in enumerate(["2018-06-29", "2018-06-30", "2018-07-01", "2018-07-02"]):
            for who in ("a", "b"):
                doc = {"when": f"{date}T12:00:00", "who": who, "amount": day, "fraud": day // 3}
                f.write(json.dumps(doc) + "\n")
    data = DataSettings(
        adapter="jsonl", path=str(path), time_column="when", label_column="fraud",
        series_column="who", split=SplitSettings(train_until="2018-07-01T00:00:00"),
    )  # fmt: skip
    series = load(data)
    assert [s.name for s in series] == ["tx.jsonl:a", "tx.jsonl:b"]
    assert all(s.n == 4 and s.n_train == 2 and s.labels.tolist() == [0, 0, 0, 1] for s in series)


def test_smd_adapter_joins_train_and_test(tmp_path: Path) -> None:
    path = tmp_path / "smd.npz"
    np.savez(
        path,
        machine_1_1_train=np.zeros((5, 3), np.float32),
        machine_1_1_test=np.ones((4, 3), np.float32),
        machine_1_1_test_label=np.array([0, 1, 1, 0], np.uint8),
    )
    (s,) = load(DataSettings(adapter="smd_npz", path=str(path)))
    assert s.name == "machine_1_1" and s.group == "machine_1"
    assert sorted(s.columns) == ["m0", "m1", "m2"]
    assert s.n_train == 5 and s.labels.tolist() == [0] * 5 + [0, 1, 1, 0]
    assert s.columns["m0"].tolist() == [0.0] * 5 + [1.0] * 4


def test_snake_case_fields() -> None:
    assert snake("Accelerometer1RMS") == "accelerometer1rms"
    assert snake(" Volume Flow RateRMS ") == "volume_flow_raterms"


# -- metrics and baselines ---------------------------------------------------------------------


def test_point_and_event_metrics_by_hand() -> None:
    labels = np.array([0, 1, 1, 1, 0, 0, 1, 1, 0, 0])
    flags = np.array([1, 0, 1, 1, 0, 0, 0, 0, 1, 1], dtype=bool)
    c = point_counts(labels, flags)
    assert (c.tp, c.fp, c.fn, c.tn) == (2, 3, 3, 2)
    assert c.precision == pytest.approx(0.4) and c.recall == pytest.approx(0.4)
    assert c.far == pytest.approx(0.6) and c.mar == pytest.approx(0.6)
    e = event_counts(labels, flags, seconds=np.arange(10) * 60.0)
    assert (e.events, e.detected, e.alarm_runs, e.true_alarm_runs) == (2, 1, 3, 1)
    assert e.delays_rows == [1] and e.delays_seconds == [60.0]
    e = event_counts(labels, flags, events=[(0, 3)])  # given windows replace label runs
    assert (e.events, e.detected, e.true_alarm_runs) == (1, 1, 2)


def test_average_precision_and_recall_at_rate_per_class() -> None:
    labels = np.array([1, 0, 1, 0, 0, 0, 0, 0, 0, 1])
    scores = np.array([9.0, 8.0, 7.0, 1, 1, 1, 1, 1, 1, 0.5])
    assert average_precision(labels, scores) == pytest.approx((1 + 2 / 3 + 3 / 10) / 3)
    classes = np.array([1, 0, 2, 0, 0, 0, 0, 0, 0, 2])
    r = recall_at_rate(labels, scores, 0.3, classes)
    assert r["recall"] == pytest.approx(2 / 3) and r["precision"] == pytest.approx(2 / 3)
    assert r["recall_class_1"] == 1.0 and r["recall_class_2"] == 0.5


def test_rolling_z_matches_brute_force() -> None:
    rng = np.random.default_rng(3)
    x = rng.normal(size=(700, 3))
    x[:, 2] = 5.0  # a constant feature: z = 0 while it stays constant
    x[650, 2] = 6.0  # ... and inf when it moves
    got = rolling_z(x, start=20, window_rows=100, chunk_rows=97)
    want = []
    for i in range(20, 700):
        past = x[max(0, i - 100) : i]
        std = past.std(axis=0)
        z = np.abs(x[i] - past.mean(axis=0)) / np.where(std > 1e-12, std, np.nan)
        z = np.where(std > 1e-12, z, np.where(np.abs(x[i] - past.mean(axis=0)) > 1e-12, np.inf, 0))
        want.append(z.max())
    np.testing.assert_allclose(got, np.array(want))
    assert np.isinf(got[650 - 20]) and np.isfinite(got[649 - 20])


# -- smoothing ---------------------------------------------------------------------------------


def test_ewma_keeps_level_across_batches() -> None:
    x = np.arange(10.0)
    whole = ewma(x, 0.3)
    first = ewma(x[:4], 0.3)
    np.testing.assert_allclose(np.concatenate([first, ewma(x[4:], 0.3, first[-1])]), whole)


def test_frozen_threshold_does_not_learn() -> None:
    warm = np.linspace(0.0, 1.0, 200)
    frozen = SmoothedThreshold(200, 0.9, 10, warm, SmoothingSettings(frozen=True))
    learning = SmoothedThreshold(200, 0.9, 10, warm, SmoothingSettings())
    before = frozen.value
    for _ in range(5):
        frozen.judge(np.full(100, 0.01))
        learning.judge(np.full(100, 0.01))
    assert frozen.value == before
    assert learning.value < before  # a quiet stream lowers the learning threshold


def test_frozen_threshold_tops_up_a_short_warm_start_then_freezes() -> None:
    t = SmoothedThreshold(200, 0.9, 50, np.linspace(0.0, 1.0, 20), SmoothingSettings(frozen=True))
    assert t.value == float("inf")
    assert not t.judge(np.full(40, 0.5)).any()  # 60 scores now: the threshold is set
    fixed = t.value
    assert np.isfinite(fixed)
    t.judge(np.full(100, 0.01))
    assert t.value == fixed
    assert t.judge(np.array([fixed + 1.0])).all()


def test_learn_in_cooldown_takes_a_lasting_shift_as_the_new_normal() -> None:
    warm = np.linspace(0.0, 1.0, 200)
    shifted = np.full(500, 5.0)  # every score jumps above anything seen, and stays there
    alerts = {}
    for learn in (False, True):
        s = SmoothingSettings(cooldown_rows=50, learn_in_cooldown=learn)
        t = SmoothedThreshold(1000, 0.99, 10, warm, s)
        alerts[learn] = int(sum(t.judge(shifted[k : k + 10]).sum() for k in range(0, 500, 10)))
    assert alerts[False] == 10  # once per cooldown, for ever
    assert alerts[True] == 1  # once; the cooldown's unclipped scores raise the threshold


def test_learn_in_cooldown_needs_a_learning_threshold_and_a_cooldown() -> None:
    with pytest.raises(ValueError, match="learn_in_cooldown"):
        SmoothingSettings(learn_in_cooldown=True)
    with pytest.raises(ValueError, match="learn_in_cooldown"):
        SmoothingSettings(learn_in_cooldown=True, cooldown_rows=5, frozen=True)


def test_margin_gates_alerts_at_a_multiple_of_the_warm_start_threshold() -> None:
    warm = np.linspace(0.0, 1.0, 200)
    plain = SmoothedThreshold(200, 0.9, 10, warm, SmoothingSettings(frozen=True))
    gated = SmoothedThreshold(200, 0.9, 10, warm, SmoothingSettings(frozen=True, margin=2.0))
    assert gated.floor == pytest.approx(2.0 * plain.value)
    scores = np.array([0.5, 1.5, 2.5])  # below, between start and 2x start, above 2x start
    assert plain.judge(scores).tolist() == [False, True, True]
    assert gated.judge(scores).tolist() == [False, False, True]


def test_margin_floors_a_learning_threshold() -> None:
    warm = np.linspace(0.0, 1.0, 200)
    t = SmoothedThreshold(200, 0.9, 10, warm, SmoothingSettings(margin=1.0))
    start = t.value
    for _ in range(5):
        assert not t.judge(np.full(100, 0.01)).any()
    assert t.value < start  # the rolling value still learns a quiet stream ...
    assert not t.judge(np.array([0.95 * start])).any()  # ... but alerts need the floor
    assert t.judge(np.array([1.05 * start])).all()


def test_margin_needs_a_warm_start() -> None:
    with pytest.raises(ValueError, match="margin"):
        SmoothedThreshold(200, 0.9, 10, None, SmoothingSettings(margin=1.5))
    with pytest.raises(ValueError, match="margin"):
        SmoothingSettings(margin=-1.0)
    # A warm start under min_samples still sets the floor (the threshold waits for live scores).
    small = SmoothedThreshold(
        200, 0.9, 50, np.linspace(0.0, 1.0, 20), SmoothingSettings(margin=2.0)
    )
    assert small.value == float("inf")
    assert small.floor == pytest.approx(2.0 * np.quantile(np.linspace(0.0, 1.0, 20), 0.9))


def test_min_consecutive_and_cooldown_shape_alerts() -> None:
    warm = np.zeros(100)
    s = SmoothingSettings(min_consecutive=3, cooldown_rows=4)
    t = SmoothedThreshold(100, 0.9, 10, warm, s)
    scores = np.array([5, 5, 0, 5, 5, 5, 5, 5, 5, 5, 5, 5, 0], dtype=float)
    # Rows 3-5 are the first three in a row above: alert at row 5, then 4 quiet rows (6-9),
    # then row 10 is still in a run of at least 3: alert again.
    flags = t.judge(scores)
    assert np.flatnonzero(flags).tolist() == [5, 10]


def test_once_per_run_alerts_once_for_a_run_that_spans_batches() -> None:
    t = SmoothedThreshold(100, 0.9, 10, np.zeros(100), SmoothingSettings(once_per_run=True))
    scores = np.array([0, 5, 5, 5, 5, 5, 5, 0, 0, 5, 5, 0], dtype=float)
    flags = np.concatenate([t.judge(scores[a:b]) for a, b in ((0, 3), (3, 5), (5, 12))])
    assert np.flatnonzero(flags).tolist() == [1, 9]  # one alert per run, wherever batches cut


def test_moving_mean_is_the_same_whatever_the_batches() -> None:
    x = np.random.default_rng(0).random(50)
    whole = np.convolve(x, np.ones(10) / 10)[:50]
    whole[:9] = [x[: k + 1].mean() for k in range(9)]  # the first rows average what exists
    t = SmoothedThreshold(1000, 0.9, 10, np.ones(100), SmoothingSettings(mean_rows=10))
    parts = []
    for a, b in ((0, 3), (3, 20), (20, 50)):
        t.judge(x[a:b])
        parts.append(t.last_smoothed)
    np.testing.assert_allclose(np.concatenate(parts), whole)


def test_likelihood_threshold_is_mean_plus_z_std_of_the_window() -> None:
    warm = np.random.default_rng(1).normal(10.0, 2.0, 500)
    t = SmoothedThreshold(1000, 0.9, 10, warm, SmoothingSettings(likelihood=0.99999))
    assert t.value == pytest.approx(warm.mean() + 4.2649 * warm.std(), rel=1e-4)
    assert t.judge(np.array([warm.mean(), t.value * 1.01])).tolist() == [False, True]


def test_likelihood_learns_every_score_so_a_lasting_level_stops_alerting() -> None:
    warm = np.random.default_rng(2).normal(1.0, 0.1, 200)
    s = SmoothingSettings(likelihood=0.99999)
    t = SmoothedThreshold(400, 0.99, 10, warm, s)
    shifted = np.full(400, 5.0)
    flags = np.concatenate([t.judge(shifted[k : k + 10]) for k in range(0, 400, 10)])
    assert flags[:10].all()  # the new level alerts at first ...
    assert not flags[-100:].any()  # ... and is normal once it fills the window
    quantile = SmoothedThreshold(400, 0.99, 10, warm, SmoothingSettings())
    kept = np.concatenate([quantile.judge(shifted[k : k + 10]) for k in range(0, 400, 10)])
    assert kept.all()  # the quantile rule learns alerted scores clipped: it never rises


def test_two_sided_likelihood_alerts_on_scores_far_below_the_mean() -> None:
    warm = np.random.default_rng(5).normal(10.0, 1.0, 500)
    one = SmoothedThreshold(1000, 0.9, 10, warm, SmoothingSettings(likelihood=0.999))
    two = SmoothedThreshold(
        1000, 0.9, 10, warm, SmoothingSettings(likelihood=0.999, two_sided=True)
    )
    scores = np.array([10.0, 20.0, 0.0])
    assert one.judge(scores).tolist() == [False, True, False]
    assert two.judge(scores).tolist() == [False, True, True]
    assert two.last_z[2] > 5.0
    with pytest.raises(ValueError, match="two_sided"):
        SmoothingSettings(two_sided=True)


def test_likelihood_alerts_nothing_below_min_samples() -> None:
    s = SmoothingSettings(likelihood=0.99, two_sided=True)
    t = SmoothedThreshold(1000, 0.9, 50, np.ones(10), s)
    assert not t.judge(np.array([100.0, -100.0])).any()
    assert np.isneginf(t.last_z).all()


def test_likelihood_on_a_flat_warm_start_still_has_a_finite_threshold() -> None:
    t = SmoothedThreshold(100, 0.9, 10, np.full(100, 2.0), SmoothingSettings(likelihood=0.999))
    assert 2.0 < t.value < 2.01
    assert t.judge(np.array([2.0, 2.1])).tolist() == [False, True]


def hovering(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A warm start and a feed with incidents whose smoothed score hovers about the
    threshold as it decays (a spike, then rows at the level of the threshold)."""
    rng = np.random.default_rng(seed)
    warm, live = rng.gamma(2.0, 0.5, 2000), rng.gamma(2.0, 0.5, 20_000)
    for start in rng.choice(19_000, 12, replace=False):
        live[start] += 200.0
        live[start + 1 : start + 80] *= rng.uniform(2.0, 4.0)
    return warm, live


def test_rearm_z_makes_one_alert_of_a_score_hovering_about_the_threshold() -> None:
    warm, live = hovering(11)
    base = SmoothingSettings(likelihood=0.99999, ewma_alpha=0.1, once_per_run=True)
    rearmed = SmoothingSettings(likelihood=0.99999, ewma_alpha=0.1, once_per_run=True, rearm_z=0.0)
    flags = {}
    for name, settings in (("base", base), ("rearmed", rearmed)):
        t = SmoothedThreshold(8640, 0.99, 50, warm, settings)
        flags[name] = np.concatenate([t.judge(live[k : k + 7]) for k in range(0, live.size, 7)])
    assert flags["rearmed"].sum() < flags["base"].sum()  # the crossings while hovering
    starts = np.flatnonzero(flags["base"])
    assert set(np.flatnonzero(flags["rearmed"])) <= set(starts)  # no new alert, only fewer


def test_rearm_z_alerts_of_the_evaluators_level_grid_are_the_pipelines() -> None:
    """nab_level_raw recomputes alerts from the rows' z with one latch over the whole file;
    the pipeline latches batch by batch, carrying the run: the same alerts."""
    warm, live = hovering(12)
    settings = SmoothingSettings(likelihood=0.9999, ewma_alpha=0.1, once_per_run=True, rearm_z=0.5)
    t = SmoothedThreshold(8640, 0.99, 50, warm, settings)
    flags, z = [], []
    for k in range(0, live.size, 13):
        flags.append(t.judge(live[k : k + 13]))
        z.append(t.last_z)
    zs = np.concatenate(z)
    above = latch(zs > NormalDist().inv_cdf(0.9999), zs <= 0.5)
    assert np.concatenate(flags).sum() > 3
    np.testing.assert_array_equal(np.concatenate(flags), shape(above, settings)[0])


def test_median_cap_counts_a_score_at_most_c_times_the_median_before_its_batch() -> None:
    warm = np.array([1.0, 2.0, 3.0, 4.0, 100.0])  # median 3: the warm start capped at 6
    t = SmoothedThreshold(6, 0.5, 1, warm, SmoothingSettings(median_cap=2.0))
    assert t.value == pytest.approx(3.0)  # the median of 1, 2, 3, 4, 6
    t.judge(np.array([5.0, 1e6, 7.0]))
    assert t.last_smoothed.tolist() == [5.0, 6.0, 6.0]
    # The raw scores were learned as they are: 2, 3, 4, 100, 5, 1e6, 7 -> window of 6.
    t.judge(np.array([1e6]))
    assert t.last_smoothed.tolist() == [2.0 * np.median([3.0, 4.0, 100.0, 5.0, 1e6, 7.0])]


def test_median_cap_window_follows_a_runtime_window_size() -> None:
    """set_threshold's window_size (runtime control) resizes the raw-score window too."""
    warm = np.array([1.0, 2.0, 3.0, 4.0, 100.0])
    t = SmoothedThreshold(6, 0.5, 1, warm, SmoothingSettings(median_cap=2.0))
    t.reconfigure(window_size=2)  # the last two raw scores: 4 and 100, median 52
    t.judge(np.array([1000.0]))
    assert t.last_smoothed.tolist() == [104.0]
    t.reconfigure(window_size=4)  # growing keeps what is held: 100, 1000
    t.judge(np.array([1e6]))
    assert t.last_smoothed.tolist() == [2.0 * 550.0]


def test_median_cap_floor_keeps_the_cap_of_a_model_that_rebuilds_its_feed_almost_exactly() -> None:
    warm = np.full(100, 1e-6)  # a near-perfect fit: 20 x the median is 2e-5
    settings = SmoothingSettings(median_cap=20.0, median_cap_floor=9.0)
    t = SmoothedThreshold(200, 0.5, 1, warm, settings)
    t.judge(np.array([5.0, 50.0]))
    assert t.last_smoothed.tolist() == [5.0, 9.0]
    no_floor = SmoothedThreshold(200, 0.5, 1, warm, SmoothingSettings(median_cap=20.0))
    no_floor.judge(np.array([5.0, 50.0]))
    assert no_floor.last_smoothed.tolist() == pytest.approx([2e-5, 2e-5])


def test_median_cap_one_spike_does_not_alert_but_a_lasting_rise_does() -> None:
    rng = np.random.default_rng(7)
    warm = rng.gamma(2.0, 0.5, 2000)
    spike = np.concatenate([rng.gamma(2.0, 0.5, 500), [1e6], rng.gamma(2.0, 0.5, 500)])
    rise = np.concatenate([rng.gamma(2.0, 0.5, 500), rng.gamma(2.0, 0.5, 60) * 6.0])
    plain = SmoothingSettings(likelihood=0.99999, ewma_alpha=0.1, once_per_run=True)
    capped = SmoothingSettings(
        likelihood=0.99999, ewma_alpha=0.1, once_per_run=True, median_cap=20.0
    )
    assert SmoothedThreshold(8640, 0.99, 50, warm, plain).judge(spike).any()  # by its size
    assert not SmoothedThreshold(8640, 0.99, 50, warm, capped).judge(spike).any()
    flags = SmoothedThreshold(8640, 0.99, 50, warm, capped).judge(rise)
    assert flags[500:].any() and not flags[:500].any()


def test_median_cap_follows_a_feed_whose_errors_are_all_higher_than_in_training() -> None:
    rng = np.random.default_rng(3)
    warm, live = rng.gamma(2.0, 0.5, 500), rng.gamma(2.0, 0.5, 5000) * 50.0
    t = SmoothedThreshold(1000, 0.99, 50, warm, SmoothingSettings(median_cap=20.0))
    for k in range(0, live.size, 10):
        t.judge(live[k : k + 10])
    # The window holds live rows only: the cap is 20 x their median, which few rows reach
    # (a fixed cap at the warm start's level would hold every live row).
    assert np.array_equal(t.last_smoothed, live[-10:])


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"mean_rows": 0}, "mean_rows"),
        ({"mean_rows": 5, "ewma_alpha": 0.5}, "mean_rows"),
        ({"likelihood": 0.3}, "likelihood"),
        ({"likelihood": 1.0}, "likelihood"),
        ({"likelihood": 0.999, "cooldown_rows": 5, "learn_in_cooldown": True}, "learn_in_cooldown"),
        ({"likelihood": 0.999, "rearm_z": 0.0}, "rearm_z"),
        ({"once_per_run": True, "rearm_z": 0.0}, "rearm_z"),
        ({"median_cap": 0.5}, "median_cap"),
        ({"median_cap_floor": 9.0}, "median_cap_floor"),
        ({"median_cap": 20.0, "median_cap_floor": -1.0}, "median_cap_floor"),
    ],
)
def test_smoothing_settings_name_the_bad_field(kwargs: dict[str, Any], field: str) -> None:
    with pytest.raises(ValueError, match=f"smoothing.{field}"):
        SmoothingSettings(**kwargs)


# -- end to end --------------------------------------------------------------------------------


def sensor_csvs(folder: Path, n: int, broken: slice, day: str, seed: int) -> None:
    """Two sensor series s0.csv, s1.csv: normal rows follow x2 = 2 x1, x3 = 5 + x1 / 10; the
    `broken` rows break the first relation by 4 standard deviations of x2 (a row-wise
    anomaly, not a range one). One row a second from `day` (ISO date), labels in `label`."""
    rng = np.random.default_rng(seed)
    for k in range(2):
        x1 = rng.normal(0, 1, n)
        x2 = 2 * x1 + rng.normal(0, 0.05, n)
        x3 = 5 + x1 / 10 + rng.normal(0, 0.005, n)
        labels = np.zeros(n, dtype=int)
        labels[broken] = 1
        x2[broken] += np.where(x1[broken] > 0, -8.0, 8.0)
        rows = [
            [f"{day}T00:{i // 60:02d}:{i % 60:02d}", x1[i], x2[i], x3[i], labels[i]]
            for i in range(n)
        ]
        write_csv(folder / f"s{k}.csv", ["time", "x1", "x2", "x3", "label"], rows)


def sensor_config(data: Path, name: str, **sections: object) -> dict[str, object]:
    """An eval config over `sensor_csvs` (200 training rows, the three sensors, a small
    dense model); `sections` add or replace top-level sections."""
    return {
        "name": name,
        "data": {"adapter": "csv", "path": str(data), "time_column": "time",
                 "label_column": "label", "split": {"train_rows": 200}},
        "features": {"profile": "syn", "entity_field": "series", "time_field": "ts",
                     "time_format": "epoch_s", "id_field": "row",
                     "columns": [{"kind": "numeric", "field": f} for f in ("x1", "x2", "x3")]},
        "training": {"hidden_units": [8], "bottleneck": 1, "epochs": 30, "batch_size": 16,
                     "patience": 30, "learning_rate": 0.01, "seed": 1},
    } | sections  # fmt: skip


def synthetic(tmp_path: Path) -> Path:
    """`sensor_csvs`: 340 rows each, rows 260-289 broken."""
    sensor_csvs(tmp_path / "data", 340, slice(260, 290), "2021-01-01", seed=0)
    threshold = {"quantile": 0.99, "window_size": 500, "min_samples": 20}
    cfg = sensor_config(
        tmp_path / "data", "synthetic", replay={"batch_size": 7},
        metrics={"nab": True, "alert_rate": 0.1},
        detectors=[
            {"name": "daemon", "threshold": threshold},
            {"name": "smoothed", "threshold": threshold,
             "smoothing": {"ewma_alpha": 0.5, "min_consecutive": 2}},
        ],
        baselines={"b2_window_rows": 50},
    )  # fmt: skip
    import tomllib

    path = tmp_path / "synthetic.toml"
    path.write_text(_to_toml(cfg))
    assert tomllib.loads(path.read_text())["name"] == "synthetic"
    return path


def _to_toml(doc: dict[str, object]) -> str:
    """Just enough TOML for the test config: inline tables and arrays via JSON literals."""
    lines = []
    for key, value in doc.items():
        lines.append(f"{key} = {_toml_value(value)}")
    return "\n".join(lines) + "\n"


def _toml_value(v: object) -> str:
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{k} = {_toml_value(x)}" for k, x in v.items()) + " }"
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, bool):
        return "true" if v else "false"
    return json.dumps(v)


def test_evaluate_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = synthetic(tmp_path)
    out = tmp_path / "out"
    assert main(["--config", str(config), "--out", str(out)]) == 0
    assert "daemon" in capsys.readouterr().out
    result = msgspec.json.decode((out / "result.json").read_bytes())
    assert result["data"]["test_rows"] == 280 and result["data"]["anomalous_test_rows"] == 60
    dets = result["detectors"]
    assert list(dets) == ["daemon", "smoothed", "B1 p99", "B2 z>3", "alert on every row"]
    ours = dets["daemon"]
    assert ours["point"]["recall"] >= 0.8 and ours["point"]["precision"] >= 0.5
    assert ours["event"]["detected"] == 2 and ours["alerts"] == ours["point"]["alerted_rows"]
    assert 0.0 < ours["nab"]["standard"] <= 100.0
    assert ours["rate"]["recall"] > 0.3
    everything = dets["alert on every row"]["point"]
    assert everything["precision"] == pytest.approx(60 / 280) and everything["recall"] == 1.0
    # Bundles were written and verified the daemon's way: one per series.
    assert len(list((out / "bundles").glob("*/current"))) == 2
    assert result["top_alerts"] and result["top_alerts"][0]["top_features"]
    html = (out / "report.html").read_text()
    assert html.count("<img") >= 3 and "synthetic" in html


@pytest.mark.parametrize(
    ("range_tolerance", "shaping"),
    [
        (None, {"cooldown_rows": 5}),
        (0.05, {"cooldown_rows": 5}),
        (None, {"once_per_run": True, "rearm_z": 0.0}),
    ],
)
def test_nab_levels_recomputed_from_z_match_replays_at_those_levels(
    tmp_path: Path, range_tolerance: float | None, shaping: dict[str, Any]
) -> None:
    config = load_config(synthetic(tmp_path))
    levels = [0.6, 0.99, 0.9999995]  # the last one would print as "1" with :g
    dets = [
        DetectorSettings(
            name=f"likelihood {q}",
            threshold=ThresholdSettings(
                window_size=500, min_samples=20, range_tolerance=range_tolerance
            ),
            smoothing=SmoothingSettings(likelihood=q, mean_rows=3, **shaping),
        )
        for q in levels
    ]
    config = msgspec.structs.replace(
        config,
        detectors=dets,
        metrics=MetricSettings(nab=True, nab_cv_levels=levels, nab_cv_detectors=True),
        baselines=BaselineSettings(b1=False, b2=False, all_rows=False),
    )
    result, arrays = evaluate(config, tmp_path / "out")
    replayed = [result["detectors"][d.name]["nab"] for d in dets]
    assert len({r["fp"] for r in replayed}) > 1  # the levels differ in what they alert
    if range_tolerance is not None:  # rows beyond range alert at every level
        beyond = [r.beyond for r in arrays["runs"][dets[-1].name]]
        assert all(b is not None for b in beyond) and sum(int(b.sum()) for b in beyond) > 0
    for d in dets:  # every detector's recomputation matches every level's own replay
        cv = result["detectors"][d.name]["nab_cv"]
        for profile in ("standard", "reward_low_FP_rate", "reward_low_FN_rate"):
            assert cv[profile]["by_setting"] == pytest.approx([r[profile] for r in replayed])
            assert len(cv[profile]["chosen"]) == 2
            assert set(cv[profile]["chosen"]) <= set(cv["settings"])
            assert cv[profile]["in_sample_score"] == pytest.approx(max(cv[profile]["by_setting"]))
        assert cv["settings"] == ["0.6", "0.99", "0.9999995"]
    # Detector and level chosen together: every detector at every level is a candidate.
    selection = result["nab_cv_selection"]["standard"]
    every = [
        x for d in dets for x in result["detectors"][d.name]["nab_cv"]["standard"]["by_setting"]
    ]
    assert selection["by_setting"] == pytest.approx(every)
    assert all(c.split(" @ ")[0] in {d.name for d in dets} for c in selection["chosen"])
    write_report(result, arrays, config, tmp_path / "report.html")
    html = (tmp_path / "report.html").read_text()
    assert "level held out (2 folds)" in html and "any likelihood detector and level" in html


def test_nab_cv_levels_refuse_a_margin(tmp_path: Path) -> None:
    config = synthetic(tmp_path)
    text = config.read_text().replace("min_consecutive = 2", "min_consecutive = 2, margin = 2.0")
    config.write_text(text.replace("nab = true", "nab = true, nab_cv_levels = [0.999]"))
    with pytest.raises(EvalConfigError, match="nab_cv_levels"):
        load_config(config)


def test_seed_flag_overrides_the_training_seed(tmp_path: Path) -> None:
    out = tmp_path / "out"
    args = ["--config", str(synthetic(tmp_path)), "--out", str(out), "--no-report"]
    assert main([*args, "--max-series", "1", "--seed", "7"]) == 0
    result = msgspec.json.decode((out / "result.json").read_bytes())
    assert result["config"]["training"]["seed"] == 7


def _label_replay(delay: float, gaps: list[float]) -> tuple[Any, Any, Any, Any]:
    """Replay a series with a label_rate column (delay 2 hours) through a stand-in Pipeline
    that builds features with its state and records, per batch, its first event time and
    the labels delivered so far; labels come `delay` after their events."""
    from streamer.aggregates import AggregateState
    from streamer.features import FeatureSpec, LabelRate, Log1p, build_features
    from streamer.pipeline import BatchResult
    from streamer.state import EntityState
    from streamer.threshold import RollingQuantileThreshold
    from training.adapters import Series
    from training.evaluate import event_fields, replay

    hour = 3600.0
    spec = FeatureSpec(
        profile="t", entity_field="card", time_field="ts", time_format="epoch_s", id_field="row",
        columns=[Log1p(field="amount"), LabelRate(key="shop", windows_seconds=[hour, 5 * hour],
                                                  delay_seconds=2 * hour)],
    )  # fmt: skip
    rng = np.random.default_rng(4)
    n, n_train = 600, 400
    seconds = np.cumsum(rng.choice(gaps, n)) + 1e6
    series = Series(
        name="s", group="g",
        columns={"card": rng.integers(0, 9, n), "shop": rng.integers(0, 4, n),
                 "amount": rng.uniform(1, 50, n)},
        seconds=seconds, labels=(rng.random(n) < 0.3).astype(np.int8), n_train=n_train,
    )  # fmt: skip

    class Recorder:
        def __init__(self) -> None:
            self.spec = spec
            self.state = EntityState(aggregates=AggregateState(spec))
            self.threshold = RollingQuantileThreshold(100, 0.99, 10)
            self.ranges = None  # no threshold.range_tolerance
            self.rows: list[np.ndarray] = []
            self.batches: list[tuple[float, list[float]]] = []
            self.decode = msgspec.json.Decoder(spec.event_type()).decode
            self.delivered: list[float] = []
            confirm = self.state.aggregates.confirm
            self.state.aggregates.confirm = lambda e: (self.delivered.append(e.ts), confirm(e))

        def process(self, messages: list, replay: bool = False) -> BatchResult:
            events = [self.decode(m.value) for m in messages]
            self.batches.append((events[0].ts, list(self.delivered)))
            x = build_features(spec, events, self.state.aggregates)
            self.rows.append(x)
            return BatchResult(len(messages), [], [], x[:, 0], 0.0, scored=list(messages))

    fake = Recorder()
    run = replay(fake, series, event_fields(spec), 50, 3, delay)
    return fake, run, series, spec


def test_replay_delivers_late_labels_at_their_time_and_matches_training_features() -> None:
    """Labels later than the columns need (3 hours against 2): every batch is cut where
    labels fall due, and each gets all labels due by its first event, none early."""
    from training.evaluate import features

    delay = 3 * 3600.0
    fake, run, series, spec = _label_replay(delay, [0.0, 60.0, 300.0, 900.0])
    for first, delivered in fake.batches:
        s, y = series.seconds, series.labels
        due = np.sort(s[(s + delay <= first) & (y > 0)])
        np.testing.assert_array_equal(np.sort(delivered), due)  # all due, none early
    assert len(fake.batches) > 600 / 50 + 2  # cut where labels fall due
    got = np.vstack(fake.rows)
    want = features(spec, series, 0, series.n, delay).features
    np.testing.assert_array_equal(got, want)
    assert np.isfinite(run.scores).all() and want[:, 3].max() > 0  # some 5h rates seen
    # Labels that arrived earlier (immediately) would change the features: the test can fail.
    early = features(spec, series, 0, series.n, 0.0).features
    assert not np.array_equal(early, want)
    with pytest.raises(ValueError, match="label_rate columns \\(keyed by shop\\)"):
        from training.datasets import from_events

        from_events(spec, [])


def test_replay_delivers_labels_before_the_batch_they_fall_due_in() -> None:
    """Labels as late as the columns need (2 hours) and batches spanning less: the batches
    are cut by size alone, as the daemon cuts them, and the labels that fall due inside one
    are delivered before it; early as some are, the features are training's."""
    from training.evaluate import features

    delay = 2 * 3600.0
    fake, _, series, spec = _label_replay(delay, [0.0, 30.0, 60.0, 120.0])
    assert len(fake.batches) == 400 // 50 + 200 // 50  # no cuts but the batch size
    s, y = series.seconds, series.labels
    early = [sum(t + delay > first for t in delivered) for first, delivered in fake.batches]
    assert sum(early) > 10  # labels not due yet at the batch's first event were delivered
    got = np.vstack(fake.rows)
    want = features(spec, series, 0, series.n, delay).features
    np.testing.assert_array_equal(got, want)
    assert want[:, 3].max() > 0
    for first, delivered in fake.batches:  # and every label due by then was delivered
        assert set(s[(s + delay <= first) & (y > 0)]) <= set(delivered)


def test_label_spans_cut_where_labels_fall_due_only_in_batches_that_span_too_long() -> None:
    from training.evaluate import label_spans

    seconds = np.array([0.0, 1.0, 2.0, 3.0, 10.0, 11.0, 12.0, 13.0])
    due = {1: None, 5: None}
    assert label_spans(0, 8, 4, due, seconds, early=3.0) == [(0, 4), (4, 8)]
    assert label_spans(0, 8, 4, due, seconds, early=2.0) == [(0, 1), (1, 4), (4, 5), (5, 8)]
    assert label_spans(0, 8, 4, due, seconds, early=None) == [(0, 1), (1, 4), (4, 5), (5, 8)]
    assert label_spans(0, 8, 4, {}, seconds, early=None) == [(0, 4), (4, 8)]


# -- periodic retraining -----------------------------------------------------------------------


def _retrain_config(tmp_path: Path, every: int, history: int | None = 150) -> Any:
    """One synthetic series (140 test rows), tiny training, a detector that alerts often (so
    every segment of the replay has alerts to read the model version from)."""
    config = load_config(synthetic(tmp_path))
    return msgspec.structs.replace(
        config,
        data=msgspec.structs.replace(config.data, max_series=1),
        training=msgspec.structs.replace(config.training, epochs=3, patience=3),
        replay=ReplaySettings(batch_size=7, retrain_every_rows=every, retrain_history_rows=history),
        detectors=[
            DetectorSettings(
                name="often",
                threshold=ThresholdSettings(quantile=0.5, window_size=500, min_samples=1),
            )
        ],
        metrics=MetricSettings(nab=True),
        baselines=BaselineSettings(b1=False, b2=False, all_rows=False),
        report=ReportSettings(top_alerts=1000),  # every alert kept, to read its model
    )


def test_retraining_swaps_in_a_new_bundle_at_each_retrain_row(tmp_path: Path) -> None:
    config = _retrain_config(tmp_path, every=40)
    result, arrays = evaluate(config, tmp_path / "out")
    # 140 test rows: retrains before test rows 40, 80, 120 = (140 - 1) // 40.
    assert result["timings"]["retrains"] == 3 and result["timings"]["retrain_seconds"] > 0
    (run,) = arrays["runs"]["often"]
    n0 = arrays["series"][0].n_train
    versions: dict[int, set[str]] = {}
    for _, _, alert in run.top_alerts:
        segment = (alert.source.offset - n0) // 40
        versions.setdefault(segment, set()).add(alert.model.version)
    assert sorted(versions) == [0, 1, 2, 3]
    assert all(len(v) == 1 for v in versions.values())  # one model per segment
    assert len(set().union(*versions.values())) == 4  # and a new one after each retrain
    # The series' registry holds every version; `current` is the last one, as in production.
    registry = tmp_path / "out" / "bundles" / "s0.csv"
    assert len([p for p in registry.iterdir() if (p / "manifest.json").is_file()]) == 4
    from streamer.bundle import current_version

    assert current_version(registry) in versions[3]


def test_retrain_seeds_are_derived_and_results_repeat(tmp_path: Path) -> None:
    config = _retrain_config(tmp_path, every=70, history=None)  # history: every row seen
    first, _ = evaluate(config, tmp_path / "a")
    second, _ = evaluate(config, tmp_path / "b")
    assert first["timings"]["retrains"] == 1  # (140 - 1) // 70
    a, b = first["detectors"]["often"], second["detectors"]["often"]
    assert a["alerts"] == b["alerts"] and a["nab"] == b["nab"]
    assert retrain_seed(1, 1) == retrain_seed(1, 1) != retrain_seed(1, 2)
    manifests = [
        msgspec.json.decode(p.read_bytes())
        for p in (tmp_path / "a" / "bundles" / "s0.csv").glob("*/manifest.json")
    ]
    seeds = sorted(m["training"]["settings"]["seed"] for m in manifests)
    assert seeds == sorted([1, retrain_seed(1, 1)])
    events = {m["data"]["events"] for m in manifests}
    assert events == {200, 270}  # the training part, then every row before test row 70


@pytest.mark.parametrize(
    ("replay", "match"),
    [
        ("retrain_every_rows = 0", r"replay\.retrain_every_rows must be >= 1"),
        ("retrain_every_rows = 5\nretrain_history_rows = 0", "retrain_history_rows must be"),
        ("retrain_history_rows = 50", "retrain_history_rows needs replay.retrain_every_rows"),
    ],
)
def test_retrain_settings_name_the_field(tmp_path: Path, replay: str, match: str) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text(MINIMAL.format(path="x", train_rows=5) + f"\n[replay]\n{replay}\n")
    with pytest.raises(EvalConfigError, match=match):
        load_config(cfg)


def test_retraining_refuses_a_shared_model(tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    text = MINIMAL.format(path="x", train_rows=5) + "\n[replay]\nretrain_every_rows = 5\n"
    cfg.write_text('model_scope = "shared"\n' + text)
    with pytest.raises(EvalConfigError, match=r"retrain_every_rows needs model_scope"):
        load_config(cfg)


def test_a_windowed_model_is_retrained_with_its_windows_restored(tmp_path: Path) -> None:
    """After each swap the new pipeline rebuilds its windows from the rows before (the
    daemon's restore), so no test row is held back; without the restore, each swap would hold
    back window_length - 1 rows."""
    config = _retrain_config(tmp_path, every=40)
    training = msgspec.structs.replace(
        config.training, model="dense_window", window_length=4, hidden_units=[8], bottleneck=2
    )
    config = msgspec.structs.replace(config, training=training)
    result, arrays = evaluate(config, tmp_path / "out")
    assert result["timings"]["retrains"] == 3
    (run,) = arrays["runs"]["often"]
    assert np.isfinite(run.scores).all()  # every test row scored, also right after a swap
    versions = {alert.model.version for _, _, alert in run.top_alerts}
    assert len(versions) == 4 and {a.model.kind for _, _, a in run.top_alerts} == {"dense_window"}
