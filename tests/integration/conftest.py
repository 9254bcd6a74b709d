"""Integration helpers: real topics, a real daemon subprocess, reading topics back."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from kafka.admin import KafkaAdminClient, NewTopic
from prometheus_client.parser import text_string_to_metric_families

from streamer.kafka_io import read_topic  # noqa: F401  (the tests import it from here)
from tests.conftest import ROOT, free_port

pytestmark = pytest.mark.integration


@dataclass
class Topics:
    input: str
    alerts: str
    dead_letters: str
    group: str


def create_topics(bootstrap: str, t: Topics) -> None:
    admin = KafkaAdminClient(bootstrap_servers=bootstrap)
    try:
        admin.create_topics([NewTopic(t.input, 4, 1)], wait_for_metadata=True)
    finally:
        admin.close()


@pytest.fixture
def topics(kafka_bootstrap: str, unique: Callable[[str], str]) -> Iterator[Topics]:
    t = Topics(unique("in"), unique("alerts"), unique("dlq"), unique("group"))
    create_topics(kafka_bootstrap, t)
    yield t
    admin = KafkaAdminClient(bootstrap_servers=kafka_bootstrap)
    admin.delete_topics([t.input, t.alerts, t.dead_letters], raise_errors=False)
    admin.close()


class Daemon:
    """`python -m streamer run` as a subprocess, with its metrics endpoint and log."""

    def __init__(self, config: Path, port: int, log: Path) -> None:
        self.config, self.port, self.log_path = config, port, log
        self._log = log.open("wb")
        env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "streamer", "run", "--config", str(config)],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
            env=env,
        )

    def get(self, path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=5) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()

    def wait_ready(self, timeout: float = 90.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"daemon exited {self.proc.returncode}:\n{self.output()}")
            try:
                if self.get("/readyz")[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.2)
        raise AssertionError(f"daemon not ready after {timeout}s:\n{self.output()}")

    def samples(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        _, text = self.get("/metrics")
        return {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
        }

    def metric(self, name: str, **labels: str) -> float:
        return self.samples().get((name, tuple(sorted(labels.items()))), 0.0)

    def wait_metric(
        self, name: str, at_least: float, timeout: float = 120.0, **labels: str
    ) -> float:
        deadline = time.monotonic() + timeout
        value = 0.0
        while time.monotonic() < deadline:
            value = self.metric(name, **labels)
            if value >= at_least:
                return value
            if self.proc.poll() is not None:
                raise AssertionError(f"daemon exited {self.proc.returncode}:\n{self.output()}")
            time.sleep(0.25)
        raise AssertionError(
            f"{name}{labels or ''} = {value} < {at_least} after {timeout}s:\n{self.output()}"
        )

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        finally:
            self._log.flush()

    def output(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")[-6000:]

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self._log.close()


def write_config(
    path: Path,
    bootstrap: str,
    topics: Topics,
    registry: Path,
    batch_size: int = 1000,
    wait_seconds: float = 0.1,
    kafka_extra: str = "",
    model_extra: str = "",
    extra: str = "",
    runtime: str = "numpy",
    profile: str | None = "orders",
) -> int:
    """A daemon config for one test; returns the metrics port it was given. `profile` None:
    `extra` holds a `[features]` table instead."""
    port = free_port()
    path.write_text(
        f"""
{f'profile = "{profile}"' if profile else ""}
[kafka]
bootstrap_servers = "{bootstrap}"
input_topic = "{topics.input}"
alert_topic = "{topics.alerts}"
dead_letter_topic = "{topics.dead_letters}"
group_id = "{topics.group}"
{kafka_extra}
[model]
bundle = "{registry}"
runtime = "{runtime}"
{model_extra}
[batch]
max_batch_size = {batch_size}
max_wait_seconds = {wait_seconds}
[metrics]
port = {port}
{extra}
"""
    )
    return port


@pytest.fixture
def start_daemon(
    kafka_bootstrap: str, topics: Topics, orders_registry: Path, tmp_path: Path
) -> Iterator[Callable[..., Daemon]]:
    """Start `streamer run` subprocesses; keyword arguments go to `write_config`."""
    started: list[Daemon] = []

    def start(**options: Any) -> Daemon:
        options.setdefault("bootstrap", kafka_bootstrap)
        options.setdefault("topics", topics)
        options.setdefault("registry", orders_registry)
        n = len(started)
        config = tmp_path / f"daemon-{n}.toml"
        port = write_config(config, **options)
        daemon = Daemon(config, port, tmp_path / f"daemon-{n}.log")
        started.append(daemon)
        return daemon

    yield start
    for d in started:
        d.kill()


def produce(
    bootstrap: str,
    topic: str,
    values: list[bytes],
    keys: list[bytes | None] | None = None,
    **options: Any,
) -> None:
    producer = KafkaProducer(
        bootstrap_servers=bootstrap, linger_ms=5, batch_size=262_144, **options
    )
    for i, v in enumerate(values):
        producer.send(topic, key=keys[i] if keys else None, value=v)
    producer.flush()
    producer.close()


def committed(bootstrap: str, group: str, topic: str) -> dict[int, int]:
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False)
    try:
        parts = consumer.partitions_for_topic(topic) or set()
        return {p: consumer.committed(TopicPartition(topic, p)) or 0 for p in sorted(parts)}
    finally:
        consumer.close()


def end_offsets(bootstrap: str, topic: str) -> dict[int, int]:
    consumer = KafkaConsumer(bootstrap_servers=bootstrap)
    try:
        parts = consumer.partitions_for_topic(topic) or set()
        tps = [TopicPartition(topic, p) for p in sorted(parts)]
        return {tp.partition: off for tp, off in consumer.end_offsets(tps).items()}
    finally:
        consumer.close()
