"""bench/smoothing.py runs end to end on a tiny stream (no timing is checked)."""

from __future__ import annotations

import pytest

from tests.bench_scripts import load_bench


def test_the_smoothing_bench_prints_its_table(capsys: pytest.CaptureFixture[str]) -> None:
    bench = load_bench("smoothing")
    # Exits 1 if a candidate alerts differently from its per-row loop reference.
    assert (
        bench.main(
            ["--batches", "50,200", "--rows", "2000", "--repeats", "1", "--min-seconds", "0"]
        )
        == 0
    )
    table = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| 200 |")]
    # The baseline, four candidates, and three references (mean_rows has no per-row loop).
    assert len(table) == 8
    assert sum("reference: per-row loops" in line for line in table) == 3
