"""Training history from a real topic: offset and time ranges read exactly, read_committed.

pytestmark is set here: a conftest's pytestmark does not reach the modules beside it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from itertools import islice
from pathlib import Path
from typing import Any

import msgspec
import pytest
from kafka import KafkaProducer
from kafka.admin import KafkaAdminClient, NewTopic

from streamer import bundle as bundles
from streamer.profiles import ORDERS
from training.__main__ import main as training_main
from training.simulate import simulate
from training.sources import TopicRange, read_events

pytestmark = pytest.mark.integration

N = 400  # plain events, event i to partition i % 2 with timestamp base + i seconds


@dataclass(frozen=True)
class Written:
    offset: int
    timestamp_ms: int
    order_id: str | None  # None: a message that does not decode
    committed: bool = True  # False: sent in an aborted transaction


@dataclass
class TopicLog:
    topic: str
    base_ms: int
    partitions: dict[int, list[Written]]

    def expected(self, keep: Callable[[Written], bool]) -> list[str]:
        """Order ids of the decodable, committed records `keep` selects, by timestamp."""
        rows = [w for ws in self.partitions.values() for w in ws if keep(w)]
        return [w.order_id for w in sorted(rows, key=lambda w: w.timestamp_ms)
                if w.order_id is not None and w.committed]  # fmt: skip

    def iso(self, seconds: float) -> str:
        return datetime.fromtimestamp(self.base_ms / 1000 + seconds, UTC).isoformat()


@pytest.fixture
def topic_log(kafka_bootstrap: str, unique: Callable[[str], str]) -> Iterator[TopicLog]:
    topic = unique("training")
    admin = KafkaAdminClient(bootstrap_servers=kafka_bootstrap)
    admin.create_topics([NewTopic(topic, 2, 1)], wait_for_metadata=True)
    # Recent record timestamps: retention would delete records stamped long ago.
    base_ms = int(time.time() * 1000) - 3_600_000
    sent: dict[int, list[tuple[Any, int, str | None, bool]]] = {0: [], 1: []}
    events = [e for e, _ in islice(simulate("orders", 11, 0.0), N + 6)]

    def send(producer: KafkaProducer, p: int, ts: int, value: bytes, oid: str | None, ok: bool):
        future = producer.send(topic, value=value, partition=p, timestamp_ms=ts)
        sent[p].append((future, ts, oid, ok))

    plain = KafkaProducer(bootstrap_servers=kafka_bootstrap, linger_ms=5)
    for i, event in enumerate(events[:N]):
        send(plain, i % 2, base_ms + 1000 * i, msgspec.json.encode(event), event["order_id"], True)
        if i == 40:
            send(plain, 0, base_ms + 40_500, b"{not an order", None, True)
    plain.flush()
    plain.close()
    # Then on partition 1 an aborted transaction and a committed one: read_committed skips
    # the first, and the read must get past the commit marker left at the end.
    tx = KafkaProducer(bootstrap_servers=kafka_bootstrap, transactional_id=unique("tx"))
    tx.init_transactions()
    for commit in (False, True):
        tx.begin_transaction()
        for k in range(3):
            event = events[N + 3 * commit + k]
            ts = base_ms + 1000 * (N + 3 * commit + k)
            send(tx, 1, ts, msgspec.json.encode(event), event["order_id"], commit)
        tx.flush()
        tx.commit_transaction() if commit else tx.abort_transaction()
    tx.close()
    partitions = {
        p: [Written(f.get(timeout=30).offset, ts, oid, ok) for f, ts, oid, ok in rows]
        for p, rows in sent.items()
    }
    try:
        yield TopicLog(topic, base_ms, partitions)
    finally:
        admin.delete_topics([topic])
        admin.close()


def order_ids(events: list[Any]) -> list[str]:
    return [e.order_id for e in events]


def test_whole_topic_read_committed(kafka_bootstrap: str, topic_log: TopicLog) -> None:
    read = read_events(ORDERS, {"bootstrap_servers": kafka_bootstrap}, TopicRange(topic_log.topic))
    assert order_ids(read.events) == topic_log.expected(lambda w: True)
    assert len(read.events) == N + 3  # the aborted three are not history
    assert read.rejected == 1
    assert read.ranges[0] == (0, N // 2 + 1)
    # Partition 1's end is past the records: 200 plain, 3 aborted, 3 committed, 2 markers.
    assert read.ranges[1] == (0, N // 2 + 8)


def test_offset_range_is_exact(kafka_bootstrap: str, topic_log: TopicLog) -> None:
    selection = TopicRange(topic_log.topic, from_offset=10, to_offset=60)
    read = read_events(ORDERS, {"bootstrap_servers": kafka_bootstrap}, selection)
    assert read.ranges == {0: (10, 60), 1: (10, 60)}
    assert order_ids(read.events) == topic_log.expected(lambda w: 10 <= w.offset < 60)
    assert len(read.events) == 99 and read.rejected == 1  # offset 21 of p0 is the bad one


def test_time_range_is_exact(kafka_bootstrap: str, topic_log: TopicLog) -> None:
    since = datetime.fromtimestamp(topic_log.base_ms / 1000 + 100, UTC)
    until = datetime.fromtimestamp(topic_log.base_ms / 1000 + 200, UTC)
    read = read_events(
        ORDERS,
        {"bootstrap_servers": kafka_bootstrap},
        TopicRange(topic_log.topic, since=since, until=until),
    )
    lo, hi = topic_log.base_ms + 100_000, topic_log.base_ms + 200_000
    assert order_ids(read.events) == topic_log.expected(lambda w: lo <= w.timestamp_ms < hi)
    assert len(read.events) == 100 and read.rejected == 0
    late = TopicRange(topic_log.topic, since=datetime.fromtimestamp(time.time() + 60, UTC))
    assert read_events(ORDERS, {"bootstrap_servers": kafka_bootstrap}, late).events == []


def test_fit_from_a_time_range(kafka_bootstrap: str, topic_log: TopicLog, tmp_path: Path) -> None:
    config = tmp_path / "orders.toml"
    config.write_text(  # the config's broker is wrong on purpose: --bootstrap overrides it
        'profile = "orders"\n[kafka]\nbootstrap_servers = "127.0.0.1:1"\ninput_topic = "a"\n'
        f'alert_topic = "b"\ndead_letter_topic = "c"\n[model]\nbundle = "{tmp_path / "reg"}"\n'
        "[training]\nepochs = 1\n"
    )
    argv = ["fit", "--config", str(config), "--topic", topic_log.topic,
            "--bootstrap", kafka_bootstrap,
            "--since", topic_log.iso(100), "--until", topic_log.iso(300)]  # fmt: skip
    assert training_main(argv) == 0
    b = bundles.load(tmp_path / "reg", expected_spec=ORDERS)
    assert b.manifest.data["events"] == 200
    # Partition 0's offsets are one ahead from 21 on: the bad message sits there.
    assert b.manifest.data["source"] == f"kafka:{topic_log.topic} p0[51,151) p1[50,150)"
