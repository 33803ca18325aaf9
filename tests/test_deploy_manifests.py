"""The Kubernetes manifests of ``deploy/k8s``, rendered and held to what the gateway needs.

Each kustomization (the base and the example overlay) is rendered by ``kubectl kustomize``
(kustomize as built into kubectl), every object is validated against the Kubernetes OpenAPI
schemas of two Kubernetes versions with the ``kubernetes-validate`` package (strict: unknown
fields fail), and the invariants below are checked on the rendered objects, so an edit that
breaks one fails here: probes on the right paths and port, a grace period longer than the drain
(with the drain settings read from the manifests, and from ``config.py`` for those left out), a
PDB over the Deployment's pods, an HPA on the Deployment and on a metric Roomcast exports,
non-root with a read-only root filesystem, and resources sized from the README's benchmark.

Without ``kubectl`` these tests skip, or FAIL when ``CI`` is set.
"""

from __future__ import annotations

import base64
import dataclasses
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from prometheus_client import CollectorRegistry

from redis_fixtures import require_binary
from roomcast.config import ENV_PREFIX, Settings, load, ops_address
from roomcast.metrics import Metrics

REPO = Path(__file__).resolve().parent.parent
K8S = REPO / "deploy" / "k8s"
KUSTOMIZATIONS = ("base", "overlays/example")
ADAPTER_CONFIG = K8S / "prometheus-adapter" / "adapter-config.yaml"
KUBERNETES_VERSIONS = ("1.29", kubernetes_validate.latest_version())
"""The oldest Kubernetes these manifests claim (docs/deploy.md), and the newest schemas known."""
CRD_KINDS = {"ServiceMonitor"}
"""Kinds outside Kubernetes' schemas; checked field by field in their own test."""
EXIT_MARGIN_S = 5.0
"""Seconds after the drain for the process to close the listener, flush state and exit."""
PROCESS_BASELINE_MIB = 80
"""RSS of roomcast with its libraries and a Redis link, rounded up (test_container_image prints 40-64)."""
LABELS = {"app.kubernetes.io/name": "roomcast", "app.kubernetes.io/component": "gateway"}

Object = dict[str, Any]


# --------------------------------------------------------------------------- rendering


def _kubectl() -> str:
    return require_binary("kubectl")


def _render(name: str) -> list[Object]:
    result = subprocess.run(
        [_kubectl(), "kustomize", str(K8S / name)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    if result.returncode != 0:
        pytest.fail(f"kubectl kustomize {name} failed:\n{result.stderr}")
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[Object]]:
    """Every kustomization's rendered objects, by kustomization."""
    return {name: _render(name) for name in KUSTOMIZATIONS}


@pytest.fixture(scope="module", params=KUSTOMIZATIONS)
def objects(request: pytest.FixtureRequest, rendered: dict[str, list[Object]]) -> list[Object]:
    """One kustomization's rendered objects (each test runs for the base and the overlay)."""
    name: str = request.param
    return rendered[name]


def _one(objects: list[Object], kind: str) -> Object:
    found = [o for o in objects if o["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, found {[o['metadata']['name'] for o in found]}"
    return found[0]


def _container(objects: list[Object]) -> Object:
    containers = _one(objects, "Deployment")["spec"]["template"]["spec"]["containers"]
    [container] = [c for c in containers if c["name"] == "roomcast"]
    return dict(container)


def _settings_env(objects: list[Object]) -> dict[str, str]:
    """The variables the pod gets from its ConfigMap and Secret (when the Secret is rendered)."""
    env: dict[str, str] = {}
    by_name = {(o["kind"], o["metadata"]["name"]): o for o in objects}
    for source in _container(objects).get("envFrom", []):
        if "configMapRef" in source:
            config_map = by_name[("ConfigMap", source["configMapRef"]["name"])]
            env.update(config_map["data"])
        elif "secretRef" in source:
            secret = by_name.get(("Secret", source["secretRef"]["name"]))
            if secret is not None:
                env.update(secret.get("stringData", {}))
                for key, value in secret.get("data", {}).items():
                    env[key] = base64.b64decode(value).decode()
    return env


def _seconds(name: str, value: float) -> float | None:
    """A drain setting's value in seconds, or None when it is not a duration."""
    if "_per_" in name:
        return None
    if name.endswith("_ms"):
        return value / 1000
    if name.endswith(("_s", "_seconds")):
        return value
    return None


_CPU = re.compile(r"^(\d+(?:\.\d+)?)(m?)$")
_MEMORY = re.compile(r"^(\d+)(Ki|Mi|Gi|k|M|G)?$")
_MEMORY_UNITS = {None: 1, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "k": 10**3, "M": 10**6, "G": 10**9}


def _cores(quantity: str | int | float) -> float:
    match = _CPU.match(str(quantity))
    assert match, quantity
    return float(match[1]) / (1000 if match[2] else 1)


def _bytes(quantity: str | int) -> int:
    match = _MEMORY.match(str(quantity))
    assert match, quantity
    return int(match[1]) * _MEMORY_UNITS[match[2]]


def _rss_per_connection_kib(workers: int) -> float:
    """The README benchmark's RSS per connection for one worker (either broker), or for two."""
    lines = (REPO / "README.md").read_text().splitlines()
    header = next(line for line in lines if line.startswith("| scenario | metric |"))
    row = next(line for line in lines if "| RSS per connection |" in line)
    columns = [c.strip() for c in header.strip("|").split("|")]
    cells = [c.strip() for c in row.strip("|").split("|")]
    figures = dict(zip(columns, cells, strict=True))
    wanted = (
        ["Roomcast", "Roomcast on Redis"] if workers == 1 else ["Roomcast `--workers 2` on Redis"]
    )
    values = []
    for column in wanted:
        match = re.match(r"^([\d.]+) KiB$", figures[column])
        assert match, (column, figures[column])
        values.append(float(match[1]))
    return max(values)


# --------------------------------------------------------------------------- schemas


def _validation_cases() -> Iterator[tuple[str, str]]:
    for name in KUSTOMIZATIONS:
        for version in KUBERNETES_VERSIONS:
            yield name, version


@pytest.mark.parametrize(("name", "version"), list(_validation_cases()))
def test_every_rendered_object_is_valid_for_kubernetes(
    rendered: dict[str, list[Object]], name: str, version: str
) -> None:
    """Every object of the rendered kustomization passes Kubernetes' strict schema."""
    checked = []
    for obj in rendered[name]:
        if obj["kind"] in CRD_KINDS:
            continue
        where = f"{name}: {obj['kind']}/{obj['metadata']['name']}"
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as error:
            path = ".".join(str(p) for p in error.path)
            pytest.fail(f"{where} is invalid for Kubernetes {version}: {path}: {error.message}")
        except kubernetes_validate.SchemaNotFoundError as error:
            pytest.fail(f"{where}: {error.message}")
        checked.append(obj["kind"])
    expected = {
        "ServiceAccount",
        "ConfigMap",
        "Deployment",
        "Service",
        "PodDisruptionBudget",
        "HorizontalPodAutoscaler",
        "NetworkPolicy",
    }
    assert expected <= set(checked), checked


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_prometheus_adapter_config_is_valid(version: str) -> None:
    """The prometheus-adapter ConfigMap passes the schema and holds a parsable rule file."""
    [config_map] = [d for d in yaml.safe_load_all(ADAPTER_CONFIG.read_text()) if d]
    kubernetes_validate.validate(config_map, version, strict=True)
    rules = yaml.safe_load(config_map["data"]["config.yaml"])["rules"]
    assert rules


def test_example_overlay_has_secret_ingress_and_service_monitor(
    rendered: dict[str, list[Object]],
) -> None:
    """The overlay adds an example Secret, an Ingress with affinity and a ServiceMonitor."""
    overlay = rendered["overlays/example"]
    secret = _one(overlay, "Secret")
    assert secret["metadata"]["name"] == "roomcast-secrets"
    assert all("replace-me" in value for value in secret["stringData"].values())
    ingress = _one(overlay, "Ingress")
    annotations = ingress["metadata"]["annotations"]
    assert annotations["nginx.ingress.kubernetes.io/affinity"] == "cookie"
    backend = ingress["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]
    service = _one(overlay, "Service")
    assert backend["name"] == service["metadata"]["name"]
    assert backend["port"]["name"] in {p["name"] for p in service["spec"]["ports"]}
    assert {o["metadata"].get("namespace") for o in overlay if o["kind"] != "Namespace"} == {
        _one(overlay, "Namespace")["metadata"]["name"]
    }


def test_service_monitor_scrapes_the_service(rendered: dict[str, list[Object]]) -> None:
    """The ServiceMonitor (a CRD, outside the schemas) selects the Service and its http port."""
    overlay = rendered["overlays/example"]
    monitor = _one(overlay, "ServiceMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    service = _one(overlay, "Service")
    selector = monitor["spec"]["selector"]["matchLabels"]
    assert selector.items() <= service["metadata"]["labels"].items()
    [endpoint] = monitor["spec"]["endpoints"]
    assert endpoint["port"] in {p["name"] for p in service["spec"]["ports"]}
    assert endpoint["path"] == "/metrics"


# --------------------------------------------------------------------------- invariants


def test_probes_use_the_health_endpoints_on_the_served_port(objects: list[Object]) -> None:
    """Readiness on /readyz, liveness and startup on /healthz, on the port roomcast listens on."""
    container = _container(objects)
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    env = _settings_env(objects)
    assert int(env[ENV_PREFIX + "PORT"]) == ports["http"]
    assert env[ENV_PREFIX + "HOST"] == "0.0.0.0"
    expected = {
        "readinessProbe": "/readyz",
        "livenessProbe": "/healthz",
        "startupProbe": "/healthz",
    }
    for probe, path in expected.items():
        get = container[probe]["httpGet"]
        assert get["path"] == path, probe
        port = ports[get["port"]] if isinstance(get["port"], str) else get["port"]
        assert port == ports["http"], probe
    # A busy pod is taken out of rotation, not restarted: liveness gives up much later.
    readiness, liveness = container["readinessProbe"], container["livenessProbe"]
    assert (
        liveness["periodSeconds"] * liveness["failureThreshold"]
        > 4 * readiness["periodSeconds"] * readiness["failureThreshold"]
    )


def test_metrics_and_server_apis_are_served_to_the_cluster_only(objects: list[Object]) -> None:
    """ROOMCAST_OPS_LISTEN is the container's "ops" port, which Prometheus scrapes."""
    container = _container(objects)
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    host, port = ops_address(_settings_env(objects)[ENV_PREFIX + "OPS_LISTEN"])
    assert (host, port) == ("0.0.0.0", ports["ops"])
    annotations = _one(objects, "Deployment")["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == str(ports["ops"])
    assert annotations["prometheus.io/path"] == "/metrics"
    service = _one(objects, "Service")
    targets = {p["name"]: p["targetPort"] for p in service["spec"]["ports"]}
    assert targets == {"http": "http", "ops": "ops"}
    monitors = [o for o in objects if o["kind"] == "ServiceMonitor"]
    for monitor in monitors:
        assert {targets[e["port"]] for e in monitor["spec"]["endpoints"]} == {"ops"}
    # Clients come through the Ingress: it must not reach /metrics or the server APIs.
    for ingress in (o for o in objects if o["kind"] == "Ingress"):
        for rule in ingress["spec"]["rules"]:
            for path in rule["http"]["paths"]:
                assert targets[path["backend"]["service"]["port"]["name"]] == "http"
    policy = _one(objects, "NetworkPolicy")
    for rule in policy["spec"]["ingress"]:
        if any(p["port"] == "ops" for p in rule["ports"]):
            assert rule.get("from"), "the ops port is open to every source"


def test_grace_period_exceeds_prestop_and_drain(objects: list[Object]) -> None:
    """terminationGracePeriodSeconds > preStop sleep + every drain duration + an exit margin."""
    pod = _one(objects, "Deployment")["spec"]["template"]["spec"]
    container = _container(objects)
    command = container["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep", command
    pre_stop = float(command[1])
    env = _settings_env(objects)
    drain: dict[str, float] = {}
    for field in dataclasses.fields(Settings):
        if not field.name.startswith("drain_"):
            continue
        key = ENV_PREFIX + field.name.upper()
        value = float(env[key]) if key in env else float(field.default)
        seconds = _seconds(field.name, value)
        if seconds is not None:
            drain[field.name] = seconds
    assert drain, "config.py has no drain_* duration setting"
    budget = pre_stop + sum(drain.values()) + EXIT_MARGIN_S
    grace = pod["terminationGracePeriodSeconds"]
    assert grace > budget, f"grace {grace} s <= preStop {pre_stop} s + {drain} + {EXIT_MARGIN_S}"
    # A drain delay (readiness 503 while still serving) must let the kubelet see the 503.
    readiness = container["readinessProbe"]
    detection = readiness["periodSeconds"] * readiness["failureThreshold"]
    for name, seconds in drain.items():
        if name.startswith("drain_delay"):
            assert seconds >= detection, f"{name} {seconds} s < readiness detection {detection} s"


def test_pod_disruption_budget_covers_the_deployments_pods(objects: list[Object]) -> None:
    """The PDB, Service, NetworkPolicy and HPA all point at the Deployment and its pods."""
    deployment = _one(objects, "Deployment")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert LABELS.items() <= pod_labels.items()
    pdb = _one(objects, "PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert pdb["spec"]["maxUnavailable"] == 1
    service = _one(objects, "Service")
    assert service["spec"]["selector"].items() <= pod_labels.items()
    policy = _one(objects, "NetworkPolicy")
    assert policy["spec"]["podSelector"]["matchLabels"].items() <= pod_labels.items()
    hpa = _one(objects, "HorizontalPodAutoscaler")
    # With one pod, maxUnavailable 1 would let a node drain take the only one.
    assert hpa["spec"]["minReplicas"] >= 2
    strategy = deployment["spec"]["strategy"]
    assert strategy["rollingUpdate"]["maxUnavailable"] == 0


def test_hpa_scales_the_deployment_on_cpu_and_connections(objects: list[Object]) -> None:
    """The HPA targets the Deployment, on CPU and on roomcast_connections, and scales down slowly."""
    deployment = _one(objects, "Deployment")
    hpa = _one(objects, "HorizontalPodAutoscaler")
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["apiVersion"], target["kind"], target["name"]) == (
        "apps/v1",
        "Deployment",
        deployment["metadata"]["name"],
    )
    assert "replicas" not in deployment["spec"], "the HPA owns the replica count"
    metrics = {m["type"]: m for m in hpa["spec"]["metrics"]}
    assert metrics["Resource"]["resource"]["name"] == "cpu"
    assert metrics["Resource"]["resource"]["target"]["type"] == "Utilization"
    assert _cores(_container(objects)["resources"]["requests"]["cpu"]) > 0
    pods = metrics["Pods"]["pods"]
    assert pods["metric"]["name"] == "roomcast_connections"
    assert pods["target"]["type"] == "AverageValue"
    down = hpa["spec"]["behavior"]["scaleDown"]
    assert down["stabilizationWindowSeconds"] >= 300
    assert down["selectPolicy"] == "Min"
    for policy in down["policies"]:
        assert policy["periodSeconds"] >= 60, policy
        assert (policy["type"], policy["value"]) in {("Pods", 1)} or (
            policy["type"] == "Percent" and policy["value"] <= 10
        ), policy


def test_hpa_metric_is_exported_by_roomcast_and_the_adapter(objects: list[Object]) -> None:
    """roomcast_connections is a gauge in metrics.py, and the adapter rule serves it per pod."""
    hpa = _one(objects, "HorizontalPodAutoscaler")
    [pods] = [m["pods"] for m in hpa["spec"]["metrics"] if m["type"] == "Pods"]
    name = pods["metric"]["name"]
    families = {f.name: f.type for f in Metrics(CollectorRegistry()).registry.collect()}
    assert families.get(name) == "gauge", sorted(families)
    [config_map] = [d for d in yaml.safe_load_all(ADAPTER_CONFIG.read_text()) if d]
    rules = yaml.safe_load(config_map["data"]["config.yaml"])["rules"]
    [rule] = [r for r in rules if r["name"]["as"] == name]
    assert rule["seriesQuery"].startswith(name + "{")
    assert re.fullmatch(rule["name"]["matches"], name)
    overrides = rule["resources"]["overrides"]
    assert overrides["pod"]["resource"] == "pod"
    assert overrides["namespace"]["resource"] == "namespace"
    assert "<<.GroupBy>>" in rule["metricsQuery"]


def test_pods_run_non_root_with_a_read_only_root_filesystem(objects: list[Object]) -> None:
    """Non-root as the image's user, read-only root, no capabilities, RuntimeDefault seccomp."""
    pod = _one(objects, "Deployment")["spec"]["template"]["spec"]
    container = _container(objects)
    context = pod["securityContext"]
    assert context["runAsNonRoot"] is True
    image_user = re.search(r"^USER (\d+):(\d+)$", (REPO / "Containerfile").read_text(), re.M)
    assert image_user, "Containerfile has no numeric USER"
    assert (context["runAsUser"], context["runAsGroup"]) == (
        int(image_user[1]),
        int(image_user[2]),
    )
    assert context["seccompProfile"]["type"] == "RuntimeDefault"
    own = container["securityContext"]
    assert own["readOnlyRootFilesystem"] is True
    assert own["allowPrivilegeEscalation"] is False
    assert own["capabilities"]["drop"] == ["ALL"]
    assert "add" not in own["capabilities"]
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert "emptyDir" in volumes[mounts["/tmp"]], "no writable /tmp"
    assert pod["automountServiceAccountToken"] is False


def test_resources_fit_the_benchmark_figures(objects: list[Object]) -> None:
    """Memory covers max_connections (limit) and the HPA target (request) at the README's KiB/conn."""
    container = _container(objects)
    env = _settings_env(objects)
    workers = int(env.get(ENV_PREFIX + "WORKERS", Settings.workers))
    max_connections = int(env[ENV_PREFIX + "MAX_CONNECTIONS"]) * workers
    per_connection = _rss_per_connection_kib(workers) * 1024
    hpa = _one(objects, "HorizontalPodAutoscaler")
    [pods] = [m["pods"] for m in hpa["spec"]["metrics"] if m["type"] == "Pods"]
    target_connections = int(pods["target"]["averageValue"])
    baseline = PROCESS_BASELINE_MIB * 2**20 * workers
    resources = container["resources"]
    limit, request = _bytes(resources["limits"]["memory"]), _bytes(resources["requests"]["memory"])
    needed_at_limit = baseline + max_connections * per_connection
    needed_at_target = baseline + target_connections * per_connection
    assert limit >= needed_at_limit, (limit, needed_at_limit)
    assert request >= needed_at_target, (request, needed_at_target)
    assert target_connections < max_connections
    # One event loop per worker uses at most one core each: a lower limit only throttles it.
    assert _cores(resources["limits"]["cpu"]) >= workers
    print(
        f"\n[figure] memory: request {request / 2**20:.0f} MiB >= {needed_at_target / 2**20:.0f}"
        f" MiB at {target_connections} conns; limit {limit / 2**20:.0f} MiB >="
        f" {needed_at_limit / 2**20:.0f} MiB at {max_connections} conns"
        f" ({per_connection / 1024:.2f} KiB/conn)"
    )


def test_settings_in_the_manifests_are_roomcast_settings(objects: list[Object]) -> None:
    """Every ROOMCAST_* key is a setting; the overlay's load, in production mode, on Redis."""
    known = {ENV_PREFIX + f.name.upper() for f in dataclasses.fields(Settings)}
    env = _settings_env(objects)
    unknown = sorted(set(env) - known)
    assert not unknown, f"not settings of roomcast.config: {unknown}"
    if any(o["kind"] == "Secret" for o in objects):
        settings = load(environ=env)
        assert settings.production
        assert settings.allowed_origins
        # Several pods share publications and recovery state only through Redis.
        assert settings.redis_url.startswith(("redis://", "rediss://"))
