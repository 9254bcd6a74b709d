"""Runtime control and feedback topics on the real broker: decisions change from the next batch."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from itertools import islice

import msgspec
import pytest

from tests.integration.conftest import Daemon, Topics, end_offsets, produce, read_topic
from training.simulate import simulate

pytestmark = pytest.mark.integration

MUTED, RAISED, CONTROL = "c-muted", "c-raised", "c-control"


def orders_with_spikes(seed: int, count: int) -> tuple[list[bytes], list[bytes | None]]:
    """Clean orders, and every 100th one copied for each of three customers at 40x the amount."""
    values: list[bytes] = []
    keys: list[bytes | None] = []
    for n, (event, _) in enumerate(islice(simulate("orders", seed, 0.0), count)):
        batch = [event]
        if n % 100 == 50:
            for customer in (MUTED, RAISED, CONTROL):
                spike = {**event, "customer_id": customer}
                spike["order_id"] = f"{event['order_id']}-{customer}"
                spike["amount"] = round(float(event["amount"]) * 40 + 500, 2)
                batch.append(spike)
        for e in batch:
            values.append(msgspec.json.encode(e))
            keys.append(str(e["customer_id"]).encode())
    return values, keys


def alerted_customers(bootstrap: str, topic: str, since_offset: dict[int, int]) -> dict[str, int]:
    """Alerts per customer for input offsets at or after `since_offset[partition]`."""
    counts: dict[str, int] = {}
    for r in read_topic(bootstrap, topic):
        a = json.loads(r.value)
        if a["type"] == "alert" and a["source"]["offset"] >= since_offset[a["source"]["partition"]]:
            counts[a["entity"]] = counts.get(a["entity"], 0) + 1
    return counts


def test_mute_and_false_positive_change_decisions_for_those_entities_only(
    kafka_bootstrap: str,
    topics: Topics,
    unique: Callable[[str], str],
    start_daemon: Callable[..., Daemon],
) -> None:
    control, feedback = unique("control"), unique("feedback")
    daemon = start_daemon(
        extra=(
            f'[control]\ntopic = "{control}"\nfeedback_topic = "{feedback}"\n'
            "poll_seconds = 0.2\nfalse_positive_factor = 1e6\nmax_factor = 1e6\n"
        )
    )
    daemon.wait_ready()
    first, first_keys = orders_with_spikes(seed=51, count=5000)
    produce(kafka_bootstrap, topics.input, first, first_keys)
    daemon.wait_metric("anomaly_events_consumed_total", len(first))
    before = alerted_customers(kafka_bootstrap, topics.alerts, {p: 0 for p in range(4)})
    assert min(before.get(c, 0) for c in (MUTED, RAISED, CONTROL)) >= 40, before

    produce(kafka_bootstrap, control, [b'{"action": "mute", "entity": "c-muted"}'])
    produce(
        kafka_bootstrap,
        control,
        [b'{"action": "set_threshold", "quantile": 0.9995}', b'{"action": "explode"}'],
    )
    fp = json.dumps({"type": "false_positive", "entity": RAISED}).encode()
    produce(kafka_bootstrap, feedback, [fp], keys=[b"some-alert-id"])
    control_total = "anomaly_control_messages_total"
    daemon.wait_metric(control_total, 1, timeout=60, action="mute", outcome="applied")
    daemon.wait_metric(
        "anomaly_feedback_total", 1, timeout=60, type="false_positive", outcome="applied"
    )
    daemon.wait_metric(control_total, 1, timeout=60, action="unknown", outcome="refused")
    assert daemon.metric("anomaly_threshold_quantile") == 0.9995
    assert daemon.metric("anomaly_control_entities", how="muted") == 1
    assert daemon.metric("anomaly_control_entities", how="raised") == 1

    since = end_offsets(kafka_bootstrap, topics.input)
    second, second_keys = orders_with_spikes(seed=52, count=5000)
    produce(kafka_bootstrap, topics.input, second, second_keys)
    daemon.wait_metric("anomaly_events_consumed_total", len(first) + len(second))
    assert daemon.stop() == 0
    after = alerted_customers(kafka_bootstrap, topics.alerts, since)
    assert after.get(MUTED, 0) == 0 and after.get(RAISED, 0) == 0, after
    assert after.get(CONTROL, 0) >= 40, after  # the same spikes, no feedback: still alerted


def test_drifted_input_shows_in_the_psi_gauges(
    kafka_bootstrap: str, topics: Topics, start_daemon: Callable[..., Daemon]
) -> None:
    daemon = start_daemon(extra="[drift]\nwindow_events = 5000\n")
    daemon.wait_ready()
    normal = [msgspec.json.encode(e) for e, _ in islice(simulate("orders", 61, 0.0), 5000)]
    produce(kafka_bootstrap, topics.input, normal)
    daemon.wait_metric("anomaly_events_consumed_total", 5000)
    time.sleep(1.5)  # the gauges are refreshed once a second
    amount = "log1p(amount)"
    assert daemon.metric("anomaly_feature_psi", feature=amount) < 0.1
    assert daemon.metric("anomaly_score_psi") < 0.1

    shifted = []
    for e, _ in islice(simulate("orders", 62, 0.0), 5000):  # prices tripled overnight
        shifted.append(msgspec.json.encode({**e, "amount": round(float(e["amount"]) * 3, 2)}))
    produce(kafka_bootstrap, topics.input, shifted)
    daemon.wait_metric("anomaly_events_consumed_total", 10_000)
    time.sleep(1.5)
    assert daemon.metric("anomaly_feature_psi", feature=amount) > 0.25
    assert daemon.metric("anomaly_feature_psi", feature="items") < 0.1  # untouched
    assert daemon.metric("anomaly_score_psi") > 0.25
    assert daemon.stop() == 0
