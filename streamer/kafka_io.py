"""Kafka at the edges: topics, the consumer, the producer, and record conversions.

kafka-python by default; with `kafka.client = "confluent"` the daemon's consumer and producer
are confluent-kafka's (streamer/confluent_io.py), behind the same surface (`GroupConsumer`).
"""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Iterable, Sequence
from typing import Any, Protocol

from kafka import ConsumerRebalanceListener, KafkaConsumer, KafkaProducer, TopicPartition
from kafka.admin import ConfigResource, ConfigResourceType, KafkaAdminClient, NewTopic
from kafka.errors import (
    KafkaError,
    KafkaTimeoutError,
    TopicAlreadyExistsError,
    UnknownTopicOrPartitionError,
)
from kafka.structs import OffsetAndMetadata

from streamer.config import KafkaSettings
from streamer.records import DeadLetter, RawMessage
from streamer.retention import (
    FEEDBACK_TOPIC_CONFIG,
    Retention,
    days,
    feedback_retention_ms,
    retention_warnings,
)

log = logging.getLogger(__name__)


class StartupError(Exception):
    """Kafka is not in a state the daemon can start in; the message says what to fix."""


class ConsumerBroken(KafkaError):
    """The consumer cannot go on (a fatal librdkafka error, e.g. fenced as a static member):
    the daemon replaces it, and the new one replays what was not committed."""


SECURITY_OPTIONS = (
    "security_protocol", "ssl_cafile", "ssl_certfile", "ssl_keyfile", "ssl_password",
    "ssl_check_hostname", "sasl_mechanism", "sasl_plain_username", "sasl_plain_password",
)  # fmt: skip


def common_options(kafka: KafkaSettings) -> dict[str, Any]:
    options: dict[str, Any] = {
        "bootstrap_servers": kafka.servers,
        "client_id": kafka.client_id,
        "request_timeout_ms": kafka.request_timeout_ms,
        "reconnect_backoff_max_ms": kafka.reconnect_backoff_max_ms,
    }
    for name in SECURITY_OPTIONS:
        value = getattr(kafka, name)
        if value is not None:
            options[name] = value
    return options


def transactional_id(kafka: KafkaSettings) -> str:
    return kafka.transactional_id or f"{kafka.group_id}-{socket.gethostname()}"


def topic_retention(admin: KafkaAdminClient, topic: str) -> Retention | None:
    """A topic's retention.ms, retention.bytes and cleanup.policy as the broker applies them
    (its own, or the broker's defaults); None when the broker says none of them (no such
    topic, or not allowed to describe it)."""
    names = ["retention.ms", "retention.bytes", "cleanup.policy"]
    resource = ConfigResource(ConfigResourceType.TOPIC, topic, names)
    described = admin.describe_configs([resource], config_filter="all")
    entries = described.get("topic", {}).get(topic, {})
    values = {}
    for name in names:
        entry = entries.get(name)
        values[name] = entry.get("value") if isinstance(entry, dict) else None
    if all(v is None for v in values.values()):
        return None
    ms, size, policy = (values[n] for n in names)
    return Retention(
        retention_ms=None if ms is None else int(ms),
        retention_bytes=None if size is None else int(size),
        cleanup_policy=None if policy is None else str(policy),
    )


def check_retention(admin: KafkaAdminClient, topic: str, label_horizon_seconds: float) -> None:
    """Log a warning for each way the feedback topic loses labels a restarted replica needs;
    never stops the start (the features only differ, and an operator may know better)."""
    try:
        retention = topic_retention(admin, topic)
    except (KafkaError, KeyError, TypeError, ValueError) as exc:
        log.warning("feedback topic %r: retention not checked: %s", topic, exc)
        return
    if retention is None or retention.retention_ms is None:
        log.warning("feedback topic %r: retention.ms not checked: the broker did not say", topic)
    if retention is None:
        return
    warnings = retention_warnings(topic, retention, label_horizon_seconds)
    for warning in warnings:
        log.warning("%s", warning)
    if not warnings and retention.retention_ms is not None:
        retention_ms = retention.retention_ms
        log.info(
            "feedback topic %r keeps labels %s, for a label horizon of %s", topic,
            "forever" if retention_ms < 0 else days(retention_ms),
            days(label_horizon_seconds * 1000),
        )  # fmt: skip


def prepare_topics(
    kafka: KafkaSettings,
    side_topics: Sequence[str] = (),
    feedback: tuple[str, float] | None = None,
) -> None:
    """Check the input topic exists; create the alert and dead-letter topics, and the
    `side_topics` (control, feedback: one partition, so their messages stay in order), if
    allowed.

    `feedback`: the feedback topic and its labels' horizon in seconds (how old a label can be
    and still change a feature), when the spec has label_rate columns. That topic is created
    keeping messages that long plus a margin, or, if it exists, its retention is checked.
    """
    admin = KafkaAdminClient(**common_options(kafka))
    try:
        existing = set(admin.list_topics())
        if kafka.input_topic not in existing:
            raise StartupError(
                f"kafka.input_topic: topic {kafka.input_topic!r} does not exist on "
                f"{','.join(kafka.servers)}"
            )
        wanted = [kafka.alert_topic, kafka.dead_letter_topic, *side_topics]
        missing = [t for t in wanted if t not in existing]
        if missing and not kafka.create_output_topics:
            raise StartupError(
                f"kafka: topic(s) {missing} do not exist and kafka.create_output_topics is false"
            )
        configs: dict[str, dict[str, str]] = {}
        if feedback:  # kept as long as its labels matter, whatever the broker's default
            configs[feedback[0]] = {
                "retention.ms": str(feedback_retention_ms(feedback[1])),
                **FEEDBACK_TOPIC_CONFIG,
            }
        if missing:
            new = [
                NewTopic(
                    t,
                    1 if t in side_topics else kafka.output_topic_partitions,
                    1,
                    topic_configs=configs.get(t),
                )
                for t in missing
            ]
            try:
                admin.create_topics(new, wait_for_metadata=True)
                log.info(
                    "created topics %s%s", missing,
                    "".join(f"; {t} with {c}" for t, c in configs.items() if t in missing),
                )  # fmt: skip
            except TopicAlreadyExistsError:
                pass  # another replica of this group created them first
        if feedback and feedback[0] in existing:
            check_retention(admin, *feedback)
    finally:
        admin.close()


class GroupConsumer(Protocol):
    """What the daemon asks of its group consumer, whichever client serves it."""

    def subscribe(self, topics: Sequence[str], listener: ConsumerRebalanceListener) -> None: ...
    def poll_raw(
        self, timeout_ms: int, max_records: int
    ) -> dict[TopicPartition, list[RawMessage]]: ...
    def assignment(self) -> set[TopicPartition]: ...
    def seek(self, tp: TopicPartition, offset: int) -> None: ...
    def seek_to_beginning(self, tp: TopicPartition) -> None: ...
    def seek_to_end(self, tp: TopicPartition) -> None: ...
    def committed(self, tp: TopicPartition) -> int | None: ...
    def position(self, tp: TopicPartition) -> int: ...
    def lag(self) -> dict[TopicPartition, int]: ...
    def coordinator_in_touch(self, within_seconds: float = 10.0) -> bool: ...
    def topics(self) -> set[str]: ...
    def commit(self, offsets: dict[TopicPartition, OffsetAndMetadata]) -> None: ...
    def group_metadata(self) -> Any: ...
    def close(self, autocommit: bool = False) -> None: ...


class Consumer(KafkaConsumer):  # type: ignore[misc]
    """kafka-python's consumer plus the few calls the daemon makes of either client."""

    def subscribe(
        self, topics: Sequence[str] = (), pattern: str | None = None, listener: Any = None
    ) -> None:
        """KafkaConsumer.subscribe, then the topics' metadata fetched before the first poll.

        kafka-python joins the group at the first poll, and a leader whose metadata does not
        list the topic's partitions yet assigns nothing ("No partition metadata for topic")
        and relies on a rejoin once the metadata arrives (KAFKA-3949; kafka-python refreshes
        first only for pattern subscriptions). Usually that costs a few seconds; twice in CI
        a member stayed without partitions for good, each time after that warning. After
        subscribing, not before: fetched before, the SIGTERM integration test committed
        4,000 of 6,050 events consumed, as after a needless rebalance (presumably the
        group's snapshot of its topics' metadata, taken at subscribe, then differs from the
        next refresh).
        """
        super().subscribe(topics=topics, pattern=pattern, listener=listener)
        for topic in topics:
            self.partitions_for_topic(topic)  # one metadata request where not cached

    def poll_raw(self, timeout_ms: int, max_records: int) -> dict[TopicPartition, list[RawMessage]]:
        polled = self.poll(timeout_ms=timeout_ms, max_records=max_records)
        return {tp: to_raw(records) for tp, records in polled.items()}

    def lag(self) -> dict[TopicPartition, int]:
        """Lag per assigned partition, from the high watermarks the fetches already returned."""
        lag: dict[TopicPartition, int] = {}
        for tp in self.assignment():
            high = self.highwater(tp)
            if high is None:
                continue
            lag[tp] = max(0, high - self.position(tp))
        return lag

    def coordinator_in_touch(self, within_seconds: float = 10.0) -> bool:
        """True while the group coordinator answers heartbeats (sent every 3 s)."""
        group = self.metrics().get("consumer-coordinator-metrics", {})
        ago = group.get("last-heartbeat-seconds-ago")
        return ago is not None and bool(ago < within_seconds)


def make_consumer(kafka: KafkaSettings) -> GroupConsumer:
    if kafka.client == "confluent":
        from streamer import confluent_io  # optional dependency

        return confluent_io.Consumer(kafka)
    consumer: GroupConsumer = Consumer(
        **common_options(kafka),
        group_id=kafka.group_id,
        group_instance_id=kafka.group_instance_id,
        session_timeout_ms=kafka.session_timeout_ms,
        enable_auto_commit=False,  # offsets are committed only after alerts are flushed
        auto_offset_reset=kafka.auto_offset_reset,
        max_poll_records=kafka.max_poll_records,
        fetch_max_bytes=kafka.fetch_max_bytes,
        max_partition_fetch_bytes=kafka.max_partition_fetch_bytes,
        isolation_level="read_committed",
    )
    return consumer


def make_producer(kafka: KafkaSettings, transactional: bool = False) -> Any:
    """A KafkaProducer, or confluent_io.Producer (the same calls) with the confluent client."""
    if kafka.client == "confluent":
        from streamer import confluent_io  # optional dependency

        return confluent_io.make_producer(kafka, transactional, transactional_id(kafka))
    acks: int | str = "all" if kafka.producer_acks == "all" else int(kafka.producer_acks)
    # Idempotence (no duplicates from the producer's own retries) needs acks=all.
    extra: dict[str, Any] = {"enable_idempotence": acks == "all"}
    if transactional:
        # Transactions need idempotence, which needs acks=all.
        extra = {
            "transactional_id": transactional_id(kafka),
            "transaction_timeout_ms": kafka.transaction_timeout_ms,
            "enable_idempotence": True,
        }
        acks = "all"
    return KafkaProducer(
        **common_options(kafka),
        acks=acks,
        linger_ms=kafka.producer_linger_ms,
        batch_size=kafka.producer_batch_bytes,
        max_in_flight_requests_per_connection=5,
        **extra,
    )


def to_raw(records: Iterable[Any]) -> list[RawMessage]:
    return [
        RawMessage(r.topic, r.partition, r.offset, r.key, r.value, r.timestamp) for r in records
    ]


def dead_letter_headers(d: DeadLetter) -> list[tuple[str, bytes]]:
    m = d.message
    return [
        ("dlq.reason", d.reason.encode()),
        ("dlq.detail", d.detail.encode("utf-8", "replace")[:1000]),
        ("dlq.topic", m.topic.encode()),
        ("dlq.partition", str(m.partition).encode()),
        ("dlq.offset", str(m.offset).encode()),
        ("dlq.timestamp_ms", str(m.timestamp_ms).encode()),
    ]


def next_offsets(messages: Sequence[RawMessage]) -> dict[TopicPartition, OffsetAndMetadata]:
    """The offsets to commit after `messages`: one past the last message per partition."""
    last: dict[TopicPartition, int] = {}
    for m in messages:
        tp = TopicPartition(m.topic, m.partition)
        if m.offset >= last.get(tp, -1):
            last[tp] = m.offset
    return {tp: OffsetAndMetadata(off + 1, "", -1) for tp, off in last.items()}


def read_topic(
    bootstrap: str, topic: str, timeout_seconds: float = 60.0, read_committed: bool = False
) -> list[Any]:
    """Every record of `topic`, from the beginning up to its end when called (outside any
    group: nothing committed). The broker check and the tests read alert topics with it.

    Raises KafkaTimeoutError when the end is not reached within `timeout_seconds`.
    """
    consumer = KafkaConsumer(
        bootstrap_servers=bootstrap,
        enable_auto_commit=False,
        isolation_level="read_committed" if read_committed else "read_uncommitted",
    )
    try:
        tps = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or ())]
        if not tps:
            return []
        consumer.assign(tps)
        consumer.seek_to_beginning(*tps)
        end = consumer.end_offsets(tps)
        records: list[Any] = []
        idle_since = time.monotonic()
        deadline = idle_since + timeout_seconds
        while any(consumer.position(tp) < end[tp] for tp in tps):
            if time.monotonic() > deadline:
                raise KafkaTimeoutError(f"could not read {topic} to its end in {timeout_seconds}s")
            polled = consumer.poll(timeout_ms=500)
            for batch in polled.values():
                records.extend(batch)
            if polled:
                idle_since = time.monotonic()
            elif read_committed and time.monotonic() - idle_since > 5.0:
                break  # a transaction marker can sit at the end, past the last record
        return records
    finally:
        consumer.close()


def read_tails(
    kafka: KafkaSettings, ends: dict[TopicPartition, int], count: int, timeout_seconds: float
) -> dict[TopicPartition, list[RawMessage]]:
    """Up to `count` messages before offset `ends[tp]` of each partition, in offset order.

    Read with a consumer outside any group (no offsets committed, no rebalance triggered).
    Raises KafkaTimeoutError when the tails are not read within `timeout_seconds`.
    """
    out: dict[TopicPartition, list[Any]] = {tp: [] for tp in ends}
    if not ends or count <= 0:
        return {}
    consumer = KafkaConsumer(
        **common_options(kafka),
        group_id=None,
        enable_auto_commit=False,
        isolation_level="read_committed",
        max_poll_records=kafka.max_poll_records,
        fetch_max_bytes=kafka.fetch_max_bytes,
        max_partition_fetch_bytes=kafka.max_partition_fetch_bytes,
    )
    try:
        partitions = list(ends)
        consumer.assign(partitions)
        begin = consumer.beginning_offsets(partitions)
        todo: dict[TopicPartition, int] = {}
        for tp in partitions:
            start = max(begin[tp], ends[tp] - count)
            if start < ends[tp]:
                consumer.seek(tp, start)
                todo[tp] = ends[tp]
        consumer.pause(*[tp for tp in partitions if tp not in todo])
        deadline = time.monotonic() + timeout_seconds
        while todo:
            if time.monotonic() > deadline:
                raise KafkaTimeoutError(
                    f"state restore: tails of {sorted(map(str, todo))} not read in "
                    f"{timeout_seconds}s"
                )
            for tp, records in consumer.poll(timeout_ms=200).items():
                if tp in todo:
                    out[tp].extend(r for r in records if r.offset < todo[tp])
            # Transaction markers and compaction leave offset gaps: go by position.
            for tp in [tp for tp, end in todo.items() if consumer.position(tp) >= end]:
                consumer.pause(tp)
                del todo[tp]
    finally:
        consumer.close()
    return {tp: to_raw(records) for tp, records in out.items() if records}


class TopicFollower:
    """Every partition of some topics, from the beginning, outside any group.

    For the control and feedback topics: every replica must see every message, and a
    replica that starts late must catch up on what was said before it started.
    """

    def __init__(self, kafka: KafkaSettings, topics: Sequence[str]) -> None:
        self._consumer = KafkaConsumer(
            **common_options(kafka),
            group_id=None,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            isolation_level="read_committed",
        )
        partitions: list[TopicPartition] = []
        try:  # a consumer left open by a failed start keeps its sockets and threads
            for topic in topics:
                ids = self._consumer.partitions_for_topic(topic)
                if not ids:  # prepare_topics checked it exists: metadata not there yet, retry
                    raise UnknownTopicOrPartitionError(
                        f"control: no partitions known for {topic!r}"
                    )
                partitions += [TopicPartition(topic, p) for p in sorted(ids)]
            self._consumer.assign(partitions)
            self._consumer.seek_to_beginning(*partitions)
        except BaseException:
            self._consumer.close(autocommit=False)
            raise
        self._partitions = partitions

    def catch_up(self, timeout_seconds: float) -> list[Any]:
        """Everything up to the end offsets as of now (a start-up read)."""
        end = self._consumer.end_offsets(self._partitions)
        records: list[Any] = []
        deadline = time.monotonic() + timeout_seconds
        while any(self._consumer.position(tp) < end[tp] for tp in self._partitions):
            if time.monotonic() > deadline:
                raise KafkaTimeoutError(
                    f"control topics not read to their end in {timeout_seconds}s"
                )
            records += self.poll(timeout_ms=200)
        return records

    def poll(self, timeout_ms: int = 0) -> list[Any]:
        polled = self._consumer.poll(timeout_ms=timeout_ms)
        return [r for tp in sorted(polled) for r in polled[tp]]

    def close(self) -> None:
        self._consumer.close(autocommit=False)
