"""The playground's latent dictionary in headless Chromium against the real service (shipped demo model and SAE):
search "red", pin the latent found at the default relative value, steer a green triangle, read "red".
The page's screenshot lands in test-artifacts/latent_search.png."""

from __future__ import annotations

import math

import pytest

from sae_modules.evaluation.latent_labels import load_latent_labels
from sae_modules.evaluation.latent_stats import load_latent_stats
from sae_modules.shapes import DEMO_SAE_DIR
from service.config import ServiceSettings
from service.serve_cli import run_app, wait_ready
from service.ui import CHECKOUT_EXAMPLES_DIR
from tests.ray_app import local_serve
from tests.test_ui import ARTIFACTS, CHROMIUM, CHROMIUM_ARGS

REPLICA = {"num_cpus": 0.25}
EXAMPLE = "green_triangle"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not CHROMIUM.exists(), reason=f"Chromium is not installed at {CHROMIUM} (make chromium)"),
]


@pytest.fixture(scope="module")
def base():
    assert (CHECKOUT_EXAMPLES_DIR / f"{EXAMPLE}.png").is_file()
    settings = ServiceSettings(ingress=REPLICA, steerer=REPLICA, batching={"max_batch_size": 2,
                                                                           "batch_wait_timeout_s": 0.0})
    with local_serve() as url:
        run_app(settings)
        wait_ready(url, 240)
        yield url


@pytest.fixture
def page():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1280, "height": 1000})
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        yield page
        browser.close()
        assert errors == [], errors


def test_search_red_pin_it_and_the_green_triangle_turns_red(base: str, page) -> None:
    stats, labels = load_latent_stats(DEMO_SAE_DIR), load_latent_labels(DEMO_SAE_DIR).by_latent()
    page.goto(f"{base}/ui")
    page.wait_for_selector("body[data-ready='1']")
    page.wait_for_function("document.querySelectorAll('#sae option').length > 0")
    page.fill("#latent-query", "red")
    page.click("#latent-search")
    page.wait_for_function("document.querySelectorAll('#latent-results li').length > 0")
    first = page.locator("#latent-results li").first
    latent = int(first.get_attribute("data-latent"))
    assert labels[latent].label == "red"
    assert first.locator(".latent-label").text_content().startswith("red (")

    first.locator("button.pin").click()
    row = page.locator("#interventions .intervention").last
    assert row.locator(".latent").input_value() == str(latent)
    assert row.locator(".unit").input_value() == "max" and row.locator(".value").input_value() == "5"
    page.wait_for_function("document.querySelector('#interventions .intervention:last-child .range-hint')"
                           ".textContent.startsWith('red')")
    assert row.locator(".value-slider").get_attribute("max") == "10"   # relative units: 0..10 x the figure
    row.locator(".unit").select_option("raw")
    expected = str(math.ceil(10 * float(stats.max[latent])))            # raw: up to 10 x its max
    page.wait_for_function(f"document.querySelector('#interventions .intervention:last-child .value-slider')"
                           f".max === '{expected}'")
    row.locator(".unit").select_option("max")

    page.click(f"#examples button[data-name='{EXAMPLE}']")
    page.wait_for_function("document.querySelectorAll('#latents li .latent-label').length > 0")
    page.fill("#prompt", "What color is the shape?")
    with page.expect_request(lambda r: r.url.endswith("/v1/steer") and r.method == "POST") as sent:
        page.click("#run")
    page.wait_for_function("document.querySelector('#metrics').rows.length > 0 || "
                           "!document.querySelector('#error').hidden")
    assert sent.value.post_data_json["interventions"] == [
        {"latent": latent, "mode": "pin", "value": 5, "unit": "max", "tokens": "all"}]
    assert page.is_hidden("#error"), page.text_content("#error")
    assert page.text_content("#out-steered").strip() == "red"
    assert page.text_content("#out-default").strip() == "green"
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "latent_search.png"), full_page=True)
