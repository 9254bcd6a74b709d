"""The daemon end to end on the real broker: detection, metrics, dead letters, shutdown."""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from itertools import islice
from pathlib import Path

import msgspec
import pytest

from streamer import bundle as bundles
from streamer.app import build_pipeline
from tests.integration.conftest import (
    Daemon,
    Topics,
    committed,
    end_offsets,
    produce,
    read_topic,
)
from tests.unit.test_smoothing_daemon import SPIKES, feed, settings, spiky_stream
from training.simulate import simulate

pytestmark = pytest.mark.integration


def orders(count: int, seed: int, rate: float) -> tuple[list[bytes], list[bytes], dict[str, str]]:
    values, keys, anomalies = [], [], {}
    for event, label in islice(simulate("orders", seed, rate), count):
        values.append(msgspec.json.encode(event))
        keys.append(event["customer_id"].encode())
        if label.is_anomaly:
            anomalies[label.event_id] = label.kind
    return values, keys, anomalies


@pytest.mark.parametrize("runtime", ["numpy", "tensorflow"])
def test_detects_anomalies_publishes_alerts_and_counts(
    runtime: str, kafka_bootstrap: str, topics: Topics, start_daemon: Callable[..., Daemon]
) -> None:
    daemon = start_daemon(runtime=runtime)
    daemon.wait_ready()
    values, keys, anomalies = orders(20_000, seed=21, rate=0.01)
    assert 150 <= len(anomalies) <= 250
    produce(kafka_bootstrap, topics.input, values, keys)

    assert daemon.wait_metric("anomaly_events_consumed_total", 20_000) == 20_000
    assert daemon.metric("anomaly_events_scored_total") == 20_000
    records = read_topic(kafka_bootstrap, topics.alerts)
    alerts = [json.loads(r.value) for r in records]
    assert daemon.metric("anomaly_alerts_published_total") == len(alerts)

    alerted = {a["event_id"] for a in alerts}
    hits = len(alerted & set(anomalies))
    recall, precision = hits / len(anomalies), hits / len(alerted)
    print(f"recall {recall:.3f} precision {precision:.3f} ({len(alerts)} alerts)")
    assert recall >= 0.8
    assert precision >= 0.5

    # Every alert is keyed by its entity and carries what a subscriber needs.
    for record, alert in zip(records, alerts, strict=True):
        assert record.key == alert["entity"].encode()
        assert alert["source"]["topic"] == topics.input
        assert alert["score"] > alert["threshold"] > 0
        assert alert["model"]["kind"] == "dense" and alert["top_features"]
        assert (
            alert["type"] == "alert"
            and alert["schema_version"] == 2
            and alert["profile"] == "orders"
        )
    assert len({a["alert_id"] for a in alerts}) == len(alerts)

    samples = daemon.samples()
    assert any(name == "anomaly_model_info" and v == 1 for (name, _), v in samples.items())
    assert daemon.metric("anomaly_threshold") > 0
    assert daemon.metric("anomaly_batch_duration_seconds_count", stage="score") > 0
    assert daemon.metric("anomaly_score_quantile", q="0.99") > 0
    assert daemon.get("/healthz")[0] == 200

    assert daemon.stop() == 0
    assert committed(kafka_bootstrap, topics.group, topics.input) == end_offsets(
        kafka_bootstrap, topics.input
    )


def test_malformed_messages_go_to_the_dead_letter_topic(
    kafka_bootstrap: str, topics: Topics, start_daemon: Callable[..., Daemon]
) -> None:
    daemon = start_daemon(batch_size=100)
    daemon.wait_ready()
    good, good_keys, _ = orders(500, seed=22, rate=0.0)
    doc = msgspec.json.decode(good[0])
    bad = {
        "invalid_json": b"{not json",
        "invalid_utf8": b'{"order_id": "\xff"}',
        "schema": msgspec.json.encode({**doc, "items": "three"}),
        "out_of_range": good[1].replace(b'"amount":', b'"amount":1e999,"was":', 1),
        "empty": b"",
        "non_finite": msgspec.json.encode({**doc, "amount": 1e308, "items": 1e-308}),
    }
    values = good[:250] + list(bad.values()) + good[250:]
    keys = good_keys[:250] + [f"bad-{r}".encode() for r in bad] + good_keys[250:]
    produce(kafka_bootstrap, topics.input, values, keys)

    daemon.wait_metric("anomaly_events_consumed_total", len(values))
    assert daemon.metric("anomaly_events_scored_total") == 500
    dead = read_topic(kafka_bootstrap, topics.dead_letters)
    by_key = {r.key.decode(): r for r in dead}
    assert sorted(by_key) == sorted(f"bad-{r}" for r in bad)
    for reason, value in bad.items():
        record = by_key[f"bad-{reason}"]
        headers = {k: v.decode() for k, v in record.headers}
        assert headers["dlq.reason"] == reason
        assert headers["dlq.detail"]
        assert headers["dlq.topic"] == topics.input
        assert int(headers["dlq.offset"]) >= 0 and int(headers["dlq.partition"]) in range(4)
        assert record.value == value  # the original bytes, untouched
        assert daemon.metric("anomaly_events_rejected_total", reason=reason) == 1
    assert daemon.stop() == 0


def test_sigterm_mid_stream_commits_everything_consumed(
    kafka_bootstrap: str, topics: Topics, start_daemon: Callable[..., Daemon]
) -> None:
    values, keys, _ = orders(60_000, seed=23, rate=0.01)

    def trickle() -> None:  # still producing when the signal lands, however fast the client
        for i in range(0, len(values), 2_000):
            produce(kafka_bootstrap, topics.input, values[i : i + 2_000], keys[i : i + 2_000])
            time.sleep(0.25)

    producer = threading.Thread(target=trickle)
    producer.start()
    daemon = start_daemon(batch_size=50, wait_seconds=0.05)
    daemon.wait_ready()
    daemon.wait_metric("anomaly_events_consumed_total", 5_000)
    assert daemon.stop(signal.SIGTERM) == 0
    producer.join()

    final = re.findall(r"consumed=(\d+) scored", daemon.output())
    consumed = int(final[-1])
    done = committed(kafka_bootstrap, topics.group, topics.input)
    assert 5_000 <= consumed < len(values), "the signal should land mid-stream"
    assert sum(done.values()) == consumed

    # A restart in the same group takes up exactly where the first run stopped.
    again = start_daemon()
    again.wait_ready()
    again.wait_metric("anomaly_events_consumed_total", len(values) - consumed)
    time.sleep(1.0)
    assert again.metric("anomaly_events_consumed_total") == len(values) - consumed
    assert again.stop() == 0
    assert committed(kafka_bootstrap, topics.group, topics.input) == end_offsets(
        kafka_bootstrap, topics.input
    )


def test_missing_input_topic_stops_the_start(
    kafka_bootstrap: str, orders_registry: Path, tmp_path: Path, unique: Callable[[str], str]
) -> None:
    config = tmp_path / "c.toml"
    config.write_text(
        f'profile = "orders"\n[kafka]\nbootstrap_servers = "{kafka_bootstrap}"\n'
        f'input_topic = "{unique("nope")}"\nalert_topic = "a"\ndead_letter_topic = "d"\n'
        f'[model]\nbundle = "{orders_registry}"\n[metrics]\nport = 0\n'
    )
    done = run_to_exit(config)
    assert done.returncode == 2
    assert "kafka.input_topic" in done.stderr and "does not exist" in done.stderr


def test_tampered_bundle_stops_the_start(
    orders_registry: Path, tmp_path: Path, kafka_bootstrap: str
) -> None:
    copy = tmp_path / "registry"
    shutil.copytree(orders_registry, copy)
    current = bundles.resolve(copy)
    with (current / bundles.MODEL_FILE).open("ab") as f:
        f.write(b"\0")
    config = tmp_path / "c.toml"
    config.write_text(
        f'profile = "orders"\n[kafka]\nbootstrap_servers = "{kafka_bootstrap}"\n'
        'input_topic = "i"\nalert_topic = "a"\ndead_letter_topic = "d"\n'
        f'[model]\nbundle = "{copy}"\n'
    )
    done = run_to_exit(config)
    assert done.returncode == 2
    assert "model.keras: sha256 does not match" in done.stderr


def run_to_exit(config: Path) -> subprocess.CompletedProcess[str]:
    """`streamer run` expected to stop by itself at start."""
    return subprocess.run(
        [sys.executable, "-m", "streamer", "run", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_second_replica_joining_mid_stream_loses_nothing(
    kafka_bootstrap: str, topics: Topics, start_daemon: Callable[..., Daemon]
) -> None:
    values, keys, _ = orders(60_000, seed=24, rate=0.01)

    def paced() -> None:  # a stream that is still flowing while the group rebalances
        for i in range(0, len(values), 5_000):
            produce(kafka_bootstrap, topics.input, values[i : i + 5_000], keys[i : i + 5_000])
            time.sleep(0.5)

    first = start_daemon(batch_size=200)
    first.wait_ready()
    feeder = threading.Thread(target=paced)
    feeder.start()
    first.wait_metric("anomaly_events_consumed_total", 5_000)
    second = start_daemon(batch_size=200)  # a rebalance while batches are uncommitted
    second.wait_ready()
    feeder.join(120)
    deadline = time.monotonic() + 120
    while committed(kafka_bootstrap, topics.group, topics.input) != end_offsets(
        kafka_bootstrap, topics.input
    ):
        assert time.monotonic() < deadline, first.output() + second.output()
        time.sleep(0.5)
    total = first.metric("anomaly_events_consumed_total") + second.metric(
        "anomaly_events_consumed_total"
    )
    assert total >= len(values)  # replays after the rebalance may add some
    assert second.metric("anomaly_events_consumed_total") > 0
    assert first.stop() == 0 and second.stop() == 0


def test_smoothing_from_the_config_alerts_as_the_evaluator_does(
    kafka_bootstrap: str,
    topics: Topics,
    start_daemon: Callable[..., Daemon],
    orders_registry: Path,
) -> None:
    """[smoothing] end to end: one feed (one key, so one partition, in order), three spikes;
    the one inside the first's cooldown is silent, as in the evaluator's pipeline."""
    # learn = false: decisions do not depend on how the daemon cuts its batches.
    smoothing = {"ewma_alpha": 0.5, "cooldown_rows": 100}
    daemon = start_daemon(
        extra="[threshold]\nquantile = 0.999\nmin_samples = 100\nlearn = false\n"
        "[smoothing]\newma_alpha = 0.5\ncooldown_rows = 100\n"
    )
    daemon.wait_ready()
    stream = spiky_stream()
    produce(kafka_bootstrap, topics.input, [m.value for m in stream], [b"pump-1"] * len(stream))
    assert daemon.wait_metric("anomaly_events_consumed_total", len(stream)) == len(stream)
    assert daemon.stop() == 0
    alerts = [json.loads(r.value) for r in read_topic(kafka_bootstrap, topics.alerts)]
    got = sorted(a["source"]["offset"] for a in alerts)
    bundle = bundles.load(orders_registry)
    s = settings(smoothing, threshold={"quantile": 0.999, "min_samples": 100, "learn": False})
    expected = [
        a.source.offset for a in feed(build_pipeline(s, bundle, bundle.load_scorer()), stream)
    ]
    assert got == expected == [SPIKES[0], SPIKES[2]]
    # On the wire: the smoothed score that cleared the threshold, and the event's own.
    assert all(a["score"] > a["threshold"] and a["raw_score"] > a["score"] for a in alerts)
