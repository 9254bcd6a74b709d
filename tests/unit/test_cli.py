import json
import subprocess
import sys

import pytest


@pytest.mark.parametrize(
    ("module", "commands"),
    [("streamer", ["run", "check", "tail"]), ("training", ["simulate", "fit", "evaluate"])],
)
def test_help_describes_every_command(module: str, commands: list[str]) -> None:
    out = subprocess.run(
        [sys.executable, "-m", module, "--help"], capture_output=True, text=True, check=True
    ).stdout
    for command in commands:
        assert command in out
        sub = subprocess.run(
            [sys.executable, "-m", module, command, "--help"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        assert "--" in sub  # every command documents its options


def test_bad_config_exits_2_naming_the_field(tmp_path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text(
        'profile = "orders"\n[kafka]\ninput_topic = "a"\nalert_topic = "b"\n'
        'dead_letter_topic = "c"\n[model]\nbundle = "x"\n[batch]\nmax_wait_seconds = "soon"\n'
    )
    done = subprocess.run(
        [sys.executable, "-m", "streamer", "run", "--config", str(cfg)],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 2
    assert "$.batch.max_wait_seconds" in done.stderr


def test_missing_bundle_exits_2(tmp_path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text(
        'profile = "orders"\n[kafka]\ninput_topic = "a"\nalert_topic = "b"\n'
        f'dead_letter_topic = "c"\n[model]\nbundle = "{tmp_path / "nothing"}"\n'
    )
    done = subprocess.run(
        [sys.executable, "-m", "streamer", "check", "--config", str(cfg)],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 2
    assert "not a model bundle" in done.stderr


def test_label_rate_without_a_feedback_topic_exits_2_naming_it(tmp_path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text(
        '[kafka]\ninput_topic = "a"\nalert_topic = "b"\ndead_letter_topic = "c"\n'
        f'[model]\nbundle = "{tmp_path / "nothing"}"\n'
        '[features]\nprofile = "p"\nentity_field = "card"\ntime_field = "ts"\n'
        'time_format = "epoch_s"\nid_field = "tx"\n'
        'columns = [{ kind = "numeric", field = "amount" }, '
        '{ kind = "label_rate", key = "terminal", windows_seconds = [86400] }]\n'
    )
    done = subprocess.run(
        [sys.executable, "-m", "streamer", "run", "--config", str(cfg)],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 2, done.stderr
    assert "control.feedback_topic" in done.stderr
    # Without an id field a label could not be told from its repeats: refused at check.
    cfg.write_text(cfg.read_text().replace('id_field = "tx"\n', ""))
    done = subprocess.run(
        [sys.executable, "-m", "streamer", "check", "--config", str(cfg)],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 2, done.stderr
    assert "id_field" in done.stderr and "features" in done.stderr, done.stderr


def test_tail_prints_the_raw_score_of_a_smoothed_alert() -> None:
    from argparse import Namespace
    from types import SimpleNamespace

    from streamer.__main__ import _describe

    alert = {
        "type": "alert", "entity_field": "sensor_id", "entity": "s-03", "event_id": 7,
        "event_time": "2026-01-01T00:00:00.000+00:00", "score": 0.52, "threshold": 0.5,
        "top_features": [{"feature": "x", "actual": 3.0, "reconstructed": 1.0}],
    }  # fmt: skip
    args = Namespace(dead_letters=False, json=False)
    plain = _describe(SimpleNamespace(value=json.dumps(alert).encode()), args)
    assert "score=0.52 > 0.5 | x=3" in plain and "raw" not in plain
    smoothed = _describe(
        SimpleNamespace(value=json.dumps({**alert, "raw_score": 4.1}).encode()), args
    )
    assert "score=0.52 > 0.5 (raw 4.1) | x=3" in smoothed
    ranged = _describe(
        SimpleNamespace(value=json.dumps({**alert, "score": 0.3, "beyond_range": True}).encode()),
        args,
    )
    assert "score=0.3 beyond range, threshold 0.5 | x=3" in ranged
