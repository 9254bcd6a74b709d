"""Settings: one frozen object, read once from a TOML file plus environment overrides.

Environment variables override file values: `STREAMER_<SECTION>__<KEY>` (for example
`STREAMER_KAFKA__BOOTSTRAP_SERVERS=broker:9092`, `STREAMER_BATCH__MAX_BATCH_SIZE=500`) or
`STREAMER_<KEY>` for top-level keys. Values are read as TOML values when they parse as one
(numbers, booleans, arrays), otherwise as strings.

Every error names the field at fault, as a path like `$.batch.max_batch_size`.
"""

from __future__ import annotations

import importlib.util
import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import msgspec

from streamer.features import FeatureSpec
from streamer.profiles import BUILTIN
from streamer.scaler import SCALER_KINDS, ScalerKind
from streamer.smoothing import SmoothingSettings

ENV_PREFIX = "STREAMER_"
DEFAULT_MAX_ENTITIES = 100_000  # state.max_entities


class ConfigError(Exception):
    """The configuration cannot be used; the message names the field."""


class _Section(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    pass


class KafkaSettings(_Section, frozen=True):
    input_topic: str
    alert_topic: str
    dead_letter_topic: str
    bootstrap_servers: str | list[str] = "127.0.0.1:9092"
    # The daemon's consumer and producer: kafka-python (pure Python, always installed), or
    # confluent-kafka (librdkafka; pip install 'kafka-anomaly-streamer[confluent]'), which
    # fetches and parses records in C: several times the throughput on one core.
    client: Literal["kafka-python", "confluent"] = "kafka-python"
    group_id: str = "anomaly-streamer"
    # Static membership: a replica that restarts with the same id takes its partitions back
    # at once instead of waiting out the session timeout (set it to the pod name in a
    # StatefulSet; leave unset where replicas have no stable name).
    group_instance_id: str | None = None
    session_timeout_ms: int = 10_000  # how long a silent member keeps its partitions
    client_id: str = "anomaly-streamer"
    auto_offset_reset: Literal["earliest", "latest"] = "earliest"
    # Create the alert and dead-letter topics at start when they are missing. The input topic
    # is never created: a typo there should stop the daemon, not make it wait forever.
    create_output_topics: bool = True
    output_topic_partitions: int = 4
    max_poll_records: int = 2000
    fetch_max_bytes: int = 52_428_800
    max_partition_fetch_bytes: int = 4_194_304
    producer_linger_ms: int = 5
    producer_batch_bytes: int = 262_144
    producer_acks: Literal["all", "1", "0"] = "all"
    request_timeout_ms: int = 30_000
    # at-least-once: produce, flush, commit. exactly-once: one transaction per batch.
    delivery: Literal["at-least-once", "exactly-once"] = "at-least-once"
    # exactly-once only. Must be stable across restarts of one replica and differ between
    # replicas; the default, `<group_id>-<hostname>`, is that under Kubernetes and Compose.
    transactional_id: str | None = None
    # exactly-once: the broker aborts a transaction left open this long (by a dead replica
    # whose successor has another transactional id); read_committed readers wait until then.
    transaction_timeout_ms: int = 60_000
    # Flush and commit at most this often (and before a rebalance or shutdown): each commit
    # costs a broker round trip. Uncommitted batches are replayed after a crash; in
    # exactly-once mode alerts become visible to read_committed readers at the commit.
    commit_interval_seconds: float = 0.5
    delivery_timeout_seconds: float = 30.0  # one try at getting a batch out
    retry_backoff_max_seconds: float = 5.0  # back-off ceiling while Kafka is unreachable
    # kafka-python's own reconnect back-off ceiling (its default, 30 s, would leave the
    # daemon idle up to half a minute after the broker is back).
    reconnect_backoff_max_ms: int = 1000
    shutdown_grace_seconds: float = 30.0  # how long SIGTERM keeps retrying the last batch
    # Security: passed through to kafka-python unchanged.
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    ssl_cafile: str | None = None
    ssl_certfile: str | None = None
    ssl_keyfile: str | None = None
    ssl_password: str | None = None
    ssl_check_hostname: bool = True
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] | None = None
    sasl_plain_username: str | None = None
    sasl_plain_password: str | None = None

    def __post_init__(self) -> None:
        for name in ("input_topic", "alert_topic", "dead_letter_topic", "group_id"):
            if not getattr(self, name):
                raise ValueError(f"kafka.{name} must not be empty")
        if self.client == "confluent" and importlib.util.find_spec("confluent_kafka") is None:
            raise ValueError(
                "kafka.client = 'confluent' needs the confluent-kafka package: "
                "pip install 'kafka-anomaly-streamer[confluent]'"
            )
        if self.security_protocol.startswith("SASL") and not self.sasl_mechanism:
            raise ValueError(f"kafka.sasl_mechanism is required with {self.security_protocol}")
        if self.sasl_mechanism and not (self.sasl_plain_username and self.sasl_plain_password):
            raise ValueError("kafka.sasl_plain_username and sasl_plain_password are required")
        if bool(self.ssl_certfile) != bool(self.ssl_keyfile):
            raise ValueError("kafka.ssl_certfile and kafka.ssl_keyfile go together")
        if self.commit_interval_seconds < 0:
            raise ValueError("kafka.commit_interval_seconds must be >= 0")
        if self.delivery_timeout_seconds <= 0 or self.retry_backoff_max_seconds <= 0:
            raise ValueError("kafka.delivery_timeout_seconds and retry_backoff_max_seconds > 0")
        if len({self.input_topic, self.alert_topic, self.dead_letter_topic}) != 3:
            raise ValueError("kafka input, alert and dead-letter topics must all differ")
        if self.output_topic_partitions < 1:
            raise ValueError("kafka.output_topic_partitions must be >= 1")

    @property
    def servers(self) -> list[str]:
        raw = self.bootstrap_servers
        items = raw.split(",") if isinstance(raw, str) else raw
        return [s.strip() for s in items if s.strip()]


class BatchSettings(_Section, frozen=True):
    max_batch_size: int = 1000
    max_wait_seconds: float = 0.2
    # How long one poll waits while no batch is open. kafka-python's poll with a long timeout
    # (0.5 s was the default here) now and then returns ~100 ms after records have arrived,
    # when the process also produces; short polls do not (bench/README.md, Latency).
    idle_poll_seconds: float = 0.05

    def __post_init__(self) -> None:
        if self.max_batch_size < 1:
            raise ValueError("batch.max_batch_size must be >= 1")
        if not 0.0 <= self.max_wait_seconds <= 60.0:
            raise ValueError("batch.max_wait_seconds must be in [0, 60]")
        if not 0.0 < self.idle_poll_seconds <= 5.0:
            raise ValueError("batch.idle_poll_seconds must be in (0, 5]")


class ModelSettings(_Section, frozen=True):
    bundle: str  # a bundle directory, or a registry directory with a `current` file
    # numpy: a plain forward pass, no TensorFlow import (lean: ~10x less memory, fast start).
    # tensorflow: the Keras model itself.
    runtime: Literal["numpy", "tensorflow"] = "numpy"
    # How often to look at a registry's `current` file; a new version is verified and swapped
    # in between batches. 0 turns hot reload off.
    reload_check_seconds: float = 5.0


class ThresholdSettings(_Section, frozen=True):
    quantile: float = 0.999
    window_size: int = 10_000
    min_samples: int = 500
    # false: keep the bundle's warm-start threshold and never learn from live scores, so
    # decisions do not depend on batch boundaries or on which replica scored what.
    learn: bool = True
    # One rolling quantile per entity (same quantile), used once the entity has
    # entity_min_samples scores; the global threshold judges it until then.
    per_entity: bool = False
    entity_window_size: int = 200  # scores kept per entity: 8 bytes each
    entity_min_samples: int = 50
    # A row with a scaled feature more than this share of the range seen so far beyond that
    # range (training rows, then live rows) alerts whatever its score (streamer/ranges.py;
    # Numenta's NAB detector uses 0.05). None: off.
    range_tolerance: float | None = None

    def __post_init__(self) -> None:
        if self.range_tolerance is not None and not self.range_tolerance >= 0.0:
            raise ValueError("threshold.range_tolerance must be >= 0")
        if not 0.0 < self.quantile < 1.0:
            raise ValueError("threshold.quantile must be in (0, 1)")
        if self.window_size < 1:
            raise ValueError("threshold.window_size must be >= 1")
        if not 0 <= self.min_samples <= self.window_size:
            raise ValueError("threshold.min_samples must be in [0, threshold.window_size]")
        if not 1 <= self.entity_min_samples <= self.entity_window_size:
            raise ValueError(
                "threshold.entity_min_samples must be in [1, threshold.entity_window_size]"
            )


class StateSettings(_Section, frozen=True):
    """Per-entity state: LSTM windows, aggregate features, per-entity thresholds, incidents,
    and the keys of the label feedback (streamer/labels.py)."""

    # Entities kept per kind of state (label keys too); the least recently seen is evicted
    # beyond it.
    max_entities: int = DEFAULT_MAX_ENTITIES
    # On every partition assignment (start, restart, rebalance) the state of the partition's
    # entities is rebuilt by re-reading up to this many messages before the committed offset.
    # Exact when every entity's needed history lies within that tail; 0 turns it off.
    restore_events: int = 10_000
    restore_timeout_seconds: float = 60.0

    def __post_init__(self) -> None:
        if self.max_entities < 1:
            raise ValueError("state.max_entities must be >= 1")
        if self.restore_events < 0:
            raise ValueError("state.restore_events must be >= 0")
        if self.restore_timeout_seconds <= 0:
            raise ValueError("state.restore_timeout_seconds must be > 0")


class AlertSettings(_Section, frozen=True):
    top_features: int = 3
    max_message_bytes: int = 1_000_000  # larger input messages are dead-lettered unread

    def __post_init__(self) -> None:
        if self.top_features < 0:
            raise ValueError("alerts.top_features must be >= 0")


class IncidentSettings(_Section, frozen=True):
    """Group one entity's consecutive alerts into one incident (open, updates, resolve).

    All times are event time: the clock is the latest event time the daemon has seen.
    """

    enabled: bool = False
    # Keep publishing every alert as well; false: subscribers get incident messages only.
    publish_alerts: bool = True
    min_duration_seconds: float = 0.0  # open only once an entity's alerts span this long
    quiet_seconds: float = 300.0  # resolve after this long without an alert of the entity
    update_seconds: float = 60.0  # at most one update per incident this often
    cooldown_seconds: float = 0.0  # after a resolve, the entity opens no incident this long

    def __post_init__(self) -> None:
        for name in ("min_duration_seconds", "update_seconds", "cooldown_seconds"):
            if getattr(self, name) < 0:
                raise ValueError(f"incidents.{name} must be >= 0")
        if self.quiet_seconds <= 0:
            raise ValueError("incidents.quiet_seconds must be > 0")


class ControlSettings(_Section, frozen=True):
    """Runtime control and feedback topics (see streamer/control.py for the messages)."""

    topic: str | None = None  # control messages; every replica reads all of it
    feedback_topic: str | None = None  # subscribers' ack / false_positive messages
    poll_seconds: float = 1.0  # how often to look for new messages, between batches
    false_positive_factor: float = 1.25  # each false positive multiplies the threshold
    max_factor: float = 4.0  # bound on the product

    def __post_init__(self) -> None:
        if self.topic is not None and self.topic == self.feedback_topic:
            raise ValueError("control.topic and control.feedback_topic must differ")
        if self.poll_seconds <= 0:
            raise ValueError("control.poll_seconds must be > 0")
        if not 1.0 <= self.false_positive_factor <= self.max_factor:
            raise ValueError("control: 1 <= false_positive_factor <= max_factor")


class ShadowSettings(_Section, frozen=True):
    """Shadow scoring of the registry's `candidate` (the rule: streamer/shadow.py)."""

    min_events: int = 50_000  # events both models score before the rule decides
    max_rate_ratio: float = 2.0  # promote when the alert rates are within this factor
    auto_promote: bool = True  # false: report what the rule says, change nothing

    def __post_init__(self) -> None:
        if self.min_events < 1:
            raise ValueError("shadow.min_events must be >= 1")
        if self.max_rate_ratio < 1.0:
            raise ValueError("shadow.max_rate_ratio must be >= 1")


class DriftSettings(_Section, frozen=True):
    """Live distributions against the bundle's training ones (population stability index)."""

    window_events: int = 10_000  # the live distribution is that of the last N rows / scores

    def __post_init__(self) -> None:
        if self.window_events < 100:
            raise ValueError("drift.window_events must be >= 100")


class MetricsSettings(_Section, frozen=True):
    host: str = "127.0.0.1"
    port: int = 9108  # 0 picks a free port (tests)

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError("metrics.port must be in [0, 65535]")


MODEL_KINDS = ("dense", "lstm", "dense_window")
# The kinds whose input is each entity's last `window_length` rows (streamer/windows.py).
WINDOWED_KINDS = ("lstm", "dense_window")


class TrainingSettings(_Section, frozen=True):
    hidden_units: list[int] = msgspec.field(default_factory=lambda: [32, 16])
    bottleneck: int = 4
    epochs: int = 40
    batch_size: int = 256
    validation_split: float = 0.15
    patience: int = 4
    learning_rate: float = 1e-3
    seed: int = 7
    # "dense": one event's features in, the same out. "lstm": an entity's last
    # `window_length` events in (training/models.py: build_lstm_autoencoder).
    # "dense_window": the same windows flattened into a dense autoencoder with hidden_units
    # and bottleneck (build_dense_window_autoencoder).
    model: Literal["dense", "lstm", "dense_window"] = "dense"
    window_length: int = 30
    # The model does not see what it scores; it predicts it. dense_window: the window's
    # last row (the event's own) is predicted from the rows before it, and the score is
    # that row's error alone. dense: the scored features are predicted from the context
    # ones (score_weights 0), e.g. a value from its hour of day. A forecast error says
    # whether a value follows from its context, where a plain autoencoder's error mostly
    # says whether it lies in the range it was trained on.
    forecast: bool = False
    # LSTM encoder sizes; the decoder mirrors them ([64, 32] -> 64-32-32-64).
    lstm_units: list[int] = msgspec.field(default_factory=lambda: [64, 32])
    # "standard": mean and standard deviation; "robust": median and IQR / 1.349, so a few
    # extreme rows in the history do not set every feature's scale (streamer/scaler.py).
    scaler: ScalerKind = "standard"
    # The most one feature's squared error (in scaled units: 16 = 4 standard deviations)
    # adds to an event's score; None: no cap. Written into the bundle, whose warm start is
    # scored the same way. A cap ranks a row where several features are off above one where
    # a single heavy-tailed feature is far off.
    error_cap: float | None = None
    # Feature-name patterns (fnmatch) -> weight of their errors in the score (others: 1).
    # Weight 0 makes a feature context: the model reads and rebuilds it, the score ignores
    # its error. Resolved against the spec's names at training and written into the bundle.
    score_weights: dict[str, float] = msgspec.field(default_factory=dict)
    # 0: the threshold's warm start is the bundle model's errors on its held-out rows
    # (validation_split of the history). k >= 2 ("dense" only): the out-of-fold errors of
    # every history row, from k more models trained side by side, each on all folds but
    # the row's. A warm start of every row, not a random few: its quantiles and
    # the likelihood's first mean and spread no longer hang on which rows the seed held out.
    warm_start_folds: int = 0

    def __post_init__(self) -> None:
        if self.warm_start_folds == 1 or self.warm_start_folds < 0:
            raise ValueError(
                f"training.warm_start_folds must be 0 or >= 2, not {self.warm_start_folds!r}"
            )
        if self.warm_start_folds and self.model != "dense":
            raise ValueError('training.warm_start_folds needs training.model = "dense"')
        if self.error_cap is not None and not self.error_cap > 0:
            raise ValueError(f"training.error_cap must be > 0, not {self.error_cap!r}")
        for pattern, weight in self.score_weights.items():
            if not weight >= 0:
                raise ValueError(
                    f"training.score_weights[{pattern!r}] must be >= 0, not {weight!r}"
                )
        if self.scaler not in SCALER_KINDS:
            raise ValueError(
                f"training.scaler must be one of {', '.join(map(repr, SCALER_KINDS))}, "
                f"not {self.scaler!r}"
            )
        if not self.hidden_units or min(self.hidden_units) < 1 or self.bottleneck < 1:
            raise ValueError("training.hidden_units and training.bottleneck must be >= 1")
        if not 0.0 < self.validation_split < 0.5:
            raise ValueError("training.validation_split must be in (0, 0.5)")
        if self.epochs < 1 or self.batch_size < 1:
            raise ValueError("training.epochs and training.batch_size must be >= 1")
        # msgspec checks the Literal when decoding a config, not when built in Python.
        if self.model not in MODEL_KINDS:
            raise ValueError(
                f"training.model must be one of {', '.join(map(repr, MODEL_KINDS))}, "
                f"not {self.model!r}"
            )
        if self.window_length < 2:
            raise ValueError("training.window_length must be >= 2")
        if self.forecast and self.model == "lstm":
            raise ValueError('training.forecast needs training.model = "dense_window" or "dense"')
        if self.forecast and self.model == "dense" and 0 not in self.score_weights.values():
            raise ValueError(
                'training.forecast with training.model = "dense" needs training.score_weights '
                "that make some features context (weight 0): the model predicts the others "
                "from them"
            )
        if not self.lstm_units or min(self.lstm_units) < 1:
            raise ValueError("training.lstm_units must be a non-empty list of sizes >= 1")


class Settings(_Section, frozen=True):
    kafka: KafkaSettings
    model: ModelSettings
    profile: str | None = None
    features: FeatureSpec | None = None
    batch: BatchSettings = msgspec.field(default_factory=BatchSettings)
    threshold: ThresholdSettings = msgspec.field(default_factory=ThresholdSettings)
    # Score smoothing and alert shaping around the threshold (streamer/smoothing.py:
    # ewma_alpha, mean_rows, likelihood, two_sided, frozen, margin, min_consecutive,
    # once_per_run, cooldown_rows, learn_in_cooldown). Absent: none. Its state is one over
    # the stream in the order this replica scores it (a single-source feed: one sensor, one
    # pump), or with threshold.per_entity = true one per entity (interleaved entities).
    smoothing: SmoothingSettings | None = None
    state: StateSettings = msgspec.field(default_factory=StateSettings)
    incidents: IncidentSettings = msgspec.field(default_factory=IncidentSettings)
    control: ControlSettings = msgspec.field(default_factory=ControlSettings)
    drift: DriftSettings = msgspec.field(default_factory=DriftSettings)
    shadow: ShadowSettings = msgspec.field(default_factory=ShadowSettings)
    alerts: AlertSettings = msgspec.field(default_factory=AlertSettings)
    metrics: MetricsSettings = msgspec.field(default_factory=MetricsSettings)
    training: TrainingSettings = msgspec.field(default_factory=TrainingSettings)
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"

    def __post_init__(self) -> None:
        if (self.profile is None) == (self.features is None):
            raise ValueError("set exactly one of `profile` (built-in) and a `[features]` table")
        if self.profile is not None and self.profile not in BUILTIN:
            raise ValueError(f"profile {self.profile!r} is not one of {sorted(BUILTIN)}")
        check_smoothing(self.threshold, self.smoothing)

    @property
    def spec(self) -> FeatureSpec:
        if self.features is not None:
            return self.features
        assert self.profile is not None
        return BUILTIN[self.profile]


def check_smoothing(threshold: ThresholdSettings, smoothing: SmoothingSettings | None) -> None:
    """Refuse smoothing where it cannot work (ValueError naming the field); the daemon's
    Settings and the evaluator's detectors both check with this."""
    if smoothing is None:
        return
    # threshold.per_entity = true: one SmoothedThreshold per entity (entity_window_size,
    # entity_min_samples), each from the bundle's warm start (streamer/entity_smoothing.py).
    if smoothing.learn_in_cooldown and not threshold.learn:
        raise ValueError("smoothing.learn_in_cooldown needs threshold.learn = true")


def read_toml(path: Path) -> dict[str, Any]:
    """A TOML file as a dict; ConfigError when it is missing or malformed."""
    try:
        return tomllib.loads(path.read_text())
    except FileNotFoundError as exc:
        raise ConfigError(f"config file {path} does not exist") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from exc


def load(path: str | Path, environ: Mapping[str, str] | None = None) -> Settings:
    """Read, merge environment overrides, validate. Raises ConfigError naming the field."""
    path = Path(path)
    raw = read_toml(path)
    return from_mapping(raw, os.environ if environ is None else environ, source=str(path))


def from_mapping(
    raw: dict[str, Any], environ: Mapping[str, str] | None = None, source: str = "config"
) -> Settings:
    merged = _apply_env(raw, environ or {})
    try:
        return msgspec.convert(merged, Settings)
    except msgspec.ValidationError as exc:
        raise ConfigError(f"{source}: {exc}") from exc


def _apply_env(raw: dict[str, Any], environ: Mapping[str, str]) -> dict[str, Any]:
    merged = {k: dict(v) if isinstance(v, dict) else v for k, v in raw.items()}
    for name, value in environ.items():
        if not name.startswith(ENV_PREFIX):
            continue
        path = name[len(ENV_PREFIX) :].lower().split("__")
        node = merged
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"{name}: {part} is not a section")
        node[path[-1]] = _parse_value(value)
    return merged


def _parse_value(text: str) -> Any:
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text
