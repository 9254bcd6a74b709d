"""bench/aggregates.py runs end to end on a tiny stream (no timing is checked)."""

from __future__ import annotations

import pytest

from tests.bench_scripts import load_bench


def test_the_aggregates_bench_checks_its_columns_and_prints_its_table(
    capsys: pytest.CaptureFixture[str],
) -> None:
    bench = load_bench("aggregates")
    # Exits 1 if the median set's count or std columns differ from the default set's.
    assert bench.main(["--customers", "5", "--days", "4", "--repeats", "1"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    assert len(rows) == 4 and "median_ratio" in rows[2] and rows[1].endswith("1.00x |")
