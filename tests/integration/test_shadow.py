"""Shadow scoring on the real broker: a sound candidate is promoted, a skewed one rolled back."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from itertools import islice
from pathlib import Path

import msgspec
import pytest

from streamer import bundle as bundles
from streamer.config import TrainingSettings
from streamer.profiles import ORDERS
from tests.integration.conftest import Daemon, Topics, produce, read_topic
from training.datasets import from_events
from training.fit import fit_bundle
from training.simulate import simulate

pytestmark = pytest.mark.integration


def train_candidate(
    registry: Path, seed: int, keep: Callable[[dict[str, object]], bool], count: int
) -> str:
    """A bundle trained on the simulated orders `keep` accepts, named as the candidate."""
    decode = msgspec.json.Decoder(ORDERS.event_type()).decode
    events = [
        decode(msgspec.json.encode(e))
        for e, _ in islice(simulate("orders", seed, 0.0), count)
        if keep(e)
    ]
    settings = TrainingSettings(epochs=15, patience=2, seed=seed)
    b = fit_bundle(ORDERS, from_events(ORDERS, events), settings, registry, "test", candidate=True)
    assert bundles.candidate_version(registry) == b.version
    return b.version


def stream(bootstrap: str, topic: str, seed: int, count: int) -> None:
    pairs = [(msgspec.json.encode(e), str(e["customer_id"]).encode())
             for e, _ in islice(simulate("orders", seed, 0.01), count)]  # fmt: skip
    produce(bootstrap, topic, [v for v, _ in pairs], [k for _, k in pairs])


def test_shadow_promotes_a_sound_candidate_and_rolls_back_a_skewed_one(
    kafka_bootstrap: str,
    topics: Topics,
    start_daemon: Callable[..., Daemon],
    orders_registry: Path,
    tmp_path: Path,
) -> None:
    registry = tmp_path / "registry"
    shutil.copytree(orders_registry, registry)
    first = bundles.current_version(registry)
    # Trained on a bad export of history that kept only orders under 30: it finds most of
    # today's orders anomalous.
    skewed = train_candidate(registry, 71, lambda e: float(e["amount"]) < 30, 40_000)  # type: ignore[arg-type]
    daemon = start_daemon(
        registry=registry,
        model_extra="reload_check_seconds = 0.5",
        extra="[shadow]\nmin_events = 8000\nmax_rate_ratio = 3.0\n",
    )
    daemon.wait_ready()
    daemon.wait_metric("anomaly_shadow_info", 1, timeout=30, version=skewed, kind="dense")
    stream(kafka_bootstrap, topics.input, 72, 10_000)
    daemon.wait_metric("anomaly_shadow_scored_total", 1, role="candidate")
    # While shadowing: both sides' score distributions (the dashboard's shadow panels).
    for role in ("current", "candidate"):
        assert daemon.metric("anomaly_shadow_score_quantile", role=role, q="0.99") > 0
    daemon.wait_metric("anomaly_shadow_decisions_total", 1, outcome="rolled_back")
    assert bundles.current_version(registry) == first
    assert bundles.candidate_version(registry) is None
    candidate_alerts = daemon.metric("anomaly_shadow_alerts_total", role="candidate")
    current_alerts = daemon.metric("anomaly_shadow_alerts_total", role="current")
    assert candidate_alerts > 3 * current_alerts

    sound = train_candidate(registry, 73, lambda e: True, 12_000)
    daemon.wait_metric("anomaly_shadow_info", 1, timeout=30, version=sound, kind="dense")
    stream(kafka_bootstrap, topics.input, 74, 10_000)
    daemon.wait_metric("anomaly_shadow_decisions_total", 1, outcome="promoted")
    assert bundles.current_version(registry) == sound
    daemon.wait_metric("anomaly_model_reloads_total", 1, timeout=30, outcome="loaded")
    stream(kafka_bootstrap, topics.input, 75, 5_000)
    daemon.wait_metric("anomaly_events_consumed_total", 25_000)
    assert daemon.stop() == 0
    versions = [
        json.loads(r.value)["model"]["version"] for r in read_topic(kafka_bootstrap, topics.alerts)
    ]
    # Nothing the candidates scored was published: alerts carry the served versions only.
    assert set(versions) <= {first, sound} and versions[-1] == sound
    assert skewed not in versions
