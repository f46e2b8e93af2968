"""The real service on a local Ray, spoken to over HTTP: two apps share one Ray and one Serve instance.

- `main`: small limits, no API keys, a wide batch window (so concurrent requests share batches).
- `keyed`: under /keyed with an API key and a one-slot queue (backpressure).
"""

from __future__ import annotations

import base64
import concurrent.futures
import io
import json
import re
import socket
from pathlib import Path

import httpx
import pytest
import torch
from PIL import Image
from transformers import AutoProcessor, LlavaForConditionalGeneration

from service.config import ServiceSettings
from service.engine.types import Stage, user_turn
from service.serve_cli import run_app, wait_ready
from tests.ray_app import local_serve
from tests.service_fixtures import N_LATENTS, data_url, encoded, noise_image, write_tiny_sae

pytestmark = pytest.mark.slow

PROMPT = "describe the image ."
KEY = "test-key-123"
PIN = {"latent": 20, "mode": "pin", "value": 50.0, "tokens": "all"}
"""An edit that changes the tiny model's greedy answer on noise_image(0) (latent 3, say, does not)."""
OVERFLOW = [{"latent": 20, "mode": "pin", "value": 1000.0}] + [{"latent": 20, "mode": "mul", "value": 1000.0}] * 3
"""Each value within the bound 1000, but together they make latent 20 1e12: the edit result is refused."""
REPLICA = {"num_cpus": 0.25}
LIMITS = {"max_body_bytes": 300_000, "max_image_bytes": 100_000, "max_image_pixels": 512 * 512,
          "max_prompt_chars": 600, "max_tokens": 32, "max_interventions": 4, "value_bound": 1000.0,
          "max_top_k": 32, "max_messages": 4}


@pytest.fixture(scope="module")
def service(tiny_llava_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    sae_dir = write_tiny_sae(tmp_path_factory.mktemp("svc_sae") / "sae")
    common = {"model": {"id": "tiny", "path": str(tiny_llava_dir)}, "saes": {"a": {"path": str(sae_dir)}},
              "limits": LIMITS, "ingress": REPLICA}
    main = ServiceSettings(**common, steerer=REPLICA, batching={"max_batch_size": 16, "batch_wait_timeout_s": 0.25})
    keyed = ServiceSettings(**common, app_name="keyed", route_prefix="/keyed", api_keys=[KEY],
                            steerer={**REPLICA, "max_ongoing_requests": 1, "max_queued_requests": 1},
                            batching={"max_batch_size": 1, "batch_wait_timeout_s": 0.0})
    with local_serve() as base:
        run_app(main)
        run_app(keyed)
        wait_ready(base, 240)
        wait_ready(f"{base}/keyed", 240)
        yield base


@pytest.fixture(scope="module")
def client(service: str):
    with httpx.Client(base_url=service, timeout=120) as client:
        yield client


def steer_body(**overrides) -> dict:
    body = {"prompt": PROMPT, "image": data_url(noise_image(0)), "types": ["STEERED", "DEFAULT"], "max_tokens": 8,
            "interventions": [PIN]}
    return {**body, **overrides}


def metric(text: str, name: str, **labels: str) -> float:
    """The value of one sample in a Prometheus text exposition (0 if absent)."""
    wanted = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        match = re.fullmatch(rf"{re.escape(name)}(?:\{{(.*)\}})? (\S+)", line)
        if match and ",".join(sorted((match[1] or "").split(","))) == wanted:
            return float(match[2])
    return 0.0


def unpatched_greedy(model_dir: Path, image, prompt: str, max_tokens: int) -> str:
    """The plain transformers LLaVA's greedy answer, cut at EOS like the service's."""
    processor = AutoProcessor.from_pretrained(model_dir)
    model = LlavaForConditionalGeneration.from_pretrained(model_dir).eval()
    text = processor.apply_chat_template(user_turn(prompt), add_generation_prompt=True)
    inputs = processor(images=[image], text=[text], return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=max_tokens, do_sample=False)
    new = out[0, inputs.input_ids.shape[1]:].tolist()
    eos = model.generation_config.eos_token_id
    if eos in new:
        new = new[: new.index(eos)]
    return processor.tokenizer.decode(new, skip_special_tokens=True)


def test_pin_changes_output_and_default_is_the_unpatched_model(client, tiny_llava_dir) -> None:
    response = client.post("/v1/steer", json=steer_body())
    assert response.status_code == 200, response.text
    data = response.json()
    outputs = {o["type"]: o for o in data["outputs"]}
    assert set(outputs) == {"STEERED", "DEFAULT"} and data["model"] == "tiny" and data["sae"] == "a"
    assert outputs["DEFAULT"]["text"] == unpatched_greedy(tiny_llava_dir, noise_image(0), PROMPT, 8)
    assert outputs["STEERED"]["text"] != outputs["DEFAULT"]["text"]
    unsteered = client.post("/v1/steer", json=steer_body(interventions=[], types=["DEFAULT"])).json()
    assert unsteered["outputs"][0]["text"] == outputs["DEFAULT"]["text"]
    change = data["metrics"]["sae"]["latents"][0]
    assert change["latent"] == 20 and change["after"] == pytest.approx(50.0)
    assert {"decode_image", "tower", "sae", "generate"} <= set(data["metrics"]["timings_s"])
    assert -1.0 <= data["metrics"]["embed_cosine"] <= 1.0
    usage = outputs["STEERED"]["usage"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


def test_chat_completions_match_steer(client) -> None:
    steer = client.post("/v1/steer", json=steer_body()).json()
    texts = {o["type"]: o["text"] for o in steer["outputs"]}
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(noise_image(0))}},
                                             {"type": "text", "text": PROMPT}]}]
    steering = {"interventions": [PIN]}
    steered = client.post("/v1/chat/completions", json={"messages": messages, "max_tokens": 8, "steering": steering})
    assert steered.status_code == 200, steered.text
    body = steered.json()
    assert body["object"] == "chat.completion" and body["choices"][0]["message"]["role"] == "assistant"
    assert body["choices"][0]["message"]["content"] == texts["STEERED"]
    assert body["steering_metrics"]["sae"]["latents"][0]["latent"] == 20
    plain = client.post("/v1/chat/completions", json={"model": "tiny", "messages": messages, "max_tokens": 8,
                                                      "user": "ignored-openai-field"}).json()
    assert plain["choices"][0]["message"]["content"] == texts["DEFAULT"]
    assert plain["steering_metrics"] is None


def test_chat_stop_strings_cut_the_answer(client) -> None:
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(noise_image(0))}},
                                             {"type": "text", "text": PROMPT}]}]
    whole = client.post("/v1/chat/completions", json={"messages": messages, "max_tokens": 8}).json()
    text = whole["choices"][0]["message"]["content"]
    words = text.split()
    assert len(words) >= 2, text
    stop = words[1]
    cut = client.post("/v1/chat/completions", json={"messages": messages, "max_tokens": 8, "stop": stop}).json()
    choice = cut["choices"][0]
    assert choice["message"]["content"] == text[:text.index(stop)]
    assert choice["finish_reason"] == "stop"
    assert cut["usage"]["completion_tokens"] < whole["usage"]["completion_tokens"]


def test_encode_top_latent_pinned_raises_it(client) -> None:
    encoding = client.post("/v1/encode", json={"image": data_url(noise_image(0)), "top_k": 5})
    assert encoding.status_code == 200, encoding.text
    latents = encoding.json()["latents"]
    assert len(latents) <= 5 and latents == sorted(latents, key=lambda item: -item["value"])
    top, value = latents[0]["latent"], latents[0]["value"]
    target = round(10 * max(value, 1.0), 3)
    pinned = client.post("/v1/steer", json=steer_body(
        types=["STEERED"], interventions=[{"latent": top, "mode": "pin", "value": target}])).json()
    change = pinned["metrics"]["sae"]["latents"][0]
    assert change["latent"] == top and change["before"] == pytest.approx(value, rel=1e-4)
    assert change["after"] == pytest.approx(target) and change["after"] > change["before"]


def _bad_inputs() -> list[tuple[str, str, dict | bytes, dict, int, str | None, str]]:
    """(name, path, body, headers, status, param, message fragment)."""
    png = data_url(noise_image(0))
    tiff = io.BytesIO()
    noise_image(0, (8, 8)).save(tiff, format="TIFF")
    b64 = base64.b64encode
    many_pixels = encoded(Image.new("RGB", (600, 600)))
    many_bytes = encoded(noise_image(1, (200, 200)))
    truncated = "data:image/png;base64," + b64(encoded(noise_image(0))[:300]).decode()
    msg = [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]
    one_image = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": png}},
                                              {"type": "text", "text": "hi"}]}]
    return [
        ("latent out of range", "/v1/steer", steer_body(interventions=[{"latent": N_LATENTS, "value": 1}]), {}, 422,
         "interventions.0.latent", "out of range"),
        ("negative latent", "/v1/steer", steer_body(interventions=[{"latent": -1, "value": 1}]), {}, 422,
         "interventions.0.latent", "greater than or equal to 0"),
        ("unknown mode", "/v1/steer", steer_body(interventions=[{"latent": 1, "mode": "zap", "value": 1}]), {}, 422,
         "interventions.0.mode", "pin"),
        ("value over bound", "/v1/steer", steer_body(interventions=[{"latent": 1, "value": 5000}]), {}, 422,
         "interventions.0.value", "bound"),
        ("token index out of range", "/v1/steer", steer_body(interventions=[{"latent": 1, "value": 1,
                                                                              "tokens": [0, 99]}]), {}, 422,
         "interventions.0.tokens", "out of range"),
        ("too many interventions", "/v1/steer", steer_body(interventions=[{"latent": 1, "value": 1}] * 5), {}, 422,
         "interventions", "limit 4"),
        ("unknown sae", "/v1/steer", steer_body(sae="nope"), {}, 404, "sae", "unknown SAE"),
        ("encode unknown sae", "/v1/encode", {"image": png, "sae": "nope"}, {}, 404, "sae", "unknown SAE"),
        ("unknown type", "/v1/steer", steer_body(types=["BOTH"]), {}, 422, "types.0", "STEERED"),
        ("missing prompt", "/v1/steer", {k: v for k, v in steer_body().items() if k != "prompt"}, {}, 422, "prompt",
         "Field required"),
        ("prompt too long", "/v1/steer", steer_body(prompt="a " * 301), {}, 422, "prompt", "characters"),
        ("prompt past the context", "/v1/steer", steer_body(prompt="a " * 250), {}, 422, "max_tokens",
         "context of 256 tokens"),
        ("image token in prompt", "/v1/steer", steer_body(prompt="what is <image> ?"), {}, 422, "prompt",
         "image placeholder"),
        ("edits compose past the bound", "/v1/steer", steer_body(interventions=OVERFLOW), {}, 422, "interventions",
         "beyond the bound 1000"),
        ("too many token indices", "/v1/steer", steer_body(interventions=[{"latent": 1, "value": 1,
                                                                            "tokens": [0] * 18}]), {}, 422,
         "interventions.0.tokens", "18 token indices"),
        ("max_tokens over limit", "/v1/steer", steer_body(max_tokens=33), {}, 422, "max_tokens", "limit 32"),
        ("unknown field", "/v1/steer", steer_body(colour="red"), {}, 422, "colour", "Extra inputs"),
        ("temperature out of range", "/v1/steer", steer_body(temperature=5), {}, 422, "temperature", "less than"),
        ("truncated image", "/v1/steer", steer_body(image=truncated), {}, 400, "image", "truncated"),
        ("not base64", "/v1/steer", steer_body(image="%%%"), {}, 400, "image", "base64"),
        ("tiff image", "/v1/steer", steer_body(image=b64(tiff.getvalue()).decode()), {}, 415, "image", "TIFF"),
        ("too many pixels", "/v1/steer", steer_body(image=b64(many_pixels).decode()), {}, 413, "image", "600x600"),
        ("too many image bytes", "/v1/steer", steer_body(image=b64(many_bytes).decode()), {}, 413, "image",
         "100000 bytes"),
        ("body is a list", "/v1/steer", [1, 2], {}, 400, None, "JSON object"),
        ("remote url refused", "/v1/steer", steer_body(image="http://example.com/a.png"), {}, 400, "image",
         "remote image URLs are disabled"),
        ("body not json", "/v1/steer", b"{not json", {"Content-Type": "application/json"}, 400, None, "JSON"),
        ("wrong content type", "/v1/steer", b"prompt=x", {"Content-Type": "text/plain"}, 415, None,
         "application/json"),
        ("chat without image", "/v1/chat/completions", {"messages": msg}, {}, 400, "messages", "exactly one image"),
        ("chat too many messages", "/v1/chat/completions", {"messages": msg * 4 + one_image}, {}, 422, "messages",
         "limit 4"),
        ("chat image in an assistant message", "/v1/chat/completions",
         {"messages": [{"role": "assistant", "content": one_image[0]["content"]}, *msg]}, {}, 400,
         "messages.0.content.0", "only appear in user messages"),
        ("NaN value", "/v1/steer",
         json.dumps(steer_body(interventions=[{"latent": 1, "value": float("nan")}])).encode(),
         {"Content-Type": "application/json"}, 422, "interventions.0.value", "finite"),
        ("chat unknown model", "/v1/chat/completions", {"model": "gpt-9", "messages": one_image}, {}, 404, "model",
         "unknown model"),
        ("chat image token in system text", "/v1/chat/completions",
         {"messages": [{"role": "system", "content": "you see <image>"}, *one_image]}, {}, 422,
         "messages.0.content", "image placeholder"),
        ("chat image token in a text part", "/v1/chat/completions",
         {"messages": [{"role": "user", "content": [*one_image[0]["content"], {"type": "text", "text": "<image>"}]}]},
         {}, 422, "messages.0.content.2.text", "image placeholder"),
        ("chat too many content parts", "/v1/chat/completions",
         {"messages": [{"role": "user", "content": [*one_image[0]["content"]] + [{"type": "text", "text": ""}] * 15}]},
         {}, 422, "messages.0.content", "limit 16"),
        ("chat too many stop strings", "/v1/chat/completions", {"messages": one_image, "stop": list("abcde")}, {},
         422, "stop", "limit 4"),
        ("chat stop string too long", "/v1/chat/completions", {"messages": one_image, "stop": ["x" * 65]}, {}, 422,
         "stop.0", "1 to 64 characters"),
        ("chat edits compose past the bound", "/v1/chat/completions",
         {"messages": one_image, "steering": {"interventions": OVERFLOW}}, {}, 422, "steering.interventions",
         "beyond the bound"),
        ("chat context", "/v1/chat/completions",
         {"messages": [{"role": "user", "content": [one_image[0]["content"][0], {"type": "text", "text": "a " * 240}]}],
          "max_completion_tokens": 20}, {}, 422, "max_completion_tokens", "context of 256"),
        ("chat unknown steering sae", "/v1/chat/completions", {"messages": one_image, "steering": {"sae": "x"}}, {},
         404, "steering.sae", "unknown SAE"),
        ("chat steering latent", "/v1/chat/completions",
         {"messages": one_image, "steering": {"interventions": [{"latent": 10_000, "value": 1}]}}, {}, 422,
         "steering.interventions.0.latent", "out of range"),
        ("encode top_k over limit", "/v1/encode", {"image": png, "top_k": 33}, {}, 422, "top_k", "limit 32"),
        ("encode bad reduce", "/v1/encode", {"image": png, "reduce": "median"}, {}, 422, "reduce", "mean"),
        ("unknown route", "/v1/nothing", {}, {}, 404, None, "Not Found"),
    ]


def test_bad_inputs_get_the_right_error_and_service_stays_ready(client) -> None:
    cases = _bad_inputs()
    assert len(cases) >= 20
    for name, path, body, headers, status, param, fragment in cases:
        if isinstance(body, bytes):
            response = client.post(path, content=body, headers=headers)
        else:
            response = client.post(path, json=body, headers=headers)
        assert response.status_code == status, (name, response.text)
        error = response.json()["error"]
        assert error["param"] == param, (name, error)
        assert fragment in error["message"], (name, error)
        assert error["type"]
    assert client.get("/readyz").status_code == 200
    assert client.post("/v1/steer", json=steer_body()).status_code == 200


def test_declared_body_over_the_limit_is_refused_before_reading(service) -> None:
    host, port = service.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(b"POST /v1/steer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 999999999\r\nConnection: close\r\n\r\n{")
        reply = b""
        while chunk := sock.recv(65536):
            reply += chunk
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 413")
    assert b'"type":"request_too_large"' in body


def test_streamed_body_over_the_limit_is_refused(client) -> None:
    def chunks():
        yield b'{"prompt": "' + b"a" * 200_000
        yield b"a" * 200_000 + b'"}'

    response = client.post("/v1/steer", content=chunks(), headers={"Content-Type": "application/json"})
    assert response.status_code == 413 and response.json()["error"]["type"] == "request_too_large"


def test_concurrent_requests_are_batched_and_counted(client) -> None:
    before = client.get("/metrics").text
    bodies = [steer_body(image=data_url(noise_image(i)), types=["STEERED"]) for i in range(16)]
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        statuses = list(pool.map(lambda body: httpx.post(f"{client.base_url}/v1/steer", json=body,
                                                         timeout=120).status_code, bodies))
    assert statuses == [200] * 16
    after = client.get("/metrics").text
    batches = metric(after, "steer_batch_size_count") - metric(before, "steer_batch_size_count")
    images = metric(after, "steer_batch_size_sum") - metric(before, "steer_batch_size_sum")
    singles = metric(after, "steer_batch_size_bucket", le="1.0") - metric(before, "steer_batch_size_bucket", le="1.0")
    assert images == 16 and batches < 16 and singles < batches
    ok = "steer_requests_total"
    assert metric(after, ok, endpoint="/v1/steer", outcome="ok") - metric(before, ok, endpoint="/v1/steer",
                                                                          outcome="ok") == 16
    assert metric(after, "steer_stage_seconds_count", stage="generate") - \
        metric(before, "steer_stage_seconds_count", stage="generate") == 16
    assert metric(after, "steer_interventions_count") - metric(before, "steer_interventions_count") == 16
    assert metric(after, "steer_sae_info", sae="a", layer="1", n_latents=str(N_LATENTS)) == 1
    assert metric(after, "steer_sae_l0_count") > 0 and metric(after, "steer_sae_fvu_count") > 0


def test_registry_endpoints(client) -> None:
    saes = client.get("/v1/saes").json()["data"]
    assert saes == [{"id": "a", "object": "sae", "layer": 1, "n_latents": N_LATENTS, "architecture": "batchtopk",
                     "d_in": 32, "default": True}]
    assert [m["id"] for m in client.get("/v1/models").json()["data"]] == ["tiny"]
    assert client.get("/healthz").json() == {"status": "ok"}
    assert "steer_requests_total" in client.get("/metrics").text
    assert client.get("/docs").status_code == 200


def test_api_keys_and_backpressure(client, service) -> None:
    keyed = f"{service}/keyed"
    assert httpx.get(f"{keyed}/healthz").status_code == 200
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        response = httpx.post(f"{keyed}/v1/steer", json=steer_body(), headers=headers)
        assert response.status_code == 401 and response.json()["error"]["type"] == "authentication_error"
    auth = {"Authorization": f"Bearer {KEY}"}
    unbatched = httpx.post(f"{keyed}/v1/steer", json=steer_body(), headers=auth, timeout=120)
    assert unbatched.status_code == 200, unbatched.text
    batched = client.post("/v1/steer", json=steer_body()).json()
    assert [o["text"] for o in unbatched.json()["outputs"]] == [o["text"] for o in batched["outputs"]]

    body = steer_body(max_tokens=32, types=["STEERED"])
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(lambda _: httpx.post(f"{keyed}/v1/steer", json=body, headers=auth, timeout=120),
                                  range(8)))
    refused = [r for r in responses if r.status_code == 503]
    assert refused and all(r.status_code in (200, 503) for r in responses)
    assert all(r.json()["error"]["type"] == "service_unavailable" and r.headers["Retry-After"] for r in refused)
    assert httpx.get(f"{keyed}/readyz").status_code == 200


def test_schemathesis_finds_no_server_errors(service) -> None:
    import schemathesis
    from hypothesis import HealthCheck, Phase, given, settings

    schema = schemathesis.openapi.from_url(f"{service}/openapi.json")
    failures = []
    for result in schema.get_all_operations():
        operation = result.ok()

        @settings(max_examples=6, deadline=None, phases=[Phase.generate], database=None,
                  suppress_health_check=list(HealthCheck))
        @given(case=operation.as_strategy())
        def check(case) -> None:
            response = case.call(base_url=service, timeout=60)
            if response.status_code >= 500:
                failures.append((case.method, case.path, response.status_code, response.text[:200]))

        check()
    assert not failures


def test_python_client(client, service) -> None:
    from service.client import ServiceError, SteerClient

    raw = client.post("/v1/steer", json=steer_body()).json()
    with SteerClient(f"{service}/keyed", api_key=KEY) as steer_client:
        assert steer_client.ready() and [s["id"] for s in steer_client.saes()] == ["a"]
        answer = steer_client.steer(noise_image(0), PROMPT, [PIN], types=["STEERED", "DEFAULT"], max_tokens=8)
        assert [o["text"] for o in answer["outputs"]] == [o["text"] for o in raw["outputs"]]
        chat = steer_client.chat(encoded(noise_image(0)), PROMPT, steering={"interventions": [PIN]}, max_tokens=8)
        assert chat["choices"][0]["message"]["content"] == raw["outputs"][0]["text"]
        with pytest.raises(ServiceError) as caught:
            steer_client.steer(noise_image(0), PROMPT, [{"latent": 10_000, "value": 1}])
        assert (caught.value.status, caught.value.param) == (422, "interventions.0.latent")
    with SteerClient(f"{service}/keyed", api_key="wrong") as wrong, pytest.raises(ServiceError) as caught:
        wrong.saes()
    assert caught.value.status == 401


def test_bad_requests_in_a_batch_fail_alone(client) -> None:
    """Good requests and requests that only the replica can refuse (edits composing past the bound) sent together
    into one batch window: each bad one gets its own 422, every good one its 200 with the answer it gets alone."""
    good = [steer_body(image=data_url(noise_image(i)), types=["STEERED"]) for i in range(6)]
    expected = [client.post("/v1/steer", json=body).json()["outputs"][0]["text"] for body in good]
    bad = [steer_body(image=data_url(noise_image(10 + i)), interventions=OVERFLOW) for i in range(3)]
    before = client.get("/metrics").text
    bodies = [good[0], bad[0], good[1], good[2], bad[1], good[3], good[4], bad[2], good[5]]
    with concurrent.futures.ThreadPoolExecutor(len(bodies)) as pool:
        responses = list(pool.map(lambda body: httpx.post(f"{client.base_url}/v1/steer", json=body, timeout=120),
                                  bodies))
    answers = [r.json()["outputs"][0]["text"] for r, body in zip(responses, bodies) if body in good]
    assert [r.status_code for r, body in zip(responses, bodies) if body in good] == [200] * 6
    assert answers == expected
    for response in (r for r, body in zip(responses, bodies) if body in bad):
        assert response.status_code == 422 and response.json()["error"]["param"] == "interventions"
    after = client.get("/metrics").text
    images = metric(after, "steer_batch_size_sum") - metric(before, "steer_batch_size_sum")
    batches = metric(after, "steer_batch_size_count") - metric(before, "steer_batch_size_count")
    assert batches < 6 and images > 6, "the good and the bad requests did not share a batch"
    assert client.get("/readyz").status_code == 200


def test_metrics_show_every_timed_stage(client) -> None:
    assert client.post("/v1/steer", json=steer_body()).status_code == 200
    assert client.post("/v1/encode", json={"image": data_url(noise_image(0))}).status_code == 200
    text = client.get("/metrics").text
    missing = [stage.value for stage in Stage if metric(text, "steer_stage_seconds_count", stage=stage.value) == 0]
    assert not missing, f"stages timed but not exported: {missing}"
