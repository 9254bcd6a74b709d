"""A real Prometheus scraping a real daemon on the real broker, and the metric names it sees.

Prometheus is Debian's `prometheus` package (scripts/setup.sh installs it): the server runs on
127.0.0.1 with a free port, a temporary TSDB and a generated config that scrapes the daemon
every second as job "anomaly-detector" (the job deploy/prometheus/rules.yml and the dashboard
select on) and loads those rules.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import ROOT, free_port
from tests.deploy.test_static import RULES_YML, _dashboard_exprs, _metric_names, _rule_exprs
from tests.integration.conftest import Daemon, Topics, produce
from tests.integration.test_daemon import orders

pytestmark = pytest.mark.integration
# Series that exist only while a candidate is shadow-scored: a version label to show, and
# score quantiles of batches the candidate scored. test_shadow.py asserts them then.
ONLY_WHILE_SHADOWING = {"anomaly_shadow_info", "anomaly_shadow_score_quantile"}

JOB = "anomaly-detector"
DASHBOARDS = sorted((ROOT / "deploy" / "grafana" / "dashboards").glob("*.json"))
PROMETHEUS_MISSING = (
    "the prometheus server binary is not on PATH: run scripts/setup.sh (it installs Debian's "
    "`prometheus` package, which brings /usr/bin/prometheus and promtool)"
)


class Prometheus:
    """`prometheus` as a subprocess, and its HTTP API."""

    def __init__(self, binary: str, workdir: Path, targets: list[str]) -> None:
        self.port = free_port()
        self.log_path = workdir / "prometheus.log"
        shutil.copy(RULES_YML, workdir / "rules.yml")
        config = {
            # scrape_timeout must not exceed the interval; the default is 10s.
            "global": {
                "scrape_interval": "1s",
                "scrape_timeout": "1s",
                "evaluation_interval": "1s",
            },
            "rule_files": ["rules.yml"],  # relative to the config file, as in the compose stack
            "scrape_configs": [{"job_name": JOB, "static_configs": [{"targets": targets}]}],
        }
        config_path = workdir / "prometheus.yml"
        config_path.write_text(yaml.safe_dump(config))
        self._log = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            [
                binary,
                f"--config.file={config_path}",
                f"--storage.tsdb.path={workdir / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
            ],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            cwd=workdir,
        )

    def output(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")[-4000:]

    def _get(self, path: str) -> tuple[int, bytes]:
        url = f"http://127.0.0.1:{self.port}{path}"
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()

    def api(self, endpoint: str, **params: str) -> Any:
        query = f"?{urllib.parse.urlencode(params)}" if params else ""
        status, body = self._get(f"/api/v1/{endpoint}{query}")
        reply = json.loads(body)
        assert status == 200 and reply["status"] == "success", f"{endpoint}: {reply}"
        return reply["data"]

    def value(self, expr: str) -> float | None:
        """The value of an instant query that gives one series, or None when it gives none."""
        result = self.api("query", query=expr)["result"]
        assert len(result) <= 1, f"{expr} gave {len(result)} series"
        return float(result[0]["value"][1]) if result else None

    def wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"prometheus exited {self.proc.returncode}:\n{self.output()}")
            try:
                if self._get("/-/ready")[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.2)
        raise AssertionError(f"prometheus not ready after {timeout}s:\n{self.output()}")

    def wait_for(self, what: str, check: Callable[[], bool], timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while not check():
            if time.monotonic() > deadline:
                raise AssertionError(f"{what}: not within {timeout}s\n{self.output()}")
            time.sleep(0.5)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
        try:
            return self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(10)
        finally:
            self._log.close()


@pytest.fixture
def start_prometheus(tmp_path: Path) -> Iterator[Callable[[list[str]], Prometheus]]:
    started: list[Prometheus] = []

    def start(targets: list[str]) -> Prometheus:
        binary = shutil.which("prometheus")
        if binary is None:  # a failure, never a skip: the check would silently stop running
            pytest.fail(PROMETHEUS_MISSING, pytrace=False)
        workdir = tmp_path / f"prometheus-{len(started)}"
        workdir.mkdir()
        started.append(Prometheus(binary, workdir, targets))
        return started[-1]

    yield start
    for server in started:
        server.stop()


def _used_metric_names() -> dict[str, set[str]]:
    """{where: metric names} for every rule and every dashboard query in the repo."""
    exprs = {f"rule {name}": expr for name, expr in _rule_exprs().items()}
    assert DASHBOARDS, "no dashboard JSON in deploy/grafana/dashboards"
    for path in DASHBOARDS:
        exprs.update({f"{path.name} {k}": v for k, v in _dashboard_exprs(path).items()})
    return {where: _metric_names(expr) for where, expr in exprs.items()}


def test_prometheus_scrapes_the_daemon_and_loads_the_rules(
    kafka_bootstrap: str,
    topics: Topics,
    start_daemon: Callable[..., Daemon],
    start_prometheus: Callable[[list[str]], Prometheus],
) -> None:
    daemon = start_daemon()
    daemon.wait_ready()
    prometheus = start_prometheus([f"127.0.0.1:{daemon.port}"])
    prometheus.wait_ready()

    values, keys, anomalies = orders(5_000, seed=33, rate=0.01)
    assert anomalies
    produce(kafka_bootstrap, topics.input, values, keys)

    # Everything below is read back through Prometheus's HTTP API, not from the daemon.
    selector = f'{{job="{JOB}"}}'
    prometheus.wait_for(
        f"Prometheus sees anomaly_events_consumed_total == {len(values)}",
        lambda: prometheus.value(f"sum(anomaly_events_consumed_total{selector})") == len(values),
    )
    published = daemon.metric("anomaly_alerts_published_total")
    assert published > 0, daemon.output()
    prometheus.wait_for(
        f"Prometheus sees anomaly_alerts_published_total == {published}",
        lambda: prometheus.value(f"sum(anomaly_alerts_published_total{selector})") == published,
    )
    assert prometheus.value(f"up{selector}") == 1
    assert prometheus.value(f"anomaly_ready{selector}") == 1
    assert prometheus.value(f"sum(anomaly_events_scored_total{selector})") == len(values)

    # The alert rules loaded, and each has been evaluated without an error.
    def rules() -> list[dict[str, Any]]:
        groups = prometheus.api("rules")["groups"]
        return [rule for group in groups for rule in group["rules"]]

    prometheus.wait_for(
        "every rule evaluated", lambda: all(r["health"] != "unknown" for r in rules()), 30.0
    )
    loaded = {r["name"]: r for r in rules()}
    assert set(loaded) == set(_rule_exprs()), f"loaded {sorted(loaded)}"
    bad = {name: r.get("lastError") for name, r in loaded.items() if r["health"] != "ok"}
    assert not bad, f"rules not healthy: {bad}"

    # Every metric name the rules and the dashboards query is one Prometheus has ingested
    # (`up` included: Prometheus makes that one itself).
    ingested = set(prometheus.api("label/__name__/values")) | ONLY_WHILE_SHADOWING
    missing = {w: sorted(n - ingested) for w, n in _used_metric_names().items() if n - ingested}
    assert not missing, f"queried but never ingested: {missing}"

    assert prometheus.stop() == 0, prometheus.output()


def test_every_queried_metric_is_in_a_real_scrape_of_the_daemon(
    kafka_bootstrap: str, topics: Topics, start_daemon: Callable[..., Daemon]
) -> None:
    daemon = start_daemon()
    daemon.wait_ready()
    values, keys, _ = orders(2_000, seed=34, rate=0.01)
    produce(kafka_bootstrap, topics.input, values, keys)
    daemon.wait_metric("anomaly_events_consumed_total", len(values))
    # Lag is refreshed on its own clock (once a second): wait until this replica reports it.
    deadline = time.monotonic() + 30
    while not any(name == "anomaly_consumer_lag" for name, _ in daemon.samples()):
        assert time.monotonic() < deadline, f"no anomaly_consumer_lag:\n{daemon.output()}"
        time.sleep(0.25)

    status, text = daemon.get("/metrics")
    assert status == 200
    scraped = {s.name for f in text_string_to_metric_families(text) for s in f.samples}
    scraped.add("up")  # made by Prometheus per target, never exported (the test above sees it)
    scraped |= ONLY_WHILE_SHADOWING  # tests/integration/test_shadow.py checks those
    missing = {w: sorted(n - scraped) for w, n in _used_metric_names().items() if n - scraped}
    assert not missing, f"queried but not exported by the daemon: {missing}"
    # The extractor found what it should: a broken one would pass the check above vacuously.
    used = set().union(*_used_metric_names().values())
    assert {"anomaly_batch_duration_seconds_bucket", "process_resident_memory_bytes"} <= used
