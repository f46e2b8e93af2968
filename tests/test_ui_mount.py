"""The /ui routes on a bare FastAPI app: examples, the report mount, the redirect, no CDN, bad settings."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from PIL import Image

from sae_modules.evaluation.browser.site import LatentCard, write_site
from service.config import ConfigError, ServiceSettings
from service.ui import STATIC_DIR, mount_ui


def _client(examples: Path | None, report: Path | None) -> TestClient:
    app = FastAPI()
    mount_ui(app, examples, report)
    return TestClient(app)


@pytest.fixture
def examples(tmp_path: Path) -> Path:
    folder = tmp_path / "examples"
    folder.mkdir()
    Image.new("RGB", (8, 8), "red").save(folder / "b_red.png")
    Image.new("RGB", (8, 8), "blue").save(folder / "a_blue.JPG", format="JPEG")
    (folder / "notes.txt").write_text("not an image")
    (folder / "sub.png").mkdir()
    return folder


def test_examples_are_listed_and_served_and_nothing_else(examples: Path) -> None:
    client = _client(examples, None)
    listed = client.get("/ui/examples.json").json()
    assert listed == [
        {"name": "a_blue", "url": "examples/a_blue.JPG"},
        {"name": "b_red", "url": "examples/b_red.png"},
    ]
    served = client.get("/ui/" + listed[1]["url"])
    assert served.status_code == 200 and served.content == (examples / "b_red.png").read_bytes()
    assert client.get("/ui/examples/..%2f..%2fetc%2fpasswd").status_code == 404
    assert client.get("/ui/examples/missing.png").status_code == 404
    assert client.get("/ui/examples/notes.txt").status_code == 404
    assert client.get("/ui/examples/sub.png").status_code == 404
    (examples / "c_new.png").write_bytes((examples / "b_red.png").read_bytes())
    assert [e["name"] for e in client.get("/ui/examples.json").json()] == ["a_blue", "b_red", "c_new"]


def test_redirect_is_relative_and_keeps_the_latent_query(examples: Path) -> None:
    client = _client(examples, None)
    bare = client.get("/ui", follow_redirects=False)
    assert bare.status_code == 307 and bare.headers["location"] == "ui/"
    linked = client.get("/ui?latent=39", follow_redirects=False)
    assert linked.headers["location"] == "ui/?latent=39"
    page = client.get("/ui?latent=39")
    assert (
        page.status_code == 200
        and str(page.url).endswith("/ui/?latent=39")
        and '<script src="app.js">' in page.text
    )


def test_static_files_fetch_nothing_from_outside_and_use_relative_urls() -> None:
    for name in ("index.html", "app.js", "style.css"):
        text = (STATIC_DIR / name).read_text()
        assert not re.search(r"https?://|//cdn|@import", text), name
    app_js = (STATIC_DIR / "app.js").read_text()
    assert not re.search(r"""["'`]/(v1|ui)/""", app_js), "absolute paths break under a route prefix"


def test_report_mount_serves_the_browser_data_from_an_evaluate_output(tmp_path: Path) -> None:
    cards = [LatentCard(latent=5, level="level 0", ms=0.7, density=0.2, max=3.0)]
    write_site(
        tmp_path / "out" / "browser",
        cards,
        {5: [0]},
        lambda i: Image.new("RGB", (4, 4)),
        title="t",
        summary="s",
        thumb=8,
    )
    for configured in (tmp_path / "out", tmp_path / "out" / "browser"):
        client = _client(None, configured)
        data = client.get("/ui/report/latents.json").json()
        assert [(c["latent"], c["grid"]) for c in data["latents"]] == [(5, "grids/latent-000005.png")]
        assert client.get("/ui/report/" + data["latents"][0]["grid"]).headers["content-type"] == "image/png"
    assert _client(None, None).get("/ui/report/latents.json").status_code == 404


def test_missing_folders_are_refused_naming_the_setting(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="ui_examples_dir"):
        _client(tmp_path / "nope", None)
    with pytest.raises(ConfigError, match="report_dir"):
        _client(None, tmp_path / "nope")


def test_settings_take_the_folders_from_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("VLM_STEER_REPORT_DIR", str(tmp_path))
    monkeypatch.setenv("VLM_STEER_UI_EXAMPLES_DIR", str(tmp_path / "ex"))
    settings = ServiceSettings()
    assert settings.report_dir == tmp_path and settings.ui_examples_dir == tmp_path / "ex"
