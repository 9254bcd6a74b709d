"""confluent-kafka (librdkafka) for the hot path: `kafka.client = "confluent"`.

The daemon's consumer and producer, behind the same small surface as kafka-python's (the
methods `streamer.app` and `streamer.delivery` call), raising kafka-python's error types so
that one set of retry, rebalance and fencing rules serves both clients. librdkafka fetches
and parses records in C on its own threads; kafka-python does both in Python inside `poll`,
which was most of the daemon's time (bench/README.md). Topic admin, the control-topic
follower and the state-restore reads stay on kafka-python: they are not on the hot path.

Imported only when that client is configured, so the package stays optional.
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Iterable, Sequence
from typing import Any

import confluent_kafka as ck
from kafka import ConsumerRebalanceListener, TopicPartition
from kafka.errors import (
    CommitFailedError,
    KafkaError,
    KafkaTimeoutError,
    ProducerFencedError,
)
from kafka.structs import OffsetAndMetadata

from streamer.config import KafkaSettings
from streamer.kafka_io import ConsumerBroken
from streamer.records import RawMessage

log = logging.getLogger(__name__)

E = ck.KafkaError
# The group moved on: what this member holds is someone else's now (CommitFailedError).
REBALANCED = {
    E.ILLEGAL_GENERATION, E.UNKNOWN_MEMBER_ID, E.REBALANCE_IN_PROGRESS, E.FENCED_INSTANCE_ID,
    E._ASSIGNMENT_LOST,
}  # fmt: skip
# Another producer took the transactional id (ProducerFencedError: retrying cannot help).
FENCED = {E.PRODUCER_FENCED, E.INVALID_PRODUCER_EPOCH, E._FENCED}
STATS_INTERVAL_MS = 1000  # how often librdkafka reports the group's state (coordinator_in_touch)
REPEAT_SECONDS = 30.0  # librdkafka repeats itself on every reconnect attempt: once is enough


class LibraryLog:
    """librdkafka's log lines and error callbacks into `logging`, each distinct line (digits
    aside) at most once per REPEAT_SECONDS: a broker outage would log several a second."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._last: dict[str, float] = {}

    def log(self, level: int, msg: str, *args: Any) -> None:
        text = msg % args if args else msg
        key = re.sub(r"\d+", "#", text)
        now = time.monotonic()
        if now - self._last.get(key, -REPEAT_SECONDS) < REPEAT_SECONDS:
            return
        if len(self._last) > 1000:
            self._last.clear()
        self._last[key] = now
        log.log(level, "%s: %s", self.name, text)

    def error(self, err: ck.KafkaError) -> None:
        """error_cb: librdkafka retries these itself (broker down, transport); fatal ones
        also surface from the call that hits them."""
        self.log(logging.ERROR if err.fatal() else logging.WARNING, err.str())


def common_config(kafka: KafkaSettings) -> dict[str, Any]:
    """kafka-python's option names (KafkaSettings) in librdkafka's terms."""
    conf: dict[str, Any] = {
        "bootstrap.servers": ",".join(kafka.servers),
        "client.id": kafka.client_id,
        "socket.timeout.ms": kafka.request_timeout_ms,
        "reconnect.backoff.max.ms": kafka.reconnect_backoff_max_ms,
        "security.protocol": kafka.security_protocol,
    }
    optional = {
        "ssl.ca.location": kafka.ssl_cafile,
        "ssl.certificate.location": kafka.ssl_certfile,
        "ssl.key.location": kafka.ssl_keyfile,
        "ssl.key.password": kafka.ssl_password,
        "sasl.mechanism": kafka.sasl_mechanism,
        "sasl.username": kafka.sasl_plain_username,
        "sasl.password": kafka.sasl_plain_password,
    }
    conf.update({k: v for k, v in optional.items() if v is not None})
    if kafka.security_protocol.endswith("SSL"):
        conf["ssl.endpoint.identification.algorithm"] = (
            "https" if kafka.ssl_check_hostname else "none"
        )
    return conf


def translate(exc: ck.KafkaException, what: str) -> KafkaError:
    """A librdkafka error as the kafka-python error the daemon's rules know."""
    err = exc.args[0] if exc.args and isinstance(exc.args[0], ck.KafkaError) else None
    code = err.code() if err is not None else None
    text = f"{what}: {err.str() if err is not None else exc}"
    if code in REBALANCED:
        return CommitFailedError(text)
    if code in FENCED:
        return ProducerFencedError(text)
    if code in (E._TIMED_OUT, E.REQUEST_TIMED_OUT):
        return KafkaTimeoutError(text)
    return KafkaError(text)


def group_state(stats: dict[str, Any]) -> tuple[str, str]:
    """(the consumer group's state, its coordinator connection's state) from one librdkafka
    statistics report. Readiness asks for both: the group "up" and the connection to its
    coordinator (librdkafka's logical "GroupCoordinator" broker) "UP", which changes as soon
    as that socket fails. A report without that broker leaves the group's state alone.

    >>> group_state({"cgrp": {"state": "up"}, "brokers": {
    ...     "GroupCoordinator": {"source": "logical", "state": "TRY_CONNECT"},
    ...     "127.0.0.1:9092/1": {"source": "learned", "state": "UP"}}})
    ('up', 'TRY_CONNECT')
    >>> group_state({"cgrp": {"state": "up"}, "brokers": {}})
    ('up', 'UP')
    >>> group_state({})
    ('unknown', 'UP')
    """
    state = stats.get("cgrp", {}).get("state", "unknown")
    coordinator = stats.get("brokers", {}).get("GroupCoordinator", {"state": "UP"})
    return state, str(coordinator.get("state", "unknown"))


def _tp(tp: ck.TopicPartition) -> TopicPartition:
    return TopicPartition(tp.topic, tp.partition)


def _ctp(tp: TopicPartition, offset: int = ck.OFFSET_INVALID) -> ck.TopicPartition:
    return ck.TopicPartition(tp.topic, tp.partition, offset)


def _offsets(offsets: dict[TopicPartition, OffsetAndMetadata]) -> list[ck.TopicPartition]:
    return [_ctp(tp, om.offset) for tp, om in offsets.items()]


class Consumer:
    """A group member reading with librdkafka; kafka-python's KafkaConsumer surface."""

    def __init__(self, kafka: KafkaSettings) -> None:
        self._kafka = kafka
        self._log = LibraryLog("consumer")
        # (the group's state, its coordinator connection's state, when librdkafka said so)
        self._group_state: tuple[str, str, float] = ("init", "INIT", time.monotonic())
        conf = {
            **common_config(kafka),
            "group.id": kafka.group_id,
            "session.timeout.ms": kafka.session_timeout_ms,
            "enable.auto.commit": False,  # offsets are committed only after alerts are out
            "enable.auto.offset.store": False,
            "auto.offset.reset": kafka.auto_offset_reset,
            "fetch.max.bytes": kafka.fetch_max_bytes,
            "max.partition.fetch.bytes": kafka.max_partition_fetch_bytes,
            "isolation.level": "read_committed",
            # librdkafka stops fetching a partition whose local queue is full for this long
            # (default 1 s): scoring drains the queue much sooner, then waited idle for
            # the rest (bench: 104k events/s at 41% busy against 230k at 92% with 10 ms).
            "fetch.queue.backoff.ms": 10,
            "statistics.interval.ms": STATS_INTERVAL_MS,
            "stats_cb": self._on_stats,
            "logger": self._log,
            "error_cb": self._log.error,
        }
        if kafka.group_instance_id:
            conf["group.instance.id"] = kafka.group_instance_id
        self._c = ck.Consumer(conf)

    # -- callbacks, served inside consume() --------------------------------------------------

    def _on_stats(self, text: str) -> None:
        self._group_state = (*group_state(json.loads(text)), time.monotonic())

    # -- group -------------------------------------------------------------------------------

    def subscribe(self, topics: Sequence[str], listener: ConsumerRebalanceListener) -> None:
        def assigned(_: Any, parts: list[ck.TopicPartition]) -> None:
            listener.on_partitions_assigned([_tp(p) for p in parts])

        def revoked(_: Any, parts: list[ck.TopicPartition]) -> None:
            listener.on_partitions_revoked([_tp(p) for p in parts])

        try:
            self._c.subscribe(list(topics), on_assign=assigned, on_revoke=revoked, on_lost=revoked)
        except ck.KafkaException as exc:
            raise translate(exc, "subscribe") from exc

    def assignment(self) -> set[TopicPartition]:
        return {_tp(p) for p in self._c.assignment()}

    def group_metadata(self) -> Any:
        return self._c.consumer_group_metadata()

    def coordinator_in_touch(self, within_seconds: float = 10.0) -> bool:
        """True while librdkafka's last report (every second) says the group is up and
        its connection to the coordinator is too."""
        state, coordinator, at = self._group_state
        return state == "up" and coordinator == "UP" and time.monotonic() - at < within_seconds

    def topics(self) -> set[str]:
        try:
            return set(self._c.list_topics(timeout=self._kafka.request_timeout_ms / 1000).topics)
        except ck.KafkaException as exc:
            raise translate(exc, "metadata") from exc

    # -- reading -----------------------------------------------------------------------------

    def poll_raw(self, timeout_ms: int, max_records: int) -> dict[TopicPartition, list[RawMessage]]:
        """What is fetched already (up to `max_records`), waiting up to `timeout_ms` only
        when nothing is: kafka-python's poll semantics, not consume()'s fill-or-time-out."""
        c = self._c
        try:
            messages = c.consume(max_records, 0)
            if not messages and timeout_ms > 0:
                messages = c.consume(1, timeout_ms / 1000)
                if messages and max_records > 1:
                    messages += c.consume(max_records - 1, 0)
        except ck.KafkaException as exc:
            raise translate(exc, "poll") from exc
        out: dict[TopicPartition, list[RawMessage]] = {}
        last: Any = None
        batch: list[RawMessage] = []
        m: Any  # a record's topic, partition and offset are None only on an error event
        for m in messages:
            err = m.error()
            if err is not None:
                if err.fatal() or err.code() == E._FATAL:
                    raise ConsumerBroken(f"poll: {err.str()}")
                log.warning("poll: %s", err.str())
                continue
            topic, partition = m.topic(), m.partition()
            if (topic, partition) != last:
                last = (topic, partition)
                batch = out.setdefault(TopicPartition(topic, partition), [])
            batch.append(
                RawMessage(topic, partition, m.offset(), m.key(), m.value(), m.timestamp()[1])
            )
        return out

    def seek(self, tp: TopicPartition, offset: int) -> None:
        self._seek(tp, offset)

    def seek_to_beginning(self, tp: TopicPartition) -> None:
        self._seek(tp, ck.OFFSET_BEGINNING)

    def seek_to_end(self, tp: TopicPartition) -> None:
        self._seek(tp, ck.OFFSET_END)

    def _seek(self, tp: TopicPartition, offset: int) -> None:
        try:
            self._c.seek(_ctp(tp, offset))
        except ck.KafkaException as exc:
            raise translate(exc, f"seek {tp.topic}[{tp.partition}]") from exc

    def committed(self, tp: TopicPartition) -> int | None:
        try:
            (part,) = self._c.committed([_ctp(tp)], timeout=self._kafka.request_timeout_ms / 1000)
        except ck.KafkaException as exc:
            raise translate(exc, "committed") from exc
        return part.offset if part.offset >= 0 else None

    def position(self, tp: TopicPartition) -> int:
        """The next offset to read: past the last record returned, else the committed offset,
        else where `auto_offset_reset` starts (kafka-python resolves it the same way)."""
        try:
            (part,) = self._c.position([_ctp(tp)])
            if part.offset >= 0:
                return int(part.offset)
            committed = self.committed(tp)
            if committed is not None:
                return committed
            low, high = self._c.get_watermark_offsets(
                _ctp(tp), timeout=self._kafka.request_timeout_ms / 1000
            )
        except ck.KafkaException as exc:
            raise translate(exc, "position") from exc
        return int(low if self._kafka.auto_offset_reset == "earliest" else high)

    def lag(self) -> dict[TopicPartition, int]:
        """Lag per assigned partition from the high watermarks of the fetches (no request)."""
        out: dict[TopicPartition, int] = {}
        parts = self._c.assignment()
        if not parts:
            return out
        for part in self._c.position(parts):
            if part.offset < 0:
                continue  # nothing read from it yet
            _, high = self._c.get_watermark_offsets(part, cached=True)
            if high >= 0:
                out[_tp(part)] = max(0, high - part.offset)
        return out

    def commit(self, offsets: dict[TopicPartition, OffsetAndMetadata]) -> None:
        try:
            self._c.commit(offsets=_offsets(offsets), asynchronous=False)
        except ck.KafkaException as exc:
            raise translate(exc, "commit") from exc

    def close(self, autocommit: bool = False) -> None:
        self._c.close()  # enable.auto.commit is off: nothing is committed here


class _Sent:
    """One produced record's fate, as kafka-python's FutureRecordMetadata reports it."""

    __slots__ = ("exception", "is_done")

    def __init__(self) -> None:
        self.is_done = False
        self.exception: Exception | None = None

    def failed(self) -> bool:
        return self.exception is not None

    def __call__(self, err: ck.KafkaError | None, _: Any) -> None:
        self.is_done = True
        if err is not None:
            self.exception = KafkaError(f"delivery: {err.str()}")


class Producer:
    """A librdkafka producer; kafka-python's KafkaProducer surface."""

    def __init__(self, conf: dict[str, Any], delivery_timeout_seconds: float) -> None:
        library = LibraryLog("producer")
        self._p = ck.Producer({**conf, "logger": library, "error_cb": library.error})
        self._timeout = delivery_timeout_seconds

    def send(
        self, topic: str, key: bytes | None = None, value: bytes | None = None,
        headers: Iterable[tuple[str, bytes]] | None = None,
    ) -> _Sent:  # fmt: skip
        sent = _Sent()
        deadline = None
        while True:
            try:
                self._p.produce(
                    topic, value, key, headers=list(headers) if headers else None,
                    on_delivery=sent,
                )  # fmt: skip
                break
            except BufferError:  # the local queue is full: let deliveries drain it
                deadline = deadline or time.monotonic() + self._timeout
                if time.monotonic() > deadline:
                    raise KafkaTimeoutError("send: producer queue full") from None
                self._p.poll(0.05)
            except ck.KafkaException as exc:
                raise translate(exc, "send") from exc
        self._p.poll(0)  # serve delivery callbacks of earlier sends
        return sent

    def flush(self, timeout: float | None = None) -> None:
        try:
            left = self._p.flush(self._timeout if timeout is None else timeout)
        except ck.KafkaException as exc:
            raise translate(exc, "flush") from exc
        if left:
            raise KafkaTimeoutError(f"flush: {left} record(s) not delivered in time")

    def init_transactions(self) -> None:
        self._call("init_transactions", self._p.init_transactions, self._timeout)

    def begin_transaction(self) -> None:
        self._call("begin_transaction", self._p.begin_transaction)

    def send_offsets_to_transaction(
        self, offsets: dict[TopicPartition, OffsetAndMetadata], group_metadata: Any
    ) -> None:
        self._call(
            "send_offsets_to_transaction", self._p.send_offsets_to_transaction,
            _offsets(offsets), group_metadata, self._timeout,
        )  # fmt: skip

    def commit_transaction(self) -> None:
        self._call("commit_transaction", self._p.commit_transaction, self._timeout)

    def _call(self, what: str, fn: Any, *args: Any) -> None:
        try:
            fn(*args)
        except ck.KafkaException as exc:
            raise translate(exc, what) from exc

    def close(self, timeout: float | None = None) -> None:
        """Deliver what is queued within `timeout` (0: drop it, as kafka-python does)."""
        if timeout == 0:
            self._p.purge()
        self._p.flush(self._timeout if timeout is None else timeout)


def make_producer(kafka: KafkaSettings, transactional: bool, transactional_id: str) -> Producer:
    acks = "all" if transactional else kafka.producer_acks
    conf: dict[str, Any] = {
        **common_config(kafka),
        "acks": acks,
        "linger.ms": kafka.producer_linger_ms,
        "batch.size": kafka.producer_batch_bytes,
        "max.in.flight.requests.per.connection": 5,
        # Idempotence (no duplicates from the producer's own retries) needs acks=all.
        "enable.idempotence": acks == "all",
        "delivery.timeout.ms": int(kafka.delivery_timeout_seconds * 1000),
        # kafka-python's max_request_size: a dead letter carries an input message of up to
        # alerts.max_message_bytes plus headers, which librdkafka's 1,000,000 would refuse.
        "message.max.bytes": 1_048_576,
    }
    if transactional:
        conf["transactional.id"] = transactional_id
        conf["transaction.timeout.ms"] = kafka.transaction_timeout_ms
        # librdkafka refuses a delivery timeout longer than the transaction's.
        conf["delivery.timeout.ms"] = min(conf["delivery.timeout.ms"], kafka.transaction_timeout_ms)
    return Producer(conf, kafka.delivery_timeout_seconds)
