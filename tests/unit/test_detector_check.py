"""Detector._check's watchdog: a member stuck outside its group gets a new consumer, and
only then (an idle replica, or a broker that does not answer, keeps its consumer)."""

from __future__ import annotations

import time

import pytest
from kafka import TopicPartition
from kafka.errors import KafkaConnectionError

from streamer import app
from streamer.config import from_mapping

SETTINGS = from_mapping(
    {
        "profile": "orders",
        "kafka": {"input_topic": "i", "alert_topic": "a", "dead_letter_topic": "d"},
        "model": {"bundle": "b"},
    }
)


class FakeConsumer:
    def __init__(self, assigned: bool, in_touch: bool, broker_answers: bool) -> None:
        self.assigned, self.in_touch, self.broker_answers = assigned, in_touch, broker_answers

    def lag(self) -> dict[TopicPartition, int]:
        return {}

    def coordinator_in_touch(self, within_seconds: float = 10.0) -> bool:
        return self.in_touch

    def assignment(self) -> set[TopicPartition]:
        return {TopicPartition("i", 0)} if self.assigned else set()

    def topics(self) -> set[str]:
        if not self.broker_answers:
            raise KafkaConnectionError("down")
        return {"i"}


@pytest.mark.parametrize(
    ("assigned", "in_touch", "broker_answers", "replaced"),
    [
        (False, False, True, True),  # stuck outside the group: replaced
        (False, True, True, False),  # an idle replica (more replicas than partitions)
        (False, False, False, False),  # the broker is away: waiting is all that helps
        (True, False, True, False),  # mid-stream outage with partitions: the client rides it
    ],
)
def test_only_a_member_stuck_outside_its_group_is_replaced(
    assigned: bool, in_touch: bool, broker_answers: bool, replaced: bool
) -> None:
    detector = app.Detector(SETTINGS)
    calls: list[str] = []
    detector._replace_consumer = calls.append  # type: ignore[method-assign]
    consumer = FakeConsumer(assigned, in_touch, broker_answers)
    detector._check(consumer, polled_any=False)  # type: ignore[arg-type]
    assert not calls  # silent only now: not yet
    detector._silent_since = time.monotonic() - app.STUCK_SECONDS - 1 if not in_touch else None
    detector._next_metadata = 0.0
    detector._check(consumer, polled_any=False)  # type: ignore[arg-type]
    assert bool(calls) is replaced


def test_readiness_expires_when_the_loop_stops_checking() -> None:
    # A delivery blocked on a broker that went away (flush waits up to
    # kafka.delivery_timeout_seconds) stops the checks; /readyz must not keep their last answer.
    detector = app.Detector(SETTINGS)
    ready = detector.registry.get_sample_value
    assert not detector.is_ready() and ready("anomaly_ready") == 0.0  # never checked yet
    detector._check(FakeConsumer(True, True, True), polled_any=False)  # type: ignore[arg-type]
    assert detector.is_ready() and ready("anomaly_ready") == 1.0
    detector._checked_at -= app.READY_FRESH_SECONDS  # the loop has been away since
    assert not detector.is_ready() and ready("anomaly_ready") == 0.0
    detector._check(FakeConsumer(True, True, True), polled_any=False)  # type: ignore[arg-type]
    assert detector.is_ready()
    detector._check(FakeConsumer(True, False, True), polled_any=False)  # type: ignore[arg-type]
    assert not detector.is_ready()  # checked just now, and out of touch
