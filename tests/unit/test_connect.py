"""Detector._connect's retries: a client made by an attempt that fails is closed before the
next attempt makes another (no consumer, with its sockets, threads or group membership, left
behind per retry)."""

from __future__ import annotations

from typing import Any, ClassVar

import pytest
from kafka.errors import KafkaConnectionError, KafkaTimeoutError

from streamer import app, confluent_io, kafka_io
from streamer.config import Settings, from_mapping

ATTEMPTS = 3
TopicFollower = kafka_io.TopicFollower  # the real one (the fixture fakes it for the daemon)


def settings(**kafka: object) -> Settings:
    return from_mapping(
        {
            "profile": "orders",
            "kafka": {"input_topic": "i", "alert_topic": "a", "dead_letter_topic": "d", **kafka},
            "model": {"bundle": "b"},
            "control": {"topic": "ctl", "feedback_topic": "fb"},
        }
    )


class FakeFollower:
    """A control-topic reader whose start-up read times out the first `failures` times."""

    made: ClassVar[list[FakeFollower]] = []
    failures = ATTEMPTS

    def __init__(self, kafka: Any, topics: Any) -> None:
        self.closed = 0
        FakeFollower.made.append(self)

    def catch_up(self, timeout_seconds: float) -> list[Any]:
        if len(FakeFollower.made) <= FakeFollower.failures:
            raise KafkaTimeoutError(f"control topics not read to their end in {timeout_seconds}s")
        return []

    def poll(self, timeout_ms: int = 0) -> list[Any]:
        return []

    def close(self) -> None:
        self.closed += 1


class FakeConsumer:
    """A group consumer of either client (made through kafka_io.make_consumer)."""

    made: ClassVar[list[FakeConsumer]] = []

    def __init__(self, *args: Any, **options: Any) -> None:
        self.closed = 0
        self.subscribed: list[str] = []
        FakeConsumer.made.append(self)

    def subscribe(self, topics: list[str], listener: Any) -> None:
        self.subscribed = topics

    def close(self, autocommit: bool = False) -> None:
        self.closed += 1


class FakeOutbox:
    def prepare(self) -> None:
        pass


@pytest.fixture(autouse=True)
def fakes(monkeypatch: pytest.MonkeyPatch) -> None:
    FakeFollower.made, FakeFollower.failures, FakeConsumer.made = [], ATTEMPTS, []
    monkeypatch.setattr(kafka_io, "prepare_topics", lambda *args, **kwargs: None)
    monkeypatch.setattr(kafka_io, "TopicFollower", FakeFollower)
    monkeypatch.setattr(kafka_io, "Consumer", FakeConsumer)
    monkeypatch.setattr(confluent_io, "Consumer", FakeConsumer)
    monkeypatch.setattr(app, "make_outbox", lambda kafka, consumer: FakeOutbox())


def give_up_after(d: app.Detector, attempts: int) -> list[str]:
    """Replace the back-off wait: record why, and stop the daemon after `attempts` failures."""
    failures: list[str] = []

    def wait(why: str) -> None:
        failures.append(why)
        d.should_exit = len(failures) >= attempts

    d._wait_after_failure = wait  # type: ignore[method-assign]
    return failures


def test_a_reader_that_times_out_is_closed_before_each_retry() -> None:
    detector = app.Detector(settings())
    failures = give_up_after(detector, ATTEMPTS)
    detector._connect()
    assert len(failures) == ATTEMPTS and "not read to their end" in failures[0]
    assert [f.closed for f in FakeFollower.made] == [1] * ATTEMPTS
    assert detector._follower is None and not FakeConsumer.made


def test_the_reader_that_catches_up_is_kept_open() -> None:
    detector = app.Detector(settings())
    FakeFollower.failures = 2
    failures = give_up_after(detector, ATTEMPTS + 1)
    detector._connect()
    assert len(failures) == 2
    assert [f.closed for f in FakeFollower.made] == [1, 1, 0]
    assert detector._follower is FakeFollower.made[-1]
    (consumer,) = FakeConsumer.made
    assert consumer.subscribed == ["i"] and not consumer.closed


@pytest.mark.parametrize("client", ["kafka-python", "confluent"])
def test_a_group_consumer_whose_producer_fails_is_closed_before_each_retry(
    monkeypatch: pytest.MonkeyPatch, client: str
) -> None:
    FakeFollower.failures = 0
    d = app.Detector(settings(client=client))

    def no_producer(kafka: Any, consumer: Any) -> FakeOutbox:
        raise KafkaConnectionError()

    monkeypatch.setattr(app, "make_outbox", no_producer)
    give_up_after(d, ATTEMPTS)
    d._connect()
    assert [c.closed for c in FakeConsumer.made] == [1] * ATTEMPTS
    assert d._consumer is None and d._outbox is None


class FakeKafkaConsumer:
    """kafka-python's KafkaConsumer, whose metadata never lists the topic's partitions."""

    made: ClassVar[list[FakeKafkaConsumer]] = []

    def __init__(self, **options: Any) -> None:
        self.closed = 0
        FakeKafkaConsumer.made.append(self)

    def partitions_for_topic(self, topic: str) -> set[int] | None:
        if topic == "slow":
            raise KafkaTimeoutError("metadata")
        return None if topic == "unknown" else {0}

    def close(self, autocommit: bool = True) -> None:
        self.closed += 1


@pytest.mark.parametrize("topic", ["unknown", "slow"])
def test_a_reader_that_cannot_start_closes_its_consumer(
    monkeypatch: pytest.MonkeyPatch, topic: str
) -> None:
    FakeKafkaConsumer.made = []
    monkeypatch.setattr(kafka_io, "KafkaConsumer", FakeKafkaConsumer)
    with pytest.raises((KafkaTimeoutError, kafka_io.UnknownTopicOrPartitionError)):
        TopicFollower(settings().kafka, ["ctl", topic])
    assert [c.closed for c in FakeKafkaConsumer.made] == [1]


def test_the_feedback_topic_is_prepared_with_the_label_horizon_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With label_rate columns the feedback topic is created (or checked) with the labels'
    horizon; a retry, or a replaced consumer, does not check it again."""
    prepared: list[Any] = []
    monkeypatch.setattr(kafka_io, "prepare_topics", lambda *args: prepared.append(args[1:]))
    columns = [
        {"kind": "log1p", "field": "amount"},
        {"kind": "label_rate", "key": "shop", "windows_seconds": [86400, 2592000],
         "delay_seconds": 604800},
    ]  # fmt: skip
    features = {
        "profile": "p",
        "entity_field": "card",
        "time_field": "ts",
        "id_field": "tx",
        "columns": columns,
    }
    d = app.Detector(
        from_mapping(
            {"features": features, "kafka": {"input_topic": "i", "alert_topic": "a",
             "dead_letter_topic": "d"}, "model": {"bundle": "b"},
             "control": {"feedback_topic": "fb"}}
        )
    )  # fmt: skip
    FakeFollower.failures = 1
    give_up_after(d, ATTEMPTS)
    d._connect()
    horizon = 37 * 86400.0 + 3600.0
    assert prepared == [(["fb"], ("fb", horizon)), (["fb"], None)]
    assert app.Detector(settings())._feedback_horizon is None  # no label_rate column
