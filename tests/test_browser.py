"""The latent browser renders offline in headless Chromium, with every grid image loaded."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from PIL import Image

from sae_modules.evaluation.browser.site import LatentCard, write_site
from sae_modules.evaluation.errors import EvaluationError

CHROMIUM = "/usr/bin/chromium"


def _site(tmp_path: Path, service_url: str | None = "http://127.0.0.1:8000") -> Path:
    colours = ["red", "green", "blue", "yellow", "purple", "orange"]
    cards = [
        LatentCard(latent=3, level="level 0", ms=0.9, density=0.1, max=2.0, depth=2.5),
        LatentCard(latent=7, level="level 1", ms=0.2, density=0.5, max=1.0),
        LatentCard(latent=9, level="level 1", ms=None, density=0.0, max=0.0),
    ]
    top = {3: [0, 1, 2, 3], 7: [4, 5], 9: [0]}
    return write_site(tmp_path / "site", cards, top, lambda i: Image.new("RGB", (20, 20), colours[i]),
                      title="tiny </script> SAE", summary="3 latents", service_url=service_url)


def test_site_files_and_inlined_data(tmp_path):
    index = _site(tmp_path)
    html = index.read_text()
    assert "tiny &lt;/script&gt; SAE" in html
    blob = html.split('<script id="data" type="application/json">')[1].split("</script>")[0]
    data = json.loads(blob)
    assert [c["latent"] for c in data["latents"]] == [3, 7, 9]
    assert data["latents"][0]["grid"] == "grids/latent-000003.png"
    with Image.open(index.parent / data["latents"][0]["grid"]) as grid:
        assert grid.size == (128, 128)                     # 4 images -> 2 x 2 thumbnails of 64 px
    assert (index.parent / "app.js").exists() and (index.parent / "style.css").exists()
    assert "http" not in (index.parent / "app.js").read_text().replace("data.meta.service_url", "")


def test_bad_service_url_is_refused(tmp_path):
    with pytest.raises(EvaluationError) as err:
        _site(tmp_path, service_url="javascript:alert(1)")
    assert err.value.field == "service_url"


@pytest.mark.skipif(not Path(CHROMIUM).exists() or shutil.which("chromium") is None,
                    reason="Debian chromium is not installed (make chromium)")
def test_renders_in_headless_chromium_with_images_loaded_and_filters(tmp_path):
    from playwright.sync_api import sync_playwright

    index = _site(tmp_path)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"])
        try:
            page = browser.new_page()
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(index.as_uri())
            page.wait_for_function("document.querySelectorAll('article.card').length === 3")
            page.wait_for_function("Array.from(document.images).every(i => i.complete)")
            widths = page.eval_on_selector_all("img", "imgs => imgs.map(i => i.naturalWidth)")
            assert len(widths) == 3 and all(w > 0 for w in widths)
            assert page.eval_on_selector_all("article.card h2", "hs => hs.map(h => h.textContent)") == [
                "Latent 3", "Latent 7", "Latent 9"]
            links = page.eval_on_selector_all("article.card a", "as => as.map(a => a.href)")
            assert links[0] == "http://127.0.0.1:8000/ui?latent=3"
            page.fill("#ms-min", "0.5")
            page.wait_for_function("document.querySelectorAll('article.card').length === 2")
            page.uncheck("#unscored")
            page.wait_for_function("document.querySelectorAll('article.card').length === 1")
            page.fill("#ms-min", "-1")
            page.select_option("#level", "level 1")
            page.wait_for_function("document.querySelectorAll('article.card').length === 1")
            assert page.text_content("#count") == "1 of 3 latents"
            assert errors == []
        finally:
            browser.close()
