"""The cpu-demo overlay's serveConfigV2 deployed for real, the way KubeRay hands it to Serve (a deploy
config with `deployments:` overrides), on a local Ray with its metrics port open; then every metric
the Grafana dashboard and the alert rules name is checked against what the service (/metrics) and
Ray (its metrics port) actually export, plus vLLM's documented engine metrics as Ray re-exports them.

Only resources are scaled down to fit 2 CPUs; names, deployments and overrides are the overlay's.
"""

from __future__ import annotations

import base64
import copy
import json
import re
import time
from pathlib import Path

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.deploy_tools import ROOT, one, render
from tests.ray_app import free_port, local_ray

pytestmark = pytest.mark.slow

VLLM_DOCUMENTED = {
    # vLLM's documented Prometheus names (docs "Production Metrics"); Ray Serve's vLLM stat logger
    # re-exports `vllm:x` as Ray metric `vllm_x`, which Prometheus sees as `ray_vllm_x`.
    "vllm:num_requests_running",
    "vllm:num_requests_waiting",
    "vllm:generation_tokens_total",
    "vllm:time_to_first_token_seconds_bucket",
    "vllm:kv_cache_usage_perc",
}
VLLM_AS_RAY_EXPORTS = {"ray_" + re.sub(r"[^a-zA-Z0-9_]", "_", name) for name in VLLM_DOCUMENTED}
PROMQL_WORDS = {"sum", "avg", "min", "max", "count", "rate", "irate", "increase", "histogram_quantile",
                "clamp_min", "clamp_max", "absent", "absent_over_time", "last_over_time", "by", "without", "on",
                "ignoring", "group_left", "group_right", "and", "or", "unless", "offset", "bool"}
SCALED_CPUS = 0.25


def promql_selectors(expr: str) -> list[tuple[str, set[str]]]:
    """(metric name, label names it filters on) for every series selector in a PromQL expression."""
    expr = re.sub(r"\[[^\]]*\]", "", expr)
    expr = re.sub(r"\b(by|without|on|ignoring)\s*\([^)]*\)", "", expr)
    found = []
    for match in re.finditer(r"(?<![\w.$\"])([a-zA-Z_:][a-zA-Z0-9_:]*)\s*(\{[^}]*\})?\s*(\()?", expr):
        name, matchers, call = match.groups()
        if call or name in PROMQL_WORDS:
            continue
        found.append((name, set(re.findall(r"([a-zA-Z_]\w*)\s*[=!]~?", matchers or ""))))
    return found


def test_selector_parser_reads_names_labels_and_skips_functions() -> None:
    expr = ('histogram_quantile(0.95, sum by (le) (rate(x_bucket{application="a", le!="1"}[5m]))) > 1e-9 '
            'or absent(y{deployment=~"D"}) unless on() z')
    assert promql_selectors(expr) == [("x_bucket", {"application", "le"}), ("y", {"deployment"}), ("z", set())]


def dashboard_exprs() -> list[str]:
    def panels(node: dict):
        for panel in node.get("panels", []):
            yield panel
            yield from panels(panel)

    board = json.loads((ROOT / "deploy" / "grafana" / "vlm-steer-dashboard.json").read_text())
    return [t["expr"] for p in panels(board) for t in p.get("targets", []) if t.get("expr")]


def rule_exprs() -> list[str]:
    rules = yaml.safe_load((ROOT / "deploy" / "prometheus" / "alert_rules.yaml").read_text())
    return [r["expr"] for g in rules["groups"] for r in g["rules"]]


def scrape(url: str) -> dict[str, list[dict[str, str]]]:
    """Sample name -> label sets, from a Prometheus text exposition."""
    samples: dict[str, list[dict[str, str]]] = {}
    for family in text_string_to_metric_families(httpx.get(url, timeout=10).text):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append(dict(sample.labels))
    return samples


def demo_serve_config(tmp_path: Path, port: int) -> dict:
    """The cpu-demo serveConfigV2 with its ConfigMap written to a temp file and CPUs scaled down."""
    docs = render("cpu-demo")
    config = yaml.safe_load(one(docs, "RayService")["spec"]["serveConfigV2"])
    settings_file = tmp_path / "config.yaml"
    settings_file.write_text(one(docs, "ConfigMap", "vlm-steer-config")["data"]["config.yaml"])
    config = copy.deepcopy(config)
    config["http_options"] = {**config.get("http_options", {}), "host": "127.0.0.1", "port": port}
    (app,) = config["applications"]
    assert app["args"]["config_file"] == "/etc/vlm-steer/config.yaml"
    app["args"]["config_file"] = str(settings_file)
    for deployment in ("ingress", "steerer"):
        app["args"][deployment]["num_cpus"] = SCALED_CPUS
    return config


@pytest.fixture(scope="module")
def deployed(tmp_path_factory: pytest.TempPathFactory, monkeypatch_module):
    from ray import serve
    from ray.serve.context import _get_global_client
    from ray.serve.schema import ServeDeploySchema

    from service.serve_cli import wait_ready

    monkeypatch_module.delenv("VLM_STEER_API_KEYS", raising=False)
    monkeypatch_module.delenv("VLM_STEER_CONFIG", raising=False)
    metrics_port, port = free_port(), free_port()
    config = demo_serve_config(tmp_path_factory.mktemp("deploy_metrics"), port)
    with local_ray(num_cpus=2, metrics_export_port=metrics_port):
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        try:
            client = _get_global_client()
            client.deploy_apps(ServeDeploySchema.model_validate(config), _blocking=False)
            base = f"http://127.0.0.1:{port}"
            wait_ready(base, 300)
            yield {"base": base, "ray_metrics": f"http://127.0.0.1:{metrics_port}/metrics", "client": client,
                   "config": config}
        finally:
            serve.shutdown()


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as patch:
        yield patch


def exercise(base: str) -> None:
    """A steered request (stage timings, SAE stats), a 422 and a 404, so every labelled series exists."""
    image = base64.b64encode((ROOT / "examples" / "red_circle.png").read_bytes()).decode()
    body = {"prompt": "What shape is this?", "image": f"data:image/png;base64,{image}", "max_tokens": 4,
            "interventions": [{"latent": 11, "mode": "pin", "value": 60.0, "tokens": "all"}]}
    with httpx.Client(base_url=base, timeout=120) as http:
        assert http.post("/v1/steer", json=body).status_code == 200
        assert http.post("/v1/steer", json={"prompt": 3}).status_code == 422
        http.get("/v1/no-such-route")


def test_serve_applied_the_overlays_deployment_overrides(deployed: dict) -> None:
    """Serve took `deployments:` as KubeRay would pass it: 2 ingress replicas, autoscaling with delays."""
    details = deployed["client"].get_serve_details()
    (app,) = deployed["config"]["applications"]
    live = details["applications"][app["name"]]["deployments"]
    assert set(live) == {"Ingress", "SteerGenerate"}
    for override in app["deployments"]:
        applied = live[override["name"]]["deployment_config"]
        assert applied["graceful_shutdown_timeout_s"] == override["graceful_shutdown_timeout_s"]
        if "autoscaling_config" in override:
            assert applied["max_ongoing_requests"] == override["max_ongoing_requests"]
            for key, value in override["autoscaling_config"].items():
                assert applied["autoscaling_config"][key] == value, key
    assert live["Ingress"]["deployment_config"]["num_replicas"] == app["args"]["ingress"]["num_replicas"] >= 2


def test_every_dashboard_and_alert_metric_is_exported(deployed: dict) -> None:
    exercise(deployed["base"])
    wanted = [s for expr in dashboard_exprs() + rule_exprs() for s in promql_selectors(expr)]
    assert len({name for name, _ in wanted}) >= 15
    vllm = [(name, labels) for name, labels in wanted if name.startswith("ray_vllm_")]
    assert {name for name, _ in vllm} <= VLLM_AS_RAY_EXPORTS, "a vLLM metric that vLLM does not document"
    live = [(name, labels) for name, labels in wanted if not name.startswith("ray_vllm_")]

    exported: dict[str, list[dict[str, str]]] = {}
    missing: list[str] = []
    deadline = time.monotonic() + 120  # Ray reports metrics every few seconds; each ingress replica has its own registry
    while time.monotonic() < deadline:
        for url in (f"{deployed['base']}/metrics", deployed["ray_metrics"]):
            for name, label_sets in scrape(url).items():
                exported.setdefault(name, []).extend(label_sets)
        missing = [f"{name}{sorted(labels)}" for name, labels in live
                   if not any(labels <= set(label_set) for label_set in exported.get(name, []))]
        outcomes = {s.get("outcome") for s in exported.get("steer_requests_total", [])
                    if s.get("endpoint") == "/v1/steer"}
        if not missing and {"ok", "invalid_request_error"} <= outcomes:
            break
        time.sleep(3)
    assert not missing, f"named in the dashboard or rules but not exported: {sorted(set(missing))}"
    assert {"ok", "invalid_request_error"} <= outcomes, "a 422 is counted as outcome=invalid_request_error"
