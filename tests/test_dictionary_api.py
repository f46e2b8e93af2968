"""The latent dictionary over HTTP: the real service (shipped demo model) on a local Ray, three SAEs registered:
`demo` with its shipped dictionary, `bare` without one and `stale` whose dictionary describes another version."""

from __future__ import annotations

import shutil

import httpx
import pytest

from sae_modules.evaluation.latent_labels import LABELS_JSON, load_latent_labels
from sae_modules.evaluation.latent_stats import STATS_JSON, STATS_TENSORS, load_latent_stats
from sae_modules.formats.detect import load_sae
from sae_modules.formats.native import save_sae
from sae_modules.shapes import DEMO_SAE_DIR
from sae_modules.shapes.prompts import QUESTIONS
from sae_modules.shapes.world import generate
from service.config import ServiceSettings
from service.serve_cli import run_app, wait_ready
from tests.ray_app import local_serve
from tests.service_fixtures import data_url

REPLICA = {"num_cpus": 0.25}
DICTIONARY = (STATS_JSON, STATS_TENSORS, LABELS_JSON)
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("dictionary")
    bare = root / "bare"
    bare.mkdir()
    for name in ("cfg.json", "sae.safetensors"):
        shutil.copy2(DEMO_SAE_DIR / name, bare / name)
    sae = load_sae(DEMO_SAE_DIR)
    sae.cfg = sae.cfg.model_copy(update={"threshold": sae.cfg.threshold * 2})
    stale = save_sae(sae, root / "stale")
    for name in DICTIONARY:
        shutil.copy2(DEMO_SAE_DIR / name, stale / name)
    settings = ServiceSettings(saes={"demo": {"path": str(DEMO_SAE_DIR)}, "bare": {"path": str(bare)},
                                     "stale": {"path": str(stale)}},
                               default_sae="demo", limits={"max_top_k": 64}, ingress=REPLICA, steerer=REPLICA,
                               batching={"max_batch_size": 8, "batch_wait_timeout_s": 0.05})
    with local_serve() as base:
        run_app(settings)
        wait_ready(base, 240)
        with httpx.Client(base_url=base, timeout=120) as http:
            yield http


def test_search_by_label_returns_the_files_figures_strongest_first(client) -> None:
    stats, labels = load_latent_stats(DEMO_SAE_DIR), load_latent_labels(DEMO_SAE_DIR).by_latent()
    body = client.get("/v1/saes/demo/latents", params={"query": "RED", "top_k": 5}).json()
    red = [k for k, label in labels.items() if "red" in label.label]
    assert [row["latent"] for row in body["data"]] == sorted(red, key=lambda k: -float(stats.max[k]))[:5]
    assert body["vocabulary"]["name"] == "shapes" and body["order"] == "max"
    for row in body["data"]:
        k = row["latent"]
        assert row["label"]["label"] == labels[k].label and row["label"]["score"] == pytest.approx(labels[k].score)
        assert row["frequency"] == pytest.approx(int(stats.fire_count[k]) / stats.info.n_vectors)
        assert row["max"] == pytest.approx(float(stats.max[k])) and row["p99"] <= row["max"]
    by_score = client.get("/v1/saes/demo/latents", params={"query": "red", "order": "score", "top_k": 64}).json()
    scores = [row["label"]["score"] for row in by_score["data"]]
    assert scores == sorted(scores, reverse=True) and len(scores) == len(red)
    everything = client.get("/v1/saes/demo/latents", params={"top_k": 64, "order": "frequency"}).json()["data"]
    assert len(everything) == min(64, int(stats.live.sum()))
    assert [row["frequency"] for row in everything] == sorted((row["frequency"] for row in everything), reverse=True)
    assert client.get("/v1/saes/demo/latents", params={"query": "zebra"}).json()["data"] == []


def test_one_latent_has_statistics_label_top_images_and_the_default_pin(client) -> None:
    stats, labels = load_latent_stats(DEMO_SAE_DIR), load_latent_labels(DEMO_SAE_DIR).by_latent()
    latent = next(iter(labels))
    body = client.get(f"/v1/saes/demo/latents/{latent}").json()
    assert body["fire_count"] == int(stats.fire_count[latent]) and body["n_vectors"] == stats.info.n_vectors
    assert body["mean"] == pytest.approx(float(stats.mean[latent]))
    assert body["label"]["label"] == labels[latent].label
    assert [(t["image"], t["value"]) for t in body["top_images"]] == [
        (image, pytest.approx(value)) for image, value in stats.top(latent)]
    assert body["images_root"] == "out/demo-dictionary/images"
    assert body["default_pin"] == {"value": 5.0, "unit": "max", "raw_value": pytest.approx(5 * float(stats.max[latent]))}


def test_a_relative_pin_resolves_at_the_ingress_and_steers(client) -> None:
    """The latent the search ranks first for "red", pinned at the default 5 x max: held-out non-red shapes
    are called red, and the response shows the raw value the model was steered with."""
    stats = load_latent_stats(DEMO_SAE_DIR)
    latent = client.get("/v1/saes/demo/latents", params={"query": "red"}).json()["data"][0]["latent"]
    images = [image for image, a in generate(40, seed=2468) if a.colour != "red"][:10]
    answers = []
    for image in images:
        body = {"prompt": QUESTIONS["colour"][0], "image": data_url(image), "max_tokens": 4,
                "interventions": [{"latent": latent, "value": 5, "unit": "max"}]}
        response = client.post("/v1/steer", json=body)
        assert response.status_code == 200, response.text
        result = response.json()
        assert result["interventions"] == [{"latent": latent, "mode": "pin", "value": pytest.approx(
            5 * float(stats.max[latent])), "unit": "raw", "tokens": "all"}]
        answers.append(result["outputs"][0]["text"].strip())
    assert answers.count("red") / len(answers) >= 0.8, answers

    chat = client.post("/v1/chat/completions", json={
        "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(images[0])}},
                                                  {"type": "text", "text": QUESTIONS["colour"][0]}]}],
        "max_tokens": 4, "steering": {"interventions": [{"latent": latent, "value": 5, "unit": "max"}]}})
    assert chat.status_code == 200, chat.text
    edited = chat.json()["steering_metrics"]["sae"]["latents"]
    assert [(e["latent"], e["after"]) for e in edited] == [(latent, pytest.approx(5 * float(stats.max[latent]),
                                                                                  rel=1e-5))]
    assert chat.json()["choices"][0]["message"]["content"].strip() == answers[0]


@pytest.mark.parametrize(("method", "url", "body", "status", "param", "words"), [
    ("GET", "/v1/saes/nope/latents", None, 404, "sae", "unknown SAE"),
    ("GET", "/v1/saes/bare/latents", None, 404, "sae", "evaluate stats"),
    ("GET", "/v1/saes/stale/latents/3", None, 404, "sae", "another version"),
    ("GET", "/v1/saes/demo/latents/100000", None, 404, "latent", "out of range"),
    ("GET", "/v1/saes/demo/latents/x", None, 422, "latent", "integer"),
    ("GET", "/v1/saes/demo/latents?top_k=65", None, 422, "top_k", "limit"),
    ("GET", "/v1/saes/demo/latents?top_k=0", None, 422, "top_k", "greater"),
    ("GET", "/v1/saes/demo/latents?order=best", None, 422, "order", "max"),
    ("POST", "/v1/steer", {"sae": "bare", "interventions": [{"latent": 1, "value": 3, "unit": "max"}]}, 422,
     "interventions.0.unit", "statistics"),
    ("POST", "/v1/steer", {"interventions": [{"latent": 1, "mode": "mul", "value": 3, "unit": "max"}]}, 422,
     "interventions.0.unit", "factor"),
    ("POST", "/v1/steer", {"interventions": [{"latent": 1, "value": 3, "unit": "furlong"}]}, 422,
     "interventions.0.unit", "raw"),
])
def test_bad_requests_name_the_field(client, method, url, body, status, param, words) -> None:
    if body is not None:
        body = {"prompt": "What shape is this?", "image": data_url(next(generate(1, seed=1))[0]), **body}
    response = client.request(method, url, json=body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["param"] == param and words in error["message"], error
