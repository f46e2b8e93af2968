"""Every manifest an operator applies renders and validates offline: core kinds against the
Kubernetes OpenAPI schemas (kubernetes-validate), custom resources against their CRDs."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
SCHEMAS = ROOT.parent / "shared" / "k8s-schemas"
OVERLAYS = ["cpu-demo", "gpu"]
CRD_FILES = {
    ("ray.io", "RayService"): "ray.io_rayservices.yaml",
    ("ray.io", "RayJob"): "ray.io_rayjobs.yaml",
    ("monitoring.coreos.com", "PodMonitor"): "monitoring.coreos.com_podmonitors.yaml",
    ("monitoring.coreos.com", "PrometheusRule"): "monitoring.coreos.com_prometheusrules.yaml",
}
K8S_VERSION = "1.32.0"

needs_kubectl = pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl (kustomize) not installed")


def render(overlay: str) -> list[dict]:
    out = subprocess.run(["kubectl", "kustomize", str(ROOT / "k8s" / "overlays" / overlay)],
                         capture_output=True, text=True, check=True).stdout
    return [doc for doc in yaml.safe_load_all(out) if doc]


def validate_custom(doc: dict, schema: dict) -> None:
    """jsonschema without its metaschema check: CRDs hold Go regexes ((?i) mid-pattern) Python rejects."""
    jsonschema.Draft7Validator(schema).validate(doc)


def crd_schema(group: str, kind: str, version: str) -> dict:
    crd = yaml.safe_load((SCHEMAS / CRD_FILES[(group, kind)]).read_text())
    (served,) = [v for v in crd["spec"]["versions"] if v["name"] == version]
    return served["schema"]["openAPIV3Schema"]


@needs_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_renders_and_validates(overlay: str) -> None:
    docs = render(overlay)
    kinds = {d["kind"] for d in docs}
    assert {"RayService", "PodMonitor", "PrometheusRule", "ConfigMap", "Secret",
            "PersistentVolumeClaim", "NetworkPolicy", "PodDisruptionBudget"} <= kinds
    if overlay == "gpu":
        assert {d["metadata"]["name"] for d in docs if d["kind"] == "RayJob"} == {"vlm-steer-extract", "vlm-steer-train"}
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


@needs_kubectl
def test_gpu_overlay_shape() -> None:
    """On GPU clusters the head schedules no work and the workers ask for GPUs."""
    (svc,) = [d for d in render("gpu") if d["kind"] == "RayService"]
    cluster = svc["spec"]["rayClusterConfig"]
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    assert cluster["enableInTreeAutoscaling"] is True
    limits = [c["resources"]["limits"] for g in cluster["workerGroupSpecs"] for c in g["template"]["spec"]["containers"]]
    assert all("nvidia.com/gpu" in lim for lim in limits)


@needs_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_serve_config_builds_valid_settings(overlay: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The RayService's serve config and the mounted ConfigMap are settings the app accepts."""
    from service.config import load_settings
    from service.deployments import build_app

    docs = render(overlay)
    (svc,) = [d for d in docs if d["kind"] == "RayService"]
    (config_map,) = [d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "vlm-steer-config"]
    (app,) = yaml.safe_load(svc["spec"]["serveConfigV2"])["applications"]
    module, _, attr = app["import_path"].partition(":")
    assert (module, attr) == (build_app.__module__, build_app.__name__)
    config_file = tmp_path / "config.yaml"
    config_file.write_text(config_map["data"]["config.yaml"])
    args = dict(app["args"])
    assert args.pop("config_file") == "/etc/vlm-steer/config.yaml"
    monkeypatch.delenv("VLM_STEER_CONFIG", raising=False)
    settings = load_settings(config_file, args)
    assert settings.app_name == app["name"]
    if overlay == "gpu":
        assert settings.model.backend == "vllm" and settings.steerer.num_gpus == 1


def test_alert_rules_match_between_plain_prometheus_and_operator() -> None:
    operator = yaml.safe_load((ROOT / "k8s" / "base" / "prometheusrule.yaml").read_text())
    plain = yaml.safe_load((ROOT / "deploy" / "prometheus" / "alert_rules.yaml").read_text())
    assert plain["groups"] == operator["spec"]["groups"]
