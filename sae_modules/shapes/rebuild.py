"""The whole demo rebuild: CLIP tower -> projector alignment -> instruction tuning -> SAE -> manifest.

Deterministic for a given recipe on a given CPU type (fixed threads, deterministic kernels,
seeded streams); the result lands in `out/clip`, `out/model`, `out/sae` and `out/MANIFEST.json`,
each swapped in only when complete (`sae_modules.atomic_file.write_folder`). `rebuild_clip` reruns
stage 1 alone, which is how assets built before the CLIP was shipped gain it without retraining the
rest; `rebuild_sae` reruns stage 4 alone on the shipped model, for a new SAE recipe.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoProcessor, LlavaForConditionalGeneration

from sae_modules.atomic_file import write_folder
from sae_modules.formats.detect import load_sae
from sae_modules.shapes.builder import build_llava, build_processor, build_tokenizer
from sae_modules.shapes.evaluate import HELD_OUT_SEED, answer_accuracy
from sae_modules.shapes.manifest import ManifestError, verify_manifest, write_manifest
from sae_modules.shapes.prompts import vocabulary
from sae_modules.shapes.recipe import Recipe, make_deterministic
from sae_modules.shapes.stage_align import align_projector
from sae_modules.shapes.stage_clip import save_clip, train_clip, vision_tower
from sae_modules.shapes.stage_instruct import instruct
from sae_modules.shapes.stage_sae import HOLDOUT, SAE_LAYER, train_demo_sae

REBUILD_COMMAND = "make demo-model"
CLIP_COMMAND = "python -m sae_modules.shapes.cli --clip-only"
SAE_COMMAND = "python -m sae_modules.shapes.cli --sae-only"
SAE_FIGURES = ("fvu", "l0", "dead_fraction", "dense_fraction", "n_vectors")


def rebuild(out: Path, recipe: Recipe, eval_images: int = 200, progress: bool = True) -> dict:
    """Train the demo LLaVA and its SAE into `out`; returns the manifest record."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    previous_threads = torch.get_num_threads()
    make_deterministic(recipe)
    timings: dict[str, float] = {}
    figures: dict[str, float] = {}
    load_before = os.getloadavg()[0]
    started = time.perf_counter()
    try:
        processor = build_processor(build_tokenizer(vocabulary()), recipe.image_size, recipe.patch_size)
        tick = time.perf_counter()
        clip, stats = train_clip(recipe, processor, progress)
        figures |= stats
        timings["clip"] = time.perf_counter() - tick
        write_folder(out / "clip", lambda staging: save_clip(clip, processor, staging))

        model = build_llava(
            processor,
            vision=recipe.vision,
            text=recipe.text,
            vision_feature_layer=SAE_LAYER,
            seed=recipe.seed,
        )
        model.model.vision_tower.load_state_dict(vision_tower(clip).state_dict())
        tick = time.perf_counter()
        figures |= align_projector(model, processor, recipe, progress)
        timings["align"] = time.perf_counter() - tick
        tick = time.perf_counter()
        figures |= instruct(model, processor, recipe, progress)
        timings["instruct"] = time.perf_counter() - tick

        def save_model(staging: Path) -> None:
            model.save_pretrained(staging)
            processor.save_pretrained(staging)

        write_folder(out / "model", save_model)
        tick = time.perf_counter()
        sae_figures = _train_and_ship_sae(out, recipe, progress)
        timings["sae"] = time.perf_counter() - tick

        tick = time.perf_counter()
        loaded = LlavaForConditionalGeneration.from_pretrained(out / "model").eval()
        accuracy = answer_accuracy(
            loaded, AutoProcessor.from_pretrained(out / "model"), count=eval_images, world_size=recipe.world_size,
            progress=progress,
        )  # fmt: skip
        timings["evaluate"] = time.perf_counter() - tick
    finally:
        torch.set_num_threads(previous_threads)
    record = {
        "format": "vlm-steer-demo/1",
        "seed": recipe.seed,
        "command": REBUILD_COMMAND,
        "recipe": recipe.to_dict(),
        "sae_layer": SAE_LAYER,
        "accuracy": {"held_out_seed": HELD_OUT_SEED, "images": eval_images, **accuracy},
        "sae": sae_figures,
        "training": figures,
        "seconds": {k: round(v, 1) for k, v in timings.items()}
        | {"total": round(time.perf_counter() - started, 1)},
        "machine": {
            "cpu_count": os.cpu_count(),
            "torch_threads": recipe.threads,
            "load_average_start": round(load_before, 2),
            "load_average_end": round(os.getloadavg()[0], 2),
            "platform": platform.platform(),
            "torch": torch.__version__,
        },
    }
    write_manifest(out, record)
    return record


def rebuild_clip(out: Path, recipe: Recipe, progress: bool = True) -> dict:
    """Rerun stage 1 alone into `out/clip` and add its files to the manifest; returns the manifest record.

    Refuses a recipe other than the manifest's, and refuses to ship a CLIP whose final loss and
    accuracy differ from the recorded stage 1: only then is it the CLIP the shipped model started from.
    """
    out = Path(out)
    record = verify_manifest(out)
    if record["recipe"] != json.loads(json.dumps(recipe.to_dict())):
        raise ManifestError(f"recipe: differs from the one recorded in {out / 'MANIFEST.json'}")
    previous_threads = torch.get_num_threads()
    make_deterministic(recipe)
    started = time.perf_counter()
    try:
        processor = build_processor(build_tokenizer(vocabulary()), recipe.image_size, recipe.patch_size)
        clip, stats = train_clip(recipe, processor, progress)
    finally:
        torch.set_num_threads(previous_threads)
    recorded = {name: record["training"].get(name) for name in stats}
    if stats != recorded:
        raise ManifestError(
            f"clip: stage 1 gave {stats}, the shipped build recorded {recorded}; "
            f"run `{REBUILD_COMMAND}` on this machine instead"
        )
    write_folder(out / "clip", lambda staging: save_clip(clip, processor, staging))
    record = {key: value for key, value in record.items() if key not in ("files", "total_bytes")}
    record["clip_rebuild"] = {
        "command": CLIP_COMMAND,
        "seconds": round(time.perf_counter() - started, 1),
        "load_average_end": round(os.getloadavg()[0], 2),
    }
    write_manifest(out, record)
    return record


def rebuild_sae(out: Path, recipe: Recipe, progress: bool = True) -> dict:
    """Rerun stage 4 alone on the shipped `out/model`, swap in the new `out/sae`, update the manifest.

    Only the `sae_*` settings of `recipe` may differ from the recorded recipe: anything else would
    have made another model, and the SAE must be the one `make demo-model` makes with this recipe.
    """
    out = Path(out)
    record = verify_manifest(out)
    recorded = record["recipe"]
    wanted = json.loads(json.dumps(recipe.to_dict()))
    changed = sorted(
        name for name in wanted if wanted[name] != recorded.get(name) and not name.startswith("sae_")
    )
    if changed:
        raise ManifestError(
            f"recipe.{changed[0]}: differs from {out / 'MANIFEST.json'}; only sae_* may change"
        )
    previous_threads = torch.get_num_threads()
    make_deterministic(recipe)
    started = time.perf_counter()
    try:
        figures = _train_and_ship_sae(out, recipe, progress)
    finally:
        torch.set_num_threads(previous_threads)
    seconds = round(time.perf_counter() - started, 1)
    record = {key: value for key, value in record.items() if key not in ("files", "total_bytes")}
    record["recipe"] = wanted
    record["sae"] = figures
    record["sae_rebuild"] = {
        "command": SAE_COMMAND,
        "seconds": seconds,
        "load_average_end": round(os.getloadavg()[0], 2),
    }
    write_manifest(out, record)
    return record


def _train_and_ship_sae(out: Path, recipe: Recipe, progress: bool) -> dict:
    """Stage 4 on `out/model` into `out/sae`; returns its held-out figures for the manifest."""
    with tempfile.TemporaryDirectory(dir=out, prefix=".sae-work-") as work:
        trained = train_demo_sae(out / "model", Path(work), recipe, progress)
        metrics = load_sae(trained).cfg.metrics
        write_folder(out / "sae", lambda staging: _copy_files(trained, staging))
    return {"held_out": HOLDOUT, **{name: metrics[name] for name in SAE_FIGURES}}


def _copy_files(source: Path, staging: Path) -> None:
    for path in source.iterdir():
        shutil.copy2(path, staging / path.name)
