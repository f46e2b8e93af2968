"""SAELens checkpoints (`cfg.json` + `sae_weights.safetensors`): read every inference architecture
SAELens saves (standard, topk, jumprelu, gated) and write ours in SAELens' current (6.x) schema.

Reading maps SAELens' options onto our module without changing what `encode` computes:
`apply_b_dec_to_input=false` is folded into the encoder bias (our encoder always subtracts b_dec),
a pre-6 `finetuning_scaling_factor` is folded into the decoder rows, and topk's
`rescale_acts_by_decoder_norm` is folded in as SAELens' own `fold_W_dec_norm` does (encoder
columns and b_enc times the decoder row norms, decoder rows divided by them): the selection and
the reconstruction are unchanged, and the latents come out exactly as SAELens reports them.
Options that need information a checkpoint does not carry (a dataset norm, per-token
normalisation) are refused.

Writing keeps our whole SAEConfig under `metadata.vlm_steer_config`, so exporting and importing
back gives the same architecture, config and tensors. BatchTopK and Matryoshka are written as
jumprelu with θ on every latent, as SAELens itself saves them.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import Tensor

from sae_modules.formats.errors import CheckpointError
from sae_modules.formats.reading import (
    build_and_load,
    check_tensors,
    parse_config,
    read_json,
    read_safetensors,
)
from sae_modules.formats.writing import write_checkpoint_dir
from sae_modules.saes.base import SAE, SAEConfig

CFG_FILE = "cfg.json"
WEIGHTS_FILE = "sae_weights.safetensors"
#: The SAELens schema we write; SAELens reads configs without a >= 6 version as its older layout.
SCHEMA_VERSION = "6.0.0"
OUR_CONFIG_KEY = "vlm_steer_config"

_TO_OURS = {"standard": "relu", "topk": "topk", "jumprelu": "jumprelu", "gated": "gated"}
_TO_SAELENS = {
    "relu": "standard",
    "topk": "topk",
    "batchtopk": "jumprelu",
    "matryoshka_batchtopk": "jumprelu",
    "jumprelu": "jumprelu",
    "gated": "gated",
}
_PRE6_RENAMES = {
    "hook_point": "hook_name",
    "hook_point_head_index": "hook_head_index",
    "activation_fn_str": "activation_fn",
}
_PRE6_METADATA = ("model_name", "hook_name", "hook_head_index", "dataset_path", "context_size", "prepend_bos")
_HOOK_LAYER = re.compile(r"blocks\.(-?\d+)\.")


def _is_pre6(raw: dict[str, Any]) -> bool:
    metadata = raw.get("metadata")
    version = raw.get("sae_lens_version") or (
        metadata.get("sae_lens_version") if isinstance(metadata, dict) else None
    )
    match = re.match(r"\s*(\d+)", str(version or ""))
    return match is None or int(match.group(1)) < 6


def _normalise(raw: dict[str, Any], where: str) -> dict[str, Any]:
    """One flat view of pre-6 and 6.x configs: the fields reading needs, with metadata as a dict."""
    if _is_pre6(raw):
        cfg = {_PRE6_RENAMES.get(k, k): v for k, v in raw.items()}
        cfg["metadata"] = {k: cfg[k] for k in _PRE6_METADATA if k in cfg}
        activation = cfg.get("activation_fn", "relu")
        kwargs = cfg.get("activation_fn_kwargs") or {}
        cfg.setdefault("architecture", "standard")
        if activation == "topk":
            cfg["architecture"] = "topk"
            cfg.setdefault("k", kwargs.get("k"))
        elif activation != "relu":
            raise CheckpointError(
                f"{where}: activation_fn {activation!r} is not supported (only relu and topk)"
            )
        normalise = cfg.get("normalize_activations")
        cfg["normalize_activations"] = {None: "none", False: "none", True: "expected_average_only_in"}.get(
            normalise, normalise
        )
    else:
        cfg = dict(raw)
        if not isinstance(cfg.get("metadata"), dict):
            raise CheckpointError(f"{where}: SAELens >= 6 config has no 'metadata' object")
    if cfg.get("architecture") == "topk":
        cfg.setdefault("k", 100)  # TopKSAEConfig's defaults
        cfg.setdefault("rescale_acts_by_decoder_norm", False)
    cfg.setdefault("apply_b_dec_to_input", True)
    cfg.setdefault("normalize_activations", "none")
    cfg.setdefault("reshape_activations", "none")
    return cfg


def _refuse_unsupported(cfg: dict[str, Any], where: str) -> None:
    architecture = cfg.get("architecture")
    if architecture in ("batchtopk", "matryoshka_batchtopk"):
        raise CheckpointError(
            f"{where}: architecture {architecture!r} is a SAELens training checkpoint, whose encode "
            "picks the top k over the whole batch; save it for inference "
            "(TrainingSAE.save_inference_model writes jumprelu)"
        )
    if architecture not in _TO_OURS:
        raise CheckpointError(
            f"{where}: SAELens architecture {architecture!r} is not supported "
            f"(supported: {', '.join(_TO_OURS)})"
        )
    for field in ("d_in", "d_sae"):
        if not isinstance(cfg.get(field), int) or isinstance(cfg.get(field), bool) or cfg[field] <= 0:
            raise CheckpointError(
                f"{where}: field {field!r} must be a positive integer, got {cfg.get(field)!r}"
            )
    normalise = cfg["normalize_activations"]
    if normalise == "expected_average_only_in":
        raise CheckpointError(
            f"{where}: normalize_activations='expected_average_only_in' needs the dataset norm "
            "scaling factor, "
            "which SAELens does not store in the checkpoint; fold it in with "
            "sae.fold_activation_norm_scaling_factor(factor) and save again"
        )
    if normalise != "none":
        raise CheckpointError(
            f"{where}: normalize_activations={normalise!r} rescales every token by its own statistics "
            "before encoding and after decoding; only 'none' is supported"
        )
    if cfg["reshape_activations"] != "none":
        raise CheckpointError(
            f"{where}: reshape_activations={cfg['reshape_activations']!r} (attention-head outputs) "
            "is not supported"
        )
    if not isinstance(cfg["apply_b_dec_to_input"], bool):
        raise CheckpointError(f"{where}: field 'apply_b_dec_to_input' must be true or false")


def _expected_shapes(architecture: str, d_in: int, d_sae: int) -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {"W_enc": (d_in, d_sae), "W_dec": (d_sae, d_in), "b_dec": (d_in,)}
    if architecture == "gated":
        return shapes | {"b_gate": (d_sae,), "b_mag": (d_sae,), "r_mag": (d_sae,)}
    shapes["b_enc"] = (d_sae,)
    if architecture == "jumprelu":
        shapes["threshold"] = (d_sae,)
    return shapes


def _our_config(cfg: dict[str, Any], threshold: Tensor | None, where: str) -> SAEConfig:
    """Our config: the exact one we wrote on export if present, else one built from SAELens' fields."""
    metadata = cfg["metadata"]
    architecture = _TO_OURS[cfg["architecture"]]
    if OUR_CONFIG_KEY in metadata:
        ours = parse_config(metadata[OUR_CONFIG_KEY], f"{where} (metadata.{OUR_CONFIG_KEY})")
        topk_matches = ours.architecture != "topk" or (ours.k, ours.rescale_acts_by_decoder_norm) == (
            cfg["k"],
            cfg["rescale_acts_by_decoder_norm"],
        )
        threshold_matches = ours.threshold is None or (
            threshold is not None and torch.equal(threshold, torch.full_like(threshold, ours.threshold))
        )
        consistent = (
            _TO_SAELENS[ours.architecture] == cfg["architecture"]
            and (ours.d_in, ours.n_latents) == (cfg["d_in"], cfg["d_sae"])
            and topk_matches
            and threshold_matches
        )
        if not consistent:
            raise CheckpointError(
                f"{where}: metadata.{OUR_CONFIG_KEY} disagrees with the SAELens fields or weights"
            )
        return ours
    hook = metadata.get("hook_name") or ""
    layer = _HOOK_LAYER.search(hook)
    fields: dict[str, Any] = {
        "architecture": architecture,
        "d_in": cfg["d_in"],
        "n_latents": cfg["d_sae"],
        "source": {
            "model_id": metadata.get("model_name"),
            "layer": int(layer.group(1)) if layer else None,
            "dataset": metadata.get("dataset_path"),
        },
    }
    if architecture == "topk":
        fields["k"] = cfg["k"]
    return parse_config(fields, where)


def load_saelens(directory: Path) -> SAE:
    cfg_path, weights_path = directory / CFG_FILE, directory / WEIGHTS_FILE
    cfg = _normalise(read_json(cfg_path), str(cfg_path))
    _refuse_unsupported(cfg, str(cfg_path))
    architecture, d_in, d_sae = cfg["architecture"], cfg["d_in"], cfg["d_sae"]
    tensors = read_safetensors(weights_path)
    scale = tensors.pop("finetuning_scaling_factor", tensors.pop("scaling_factor", None))
    expected = _expected_shapes(architecture, d_in, d_sae)
    unexpected = sorted(set(tensors) - set(expected))
    if unexpected:
        raise CheckpointError(f"{weights_path} has unexpected tensor(s) {', '.join(map(repr, unexpected))}")
    check_tensors(
        tensors,
        expected,
        str(weights_path),
        f"{cfg_path} (architecture={architecture!r}, d_in={d_in}, d_sae={d_sae})",
    )
    tensors = {name: t.to(torch.float32) for name, t in tensors.items()}
    if scale is not None:
        check_tensors({"scaling_factor": scale}, {"scaling_factor": (d_sae,)}, str(weights_path), "d_sae")
        tensors["W_dec"] = tensors["W_dec"] * scale.to(torch.float32)[:, None]
    if architecture == "gated":
        tensors["b_enc"] = tensors.pop("b_gate")
    if architecture == "topk" and cfg["rescale_acts_by_decoder_norm"]:
        norms = tensors["W_dec"].norm(dim=1).clamp_min(1e-8)
        tensors["W_enc"], tensors["b_enc"] = tensors["W_enc"] * norms, tensors["b_enc"] * norms
        tensors["W_dec"] = tensors["W_dec"] / norms[:, None]
        cfg = cfg | {"rescale_acts_by_decoder_norm": False}
    if not cfg["apply_b_dec_to_input"]:
        shift = tensors["b_dec"] @ tensors["W_enc"]
        tensors["b_enc"] = tensors["b_enc"] + shift
        if architecture == "gated":
            tensors["b_mag"] = tensors["b_mag"] + shift * tensors["r_mag"].exp()
    ours = _our_config(cfg, tensors.get("threshold"), str(cfg_path))
    if ours.architecture in ("batchtopk", "matryoshka_batchtopk"):
        del tensors["threshold"]
    return build_and_load(ours, tensors, str(weights_path))


def _hook_name(cfg: SAEConfig) -> str | None:
    """SAELens names residual-stream hooks by block; the image embedding ('last') has no such name."""
    return None if not isinstance(cfg.source.layer, int) else f"blocks.{cfg.source.layer}.hook_resid_post"


def saelens_layout(sae: SAE) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """The cfg.json dict and tensors SAELens' `SAE.load_from_disk` reads for this SAE."""
    cfg = sae.cfg
    state = {name: t.detach().to("cpu", torch.float32).contiguous() for name, t in sae.state_dict().items()}
    tensors = {name: state[name] for name in ("W_enc", "W_dec", "b_dec")}
    architecture = _TO_SAELENS[cfg.architecture]
    extra: dict[str, Any] = {}
    metadata: dict[str, Any] = {
        "sae_lens_version": SCHEMA_VERSION,
        "sae_lens_training_version": SCHEMA_VERSION,
        "model_name": cfg.source.model_id,
        "hook_name": _hook_name(cfg),
        "hook_head_index": None,
        "dataset_path": cfg.source.dataset,
        OUR_CONFIG_KEY: cfg.model_dump(mode="json"),
    }
    if architecture == "gated":
        tensors |= {"b_gate": state["b_enc"], "b_mag": state["b_mag"], "r_mag": state["r_mag"]}
    else:
        tensors["b_enc"] = state["b_enc"]
    if cfg.architecture == "topk":
        extra = {"k": cfg.k, "rescale_acts_by_decoder_norm": cfg.rescale_acts_by_decoder_norm}
    elif cfg.architecture == "jumprelu":
        tensors["threshold"] = state["threshold"]
    elif architecture == "jumprelu":
        if cfg.threshold is None:
            raise CheckpointError(f"{cfg.architecture} SAE has no inference threshold θ yet (train it first)")
        tensors["threshold"] = torch.full((cfg.n_latents,), cfg.threshold, dtype=torch.float32)
        metadata["training_architecture"] = cfg.architecture
        metadata["training_architecture_details"] = {"k": cfg.k}
        if cfg.group_sizes:
            widths = torch.tensor(cfg.group_sizes).cumsum(0).tolist()
            metadata["training_architecture_details"]["matryoshka_widths"] = widths
    layout = {
        "architecture": architecture,
        "d_in": cfg.d_in,
        "d_sae": cfg.n_latents,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": True,
        "normalize_activations": "none",
        "reshape_activations": "none",
        **extra,
        "metadata": metadata,
    }
    return layout, tensors


def export_saelens(sae: SAE, path: str | Path) -> Path:
    """Write `sae` in SAELens' layout to the directory `path`, atomically."""
    path = Path(path)
    layout, tensors = saelens_layout(sae)

    def fill(staging: Path) -> None:
        save_file(tensors, staging / WEIGHTS_FILE)
        (staging / CFG_FILE).write_text(json.dumps(layout, indent=2) + "\n")

    write_checkpoint_dir(path, fill)
    return path
