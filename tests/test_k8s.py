"""Every manifest an operator applies renders, validates offline, and fits together the way a real
cluster needs: selectors find the pods KubeRay creates, every pod runs one image, files the jobs name
are mounted, RayJob entrypoints parse against the real CLI, serve configs follow Ray Serve's advice.

Core kinds validate with kubernetes-validate; custom resources against the CRDs copied into
tests/data/k8s-schemas (nothing outside the repository is read).
"""

from __future__ import annotations

import shlex
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

from tests.deploy_tools import NAMESPACE, OVERLAYS, ROOT, Pod, one, pods, render, selects

pytestmark = pytest.mark.slow

SCHEMAS = ROOT / "tests" / "data" / "k8s-schemas"
CRD_FILES = {
    ("ray.io", "RayService"): "ray.io_rayservices.yaml",
    ("ray.io", "RayJob"): "ray.io_rayjobs.yaml",
    ("monitoring.coreos.com", "PodMonitor"): "monitoring.coreos.com_podmonitors.yaml",
    ("monitoring.coreos.com", "PrometheusRule"): "monitoring.coreos.com_prometheusrules.yaml",
}
K8S_VERSION = "1.32.0"
CLUSTER_SCOPED = {"Namespace"}


def validate_custom(doc: dict, schema: dict) -> None:
    """jsonschema without its metaschema check: CRDs hold Go regexes ((?i) mid-pattern) Python rejects."""
    jsonschema.Draft7Validator(schema).validate(doc)


def crd_schema(group: str, kind: str, version: str) -> dict:
    crd = yaml.safe_load((SCHEMAS / CRD_FILES[(group, kind)]).read_text())
    (served,) = [v for v in crd["spec"]["versions"] if v["name"] == version]
    return served["schema"]["openAPIV3Schema"]


def serve_config(docs: list[dict]) -> dict:
    return yaml.safe_load(one(docs, "RayService")["spec"]["serveConfigV2"])


def serving_pods(docs: list[dict]) -> list[Pod]:
    return [p for p in pods(docs) if p.owner == one(docs, "RayService")["metadata"]["name"]]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_renders_and_validates(overlay: str) -> None:
    docs = render(overlay)
    kinds = {d["kind"] for d in docs}
    assert {"RayService", "PodMonitor", "PrometheusRule", "ConfigMap", "NetworkPolicy", "PodDisruptionBudget"} <= kinds
    if overlay == "gpu":
        assert {d["metadata"]["name"] for d in docs if d["kind"] == "RayJob"} == {"vlm-steer-extract", "vlm-steer-train"}
        assert {"PersistentVolumeClaim", "Job"} <= kinds
    assert "HorizontalPodAutoscaler" not in kinds, "Ray pods scale through the Ray autoscaler, never an HPA"
    for doc in docs:
        group, _, version = doc["apiVersion"].rpartition("/")
        if (group, doc["kind"]) in CRD_FILES:
            validate_custom(doc, crd_schema(group, doc["kind"], version))
        else:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_crd_validation_catches_a_bad_manifest() -> None:
    """The CRD check is real: a RayService with a mistyped field type is refused."""
    bad = {"apiVersion": "ray.io/v1", "kind": "RayService", "metadata": {"name": "x"},
           "spec": {"rayClusterConfig": {"enableInTreeAutoscaling": "yes", "headGroupSpec": {}}}}
    with pytest.raises(jsonschema.ValidationError):
        validate_custom(bad, crd_schema("ray.io", "RayService", "v1"))


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_object_lands_in_the_namespace(overlay: str) -> None:
    """Overlay-local objects get the namespace too (a kustomize base's `namespace:` covers only the base)."""
    for doc in render(overlay):
        if doc["kind"] not in CLUSTER_SCOPED:
            assert doc["metadata"].get("namespace") == NAMESPACE, (doc["kind"], doc["metadata"]["name"])


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_pod_runs_the_same_pushed_image(overlay: str) -> None:
    """Head, workers, RayJob clusters and Jobs: one image, and never the unreplaced placeholder."""
    images = {c["image"] for p in pods(render(overlay)) for c in p.containers}
    assert len(images) == 1, images
    (image,) = images
    assert "/" in image and ":" in image, f"{image!r}: the overlay's images: entry did not apply"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_selectors_find_the_pods_kuberay_creates(overlay: str) -> None:
    docs = render(overlay)
    all_pods = pods(docs)
    serving = serving_pods(docs)
    for pod in all_pods:
        assert pod.labels.get("app.kubernetes.io/name") == "vlm-steer", f"{pod.owner}/{pod.group} has no labels of ours"

    monitor = one(docs, "PodMonitor")
    monitored = [p for p in all_pods if selects(monitor["spec"]["selector"]["matchLabels"], p.labels)]
    assert {(p.owner, p.group) for p in monitored} == {(p.owner, p.group) for p in serving}
    for pod in monitored:
        ports = {port["name"] for c in pod.containers for port in c.get("ports", [])}
        for endpoint in monitor["spec"]["podMetricsEndpoints"]:
            assert endpoint["port"] in ports, f"{pod.group} pods have no port named {endpoint['port']!r}"
        if pod.group != "headgroup":
            assert pod.ray_start_params.get("metrics-export-port") == "8080"

    policy = one(docs, "NetworkPolicy")
    guarded = [p for p in all_pods if selects(policy["spec"]["podSelector"]["matchLabels"], p.labels)]
    assert len(guarded) == len(all_pods), "the NetworkPolicy leaves some of our pods out"
    operator_ports = {port["port"] for rule in policy["spec"]["ingress"] for source in rule.get("from", [])
                      if source.get("podSelector", {}).get("matchLabels", {}).get("app.kubernetes.io/name")
                      == "kuberay-operator" for port in rule.get("ports", [])}
    assert {8265, 6379} <= operator_ports, "the KubeRay operator must still reach the head's dashboard and GCS"

    budgets = [d for d in docs if d["kind"] == "PodDisruptionBudget"]
    for budget in budgets:
        chosen = [p for p in all_pods if selects(budget["spec"]["selector"]["matchLabels"], p.labels)]
        assert chosen, f"PDB {budget['metadata']['name']} selects no pod"
        assert all(p in serving and p.group != "headgroup" for p in chosen)
        if "minAvailable" in budget["spec"]:
            assert sum(p.replicas for p in chosen) > budget["spec"]["minAvailable"], "the PDB would block every drain"


def test_selector_check_fails_on_labels_only_on_the_custom_resource() -> None:
    """The old manifests labelled only the RayService's metadata: KubeRay pods then match nothing."""
    cluster = {"headGroupSpec": {"template": {"spec": {"containers": []}}}, "workerGroupSpecs": []}
    (head,) = pods([{"kind": "RayService", "metadata": {"name": "x", "labels": {"app.kubernetes.io/name": "vlm-steer"}},
                     "spec": {"rayClusterConfig": cluster}}])
    assert not selects({"app.kubernetes.io/name": "vlm-steer"}, head.labels)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_api_keys_are_never_applied_and_required_on_gpu(overlay: str) -> None:
    """`apply -k` must not reset the keys: no Secret is rendered; on GPU a missing Secret stops the pods."""
    docs = render(overlay)
    assert not [d for d in docs if d["kind"] == "Secret"]
    for pod in serving_pods(docs):
        refs = [e["valueFrom"]["secretKeyRef"] for c in pod.containers for e in c.get("env", [])
                if e["name"] == "VLM_STEER_API_KEYS"]
        assert len(refs) == 1, f"{pod.group} pods do not get the API keys"
        assert refs[0]["name"] == "vlm-steer-api-keys"
        assert refs[0]["optional"] is (overlay == "cpu-demo")


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_container_requests_ephemeral_storage(overlay: str) -> None:
    for pod in pods(render(overlay)):
        for container in pod.containers:
            assert "ephemeral-storage" in container["resources"]["requests"], (pod.owner, pod.group)


def test_gpu_overlay_parameters_reach_the_objects() -> None:
    docs = render("gpu")
    params = yaml.safe_load((ROOT / "k8s" / "overlays" / "gpu" / "params.yaml").read_text())["data"]
    assert not [d for d in docs if d["metadata"]["name"] == "vlm-steer-params"], "params must stay local-config"
    pvc = one(docs, "PersistentVolumeClaim")
    assert pvc["spec"]["storageClassName"] == params["storageClassName"]
    assert pvc["spec"]["accessModes"] == [params["accessMode"]]
    assert pvc["spec"]["resources"]["requests"]["storage"] == params["storage"]
    gpu_pods = [p for p in pods(docs) if p.group == "gpu"]
    assert {p.owner for p in gpu_pods} == {"vlm-steer", "vlm-steer-extract", "vlm-steer-train"}
    for pod in gpu_pods:
        term = pod.template["spec"]["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
        (expression,) = term["nodeSelectorTerms"][0]["matchExpressions"]
        assert (expression["key"], expression["values"]) == (params["gpuNodeLabel"], [params["gpuNodeLabelValue"]])
        assert all(c["resources"]["limits"]["nvidia.com/gpu"] == "1" for c in pod.containers)
    (svc_head,) = [p for p in serving_pods(docs) if p.group == "headgroup"]
    assert svc_head.ray_start_params["num-cpus"] == "0", "the GPU head schedules no work"
    assert one(docs, "RayService")["spec"]["rayClusterConfig"]["enableInTreeAutoscaling"] is True


def test_serving_replicas_read_weights_only_from_the_volume() -> None:
    """GPU serving pods mount the data volume read-only and the settings point into it (no hub ids)."""
    docs = render("gpu")
    settings = yaml.safe_load(one(docs, "ConfigMap", "vlm-steer-config")["data"]["config.yaml"])
    assert settings["model"]["path"].startswith("/data/")
    assert all(entry["path"].startswith("/data/") for entry in settings["saes"].values())
    assert settings["saes"][settings["default_sae"]]["layer"] == 22
    (gpu,) = [p for p in serving_pods(docs) if p.group == "gpu"]
    (mount,) = [m for c in gpu.containers for m in c["volumeMounts"] if m["mountPath"] == "/data"]
    assert mount.get("readOnly") is True
    assert gpu.volumes[mount["name"]]["persistentVolumeClaim"]["readOnly"] is True
    seed = one(docs, "Job", "vlm-steer-seed-weights")
    env = {e["name"]: e for e in seed["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["MODEL_DIR"]["value"] == settings["model"]["path"]
    assert env["SAE_DIR"]["value"] == settings["saes"][settings["default_sae"]]["path"]
    assert env["HF_TOKEN"]["valueFrom"]["secretKeyRef"]["optional"] is True


def _mounted_file(pod: Pod, docs: list[dict], path: str) -> str | None:
    """The content of `path` in the pod's first container if a ConfigMap volume provides it, '' if a
    PVC is mounted above it (content unknown offline), None if nothing provides it."""
    container = pod.containers[0]
    for mount in container.get("volumeMounts", []):
        root = mount["mountPath"].rstrip("/") + "/"
        if not path.startswith(root):
            continue
        volume = pod.volumes[mount["name"]]
        if "persistentVolumeClaim" in volume:
            return ""
        if "configMap" in volume:
            data = one(docs, "ConfigMap", volume["configMap"]["name"])["data"]
            return data.get(path[len(root):])
    return None


def _entrypoints(docs: list[dict]) -> list[tuple[Pod, list[str]]]:
    """(pod that runs it, argv): RayJob entrypoints run on the head; Jobs run their container command."""
    out = []
    for doc in docs:
        if doc["kind"] == "RayJob":
            (head,) = [p for p in pods([doc]) if p.group == "headgroup"]
            out.append((head, shlex.split(doc["spec"]["entrypoint"])))
        elif doc["kind"] == "Job":
            (pod,) = pods([doc])
            out.append((pod, pod.containers[0]["command"] + pod.containers[0].get("args", [])))
    return out


def test_every_file_a_job_names_is_mounted() -> None:
    docs = render("gpu")
    entrypoints = _entrypoints(docs)
    assert len(entrypoints) == 3
    for pod, argv in entrypoints:
        files = [a for a in argv if a.startswith(("/etc/", "/data/"))]
        assert files, argv
        for path in files:
            assert _mounted_file(pod, docs, path) is not None, f"{pod.owner}: nothing mounts {path}"
    train_yaml = _mounted_file(pods([one(docs, "RayJob", "vlm-steer-train")])[0], docs,
                               "/etc/vlm-steer-train/train.yaml")
    assert train_yaml, "train.yaml must come from the ConfigMap"
    for path in [yaml.safe_load(train_yaml)["shards"], yaml.safe_load(train_yaml)["out"]]:
        for pod in pods([one(docs, "RayJob", "vlm-steer-train")]):
            assert _mounted_file(pod, docs, path + "/x") == "", f"{pod.group} pods do not mount {path}"


def _gpus(doc: dict) -> int:
    groups = doc["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    for group in groups:
        assert group["replicas"] == group["minReplicas"] == group["maxReplicas"], "a job's GPU count is fixed"
    return sum(g["replicas"] * int(c["resources"]["limits"].get("nvidia.com/gpu", 0))
               for g in groups for c in g["template"]["spec"]["containers"])


def test_jobs_use_every_gpu_they_request() -> None:
    docs = render("gpu")
    extract = one(docs, "RayJob", "vlm-steer-extract")
    argv = shlex.split(extract["spec"]["entrypoint"])
    assert int(argv[argv.index("--workers") + 1]) == _gpus(extract) > 1
    assert argv[argv.index("--device") + 1] == "cuda"
    train = one(docs, "RayJob", "vlm-steer-train")
    config = yaml.safe_load(one(docs, "ConfigMap", "vlm-steer-train-config")["data"]["train.yaml"])
    assert config["workers"] == _gpus(train) > 1
    assert config["device"] == "cuda" and config["resume"] is True


def test_extract_entrypoint_parses_against_the_cli() -> None:
    """Click parses the RayJob's arguments with the real command (types, names, required options)."""
    import typer

    from sae_modules.activations.towers import parse_layer
    from service.cli import app

    argv = shlex.split(one(render("gpu"), "RayJob", "vlm-steer-extract")["spec"]["entrypoint"])
    assert argv[:2] == ["vlm-steer", "extract"]
    group = typer.main.get_command(app)
    command = group.get_command(None, "extract")
    ctx = command.make_context("extract", argv[2:])
    assert ctx.params["workers"] == 4 and parse_layer(ctx.params["layer"]) == -2 and ctx.params["progress"] is False
    with pytest.raises(Exception, match="No such option"):
        command.make_context("extract", [*argv[2:], "--num-gpus", "4"])


def test_train_entrypoint_validates_with_dry_run(tmp_path: Path) -> None:
    """`vlm-steer train --config train.yaml --dry-run` accepts the shipped config (shards and run folder
    moved into a temp dir with real tiny shards, everything else as shipped)."""
    from typer.testing import CliRunner

    from service.cli import app
    from tests.train_fixtures import sparse_activations, write_shards

    docs = render("gpu")
    argv = shlex.split(one(docs, "RayJob", "vlm-steer-train")["spec"]["entrypoint"])
    assert argv[:2] == ["vlm-steer", "train"]
    config = yaml.safe_load(one(docs, "ConfigMap", "vlm-steer-train-config")["data"]["train.yaml"])
    write_shards(tmp_path / "shards", sparse_activations(4096), shard_size=1024)
    config.update(shards=str(tmp_path / "shards"), out=str(tmp_path / "run"))
    config_file = tmp_path / "train.yaml"
    config_file.write_text(yaml.safe_dump(config))
    args = [str(config_file) if a == "/etc/vlm-steer-train/train.yaml" else a for a in argv[2:]]
    result = CliRunner().invoke(app, ["train", *args, "--dry-run"])
    assert result.exit_code == 0, result.output
    assert not (tmp_path / "run" / "sae").exists(), "a dry run must not train"
    config_file.write_text(yaml.safe_dump({**config, "workers": 3}))
    refused = CliRunner().invoke(app, ["train", *args, "--dry-run"])
    assert refused.exit_code == 2 and "workers" in refused.output


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_serve_config_follows_ray_serve_guidance(overlay: str) -> None:
    """Ingress replicas >= 2; autoscaled deployments keep max_ongoing_requests 20-50 % above the target,
    with explicit delays; pods outlive every deployment's graceful shutdown."""
    from ray.serve.schema import ServeDeploySchema

    docs = render(overlay)
    config = serve_config(docs)
    ServeDeploySchema.model_validate(config)
    (app,) = config["applications"]
    assert app["args"]["ingress"]["num_replicas"] >= 2
    deployments = {d["name"]: d for d in app["deployments"]}
    autoscaled = [d for d in deployments.values() if "autoscaling_config" in d]
    assert autoscaled
    for deployment in autoscaled:
        scaling = deployment["autoscaling_config"]
        assert deployment["num_replicas"] == "auto"
        assert 1.2 <= deployment["max_ongoing_requests"] / scaling["target_ongoing_requests"] <= 1.5
        assert {"upscale_delay_s", "downscale_delay_s"} <= set(scaling)
        assert deployment["max_ongoing_requests"] == app["args"]["steerer"]["max_ongoing_requests"]
    longest = max(d["graceful_shutdown_timeout_s"] for d in deployments.values())
    for pod in serving_pods(docs):
        assert pod.template["spec"]["terminationGracePeriodSeconds"] > longest or pod.group == "headgroup"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_serve_config_builds_with_build_app(overlay: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The serve config and the mounted ConfigMap are settings the app accepts, build_app builds the
    application on CPU, and every deployment the config overrides exists in it."""
    from ray.serve._private.build_app import build_app as serve_build

    from service.config import load_settings
    from service.deployments import build_app

    docs = render(overlay)
    (app,) = serve_config(docs)["applications"]
    module, _, attr = app["import_path"].partition(":")
    assert (module, attr) == (build_app.__module__, build_app.__name__)
    config_file = tmp_path / "config.yaml"
    config_file.write_text(one(docs, "ConfigMap", "vlm-steer-config")["data"]["config.yaml"])
    args = dict(app["args"])
    assert args.pop("config_file") == "/etc/vlm-steer/config.yaml"
    monkeypatch.delenv("VLM_STEER_CONFIG", raising=False)
    monkeypatch.delenv("VLM_STEER_API_KEYS", raising=False)
    settings = load_settings(config_file, args)
    assert settings.app_name == app["name"]
    if overlay == "gpu":
        assert settings.model.backend == "vllm" and settings.model.device == "cuda"
        assert settings.steerer.num_gpus == 1
    built = serve_build(build_app({**args, "config_file": str(config_file)}), name=app["name"])
    names = {d.name for d in built.deployments}
    assert {d["name"] for d in app["deployments"]} <= names, names


def test_alert_rules_match_between_plain_prometheus_and_operator() -> None:
    operator = yaml.safe_load((ROOT / "k8s" / "base" / "prometheusrule.yaml").read_text())
    plain = yaml.safe_load((ROOT / "deploy" / "prometheus" / "alert_rules.yaml").read_text())
    assert plain["groups"] == operator["spec"]["groups"]


def test_plain_serve_config_builds(monkeypatch: pytest.MonkeyPatch) -> None:
    """deploy/serve_config.yaml (`serve run`/`serve deploy` outside Kubernetes) is a valid Serve deploy
    config whose args build the app."""
    from ray.serve._private.build_app import build_app as serve_build
    from ray.serve.schema import ServeDeploySchema

    from service.deployments import build_app

    config = yaml.safe_load((ROOT / "deploy" / "serve_config.yaml").read_text())
    ServeDeploySchema.model_validate(config)
    (app,) = config["applications"]
    monkeypatch.delenv("VLM_STEER_CONFIG", raising=False)
    built = serve_build(build_app(app["args"]), name=app["name"])
    assert {d.name for d in built.deployments} >= {"Ingress"}
