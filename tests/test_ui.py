"""The /ui playground driven in headless Chromium against the real service on a local Ray.

One keyed app (API key on, under a route prefix) serves every test here: the key gate, a full steering
round trip whose shown request, curl and Python snippets are checked against the real API, and
an API error shown in the API's own words. The page's screenshot lands in test-artifacts/ui.png.
"""

from __future__ import annotations

import ast
import base64
import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from PIL import Image

from sae_modules.evaluation.browser.site import LatentCard, write_site
from sae_modules.shapes.world import write_examples
from service.config import ServiceSettings
from service.serve_cli import run_app, wait_ready
from service.ui import CHECKOUT_EXAMPLES_DIR, IMAGE_SUFFIXES
from tests.ray_app import local_serve
from tests.service_fixtures import N_LATENTS, write_tiny_sae

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
KEY = "ui-test-key"
REPLICA = {"num_cpus": 0.25}
LIMITS = {"max_tokens": 16, "max_interventions": 4, "value_bound": 1000.0, "max_top_k": 64}
PREFIX = "/playground"
"""The page must work below a Ray Serve route prefix, so the app is served under one."""
ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"

pytestmark = [pytest.mark.slow, pytest.mark.skipif(
    not CHROMIUM.exists() and os.environ.get("CI") != "true",  # in CI the README's playground must be tested: fail
    reason=f"Chromium is not installed at {CHROMIUM} (make chromium)",
)]


def _examples(tmp: Path) -> tuple[Path | None, list[Path]]:
    """The `ui_examples_dir` setting and its images: the checkout's shipped examples through the default (None)
    when they exist, else the same set written by the shapes world."""
    if CHECKOUT_EXAMPLES_DIR.is_dir():
        shipped = sorted(p for p in CHECKOUT_EXAMPLES_DIR.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if shipped:
            return None, shipped
    return tmp / "examples", sorted(write_examples(tmp / "examples"))


def _report(tmp: Path, examples: list[Path]) -> Path:
    """A latent browser for every latent of the tiny SAE, inside an evaluate-style output folder."""
    cards = [LatentCard(latent=k, level="level 0", ms=0.5, density=0.1, max=10.0) for k in range(N_LATENTS)]
    top = {k: [k % len(examples), (k + 1) % len(examples)] for k in range(N_LATENTS)}
    write_site(
        tmp / "report" / "browser",
        cards,
        top,
        lambda i: Image.open(examples[i]),
        title="tiny",
        summary="test report",
        thumb=32,
    )
    return tmp / "report"


@pytest.fixture(scope="module")
def app(tiny_llava_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    tmp = tmp_path_factory.mktemp("ui")
    examples_dir, examples = _examples(tmp)
    settings = ServiceSettings(
        model={"id": "tiny", "path": str(tiny_llava_dir)},
        saes={"a": {"path": str(write_tiny_sae(tmp / "sae"))}},
        api_keys=[KEY],
        limits=LIMITS,
        ingress=REPLICA,
        steerer=REPLICA,
        batching={"max_batch_size": 1, "batch_wait_timeout_s": 0.0},
        ui_examples_dir=examples_dir,
        report_dir=_report(tmp, examples),
        app_name="playground",
        route_prefix=PREFIX,
    )
    with local_serve() as base:
        run_app(settings)
        wait_ready(base + PREFIX, 240)
        yield {"base": base + PREFIX, "examples": [p.stem for p in examples], "paths": examples}


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    yield page
    context.close()
    assert errors == [], errors


def _open(page, base: str, query: str = "", key: str | None = KEY) -> None:
    page.goto(f"{base}/ui{query}")
    page.wait_for_selector("body[data-ready='1']")
    if key is not None:
        page.fill("#api-key", key)
        page.press("#api-key", "Tab")
        page.wait_for_function("document.querySelectorAll('#sae option').length > 0")


def _pick_example(page, name: str) -> None:
    page.click(f"#examples button[data-name='{name}']")
    page.wait_for_function("document.querySelectorAll('#latents li').length > 0")


def _run(page) -> dict:
    """Click Run; the body the browser really sent."""
    with page.expect_request(lambda r: r.url.endswith("/v1/steer") and r.method == "POST") as sent:
        page.click("#run")
    page.wait_for_function(
        "document.querySelector('#metrics').rows.length > 0 || !document.querySelector('#error').hidden"
    )
    return sent.value.post_data_json


def _api_error(response: httpx.Response) -> str:
    """An error as the page words it: status, the API's type and message, and the field."""
    error = response.json()["error"]
    return f"{response.status_code} {error['type']}: {error['message']}" + (
        f" (param {error['param']})" if error["param"] else ""
    )


def test_key_gate_shows_the_401_then_works_and_the_latent_link_pre_adds_a_pin(app, page) -> None:
    base = app["base"]
    _open(page, base, "?latent=7", key=None)
    assert page.url == f"{base}/ui/?latent=7"
    refused = httpx.get(f"{base}/v1/saes")
    assert page.text_content("#error") == _api_error(refused) + " — enter the API key at the top."
    assert page.locator("#sae option").count() == 0
    assert page.input_value("#interventions .latent") == "7"
    assert page.input_value("#interventions .mode") == "pin"
    page.fill("#api-key", KEY)
    page.press("#api-key", "Tab")
    page.wait_for_function("document.querySelectorAll('#sae option').length === 1")
    assert page.is_hidden("#error")
    assert page.input_value("#sae") == "a"


def test_steer_round_trip_shows_both_answers_metrics_and_the_request_sent(app, page) -> None:
    base = app["base"]
    _open(page, base)
    assert (
        sorted(page.eval_on_selector_all("#examples button", "bs => bs.map(b => b.dataset.name)"))
        == app["examples"]
    )
    _pick_example(page, app["examples"][0])
    page.wait_for_function("[...document.querySelectorAll('#latents img.tops')].every(i => i.complete)")
    grids = page.eval_on_selector_all("#latents img.tops", "imgs => imgs.map(i => [i.naturalWidth, i.src])")
    assert grids and all(width > 0 and "/ui/report/grids/latent-" in src for width, src in grids)

    first = page.locator("#latents li").first
    latent = int(first.get_attribute("data-latent"))
    first.locator("button.pin").click()
    row = page.locator("#interventions .intervention").last
    assert row.locator(".latent").input_value() == str(latent)
    assert row.locator(".value").input_value() == "20"  # twice the report's max of 10
    row.locator(".value").fill("60")
    page.check("input[name=edit-mode][value=error]")
    sent = _run(page)

    shown = json.loads(page.text_content("#request-code"))
    assert sent.pop("stream") is True, "the page streams its answers"
    assert shown == sent
    assert sent["interventions"] == [{"latent": latent, "mode": "pin", "value": 60, "tokens": "all"}]
    assert sent["use_error_term"] is True and sent["types"] == ["STEERED", "DEFAULT"] and sent["sae"] == "a"
    steered, default = page.text_content("#out-steered"), page.text_content("#out-default")

    page.click(".tabs button[data-tab=python]")
    env = {**os.environ, "VLM_STEER_KEY": KEY}
    python = subprocess.run(
        [sys.executable, "-c", page.text_content("#request-code")],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
        env=env,
    )
    answer = ast.literal_eval(python.stdout)
    texts = {o["type"]: o["text"] for o in answer["outputs"]}
    assert texts == {"STEERED": steered, "DEFAULT": default}

    page.click(".tabs button[data-tab=curl]")
    curl = subprocess.run(
        ["bash", "-c", page.text_content("#request-code")],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
        env=env,
    )
    assert {o["type"]: o["text"] for o in json.loads(curl.stdout)["outputs"]} == texts

    metrics = dict(
        zip(
            page.eval_on_selector_all("#metrics th", "c => c.map(x => x.textContent)"),
            page.eval_on_selector_all("#metrics td", "c => c.map(x => x.textContent)"),
        )
    )
    change = answer["metrics"]["sae"]["latents"][0]
    assert change["latent"] == latent and change["after"] == pytest.approx(60.0)
    assert metrics[f"latent {latent} before → after"] == f"{change['before']:.3f} → {change['after']:.3f}"
    assert metrics["L0 (active latents per token)"] == f"{answer['metrics']['sae']['l0']:.2f}"
    assert metrics["FVU"] == f"{answer['metrics']['sae']['fvu']:.4f}"
    assert set(answer["metrics"]["timings_s"]) == {
        k.removesuffix(" time") for k in metrics if k.endswith(" time")
    }

    page.click(".tabs button[data-tab=json]")
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "ui.png"), full_page=True)


def test_an_uploaded_image_is_sent_as_is_and_an_api_error_is_shown_as_the_api_words_it(app, page) -> None:
    base = app["base"]
    _open(page, base)
    upload = app["paths"][-1]
    page.set_input_files("#file", str(upload))
    page.wait_for_function("document.querySelectorAll('#latents li').length > 0")
    page.click("#add-intervention")
    page.fill("#interventions .latent", str(N_LATENTS + 935))
    sent = _run(page)
    del sent["stream"]
    assert sent["image"] == "data:image/png;base64," + base64.b64encode(upload.read_bytes()).decode()
    refused = httpx.post(
        f"{base}/v1/steer", json=sent, headers={"Authorization": f"Bearer {KEY}"}, timeout=60
    )
    assert refused.status_code == 422
    assert (
        refused.json()["error"]["message"]
        == f"latent {N_LATENTS + 935} is out of range: the SAE has 64 latents"
    )
    assert page.text_content("#error") == _api_error(refused)
    assert page.text_content("#out-steered") == "—" and page.locator("#metrics tr").count() == 0
