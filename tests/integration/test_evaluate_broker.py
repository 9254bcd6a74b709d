"""`python -m training.evaluate --broker`: the test part through Kafka and the real daemon
gives the in-process replay's alerts, row for row."""

from __future__ import annotations

from pathlib import Path

import msgspec
import numpy as np
import pytest

from tests.unit.test_evaluate import _to_toml, sensor_config, sensor_csvs, write_csv
from training.evaluate import main


def labeled_csvs(tmp_path: Path) -> Path:
    """Two sensor series of 330 rows (200 train): x2 = 2 x1 normally; rows 250-274 break it.
    130 test rows in batches of 9: 14 full batches and a partial one of 4."""
    sensor_csvs(tmp_path / "data", 330, slice(250, 275), "2019-03-01", seed=3)
    threshold = {"quantile": 0.98, "window_size": 300, "min_samples": 20}
    cfg = sensor_config(
        tmp_path / "data", "broker-check", replay={"batch_size": 9},
        # The primary (checked) detector smooths and learns: both depend on the batch cuts;
        # its range rule learns every row (the broken rows push x2 beyond its range).
        detectors=[
            {"name": "smoothed", "threshold": {**threshold, "range_tolerance": 0.05},
             "smoothing": {"ewma_alpha": 0.5, "min_consecutive": 2}},
            {"name": "plain", "threshold": threshold},
        ],
        baselines={"b1": False, "b2": False},
    )  # fmt: skip
    return _written(tmp_path, cfg)


def _written(tmp_path: Path, cfg: dict[str, object]) -> Path:
    path = tmp_path / f"{cfg['name']}.toml"
    path.write_text(_to_toml(cfg))
    return path


def test_broker_replay_gives_the_in_process_alerts(
    kafka_bootstrap: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    args = ["--config", str(labeled_csvs(tmp_path)), "--out", str(out), "--no-report"]
    assert main([*args, "--broker", kafka_bootstrap]) == 0
    assert "broker check (smoothed): identical" in capsys.readouterr().out
    check = msgspec.json.decode((out / "result.json").read_bytes())["broker_check"]
    assert check["detector"] == "smoothed"
    assert check["series"] == 2 and check["rows"] == 260
    assert check["identical"] and check["identical_series"] == 2 and not check["mismatches"]
    assert check["alerts_broker"] == check["alerts_in_process"] >= 2  # not vacuous
    assert check["cuts_checked_series"] == 2 and check["batches"] == 2 * 15
    assert check["max_score_difference"] < 1e-9
    assert check["dead_letters"] == 0
    # Rows beyond the range alerted on both paths (the alerts above are identical).
    arrays = np.load(out / "series.npz")
    assert sum(int(arrays[f"{k}/0/beyond"].sum()) for k in range(2)) >= 2


def stateful_csvs(tmp_path: Path) -> Path:
    """`labeled_csvs`' series with per-entity history the daemon must rebuild: a rolling
    mean and std of x2 per series over 30 s, and per-series thresholds."""
    sensor_csvs(tmp_path / "data", 330, slice(250, 275), "2019-03-01", seed=3)
    threshold = {"quantile": 0.98, "window_size": 300, "min_samples": 20, "per_entity": True,
                 "entity_window_size": 300, "entity_min_samples": 20}  # fmt: skip
    rolling = {"kind": "rolling", "field": "x2", "windows_seconds": [30],
               "stats": ["mean", "std"], "key": "series"}  # fmt: skip
    columns = [{"kind": "numeric", "field": f} for f in ("x1", "x2", "x3")] + [rolling]
    cfg = sensor_config(tmp_path / "data", "broker-check-stateful", replay={"batch_size": 9},
                        detectors=[{"name": "per-series", "threshold": threshold}],
                        baselines={"b1": False, "b2": False})  # fmt: skip
    cfg["features"] = {**cfg["features"], "columns": columns}  # type: ignore[dict-item]
    return _written(tmp_path, cfg)


def test_broker_replay_restores_per_entity_history(
    kafka_bootstrap: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The daemon rebuilds aggregates and per-series thresholds from the training rows ahead
    of the test part, as the in-process replay does, and alerts on the same rows."""
    out = tmp_path / "out"
    args = ["--config", str(stateful_csvs(tmp_path)), "--out", str(out), "--no-report"]
    assert main([*args, "--broker", kafka_bootstrap]) == 0
    assert "state restored from 400 earlier" in capsys.readouterr().out
    check = msgspec.json.decode((out / "result.json").read_bytes())["broker_check"]
    assert check["restored_rows"] == 2 * 200 and check["rows"] == 2 * 130
    assert check["identical"] and not check["mismatches"]
    assert check["alerts_broker"] == check["alerts_in_process"] >= 2
    assert check["cuts_checked_series"] == 2 and check["max_score_difference"] < 1e-9


def payment_csvs(tmp_path: Path) -> Path:
    """A payment a minute for 12 hours (720 rows, 360 for training); every payment at shop 1
    during rows 120-179 and 450-519 is fraud, with an ordinary amount: only its labels, due
    an hour later, show it (the shop's confirmed-fraud rate over the hour before that)."""
    rng = np.random.default_rng(5)
    n = 720
    shops, amounts = rng.integers(0, 4, n), rng.lognormal(3, 0.5, n).round(2)
    fraud = np.zeros(n, dtype=int)
    for lo, hi in ((120, 180), (450, 520)):
        fraud[lo:hi] = shops[lo:hi] == 1
    rows = [[f"2020-05-01T{i // 60:02d}:{i % 60:02d}:00", shops[i], amounts[i], fraud[i]]
            for i in range(n)]  # fmt: skip
    write_csv(tmp_path / "data" / "pay.csv", ["time", "shop", "amount", "label"], rows)
    rate = {"kind": "label_rate", "key": "shop", "windows_seconds": [3600],
            "delay_seconds": 3600, "stats": ["count", "rate"]}  # fmt: skip
    cfg = sensor_config(
        tmp_path / "data", "broker-check-labels",
        replay={"batch_size": 9, "label_delay_seconds": 3600},
        detectors=[{"name": "plain", "threshold": {"quantile": 0.97, "window_size": 300,
                                                   "min_samples": 20}}],
        baselines={"b1": False, "b2": False},
    )  # fmt: skip
    columns = [{"kind": "log1p", "field": "amount"}, rate]
    cfg["features"] = {**cfg["features"], "columns": columns}  # type: ignore[dict-item]
    cfg["data"] = {**cfg["data"], "split": {"train_rows": 360}}  # type: ignore[dict-item]
    return _written(tmp_path, cfg)


def test_broker_replay_feeds_labels_in_lockstep(
    kafka_bootstrap: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Label feedback through a real feedback topic: the labels due before the test part,
    then each chunk's labels before its rows; the daemon's label rates, and so its alerts,
    are the in-process replay's."""
    out = tmp_path / "out"
    args = ["--config", str(payment_csvs(tmp_path)), "--out", str(out), "--no-report"]
    assert main([*args, "--broker", kafka_bootstrap]) == 0
    assert "labels fed)" in capsys.readouterr().out
    check = msgspec.json.decode((out / "result.json").read_bytes())["broker_check"]
    assert check["identical"] and not check["mismatches"] and check["rows"] == 360
    assert check["labels_fed"] > 20 and check["restored_rows"] == 360
    assert check["alerts_broker"] == check["alerts_in_process"] >= 2
    assert check["cuts_checked_series"] == 1 and check["max_score_difference"] < 1e-9
