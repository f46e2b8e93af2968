"""The browser playground at /ui: static files shipped in the package, the example images, and
(when configured) the latent browser's report, so top images appear beside latents."""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI, HTTPException
from fastapi.responses import FileResponse, RedirectResponse
from fastapi.staticfiles import StaticFiles

STATIC_DIR = Path(__file__).parent / "static"
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp"}


def mount_ui(app: FastAPI, examples_dir: Path | None, report_dir: Path | None) -> None:
    """Serve the playground. Neither folder comes from a request: both are operator settings."""
    examples = sorted(p for p in examples_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES) if examples_dir else []
    by_name = {p.name: p for p in examples}

    @app.get("/ui", include_in_schema=False)
    def ui_root() -> RedirectResponse:
        return RedirectResponse("/ui/")

    @app.get("/ui/examples.json", include_in_schema=False)
    def ui_examples() -> list[dict[str, str]]:
        return [{"name": p.stem, "url": f"/ui/examples/{p.name}"} for p in examples]

    @app.get("/ui/examples/{name}", include_in_schema=False)
    def ui_example(name: str) -> FileResponse:
        if name not in by_name:
            raise HTTPException(404, f"no example image named {name!r}")
        return FileResponse(by_name[name])

    if report_dir is not None and report_dir.is_dir():
        app.mount("/ui/report", StaticFiles(directory=report_dir), name="ui-report")
    app.mount("/ui/", StaticFiles(directory=STATIC_DIR, html=True), name="ui")
