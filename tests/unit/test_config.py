from pathlib import Path

import pytest

from streamer import config

ROOT = Path(__file__).resolve().parents[2]
SPEC = {
    "profile": "p",
    "entity_field": "e",
    "time_field": "t",
    "columns": [{"kind": "numeric", "field": "x"}],
}
MINIMAL = {
    "profile": "orders",
    "kafka": {"input_topic": "in", "alert_topic": "alerts", "dead_letter_topic": "dlq"},
    "model": {"bundle": "runs/registry"},
}


@pytest.mark.parametrize("name", ["orders.toml", "sensors.toml"])
def test_shipped_configs_load(name: str) -> None:
    s = config.load(ROOT / "config" / name, environ={})
    assert s.spec.profile == name.removesuffix(".toml")


def test_defaults_and_env_overrides() -> None:
    env = {
        "STREAMER_KAFKA__BOOTSTRAP_SERVERS": "a:1,b:2",
        "STREAMER_BATCH__MAX_BATCH_SIZE": "250",
        "STREAMER_THRESHOLD__QUANTILE": "0.99",
        "STREAMER_LOG_LEVEL": "DEBUG",
        "OTHER": "ignored",
    }
    s = config.from_mapping(MINIMAL, env)
    assert s.kafka.servers == ["a:1", "b:2"]
    assert s.batch.max_batch_size == 250 and s.batch.max_wait_seconds == 0.2
    assert s.threshold.quantile == 0.99
    assert s.log_level == "DEBUG"


@pytest.mark.parametrize(
    ("patch", "named"),
    [
        ({"batch": {"max_batch_size": "many"}}, r"\$\.batch\.max_batch_size"),
        ({"batch": {"max_batch_size": 0}}, r"batch\.max_batch_size must be >= 1"),
        ({"threshold": {"quantile": 1.5}}, r"threshold\.quantile"),
        ({"kafka": {"input_topic": "in"}}, r"alert_topic"),
        ({"kafka": {**MINIMAL["kafka"], "bootstrap": "x"}}, r"unknown field `bootstrap`"),
        ({"profile": "payments"}, r"profile 'payments'"),
        ({"metrics": {"port": 70000}}, r"metrics\.port"),
        ({"features": {"profile": "x"}}, r"field `entity_field` - at `\$\.features`"),
        ({"features": SPEC}, r"exactly one of `profile`"),
    ],
)
def test_errors_name_the_field(patch: dict, named: str) -> None:
    with pytest.raises(config.ConfigError, match=named):
        config.from_mapping({**MINIMAL, **patch}, {})


def test_inline_feature_spec(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text(
        """
[kafka]
input_topic = "in"
alert_topic = "out"
dead_letter_topic = "dlq"

[model]
bundle = "b"

[features]
profile = "payments"
entity_field = "terminal"
time_field = "ts"
time_format = "epoch_s"

[[features.columns]]
kind = "log1p"
field = "amount"

[[features.columns]]
kind = "onehot"
field = "scheme"
vocabulary = ["visa", "mc"]
"""
    )
    s = config.load(path, environ={})
    assert s.spec.feature_names() == ["log1p(amount)", "scheme=visa", "scheme=mc", "scheme=<other>"]


def test_unreadable_files(tmp_path: Path) -> None:
    with pytest.raises(config.ConfigError, match="does not exist"):
        config.load(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[kafka\n")
    with pytest.raises(config.ConfigError, match="not valid TOML"):
        config.load(bad)
