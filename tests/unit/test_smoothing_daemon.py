"""`[smoothing]` in the daemon: build_pipeline's SmoothedThreshold and what touches it
(runtime reconfigure, learn = false, reloads and shadow pipelines, replays, control)."""

from __future__ import annotations

from dataclasses import replace
from itertools import islice
from typing import Any

import msgspec
import numpy as np
import pytest

from streamer import bundle as bundles
from streamer.app import Detector, build_pipeline
from streamer.config import Settings, from_mapping
from streamer.pipeline import Pipeline
from streamer.records import Alert, RawMessage
from streamer.smoothing import SmoothedThreshold, SmoothingSettings
from streamer.threshold import RollingQuantileThreshold
from training.evaluate import DetectorSettings
from training.simulate import simulate

SPIKES = (300, 320, 500)  # absurd orders; with a 100-row cooldown the one at 320 is silent
COOLDOWN = {"ewma_alpha": 0.5, "cooldown_rows": 100}


def settings(smoothing: dict[str, Any] | None = None, **sections: Any) -> Settings:
    raw: dict[str, Any] = {
        "profile": "orders",
        "kafka": {"input_topic": "in", "alert_topic": "a", "dead_letter_topic": "d"},
        "model": {"bundle": "unused"},
        "threshold": {"quantile": 0.999, "min_samples": 100},
        **sections,
    }
    if smoothing is not None:
        raw["smoothing"] = smoothing
    return from_mapping(raw)


def spiky_stream(n: int = 700, entity: str = "c-spike") -> list[RawMessage]:
    """Clean simulated orders; at each of SPIKES an absurd order of `entity`."""
    out = []
    for i, (event, _) in enumerate(islice(simulate("orders", 21, 0.0), n)):
        if i in SPIKES:
            event = {**msgspec.to_builtins(event), "amount": 250_000.0, "items": 2}
            event["customer_id"] = entity
        out.append(RawMessage("orders", 0, i, None, msgspec.json.encode(event), 0))
    return out


def feed(p: Pipeline, messages: list[RawMessage], size: int = 50) -> list[Alert]:
    alerts: list[Alert] = []
    for i in range(0, len(messages), size):
        alerts += p.process(messages[i : i + size]).alerts
    return alerts


def offsets(alerts: list[Alert]) -> list[int]:
    return [a.source.offset for a in alerts]


def former_evaluator_pipeline(s: Settings, bundle: bundles.Bundle) -> Pipeline:
    """What training/evaluate.py did before [smoothing]: the daemon's pipeline, then its
    threshold swapped for a SmoothedThreshold (kept here as the reference)."""
    assert s.smoothing is not None
    p = build_pipeline(msgspec.structs.replace(s, smoothing=None), bundle, bundle.load_scorer())
    t = s.threshold
    p.threshold = SmoothedThreshold(
        t.window_size, t.quantile, t.min_samples, bundle.warm_start, s.smoothing
    )
    return p


def test_build_pipeline_smooths_only_when_configured(orders_bundle: bundles.Bundle) -> None:
    plain = build_pipeline(settings(), orders_bundle, orders_bundle.load_scorer())
    assert type(plain.threshold) is RollingQuantileThreshold
    s = settings({"ewma_alpha": 0.1})
    smoothed = build_pipeline(s, orders_bundle, orders_bundle.load_scorer())
    assert isinstance(smoothed.threshold, SmoothedThreshold)
    assert smoothed.threshold.settings == SmoothingSettings(ewma_alpha=0.1)
    # Started from the bundle's warm start, as the plain threshold is.
    assert smoothed.threshold.count == plain.threshold.count > 0
    assert smoothed.threshold.value == plain.threshold.value


def test_same_alerts_as_the_evaluator_before_the_change(orders_bundle: bundles.Bundle) -> None:
    s = settings(COOLDOWN)
    stream = spiky_stream()
    new = build_pipeline(s, orders_bundle, orders_bundle.load_scorer())
    old = former_evaluator_pipeline(s, orders_bundle)
    new_alerts, old_alerts = [], []
    for i in range(0, len(stream), 50):
        a, b = new.process(stream[i : i + 50]), old.process(stream[i : i + 50])
        np.testing.assert_array_equal(a.scores, b.scores)
        assert isinstance(new.threshold, SmoothedThreshold)
        assert isinstance(old.threshold, SmoothedThreshold)
        np.testing.assert_array_equal(new.threshold.last_smoothed, old.threshold.last_smoothed)
        assert a.threshold == b.threshold
        new_alerts += a.alerts
        old_alerts += b.alerts
    strip = [msgspec.structs.replace(a, detected_at="") for a in new_alerts]
    assert strip == [msgspec.structs.replace(a, detected_at="") for a in old_alerts]
    # One alert per spike outside the cooldown; without smoothing every spike alerts.
    assert offsets(new_alerts) == [300, 500]
    plain = build_pipeline(settings(), orders_bundle, orders_bundle.load_scorer())
    assert set(SPIKES) < set(offsets(feed(plain, stream)))  # and a few normal orders


def test_learn_false_keeps_the_warm_start_threshold(orders_bundle: bundles.Bundle) -> None:
    learned = {}
    for learn in (True, False):
        s = settings(COOLDOWN, threshold={"learn": learn})
        p = build_pipeline(s, orders_bundle, orders_bundle.load_scorer())
        assert p.threshold.learn is learn
        start = p.threshold.count
        assert offsets(feed(p, spiky_stream())) == [300, 500]
        learned[learn] = p.threshold.count - start
    assert learned == {True: 700, False: 0}


def test_each_pipeline_has_its_own_smoothing_state(orders_bundle: bundles.Bundle) -> None:
    """A reload or a shadowed candidate gets a fresh SmoothedThreshold (same settings)."""
    s = settings(COOLDOWN)
    first = build_pipeline(s, orders_bundle, orders_bundle.load_scorer())
    second = build_pipeline(s, orders_bundle, orders_bundle.load_scorer())
    assert first.threshold is not second.threshold
    stream = spiky_stream()
    feed(first, stream[:310])  # first is cooling down after the spike at 300
    assert offsets(feed(second, stream[:310])) == [300]  # not silenced by first's cooldown


def test_a_replay_leaves_the_smoothing_state_alone(orders_bundle: bundles.Bundle) -> None:
    """Replay (the state restore) computes scores here (incidents on), but does not judge:
    the EWMA level, run and cooldown are those of the live stream only."""
    s = settings(COOLDOWN, incidents={"enabled": True})
    stream = spiky_stream()
    straight = build_pipeline(s, orders_bundle, orders_bundle.load_scorer())
    replayed = build_pipeline(s, orders_bundle, orders_bundle.load_scorer())
    expected = feed(straight, stream[:250]) + feed(straight, stream[250:])
    got = feed(replayed, stream[:250])
    before = replayed.threshold.value
    replayed.process(stream[295:305], replay=True)  # a spike, replayed
    assert replayed.threshold.value == before
    got += feed(replayed, stream[250:])
    assert offsets(got) == offsets(expected) == [300, 500]
    assert isinstance(replayed.threshold, SmoothedThreshold)
    assert isinstance(straight.threshold, SmoothedThreshold)
    np.testing.assert_array_equal(
        replayed.threshold.last_smoothed, straight.threshold.last_smoothed
    )


def test_a_false_positive_factor_keeps_the_cooldown(orders_bundle: bundles.Bundle) -> None:
    """Control re-judges an entity with a feedback factor on the smoothed score, and the
    factor can only drop alerts: the spike at 320, inside the cooldown, stays silent."""
    s = settings(COOLDOWN, control={"topic": "ctl"})
    d = Detector(s)
    d._serve(orders_bundle, orders_bundle.load_scorer())
    assert d._control is not None and d._pipeline is not None
    d._control.apply_feedback(b'{"type": "false_positive", "entity": "c-spike"}', None)
    stream = spiky_stream()
    alerts, judged_against = [], []
    for i in range(0, len(stream), 50):
        result = d._pipeline.process(stream[i : i + 50])
        alerts += result.alerts
        judged_against += [result.threshold] * len(result.alerts)
    assert offsets(alerts) == [300, 500]
    factor = s.control.false_positive_factor
    assert [a.threshold for a in alerts] == pytest.approx([factor * t for t in judged_against])


def test_a_fixed_override_judges_the_smoothed_score(orders_bundle: bundles.Bundle) -> None:
    """An entity's fixed threshold is compared with the score the threshold compared (on
    the smoothed scale), without the run length or cooldown (a decision of its own)."""
    stream = spiky_stream()
    plain = build_pipeline(settings(), orders_bundle, orders_bundle.load_scorer())
    raw = plain.process(stream[:301]).scores[300]  # the spike's own score
    d = Detector(settings(COOLDOWN, control={"topic": "ctl"}))
    d._serve(orders_bundle, orders_bundle.load_scorer())
    assert d._control is not None and d._pipeline is not None
    # Above the spike's smoothed score (half of it plus half the level before), below its own.
    value = 0.75 * raw
    d._control.apply_control(
        b'{"action": "set_entity_threshold", "entity": "c-spike", "value": %f}' % value
    )
    assert offsets(feed(d._pipeline, stream)) == []
    d._control.apply_control(
        b'{"action": "set_entity_threshold", "entity": "c-spike", "value": %f}' % (value / 4)
    )
    assert offsets(feed(d._pipeline, stream)) == list(SPIKES)  # no cooldown for it


def test_runtime_reconfigure_keeps_the_smoothing_state(orders_bundle: bundles.Bundle) -> None:
    s = settings({"ewma_alpha": 0.5, "cooldown_rows": 100, "margin": 1.0}, control={"topic": "c"})
    d = Detector(s)
    d._serve(orders_bundle, orders_bundle.load_scorer())
    assert d._control is not None and d._pipeline is not None
    threshold = d._pipeline.threshold
    assert isinstance(threshold, SmoothedThreshold)
    stream = spiky_stream()
    assert offsets(feed(d._pipeline, stream[:310])) == [300]
    floor, before = threshold.floor, threshold.value
    d._control.apply_control(b'{"action": "set_threshold", "quantile": 0.9}')
    d._apply_threshold_control()
    assert d._pipeline.threshold is threshold  # reconfigured in place
    assert threshold.quantile == 0.9 and threshold.value < before
    assert threshold.floor == floor  # the margin's gate stays relative to the start
    # Still in the cooldown of the alert at 300: the spike at 320 stays silent.
    assert offsets(feed(d._pipeline, stream[310:400])) == []
    # A reload starts a fresh SmoothedThreshold, with the control's quantile applied again.
    d._serve(orders_bundle, orders_bundle.load_scorer())
    fresh = d._pipeline.threshold
    assert isinstance(fresh, SmoothedThreshold) and fresh is not threshold
    assert fresh.quantile == 0.9 and fresh.floor == floor


def test_margin_refuses_a_bundle_without_warm_start(
    orders_bundle: bundles.Bundle, monkeypatch: pytest.MonkeyPatch
) -> None:
    d = Detector(settings({"margin": 2.0}))

    def load(path: Any, expected_spec: Any = None) -> bundles.Bundle:
        return replace(orders_bundle, warm_start=np.empty(0))

    monkeypatch.setattr(bundles, "load", load)
    with pytest.raises(bundles.BundleError, match=r"smoothing\.margin"):
        d._load_bundle(orders_bundle.path)


def test_evaluator_detectors_refuse_what_the_daemon_config_refuses() -> None:
    ok = {"name": "q0.95 + EWMA 0.1", "threshold": {"quantile": 0.95}}
    det = msgspec.convert({**ok, "smoothing": {"ewma_alpha": 0.1}}, DetectorSettings)
    assert det.smoothing == SmoothingSettings(ewma_alpha=0.1)
    bad = {**ok, "threshold": {"per_entity": True}, "smoothing": {"ewma_alpha": 0.1}}
    with pytest.raises(msgspec.ValidationError, match=r"threshold\.per_entity"):
        msgspec.convert(bad, DetectorSettings)


def test_an_alert_carries_the_smoothed_score_it_was_judged_by(
    orders_bundle: bundles.Bundle,
) -> None:
    """`score` is the smoothed score the threshold compared, so it is above `threshold`;
    `raw_score` is the event's own reconstruction error (the old `score`)."""
    p = build_pipeline(settings({"ewma_alpha": 0.1}), orders_bundle, orders_bundle.load_scorer())
    assert isinstance(p.threshold, SmoothedThreshold)
    stream = spiky_stream()
    alerts = []
    for i in range(0, len(stream), 50):
        result = p.process(stream[i : i + 50])
        row = {m.offset: r for r, m in enumerate(result.scored)}
        for a in result.alerts:
            r = row[a.source.offset]
            assert a.score == p.threshold.last_smoothed[r] > a.threshold == result.threshold
            assert a.raw_score == float(result.scores[r]) != a.score
            alerts.append(a)
    assert set(SPIKES) <= set(offsets(alerts))
    doc = msgspec.json.decode(msgspec.json.encode(alerts[0]))
    assert doc["score"] == alerts[0].score and doc["raw_score"] == alerts[0].raw_score


def test_without_a_smoother_the_alert_has_no_raw_score(orders_bundle: bundles.Bundle) -> None:
    """[smoothing] that only shapes alerts (a cooldown) compares the raw score: no raw_score."""
    p = build_pipeline(settings({"cooldown_rows": 100}), orders_bundle, orders_bundle.load_scorer())
    alerts = feed(p, spiky_stream())
    assert offsets(alerts) and all(a.raw_score is None for a in alerts)
    assert all(b"raw_score" not in msgspec.json.encode(a) for a in alerts)


def test_a_replay_rebuilds_incidents_from_raw_scores(
    orders_bundle: bundles.Bundle, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A replay leaves the one-stream smoothing alone, so it judges (and its alerts, which
    only feed the incident tracker, carry) the raw score, with no raw_score beside it."""
    p = build_pipeline(
        settings({"ewma_alpha": 0.1}, incidents={"enabled": True}),
        orders_bundle,
        orders_bundle.load_scorer(),
    )
    tracker = p.state.incidents
    assert tracker is not None
    seen: list[Alert] = []
    observe = tracker.observe
    monkeypatch.setattr(tracker, "observe", lambda a, *rest: seen.extend(a) or observe(a, *rest))
    result = p.process(spiky_stream()[295:305], replay=True)
    assert result.alerts == [] and 300 in offsets(seen)
    spike = next(a for a in seen if a.source.offset == 300)
    assert spike.score == float(result.scores[300 - 295]) > spike.threshold
    assert spike.raw_score is None
