"""The pipeline with per-entity state: LSTM windows, held-back events, replay, entity thresholds."""

from __future__ import annotations

from itertools import islice

import msgspec
import numpy as np
import pytest

from streamer import bundle as bundles
from streamer.app import build_pipeline
from streamer.config import Settings, from_mapping
from streamer.pipeline import Pipeline
from streamer.records import RawMessage
from training.simulate import simulate

SENSORS = 20


def settings(**threshold: object) -> Settings:
    return from_mapping(
        {
            "profile": "sensors",
            "kafka": {"input_topic": "in", "alert_topic": "a", "dead_letter_topic": "d"},
            "model": {"bundle": "unused"},
            "threshold": {"min_samples": 0, **threshold},
        }
    )


def readings(count: int, seed: int, rate: float = 0.0) -> list[RawMessage]:
    stream = islice(simulate("sensors", seed, rate), count)
    return [
        RawMessage("readings", 0, i, None, msgspec.json.encode(e), 0)
        for i, (e, _) in enumerate(stream)
    ]


def pipeline(bundle: bundles.Bundle, s: Settings | None = None) -> Pipeline:
    return build_pipeline(s or settings(), bundle, bundle.load_scorer("numpy"))


def run(p: Pipeline, messages: list[RawMessage], size: int) -> dict[int, float]:
    """{offset: score} over the stream, fed in batches of `size`."""
    out: dict[int, float] = {}
    for i in range(0, len(messages), size):
        result = p.process(messages[i : i + size])
        out.update(zip((m.offset for m in result.scored), result.scores.tolist(), strict=True))
    return out


def test_events_wait_for_their_window_then_score_independently_of_batching(
    sensors_lstm_bundle: bundles.Bundle,
) -> None:
    length = sensors_lstm_bundle.window_length
    assert length is not None and length > 1
    messages = readings(3000, seed=5)
    p = pipeline(sensors_lstm_bundle)
    first = p.process(messages[:100])
    # Round robin over 20 sensors: each sensor's first length-1 readings are held back.
    assert first.held_back == min(100, SENSORS * (length - 1))
    assert len(first.scored) == first.scores.size == 100 - first.held_back
    whole = run(pipeline(sensors_lstm_bundle), messages, 3000)
    for size in (1, 7, 250):
        chunked = run(pipeline(sensors_lstm_bundle), messages, size)
        assert chunked.keys() == whole.keys()
        np.testing.assert_allclose(
            [chunked[k] for k in whole], list(whole.values()), rtol=1e-5, atol=1e-7
        )


def test_cleared_state_rebuilt_by_replaying_the_tail_scores_as_if_nothing_moved(
    sensors_lstm_bundle: bundles.Bundle,
) -> None:
    messages = readings(2000, seed=6)
    undisturbed = run(pipeline(sensors_lstm_bundle), messages, 100)
    p = pipeline(sensors_lstm_bundle)
    run(p, messages[:1000], 100)
    p.state.clear()  # the partition moved away and back
    threshold = p.threshold.value
    replayed = p.process(messages[1000 - 200 : 1000], replay=True)  # the restore's re-read
    assert replayed.alerts == [] and p.threshold.value == threshold
    after = run(p, messages[1000:], 100)
    assert after.keys() == {k for k in undisturbed if k >= 1000}  # nothing held back again
    np.testing.assert_allclose(
        [after[k] for k in sorted(after)], [undisturbed[k] for k in sorted(after)], rtol=1e-5
    )
    without_replay = pipeline(sensors_lstm_bundle)
    run(without_replay, messages[:1000], 100)
    without_replay.state.clear()
    assert without_replay.process(messages[1000:1100]).held_back > 0


def test_an_anomaly_alerts_with_its_window_and_model_version(
    sensors_lstm_bundle: bundles.Bundle,
) -> None:
    p = pipeline(sensors_lstm_bundle, settings(quantile=0.999))
    messages = readings(4000, seed=7, rate=0.004)
    alerts = [a for i in range(0, 4000, 500) for a in p.process(messages[i : i + 500]).alerts]
    assert alerts
    a = alerts[0]
    assert a.model.kind == "lstm" and a.model.version == sensors_lstm_bundle.version
    assert a.entity.startswith("s-") and a.top_features
    doc = msgspec.json.decode(msgspec.json.encode(a))  # plain JSON types all through
    assert all(isinstance(f["actual"], float) for f in doc["top_features"])


def test_per_entity_thresholds_judge_each_entity_by_its_own_history(
    sensors_lstm_bundle: bundles.Bundle,
) -> None:
    s = settings(per_entity=True, entity_min_samples=20, entity_window_size=100, quantile=0.99)
    p = pipeline(sensors_lstm_bundle, s)
    messages = readings(3000, seed=8)
    used: set[float] = set()
    for i in range(0, 3000, 300):
        result = p.process(messages[i : i + 300])
        used.update(a.threshold for a in result.alerts)
    assert p.state.thresholds is not None and p.state.thresholds.entities == SENSORS
    # Alerts were judged against per-sensor values, not one global number.
    assert len(used) > 1


@pytest.mark.parametrize("cap", [3])
def test_window_state_is_capped(sensors_lstm_bundle: bundles.Bundle, cap: int) -> None:
    s = from_mapping(
        {**msgspec.to_builtins(settings()), "state": {"max_entities": cap}},
    )
    p = pipeline(sensors_lstm_bundle, s)
    p.process(readings(400, seed=9))
    assert p.state.windows is not None
    assert p.state.windows.entities == cap
    assert p.state.windows.evictions["capacity"] > 0


@pytest.fixture(scope="module")
def orders_with_history(tmp_path_factory: pytest.TempPathFactory) -> bundles.Bundle:
    """A small dense bundle whose spec adds per-customer aggregates to the orders columns."""
    from streamer.config import TrainingSettings
    from streamer.features import FeatureSpec, Rolling, SincePrevious
    from streamer.profiles import ORDERS
    from training.datasets import from_events
    from training.fit import fit_bundle

    spec = FeatureSpec(
        profile="orders-history",
        entity_field=ORDERS.entity_field,
        time_field=ORDERS.time_field,
        time_format=ORDERS.time_format,
        id_field=ORDERS.id_field,
        columns=[
            *ORDERS.columns,
            Rolling(field="amount", windows_seconds=[86400.0, 604800.0]),
            SincePrevious(),
        ],
    )
    decode = msgspec.json.Decoder(spec.event_type()).decode
    events = [decode(msgspec.json.encode(e)) for e, _ in islice(simulate("orders", 11, 0.0), 6000)]
    root = tmp_path_factory.mktemp("orders-history")
    training = TrainingSettings(epochs=3, patience=1)
    return fit_bundle(spec, from_events(spec, events), training, root, source="simulated")


def test_aggregate_state_is_rebuilt_by_replay_like_windows(
    orders_with_history: bundles.Bundle,
) -> None:
    b = orders_with_history
    s = from_mapping(
        {
            "features": msgspec.to_builtins(b.spec),
            "kafka": {"input_topic": "in", "alert_topic": "a", "dead_letter_topic": "d"},
            "model": {"bundle": "unused"},
        }
    )
    stream = islice(simulate("orders", 12, 0.01), 4000)
    messages = [
        RawMessage("orders", 0, i, None, msgspec.json.encode(e), 0)
        for i, (e, _) in enumerate(stream)
    ]
    undisturbed = run(pipeline(b, s), messages, 250)
    p = pipeline(b, s)
    run(p, messages[:2000], 250)
    assert p.state.aggregates is not None and p.state.aggregates.entities > 0
    p.state.clear()
    p.process(messages[:2000], replay=True)  # a tail that covers every customer's history
    after = run(p, messages[2000:], 250)
    np.testing.assert_allclose(
        [after[k] for k in sorted(after)], [undisturbed[k] for k in sorted(after)], rtol=1e-6
    )
    cold = pipeline(b, s)
    run(cold, messages[:2000], 250)
    cold.state.clear()  # no replay: customers start over, and their scores differ
    assert run(cold, messages[2000:], 250) != after


def test_dense_window_model_scores_anomalies_higher_and_explains_per_feature(
    sensors_dense_window_bundle: bundles.Bundle,
) -> None:
    # The flattened model's reconstruction comes back as (n, L, d), so the pipeline's LSTM
    # path (errors averaged over steps per feature, the event's own step explained) serves it.
    stream = list(islice(simulate("sensors", 7, 0.01, kinds=("spike", "oscillation")), 4000))
    labels = {i: label.is_anomaly for i, (_, label) in enumerate(stream)}
    messages = [
        RawMessage("readings", 0, i, None, msgspec.json.encode(e), 0)
        for i, (e, _) in enumerate(stream)
    ]
    p = pipeline(sensors_dense_window_bundle, settings(quantile=0.999))
    scores: dict[int, float] = {}
    alerts = []
    for i in range(0, len(messages), 500):
        result = p.process(messages[i : i + 500])
        scores.update(zip((m.offset for m in result.scored), result.scores.tolist(), strict=True))
        alerts.extend(result.alerts)
    anomalous = [s for k, s in scores.items() if labels[k]]
    normal = [s for k, s in scores.items() if not labels[k]]
    assert anomalous and np.median(anomalous) > 3 * np.median(normal)
    assert alerts
    a = alerts[0]
    assert a.model.kind == "dense_window"
    assert a.model.version == sensors_dense_window_bundle.version
    names = set(sensors_dense_window_bundle.spec.feature_names())
    shares = [f.contribution for f in a.top_features]
    assert {f.feature for f in a.top_features} <= names
    assert shares and shares == sorted(shares, reverse=True) and 0 < sum(shares) <= 1 + 1e-9


def test_a_forecast_bundle_scores_each_event_by_its_own_row_alone(
    sensors_forecast_bundle: bundles.Bundle,
) -> None:
    """training.forecast: the score is the error of the window's last row (the event's own),
    which the model rebuilt without seeing it; not the window's mean error."""
    from streamer.features import build_features
    from streamer.windows import sliding_windows

    b = sensors_forecast_bundle
    assert b.forecast and b.window_length is not None
    messages = readings(600, seed=9)
    result = pipeline(b).process(messages)
    events = [msgspec.json.decode(m.value) for m in messages]
    decoded = [b.spec.event_type()(**e) for e in events]
    rows = b.scaler.transform(build_features(b.spec, decoded))
    windows, _ = sliding_windows([e.sensor_id for e in decoded], rows, b.window_length)
    squared = (windows - b.load_scorer("numpy").reconstruct(windows)) ** 2
    np.testing.assert_allclose(result.scores, squared[:, -1, :].mean(axis=1), rtol=1e-5)
    assert not np.allclose(result.scores, squared.mean(axis=(1, 2)), rtol=1e-2)
