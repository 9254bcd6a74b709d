"""bench/e2e.py's pure helpers: the LSTM rows' bookkeeping, without a broker or a model."""

from __future__ import annotations

from pathlib import Path

import pytest

from streamer import config as config_mod
from tests.bench_scripts import load_bench

e2e = load_bench("e2e")


def test_held_back_count_is_the_first_length_minus_one_rows_of_each_entity() -> None:
    keys = [b"a", b"b"] * 40 + [b"c"] * 3
    assert e2e.held_back_count(keys, 30) == 29 + 29 + 3


def test_parse_runtimes_keeps_order_and_drops_repeats() -> None:
    assert e2e.parse_runtimes("tensorflow, numpy,tensorflow") == ["tensorflow", "numpy"]
    for bad in ("", "numpy,jax"):
        with pytest.raises(ValueError, match="choose one or more"):
            e2e.parse_runtimes(bad)


def test_lstm_table_gives_each_row_its_share_of_the_same_runtimes_model_only_rate() -> None:
    s = e2e.Scenario
    baseline = s("seeds' way", 10, 1.0)
    rows = [
        s("daemon, numpy", 8_000, 1.0, runtime="numpy"),
        s("daemon, tensorflow", 5_000, 1.0, runtime="tensorflow"),
        baseline,
        s("model only, batched: numpy", 10_000, 1.0, runtime="numpy"),
        s("model only, batched: tf", 20_000, 1.0, runtime="tensorflow"),
    ]
    ceilings = e2e.model_only_rows(rows)
    assert set(ceilings) == {"numpy", "tensorflow"}
    lines = e2e.table(rows, baseline, ceilings).splitlines()
    assert "share of model-only rate" in lines[0]
    assert lines[2].startswith("| daemon, numpy | 8,000 | 800.0x | 80% |")
    assert lines[3].startswith("| daemon, tensorflow | 5,000 | 500.0x | 25% |")
    assert lines[4].startswith("| seeds' way | 10 | 1.0x |  |")
    # The dense table keeps its four columns.
    assert e2e.table(rows, baseline).splitlines()[0] == (
        "| scenario | events/s | ratio to baseline | notes |"
    )


def test_daemon_config_for_the_lstm_path_is_a_valid_config() -> None:
    doc = e2e.daemon_config("127.0.0.1:1", "t", Path("b"), 0, 1000, "sensors", "tensorflow")
    settings = config_mod.from_mapping(doc)
    assert settings.profile == "sensors" and settings.model.runtime == "tensorflow"
    dense = e2e.daemon_config("127.0.0.1:1", "t", Path("b"), 0, 1000)
    assert dense["profile"] == "orders" and "runtime" not in dense["model"]
