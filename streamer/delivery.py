"""How a scored batch leaves the daemon: alerts and dead letters out, offsets committed.

Two guarantees, chosen by `kafka.delivery`:

- `at-least-once` (default): produce, flush, check every send, then commit the offsets.
  A crash in between replays the batch; replayed alerts carry the same `alert_id`.
- `exactly-once`: the batch's alerts, dead letters and offsets go in one Kafka transaction.
  Subscribers reading with `isolation_level=read_committed` see each alert once.

Either way a failed delivery raises `DeliveryError`; the caller retries the same batch after
a back-off, so a broker outage delays a batch but never drops or reorders it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any, Protocol

import msgspec
from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from kafka.errors import CommitFailedError, KafkaError, ProducerFencedError
from kafka.structs import OffsetAndMetadata

from streamer import kafka_io
from streamer.config import KafkaSettings
from streamer.pipeline import BatchResult

log = logging.getLogger(__name__)
Offsets = dict[TopicPartition, OffsetAndMetadata]
STAGES = ("produce", "commit")  # what deliver() times, after the pipeline's own stages


class DeliveryError(Exception):
    """The batch did not get out; retry it (the broker may be away)."""


class Rebalanced(Exception):
    """The group moved on while the batch was in flight; the new owner replays it."""


class FatalDeliveryError(Exception):
    """Retrying cannot help (for example, another instance took this transactional id)."""


class Delivery(Protocol):
    def prepare(self) -> None:
        """Get ready to deliver, before the first poll; raise DeliveryError to retry."""
        ...

    def deliver(self, result: BatchResult, offsets: Offsets) -> dict[str, float]:
        """Publish and commit one batch; return seconds spent per stage (produce, commit)."""
        ...

    def close(self) -> None: ...


def _records(result: BatchResult, k: KafkaSettings) -> list[tuple[str, Any, bytes, Any]]:
    """(topic, key, value, headers) for every alert and dead letter of a batch."""
    encode = msgspec.json.encode
    out: list[tuple[str, Any, bytes, Any]] = [
        (k.alert_topic, str(a.entity).encode(), encode(a), None) for a in result.alerts
    ]
    out += [
        (k.dead_letter_topic, d.message.key, d.message.value or b"",
         kafka_io.dead_letter_headers(d))
        for d in result.dead_letters
    ]  # fmt: skip
    return out


class AtLeastOnce:
    def __init__(self, kafka: KafkaSettings, consumer: KafkaConsumer) -> None:
        self.kafka = kafka
        self.consumer = consumer
        self.producer = kafka_io.make_producer(kafka)

    def prepare(self) -> None:
        pass  # the producer connects lazily; nothing must happen before the first poll

    def deliver(self, result: BatchResult, offsets: Offsets) -> dict[str, float]:
        t0 = time.perf_counter()
        send = self.producer.send
        futures = [
            send(t, key=k, value=v, headers=h) for t, k, v, h in _records(result, self.kafka)
        ]
        try:
            self.producer.flush(timeout=self.kafka.delivery_timeout_seconds)
        except KafkaError as exc:
            raise DeliveryError(f"flush: {exc}") from exc
        failed = [f.exception for f in futures if f.failed()]
        if failed or not all(f.is_done for f in futures):
            raise DeliveryError(f"{len(failed)} of {len(futures)} records not acknowledged")
        t1 = time.perf_counter()
        try:
            self.consumer.commit(offsets)
        except CommitFailedError as exc:
            raise Rebalanced(str(exc)) from exc
        except KafkaError as exc:
            raise DeliveryError(f"commit: {exc}") from exc
        return {"produce": t1 - t0, "commit": time.perf_counter() - t1}

    def close(self) -> None:
        self.producer.close(timeout=10)


class ExactlyOnce:
    """One transaction per batch: alerts, dead letters and consumed offsets commit together."""

    def __init__(
        self,
        kafka: KafkaSettings,
        consumer: KafkaConsumer,
        make_producer: Callable[[], KafkaProducer] | None = None,
    ) -> None:
        self.kafka = kafka
        self.consumer = consumer
        self._make = make_producer or (lambda: kafka_io.make_producer(kafka, transactional=True))
        self.producer: KafkaProducer | None = None

    def prepare(self) -> None:
        """Initialise transactions before the first poll.

        A killed predecessor with the same transactional id may hold an open transaction with
        pending offsets; until it is aborted the group's offsets are unstable and the consumer
        cannot start. init_transactions aborts it now instead of after its timeout.
        """
        self._ensure_producer()

    def _ensure_producer(self) -> KafkaProducer:
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

    def deliver(self, result: BatchResult, offsets: Offsets) -> dict[str, float]:
        producer = self._ensure_producer()
        try:
            t0 = time.perf_counter()
            producer.begin_transaction()
            for t, k, v, h in _records(result, self.kafka):
                producer.send(t, key=k, value=v, headers=h)
            t1 = time.perf_counter()
            producer.send_offsets_to_transaction(offsets, self.consumer.group_metadata())
            producer.commit_transaction()
            return {"produce": t1 - t0, "commit": time.perf_counter() - t1}
        except ProducerFencedError as exc:
            self._discard()
            raise FatalDeliveryError(
                f"transactional id {self.kafka.transactional_id!r} was taken by another instance"
            ) from exc
        except CommitFailedError as exc:
            self._discard()
            raise Rebalanced(str(exc)) from exc
        except KafkaError as exc:
            # Whatever state the transaction is in, a fresh producer with the same id aborts
            # it on init: simpler and safer than reasoning about every abortable error.
            self._discard()
            if "generation" in str(exc).lower() or "rebalanc" in str(exc).lower():
                raise Rebalanced(str(exc)) from exc
            raise DeliveryError(f"transaction: {exc}") from exc

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
