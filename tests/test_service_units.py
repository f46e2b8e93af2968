"""Service parts that need no Ray: settings, image decoding limits, route guards."""

from __future__ import annotations

import asyncio
import base64
import io
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from service.api.errors import APIError
from service.api.guard import RateLimiter
from service.api.images import load_image
from service.api.routes import create_app
from service.config import ConfigError, Limits, ServiceSettings, load_settings
from service.engine.engine import SteeringEngine
from service.engine.types import EncodeJob, SAEInfo, ServingInfo
from tests.service_fixtures import data_url, encoded, noise_image, write_tiny_sae

PROMPT = "describe the image ."


# --- settings -------------------------------------------------------------------------------------------------

def test_settings_env_overrides_file_and_builder_args(tmp_path, monkeypatch) -> None:
    path = tmp_path / "config.yaml"
    path.write_text("limits: {max_tokens: 99, max_prompt_chars: 5}\nsaes: {a: {path: /ckpt}}\n"
                    "model: {engine: {max_num_seqs: 8, engine_kwargs: {max_num_seqs: 2, swap_space: 1}}}\n")
    monkeypatch.setenv("VLM_STEER_LIMITS__MAX_TOKENS", "7")
    monkeypatch.setenv("VLM_STEER_API_KEYS", "k1, k2")
    settings = load_settings(path, {"batching": {"max_batch_size": 3}, "limits": {"max_interventions": 2}})
    assert settings.limits.max_tokens == 7
    assert settings.limits.max_prompt_chars == 5
    assert settings.limits.max_interventions == 2
    assert settings.batching.max_batch_size == 3
    assert settings.model.engine.engine_args() == {"max_num_seqs": 8, "swap_space": 1}
    assert settings.saes["a"].path == "/ckpt"
    assert [key.get_secret_value() for key in settings.api_keys] == ["k1", "k2"]
    assert "k1" not in repr(settings)


def test_settings_read_the_kubernetes_configmap_shape(tmp_path, monkeypatch) -> None:
    path = tmp_path / "config.yaml"
    path.write_text("model: llava-hf/llava-1.5-7b-hf\nsaes:\n  paper: {path: /data/saes/paper}\ndefault_sae: paper\n")
    monkeypatch.setenv("VLM_STEER_CONFIG", str(path))
    monkeypatch.setenv("VLM_STEER_API_KEYS", "")
    settings = load_settings()
    assert settings.model.path == settings.model.id == "llava-hf/llava-1.5-7b-hf"
    assert settings.default_sae == "paper" and settings.api_keys == []
    monkeypatch.setenv("VLM_STEER_CONFIG", str(tmp_path / "absent.yaml"))
    assert load_settings().model.path is None


def test_settings_reject_bad_files_and_fields(tmp_path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a list\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_settings(bad)
    with pytest.raises(ValueError, match="layout"):
        load_settings(None, {"layout": "split"})
    with pytest.raises(ValueError, match="gpu_memory_utilization"):
        load_settings(None, {"model": {"engine": {"gpu_memory_utilization": 1.5}}})


def test_deployment_options_from_settings() -> None:
    settings = ServiceSettings(steerer={"num_cpus": 0.5, "num_gpus": 1, "autoscaling": {"max_replicas": 3}})
    options = settings.steerer.ray_options()
    assert options["ray_actor_options"] == {"num_cpus": 0.5, "num_gpus": 1}
    assert options["autoscaling_config"]["max_replicas"] == 3 and "num_replicas" not in options


# --- images -----------------------------------------------------------------------------------------------------

LIMITS = Limits(max_image_bytes=200_000, max_image_pixels=100 * 100)


def _status(ref: str, limits: Limits = LIMITS) -> tuple[int, str]:
    with pytest.raises(APIError) as caught:
        load_image(ref, limits)
    assert caught.value.param == "image"
    return caught.value.status, caught.value.message


def test_images_decode_from_data_url_and_bare_base64() -> None:
    image = noise_image(1, (20, 10))
    assert load_image(data_url(image), LIMITS).size == (20, 10)
    assert load_image(base64.b64encode(encoded(image, "JPEG")).decode(), LIMITS).mode == "RGB"
    rgba = Image.new("RGBA", (8, 8))
    assert load_image(data_url(rgba), LIMITS).mode == "RGB"


def test_images_refused_with_the_right_status() -> None:
    png = encoded(noise_image(0, (20, 20)))
    b64 = base64.b64encode(png).decode()
    tiff = io.BytesIO()
    noise_image(0, (8, 8)).save(tiff, format="TIFF")
    big = io.BytesIO()
    Image.new("RGB", (101, 100)).save(big, format="PNG")
    assert len(big.getvalue()) < 10_000, "the pixel check must not depend on the encoded size"
    cases = {
        "data:image/png;base64," + base64.b64encode(png[: len(png) // 2]).decode(): (400, "truncated"),
        "data:image/png;base64,@@@": (400, "base64"),
        "data:image/png," + b64: (400, "base64-encoded"),
        "data:text/plain;base64," + b64: (415, "text/plain"),
        base64.b64encode(b"hello world, not an image").decode(): (415, "not a supported image"),
        base64.b64encode(tiff.getvalue()).decode(): (415, "TIFF"),
        base64.b64encode(big.getvalue()).decode(): (413, "101x100"),
        "A" * 300_000: (413, "200000 bytes"),
        "https://example.com/cat.png": (400, "remote image URLs are disabled"),
    }
    for ref, (status, message) in cases.items():
        got_status, got_message = _status(ref)
        assert got_status == status, (ref[:40], got_message)
        assert message in got_message


# --- encode on a real engine ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def engine(tiny_llava_dir, tmp_path_factory) -> SteeringEngine:
    sae_dir = write_tiny_sae(tmp_path_factory.mktemp("sae") / "sae")
    return SteeringEngine.load(str(tiny_llava_dir), {"a": str(sae_dir)})


def test_encode_against_dense_computation(engine) -> None:
    jobs = [EncodeJob(noise_image(0), "a", "all", "mean", 5), EncodeJob(noise_image(1), "a", "patches", "max", 3)]
    results = engine.encode(jobs)
    sae = engine.sae("a")
    for job, result in zip(jobs, results):
        pixels = engine.preprocess([job.image])
        with torch.no_grad():
            latents = engine.encode_latents(pixels, "a", job.tokens)[0]
            hidden = engine.block_output(pixels, engine.sae_block("a"))[0]
            x = hidden[1:] if job.tokens == "patches" else hidden
            recon = sae.decode(sae.encode(x.float()))
        pooled = latents.mean(0) if job.reduce == "mean" else latents.amax(0)
        values, indices = pooled.topk(job.top_k)
        assert [v.latent for v in result.latents] == indices.tolist()
        assert [v.value for v in result.latents] == pytest.approx(values.tolist(), rel=1e-5)
        assert result.l0 == pytest.approx((latents > 0).sum(-1).float().mean().item())
        fvu = ((x - recon) ** 2).sum() / ((x - x.mean(0)) ** 2).sum()
        assert result.fvu == pytest.approx(fvu.item(), rel=1e-4)
    assert engine.encode([EncodeJob(noise_image(0), "a", "cls", "mean", 2)])[0].fvu is None


# --- routes and guard without Ray -----------------------------------------------------------------------------

class _StalledBackend:
    """A backend whose model never answers: what the routes do when a replica hangs or is missing."""

    def __init__(self, info: ServingInfo | None) -> None:
        self._info = info

    async def info(self) -> ServingInfo:
        if self._info is None:
            raise ConnectionError("no replica")
        return self._info

    async def ready(self) -> bool:
        return self._info is not None

    async def steer(self, job):
        await asyncio.Event().wait()

    async def steer_stream(self, job):
        await asyncio.Event().wait()
        yield None

    async def encode(self, job):
        await asyncio.Event().wait()


def serving_info(checkpoint: Path) -> ServingInfo:
    return ServingInfo(model_id="tiny", checkpoint=str(checkpoint), created=0, n_tokens=17, image_tokens=16,
                       context_tokens=256, default_sae="a",
                       saes=[SAEInfo(id="a", layer=1, n_latents=64, architecture="batchtopk", d_in=32, default=True)])


def test_timeout_loading_and_rate_limit_answer_json(tiny_llava_dir) -> None:
    settings = ServiceSettings(limits={"request_timeout_s": 0.2, "rate_limit_per_minute": 4})
    body = {"prompt": PROMPT, "image": data_url(noise_image(0))}
    with TestClient(create_app(settings, _StalledBackend(serving_info(tiny_llava_dir)))) as client:
        response = client.post("/v1/steer", json=body)
        assert response.status_code == 504 and response.json()["error"]["type"] == "timeout_error"
        stream = client.post("/v1/steer", json={**body, "stream": True})
        assert stream.status_code == 504 and stream.json()["error"]["type"] == "timeout_error"
        statuses = [client.post("/v1/encode", json={"image": body["image"]}).status_code for _ in range(3)]
        assert statuses == [504, 504, 429]
    with TestClient(create_app(ServiceSettings(), _StalledBackend(None))) as client:
        assert client.get("/readyz").status_code == 503
        response = client.post("/v1/steer", json=body)
        assert response.status_code == 503 and "Retry-After" in response.headers


def test_rate_limiter_refills() -> None:
    limiter = RateLimiter(per_minute=2)
    assert limiter.allow("a") is None and limiter.allow("a") is None
    wait = limiter.allow("a")
    assert wait is not None and 0 < wait <= 30
    assert limiter.allow("b") is None


def test_serve_config_builds_the_app() -> None:
    import yaml
    from ray.serve.schema import ServeDeploySchema

    from service import deployments

    config = yaml.safe_load((Path(__file__).parents[1] / "deploy" / "serve_config.yaml").read_text())
    ServeDeploySchema.model_validate(config)
    (application,) = config["applications"]
    module, _, name = application["import_path"].partition(":")
    assert (module, name) == ("service.deployments", "build_app")
    app = deployments.build_app(application["args"])
    ingress = app._bound_deployment
    assert ingress.name == "Ingress"
    model = ingress.init_args[1]._bound_deployment
    assert model.name == "SteerGenerate" and len(ingress.init_args) == 2
    assert model._deployment_config.autoscaling_config.max_replicas == 4
