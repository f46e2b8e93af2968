"""EleutherAI sparsify checkpoints: a folder with `cfg.json` (SparseCoderConfig fields plus `d_in`)
and `sae.safetensors` (`encoder.weight` [n, d_in], `encoder.bias`, `W_dec` [n, d_in], `b_dec`).

sparsify's encode is `topk(relu(encoder(x - b_dec)), k)`, our TopK SAE's selection, so its SAEs
load as `topk` with their `k`. A training run saves one such folder per hookpoint under the run
folder (`layers.5/`, `vision_model.encoder.layers.22/`, ...) next to the run's `config.json`; a
hookpoint that names a block's output (`...layers.N`) gives the SAE's layer N, and the run's
`model` and `dataset` fill in where the activations came from.

The file names are the same as our native layout's; `detect.py` tells them apart by cfg.json's
content (ours carries `"format": "vlm-steer-sae"`, sparsify's a top-level `d_in`).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from sae_modules.formats.errors import CheckpointError
from sae_modules.formats.reading import (
    build_and_load,
    check_tensors,
    parse_config,
    read_json,
    read_safetensors,
)
from sae_modules.formats.writing import write_checkpoint_dir
from sae_modules.saes.base import SAE

CFG_FILE = "cfg.json"
WEIGHTS_FILE = "sae.safetensors"
RUN_CONFIG_FILE = "config.json"
_BLOCK_HOOKPOINT = re.compile(r"(?:^|\.)(?:layers|h|blocks)\.(\d+)$")


def is_sparsify_config(cfg: dict[str, Any]) -> bool:
    """sparsify writes `d_in` beside the SparseCoderConfig fields and no format tag."""
    return "format" not in cfg and "d_in" in cfg and ("k" in cfg or "activation" in cfg)


def _int_field(cfg: dict[str, Any], name: str, where: str, default: int | None = None) -> int:
    value = cfg.get(name, default)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise CheckpointError(f"{where}: field {name!r} must be a non-negative integer, got {value!r}")
    return value


def _refuse_unsupported(cfg: dict[str, Any], where: str) -> None:
    activation = cfg.get("activation", "topk")
    if activation != "topk":
        raise CheckpointError(
            f"{where}: activation {activation!r} is not supported (only sparsify's 'topk'; "
            "'groupmax' takes one latent per group)"
        )
    if cfg.get("transcode"):
        raise CheckpointError(
            f"{where}: this is a transcoder (transcode=true): it predicts another module's output, so it "
            "cannot replace the activations it reads"
        )
    if cfg.get("skip_connection"):
        raise CheckpointError(
            f"{where}: skip_connection=true adds a linear skip term (W_skip) our SAEs do not have"
        )


def _source(directory: Path) -> dict[str, Any]:
    """Layer from the hookpoint folder's name; model and dataset from the run's config.json."""
    block = _BLOCK_HOOKPOINT.search(directory.name)
    source: dict[str, Any] = {"layer": int(block.group(1)) if block else None}
    run_config = directory.parent / RUN_CONFIG_FILE
    if run_config.is_file():
        run = read_json(run_config)
        for ours, theirs in (("model_id", "model"), ("dataset", "dataset")):
            if isinstance(run.get(theirs), str) and run[theirs]:
                source[ours] = run[theirs]
    return source


def load_sparsify(directory: Path) -> SAE:
    cfg_path, weights_path = directory / CFG_FILE, directory / WEIGHTS_FILE
    cfg = read_json(cfg_path)
    where = str(cfg_path)
    _refuse_unsupported(cfg, where)
    d_in = _int_field(cfg, "d_in", where)
    n = _int_field(cfg, "num_latents", where, 0) or d_in * _int_field(cfg, "expansion_factor", where, 32)
    k = _int_field(cfg, "k", where, 32)
    tensors = read_safetensors(weights_path)
    expected = {"encoder.weight": (n, d_in), "encoder.bias": (n,), "W_dec": (n, d_in), "b_dec": (d_in,)}
    if "W_dec" not in tensors and "encoder.weight" in tensors:
        raise CheckpointError(f"{weights_path} has no decoder (W_dec): it was saved without one")
    check_tensors(tensors, expected, str(weights_path), f"{cfg_path} (d_in={d_in}, num_latents={n})")
    unexpected = sorted(set(tensors) - set(expected))
    if unexpected:
        raise CheckpointError(f"{weights_path} has unexpected tensor(s) {', '.join(map(repr, unexpected))}")
    ours = parse_config(
        {"architecture": "topk", "d_in": d_in, "n_latents": n, "k": k, "source": _source(directory)}, where
    )
    weights = {
        "W_enc": tensors["encoder.weight"].T.contiguous(),
        "b_enc": tensors["encoder.bias"],
        "W_dec": tensors["W_dec"],
        "b_dec": tensors["b_dec"],
    }
    return build_and_load(ours, {name: t.to(torch.float32) for name, t in weights.items()}, str(weights_path))


def sparsify_layout(sae: SAE) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The cfg.json dict and tensors sparsify's `SparseCoder.load_from_disk` reads for this SAE."""
    cfg = sae.cfg
    if cfg.architecture != "topk":
        raise CheckpointError(
            f"a {cfg.architecture} SAE cannot be written for sparsify, whose only encoder is per-sample "
            "top-k; export it as saelens (BatchTopK and Matryoshka become jumprelu there)"
        )
    state = {name: t.detach().to("cpu", torch.float32) for name, t in sae.state_dict().items()}
    layout = {
        "activation": "topk",
        "expansion_factor": max(1, cfg.n_latents // cfg.d_in),
        "normalize_decoder": True,
        "num_latents": cfg.n_latents,
        "k": cfg.k,
        "multi_topk": False,
        "skip_connection": False,
        "transcode": False,
        "d_in": cfg.d_in,
    }
    tensors = {
        "encoder.weight": state["W_enc"].T.contiguous(),
        "encoder.bias": state["b_enc"].contiguous(),
        "W_dec": state["W_dec"].contiguous(),
        "b_dec": state["b_dec"].contiguous(),
    }
    return layout, tensors


def export_sparsify(sae: SAE, path: str | Path) -> Path:
    """Write a TopK `sae` as one sparsify hookpoint folder at `path`, atomically."""
    path = Path(path)
    layout, tensors = sparsify_layout(sae)

    def fill(staging: Path) -> None:
        save_file(tensors, staging / WEIGHTS_FILE)
        (staging / CFG_FILE).write_text(json.dumps(layout) + "\n")

    write_checkpoint_dir(path, fill)
    return path
