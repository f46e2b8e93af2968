"""`vlm-steer serve`: start Ray Serve with the steering app on one machine, wait until ready, show how to call it.

On a cluster, KubeRay runs the same `build_app` from `deploy/serve_config.yaml` instead.
"""

from __future__ import annotations

import base64
import io
import time
from pathlib import Path
from typing import Annotated

import httpx
import typer
from pydantic import ValidationError

from service.assets import resolve_checkpoints
from service.config import ServiceSettings, load_settings


def run_app(settings: ServiceSettings) -> None:
    """Deploy the app on the running Ray Serve instance (not waiting for readiness)."""
    from ray import serve

    from service.deployments import build_app

    serve.run(build_app(settings), name=settings.app_name, route_prefix=settings.route_prefix, blocking=False)


def wait_ready(base_url: str, timeout_s: float = 300.0) -> None:
    """Poll GET /readyz until it answers 200; raise TimeoutError with the last answer otherwise."""
    deadline = time.monotonic() + timeout_s
    last = "no answer"
    while time.monotonic() < deadline:
        try:
            response = httpx.get(f"{base_url}/readyz", timeout=5.0)
            if response.status_code == 200:
                return
            last = f"{response.status_code} {response.text[:200]}"
        except httpx.HTTPError as exc:
            last = repr(exc)
        time.sleep(0.5)
    raise TimeoutError(f"{base_url}/readyz not ready after {timeout_s:g} s: {last}")


def example_image_b64() -> str:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (16, 16), (200, 30, 30)).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def curl_example(base_url: str, auth: bool) -> str:
    header = ' -H "Authorization: Bearer $VLM_STEER_KEY"' if auth else ""
    body = ('{"prompt": "Describe the image.", "image": "data:image/png;base64,' + example_image_b64()
            + '", "interventions": [{"latent": 3, "mode": "pin", "value": 20}], "types": ["STEERED", "DEFAULT"], '
            '"max_tokens": 16}')
    return f"curl -s {base_url}/v1/steer -H 'Content-Type: application/json'{header} -d '{body}'"


def serve(
    host: Annotated[str, typer.Option(help="Address the HTTP proxy binds.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(envvar="PORT", help="HTTP port.")] = 8000,
    config: Annotated[
        Path | None, typer.Option(help="Settings YAML file (default: $VLM_STEER_CONFIG if it exists).")
    ] = None,
    num_cpus: Annotated[float | None, typer.Option(help="CPUs Ray may use (default: all).")] = None,
    ready_timeout_s: Annotated[float, typer.Option(help="How long to wait for the models to load.")] = 600.0,
) -> None:
    """Start the steering service on this machine and block until Ctrl-C."""
    import ray
    from ray import serve as ray_serve

    try:
        settings = load_settings(config)
        checkpoints = resolve_checkpoints(settings)
    except (ValueError, ValidationError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc
    note = "  <- a tiny RANDOM model: answers are meaningless" if checkpoints.random else ""
    typer.echo(f"model {settings.model.id}: {checkpoints.model}{note}")
    for sae_id, path in checkpoints.saes.items():
        typer.echo(f"SAE {sae_id}: {path}")
    ray.init(include_dashboard=False, num_cpus=None if num_cpus is None else int(max(1, num_cpus)),
             ignore_reinit_error=True)
    ray_serve.start(http_options={"host": host, "port": port})
    run_app(settings)
    base_url = f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}{settings.route_prefix.rstrip('/')}"
    typer.echo(f"waiting for {base_url}/readyz ...")
    try:
        wait_ready(base_url, ready_timeout_s)
        typer.echo(f"ready: {base_url}  (API docs: {base_url}/docs, metrics: {base_url}/metrics)\n")
        typer.echo(curl_example(base_url, auth=bool(settings.api_keys)))
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        ray_serve.shutdown()
        ray.shutdown()
