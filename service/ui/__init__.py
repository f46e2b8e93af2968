"""The browser playground at /ui: static files shipped in the package, the example images, and
(when configured) the latent browser's site, so each active latent shows its top images.

Everything here is public and read-only: the page holds no secret and speaks to the API with the
key the user types, so the guard leaves `/ui` open while `/v1/` stays protected. Both folders are
operator settings, never request input; StaticFiles refuses paths that climb out of them.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import FileResponse, RedirectResponse
from fastapi.staticfiles import StaticFiles

from service.config import ConfigError

STATIC_DIR = Path(__file__).parent / "static"
CHECKOUT_EXAMPLES_DIR = Path(__file__).resolve().parents[2] / "examples"
"""`examples/` at the root of a source checkout: the shipped example images (absent from a wheel)."""
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp"}
BROWSER_SUBDIR = "browser"
"""Where `vlm-steer evaluate` puts the latent browser inside its output folder."""


def _folder(path: Path | None, setting: str) -> Path | None:
    if path is None:
        return None
    if not path.is_dir():
        raise ConfigError(f"{setting}: {path} is not a directory")
    return path


def browser_dir(report_dir: Path) -> Path:
    """The latent browser's folder: `report_dir` itself, or its `browser/` when given an evaluate output."""
    nested = report_dir / BROWSER_SUBDIR
    return nested if nested.is_dir() else report_dir


def mount_ui(app: FastAPI, examples_dir: Path | None, report_dir: Path | None) -> None:
    """Serve the playground; `examples_dir` None means the checkout's `examples/` when there is one."""
    examples = _folder(examples_dir, "ui_examples_dir")
    if examples is None and CHECKOUT_EXAMPLES_DIR.is_dir():
        examples = CHECKOUT_EXAMPLES_DIR
    report = _folder(report_dir, "report_dir")

    @app.get("/ui", include_in_schema=False)
    def ui_root(request: Request) -> RedirectResponse:
        # Relative, so it keeps a Ray Serve route prefix; the query carries ?latent=K from the browser.
        query = request.url.query
        return RedirectResponse("ui/" + (f"?{query}" if query else ""))

    def example_names() -> list[str]:
        """The example images, read on each call so files added while serving appear."""
        if examples is None:
            return []
        return sorted(p.name for p in examples.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)

    @app.get("/ui/examples.json", include_in_schema=False)
    def ui_examples() -> list[dict[str, str]]:
        return [{"name": Path(name).stem, "url": f"examples/{name}"} for name in example_names()]

    @app.get("/ui/examples/{name}", include_in_schema=False)
    def ui_example(name: str) -> FileResponse:
        """Only the listed images: other files in the folder (notes, subfolders) are not served."""
        if name not in example_names():
            raise HTTPException(404, "no such example image")
        return FileResponse(examples / name)

    if report is not None:
        app.mount("/ui/report", StaticFiles(directory=browser_dir(report)), name="ui-report")
    app.mount("/ui", StaticFiles(directory=STATIC_DIR, html=True), name="ui")
