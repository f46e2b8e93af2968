"""`vlm-steer steer`: one image and prompt, answered with and without the requested latent edits."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from PIL import Image, UnidentifiedImageError
from pydantic import ValidationError
from rich.console import Console
from rich.table import Table

from sae_modules.cli_errors import EXIT_CODES, fail, reported_errors
from sae_modules.errors import ErrorKind
from sae_modules.intervention_spec import Intervention
from service.engine.types import SamplingParams, SteerResult, SteerSpec


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


def _stats_table(result: SteerResult) -> Table:
    metrics = result.metrics
    table = Table(title="Statistics")
    table.add_column("measure")
    table.add_column("value", justify="right")
    for name, value in (("L0 (unedited)", metrics.sae.l0), ("FVU (unedited)", metrics.sae.fvu),
                        ("embedding cosine", metrics.embed_cosine)):
        table.add_row(name, "-" if value is None else f"{value:.4f}")
    for change in metrics.sae.latents:
        table.add_row(f"latent {change.latent} before → after", f"{change.before:.3f} → {change.after:.3f}")
    for stage, seconds in metrics.timings_s.items():
        table.add_row(f"{stage} s", f"{seconds:.3f}")
    return table


def steer(
    image: Annotated[Path, typer.Option(exists=True, dir_okay=False, help="Image file to ask about.")],
    prompt: Annotated[str, typer.Option(help="Question for the model.")] = "What is in the image?",
    model: Annotated[str | None, typer.Option(help="LLaVA hub id or directory (default: the demo model).")] = None,
    sae: Annotated[str | None, typer.Option(help="SAE checkpoint directory or hub id (default: the demo SAE).")] = None,
    pin: Annotated[list[str] | None, typer.Option(help="LATENT=VALUE: set the latent to VALUE (the paper's clamp).")]
    = None,
    nudge: Annotated[list[str] | None, typer.Option(help="LATENT=VALUE: add VALUE to the latent.")] = None,
    mul: Annotated[list[str] | None, typer.Option(help="LATENT=VALUE: multiply the latent by VALUE.")] = None,
    tokens: Annotated[str, typer.Option(help="Tokens to edit: all, cls, patches or indices like 0,3,4.")] = "all",
    error_term: Annotated[bool, typer.Option("--error-term", help="Keep the SAE's error: x + Δf·W_dec.")] = False,
    pre_zero: Annotated[bool, typer.Option("--pre-zero", help="Zero all latents before the edits.")] = False,
    max_tokens: Annotated[int, typer.Option(min=1, help="Most tokens to generate.")] = 64,
    temperature: Annotated[float, typer.Option(min=0.0, help="0 is greedy.")] = 0.0,
    seed: Annotated[int | None, typer.Option(help="Sampling seed.")] = None,
    device: Annotated[str, typer.Option(help="cpu, cuda, cuda:1, ...")] = "cpu",
    dtype: Annotated[str | None, typer.Option(help="fp32, fp16 or bf16 (default: fp32 on CPU, fp16 on GPU).")] = None,
    backend: Annotated[str, typer.Option(help="transformers, or vllm (GPU; needs the vllm extra).")] = "transformers",
    layer: Annotated[int | None, typer.Option(help="The SAE's block, when its checkpoint does not record it.")] = None,
) -> None:
    """Print the steered and the unsteered answers side by side, then the statistics."""
    from service.engine.engine import SteeringEngine, steer_one

    edits = [edit for mode, items in (("pin", pin), ("nudge", nudge), ("mul", mul))
             for edit in parse_edits(mode, items or [], tokens)]
    model = _default_path(model, "DEMO_MODEL_DIR", "--model")
    sae = _default_path(sae, "DEMO_SAE_DIR", "--sae")
    console = Console()
    try:
        picture = Image.open(image)
    except UnidentifiedImageError as err:
        raise fail(str(err), EXIT_CODES[ErrorKind.INVALID], "--image") from None
    with reported_errors({"layer": "--layer", "d_in": "--sae", "model": "--model"}):
        engine = SteeringEngine.load(model, {"sae": sae}, backend=backend, device=device, dtype=dtype,
                                     sae_layers=None if layer is None else {"sae": layer})
        spec = SteerSpec(interventions=edits, use_error_term=error_term, pre_zero=pre_zero, want_default=True)
        result = steer_one(engine, picture, prompt, spec, SamplingParams(max_tokens=max_tokens,
                                                                         temperature=temperature, seed=seed))
    answers = Table(title=f"{prompt}")
    answers.add_column("steered")
    answers.add_column("unsteered")
    answers.add_row(result.output("STEERED").text, result.output("DEFAULT").text)
    console.print(answers)
    console.print(_stats_table(result))
