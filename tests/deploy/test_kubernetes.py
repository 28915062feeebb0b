"""deploy/kubernetes: every overlay renders offline, every object passes Kubernetes' schemas
(kubernetes-validate, strict; the two custom resources against tests/deploy/crd_schemas.py),
and the rendered objects have the properties a GPU cluster needs: GPUs only on workers,
probes on the endpoints the server serves, credentials only from Secrets, a drain that fits
the grace period, budgets, metrics scraping and KEDA's query from server/queue/autoscaling.py."""

from __future__ import annotations

import copy
import re

import jsonschema
import kubernetes_validate
import pytest
from kubernetes_validate.utils import ValidationError

from server.api.routes.health import router as health_router
from server.api.routes.metrics import router as metrics_router
from server.config import Settings
from server.queue.autoscaling import workers_wanted_sql
from server.supervisor.loop import STOP_GRACE
from tests.deploy.crd_schemas import CUSTOM_SCHEMAS, POSTGRESQL_TRIGGER_KEYS
from tests.deploy.kube import OVERLAYS, Obj, component, container, env, named, of_kind, render, selects

# The oldest Kubernetes these manifests are checked against, and the newest kubernetes-validate knows.
KUBERNETES_VERSIONS = ("1.29", kubernetes_validate.latest_version())
GPU = "nvidia.com/gpu"
# Cold start to plan for, docs/deploy.md "Cold starts": weight loading (20-60 s) plus compiling
# (10-70 s), against the project's target of ready within 180 s on a cold compile cache; the
# startup probe allows several times that (weights over a network volume, a slow node).
COLD_START_TARGET_SECONDS = 180
# Settings that the object storage work (issue 19, another branch) adds; not yet in
# server/config.py on this branch: drop it from here once that is merged.
STORAGE_ENV = (
    "FLUX_STORAGE_URL",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_ENDPOINT_URL",
    "AWS_REGION",
)


def test_the_overlays_are_the_single_and_multi_gpu_ones() -> None:
    assert OVERLAYS == ["multi-gpu", "single-gpu"]


def validate(obj: Obj) -> None:
    """Kubernetes' schema for a built-in kind, ours for the two custom resources."""
    schema = CUSTOM_SCHEMAS.get((obj["apiVersion"], obj["kind"]))
    if schema is not None:
        jsonschema.validate(obj, schema)
        return
    for version in KUBERNETES_VERSIONS:
        kubernetes_validate.validate(obj, version, strict=True)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_rendered_object_passes_its_schema(overlay: str) -> None:
    objects = render(overlay)
    kinds = {obj["kind"] for obj in objects}
    assert {"Deployment", "Service", "PodDisruptionBudget", "ServiceMonitor", "ConfigMap"} <= kinds
    for obj in objects:
        validate(obj)
        assert obj["kind"] == "Namespace" or obj["metadata"]["namespace"] == "flux"


def test_the_validation_would_catch_a_misspelt_field() -> None:
    """The checks above can fail: a typo in a built-in object and in a custom resource."""
    objects = render("multi-gpu")
    worker = copy.deepcopy(named(objects, "Deployment", "flux-worker-h100"))
    worker_container = container(worker)
    worker_container["startupProb"] = worker_container.pop("startupProbe")
    with pytest.raises(ValidationError):
        validate(worker)
    scaled = copy.deepcopy(of_kind(objects, "ScaledObject")[0])
    scaled["spec"]["minReplicas"] = scaled["spec"].pop("minReplicaCount")
    with pytest.raises(jsonschema.ValidationError):
        validate(scaled)
    monitor = copy.deepcopy(of_kind(objects, "ServiceMonitor")[0])
    monitor["spec"]["endpoints"][0]["interval"] = "thirty seconds"
    with pytest.raises(jsonschema.ValidationError):
        validate(monitor)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_gpus_only_on_worker_pods_one_each_with_the_gpu_toleration(overlay: str) -> None:
    deployments = of_kind(render(overlay), "Deployment")
    assert {component(d) for d in deployments} == {"api", "worker"}
    for deployment in deployments:
        pod = deployment["spec"]["template"]["spec"]
        resources = container(deployment)["resources"]
        if component(deployment) == "api":
            assert GPU not in resources.get("limits", {}) and GPU not in resources.get("requests", {})
            assert not pod.get("tolerations") and not pod.get("nodeSelector")
            continue
        assert resources["limits"][GPU] == 1  # one GPU per pod, one worker on it
        assert env(container(deployment))["FLUX_WORKERS"]["value"] == "1"
        assert {"key": GPU, "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
        # Never one pod more than there are GPUs during a rollout (a surge pod would wait forever
        # for a GPU on a single-GPU node).
        assert deployment["spec"]["strategy"]["rollingUpdate"]["maxSurge"] == 0


def test_each_gpu_type_has_its_own_nodes_and_compile_cache_volume() -> None:
    objects = render("multi-gpu")
    workers = [d for d in of_kind(objects, "Deployment") if component(d) == "worker"]
    assert len(workers) == 2
    claims, products = set(), set()
    for deployment in workers:
        pod = deployment["spec"]["template"]["spec"]
        products.add(pod["nodeSelector"]["nvidia.com/gpu.product"])
        cache_dir = env(container(deployment))["TORCHINDUCTOR_CACHE_DIR"]["value"]
        (mount,) = [m for m in container(deployment)["volumeMounts"] if m["mountPath"] == cache_dir]
        (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
        claim = volume["persistentVolumeClaim"]["claimName"]
        assert named(objects, "PersistentVolumeClaim", claim)["spec"]["accessModes"] == ["ReadWriteMany"]
        claims.add(claim)
    assert len(claims) == 2 and len(products) == 2


def _http_probe(container_spec: Obj, probe: str) -> tuple[str, int]:
    """(path, container port) of a container's HTTP probe."""
    get = container_spec[probe]["httpGet"]
    ports = {p["name"]: p["containerPort"] for p in container_spec["ports"]}
    return get["path"], ports.get(get["port"], get["port"])


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_probes_ask_the_health_endpoints_the_server_serves(overlay: str) -> None:
    objects = render(overlay)
    served = {route.path for route in health_router.routes}
    config = named(objects, "ConfigMap", "flux-config")["data"]
    port = int(config["FLUX_PORT"])
    for deployment in of_kind(objects, "Deployment"):
        spec = container(deployment)
        assert _http_probe(spec, "livenessProbe") == ("/health/live", port)
        assert _http_probe(spec, "readinessProbe") == ("/health/ready", port)
        startup_path, startup_port = _http_probe(spec, "startupProbe")
        assert {"/health/live", "/health/ready", startup_path} <= served and startup_port == port
        startup = spec["startupProbe"]
        budget = startup["periodSeconds"] * startup["failureThreshold"]
        if component(deployment) == "worker":
            # Ready means the model is loaded and compiled: the start-up allowance covers it.
            assert startup_path == "/health/ready"
            assert budget >= 3 * COLD_START_TARGET_SECONDS
            # A worker busy with a job still answers within the timeout: the probes ask its
            # pod's API process, never the worker itself.
            assert env(spec)["FLUX_ROLE"]["value"] == "all"
        else:
            assert env(spec)["FLUX_ROLE"]["value"] == "api"
            assert budget <= 120  # an API that does not listen within two minutes is broken


def secret_ref(variables: dict[str, Obj], name: str) -> tuple[str, str, bool]:
    """(Secret, key, optional) of an env var read from a Secret."""
    ref = variables[name]["valueFrom"]["secretKeyRef"]
    return ref["name"], ref["key"], ref.get("optional", False)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_credentials_come_from_secrets_and_every_setting_exists(overlay: str) -> None:
    objects = render(overlay)
    settings = {f"FLUX_{name.upper()}" for name in Settings.model_fields}
    config = named(objects, "ConfigMap", "flux-config")["data"]
    assert set(config) <= settings, set(config) - settings
    for deployment in of_kind(objects, "Deployment"):
        spec = container(deployment)
        variables = env(spec)
        assert spec["envFrom"] == [{"configMapRef": {"name": "flux-config"}}]
        flux_names = {name for name in variables if name.startswith("FLUX_")}
        assert flux_names <= settings, flux_names - settings

        assert secret_ref(variables, "FLUX_QUEUE_URL") == ("flux-queue", "FLUX_QUEUE_URL", False)
        assert secret_ref(variables, "FLUX_METRICS_KEY") == ("flux-metrics", "FLUX_METRICS_KEY", False)
        # One URL-signing key for every pod: a file URL returned by one opens on any other.
        assert secret_ref(variables, "FLUX_URL_SIGNING_KEY") == (
            "flux-url-signing",
            "FLUX_URL_SIGNING_KEY",
            False,
        )
        for name in STORAGE_ENV:
            optional = name in ("AWS_ENDPOINT_URL", "AWS_REGION")  # a cloud bucket needs neither
            assert secret_ref(variables, name) == ("flux-storage", name, optional)
        # Nothing secret is written into the manifests.
        for name, entry in variables.items():
            if (
                re.search(r"KEY|SECRET|PASSWORD|TOKEN|QUEUE_URL|STORAGE_URL", name)
                and name != "FLUX_API_KEYS_FILE"
            ):
                assert "value" not in entry, name
        # The API keys file and the webhook signing key are Secret volumes.
        volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
        mounts = {m["mountPath"]: m for m in spec["volumeMounts"]}
        keys_dir = variables["FLUX_API_KEYS_FILE"]["value"].rsplit("/", 1)[0]
        assert volumes[mounts[keys_dir]["name"]]["secret"]["secretName"] == "flux-api-keys"
        signing_key = mounts[f"{config['FLUX_DATA_DIR']}/webhook-ed25519.pem"]
        assert volumes[signing_key["name"]]["secret"]["secretName"] == "flux-webhook-key"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_grace_period_holds_the_drain(overlay: str) -> None:
    """SIGTERM: serve stops its worker, whose running job goes back to the queue at the next
    step, waits up to STOP_GRACE for it, then releases its jobs in the queue. The pod must not
    be killed before that (tests/e2e/test_resilience.py runs the drain on a real server)."""
    for deployment in of_kind(render(overlay), "Deployment"):
        pod = deployment["spec"]["template"]["spec"]
        spec = container(deployment)
        assert spec["command"] == ["flux-server", "serve"]  # PID 1 gets the SIGTERM itself
        pre_stop = 0
        if "lifecycle" in spec:
            (_, seconds) = spec["lifecycle"]["preStop"]["exec"]["command"]
            pre_stop = int(seconds)
        # The preStop hook's time counts against the grace period; 10 s to release the jobs.
        assert pod["terminationGracePeriodSeconds"] >= pre_stop + STOP_GRACE + 10


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_deployment_has_a_budget_that_never_blocks_a_drain_of_its_last_pod(overlay: str) -> None:
    objects = render(overlay)
    budgets = of_kind(objects, "PodDisruptionBudget")
    for deployment in of_kind(objects, "Deployment"):
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        (budget,) = [b for b in budgets if selects(b["spec"]["selector"]["matchLabels"], labels)]
        replicas = deployment["spec"].get("replicas", 1)
        if "maxUnavailable" in budget["spec"]:
            assert budget["spec"]["maxUnavailable"] >= 1
        else:
            assert budget["spec"]["minAvailable"] < replicas
    # The multi-GPU cluster keeps one API pod serving while another is evicted.
    assert named(render("multi-gpu"), "PodDisruptionBudget", "flux-api")["spec"]["minAvailable"] == 1


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_service_monitor_scrapes_every_pod_with_the_metrics_key(overlay: str) -> None:
    objects = render(overlay)
    (monitor,) = of_kind(objects, "ServiceMonitor")
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["path"] in {route.path for route in metrics_router.routes}
    assert endpoint["authorization"] == {
        "type": "Bearer",
        "credentials": {"name": "flux-metrics", "key": "FLUX_METRICS_KEY"},
    }
    scraped = [
        s
        for s in of_kind(objects, "Service")
        if selects(monitor["spec"]["selector"]["matchLabels"], s["metadata"]["labels"])
    ]
    for deployment in of_kind(objects, "Deployment"):
        pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
        (service,) = [s for s in scraped if selects(s["spec"]["selector"], pod_labels)]
        (port,) = [p for p in service["spec"]["ports"] if p["name"] == endpoint["port"]]
        assert port["targetPort"] == "http"


def test_one_gpu_node_runs_one_worker_without_an_autoscaler() -> None:
    objects = render("single-gpu")
    assert not of_kind(objects, "ScaledObject")
    (worker,) = [d for d in of_kind(objects, "Deployment") if component(d) == "worker"]
    assert worker["spec"].get("replicas", 1) == 1
    for claim in of_kind(objects, "PersistentVolumeClaim"):
        assert claim["spec"]["accessModes"] == ["ReadWriteOnce"]


def test_keda_scales_each_gpu_pool_with_the_projects_query() -> None:
    objects = render("multi-gpu")
    workers = {d["metadata"]["name"]: d for d in of_kind(objects, "Deployment") if component(d) == "worker"}
    scaled_objects = of_kind(objects, "ScaledObject")
    assert sorted(s["spec"]["scaleTargetRef"]["name"] for s in scaled_objects) == sorted(workers)
    for scaled in scaled_objects:
        target = workers[scaled["spec"]["scaleTargetRef"]["name"]]
        assert "replicas" not in target["spec"]  # KEDA's HPA owns the count; an apply never resets it
        annotations = scaled["metadata"]["annotations"]
        pool, per_worker = annotations["flux-server/pool"], int(annotations["flux-server/queued-per-worker"])
        assert pool == target["metadata"]["name"]
        (trigger,) = scaled["spec"]["triggers"]
        metadata = trigger["metadata"]
        assert trigger["type"] == "postgresql" and set(metadata) <= POSTGRESQL_TRIGGER_KEYS
        assert metadata["query"] == workers_wanted_sql(per_worker, pool)
        # workers wanted is a count of workers: one per replica
        assert metadata["targetQueryValue"] == "1" and float(metadata["activationTargetQueryValue"]) >= 0
        # KEDA reads the connection string from the pool's own container, from the Secret.
        source = container(target, scaled["spec"]["scaleTargetRef"]["envSourceContainerName"])
        assert env(source)[metadata["connectionFromEnv"]]["valueFrom"]["secretKeyRef"]["name"] == "flux-queue"
        spec = scaled["spec"]
        assert 0 <= spec["minReplicaCount"] <= spec["maxReplicaCount"]
        behavior = spec["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]
        # Scaling down waits out a cold start's worth of quiet at least (docs/deploy.md).
        assert behavior["scaleDown"]["stabilizationWindowSeconds"] >= COLD_START_TARGET_SECONDS
        hpa = {
            "apiVersion": "autoscaling/v2",
            "kind": "HorizontalPodAutoscaler",
            "metadata": {"name": scaled["metadata"]["name"]},
            "spec": {
                "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": pool},
                "minReplicas": max(1, spec["minReplicaCount"]),
                "maxReplicas": spec["maxReplicaCount"],
                "behavior": behavior,
            },
        }
        for version in KUBERNETES_VERSIONS:
            kubernetes_validate.validate(hpa, version, strict=True)
    # A pool that scales from zero starts only for a backlog, never for one stray job.
    for scaled in scaled_objects:
        if scaled["spec"]["minReplicaCount"] == 0:
            activation = float(scaled["spec"]["triggers"][0]["metadata"]["activationTargetQueryValue"])
            assert activation >= 1
    assert any(s["spec"]["minReplicaCount"] >= 1 for s in scaled_objects)  # someone takes stray jobs
