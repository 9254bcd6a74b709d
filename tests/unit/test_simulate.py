from itertools import islice

import msgspec

from streamer.profiles import BUILTIN
from training.simulate import ORDER_ANOMALIES, SENSOR_ANOMALIES, simulate


def take(profile: str, n: int, seed: int, rate: float) -> list:
    return list(islice(simulate(profile, seed, rate), n))


def test_seeded_and_labels_outside_events() -> None:
    a, b = take("orders", 500, 3, 0.05), take("orders", 500, 3, 0.05)
    assert a == b
    for event, label in a:
        assert "is_anomaly" not in event and "kind" not in event
        assert label.event_id == event["order_id"]


def test_every_event_decodes_with_its_profile_spec() -> None:
    for profile, kinds in [("orders", ORDER_ANOMALIES), ("sensors", SENSOR_ANOMALIES)]:
        decoder = msgspec.json.Decoder(BUILTIN[profile].event_type())
        stream = take(profile, 20_000, 5, 0.02)
        for event, _ in stream:
            decoder.decode(msgspec.json.encode(event))
        seen = {label.kind for _, label in stream if label.is_anomaly}
        assert seen == set(kinds)
        share = sum(label.is_anomaly for _, label in stream) / len(stream)
        # Drift and stuck anomalies span many readings, so sensors run above the start rate.
        assert 0.01 < share < (0.03 if profile == "orders" else 0.4)
