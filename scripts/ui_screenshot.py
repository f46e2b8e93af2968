"""Regenerate docs/ui.png: start `vlm-steer serve` (the shipped demo, or whatever VLM_STEER_* / --config name),
open /ui in headless Chromium, pick an example, pin a latent (by default its strongest), run, and save the page.

    .venv/bin/python scripts/ui_screenshot.py [--out docs/ui.png] [--config settings.yaml] [--report EVAL_OUT] \
        [--example blue_square] [--prompt "What color is the shape?"] [--pin 28=40]

The PNG is quantised to 256 colours so the committed file stays small.
"""

from __future__ import annotations

import argparse
import io
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

from PIL import Image
from playwright.sync_api import sync_playwright

from sae_modules.atomic_file import atomic_write_bytes
from service.serve_cli import wait_ready

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def capture(base: str, out: Path, example: str | None, prompt: str | None, pin: tuple[int, float] | None) -> None:
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1280, "height": 1000})
        page.goto(f"{base}/ui")
        page.wait_for_selector("body[data-ready='1']")
        page.click(f"#examples button[data-name='{example}']" if example else "#examples button")
        page.wait_for_function("document.querySelectorAll('#latents li').length > 0")
        if pin is None:
            page.click("#latents li button.pin")
        else:
            page.click("#add-intervention")
            page.fill("#interventions .latent", str(pin[0]))
            page.fill("#interventions .value", f"{pin[1]:g}")
        if prompt is not None:
            page.fill("#prompt", prompt)
        page.click("#run")
        page.wait_for_function("document.querySelector('#metrics').rows.length > 0 || "
                               "!document.querySelector('#error').hidden", timeout=300_000)
        raw = out.with_suffix(".raw.png")
        page.screenshot(path=str(raw), full_page=True)
        browser.close()
    with Image.open(raw) as image:
        small = image.convert("RGB").quantize(256)
    png = io.BytesIO()
    small.save(png, format="PNG", optimize=True)
    atomic_write_bytes(out, png.getvalue())
    raw.unlink()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("docs/ui.png"))
    parser.add_argument("--config", type=Path, help="Settings YAML for vlm-steer serve.")
    parser.add_argument("--report", type=Path, help="A `vlm-steer evaluate` output, shown beside the latents.")
    parser.add_argument("--example", help="Example image name (default: the first).")
    parser.add_argument("--prompt", help="Prompt (default: the page's).")
    parser.add_argument("--pin", help="LATENT=VALUE to pin (default: the image's strongest latent, suggested value).")
    args = parser.parse_args()
    port = free_port()
    env = dict(os.environ)
    if args.report is not None:
        env["VLM_STEER_REPORT_DIR"] = str(args.report.resolve())
    command = [str(Path(sys.executable).parent / "vlm-steer"), "serve", "--port", str(port)]
    if args.config is not None:
        command += ["--config", str(args.config)]
    server = subprocess.Popen(command, env=env, start_new_session=True)
    try:
        base = f"http://127.0.0.1:{port}"
        wait_ready(base, 600)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        pin = None
        if args.pin is not None:
            latent, _, value = args.pin.partition("=")
            pin = (int(latent), float(value))
        capture(base, args.out, args.example, args.prompt, pin)
        print(f"wrote {args.out} ({args.out.stat().st_size} bytes)")
    finally:
        os.killpg(server.pid, signal.SIGINT)
        try:
            server.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()


if __name__ == "__main__":
    main()
