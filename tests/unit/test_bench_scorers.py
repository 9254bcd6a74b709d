"""bench/scorers.py runs end to end on tiny batches (no timing is checked)."""

from __future__ import annotations

import pytest

from tests.bench_scripts import load_bench


def test_the_scorer_bench_checks_parity_and_prints_its_table(
    capsys: pytest.CaptureFixture[str],
) -> None:
    bench = load_bench("scorers")
    args = ["--features", "3", "--window", "4", "--batches", "1,8", "--events", "16"]
    # Exits 1 if a numpy scorer does not rebuild Keras's output.
    assert bench.main([*args, "--repeats", "1", "--min-seconds", "0"]) == 0
    out = capsys.readouterr().out
    assert out.count("parity ") == 3
    table = [line for line in out.splitlines() if line.startswith(("| 1 |", "| 8 |"))]
    assert len(table) == 6 and sum("dense_window" in line for line in table) == 2
