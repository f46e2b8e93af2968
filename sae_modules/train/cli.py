"""`vlm-steer train`: settings from a YAML file, each overridable by a flag of the same name.

The flags are generated from `TrainConfig` (and its `sae` section), so every setting has one and
a new setting needs no CLI code: `--k 20`, `--betas 0.9,0.99`, `--group-fractions 0.25,0.75`.
"""

from __future__ import annotations

import inspect
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer
from pydantic import BaseModel
from pydantic.fields import FieldInfo

from sae_modules.cli_errors import reported_errors
from sae_modules.formats.native import CFG_FILE, read_json
from sae_modules.train.config import TrainConfig, load_train_config

_OWN_OPTIONS = ("config", "dry_run")


def _settings(model: type[BaseModel]) -> dict[str, FieldInfo]:
    """Every leaf setting of `model` by its own name; nested sections are flattened (their
    fields are accepted at the top level, see TrainConfig)."""
    leaves: dict[str, FieldInfo] = {}
    for name, info in model.model_fields.items():
        inner = _unwrap_optional(info.annotation)
        found = _settings(inner) if isinstance(inner, type) and issubclass(inner, BaseModel) else {name: info}
        clash = (leaves.keys() & found.keys()) | (found.keys() & set(_OWN_OPTIONS))
        if clash:
            raise TypeError(f"settings {sorted(clash)} appear twice; flags need unique names")
        leaves.update(found)
    return leaves


def _unwrap_optional(annotation: Any) -> Any:
    """X for X | None and for Annotated[X, constraints] (pydantic checks the constraints)."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return _unwrap_optional(args[0]) if len(args) == 1 else str
    if typing.get_origin(annotation) is Annotated:
        return _unwrap_optional(typing.get_args(annotation)[0])
    return annotation


def _option(name: str, info: FieldInfo) -> inspect.Parameter:
    """A typer option for one setting: bools as --x/--no-x, lists as comma-separated text,
    Literal choices as text listed in the help (pydantic checks them and names the field)."""
    kind = _unwrap_optional(info.annotation)
    flag = "--" + name.replace("_", "-")
    help_text = info.description or name.replace("_", " ")
    origin = typing.get_origin(kind)
    if kind is bool:
        option, kind = typer.Option(f"{flag}/--no-{flag[2:]}", help=help_text), bool
    elif origin is typing.Literal:
        choices = ", ".join(str(c) for c in typing.get_args(kind))
        option, kind = typer.Option(flag, help=f"{help_text} (one of: {choices})"), str
    elif origin in (list, tuple):
        option, kind = typer.Option(flag, help=f"{help_text} (comma-separated)"), str
    else:
        option = typer.Option(flag, help=help_text)
    return inspect.Parameter(
        name, inspect.Parameter.KEYWORD_ONLY, default=None, annotation=Annotated[kind | None, option]
    )


def _overrides(values: dict[str, Any]) -> dict[str, Any]:
    """Flag values as settings: comma-separated text becomes a list for list-valued settings."""
    settings = _settings(TrainConfig)
    result = {}
    for name, value in values.items():
        if isinstance(value, str) and typing.get_origin(_unwrap_optional(settings[name].annotation)) in (
            list,
            tuple,
        ):
            value = [part.strip() for part in value.split(",")]
        result[name] = value
    return result


def _run(config: Path | None, dry_run: bool, **flags: Any) -> None:
    """Train an SAE on activation shards; writes OUT/sae (cfg.json + sae.safetensors), OUT/train_log.jsonl."""
    from sae_modules.train.api import train_sae
    from sae_modules.train.trainer import plan_run

    with reported_errors():
        settings = load_train_config(config, **_overrides(flags))
        if dry_run:
            typer.echo(plan_run(settings).summary())
            return
        final = train_sae(settings)
    metrics = read_json(final / CFG_FILE)["config"].get("metrics", {})
    typer.echo(f"SAE written to {final}")
    if metrics:
        typer.echo("held-out: " + ", ".join(f"{k}={v:.4g}" for k, v in metrics.items()))


def _command() -> Callable[..., None]:
    """`_run` with one keyword option per setting, in the order TrainConfig declares them."""
    own = [
        inspect.Parameter(
            "config",
            inspect.Parameter.KEYWORD_ONLY,
            default=None,
            annotation=Annotated[Path | None, typer.Option("--config", "-c", help="YAML file of settings.")],
        ),
        inspect.Parameter(
            "dry_run",
            inspect.Parameter.KEYWORD_ONLY,
            default=False,
            annotation=Annotated[
                bool,
                typer.Option(
                    "--dry-run", help="Check the settings and the shards (manifest, d_in); do not train."
                ),
            ],
        ),
    ]
    params = own + [_option(name, info) for name, info in _settings(TrainConfig).items()]

    def train(**values: Any) -> None:
        flags = {k: v for k, v in values.items() if k not in _OWN_OPTIONS}
        _run(values.get("config"), bool(values.get("dry_run")), **flags)

    train.__doc__ = _run.__doc__
    train.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    train.__annotations__ = {p.name: p.annotation for p in params}
    return train


train = _command()
