"""`vlm-steer steer`: one image and prompt, answered with and without the requested latent edits."""

from __future__ import annotations

from pathlib import Path

import typer
from PIL import Image, UnidentifiedImageError
from pydantic import ValidationError
from rich.console import Console
from rich.table import Table

from sae_modules.formats.errors import CheckpointError
from sae_modules.intervention_spec import Intervention, InterventionError
from service.engine.loading import EngineLoadError, SAEMismatchError
from service.engine.types import SamplingParams, SteerSpec


def parse_edits(mode: str, items: list[str], tokens: str) -> list[Intervention]:
    """`LATENT=VALUE` strings into interventions; raises typer.BadParameter naming the option."""
    scope: str | list[int] = tokens if tokens in ("all", "cls", "patches") else _indices(tokens)
    edits = []
    for item in items:
        latent, sep, value = item.partition("=")
        try:
            if not sep:
                raise ValueError("expected LATENT=VALUE")
            edits.append(Intervention(latent=int(latent), mode=mode, value=float(value), tokens=scope))
        except (ValueError, ValidationError) as err:
            reason = err.errors()[0]["msg"] if isinstance(err, ValidationError) else str(err)
            raise typer.BadParameter(f"{item!r}: {reason}", param_hint=f"--{mode}") from None
    return edits


def _indices(tokens: str) -> list[int]:
    try:
        return [int(t) for t in tokens.split(",") if t.strip()]
    except ValueError:
        raise typer.BadParameter(f"{tokens!r}: use all, cls, patches or comma-separated token indices",
                                 param_hint="--tokens") from None


def _default_path(given: str | None, attribute: str, option: str) -> str:
    if given:
        return given
    from sae_modules import shapes

    path = getattr(shapes, attribute)
    if not Path(path).exists():
        raise typer.BadParameter(f"no {option} given and the demo checkpoint {path} is not built "
                                 "(run `make demo-model`)", param_hint=option)
    return str(path)


def _stats_table(result: dict) -> Table:
    stats = result["stats"]
    table = Table(title="Statistics")
    table.add_column("measure")
    table.add_column("value", justify="right")
    for name, value in (("L0 (unedited)", stats["l0"]), ("FVU (unedited)", stats["fvu"]),
                        ("embedding cosine", stats["embed_cosine"])):
        table.add_row(name, "-" if value is None else f"{value:.4f}")
    for change in stats["latents"]:
        table.add_row(f"latent {change['latent']} before → after", f"{change['before']:.3f} → {change['after']:.3f}")
    for name, seconds in result["timings_s"].items():
        table.add_row(name, f"{seconds:.3f}")
    return table


def steer(
    image: Path = typer.Option(..., "--image", exists=True, dir_okay=False, help="Image file to ask about."),
    prompt: str = typer.Option("What is in the image?", "--prompt", help="Question for the model."),
    model: str = typer.Option(None, "--model", help="LLaVA hub id or directory (default: the shipped demo model)."),
    sae: str = typer.Option(None, "--sae", help="SAE checkpoint directory or hub id (default: the demo SAE)."),
    pin: list[str] = typer.Option([], "--pin", help="LATENT=VALUE: set the latent to VALUE (the paper's clamp)."),
    nudge: list[str] = typer.Option([], "--nudge", help="LATENT=VALUE: add VALUE to the latent."),
    mul: list[str] = typer.Option([], "--mul", help="LATENT=VALUE: multiply the latent by VALUE."),
    tokens: str = typer.Option("all", "--tokens", help="Tokens to edit: all, cls, patches or indices like 0,3,4."),
    error_term: bool = typer.Option(False, "--error-term", help="Keep the SAE's error: edit = x + Δf·W_dec."),
    pre_zero: bool = typer.Option(False, "--pre-zero", help="Zero all latents before the edits."),
    max_tokens: int = typer.Option(64, "--max-tokens", min=1, help="Most tokens to generate."),
    temperature: float = typer.Option(0.0, "--temperature", min=0.0, help="0 is greedy."),
    seed: int = typer.Option(None, "--seed", help="Sampling seed."),
    device: str = typer.Option("cpu", "--device", help="cpu, cuda, cuda:1, ..."),
    dtype: str = typer.Option(None, "--dtype", help="fp32, fp16 or bf16 (default fp32 on CPU, fp16 on GPU)."),
) -> None:
    """Print the steered and the unsteered answers side by side, then the statistics."""
    from service.engine.engine import SteeringEngine

    edits = [*parse_edits("pin", pin, tokens), *parse_edits("nudge", nudge, tokens), *parse_edits("mul", mul, tokens)]
    model = _default_path(model, "DEMO_MODEL_DIR", "--model")
    sae = _default_path(sae, "DEMO_SAE_DIR", "--sae")
    console = Console()
    try:
        picture = Image.open(image)
        engine = SteeringEngine.load(model, {"sae": sae}, device=device, dtype=dtype)
        spec = SteerSpec(interventions=edits, use_error_term=error_term, pre_zero=pre_zero, want_default=True)
        result = engine.run(picture, prompt, spec, SamplingParams(max_tokens=max_tokens, temperature=temperature,
                                                                  seed=seed))
    except (UnidentifiedImageError, EngineLoadError, CheckpointError, SAEMismatchError, InterventionError) as err:
        console.print(f"[red]error:[/red] {err}")
        raise typer.Exit(1) from None
    answers = Table(title=f"{prompt}")
    answers.add_column("steered")
    answers.add_column("unsteered")
    answers.add_row(result["steered"]["text"], result["default"]["text"])
    console.print(answers)
    console.print(_stats_table(result))
