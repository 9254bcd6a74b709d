"""The confluent-kafka client's translations: settings into librdkafka's names, errors into
kafka-python's types (the daemon's retry, rebalance and fencing rules read those)."""

from __future__ import annotations

import logging

import confluent_kafka as ck
import pytest
from kafka import TopicPartition
from kafka.errors import CommitFailedError, KafkaError, KafkaTimeoutError, ProducerFencedError
from kafka.structs import OffsetAndMetadata

from streamer import confluent_io, kafka_io
from streamer.config import KafkaSettings

TOPICS = {"input_topic": "in", "alert_topic": "alerts", "dead_letter_topic": "dlq"}


def settings(**options: object) -> KafkaSettings:
    return KafkaSettings(**TOPICS, **options)  # type: ignore[arg-type]


def test_settings_map_to_librdkafka_names() -> None:
    conf = confluent_io.common_config(
        settings(
            bootstrap_servers=["a:9092", "b:9092"],
            security_protocol="SASL_SSL",
            sasl_mechanism="SCRAM-SHA-512",
            sasl_plain_username="u",
            sasl_plain_password="p",
            ssl_cafile="ca.pem",
            ssl_check_hostname=False,
        )
    )
    assert conf["bootstrap.servers"] == "a:9092,b:9092"
    assert conf["security.protocol"] == "SASL_SSL"
    assert (conf["sasl.mechanism"], conf["sasl.username"], conf["sasl.password"]) == (
        "SCRAM-SHA-512", "u", "p",
    )  # fmt: skip
    assert conf["ssl.ca.location"] == "ca.pem"
    assert conf["ssl.endpoint.identification.algorithm"] == "none"
    assert "ssl.certificate.location" not in conf  # unset options are left to librdkafka
    plain = confluent_io.common_config(settings())
    assert "ssl.endpoint.identification.algorithm" not in plain


@pytest.mark.parametrize(
    ("code", "kind"),
    [
        (ck.KafkaError.ILLEGAL_GENERATION, CommitFailedError),
        (ck.KafkaError.UNKNOWN_MEMBER_ID, CommitFailedError),
        (ck.KafkaError.REBALANCE_IN_PROGRESS, CommitFailedError),
        (ck.KafkaError.PRODUCER_FENCED, ProducerFencedError),
        (ck.KafkaError._FENCED, ProducerFencedError),
        (ck.KafkaError._TIMED_OUT, KafkaTimeoutError),
        (ck.KafkaError._TRANSPORT, KafkaError),
    ],
)
def test_errors_become_the_kafka_python_types_the_daemon_handles(code: int, kind: type) -> None:
    error = confluent_io.translate(ck.KafkaException(ck.KafkaError(code)), "commit")
    assert type(error) is kind
    assert "commit: " in str(error)


def test_producers_carry_the_delivery_guarantee() -> None:
    k = settings(producer_acks="1", client="confluent")
    plain = kafka_io.make_producer(k)
    assert isinstance(plain, confluent_io.Producer)
    eos = confluent_io.make_producer(k, transactional=True, transactional_id="t-1")
    assert isinstance(eos, confluent_io.Producer)


def test_a_send_to_nowhere_fails_at_the_flush_not_silently() -> None:
    # Nothing listens on this port: the record cannot be delivered within the timeout.
    k = settings(bootstrap_servers="127.0.0.1:9", delivery_timeout_seconds=1.0, client="confluent")
    producer = kafka_io.make_producer(k)
    sent = producer.send("in", key=b"k", value=b"v")
    with pytest.raises(KafkaTimeoutError):
        producer.flush(timeout=0.5)
    producer.close(timeout=0)
    assert not sent.failed() or isinstance(sent.exception, KafkaError)


def test_offsets_keep_their_partitions() -> None:
    offsets = {TopicPartition("in", 3): OffsetAndMetadata(42, "", -1)}
    (part,) = confluent_io._offsets(offsets)
    assert (part.topic, part.partition, part.offset) == ("in", 3, 42)


def test_library_log_says_each_line_once_per_interval(caplog: pytest.LogCaptureFixture) -> None:
    library = confluent_io.LibraryLog("consumer")
    with caplog.at_level("INFO", logger="streamer.confluent_io"):
        for ms in range(5):  # a reconnect loop: the same line, only the numbers change
            library.log(logging.ERROR, f"Connect to 127.0.0.1:9 failed (after {ms}ms)")
        library.log(logging.WARNING, "1/1 brokers are down")
    assert [r.getMessage() for r in caplog.records] == [
        "consumer: Connect to 127.0.0.1:9 failed (after 0ms)",
        "consumer: 1/1 brokers are down",
    ]
