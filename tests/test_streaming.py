"""Streaming over HTTP on the real Ray Serve app: /v1/steer and /v1/chat/completions with "stream": true.

One app (transformers backend, tiny LLaVA) serves the module. Streamed text must equal the answer
the same request gets unstreamed; the official `openai` client must read the chat stream; a
client that leaves mid-stream must leave the service and the other requests untouched.
"""

from __future__ import annotations

import concurrent.futures
import json
import re
import socket
import time
from pathlib import Path

import httpx
import pytest

from service.config import ServiceSettings
from service.serve_cli import run_app, wait_ready
from tests.ray_app import local_serve
from tests.service_fixtures import data_url, noise_image, write_tiny_sae

pytestmark = pytest.mark.slow

PROMPT = "describe the image ."
PIN = {"latent": 20, "mode": "pin", "value": 50.0}
REPLICA = {"num_cpus": 0.25}


@pytest.fixture(scope="module")
def base(tiny_llava_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    sae_dir = write_tiny_sae(tmp_path_factory.mktemp("stream_sae") / "sae")
    settings = ServiceSettings(model={"id": "tiny", "path": str(tiny_llava_dir)}, saes={"a": {"path": str(sae_dir)}},
                               limits={"max_tokens": 64, "value_bound": 1000.0}, ingress=REPLICA, steerer=REPLICA,
                               batching={"max_batch_size": 16, "batch_wait_timeout_s": 0.05}, app_name="streaming")
    with local_serve() as url:
        run_app(settings)
        wait_ready(url, 240)
        yield url


def steer_body(image: int = 0, **overrides) -> dict:
    return {"prompt": PROMPT, "image": data_url(noise_image(image)), "types": ["STEERED", "DEFAULT"],
            "interventions": [PIN], "max_tokens": 12, **overrides}


def chat_messages(seed: int = 0) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(noise_image(seed))}},
                                         {"type": "text", "text": PROMPT}]}]


def sse_events(response: httpx.Response) -> list[tuple[str | None, str]]:
    """(event name, data) of each server-sent event."""
    events, name = [], None
    for line in response.iter_lines():
        if line.startswith("event: "):
            name = line.removeprefix("event: ")
        elif line.startswith("data: "):
            events.append((name, line.removeprefix("data: ")))
            name = None
    return events


def streamed_steer(url: str, body: dict) -> tuple[dict[str, str], dict]:
    """The text each output type streamed, and the final result event's body."""
    with httpx.stream("POST", f"{url}/v1/steer", json={**body, "stream": True}, timeout=120) as response:
        assert response.status_code == 200, response.read()
        assert response.headers["content-type"].startswith("text/event-stream")
        events = sse_events(response)
    texts: dict[str, str] = {}
    for name, data in events[:-1]:
        assert name == "delta", (name, data)
        delta = json.loads(data)
        texts[delta["type"]] = texts.get(delta["type"], "") + delta["text"]
    name, data = events[-1]
    assert name == "result", (name, data)
    return texts, json.loads(data)


@pytest.mark.parametrize("sampling", [{}, {"temperature": 1.2, "seed": 7}], ids=["greedy", "seeded"])
def test_streamed_steer_equals_the_unstreamed_answer(base, sampling) -> None:
    body = steer_body(**sampling)
    plain = httpx.post(f"{base}/v1/steer", json=body, timeout=120)
    assert plain.status_code == 200, plain.text
    expected = {o["type"]: o["text"] for o in plain.json()["outputs"]}
    texts, final = streamed_steer(base, body)
    assert texts == expected
    assert {o["type"]: o["text"] for o in final["outputs"]} == expected
    assert final["metrics"]["sae"]["latents"][0]["latent"] == PIN["latent"]


def first_token_histogram(url: str, endpoint: str) -> tuple[float, float]:
    """(count, sum) of steer_time_to_first_token_seconds for `endpoint`, scraped from /metrics."""
    text = httpx.get(f"{url}/metrics", timeout=30).text
    found = {}
    for part in ("count", "sum"):
        match = re.search(rf'^steer_time_to_first_token_seconds_{part}{{[^}}]*endpoint="{re.escape(endpoint)}"[^}}]*}} '
                          r"(\S+)$", text, re.MULTILINE)
        found[part] = float(match[1]) if match else 0.0
    return found["count"], found["sum"]


def test_time_to_first_token_covers_the_work_before_the_first_text(base) -> None:
    """The recorded figure lies between the stages that must precede any text (the result's own timings:
    image decode, preprocessing, tower, SAE edit) and what the client saw from sending to the first delta."""
    count, total = first_token_histogram(base, "/v1/steer")
    sent = time.monotonic()
    first_delta = None
    with httpx.stream("POST", f"{base}/v1/steer", json={**steer_body(), "stream": True}, timeout=120) as response:
        assert response.status_code == 200, response.read()
        for name, data in sse_events(response):
            if name == "delta" and first_delta is None:
                first_delta = time.monotonic() - sent
            final = data
    after_count, after_total = first_token_histogram(base, "/v1/steer")
    assert after_count == count + 1
    recorded = after_total - total
    timings = json.loads(final)["metrics"]["timings_s"]
    before_any_text = sum(timings[stage] for stage in ("decode_image", "preprocess", "tower", "sae"))
    assert before_any_text <= recorded <= first_delta


def test_openai_client_streams_chat_completions(base) -> None:
    from openai import OpenAI

    client = OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0)
    steering = {"steering": {"interventions": [PIN]}}
    plain = client.chat.completions.create(model="tiny", messages=chat_messages(), max_tokens=10, extra_body=steering)
    chunks = list(client.chat.completions.create(model="tiny", messages=chat_messages(), max_tokens=10, stream=True,
                                                 stream_options={"include_usage": True}, extra_body=steering))
    assert all(chunk.object == "chat.completion.chunk" for chunk in chunks)
    text = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
    assert text == plain.choices[0].message.content and text
    finished = [chunk for chunk in chunks if chunk.choices and chunk.choices[0].finish_reason]
    assert len(finished) == 1 and finished[0].choices[0].finish_reason == plain.choices[0].finish_reason
    assert finished[0].model_extra["steering_metrics"]["sae"]["latents"][0]["latent"] == PIN["latent"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == plain.usage.completion_tokens
    unsteered = client.chat.completions.create(model="tiny", messages=chat_messages(), max_tokens=10, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in unsteered if c.choices)


def test_chat_stream_ends_with_done(base) -> None:
    body = {"messages": chat_messages(), "max_tokens": 6, "stream": True}
    with httpx.stream("POST", f"{base}/v1/chat/completions", json=body, timeout=120) as response:
        events = sse_events(response)
    assert events[-1] == (None, "[DONE]")
    first = json.loads(events[0][1])
    assert first["choices"][0]["delta"] == {"role": "assistant", "content": ""}


def test_stream_errors_before_any_byte_are_plain_http_errors(base) -> None:
    overflow = [{"latent": 20, "value": 1000.0}] + [{"latent": 20, "mode": "mul", "value": 1000.0}] * 3
    response = httpx.post(f"{base}/v1/steer", json=steer_body(interventions=overflow, stream=True), timeout=120)
    assert response.status_code == 422 and response.json()["error"]["param"] == "interventions"


def test_disconnect_mid_stream_leaves_others_unaffected(base) -> None:
    others = [steer_body(image=s, max_tokens=8, types=["STEERED"]) for s in (1, 2, 3)]
    expected = [httpx.post(f"{base}/v1/steer", json=b, timeout=120).json()["outputs"][0]["text"] for b in others]
    host, port = base.removeprefix("http://").split(":")
    payload = json.dumps(steer_body(image=4, max_tokens=64, stream=True)).encode()
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        with socket.create_connection((host, int(port)), timeout=60) as sock:
            sock.sendall(b"POST /v1/steer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Content-Length: " + str(len(payload)).encode() + b"\r\n\r\n" + payload)
            received = b""
            while b"event: delta" not in received:
                received += sock.recv(4096)
            futures = [pool.submit(httpx.post, f"{base}/v1/steer", json=b, timeout=120) for b in others]
        answers = [f.result() for f in futures]  # the socket is closed: the streamed job's client has left
    assert [a.status_code for a in answers] == [200] * 3
    assert [a.json()["outputs"][0]["text"] for a in answers] == expected
    assert httpx.get(f"{base}/readyz", timeout=30).status_code == 200
    texts, _ = streamed_steer(base, steer_body(image=4, max_tokens=64))
    assert texts


def test_sixteen_concurrent_mixed_requests_all_finish(base) -> None:
    lengths = [4 + (60 * i) // 15 for i in range(16)]

    def one(i: int) -> tuple[int, int]:
        body = steer_body(image=i, max_tokens=lengths[i], types=["STEERED"])
        if i % 2:
            texts, final = streamed_steer(base, body)
            assert texts["STEERED"] == final["outputs"][0]["text"]
            return 200, final["outputs"][0]["usage"]["completion_tokens"]
        response = httpx.post(f"{base}/v1/steer", json=body, timeout=300)
        return response.status_code, response.json()["outputs"][0]["usage"]["completion_tokens"]

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        results = list(pool.map(one, range(16)))
    assert [status for status, _ in results] == [200] * 16
    assert all(1 <= tokens <= lengths[i] for i, (_, tokens) in enumerate(results))


def test_python_client_streams_steer(base) -> None:
    from service.client import ServiceError, SteerClient

    body = steer_body(max_tokens=10)
    with SteerClient(base) as client:
        events = list(client.steer_stream(noise_image(0), PROMPT, [PIN], types=["STEERED", "DEFAULT"], max_tokens=10))
        with pytest.raises(ServiceError) as caught:
            list(client.steer_stream(noise_image(0), PROMPT, [{"latent": 10_000, "value": 1}]))
    assert (caught.value.status, caught.value.param) == (422, "interventions.0.latent")
    kinds = [kind for kind, _ in events]
    assert kinds[-1] == "result" and set(kinds[:-1]) == {"delta"}
    assert events[-1][1]["outputs"] == streamed_steer(base, body)[1]["outputs"]
