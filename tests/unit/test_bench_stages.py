"""bench/stages.py's pure helpers: the scaling verdicts and the tables, without a model."""

from __future__ import annotations

import pytest

from tests.bench_scripts import load_bench

load_bench("e2e")  # stages.py imports it by name
stages = load_bench("stages")


def test_a_cost_that_falls_with_batch_size_falls() -> None:
    v = stages.scaling_verdict([10, 100, 1000], [10.0, 2.0, 1.0])
    assert v.word == "falls"
    assert v.last_over_first == pytest.approx(0.1)
    assert v.text().startswith("falls (last/first 0.10x")


def test_a_cost_within_the_tolerance_is_flat() -> None:
    v = stages.scaling_verdict([10, 100, 1000], [1.0, 1.2, 0.9])
    assert v.word == "flat"
    assert v.worst_rise == pytest.approx(1.2)
    assert "largest rise +20%" in v.text()


def test_any_rise_beyond_the_tolerance_is_flagged_with_where_it_happened() -> None:
    # Falls overall, yet rises by 50% between the two largest sizes: still flagged.
    v = stages.scaling_verdict([10, 100, 1000, 10_000], [10.0, 1.0, 1.0, 1.5])
    assert v.word == "RISES"
    assert (v.rise_from, v.rise_to) == (100, 10_000)
    assert v.text() == "RISES: +50% from 100 to 10,000"


def test_verdict_needs_matching_points() -> None:
    with pytest.raises(ValueError, match="two"):
        stages.scaling_verdict([10], [1.0])
    with pytest.raises(ValueError, match="two"):
        stages.scaling_verdict([10, 100], [1.0])


def test_median_by_key_and_fmt() -> None:
    runs = [{"a": 1.0, "b": 5.0}, {"a": 3.0, "b": 4.0}, {"a": 2.0, "b": 9.0}]
    assert stages.median_by_key(runs) == {"a": 2.0, "b": 5.0}
    assert [stages.fmt(x) for x in (1234.5, 12.345, 1.2345, 0.12345)] == [
        "1,234",
        "12.3",
        "1.23",
        "0.123",
    ]


def test_batch_table_has_a_row_and_a_verdict_per_stage() -> None:
    medians = [
        {"decode": 1.0, "process() wall": 10.0},
        {"decode": 2.0, "process() wall": 5.0},
    ]
    table, verdicts = stages.batch_table([10, 100], medians)
    lines = table.splitlines()
    assert lines[0] == "| us/event | batch 10 | batch 100 | verdict |"
    assert lines[2] == "| decode | 1.00 | 2.00 | RISES: +100% from 10 to 100 |"
    assert lines[-1] == "| events/s (process() wall) | 100,000 | 200,000 | |"
    assert verdicts["process() wall"].word == "falls"


def test_threshold_table_judges_cost_per_ring_entry() -> None:
    per_batch = [
        {"threshold": 50.0, "sum of stages": 1.0},
        {"threshold": 300.0, "sum of stages": 1.0},
    ]
    table, verdict = stages.threshold_table([1000, 10_000], per_batch, [1000, 10_000])
    assert "| 10,000 | 10,000 | 300 | 30.0 | 1.00 |" in table
    assert verdict.word == "falls"  # 50 -> 30 us per 1,000 entries: linear at most


def test_parse_sizes() -> None:
    assert stages.parse_sizes("10,100, 1_000") == (10, 100, 1000)
    for bad in ("10", "100,10", "0,10", "10,10", "ten,100"):
        with pytest.raises(ValueError):
            stages.parse_sizes(bad)
