"""The batch pipeline on a real trained bundle, without Kafka."""

from itertools import islice

import msgspec
import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from streamer import bundle as bundles
from streamer.app import build_pipeline
from streamer.config import from_mapping
from streamer.metrics import Metrics
from streamer.pipeline import Pipeline
from streamer.records import (
    Alert,
    FeatureContribution,
    ModelRef,
    RawMessage,
    SourcePosition,
    alert_id,
)
from training.simulate import simulate

SETTINGS = from_mapping(
    {
        "profile": "orders",
        "kafka": {"input_topic": "in", "alert_topic": "a", "dead_letter_topic": "d"},
        "model": {"bundle": "unused"},
        "alerts": {"top_features": 3, "max_message_bytes": 2000},
    }
)


@pytest.fixture
def pipeline(orders_bundle: bundles.Bundle) -> Pipeline:
    return build_pipeline(SETTINGS, orders_bundle, orders_bundle.load_scorer())


def messages(values: list[bytes], start: int = 0) -> list[RawMessage]:
    return [RawMessage("orders", 1, start + i, b"k", v, 0) for i, v in enumerate(values)]


def stream(n: int, seed: int, rate: float) -> tuple[list[bytes], dict[str, str]]:
    values, kinds = [], {}
    for event, label in islice(simulate("orders", seed, rate), n):
        values.append(msgspec.json.encode(event))
        if label.is_anomaly:
            kinds[label.event_id] = label.kind
    return values, kinds


def test_detects_injected_anomalies(pipeline: Pipeline) -> None:
    values, kinds = stream(10_000, seed=11, rate=0.01)
    alerted: set[str] = set()
    for i in range(0, len(values), 500):
        result = pipeline.process(messages(values[i : i + 500], i))
        assert result.scores.size == 500 and not result.dead_letters
        alerted |= {str(a.event_id) for a in result.alerts}
    hits = len(alerted & set(kinds))
    assert hits / len(kinds) >= 0.8
    assert hits / len(alerted) >= 0.5


def test_alert_contents(pipeline: Pipeline) -> None:
    normal, _ = stream(200, seed=12, rate=0.0)
    event = msgspec.json.decode(normal[0])
    event.update(amount=250_000.0, items=2)  # an absurd order
    result = pipeline.process(messages([*normal[1:], msgspec.json.encode(event)]))
    [alert] = [a for a in result.alerts if a.event_id == event["order_id"]]
    assert alert.alert_id == alert_id("orders", 1, 199)
    assert alert.entity == event["customer_id"] and alert.entity_field == "customer_id"
    assert alert.event_time.startswith(event["created_at"][:19])
    assert alert.score > alert.threshold == result.threshold
    assert alert.raw_score is None  # no smoothing: `score` is the raw score
    assert alert.quantile == SETTINGS.threshold.quantile
    assert alert.model.kind == "dense" and len(alert.model.version) == 16
    assert (alert.source.topic, alert.source.partition, alert.source.offset) == ("orders", 1, 199)
    assert len(alert.top_features) == 3
    shares = [f.contribution for f in alert.top_features]
    assert shares == sorted(shares, reverse=True) and 0 < sum(shares) <= 1.0 + 1e-9
    by_name = {f.feature: f for f in alert.top_features}
    # Values come back in the field's own unit: log1p(amount) is reported as the amount.
    if "amount" in by_name:
        assert by_name["amount"].actual == pytest.approx(250_000.0, rel=1e-6)
    assert any(name in by_name for name in ("amount", "amount/items"))


def test_bad_messages_become_dead_letters(pipeline: Pipeline) -> None:
    good, _ = stream(3, seed=13, rate=0.0)
    doc = msgspec.json.decode(good[0])
    bad = {
        "empty": b"",
        "too_large": b"{" + b" " * 3000 + b"}",
        "invalid_utf8": b"\xff\xfe{}",
        "invalid_json": b'{"order_id": ',
        "schema": msgspec.json.encode({**doc, "amount": "12.00"}),
        "out_of_range": good[0].replace(b'"amount":', b'"amount":1e999,"x":', 1),
        "non_finite": msgspec.json.encode({**doc, "amount": 1e308, "items": 1e-308}),
    }
    values = [good[0], *bad.values(), good[1], None, good[2]]
    result = pipeline.process(
        [RawMessage("orders", 0, i, None, v, 0) for i, v in enumerate(values)]  # type: ignore[arg-type]
    )
    assert result.consumed == len(values) and result.scores.size == 3
    reasons = {d.message.offset: d.reason for d in result.dead_letters}
    assert reasons == {i + 1: r for i, r in enumerate(bad)} | {len(values) - 2: "empty"}
    for d in result.dead_letters:
        assert d.detail
        assert d.message.value == values[d.message.offset]  # original bytes kept


def test_batch_equals_one_by_one(orders_bundle: bundles.Bundle) -> None:
    values, _ = stream(300, seed=14, rate=0.02)
    batched = build_pipeline(SETTINGS, orders_bundle, orders_bundle.load_scorer())
    single = build_pipeline(SETTINGS, orders_bundle, orders_bundle.load_scorer())
    whole = batched.process(messages(values)).scores
    # The threshold moves between batches, so compare scores, which do not depend on it.
    one = np.concatenate([single.process(messages([v], i)).scores for i, v in enumerate(values)])
    np.testing.assert_allclose(whole, one, rtol=1e-5, atol=1e-7)


def test_empty_batch(pipeline: Pipeline) -> None:
    result = pipeline.process([])
    assert result.consumed == 0 and result.scores.size == 0 and not result.alerts


def test_float32_overflow_is_a_dead_letter_not_an_alert(pipeline: Pipeline) -> None:
    good, _ = stream(2, seed=15, rate=0.0)
    doc = msgspec.json.decode(good[0])
    huge = msgspec.json.encode({**doc, "items": 1e300})
    result = pipeline.process(messages([good[0], huge, good[1]]))
    assert [d.reason for d in result.dead_letters] == ["non_finite"]
    assert "items" in result.dead_letters[0].detail
    assert result.scores.size == 2 and np.isfinite(result.scores).all()


def test_an_unsmoothed_alert_on_the_wire() -> None:
    """The JSON subscribers get, byte for byte: `raw_score` (smoothing only) is left out."""
    alert = Alert(
        alert_id=alert_id("orders", 2, 1234), schema_version=2, profile="orders",
        entity_field="customer_id", entity="c-00097", event_id="o-000000267",
        event_time="2026-11-26T07:19:10.417+00:00", detected_at="2026-11-26T07:19:10.602+00:00",
        score=0.456, threshold=0.441, quantile=0.999, model=ModelRef("c265694b2ea78bff", "dense"),
        top_features=[FeatureContribution("items", 4.0, 1.36, 0.41)],
        source=SourcePosition("orders", 2, 1234),
    )  # fmt: skip
    assert msgspec.json.encode(alert) == (
        b'{"type":"alert","alert_id":"8118f2462744f29e013354d77a00e500","schema_version":2,'
        b'"profile":"orders","entity_field":"customer_id","entity":"c-00097",'
        b'"event_id":"o-000000267","event_time":"2026-11-26T07:19:10.417+00:00",'
        b'"detected_at":"2026-11-26T07:19:10.602+00:00","score":0.456,"threshold":0.441,'
        b'"quantile":0.999,"model":{"version":"c265694b2ea78bff","kind":"dense"},'
        b'"top_features":[{"feature":"items","actual":4.0,"reconstructed":1.36,'
        b'"contribution":0.41}],"source":{"topic":"orders","partition":2,"offset":1234}}'
    )
    smoothed = msgspec.structs.replace(alert, raw_score=3.2)
    assert msgspec.json.encode(smoothed).endswith(b',"offset":1234},"raw_score":3.2}')
    assert msgspec.json.decode(msgspec.json.encode(alert), type=Alert) == alert


def test_range_tolerance_alerts_a_breakout_whatever_the_score(
    orders_bundle: bundles.Bundle,
) -> None:
    settings = msgspec.structs.replace(
        SETTINGS,
        threshold=msgspec.structs.replace(SETTINGS.threshold, range_tolerance=0.05, learn=False),
    )
    p = build_pipeline(settings, orders_bundle, orders_bundle.load_scorer())
    p.threshold.value = float("inf")  # only the range rule can alert
    assert p.ranges is not None and orders_bundle.feature_range is not None
    high = orders_bundle.feature_range[1].tolist()
    assert p.ranges.high is not None and p.ranges.high.tolist() == high  # the training range
    normal, _ = stream(200, seed=12, rate=0.0)
    event = msgspec.json.decode(normal[0])
    event.update(amount=250_000.0, items=2)  # far beyond any training order
    breakout = msgspec.json.encode(event)
    assert not p.process(messages([breakout]), replay=True).alerts
    assert p.ranges.high.tolist() == high  # a replay re-reads rows: the range is untouched
    result = p.process(messages([*normal[1:], breakout, breakout]))
    [alert] = result.alerts  # the repeat lies inside the range the first one widened
    assert alert.source.offset == 199 and alert.beyond_range
    assert alert.score < alert.threshold == float("inf")
    assert b'"beyond_range":true' in msgspec.json.encode(alert)
    assert result.beyond_range is not None
    assert result.beyond_range.tolist() == [False] * 199 + [True, False]
    registry = CollectorRegistry()
    Metrics(registry).record_batch(result)
    assert registry.get_sample_value("anomaly_events_beyond_range_total") == 1.0
