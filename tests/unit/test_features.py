import math
from datetime import UTC, datetime

import msgspec
import numpy as np
import pytest

from streamer.features import (
    FeatureSpec,
    HourOfDay,
    Log1p,
    Numeric,
    OneHot,
    Ratio,
    build_features,
)
from streamer.profiles import ORDERS, SENSORS

SPEC = FeatureSpec(
    profile="t",
    entity_field="user",
    time_field="ts",
    time_format="epoch_ms",
    id_field="id",
    columns=[
        Numeric(field="n"),
        Log1p(field="amount"),
        Ratio(numerator="amount", denominator="n"),
        OneHot(field="color", vocabulary=["red", "blue"]),
        HourOfDay(),
    ],
)


def decode(spec: FeatureSpec, *docs: dict) -> list:
    decoder = msgspec.json.Decoder(spec.event_type())
    return [decoder.decode(msgspec.json.encode(d)) for d in docs]


def test_each_column_kind() -> None:
    six_am = 6 * 3600 * 1000
    events = decode(
        SPEC,
        {"id": 1, "user": "a", "ts": six_am, "n": 2, "amount": math.e - 1, "color": "blue"},
        {"id": "x", "user": 7, "ts": 0, "n": 0, "amount": -5.0, "color": "green"},
    )
    x = build_features(SPEC, events)
    assert SPEC.feature_names() == [
        "n", "log1p(amount)", "amount/n", "color=red", "color=blue", "color=<other>",
        "hour_sin", "hour_cos",
    ]  # fmt: skip
    np.testing.assert_allclose(x[0], [2, 1, (math.e - 1) / 2, 0, 1, 0, 1, 0], atol=1e-12)
    # Negative amounts clip to log1p(0); a zero denominator gives 0; unknown colour -> other.
    np.testing.assert_allclose(x[1], [0, 0, 0, 0, 0, 1, 0, 1], atol=1e-12)


def test_iso_time_needs_a_timezone() -> None:
    decoder = msgspec.json.Decoder(ORDERS.event_type())
    good = {
        "order_id": "o1", "customer_id": "c1", "created_at": "2026-01-01T18:00:00Z",
        "amount": 10, "items": 1, "discount": 0, "shipping_cost": 0,
        "shipping_method": "pickup", "payment_method": "card", "country": "US",
    }  # fmt: skip
    event = decoder.decode(msgspec.json.encode(good))
    assert event.created_at == datetime(2026, 1, 1, 18, tzinfo=UTC)
    hour = build_features(ORDERS, [event])[0, -2:]
    np.testing.assert_allclose(hour, [-1.0, 0.0], atol=1e-12)  # 18:00 is three quarters round
    with pytest.raises(msgspec.ValidationError, match="timezone"):
        decoder.decode(msgspec.json.encode({**good, "created_at": "2026-01-01T18:00:00"}))


def test_missing_and_mistyped_fields_are_named() -> None:
    decoder = msgspec.json.Decoder(SENSORS.event_type())
    reading = {"reading_id": "r", "sensor_id": "s", "ts": 1, "temperature": 1.0,
               "pressure": 1.0, "vibration": 1.0, "current": 1.0}  # fmt: skip
    with pytest.raises(msgspec.ValidationError, match="rpm"):
        decoder.decode(msgspec.json.encode(reading))
    with pytest.raises(msgspec.ValidationError, match=r"\$\.rpm"):
        decoder.decode(msgspec.json.encode({**reading, "rpm": "fast"}))


def test_standardized_mask_and_units() -> None:
    assert SPEC.standardized().tolist() == [True, True, True, False, False, False, False, False]
    assert SPEC.to_original_units(1, math.log1p(99.0)) == pytest.approx(99.0)
    assert SPEC.to_original_units(0, 3.0) == 3.0
    assert SPEC.unit_names()[:3] == ["n", "amount", "amount/n"]


def test_spec_round_trips_through_json_and_rejects_bad_columns() -> None:
    again = msgspec.json.decode(msgspec.json.encode(ORDERS), type=FeatureSpec)
    assert again == ORDERS
    with pytest.raises(msgspec.ValidationError, match="kind"):
        msgspec.convert(
            {"profile": "p", "entity_field": "e", "time_field": "t",
             "columns": [{"kind": "sqrt", "field": "x"}]},
            FeatureSpec,
        )  # fmt: skip
    with pytest.raises(msgspec.ValidationError, match="duplicates"):
        msgspec.convert(
            {"profile": "p", "entity_field": "e", "time_field": "t",
             "columns": [{"kind": "onehot", "field": "x", "vocabulary": ["a", "a"]}]},
            FeatureSpec,
        )  # fmt: skip


def test_empty_batch() -> None:
    assert build_features(SPEC, []).shape == (0, len(SPEC.feature_names()))


def test_stateful_columns_sit_in_spec_order_among_the_others() -> None:
    from streamer.aggregates import AggregateState
    from streamer.features import Rolling, SincePrevious

    spec = FeatureSpec(
        profile="s", entity_field="user", time_field="ts", time_format="epoch_s",
        columns=[
            Log1p(field="amount"),
            Rolling(field="amount", windows_seconds=[60], stats=["count", "mean"]),
            HourOfDay(),
            SincePrevious(cap_seconds=100.0),
        ],
    )  # fmt: skip
    assert spec.stateful and not SPEC.stateful
    assert spec.feature_names() == [
        "log1p(amount)", "user.count(amount,1m)", "user.mean(amount,1m)", "hour_sin",
        "hour_cos", "user.since_previous",
    ]  # fmt: skip
    assert spec.standardized().tolist() == [True, True, True, False, False, True]
    events = decode(
        spec, {"user": "a", "ts": 0, "amount": 3.0}, {"user": "a", "ts": 10, "amount": 5.0}
    )
    x = build_features(spec, events, AggregateState(spec))
    np.testing.assert_allclose(x[:, [1, 2, 5]], [[0, 3, math.log1p(100)], [1, 3, math.log1p(10)]])
    np.testing.assert_allclose(x[:, 0], np.log1p([3.0, 5.0]))
    assert spec.to_original_units(5, math.log1p(10.0)) == pytest.approx(10.0)  # seconds
    with pytest.raises(ValueError, match="AggregateState"):
        build_features(spec, events)
