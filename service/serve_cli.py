"""`vlm-steer serve`: start Ray Serve with the steering app on one machine, wait until ready, show how to call it.

SIGTERM (what Kubernetes, systemd and `docker stop` send) and SIGINT (Ctrl-C) both shut down
cleanly: in-flight requests finish first (up to `--drain-timeout-s`), then the app is deleted,
Serve and the Ray processes this command started are stopped, and the command exits 0. On a cluster, KubeRay runs the same `build_app` from
`deploy/serve_config.yaml` instead.
"""

from __future__ import annotations

import base64
import io
import json
import shlex
import signal
import time
from pathlib import Path
from types import FrameType
from typing import Annotated

import httpx
import typer
from pydantic import ValidationError

from service.assets import Checkpoints, check_layers, resolve_checkpoints
from service.config import ServiceSettings, load_settings
from service.ui import CHECKOUT_EXAMPLES_DIR

DEMO_IMAGE = "red_circle.png"
DEMO_PROMPT = "What shape is this?"
DEMO_PIN = {"latent": 26, "mode": "pin", "value": 60}
DEMO_CLAIM = '# the demo answers "circle" (DEFAULT); pinning latent 26, its "star" latent, makes it say "star" (STEERED)'
"""The first request `make serve` prints: on the shipped demo, latent 26 pinned turns a circle into a star."""


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


def demo_example_image(settings: ServiceSettings, checkpoints: Checkpoints) -> Path | None:
    """The shipped example image the demo claim is about, when the shipped demo model and SAE are served."""
    if settings.model.path or settings.saes or checkpoints.random:
        return None
    image = (settings.ui_examples_dir or CHECKOUT_EXAMPLES_DIR) / DEMO_IMAGE
    return image if image.is_file() else None


def _generated_image_b64() -> str:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (16, 16), (200, 30, 30)).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def curl_example(base_url: str, auth: bool, image: Path | None) -> str:
    """A shell snippet that steers one image: the demo's circle-to-star example, or any model on a red square."""
    if image is not None:
        setup = f"IMG=$(base64 < {shlex.quote(str(image))} | tr -d '\\n')\n"
        ref, prompt, pin, claim = "$IMG", DEMO_PROMPT, DEMO_PIN, f"\n{DEMO_CLAIM}"
    else:
        setup, ref, prompt, claim = "", _generated_image_b64(), "Describe the image.", ""
        pin = {"latent": 0, "mode": "pin", "value": 20}
    body = json.dumps({"prompt": prompt, "image": f"data:image/png;base64,{ref}", "interventions": [pin],
                       "types": ["STEERED", "DEFAULT"], "max_tokens": 8})
    header = ' -H "Authorization: Bearer $VLM_STEER_KEY"' if auth else ""
    return (f"{setup}curl -s {base_url}/v1/steer -H 'Content-Type: application/json'{header} -d @- <<JSON\n"
            f"{body}\nJSON{claim}")


class _Stop(Exception):
    """Raised in the main thread by the SIGTERM/SIGINT handler: leave the serving loop and shut down."""


def _raise_stop(signum: int, _frame: FrameType | None) -> None:
    raise _Stop(signal.Signals(signum).name)


def _already_stopping(signum: int, _frame: FrameType | None) -> None:
    typer.echo(f"{signal.Signals(signum).name}: already shutting down", err=True)


def in_flight(app_name: str) -> int:
    """Requests the app's replicas are working on now, ingress included (asked of each replica actor).

    Ray Serve has no public call for this; replica actors are found by Serve's own naming
    (`SERVE_REPLICA::<app>#...` in the `serve` namespace) and asked `get_num_ongoing_requests`,
    the count Serve's autoscaler uses. tests/test_serve_shutdown.py pins the behaviour."""
    import ray
    from ray.serve._private.common import REPLICA_ID_FULL_ID_STR_PREFIX
    from ray.serve._private.constants import SERVE_NAMESPACE

    prefix = f"{REPLICA_ID_FULL_ID_STR_PREFIX}{app_name}#"
    replicas = [ray.get_actor(actor["name"], namespace=SERVE_NAMESPACE)
                for actor in ray.util.list_named_actors(all_namespaces=True)
                if actor["namespace"] == SERVE_NAMESPACE and actor["name"].startswith(prefix)]
    return sum(ray.get([replica.get_num_ongoing_requests.remote() for replica in replicas], timeout=10))


def drain(app_name: str, timeout_s: float, quiet_s: float = 1.0) -> bool:
    """Wait until no request has been in flight in the app for `quiet_s` (True), or `timeout_s` passed (False).

    Deleting the app alone is not enough: Serve stops all its deployments at once, so a request
    still at the ingress (say, uploading its body) would find the model deployment gone. The quiet
    period covers requests the HTTP proxy has accepted but not yet handed to a replica."""
    import ray

    deadline = time.monotonic() + timeout_s
    quiet_since = None
    while time.monotonic() < deadline:
        try:
            busy = in_flight(app_name) > 0
        except (ray.exceptions.RayError, ValueError) as exc:
            typer.echo(f"cannot count in-flight requests ({type(exc).__name__}); stopping without waiting", err=True)
            return False
        now = time.monotonic()
        quiet_since = None if busy else (quiet_since or now)
        if quiet_since is not None and now - quiet_since >= quiet_s:
            return True
        time.sleep(0.2)
    return False


def shut_down(app_name: str, drain_timeout_s: float) -> None:
    """Drain the app, delete it (replicas finish what they still hold), stop Serve, stop Ray."""
    import ray
    from ray import serve

    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, _already_stopping)
    try:
        if not drain(app_name, drain_timeout_s):
            typer.echo(f"requests still in flight after {drain_timeout_s:g} s; stopping anyway", err=True)
        serve.delete(app_name)
    finally:
        serve.shutdown()
        ray.shutdown()


def serve(
    host: Annotated[str, typer.Option(help="Address the HTTP proxy binds.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(envvar="PORT", help="HTTP port.")] = 8000,
    config: Annotated[
        Path | None, typer.Option(help="Settings YAML file (default: $VLM_STEER_CONFIG if it exists).")
    ] = None,
    num_cpus: Annotated[float | None, typer.Option(help="CPUs Ray may use (default: all).")] = None,
    ready_timeout_s: Annotated[float, typer.Option(help="How long to wait for the models to load.")] = 600.0,
    drain_timeout_s: Annotated[
        float, typer.Option(help="On SIGTERM/SIGINT, how long in-flight requests may take to finish.")
    ] = 30.0,
) -> None:
    """Start the steering service on this machine; SIGTERM or Ctrl-C drains it and stops Serve and Ray."""
    import ray
    from ray import serve as ray_serve

    try:
        settings = load_settings(config)
        checkpoints = resolve_checkpoints(settings)
        check_layers(checkpoints.saes, checkpoints.layers)
    except (ValueError, ValidationError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc
    note = "  <- a tiny RANDOM model: answers are meaningless" if checkpoints.random else ""
    typer.echo(f"model {settings.model.id}: {checkpoints.model}{note}")
    for sae_id, path in checkpoints.saes.items():
        typer.echo(f"SAE {sae_id}: {path}")
    ray.init(include_dashboard=False, num_cpus=None if num_cpus is None else int(max(1, num_cpus)),
             ignore_reinit_error=True)
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, _raise_stop)
    try:
        ray_serve.start(http_options={"host": host, "port": port})
        run_app(settings)
        shown_host = "127.0.0.1" if host in ("0.0.0.0", "::") else host
        base_url = f"http://{shown_host}:{port}{settings.route_prefix.rstrip('/')}"
        typer.echo(f"waiting for {base_url}/readyz ...")
        wait_ready(base_url, ready_timeout_s)
        typer.echo(f"ready: {base_url}  (API docs: {base_url}/docs, metrics: {base_url}/metrics)\n")
        typer.echo(curl_example(base_url, bool(settings.api_keys), demo_example_image(settings, checkpoints)))
        while True:
            time.sleep(3600)
    except _Stop as stop:
        typer.echo(f"{stop}: draining in-flight requests, then stopping Serve and Ray")
    finally:
        shut_down(settings.app_name, drain_timeout_s)
    typer.echo("stopped")
