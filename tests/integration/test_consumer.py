"""The daemon's kafka-python consumer joins its group with the topic's partitions known."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

import pytest

from streamer.config import KafkaSettings
from streamer.kafka_io import make_consumer
from tests.integration.conftest import Topics, create_topics


def join_at_once(bootstrap: str, unique: Callable[[str], str]) -> dict[str, float]:
    """Create a topic, then subscribe three consumers in two groups to it at once (as the
    integration tests' daemons do); seconds until each has partitions (inf: none in 30 s)."""
    topics = Topics(unique("in"), unique("alerts"), unique("dlq"), unique("group"))
    create_topics(bootstrap, topics)
    waited: dict[str, float] = {}

    def join(name: str, group: str) -> None:
        consumer = make_consumer(
            KafkaSettings(
                input_topic=topics.input, alert_topic=topics.alerts,
                dead_letter_topic=topics.dead_letters, bootstrap_servers=bootstrap,
                group_id=group, session_timeout_ms=6000,
            )
        )  # fmt: skip
        try:
            consumer.subscribe([topics.input])
            started = time.monotonic()
            while not consumer.assignment() and time.monotonic() - started < 30:
                consumer.poll(timeout_ms=100)
            waited[name] = time.monotonic() - started if consumer.assignment() else float("inf")
        finally:
            consumer.close()

    joins = [
        threading.Thread(target=join, args=(name, topics.group + suffix))
        for name, suffix in (("alone", "-a"), ("first", "-b"), ("second", "-b"))
    ]
    for t in joins:
        t.start()
    for t in joins:
        t.join(60)
    return waited


def test_consumers_started_with_a_new_topic_are_assigned_at_once(
    kafka_bootstrap: str, unique: Callable[[str], str], caplog: pytest.LogCaptureFixture
) -> None:
    """None is left to a rebalance by a join that raced the topic's metadata ("No partition
    metadata for topic", then assigned nothing): the race of CI's stuck daemons."""
    # A fresh broker first creates its offsets topic, which slows the first joins enough to
    # hide the race; a broker that has served groups (CI's, mid-session) answers at once.
    join_at_once(kafka_bootstrap, unique)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="kafka.coordinator"):
        waited = join_at_once(kafka_bootstrap, lambda prefix: unique(prefix) + "-2")
    assert not [r for r in caplog.records if "No partition metadata" in r.getMessage()]
    assert len(waited) == 3 and max(waited.values()) < 3.0, waited
