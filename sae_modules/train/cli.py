"""`vlm-steer train`: settings from a YAML file, each overridable by a flag of the same name."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from sae_modules.activations.shards import ShardError
from sae_modules.formats import CheckpointError
from sae_modules.formats.native import CFG_FILE, read_json
from sae_modules.saes.base import SAEConfigError
from sae_modules.train.config import TrainConfigError, load_train_config

_USER_ERRORS: tuple[type[Exception], ...] = (TrainConfigError, ShardError, CheckpointError, SAEConfigError)
"""Failures the user can fix; anything else is a bug and keeps its traceback."""


def _fractions(text: str | None) -> list[float] | None:
    if text is None:
        return None
    try:
        return [float(part) for part in text.split(",")]
    except ValueError:
        raise TrainConfigError(
            f"group_fractions: {text!r} is not a comma-separated list of numbers"
        ) from None


def train(
    config: Annotated[Path | None, typer.Option("--config", "-c", help="YAML file of settings.")] = None,
    shards: Annotated[Path | None, typer.Option(help="Activation shard directory.")] = None,
    out: Annotated[Path | None, typer.Option(help="Run directory (checkpoints, log, final sae/).")] = None,
    architecture: Annotated[
        str | None, typer.Option(help="relu | topk | batchtopk | matryoshka_batchtopk")
    ] = None,
    n_latents: Annotated[int | None, typer.Option(help="Dictionary size (default expansion × d_in).")] = None,
    expansion: Annotated[float | None, typer.Option(help="n_latents as a multiple of d_in.")] = None,
    k: Annotated[int | None, typer.Option(help="Active latents per sample (TopK family).")] = None,
    group_fractions: Annotated[
        str | None, typer.Option(help="Matryoshka groups, e.g. 0.0625,0.1875,0.75.")
    ] = None,
    l1_coeff: Annotated[float | None, typer.Option(help="ReLU SAE sparsity penalty.")] = None,
    auxk_alpha: Annotated[float | None, typer.Option(help="AuxK loss weight.")] = None,
    dead_window: Annotated[
        int | None, typer.Option(help="Samples without firing before a latent is dead.")
    ] = None,
    d_in: Annotated[int | None, typer.Option(help="Expected activation width (checked).")] = None,
    batch_size: Annotated[
        int | None, typer.Option(help="Vectors per optimizer step (over all workers).")
    ] = None,
    steps: Annotated[int | None, typer.Option(help="Optimizer steps.")] = None,
    epochs: Annotated[
        float | None, typer.Option(help="Passes over the training shards (if no --steps).")
    ] = None,
    lr: Annotated[float | None, typer.Option(help="Peak Adam learning rate.")] = None,
    warmup_steps: Annotated[int | None, typer.Option(help="Linear warm-up steps.")] = None,
    decay: Annotated[str | None, typer.Option(help="cosine | linear | constant")] = None,
    grad_clip: Annotated[float | None, typer.Option(help="Max gradient norm.")] = None,
    seed: Annotated[int | None, typer.Option(help="Seeds initialisation and the data order.")] = None,
    buffer_mb: Annotated[float | None, typer.Option(help="Shuffle buffer size in MiB.")] = None,
    holdout: Annotated[
        float | None, typer.Option(help="Held-out fraction of vectors for the final evaluation.")
    ] = None,
    holdout_shards: Annotated[
        int | None, typer.Option(help="Held-out last shards (if no --holdout).")
    ] = None,
    checkpoint_every: Annotated[int | None, typer.Option(help="Steps between checkpoints.")] = None,
    log_every: Annotated[int | None, typer.Option(help="Steps between log lines.")] = None,
    resume: Annotated[
        bool | None, typer.Option("--resume/--no-resume", help="Continue from the last checkpoint.")
    ] = None,
    workers: Annotated[
        int | None, typer.Option(help="Ray Train data-parallel workers (1 = in-process).")
    ] = None,
    device: Annotated[str | None, typer.Option(help="cpu, cuda, cuda:1, ...")] = None,
    threads: Annotated[int | None, typer.Option(help="torch CPU threads per process.")] = None,
    progress: Annotated[
        bool | None, typer.Option("--progress/--no-progress", help="Show a progress bar.")
    ] = None,
    dry_run: Annotated[
        bool,
        typer.Option("--dry-run", help="Check the settings and the shards (manifest, d_in), then exit without training."),
    ] = False,
) -> None:
    """Train an SAE on activation shards; writes OUT/sae (cfg.json + sae.safetensors) and OUT/train_log.jsonl."""
    overrides = {k: v for k, v in locals().items() if k not in ("config", "dry_run")}
    from sae_modules.train.api import train_sae
    from sae_modules.train.trainer import plan_run

    try:
        overrides["group_fractions"] = _fractions(group_fractions)
        settings = load_train_config(config, **overrides)
        if dry_run:
            typer.echo(plan_run(settings).summary())
            return
        final = train_sae(settings)
    except _USER_ERRORS as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(2) from None
    metrics = read_json(final / CFG_FILE)["config"].get("metrics", {})
    typer.echo(f"SAE written to {final}")
    if metrics:
        typer.echo("held-out: " + ", ".join(f"{k}={v:.4g}" for k, v in metrics.items()))
