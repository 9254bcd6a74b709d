"""Hot reload from a model registry, mid-stream, on the real broker."""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from itertools import islice
from pathlib import Path

import msgspec
import pytest

from streamer import bundle as bundles
from streamer.config import TrainingSettings
from streamer.profiles import ORDERS
from tests.conftest import write_events
from tests.integration.conftest import (
    Daemon,
    Topics,
    committed,
    end_offsets,
    produce,
    read_topic,
)
from training.datasets import read_jsonl
from training.fit import fit_bundle
from training.simulate import simulate

pytestmark = pytest.mark.integration
INFO = {"kind": "dense", "profile": "orders", "entity_field": "customer_id"}


def orders(count: int, seed: int) -> tuple[list[bytes], list[bytes]]:
    pairs = [(msgspec.json.encode(e), e["customer_id"].encode())
             for e, _ in islice(simulate("orders", seed, 0.01), count)]  # fmt: skip
    return [v for v, _ in pairs], [k for _, k in pairs]


def test_reload_mid_stream_refuses_a_corrupt_candidate_and_loses_nothing(
    kafka_bootstrap: str,
    topics: Topics,
    start_daemon: Callable[..., Daemon],
    orders_registry: Path,
    tmp_path: Path,
) -> None:
    registry = tmp_path / "registry"
    shutil.copytree(orders_registry, registry)
    first = bundles.current_version(registry)
    assert first
    daemon = start_daemon(registry=registry, model_extra="reload_check_seconds = 0.5")
    daemon.wait_ready()
    produced = 0

    def stream(count: int, seed: int) -> None:
        nonlocal produced
        values, keys = orders(count, seed)
        produce(kafka_bootstrap, topics.input, values, keys)
        produced += count
        daemon.wait_metric("anomaly_events_consumed_total", produced)

    stream(3_000, seed=51)

    # A tampered candidate is refused; the old model keeps scoring.
    shutil.copytree(registry / first, registry / "tampered")
    with (registry / "tampered" / bundles.MODEL_FILE).open("ab") as f:
        f.write(b"\0")
    bundles.set_current(registry, "tampered")
    _wait_outcome(daemon, "rejected")
    stream(2_000, seed=52)
    assert daemon.metric("anomaly_model_info", version=first, **INFO) == 1
    assert daemon.metric("anomaly_model_reloads_total", outcome="loaded") == 0

    # A new, good bundle is swapped in between batches.
    history_file = tmp_path / "history.jsonl"
    write_events(history_file, "orders", count=8_000, seed=53, anomaly_rate=0.0)
    second = fit_bundle(
        ORDERS,
        read_jsonl(ORDERS, history_file),
        TrainingSettings(epochs=4, seed=8),
        registry,
        source=history_file.name,
    ).version
    assert second != first
    _wait_outcome(daemon, "loaded")
    before = end_offsets(kafka_bootstrap, topics.input)
    stream(5_000, seed=54)
    assert daemon.metric("anomaly_model_info", version=second, **INFO) == 1
    assert daemon.metric("anomaly_model_info", version=first, **INFO) == 0

    alerts = [json.loads(r.value) for r in read_topic(kafka_bootstrap, topics.alerts)]
    after = [a for a in alerts if a["source"]["offset"] >= before[a["source"]["partition"]]]
    assert after, "the stream after the reload raised no alert"
    assert {a["model"]["version"] for a in after} == {second}
    assert first in {a["model"]["version"] for a in alerts}
    assert daemon.metric("anomaly_events_consumed_total") == produced
    assert daemon.stop() == 0
    assert committed(kafka_bootstrap, topics.group, topics.input) == end_offsets(
        kafka_bootstrap, topics.input
    )


def _wait_outcome(daemon: Daemon, outcome: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if daemon.metric("anomaly_model_reloads_total", outcome=outcome) >= 1:
            return
        time.sleep(0.2)
    raise AssertionError(f"no {outcome} reload after {timeout}s:\n{daemon.output()}")
