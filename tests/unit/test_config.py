from pathlib import Path

import msgspec
import pytest

from streamer import config
from streamer.smoothing import SmoothingSettings

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
        ({"smoothing": {"ewma_alpha": 0}}, r"smoothing\.ewma_alpha must be in \(0, 1\]"),
        ({"smoothing": {"ewma_alpha": 1.5}}, r"smoothing\.ewma_alpha must be in \(0, 1\]"),
        ({"smoothing": {"ewma_alpha": "fast"}}, r"\$\.smoothing\.ewma_alpha"),
        ({"smoothing": {"margin": -1.0}}, r"smoothing\.margin must be >= 0"),
        ({"smoothing": {"min_consecutive": 0}}, r"smoothing\.min_consecutive must be >= 1"),
        ({"smoothing": {"cooldown_rows": -1}}, r"smoothing\.cooldown_rows must be >= 0"),
        ({"smoothing": {"alpha": 0.1}}, r"unknown field `alpha` - at `\$\.smoothing`"),
        ({"smoothing": {"learn_in_cooldown": True}}, r"smoothing\.learn_in_cooldown needs"),
        ({"smoothing": 0.1}, r"\$\.smoothing"),
        ({"state": {"max_entities": 0}}, r"state\.max_entities must be >= 1"),
        ({"training": {"model": "gru"}}, r"'gru' - at `\$\.training\.model`"),
        (
            {"training": {"model": "dense_window", "window_length": 1}},
            r"training\.window_length must be >= 2",
        ),
        (
            {"training": {"model": "dense_window", "bottleneck": 0}},
            r"training\.hidden_units and training\.bottleneck must be >= 1",
        ),
        # Refused combinations name both sides.
        (
            {
                "smoothing": {"cooldown_rows": 10, "learn_in_cooldown": True},
                "threshold": {"learn": False, "per_entity": True},
            },
            r"smoothing\.learn_in_cooldown needs threshold\.learn = true",
        ),
        (
            {"smoothing": {}, "threshold": {"per_entity": True, "entity_min_samples": 0}},
            r"threshold\.entity_min_samples must be in \[1, threshold\.entity_window_size\]",
        ),
        (
            {
                "smoothing": {"cooldown_rows": 10, "learn_in_cooldown": True},
                "threshold": {"learn": False},
            },
            r"smoothing\.learn_in_cooldown needs threshold\.learn = true",
        ),
    ],
)
def test_errors_name_the_field(patch: dict, named: str) -> None:
    with pytest.raises(config.ConfigError, match=named):
        config.from_mapping({**MINIMAL, **patch}, {})


def test_training_model_is_checked_when_built_in_python() -> None:
    # msgspec checks the Literal only when decoding; a TrainingSettings built in code is
    # checked by its own __post_init__, which names every kind.
    with pytest.raises(ValueError, match="'dense', 'lstm', 'dense_window', not 'gru'"):
        config.TrainingSettings(model="gru")  # type: ignore[arg-type]
    windowed = config.TrainingSettings(model="dense_window", window_length=8)
    assert windowed.model in config.WINDOWED_KINDS


def test_smoothing_is_off_by_default_and_reads_every_field() -> None:
    assert config.from_mapping(MINIMAL, {}).smoothing is None
    skab = config.from_mapping({**MINIMAL, "smoothing": {"ewma_alpha": 0.1}}, {})
    assert skab.smoothing == SmoothingSettings(ewma_alpha=0.1)
    # The section is SmoothingSettings itself: every field it has is a key of [smoothing].
    full = SmoothingSettings(
        ewma_alpha=0.1, margin=2.0, min_consecutive=3, cooldown_rows=288, learn_in_cooldown=True
    )
    raw = msgspec.to_builtins(full)
    assert set(raw) == set(SmoothingSettings.__struct_fields__)
    assert config.from_mapping({**MINIMAL, "smoothing": raw}, {}).smoothing == full
    env = {"STREAMER_SMOOTHING__EWMA_ALPHA": "0.2", "STREAMER_SMOOTHING__COOLDOWN_ROWS": "5"}
    assert config.from_mapping(MINIMAL, env).smoothing == SmoothingSettings(
        ewma_alpha=0.2, cooldown_rows=5
    )


def test_smoothing_in_a_toml_file(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text(
        'profile = "sensors"\n[kafka]\ninput_topic = "in"\nalert_topic = "out"\n'
        'dead_letter_topic = "dlq"\n[model]\nbundle = "b"\n[threshold]\nquantile = 0.95\n'
        "[smoothing]\newma_alpha = 0.1\n"
    )
    s = config.load(path, environ={})
    assert s.threshold.quantile == 0.95 and s.smoothing == SmoothingSettings(ewma_alpha=0.1)


def test_smoothing_per_entity_is_accepted() -> None:
    """[smoothing] with threshold.per_entity = true: one smoothing state per entity."""
    raw = {**MINIMAL, "smoothing": {"ewma_alpha": 0.1, "cooldown_rows": 10}}
    env = {"STREAMER_THRESHOLD__PER_ENTITY": "true"}
    s = config.from_mapping(raw, env)
    assert s.threshold.per_entity
    assert s.smoothing == SmoothingSettings(ewma_alpha=0.1, cooldown_rows=10)


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


def test_security_and_delivery_settings() -> None:
    kafka = {
        **MINIMAL["kafka"],
        "security_protocol": "SASL_SSL",
        "sasl_mechanism": "SCRAM-SHA-512",
        "sasl_plain_username": "detector",
        "sasl_plain_password": "secret",
        "ssl_cafile": "ca.pem",
        "delivery": "exactly-once",
    }
    s = config.from_mapping({**MINIMAL, "kafka": kafka}, {})
    from streamer.kafka_io import common_options, transactional_id

    options = common_options(s.kafka)
    assert options["security_protocol"] == "SASL_SSL"
    assert options["sasl_plain_username"] == "detector" and options["ssl_cafile"] == "ca.pem"
    assert "ssl_certfile" not in options  # unset values are left to kafka-python's defaults
    assert transactional_id(s.kafka).startswith("anomaly-streamer-")


@pytest.mark.parametrize(
    ("kafka", "named"),
    [
        ({"security_protocol": "SASL_PLAINTEXT"}, r"kafka\.sasl_mechanism is required"),
        ({"sasl_mechanism": "PLAIN"}, r"sasl_plain_username and sasl_plain_password"),
        ({"ssl_certfile": "c.pem"}, r"ssl_certfile and kafka\.ssl_keyfile"),
        ({"delivery": "at-most-once"}, r"\$\.kafka\.delivery"),
        ({"security_protocol": "TLS"}, r"\$\.kafka\.security_protocol"),
        ({"client": "librdkafka"}, r"\$\.kafka\.client"),
    ],
)
def test_bad_security_settings_are_named(kafka: dict, named: str) -> None:
    with pytest.raises(config.ConfigError, match=named):
        config.from_mapping({**MINIMAL, "kafka": {**MINIMAL["kafka"], **kafka}}, {})
