"""The outbox's own bookkeeping; Kafka behaviour itself is covered by the integration tests."""

from __future__ import annotations

import numpy as np
import pytest
from kafka import TopicPartition
from kafka.structs import OffsetAndMetadata

from streamer.config import from_mapping
from streamer.delivery import DEAD_LETTER_MAX_BYTES, DeliveryError, Outbox, Record, dead_letter
from streamer.pipeline import BatchResult
from streamer.records import DeadLetter, RawMessage

KAFKA = from_mapping(
    {
        "profile": "orders",
        "kafka": {"input_topic": "i", "alert_topic": "a", "dead_letter_topic": "d",
                  "commit_interval_seconds": 60},
        "model": {"bundle": "b"},
    }
).kafka  # fmt: skip
TP = TopicPartition("i", 0)


class Recording:
    """A transport that records what the outbox asks of it, and fails when told to."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, object]] = []
        self.fail_send = self.fail_commit = 0

    def prepare(self) -> None: ...
    def close(self) -> None: ...

    def begin(self) -> None:
        self.calls.append(("begin", None))

    def send(self, records: list[Record]) -> None:
        if self.fail_send:
            self.fail_send -= 1
            raise DeliveryError("broker away")
        self.calls.append(("send", [r[2] for r in records]))

    def commit(self, offsets: dict) -> float:
        if self.fail_commit:
            self.fail_commit -= 1
            raise DeliveryError("broker away")
        self.calls.append(("commit", {tp: om.offset for tp, om in offsets.items()}))
        return 0.0

    def abort(self) -> None:
        self.calls.append(("abort", None))


def batch(*values: bytes) -> BatchResult:
    dead = [
        DeadLetter(RawMessage("i", 0, i, None, v, 0), "schema", "x") for i, v in enumerate(values)
    ]
    return BatchResult(len(values), [], dead, np.empty(0), 1.0)


def offsets(n: int) -> dict:
    return {TP: OffsetAndMetadata(n, "", -1)}


def test_batches_share_one_commit_with_the_highest_offsets() -> None:
    t = Recording()
    box = Outbox(t, KAFKA)
    box.add(batch(b"a"), offsets(10))
    box.add(batch(b"b"), offsets(20))
    assert not box.commit_due()  # 60 s interval
    box.commit()
    assert t.calls == [
        ("begin", None), ("send", [b"a"]), ("send", [b"b"]), ("commit", {TP: 20}),
    ]  # fmt: skip
    assert box.pending_batches == 0 and box.commit() == {}


def test_a_failed_send_resends_everything_before_the_commit() -> None:
    t = Recording()
    box = Outbox(t, KAFKA)
    box.add(batch(b"a"), offsets(10))
    t.fail_send = 1
    with pytest.raises(DeliveryError):
        box.add(batch(b"b"), offsets(20))
    box.commit()
    assert t.calls[-4:] == [
        ("abort", None), ("begin", None), ("send", [b"a", b"b"]), ("commit", {TP: 20}),
    ]  # fmt: skip


def test_a_failed_commit_keeps_everything_for_the_retry() -> None:
    t = Recording()
    box = Outbox(t, KAFKA)
    box.add(batch(b"a"), offsets(10))
    t.fail_commit = 1
    with pytest.raises(DeliveryError):
        box.commit()
    assert box.pending_batches == 1
    box.resend()
    box.commit()
    assert t.calls[-2:] == [("send", [b"a"]), ("commit", {TP: 10})]


def test_drop_forgets_batches_left_to_a_new_owner() -> None:
    t = Recording()
    box = Outbox(t, KAFKA)
    box.add(batch(b"a"), offsets(10))
    box.drop()
    assert box.pending_batches == 0 and box.commit() == {}
    assert t.calls[-1] == ("abort", None)


def test_a_dead_letter_too_large_to_send_is_cut_and_says_so() -> None:
    huge = b"x" * (DEAD_LETTER_MAX_BYTES + 4_000)  # a broker takes it; with headers, too big
    ((topic, _, value, headers), (_, _, small, small_headers)) = (
        dead_letter(d, "dlq") for d in batch(huge, b"{}").dead_letters
    )
    assert topic == "dlq" and value == huge[:DEAD_LETTER_MAX_BYTES]
    assert dict(headers)["dlq.truncated_from_bytes"] == str(len(huge)).encode()
    assert dict(headers)["dlq.offset"] == b"0"  # where the whole original still is
    assert small == b"{}" and "dlq.truncated_from_bytes" not in dict(small_headers)
    # alerts.max_message_bytes (1,000,000) is the too_large reason's limit: those stay whole.
    (whole,) = batch(b"y" * 1_000_100).dead_letters
    assert dead_letter(whole, "dlq")[2] == whole.message.value
