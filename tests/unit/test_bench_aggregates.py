"""bench/aggregates.py runs end to end on a tiny stream (no timing is checked)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_the_aggregates_bench_checks_its_columns_and_prints_its_table(
    capsys: pytest.CaptureFixture[str],
) -> None:
    spec = importlib.util.spec_from_file_location(
        "bench_aggregates", ROOT / "bench" / "aggregates.py"
    )
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    sys.modules["bench_aggregates"] = bench
    spec.loader.exec_module(bench)
    # Exits 1 if the median set's count or std columns differ from the default set's.
    assert bench.main(["--customers", "5", "--days", "4", "--repeats", "1"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    assert len(rows) == 4 and "median_ratio" in rows[2] and rows[1].endswith("1.00x |")
