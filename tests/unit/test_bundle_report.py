import logging
import shutil
from pathlib import Path

import msgspec
import numpy as np
import pytest

from streamer import bundle as bundles
from streamer.profiles import ORDERS
from tests.conftest import write_events
from training.__main__ import main as training_main
from training.bundle_report import REPORT_FILE, write_report
from training.bundle_report import main as report_main


def test_report_is_not_part_of_the_bundle(orders_bundle: bundles.Bundle, tmp_path: Path) -> None:
    path = tmp_path / "b"
    shutil.copytree(orders_bundle.path, path)
    (path / REPORT_FILE).unlink(missing_ok=True)
    report = write_report(path, orders_bundle.manifest, orders_bundle.warm_start)
    assert report == path / REPORT_FILE
    text = report.read_text()
    assert orders_bundle.version in text
    assert text.count('<img src="data:image/png;base64,') == 3  # loss, errors, per feature
    assert "quantile 0.999" in text and "train.jsonl" in text
    # load() verifies the files the manifest lists and ignores the rest.
    b = bundles.load(path, expected_spec=ORDERS)
    assert REPORT_FILE not in b.manifest.files
    assert b.version == orders_bundle.version


def test_report_of_a_bundle_without_per_feature_errors(
    orders_bundle: bundles.Bundle, tmp_path: Path
) -> None:
    manifest = msgspec.structs.replace(
        orders_bundle.manifest,
        training={k: v for k, v in orders_bundle.manifest.training.items()
                  if k != "val_feature_error"},
    )  # fmt: skip
    text = write_report(tmp_path, manifest, np.zeros(10)).read_text()
    assert "Not recorded in this bundle" in text
    assert text.count("<img") == 2


def test_report_command_rebuilds_it(
    orders_registry: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    registry = tmp_path / "registry"
    shutil.copytree(orders_registry, registry)
    assert report_main([str(registry)]) == 0
    assert capsys.readouterr().out.strip().endswith(REPORT_FILE)
    assert report_main([str(tmp_path / "nothing")]) == 2


def test_fit_command_logs_epochs_and_writes_the_report(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    events = tmp_path / "train.jsonl"
    write_events(events, "orders", count=1000, seed=5, anomaly_rate=0.0)
    config = tmp_path / "orders.toml"
    config.write_text(
        'profile = "orders"\n[kafka]\ninput_topic = "a"\nalert_topic = "b"\n'
        f'dead_letter_topic = "c"\n[model]\nbundle = "{tmp_path / "registry"}"\n'
        "[training]\nepochs = 2\npatience = 1\n"
    )
    with caplog.at_level(logging.INFO, logger="training"):
        assert training_main(["fit", "--config", str(config), "--events", str(events)]) == 0
    assert "epoch 1/2: loss " in caplog.text and "epoch 2/2: loss " in caplog.text
    out = capsys.readouterr().out
    b = bundles.load(tmp_path / "registry", expected_spec=ORDERS)
    assert f"report: {b.path / REPORT_FILE}" in out
    assert (b.path / REPORT_FILE).is_file()
    assert b.drift is not None
    assert set(b.manifest.training["val_feature_error"]) == set(ORDERS.feature_names())
