"""training/sources.py without a broker: a fake consumer that serves in-memory partitions."""

from __future__ import annotations

import logging
from collections import namedtuple
from datetime import UTC, datetime
from typing import Any

import kafka
import msgspec
import pytest
from kafka import TopicPartition

from streamer.profiles import SENSORS
from training.__main__ import main as training_main
from training.sources import (
    TopicRange,
    parse_time,
    plan_ranges,
    read_events,
    read_topic,
)

Record = namedtuple("Record", "offset timestamp value")
OffsetAndTimestamp = namedtuple("OffsetAndTimestamp", "offset timestamp")


class FakeConsumer:
    """Partitions as lists of (timestamp ms, value); offsets start at `first[p]`."""

    def __init__(
        self,
        topic: str,
        logs: dict[int, list[tuple[int, bytes | None]]],
        first: dict[int, int] | None = None,
        batch: int = 3,
    ) -> None:
        self.topic, self.logs, self.batch = topic, logs, batch
        self.first = first or {}
        self.pos: dict[TopicPartition, int] = {}
        self.paused: set[TopicPartition] = set()
        self.closed = False

    def _start(self, tp: TopicPartition) -> int:
        return self.first.get(tp.partition, 0)

    def partitions_for_topic(self, topic: str) -> set[int]:
        return set(self.logs) if topic == self.topic else set()

    def beginning_offsets(self, tps: list[TopicPartition]) -> dict[TopicPartition, int]:
        return {tp: self._start(tp) for tp in tps}

    def end_offsets(self, tps: list[TopicPartition]) -> dict[TopicPartition, int]:
        return {tp: self._start(tp) + len(self.logs[tp.partition]) for tp in tps}

    def offsets_for_times(self, times: dict[TopicPartition, int]) -> dict[TopicPartition, Any]:
        found: dict[TopicPartition, Any] = {}
        for tp, ms in times.items():
            hits = [i for i, (ts, _) in enumerate(self.logs[tp.partition]) if ts >= ms]
            i = hits[0] if hits else None
            found[tp] = None if i is None else OffsetAndTimestamp(self._start(tp) + i, ms)
        return found

    def assign(self, tps: list[TopicPartition]) -> None:
        self.pos = {tp: 0 for tp in tps}

    def seek(self, tp: TopicPartition, offset: int) -> None:
        self.pos[tp] = offset

    def pause(self, *tps: TopicPartition) -> None:
        self.paused.update(tps)

    def position(self, tp: TopicPartition) -> int:
        return self.pos[tp]

    def poll(self, timeout_ms: int = 0) -> dict[TopicPartition, list[Record]]:
        out = {}
        for tp in self.pos:
            if tp in self.paused:
                continue
            start = self._start(tp)
            i = self.pos[tp] - start
            chunk = self.logs[tp.partition][i : i + self.batch]
            if chunk:
                out[tp] = [Record(start + i + k, ts, v) for k, (ts, v) in enumerate(chunk)]
                self.pos[tp] += len(chunk)
        return out

    def close(self) -> None:
        self.closed = True


def reading(rid: str, sensor: str, ts: int) -> bytes:
    values = {"rpm": 1500.0, "temperature": 60.0, "pressure": 2.0, "vibration": 0.1}
    return msgspec.json.encode(
        {"sensor_id": sensor, "reading_id": rid, "ts": ts, "current": 10.0, **values}
    )


def two_partitions() -> dict[int, list[tuple[int, bytes | None]]]:
    # p0 holds sensor a, p1 sensor b; p1's timestamps are not monotonic (producer clocks).
    p0 = [(1000 * i, reading(f"a{i}", "a", 1000 * i)) for i in range(10)]
    p1 = [(1000 * i + 500, reading(f"b{i}", "b", 1000 * i + 500)) for i in range(10)]
    p1[4] = (9500, p1[4][1])
    p0[6] = (6000, b"{not json")
    p1[7] = (7500, None)  # a tombstone
    return {0: p0, 1: p1}


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> FakeConsumer:
    consumer = FakeConsumer("t", two_partitions(), first={1: 100})
    monkeypatch.setattr(kafka, "KafkaConsumer", lambda **options: consumer)
    return consumer


def ids(events: list[Any]) -> list[str]:
    return [e.reading_id for e in events]


def test_whole_topic_partitions_merged_by_time_each_in_offset_order(fake: FakeConsumer) -> None:
    read = read_events(SENSORS, {}, TopicRange("t"))
    assert read.ranges == {0: (0, 10), 1: (100, 110)}
    assert read.rejected == 2  # the bad JSON and the tombstone
    got = ids(read.events)
    assert len(got) == 18
    assert [i for i in got if i.startswith("a")] == [f"a{i}" for i in range(10) if i != 6]
    # b4 (timestamp 9.5 s) holds back b5.. of its partition: order within it is kept.
    assert [i for i in got if i.startswith("b")] == [f"b{i}" for i in range(10) if i != 7]
    assert got[:9] == ["a0", "b0", "a1", "b1", "a2", "b2", "a3", "b3", "a4"]
    assert fake.closed
    assert read.source == "kafka:t p0[0,10) p1[100,110)"


def test_offset_range_is_exact_per_partition(fake: FakeConsumer) -> None:
    fake.first = {}  # both partitions start at 0: one range reads both
    read = read_events(SENSORS, {}, TopicRange("t", from_offset=2, to_offset=5))
    assert read.ranges == {0: (2, 5), 1: (2, 5)}
    assert sorted(ids(read.events)) == ["a2", "a3", "a4", "b2", "b3", "b4"]


def test_ranges_are_clamped_to_what_the_partitions_hold(
    fake: FakeConsumer, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING):
        ranges = plan_ranges(fake, TopicRange("t", from_offset=5, to_offset=1000))
    by_partition = {tp.partition: r for tp, r in ranges.items()}
    assert by_partition == {0: (5, 10), 1: (100, 110)}
    assert "offsets before 100 are gone" in caplog.text
    empty = plan_ranges(fake, TopicRange("t", from_offset=500))
    assert {tp.partition: r for tp, r in empty.items()} == {0: (10, 10), 1: (110, 110)}


def test_time_range_uses_record_timestamps(fake: FakeConsumer) -> None:
    since = datetime.fromtimestamp(2.0, UTC)
    until = datetime.fromtimestamp(5.0, UTC)
    ranges = plan_ranges(fake, TopicRange("t", since=since, until=until))
    # p0: ts 2000 at offset 2, first ts >= 5000 at 5; p1: 2500 at 102, 9500 (b4) at 104.
    assert {tp.partition: r for tp, r in ranges.items()} == {0: (2, 5), 1: (102, 104)}
    late = plan_ranges(fake, TopicRange("t", since=datetime.fromtimestamp(60.0, UTC)))
    assert {tp.partition: r for tp, r in late.items()} == {0: (10, 10), 1: (110, 110)}
    read = read_events(SENSORS, {}, TopicRange("t", since=since, until=until))
    assert ids(read.events) == ["a2", "b2", "a3", "b3", "a4"]


def test_read_topic_gives_history_and_source(fake: FakeConsumer) -> None:
    history, source = read_topic(SENSORS, {}, TopicRange("t", to_offset=104))
    assert source == "kafka:t p0[0,10) p1[100,104)"
    assert history.features.shape == (9 + 4, len(SENSORS.feature_names()))
    assert history.rejected == 1  # a6; b7 is past the range
    assert set(history.keys) == {"a", "b"}


def test_missing_topic_is_named(fake: FakeConsumer) -> None:
    from training.sources import SourceError

    with pytest.raises(SourceError, match="topic 'nope' does not exist"):
        read_events(SENSORS, {}, TopicRange("nope"))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"from_offset": 1, "since": datetime(2024, 1, 1, tzinfo=UTC)}, "--from-offset and"),
        ({"to_offset": 1, "until": datetime(2024, 1, 1, tzinfo=UTC)}, "--to-offset and"),
        ({"from_offset": 5, "to_offset": 4}, "must not be after"),
        ({"from_offset": -1}, ">= 0"),
        ({"since": datetime(2024, 1, 1)}, "time zone"),
        (
            {"since": datetime(2024, 1, 2, tzinfo=UTC), "until": datetime(2024, 1, 1, tzinfo=UTC)},
            "before --until",
        ),
    ],
)
def test_range_validation(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        TopicRange("t", **kwargs)


def test_parse_time_defaults_to_utc() -> None:
    assert parse_time("2024-05-01T12:00:00Z") == datetime(2024, 5, 1, 12, tzinfo=UTC)
    assert parse_time("2024-05-01T12:00:00").tzinfo is UTC


def test_cli_wants_exactly_one_source_and_ranges_only_with_a_topic(
    tmp_path: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        training_main(["fit", "--config", "c.toml"])
    assert exit_info.value.code == 2
    with pytest.raises(SystemExit):
        training_main(["fit", "--config", "c.toml", "--events", "e.jsonl", "--topic", "t"])
    assert "not allowed with argument" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        training_main(["fit", "--config", "c.toml", "--topic", "t", "--since", "yesterday"])
    assert "not an ISO 8601 time: 'yesterday'" in capsys.readouterr().err
    code = training_main(["fit", "--config", "c.toml", "--events", "e", "--from-offset", "3"])
    assert code == 2
    assert "go with --topic" in capsys.readouterr().err
