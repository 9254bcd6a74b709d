"""Fault injection on the real broker: broker outages, SIGKILL storms, fuzzed input.

Run on their own with `pytest -m faults`. Each scenario checks what a subscriber relies on:
nothing lost (every input offset committed), every clear anomaly alerted, and in
exactly-once mode no alert seen twice by a read_committed reader.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

import msgspec
import numpy as np
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from kafka import KafkaProducer

from streamer import bundle as bundles
from streamer.app import build_pipeline
from streamer.config import from_mapping
from streamer.records import RawMessage
from tests.conftest import KAFKA_SH, broker_env, broker_port, ports_in_use
from tests.integration.conftest import (
    Daemon,
    Topics,
    committed,
    create_topics,
    end_offsets,
    produce,
    read_topic,
)
from training.simulate import simulate

pytestmark = [pytest.mark.integration, pytest.mark.faults]

# This module's broker sits 100 above the session's (19192 by default), so it moves with
# TEST_KAFKA_PORT too.
OWN_BROKER_OFFSET = 100


@dataclass
class Broker:
    """A broker of this module's own, so it can be stopped without hurting other tests."""

    port: str

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _run(self, command: str) -> None:
        env = broker_env(int(self.port))
        done = subprocess.run([str(KAFKA_SH), command], env=env, capture_output=True, text=True)
        assert done.returncode == 0, f"kafka.sh {command} failed:\n{done.stderr[-3000:]}"

    def start(self) -> None:
        self._run("start")

    def stop(self) -> None:
        self._run("stop")


@pytest.fixture(scope="module")
def own_broker() -> Iterator[Broker]:
    port = broker_port() + OWN_BROKER_OFFSET
    busy = ports_in_use(port, port + 1)
    assert not busy, f"port(s) {busy} in use: another session's broker? (TEST_KAFKA_PORT)"
    broker = Broker(str(port))
    broker._run("reset")
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()


def orders(count: int, seed: int, rate: float = 0.01) -> tuple[list[bytes], list[bytes]]:
    values, keys = [], []
    for event, _ in islice(simulate("orders", seed, rate), count):
        values.append(msgspec.json.encode(event))
        keys.append(event["customer_id"].encode())
    return values, keys


def clear_anomalies(registry: Path, values: list[bytes]) -> set[str]:
    """Events the model flags with a wide margin, replayed in-process: whatever the batching
    or the restarts, the daemon must alert on every one of them."""
    b = bundles.load(registry)
    settings = from_mapping(
        {
            "profile": "orders",
            "kafka": {"input_topic": "i", "alert_topic": "a", "dead_letter_topic": "d"},
            "model": {"bundle": str(registry)},
        }
    )
    pipeline = build_pipeline(settings, b, b.load_scorer())
    clear: set[str] = set()
    for i in range(0, len(values), 1000):
        result = pipeline.process(
            [RawMessage("t", 0, i + j, None, v, 0) for j, v in enumerate(values[i : i + 1000])]
        )
        clear |= {str(a.event_id) for a in result.alerts if a.score > 1.5 * a.threshold}
    return clear


def alerted_ids(records: list) -> list[str]:
    return [json.loads(r.value)["event_id"] for r in records]


def wait_until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def test_broker_down_at_start_then_back(
    own_broker: Broker, start_daemon: Callable[..., Daemon], unique: Callable[[str], str]
) -> None:
    topics = Topics(unique("in"), unique("alerts"), unique("dlq"), unique("group"))
    create_topics(own_broker.bootstrap, topics)
    own_broker.stop()
    try:
        daemon = start_daemon(bootstrap=own_broker.bootstrap, topics=topics)
        # Alive and saying so, not ready, and not exiting, while the broker is away.
        wait_until(lambda: _status(daemon, "/healthz") == 200, 60, "/healthz while down")
        time.sleep(3)
        assert daemon.proc.poll() is None
        assert _status(daemon, "/readyz") == 503
    finally:
        own_broker.start()
    daemon.wait_ready(timeout=90)
    values, keys = orders(5_000, seed=31)
    produce(own_broker.bootstrap, topics.input, values, keys)
    daemon.wait_metric("anomaly_events_consumed_total", 5_000)
    assert daemon.stop() == 0
    assert committed(own_broker.bootstrap, topics.group, topics.input) == end_offsets(
        own_broker.bootstrap, topics.input
    )


def _status(daemon: Daemon, path: str) -> int:
    try:
        return daemon.get(path)[0]
    except OSError:
        return 0


def test_broker_restart_mid_stream_loses_nothing(
    own_broker: Broker,
    start_daemon: Callable[..., Daemon],
    unique: Callable[[str], str],
    orders_registry: Path,
) -> None:
    topics = Topics(unique("in"), unique("alerts"), unique("dlq"), unique("group"))
    create_topics(own_broker.bootstrap, topics)
    values, keys = orders(30_000, seed=32)
    daemon = start_daemon(bootstrap=own_broker.bootstrap, topics=topics, batch_size=200)
    daemon.wait_ready()
    # The first third before the outage, the rest while the broker is down and after.
    produce(own_broker.bootstrap, topics.input, values[:10_000], keys[:10_000])
    daemon.wait_metric("anomaly_events_consumed_total", 10_000)
    # Connected before the outage (a new client would wait to bootstrap), and quick to
    # reconnect, so the test's own producer does not lag behind the daemon.
    producer = KafkaProducer(
        bootstrap_servers=own_broker.bootstrap, linger_ms=5, reconnect_backoff_max_ms=1000
    )

    def send_rest() -> None:
        for k, v in zip(keys[10_000:], values[10_000:], strict=True):
            producer.send(topics.input, key=k, value=v)
        producer.flush()

    own_broker.stop()
    rest = threading.Thread(target=send_rest, daemon=True)
    rest.start()  # kafka-python buffers and retries until the broker is back
    try:
        time.sleep(8)
        assert daemon.proc.poll() is None, "the daemon must ride through the outage"
        wait_until(lambda: _status(daemon, "/readyz") == 503, 30, "/readyz to report the outage")
    finally:
        # Back even when the outage checks fail: the module's later tests need the broker,
        # and send_rest must not fail inside one of them.
        own_broker.start()  # returns once the broker serves again
    back = time.monotonic()
    # librdkafka ends a session its coordinator has not answered for session_timeout_ms
    # (10 s, shorter than this outage) and rejoins as a new member, whom the broker admits
    # once the old membership expires: up to one more session timeout (README: Kafka client).
    # kafka-python keeps its membership through the outage.
    within = 20 if os.environ.get("STREAMER_KAFKA__CLIENT") == "confluent" else 10
    wait_until(
        lambda: daemon.metric("anomaly_events_consumed_total") > 10_000,
        within,
        f"consumption to resume within {within} s of the broker being back",
    )
    print(f"resumed {time.monotonic() - back:.1f}s after the broker was back")
    rest.join(120)
    producer.close()
    # The consumed count includes replays (the confluent client replays what was uncommitted
    # when its session ended), so it can reach 30,000 early: wait for the offsets themselves.
    end = end_offsets(own_broker.bootstrap, topics.input)
    wait_until(
        lambda: committed(own_broker.bootstrap, topics.group, topics.input) == end,
        120,
        "every input offset committed",
    )
    assert daemon.stop() == 0
    assert committed(own_broker.bootstrap, topics.group, topics.input) == end
    got = set(alerted_ids(read_topic(own_broker.bootstrap, topics.alerts)))
    missing = clear_anomalies(orders_registry, values) - got
    assert not missing, f"{len(missing)} clear anomalies never alerted"


@pytest.mark.parametrize("delivery", ["at-least-once", "exactly-once"])
def test_sigkill_twenty_times(
    delivery: str,
    kafka_bootstrap: str,
    topics: Topics,
    start_daemon: Callable[..., Daemon],
    orders_registry: Path,
) -> None:
    values, keys = orders(100_000, seed=33)
    produce(kafka_bootstrap, topics.input, values, keys)
    rng = random.Random(33)
    # Static membership: each restart takes the partitions back at once, instead of
    # waiting for the killed member's session to expire.
    extra = f'delivery = "{delivery}"\ngroup_instance_id = "replica-0"'
    options = {"batch_size": 100, "kafka_extra": extra}

    def all_committed() -> bool:
        return committed(kafka_bootstrap, topics.group, topics.input) == end_offsets(
            kafka_bootstrap, topics.input
        )

    kills = 0
    while kills < 20:
        daemon = start_daemon(**options)
        daemon.wait_ready()
        wait_until(
            lambda d=daemon: d.metric("anomaly_events_consumed_total") > 0 or all_committed(),
            60,
            "the restarted daemon to consume",
        )
        time.sleep(rng.uniform(0.0, 1.0))  # die at a random point of the stream
        daemon.proc.send_signal(signal.SIGKILL)
        daemon.proc.wait(30)
        kills += 1
    final = start_daemon(**options)
    final.wait_ready()
    wait_until(
        lambda: (
            committed(kafka_bootstrap, topics.group, topics.input)
            == end_offsets(kafka_bootstrap, topics.input)
        ),
        180,
        "every input offset to be committed",
    )
    assert final.stop() == 0

    records = read_topic(kafka_bootstrap, topics.alerts, read_committed=True)
    ids = [json.loads(r.value)["alert_id"] for r in records]
    counts = Counter(ids)
    if delivery == "exactly-once":
        assert max(counts.values()) == 1, "a read_committed reader saw an alert twice"
    else:
        # Duplicates are allowed, but a duplicate is the same alert: same id, same event.
        by_id: dict[str, set[str]] = {}
        for r in records:
            doc = json.loads(r.value)
            by_id.setdefault(doc["alert_id"], set()).add(doc["event_id"])
        assert all(len(events) == 1 for events in by_id.values())
    print(f"{delivery}: {len(ids)} alert records, {len(counts)} distinct, {kills} kills")
    missing = clear_anomalies(orders_registry, values) - set(alerted_ids(records))
    assert not missing, f"{len(missing)} clear anomalies never alerted"


# -- fuzzed input -----------------------------------------------------------------------------

GOOD = msgspec.json.decode(orders(1, seed=34)[0][0])
JSONISH = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=10,
)


def _utf8(b: bytes) -> bool:
    try:
        b.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


def _not_json(b: bytes) -> bool:
    return _utf8(b) and b.strip()[:1] not in (b"{", b"[", b'"')


def _with_amount(token: bytes) -> bytes:
    return msgspec.json.encode(GOOD).replace(b'"amount":', b'"amount":' + token + b',"was":', 1)


def _without(field: str) -> bytes:
    return msgspec.json.encode({k: v for k, v in GOOD.items() if k != field})


def _wrong_type(field: str, value: object) -> bytes:
    return msgspec.json.encode({**GOOD, field: value})


NOT_A_NUMBER = JSONISH.filter(lambda v: isinstance(v, bool) or not isinstance(v, int | float))
BAD_MESSAGES: st.SearchStrategy[bytes] = st.one_of(
    st.binary(min_size=1).filter(_not_json),  # not JSON
    st.binary(min_size=1).map(lambda b: b"\xff" + b),  # not UTF-8
    st.builds(_wrong_type, st.sampled_from(["amount", "items", "discount"]), NOT_A_NUMBER),
    st.builds(_wrong_type, st.sampled_from(["country", "payment_method"]),
              JSONISH.filter(lambda v: not isinstance(v, str))),
    st.sampled_from(sorted(GOOD)).map(_without),  # a required field missing
    st.sampled_from([b"NaN", b"Infinity", b"-Infinity", b"nan"]).map(_with_amount),
    st.integers(400, 100_000).map(lambda e: _with_amount(f"1e{e}".encode())),  # overflows
    st.integers(10, 50_000).map(lambda d: b"[" * d + b"]" * d),  # deep nesting
    st.just(msgspec.json.encode({"sensor_id": "s-01", "ts": 1, "rpm": 1.0})),  # other profile
    st.just(b""),  # empty
)  # fmt: skip


def draw_bad_messages(n_examples: int) -> list[bytes]:
    """Fuzzed messages drawn by hypothesis's strategies (no shrinking: nothing fails here)."""
    drawn: list[bytes] = []

    @settings(
        max_examples=n_examples,
        database=None,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
        deadline=None,
    )
    @given(BAD_MESSAGES)
    def collect(message: bytes) -> None:
        drawn.append(message)

    collect()
    return drawn


def test_hundred_thousand_fuzzed_messages(
    kafka_bootstrap: str,
    topics: Topics,
    start_daemon: Callable[..., Daemon],
    orders_registry: Path,
) -> None:
    bad = draw_bad_messages(2_000)
    rng = np.random.default_rng(35)
    # 100k bad messages, plus a few over the 1 MB size limit, mixed into 20k good events.
    fuzz = [bad[i] for i in rng.integers(0, len(bad), 100_000)]
    # Just over the daemon's 1,000,000-byte limit, under the broker's own 1 MiB.
    fuzz += [b'{"pad": "' + b"x" * 1_000_100 + b'"}'] * 3
    good, good_keys = orders(20_000, seed=36)
    stream: list[tuple[bytes, bytes]] = [(v, k) for v, k in zip(good, good_keys, strict=True)]
    stream += [(v, f"bad-{i}".encode()) for i, v in enumerate(fuzz)]
    order = rng.permutation(len(stream))
    values = [stream[i][0] for i in order]
    keys = [stream[i][1] for i in order]
    daemon = start_daemon()
    daemon.wait_ready()
    produce_large(kafka_bootstrap, topics.input, values, keys)
    daemon.wait_metric("anomaly_events_consumed_total", len(values), timeout=300)
    assert daemon.proc.poll() is None
    assert daemon.metric("anomaly_events_scored_total") == len(good)

    dead = read_topic(kafka_bootstrap, topics.dead_letters)
    assert len(dead) == len(fuzz)
    assert {r.key for r in dead} == {f"bad-{i}".encode() for i in range(len(fuzz))}
    reasons = Counter(dict(r.headers)["dlq.reason"].decode() for r in dead)
    print("dead letters by reason:", dict(reasons))
    for reason, n in reasons.items():
        assert daemon.metric("anomaly_events_rejected_total", reason=reason) == n
    expected = {f"bad-{i}".encode(): v for i, v in enumerate(fuzz)}
    assert all(r.value == expected[r.key] for r in dead), "dead letters keep the original bytes"

    got = set(alerted_ids(read_topic(kafka_bootstrap, topics.alerts)))
    missing = clear_anomalies(orders_registry, good) - got
    assert not missing, f"{len(missing)} clear anomalies lost among the fuzz"
    assert daemon.stop() == 0


def produce_large(bootstrap: str, topic: str, values: list[bytes], keys: list[bytes]) -> None:
    producer = KafkaProducer(
        bootstrap_servers=bootstrap, linger_ms=5, batch_size=262_144, max_request_size=4_000_000
    )
    for k, v in zip(keys, values, strict=True):
        producer.send(topic, key=k, value=v)
    producer.flush()
    producer.close()
