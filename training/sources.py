"""Read training history from a Kafka topic over an offset or time range.

A group-less consumer (assign + seek, nothing committed) reads each partition from its start
offset up to its end offset, read_committed, and stops there: a retrain reads a fixed slice
of the topic, never waits for new records. Messages are decoded with the spec's event type
exactly like `training.datasets.read_jsonl`: what does not decode is counted and skipped.

Order: each partition's events stay in offset order, and partitions are interleaved by
record timestamp (a merge that never reorders a partition), so the latest records come
last, as the LSTM split's held-out tail expects. Per-entity aggregates (rolling columns,
LSTM windows) are then right only when all of an entity's events sit in one partition,
which is what keying the records by entity gives (the daemon assumes the same).
"""

from __future__ import annotations

import heapq
import logging
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import msgspec

from streamer.features import FeatureSpec
from training.datasets import History, from_events

log = logging.getLogger(__name__)
PROGRESS_SECONDS = 5.0
# A partition whose position does not move this long while records are still due: give up
# rather than train on part of the range.
STALL_SECONDS = 60.0


class SourceError(Exception):
    """The topic range cannot be read; the message says what to fix."""


@dataclass(frozen=True)
class TopicRange:
    """Which records of `topic` to read, the same range in every partition.

    Start: `from_offset`, or the first record at or after `since`, or the partition's
    beginning. End (exclusive): `to_offset`, or the first record at or after `until`, or the
    partition's end when the read starts. Times are Kafka record timestamps (the producer's
    CreateTime unless the topic says LogAppendTime), not the events' own time field.
    """

    topic: str
    from_offset: int | None = None
    to_offset: int | None = None
    since: datetime | None = None
    until: datetime | None = None

    def __post_init__(self) -> None:
        if not self.topic:
            raise ValueError("the topic name must not be empty")
        if self.from_offset is not None and self.since is not None:
            raise ValueError("give at most one of --from-offset and --since")
        if self.to_offset is not None and self.until is not None:
            raise ValueError("give at most one of --to-offset and --until")
        if min(self.from_offset or 0, self.to_offset or 0) < 0:
            raise ValueError("offsets must be >= 0")
        start, end = self.from_offset, self.to_offset
        if start is not None and end is not None and start > end:
            raise ValueError("--from-offset must not be after --to-offset")
        for t in (self.since, self.until):
            if t is not None and t.tzinfo is None:
                raise ValueError("times need a time zone (parse_time assumes UTC)")
        if self.since and self.until and self.since >= self.until:
            raise ValueError("--since must be before --until")


def parse_time(text: str) -> datetime:
    """An ISO 8601 time (`2024-05-01T12:00:00Z`, `2024-05-01`); UTC when it names no zone.

    >>> parse_time("2024-05-01T12:00:00+02:00").isoformat()
    '2024-05-01T12:00:00+02:00'
    >>> parse_time("2024-05-01").isoformat()
    '2024-05-01T00:00:00+00:00'
    """
    t = datetime.fromisoformat(text)
    return t if t.tzinfo is not None else t.replace(tzinfo=UTC)


@dataclass(frozen=True)
class TopicRead:
    """What a read gave: decoded events in training order, and per partition the offset
    range `[start, end)` that was read."""

    topic: str
    events: list[Any]
    rejected: int  # messages that did not decode (or had no value)
    ranges: dict[int, tuple[int, int]] = field(default_factory=dict)

    @property
    def source(self) -> str:
        """For the manifest's data summary: `kafka:orders p0[0,5000) p1[0,4990)`."""
        parts = " ".join(f"p{p}[{a},{b})" for p, (a, b) in sorted(self.ranges.items()))
        return f"kafka:{self.topic} {parts}"


def read_topic(
    spec: FeatureSpec, options: dict[str, Any], selection: TopicRange
) -> tuple[History, str]:
    """A topic range as training history, and the range read (for the manifest's `source`).
    `options` are kafka-python client options (`streamer.kafka_io.common_options`:
    bootstrap servers, security)."""
    read = read_events(spec, options, selection)
    history = from_events(spec, read.events)
    rejected = read.rejected + history.rejected
    if history.rejected:
        log.warning(
            "%s: %d event(s) with non-finite features skipped", read.topic, history.rejected
        )
    return History(history.features, history.event_seconds, rejected, history.keys), read.source


def read_events(spec: FeatureSpec, options: dict[str, Any], selection: TopicRange) -> TopicRead:
    """Decode every record of the range; logs progress every PROGRESS_SECONDS."""
    from kafka import KafkaConsumer

    consumer = KafkaConsumer(
        **options,
        group_id=None,  # no group: nothing to join, nothing committed
        enable_auto_commit=False,
        isolation_level="read_committed",  # aborted transactions are not history
        max_poll_records=5000,
    )
    try:
        ranges = plan_ranges(consumer, selection)
        return _read(consumer, spec, selection.topic, ranges)
    finally:
        _close(consumer)


def _close(consumer: Any) -> None:
    # kafka-python logs the metadata refresh that close() itself cancels as an ERROR
    # ("Metadata refresh: failed Cancelled"): noise after every good read.
    cluster_log = logging.getLogger("kafka.cluster")
    level = cluster_log.level
    cluster_log.setLevel(logging.CRITICAL)
    try:
        consumer.close()
    finally:
        cluster_log.setLevel(level)


def plan_ranges(consumer: Any, selection: TopicRange) -> dict[Any, tuple[int, int]]:
    """Per TopicPartition the offsets `[start, end)` to read, within what the partition
    holds now (end offsets are the last stable ones under read_committed)."""
    from kafka import TopicPartition

    partitions = consumer.partitions_for_topic(selection.topic)
    if not partitions:
        raise SourceError(f"topic {selection.topic!r} does not exist (or is not readable)")
    tps = [TopicPartition(selection.topic, p) for p in sorted(partitions)]
    first = consumer.beginning_offsets(tps)
    last = consumer.end_offsets(tps)
    starts = _at_time(consumer, tps, selection.since, last)
    ends = _at_time(consumer, tps, selection.until, last)
    ranges = {}
    for tp in tps:
        start = starts[tp] if selection.since else first[tp]
        if selection.from_offset is not None:
            start = selection.from_offset
            if start < first[tp]:
                log.warning(
                    "%s[%d]: offsets before %d are gone (retention); reading from there",
                    tp.topic, tp.partition, first[tp],
                )  # fmt: skip
        start = min(max(start, first[tp]), last[tp])
        end = ends[tp] if selection.until else last[tp]
        if selection.to_offset is not None:
            end = selection.to_offset
        ranges[tp] = (start, max(start, min(end, last[tp])))
    return ranges


def _at_time(
    consumer: Any, tps: list[Any], when: datetime | None, last: dict[Any, int]
) -> dict[Any, int]:
    """Per partition the first offset whose record timestamp is >= `when`; the end offset
    where no record is that late."""
    if when is None:
        return dict(last)
    found = consumer.offsets_for_times({tp: int(when.timestamp() * 1000) for tp in tps})
    return {tp: found[tp].offset if found.get(tp) is not None else last[tp] for tp in tps}


def _read(
    consumer: Any, spec: FeatureSpec, topic: str, ranges: dict[Any, tuple[int, int]]
) -> TopicRead:
    decoder = msgspec.json.Decoder(spec.event_type())
    total = sum(end - start for start, end in ranges.values())
    log.info(
        "reading %s: %d record(s) in %d partition(s) (%s)",
        topic, total, len(ranges),
        ", ".join(f"{tp.partition}: [{a}, {b})" for tp, (a, b) in ranges.items()),
    )  # fmt: skip
    consumer.assign(list(ranges))
    for tp, (start, _) in ranges.items():
        consumer.seek(tp, start)
    pending = {tp for tp, (start, end) in ranges.items() if start < end}
    if done := [tp for tp in ranges if tp not in pending]:
        consumer.pause(*done)
    # Per partition (record timestamp, event), in offset order.
    decoded: dict[Any, list[tuple[int, Any]]] = {tp: [] for tp in ranges}
    read = rejected = 0
    started = last_report = time.monotonic()
    moved = {tp: (ranges[tp][0], started) for tp in pending}  # last position and when
    while pending:
        for tp, records in consumer.poll(timeout_ms=500).items():
            end = ranges[tp][1]
            for r in records:
                if r.offset >= end:
                    break  # fetched past the range: not ours
                read += 1
                try:
                    if r.value is None:
                        raise msgspec.DecodeError("no value (tombstone)")
                    decoded[tp].append((r.timestamp, decoder.decode(r.value)))
                except (msgspec.DecodeError, UnicodeDecodeError) as exc:
                    rejected += 1
                    if rejected <= 5:
                        log.warning("%s[%d]@%d skipped: %s", topic, tp.partition, r.offset, exc)
        now = time.monotonic()
        for tp in list(pending):
            position = consumer.position(tp)
            if position >= ranges[tp][1]:
                pending.discard(tp)
                consumer.pause(tp)  # fetch nothing more from a finished partition
            elif position != moved[tp][0]:
                moved[tp] = (position, now)
            elif now - moved[tp][1] > STALL_SECONDS:
                raise SourceError(
                    f"{topic}[{tp.partition}]: stuck at offset {position} for "
                    f"{STALL_SECONDS:.0f} s, {ranges[tp][1] - position} record(s) before the "
                    "range's end"
                )
        if now - last_report >= PROGRESS_SECONDS:
            last_report = now
            log.info("%s: %d of at most %d records read, %d rejected", topic, read, total, rejected)
    # Partitions interleaved by timestamp; heapq.merge only ever takes the head of each
    # list, so every partition keeps its offset order whatever its timestamps.
    merged = heapq.merge(*decoded.values(), key=lambda pair: pair[0])
    events = [event for _, event in merged]
    log.info(
        "%s: read %d record(s) in %.1f s: %d event(s), %d rejected",
        topic, read, time.monotonic() - started, len(events), rejected,
    )  # fmt: skip
    if rejected:
        log.warning("%s: %d message(s) skipped in all", topic, rejected)
    spans = {tp.partition: span for tp, span in ranges.items()}
    return TopicRead(topic, events, rejected, spans)
