"""The evaluator's `--broker` check, the parts that need no broker: what it refuses, and the
daemon config it writes."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.unit.test_evaluate import MINIMAL
from training.broker_check import (
    SeriesCheck,
    Topics,
    daemon_settings,
    headline,
    refusal,
    summary,
    write_settings,
)
from training.evaluate import _settings, load_config, main

SMOOTHED = "threshold = { quantile = 0.97, min_samples = 20 }\nsmoothing = { ewma_alpha = 0.3 }\n"


def test_daemon_config_loads_back_as_the_evaluators_settings(tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    weights = '[training]\nscore_weights = { "x*" = 0.5, "y.(z)" = 0.0 }\nerror_cap = 4.0\n'
    cfg.write_text(MINIMAL.format(path="x", train_rows=5) + SMOOTHED + weights)
    config = load_config(cfg)
    settings = _settings(config, config.detectors[0], tmp_path / "bundle")
    topics = Topics.fresh("valve1/1.csv")
    daemon = daemon_settings(settings, "127.0.0.1:1", topics, batch_size=7, port=1234)
    write_settings(daemon, tmp_path / "daemon.toml")  # raises unless it loads back equal
    assert daemon.features == settings.features and daemon.smoothing == settings.smoothing
    assert daemon.threshold == settings.threshold and daemon.model == settings.model
    assert daemon.training.score_weights == {"x*": 0.5, "y.(z)": 0.0}  # quoted keys
    assert daemon.batch.max_batch_size == 7 and daemon.kafka.input_topic == topics.input
    assert "/" not in topics.input


# MINIMAL with a label_rate column: the series' confirmed anomalies over the hour before the
# hour an hour back.
LABELED = MINIMAL.replace(
    'columns = [{{ kind = "numeric", field = "x" }}]',
    'id_field = "row"\ncolumns = [{{ kind = "numeric", field = "x" }}, '
    '{{ kind = "label_rate", windows_seconds = [3600], delay_seconds = 3600 }}]',
)


@pytest.mark.parametrize(
    ("base", "extra", "why"),
    [
        (LABELED, "[replay]\nlabel_delay_seconds = 7200.0\n", "cuts batches where labels"),
        (LABELED, "threshold = { per_entity = true }\n", "per-entity thresholds"),
        (MINIMAL, "[replay]\nretrain_every_rows = 10\n", "retrain"),
    ],
)
def test_broker_check_refuses_what_it_cannot_mirror_before_training(
    tmp_path: Path, base: str, extra: str, why: str, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = tmp_path / "c.toml"
    text = base.format(path=str(tmp_path / "missing"), train_rows=5)
    cfg.write_text(text + extra)  # MINIMAL ends in its [[detectors]] entry
    assert refusal(load_config(cfg)) is not None
    args = ["--config", str(cfg), "--out", str(tmp_path / "out"), "--broker", "127.0.0.1:1"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "--broker refused" in err and why in err
    assert not (tmp_path / "out").exists()  # refused before anything ran


def test_broker_check_takes_labels_no_later_than_the_columns_need(tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    text = LABELED.format(path="x", train_rows=5)
    for extra in ("", "[replay]\nlabel_delay_seconds = 3600.0\n"):
        cfg.write_text(text + extra)
        assert refusal(load_config(cfg)) is None


def test_summary_lists_the_rows_alerted_on_one_side_only() -> None:
    same = SeriesCheck("a", 10, [1, 2], [1, 2], batches=2, cuts_checked=True, dead_letters=0)
    other = SeriesCheck("b", 10, [3, 4, 5], [4, 6], batches=2, cuts_checked=True, dead_letters=0)
    out = summary("d", [same, other], seconds=1.0)
    assert not out["identical"] and out["identical_series"] == 1
    assert (out["alerts_in_process"], out["alerts_broker"], out["rows"]) == (5, 4, 20)
    assert out["mismatches"] == [
        {"series": "b", "only_in_process": [3, 5], "only_broker": [6],
         "only_in_process_count": 2, "only_broker_count": 1, "cuts_checked": True}
    ]  # fmt: skip
    assert "DIFFERENT" in headline(out)


ROLLING = '{ kind = "rolling", field = "x", windows_seconds = [60], stats = ["mean"], key = "k" }'


@pytest.mark.parametrize(
    "extra",
    [
        '[training]\nmodel = "lstm"\n',
        '[training]\nmodel = "dense_window"\n',
        "threshold = { per_entity = true }\n",
        None,  # aggregate features
    ],
)
def test_broker_check_takes_per_entity_history(tmp_path: Path, extra: str | None) -> None:
    """The daemon restores it from the training rows, produced ahead of the test part."""
    text = MINIMAL.format(path="x", train_rows=5)
    if extra is None:
        text = text.replace('{ kind = "numeric", field = "x" }', ROLLING)
    cfg = tmp_path / "c.toml"
    cfg.write_text(text + (extra or ""))
    assert refusal(load_config(cfg)) is None


def test_daemon_restores_every_history_row(tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text(MINIMAL.format(path="x", train_rows=5) + "threshold = { per_entity = true }\n")
    config = load_config(cfg)
    settings = _settings(config, config.detectors[0], tmp_path / "bundle")
    topics = Topics.fresh("s")
    daemon = daemon_settings(settings, "127.0.0.1:1", topics, 7, 1234, 25_000, 90.0)
    assert daemon.state.restore_events == 25_000
    assert daemon.state.restore_timeout_seconds == 90.0
    write_settings(daemon, tmp_path / "daemon.toml")
    plain = daemon_settings(settings, "127.0.0.1:1", topics, 7, 1234)
    assert plain.state == settings.state  # nothing before the test part: nothing to restore
    same = SeriesCheck("a", 10, [1], [1], batches=2, cuts_checked=True, dead_letters=0)
    out = summary("d", [same, SeriesCheck("b", 10, [], [], 2, True, 0, restored=300)], 1.0)
    assert out["restored_rows"] == 300 and "state restored from 300 earlier" in headline(out)


def test_feedback_plan_feeds_whole_batches_no_earlier_than_harmless() -> None:
    """The labels the in-process replay delivers, as feedback messages: those due before
    the test part first, then per chunk of whole batches spanning at most the label delay."""
    from itertools import pairwise

    import msgspec
    import numpy as np

    from streamer.features import FeatureSpec, LabelRate, Numeric
    from streamer.labels import deliveries
    from training.adapters import Series
    from training.broker_check import feedback_plan
    from training.evaluate import event_fields

    hour = 3600.0
    spec = FeatureSpec(
        profile="t", entity_field="series", time_field="ts", time_format="epoch_s",
        id_field="row", columns=[Numeric(field="x"),
                                 LabelRate(key="shop", windows_seconds=[hour], delay_seconds=hour)],
    )  # fmt: skip
    rng = np.random.default_rng(1)
    n, n0 = 300, 100
    seconds = np.arange(n) * 60.0 + 1e6  # a row a minute: 60 rows an hour
    series = Series(
        name="s", group="g", columns={"x": rng.normal(size=n), "shop": rng.integers(0, 3, n)},
        seconds=seconds, labels=(rng.random(n) < 0.2).astype(np.int8), n_train=n0,
    )  # fmt: skip
    plan = feedback_plan(series, spec, event_fields(spec), hour, batch_size=7)
    # Whole batches of 7 (the last one partial), each chunk spanning at most an hour.
    bounds = [(a, b) for a, b, _ in plan.chunks]
    assert bounds[0][0] == 0 and bounds[-1][1] == n - n0
    assert all(b1 == a2 for (_, b1), (a2, _) in pairwise(bounds))
    assert all(a % 7 == 0 and (b % 7 == 0 or b == n - n0) for a, b in bounds)
    assert all((b - a - 1) * 60.0 <= hour for a, b in bounds) and len(bounds) > 2
    # Every label the replay delivers, once, in the chunk it falls due in.
    due = deliveries(seconds, series.labels, hour)
    sent = [msgspec.json.decode(m) for m in plan.before] + [
        msgspec.json.decode(m) for _, _, labels in plan.chunks for m in labels
    ]
    assert [d["event_id"] for d in sent] == [int(j) for _, rows in due for j in rows]
    assert len(plan.before) == sum(len(rows) for i, rows in due if i < n0)
    assert all(d["key_field"] == "shop" and d["anomaly"] for d in sent)
    first = sent[0]
    assert first["key"] == series.columns["shop"][first["event_id"]]
    assert first["event_time"] == seconds[first["event_id"]]


def test_lockstep_sends_rows_only_after_their_labels_and_chunks_after_scoring(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The feed's order, from the daemon's metrics alone: a chunk's labels, its rows once
    every label is applied, the next chunk once its batches are scored."""
    from training import broker_check
    from training.broker_check import Feedback, _Lockstep

    sent: list[tuple[str, int, int]] = []  # (topic, first offset, messages)
    monkeypatch.setattr(
        broker_check, "_produce", lambda _b, t, m, first=0: sent.append((t, first, len(m)))
    )
    topics = Topics("in", "alerts", "dlq", "group", "fb")
    plan = Feedback([b"l0"], [(0, 4, [b"l1", b"l2"]), (4, 8, []), (8, 10, [b"l3"])])
    rows = [(b"r", 0)] * 10
    feed = _Lockstep("b", topics, plan, rows, first_offset=100, batch_size=2)

    def look(applied: float, batches: float) -> bool:
        samples = {
            ("anomaly_feedback_total", (("outcome", "applied"), ("type", "label"))): applied,
            ("anomaly_batches_total", ()): batches,
        }
        return feed(samples)

    assert not look(0, 0) and sent == [("fb", 1, 2)]  # chunk 1's labels, after the one before
    assert not look(2, 0) and len(sent) == 1  # 2 of 3 labels applied: no rows yet
    assert "chunk 1 of 3, waiting for its labels to apply" in feed.progress()
    assert not look(3, 0) and sent[-1] == ("in", 100, 4)  # chunk 1's rows
    assert not look(3, 1) and len(sent) == 2  # 1 of its 2 batches scored
    # Scored: chunk 2 has no labels, so its rows go at once; then wait for them.
    assert not look(3, 2) and sent[2:] == [("fb", 3, 0), ("in", 104, 4)]
    assert not look(3, 4) and sent[-1] == ("fb", 3, 1)  # chunk 3's label
    assert look(4, 4) and sent[-1] == ("in", 108, 2)  # the last rows: all out
