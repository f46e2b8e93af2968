"""Steering overhead at LLaVA-1.5's real vision shapes: (tower + edit + projector) / (tower + projector).

CLIP ViT-L/14-336 with random weights (24 blocks, 1024 wide, 577 tokens), LLaVA-1.5's projector
(1024 -> 4096 -> 4096), a 65,536-latent BatchTopK SAE at block 22 (`vision_feature_layer=-2`),
one pinned latent on every token. Both edit modes are timed against the unsteered image features
in the same process, interleaved, and the medians compared (CPU: process CPU time; CUDA: wall time):
- error-preserving fast path (encodes only the pinned latent), goal <= 1.02;
- paper mode (full encode, sparse decode of the edited reconstruction), goal <= 1.3.
Statistics are off (`want_stats=False`): they cost a full encode and are not part of the edit.

`BENCH_SMALL=1` uses 224-pixel images (257 tokens) and batches 1 and 4: the per-token costs of the
tower and the SAE, and so the ratios, stay nearly the same at under half the time. `BENCH_BATCHES=1,2`
and `BENCH_REPEATS=N` (default 3) trim it further on a busy machine.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

from sae_modules.intervention_spec import Intervention
from sae_modules.saes import SAE, SAEConfig, build_sae
from sae_modules.saes.base import SourceInfo
from service.engine.steerer import VisionSteerer
from service.engine.types import SteerSpec

SAE_LAYER = 22
TARGET_L0 = 40


@dataclass
class Shapes:
    image_size: int = 336
    vision: dict | None = None
    text_hidden: int = 4096
    n_latents: int = 65_536

    def vision_config(self) -> CLIPVisionConfig:
        base = {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24, "num_attention_heads": 16,
                "patch_size": 14, "projection_dim": 768}
        return CLIPVisionConfig(image_size=self.image_size, **{**base, **(self.vision or {})})


def build_model(shapes: Shapes, device: torch.device) -> LlavaForConditionalGeneration:
    """LLaVA-1.5's tower and projector (fp16 on GPU); a one-block stand-in language model, never run here."""
    text = LlamaConfig(hidden_size=shapes.text_hidden, intermediate_size=256, num_hidden_layers=1,
                       num_attention_heads=max(1, shapes.text_hidden // 128), vocab_size=512)
    config = LlavaConfig(vision_config=shapes.vision_config(), text_config=text, image_token_index=511,
                         vision_feature_layer=-2, vision_feature_select_strategy="default")
    torch.manual_seed(0)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    return LlavaForConditionalGeneration(config).to(device, dtype).eval()


def build_bench_sae(steerer: VisionSteerer, pixels: torch.Tensor, shapes: Shapes, layer: int) -> SAE:
    """A random BatchTopK SAE whose threshold makes about TARGET_L0 latents fire per token here."""
    d_in = steerer.model.config.vision_config.hidden_size
    cfg = SAEConfig(architecture="batchtopk", d_in=d_in, n_latents=shapes.n_latents, k=TARGET_L0,
                    source=SourceInfo(layer=layer))
    sae = build_sae(cfg).to(steerer.device).eval()
    sample = steerer.block_output(pixels[:1], layer)[0, :: max(1, steerer.n_tokens // 32)].float()
    pre = sae.pre_acts(sample)
    kth = pre.numel() - TARGET_L0 * sample.shape[0]
    sae.cfg = cfg.model_copy(update={"threshold": pre.flatten().kthvalue(kth).values.item()})
    return sae


def _seconds(fn, device: torch.device) -> float:
    """CUDA: wall time after a sync. CPU: this process's CPU time, which other jobs on a shared machine
    barely disturb (wall time there swings by 2x between repeats)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize(device)
        return time.perf_counter() - start
    start = time.process_time()
    fn()
    return time.process_time() - start


def build_steerer(shapes: Shapes, layer: int, device: torch.device) -> VisionSteerer:
    """The benchmark's model with its SAE attached as "bench"."""
    model = build_model(shapes, device)
    image = shapes.image_size
    probe = torch.randn(1, 3, image, image, generator=torch.Generator().manual_seed(0)).to(device)
    return VisionSteerer(model, {"bench": build_bench_sae(VisionSteerer(model, {}), probe, shapes, layer)})


def bench_runs(steerer: VisionSteerer, batch: int) -> dict[str, Callable[[], object]]:
    """The three timed calls at one batch size: unsteered image features, the fast path, paper mode."""
    model = steerer.model
    image = model.config.vision_config.image_size
    pin = [Intervention(latent=39, mode="pin", value=40.0)]
    modes = {
        "fast": SteerSpec(pin, sae_id="bench", use_error_term=True, want_stats=False),
        "paper": SteerSpec(pin, sae_id="bench", use_error_term=False, want_stats=False),
    }
    pixels = torch.randn(batch, 3, image, image, generator=torch.Generator().manual_seed(batch))
    pixels = pixels.to(steerer.device, steerer.dtype)
    return {
        "baseline": partial(model.get_image_features, pixel_values=pixels),
        **{name: partial(steerer.steer, pixels, [spec] * batch) for name, spec in modes.items()},
    }


def measure(shapes: Shapes, batches: tuple[int, ...], repeats: int, layer: int = SAE_LAYER,
            device: torch.device | None = None) -> list[dict]:
    """Median seconds of baseline, fast path and paper mode per batch size, and their ratios."""
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    steerer = build_steerer(shapes, layer, device)
    rows = []
    for batch in batches:
        runs = bench_runs(steerer, batch)
        times: dict[str, list[float]] = {name: [] for name in runs}
        with torch.no_grad():
            for name, run in runs.items():
                run()
            for _ in range(repeats):
                for name, run in runs.items():
                    times[name].append(_seconds(run, device))
        median = {name: statistics.median(values) for name, values in times.items()}
        rows.append({"batch": batch, **{f"{k}_s": v for k, v in median.items()},
                     "fast_ratio": median["fast"] / median["baseline"],
                     "paper_ratio": median["paper"] / median["baseline"]})
    return rows


def main() -> None:
    small = os.environ.get("BENCH_SMALL") == "1"
    shapes = Shapes(image_size=224 if small else 336)
    default_batches = "1,4" if small else "1,8"
    batches = tuple(int(b) for b in os.environ.get("BENCH_BATCHES", default_batches).split(","))
    repeats = int(os.environ.get("BENCH_REPEATS", "3"))
    device = "cuda (wall s)" if torch.cuda.is_available() else f"cpu (process CPU s, {torch.get_num_threads()} threads)"
    print(f"CLIP ViT-L/14 at {shapes.image_size}px, {shapes.n_latents} latents at block {SAE_LAYER}, "
          f"{device}, {repeats} repeats (medians)")
    print(f"{'batch':>5} {'baseline s':>11} {'fast s':>9} {'paper s':>9} {'fast ratio':>11} {'paper ratio':>12}")
    for row in measure(shapes, batches, repeats):
        print(f"{row['batch']:>5} {row['baseline_s']:>11.3f} {row['fast_s']:>9.3f} {row['paper_s']:>9.3f} "
              f"{row['fast_ratio']:>11.3f} {row['paper_ratio']:>12.3f}")
    print("goals: fast ratio <= 1.02, paper ratio <= 1.3")


if __name__ == "__main__":
    main()
