"""Static checks of the Kubernetes base in deploy/k8s (nothing is applied to a cluster).

Built-in kinds are validated against the Kubernetes OpenAPI schemas that the
kubernetes-validate package ships (strict: unknown fields fail). The two custom resources,
PodMonitor (Prometheus Operator) and ScaledObject (KEDA), have no schema there, so their
structure is checked here, together with how the pieces fit: the config, the ports, the
probes, the labels, the images and the replica ceiling.
"""

from __future__ import annotations

import copy
import re
import tomllib
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from streamer.config import Settings, from_mapping
from tests.deploy.test_static import (
    COMPOSE,
    RULES_YML,
    _assert_pinned,
    _hadolint,
    _load_yaml,
    _run,
)

K8S = Path(__file__).resolve().parents[2] / "deploy" / "k8s"
KUSTOMIZATION = K8S / "kustomization.yaml"
MODEL_DOCKERFILE = K8S / "model-image" / "Dockerfile"
CONFIG_PATH = "/etc/streamer/config.toml"
# A recent release that kubernetes-validate ships schemas for.
K8S_VERSION = "1.34.0"
BUILTIN_API_VERSIONS = {"v1", "apps/v1", "policy/v1"}


# -- loading ---------------------------------------------------------------------------------


def _kustomization() -> dict[str, Any]:
    doc = _load_yaml(KUSTOMIZATION)
    assert doc["apiVersion"] == "kustomize.config.k8s.io/v1beta1"
    assert doc["kind"] == "Kustomization"
    return doc


def _resources() -> list[tuple[str, dict[str, Any]]]:
    """(file, document) for every resource file, plus the ConfigMap the generator makes."""
    out = []
    for name in _kustomization()["resources"]:
        with (K8S / name).open() as f:
            out.extend((name, doc) for doc in yaml.safe_load_all(f) if doc)
    for gen in _kustomization().get("configMapGenerator", []):
        # What kustomize generates, less the content-hash suffix on the name.
        data = {Path(f).name: (K8S / f).read_text() for f in gen["files"]}
        cm = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": gen["name"]}}
        out.append(("configMapGenerator", {**cm, "data": data}))
    return out


def _one(kind: str) -> dict[str, Any]:
    found = [doc for _, doc in _resources() if doc["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def _settings() -> Settings:
    config = _one("ConfigMap")["data"]["config.toml"]
    return from_mapping(tomllib.loads(config), environ={}, source="deploy/k8s/config.toml")


def _pod_spec() -> dict[str, Any]:
    return _one("Deployment")["spec"]["template"]["spec"]


def _detector() -> dict[str, Any]:
    (container,) = [c for c in _pod_spec()["containers"] if c["name"] == "detector"]
    return container


def _all_containers() -> list[dict[str, Any]]:
    spec = _pod_spec()
    return [*spec.get("initContainers", []), *spec["containers"]]


def _pod_labels() -> dict[str, str]:
    return _one("Deployment")["spec"]["template"]["metadata"]["labels"]


def _selects_pods(match_labels: dict[str, str]) -> bool:
    return bool(match_labels) and match_labels.items() <= _pod_labels().items()


# -- the kustomize base and the schemas ------------------------------------------------------


def test_kustomization_lists_every_manifest() -> None:
    listed = set(_kustomization()["resources"])
    on_disk = {p.name for p in K8S.glob("*.yaml")} - {KUSTOMIZATION.name}
    assert listed == on_disk, f"listed {sorted(listed)}, on disk {sorted(on_disk)}"
    for gen in _kustomization()["configMapGenerator"]:
        for file in gen["files"]:
            assert (K8S / file).is_file(), f"configMapGenerator file {file} is missing"
    kinds = sorted(doc["kind"] for _, doc in _resources())
    assert kinds == [
        "ConfigMap", "Deployment", "PodDisruptionBudget", "PodMonitor", "ScaledObject", "Service",
    ]  # fmt: skip


@pytest.mark.parametrize(
    "source, doc",
    [(s, d) for s, d in _resources() if d["apiVersion"] in BUILTIN_API_VERSIONS],
    ids=lambda v: v if isinstance(v, str) else v["kind"],
)
def test_builtin_kinds_validate_against_the_kubernetes_schema(source: str, doc: Any) -> None:
    try:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        return
    except kubernetes_validate.ValidationError as exc:
        # The message alone: the exception would print the whole schema, twice.
        error = f"{source}: {doc['kind']} at {'.'.join(map(str, exc.path))}: {exc.message}"
    pytest.fail(error, pytrace=False)


def test_every_resource_is_either_schema_checked_or_a_known_crd() -> None:
    crds = {("monitoring.coreos.com/v1", "PodMonitor"), ("keda.sh/v1alpha1", "ScaledObject")}
    for source, doc in _resources():
        key = (doc["apiVersion"], doc["kind"])
        assert doc["apiVersion"] in BUILTIN_API_VERSIONS or key in crds, f"{source}: {key}"


def test_the_schema_check_rejects_a_broken_deployment() -> None:
    """The validator is not a no-op: an unknown field and a wrong type both fail."""
    broken = copy.deepcopy(_one("Deployment"))
    broken["spec"]["template"]["spec"]["containers"][0]["livenessprobe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, K8S_VERSION, strict=True)
    broken = copy.deepcopy(_one("Deployment"))
    broken["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"] = "9108"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, K8S_VERSION, strict=True)


# -- the config and how the Deployment uses it -----------------------------------------------


def test_the_config_loads_and_fits_the_pod() -> None:
    settings = _settings()
    assert settings.metrics.host == "0.0.0.0", "probes and scrapes come from outside the pod"
    detector = _detector()
    assert detector["args"][-2:] == ["--config", CONFIG_PATH]
    mounts = {m["mountPath"]: m for m in detector["volumeMounts"]}
    volumes = {v["name"]: v for v in _pod_spec()["volumes"]}
    config_dir, _, config_file = CONFIG_PATH.rpartition("/")
    config_volume = volumes[mounts[config_dir]["name"]]["configMap"]
    generated = _kustomization()["configMapGenerator"][0]["name"]
    assert config_volume["name"] == generated, "the Deployment mounts another ConfigMap"
    assert {"key": "config.toml", "path": config_file} in config_volume["items"]
    # The bundle is on the volume that the init container fills, read-only for the detector.
    model_dir = next(m for m in mounts if settings.model.bundle.startswith(m + "/"))
    assert mounts[model_dir]["readOnly"] is True
    model_volume = mounts[model_dir]["name"]
    init = _pod_spec()["initContainers"]
    assert any(m["name"] == model_volume for c in init for m in c["volumeMounts"])
    assert settings.model.bundle in " ".join(init[0]["command"])
    # Config overrides from the environment must not be injected by Service links.
    assert _pod_spec()["enableServiceLinks"] is False


def test_probes_and_ports_use_the_configured_metrics_port() -> None:
    port = _settings().metrics.port
    detector = _detector()
    ports = {p["name"]: p["containerPort"] for p in detector["ports"]}
    expected = {
        "startupProbe": "/healthz",
        "livenessProbe": "/healthz",
        "readinessProbe": "/readyz",
    }
    for probe, path in expected.items():
        get = detector[probe]["httpGet"]
        assert get["path"] == path, f"{probe} asks {get['path']}"
        assert ports.get(get["port"], get["port"]) == port, f"{probe} is not on port {port}"
    service = _one("Service")
    assert _selects_pods(service["spec"]["selector"])
    (svc_port,) = service["spec"]["ports"]
    assert ports.get(svc_port["targetPort"], svc_port["targetPort"]) == port
    assert svc_port["port"] == port


def test_the_pods_are_locked_down_and_sized() -> None:
    pod = _pod_spec()["securityContext"]
    assert pod["runAsNonRoot"] is True and pod["runAsUser"] != 0
    assert pod["seccompProfile"] == {"type": "RuntimeDefault"}
    assert _pod_spec()["automountServiceAccountToken"] is False
    for c in _all_containers():
        sc = c["securityContext"]
        assert sc["readOnlyRootFilesystem"] is True, c["name"]
        assert sc["allowPrivilegeEscalation"] is False, c["name"]
        assert sc["capabilities"]["drop"] == ["ALL"], c["name"]
        assert not sc["capabilities"].get("add"), c["name"]
        assert sc.get("runAsUser", 1) != 0 and sc.get("privileged") is not True, c["name"]
        for bound in ("requests", "limits"):
            assert {"cpu", "memory"} <= set(c["resources"][bound]), f"{c['name']} {bound}"
    # With a read-only root, Keras writes ~/.keras: HOME must be on a writable volume.
    assert any(m["mountPath"] == "/tmp" for m in _detector()["volumeMounts"])
    assert {"name": "HOME", "value": "/tmp"} in _detector()["env"]


def test_images_are_pinned() -> None:
    for c in _all_containers():
        _assert_pinned(c["image"], f"container {c['name']}")
    for image in _kustomization().get("images", []):  # an overlay's `kustomize edit set image`
        assert image.get("digest") or re.search(r"\d", image.get("newTag", "")), image
    bases = [
        line.split()[1]
        for line in MODEL_DOCKERFILE.read_text().splitlines()
        if line.upper().startswith("FROM ")
    ]
    assert bases, f"{MODEL_DOCKERFILE} has no FROM"
    for base in bases:
        _assert_pinned(base, "model image FROM")


def test_model_image_dockerfile_passes_hadolint() -> None:
    _run([_hadolint(), "--no-color", str(MODEL_DOCKERFILE)])


def test_the_deployment_rolls_one_pod_at_a_time_and_leaves_replicas_to_keda() -> None:
    deployment = _one("Deployment")
    assert "replicas" not in deployment["spec"], "KEDA owns the replica count"
    assert _selects_pods(deployment["spec"]["selector"]["matchLabels"])
    rolling = deployment["spec"]["strategy"]["rollingUpdate"]
    assert rolling["maxUnavailable"] == 0 and rolling["maxSurge"] == 1
    # Longer than a batch's flush and commit; the daemon exits by itself on SIGTERM.
    assert _pod_spec()["terminationGracePeriodSeconds"] >= 30


# -- the custom resources --------------------------------------------------------------------


def _rules_job() -> str:
    """The job label that the alert rules select detectors by."""
    jobs = set(re.findall(r'up\{job="([^"]+)"\}', RULES_YML.read_text()))
    assert len(jobs) == 1, f"rules select jobs {jobs}"
    return jobs.pop()


def test_podmonitor_scrapes_the_detectors_as_the_rules_job() -> None:
    monitor = _one("PodMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    spec = monitor["spec"]
    assert _selects_pods(spec["selector"]["matchLabels"])
    # Without jobLabel the job would be "<namespace>/<name>" and no rule would match.
    assert _pod_labels()[spec["jobLabel"]] == _rules_job()
    port_names = {p["name"] for p in _detector()["ports"]}
    (endpoint,) = spec["podMetricsEndpoints"]
    assert endpoint["port"] in port_names
    assert endpoint["path"] == "/metrics"
    assert re.fullmatch(r"\d+[smh]", endpoint["interval"])


def _input_partitions(topic: str) -> int:
    """The input topic's partitions, as the compose stack creates it (the one place they are)."""
    script = " ".join(_load_yaml(COMPOSE)["services"]["topics"]["command"])
    match = re.search(rf"--topic {re.escape(topic)} --partitions (\d+) ", script)
    assert match, f"the compose topics job does not create {topic}"
    return int(match.group(1))


def test_scaledobject_scales_on_the_detectors_lag_up_to_the_partition_count() -> None:
    settings = _settings()
    scaled = _one("ScaledObject")
    assert scaled["apiVersion"] == "keda.sh/v1alpha1"
    spec = scaled["spec"]
    target = spec["scaleTargetRef"]
    assert target.get("kind", "Deployment") == "Deployment"
    assert target["name"] == _one("Deployment")["metadata"]["name"]
    (trigger,) = spec["triggers"]
    assert trigger["type"] == "kafka"
    meta = trigger["metadata"]
    # The CRD's trigger metadata is map[string]string: an unquoted number or bool is rejected.
    assert all(isinstance(v, str) for v in meta.values()), meta
    assert meta["bootstrapServers"].split(",") == settings.kafka.servers
    assert meta["consumerGroup"] == settings.kafka.group_id
    assert meta["topic"] == settings.kafka.input_topic
    assert int(meta["lagThreshold"]) > 0
    assert meta.get("offsetResetPolicy", "latest") == settings.kafka.auto_offset_reset
    assert meta.get("allowIdleConsumers", "false") == "false"
    partitions = _input_partitions(settings.kafka.input_topic)
    assert partitions == 4
    assert spec["maxReplicaCount"] == partitions, "a replica past the partition count is idle"
    assert 1 <= spec["minReplicaCount"] <= spec["maxReplicaCount"]


def test_pdb_covers_the_pods_and_never_blocks_a_drain() -> None:
    pdb = _one("PodDisruptionBudget")["spec"]
    assert _selects_pods(pdb["selector"]["matchLabels"])
    min_replicas = _one("ScaledObject")["spec"]["minReplicaCount"]
    if "minAvailable" in pdb:
        assert isinstance(pdb["minAvailable"], int) and pdb["minAvailable"] < min_replicas
    else:
        assert pdb["maxUnavailable"] == 1, "one rebalance at a time"
