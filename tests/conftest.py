"""Shared fixtures: one real Kafka broker per test session, and one small trained bundle.

The broker is the repo's own local KRaft broker (deploy/local-kafka/kafka.sh) on
127.0.0.1:$TEST_KAFKA_PORT (19092 by default; its controller on the next port), started fresh
for the session and stopped at its end. kafka.sh names its data directory, properties, log and
pid file by port, so a second test session on the same machine runs beside the first with
another TEST_KAFKA_PORT (e.g. 29092); the fault tests' own broker moves with it (port + 100).
A port something already listens on fails the session before the broker is touched: the
session would otherwise reset (stop and wipe) another session's broker of the same checkout.
Set KAFKA_BOOTSTRAP to use a broker that is already running instead. If no broker can be had,
the integration tests fail: they never skip.
"""

from __future__ import annotations

import os
import socket
import subprocess
import uuid
from collections.abc import Callable, Iterator, Mapping
from itertools import islice
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import pytest

from streamer import bundle as bundles
from streamer.config import TrainingSettings
from streamer.features import FeatureSpec, HourOfDay, Numeric, build_features
from streamer.profiles import ORDERS, SENSORS
from training.datasets import History, read_jsonl
from training.fit import fit_bundle
from training.simulate import simulate

ROOT = Path(__file__).resolve().parent.parent
KAFKA_SH = ROOT / "deploy" / "local-kafka" / "kafka.sh"
DEFAULT_TEST_PORT = 19092
MAX_TEST_PORT = 65535 - 101  # room for the controller and the fault tests' broker


def broker_port(environ: Mapping[str, str] = os.environ) -> int:
    """The port of the session's own broker: TEST_KAFKA_PORT, or 19092. Its controller listens
    on the next port, and the fault tests' broker on port + 100 and + 101.

    >>> broker_port({}), broker_port({"TEST_KAFKA_PORT": "29092"})
    (19092, 29092)
    """
    raw = environ.get("TEST_KAFKA_PORT", "").strip() or str(DEFAULT_TEST_PORT)
    try:
        port = int(raw)
    except ValueError:
        port = 0
    if not 1024 <= port <= MAX_TEST_PORT:
        raise ValueError(f"TEST_KAFKA_PORT must be in [1024, {MAX_TEST_PORT}], not {raw!r}")
    return port


def broker_env(port: int, environ: Mapping[str, str] = os.environ) -> dict[str, str]:
    """kafka.sh's environment for a broker on `port`: the controller on port + 1, as kafka.sh
    derives it, set here so an inherited KAFKA_CONTROLLER_PORT cannot make two brokers share
    one.

    >>> env = broker_env(29092, {"KAFKA_CONTROLLER_PORT": "19093"})
    >>> env["KAFKA_PORT"], env["KAFKA_CONTROLLER_PORT"]
    ('29092', '29093')
    """
    return {**environ, "KAFKA_PORT": str(port), "KAFKA_CONTROLLER_PORT": str(port + 1)}


def ports_in_use(*ports: int) -> list[int]:
    """Those of `ports` something on 127.0.0.1 accepts connections on."""
    busy = []
    for port in ports:
        with socket.socket() as s:
            s.settimeout(1.0)
            if s.connect_ex(("127.0.0.1", port)) == 0:
                busy.append(port)
    return busy


@pytest.fixture(scope="session")
def kafka_bootstrap() -> Iterator[str]:
    given = os.environ.get("KAFKA_BOOTSTRAP")
    if given:
        yield given
        return
    try:
        port = broker_port()
    except ValueError as exc:
        pytest.fail(str(exc), pytrace=False)
    busy = ports_in_use(port, port + 1)
    if busy:
        pytest.fail(
            f"port(s) {busy} on 127.0.0.1 are in use (another test session's broker?): set "
            "TEST_KAFKA_PORT to a free port (its controller takes the next one), or stop a "
            f"leftover broker of this checkout with KAFKA_PORT={port} "
            "deploy/local-kafka/kafka.sh stop",
            pytrace=False,
        )
    env = broker_env(port)
    subprocess.run([str(KAFKA_SH), "reset"], env=env, check=True)
    started = subprocess.run([str(KAFKA_SH), "start"], env=env, capture_output=True, text=True)
    if started.returncode != 0:
        pytest.fail(
            f"the local Kafka broker did not start:\n{started.stderr[-4000:]}", pytrace=False
        )
    try:
        yield f"127.0.0.1:{port}"
    finally:
        subprocess.run([str(KAFKA_SH), "stop"], env=env, check=False)


@pytest.fixture
def unique() -> Callable[[str], str]:
    """Names no other test uses: topics and consumer groups per test."""
    token = uuid.uuid4().hex[:8]
    return lambda prefix: f"{prefix}-{token}"


@pytest.fixture(scope="session")
def orders_registry(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small dense bundle trained on clean simulated orders (the session's one training)."""
    root = tmp_path_factory.mktemp("orders-model")
    events = root / "train.jsonl"
    write_events(events, "orders", count=20_000, seed=101, anomaly_rate=0.0)
    history = read_jsonl(ORDERS, events)
    settings = TrainingSettings(epochs=25, patience=3, seed=7)
    fit_bundle(ORDERS, history, settings, root / "registry", source=events.name)
    return root / "registry"


@pytest.fixture(scope="session")
def orders_bundle(orders_registry: Path) -> bundles.Bundle:
    return bundles.load(orders_registry, expected_spec=ORDERS)


def _sensor_registry(
    tmp_path_factory: pytest.TempPathFactory, name: str, settings: TrainingSettings
) -> Path:
    """A windowed bundle trained on 4,000 clean simulated sensor readings."""
    root = tmp_path_factory.mktemp(name)
    events = root / "train.jsonl"
    write_events(events, "sensors", count=4000, seed=101, anomaly_rate=0.0)
    history = read_jsonl(SENSORS, events)
    fit_bundle(SENSORS, history, settings, root / "registry", source=events.name)
    return root / "registry"


@pytest.fixture(scope="session")
def sensors_lstm_registry(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small LSTM bundle over windows of clean simulated sensor readings (~10 s to train)."""
    settings = TrainingSettings(
        model="lstm",
        window_length=10,
        lstm_units=[16, 8],
        epochs=10,
        patience=3,
        batch_size=64,
        learning_rate=5e-3,
        seed=7,
    )
    return _sensor_registry(tmp_path_factory, "sensors-lstm-model", settings)


@pytest.fixture(scope="session")
def sensors_lstm_bundle(sensors_lstm_registry: Path) -> bundles.Bundle:
    return bundles.load(sensors_lstm_registry, expected_spec=SENSORS)


DENSE_WINDOW = TrainingSettings(
    model="dense_window",
    window_length=10,
    hidden_units=[32],
    bottleneck=8,
    epochs=20,
    patience=3,
    batch_size=64,
    learning_rate=5e-3,
    seed=7,
)


@pytest.fixture(scope="session")
def sensors_dense_window_registry(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small dense autoencoder over flattened windows of the LSTM's readings (~5 s)."""
    return _sensor_registry(tmp_path_factory, "sensors-dense-window-model", DENSE_WINDOW)


@pytest.fixture(scope="session")
def sensors_dense_window_bundle(sensors_dense_window_registry: Path) -> bundles.Bundle:
    return bundles.load(sensors_dense_window_registry, expected_spec=SENSORS)


HOURLY = FeatureSpec(
    profile="hourly",
    entity_field="series",
    time_field="ts",
    time_format="epoch_s",
    columns=[Numeric(field="value"), HourOfDay()],
)


def hourly_events(count: int, seed: int) -> list[Any]:
    """A value that follows the hour of day (10 + 5 sin), every 10 minutes, with noise."""
    rng = np.random.default_rng(seed)
    ts = 1_700_000_000 + 600 * np.arange(count)
    value = 10 + 5 * np.sin(2 * np.pi * (ts % 86_400) / 86_400) + rng.normal(0, 0.3, count)
    decoder = msgspec.json.Decoder(HOURLY.event_type())
    return [
        decoder.decode(msgspec.json.encode({"series": "s", "ts": int(t), "value": float(v)}))
        for t, v in zip(ts, value, strict=True)
    ]


@pytest.fixture(scope="session")
def hourly_forecast_bundle(tmp_path_factory: pytest.TempPathFactory) -> bundles.Bundle:
    """A dense model with training.forecast that predicts a value from its hour of day
    (the hour's sin and cos are context, score weight 0) (~5 s)."""
    events = hourly_events(3000, seed=3)
    history = History(build_features(HOURLY, events), np.array([e.ts for e in events], float), 0)
    settings = TrainingSettings(
        forecast=True,
        score_weights={"hour_*": 0.0},
        hidden_units=[16],
        bottleneck=4,
        epochs=60,
        patience=5,
        batch_size=64,
        learning_rate=5e-3,
        seed=7,
    )
    registry = tmp_path_factory.mktemp("hourly-forecast-model") / "registry"
    fit_bundle(HOURLY, history, settings, registry, source="hourly")
    return bundles.load(registry, expected_spec=HOURLY)


@pytest.fixture(scope="session")
def sensors_forecast_bundle(tmp_path_factory: pytest.TempPathFactory) -> bundles.Bundle:
    """The dense window model with training.forecast: it rebuilds each window's last row
    from the rows before it (~5 s)."""
    settings = msgspec.structs.replace(DENSE_WINDOW, forecast=True)
    registry = _sensor_registry(tmp_path_factory, "sensors-forecast-model", settings)
    return bundles.load(registry, expected_spec=SENSORS)


def write_events(
    path: Path, profile: str, count: int, seed: int, anomaly_rate: float
) -> dict[str, str]:
    """Write simulated events as JSON lines; return {event_id: kind} for the anomalies."""
    anomalies: dict[str, str] = {}
    with path.open("wb") as f:
        for event, label in islice(simulate(profile, seed, anomaly_rate), count):
            f.write(msgspec.json.encode(event) + b"\n")
            if label.is_anomaly:
                anomalies[label.event_id] = label.kind
    return anomalies


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
