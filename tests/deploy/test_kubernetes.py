"""The Kubernetes manifests: schema-valid offline, and consistent with each other.

Every built-in resource is validated with kubernetes-validate against the
Kubernetes schemas it ships (strict: unknown fields are errors). The KServe
ServingRuntime is a CRD those schemas do not know, so it is checked structurally
against KServe's ServingRuntimeSpec, and its pod parts (containers, volumes,
tolerations) against the core Pod schema. The cross-file tests hold the numbers
together: probes, ports, /dev/shm, drain versus grace period, cache sizes, the
models file mount, and the MODEL_SERVER_* names against Settings.
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from kubernetes_validate.utils import all_versions

from model_server.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
KUBE = ROOT / "deploy" / "kubernetes"
DOCKERFILE = ROOT / "Dockerfile"
PREFIX = "MODEL_SERVER_"
# Oldest Kubernetes release the manifests target (native sidecars, preStop sleep
# and autoscaling/v2 are all there); kubernetes-validate ships its schemas.
K8S_VERSION = "1.30"
CONTAINER = "model-server"
CORE_FILES = {"configmap-models.yaml", "deployment.yaml", "service.yaml", "hpa.yaml"}

Doc = dict[str, Any]


def load(path: Path) -> list[Doc]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def all_docs() -> Iterator[tuple[str, Doc]]:
    for path in sorted(KUBE.glob("*.yaml")):
        for doc in load(path):
            yield path.name, doc


def one(kind: str, file: str | None = None) -> Doc:
    found = [doc for name, doc in all_docs() if doc["kind"] == kind and (file is None or name == file)]
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def container(pod_spec: Doc, name: str) -> Doc:
    matches: list[Doc] = [c for c in pod_spec["containers"] if c["name"] == name]
    assert len(matches) == 1, f"no container {name}"
    return matches[0]


def env_of(c: Doc) -> dict[str, str]:
    """Literal env values (valueFrom entries are not literals and are skipped)."""
    return {e["name"]: str(e["value"]) for e in c.get("env", []) if "value" in e}


def port_number(c: Doc, port: int | str) -> int:
    """A probe's or Service's port, resolving a name against the container's ports."""
    if isinstance(port, int):
        return port
    if port.isdigit():
        return int(port)
    named = [p["containerPort"] for p in c.get("ports", []) if p.get("name") == port]
    assert named, f"container has no port named {port}"
    return int(named[0])


_UNITS = {
    "": 1,
    "k": 10**3,
    "M": 10**6,
    "G": 10**9,
    "T": 10**12,
    "Ki": 2**10,
    "Mi": 2**20,
    "Gi": 2**30,
    "Ti": 2**40,
}


def quantity(value: str | int) -> int:
    """A Kubernetes byte quantity ('1Gi', '512M', '1000') in bytes."""
    match = re.fullmatch(r"(\d+)([kMGT]i?|)", str(value))
    assert match, f"unsupported quantity {value!r}"
    return int(match.group(1)) * _UNITS[match.group(2)]


def settings_from(env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> Settings:
    """The Settings a container with this env would read (defaults for the rest)."""
    for name in list(os.environ):
        if name.startswith(PREFIX) or name in {"MLFLOW_TRACKING_URI", "AWS_S3_BUCKET"}:
            monkeypatch.delenv(name)
    for name, value in env.items():
        if name.startswith(PREFIX):
            monkeypatch.setenv(name, value)
    return Settings()


def volume(pod_spec: Doc, mount_path: str, c: Doc) -> Doc:
    mounts = [m for m in c.get("volumeMounts", []) if m["mountPath"] == mount_path]
    assert len(mounts) == 1, f"nothing mounted at {mount_path}"
    volumes: list[Doc] = [v for v in pod_spec.get("volumes", []) if v["name"] == mounts[0]["name"]]
    assert len(volumes) == 1, f"no volume {mounts[0]['name']}"
    return volumes[0]


def probe_window(probe: Doc) -> int:
    return int(probe.get("initialDelaySeconds", 0)) + int(probe.get("periodSeconds", 10)) * int(
        probe.get("failureThreshold", 3)
    )


@pytest.fixture(scope="module")
def deployment() -> Doc:
    return one("Deployment")


@pytest.fixture(scope="module")
def pod(deployment: Doc) -> Doc:
    spec: Doc = deployment["spec"]["template"]["spec"]
    return spec


@pytest.fixture(scope="module")
def server(pod: Doc) -> Doc:
    return container(pod, CONTAINER)


@pytest.fixture(scope="module")
def runtime() -> Doc:
    return one("ServingRuntime")


@pytest.fixture(scope="module")
def runtime_container(runtime: Doc) -> Doc:
    return container(runtime["spec"], "kserve-container")


# --- schemas ----------------------------------------------------------------------


def test_schema_version_is_shipped() -> None:
    assert any(v.startswith(f"{K8S_VERSION}.") for v in all_versions())


BUILTIN = [
    pytest.param(doc, id=f"{name}:{doc['kind']}/{doc['metadata']['name']}")
    for name, doc in all_docs()
    if doc["kind"] not in {"ServingRuntime", "Kustomization"}
]


@pytest.mark.parametrize("doc", BUILTIN)
def test_manifest_matches_the_kubernetes_schema(doc: Doc) -> None:
    try:
        validated = kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    except kubernetes_validate.ValidationError as exc:
        path = ".".join(str(p) for p in exc.path)
        pytest.fail(f"{doc['kind']}/{doc['metadata']['name']}: {path}: {exc.message}")
    assert validated == K8S_VERSION


def test_every_file_holds_known_kinds() -> None:
    kinds = {name: doc["kind"] for name, doc in all_docs()}
    assert set(kinds) == CORE_FILES | {"servingruntime.yaml", "kustomization.yaml"}


# --- KServe ServingRuntime (a CRD: structure, and its pod parts as a Pod) -----------------

# serving.kserve.io/v1alpha1 ServingRuntimeSpec (pkg/apis/serving/v1alpha1/servingruntime_types.go)
RUNTIME_SPEC_FIELDS = {
    "supportedModelFormats",
    "multiModel",
    "disabled",
    "protocolVersions",
    "workerSpec",
    "containers",
    "volumes",
    "nodeSelector",
    "affinity",
    "tolerations",
    "labels",
    "annotations",
    "imagePullSecrets",
    "hostIPC",
    "grpcEndpoint",
    "grpcDataEndpoint",
    "httpDataEndpoint",
    "replicas",
    "storageHelper",
    "builtInAdapter",
}
MODEL_FORMAT_FIELDS = {"name", "version", "autoSelect", "priority"}
PROTOCOLS = {"v1", "v2", "grpc-v1", "grpc-v2"}


def test_servingruntime_structure(runtime: Doc) -> None:
    assert runtime["apiVersion"] == "serving.kserve.io/v1alpha1"
    assert set(runtime) <= {"apiVersion", "kind", "metadata", "spec"}
    assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", runtime["metadata"]["name"])
    spec = runtime["spec"]
    assert set(spec) <= RUNTIME_SPEC_FIELDS, set(spec) - RUNTIME_SPEC_FIELDS
    assert spec["containers"], "a ServingRuntime needs at least one container"
    assert spec.get("multiModel", False) is False
    formats = spec["supportedModelFormats"]
    assert {f["name"] for f in formats} == {"onnx"}
    for fmt in formats:
        assert set(fmt) <= MODEL_FORMAT_FIELDS
        assert isinstance(fmt.get("version", ""), str)
        if "priority" in fmt:
            assert fmt.get("autoSelect") is True and fmt["priority"] >= 1
    assert spec["protocolVersions"] == ["v2"]
    assert set(spec["protocolVersions"]) <= PROTOCOLS
    for key in ("annotations", "labels", "nodeSelector"):
        assert all(isinstance(v, str) for v in spec.get(key, {}).values()), key


def test_servingruntime_pod_parts_match_the_pod_schema(runtime: Doc) -> None:
    spec = runtime["spec"]
    pod_keys = ("containers", "volumes", "tolerations", "nodeSelector", "affinity", "imagePullSecrets")
    as_pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": runtime["metadata"]["name"]},
        "spec": {key: spec[key] for key in pod_keys if key in spec},
    }
    try:
        kubernetes_validate.validate(as_pod, K8S_VERSION, strict=True)
    except kubernetes_validate.ValidationError as exc:
        path = ".".join(str(p) for p in exc.path)
        pytest.fail(f"ServingRuntime pod parts: {path}: {exc.message}")


def test_servingruntime_runs_the_server(runtime: Doc, runtime_container: Doc) -> None:
    argv = runtime_container.get("command", []) + runtime_container.get("args", [])
    assert argv[-2:] == ["model-server", "serve"]
    env = env_of(runtime_container)
    # KServe's storage initializer puts storageUri at /mnt/models.
    assert env["MODEL_SERVER_MODEL_REPOSITORY"] == "/mnt/models"
    port = int(env["MODEL_SERVER_PORT"])
    assert [p["containerPort"] for p in runtime_container["ports"]] == [port]
    assert runtime["spec"]["annotations"]["prometheus.kserve.io/port"] == str(port)
    assert runtime_container["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert runtime_container["livenessProbe"]["httpGet"]["path"] == "/health"
    for probe in ("readinessProbe", "livenessProbe"):
        assert port_number(runtime_container, runtime_container[probe]["httpGet"]["port"]) == port


def test_servingruntime_settings(
    runtime: Doc, runtime_container: Doc, monkeypatch: pytest.MonkeyPatch
) -> None:
    env = env_of(runtime_container)
    check_settings_names(env)
    settings = settings_from(env, monkeypatch)
    # A ServingRuntime cannot set the pod's grace period: Kubernetes' default 30 s.
    assert settings.drain_seconds + 5 <= 30
    spec = runtime["spec"]
    check_shm(spec, runtime_container, settings)
    check_cache(spec, runtime_container, settings)


# --- kustomization -------------------------------------------------------------------------


def test_kustomization_ties_the_core_manifests(deployment: Doc) -> None:
    kustomization = one("Kustomization")
    assert kustomization["apiVersion"] == "kustomize.config.k8s.io/v1beta1"
    resources = kustomization["resources"]
    assert set(resources) == CORE_FILES
    assert all((KUBE / r).is_file() for r in resources)
    image = container(deployment["spec"]["template"]["spec"], CONTAINER)["image"]
    names = {i["name"] for i in kustomization.get("images", [])}
    assert image.rsplit(":", 1)[0] in names
    # Labels added by kustomize must not touch selectors (immutable on Deployments).
    for label in kustomization.get("labels", []):
        assert not label.get("includeSelectors", False)


# --- the Deployment and its neighbours ------------------------------------------------------


def check_settings_names(env: dict[str, str]) -> None:
    names = [n for n in env if n.startswith(PREFIX)]
    unknown = [n for n in names if n[len(PREFIX) :].lower() not in Settings.model_fields]
    # Settings ignores unknown variables (extra="ignore"): a typo would be silent.
    assert unknown == [], f"not fields of model_server.settings.Settings: {unknown}"


def check_shm(pod_spec: Doc, c: Doc, settings: Settings) -> None:
    shm = volume(pod_spec, "/dev/shm", c)
    assert shm["emptyDir"]["medium"] == "Memory"
    limit = quantity(shm["emptyDir"]["sizeLimit"])
    assert limit >= settings.frontend_processes * settings.shm_arena_bytes * 2, (
        "/dev/shm must hold every frontend's arena with headroom"
    )
    memory_limit = c["resources"].get("limits", {}).get("memory")
    if memory_limit is not None:
        # Memory-backed emptyDir pages count against the container's memory limit.
        assert quantity(memory_limit) > limit


def check_cache(pod_spec: Doc, c: Doc, settings: Settings) -> None:
    cache = volume(pod_spec, str(settings.cache_dir), c)
    assert "emptyDir" in cache
    # The server evicts before the kubelet evicts the pod for a full emptyDir.
    assert settings.cache_max_bytes < quantity(cache["emptyDir"]["sizeLimit"])


def test_every_model_server_variable_is_a_settings_field(server: Doc) -> None:
    check_settings_names(env_of(server))


def test_required_env_is_set(server: Doc) -> None:
    env = env_of(server)
    for name in ("MODEL_SERVER_WORKERS", "MODEL_SERVER_MODELS_FILE", "MODEL_SERVER_DRAIN_SECONDS"):
        assert name in env, name
    assert env["MODEL_SERVER_GPUS"] == "auto"


def test_probes_hit_health_and_ready_on_the_container_port(
    server: Doc, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = settings_from(env_of(server), monkeypatch)
    ports = {p["name"]: p["containerPort"] for p in server["ports"]}
    assert ports == {"http": 8001, "grpc": 8002} == {"http": settings.port, "grpc": settings.grpc_port}
    expected = {"startupProbe": "/health", "livenessProbe": "/health", "readinessProbe": "/ready"}
    for probe, path in expected.items():
        get = server[probe]["httpGet"]
        assert get["path"] == path, probe
        assert port_number(server, get["port"]) == settings.port, probe


def test_startup_probe_outlasts_boot_and_a_model_load(server: Doc, monkeypatch: pytest.MonkeyPatch) -> None:
    settings = settings_from(env_of(server), monkeypatch)
    window = probe_window(server["startupProbe"])
    worker_boot_s = 120  # importing onnxruntime and binding sockets, generously
    assert window >= worker_boot_s + settings.load_timeout_s


def test_dev_shm_is_a_sized_memory_emptydir(pod: Doc, server: Doc, monkeypatch: pytest.MonkeyPatch) -> None:
    check_shm(pod, server, settings_from(env_of(server), monkeypatch))


def test_cache_is_a_bounded_emptydir(pod: Doc, server: Doc, monkeypatch: pytest.MonkeyPatch) -> None:
    check_cache(pod, server, settings_from(env_of(server), monkeypatch))


def test_grace_period_exceeds_the_drain(pod: Doc, server: Doc, monkeypatch: pytest.MonkeyPatch) -> None:
    env = env_of(server)
    assert "MODEL_SERVER_DRAIN_SECONDS" in env
    drain = settings_from(env, monkeypatch).drain_seconds
    grace = pod["terminationGracePeriodSeconds"]
    # The grace period also pays for the preStop hook, which runs before SIGTERM.
    pre_stop = server.get("lifecycle", {}).get("preStop", {})
    sleep = int(pre_stop.get("sleep", {}).get("seconds", 0))
    assert set(pre_stop) <= {"sleep"}, "only a sleep hook is accounted for here"
    assert sleep <= 10
    # After the drain, room for supervisord to stop the workers and the coordinator.
    assert grace >= sleep + drain + 10, (grace, sleep, drain)
    # A pod that turns not-ready leaves the endpoints well inside the drain.
    ready = server["readinessProbe"]
    assert int(ready["periodSeconds"]) * int(ready["failureThreshold"]) <= drain / 2


def test_one_gpu_is_requested(server: Doc) -> None:
    assert str(server["resources"]["limits"]["nvidia.com/gpu"]) == "1"
    requests = server["resources"].get("requests", {})
    # Extended resources may not be overcommitted: a request must equal the limit.
    assert str(requests.get("nvidia.com/gpu", "1")) == "1"
    assert {"cpu", "memory"} <= set(requests)


def test_models_file_comes_from_the_configmap(pod: Doc, server: Doc) -> None:
    models_file = Path(env_of(server)["MODEL_SERVER_MODELS_FILE"])
    mount = [m for m in server["volumeMounts"] if m["mountPath"] == str(models_file.parent)]
    assert len(mount) == 1, f"nothing mounted at {models_file.parent}"
    assert mount[0].get("readOnly") is True
    source = next(v for v in pod["volumes"] if v["name"] == mount[0]["name"])
    configmap = one("ConfigMap")
    assert source["configMap"]["name"] == configmap["metadata"]["name"]
    items = {i["path"]: i["key"] for i in source["configMap"].get("items", [])}
    key = items.get(models_file.name, models_file.name)
    assert key in configmap["data"], f"ConfigMap has no key {key}"


# Keys of one start-up model entry (model_server.models_file.read_models_file). The
# reader ignores other keys, so a misspelt option would be dropped silently.
MODEL_KEYS = {
    "model_id",
    "version",
    "registry_uri",
    "max_batch_size",
    "max_queue_delay_us",
    "preferred_batch_sizes",
    "max_queue_size",
    "replicas",
    "warmup",
}


def test_example_models_file_is_well_formed(tmp_path: Path) -> None:
    from model_server.models_file import read_models_file

    data = one("ConfigMap")["data"]
    (text,) = data.values()
    entries = yaml.safe_load(text)
    assert isinstance(entries, list) and entries
    for entry in entries:
        assert set(entry) <= MODEL_KEYS, set(entry) - MODEL_KEYS
        # Quoted versions: YAML would read 3 as an int, 1.10 as the float 1.1.
        assert isinstance(entry["version"], str)
    path = tmp_path / "models.yaml"
    path.write_text(text)
    models = read_models_file(path)
    assert len(models) == len(entries)
    keys = [(model_id, version) for model_id, version, _, _ in models]
    assert len(set(keys)) == len(keys), "a model version is listed twice"
    assert all(config.startup for *_, config in models)


def test_service_targets_the_container_port(deployment: Doc, server: Doc) -> None:
    service = one("Service")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    selector = service["spec"]["selector"]
    assert selector.items() <= labels.items()
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    targets = {p["name"]: port_number(server, p["targetPort"]) for p in service["spec"]["ports"]}
    assert targets == {"http": 8001, "grpc": 8002}
    (grpc,) = [p for p in service["spec"]["ports"] if p["name"] == "grpc"]
    assert grpc["appProtocol"] == "kubernetes.io/h2c"  # tells ingresses and meshes to speak HTTP/2


def test_hpa_targets_the_deployment(deployment: Doc) -> None:
    hpa = one("HorizontalPodAutoscaler")
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["apiVersion"], target["kind"], target["name"]) == (
        "apps/v1",
        "Deployment",
        deployment["metadata"]["name"],
    )
    assert any(m["type"] == "Resource" and m["resource"]["name"] == "cpu" for m in hpa["spec"]["metrics"])
    assert 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
    # The HPA owns the replica count; a fixed one would be reset by every apply.
    assert "replicas" not in deployment["spec"]


def test_service_links_cannot_shadow_settings(pod: Doc) -> None:
    # A Service named model-server would inject MODEL_SERVER_PORT=tcp://... and friends.
    assert pod["enableServiceLinks"] is False


def test_runs_as_the_image_user_with_a_read_only_root(pod: Doc, server: Doc) -> None:
    user = re.search(r"^USER\s+(\d+)", DOCKERFILE.read_text(), re.MULTILINE)
    assert user, "the Dockerfile sets no numeric USER"
    security = pod["securityContext"]
    assert security["runAsNonRoot"] is True
    assert security["runAsUser"] == int(user.group(1))
    own = server["securityContext"]
    assert own["readOnlyRootFilesystem"] is True
    assert own["allowPrivilegeEscalation"] is False
    assert own["capabilities"]["drop"] == ["ALL"]
    # What the server writes lives on emptyDirs: /tmp (run dir) and the cache.
    mounted = {m["mountPath"] for m in server["volumeMounts"]}
    env = env_of(server)
    assert "/tmp" in mounted and env["MODEL_SERVER_RUN_DIR"].startswith("/tmp/")
    assert env["MODEL_SERVER_CACHE_DIR"] in mounted


def test_args_run_model_server_serve(server: Doc) -> None:
    argv = server.get("command", []) + server.get("args", [])
    assert argv[-2:] == ["model-server", "serve"]
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert "model-server" in scripts
