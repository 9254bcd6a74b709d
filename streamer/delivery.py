"""How scored batches leave the daemon: alerts and dead letters out, offsets committed.

Two guarantees, chosen by `kafka.delivery`:

- `at-least-once` (default): records are produced as each batch is scored; at a commit the
  producer is flushed, every send checked, then the offsets committed. A crash in between
  replays the uncommitted batches; replayed alerts carry the same `alert_id`.
- `exactly-once`: the records and offsets between two commits form one Kafka transaction.
  Subscribers reading with `isolation_level=read_committed` see each alert once.

A commit is due every `kafka.commit_interval_seconds` (and before a rebalance or shutdown):
flushing and committing cost a broker round trip each, which per 1,000-event batch took more
time than all the scoring. Until the commit, the outbox keeps the batches' records so that a
failed flush or transaction can be sent again as a whole.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any, Literal, Protocol

import msgspec
from kafka import TopicPartition
from kafka.errors import CommitFailedError, KafkaError, ProducerFencedError
from kafka.structs import OffsetAndMetadata

from streamer import kafka_io
from streamer.config import KafkaSettings
from streamer.pipeline import BatchResult
from streamer.records import DeadLetter

log = logging.getLogger(__name__)
Offsets = dict[TopicPartition, OffsetAndMetadata]
Record = tuple[str, Any, bytes, Any]  # topic, key, value, headers
STAGES = ("produce", "commit")  # what the outbox times, after the pipeline's own stages
# The producers' request limit (kafka-python's max_request_size, set for librdkafka too), less
# room for the dead-letter headers (dlq.detail is cut at 1,000 bytes) and the batch overhead.
DEAD_LETTER_MAX_BYTES = 1_048_576 - 8_192


class DeliveryError(Exception):
    """Records or offsets did not get out; send everything pending again and retry."""


class Rebalanced(Exception):
    """The group moved on before the commit; the partitions' new owner replays the batches."""


class FatalDeliveryError(Exception):
    """Retrying cannot help (for example, another instance took this transactional id)."""


class Transport(Protocol):
    """One delivery guarantee: how records are sent and how a commit is made."""

    def prepare(self) -> None: ...
    def begin(self) -> None: ...
    def send(self, records: list[Record]) -> None: ...
    def commit(self, offsets: Offsets) -> float:
        """Make everything sent since begin() durable with the offsets; return the seconds
        spent waiting for produced records (the rest is the commit itself)."""
        ...

    def abort(self) -> None: ...
    def close(self) -> None: ...


def records_of(result: BatchResult, k: KafkaSettings) -> list[Record]:
    """Every alert, incident message and dead letter of a batch, as producer records."""
    encode = msgspec.json.encode
    out: list[Record] = []
    if result.publish_alerts:
        out += [(k.alert_topic, str(a.entity).encode(), encode(a), None) for a in result.alerts]
    out += [(k.alert_topic, str(i.entity).encode(), encode(i), None) for i in result.incidents]
    out += [dead_letter(d, k.dead_letter_topic) for d in result.dead_letters]
    return out


def dead_letter(d: DeadLetter, topic: str) -> Record:
    """The dead letter's record: the original bytes, cut when they and the key would not fit
    in DEAD_LETTER_MAX_BYTES.

    An input record near the broker's size limit plus the dead-letter headers would exceed
    the producer's request limit (1 MiB) on every retry and stall the partition for good;
    the headers name where the full original still is.
    """
    value = d.message.value or b""
    headers = kafka_io.dead_letter_headers(d)
    room = max(0, DEAD_LETTER_MAX_BYTES - len(d.message.key or b""))
    if len(value) > room:
        headers.append(("dlq.truncated_from_bytes", str(len(value)).encode()))
        value = value[:room]
    return (topic, d.message.key, value, headers)


class Outbox:
    """Batches scored since the last commit: their records and their offsets."""

    def __init__(self, transport: Transport, kafka: KafkaSettings) -> None:
        self.transport = transport
        self.kafka = kafka
        self._records: list[Record] = []
        self._offsets: Offsets = {}
        self._open = False
        self._broken = False  # a send failed part-way: resend everything before committing
        self._batches = 0
        self.last_commit = time.monotonic()

    def prepare(self) -> None:
        self.transport.prepare()

    def close(self) -> None:
        self.transport.close()

    @property
    def pending_batches(self) -> int:
        return self._batches

    def commit_due(self) -> bool:
        return bool(self._batches) and (
            time.monotonic() - self.last_commit >= self.kafka.commit_interval_seconds
        )

    def add(self, result: BatchResult, offsets: Offsets) -> float:
        """Send a batch's records now; its offsets wait for the next commit."""
        t0 = time.perf_counter()
        records = records_of(result, self.kafka)
        self._records += records
        for tp, om in offsets.items():
            held = self._offsets.get(tp)
            if held is None or om.offset > held.offset:
                self._offsets[tp] = om
        self._batches += 1
        try:
            if not self._open:
                self.transport.begin()
                self._open = True
            self.transport.send(records)
        except DeliveryError:
            self._broken = True
            raise
        return time.perf_counter() - t0

    def commit(self) -> dict[str, float]:
        """Make the pending batches durable; raises DeliveryError, Rebalanced or Fatal."""
        if not self._batches:
            return {}
        if self._broken:
            self.resend()
        t0 = time.perf_counter()
        waited = self.transport.commit(self._offsets)
        self._clear()
        return {"produce": waited, "commit": time.perf_counter() - t0 - waited}

    def resend(self) -> None:
        """After a failed commit: start over and send every pending record again."""
        self._broken = True
        self.transport.abort()
        self._open = False
        self.transport.begin()
        self._open = True
        self.transport.send(self._records)
        self._broken = False

    def drop(self) -> None:
        """After a rebalance: the new owner of the partitions replays these batches."""
        self.transport.abort()
        self._clear()

    def _clear(self) -> None:
        self._records, self._offsets, self._batches = [], {}, 0
        self._open = self._broken = False
        self.last_commit = time.monotonic()


class AtLeastOnce:
    def __init__(self, kafka: KafkaSettings, consumer: kafka_io.GroupConsumer) -> None:
        self.kafka = kafka
        self.consumer = consumer
        self.producer = kafka_io.make_producer(kafka)
        self._futures: list[Any] = []

    def prepare(self) -> None:
        pass  # the producer connects lazily; nothing must happen before the first poll

    def begin(self) -> None:
        self._futures = []

    def send(self, records: list[Record]) -> None:
        send = self.producer.send
        try:
            self._futures += [send(t, key=k, value=v, headers=h) for t, k, v, h in records]
        except KafkaError as exc:  # metadata or buffer space not available in time
            raise DeliveryError(f"send: {exc}") from exc

    def commit(self, offsets: Offsets) -> float:
        t0 = time.perf_counter()
        try:
            self.producer.flush(timeout=self.kafka.delivery_timeout_seconds)
        except KafkaError as exc:
            raise DeliveryError(f"flush: {exc}") from exc
        futures = self._futures
        failed = [f.exception for f in futures if f.failed()]
        if failed or not all(f.is_done for f in futures):
            raise DeliveryError(f"{len(failed)} of {len(futures)} records not acknowledged")
        waited = time.perf_counter() - t0
        try:
            self.consumer.commit(offsets)
        except CommitFailedError as exc:
            raise Rebalanced(str(exc)) from exc
        except KafkaError as exc:
            raise DeliveryError(f"commit: {exc}") from exc
        self._futures = []
        return waited

    def abort(self) -> None:
        self._futures = []  # records already sent may still land: duplicates, same alert_id

    def close(self) -> None:
        self.producer.close(timeout=10)


class ExactlyOnce:
    """Records and consumed offsets between two commits commit together, or not at all."""

    def __init__(
        self,
        kafka: KafkaSettings,
        consumer: kafka_io.GroupConsumer,
        make_producer: Callable[[], Any] | None = None,
    ) -> None:
        self.kafka = kafka
        self.consumer = consumer
        self._make = make_producer or (lambda: kafka_io.make_producer(kafka, transactional=True))
        self.producer: Any = None  # kafka_io.make_producer's

    def prepare(self) -> None:
        """Initialise transactions before the first poll.

        A killed predecessor with the same transactional id may hold an open transaction with
        pending offsets; until it is aborted the group's offsets are unstable and the consumer
        cannot start. init_transactions aborts it now instead of after its timeout.
        """
        self._ensure_producer()

    def _ensure_producer(self) -> Any:
        if self.producer is None:
            producer = self._make()
            try:
                # Fences an earlier instance with the same id and aborts its open transaction.
                producer.init_transactions()
            except KafkaError as exc:
                producer.close(timeout=0)
                raise DeliveryError(f"init_transactions: {exc}") from exc
            self.producer = producer
        return self.producer

    def begin(self) -> None:
        with self._errors("begin"):
            self._ensure_producer().begin_transaction()

    def send(self, records: list[Record]) -> None:
        producer = self._ensure_producer()
        with self._errors("send"):
            for t, k, v, h in records:
                producer.send(t, key=k, value=v, headers=h)

    def commit(self, offsets: Offsets) -> float:
        producer = self._ensure_producer()
        with self._errors("commit"):
            t0 = time.perf_counter()
            producer.flush(timeout=self.kafka.delivery_timeout_seconds)
            waited = time.perf_counter() - t0
            producer.send_offsets_to_transaction(offsets, self.consumer.group_metadata())
            producer.commit_transaction()
        return waited

    def abort(self) -> None:
        # Whatever state the transaction is in, a fresh producer with the same id aborts it
        # on init: simpler and safer than reasoning about every abortable error.
        self._discard()

    def _errors(self, what: str) -> _TransactionErrors:
        return _TransactionErrors(self, what)

    def _discard(self) -> None:
        if self.producer is not None:
            try:
                self.producer.close(timeout=0)
            except Exception:  # closing a broken producer must not hide the real error
                log.debug("closing a failed transactional producer", exc_info=True)
            self.producer = None

    def close(self) -> None:
        if self.producer is not None:
            self.producer.close(timeout=10)
            self.producer = None


class _TransactionErrors:
    """Map transaction errors (kafka-python's types, which confluent_io raises too) onto retry,
    rebalance or stop."""

    def __init__(self, eos: ExactlyOnce, what: str) -> None:
        self.eos, self.what = eos, what

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: Any, exc: Any, tb: Any) -> Literal[False]:
        if exc is None or not isinstance(exc, KafkaError):
            return False
        self.eos._discard()
        if isinstance(exc, ProducerFencedError):
            raise FatalDeliveryError(
                f"transactional id {self.eos.kafka.transactional_id!r} was taken by another "
                "instance"
            ) from exc
        text = str(exc).lower()
        if isinstance(exc, CommitFailedError) or "generation" in text or "rebalanc" in text:
            raise Rebalanced(str(exc)) from exc
        raise DeliveryError(f"transaction {self.what}: {exc}") from exc


def make_outbox(kafka: KafkaSettings, consumer: kafka_io.GroupConsumer) -> Outbox:
    transport: Transport = (
        ExactlyOnce(kafka, consumer) if kafka.delivery == "exactly-once"
        else AtLeastOnce(kafka, consumer)
    )  # fmt: skip
    return Outbox(transport, kafka)
