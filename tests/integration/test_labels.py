"""Label feedback on the real broker: a `label` message changes the label_rate feature, and the
decisions, for that terminal's later events only; a redelivered label counts once; the
feedback topic's retention covers the labels' horizon."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path

import msgspec
import numpy as np
import pytest
from kafka.admin import KafkaAdminClient, NewTopic

from streamer import kafka_io, retention
from streamer.config import KafkaSettings, TrainingSettings
from streamer.features import FeatureSpec, LabelRate, Log1p
from tests.integration.conftest import Daemon, Topics, produce, read_topic, write_config
from training.datasets import from_events
from training.fit import fit_bundle

pytestmark = pytest.mark.integration

HOUR, DAY = 3600.0, 86400.0
SPEC = FeatureSpec(
    profile="cards", entity_field="customer_id", time_field="ts", time_format="epoch_s",
    id_field="transaction_id",
    columns=[Log1p(field="amount"),
             LabelRate(key="terminal_id", windows_seconds=[DAY], delay_seconds=HOUR,
                       stats=["rate"])],
)  # fmt: skip
RATE = "terminal_id.label_rate(1d,-1h)"
T0 = 1_700_000_000.0 - 1_700_000_000.0 % DAY  # a day boundary, after the training history


def train(root: Path) -> Path:
    """A small bundle: 20 terminals over 10 days, 2% of transactions fraud at random, so a
    terminal's confirmed share stays small; a share of 1 is something it never saw."""
    rng = np.random.default_rng(5)
    n = 6000
    Event = SPEC.event_type()
    times = np.sort(rng.uniform(T0 - 10 * DAY, T0 - DAY, n))
    events = [
        Event(transaction_id=f"h{k}", customer_id=f"c{rng.integers(300)}",
              terminal_id=f"T{rng.integers(20)}", ts=float(t), amount=float(rng.uniform(5, 60)))
        for k, t in enumerate(times)
    ]  # fmt: skip
    labels = (rng.random(n) < 0.02).astype(np.int8)
    history = from_events(SPEC, events, labels, HOUR)
    settings = TrainingSettings(hidden_units=[8], bottleneck=1, epochs=15, patience=3, seed=3)
    fit_bundle(SPEC, history, settings, root / "registry", source="cards")
    return root / "registry"


def config(path: Path, bootstrap: str, topics: Topics, registry: Path, feedback: str) -> int:
    features = "\n".join(f"{k} = {json.dumps(v)}" for k, v in msgspec.to_builtins(SPEC).items()
                         if k != "columns" and v is not None)  # fmt: skip
    columns = ", ".join(
        "{ " + ", ".join(f"{k} = {json.dumps(v)}" for k, v in c.items()) + " }"
        for c in msgspec.to_builtins(SPEC.columns)
    )
    features += f"\ncolumns = [{columns}]"
    return write_config(
        path, bootstrap, topics, registry, batch_size=100, wait_seconds=0.1, profile=None,
        extra=f"""
[threshold]
quantile = 0.99
learn = false
[control]
feedback_topic = "{feedback}"
poll_seconds = 0.2
[features]
{features}
""",
    )  # fmt: skip


def transactions(terminal: str, start: float, count: int) -> list[dict[str, object]]:
    return [
        {"transaction_id": f"{terminal}@{start:.0f}+{k}", "customer_id": f"c-{terminal}-{k}",
         "terminal_id": terminal, "ts": start + 60.0 * k, "amount": 20.0 + k % 7}
        for k in range(count)
    ]  # fmt: skip


def test_label_message_raises_the_rate_for_that_terminal_only(
    kafka_bootstrap: str,
    topics: Topics,
    unique: Callable[[str], str],
    tmp_path: Path,
) -> None:
    registry = train(tmp_path)
    feedback = unique("feedback")
    port = config(tmp_path / "d.toml", kafka_bootstrap, topics, registry, feedback)
    daemon = Daemon(tmp_path / "d.toml", port, tmp_path / "d.log")
    try:
        daemon.wait_ready()
        first = transactions("T-bad", T0, 20) + transactions("T-good", T0, 20)
        encode = msgspec.json.encode
        produce(kafka_bootstrap, topics.input, [encode(e) for e in first])
        daemon.wait_metric("anomaly_events_consumed_total", len(first))

        # Investigators confirm every T-bad transaction of that hour as fraud, and each
        # label arrives twice (a retrying producer): the second is a duplicate.
        labels = [
            {"type": "label", "key_field": "terminal_id", "key": "T-bad",
             "event_id": e["transaction_id"], "event_time": e["ts"], "anomaly": True}
            for e in first if e["terminal_id"] == "T-bad"
        ]  # fmt: skip
        produce(kafka_bootstrap, feedback, [encode(m) for m in labels + labels])
        daemon.wait_metric(
            "anomaly_feedback_total", 20, timeout=60, type="label", outcome="duplicate"
        )
        assert daemon.metric("anomaly_feedback_total", type="label", outcome="applied") == 20

        later = transactions("T-bad", T0 + 2 * HOUR, 10) + transactions("T-good", T0 + 2 * HOUR, 10)
        produce(kafka_bootstrap, topics.input, [encode(e) for e in later])
        daemon.wait_metric("anomaly_events_consumed_total", len(first) + len(later))
        assert daemon.stop() == 0
    finally:
        daemon.kill()

    alerts = [json.loads(r.value) for r in read_topic(kafka_bootstrap, topics.alerts)]
    alerts = [a for a in alerts if a["type"] == "alert"]
    by_terminal: dict[tuple[str, bool], list[dict]] = {}
    for a in alerts:
        terminal, _ = a["entity"].split("-", 1)[1].rsplit("-", 1)
        late = a["event_time"] >= "2023-11-14T02"  # T0 + 2h and later
        by_terminal.setdefault((terminal, late), []).append(a)
    assert len(by_terminal.get(("T-bad", True), [])) == 10, alerts  # every later T-bad event
    for a in by_terminal[("T-bad", True)]:
        rate = next(f for f in a["top_features"] if f["feature"] == RATE)
        assert rate["actual"] == 1.0
    assert not by_terminal.get(("T-bad", False)) and not by_terminal.get(("T-good", True))


def test_the_feedback_topic_keeps_labels_as_long_as_they_matter(
    kafka_bootstrap: str,
    topics: Topics,
    unique: Callable[[str], str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Created by the daemon, the feedback topic keeps messages the labels' horizon plus a
    margin, limited by time alone; an existing one that keeps them less, limits them by size
    or compacts them is named in a warning for each, and the start goes on."""
    k = KafkaSettings(
        bootstrap_servers=kafka_bootstrap, input_topic=topics.input,
        alert_topic=topics.alerts, dead_letter_topic=topics.dead_letters,
    )  # fmt: skip
    horizon = SPEC.label_reach_seconds
    created, short, forever = unique("fb-new"), unique("fb-week"), unique("fb-forever")
    sized, compacted = unique("fb-sized"), unique("fb-compacted")
    admin = KafkaAdminClient(bootstrap_servers=kafka_bootstrap)

    def warnings() -> list[str]:  # the daemon's own; kafka-python warns of slow polls under load
        return [
            r.getMessage()
            for r in caplog.records
            if r.levelname == "WARNING" and r.name == "streamer.kafka_io"
        ]

    try:
        admin.create_topics(
            [NewTopic(short, 1, 1, topic_configs={"retention.ms": str(int(DAY * 1000))}),
             NewTopic(forever, 1, 1, topic_configs={"retention.ms": "-1"}),
             NewTopic(sized, 1, 1, topic_configs={"retention.ms": "-1",
                                                  "retention.bytes": "1048576"}),
             NewTopic(compacted, 1, 1, topic_configs={"retention.ms": "-1",
                                                      "cleanup.policy": "compact,delete"})],
            wait_for_metadata=True,
        )  # fmt: skip
        with caplog.at_level(logging.INFO, logger="streamer.kafka_io"):
            kafka_io.prepare_topics(k, [created], (created, horizon))
            assert kafka_io.topic_retention(admin, created) == retention.Retention(
                retention.feedback_retention_ms(horizon), -1, "delete"
            )
            caplog.clear()
            kafka_io.prepare_topics(k, [short], (short, horizon))
            (warning,) = warnings()
            assert repr(short) in warning and "retention.ms=86400000" in warning
            caplog.clear()
            kafka_io.prepare_topics(k, [forever], (forever, horizon))
            assert not warnings()
            assert "keeps labels forever" in caplog.text
            caplog.clear()
            kafka_io.prepare_topics(k, [sized], (sized, horizon))
            (warning,) = warnings()
            assert repr(sized) in warning and "retention.bytes=1048576" in warning
            caplog.clear()
            kafka_io.prepare_topics(k, [compacted], (compacted, horizon))
            (warning,) = warnings()
            assert repr(compacted) in warning and "cleanup.policy=compact,delete" in warning
            # The broker's own defaults (nothing set on the topic) are read too.
            defaults = kafka_io.topic_retention(admin, topics.input)
            assert defaults is not None and defaults.retention_ms is not None
            assert defaults.retention_bytes == -1 and defaults.cleanup_policy == "delete"
    finally:
        admin.delete_topics([created, short, forever, sized, compacted], raise_errors=False)
        admin.close()
