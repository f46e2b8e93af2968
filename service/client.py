"""A small Python client for the steering service (httpx); errors come back as `ServiceError`.

    from service.client import SteerClient
    client = SteerClient("http://127.0.0.1:8000", api_key=None)
    top = client.encode("cat.png", top_k=5)["latents"][0]["latent"]
    answer = client.steer("cat.png", "Describe the image.", [{"latent": top, "value": 40}],
                          types=["STEERED", "DEFAULT"])
    print({o["type"]: o["text"] for o in answer["outputs"]})
"""

from __future__ import annotations

import base64
import io
import json
import mimetypes
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Self

import httpx
from PIL import Image

ImageLike = str | Path | bytes | Image.Image


class ServiceError(RuntimeError):
    """An error answer from the service: HTTP status, OpenAI error type, message and offending field."""

    def __init__(self, status: int, type: str, message: str, param: str | None) -> None:
        super().__init__(f"{status} {type}: {message}" + (f" (param {param})" if param else ""))
        self.status, self.type, self.message, self.param = status, type, message, param


def image_data_url(image: ImageLike) -> str:
    """A data URL for a file path, encoded bytes, a PIL image, or a string that already is a data URL."""
    if isinstance(image, str) and image.startswith(("data:", "http://", "https://")):
        return image
    if isinstance(image, Image.Image):
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        data, mime = buffer.getvalue(), "image/png"
    elif isinstance(image, bytes):
        data, mime = image, "image/" + (Image.open(io.BytesIO(image)).format or "png").lower()
    else:
        path = Path(image)
        data, mime = path.read_bytes(), mimetypes.guess_type(path.name)[0] or "image/png"
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


class SteerClient:
    def __init__(self, base_url: str = "http://127.0.0.1:8000", api_key: str | None = None,
                 timeout_s: float = 120.0) -> None:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = httpx.Client(base_url=base_url.rstrip("/"), headers=headers, timeout=timeout_s)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.http.close()

    def _answer(self, response: httpx.Response) -> dict[str, Any]:
        if response.status_code >= 400:
            try:
                error = response.json()["error"]
            except (ValueError, KeyError, TypeError):
                error = {"type": "http_error", "message": response.text[:500], "param": None}
            raise ServiceError(response.status_code, error.get("type", ""), error.get("message", ""),
                               error.get("param"))
        return response.json()

    def _post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        return self._answer(self.http.post(path, json={k: v for k, v in body.items() if v is not None}))

    def steer(self, image: ImageLike, prompt: str, interventions: list[dict[str, Any]] | None = None, *,
              sae: str | None = None, types: list[str] | None = None, use_error_term: bool = False,
              pre_zero: bool = False, max_tokens: int | None = None, temperature: float = 0.0,
              top_p: float = 1.0, seed: int | None = None) -> dict[str, Any]:
        """POST /v1/steer; `interventions` like [{"latent": 39, "mode": "pin", "value": 40, "tokens": "all"}]."""
        return self._post("/v1/steer", {
            "prompt": prompt, "image": image_data_url(image), "sae": sae, "interventions": interventions or [],
            "types": types, "use_error_term": use_error_term, "pre_zero": pre_zero, "max_tokens": max_tokens,
            "temperature": temperature, "top_p": top_p, "seed": seed,
        })

    def steer_stream(self, image: ImageLike, prompt: str, interventions: list[dict[str, Any]] | None = None,
                     **fields: Any) -> Iterator[tuple[str, dict[str, Any]]]:
        """POST /v1/steer with "stream": true: ("delta", {"type", "text"}) as text is made, then ("result", body).

        `fields` are the other /v1/steer fields (types, max_tokens, seed, ...); errors raise `ServiceError`."""
        body = {"prompt": prompt, "image": image_data_url(image), "interventions": interventions or [],
                "stream": True, **{k: v for k, v in fields.items() if v is not None}}
        with self.http.stream("POST", "/v1/steer", json=body) as response:
            if response.status_code >= 400:
                response.read()
                self._answer(response)
            event = None
            for line in response.iter_lines():
                if line.startswith("event: "):
                    event = line.removeprefix("event: ")
                elif line.startswith("data: "):
                    data = json.loads(line.removeprefix("data: "))
                    if event == "error":
                        error = data["error"]
                        raise ServiceError(response.status_code, error["type"], error["message"], error.get("param"))
                    yield event, data

    def chat(self, image: ImageLike, prompt: str, steering: dict[str, Any] | None = None,
             **openai_fields: Any) -> dict[str, Any]:
        """POST /v1/chat/completions with one user turn (image + text) and optional `steering`."""
        content = [{"type": "image_url", "image_url": {"url": image_data_url(image)}},
                   {"type": "text", "text": prompt}]
        return self._post("/v1/chat/completions",
                          {"messages": [{"role": "user", "content": content}], "steering": steering, **openai_fields})

    def encode(self, image: ImageLike, *, sae: str | None = None, top_k: int = 16, tokens: str = "all",
               reduce: str = "mean") -> dict[str, Any]:
        return self._post("/v1/encode", {"image": image_data_url(image), "sae": sae, "top_k": top_k,
                                         "tokens": tokens, "reduce": reduce})

    def saes(self) -> list[dict[str, Any]]:
        return self._answer(self.http.get("/v1/saes"))["data"]

    def models(self) -> list[dict[str, Any]]:
        return self._answer(self.http.get("/v1/models"))["data"]

    def ready(self) -> bool:
        return self.http.get("/readyz").status_code == 200
