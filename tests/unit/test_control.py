"""Runtime control and feedback: message decoding, re-judging, bounds, threshold changes."""

from __future__ import annotations

from types import SimpleNamespace

import msgspec
import numpy as np
import pytest

from streamer.aggregates import AggregateState
from streamer.app import Detector
from streamer.config import ControlSettings, from_mapping
from streamer.control import ControlError, ControlState, SetThreshold
from streamer.features import FeatureSpec, LabelRate
from streamer.threshold import RollingQuantileThreshold


def judge(c: ControlState, keys: list[str], scores: list[float], base: float = 1.0):  # type: ignore[no-untyped-def]
    s = np.array(scores)
    return c.adjust(keys, s, s > base, np.full(s.size, base))


def test_mute_override_and_unmute() -> None:
    c = ControlState(ControlSettings())
    assert c.apply_control(b'{"action": "mute", "entity": "a"}') == "mute"
    assert c.apply_control(b'{"action": "set_entity_threshold", "entity": "b", "value": 5}')
    flagged, used = judge(c, ["a", "b", "c"], [9.0, 4.0, 4.0])
    assert flagged.tolist() == [False, False, True] and used.tolist() == [1.0, 5.0, 1.0]
    c.apply_control(b'{"action": "unmute", "entity": "a"}')
    c.apply_control(b'{"action": "clear_entity_threshold", "entity": "b"}')
    assert not c.active
    assert judge(c, ["a", "b"], [9.0, 4.0])[0].tolist() == [True, True]


def test_false_positives_raise_one_entity_within_the_bound() -> None:
    c = ControlState(ControlSettings(false_positive_factor=1.5, max_factor=2.0))
    for _ in range(5):
        assert c.apply_feedback(b'{"type": "false_positive", "entity": "a"}', None) == (
            "false_positive",
            "applied",
        )
    assert c.factors == {"a": 2.0}  # 1.5, 2.25 -> capped at 2
    assert c.apply_feedback(b'{"type": "ack", "entity": "b"}', None) == ("ack", "applied")
    flagged, used = judge(c, ["a", "b"], [1.9, 1.9])
    assert flagged.tolist() == [False, True] and used.tolist() == [2.0, 1.0]


def test_a_factor_only_drops_alerts_an_override_judges_anew() -> None:
    """A threshold that did not flag a score above its value (a smoothed threshold's cooldown
    or run length) keeps it unflagged under a factor; a fixed override decides by itself."""
    c = ControlState(ControlSettings(false_positive_factor=1.5))
    c.apply_feedback(b'{"type": "false_positive", "entity": "a"}', None)
    c.apply_control(b'{"action": "set_entity_threshold", "entity": "b", "value": 2}')
    scores = np.array([9.0, 9.0, 9.0])
    flagged, used = c.adjust(["a", "b", "c"], scores, np.zeros(3, dtype=bool), np.ones(3))
    assert flagged.tolist() == [False, True, False] and used.tolist() == [1.5, 2.0, 1.0]
    flagged, _ = c.adjust(["a", "b", "c"], scores, np.ones(3, dtype=bool), np.ones(3))
    assert flagged.tolist() == [True, True, True]


def test_feedback_without_entity_is_matched_by_id_or_counted_unmatched() -> None:
    c = ControlState(ControlSettings())
    c.remember(["alert-1", "incident-9"], ["a", "b"])
    fp = b'{"type": "false_positive"}'
    assert c.apply_feedback(fp, key=b"alert-1") == ("false_positive", "applied")
    assert c.apply_feedback(b'{"type": "false_positive", "incident_id": "incident-9"}', None)[1]
    assert set(c.factors) == {"a", "b"}
    assert c.apply_feedback(fp, key=b"unknown") == ("false_positive", "unmatched")


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"not json",
        b'{"action": "explode"}',
        b'{"action": "set_threshold"}',
        b'{"action": "set_threshold", "quantile": 1.5}',
        b'{"action": "set_entity_threshold", "entity": "a", "value": -1}',
        b'{"action": "mute"}',
    ],
)
def test_bad_control_messages_are_refused_with_a_reason(raw: bytes) -> None:
    c = ControlState(ControlSettings())
    with pytest.raises(ControlError, match="control message refused"):
        c.apply_control(raw)
    assert not c.active and c.threshold is None


def test_set_threshold_reconfigures_the_rolling_threshold() -> None:
    c = ControlState(ControlSettings())
    c.apply_control(b'{"action": "set_threshold", "quantile": 0.5, "window_size": 50}')
    assert c.threshold == SetThreshold(quantile=0.5, window_size=50)
    t = RollingQuantileThreshold(100, 0.99, 10, np.arange(100.0))
    t.reconfigure(c.threshold.quantile, c.threshold.window_size)
    # The 50 most recent scores (50..99) are kept; their median is the new threshold.
    assert t.window_size == 50 and t.count == 50 and t.value == pytest.approx(74.5)
    t.reconfigure(window_size=200)  # growing keeps everything held
    assert t.count == 50 and t.value == pytest.approx(74.5)


def test_label_feedback_reaches_the_label_rate_features() -> None:
    spec = FeatureSpec(
        profile="p", entity_field="card", time_field="ts", time_format="epoch_ms",
        id_field="tx",
        columns=[LabelRate(key="shop", windows_seconds=[3600.0], delay_seconds=0.0,
                           stats=["confirmed", "rate"])],
    )  # fmt: skip
    c = ControlState(ControlSettings(), spec.time_format)
    state = AggregateState(spec, labels=c.labels)  # what build_pipeline does
    Event = spec.event_type()
    state.update([Event(tx=1, card=1, shop="s", ts=60_000), Event(tx=2, card=2, shop="s",
                                                                  ts=120_000)])  # fmt: skip

    def label(**fields: object) -> tuple[str, str]:
        doc = {"type": "label", "key_field": "shop", "key": "s", "event_id": 1, "anomaly": True}
        return c.apply_feedback(msgspec.json.encode(doc | fields), key=None)

    assert label(event_time=60_000) == ("label", "applied")  # milliseconds, as the spec
    # "Not anomalous" withdraws a label; event 2 has none to take back.
    assert label(event_time="1970-01-01T00:02:00Z", event_id=2, anomaly=False) == (
        "label", "unmatched")  # fmt: skip
    assert label(event_time=60_000, key_field="card") == ("label", "unmatched")
    with pytest.raises(ControlError, match="event_time"):
        label(event_time="1970-01-01T00:02:00")  # no zone
    with pytest.raises(ControlError, match="anomaly"):
        c.apply_feedback(b'{"type": "label", "key_field": "shop", "key": "s", "event_id": 1, '
                         b'"event_time": 1}', key=None)  # fmt: skip
    with pytest.raises(ControlError, match="event_id"):
        c.apply_feedback(b'{"type": "label", "key_field": "shop", "key": "s", '
                         b'"event_time": 60000, "anomaly": true}', key=None)  # fmt: skip
    with pytest.raises(ControlError, match="needs event_time"):  # a label needs its hour
        c.apply_feedback(b'{"type": "label", "key_field": "shop", "key": "s", "event_id": 1, '
                         b'"anomaly": true}', key=None)  # fmt: skip
    x = state.update([Event(tx=3, card=3, shop="s", ts=3_600_000),
                      Event(tx=4, card=3, shop="t", ts=3_600_000)])  # fmt: skip
    assert x.tolist() == [[1.0, 0.5], [0.0, 0.0]]
    state.clear()  # a partition move: the labels stay with the ControlState
    state.update([Event(tx=1, card=1, shop="s", ts=60_000)])
    assert state.update([Event(tx=3, card=3, shop="s", ts=3_600_000)]).tolist() == [[1.0, 1.0]]
    # The alert feedback still works as before.
    assert c.apply_feedback(b'{"type": "ack", "entity": "e"}', key=None) == ("ack", "applied")


LABELED = FeatureSpec(
    profile="p", entity_field="card", time_field="ts", time_format="epoch_s", id_field="tx",
    columns=[LabelRate(key="shop", windows_seconds=[3600.0], delay_seconds=0.0,
                       stats=["confirmed", "rate"])],
)  # fmt: skip


def test_a_repeated_label_is_a_duplicate_and_counts_once() -> None:
    """At-least-once delivery, or two investigators confirming one event: the event's label
    counts once, and the rate is the real share (here a half, not 1)."""
    spec = LABELED
    c = ControlState(ControlSettings(), spec.time_format)
    state = AggregateState(spec, labels=c.labels)
    Event = spec.event_type()
    state.update([Event(tx=f"t{k}", card=k, shop="s", ts=60.0 * k) for k in range(4)])
    label = msgspec.json.encode(
        {"type": "label", "key_field": "shop", "key": "s", "event_id": "t1", "event_time": 60,
         "anomaly": True}
    )  # fmt: skip
    assert c.apply_feedback(label, key=None) == ("label", "applied")
    assert c.apply_feedback(label, key=None) == ("label", "duplicate")
    same_event_iso = label.replace(b"60", b'"1970-01-01T00:01:00Z"')
    assert c.apply_feedback(same_event_iso, key=None) == ("label", "duplicate")
    other = label.replace(b'"t1"', b'"t2"')
    assert c.apply_feedback(other, key=None) == ("label", "applied")
    x = state.update([Event(tx="t9", card=9, shop="s", ts=3600.0)])
    assert x.tolist() == [[2.0, 0.5]]  # two of the four events, each once


def _feedback_detector(**sections: dict) -> Detector:
    """A Detector (not started) that reads a feedback topic, for its feedback path."""
    settings = from_mapping(
        {"profile": "orders", "model": {"bundle": "unused"},
         "kafka": {"input_topic": "in", "alert_topic": "a", "dead_letter_topic": "d"},
         "control": {"feedback_topic": "fb"}, **sections}
    )  # fmt: skip
    return Detector(settings)


def test_the_label_store_keeps_state_max_entities_keys() -> None:
    """The daemon's label store is bounded like its other per-entity state: by
    state.max_entities, least recently labeled key evicted first."""
    assert _feedback_detector()._control.labels.max_keys == 100_000  # type: ignore[union-attr]
    d = _feedback_detector(state={"max_entities": 2})
    assert d._control is not None and d._control.labels.max_keys == 2
    d._control.labels.require(["shop"], 3600.0)

    def label(shop: str) -> SimpleNamespace:
        value = msgspec.json.encode(
            {"type": "label", "key_field": "shop", "key": shop, "event_id": shop,
             "event_time": 60, "anomaly": True}
        )  # fmt: skip
        return SimpleNamespace(topic="fb", partition=0, offset=0, key=None, value=value)

    d._apply_control([label("a"), label("b"), label("c")])
    labels = d._control.labels
    assert (labels.keys, labels.evictions) == (2, 1)
    assert labels.confirmed("shop", "a", [(0, 1)]) == [0]  # the oldest key went
    assert labels.confirmed("shop", "c", [(0, 1)]) == [1]


def test_the_feedback_path_counts_a_duplicate_label_apart() -> None:
    """The daemon's feedback loop: a redelivered label is counted as `duplicate` in
    anomaly_feedback_total, and changes no feature."""
    d = _feedback_detector()
    assert d._control is not None
    spec = LABELED
    state = AggregateState(spec, labels=d._control.labels)  # as build_pipeline shares it
    Event = spec.event_type()
    state.update([Event(tx=k, card=k, shop="s", ts=60.0 * k) for k in range(4)])
    value = msgspec.json.encode(
        {"type": "label", "key_field": "shop", "key": "s", "event_id": 2, "event_time": 120,
         "anomaly": True}
    )  # fmt: skip
    records = [SimpleNamespace(topic="fb", partition=0, offset=k, key=None, value=value)
               for k in range(3)]  # fmt: skip
    d._apply_control(records)

    def feedback(outcome: str) -> float | None:
        return d.registry.get_sample_value(
            "anomaly_feedback_total", {"type": "label", "outcome": outcome}
        )

    assert (feedback("applied"), feedback("duplicate"), feedback("unmatched")) == (1.0, 2.0, 0.0)
    assert state.update([Event(tx=9, card=9, shop="s", ts=3600.0)]).tolist() == [[1.0, 0.25]]


def test_the_feedback_path_withdraws_and_relabels() -> None:
    """`"anomaly": false` for a counted label takes it back (counted as `withdrawn`); one for
    an event not counted changes nothing (`unmatched`); a relabel counts again."""
    d = _feedback_detector()
    assert d._control is not None
    spec = LABELED
    state = AggregateState(spec, labels=d._control.labels)
    Event = spec.event_type()
    state.update([Event(tx=k, card=k, shop="s", ts=60.0 * k) for k in range(4)])

    def message(event_id: int, anomaly: bool) -> SimpleNamespace:
        # A withdrawal goes by the id: it leaves event_time out.
        time = {"event_time": 60 * event_id} if anomaly else {}
        value = msgspec.json.encode(
            {"type": "label", "key_field": "shop", "key": "s", "event_id": event_id,
             "anomaly": anomaly} | time
        )  # fmt: skip
        return SimpleNamespace(topic="fb", partition=0, offset=0, key=None, value=value)

    def feedback(outcome: str) -> float | None:
        return d.registry.get_sample_value(
            "anomaly_feedback_total", {"type": "label", "outcome": outcome}
        )

    assert feedback("withdrawn") == 0.0  # exported before any withdrawal
    later = Event(tx=9, card=9, shop="s", ts=3600.0)
    d._apply_control([message(1, True), message(2, True), message(1, False)])
    assert state.update([later]).tolist() == [[1.0, 0.25]]  # event 2's label stands
    d._apply_control([message(1, False), message(3, False)])  # nothing left to take back
    assert state.update([later]).tolist() == [[1.0, 0.25]]
    d._apply_control([message(1, True)])  # the investigators change their minds again
    assert state.update([later]).tolist() == [[2.0, 0.5]]
    outcomes = ("applied", "withdrawn", "unmatched", "duplicate")
    assert [feedback(o) for o in outcomes] == [3.0, 1.0, 2.0, 0.0]
